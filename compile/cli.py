"""``edgeml compile``: argument parsing only; the work is :func:`edgeml.compile.compile_model`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgeml.errors import ConfigError

if TYPE_CHECKING:
    from edgeml.compile.pipeline import CompileReport

__all__ = ["compile_command"]

INT8_TARGETS = ("onnx-int8", "tflite-int8", "tensorrt-int8")


def _size(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError as exc:
        raise ConfigError(f"--resize {text!r} is not HxW, e.g. 96x96") from exc


def _input_shapes(texts: list[str] | None) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    from edgeml.compile.shapes import parse_input_shapes

    shapes = parse_input_shapes(texts)
    return dict(shapes) if shapes is not None and not isinstance(shapes, tuple) else shapes


def _floats(text: str | None) -> tuple[float, ...] | None:
    return tuple(float(v) for v in text.split(",")) if text else None


def compile_command(
    model: Annotated[str, typer.Argument(help="An .onnx file, or package.module:factory for PyTorch.")],
    target: Annotated[list[str], typer.Option("--target", "-t", help="onnx, onnx-int8, tflite, tflite-int8, "
                                              "tensorrt-fp16, tensorrt-int8 (repeatable).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the .edgeml bundles.")],
    calib: Annotated[Path | None, typer.Option(help="Calibration data: .npz, .npy or image folder.")] = None,
    val: Annotated[Path | None, typer.Option(help="Validation data for the accuracy gate.")] = None,
    max_accuracy_drop: Annotated[float, typer.Option(help="Gate budget in points.")] = 1.0,
    max_error: Annotated[float | None, typer.Option(help="Gate on max abs output error (regressors).")] = None,
    metric: Annotated[str, typer.Option(help="auto | accuracy | agreement | package.module:function")] = "auto",
    no_gate: Annotated[bool, typer.Option("--no-gate", help="Build INT8 targets without a gate.")] = False,
    name: Annotated[str | None, typer.Option(help="Model name in the bundle.")] = None,
    version: Annotated[str | None, typer.Option(help="Semantic version, e.g. 1.2.0.")] = None,
    calibration_method: Annotated[str, typer.Option(help="minmax | entropy | percentile")] = "minmax",
    calib_samples: Annotated[int, typer.Option(help="Calibration samples used at most.")] = 256,
    exclude_node: Annotated[list[str] | None, typer.Option(help="Keep this node in float (repeatable).")] = None,
    exclude_op_type: Annotated[list[str] | None, typer.Option(help="Keep this op type in float.")] = None,
    input_shape: Annotated[list[str] | None, typer.Option(
        help="Fix input shapes: 1,3,96,96 (one input; required for PyTorch) or NAME:1,3,48,192 (repeatable).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="State dict for a PyTorch factory.")] = None,
    resize: Annotated[str | None, typer.Option(help="Image folders: resize to HxW.")] = None,
    mean: Annotated[str | None, typer.Option(help="Image folders: per-channel mean, e.g. 0.485,0.456,0.406")] = None,
    std: Annotated[str | None, typer.Option(help="Image folders: per-channel std.")] = None,
    layout: Annotated[str, typer.Option(help="Image folders: NCHW or NHWC.")] = "NCHW",
    grayscale: Annotated[bool, typer.Option(help="Image folders: one channel.")] = False,
    build_engine: Annotated[bool, typer.Option(help="Also build the TensorRT engine here (GPU).")] = False,
    no_benchmark: Annotated[bool, typer.Option("--no-benchmark", help="Skip latency measurement.")] = False,
    calibration_percentile: Annotated[float, typer.Option(
        help="The percentile kept by --calibration-method percentile.")] = 99.99,
    recover: Annotated[bool, typer.Option("--recover", help="When an INT8 target fails its gate, search "
                                          "calibrations, rescalings and float layers for one that passes.")] = False,
    recover_budget: Annotated[float, typer.Option(help="Seconds --recover may search per target.")] = 300.0,
) -> None:
    """Compile MODEL into gated, benchmarked bundles, one per --target."""
    from edgeml.compile.data import ImagePreprocessing
    from edgeml.compile.options import CompileOptions
    from edgeml.compile.pipeline import compile_model
    from edgeml.progress import RichProgress

    options = CompileOptions(
        targets=tuple(target), name=name, version=version, max_accuracy_drop=max_accuracy_drop,
        max_error=max_error, metric=metric, gate=not no_gate, calibration_method=calibration_method,
        calib_samples=calib_samples, exclude_nodes=tuple(exclude_node or ()),
        exclude_op_types=tuple(exclude_op_type or ()), input_shape=_input_shapes(input_shape),
        build_engine=build_engine, benchmark=not no_benchmark, calibration_percentile=calibration_percentile,
        recover=recover, recover_budget_s=recover_budget,
    )
    pre = None
    if resize or mean or std or grayscale or layout != "NCHW":
        size = _size(resize)
        channels = 1 if grayscale else 3
        pre = ImagePreprocessing(size=(size[0], size[1]) if size else None, mean=_floats(mean) or (0.0,),
                                 std=_floats(std) or (1.0,), layout=layout.upper(), channels=channels)
    report = compile_model(model, options, output, calib=calib, val=val, preprocessing=pre,
                           checkpoint=checkpoint, progress=RichProgress())
    print_report(report)
    if not report.ok:
        raise typer.Exit(code=1)


def _relative(m: dict[str, Any]) -> str:
    """The largest output error relative to that output's magnitude, e.g. ``0.004%``."""
    rel = m.get("max_relative_error")
    if rel is None:
        return "-"
    return "inf" if rel == float("inf") else f"{100 * rel:.2g}%"


