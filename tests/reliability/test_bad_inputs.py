"""Bad input at every entry point: data loading, ``Retriever`` (API), the CLI and the served UI.

One table of crafted files (``_bad_images.py``) goes through each entry point: every broken file gets a
clear error that names it and says what is wrong (bulk loading skips and counts it instead), never a
traceback; every odd-but-valid file (1×1, 16-bit, CMYK, palette, animated GIF, ...) decodes to the right
pixels and gives the *same* results through the API, the CLI and the UI. Then tables of bad non-file
input: arrays, tensors, embeddings, domains, k, CLI arguments and UI parameters.

Gaps only: tests/data/test_images.py, tests/test_retrieval.py, tests/test_cli.py and tests/app/test_ui.py
already cover the basic cases (modes, a truncated JPEG, unknown target domain, k ≤ 0, wrong tensor shape...).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _bad_images import BadFile, OddFile, bad_files, encode, noise_rgb, odd_files, png_header_only
from PIL import Image

from cdretrieval.cli import main
from cdretrieval.data.images import as_rgb_image, load_image, load_image_bytes
from cdretrieval.errors import CDRetrievalError, DataError, ImageLoadError, QueryError
from cdretrieval.retrieval import Retriever

BAD = bad_files()
ODD = odd_files()
CPU = ["--device", "cpu"]
FAST = ["--num-workers", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every crafted file written under its file name."""
    folder = tmp_path_factory.mktemp("crafted")
    for f in [*BAD, *ODD]:
        (folder / f.filename).write_bytes(f.data)
    return folder


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_error_line(err: str, pattern: str) -> None:
    """The CLI's failure output: one ``error: ...`` line matching ``pattern``, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), (pattern, lines[0])


# ---------------------------------------------------------------------------------------------------------
# Broken files, through every entry point


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_file_data_loading(bad: BadFile, files: Path) -> None:
    with pytest.raises(ImageLoadError, match=bad.match) as e:
        load_image(files / bad.filename)
    assert bad.filename in str(e.value)
    with pytest.raises(ImageLoadError, match=bad.match) as e:
        load_image_bytes(bad.data, name=f"upload {bad.filename}")
    assert f"upload {bad.filename}" in str(e.value)


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_file_api(bad: BadFile, files: Path, retriever: Retriever) -> None:
    for query in (files / bad.filename, str(files / bad.filename), bad.data):
        with pytest.raises(QueryError, match=bad.match):
            retriever.search(query, "photo", k=3)
    with pytest.raises(QueryError, match=bad.match):  # one bad file fails the whole batch, naming itself
        retriever.search_batch([retriever.indexes["ink"].items[0].path, files / bad.filename], "photo", k=3)


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_file_cli(bad: BadFile, files: Path, indexed_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["search", "--run", str(indexed_run), "--query", str(files / bad.filename), *CPU], capsys)
    assert code == 2 and out == ""
    _assert_one_error_line(err, bad.match)
    assert bad.filename in err


def test_bad_files_ui(files: Path, server_url: str, demo_root: Path) -> None:
    """Every broken upload: the API answers an error naming the file and the problem; the server carries on."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server_url, verbose=False, download_files=False)
    for bad in BAD:
        with pytest.raises(AppError) as e:
            client.predict(handle_file(str(files / bad.filename)), "auto", ["photo"], 5, api_name="/search")
        message = str(e.value)
        assert re.search(bad.match, message) and bad.filename in message, (bad.id, message)
        assert "Traceback" not in message and str(files) not in message  # no server paths either
    good = next((demo_root / "ink").rglob("*.png"))
    _, result = client.predict(handle_file(str(good)), "auto", ["photo"], 5, api_name="/search")
    assert len(result["results"]) == 5


