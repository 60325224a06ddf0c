"""ONNX Runtime: CPU everywhere; CUDA or TensorRT execution providers where the build has them.

Inference calls the session's compiled ``run`` directly (``InferenceSession._sess.run``) when the installed
onnxruntime has it: ``InferenceSession.run`` re-validates the feed names, output names and graph-capture
options in Python on every call, about 2 microseconds, which is 10-15% of a small model's run. The feeds are
checked here instead (names once per call, dtypes and shapes by the agent). An execution provider's failure
(``EPFail``) goes through ``InferenceSession.run``, which owns the fallback to the next provider.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgeml._deps import require
from edgeml.edge_agent.runtimes.base import Runtime
from edgeml.errors import DataError, RuntimeBackendError

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
        self._input_names = tuple(i.name for i in self._session.get_inputs())
        self._single = self._input_names[0] if len(self._input_names) == 1 else None
        self._output_names = [o.name for o in self._session.get_outputs()]
        self._ep_fail: type[BaseException] = getattr(ort.capi.onnxruntime_pybind11_state, "EPFail", RuntimeError)
        compiled = getattr(getattr(self._session, "_sess", None), "run", None)
        self._run: Callable[[list[str], dict[str, Any], Any], list[Any]] = compiled or self._session.run

    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        single = self._single
        if single is not None and type(inputs) is dict and len(inputs) == 1 \
                and type(inputs.get(single)) is np.ndarray:
            feed: dict[str, Any] = inputs  # the agent's own feeds: already what the session takes
        else:
            names = self._input_names
            missing = set(names) - set(inputs)
            if missing:
                raise DataError(f"missing model input(s): {', '.join(sorted(missing))}")
            feed = {name: np.ascontiguousarray(inputs[name]) for name in names}
        try:
            results = self._run(self._output_names, feed, None)
        except self._ep_fail:  # InferenceSession.run falls back to the next execution provider
            results = self._session.run(self._output_names, feed)
        outputs = self._output_names
        if len(outputs) == 1:
            return {outputs[0]: results[0]}
        return dict(zip(outputs, results))

    def runner(self) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
        """For a model of one input and one output with a free batch size, the compiled run with nothing
        around it but the translation of its failures: feeds must be arrays of the model's input (the agent
        checks them); anything else fails as a RuntimeBackendError from onnxruntime's own check."""
        if self._fixed or self._single is None or len(self._output_names) != 1:
            return self.infer
        run, session, names, ep_fail = self._run, self._session, self._output_names, self._ep_fail
        first = names[0]

        def run_checked(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            try:
                try:
                    return {first: run(names, feeds, None)[0]}  # type: ignore[arg-type]
                except ep_fail:  # InferenceSession.run falls back to the next execution provider
                    return {first: session.run(names, feeds)[0]}
            except Exception as exc:
                raise RuntimeBackendError(f"{self.name} inference failed: {exc}") from exc

        return run_checked

    def fixed_batch(self) -> int | None:
        dim = self._session.get_inputs()[0].shape[0] if self._session is not None else None
        return dim if isinstance(dim, int) and dim > 0 else None

    def _unload_impl(self) -> None:
        self._session = None
        self._run = _unloaded

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


def _unloaded(*args: Any) -> list[Any]:
    raise DataError("the model was unloaded")
