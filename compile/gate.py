"""The accuracy gate: run a compiled model in its real runtime and compare it with the FP32 reference.

Pure decisions live in :func:`judge`; :func:`run_model` does the I/O through the runtime classes the
devices use.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.compile.data import Dataset
from edgeml.compile.options import CompileOptions
from edgeml.edge_agent.runtimes.base import open_runtime
from edgeml.errors import ConfigError, ConversionError, DataError
from edgeml.progress import noop

__all__ = ["GateResult", "combine_parity", "judge", "output_errors", "resolve_metric", "run_model"]

#: Float slack when a drop is compared with its budget: counts over a sample size are not exact in binary.
_EPSILON_POINTS = 1e-9


def run_model(runtime: str, path: Path, data: Dataset, *, batch: int = 32, threads: int = 0,
              tick: Callable[[int], None] = noop) -> list[np.ndarray]:
    """Run every sample of ``data`` through ``path`` in ``runtime``; outputs in graph order, concatenated."""
    outputs: list[list[np.ndarray]] = []
    with open_runtime(runtime, path, threads=threads) as rt:
        # A fixed-batch model gets batches of its own size; the runtime splits anything larger itself.
        for chunk in data.batches(rt.fixed_batch() or batch):
            result = list(rt.infer(chunk).values())
            if not outputs:
                outputs = [[] for _ in result]
            for acc, arr in zip(outputs, result):
                acc.append(np.asarray(arr))
            tick(1)
    return [np.concatenate(acc) for acc in outputs]


@dataclass
class GateResult:
    """The gate's verdict on one target.

    Attributes:
        passed: Within budget.
        metric: ``parity``, ``accuracy``, ``agreement``, ``max-error`` or the custom metric's name.
        drop: Loss in the metric's units (points for accuracy/agreement); for max-error the error; for parity
            the largest error of an output relative to its own magnitude.
        budget: The allowed drop (or error).
        metrics: Every number measured, for the manifest.
        reason: One line explaining a failure.
    """

    passed: bool
    metric: str
    drop: float
    budget: float
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def _align(reference: list[np.ndarray], compiled: list[np.ndarray]) -> list[np.ndarray]:
    if len(reference) != len(compiled):
        raise ConversionError(f"compiled model has {len(compiled)} outputs, the source has {len(reference)}")
    aligned = []
    for ref, got in zip(reference, compiled):
        if got.shape != ref.shape:
            if got.size != ref.size:
                raise ConversionError(f"compiled output shape {got.shape} differs from the source's {ref.shape}")
            got = got.reshape(ref.shape)
        aligned.append(got.astype(np.float64))
    return aligned


def resolve_metric(options: CompileOptions, labels: np.ndarray | None, reference: np.ndarray) -> str:
    """Which quantity the INT8 gate judges, given the options, labels and the output shape.

    Raises:
        DataError: ``accuracy`` was asked without labels, or nothing fits a non-classifier.
    """
    if options.max_error is not None:
        return "max-error"
    if ":" in options.metric:
        return options.metric
    classifier = reference.ndim == 2 and reference.shape[1] >= 2
    if options.metric == "accuracy":
        if labels is None:
            raise DataError("--metric accuracy needs labels: add an integer array 'labels' to the --val .npz "
                            "(or use class sub-folders)")
        return "accuracy"
    if options.metric == "agreement" or (options.metric == "auto" and classifier and labels is None):
        return "agreement"
    if options.metric == "auto" and classifier:
        return "accuracy"
    raise DataError("the model's output is not a class score vector, so accuracy cannot be judged",
                    hint="pass --max-error E (regressors) or --metric package.module:function")


def _custom(spec: str) -> Callable[..., float]:
    module, _, attr = spec.partition(":")
    try:
        fn: Callable[..., float] = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import metric {spec!r}: {exc}") from exc
    return fn


def output_errors(reference: list[np.ndarray], compiled: list[np.ndarray], names: Sequence[str] | None,
                  options: CompileOptions) -> list[dict[str, Any]]:
    """Per output: max abs error, max |reference|, the error relative to that magnitude, and the parity
    budget ``parity_rtol x max |reference| + parity_atol``.

    Positions where the reference is not finite are left out; a compiled value that is not finite where the
    reference is counts as an infinite error.
    """
    rows = []
    for i, (ref, got) in enumerate(zip(reference, compiled)):
        finite = np.isfinite(ref)
        r, g = ref[finite], got[finite]
        err = np.abs(g - r)
        err = np.where(np.isfinite(err), err, np.inf)
        max_err = float(err.max()) if err.size else 0.0
        magnitude = float(np.abs(r).max()) if r.size else 0.0
        rows.append({
            "name": names[i] if names is not None and i < len(names) else f"output{i}",
            "max_abs_error": max_err, "mean_abs_error": float(err.mean()) if err.size else 0.0,
            "max_abs_reference": magnitude,
            "relative_error": max_err / magnitude if magnitude > 0 else (0.0 if max_err == 0 else math.inf),
            "budget": options.parity_rtol * magnitude + options.parity_atol,
        })
    return rows


def _parity(rows: list[dict[str, Any]], metrics: dict[str, Any], options: CompileOptions,
            inputs: str) -> GateResult:
    """FP32/FP16: every output within ``parity_rtol`` of its own magnitude (plus ``parity_atol``)."""
    bad = [row for row in rows if not row["max_abs_error"] <= row["budget"]]
    worst = max(rows, key=lambda row: row["relative_error"])
    if not bad:
        return GateResult(True, "parity", worst["relative_error"], options.parity_rtol, metrics)
    row = max(bad, key=lambda row: row["relative_error"])
    where = f" on {inputs}" if inputs else ""
    reason = (f"FP32 parity broken: output {row['name']!r} is off by {_percent(row['relative_error'])} of its "
              f"magnitude{where} (max abs error {row['max_abs_error']:.3g}, max |output| "
              f"{row['max_abs_reference']:.3g}; allowed {_percent(options.parity_rtol)} + "
              f"{options.parity_atol:g}): the converter changed the model's function")
    return GateResult(False, "parity", row["relative_error"], options.parity_rtol, metrics, reason)


def _percent(fraction: float) -> str:
    return "an unbounded amount" if not math.isfinite(fraction) else f"{100 * fraction:.3g}%"


def judge(reference: list[np.ndarray], compiled: list[np.ndarray], labels: np.ndarray | None,
          options: CompileOptions, *, precision: str, names: Sequence[str] | None = None,
          inputs: str = "") -> GateResult:
    """Compare compiled outputs with the FP32 reference and decide.

    FP32/FP16 targets must match the reference output by output, each within ``parity_rtol`` of its own
    largest magnitude plus ``parity_atol``; INT8 targets may lose at most ``max_accuracy_drop`` points of the
    resolved metric.

    Args:
        reference: The FP32 source's outputs, in graph order.
        compiled: The target's outputs on the same inputs.
        labels: Class labels of the samples, or None.
        options: The budgets.
        precision: ``fp32``, ``fp16`` or ``int8``.
        names: Output names, for the metrics and messages.
        inputs: What the inputs were (e.g. ``uniform [0, 255]``), for the failure message.
    """
    got = _align(reference, compiled)
    ref = [r.astype(np.float64) for r in reference]
    rows = output_errors(ref, got, names, options)
    # where the source itself computes NaN or inf (sqrt of a negative input), there is nothing to compare;
    # a compiled value that is not finite where the source's is counts as an infinite error
    err = np.concatenate([np.nan_to_num(np.abs(g - r)[np.isfinite(r)], nan=np.inf) for g, r in zip(got, ref)])
    err = err if err.size else np.zeros(1)
    scale = max(1.0, max((float(np.abs(r[np.isfinite(r)]).max()) for r in ref if np.isfinite(r).any()),
                         default=1.0))
    metrics: dict[str, Any] = {"samples": int(ref[0].shape[0]), "max_abs_error": float(err.max()),
                               "mean_abs_error": float(err.mean()), "output_scale": scale,
                               "max_relative_error": max(row["relative_error"] for row in rows), "outputs": rows}
    r0, g0 = ref[0], got[0]
    if r0.ndim == 2 and r0.shape[1] >= 2:
        metrics["top1_agreement"] = float((r0.argmax(1) == g0.argmax(1)).mean())
        if labels is not None:
            metrics["reference_accuracy"] = float((r0.argmax(1) == labels).mean())
            metrics["accuracy"] = float((g0.argmax(1) == labels).mean())
    if precision in ("fp32", "fp16"):
        return _parity(rows, metrics, options, inputs)
    metric = resolve_metric(options, labels, r0)
    if metric == "max-error":
        budget = float(options.max_error or 0.0)
        ok = metrics["max_abs_error"] <= budget
        return GateResult(ok, metric, metrics["max_abs_error"], budget, metrics,
                          "" if ok else f"max abs error {metrics['max_abs_error']:.4g} > --max-error {budget}")
    if metric == "accuracy":
        drop = 100.0 * (metrics["reference_accuracy"] - metrics["accuracy"])
    elif metric == "agreement":
        drop = 100.0 * (1.0 - metrics["top1_agreement"])
    else:
        fn = _custom(metric)
        ref_score, score = float(fn(r0, labels)), float(fn(g0, labels))
        metrics.update(reference_score=ref_score, score=score)
        drop = ref_score - score
    metrics["drop_points"] = drop
    ok = drop <= options.max_accuracy_drop + _EPSILON_POINTS  # 3 of 300 is 1.0000000000000009 points: 1 fits 1
    reason = "" if ok else f"{metric} dropped {drop:.2f} points (budget {options.max_accuracy_drop:g})"
    return GateResult(ok, metric, drop, options.max_accuracy_drop, metrics, reason)


def combine_parity(verdicts: Sequence[tuple[str, GateResult]]) -> GateResult:
    """One parity verdict from the verdicts on several input sets (label, verdict), the first the primary.

    It fails when any set fails (with that set's reason); its metrics are the primary set's, with each
    output's worst relative error over all sets (and the set it came from) and ``parity_inputs``.
    """
    primary = verdicts[0][1]
    metrics = dict(primary.metrics)
    worst: dict[str, dict[str, Any]] = {}
    for label, verdict in verdicts:
        for row in verdict.metrics.get("outputs", []):
            kept = worst.get(row["name"])
            if kept is None or row["relative_error"] > kept["relative_error"]:
                worst[row["name"]] = dict(row, inputs=label)
    metrics["outputs"] = list(worst.values())
    metrics["max_relative_error"] = max((r["relative_error"] for r in worst.values()), default=0.0)
    metrics["parity_inputs"] = [label for label, _ in verdicts]
    failed = [(label, v) for label, v in verdicts if not v.passed]
    if failed:
        label, verdict = max(failed, key=lambda item: item[1].drop)
        return GateResult(False, "parity", verdict.drop, verdict.budget, metrics, verdict.reason)
    return GateResult(True, "parity", metrics["max_relative_error"], primary.budget, metrics)
