"""``onnx``: the FP32 model, checked and simplified (onnxslim), parity-checked by the gate."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from edgeml._deps import require
from edgeml.compile.backends.base import Backend, BuildContext, BuildResult

__all__ = ["OnnxFp32Backend", "simplified_fp32"]


def simplified_fp32(ctx: BuildContext) -> BuildResult:
    """Simplify the source with onnxslim (kept as is when slimming fails), once per run."""
    if "onnx_fp32" in ctx.shared:
        result: BuildResult = ctx.shared["onnx_fp32"]
        return result
    onnx = require("onnx", "compile")
    out = ctx.workdir / "fp32" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = []
    model = onnx.load(str(ctx.source.path))
    try:
        import onnxslim

        candidate = onnx.ModelProto()
        candidate.CopyFrom(model)  # onnxslim edits its argument in place: keep the original for the fallback
        with contextlib.redirect_stdout(io.StringIO()):
            slim = onnxslim.slim(candidate)
        onnx.checker.check_model(slim)
        model = slim
        notes.append("simplified with onnxslim")
    except Exception as exc:  # slimming is an optimisation, never a reason to fail
        notes.append(f"onnxslim skipped: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    onnx.save(model, str(out))
    version = ort_min_version(model)
    result = BuildResult(
        files={"model.onnx": out}, model_file="model.onnx", model_format="onnx",
        runtime={"name": "onnxruntime", "min_version": version, "precision": "fp32", "build": None},
        eval_path=out, eval_runtime="onnxruntime", notes=notes,
    )
    ctx.shared["onnx_fp32"] = result
    return result


#: The first onnxruntime release that runs each (ONNX IR version, default-domain opset), from onnxruntime's
#: compatibility table (onnxruntime.ai/docs/reference/compatibility.html): ``(release, max IR, max opset)``.
ORT_SUPPORT = (("1.10", 8, 15), ("1.11", 8, 16), ("1.12", 8, 17), ("1.14", 8, 18), ("1.15", 9, 19),
               ("1.17", 9, 20), ("1.18", 10, 21), ("1.21", 10, 22), ("1.22", 11, 22), ("1.23", 11, 23))


def ort_min_version(model: Any) -> str:
    """The oldest onnxruntime that can run ``model`` (an ONNX ModelProto): from its IR version and opset, so a
    device with an older onnxruntime than this build host (a Jetson's JetPack build) still takes the bundle;
    past the table, this host's version."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)
    for release, max_ir, max_opset in ORT_SUPPORT:
        if model.ir_version <= max_ir and opset <= max_opset:
            return release
    return _ort_version()


def _ort_version() -> str:
    ort = require("onnxruntime", "ort")
    major, minor = str(ort.__version__).split(".")[:2]
    return f"{major}.{minor}"


class OnnxFp32Backend(Backend):
    def _build_impl(self, ctx: BuildContext) -> BuildResult:
        return simplified_fp32(ctx)
