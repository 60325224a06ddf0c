"""The table of compile targets: which backend builds each, which runtime checks it, which extra it needs.

Backends are imported on demand, so asking for ``onnx`` never imports TensorFlow.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeml.errors import UnknownTargetError

if TYPE_CHECKING:
    from edgeml.compile.backends.base import Backend

__all__ = ["TARGETS", "Target", "backend_for", "get_target"]


@dataclass(frozen=True)
class Target:
    """One compile target.

    Attributes:
        name: What the user types after ``--target``.
        backend: ``module:Class`` building it.
        runtime: The runtime that runs it on a device (and, unless ``proxy``, in the gate).
        precision: ``fp32``, ``fp16`` or ``int8``.
        extra: The pip extra it needs.
        description: One line for ``edgeml compile --help`` and the docs.
    """

    name: str
    backend: str
    runtime: str
    precision: str
    extra: str
    description: str

    @property
    def quantized(self) -> bool:
        return self.precision == "int8"


_B = "edgeml.compile.backends"
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("onnx", f"{_B}.onnx_fp32:OnnxFp32Backend", "onnxruntime", "fp32", "compile",
               "FP32 ONNX, checked and simplified"),
        Target("onnx-int8", f"{_B}.onnx_int8:OnnxInt8Backend", "onnxruntime", "int8", "compile",
               "ONNX Runtime static INT8 (QDQ, per-channel weights), calibrated"),
        Target("tflite", f"{_B}.tflite:TFLiteBackend", "litert", "fp32", "tflite",
               "TFLite/LiteRT FP32 through onnx2tf"),
        Target("tflite-int8", f"{_B}.tflite:TFLiteBackend", "litert", "int8", "tflite",
               "TFLite/LiteRT full-integer INT8 through onnx2tf, calibrated"),
        Target("tensorrt-fp16", f"{_B}.tensorrt:TensorRTBackend", "tensorrt", "fp16", "compile",
               "TensorRT-ready ONNX + build config; engine built on the device"),
        Target("tensorrt-int8", f"{_B}.tensorrt:TensorRTBackend", "tensorrt", "int8", "compile",
               "TensorRT-ready explicit INT8 (symmetric QDQ) ONNX + build config"),
    )
}


def get_target(name: str) -> Target:
    """Look up a target by name.

    Raises:
        UnknownTargetError: No such target.
    """
    try:
        return TARGETS[name]
    except KeyError as exc:
        raise UnknownTargetError(
            f"unknown target {name!r}", hint=f"choose from: {', '.join(TARGETS)}"
        ) from exc


def backend_for(target: Target) -> Backend:
    """Instantiate the backend that builds ``target``."""
    module, cls = target.backend.split(":")
    backend: Backend = getattr(importlib.import_module(module), cls)(target)
    return backend
