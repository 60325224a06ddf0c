"""What drift detection is configured with and what it reports: :class:`DriftConfig`, and each evaluated
:class:`DriftWindow` with its :class:`FeatureDrift` per input feature (the monitor is :mod:`.drift`).

A window's ``to_metrics`` is what telemetry carries as ``drift``; ``output_metrics`` its ``output_drift``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgeml.errors import ConfigError

__all__ = ["MAX_DRIVERS", "DriftConfig", "DriftWindow", "FeatureDrift"]

MAX_DRIVERS = 16  # output tests named in telemetry at most (the total is reported beside them)


@dataclass(frozen=True)
class DriftConfig:
    """Settings of a :class:`DriftMonitor`. Sample counts are in model input samples (rows of a batch)."""

    window: int = 500  # samples summarised by one evaluation (the newest ones); a multiple of stride
    stride: int = 250  # samples between evaluations (cost ~ 1 evaluation per stride); stride == window: disjoint
    alpha: float = 0.01  # false-alarm probability per `window` samples of a drift-free stream
    min_distance: float = 0.0  # a significant test flags only if its KS / TV distance is at least this (0..1)
    psi_epsilon: float = 1e-4  # proportion used for empty bins in PSI
    min_expected: float = 5.0  # chi-square: classes expected fewer times than this in the window are pooled
    layout: str = "NCHW"  # layout of rank-4 (image) inputs, as given to edgeml.refstats.feature_matrix
    top_k: int = 3  # features detailed in DriftWindow.top_features
    history: int = 64  # finished windows kept until drain()
    defer: int = 32  # batches smaller than this are copied and reduced together once this many samples queue up

    def __post_init__(self) -> None:
        if self.stride < 1 or self.window < self.stride or self.window % self.stride:
            raise ConfigError(f"drift window {self.window} must be a positive multiple of stride {self.stride}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"drift alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 <= self.min_distance <= 1.0 or self.psi_epsilon <= 0.0 or self.min_expected < 0.0:
            raise ConfigError("drift min_distance must be in [0, 1], psi_epsilon > 0 and min_expected >= 0")
        if self.layout.upper() not in ("NCHW", "NHWC"):
            raise ConfigError(f"drift layout must be NCHW or NHWC, got {self.layout!r}")
        if self.top_k < 0 or self.history < 1 or self.defer < 1:
            raise ConfigError("drift top_k must be >= 0, history >= 1 and defer >= 1")

    @property
    def looks(self) -> int:
        """Evaluations that see any given sample (the ring's number of blocks)."""
        return self.window // self.stride


@dataclass(frozen=True)
class FeatureDrift:
    """The tests of one input feature over one window."""

    name: str
    ks: float  # binned KS distance, 0..1
    p_value: float  # KS p-value (not adjusted for multiple tests)
    psi: float  # population stability index (0.1 moderate, 0.25 large by the usual rule of thumb)
    mean: float  # mean of the window (NaN without finite values)
    shift_sigma: float  # (mean - reference mean) / reference std

    def to_metrics(self) -> dict[str, Any]:
        return {k: _finite(v) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class DriftWindow:
    """The result of one evaluation: what telemetry reports and what raises a drift alert.

    ``index`` counts evaluations from 0; the window covers samples ``end - n`` to ``end`` of the stream.
    ``alert`` is true on the first flagged window after an unflagged one (the event to send).
    """

    index: int
    end: int
    n: int
    score: float
    flagged: bool
    alert: bool
    threshold: float  # p-value below which one test counts, alpha / (tests x looks)
    min_p_value: float
    features: tuple[str, ...]
    ks: tuple[float, ...]
    p_values: tuple[float, ...]
    psi: tuple[float, ...]
    nonfinite: tuple[int, ...]  # NaN / inf values per feature, left out of the tests
    top_features: tuple[FeatureDrift, ...]
    class_chi2: float | None
    class_p_value: float | None
    class_tv: float | None
    confidence_ks: float | None
    confidence_p_value: float | None
    mean_confidence: float | None
    drivers: tuple[str, ...]  # the tests that flagged: feature names, "classes", "confidence"
    output_score: float | None = None  # largest KS distance of an output feature (None: outputs not sketched)
    output_flagged: bool = False  # an output test is significant (own family: alpha / (output tests x looks))
    output_threshold: float | None = None
    output_min_p_value: float | None = None
    output_against: tuple[tuple[str, float], ...] = ()  # ("own" | "previous", largest KS against that reference)
    output_top: tuple[FeatureDrift, ...] = ()  # the output features that moved most ("output.feature[@previous]")
    output_drivers: tuple[str, ...] = ()  # the output tests that flagged

    def output_metrics(self) -> dict[str, Any] | None:
        """The output shift of this window for telemetry (``output_drift``), or None without output sketches."""
        if self.output_score is None:
            return None
        return {
            "index": self.index, "end": self.end, "n": self.n, "score": _finite(self.output_score),
            "flagged": self.output_flagged, "threshold": self.output_threshold,
            "min_p_value": _finite(self.output_min_p_value),
            "against": {name: _finite(score) for name, score in self.output_against},
            "top_outputs": [f.to_metrics() for f in self.output_top],
            "drivers": list(self.output_drivers[:MAX_DRIVERS]), "drivers_total": len(self.output_drivers),
        }

    def to_metrics(self) -> dict[str, Any]:
        """A JSON-friendly summary (no per-feature arrays beyond the top features; NaN becomes None)."""
        return {
            "index": self.index, "end": self.end, "n": self.n, "score": _finite(self.score),
            "flagged": self.flagged, "alert": self.alert, "threshold": self.threshold,
            "min_p_value": _finite(self.min_p_value), "max_psi": _finite(max(self.psi, default=0.0)),
            "nonfinite": sum(self.nonfinite),
            "top_features": [f.to_metrics() for f in self.top_features],
            "class_chi2": _finite(self.class_chi2), "class_p_value": _finite(self.class_p_value),
            "class_tv": _finite(self.class_tv), "confidence_ks": _finite(self.confidence_ks),
            "confidence_p_value": _finite(self.confidence_p_value),
            "mean_confidence": _finite(self.mean_confidence), "drivers": list(self.drivers),
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
