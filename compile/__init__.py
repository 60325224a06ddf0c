"""``edgeml compile``: turn a model into gated, benchmarked artifacts for every edge runtime.

Public API::

    from edgeml.compile import CompileOptions, compile_model
    report = compile_model("model.onnx", CompileOptions(targets=("onnx", "onnx-int8")), "dist/",
                           calib="calib.npz", val="val.npz")
"""

from edgeml.compile.options import CompileOptions
from edgeml.compile.pipeline import CompileReport, TargetOutcome, compile_model
from edgeml.compile.targets import TARGETS, Target

__all__ = ["TARGETS", "CompileOptions", "CompileReport", "Target", "TargetOutcome", "compile_model"]
