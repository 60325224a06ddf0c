"""TensorRT engines: the build config a bundle carries, the engine build, and the device's engine cache.

This lives in the core because both sides need it: ``edgeml compile --build-engine`` builds an engine on a
GPU host, and the agent builds (or reuses) one on the device from the bundle's TensorRT-ready ONNX. An
engine is specific to the GPU, the TensorRT version and the JetPack/L4T release it was built with, so the
cache key (:func:`engine_cache_key`) covers all of them, plus the bundle and every build setting.

TensorRT and cuda-python are imported lazily, inside the functions that need them; everything else here
imports and runs without them. The calls target TensorRT 8.6 (JetPack 5) and 10.x (JetPack 6): explicit
batch networks, ``set_memory_pool_limit``, ``build_serialized_network`` and the named I/O tensor API.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from edgeml._deps import require
from edgeml.bundle import TensorSpec
from edgeml.errors import (
    ConfigError,
    ConversionError,
    EdgeMLError,
    MissingExtraError,
    ModelError,
    StorageError,
)
from edgeml.fsutil import atomic_write_bytes

__all__ = [
    "BUILD_SCHEMA", "DeviceFacts", "EngineCache", "ShapeProfile", "TensorRTBuildConfig", "build_engine",
    "capture_log", "compute_capability_from_device_tree", "cuda_ok", "device_facts", "engine_cache_key",
    "parse_l4t_release", "require_cudart", "require_tensorrt", "shared_logger", "tensorrt_version",
]

#: Version of the ``tensorrt_build.json`` format (the manifest's ``runtime.build`` block).
BUILD_SCHEMA = "edgeml.tensorrt-build/1"
#: Version of the engine cache key; bump it when what goes into an engine changes.
_KEY_SCHEMA = "edgeml.tensorrt-engine/1"
PRECISIONS = ("fp16", "int8")
#: (min, opt, max) batch of the optimization profile of an input whose batch axis is dynamic.
DEFAULT_BATCH = (1, 1, 8)
_CONFIG_KEYS = {"schema", "precision", "workspace_mb", "profiles", "builder_optimization_level"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_L4T_RELEASE = Path("/etc/nv_tegra_release")
_DEVICE_TREE_COMPATIBLE = Path("/proc/device-tree/compatible")
#: Jetson SoC (device-tree ``compatible``) -> GPU compute capability, for hosts without cuda-python.
_TEGRA_COMPUTE_CAPABILITY = {"tegra264": "11.0", "tegra234": "8.7", "tegra194": "7.2", "tegra186": "6.2",
                             "tegra210": "5.3"}
_TENSORRT_HINT = ("on a Jetson, TensorRT comes with JetPack (sudo apt install python3-libnvinfer); "
                  "elsewhere: pip install tensorrt cuda-python")


# --- the build config -----------------------------------------------------------------------------------


def _check_int(value: object, what: str, low: int, high: int | None = None) -> int:
    if (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high)):
        return value
    bound = f"between {low} and {high}" if high is not None else f"at least {low}"
    raise ConfigError(f"TensorRT build config: {what} must be an integer {bound}, got {value!r}")


def _shape(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"TensorRT build config: {what} must be a non-empty list of dimensions, "
                          f"got {value!r}")
    return tuple(_check_int(d, f"{what} dimension", 1) for d in value)


@dataclass(frozen=True)
class ShapeProfile:
    """The shapes one input may take in the engine (a TensorRT optimization profile entry).

    Attributes:
        input: The input tensor's name.
        min: Smallest shape accepted.
        opt: The shape TensorRT tunes kernels for.
        max: Largest shape accepted.
    """

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.input, str) or not self.input:
            raise ConfigError(f"TensorRT build config: a profile needs an input name, got {self.input!r}")
        named = (("min", self.min), ("opt", self.opt), ("max", self.max))
        shapes = [_shape(s, f"{self.input} {k}") for k, s in named]
        what = f"TensorRT build config: {self.input}"
        if len({len(s) for s in shapes}) != 1:
            raise ConfigError(f"{what} min/opt/max have different ranks: {shapes}")
        if not all(a <= b <= c for a, b, c in zip(*shapes)):
            raise ConfigError(f"{what} needs min <= opt <= max in every dimension, "
                              f"got {shapes[0]}, {shapes[1]}, {shapes[2]}")
        for name, shape in zip(("min", "opt", "max"), shapes):
            object.__setattr__(self, name, shape)

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: object) -> ShapeProfile:
        """Parse one profile entry.

        Raises:
            ConfigError: Not a mapping with exactly ``input``, ``min``, ``opt`` and ``max``.
        """
        keys = {"input", "min", "opt", "max"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise ConfigError(f"TensorRT build config: a profile needs exactly {sorted(keys)}, got {data!r}")
        return cls(data["input"], data["min"], data["opt"], data["max"])


@dataclass(frozen=True)
class TensorRTBuildConfig:
    """How the device builds its TensorRT engine; stored in a bundle as ``tensorrt_build.json``.

    Attributes:
        precision: ``fp16`` (FP16 kernels where faster, FP32 elsewhere) or ``int8`` (the ONNX carries
            explicit symmetric Q/DQ nodes; FP16 stays enabled for the layers left in float).
        workspace_mb: Builder scratch memory limit in MiB (Jetsons share it with the CPU; keep it modest).
        profiles: One entry per input with a dynamic dimension; empty when every input shape is fixed.
        builder_optimization_level: 0-5; TensorRT's default is 3, higher builds longer for faster engines.
    """

    precision: str = "fp16"
    workspace_mb: int = 1024
    profiles: tuple[ShapeProfile, ...] = ()
    builder_optimization_level: int = 3

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"TensorRT build config: precision must be one of {', '.join(PRECISIONS)}, "
                              f"got {self.precision!r}")
        _check_int(self.workspace_mb, "workspace_mb", 1)
        _check_int(self.builder_optimization_level, "builder_optimization_level", 0, 5)
        if not (isinstance(self.profiles, tuple) and all(isinstance(p, ShapeProfile) for p in self.profiles)):
            raise ConfigError("TensorRT build config: profiles must be a tuple of ShapeProfile")
        names = [p.input for p in self.profiles]
        if len(set(names)) != len(names):
            raise ConfigError(f"TensorRT build config: more than one profile for an input: {names}")

    @classmethod
    def for_inputs(cls, inputs: Sequence[TensorSpec], precision: str = "fp16", *,
                   batch: tuple[int, int, int] = DEFAULT_BATCH, workspace_mb: int = 1024,
                   builder_optimization_level: int = 3) -> TensorRTBuildConfig:
        """The config for a model's inputs: a ``batch`` (min, opt, max) profile where dim 0 is dynamic.

        Raises:
            ConfigError: An input has a dynamic dimension other than the batch (TensorRT needs its range).
        """
        profiles = []
        for spec in inputs:
            dynamic = [i for i, d in enumerate(spec.shape) if not (isinstance(d, int) and d > 0)]
            if dynamic and dynamic != [0]:
                raise ConfigError(
                    f"input {spec.name!r} has dynamic dimensions {dynamic} besides the batch: TensorRT needs "
                    f"their range", hint="export the model with fixed sizes (or pass --input-shape)")
            if dynamic:
                rest = tuple(int(d) for d in spec.shape[1:])
                lo, opt, hi = batch
                profiles.append(ShapeProfile(spec.name, (lo, *rest), (opt, *rest), (hi, *rest)))
        return cls(precision, workspace_mb, tuple(profiles), builder_optimization_level)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": BUILD_SCHEMA, "precision": self.precision, "workspace_mb": self.workspace_mb,
                "profiles": [p.to_dict() for p in self.profiles],
                "builder_optimization_level": self.builder_optimization_level}

    @classmethod
    def from_dict(cls, data: object) -> TensorRTBuildConfig:
        """Parse :meth:`to_dict`'s output (e.g. a manifest's ``runtime.build`` block).

        Raises:
            ConfigError: Wrong schema, unknown or missing keys, or invalid values.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"TensorRT build config must be a JSON object, got {type(data).__name__}")
        if data.get("schema") != BUILD_SCHEMA:
            raise ConfigError(f"TensorRT build config has schema {data.get('schema')!r}; this edgeml reads "
                              f"{BUILD_SCHEMA!r}", hint="recompile the bundle with this edgeml version")
        unknown = set(data) - _CONFIG_KEYS
        if unknown:
            raise ConfigError(f"TensorRT build config has unknown keys: {', '.join(sorted(unknown))}")
        if "precision" not in data:
            raise ConfigError("TensorRT build config has no precision")
        profiles = data.get("profiles", [])
        if not isinstance(profiles, list):
            raise ConfigError(f"TensorRT build config: profiles must be a list, got {profiles!r}")
        return cls(data["precision"], data.get("workspace_mb", 1024),
                   tuple(map(ShapeProfile.from_dict, profiles)), data.get("builder_optimization_level", 3))

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> TensorRTBuildConfig:
        """Parse ``tensorrt_build.json``.

        Raises:
            ConfigError: Not JSON, or not a valid config.
        """
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"TensorRT build config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