def _recovery_cell(block: dict[str, Any] | None) -> str:
    """What --recover did, in a few words: ``percentile 99.9``, ``equalize``, ``1 float (12%)``."""
    if block is None:
        return "-"
    if block["float_nodes"]:
        return f"{len(block['float_layers'])} float ({100 * block['float_compute_share']:.0f}%)"
    if block["rescaled"]:
        return "+".join(sorted({r["kind"] for r in block["rescaled"]}))
    cal = block["calibration"]
    return f"{cal['method']} {cal['percentile']:g}" if cal.get("percentile") is not None else cal["method"]


def print_report(report: CompileReport) -> None:
    """The final summary table, then one block per failed target, then the warnings."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from edgeml.recovery import describe_recovery

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"edgeml compile: {report.source.original}")
    for col in ("target", "status", "size", "vs FP32", "accuracy", "agreement", "max err", "rel err",
                "p50 ms (1t)", "p99 ms (1t)", "recovery", "bundle"):
        table.add_column(col)
    for o in report.outcomes:
        m = o.gate.metrics if o.gate else {}
        lat = o.latency.get("threads_1", {})
        acc = f"{100 * m['accuracy']:.2f}%" if "accuracy" in m else "-"
        agree = f"{100 * m['top1_agreement']:.2f}%" if "top1_agreement" in m else "-"
        table.add_row(
            o.target, o.status, f"{o.size_bytes / 1024:.0f} KiB" if o.size_bytes else "-",
            f"{o.size_bytes / report.reference_size:.2f}x" if o.size_bytes else "-", acc, agree,
            f"{m['max_abs_error']:.3g}" if "max_abs_error" in m else "-", _relative(m),
            f"{lat['p50_ms']:.2f}" if lat else "-", f"{lat['p99_ms']:.2f}" if lat else "-",
            _recovery_cell(o.manifest.recovery if o.manifest else None), o.bundle.name if o.bundle else "-",
        )
    console.print(table)
    for o in report.outcomes:
        if o.manifest is not None and o.manifest.recovery is not None:
            console.print(f"  {o.target}: recovered by --recover: {describe_recovery(o.manifest.recovery)}",
                          highlight=False, markup=False)
    for o in report.outcomes:
        rows = o.gate.metrics.get("outputs", []) if o.gate else []
        if len(rows) > 1:  # the relative error of each output, when there are several
            shown = ", ".join(f"{r['name']} {100 * r['relative_error']:.2g}%" for r in rows[:8])
            console.print(f"  {o.target}: error relative to each output's magnitude: {shown}", highlight=False,
                          markup=False)
    for o in report.outcomes:
        if o.status == "gate-failed" and o.gate:
            what = "parity gate failed" if o.gate.metric == "parity" else "accuracy gate failed"
            console.print(f"[red]✗ {o.target}: {what}: {escape(o.gate.reason)}; no bundle written[/red]")
            for line in o.diagnosis.lines() if o.diagnosis else []:
                console.print(line, highlight=False, markup=False)
            if o.recovery is not None:
                for line in o.recovery.lines():
                    console.print(line, highlight=False, markup=False)
            elif o.gate.metric != "parity" and o.target in INT8_TARGETS:
                console.print("  try --recover  (searches calibrations, equalization and float layers for an INT8 "
                              "artifact that passes, cheapest first)", highlight=False, markup=False)
        elif o.status == "error" and o.error:
            console.print(f"[red]✗ {o.target}: {escape(str(o.error))}[/red]", highlight=False)
    for warning in dict.fromkeys(w for o in report.outcomes for w in o.warnings):
        console.print(f"[yellow]warning: {escape(warning)}[/yellow]", highlight=False)
