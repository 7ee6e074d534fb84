"""One direction: serving never imports the batch jobs, and the CLI imports only what a command needs.

Each check runs a fresh interpreter, so what earlier tests imported cannot hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Batch-job and training code: the Retriever (UI, API, ``search``) must work without loading any of it.
BATCH_MODULES = (
    "cdretrieval.embedding_chunks",
    "cdretrieval.metrics",
    "cdretrieval.domain_embeddings",
    "cdretrieval.indexing",
    "cdretrieval.evaluation",
    "cdretrieval.pipeline",
    "cdretrieval.train",
    "cdretrieval.losses",
    "cdretrieval.clustering",
    "benchmarks",
)
#: What ``search`` / ``embed`` / ``index`` never need (seconds of start-up each).
UI_AND_BENCHMARK_MODULES = ("gradio", "matplotlib", "benchmarks", "app")


def _imported_after(code: str, prefixes: Sequence[str]) -> list[str]:
    """The modules named by (or under) ``prefixes`` in ``sys.modules`` after a fresh interpreter runs ``code``."""
    script = (
        f"import json, sys\n{code}\n"
        f"prefixes = {tuple(prefixes)!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if any(m == p or m.startswith(p + '.') for p in prefixes))))"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_serving_imports_no_batch_job() -> None:
    """``import cdretrieval.retrieval`` loads neither the chunk store, the metrics, training nor benchmarks."""
    assert _imported_after("import cdretrieval.retrieval", BATCH_MODULES) == []


def test_serving_imports_no_torchvision() -> None:
    """``import cdretrieval.retrieval`` loads no torchvision (1.4–3 s of a cold start: it pulls in torch._dynamo);
    the eval transform is plain PIL + torch (tests/data/test_transforms.py proves it equal)."""
    assert _imported_after("import cdretrieval.retrieval", ("torchvision", "torch._dynamo")) == []


def test_cli_import_is_cheap() -> None:
    """``cdretrieval --help`` loads no framework: each command imports its own modules when it runs."""
    assert _imported_after("import cdretrieval.cli", (*UI_AND_BENCHMARK_MODULES, "torch", "faiss")) == []


@pytest.mark.parametrize(
    "modules",
    [
        ("cdretrieval.domain_embeddings",),  # embed
        ("cdretrieval.indexing",),  # index, index --add
        ("cdretrieval.retrieval", "cdretrieval.data.folders"),  # search
    ],
)
def test_cli_commands_import_no_ui_or_benchmark(modules: tuple[str, ...]) -> None:
    """What ``embed``, ``index`` and ``search`` import loads no Gradio, matplotlib or benchmark code."""
    code = "import cdretrieval.cli\n" + "\n".join(f"import {m}" for m in modules)
    assert _imported_after(code, UI_AND_BENCHMARK_MODULES) == []


def test_search_command_runs_without_ui_or_batch_modules(indexed_run: Path, demo_root: Path) -> None:
    """A whole ``cdretrieval search`` in a fresh process: no UI, benchmark or batch-job module gets loaded."""
    query = next((demo_root / "ink").rglob("*.png"))
    argv = ["search", "--run", str(indexed_run), "--query", str(query), "--device", "cpu", "--json"]
    code = (
        "import contextlib, io\nfrom cdretrieval.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main({argv!r}) == 0"
    )
    assert _imported_after(code, (*UI_AND_BENCHMARK_MODULES, *BATCH_MODULES, "torchvision")) == []


def test_pipeline_keeps_the_old_names() -> None:
    """Code written against ``cdretrieval.pipeline`` still finds the batch entry points there."""
    from cdretrieval import domain_embeddings, evaluation, indexing, loading, pipeline

    assert pipeline.build_indexes is indexing.build_indexes and pipeline.add_to_index is indexing.add_to_index
    assert pipeline.embed_domains is domain_embeddings.embed_domains and pipeline.evaluate is evaluation.evaluate
    assert pipeline.load_model is loading.load_model and pipeline.LoadedModel is loading.LoadedModel