# --- what identifies an engine ----------------------------------------------------------------------------


def engine_cache_key(bundle_sha256: str, trt_version: str, compute_capability: str | None,
                     l4t_version: str | None, config: TensorRTBuildConfig) -> str:
    """The sha256 naming an engine: same inputs, same key; any change, another key.

    Args:
        bundle_sha256: Hash of what the engine is built from (the bundle, or its ONNX).
        trt_version: ``tensorrt.__version__`` (engines do not load across TensorRT versions).
        compute_capability: The GPU's, e.g. ``"8.7"`` (engines are GPU-specific); None when unknown.
        l4t_version: The Jetson L4T release, e.g. ``"36.3.0"``; None off Jetson.
        config: The build settings.

    Raises:
        ConfigError: ``bundle_sha256`` is not a hex sha256, or ``trt_version`` is empty.
    """
    if not _SHA256.fullmatch(bundle_sha256 or ""):
        raise ConfigError(f"engine cache key: {bundle_sha256!r} is not a lowercase hex sha256")
    if not trt_version:
        raise ConfigError("engine cache key: the TensorRT version is required")
    payload = {"key": _KEY_SCHEMA, "bundle_sha256": bundle_sha256, "tensorrt": trt_version,
               "compute_capability": compute_capability, "l4t": l4t_version, "build": config.to_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class DeviceFacts:
    """What an engine depends on, as found on this machine (None where it cannot be found).

    Attributes:
        tensorrt_version: ``tensorrt.__version__``.
        compute_capability: The first GPU's, e.g. ``"8.7"``.
        l4t_version: The Jetson L4T release, e.g. ``"36.3.0"`` (JetPack 6.0).
    """

    tensorrt_version: str | None
    compute_capability: str | None
    l4t_version: str | None


def parse_l4t_release(text: str) -> str | None:
    """The L4T version in ``/etc/nv_tegra_release``'s first line, e.g. ``"# R36 (release), REVISION: 3.0,
    GCID: ..."`` -> ``"36.3.0"``; None when the text is not in that form."""
    match = re.search(r"^#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)", text, re.MULTILINE)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def compute_capability_from_device_tree(compatible: bytes) -> str | None:
    """The GPU compute capability of a Jetson from ``/proc/device-tree/compatible`` (NUL-separated
    strings such as ``nvidia,tegra234``); None when no known Tegra SoC is named."""
    for entry in compatible.split(b"\0"):
        vendor, _, soc = entry.decode("ascii", "replace").strip().partition(",")
        if vendor == "nvidia" and soc in _TEGRA_COMPUTE_CAPABILITY:
            return _TEGRA_COMPUTE_CAPABILITY[soc]
    return None


def _cuda_compute_capability() -> str | None:
    try:
        cudart = require_cudart()
        attr = cudart.cudaDeviceAttr
        major = cuda_ok(cudart, cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, 0),
                        "cudaDeviceGetAttribute")
        minor = cuda_ok(cudart, cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, 0),
                        "cudaDeviceGetAttribute")
    except (EdgeMLError, RuntimeError, OSError):  # no cuda-python, no driver or no GPU: not known here
        return None
    return f"{major}.{minor}"


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def tensorrt_version() -> str | None:
    """``tensorrt.__version__``, or None when TensorRT cannot be imported."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return str(tensorrt.__version__)


def device_facts(*, release_file: Path = _L4T_RELEASE, compatible_file: Path = _DEVICE_TREE_COMPATIBLE,
                 probe_cuda: bool = True) -> DeviceFacts:
    """TensorRT version, GPU compute capability and L4T release of this machine.

    The compute capability comes from CUDA (cuda-python) when ``probe_cuda`` and it is installed, else from
    the Jetson device tree.

    Args:
        release_file: The L4T release file.
        compatible_file: The device tree's ``compatible`` list.
        probe_cuda: Ask the CUDA runtime (initialises CUDA; False for tests and CPU-only hosts).
    """
    release = _read(release_file)
    l4t = parse_l4t_release(release.decode("utf-8", "replace")) if release is not None else None
    capability = _cuda_compute_capability() if probe_cuda else None
    if capability is None:
        compatible = _read(compatible_file)
        capability = compute_capability_from_device_tree(compatible) if compatible is not None else None
    return DeviceFacts(tensorrt_version(), capability, l4t)


# --- TensorRT and CUDA, imported on demand ------------------------------------------------------------


def require_tensorrt() -> ModuleType:
    """Import ``tensorrt`` or raise MissingExtraError saying where TensorRT comes from."""
    try:
        return require("tensorrt", "tensorrt")
    except MissingExtraError as exc:
        exc.hint = _TENSORRT_HINT
        raise


def require_cudart() -> ModuleType:
    """cuda-python's CUDA runtime bindings (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    with contextlib.suppress(ImportError):
        from cuda.bindings import runtime

        return runtime
    try:
        from cuda import cudart
    except ImportError as exc:
        err = MissingExtraError("cuda-python", "tensorrt")
        err.hint = _TENSORRT_HINT
        raise err from exc
    return cudart


