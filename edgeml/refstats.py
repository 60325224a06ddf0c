"""Reference statistics: what "normal" inputs and outputs look like, for drift and output-shift detection.

One versioned format written by the trainer and the compiler and read by the agent:

* ``edgeml.refstats/2`` (written now): input features, the model's predictions (classifiers) and a sketch of
  every output (``outputs``);
* ``edgeml.refstats/1`` (read): input features and predictions only; it reads as a document without output
  sketches, so the agent monitors its inputs and skips the output shift.

For each input feature it keeps quantile bin edges with the count of reference samples in each bin, plus
moments; for image inputs a feature is one channel's per-sample mean (never per-pixel tests). For each
output it keeps the same kind of summary of per-sample output features (:func:`output_matrix`: the columns
of a narrow 2-D output, and each sample's mean, standard deviation, minimum and maximum), whatever the model
computes: class scores, a probability map, boxes, regression values. For a classifier it also keeps the
predicted-class counts and a histogram of the confidence (top-1 probability). Outputs are computed with the
compiled model on the validation data.

Everything is small (tens of numbers per feature) so that it fits in a bundle and in device memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "READABLE_SCHEMAS",
    "SCHEMA",
    "FeatureStats",
    "PredictionStats",
    "RefStatsError",
    "ReferenceStats",
    "compute_reference_stats",
    "feature_matrix",
    "output_matrix",
    "to_probabilities",
]

SCHEMA = "edgeml.refstats/2"
#: Schemas this version reads: /1 has no output sketches.
READABLE_SCHEMAS = ("edgeml.refstats/1", SCHEMA)
DEFAULT_BINS = 10
CONFIDENCE_BINS = 20
MAX_FEATURES = 256
#: A 2-D output with at most this many columns has each column as a feature (regressors, small classifiers).
OUTPUT_COLUMNS = 16
#: A reference feature whose spread is at most this fraction of its magnitude is treated as a constant ...
_CONSTANT_SPREAD = 1e-4
#: ... and live values within this fraction of it (or of 1e-6 around zero) count as equal to it.
_CONSTANT_BAND = 0.05


class RefStatsError(ValueError):
    """The reference statistics document is malformed (a ValueError so callers may wrap it)."""


@dataclass(frozen=True)
class FeatureStats:
    """Summary of one feature over the reference data."""

    name: str
    bin_edges: list[float]
    counts: list[int]
    mean: float
    std: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PredictionStats:
    """Distribution of the predicted class and of the top-1 confidence."""

    class_counts: list[int]
    confidence_edges: list[float]
    confidence_counts: list[int]
    mean_confidence: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ReferenceStats:
    """Reference statistics of one model's inputs, predictions and outputs.

    Attributes:
        features: Input name -> its features (:func:`feature_matrix`).
        predictions: Class and confidence distribution (classifiers), or None.
        n_samples: Reference samples.
        schema: The document's schema (a /1 document read here keeps its schema and has no ``outputs``).
        extra: Free-form facts.
        outputs: Output name -> its features (:func:`output_matrix`), in the model's output order.
    """

    features: dict[str, list[FeatureStats]]
    predictions: PredictionStats | None = None
    n_samples: int = 0
    schema: str = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, list[FeatureStats]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "schema": self.schema,
            "n_samples": self.n_samples,
            "features": {k: [f.to_dict() for f in v] for k, v in self.features.items()},
            "predictions": self.predictions.to_dict() if self.predictions else None,
            "extra": self.extra,
        }
        if self.schema != READABLE_SCHEMAS[0]:
            doc["outputs"] = {k: [f.to_dict() for f in v] for k, v in self.outputs.items()}
        return doc

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceStats:
        """Parse a reference statistics document.

        Raises:
            RefStatsError: Unknown schema or malformed content.
        """
        if not isinstance(data, Mapping) or data.get("schema") not in READABLE_SCHEMAS:
            found = data.get("schema") if isinstance(data, Mapping) else None
            raise RefStatsError(f"unsupported reference statistics schema {found!r} (this edgeml reads "
                                f"{' and '.join(READABLE_SCHEMAS)})")
        try:
            features = {
                str(k): [FeatureStats(**f) for f in v] for k, v in dict(data["features"]).items()
            }
            outputs = {} if data["schema"] == READABLE_SCHEMAS[0] else {
                str(k): [FeatureStats(**f) for f in v] for k, v in dict(data.get("outputs") or {}).items()
            }
            preds = data.get("predictions")
            stats = cls(
                features=features,
                predictions=PredictionStats(**preds) if preds else None,
                n_samples=int(data.get("n_samples", 0)),
                schema=str(data["schema"]),
                extra=dict(data.get("extra") or {}),
                outputs=outputs,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RefStatsError(f"malformed reference statistics: {exc}") from exc
        for feats in [*stats.features.values(), *stats.outputs.values()]:
            for f in feats:
                if len(f.bin_edges) != len(f.counts) + 1:
                    raise RefStatsError(f"feature {f.name}: {len(f.counts)} counts need one more edge")
        return stats

    @classmethod
    def from_json(cls, raw: bytes | str) -> ReferenceStats:
        try:
            return cls.from_dict(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise RefStatsError(f"reference statistics are not valid JSON: {exc}") from exc


def feature_matrix(x: np.ndarray, layout: str = "NCHW") -> tuple[np.ndarray, list[str]]:
    """Reduce a batch to one row per sample and one column per monitored feature.

    Images (rank 4) give one feature per channel: the per-sample channel mean. Tabular data (rank 2) gives
    its columns (the first :data:`MAX_FEATURES`). Anything else is reduced to the per-sample mean.
    The agent calls the same function on live data, so both sides summarise identically.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 4:
        axes = (2, 3) if layout.upper() == "NCHW" else (1, 2)
        rows = arr.mean(axis=axes)
        return rows, [f"channel{c}" for c in range(rows.shape[1])]
    if arr.ndim == 2:
        rows = arr[:, :MAX_FEATURES]
        return rows, [f"f{c}" for c in range(rows.shape[1])]
    if arr.ndim == 1:
        return arr[:, None], ["value"]
    return arr.reshape(arr.shape[0], -1).mean(axis=1, keepdims=True), ["mean"]


