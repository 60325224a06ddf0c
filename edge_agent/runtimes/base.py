"""The runtime contract, and the table from runtime name to implementation.

Every runtime is used the same way::

    with open_runtime("onnxruntime", "model.onnx", threads=1) as rt:
        outputs = rt.infer({"input": batch})

``infer`` before ``load`` is refused. Failures of the underlying library become RuntimeBackendError; a
missing library becomes MissingExtraError naming the extra to install.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.errors import ConfigError, EdgeMLError, RuntimeBackendError

__all__ = ["RUNTIMES", "Runtime", "latency_ms", "open_runtime", "runtime_for"]

#: runtime name -> "module:Class" (imported on demand, so an absent runtime costs nothing)
RUNTIMES: dict[str, str] = {
    "onnxruntime": "edgeml.edge_agent.runtimes.onnxruntime:OnnxRuntime",
    "litert": "edgeml.edge_agent.runtimes.litert:LiteRTRuntime",
    "tensorrt": "edgeml.edge_agent.runtimes.tensorrt:TensorRTRuntime",
}


class Runtime(ABC):
    """One loaded model in one inference runtime.

    Args:
        model_path: The model file (``.onnx``, ``.tflite``, or a TensorRT-ready ONNX).
        threads: Intra-op threads; 0 lets the runtime use every core.
    """

    name: str = "runtime"

    def __init__(self, model_path: str | Path, *, threads: int = 0, **options: Any) -> None:
        self.model_path = Path(model_path)
        self.threads = threads
        self.options = options
        self._loaded = False
        self._fixed: int | None = None  # fixed_batch(), read once at load (it asks the library)

    # -- public API: wraps the private implementations and translates their failures ----------------
    def load(self) -> Runtime:
        """Load the model. Raises RuntimeBackendError when the runtime refuses it."""
        if not self.model_path.is_file():
            raise RuntimeBackendError(f"model file {self.model_path} does not exist")
        try:
            self._load_impl()
        except EdgeMLError:
            raise
        except Exception as exc:
            raise RuntimeBackendError(f"{self.name} could not load {self.model_path.name}: {exc}") from exc
        self._fixed = self.fixed_batch()
        self._loaded = True
        return self

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns output name -> array (float outputs are dequantized)."""
        if not self._loaded:
            raise RuntimeBackendError(f"{self.name}: infer() called before load()")
        try:
            fixed = self._fixed
            if fixed:
                batch = len(next(iter(inputs.values()))) if inputs else 0
                if batch != fixed and batch % fixed == 0:  # a fixed-batch model: run it chunk by chunk
                    parts = [self._infer_impl({k: v[i:i + fixed] for k, v in inputs.items()})
                             for i in range(0, batch, fixed)]
                    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
            return self._infer_impl(inputs)
        except EdgeMLError:
            raise
        except Exception as exc:
            raise RuntimeBackendError(f"{self.name} inference failed: {exc}") from exc

    def runner(self) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
        """The fastest way to run feeds the caller has already checked against the model's inputs (names,
        dtypes, shapes): :meth:`infer` unless the runtime has something quicker. Same results and errors as
        :meth:`infer`; only valid while the model is loaded (after load)."""
        return self.infer

    def unload(self) -> None:
        """Release the model (idempotent)."""
        if self._loaded:
            self._unload_impl()
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def __enter__(self) -> Runtime:
        return self.load() if not self._loaded else self

    def __exit__(self, *exc: object) -> None:
        self.unload()

    @classmethod
    def version(cls) -> str | None:
        """The installed runtime library's version, or None when it is not installed."""
        return None

    def fixed_batch(self) -> int | None:
        """The model's fixed batch size, or None when its batch axis is dynamic (after load)."""
        return None

    # -- what each runtime implements -------------------------------------------------------------
    @abstractmethod
    def _load_impl(self) -> None: ...

    @abstractmethod
    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _unload_impl(self) -> None:
        return None


def runtime_for(name: str) -> type[Runtime]:
    """The runtime class registered under ``name``.

    Raises:
        ConfigError: Unknown runtime name.
    """
    try:
        module, cls = RUNTIMES[name].split(":")
    except KeyError as exc:
        raise ConfigError(f"unknown runtime {name!r}; known: {', '.join(RUNTIMES)}") from exc
    runtime: type[Runtime] = getattr(importlib.import_module(module), cls)
    return runtime


def open_runtime(name: str, model_path: str | Path, *, threads: int = 0, **options: Any) -> Runtime:
    """Create (not yet load) the runtime ``name`` for ``model_path``; use it as a context manager."""
    return runtime_for(name)(model_path, threads=threads, **options)


def latency_ms(
    runtime: Runtime,
    inputs: Mapping[str, np.ndarray],
    *,
    warmup: int = 5,
    min_runs: int = 20,
    max_runs: int = 20_000,
    budget_s: float = 2.0,
    on_run: Any = None,
) -> dict[str, float]:
    """p50/p99/mean latency of ``runtime.infer(inputs)`` in milliseconds, after a warm-up.

    Runs at least ``min_runs`` and at most ``max_runs`` times, stopping once ``budget_s`` is spent.
    """
    for _ in range(warmup):
        runtime.infer(inputs)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        runtime.infer(inputs)
        times.append((time.perf_counter() - t0) * 1000.0)
        if on_run is not None:
            on_run()
    arr = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "runs": len(times),
    }
