"""The model host: serves requests on the active model and switches models without dropping any.

:class:`ModelHost` holds the active :class:`LoadedModel` and, during an update's probation, the previous
one (still loaded, so a rollback is a pointer swap). :meth:`ModelHost.swap` changes the active model
under a short lock: a request that already took the old model finishes on it, every later request uses
the new one. Each version's :class:`ServingStats` (requests, errors, latency p99, mean confidence) is what
the update's health judge reads, and what the telemetry's latency accounting is fed from (``sink``);
``observers`` are called after every request with ``(version, inputs, outputs, latency_s, ok)``, and the
``sampler`` (drift) after one successful request in the number it returns.

The request path is kept short because the models served on small devices are small: a 10-microsecond
model must not pay much more than that for being served. Per request it takes the active model (no lock:
an in-flight token in a deque, whose append and pop are atomic), runs it, and records the latency, batch
size and first output in its version's ring buffer under one short lock; everything else (percentiles,
confidence, the telemetry histogram) is computed from the ring when it is read.
"""

from __future__ import annotations

import array
import contextlib
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeml.bundle import MANIFEST_NAME, Manifest
from edgeml.edge_agent.preprocess import FeedSpec
from edgeml.edge_agent.runtimes.base import Runtime, open_runtime
from edgeml.edge_agent.update.health import HealthSnapshot, mean_confidence
from edgeml.errors import EdgeMLError, RuntimeBackendError

__all__ = ["OUTPUTS_PER_S", "FeedSpec", "LatencySink", "LoadedModel", "ModelHost", "Observer", "Sampler",
           "RuntimeFactory", "ServingStats", "load_model"]

#: Requests per second up to which every output is kept for the mean confidence (see :class:`ServingStats`).
OUTPUTS_PER_S = 1000
Observer = Callable[[str, Mapping[str, np.ndarray], "dict[str, np.ndarray] | None", float, bool], None]
_perf_counter = time.perf_counter


class Sampler(Protocol):
    """Called for one successful request in N (drift): returns N, the requests until its next call (>= 1)."""

    def __call__(self, version: str, inputs: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray],
                 latency_s: float) -> int: ...


class LatencySink(Protocol):
    """Where request latencies go besides the health numbers (the telemetry's
    :class:`~edgeml.edge_agent.telemetry.Aggregator` is one)."""

    def record(self, latency_s: float, ok: bool = True, n: int = 1) -> None:
        """One request of ``n`` rows that took ``latency_s``, succeeded or not."""

    def record_batch(self, latencies_s: np.ndarray, rows: np.ndarray) -> None:
        """Successful requests: each one's latency and rows."""


