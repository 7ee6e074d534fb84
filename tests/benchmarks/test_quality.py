"""The quality benchmark: variants are configs, data selection keeps pairs, the view reads back, and an
end-to-end run on tiny fabricated data writes the JSON, the Markdown and the three kinds of pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from benchmarks.presets import check_layout, get_preset
from benchmarks.quality import (
    apply_overrides,
    base_config,
    cap,
    cli,
    grid_pair,
    main,
    parse_sets,
    seeded_split,
    select_samples,
    stat,
    variant_config,
    write_view,
)
from cdretrieval.config import RunConfig
from cdretrieval.data.folders import Sample, scan_domains


def test_variants_are_configs() -> None:
    base = RunConfig()
    assert variant_config(base, "none") is None
    cds = variant_config(base, "cds")
    pcs = variant_config(base, "pcs")
    sink = variant_config(base, "full-sinkhorn")
    assert cds is not None and pcs is not None and sink is not None
    assert {n for n, t in cds.losses.terms.items() if t.weight > 0} == {"instance", "cross_instance"}
    assert {n for n, t in pcs.losses.terms.items() if t.weight > 0} == {"proto", "cross_proto", "mim"}
    assert sink.losses.clustering == "sinkhorn" and all(t.weight > 0 for t in sink.losses.terms.values())
    # nothing else differs from the base config
    for v in (cds, pcs, sink):
        a, b = v.to_dict(), base.to_dict()
        a.pop("losses"), b.pop("losses")
        assert a == b
    assert base.losses.terms["proto"].weight == 1.0  # the base is not modified
    with pytest.raises(ValueError, match="unknown variant 'full'"):
        variant_config(base, "full")


def test_overrides() -> None:
    sets = parse_sets(
        ["train.lr=5e-4", "losses.num_clusters=[7, 14]", "losses.terms.mim.weight=0", "train.mode=frozen"]
    )
    assert sets == {"train.lr": 5e-4, "losses.num_clusters": [7, 14], "losses.terms.mim.weight": 0,
                    "train.mode": "frozen"}
    cfg = base_config(get_preset("digits"), 3, 32, sets)
    assert (cfg.train.epochs, cfg.data.image_size, cfg.data.hflip, cfg.train.lr) == (3, 32, 0.0, 5e-4)
    assert cfg.losses.terms["mim"].weight == 0.0 and cfg.losses.num_clusters == [7, 14]
    with pytest.raises(ValueError, match="unknown config key 'train.speed'"):
        apply_overrides(cfg, {"train.speed": 1})
    with pytest.raises(ValueError, match="multiple of 32"):
        apply_overrides(cfg, {"data.image_size": 50})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_sets(["train.lr"])


def test_split_and_cap_keep_instance_pairs() -> None:
    def domain(name: str) -> list[Sample]:
        return [Sample(f"/d/{name}/{i % 10}/{i:05d}.png", name, str(i % 10)) for i in range(200)]

    a, b = domain("mnist"), domain("mnistm")
    (ta, ea), (tb, eb) = seeded_split(a, 0.3, 0), seeded_split(b, 0.3, 0)
    stems = lambda xs: [Path(s.path).stem for s in xs]  # noqa: E731
    assert stems(ta) == stems(tb) and stems(ea) == stems(eb)
    assert 40 < len(ea) < 80 and not set(stems(ta)) & set(stems(ea))
    assert stems(cap(a, 50, 1)) == stems(cap(b, 50, 1)) and len(cap(a, 50, 1)) == 50
    assert cap(a, 50, 1) != cap(a, 50, 2) and cap(a, None, 0) == a
    assert seeded_split(a, 0.3, 1) != (ta, ea)
    with pytest.raises(ValueError, match="fraction"):
        seeded_split(a, 1.0, 0)


def test_stat() -> None:
    assert stat([0.5, None]) == {"mean": 0.5, "std": None, "n": 1}
    s = stat([0.2, 0.4])
    assert s["mean"] == pytest.approx(0.3) and s["std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert stat([None])["mean"] is None


def test_view_of_officehome_with_a_space_in_real_world(tmp_path: Path, fabricate: Any) -> None:
    root = fabricate.folders(tmp_path / "oh", ("Art", "Clipart", "Product", "Real World"), ["Mug", "Pen"], 5)
    preset = get_preset("officehome")
    layout = check_layout(preset, root, "heldout")
    sel = select_samples(layout, root, preset.domains, "heldout", classes=None, max_per_domain=3,
                         heldout_fraction=0.4, split_seed=0)
    assert list(sel.folders) == ["Art", "Clipart", "Product", "Real_World"]
    view = write_view(tmp_path / "work", root, sel)
    assert grid_pair(preset, view.keys) == ("Clipart", "Real_World")
    train = scan_domains(view.root, view.keys, view.train_split)
    held = scan_domains(view.root, view.keys, view.eval_split)
    for k in view.keys:
        assert len(train[k]) == len(sel.train[k]) <= 3 and len(held[k]) == len(sel.eval[k]) <= 3
        assert {s.label for s in train[k]} <= {"Mug", "Pen"}
        assert all(Path(s.path).resolve().is_relative_to(root.resolve()) for s in train[k])
        assert not {Path(s.path).name for s in train[k]} & {Path(s.path).name for s in held[k]}
    again = write_view(tmp_path / "work", root, sel)  # idempotent: same links, same lists
    assert again == view


def test_pacs_kfold_lists_and_class_subset(tmp_path: Path, fabricate: Any) -> None:
    domains = ("art_painting", "cartoon", "photo", "sketch")
    root = fabricate.folders(tmp_path / "pacs", domains, ["dog", "horse", "house"], per_class=4)
    for d in domains:
        fabricate.lists(root, d, {"train": 3, "crossval": 1}, suffix="_kfold.txt")
    layout = check_layout(get_preset("pacs"), root, "heldout")
    sel = select_samples(layout, root, domains, "heldout", classes=("dog", "house"), max_per_domain=None,
                         heldout_fraction=0.3, split_seed=0)
    assert {k: (len(sel.train[k]), len(sel.eval[k])) for k in domains} == {d: (6, 2) for d in domains}
    assert "'crossval' lists" in sel.source
    assert {s.label for s in sel.eval["photo"]} == {"dog", "house"}


def test_cli_reports_problems_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["--preset", "pacs", "--data-root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PACS data root") and "Traceback" not in err
    assert cli(["--preset", "pacs", "--variants", "none,full"]) == 2
    assert "unknown variant 'full'" in capsys.readouterr().err


def _picture_ok(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5_000, path
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 300
        assert np.asarray(img.convert("RGB"), dtype=np.float32).std() > 5.0


def _tiny(tmp_path: Path) -> list[str]:
    """Arguments that keep a run tiny: 64 px, 2 epochs, small head, no loader workers."""
    return [
        "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
        "--feature-cache", str(tmp_path / "features"), "--image-size", "64", "--epochs", "2",
        "--set", "data.num_workers=0", "--set", "train.batch_size=8", "--set", "train.cached_views=1",
        "--set", "model.hidden_dim=32", "--set", "model.dim=16", "--set", "train.device=cpu",
        "--grid-queries", "3", "--grid-topk", "4", "--tsne-points", "60",
    ]


def test_end_to_end_on_tiny_digits(tmp_path: Path, fabricate: Any) -> None:
    root = fabricate.digits(tmp_path / "digits", n=12)
    path = main(["--preset", "digits", "--data-root", str(root), "--variants", "none,full-kmeans",
                 "--domains", "mnist,mnistm", *_tiny(tmp_path)])
    out = tmp_path / "out"
    assert path == out / "quality_transductive.json"
    res = json.loads(path.read_text())
    assert res["machine"]["torch"] and res["versions"]["torch"] and "git_commit" in res["machine"]
    none, full = res["variants"]["none"], res["variants"]["full-kmeans"]
    assert none["feature"] == "backbone" and full["feature"] == "head"
    assert full["config"]["losses"]["clustering"] == "kmeans" and full["config"]["train"]["epochs"] == 2
    assert full["config"]["data"]["hflip"] == 0.0  # the preset's override
    run = full["runs"][0]
    assert run["train"]["epochs"] == 2 and run["train"]["mode"] == "partial" and run["peak_rss_mb"] > 0  # CPU default
    assert {(p["query"], p["gallery"]) for p in run["pairs"]} == {("mnist", "mnistm"), ("mnistm", "mnist")}
    assert run["pairs"][0]["R@1"] is not None  # instance pairs survived the view (pairs.json, stems)
    for v in (none, full):
        assert 0.0 <= v["summary"]["mean"]["mAP"]["mean"] <= 1.0 and v["summary"]["mean"]["mAP"]["n"] == 1
    md = (out / "quality_transductive.md").read_text()
    assert "| none | backbone |" in md and "| full-kmeans | head |" in md and "R@1" in md
    for name in ("transductive_retrieval_none.png", "transductive_retrieval_full-kmeans.png",
                 "transductive_embedding_map.png", "transductive_loss_curves_full-kmeans.png"):
        assert name in res["pictures"].values()
        _picture_ok(out / name)
    assert (out / "logs" / "transductive_full-kmeans_seed0.jsonl").is_file()
    assert not list((tmp_path / "work" / "runs").rglob("checkpoint.pt"))  # dropped unless --keep-checkpoints


@pytest.mark.slow
def test_end_to_end_heldout_two_seeds(tmp_path: Path, fabricate: Any) -> None:
    domains = ("photo", "sketch")
    root = fabricate.folders(tmp_path / "pacs", domains, ["dog", "horse", "house"], per_class=6)
    path = main(["--preset", "pacs", "--data-root", str(root), "--protocol", "heldout", "--domains",
                 ",".join(domains), "--variants", "none,cds", "--seeds", "0,1", "--no-plots", *_tiny(tmp_path)])
    res = json.loads(path.read_text())
    assert path.name == "quality_heldout.json" and "seeded split" in res["data"]["selection"]
    cds = res["variants"]["cds"]["summary"]["mean"]["mAP"]
    assert cds["n"] == 2 and cds["std"] is not None
    none = res["variants"]["none"]["summary"]["mean"]["mAP"]
    assert none["std"] == pytest.approx(0.0)  # the baseline does not depend on the training seed
    assert not res["pictures"]
