"""``onnx-int8``: onnxruntime static quantization, QDQ, per-channel weights, calibrated."""

from __future__ import annotations

from edgeml.compile.backends.base import Backend, BuildContext, BuildResult
from edgeml.compile.backends.onnx_fp32 import ort_min_version, simplified_fp32
from edgeml.compile.quantize import QdqSettings, batch_size_of, prepare_for_quantization, quantize_qdq

__all__ = ["OnnxInt8Backend", "settings_from_options"]


def settings_from_options(ctx: BuildContext) -> QdqSettings:
    o = ctx.options
    return QdqSettings(method=o.calibration_method, per_channel=o.per_channel,
                       exclude_nodes=o.exclude_nodes, exclude_op_types=o.exclude_op_types,
                       percentile=o.calibration_percentile)


def prepared_model(ctx: BuildContext):  # type: ignore[no-untyped-def]
    """The simplified FP32 model after quantization pre-processing (shared by the INT8 targets)."""
    if "prepared" not in ctx.shared:
        fp32 = simplified_fp32(ctx).eval_path
        out = ctx.workdir / "prepared" / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        ctx.shared["prepared"] = prepare_for_quantization(fp32, out)
    return ctx.shared["prepared"]


class OnnxInt8Backend(Backend):
    def _build_impl(self, ctx: BuildContext) -> BuildResult:
        prepared = prepared_model(ctx)
        settings = settings_from_options(ctx)
        out = ctx.workdir / "onnx-int8" / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        calib = ctx.calib.take(ctx.options.calib_samples) if ctx.calib is not None else None
        total = -(-len(calib) // batch_size_of(prepared)) if calib is not None else None
        with ctx.progress.task(f"calibrating onnx-int8 ({settings.method})", total) as tick:
            quantize_qdq(prepared, out, calib, settings, tick)
        import onnx

        minimum = ort_min_version(onnx.load(str(out), load_external_data=False))
        return BuildResult(
            files={"model.onnx": out}, model_file="model.onnx", model_format="onnx",
            runtime={"name": "onnxruntime", "min_version": minimum, "precision": "int8", "build": None},
            eval_path=out, eval_runtime="onnxruntime", quantized_onnx=out,
            notes=[f"QDQ, {settings.activation_type} activations, int8 "
                   f"{'per-channel' if settings.per_channel else 'per-tensor'} weights, {settings.method}"],
        )
