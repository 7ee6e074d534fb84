"""Which visual domain is a query from? A linear classifier over the indexed images, fitted at index time.

"auto" (the UI's query domain, and the API / CLI when no source domain is given) *predicts* the query's
domain among the indexed ones, then searches the other domains. The predictor is a multinomial logistic
regression (scikit-learn, ``lbfgs``, balanced class weights so a big domain does not win by its size
alone) from an image's vector to its domain — the domain *folder name* of each indexed image, never a
class label. Its input (``feature``) is the model's ``"head"`` embedding or its ``"backbone"`` pooled
feature (L2-normalised), whichever it was fitted on; at query time both come from one forward pass.

Fitting (:meth:`DomainDetector.fit`): at most ``max_per_domain`` images per domain (a seeded sample), the
features standardised, a stratified 20 % held out to measure accuracy (recorded as ``holdout``), then the
final model refitted on every sampled image. The standardisation is folded into the weights, so the saved
model is one linear layer: ``p = softmax(W·x + b)`` over the L2-normalised vector ``x``.

Storage: ``INDEX_ROOT/domain_detector.json`` (:data:`DETECTOR_FILE`), written atomically by
:meth:`cdretrieval.index.IndexSet.save` and recorded (size + sha256) in ``indexset.json``; it names its
domains, feature, model hash, dim, weights and how it was fitted, so it describes itself. An index set
without one loads fine: detection is then unavailable and "auto" searches every domain.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, NamedTuple

import numpy as np

DETECTOR_FILE: Final = "domain_detector.json"
DETECTOR_FORMAT: Final = 1
DETECTOR_KIND: Final = "multinomial_logistic_regression"
#: What the detector reads: the projection head's embedding, or the backbone's pooled feature.
DetectorFeature = Literal["head", "backbone"]
DETECTOR_FEATURES: Final = ("head", "backbone")
MAX_PER_DOMAIN: Final = 5_000  # images per domain the classifier is fitted on (a seeded sample above it)
HOLDOUT_FRACTION: Final = 0.2
DEFAULT_C: Final = 0.1  # inverse L2 regularisation strength on standardised features (PACS: flat over 0.01–5)


class Detection(NamedTuple):
    """A query's predicted domain, the probability of that prediction, and every domain's probability.

    A named tuple: ``domain, confidence, probabilities = detection``.
    """

    domain: str
    confidence: float
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict ``{"domain", "confidence", "probabilities"}``."""
        return {"domain": self.domain, "confidence": self.confidence, "probabilities": dict(self.probabilities)}


def _unit_rows(x: Any, name: str) -> np.ndarray:
    """``x`` as ``[N, D]`` float32 with L2-normalised rows (ValueError naming ``name`` otherwise)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name} must be [N, D] with D ≥ 1, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return (a / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _sample_rows(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: all ``n`` rows, or ``cap`` of them drawn without replacement."""
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, size=cap, replace=False))


