"""``python -m app --run RUN_DIR [--host H] [--port P] [--auth user:pass]`` (also ``cdretrieval serve``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser(prog: str = "python -m app") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve the cross-domain image search UI (and its /search HTTP API) for a trained run.",
    )
    p.add_argument("--run", required=True, help="run folder with checkpoint.pt and index/ (cdretrieval index)")
    p.add_argument("--index-dir", default=None, help="index folder if not RUN_DIR/index")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--auth", default=None, metavar="USER:PASS",
        help="require this login (default: $CDRETRIEVAL_AUTH when set, else no login)",
    )
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (use with --auth)")
    p.add_argument("--max-upload-mb", type=int, default=10, help="largest accepted upload in MB (default 10)")
    p.add_argument("--device", default="auto", help="torch device for query embedding (default auto)")
    p.add_argument("--open-browser", action="store_true", help="open the page in the default browser")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m app") -> int:
    """Parse ``argv`` and serve until interrupted; returns a process exit code (2 on a usage/run error)."""
    args = build_parser(prog).parse_args(argv)
    from app.ports import check_port_free
    from cdretrieval.cli import EXPECTED_ERRORS, error_message

    try:
        check_port_free(args.host, args.port)  # before any heavy import or loading: a busy port fails at once
    except (OSError, ValueError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    print("[serve] starting: importing gradio and torch", flush=True)
    # Imported here so that `--help` is fast and argument errors don't pay for torch/gradio imports.
    from app.server import launch_app, parse_auth

    try:
        auth = parse_auth(args.auth)
        launch_app(
            args.run, host=args.host, port=args.port, auth=auth, share=args.share,
            max_upload_mb=args.max_upload_mb, open_browser=args.open_browser,
            index_dir=args.index_dir, device=args.device,
        )
    except EXPECTED_ERRORS as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
