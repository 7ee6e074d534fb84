"""``cdretrieval <command>``: each command is one call into the library (see ``--help``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from cdretrieval import __version__
from cdretrieval.errors import CDRetrievalError

if TYPE_CHECKING:
    from cdretrieval.config import RunConfig as RunConfigT
    from cdretrieval.rerank import RerankParams

Handler = Callable[[argparse.Namespace], int]

#: Printed under the ``evaluate`` table: why P@15 may exceed P@5.
P_AT_K_NOTE = (
    "P@k = relevant images among the top k / min(k, #relevant images in the gallery), so a class with few "
    "gallery images can still reach 1 and P@k may grow with k."
)
#: Exit status after the reader of our stdout went away (``search --json | head``): 128 + SIGPIPE.
EXIT_BROKEN_PIPE = 141


# ---------------------------------------------------------------------------------------------------------
# Argument types: bad values are reported by argparse as ``error: ...`` with exit status 2.


def _checked(convert: Callable[[str], float], ok: Callable[[float], bool], what: str, text: str) -> float:
    """Parse ``text`` with ``convert`` and check it with ``ok``; else argparse's ``expected <what>`` error."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return int(_checked(int, lambda v: v >= 1, "a positive integer", text))


def _non_negative_int(text: str) -> int:
    return int(_checked(int, lambda v: v >= 0, "an integer ≥ 0", text))


def _positive_float(text: str) -> float:
    return _checked(float, lambda v: v > 0, "a positive number", text)


def _non_negative_float(text: str) -> float:
    return _checked(float, lambda v: math.isfinite(v) and v >= 0, "a number ≥ 0", text)


