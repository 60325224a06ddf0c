"""The TensorRT build config a bundle carries (``tensorrt_build.json``, the manifest's ``runtime.build``).

Pure data, no TensorRT: ``edgeml compile`` writes it from the model's inputs, the device reads it back and
builds its engine with it (:mod:`edgeml.tensorrt.build`), and it is part of the engine's cache key
(:mod:`edgeml.tensorrt.cache`).

Map::

    ShapeProfile          min/opt/max shapes of one input (an optimization profile entry)
    TensorRTBuildConfig   precision, workspace, profiles, optimization level; to/from dict and JSON;
                          for_inputs() derives the profiles from a model's inputs
    BUILD_SCHEMA          the format's version
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeml.bundle import TensorSpec
from edgeml.errors import ConfigError

__all__ = ["BUILD_SCHEMA", "DEFAULT_BATCH", "PRECISIONS", "ShapeProfile", "TensorRTBuildConfig"]

#: Version of the ``tensorrt_build.json`` format (the manifest's ``runtime.build`` block).
BUILD_SCHEMA = "edgeml.tensorrt-build/1"
PRECISIONS = ("fp16", "int8")
#: (min, opt, max) batch of the optimization profile of an input whose batch axis is dynamic.
DEFAULT_BATCH = (1, 1, 8)
_CONFIG_KEYS = {"schema", "precision", "workspace_mb", "profiles", "builder_optimization_level"}


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
