"""ONNX Runtime: CPU everywhere; CUDA or TensorRT execution providers where the build has them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeml._deps import require
from edgeml.edge_agent.runtimes.base import Runtime
from edgeml.errors import DataError

__all__ = ["OnnxRuntime"]

_PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxRuntime(Runtime):
    """An onnxruntime InferenceSession.

    Options:
        providers: Execution providers to use, in order (default: the best available, CPU last).
    """

    name = "onnxruntime"

    def _load_impl(self) -> None:
        ort = require("onnxruntime", "ort")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        available = ort.get_available_providers()
        providers = self.options.get("providers") or [p for p in _PREFERRED if p in available]
        self._session: Any = ort.InferenceSession(str(self.model_path), opts, providers=providers)
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        self._output_names = [o.name for o in self._session.get_outputs()]

    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self._inputs) - set(inputs)
        if missing:
            raise DataError(f"missing model input(s): {', '.join(sorted(missing))}")
        feed = {name: np.ascontiguousarray(inputs[name]) for name in self._inputs}
        results = self._session.run(self._output_names, feed)
        return dict(zip(self._output_names, results))

    def fixed_batch(self) -> int | None:
        dim = self._session.get_inputs()[0].shape[0] if self._session is not None else None
        return dim if isinstance(dim, int) and dim > 0 else None

    def _unload_impl(self) -> None:
        self._session = None

    @classmethod
    def version(cls) -> str | None:
        from importlib import metadata

        for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml"):  # read without importing (~30 MiB)
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        try:  # an onnxruntime built from source, without distribution metadata
            import onnxruntime

            return str(onnxruntime.__version__)
        except ImportError:
            return None
