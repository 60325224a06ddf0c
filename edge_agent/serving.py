"""The model host: serves requests on the active model and switches models without dropping any.

:class:`ModelHost` holds the active :class:`LoadedModel` and, during an update's probation, the previous
one (still loaded, so a rollback is a pointer swap). :meth:`ModelHost.swap` changes the active model
under a short lock: a request that already took the old model finishes on it, every later request uses
the new one. Each version's :class:`ServingStats` (requests, errors, latency p99, mean confidence) is what
the update's health judge reads; ``observers`` are called after every request with
``(version, inputs, outputs, latency_s, ok)`` for telemetry and drift.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.bundle import MANIFEST_NAME, Manifest
from edgeml.edge_agent.runtimes.base import Runtime, open_runtime
from edgeml.edge_agent.update.health import HealthSnapshot, mean_confidence
from edgeml.errors import EdgeMLError, RuntimeBackendError

__all__ = ["LoadedModel", "ModelHost", "Observer", "ServingStats", "load_model"]

Observer = Callable[[str, Mapping[str, np.ndarray], "dict[str, np.ndarray] | None", float, bool], None]


@dataclass
class ServingStats:
    """Live numbers of one model version (thread-safe; latencies kept in a bounded window).

    Attributes:
        window: How many recent latencies and confidences the p99 and mean are computed over.
    """

    window: int = 2048
    requests: int = 0
    errors: int = 0
    _latencies_ms: deque[float] = field(default_factory=deque)
    _outputs: deque[np.ndarray] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._latencies_ms = deque(maxlen=self.window)
        self._outputs = deque(maxlen=max(1, self.window // 8))

    def record(self, latency_s: float, ok: bool, outputs: np.ndarray | None) -> None:
        """Account one request: cheap (the confidence is computed from the kept outputs when asked)."""
        with self._lock:
            self.requests += 1
            if ok:
                self._latencies_ms.append(latency_s * 1000.0)
                if outputs is not None:
                    self._outputs.append(outputs)
            else:
                self.errors += 1

    def snapshot(self) -> HealthSnapshot:
        """Requests, errors, p99 latency and mean confidence so far (drift and crashes left to the caller)."""
        with self._lock:
            lat = np.asarray(self._latencies_ms, dtype=np.float64)
            outputs = list(self._outputs)
            requests, errors = self.requests, self.errors
        rows = [o for o in outputs if o.ndim == 2 and o.shape[1:] == outputs[-1].shape[1:]] if outputs else []
        confidence = mean_confidence(np.concatenate(rows)) if rows else None  # one vectorised pass
        return HealthSnapshot(requests=requests, errors=errors,
                              p99_ms=float(np.percentile(lat, 99)) if lat.size else None, confidence=confidence)


@dataclass
class LoadedModel:
    """A model loaded in its runtime, with the slot it came from."""

    version: str
    slot: str
    manifest: Manifest
    runtime: Runtime
    users: int = 0

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runtime.infer(inputs)


def load_model(slot_dir: Path, slot: str, *, threads: int = 1) -> LoadedModel:
    """Load the model staged in ``slot_dir`` into the runtime its manifest names.

    Raises:
        RuntimeBackendError: The runtime refuses the model.
        BundleError: The slot's manifest is malformed.
    """
    manifest = Manifest.from_dict(json.loads((slot_dir / MANIFEST_NAME).read_bytes()))
    # TensorRT builds its engine on the device: cache it beside the slots (keyed by the model's hash, the GPU and
    # the TensorRT version), so a restart or a rollback does not rebuild it.
    options = {"cache_dir": slot_dir.parent / "engine-cache"} if manifest.runtime["name"] == "tensorrt" else {}
    runtime = open_runtime(manifest.runtime["name"], slot_dir / manifest.model["file"], threads=threads, **options)
    runtime.load()
    return LoadedModel(manifest.version, slot, manifest, runtime)


class ModelHost:
    """Serves predictions on the active model; swaps models atomically.

    Args:
        observers: Called after every request with ``(version, inputs, outputs or None, latency_s, ok)``.
    """

    def __init__(self, observers: list[Observer] | None = None) -> None:
        self.observers: list[Observer] = list(observers or [])
        self._lock = threading.Condition()
        self._active: LoadedModel | None = None
        self._previous: LoadedModel | None = None
        self._stats: dict[str, ServingStats] = {}

    # -- serving ------------------------------------------------------------------------------
    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``inputs`` on the active model, recording latency, errors and confidence.

        Raises:
            RuntimeBackendError: No model is loaded, or the model failed on these inputs.
        """
        with self._lock:
            model = self._active
            if model is None:
                raise RuntimeBackendError("no model is serving yet")
            model.users += 1
        start = time.perf_counter()
        outputs: dict[str, np.ndarray] | None = None
        try:
            outputs = model.infer(inputs)
            return outputs
        finally:
            elapsed = time.perf_counter() - start
            ok = outputs is not None
            stats = self._stats.get(model.version) or self.stats(model.version)
            stats.record(elapsed, ok, next(iter(outputs.values())) if outputs else None)
            with self._lock:
                model.users -= 1
                self._lock.notify_all()
            for observer in self.observers:
                observer(model.version, inputs, outputs, elapsed, ok)

    def stats(self, version: str) -> ServingStats:
        """The live stats of ``version`` (created empty on first use)."""
        with self._lock:
            return self._stats.setdefault(version, ServingStats())

    def reset_stats(self, version: str) -> None:
        """Start ``version``'s stats afresh (at the start of its probation)."""
        with self._lock:
            self._stats[version] = ServingStats()

    # -- switching ------------------------------------------------------------------------------
    @property
    def active(self) -> LoadedModel | None:
        return self._active

    @property
    def previous(self) -> LoadedModel | None:
        return self._previous

    def swap(self, model: LoadedModel | None, *, keep_previous: bool = True) -> LoadedModel | None:
        """Make ``model`` the active model; return the one it replaced.

        Args:
            model: The new active model (None: serve nothing).
            keep_previous: Keep the replaced model loaded as :attr:`previous` (for a rollback); otherwise
                it is released once its in-flight requests finish.
        """
        with self._lock:
            old, self._active = self._active, model
            if old is model:
                return old
            stale = self._previous if keep_previous else old
            if keep_previous:
                self._previous = old
            elif self._previous is model:
                self._previous = None
        if stale is not None and stale is not model and stale is not self._active:
            self.release(stale)
        return old

    def set_previous(self, model: LoadedModel | None) -> None:
        """Hold ``model`` loaded as the rollback target (after a restart during probation)."""
        with self._lock:
            stale, self._previous = self._previous, model
        if stale is not None and stale is not model and stale is not self._active:
            self.release(stale)

    def release_previous(self) -> None:
        """Unload the previous model (after a commit)."""
        self.set_previous(None)

    def release(self, model: LoadedModel, timeout_s: float = 30.0) -> None:
        """Unload ``model`` once no request is using it (waits at most ``timeout_s``)."""
        with self._lock:
            self._lock.wait_for(lambda: model.users == 0, timeout=timeout_s)
        with contextlib.suppress(EdgeMLError):  # best effort: the runtime goes away with the object
            model.runtime.unload()

    def close(self) -> None:
        """Unload every model."""
        active, previous = self._active, self._previous
        self._active = self._previous = None
        for model in (active, previous):
            if model is not None:
                self.release(model)

    def describe(self) -> dict[str, Any]:
        """What serves now: active and previous version and slot."""
        a, p = self._active, self._previous
        return {"active": a and {"version": a.version, "slot": a.slot},
                "previous": p and {"version": p.version, "slot": p.slot}}
