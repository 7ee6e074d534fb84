"""Preset layout checks on tiny fabricated data sets with the real layouts and file naming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.presets import DOMAINNET7_CLASSES, check_layout, get_preset, presets
from cdretrieval.errors import DataError

OFFICE = ("Art", "Clipart", "Product")
DOMAINNET = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
PACS = ("art_painting", "cartoon", "photo", "sketch")


def test_every_preset_is_described() -> None:
    names = set(presets())
    assert names == {"officehome", "domainnet", "domainnet7", "pacs", "digits", "demo"}
    assert get_preset("domainnet").ks == (50, 100, 200) and get_preset("pacs").ks == (1, 5, 15)
    assert get_preset("domainnet7").classes == DOMAINNET7_CLASSES and len(DOMAINNET7_CLASSES) == 7
    assert get_preset("digits").overrides["data.hflip"] == 0.0
    assert get_preset("pacs").default_root().name == "pacs"
    demo = get_preset("demo")  # trains exactly the shipped demo config, on the generated demo data
    assert demo.overrides == {"data.image_size": 128, "data.hflip": 0.0, "data.min_scale": 0.6, "train.epochs": 20}
    assert demo.default_root(create=False).name.startswith("demo-digits-v")
    with pytest.raises(ValueError, match="unknown preset 'office'"):
        get_preset("office")


@pytest.mark.parametrize("real", ["Real World", "Real_World", "RealWorld", "Real"])
def test_officehome_accepts_every_real_world_name(tmp_path: Path, fabricate: Any, real: str) -> None:
    root = fabricate.folders(tmp_path / "oh", (*OFFICE, real), ["Alarm_Clock", "Backpack"], per_class=1)
    layout = check_layout(get_preset("officehome"), root)
    assert layout.folders == {"Art": "Art", "Clipart": "Clipart", "Product": "Product", "Real World": real}
    assert any("2 class folders" in n for n in layout.notes)  # not the full 65 classes: said, not refused


def test_officehome_names_what_is_missing(tmp_path: Path, fabricate: Any) -> None:
    root = fabricate.folders(tmp_path / "oh", ("Art", "Product"), ["Backpack"], per_class=1)
    (root / "Clipart").mkdir()  # a domain folder without class folders
    with pytest.raises(DataError) as e:
        check_layout(get_preset("officehome"), root)
    msg = str(e.value)
    assert "Office-Home" in msg and "'Real World'" in msg and "class folders with images in Clipart/" in msg
    with pytest.raises(DataError, match="does not exist"):
        check_layout(get_preset("officehome"), tmp_path / "nowhere")


def _domainnet(tmp_path: Path, fabricate: Any, classes: list[str]) -> Path:
    root = fabricate.folders(tmp_path / "dn", DOMAINNET, classes, per_class=3)
    for d in DOMAINNET:
        fabricate.lists(root, d, {"train": 2, "test": 1})
    return root


def test_domainnet_split_files(tmp_path: Path, fabricate: Any) -> None:
    root = _domainnet(tmp_path, fabricate, ["aircraft_carrier", "zebra"])
    first = (root / "clipart_train.txt").read_text().splitlines()[0]
    assert first == "clipart/aircraft_carrier/clipart_aircraft_carrier_000.png 0"
    layout = check_layout(get_preset("domainnet"), root, "heldout")
    assert layout.lists == ("train", "test")
    (root / "sketch_test.txt").unlink()
    (root / "real_train.txt").unlink()
    with pytest.raises(DataError, match=r"split list file\(s\) real_train.txt, sketch_test.txt"):
        check_layout(get_preset("domainnet"), root, "heldout")
    layout = check_layout(get_preset("domainnet"), root, "transductive")  # lists are not needed there
    assert layout.lists is None and any("held-out protocol needs them" in n for n in layout.notes)


def test_domainnet_list_pointing_elsewhere(tmp_path: Path, fabricate: Any) -> None:
    root = _domainnet(tmp_path, fabricate, ["zebra"])
    (root / "painting_test.txt").write_text("painting/zebra/missing.jpg 0\n")
    with pytest.raises(DataError, match="painting_test.txt.*missing.jpg"):
        check_layout(get_preset("domainnet"), root, "heldout")


def test_domainnet7_needs_its_classes(tmp_path: Path, fabricate: Any) -> None:
    root = _domainnet(tmp_path, fabricate, list(DOMAINNET7_CLASSES))
    assert check_layout(get_preset("domainnet7"), root, "heldout").lists == ("train", "test")
    for d in ("real", "quickdraw"):
        for f in (root / d / "whale").iterdir():
            f.unlink()
        (root / d / "whale").rmdir()
    with pytest.raises(DataError, match=r"class folder\(s\) whale in quickdraw/.*whale in real/"):
        check_layout(get_preset("domainnet7"), root)


def test_pacs_with_and_without_kfold_lists(tmp_path: Path, fabricate: Any) -> None:
    root = fabricate.folders(tmp_path / "pacs", PACS, ["dog", "horse"], per_class=4)
    bare = check_layout(get_preset("pacs"), root, "heldout")
    assert bare.lists is None and any("seeded split" in n for n in bare.notes)
    for d in PACS:
        fabricate.lists(root, d, {"train": 3, "crossval": 1}, suffix="_kfold.txt")
    assert (root / "photo_crossval_kfold.txt").is_file()
    assert check_layout(get_preset("pacs"), root, "heldout").lists == ("train", "crossval")
    (root / "cartoon_crossval_kfold.txt").unlink()
    with pytest.raises(DataError, match="cartoon_crossval.txt .*give all or none"):
        check_layout(get_preset("pacs"), root, "heldout")
    check_layout(get_preset("pacs"), root, "transductive")  # lists are ignored there


def test_pacs_domain_subset_and_bad_arguments(tmp_path: Path, fabricate: Any) -> None:
    root = fabricate.folders(tmp_path / "pacs", ("photo", "sketch"), ["dog"], per_class=1)
    assert set(check_layout(get_preset("pacs"), root, domains=["photo", "sketch"]).folders) == {"photo", "sketch"}
    with pytest.raises(DataError, match="'art_painting'.*'cartoon'"):
        check_layout(get_preset("pacs"), root)
    with pytest.raises(ValueError, match="unknown domain"):
        check_layout(get_preset("pacs"), root, domains=["photo", "quickdraw"])
    with pytest.raises(ValueError, match="protocol"):
        check_layout(get_preset("pacs"), root, "inductive")


def test_digits_npz(tmp_path: Path, fabricate: Any) -> None:
    root = fabricate.digits(tmp_path / "digits", n=4)
    layout = check_layout(get_preset("digits"), root)
    assert layout.folders == {"mnist": "mnist", "mnistm": "mnistm", "usps": "usps"}
    (root / "usps.npz").unlink()
    np.savez(root / "mnistm.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"array\(s\) labels in mnistm.npz; usps.npz"):
        check_layout(get_preset("digits"), root)
    (root / "mnist.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="a readable mnist.npz"):
        check_layout(get_preset("digits"), root, domains=["mnist", "mnistm"])