def cuda_ok(cudart: ModuleType, result: Any, what: str, error: type[EdgeMLError] = ConversionError) -> Any:
    """Unpack a cuda-python ``(error, value...)`` result; a CUDA error becomes ``error`` naming ``what``."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise error(f"CUDA {what} failed: {getattr(err, 'name', err)}",
                    hint="check that an NVIDIA GPU and its driver are present")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass
class _LogState:
    """Where the process-wide TensorRT logger sends messages right now."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    sinks: list[Callable[[int, str], None]] = field(default_factory=list)
    logger: Any = None


_LOG = _LogState()


def shared_logger(trt: ModuleType) -> Any:
    """The one ``trt.ILogger`` of this process.

    TensorRT keeps the logger of the first Builder or Runtime for the whole process, so a logger per call
    would lose messages (or be called after it was freed); this one forwards to :func:`capture_log` sinks.
    """
    with _LOG.lock:
        if _LOG.logger is None:

            class _Logger(trt.ILogger):  # type: ignore[name-defined]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    for sink in list(_LOG.sinks):
                        sink(int(severity), msg)

            _LOG.logger = _Logger()
        return _LOG.logger


@contextlib.contextmanager
def capture_log(trt: ModuleType, log: Callable[[str], None] | None = None) -> Iterator[list[str]]:
    """Collect TensorRT's error messages (yielded list) and pass warnings and errors to ``log``."""
    errors: list[str] = []
    severity = trt.ILogger.Severity
    worst_error, warning = int(severity.ERROR), int(severity.WARNING)

    def sink(level: int, msg: str) -> None:
        if level <= worst_error:
            errors.append(msg.strip())
        if log is not None and level <= warning:
            log(f"TensorRT: {msg.strip()}")

    with _LOG.lock:
        _LOG.sinks.append(sink)
    try:
        yield errors
    finally:
        with _LOG.lock:
            _LOG.sinks.remove(sink)


