"""``cdretrieval <command>``: each command is one call into the library (see ``--help``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from cdretrieval import __version__
from cdretrieval.errors import CDRetrievalError

Handler = Callable[[argparse.Namespace], int]


def _cmd_data(args: argparse.Namespace) -> int:
    """Describe a data set (domains, images, classes), or generate the embedded demo data."""
    from cdretrieval.data.demo import generate_demo_data
    from cdretrieval.data.digits import resolve_data_root
    from cdretrieval.data.folders import parse_domains, scan_domains

    root = generate_demo_data(args.out) if args.demo else resolve_data_root(args.data)
    data = scan_domains(root, parse_domains(args.domains), args.split)
    info = {
        "root": str(root),
        "domains": {
            d: {"images": len(s), "classes": len({x.label for x in s if x.label is not None})}
            for d, s in data.items()
        },
    }
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdretrieval",
        description="Unsupervised cross-domain image retrieval: pretrain (CDS + PCS), index, search, serve.",
    )
    parser.add_argument("--version", action="version", version=f"cdretrieval {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="describe a data set, or generate the embedded demo data (--demo)")
    p.add_argument("--data", default=None, help="data root: ROOT/<domain>/[<class>/]<image>, or a folder of .npz")
    p.add_argument("--domains", default=None, help="comma-separated domain names (default: all)")
    p.add_argument("--split", default=None, help="read <domain>_<split>.txt lists")
    p.add_argument("--demo", action="store_true", help="generate (once) and describe the demo data set")
    p.add_argument("--out", default=None, help="with --demo: where to write it (default: the cache)")
    p.set_defaults(func=_cmd_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "data" and not args.demo and not args.data:
        parser.error("data: give --data ROOT or --demo")
    func: Handler = args.func
    try:
        return func(args)
    except CDRetrievalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
