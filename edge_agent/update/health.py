"""The rules that decide whether a new model is healthy: pure functions, no I/O.

* :class:`Thresholds`: the limits, from the rollout, with defaults.
* :func:`judge`: a probation snapshot against the device's baseline -> a :class:`Verdict` (the cause and the
  reason to roll back), or None.
* :func:`compare_golden`: a smoke test's outputs against the bundle's golden vectors -> the reason to
  refuse, or None. Integer kernels differ between ARM and x86 by a few quantization steps (and so may
  flip the top-1 class of an input near a decision boundary), so int8 (and fp16) models are compared
  with looser tolerances and a top-1 agreement just under 100%.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from edgeml.protocol import Cause
from edgeml.thresholds import Thresholds

__all__ = ["Baseline", "HealthSnapshot", "Thresholds", "Verdict", "compare_golden", "judge", "mean_confidence"]

#: precision -> (factor on the manifest's atol/rtol, minimum top-1 agreement when the manifest says top1: true)
_GOLDEN_SLACK: dict[str, tuple[float, float]] = {
    "fp32": (1.0, 1.0),
    "fp16": (4.0, 0.98),
    "int8": (4.0, 0.95),
}


@dataclass(frozen=True)
class Baseline:
    """What this device measured before the switch.

    Attributes:
        p99_ms: The outgoing model's p99 latency here (for a first model: its own smoke-test p99).
        confidence: The mean top-1 confidence to compare with (None: not a classifier).
    """

    p99_ms: float
    confidence: float | None = None


@dataclass(frozen=True)
class HealthSnapshot:
    """The new model's record so far in probation.

    Attributes:
        requests: Requests served.
        errors: Requests that failed.
        p99_ms: p99 latency (None before any request).
        confidence: Mean top-1 confidence (None when unknown).
        drift: Drift score from the drift monitor (None when there is none).
        crashes: Times the agent died during this probation (the persisted counter).
        output_shift: Output-shift score from the drift monitor (None when the outputs are not monitored, or
            before the first window).
    """

    requests: int = 0
    errors: int = 0
    p99_ms: float | None = None
    confidence: float | None = None
    drift: float | None = None
    crashes: int = 0
    output_shift: float | None = None


class Verdict(NamedTuple):
    """Why a model must go: the cause for the fleet's rules and the reason for people."""

    cause: Cause
    reason: str


def judge(snapshot: HealthSnapshot, baseline: Baseline, thresholds: Thresholds) -> Verdict | None:
    """Why the model must roll back, or None while it looks healthy.

    Crashes count at once; the error rate, latency, confidence, drift and output-shift checks wait for
    ``thresholds.min_requests`` requests.
    """
    t = thresholds
    if snapshot.crashes >= max(t.max_crashes, 1):
        return Verdict(Cause.CRASH, f"the agent died {snapshot.crashes} times during probation "
                                    f"(limit {t.max_crashes})")
    if snapshot.requests < max(t.min_requests, 1):
        return None
    rate = snapshot.errors / snapshot.requests
    if rate > t.max_error_rate:
        return Verdict(Cause.ERROR_RATE, f"error rate {rate:.1%} over {snapshot.requests} requests exceeds "
                                         f"{t.max_error_rate:.1%}")
    limit = baseline.p99_ms * t.p99_factor + t.p99_slack_ms
    if snapshot.p99_ms is not None and snapshot.p99_ms > limit:
        return Verdict(Cause.LATENCY, f"p99 latency {snapshot.p99_ms:.2f} ms exceeds {limit:.2f} ms "
                                      f"({t.p99_factor:g} x baseline {baseline.p99_ms:.2f} ms + {t.p99_slack_ms:g} ms)")
    if snapshot.confidence is not None and baseline.confidence is not None:
        drop = baseline.confidence - snapshot.confidence
        if drop > t.max_confidence_drop:
            return Verdict(Cause.CONFIDENCE, f"mean confidence fell from {baseline.confidence:.3f} to "
                                             f"{snapshot.confidence:.3f} (drop {drop:.3f} > {t.max_confidence_drop:g})")
    if snapshot.drift is not None and snapshot.drift > t.max_drift:
        return Verdict(Cause.DRIFT, f"drift score {snapshot.drift:.3f} exceeds {t.max_drift:g}")
    if snapshot.output_shift is not None and snapshot.output_shift > t.max_output_shift:
        return Verdict(Cause.OUTPUT_SHIFT, f"output shift {snapshot.output_shift:.3f} exceeds {t.max_output_shift:g} "
                                           "(its outputs moved away from the reference)")
    return None


def mean_confidence(outputs: np.ndarray) -> float | None:
    """Mean top-1 confidence of a batch of class scores (softmax applied unless rows are probabilities).

    Returns None for outputs that are not a 2-D batch of at least two classes.
    """
    scores = np.asarray(outputs, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2 or scores.shape[0] == 0:
        return None
    probs = scores
    if not (np.all(scores >= 0) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)):
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
    return float(probs.max(axis=1).mean())


def _tolerances(golden: Mapping[str, Any], name: str, slack: float, min_top1: float) -> tuple[float, float, float]:
    """(atol, rtol, required top-1 agreement) of output ``name``: its own entry in the ``outputs`` block when
    the bundle has one (edgeml writes one per output, on that output's magnitude), else the bundle-wide ones."""
    own = golden.get("outputs")
    spec = own.get(name) if isinstance(own, Mapping) else None
    spec = spec if isinstance(spec, Mapping) else {}
    atol = float(spec.get("atol", golden.get("atol", 1e-3))) * slack
    rtol = float(spec.get("rtol", golden.get("rtol", 0.0))) * slack
    top1 = spec.get("top1", golden.get("top1", False))
    return atol, rtol, min_top1 if top1 is True else float(top1 or 0.0)


def compare_golden(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                   golden: Mapping[str, Any], precision: str) -> str | None:
    """Why ``actual`` fails the golden vectors, or None when it passes.

    Args:
        actual: Output name -> what the device computed on the golden inputs.
        expected: Output name -> the golden outputs from the bundle.
        golden: The manifest's ``golden`` block (``atol``, ``rtol``, ``top1``: bool or minimum agreement), with
            per-output tolerances in ``outputs`` (output name -> ``atol``, ``rtol``, ``top1``) when present.
        precision: The bundle's runtime precision (``fp32``, ``fp16``, ``int8``).
    """
    slack, min_top1 = _GOLDEN_SLACK.get(precision, _GOLDEN_SLACK["int8"])
    for name, want in expected.items():
        atol, rtol, required = _tolerances(golden, name, slack, min_top1)
        got = actual.get(name)
        if got is None or np.shape(got) != np.shape(want):
            return f"output {name}: shape {np.shape(got) if got is not None else None} != golden {np.shape(want)}"
        if not np.all(np.isfinite(got)):
            return f"output {name}: non-finite values"
        if required and want.ndim == 2 and want.shape[1] > 1:
            agree = float((np.argmax(got, axis=1) == np.argmax(want, axis=1)).mean())
            if agree < required:
                return f"output {name}: top-1 agreement {agree:.1%} with the golden vectors < {required:.1%}"
        bad = ~np.isclose(got, want, atol=atol, rtol=rtol)
        if precision == "fp32" and bad.any():
            worst = float(np.max(np.abs(got - want)))
            return f"output {name}: max |error| {worst:.3g} vs the golden vectors exceeds atol {atol:.3g}"
        if bad.mean() > 0.01:  # integer kernels: a few elements may be a step further off
            return f"output {name}: {bad.mean():.1%} of values differ from the golden vectors past atol {atol:.3g}"
    return None
