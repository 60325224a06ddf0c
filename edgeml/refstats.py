"""Reference statistics: what "normal" inputs and predictions look like, for drift detection.

One versioned format (``schema = "edgeml.refstats/1"``) written by the trainer and the compiler and read by
the agent. For each input feature it keeps quantile bin edges with the count of reference samples in each
bin, plus moments; for image inputs a feature is one channel's per-sample mean (never per-pixel tests).
For the model's predictions it keeps the predicted-class counts and a histogram of the confidence (top-1
probability), computed with the compiled model on the validation data.

Everything is small (tens of numbers per feature) so that it fits in a bundle and in device memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "SCHEMA",
    "FeatureStats",
    "PredictionStats",
    "RefStatsError",
    "ReferenceStats",
    "compute_reference_stats",
    "feature_matrix",
    "to_probabilities",
]

SCHEMA = "edgeml.refstats/1"
DEFAULT_BINS = 10
CONFIDENCE_BINS = 20
MAX_FEATURES = 256


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
    """Reference statistics of one model's inputs and predictions."""

    features: dict[str, list[FeatureStats]]
    predictions: PredictionStats | None = None
    n_samples: int = 0
    schema: str = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "n_samples": self.n_samples,
            "features": {k: [f.to_dict() for f in v] for k, v in self.features.items()},
            "predictions": self.predictions.to_dict() if self.predictions else None,
            "extra": self.extra,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceStats:
        """Parse a reference statistics document.

        Raises:
            RefStatsError: Unknown schema or malformed content.
        """
        if not isinstance(data, Mapping) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, Mapping) else None
            raise RefStatsError(f"unsupported reference statistics schema {found!r} (expected {SCHEMA})")
        try:
            features = {
                str(k): [FeatureStats(**f) for f in v] for k, v in dict(data["features"]).items()
            }
            preds = data.get("predictions")
            stats = cls(
                features=features,
                predictions=PredictionStats(**preds) if preds else None,
                n_samples=int(data.get("n_samples", 0)),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RefStatsError(f"malformed reference statistics: {exc}") from exc
        for feats in stats.features.values():
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


def _feature_stats(name: str, col: np.ndarray, bins: int) -> FeatureStats:
    col = col[np.isfinite(col)]
    if col.size == 0:
        col = np.zeros(1)
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
    outputs: np.ndarray | None = None,
    *,
    layout: str = "NCHW",
    bins: int = DEFAULT_BINS,
) -> ReferenceStats:
    """Summarise reference inputs (and optionally a classifier's outputs on them).

    Args:
        inputs: Input name -> batch of samples (first axis is the batch).
        outputs: The model's outputs on the same samples, shape (N, classes), logits or probabilities.
        layout: Image layout of rank-4 inputs, ``"NCHW"`` or ``"NHWC"``.
        bins: Quantile bins per feature.
    """
    features: dict[str, list[FeatureStats]] = {}
    n = 0
    for name, batch in inputs.items():
        rows, names = feature_matrix(batch, layout)
        n = max(n, rows.shape[0])
        features[name] = [_feature_stats(fn, rows[:, i], bins) for i, fn in enumerate(names)]
    preds = None
    if outputs is not None and np.asarray(outputs).ndim == 2 and np.asarray(outputs).shape[1] >= 2:
        probs = to_probabilities(outputs)
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
    return ReferenceStats(features=features, predictions=preds, n_samples=n)