class ServingStats:
    """Live numbers of one model version (thread-safe; fixed memory).

    Successful requests go into a ring of the newest ``window`` latencies and batch sizes (a power of two);
    the p99 is computed over it when asked, the mean confidence over the newest ``window // 8`` first outputs
    kept: every one while the version serves at most :data:`OUTPUTS_PER_S` requests a second, a regular sample
    above that rate (holding on to every output of a 10-microsecond model costs it about 5% of its speed).
    Every ``window // 4`` requests, and at :meth:`flush`, the entries not yet handed on go to ``sink`` in one
    call; failed requests go to it one by one.

    Args:
        window: Latencies (and batch sizes) kept; a power of two.
        sink: Where latencies also go (None: nowhere).
    """

    __slots__ = ("_keep", "_lat", "_lock", "_mark", "_mask", "_n", "_outputs", "_pushed", "_rows", "_step", "errors",
                 "sink", "window")

    def __init__(self, window: int = 2048, sink: LatencySink | None = None) -> None:
        if window < 8 or window & (window - 1):
            raise ValueError(f"window must be a power of two >= 8, got {window}")
        self.window = window
        self.sink = sink
        self.errors = 0
        self._n = 0  # successful requests recorded
        self._pushed = 0  # of which handed to the sink
        self._mask = window - 1
        self._step = window // 4 - 1
        self._lat = array.array("d", bytes(8 * window))
        self._rows = array.array("q", bytes(8 * window))
        self._outputs: deque[np.ndarray] = deque(maxlen=max(1, window // 8))
        self._keep = 1  # keep the output of one successful request in this many
        self._mark = time.monotonic()
        self._lock = threading.Lock()

    @property
    def requests(self) -> int:
        """Requests recorded, failed ones included."""
        return self._n + self.errors

    def record(self, latency_s: float, ok: bool, outputs: np.ndarray | None, rows: int = 1) -> None:
        """Account one request of ``rows`` rows (cheap: the numbers are computed when read)."""
        if not ok:
            with self._lock:
                self.errors += 1
            sink = self.sink
            if sink is not None:
                sink.record(latency_s, False, rows)
            return
        lock = self._lock
        lock.acquire()
        n = self._n
        i = n & self._mask
        self._lat[i] = latency_s
        self._rows[i] = rows
        self._n = n + 1
        if outputs is not None and not n % self._keep:
            self._outputs.append(outputs)
        lock.release()
        if not i & self._step and n:
            self._tick()

    def record_served(self, latency_s: float, rows: int, outputs: Mapping[str, np.ndarray]) -> None:
        """:meth:`record` of a successful request, as the model host calls it: ``outputs`` is the runtime's
        output dict, whose first output is looked at only when it is kept."""
        lock = self._lock
        lock.acquire()
        n = self._n
        i = n & self._mask
        self._lat[i] = latency_s
        self._rows[i] = rows
        self._n = n + 1
        if not n % self._keep:
            first = next(iter(outputs.values()), None)
            if first is not None:
                self._outputs.append(first)
        lock.release()
        if not i & self._step and n:
            self._tick()

    def _tick(self) -> None:
        """Every ``window // 4`` requests: adjust the output sample to the request rate, hand latencies on."""
        now = time.monotonic()
        elapsed, self._mark = now - self._mark, now
        if elapsed > 0:
            self._keep = max(1, math.ceil((self._step + 1) / elapsed / OUTPUTS_PER_S))
        self.flush()

    def flush(self) -> None:
        """Hand the entries not yet handed on to ``sink`` (the telemetry reads them before each report)."""
        with self._lock:
            start, end = self._pushed, self._n
            self._pushed = end
            if self.sink is None or end == start:
                return
            lat = np.frombuffer(self._lat, np.float64)
            rows = np.frombuffer(self._rows, np.int64)
            idx = np.arange(max(start, end - self.window), end) & self._mask  # overwritten ones are lost
            batch = lat[idx], rows[idx]
            sink = self.sink
        sink.record_batch(*batch)

    def snapshot(self) -> HealthSnapshot:
        """Requests, errors, p99 latency and mean confidence so far (drift and crashes left to the caller)."""
        with self._lock:
            n, errors = self._n, self.errors
            lat = np.frombuffer(self._lat, np.float64)[:min(n, self.window)].copy()
            outputs = list(self._outputs)
        rows = [o for o in outputs if o.ndim == 2 and o.shape[1:] == outputs[-1].shape[1:]] if outputs else []
        confidence = mean_confidence(np.concatenate(rows)) if rows else None  # one vectorised pass
        return HealthSnapshot(requests=n + errors, errors=errors,
                              p99_ms=float(np.percentile(lat, 99)) * 1000.0 if lat.size else None,
                              confidence=confidence)


@dataclass(eq=False)
class LoadedModel:
    """A model loaded in its runtime, with the slot it came from.

    ``inflight`` holds one token per request running on it (deque appends and pops are atomic, so taking
    the model needs no lock); ``retired`` is set when it is being released: a request that took it just then
    puts its token back and takes the active model instead.
    """

    version: str
    slot: str
    manifest: Manifest
    runtime: Runtime
    inflight: deque[None] = field(default_factory=deque, repr=False)
    retired: bool = False
    feed_spec: FeedSpec | None = field(default=None, repr=False)  # filled by the agent on first use
    #: The runtime's :meth:`~edgeml.edge_agent.runtimes.base.Runtime.runner`: what the host runs feeds with.
    run: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.run is None:
            self.run = self.runtime.runner() if self.runtime.loaded else self.runtime.infer

    @property
    def users(self) -> int:
        """Requests running on this model now."""
        return len(self.inflight)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runtime.infer(inputs)


#: ``open_runtime(name, model_path, *, threads, **options) -> Runtime``: how a model's runtime is made
#: (:func:`~edgeml.edge_agent.runtimes.base.open_runtime`; the fleet simulator passes its own).
RuntimeFactory = Callable[..., Runtime]


def load_model(slot_dir: Path, slot: str, *, threads: int = 1, runtimes: RuntimeFactory = open_runtime) -> LoadedModel:
    """Load the model staged in ``slot_dir`` into the runtime its manifest names, made by ``runtimes``.

    Raises:
        RuntimeBackendError: The runtime refuses the model.
        BundleError: The slot's manifest is malformed.
    """
    manifest = Manifest.from_dict(json.loads((slot_dir / MANIFEST_NAME).read_bytes()))
    # TensorRT builds its engine on the device: cache it beside the slots (keyed by the model's hash, the GPU and
    # the TensorRT version), so a restart or a rollback does not rebuild it.
    options = {"cache_dir": slot_dir.parent / "engine-cache"} if manifest.runtime["name"] == "tensorrt" else {}
    runtime = runtimes(manifest.runtime["name"], slot_dir / manifest.model["file"], threads=threads, **options)
    runtime.load()
    return LoadedModel(manifest.version, slot, manifest, runtime)


class ModelHost:
    """Serves predictions on the active model; swaps models atomically.

    Args:
        observers: Called after every request with ``(version, inputs, outputs or None, latency_s, ok)``.
        sink: Where every version's latencies also go (see :attr:`sink`).
        sampler: Called after one successful request in the number it returns (see :class:`Sampler`).
    """

    def __init__(self, observers: list[Observer] | None = None, sink: LatencySink | None = None,
                 sampler: Sampler | None = None) -> None:
        self.observers: list[Observer] = list(observers or [])
        #: Called for one successful request in the number it returns (the drift monitors' sample).
        self.sampler = sampler
        self._until_sample = 1
        self._lock = threading.Lock()
        self._active: LoadedModel | None = None
        self._previous: LoadedModel | None = None
        self._stats: dict[str, ServingStats] = {}
        self._sink = sink

    # -- serving ------------------------------------------------------------------------------
    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``inputs`` on the active model, recording latency, errors and confidence.

        Raises:
            RuntimeBackendError: No model is loaded, or the model failed on these inputs.
        """
        return self.serve(inputs)[1]

    def serve(self, inputs: Mapping[str, np.ndarray], rows: int | None = None
              ) -> tuple[LoadedModel, dict[str, np.ndarray]]:
        """:meth:`predict` that also returns the model that ran (its version is the one to report).

        Args:
            inputs: The runtime's feeds.
            rows: Their batch size (None: read from the first input).

        Raises:
            RuntimeBackendError: No model is loaded, or the model failed on these inputs.
        """
        while True:
            model = self._active
            if model is None:
                raise RuntimeBackendError("no model is serving yet")
            inflight = model.inflight
            inflight.append(None)
            if not model.retired:
                break
            inflight.pop()  # it is being released: take the model that replaced it
            time.sleep(0)
        if rows is None:
            first = next(iter(inputs.values()), None)
            rows = first.shape[0] if first is not None and first.ndim else 1
        start = _perf_counter()
        try:
            outputs = model.run(inputs)  # type: ignore[misc]
        except BaseException:
            elapsed = _perf_counter() - start
            inflight.pop()
            self._account(model, inputs, None, elapsed, rows)
            raise
        elapsed = _perf_counter() - start
        inflight.pop()
        (self._stats.get(model.version) or self.stats(model.version)).record_served(elapsed, rows, outputs)
        for observer in self.observers:
            observer(model.version, inputs, outputs, elapsed, True)
        left = self._until_sample - 1  # a countdown, not a lock: a sample taken twice or late does no harm
        if left:
            self._until_sample = left
        else:
            sampler = self.sampler
            self._until_sample = max(1, sampler(model.version, inputs, outputs, elapsed)) if sampler else 1 << 20
        return model, outputs

    def _account(self, model: LoadedModel, inputs: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray] | None,
                 elapsed: float, rows: int) -> None:
        self.stats(model.version).record(elapsed, False, None, rows)
        for observer in self.observers:
            observer(model.version, inputs, outputs, elapsed, False)

    @property
    def sink(self) -> LatencySink | None:
        """Where every version's latencies also go (the telemetry's aggregator), or None."""
        return self._sink

    @sink.setter
    def sink(self, sink: LatencySink | None) -> None:
        with self._lock:
            self._sink = sink
            for stats in self._stats.values():
                stats.sink = sink

    def flush(self) -> None:
        """Hand every version's latencies not yet handed on to :attr:`sink` (before a telemetry report)."""
        with self._lock:
            stats = list(self._stats.values())
        for s in stats:
            s.flush()

    def stats(self, version: str) -> ServingStats:
        """The live stats of ``version`` (created empty on first use)."""
        with self._lock:
            stats = self._stats.get(version)
            if stats is None:
                stats = self._stats[version] = ServingStats(sink=self._sink)
            return stats

    def reset_stats(self, version: str) -> None:
        """Start ``version``'s stats afresh (at the start of its probation); what it had goes to the sink."""
        with self._lock:
            old, self._stats[version] = self._stats.get(version), ServingStats(sink=self._sink)
        if old is not None:
            old.flush()

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
        model.retired = True  # a request taking it from now on takes the active model instead
        deadline = time.monotonic() + timeout_s
        while model.inflight and time.monotonic() < deadline:
            time.sleep(0.001)
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
