"""The device's engine cache: one serialized engine per :func:`engine_cache_key`.

The key covers everything an engine depends on (the bundle, the TensorRT version, the GPU's compute
capability, the L4T release and every build setting), so a changed input never reuses a stale engine.

Map::

    engine_cache_key()   sha256 of (bundle, TensorRT version, compute capability, L4T, build config)
    EngineCache          <key>.engine files in a directory: get, put (atomic), discard, keys, prune,
                         get_or_build
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from edgeml.errors import ConfigError, StorageError
from edgeml.fsutil import atomic_write_bytes
from edgeml.tensorrt.config import TensorRTBuildConfig

__all__ = ["EngineCache", "engine_cache_key"]

#: Version of the engine cache key; bump it when what goes into an engine changes.
_KEY_SCHEMA = "edgeml.tensorrt-engine/1"
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
