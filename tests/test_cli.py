"""CLI: each command end to end through ``cdretrieval.cli.main`` (exit codes, JSON output, error lines)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdretrieval.cli import EXIT_BROKEN_PIPE, P_AT_K_NOTE, build_parser, main

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
    shutil.rmtree(run / "index")  # a fresh index of two domains (--domains keeps an existing index's others)
    assert main(["index", "--run", str(run), "--data", str(demo_root), "--domains", "ink,photo", *FAST]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["dim"] == 32 and built["domains"] == {
        "ink": {"count": 120, "index_type": "flat"}, "photo": {"count": 120, "index_type": "flat"}
    }
    detector = built["domain_detector"]
    assert detector["domains"] == ["ink", "photo"] and detector["feature"] == "backbone"
    assert detector["holdout_accuracy"] >= 0.95
    query = next((demo_root / "ink").rglob("*.png"))
    assert main(["search", "--run", str(run), "--query", str(query), "--target", "photo", "-k", "4", "--json",
                 "--device", "cpu"]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert len(answers) == 1 and answers[0]["query"] == str(query)
    assert answers[0]["target_domains"] == ["photo"] and answers[0]["detected"]["domain"] == "ink"
    results = answers[0]["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4] and {r["domain"] for r in results} == {"photo"}
    assert set(results[0]) == {"rank", "path", "domain", "score", "label", "item_id", "calibrated_score"}
    assert results[0]["score"] >= results[-1]["score"]

    assert main(["search", "--run", str(run), "--query", str(query), "--target", "ink", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("detected domain: ink (") and lines[0].endswith("searched: ink")
    assert lines[1].split() == ["rank", "score", "z", "domain", "label", "path"] and str(query) in lines[2]


def test_search_auto_and_batch_queries(indexed_run: Path, demo_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Several files and a folder: one JSON object per query, each excluding its detected domain."""
    ink = sorted((demo_root / "ink" / "3").glob("*.png"))[:2]
    folder = demo_root / "photo" / "7"
    photos = sorted(folder.glob("*.png"))
    assert main(["search", "--run", str(indexed_run), "--query", *map(str, ink), str(folder), "-k", "3",
                 "--batch-size", "4", "--json", "--device", "cpu"]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert [a["query"] for a in answers] == [str(p) for p in [*ink, *photos]]
    for a in answers:
        own = "ink" if "/ink/" in a["query"] else "photo"
        assert a["source"] == "detected" and a["source_domain"] == own == a["detected"]["domain"]
        assert own not in a["target_domains"] and len(a["results"]) == 3
        assert all(r["domain"] != own for r in a["results"])
    assert main(["search", "--run", str(indexed_run), "--query", str(ink[0]), str(ink[1]), "-k", "2",
                 "--source", "outline", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.count("query: ") == 2 and text.count("source domain: outline; searched: ink, photo") == 2


def test_search_json_into_a_closed_pipe(indexed_run: Path, demo_root: Path) -> None:
    """`search --json | head` ends quietly (no BrokenPipeError traceback) with status 141."""
    queries = [str(p) for p in sorted((demo_root / "ink" / "1").glob("*.png"))[:3]]  # ~170 kB of JSON
    code = ("import sys; from cdretrieval.cli import main; sys.exit(main(['search', '--run', sys.argv[1], "
            "'--device', 'cpu', '-k', '200', '--json', '--query', *sys.argv[2:]]))")
    proc = subprocess.run(
        f'"{sys.executable}" -c "{code}" "{indexed_run}" {" ".join(queries)} | head -c 100; '
        'echo "status=${PIPESTATUS[0]}" >&2',
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=180,
    )
    assert proc.stdout.startswith("[") and len(proc.stdout) == 100
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert f"status={EXIT_BROKEN_PIPE}" in proc.stderr, proc.stderr


def test_serve_checks_the_port_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.perf_counter()
        # The run does not exist: the port is named first, before anything is loaded.
        assert main(["serve", "--run", str(tmp_path / "no-run"), "--port", str(port)]) == 2
        assert time.perf_counter() - start < 10
    assert capsys.readouterr().err.strip() == f"error: port {port} is in use; pass --port N"


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
    assert table.startswith("| query | gallery |") and "**mean**" in table and P_AT_K_NOTE in table
    assert "min(k, #relevant" in table
    result = json.loads(out.read_text())
    assert result["domain_detection"] is None
    assert {"pairs", "mean", "run", "backbone", "feature", "image_size"} <= set(result)
    assert [(p["query"], p["gallery"]) for p in result["pairs"]] == [("ink", "photo"), ("photo", "ink")]
    for p in result["pairs"]:
        assert {"query", "gallery", "n_query", "n_gallery", "P@1", "P@5", "mAP"} <= set(p)
    assert result["run"] == str(run.resolve()) and result["feature"] == "head" and result["image_size"] == 64

    # The index's domain detector scored on the evaluated images (here: the indexed ones themselves).
    assert main(["evaluate", "--data", str(demo_root), "--domains", "ink,photo", "--run", str(run), "--ks", "1",
                 "--detector", str(run / "index"), "--json", str(out), *FAST]) == 0
    assert "domain detection (backbone features): accuracy 1.0000 on 240 images" in capsys.readouterr().out
    detection = json.loads(out.read_text())["domain_detection"]
    assert detection["accuracy"] == 1.0 and detection["n"] == 240 and set(detection["per_domain"]) == {"ink", "photo"}


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


def test_pretrain_set_overrides_any_config_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cdretrieval.cli import _config_from_args

    config = tmp_path / "cfg.yaml"
    config.write_text("losses:\n  temperature: 0.3\ntrain:\n  epochs: 4\n", encoding="utf-8")
    args = build_parser().parse_args([
        "pretrain", "--data", "d", "--out", "o", "--config", str(config), "--epochs", "7",
        "--set", "losses.temperature=0.15", "--set", "train.trainable_units=3", "--set", "losses.num_clusters=[7, 14]",
        "--set", "losses.terms.mim.weight=0", "--set", "train.lr=5e-4",
    ])
    cfg = _config_from_args(args)
    assert cfg.losses.temperature == 0.15 and cfg.train.epochs == 7 and cfg.train.trainable_units == 3
    assert cfg.losses.num_clusters == [7, 14] and cfg.losses.terms["mim"].weight == 0.0 and cfg.train.lr == 5e-4
    # an unknown key or an invalid value: one `error:` line, exit 2, nothing created
    for bad, message in (("train.nope=1", "unknown config key 'train.nope'"),
                         ("losses.temperature=0", "temperature must be > 0"), ("train.lr", "KEY=VALUE")):
        assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and "Traceback" not in err
        assert not (tmp_path / "run").exists()
