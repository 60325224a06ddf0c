"""Building a TensorRT engine from a TensorRT-ready ONNX, with a :class:`TensorRTBuildConfig`.

Used on a GPU host (``edgeml compile --build-engine``) and on the device (the agent's TensorRT runtime, on a
cache miss). The calls target TensorRT 8.6 (JetPack 5) and 10.x (JetPack 6): explicit batch networks,
``set_memory_pool_limit`` and ``build_serialized_network``. TensorRT is imported when :func:`build_engine`
runs, not before; every failure becomes a :class:`~edgeml.errors.ConversionError` with TensorRT's message.

Map::

    build_engine()      the public call: ONNX path + config -> serialized engine bytes
    _build()            builder, network, ONNX parser, builder config, serialize
    _builder_config()   workspace, optimization level, FP16/INT8 flags, the optimization profile
    _profile()          the config's shape profiles checked against the network's inputs
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from edgeml.errors import ConversionError, EdgeMLError, ModelError
from edgeml.tensorrt.config import TensorRTBuildConfig
from edgeml.tensorrt.libs import capture_log, require_tensorrt, shared_logger

__all__ = ["build_engine"]


def _last(errors: list[str]) -> str:
    return errors[-1] if errors else "no error message from TensorRT"


def _network_flags(trt: ModuleType) -> int:
    # Explicit batch is required before TensorRT 10, where it became the only mode (and the flag deprecated).
    if int(str(trt.__version__).split(".")[0]) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _profile(builder: Any, network: Any, config: TensorRTBuildConfig) -> Any:
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    given = {p.input: p for p in config.profiles}
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise ConversionError(f"the build config has profiles for {unknown}, which the model does not have "
                              f"(its inputs: {sorted(inputs)})")
    missing = sorted(n for n, s in inputs.items() if any(d < 0 for d in s) and n not in given)
    if missing:
        raise ConversionError(f"inputs {missing} have dynamic dimensions but the build config has no profile "
                              "for them")
    if not given:
        return None
    profile = builder.create_optimization_profile()
    for name, p in given.items():
        if len(p.min) != len(inputs[name]):
            raise ConversionError(f"profile for {name!r} has rank {len(p.min)}, the model's input has "
                                  f"shape {inputs[name]}")
        profile.set_shape(name, p.min, p.opt, p.max)
    return profile


def _builder_config(trt: ModuleType, builder: Any, network: Any, config: TensorRTBuildConfig) -> Any:
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    cfg.builder_optimization_level = config.builder_optimization_level
    cfg.set_flag(trt.BuilderFlag.FP16)
    if config.precision == "int8":
        # Explicit quantization: the scales are in the ONNX's Q/DQ nodes, so no calibrator.
        cfg.set_flag(trt.BuilderFlag.INT8)
    profile = _profile(builder, network, config)
    if profile is not None:
        cfg.add_optimization_profile(profile)
    return cfg


def _new_builder(trt: ModuleType, errors: list[str]) -> Any:
    builder, cause = None, None
    try:
        builder = trt.Builder(shared_logger(trt))
    except Exception as exc:  # e.g. "CUDA initialization failure" on a host without a GPU
        cause = exc
    if builder is None:
        raise ConversionError(f"TensorRT could not start a builder: {_last(errors)}",
                              hint="building an engine needs an NVIDIA GPU and its driver") from cause
    return builder


def _build(trt: ModuleType, onnx_path: Path, config: TensorRTBuildConfig, errors: list[str]) -> bytes:
    builder = _new_builder(trt, errors)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, shared_logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        found = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)] or errors
        detail = "; ".join(found) or "unknown error"
        raise ConversionError(f"TensorRT cannot parse {onnx_path.name}: {detail}")
    serialized = builder.build_serialized_network(network, _builder_config(trt, builder, network, config))
    if serialized is None:
        raise ConversionError(f"TensorRT failed to build the {config.precision} engine: {_last(errors)}")
    return bytes(serialized)


def build_engine(onnx_path: str | Path, config: TensorRTBuildConfig,
                 log: Callable[[str], None] | None = None) -> bytes:
    """Build a serialized TensorRT engine from a TensorRT-ready ONNX.

    Args:
        onnx_path: The FP32 ONNX (``fp16``) or the explicitly quantized QDQ ONNX (``int8``).
        config: Precision, workspace, optimization profiles.
        log: Receives TensorRT's warnings and errors, one line each (optional).

    Raises:
        MissingExtraError: TensorRT is not installed.
        ModelError: ``onnx_path`` does not exist.
        ConversionError: TensorRT cannot start (no GPU), parse the model, or build the engine.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    trt = require_tensorrt()
    with capture_log(trt, log) as errors:
        try:
            return _build(trt, path, config, errors)
        except EdgeMLError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConversionError(f"TensorRT engine build failed: {first} ({_last(errors)})") from exc
