"""DomainDetector: fitting, probabilities, accuracy, and storage with an IndexSet (self-describing, checked)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cdretrieval.domain_detection import DETECTOR_FILE, Detection, DomainDetector
from cdretrieval.errors import IndexFileError, IndexMismatchError
from cdretrieval.index import INDEX_SET_FILE, IndexSet, Item, load_detector


def _domains(n: int = 60, dim: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Three well-separated clusters of unit vectors (one per domain), ``n`` each."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim))
    out = {}
    for name, c in zip(("ink", "outline", "photo"), centres, strict=True):
        x = c + 0.3 * rng.normal(size=(n, dim))
        out[name] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def test_fit_detects_and_reports_held_out_accuracy() -> None:
    train, test = _domains(seed=0), _domains(seed=0, n=90)
    det = DomainDetector.fit(train, feature="backbone", model_hash="m")
    assert det.domains == ["ink", "outline", "photo"] and det.dim == 16
    assert det.holdout_accuracy == pytest.approx(1.0) and det.info["n_per_domain"] == {"ink": 60, "outline": 60,
                                                                                        "photo": 60}
    found = det.detect(test["outline"][:5])
    assert all(isinstance(d, Detection) and d.domain == "outline" and d.confidence > 0.9 for d in found)
    domain, confidence, probs = found[0]  # a named tuple
    assert set(probs) == {"ink", "outline", "photo"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert confidence == max(probs.values()) and domain == "outline"
    report = det.accuracy({**test, "sketch": test["ink"][:10]})  # an unknown domain counts as missed
    assert report["n"] == 280 and report["per_domain"]["sketch"] == 0.0
    assert report["accuracy"] == pytest.approx(270 / 280)
    with pytest.raises(ValueError, match="16-d"):
        det.probabilities(np.ones((2, 8)))


def test_two_domains_and_imbalance() -> None:
    data = _domains()
    det = DomainDetector.fit({"ink": data["ink"], "photo": data["photo"][:12]}, feature="head", model_hash="m")
    p = det.probabilities(np.concatenate([data["ink"][:3], data["photo"][:3]]))
    assert p.shape == (6, 2) and (p[:3, 0] > 0.5).all() and (p[3:, 1] > 0.5).all()
    with pytest.raises(ValueError, match="two domains"):
        DomainDetector.fit({"ink": data["ink"]}, feature="head", model_hash="m")


def test_roundtrip_dict() -> None:
    det = DomainDetector.fit(_domains(), feature="backbone", model_hash="m")
    back = DomainDetector.from_dict(json.loads(det.to_json_bytes()))
    x = _domains(seed=3)["photo"]
    np.testing.assert_allclose(back.probabilities(x), det.probabilities(x), atol=1e-6)
    assert back.feature == "backbone" and back.model_hash == "m" and back.info == det.info
    with pytest.raises(ValueError, match="format_version"):
        DomainDetector.from_dict({**det.to_dict(), "format_version": 99})


def _index_set(vectors: dict[str, np.ndarray]) -> IndexSet:
    items = {d: [Item(f"/data/{d}/{i}.png", d, "0") for i in range(len(x))] for d, x in vectors.items()}
    iset = IndexSet.build(vectors, items, "m")
    for d in iset:
        iset[d].manifest["feature"] = "head"
    return iset


def test_index_set_stores_detector_atomically_and_checks_it(tmp_path: Path) -> None:
    vectors = _domains()
    iset = _index_set(vectors)
    iset.set_detector(DomainDetector.fit(vectors, feature="head", model_hash="m"))
    root = iset.save(tmp_path / "index")
    meta = json.loads((root / INDEX_SET_FILE).read_text())
    entry = meta["domain_detector"]
    assert entry["file"] == DETECTOR_FILE and entry["feature"] == "head"
    assert entry["bytes"] == (root / DETECTOR_FILE).stat().st_size
    assert not list(root.glob(".*.tmp"))  # atomic writes leave no temporary files
    loaded = IndexSet.load(root)
    assert loaded.detector is not None and loaded.detector.domains == ["ink", "outline", "photo"]
    assert load_detector(root) is not None

    (root / DETECTOR_FILE).write_bytes((root / DETECTOR_FILE).read_bytes().replace(b'"m"', b'"x"'))
    with pytest.raises(IndexFileError, match="corrupt or was replaced"):
        IndexSet.load(root)
    (root / DETECTOR_FILE).unlink()
    with pytest.raises(IndexFileError, match="missing"):
        IndexSet.load(root)

    iset.set_detector(None)  # saving without one removes the file and records null
    iset.save(root)
    assert not (root / DETECTOR_FILE).exists() and IndexSet.load(root).detector is None
    del meta["domain_detector"]  # an index set from before detection: no key at all
    (root / INDEX_SET_FILE).write_text(json.dumps(meta))
    assert IndexSet.load(root).detector is None and load_detector(root) is None


def test_index_set_refuses_a_foreign_detector() -> None:
    vectors = _domains()
    iset = _index_set(vectors)
    with pytest.raises(IndexMismatchError, match="model"):
        iset.set_detector(DomainDetector.fit(vectors, feature="head", model_hash="other"))
    with pytest.raises(IndexMismatchError, match="domains"):
        iset.set_detector(DomainDetector.fit({"ink": vectors["ink"], "photo": vectors["photo"]}, feature="head",
                                             model_hash="m"))
    with pytest.raises(IndexMismatchError, match="8-d head"):
        iset.set_detector(DomainDetector.fit({d: x[:, :8] for d, x in vectors.items()}, feature="head",
                                             model_hash="m"))