def _fit_linear(x: np.ndarray, y: np.ndarray, n_classes: int, c: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standardise, fit a balanced multinomial logistic regression, fold the scaling in: ``(W [C,D], b [C])``."""
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0, dtype=np.float64)
    scale = x.std(axis=0, dtype=np.float64)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x - mean) / scale
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
    clf.fit(z, y)
    coef = np.asarray(clf.coef_, dtype=np.float64)  # [C, D], or [1, D] for two classes
    intercept = np.asarray(clf.intercept_, dtype=np.float64)
    if n_classes == 2 and coef.shape[0] == 1:  # sigmoid(w·z + b) = softmax([-(w·z+b)/2, (w·z+b)/2])[1]
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    weights = coef / scale  # W·((x − m)/s) + b = (W/s)·x + (b − (W/s)·m)
    bias = intercept - weights @ mean
    return weights.astype(np.float32), bias.astype(np.float32)


def _accuracy_report(pred: np.ndarray, y: np.ndarray, domains: Sequence[str]) -> dict[str, Any]:
    """Overall accuracy, per-domain accuracy (recall) and the count, for predictions ``pred`` of ``y``."""
    per = {d: float(np.mean(pred[y == i] == i)) for i, d in enumerate(domains) if (y == i).any()}
    return {"accuracy": float(np.mean(pred == y)) if len(y) else None, "per_domain": per, "n": len(y)}


class DomainDetector:
    """``softmax(W·x + b)`` over the indexed domains; build with :meth:`fit`, persist with :meth:`to_dict`.

    Args:
        domains: the class order of ``weights`` rows (domain folder names).
        weights: ``[C, D]`` float32; ``bias``: ``[C]``.
        feature: ``"head"`` (the model's embedding) or ``"backbone"`` (its pooled backbone feature).
        model_hash: the model whose vectors it reads (checked against the index when loaded).
        info: how it was fitted (``n_per_domain``, ``holdout`` accuracy, ``C``, ...), JSON-ready.
    """

    def __init__(
        self,
        domains: Sequence[str],
        weights: Any,
        bias: Any,
        feature: DetectorFeature,
        model_hash: str,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        w = np.asarray(weights, dtype=np.float32)
        b = np.asarray(bias, dtype=np.float32)
        if len(domains) < 2 or len(set(domains)) != len(domains):
            raise ValueError(f"a domain detector needs at least two distinct domains, got {list(domains)}")
        if w.ndim != 2 or w.shape[0] != len(domains) or b.shape != (len(domains),):
            raise ValueError(f"weights must be [{len(domains)}, D] and bias [{len(domains)}], got {w.shape}, {b.shape}")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ValueError("the detector's weights contain NaN or infinite values")
        if feature not in DETECTOR_FEATURES:
            raise ValueError(f"feature must be one of {DETECTOR_FEATURES}, got {feature!r}")
        self.domains = [str(d) for d in domains]
        self.weights = w
        self.bias = b
        self.feature: DetectorFeature = feature
        self.model_hash = str(model_hash)
        self.info: dict[str, Any] = dict(info or {})

    @property
    def dim(self) -> int:
        """Length of the vectors it reads."""
        return int(self.weights.shape[1])

    @property
    def holdout_accuracy(self) -> float | None:
        """Accuracy on the images held out at fit time (None when too few to hold any out)."""
        value = self.info.get("holdout", {}).get("accuracy")
        return float(value) if value is not None else None

    # -- fitting --------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        vectors: Mapping[str, Any],
        *,
        feature: DetectorFeature,
        model_hash: str,
        c: float = DEFAULT_C,
        max_per_domain: int = MAX_PER_DOMAIN,
        seed: int = 0,
    ) -> DomainDetector:
        """Fit on ``vectors[domain]`` ``[N_d, D]`` (one row per indexed image of that domain).

        Raises:
            ValueError: fewer than two domains, a domain without rows, dims that differ, bad values.
        """
        domains = list(vectors)
        if len(domains) < 2:
            raise ValueError(f"domain detection needs at least two domains, got {domains}")
        rng = np.random.default_rng(seed)
        xs, ys, counts = [], [], {}
        for i, d in enumerate(domains):
            x = _unit_rows(vectors[d], f"vectors of domain {d!r}")
            if x.shape[0] == 0:
                raise ValueError(f"domain {d!r} has no vectors to fit the detector on")
            rows = _sample_rows(x.shape[0], max_per_domain, rng)
            xs.append(x[rows])
            ys.append(np.full(len(rows), i))
            counts[d] = len(rows)
        if len({x.shape[1] for x in xs}) != 1:
            raise ValueError(f"the domains' vectors have different dims: {[x.shape[1] for x in xs]}")
        x_all, y_all = np.concatenate(xs), np.concatenate(ys)

        holdout: dict[str, Any] = {"accuracy": None, "per_domain": {}, "n": 0}
        test = _holdout_rows(y_all, len(domains), rng)
        if test.any():
            w, b = _fit_linear(x_all[~test], y_all[~test], len(domains), c, seed)
            pred = np.argmax(x_all[test] @ w.T + b, axis=1)
            holdout = _accuracy_report(pred, y_all[test], domains)
        w, b = _fit_linear(x_all, y_all, len(domains), c, seed)
        train_acc = float(np.mean(np.argmax(x_all @ w.T + b, axis=1) == y_all))
        info = {
            "kind": DETECTOR_KIND,
            "C": float(c),
            "class_weight": "balanced",
            "standardised": True,
            "seed": int(seed),
            "n_per_domain": counts,
            "holdout_fraction": HOLDOUT_FRACTION,
            "holdout": holdout,
            "train_accuracy": train_acc,
        }
        return cls(domains, w, b, feature, model_hash, info)

    # -- predicting -----------------------------------------------------------------------------------
    def probabilities(self, vectors: Any) -> np.ndarray:
        """``[N, C]`` domain probabilities of ``vectors`` ``[N, D]`` (or one ``[D]``); rows sum to 1.

        Raises:
            ValueError: wrong dim or non-finite values.
        """
        x = _unit_rows(vectors, "vectors")
        if x.shape[1] != self.dim:
            raise ValueError(f"the detector reads {self.dim}-d vectors, got {x.shape[1]}-d")
        logits = x @ self.weights.T + self.bias  # [N, C]
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits.astype(np.float64))
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def detect(self, vectors: Any) -> list[Detection]:
        """One :class:`Detection` per row of ``vectors``: the most probable domain and the probabilities."""
        out = []
        for row in self.probabilities(vectors):
            best = int(np.argmax(row))
            probs = {d: round(float(p), 6) for d, p in zip(self.domains, row, strict=True)}
            out.append(Detection(self.domains[best], round(float(row[best]), 6), probs))
        return out

    def accuracy(self, vectors: Mapping[str, Any]) -> dict[str, Any]:
        """How often ``vectors[domain]`` is detected as ``domain``: accuracy, per-domain accuracy, n.

        Domains the detector does not know are counted as misses (it cannot name them).
        """
        preds, ys = [], []
        known = {d: i for i, d in enumerate(self.domains)}
        for d, x in vectors.items():
            x = np.asarray(x)
            if x.size == 0:
                continue
            preds.append(np.argmax(self.probabilities(x), axis=1))
            ys.append(np.full(len(preds[-1]), known.get(d, -1)))
        if not preds:
            return {"accuracy": None, "per_domain": {}, "n": 0}
        pred, y = np.concatenate(preds), np.concatenate(ys)
        report = _accuracy_report(pred, y, self.domains)
        for d in vectors:
            if d not in known and np.asarray(vectors[d]).size:
                report["per_domain"][d] = 0.0
        return report

    # -- persistence ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Self-describing, JSON-ready: format, kind, domains, feature, model hash, dim, weights, fit info."""
        return {
            "format_version": DETECTOR_FORMAT,
            "kind": DETECTOR_KIND,
            "domains": self.domains,
            "feature": self.feature,
            "model_hash": self.model_hash,
            "dim": self.dim,
            "weights": self.weights.tolist(),
            "bias": self.bias.tolist(),
            "info": self.info,
        }

    def to_json_bytes(self) -> bytes:
        """:meth:`to_dict` as UTF-8 JSON (what :data:`DETECTOR_FILE` holds)."""
        return (json.dumps(self.to_dict(), separators=(",", ":")) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DomainDetector:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: another format version or kind, missing keys, inconsistent shapes.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a domain detector must be a JSON object, got {type(d).__name__}")
        if d.get("format_version") != DETECTOR_FORMAT or d.get("kind") != DETECTOR_KIND:
            raise ValueError(
                f"unsupported domain detector (format_version {d.get('format_version')!r}, kind {d.get('kind')!r}); "
                f"this cdretrieval reads version {DETECTOR_FORMAT} of {DETECTOR_KIND!r}"
            )
        missing = [k for k in ("domains", "feature", "model_hash", "dim", "weights", "bias") if k not in d]
        if missing:
            raise ValueError(f"the domain detector lacks {missing}")
        det = cls(d["domains"], d["weights"], d["bias"], d["feature"], d["model_hash"], d.get("info"))
        if det.dim != d["dim"]:
            raise ValueError(f"the domain detector records dim {d['dim']} but its weights are {det.dim}-d")
        return det

    def summary(self) -> dict[str, Any]:
        """What :meth:`cdretrieval.retrieval.Retriever.info` reports: no weights."""
        return {
            "domains": self.domains,
            "feature": self.feature,
            "holdout_accuracy": self.holdout_accuracy,
            "n_per_domain": self.info.get("n_per_domain"),
        }

    def __repr__(self) -> str:
        acc = self.holdout_accuracy
        return (f"DomainDetector(domains={self.domains}, feature={self.feature!r}, dim={self.dim}, "
                f"holdout_accuracy={'n/a' if acc is None else f'{acc:.3f}'})")


def _holdout_rows(y: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A stratified ``HOLDOUT_FRACTION`` mask over ``y``; empty when a class has fewer than 5 rows."""
    mask = np.zeros(len(y), bool)
    for c in range(n_classes):
        rows = np.flatnonzero(y == c)
        if len(rows) < 5:
            return np.zeros(len(y), bool)
        take = max(1, round(HOLDOUT_FRACTION * len(rows)))
        mask[rng.choice(rows, size=take, replace=False)] = True
    return mask
