"""LiteRT (the TFLite interpreter): ``ai_edge_litert``, or ``tflite_runtime`` where only it exists.

Full-integer models take and return int8/uint8 tensors; this runtime quantizes float inputs and
dequantizes outputs with the tensors' own scale and zero point, so callers always see float32.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from edgeml.edge_agent.runtimes.base import Runtime
from edgeml.errors import DataError, MissingExtraError

__all__ = ["LiteRTRuntime", "interpreter_module"]


def interpreter_module() -> ModuleType:
    """The module providing ``Interpreter``: LiteRT first, then the legacy tflite_runtime."""
    for name in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingExtraError("ai_edge_litert", "litert")


def _quantize(x: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.floating) or x.dtype == dtype:
        return x.astype(dtype, copy=False)
    scale, zero = detail["quantization"]
    if not scale:
        return x.astype(dtype)
    info = np.iinfo(dtype)
    q = np.round(x.astype(np.float32) / scale + zero)
    return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    scale, zero = detail["quantization"]
    if np.issubdtype(y.dtype, np.integer) and scale:
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    return y


class LiteRTRuntime(Runtime):
    """A LiteRT interpreter. Resizes the batch dimension to the request's on the fly."""

    name = "litert"

    def _load_impl(self) -> None:
        self._serial = threading.Lock()
        module = interpreter_module()
        threads = self.threads if self.threads > 0 else None
        self._interp: Any = module.Interpreter(model_path=str(self.model_path), num_threads=threads)
        self._interp.allocate_tensors()
        self._in = {d["name"]: d for d in self._interp.get_input_details()}
        self._out = self._interp.get_output_details()

    def _match(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if set(inputs) >= set(self._in):
            return {k: inputs[k] for k in self._in}
        if len(inputs) == len(self._in):  # converters may rename tensors: match by position
            return dict(zip(self._in, inputs.values()))
        raise DataError(f"model expects inputs {sorted(self._in)}, got {sorted(inputs)}")

    def fixed_batch(self) -> int | None:
        detail = next(iter(self._in.values()))
        signature = detail.get("shape_signature", detail["shape"])
        dim = int(signature[0]) if len(signature) else -1
        return dim if dim > 0 else None

    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._serial:  # a LiteRT interpreter holds one set of tensors: one inference at a time
            return self._run(inputs)

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = self._match(inputs)
        resized = False
        for name, x in feed.items():
            detail = self._in[name]
            if tuple(detail["shape"]) != x.shape:
                self._interp.resize_tensor_input(detail["index"], list(x.shape), strict=False)
                resized = True
        if resized:  # resize every input first, then allocate once
            self._interp.allocate_tensors()
            self._in = {d["name"]: d for d in self._interp.get_input_details()}
            self._out = self._interp.get_output_details()
        for name, x in feed.items():
            detail = self._in[name]
            self._interp.set_tensor(detail["index"], _quantize(np.asarray(x), detail))
        self._interp.invoke()
        return {d["name"]: _dequantize(self._interp.get_tensor(d["index"]), d) for d in self._out}

    def _unload_impl(self) -> None:
        self._interp = None

    @classmethod
    def version(cls) -> str | None:
        for dist in ("ai-edge-litert", "tflite-runtime"):
            try:
                from importlib.metadata import version

                return f"{dist} {version(dist)}"
            except Exception:
                continue
        return None
