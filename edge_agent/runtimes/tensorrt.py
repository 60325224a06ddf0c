"""TensorRT on an NVIDIA GPU (Jetson): the engine is built on the device, once, and cached.

A bundle carries a TensorRT-ready ONNX and its build config (``tensorrt_build.json``), not an engine: an
engine only loads on the GPU, TensorRT and L4T release it was built for. :meth:`TensorRTRuntime.load`
looks the engine up in the cache under :func:`edgeml.tensorrt.engine_cache_key` and builds it on a miss
(minutes on a Jetson, once per model and device). A prebuilt ``.engine`` file can be loaded directly.

Inference uses TensorRT's named I/O tensors (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``; TensorRT 8.6 and 10.x) with host/device copies through cuda-python on one stream.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from edgeml.bundle import sha256_file
from edgeml.edge_agent.runtimes.base import Runtime
from edgeml.errors import ConfigError, DataError, RuntimeBackendError
from edgeml.tensorrt import (
    EngineCache,
    TensorRTBuildConfig,
    build_engine,
    capture_log,
    cuda_ok,
    device_facts,
    engine_cache_key,
    require_cudart,
    require_tensorrt,
    shared_logger,
    tensorrt_version,
)

__all__ = ["BUILD_CONFIG_FILE", "TensorRTRuntime"]

#: The build config's member name in a bundle; looked up beside the model when no config is passed.
BUILD_CONFIG_FILE = "tensorrt_build.json"


class TensorRTRuntime(Runtime):
    """A TensorRT engine built from (or cached for) a TensorRT-ready ONNX, or a prebuilt ``.engine``.

    Options:
        build_config: The manifest's ``runtime.build`` dict (or a TensorRTBuildConfig); default: the
            ``tensorrt_build.json`` beside the model.
        cache_dir: Where engines are cached; None builds on every load.
        bundle_sha256: The bundle's hash, for the cache key; default: the model file's sha256.
        log: Receives TensorRT's warnings and errors, one line each.

    ``threads`` is ignored: TensorRT runs on the GPU.
    """

    name = "tensorrt"

    # -- loading ------------------------------------------------------------------------------------------
    def _load_impl(self) -> None:
        self._serial = threading.Lock()
        trt = require_tensorrt()
        self._cudart = require_cudart()
        with capture_log(trt) as errors:  # build_engine passes TensorRT's messages to the log option
            self._trt_runtime = trt.Runtime(shared_logger(trt))
            self._engine = self._deserialize(trt, errors)
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeBackendError(f"TensorRT could not create an execution context: {_last(errors)}")
        self._io = _io_tensors(trt, self._engine)
        self._buffers: dict[str, tuple[int, int]] = {}
        self._stream = self._cuda(self._cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _deserialize(self, trt: ModuleType, errors: list[str]) -> Any:
        if self.model_path.suffix == ".engine":
            engine = self._trt_runtime.deserialize_cuda_engine(self.model_path.read_bytes())
            if engine is None:
                raise RuntimeBackendError(f"TensorRT cannot load {self.model_path.name} (built for another "
                                          f"GPU or TensorRT version?): {_last(errors)}",
                                          hint="ship the TensorRT-ready ONNX and let the device build")
            return engine
        cache, key = self._cache()
        data = cache.get(key) if cache is not None else None
        engine = self._trt_runtime.deserialize_cuda_engine(data) if data is not None else None
        if engine is None:
            if cache is not None and data is not None:
                cache.discard(key)  # refused by this TensorRT: build afresh
            data = build_engine(self.model_path, self._build_config(), log=self.options.get("log"))
            if cache is not None:
                cache.put(key, data)
            engine = self._trt_runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise RuntimeBackendError(f"TensorRT cannot load the engine it just built: {_last(errors)}")
        return engine

    def _cache(self) -> tuple[EngineCache | None, str]:
        cache_dir = self.options.get("cache_dir")
        if cache_dir is None:
            return None, ""
        facts = device_facts()
        digest = self.options.get("bundle_sha256") or sha256_file(self.model_path)
        key = engine_cache_key(digest, facts.tensorrt_version or "unknown", facts.compute_capability,
                               facts.l4t_version, self._build_config())
        return EngineCache(cache_dir), key

    def _build_config(self) -> TensorRTBuildConfig:
        given = self.options.get("build_config")
        if isinstance(given, TensorRTBuildConfig):
            return given
        if given is not None:
            return TensorRTBuildConfig.from_dict(given)
        beside = self.model_path.parent / BUILD_CONFIG_FILE
        if not beside.is_file():
            raise ConfigError(f"no TensorRT build config for {self.model_path.name}",
                              hint=f"pass build_config= (the manifest's runtime.build) or keep "
                                   f"{BUILD_CONFIG_FILE} beside the model")
        return TensorRTBuildConfig.from_json(beside.read_bytes())

    # -- inference ----------------------------------------------------------------------------------------
    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._serial:  # a TensorRT execution context binds one set of buffers: one inference at a time
            return self._run(inputs)

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [n for n, (is_input, _) in self._io.items() if is_input]
        missing = set(names) - set(inputs)
        if missing:
            raise DataError(f"missing model input(s): {', '.join(sorted(missing))}")
        cudart = self._cudart
        to_device, to_host = (cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        feeds = {n: np.ascontiguousarray(inputs[n], dtype=self._io[n][1]) for n in names}
        for name, arr in feeds.items():
            self._set_shape(name, arr.shape)
            self._copy(self._device(name, arr.nbytes), arr.ctypes.data, arr.nbytes, to_device)
        results = {n: np.empty(self._output_shape(n), dt) for n, (is_in, dt) in self._io.items() if not is_in}
        for name, arr in results.items():
            self._device(name, arr.nbytes)
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeBackendError("TensorRT execute_async_v3 failed")
        for name, arr in results.items():
            self._copy(arr.ctypes.data, self._buffers[name][0], arr.nbytes, to_host)
        self._cuda(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return results

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(name, shape):
            low, _, high = (tuple(s) for s in self._engine.get_tensor_profile_shape(name, 0))
            raise DataError(f"input {name!r}: shape {tuple(shape)} is outside the engine's range "
                            f"{low}..{high}")

    def _output_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise RuntimeBackendError(f"TensorRT cannot infer the shape of output {name!r}: {shape}")
        return shape

    def _device(self, name: str, nbytes: int) -> int:
        """The device buffer of tensor ``name``, grown to ``nbytes`` when needed, bound to the context."""
        ptr, size = self._buffers.get(name, (0, 0))
        if size < max(nbytes, 1):
            if ptr:
                self._cuda(self._cudart.cudaFree(ptr), "cudaFree")
            size = max(nbytes, 1)
            ptr = int(self._cuda(self._cudart.cudaMalloc(size), "cudaMalloc"))
            self._buffers[name] = (ptr, size)
        self._context.set_tensor_address(name, ptr)
        return ptr

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        if nbytes:
            self._cuda(self._cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self._stream), "cudaMemcpyAsync")

    def _cuda(self, result: Any, what: str) -> Any:
        return cuda_ok(self._cudart, result, what, RuntimeBackendError)

    def _unload_impl(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers = {}
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
        self._stream = None
        self._context = self._engine = self._trt_runtime = None  # context before engine before runtime

    @classmethod
    def version(cls) -> str | None:
        return tensorrt_version()


def _last(errors: list[str]) -> str:
    return errors[-1] if errors else "no message from TensorRT"


def _io_tensors(trt: ModuleType, engine: Any) -> dict[str, tuple[bool, np.dtype[Any]]]:
    """Engine I/O tensor name -> (is input, numpy dtype), in the engine's order."""
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        io[name] = (is_input, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
    return io
