"""CLI: each command end to end through ``cdretrieval.cli.main`` (exit codes, JSON output, error lines)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cdretrieval.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def run(indexed_run: Path, tmp_path: Path) -> Path:
    """A writable copy of the indexed run (its embedding chunks make re-indexing cheap)."""
    out = tmp_path / "run"
    shutil.copytree(indexed_run, out)
    return out


FAST = ["--num-workers", "0", "--no-progress", "--device", "cpu"]


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "embed", "index", "search", "evaluate"):
        assert command in out
    build_parser().parse_args(["search", "--run", "r", "--query", "q.png", "--target", "a,b", "-k", "3"])


def test_index_then_search_json(run: Path, demo_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", "--run", str(run), "--data", str(demo_root), "--domains", "ink,photo", *FAST]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["dim"] == 32 and built["domains"] == {
        "ink": {"count": 120, "index_type": "flat"}, "photo": {"count": 120, "index_type": "flat"}
    }
    query = next((demo_root / "ink").rglob("*.png"))
    assert main(["search", "--run", str(run), "--query", str(query), "--target", "photo", "-k", "4", "--json",
                 "--device", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in results] == [1, 2, 3, 4] and {r["domain"] for r in results} == {"photo"}
    assert set(results[0]) == {"rank", "path", "domain", "score", "label", "item_id"}
    assert results[0]["score"] >= results[-1]["score"]

    assert main(["search", "--run", str(run), "--query", str(query), "--target", "ink", "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "domain", "label", "path"] and str(query) in table[1]


def test_index_add(run: Path, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "new.png"
    shutil.copy(next((demo_root / "outline").rglob("*.png")), image)
    assert main(["index", "--run", str(run), "--domains", "photo", "--add", str(image), *FAST]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["domain"], info["added"], info["total"]) == ("photo", 1, 121)
    with pytest.raises(SystemExit) as exc:
        main(["index", "--run", str(run), "--add", str(image)])  # which domain?
    assert exc.value.code == 2 and "--domains" in capsys.readouterr().err


def test_evaluate_json(run: Path, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--data", str(demo_root), "--domains", "ink,photo", "--run", str(run), "--ks", "1,5",
                 "--json", str(out), *FAST])
    assert code == 0
    table = capsys.readouterr().out
    assert table.startswith("| query | gallery |") and "**mean**" in table
    result = json.loads(out.read_text())
    assert {"pairs", "mean", "run", "backbone", "feature", "image_size"} <= set(result)
    assert [(p["query"], p["gallery"]) for p in result["pairs"]] == [("ink", "photo"), ("photo", "ink")]
    for p in result["pairs"]:
        assert {"query", "gallery", "n_query", "n_gallery", "P@1", "P@5", "mAP"} <= set(p)
    assert result["run"] == str(run.resolve()) and result["feature"] == "head" and result["image_size"] == 64


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--data", "{tmp}/missing", "--domains", "a,b"],
        ["index", "--run", "{tmp}/no-run", "--data", "{demo}"],
        ["embed", "--run", "{run}", "--data", "{tmp}/missing"],
        ["search", "--run", "{run}", "--query", "{tmp}/missing.png", "--target", "photo"],
        ["search", "--run", "{run}", "--query", "{demo}/ink/0", "--target", "sketch"],
        ["search", "--run", "{tmp}", "--query", "{tmp}/missing.png"],
    ],
)
def test_wrong_paths_exit_2_with_error_line(
    argv: list[str], run: Path, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.format(tmp=tmp_path, demo=demo_root, run=run) for a in argv]
    assert main([*args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--data", "d", "--run", "r", "--backbone", "resnet18"],
        ["evaluate", "--data", "d", "--ks", "1,0"],
        ["search", "--run", "r", "--query", "q", "-k", "0"],
        ["index", "--run", "r", "--data", "d", "--index-type", "kdtree"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
