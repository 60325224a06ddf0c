"""The settings of one ``edgeml compile`` run, validated once at the boundary."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeml.errors import ConfigError

__all__ = ["CALIBRATION_METHODS", "CompileOptions"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class CompileOptions:
    """What to build and how strictly to check it.

    Attributes:
        targets: Compile targets, e.g. ``("onnx", "onnx-int8")`` (see ``edgeml.compile.targets``).
        name: Model name in the bundle (lowercase); default: the model file's stem.
        version: Semantic version; default ``0.0.0-dev.h<source sha256 prefix>``.
        max_accuracy_drop: Gate budget in percentage points (accuracy, or 100 - top-1 agreement).
        max_error: Gate on the max absolute output error instead (regressors).
        metric: ``auto`` | ``accuracy`` | ``agreement`` | ``package.module:function``.
        gate: False builds INT8 targets without a validation set; the manifest then says "ungated".
        calibration_method: ``minmax``, ``entropy`` or ``percentile``.
        calibration_percentile: The percentile ``percentile`` calibration keeps (99.99: clip the top 0.01%).
        calib_samples: At most this many calibration samples are used.
        exclude_nodes: Node names kept in float (not quantized).
        exclude_op_types: Op types kept in float.
        per_channel: Per-channel weight quantization.
        parity_rtol: FP32/FP16 targets must match the source output by output: max abs error at most this
            fraction of that output's largest magnitude (max |reference|) ...
        parity_atol: ... plus this absolute error (only matters for outputs that are all about zero).
        benchmark: Measure latency (p50/p99, one thread and all threads).
        bench_budget_s: Seconds spent measuring each target at each thread count, at most.
        build_engine: Also build a TensorRT engine here (needs TensorRT and a GPU).
        diagnose_remedies: On a failed INT8 gate, try this many remedies and report which pass.
        golden_count: Golden vectors stored for the device's smoke test.
        input_shape: ``--input-shape``: the export shape of a PyTorch source; for an ONNX source the shapes the
            artifacts are built for: one shape (single-input models) or input name -> shape.
        opset: ONNX opset for PyTorch export.
        recover: ``--recover``: when an INT8 target fails its gate, search calibrations, rescalings and
            float layers for an artifact that passes (see :mod:`edgeml.compile.recover`).
        recover_budget_s: Seconds the search may take per target, at most (it stops after the candidate
            in progress).
    """

    targets: tuple[str, ...]
    name: str | None = None
    version: str | None = None
    max_accuracy_drop: float = 1.0
    max_error: float | None = None
    metric: str = "auto"
    gate: bool = True
    calibration_method: str = "minmax"
    calibration_percentile: float = 99.99
    calib_samples: int = 256
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    per_channel: bool = True
    parity_rtol: float = 1e-3
    parity_atol: float = 1e-6
    benchmark: bool = True
    bench_budget_s: float = 1.5
    build_engine: bool = False
    diagnose_remedies: int = 3
    golden_count: int = 4
    input_shape: tuple[int, ...] | dict[str, tuple[int, ...]] | None = None
    opset: int = 17
    extra: dict[str, str] = field(default_factory=dict)
    recover: bool = False
    recover_budget_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError("no target given", hint="pass --target, e.g. --target onnx-int8")
        if not 0 <= self.max_accuracy_drop <= 100:
            raise ConfigError(f"--max-accuracy-drop {self.max_accuracy_drop} is not between 0 and 100")
        if self.max_error is not None and self.max_error < 0:
            raise ConfigError(f"--max-error {self.max_error} must not be negative")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"unknown calibration method {self.calibration_method!r}; "
                f"choose one of {', '.join(CALIBRATION_METHODS)}"
            )
        if not 50.0 < self.calibration_percentile <= 100.0:
            raise ConfigError(f"--calibration-percentile {self.calibration_percentile} is not in (50, 100]")
        if not self.recover_budget_s > 0:
            raise ConfigError(f"--recover-budget {self.recover_budget_s} must be a positive number of seconds")
        if not 0 < self.parity_rtol < 1 or self.parity_atol < 0:
            raise ConfigError(f"parity_rtol must be in (0, 1) and parity_atol >= 0, got {self.parity_rtol}, "
                              f"{self.parity_atol}")
        if self.calib_samples < 1:
            raise ConfigError("--calib-samples must be at least 1")
        if self.metric not in ("auto", "accuracy", "agreement") and ":" not in self.metric:
            raise ConfigError(
                f"--metric {self.metric!r} is not auto, accuracy, agreement or package.module:function"
            )