def test_bulk_loading_skips_and_counts_bad_files(
    files: Path, demo_root: Path, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cdretrieval embed`` over a domain holding every broken file: each one skipped, counted and named."""
    root = tmp_path / "data"
    for d in ("ink", "photo"):
        for p in sorted((demo_root / d / "4").glob("*.png"))[:3]:
            (root / d / "4").mkdir(parents=True, exist_ok=True)
            shutil.copy(p, root / d / "4" / p.name)
    for bad in BAD:
        (root / "ink" / "4" / bad.filename).write_bytes(bad.data)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with pytest.warns(UserWarning, match=rf"domain ink: skipped {len(BAD)} unreadable image"):
        code, out, _ = _cli(["embed", "--run", str(run), "--data", str(root), *FAST], capsys)
    assert code == 0
    summary = json.loads(out)["domains"]
    assert summary["ink"] == {"embedded": 3, "skipped": len(BAD), "dim": 32, "feature": "head"}
    assert summary["photo"]["skipped"] == 0

    from cdretrieval.domain_embeddings import embed_domains

    with pytest.warns(UserWarning, match="skipped"):  # reloaded from the chunks: still counted and reported
        emb = embed_domains(run, root, "ink", num_workers=0, progress=False, device="cpu")["ink"]
    reasons = {Path(path).name: reason for path, reason in emb.skipped}
    assert set(reasons) == {b.filename for b in BAD}
    for bad in BAD:
        assert re.search(bad.match, reasons[bad.filename]), (bad.id, reasons[bad.filename])


def test_domain_with_only_broken_files_is_a_clear_index_error(
    files: Path, demo_root: Path, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    (root / "photo" / "1").mkdir(parents=True)
    for bad in BAD[:4]:
        (root / "photo" / "1" / bad.filename).write_bytes(bad.data)
    shutil.copytree(demo_root / "ink" / "1", root / "ink" / "1")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with pytest.warns(UserWarning, match="skipped 4 unreadable"):
        code, _, err = _cli(["index", "--run", str(run), "--data", str(root), *FAST], capsys)
    assert code == 2
    _assert_one_error_line(err.split("warn_skipped")[-1], r"no readable image in domain\(s\) \['photo'\].*all 4")
    assert not (run / "index").exists()  # nothing half-built left behind


# ---------------------------------------------------------------------------------------------------------
# Odd but valid files: right pixels, and one answer whatever the entry point


@pytest.mark.parametrize("odd", ODD, ids=[o.id for o in ODD])
def test_odd_file_decodes_to_expected_pixels(odd: OddFile, files: Path) -> None:
    for img in (load_image(files / odd.filename), load_image_bytes(odd.data)):
        got = np.asarray(img)
        assert img.mode == "RGB" and got.shape == odd.expected.shape
        assert int(np.abs(got.astype(int) - odd.expected).max()) <= odd.atol


def test_odd_files_give_the_same_results_through_api_cli_and_ui(
    files: Path, retriever: Retriever, indexed_run: Path, server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradio_client import Client, handle_file

    client = Client(server_url, verbose=False, download_files=False)
    for odd in ODD:
        path = files / odd.filename
        api = retriever.search(path, "photo", k=5)
        assert [r.rank for r in api] == [1, 2, 3, 4, 5]
        assert [r.score for r in api] == sorted((r.score for r in api), reverse=True)
        assert retriever.search(odd.data, "photo", k=5) == api
        reference = Image.fromarray(odd.expected)  # what the file means, as a plain RGB image
        assert [r.item_id for r in retriever.search(reference, "photo", k=5)] == [r.item_id for r in api]

        code, out, err = _cli(["search", "--run", str(indexed_run), "--query", str(path), "--target", "photo",
                               "-k", "5", "--json", *CPU], capsys)
        assert code == 0, err
        rows = json.loads(out)[0]["results"]
        assert [(r["item_id"], r["path"]) for r in rows] == [(r.item_id, r.path) for r in api]
        np.testing.assert_allclose([r["score"] for r in rows], [r.score for r in api], atol=1e-6)

        _, ui = client.predict(handle_file(str(path)), "auto", ["photo"], 5, api_name="/search")
        assert [r["item_id"] for r in ui["results"]] == [r.item_id for r in api], odd.id
        np.testing.assert_allclose([r["score"] for r in ui["results"]], [r.score for r in api], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Bad non-file queries and parameters to the API


def _closed_image() -> Image.Image:
    img = Image.open(__import__("io").BytesIO(encode(Image.new("RGB", (8, 8)), "PNG")))
    img.close()
    return img


API_CASES: list[tuple[str, Callable[[Retriever, str], Any], str]] = [
    # query arrays and tensors
    ("nan-array", lambda r, q: r.search(np.full((8, 8, 3), np.nan, np.float32), "photo"), "NaN or infinite"),
    ("inf-grey-array", lambda r, q: r.search(np.full((8, 8), np.inf), "photo"), "NaN or infinite"),
    ("bool-array", lambda r, q: r.search(np.ones((8, 8), bool), "photo"), "dtype bool"),
    ("object-array", lambda r, q: r.search(np.zeros((8, 8), object), "photo"), "dtype object"),
    ("0-d-array", lambda r, q: r.search(np.array(3), "photo"), r"got \(\)"),
    ("1-d-array", lambda r, q: r.search(np.zeros(64, np.uint8), "photo"), r"got \(64,\)"),
    ("hw2-array", lambda r, q: r.search(np.zeros((8, 8, 2), np.uint8), "photo"), r"\(8, 8, 2\)"),
    ("empty-array", lambda r, q: r.search(np.zeros((0, 5, 3), np.uint8), "photo"), "no pixels"),
    ("strip-array", lambda r, q: r.search(np.zeros((1, 5000), np.uint8), "photo"), "over 100 times"),
    ("nan-tensor", lambda r, q: r.search(torch.full((3, 8, 8), float("nan")), "photo"), "NaN or infinite"),
    ("int64-tensor", lambda r, q: r.search(torch.ones(3, 8, 8, dtype=torch.int64), "photo"), "torch.int64"),
    ("complex-tensor", lambda r, q: r.search(torch.ones(3, 8, 8, dtype=torch.complex64), "photo"), "complex64"),
    ("hwc-tensor", lambda r, q: r.search(torch.rand(8, 8, 3), "photo"), r"\(3,H,W\).*\(8, 8, 3\)"),
    ("empty-tensor", lambda r, q: r.search(torch.rand(3, 0, 0), "photo"), "no pixels"),
    ("meta-tensor", lambda r, q: r.search(torch.empty(3, 8, 8, device="meta"), "photo"), "device meta"),
    ("sparse-tensor", lambda r, q: r.search(torch.rand(3, 8, 8).to_sparse(), "photo"), "sparse"),
    ("pil-0x0", lambda r, q: r.search(Image.new("RGB", (0, 0)), "photo"), "no pixels"),
    ("pil-closed", lambda r, q: r.search(_closed_image(), "photo"), "closed image"),
    ("pil-nan-float", lambda r, q: r.search(Image.fromarray(np.full((4, 4), np.nan, np.float32)), "photo"), "NaN"),
    ("none-query", lambda r, q: r.search(None, "photo"), "got NoneType"),  # type: ignore[arg-type]
    ("list-query", lambda r, q: r.search([1, 2, 3], "photo"), "got list"),  # type: ignore[arg-type]
    ("folder-query", lambda r, q: r.search(str(Path(q).parent), "photo"), "not a file"),
    ("too-long-path", lambda r, q: r.search("x" * 5000, "photo"), "cannot access|no such file"),
    ("batch-none", lambda r, q: r.search_batch(None, "photo"), "list of queries"),  # type: ignore[arg-type]
    ("batch-int", lambda r, q: r.search_batch(7, "photo"), "list of queries"),  # type: ignore[arg-type]
    # domains
    ("unknown-source", lambda r, q: r.search(q, source_domain="sketch"), r"unknown source domain 'sketch'"),
    ("empty-target", lambda r, q: r.search(q, ""), r"unknown target domain ''"),
    ("no-targets", lambda r, q: r.search(q, []), "no target domain given"),
    ("int-target", lambda r, q: r.search(q, 3), "target_domain must be"),  # type: ignore[arg-type]
    ("dict-target", lambda r, q: r.search(q, {"photo": 1}), "target_domain must be"),  # type: ignore[arg-type]
    ("none-in-targets", lambda r, q: r.search(q, ["photo", None]), "unknown target domain None"),  # type: ignore[list-item]
    ("case-target", lambda r, q: r.search(q, "Photo"), r"unknown target domain 'Photo'.*'photo'"),
    ("item-out-of-range", lambda r, q: r.item("photo", 120), r"item_id must be in \[0, 120\)"),
    ("examples-unknown", lambda r, q: r.example_items("sketch"), "unknown domain 'sketch'"),
    # k
    ("k-none", lambda r, q: r.search(q, "photo", k=None), "k must be a positive integer"),  # type: ignore[arg-type]
    ("k-string", lambda r, q: r.search(q, "photo", k="3"), "k must be a positive integer"),  # type: ignore[arg-type]
    ("k-nan", lambda r, q: r.search(q, "photo", k=float("nan")), "k must be a positive integer"),
    ("k-negative-np", lambda r, q: r.search(q, "photo", k=np.int64(-2)), "k must be a positive integer"),
    # precomputed embeddings
    ("emb-nan", lambda r, q: r.search_embeddings(np.full(32, np.nan), "photo"), "NaN or infinite"),
    ("emb-zero", lambda r, q: r.search_embeddings(np.zeros((2, 32)), "photo"), "all zeros"),
    ("emb-overflow", lambda r, q: r.search_embeddings(np.full(32, 1e300), "photo"), "NaN or infinite"),
    ("emb-wrong-dim", lambda r, q: r.search_embeddings(np.ones((2, 31)), "photo"), r"\[Q, 32\].*\(2, 31\)"),
    ("emb-3d", lambda r, q: r.search_embeddings(np.ones((1, 1, 32)), "photo"), r"\(1, 1, 32\)"),
    ("emb-ragged", lambda r, q: r.search_embeddings([[1.0, 2.0], [3.0]], "photo"), "numeric"),
    ("emb-strings", lambda r, q: r.search_embeddings(np.array(["a"] * 32), "photo"), "real numbers"),
    ("emb-complex", lambda r, q: r.search_embeddings(np.ones(32, complex), "photo"), "real numbers.*complex"),
    ("emb-none", lambda r, q: r.search_embeddings(None, "photo"), "real numbers"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_api_input(case: tuple[str, Callable[[Retriever, str], Any], str], retriever: Retriever) -> None:
    _, call, pattern = case
    query = retriever.indexes["ink"].items[0].path
    with pytest.raises(QueryError, match=pattern):
        call(retriever, query)


def test_k_beyond_gallery_and_integer_types(retriever: Retriever) -> None:
    q = retriever.indexes["ink"].items[0].path
    everything = retriever.search(q, "photo", k=2**63)
    assert len(everything) == 120 and len({r.item_id for r in everything}) == 120
    assert [r.item_id for r in retriever.search(q, "photo", k=np.int64(4))] == [r.item_id for r in everything[:4]]
    both = retriever.search(q, ("outline", "photo"), k=10**6)  # k > both galleries together: all of them
    assert len(both) == 240 and {r.domain for r in both} == {"outline", "photo"}


# ---------------------------------------------------------------------------------------------------------
# CLI arguments


@pytest.fixture(scope="module")
def odd_root(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data root with a small ink domain, an empty domain folder and a domain holding only a text file."""
    root = tmp_path_factory.mktemp("odd-data")
    shutil.copytree(demo_root / "ink" / "2", root / "ink" / "2")
    shutil.copytree(demo_root / "photo" / "2", root / "photo" / "2")
    (root / "empty").mkdir()
    (root / "textonly").mkdir()
    (root / "textonly" / "readme.txt").write_text("no images here")
    return root


BAD_MANIFEST_SIZES = (0, -1, 1, 33, 4096)
CONFIGS = {"cfg_epochs": "train:\n  epochs: abc\n", "cfg_unknown": "bogus: 1\n", "cfg_bs": "train:\n  batch_size: -4\n",
           "cfg_list": "- 1\n- 2\n", "cfg_temp": "losses:\n  temperature: 0\n"}

CLI_CASES: list[tuple[str, list[str], str]] = [
    ("search-unknown-source", ["search", "--run", "{run}", "--query", "{query}", "--source", "sketch"],
     r"unknown source domain 'sketch'.*\['ink', 'outline', 'photo'\]"),
    ("search-target-not-indexed", ["search", "--run", "{small_run}", "--query", "{query}", "--target", "outline"],
     r"unknown target domain 'outline'; indexed domains: \['ink', 'photo'\]"),
    ("search-index-lost-a-domain", ["search", "--run", "{lost_run}", "--query", "{query}"],
     r"no index folder at .*ink.*cdretrieval index"),
    ("search-run-without-index", ["search", "--run", "{tiny_run}", "--query", "{query}"],
     r"no index set.*cdretrieval index"),
    ("index-unknown-domain", ["index", "--run", "{small_run}", "--data", "{odd_root}", "--domains", "ink,sketch"],
     r"domain 'sketch' not found .*available: empty, ink, photo, textonly"),
    ("index-empty-domain", ["index", "--run", "{small_run}", "--data", "{odd_root}", "--domains", "ink,empty"],
     r"domain 'empty' .* has no images"),
    ("index-text-only-domain", ["index", "--run", "{small_run}", "--data", "{odd_root}", "--domains", "textonly"],
     r"domain 'textonly' .* has no images"),
    ("index-empty-root", ["index", "--run", "{small_run}", "--data", "{empty_root}"], r"no domain folders with images"),
    ("index-add-unknown-domain", ["index", "--run", "{small_run}", "--domains", "outline", "--add", "{query}"],
     r"unknown domain 'outline'"),
    ("evaluate-same-domain-twice", ["evaluate", "--data", "{odd_root}", "--domains", "ink,Ink", "--run", "{run}"],
     r"domain 'Ink' given twice"),
    ("evaluate-one-domain", ["evaluate", "--data", "{odd_root}", "--domains", "ink", "--run", "{run}"],
     r"at least two domains"),
    ("evaluate-unknown-domain", ["evaluate", "--data", "{odd_root}", "--domains", "ink,sketch", "--run", "{run}"],
     r"domain 'sketch' not found"),
    ("evaluate-empty-domain", ["evaluate", "--data", "{odd_root}", "--domains", "ink,empty", "--run", "{run}"],
     r"domain 'empty' .* has no images"),
    # Plain ValueError / OSError / FAISS RuntimeError from deeper down: the same one line, never a traceback.
    ("pretrain-image-size-50", ["pretrain", "--data", "{odd_root}", "--out", "{tmp}/p1", "--image-size", "50"],
     r"image_size must be a multiple of 32 in \[32, 1024\], got 50"),
    ("config-epochs-abc", ["pretrain", "--data", "{odd_root}", "--out", "{tmp}/p2", "--config", "{cfg_epochs}"],
     r"train\.epochs: expected int, got 'abc'"),
    ("config-unknown-key", ["pretrain", "--data", "{odd_root}", "--out", "{tmp}/p3", "--config", "{cfg_unknown}"],
     r"unknown key\(s\) bogus"),
    ("config-batch-size-negative", ["pretrain", "--data", "{odd_root}", "--out", "{tmp}/p4", "--config", "{cfg_bs}"],
     r"batch_size"),
    ("config-top-level-list", ["pretrain", "--data", "{odd_root}", "--out", "{tmp}/p5", "--config", "{cfg_list}"],
     r"mapping at the top level"),
    ("config-temperature-0", ["pretrain", "--data", "{odd_root}", "--out", "{tmp}/p6", "--config", "{cfg_temp}"],
     r"temperature must be > 0"),
    ("pretrain-out-is-a-file", ["pretrain", "--data", "{odd_root}", "--out", "{a_file}", "--epochs", "1"],
     r"File exists|is a file|not a folder"),
    ("search-manifest-nprobe-on-flat", ["search", "--run", "{nprobe_run}", "--query", "{query}"],
     r"search parameters .*nprobe.* do not fit its 'flat' index.*cdretrieval index"),
    *[(f"search-manifest-image-size-{size}", ["search", "--run", f"{{size_run_{i}}}", "--query", "{query}"],
       rf"image_size recorded in .*manifest\.json must be a multiple of 32 in \[32, 1024\], got {size}")
      for i, size in enumerate(BAD_MANIFEST_SIZES)],
]


@pytest.fixture(scope="module")
def cli_runs(indexed_run: Path, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``small_run``: indexed on ink + photo only; ``lost_run``: its index lost the ink folder."""
    from cdretrieval.indexing import build_indexes

    base = tmp_path_factory.mktemp("cli-runs")
    small = base / "small"
    shutil.copytree(indexed_run, small)  # its embedding chunks make re-indexing two domains cheap
    shutil.rmtree(small / "index")  # else --domains would keep the outline index
    build_indexes(small, demo_root, ["ink", "photo"], num_workers=0, progress=False, device="cpu")
    lost = base / "lost"
    shutil.copytree(indexed_run, lost)
    shutil.rmtree(lost / "index" / "ink")
    empty = base / "empty-root"
    (empty / "nothing").mkdir(parents=True)
    out: dict[str, Path] = {"small_run": small, "lost_run": lost, "empty_root": empty, "tmp": base}
    for name, text in CONFIGS.items():
        out[name] = base / f"{name}.yaml"
        out[name].write_text(text)
    out["a_file"] = base / "a-file"
    out["a_file"].write_text("not a folder")

    def edited_run(name: str, **manifest: Any) -> Path:
        run = base / name
        shutil.copytree(indexed_run, run, ignore=shutil.ignore_patterns("embeddings"))
        path = run / "index" / "photo" / "manifest.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **manifest}))
        return run

    out["nprobe_run"] = edited_run("nprobe", params={"nprobe": 4})
    for i, size in enumerate(BAD_MANIFEST_SIZES):
        out[f"size_run_{i}"] = edited_run(f"size-{i}", image_size=size)
    return out


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_arguments(
    case: tuple[str, list[str], str], cli_runs: dict[str, Path], indexed_run: Path, tiny_run: Path,
    odd_root: Path, demo_root: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    _, argv, pattern = case
    query = next((demo_root / "ink").rglob("*.png"))
    names = {**cli_runs, "run": indexed_run, "tiny_run": tiny_run, "odd_root": odd_root, "query": query}
    args = [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]
    extra = {"index": FAST, "evaluate": FAST, "pretrain": ["--device", "cpu", "--no-progress"]}.get(args[0], CPU)
    code, out, err = _cli([*args, *extra], capsys)
    assert code == 2 and out == ""
    _assert_one_error_line(err, pattern)


@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied", "/runs/r/checkpoint.pt"),
    IsADirectoryError(21, "Is a directory", "/runs/r/checkpoint.pt"),
    ValueError("a plain ValueError\nover two lines"),
])
def test_cli_error_boundary_turns_plain_errors_into_one_line(
    error: Exception, indexed_run: Path, demo_root: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unreadable run folder (PermissionError, unforgeable as root) or any plain ValueError: one line, exit 2."""
    import cdretrieval.loading

    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(cdretrieval.loading, "load_encoder", fail)
    query = next((demo_root / "ink").rglob("*.png"))
    code, out, err = _cli(["search", "--run", str(indexed_run), "--query", str(query), *CPU], capsys)
    assert code == 2 and out == ""
    _assert_one_error_line(err, r"Permission denied: /runs/r|Is a directory|plain ValueError over two lines")


def test_serve_start_up_reports_a_bad_manifest_in_one_line(
    cli_runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``serve`` start-up goes through the same boundary: a manifest FAISS refuses is one ``error:`` line."""
    from conftest import free_port

    from app.cli import main as serve_main

    code = serve_main(["--run", str(cli_runs["nprobe_run"]), "--port", str(free_port()), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    _assert_one_error_line(err, r"search parameters .*nprobe.* do not fit")


def test_cli_k_beyond_gallery_returns_everything(indexed_run: Path, demo_root: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    query = next((demo_root / "ink").rglob("*.png"))
    code, out, _ = _cli(["search", "--run", str(indexed_run), "--query", str(query), "--target", "photo",
                         "-k", "100000", "--json", *CPU], capsys)
    rows = json.loads(out)[0]["results"]
    assert code == 0 and len(rows) == 120 and len({r["item_id"] for r in rows}) == 120
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)


# ---------------------------------------------------------------------------------------------------------
# UI parameters and upload decoding


def test_bad_ui_parameters(server_url: str, demo_root: Path) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server_url, verbose=False, download_files=False)
    good = handle_file(str(next((demo_root / "ink").rglob("*.png"))))
    for source, targets, k in (("auto", ["photo"], 51), ("auto", ["photo"], 2.5), ("auto", ["photo"], -1),
                               ("auto", ["Photo"], 5), ("", ["photo"], 5), ("auto", "photo; rm -rf /", 5)):
        with pytest.raises(AppError) as e:
            client.predict(good, source, targets, k, api_name="/search")
        assert "Traceback" not in str(e.value)
    _, result = client.predict(good, "auto", ["photo"], 50, api_name="/search")
    assert len(result["results"]) == 50


def test_ui_upload_component_reports_decompression_bomb(tmp_path: Path, retriever: Retriever) -> None:
    """The page's image upload opens the file with PIL first: a bomb header reaches the handler as the raw
    file, which reports it readably in the status line."""
    import gradio as gr

    from app.ui import SearchService, tolerant_upload

    image = tolerant_upload(gr.Image(type="filepath", image_mode=None, render=False))
    bomb = next(b for b in BAD if b.id == "bomb-100k-x-100k")
    path = tmp_path / "bomb.png"  # Gradio keeps an upload under its own name
    path.write_bytes(bomb.data)
    raw = image.preprocess(image.data_model(path=str(path), orig_name="bomb.png"))
    assert raw == str(path)
    cleared, status, _ = SearchService(retriever).on_upload(raw)
    assert cleared is None and "Error" in status and "bomb.png" in status, status
    assert re.search(bomb.match, status), status


@pytest.mark.filterwarnings("ignore:.*:UserWarning:gradio")  # gr.Warning outside a request
def test_ui_handler_reports_bad_files_in_the_page(files: Path, retriever: Retriever) -> None:
    """The Search button path (not in the HTTP API): errors land in the status line, never an exception."""
    from app.ui import SearchService

    service = SearchService(retriever)
    for bad in BAD:
        gallery, status, payload, *_ = service.ui_search("upload", str(files / bad.filename), None, "auto", [], 5)
        assert gallery == [] and payload["ok"] is False and "Error" in status, bad.id
        assert re.search(bad.match, payload["error"]) and str(files) not in payload["error"], bad.id


# ---------------------------------------------------------------------------------------------------------
# Data loading helpers


def test_in_memory_images_of_every_mode_or_a_clear_error() -> None:
    """Every PIL mode either converts to RGB or raises ImageLoadError (never another exception)."""
    for mode in ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                 "I", "I;16", "I;16B", "I;16L", "F"):
        img = Image.new(mode, (5, 4))
        out = as_rgb_image(img, f"mode {mode}")
        assert out.mode == "RGB" and out.size == (5, 4), mode


def test_scan_errors_name_the_problem(tmp_path: Path) -> None:
    from cdretrieval.data.folders import scan_domains

    with pytest.raises(DataError, match="does not exist"):
        scan_domains(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        scan_domains(tmp_path / "file.txt")
    with pytest.raises(DataError, match="no domain folders with images"):
        scan_domains(tmp_path)
    with pytest.raises(DataError, match="empty domain name"):
        scan_domains(tmp_path, [" "])
    assert issubclass(DataError, CDRetrievalError) and issubclass(QueryError, CDRetrievalError)


def test_query_embeddings_as_tensors_of_any_float_dtype(retriever: Retriever) -> None:
    emb = retriever.encode(retriever.indexes["ink"].items[0].path)  # [32] float32
    want = [r.item_id for r in retriever.search_embeddings(emb, "ink", k=3)[0]]
    assert want[0] == 0
    for t in (torch.from_numpy(emb), torch.from_numpy(emb).double(), torch.from_numpy(emb).bfloat16(),
              torch.from_numpy(emb).half().requires_grad_(), torch.from_numpy(emb)[None, :]):
        assert retriever.search_embeddings(t, "ink", k=3)[0][0].item_id == 0, t.dtype


def test_decoding_leaves_the_global_warning_filters_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server decodes uploads in several threads, so decoding must not swap ``warnings.filters``
    (``warnings.catch_warnings`` is not thread-safe: concurrent decodes used to leave an "error" filter behind
    or drop another thread's filters). Checked while PIL is opening the file, then under real concurrency."""
    import threading
    import warnings

    data = [png_header_only(10_000, 10_000), encode(noise_rgb(), "PNG")]  # 100 M px: PIL's warning range
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL's own warning for 89-179 M px
        filters, before = warnings.filters, list(warnings.filters)
        during: list[bool] = []
        real_open = Image.open

        def spying_open(*args: Any, **kwargs: Any) -> Any:
            during.append(warnings.filters is filters and warnings.filters == before)
            return real_open(*args, **kwargs)

        monkeypatch.setattr(Image, "open", spying_open)
        for blob in data:
            with contextlib.suppress(ImageLoadError):
                load_image_bytes(blob)
        assert during == [True, True]
        monkeypatch.undo()

        def work(i: int) -> None:
            for j in range(150):
                try:
                    load_image_bytes(data[(i + j) % 2])
                except ImageLoadError as e:
                    assert "10000x10000" in str(e) and "over the limit" in str(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert warnings.filters is filters and warnings.filters == before


# ---------------------------------------------------------------------------------------------------------
# Minor messages


def test_edited_model_hash_error_quotes_both_hashes(
    indexed_run: Path, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cdretrieval.run import load_encoder, model_hash

    run = tmp_path / "run"
    shutil.copytree(indexed_run, run, ignore=shutil.ignore_patterns("embeddings"))
    manifest = run / "index" / "photo" / "manifest.json"
    edited = "f" * 64
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "model_hash": edited}))
    real = model_hash(load_encoder(run)[0])
    query = next((demo_root / "ink").rglob("*.png"))
    code, out, err = _cli(["search", "--run", str(run), "--query", str(query), *CPU], capsys)
    assert code == 2 and out == ""
    _assert_one_error_line(err, rf"hash {edited[:12]}….*hash {real[:12]}…")


def test_run_that_is_a_file_is_called_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "run.txt"
    file.write_text("not a run")
    code, out, err = _cli(["search", "--run", str(file), "--query", str(file), *CPU], capsys)
    assert code == 2 and out == ""
    _assert_one_error_line(err, r"run\.txt is a file, not a run folder")
    assert "does not exist" not in err


def test_unreadable_class_folder_is_skipped_with_a_warning(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chmod-000 class folder: its images are skipped, and a warning names the folder (never silently)."""
    import os

    import cdretrieval.data.folders as folders
    from cdretrieval.data.folders import scan_domain

    root = tmp_path / "data"
    for label in ("1", "2"):
        shutil.copytree(demo_root / "ink" / label, root / "ink" / label)
    locked = root / "ink" / "2"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root reads anything: make os.walk meet the error chmod 000 gives
            real_walk = os.walk

            def walk(top: Any, onerror: Any = None, **kw: Any) -> Any:
                for dirpath, dirs, files in real_walk(top, onerror=onerror, **kw):
                    if Path(dirpath) == locked:
                        if onerror is not None:
                            onerror(PermissionError(13, "Permission denied", str(locked)))
                        continue
                    yield dirpath, dirs, files

            monkeypatch.setattr(folders.os, "walk", walk)
        with pytest.warns(UserWarning, match=r"skipped unreadable folder .*ink/2: Permission denied"):
            samples = scan_domain(root, "ink")
    finally:
        locked.chmod(0o755)
    assert samples and {s.label for s in samples} == {"1"}