def _int_list(text: str) -> list[int]:
    """``"1,5,15"`` → ``[1, 5, 15]`` (positive integers)."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return [_positive_int(t) for t in parts]


def _device(text: str) -> str:
    from cdretrieval.device import resolve_device

    try:
        resolve_device(text)
    except (ValueError, RuntimeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Options every embedding command shares."""
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--num-workers", type=_non_negative_int, default=2, help="image decoding workers (default 2)")
    p.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda[:i] (default auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


#: ``--dba-k`` etc.: option → RerankParams field. Their defaults live in RerankParams alone.
_RERANK_OPTIONS = {"dba_k": "--dba-k", "dba_power": "--dba-power", "qe_k": "--qe-k", "qe_alpha": "--qe-alpha"}


def _add_rerank_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--rerank/--no-rerank`` (default off; any parameter turns it on) and the four re-ranking parameters."""
    p.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                   help=f"re-rank {what}: database-side augmentation + α-query expansion (default: off; "
                        "any of the options below turns it on; docs/reranking.md)")
    p.add_argument("--dba-k", type=_positive_int, default=None,
                   help="neighbours averaged per gallery vector, itself included; 1 = no DBA (default 20)")
    p.add_argument("--dba-power", type=_non_negative_float, default=None,
                   help="DBA weight exponent p in max(s,0)^p (default 3)")
    p.add_argument("--qe-k", type=_non_negative_int, default=None,
                   help="top hits added to the query; 0 = no query expansion (default 20)")
    p.add_argument("--qe-alpha", type=_non_negative_float, default=None,
                   help="query-expansion weight exponent α in max(s,0)^α (default 3)")


def _rerank_given(args: argparse.Namespace) -> list[str]:
    """The re-ranking parameter options given on the command line."""
    return [opt for field, opt in _RERANK_OPTIONS.items() if getattr(args, field, None) is not None]


def _rerank_params(args: argparse.Namespace) -> RerankParams | None:
    """The re-ranking asked for: None unless ``--rerank`` or a parameter option is given, else the defaults
    overridden by the options."""
    from cdretrieval.rerank import RerankParams

    if args.rerank is False or (args.rerank is None and not _rerank_given(args)):
        return None
    given = {field: getattr(args, field) for field in _RERANK_OPTIONS if getattr(args, field) is not None}
    return RerankParams(**given)


def _domain_list(text: str | None) -> list[str] | None:
    from cdretrieval.data.folders import parse_domains

    return parse_domains(text)


# ---------------------------------------------------------------------------------------------------------
# Commands


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


def _cmd_embed(args: argparse.Namespace) -> int:
    """Embed the images of a data set with a run's encoder (resumable chunks in RUN_DIR/embeddings); under
    ``torchrun`` every process embeds its share of the chunks and rank 0 prints the summary."""
    from cdretrieval.distributed import rank
    from cdretrieval.domain_embeddings import embed_domains

    out = embed_domains(
        args.run, args.data, _domain_list(args.domains), split=args.split, feature=args.feature,
        batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, progress=args.progress,
        resume=not args.restart, chunk_size=args.chunk_size,
    )
    summary = {
        d: {"embedded": len(e), "skipped": len(e.skipped), "dim": int(e.embeddings.shape[1]), "feature": e.feature}
        for d, e in out.items()
    }
    if rank() == 0:
        print(json.dumps({"run": args.run, "domains": summary}, indent=2))
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    """Build per-domain indexes in RUN_DIR/index, or append images to one domain (--add); under ``torchrun``
    the processes share the embedding (and an ivf-ondisk build's shards) and rank 0 prints the summary."""
    from cdretrieval.distributed import rank
    from cdretrieval.indexing import add_to_index, build_indexes

    domains = _domain_list(args.domains)
    if args.add:
        added = add_to_index(
            args.run, domains[0] if domains else "", args.add, batch_size=args.batch_size,
            num_workers=args.num_workers, device=args.device, progress=args.progress,
        )
        info = {
            "domain": added.domain, "added": len(added.added), "duplicates": len(added.duplicates),
            "skipped": [{"path": p, "reason": r} for p, r in added.skipped], "total": added.total,
        }
        print(json.dumps(info, indent=2))
        return 0
    rerank = _rerank_params(args)
    iset = build_indexes(
        args.run, args.data, domains, index_type=args.index_type, memory_budget_mb=args.memory_budget_mb,
        split=args.split, feature=args.feature, batch_size=args.batch_size, num_workers=args.num_workers,
        device=args.device, progress=args.progress, rerank=rerank,
        domain_detector=None if args.domain_detector == "none" else args.domain_detector,
        chunk_size=args.chunk_size, **({"shard_rows": args.shard_rows} if args.shard_rows is not None else {}),
    )
    info = {
        "run": args.run,
        "dim": iset.dim,
        "domains": {d: {"count": len(iset[d]), "index_type": iset[d].index_type} for d in iset},
        "rerank": rerank.to_dict() if rerank is not None else None,
        "domain_detector": iset.detector.summary() if iset.detector is not None else None,
    }
    if rank() == 0:
        print(json.dumps(info, indent=2))
    return 0


def _format_results(results: Sequence[object]) -> str:
    """A plain-text table of search results (``z``: the calibrated score the merge ranked by)."""
    from cdretrieval.retrieval import SearchResult

    rows = [["rank", "score", "z", "domain", "label", "path"]]
    for r in results:
        assert isinstance(r, SearchResult)
        z = f"{r.calibrated_score:.2f}" if r.calibrated_score is not None else "-"
        rows.append([str(r.rank), f"{r.score:.4f}", z, r.domain, r.label or "-", r.path])
    n = len(rows[0]) - 1  # the path column is left unpadded
    widths = [max(len(row[i]) for row in rows) for i in range(n)]
    lines = []
    for row in rows:
        cells = [row[i].rjust(widths[i]) if i < 3 else row[i].ljust(widths[i]) for i in range(n)]
        lines.append("  ".join([*cells, row[n]]))
    return "\n".join(lines)


def _describe_source(response: object) -> str:
    """One line: the query's domain (given / detected with its confidence / unknown) and what was searched."""
    from cdretrieval.retrieval import SearchResponse

    assert isinstance(response, SearchResponse)
    searched = ", ".join(response.target_domains)
    if response.detection is not None:
        det = response.detection
        return f"detected domain: {det.domain} ({det.confidence:.2f}); searched: {searched}"
    if response.source == "given":
        return f"source domain: {response.source_domain}; searched: {searched}"
    return f"source domain: unknown (the index has no domain detector); searched: {searched}"


def _query_batches(paths: Sequence[str], batch_size: int) -> Iterator[list[tuple[str, Any]]]:
    """``(path, RGB image)`` batches of the query files and folders; unreadable images are reported and skipped.

    Raises:
        DataError: a path does not exist, or a folder holds no image file.
    """
    from cdretrieval.data.folders import collect_images
    from cdretrieval.errors import QueryError
    from cdretrieval.retrieval import query_to_image

    samples = collect_images(list(paths), "query")
    batch: list[tuple[str, Any]] = []
    skipped: list[str] = []
    for sample in samples:
        try:
            batch.append((sample.path, query_to_image(sample.path)))
        except QueryError as e:
            if len(samples) == 1:
                raise
            skipped.append(sample.path)
            print(f"warning: skipped {e}", file=sys.stderr)
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
    if len(skipped) == len(samples):
        raise QueryError(f"none of the {len(samples)} query images could be read")


def _cmd_search(args: argparse.Namespace) -> int:
    """Query images (files or folders) against the run's indexes, one forward pass per batch of queries."""
    from cdretrieval.retrieval import Retriever

    retriever = Retriever.from_run(args.run, device=args.device)
    several = len(args.query) > 1 or any(os.path.isdir(q) for q in args.query)
    first = True
    for batch in _query_batches(args.query, args.batch_size):
        responses = retriever.retrieve_batch([img for _, img in batch], _domain_list(args.target), k=args.k,
                                             source_domain=args.source, rerank=args.rerank)
        for (path, _), response in zip(batch, responses, strict=True):
            if args.json:
                text = json.dumps({"query": path, **response.to_dict()}, indent=2)
                print(("[\n" if first else ",\n") + _indent(text), end="")
            else:
                header = f"query: {path}\n" if several else ""
                print(("" if first else "\n") + header + _describe_source(response) + "\n"
                      + _format_results(response.results))
            first = False
    if args.json:
        print("\n]")
    return 0


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """P@k / mAP (and paired R@k) for every directed domain pair; Markdown table, optional JSON file."""
    from cdretrieval.evaluation import evaluate
    from cdretrieval.io import atomic_write_json
    from cdretrieval.metrics import format_table

    result = evaluate(
        args.data, _domain_list(args.domains), run_dir=args.run, backbone=args.backbone, ks=args.ks,
        split=args.split, feature=args.feature, image_size=args.image_size, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, progress=args.progress, rerank=_rerank_params(args),
        domain_detector=args.detector,
    )
    print(format_table(result))
    print(P_AT_K_NOTE)
    detection = result.get("domain_detection")
    if detection is not None:
        per = ", ".join(f"{d} {a:.3f}" for d, a in detection["per_domain"].items())
        print(f"domain detection ({detection['feature']} features): accuracy {detection['accuracy']:.4f} on "
              f"{detection['n']} images ({per})")
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _config_from_args(args: argparse.Namespace) -> RunConfigT:
    """The run config: defaults ← ``--config`` YAML ← explicit command-line options ← ``--set KEY=VALUE``."""
    from cdretrieval.config import RunConfig, apply_overrides, parse_sets, validate

    cfg = RunConfig.load(args.config) if args.config else RunConfig()
    cfg.data.root = str(args.data)
    if args.domains:
        cfg.data.domains = _domain_list(args.domains) or []
    overrides = {
        ("data", "split"): args.split, ("data", "image_size"): args.image_size,
        ("model", "backbone"): args.backbone, ("train", "epochs"): args.epochs,
        ("train", "mode"): args.mode, ("train", "batch_size"): args.batch_size,
        ("train", "device"): args.device, ("train", "seed"): args.seed,
        ("losses", "clustering"): args.clustering,
    }
    for (section, key), value in overrides.items():
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    if args.clusters:
        cfg.losses.num_clusters = args.clusters
    validate(cfg)
    if args.set:  # last, so `--set` wins over the named options too
        cfg = apply_overrides(cfg, parse_sets(args.set))
    return cfg


def _cmd_pretrain(args: argparse.Namespace) -> int:
    """Cross-domain self-supervised pretraining into RUN_DIR (resumable)."""
    from cdretrieval.train import pretrain

    cfg = _config_from_args(args)
    result = pretrain(cfg, args.out, resume=args.resume, progress=args.progress)
    print(
        f"trained {result.epochs_done} epochs ({result.steps} steps, {result.mode} mode, "
        f"{result.images_per_second:.0f} img/s) in {result.seconds:.1f} s after {result.setup_seconds:.1f} s of set-up"
        f"{' (feature cache included)' if result.mode == 'frozen' else ''}; {result.wall_seconds:.1f} s in all "
        f"→ {args.out}; last losses: " + ", ".join(f"{k}={v:.3f}" for k, v in result.last_losses.items())
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Data (embedded demo set unless --data) → pretrain → index → serve the UI."""
    from cdretrieval.workflow import prepare_demo

    if not args.no_serve:
        from app.ports import check_port_free

        try:
            check_port_free(args.host, args.port)  # before minutes of training, not after
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    demo = prepare_demo(args.out, args.data, _domain_list(args.domains), progress=args.progress)
    print(f"[demo] ready: {demo.run_dir} (train {demo.trained_seconds:.0f} s, index {demo.indexed_seconds:.0f} s)")
    if args.no_serve:
        return 0
    return _serve(str(demo.run_dir), args.host, args.port, args.auth)


def _serve(run_dir: str, host: str, port: int, auth: str | None) -> int:
    from app.cli import main as app_main

    argv = ["--run", run_dir, "--host", host, "--port", str(port)]
    if auth:
        argv += ["--auth", auth]
    return int(app_main(argv) or 0)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Serve the Gradio UI (and its HTTP API) for a run with indexes."""
    return _serve(args.run, args.host, args.port, args.auth)


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

    p = sub.add_parser("pretrain", help="cross-domain self-supervised pretraining (CDS + PCS) into a run folder")
    p.add_argument("--data", required=True, help="data root: ROOT/<domain>/[<class>/]<image>, or a folder of .npz")
    p.add_argument("--domains", default=None, help="comma-separated domain names, at least two (default: all)")
    p.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    p.add_argument("--config", default=None, help="YAML config (see `RunConfig`); options below override it")
    p.add_argument("--epochs", type=_positive_int, default=None)
    p.add_argument("--backbone", choices=("efficientnet_lite0", "resnet18", "resnet50"), default=None)
    p.add_argument("--image-size", type=_positive_int, default=None, help="a multiple of 32 (default 160)")
    p.add_argument("--mode", choices=("auto", "frozen", "partial", "finetune"), default=None,
                   help="auto (default): finetune on CUDA; on CPU partial (the top backbone units train over "
                        "cached lower feature maps)")
    p.add_argument("--clustering", choices=("kmeans", "sinkhorn"), default=None)
    p.add_argument("--clusters", type=_int_list, default=None, help="k values, e.g. 7,14 (default: label-free rule)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="per domain per step (default 64)")
    p.add_argument("--seed", type=_non_negative_int, default=None)
    p.add_argument("--split", default=None, help="train on <domain>_<split>.txt lists")
    p.add_argument("--device", type=_device, default=None, help="auto | cpu | cuda[:i]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, dotted (repeatable): losses.temperature=0.15, train.trainable_units=2, "
                        "losses.terms.mim.weight=0")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("embed", help="embed a data set's images with a run's encoder (resumable; shared among "
                                     "processes under torchrun)")
    p.add_argument("--run", required=True, help="run folder (from `cdretrieval pretrain`)")
    p.add_argument("--data", required=True, help="data root: ROOT/<domain>/[<class>/]<image>, or a folder of .npz")
    p.add_argument("--domains", default=None, help="comma-separated domain names (default: all)")
    p.add_argument("--split", default=None, help="read <domain>_<split>.txt lists")
    p.add_argument("--feature", choices=("head", "backbone"), default=None,
                   help="embedding to compute (default: the run's model.index_feature)")
    p.add_argument("--restart", action="store_true", help="ignore saved chunks and embed everything again")
    p.add_argument("--chunk-size", type=_positive_int, default=1024,
                   help="images per saved chunk, the unit of resumption and of sharing among torchrun processes; "
                        "a multiple of --batch-size (default 1024)")
    _add_model_options(p)
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("index", help="build per-domain FAISS indexes in RUN_DIR/index, or --add images")
    p.add_argument("--run", required=True, help="run folder (from `cdretrieval pretrain`)")
    p.add_argument("--data", default=None, help="data root (required unless --add)")
    p.add_argument("--domains", default=None,
                   help="comma-separated domains to (re)index; the index's other domains are kept (default: every "
                        "domain folder of --data, and an empty or unreadable one is an error); one with --add")
    p.add_argument("--split", default=None, help="read <domain>_<split>.txt lists")
    p.add_argument("--index-type", choices=("flat", "ivf", "hnsw", "ivfpq", "ivf-ondisk", "auto"), default="flat",
                   help="FAISS index type (default flat: exact); ivf-ondisk keeps its lists in a memory-mapped file "
                        "(needs --no-rerank)")
    p.add_argument("--memory-budget-mb", type=_positive_float, default=None,
                   help="with --index-type auto: largest index per domain in MiB")
    p.add_argument("--chunk-size", type=_positive_int, default=1024,
                   help="images per saved embedding chunk, as for `embed` (default 1024)")
    p.add_argument("--shard-rows", type=_positive_int, default=None,
                   help="ivf-ondisk: images per shard, read from the saved chunks and filled by one process at a "
                        "time (default 1000000)")
    p.add_argument("--feature", choices=("head", "backbone"), default=None,
                   help="embedding to index (default: the run's model.index_feature)")
    p.add_argument("--add", nargs="+", default=None, metavar="PATH",
                   help="append these images / folders to the index of the one domain named by --domains "
                        "(re-ranked as the index was built)")
    p.add_argument("--domain-detector", choices=("backbone", "head", "none"), default="backbone",
                   help="features the domain detector behind 'auto' searches is fitted on (default backbone); "
                        "none: no detector ('auto' then searches every domain)")
    _add_rerank_options(p, "searches over the new indexes (recorded in their manifests)")
    _add_model_options(p)
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("search", help="find the images of other domains most similar to a query image")
    p.add_argument("--run", required=True, help="run folder with an index (from `cdretrieval index`)")
    p.add_argument("--query", required=True, nargs="+", metavar="PATH",
                   help="query image file(s) and/or folder(s) of images (walked recursively)")
    p.add_argument("--target", default=None,
                   help="domain(s) to search, comma-separated (default: every domain but the query's)")
    p.add_argument("-k", type=_positive_int, default=10, help="number of results per query (default 10)")
    p.add_argument("--source", default="auto",
                   help="the query's domain, left out of the default targets; auto (default): detect it")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="queries embedded per forward pass (default 32)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list with one object per query: query, source_domain, source, detected, "
                        "target_domains, results")
    p.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                   help="query expansion: --no-rerank searches plainly (default: as the index was built)")
    p.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda[:i] (default auto)")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("evaluate", help="retrieval quality (P@k, mAP, paired R@k) for every domain pair")
    p.add_argument("--data", required=True, help="data root with class folders: ROOT/<domain>/<class>/<image>")
    p.add_argument("--domains", default=None, help="comma-separated domain names, at least two (default: all)")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--run", default=None, help="run folder to evaluate")
    model.add_argument("--backbone", default=None,
                       help="without --run: the no-adaptation baseline backbone (default efficientnet_lite0)")
    p.add_argument("--ks", type=_int_list, default=[1, 5, 15], help="cut-offs, comma-separated (default 1,5,15)")
    p.add_argument("--split", default=None, help="read <domain>_<split>.txt lists")
    p.add_argument("--feature", choices=("head", "backbone"), default=None,
                   help="embedding to evaluate (default: the run's model.index_feature; backbone without --run)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="eval image side, a multiple of 32 (default: the run's; 160 without --run)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the results as JSON")
    p.add_argument("--detector", default=None, metavar="INDEX_DIR",
                   help="also score the domain detector of this index folder (e.g. RUN_DIR/index) on the "
                        "evaluated images (use images the index was not built from)")
    _add_rerank_options(p, "as searches do (DBA galleries, expanded queries)")
    _add_model_options(p)
    p.set_defaults(func=_cmd_evaluate)

    for name, helptext in (("serve", "serve the Gradio UI and its HTTP API for a run with indexes"),
                           ("demo", "one command: data → pretrain → index → serve (embedded demo data by default)")):
        p = sub.add_parser(name, help=helptext)
        if name == "serve":
            p.add_argument("--run", required=True, help="run folder with indexes")
            p.set_defaults(func=_cmd_serve)
        else:
            p.add_argument("--data", default=None, help="your data root (default: the embedded demo digits)")
            p.add_argument("--domains", default=None, help="comma-separated domain names (default: all)")
            p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo); reused when complete")
            p.add_argument("--no-serve", action="store_true", help="prepare the run and indexes, then exit")
            p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
            p.set_defaults(func=_cmd_demo)
        p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
        p.add_argument("--port", type=_positive_int, default=7860)
        p.add_argument("--auth", default=os.environ.get("CDRETRIEVAL_AUTH"),
                       help="user:password required by the UI (default $CDRETRIEVAL_AUTH); use it off localhost")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "data" and not args.demo and not args.data:
        parser.error("data: give --data ROOT or --demo")
    if args.command == "index":
        if args.add and len(_domain_list(args.domains) or []) != 1:
            parser.error("index --add: name the one domain to extend with --domains DOMAIN")
        if not args.add and not args.data:
            parser.error("index: give --data ROOT (or --add PATH... to extend an index)")
        if args.add and (args.rerank is not None or _rerank_given(args)):
            parser.error("index --add: new images are re-ranked as the index was built; rebuild to change that")
    if args.command in ("index", "evaluate") and args.rerank is False and _rerank_given(args):
        parser.error(f"{args.command}: {', '.join(_rerank_given(args))} given with --no-rerank")
    if args.command == "evaluate" and args.image_size is not None and args.image_size % 32:
        parser.error(f"evaluate: --image-size must be a multiple of 32, got {args.image_size}")
    func: Handler = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cdretrieval search --json | head`: the reader has what it wanted
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except EXPECTED_ERRORS as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2


#: The one error boundary: what a command may fail with because of its input or its environment (bad
#: values, files, permissions) becomes one ``error: ...`` line and exit status 2; anything else is a bug
#: and keeps its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (CDRetrievalError, ValueError, OSError)


def error_message(e: BaseException) -> str:
    """``e`` as one line: an OSError as "<what>: <path>", newlines folded, never empty."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename is not None else e.strerror
        if e.filename2 is not None:
            text += f" -> {e.filename2}"
    else:
        text = str(e)
    text = " ".join(text.split())
    return text or type(e).__name__


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured output): nothing to do
        pass


if __name__ == "__main__":
    sys.exit(main())
