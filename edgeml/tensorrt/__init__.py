"""TensorRT engines: the build config a bundle carries, the engine build, and the device's engine cache.

This lives in the core because both sides need it: ``edgeml compile --build-engine`` builds an engine on a
GPU host, and the agent builds (or reuses) one on the device from the bundle's TensorRT-ready ONNX. An
engine is specific to the GPU, the TensorRT version and the JetPack/L4T release it was built with, so the
cache key (:func:`engine_cache_key`) covers all of them, plus the bundle and every build setting.

TensorRT and cuda-python are imported lazily, inside the functions that need them; everything else here
imports and runs without them. The calls target TensorRT 8.6 (JetPack 5) and 10.x (JetPack 6): explicit
batch networks, ``set_memory_pool_limit``, ``build_serialized_network`` and the named I/O tensor API.

Where things are (every public name is importable from ``edgeml.tensorrt``)::

    config.py   the build config: TensorRTBuildConfig, ShapeProfile, BUILD_SCHEMA (pure data, no TensorRT)
    device.py   what an engine depends on here: DeviceFacts, device_facts(), the L4T / device-tree parsers
    libs.py     tensorrt and cuda-python on demand: require_tensorrt/require_cudart, cuda_ok, the shared logger
    build.py    build_engine(): ONNX + config -> serialized engine
    cache.py    engine_cache_key() and EngineCache, the device's <key>.engine files
"""

from edgeml.tensorrt.build import build_engine
from edgeml.tensorrt.cache import EngineCache, engine_cache_key
from edgeml.tensorrt.config import BUILD_SCHEMA, DEFAULT_BATCH, PRECISIONS, ShapeProfile, TensorRTBuildConfig
from edgeml.tensorrt.device import (
    DeviceFacts,
    compute_capability_from_device_tree,
    device_facts,
    parse_l4t_release,
    tensorrt_version,
)
from edgeml.tensorrt.libs import capture_log, cuda_ok, require_cudart, require_tensorrt, shared_logger

__all__ = [
    "BUILD_SCHEMA", "DEFAULT_BATCH", "PRECISIONS", "DeviceFacts", "EngineCache", "ShapeProfile",
    "TensorRTBuildConfig", "build_engine", "capture_log", "compute_capability_from_device_tree", "cuda_ok",
    "device_facts", "engine_cache_key", "parse_l4t_release", "require_cudart", "require_tensorrt",
    "shared_logger", "tensorrt_version",
]
