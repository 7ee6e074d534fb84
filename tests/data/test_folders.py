from pathlib import Path

import pytest
from PIL import Image

from cdretrieval.data.folders import list_domains, parse_domains, resolve_domain, scan_domain, scan_domains
from cdretrieval.errors import DataError


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


@pytest.mark.parametrize("folder", ["Real", "Real_World", "Real World", "RealWorld"])
@pytest.mark.parametrize("asked", ["Real", "real_world", "Real World", "RealWorld", "real"])
def test_office_home_real_aliases(tmp_path: Path, folder: str, asked: str) -> None:
    _img(tmp_path / folder / "Chair" / "00001.jpg")
    _img(tmp_path / "Art" / "Chair" / "00001.jpg")
    samples = scan_domain(tmp_path, asked)
    assert [s.domain for s in samples] == [folder]
    assert samples[0].label == "Chair"


def test_labeled_and_unlabeled_layouts(tmp_path: Path) -> None:
    _img(tmp_path / "photo" / "dog" / "b.jpg")
    _img(tmp_path / "photo" / "dog" / "a.jpg")
    _img(tmp_path / "photo" / "cat" / "c.png")
    _img(tmp_path / "sketch" / "x.png")
    (tmp_path / "sketch" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    assert list_domains(tmp_path) == ["photo", "sketch"]
    photo = scan_domain(tmp_path, "PHOTO")
    assert [(Path(s.path).name, s.label) for s in photo] == [("c.png", "cat"), ("a.jpg", "dog"), ("b.jpg", "dog")]
    assert [s.label for s in scan_domain(tmp_path, "sketch")] == [None]
    with pytest.raises(DataError, match="no images"):
        scan_domain(tmp_path, "empty")
    with pytest.raises(DataError, match="not found.*available: empty, photo, sketch"):
        scan_domain(tmp_path, "clipart")
    with pytest.raises(DataError, match="does not exist"):
        scan_domain(tmp_path / "missing", "photo")


def test_domainnet_split_files(tmp_path: Path) -> None:
    for split, names in {"train": ["a.jpg", "b.jpg"], "test": ["c.jpg"]}.items():
        for n in names:
            _img(tmp_path / "clipart" / "aircraft_carrier" / n)
        lines = [f"clipart/aircraft_carrier/{n} 0" for n in names]
        (tmp_path / f"clipart_{split}.txt").write_text("\n".join(lines) + "\n")
    assert len(scan_domain(tmp_path, "clipart")) == 3
    train = scan_domain(tmp_path, "clipart", split="train")
    assert [Path(s.path).name for s in train] == ["a.jpg", "b.jpg"]
    assert {s.label for s in train} == {"aircraft_carrier"}
    assert len(scan_domain(tmp_path, "clipart", split="test")) == 1
    with pytest.raises(DataError, match="no split file"):
        scan_domain(tmp_path, "clipart", split="val")
    (tmp_path / "clipart_bad.txt").write_text("clipart/x/missing.jpg 1\n")
    with pytest.raises(DataError, match="missing.jpg"):
        scan_domain(tmp_path, "clipart", split="bad")


def test_pacs_kfold_lists(tmp_path: Path) -> None:
    _img(tmp_path / "art_painting" / "dog" / "pic_001.jpg")
    _img(tmp_path / "art_painting" / "dog" / "pic_002.jpg")
    (tmp_path / "art_painting_crossval_kfold.txt").write_text("art_painting/dog/pic_002.jpg 1\n")
    got = scan_domain(tmp_path, "art_painting", split="crossval")
    assert [Path(s.path).name for s in got] == ["pic_002.jpg"]


def test_scan_domains_and_parse(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "1.png")
    _img(tmp_path / "b" / "1.png")
    assert list(scan_domains(tmp_path)) == ["a", "b"]
    with pytest.raises(DataError, match="given twice"):
        scan_domains(tmp_path, ["a", "A"])
    assert parse_domains("a, b,,c") == ["a", "b", "c"]
    assert parse_domains("") is None and parse_domains(None) is None
    assert resolve_domain(tmp_path, "A").name == "a"


def test_real_pacs_layout(pacs_root: Path) -> None:
    data = scan_domains(pacs_root)
    assert set(data) == {"photo", "art_painting", "cartoon", "sketch"}
    assert len(data["photo"]) == 1499 and len(data["sketch"]) == 3531
    assert {s.label for s in data["photo"]} == {"dog", "elephant", "giraffe", "guitar", "horse", "house", "person"}


def test_links_out_of_a_domain_are_skipped_but_a_linked_domain_folder_is_followed(tmp_path: Path) -> None:
    """A link inside a domain that leads out of the data is skipped with a warning; a domain folder that is
    itself a link (a whole domain kept elsewhere, as the quality benchmark's views do) is scanned."""

    elsewhere = tmp_path / "elsewhere" / "photos" / "dog"
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(elsewhere / "a.png")
    private = tmp_path / "private"
    private.mkdir()
    Image.new("RGB", (8, 8)).save(private / "secret.png")
    root = tmp_path / "root"
    (root / "sketch" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "sketch" / "dog" / "b.png")
    (root / "sketch" / "dog" / "link.png").symlink_to(private / "secret.png")
    (root / "photo").symlink_to(tmp_path / "elsewhere" / "photos", target_is_directory=True)
    with pytest.warns(UserWarning, match="outside the data root"):
        sketch = scan_domain(root, "sketch")
    assert [Path(s.path).name for s in sketch] == ["b.png"]
    photo = scan_domain(root, "photo")
    assert [Path(s.path).name for s in photo] == ["a.png"] and photo[0].label == "dog"