def output_matrix(x: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Reduce a batch of one model output to one row per sample and one column per monitored feature.

    A rank-2 output with at most :data:`OUTPUT_COLUMNS` columns (a regressor, a small classifier) gives its
    columns (``f0``, ``f1``, ...); any output with more than one value per sample also gives each sample's
    ``mean``, ``std``, ``min`` and ``max`` (a probability map, boxes, a wide score vector). A scaling bug
    moves all of them. The agent calls the same function on live outputs.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    flat = arr.reshape(arr.shape[0], -1)
    parts: list[np.ndarray] = []
    names: list[str] = []
    if arr.ndim == 1 or flat.shape[1] == 1:
        return flat[:, :1], ["value"]
    if arr.ndim == 2 and arr.shape[1] <= OUTPUT_COLUMNS:
        parts.append(flat)
        names += [f"f{c}" for c in range(flat.shape[1])]
    with np.errstate(invalid="ignore"):
        parts += [flat.mean(axis=1, keepdims=True), flat.std(axis=1, keepdims=True),
                  flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)]
    names += ["mean", "std", "min", "max"]
    return np.hstack(parts), names


def _feature_stats(name: str, col: np.ndarray, bins: int, *, band: bool = False) -> FeatureStats:
    """Quantile bins of one feature. With ``band`` a (near) constant feature gets a bin of +-5% around its
    value with empty bins on both sides, so that live values that move away from it show."""
    col = col[np.isfinite(col)]
    if col.size == 0:
        col = np.zeros(1)
    lo, hi = float(col.min()), float(col.max())
    if band and hi - lo <= _CONSTANT_SPREAD * max(abs(lo), abs(hi)):
        centre = 0.5 * (lo + hi)
        half = max(_CONSTANT_BAND * abs(centre), 1e-6)
        edges = np.array([centre - 2 * half, centre - half, centre + half, centre + 2 * half])
        return FeatureStats(name=name, bin_edges=[float(e) for e in edges], counts=[0, int(col.size), 0],
                            mean=float(col.mean()), std=float(col.std()), min=lo, max=hi, n=int(col.size))
    edges = np.unique(np.quantile(col, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:  # constant feature: one bin around the value
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    counts, _ = np.histogram(np.clip(col, edges[0], edges[-1]), bins=edges)
    return FeatureStats(
        name=name,
        bin_edges=[float(e) for e in edges],
        counts=[int(c) for c in counts],
        mean=float(col.mean()),
        std=float(col.std()),
        min=float(col.min()),
        max=float(col.max()),
        n=int(col.size),
    )


def to_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Rows of class probabilities: kept as they are when they already sum to one, else softmaxed."""
    out = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    if np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        return out
    shifted = out - out.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def compute_reference_stats(
    inputs: Mapping[str, np.ndarray],
    outputs: np.ndarray | Mapping[str, np.ndarray] | None = None,
    *,
    layout: str = "NCHW",
    bins: int = DEFAULT_BINS,
) -> ReferenceStats:
    """Summarise reference inputs and the model's outputs on them.

    Args:
        inputs: Input name -> batch of samples (first axis is the batch).
        outputs: The model's outputs on the same samples: output name -> batch, in the model's output order
            (or one array, named ``output``). Every output gets a sketch (:func:`output_matrix`); when the
            first is a class-score vector, shape (N, classes) of logits or probabilities, the predictions are
            summarised too.
        layout: Image layout of rank-4 inputs, ``"NCHW"`` or ``"NHWC"``.
        bins: Quantile bins per feature.
    """
    features: dict[str, list[FeatureStats]] = {}
    n = 0
    for name, batch in inputs.items():
        rows, names = feature_matrix(batch, layout)
        n = max(n, rows.shape[0])
        features[name] = [_feature_stats(fn, rows[:, i], bins) for i, fn in enumerate(names)]
    named = {"output": outputs} if isinstance(outputs, np.ndarray) else dict(outputs or {})
    sketches: dict[str, list[FeatureStats]] = {}
    for name, batch in named.items():
        rows, names = output_matrix(batch)
        sketches[name] = [_feature_stats(fn, rows[:, i], bins, band=True) for i, fn in enumerate(names)]
    first = np.asarray(next(iter(named.values()))) if named else None
    preds = None
    if first is not None and first.ndim == 2 and first.shape[1] >= 2:
        probs = to_probabilities(first)
        top = probs.argmax(axis=1)
        conf = probs.max(axis=1)
        edges = np.linspace(0.0, 1.0, CONFIDENCE_BINS + 1)
        ccounts, _ = np.histogram(conf, bins=edges)
        preds = PredictionStats(
            class_counts=[int(c) for c in np.bincount(top, minlength=probs.shape[1])],
            confidence_edges=[float(e) for e in edges],
            confidence_counts=[int(c) for c in ccounts],
            mean_confidence=float(conf.mean()),
        )
    return ReferenceStats(features=features, predictions=preds, n_samples=n, outputs=sketches)