# --- building an engine -------------------------------------------------------------------------------


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


# --- the device's engine cache ----------------------------------------------------------------------------


class EngineCache:
    """Serialized engines in a directory, one ``<key>.engine`` file per :func:`engine_cache_key`.

    Writes are atomic, so a crash mid-write leaves the old state, never a torn engine.

    Args:
        directory: Where engines are kept (created on the first write).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path_for(self, key: str) -> Path:
        """The file of ``key``. Raises ConfigError for anything but a hex sha256 (no path tricks)."""
        if not isinstance(key, str) or not _SHA256.fullmatch(key):
            raise ConfigError(f"engine cache key {key!r} is not a lowercase hex sha256")
        return self.directory / f"{key}.engine"

    def get(self, key: str) -> bytes | None:
        """The cached engine, or None."""
        path = self.path_for(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read cached engine {path}: {exc.strerror}") from exc

    def put(self, key: str, engine: bytes) -> Path:
        """Store ``engine`` under ``key`` (atomically); returns its path."""
        path = self.path_for(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create engine cache {self.directory}: {exc.strerror}") from exc
        atomic_write_bytes(path, engine)
        return path

    def discard(self, key: str) -> None:
        """Remove ``key``'s engine if present (e.g. one TensorRT refused to load)."""
        with contextlib.suppress(FileNotFoundError):
            self.path_for(key).unlink()

    def keys(self) -> list[str]:
        """The keys of every cached engine, sorted."""
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.engine") if _SHA256.fullmatch(p.stem))

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Remove every engine whose key is not in ``keep``; returns the removed keys."""
        keep_set = set(keep)
        removed = [k for k in self.keys() if k not in keep_set]
        for key in removed:
            self.discard(key)
        return removed

    def get_or_build(self, key: str, build: Callable[[], bytes]) -> tuple[bytes, bool]:
        """The cached engine, or ``build()``'s result stored first; returns (engine, was_cached)."""
        cached = self.get(key)
        if cached is not None:
            return cached, True
        engine = build()
        self.put(key, engine)
        return engine, False
