"""Benchmark presets (Office-Home, DomainNet, DomainNet-7, PACS, digits, the demo) and their data-layout checks.

A preset says where a data set usually lives, which domains and cut-offs ``k`` it is scored with, which
training settings differ from ``RunConfig()`` for it, which classes it keeps, and how its held-out
protocol splits the images (official list files, or a seeded split when it has none).

:func:`check_layout` looks at a data root before anything expensive runs and raises a
:class:`~cdretrieval.errors.DataError` naming every missing piece (domain folders, class folders,
split-list files, ``.npz`` files) at once.

DomainNet-7
    UCDIR (Hu & Lee, ECCV 2022) and the methods compared with it (CoDA, ProtoOT) score DomainNet on a
    7-class subset with P@50/100/200. The papers' public code reads pre-cut class folders and does not
    name the classes, and we could not check the list offline, so the list here is **our choice**:
    ``airplane, bicycle, bird, clock, dog, strawberry, whale`` — seven frequent DomainNet classes that
    are visually distinct (vehicles, animals, an object, a fruit), appear in all six domains, and have
    enough images per domain for P@200 to mean something. Pass ``--classes`` to score another subset;
    numbers are comparable with the papers only when the class list is the same.

demo
    The embedded demo digits (:mod:`cdretrieval.data.demo`: ``ink``, ``outline``, ``photo``). Its default
    root is the generated demo data (written on first use, as ``cdretrieval demo`` does), and its
    overrides are exactly what :func:`cdretrieval.workflow.demo_config` changes from ``RunConfig()``, so
    the benchmark trains the shipped demo config.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from cdretrieval.data.folders import resolve_domain
from cdretrieval.data.images import is_image_file
from cdretrieval.errors import DataError

Protocol = Literal["transductive", "heldout"]
PROTOCOLS: tuple[str, ...] = ("transductive", "heldout")

#: The DomainNet-7 subset used by :func:`presets` (see the module docstring for why these seven).
DOMAINNET7_CLASSES: tuple[str, ...] = ("airplane", "bicycle", "bird", "clock", "dog", "strawberry", "whale")

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Preset:
    """How one benchmark data set is laid out, scored and trained.

    Attributes:
        name: the ``--preset`` value.
        title: human-readable data set name.
        data_dir: default root, relative to the shared data folder (``$CDRETRIEVAL_SHARED_DATA`` or
            ``<repo>/../shared/data``).
        domains: domain names in table order (Office-Home's "Real World" aliases are accepted on disk).
        ks: cut-offs for P@k (and R@k for instance-paired domains).
        num_classes: classes in the full data set (a check, not a filter).
        layout: ``folders`` (``ROOT/<domain>/<class>/<image>``) or ``npz`` (``ROOT/<domain>.npz``).
        split_lists: (train, eval) list names read as ``<domain>_<name>.txt`` / ``<domain>_<name>_kfold.txt``
            for the held-out protocol; None when the data set has none.
        lists_required: the held-out protocol refuses to run without the lists (DomainNet); otherwise a
            seeded split is used when *all* lists are absent (PACS).
        overrides: dotted ``RunConfig`` fields that differ from the project defaults for this data set.
        classes: class subset kept for training and evaluation (None = all).
        grid_pair: (query domain, gallery domain) of the retrieval picture.
        generated_root: for data we generate ourselves (the demo): ``create → root``; with ``create`` it
            writes the data when absent. None: the data lives under the shared data folder.
    """

    name: str
    title: str
    data_dir: str
    domains: tuple[str, ...]
    ks: tuple[int, ...]
    num_classes: int
    layout: Literal["folders", "npz"] = "folders"
    split_lists: tuple[str, str] | None = None
    lists_required: bool = False
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    classes: tuple[str, ...] | None = None
    grid_pair: tuple[str, str] | None = None
    generated_root: Callable[[bool], Path] | None = None

    def default_root(self, create: bool = True) -> Path:
        """``$CDRETRIEVAL_SHARED_DATA/<data_dir>``, else ``<repo>/../shared/data/<data_dir>``; for generated
        data (the demo) its folder, generated first when ``create`` and absent."""
        if self.generated_root is not None:
            return self.generated_root(create)
        shared = os.environ.get("CDRETRIEVAL_SHARED_DATA")
        base = Path(shared).expanduser() if shared else REPO.parent / "shared" / "data"
        return base / self.data_dir

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (what the results file records)."""
        return {
            "name": self.name, "title": self.title, "default_root": str(self.default_root(create=False)),
            "domains": list(self.domains), "ks": list(self.ks), "num_classes": self.num_classes,
            "layout": self.layout, "split_lists": list(self.split_lists) if self.split_lists else None,
            "lists_required": self.lists_required, "overrides": dict(self.overrides),
            "classes": list(self.classes) if self.classes else None,
            "grid_pair": list(self.grid_pair) if self.grid_pair else None,
        }


def _demo_root(create: bool) -> Path:
    from cdretrieval.data.demo import default_demo_root, generate_demo_data

    return generate_demo_data() if create else default_demo_root()


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def demo_overrides() -> dict[str, Any]:
    """The dotted fields in which the shipped demo config differs from ``RunConfig()`` (root and domains aside)."""
    from cdretrieval.config import RunConfig
    from cdretrieval.workflow import demo_config

    default = _flatten(RunConfig().to_dict())
    demo = _flatten(demo_config("", None, is_demo_data=True).to_dict())
    return {k: v for k, v in demo.items() if default.get(k) != v and k not in ("data.root", "data.domains")}


def presets() -> dict[str, Preset]:
    """Every preset by name."""
    domainnet_domains = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    domainnet = {"data.image_size": 128}  # 600k images: 128 px keeps the CPU cache pass at 0.64× the default's
    items = [
        Preset(
            "officehome", "Office-Home", "officehome", ("Art", "Clipart", "Product", "Real World"), (1, 5, 15), 65,
            grid_pair=("Clipart", "Real World"),
        ),
        Preset(
            "domainnet", "DomainNet", "domainnet", domainnet_domains, (50, 100, 200), 345,
            split_lists=("train", "test"), lists_required=True, overrides=MappingProxyType(domainnet),
            grid_pair=("sketch", "real"),
        ),
        Preset(
            "domainnet7", "DomainNet-7 (UCDIR-style 7-class subset)", "domainnet", domainnet_domains,
            (50, 100, 200), 345, split_lists=("train", "test"), lists_required=True,
            overrides=MappingProxyType(domainnet), classes=DOMAINNET7_CLASSES, grid_pair=("sketch", "real"),
        ),
        Preset(
            "pacs", "PACS", "pacs", ("art_painting", "cartoon", "photo", "sketch"), (1, 5, 15), 7,
            split_lists=("train", "crossval"),
            grid_pair=("sketch", "photo"),
        ),
        Preset(
            "digits", "Digits (MNIST / MNIST-M / USPS)", "digits", ("mnist", "mnistm", "usps"), (1, 5, 15), 10,
            layout="npz",
            # digits are not mirror-symmetric; small crops cut strokes away
            overrides=MappingProxyType(
                {"data.image_size": 64, "data.hflip": 0.0, "data.min_scale": 0.5}
            ),
            grid_pair=("mnist", "mnistm"),
        ),
        Preset(
            "demo", "Demo digits (ink / outline / photo)", "demo", ("ink", "outline", "photo"), (1, 5, 15), 10,
            overrides=MappingProxyType(demo_overrides()), grid_pair=("ink", "photo"), generated_root=_demo_root,
        ),
    ]
    return {p.name: p for p in items}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the known ones otherwise."""
    known = presets()
    if name not in known:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(known)}")
    return known[name]


# --------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """What :func:`check_layout` found.

    Attributes:
        root: the data root as given (for digits: the folder of ``.npz`` files, or a folder layout).
        folders: preset domain name → its folder name under the (folder-layout) root; for ``.npz`` roots
            the file stem.
        lists: (train, eval) list names when every domain has both list files, else None.
        notes: what a reader of the results should know (aliases used, seeded split, class counts).
    """

    root: Path
    folders: dict[str, str]
    lists: tuple[str, str] | None
    notes: tuple[str, ...] = ()


def list_file(root: Path, folder: str, split: str) -> Path | None:
    """``<folder>_<split>.txt`` or ``<folder>_<split>_kfold.txt`` in ``root`` (what the library reads)."""
    for stem in dict.fromkeys((folder, folder.lower())):
        for name in (f"{stem}_{split}.txt", f"{stem}_{split}_kfold.txt"):
            if (root / name).is_file():
                return root / name
    return None


def _first_listed(path: Path) -> str | None:
    """The relative image path on the first non-comment line of a list file (None when empty)."""
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.strip()
            if line and not line.startswith("#"):
                return line.split()[0]
    return None


def _class_folders(folder: Path) -> list[str]:
    return sorted(c.name for c in folder.iterdir() if c.is_dir() and not c.name.startswith("."))


def _has_image(folder: Path) -> bool:
    return any(is_image_file(f) for _dirpath, _dirs, files in os.walk(folder) for f in files)


def _check_folders(preset: Preset, root: Path, domains: Sequence[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """Domain and class folders: (preset name → folder name, problems, notes)."""
    folders: dict[str, str] = {}
    problems: list[str] = []
    notes: list[str] = []
    for name in domains:
        try:
            folder = resolve_domain(root, name)
        except DataError:
            problems.append(f"domain folder {name!r}")
            continue
        folders[name] = folder.name
        if folder.name != name:
            notes.append(f"domain {name!r} is the folder {folder.name!r}")
        classes = _class_folders(folder)
        if not classes or not _has_image(folder):
            problems.append(f"class folders with images in {folder.name}/ (expected {folder.name}/<class>/<image>)")
            continue
        if preset.classes:
            missing = sorted(set(preset.classes) - set(classes))
            if missing:
                problems.append(f"class folder(s) {', '.join(missing)} in {folder.name}/")
        elif len(classes) != preset.num_classes:
            notes.append(f"{folder.name}: {len(classes)} class folders (the full data set has {preset.num_classes})")
    return folders, problems, notes


def _check_lists(
    preset: Preset, root: Path, folders: Mapping[str, str], protocol: str
) -> tuple[tuple[str, str] | None, list[str], list[str]]:
    """Split-list files: (list names when all present, problems, notes)."""
    if preset.split_lists is None:
        return None, [], []
    found: list[Path] = []
    missing: list[str] = []
    for folder in folders.values():
        for split in preset.split_lists:
            path = list_file(root, folder, split)
            if path is None:
                missing.append(f"{folder}_{split}.txt")
            else:
                found.append(path)
    problems: list[str] = []
    for path in found:
        rel = _first_listed(path)
        if rel is not None and not any((base / rel).is_file() for base in (root, path.parent)):
            problems.append(f"the images listed in {path.name} (first: {rel!r} not found under {root})")
    if not missing:
        return preset.split_lists, problems, []
    if preset.lists_required and protocol == "heldout":
        problems.append("split list file(s) " + ", ".join(missing))
        return None, problems, []
    if found and protocol == "heldout":
        problems.append("split list file(s) " + ", ".join(missing) + " (some lists exist: give all or none)")
        return None, problems, []
    if preset.lists_required:
        return None, problems, [f"no {'/'.join(preset.split_lists)} lists: the held-out protocol needs them"]
    return None, problems, [f"no {'/'.join(preset.split_lists)} lists: a held-out run uses a seeded split"]


def _check_npz(preset: Preset, root: Path, domains: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``<domain>.npz`` files with ``images`` and ``labels`` arrays: (name → stem, problems)."""
    folders: dict[str, str] = {}
    problems: list[str] = []
    for name in domains:
        path = root / f"{name}.npz"
        if not path.is_file():
            problems.append(f"{name}.npz")
            continue
        try:
            with zipfile.ZipFile(path) as z:
                arrays = {Path(n).stem for n in z.namelist()}
        except (OSError, zipfile.BadZipFile):
            problems.append(f"a readable {name}.npz (the file is not an .npz archive)")
            continue
        lacking = sorted({"images", "labels"} - arrays)
        if lacking:
            problems.append(f"array(s) {', '.join(lacking)} in {name}.npz")
            continue
        folders[name] = name
    return folders, problems


def _expected(preset: Preset) -> str:
    if preset.layout == "npz":
        return "ROOT/<domain>.npz with arrays images and labels, for domains " + ", ".join(preset.domains)
    lists = ""
    if preset.split_lists:
        lists = " and lists ROOT/<domain>_{" + ",".join(preset.split_lists) + "}.txt"
    return f"ROOT/<domain>/<class>/<image>{lists}; domains {', '.join(preset.domains)}"


def check_layout(
    preset: Preset,
    root: str | os.PathLike[str],
    protocol: str = "transductive",
    domains: Sequence[str] | None = None,
) -> Layout:
    """Check that ``root`` holds ``preset``'s data for ``protocol``; say everything that is missing.

    Args:
        preset: the data set.
        root: its root folder.
        protocol: ``transductive`` or ``heldout`` (DomainNet's held-out run needs its split lists).
        domains: a subset of the preset's domains (default: all of them).

    Raises:
        DataError: naming the root and every missing domain folder, class folder, list or ``.npz`` file.
        ValueError: unknown protocol or domain.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    names = list(domains) if domains else list(preset.domains)
    unknown = [d for d in names if d not in preset.domains]
    if unknown:
        raise ValueError(f"{preset.name}: unknown domain(s) {unknown}; the preset's domains: {list(preset.domains)}")
    if len(names) < 2:
        raise ValueError(f"need at least two domains, got {names}")
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DataError(
            f"{preset.title} data root {r} does not exist or is not a folder; pass --data-root "
            f"(expected {_expected(preset)})"
        )
    problems: list[str] = []
    notes: list[str] = []
    lists: tuple[str, str] | None = None
    if preset.layout == "npz" and not any((r / d).is_dir() for d in names):
        folders, problems = _check_npz(preset, r, names)
    else:
        folders, problems, notes = _check_folders(preset, r, names)
        lists, list_problems, list_notes = _check_lists(preset, r, folders, protocol)
        problems += list_problems
        notes += list_notes
    if problems:
        raise DataError(
            f"{preset.title} data in {r} is incomplete; missing: " + "; ".join(problems)
            + f". Expected {_expected(preset)}."
        )
    return Layout(r, folders, lists, tuple(notes))
