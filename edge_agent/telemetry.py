"""The agent's telemetry: per-request accounting, periodic aggregates, and their delivery to the fleet.

* :class:`LatencyHistogram`: fixed log-spaced buckets from 1 us to 100 s, 100 per decade. Recording is
  O(1); a percentile is within :data:`RELATIVE_ERROR` (1.16 %) of ``numpy.percentile`` (linear
  interpolation) of the recorded values between 1 us and 100 s (see :meth:`LatencyHistogram.percentile`).
* :class:`Aggregator`: what the serving path records requests into, one at a time (:meth:`Aggregator.record`:
  one store into a preallocated buffer, a few integer additions, one short uncontended lock; the buffer is
  binned with numpy every 4096 requests) or in batches (:meth:`Aggregator.record_batch`: the agent's model host
  hands on the latencies and batch sizes its health numbers keep, so serving pays nothing per request for
  telemetry), and what the telemetry loop reads once per interval
  (:meth:`Aggregator.snapshot_and_reset`): requests, errors, latency percentiles, throughput, process CPU
  and RSS, temperature, plus the caller's fields (model, version, slot, drift).
* :class:`TelemetrySender`: appends each snapshot to the durable :class:`~.outbox.Outbox` and publishes
  pending entries in sequence order at QoS 1 on the device's ``telemetry`` topic, a bounded number in
  flight. The fleet's ``telemetry-ack`` (the highest contiguous sequence number it stored) trims the
  outbox; a reconnect, or ``resend_after_s`` without progress, resends everything unacknowledged in order
  (go-back-N: the fleet drops duplicates by ``(device, seq)``).

Clocks are injected (``clock``: monotonic seconds for windows and resend timers; ``wall``: Unix seconds for
``sent_at``) so that tests can run an hour of telemetry in a few seconds.
"""

from __future__ import annotations

import array
import glob
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeml.protocol import Telemetry, device_topic

from .outbox import Outbox

__all__ = [
    "BINS_PER_DECADE",
    "MAX_LATENCY_S",
    "MIN_LATENCY_S",
    "RELATIVE_ERROR",
    "Aggregator",
    "LatencyHistogram",
    "Publisher",
    "SystemProbe",
    "TelemetrySender",
]

MIN_LATENCY_S = 1e-6  # lowest bucket edge; smaller values land in an underflow bucket
MAX_LATENCY_S = 100.0  # highest bucket edge; larger values land in an overflow bucket
BINS_PER_DECADE = 100
_GROWTH = 10.0 ** (1.0 / BINS_PER_DECADE)  # ratio of a bucket's upper to its lower edge
#: Largest relative error of a reported value inside [MIN_LATENCY_S, MAX_LATENCY_S]: (g - 1) / (g + 1).
RELATIVE_ERROR = (_GROWTH - 1.0) / (_GROWTH + 1.0)
_LOG_BUCKETS = round(math.log10(MAX_LATENCY_S / MIN_LATENCY_S) * BINS_PER_DECADE)
_NBUCKETS = _LOG_BUCKETS + 2  # [underflow, log buckets..., overflow]
_SCALE = 1.0 / math.log(_GROWTH)
_OFFSET = 1.0 - math.log(MIN_LATENCY_S) * _SCALE  # +1: bucket 0 is the underflow
_log = math.log


def _bucket(latency_s: float) -> int:
    if latency_s < MIN_LATENCY_S:
        return 0
    i = int(_log(latency_s) * _SCALE + _OFFSET)
    return i if i <= _LOG_BUCKETS else _LOG_BUCKETS + 1


def _buckets(latencies_s: np.ndarray) -> np.ndarray:
    """:func:`_bucket` of every value (vectorized)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.floor(np.log(np.maximum(latencies_s, MIN_LATENCY_S)) * _SCALE + _OFFSET)
    raw = np.where((latencies_s < MIN_LATENCY_S) | np.isnan(raw), 0, raw)  # NaN: underflow, not a crash
    return np.clip(raw, 0, _LOG_BUCKETS + 1).astype(np.intp)


def _representative(i: np.ndarray) -> np.ndarray:
    """The values reported for buckets ``i``: each the one with the least worst-case relative error."""
    lo = MIN_LATENCY_S * _GROWTH ** (i - 1.0)
    rep = 2.0 * _GROWTH / (1.0 + _GROWTH) * lo  # 2 lo hi / (lo + hi), hi = lo * g
    return np.where(i == 0, MIN_LATENCY_S / 2, np.where(i > _LOG_BUCKETS, MAX_LATENCY_S, rep))


class LatencyHistogram:
    """Counts of latencies in fixed log-spaced buckets (not thread-safe; :class:`Aggregator` locks it).

    Error bound: a recorded value ``x`` in ``[MIN_LATENCY_S, MAX_LATENCY_S]`` is represented by a value
    within ``RELATIVE_ERROR * x`` of it; :meth:`percentile` interpolates linearly between the represented
    values of the two ranks ``numpy.percentile`` interpolates between, so it is within ``RELATIVE_ERROR``
    (relative) of ``numpy.percentile(values, q)``. Values below ``MIN_LATENCY_S`` are reported as
    ``MIN_LATENCY_S / 2`` (absolute error < 0.5 us); values above ``MAX_LATENCY_S`` as ``MAX_LATENCY_S``.
    """

    __slots__ = ("counts", "total_s")

    def __init__(self) -> None:
        self.counts = np.zeros(_NBUCKETS, np.int64)
        self.total_s = 0.0

    @property
    def count(self) -> int:
        """How many values were recorded."""
        return int(self.counts.sum())

    def record(self, latency_s: float, n: int = 1) -> None:
        """Count ``n`` requests of ``latency_s`` seconds each (O(1))."""
        self.counts[_bucket(latency_s)] += n
        self.total_s += latency_s * n

    def record_many(self, latencies_s: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Count one request per value of ``latencies_s`` (seconds), or ``weights[i]`` requests of each."""
        values = np.asarray(latencies_s, np.float64)
        if weights is None:
            self.counts += np.bincount(_buckets(values), minlength=_NBUCKETS)
            self.total_s += float(values.sum())
            return
        w = np.asarray(weights, np.int64)
        self.counts += np.bincount(_buckets(values), weights=w, minlength=_NBUCKETS).astype(np.int64)
        self.total_s += float(values @ w)

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s counts to this histogram."""
        self.counts += other.counts
        self.total_s += other.total_s

    def reset(self) -> None:
        """Forget every recorded value."""
        self.counts[:] = 0
        self.total_s = 0.0

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0..100) in seconds, like ``numpy.percentile``; None when empty."""
        return self.percentiles([q])[0]

    def percentiles(self, qs: Iterable[float]) -> list[float | None]:
        """Several percentiles (0..100) in seconds, with one pass over the buckets.

        Raises:
            ValueError: A percentile outside 0..100.
        """
        q = np.asarray(list(qs), np.float64)
        if np.any((q < 0) | (q > 100)) or not np.all(np.isfinite(q)):
            raise ValueError(f"percentiles must be within 0..100, got {q.tolist()}")
        cumulative = np.cumsum(self.counts)
        n = int(cumulative[-1])
        if n == 0:
            return [None] * len(q)
        h = (n - 1) * q / 100.0
        lo = np.floor(h)
        below = _representative(np.searchsorted(cumulative, lo, side="right").astype(np.float64))
        above = _representative(np.searchsorted(cumulative, np.minimum(lo + 1, n - 1), side="right").astype(np.float64))
        return [float(v) for v in below + (h - lo) * (above - below)]

    @property
    def mean_s(self) -> float | None:
        """The exact mean of the recorded values in seconds; None when empty."""
        n = self.count
        return self.total_s / n if n else None


class SystemProbe:
    """Reads the process's CPU use and memory and the board's temperature, where the system offers them.

    Args:
        thermal_root: Folder holding ``thermal_zone*/temp`` (millidegrees Celsius), as in Linux sysfs.
        proc_self: The process's ``/proc`` folder (``statm`` gives the resident set).
        clock: Monotonic seconds for CPU percentages (real time even when the aggregator's clock is simulated).
    """

    def __init__(self, thermal_root: str | Path = "/sys/class/thermal", proc_self: str | Path = "/proc/self",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.thermal_root = Path(thermal_root)
        self.proc_self = Path(proc_self)
        self._clock = clock
        self._last = (clock(), self._cpu_seconds())

    @staticmethod
    def _cpu_seconds() -> float:
        t = os.times()
        return t.user + t.system

    def cpu_percent(self) -> float | None:
        """Process CPU use since the previous call (or since creation), in % of one core; None if no time passed."""
        now, cpu = self._clock(), self._cpu_seconds()
        (then, cpu_then), self._last = self._last, (now, cpu)
        return round(100.0 * (cpu - cpu_then) / (now - then), 2) if now > then else None

    def rss_mib(self) -> float | None:
        """The resident set size in MiB, from ``statm``; None where it is not readable."""
        try:
            pages = int((self.proc_self / "statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 2)

    def temperature_c(self) -> float | None:
        """The hottest thermal zone in degrees Celsius; None where there is none."""
        readings = []
        for path in glob.glob(str(self.thermal_root / "thermal_zone*" / "temp")):
            try:
                readings.append(int(Path(path).read_text().strip()) / 1000.0)
            except (OSError, ValueError):
                continue
        return max(readings) if readings else None


class Aggregator:
    """Per-request counters of the serving path, read and reset once per telemetry interval. Thread-safe.

    :meth:`record` stores the latency in a preallocated buffer (no allocation) and bins the buffer with
    numpy once it is full (every ``buffer`` requests), so a request costs a store, a few integer additions
    and one short uncontended lock.

    Args:
        clock: Monotonic seconds; the window runs from the previous snapshot (or creation) to ``now``.
        probe: Where CPU, RSS and temperature come from (None: not reported).
        buffer: Latencies kept before they are binned.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, probe: SystemProbe | None = None,
                 buffer: int = 4096) -> None:
        self._clock = clock
        self._probe = probe
        self._lock = threading.Lock()
        self._hist = LatencyHistogram()
        self._buf = array.array("d", bytes(8 * buffer))
        self._last = buffer - 1
        self._fill = 0
        self._requests = 0
        self._errors = 0
        self._window_start = clock()

    def record(self, latency_s: float, ok: bool = True, n: int = 1) -> None:
        """Account ``n`` requests that took ``latency_s`` seconds each and succeeded (``ok``) or failed.

        Failed requests count in the latency percentiles too: a client waited for them.
        """
        lock = self._lock
        lock.acquire()
        try:
            self._requests += n
            if not ok:
                self._errors += n
            if n != 1:
                self._hist.record(latency_s, n)
                return
            i = self._fill
            self._buf[i] = latency_s
            self._fill = i + 1
            if i == self._last:
                self._flush()
        finally:
            lock.release()

    def record_batch(self, latencies_s: np.ndarray, rows: np.ndarray) -> None:
        """Account successful requests in one call: request ``i`` had ``rows[i]`` rows and took
        ``latencies_s[i]`` seconds (what the model host hands on, see
        :class:`~edgeml.edge_agent.serving.ServingStats`)."""
        with self._lock:
            self._requests += int(rows.sum())
            self._hist.record_many(latencies_s, rows)

    def _flush(self) -> None:
        """Bin the buffered latencies (lock held)."""
        self._hist.record_many(np.frombuffer(self._buf, np.float64, self._fill))
        self._fill = 0

    def snapshot_and_reset(self, now: float | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The metrics of the window that ends ``now`` (default: the clock), and start a new window.

        Keys: ``window_s``, ``requests``, ``errors``, ``error_rate``, ``throughput_rps``, ``latency_p50_ms``,
        ``latency_p95_ms``, ``latency_p99_ms``, ``latency_mean_ms`` (None without requests), ``cpu_percent``,
        ``rss_mib``, ``temperature_c`` (None where unavailable), then ``extra`` (model, version, slot,
        drift metrics...), which may override any of them.

        Args:
            now: The end of the window in the clock's seconds.
            extra: Fields added as they are (JSON values).
        """
        now = self._clock() if now is None else now
        fresh = LatencyHistogram()
        with self._lock:
            self._flush()
            hist, requests, errors, start = self._hist, self._requests, self._errors, self._window_start
            self._hist, self._requests, self._errors, self._window_start = fresh, 0, 0, now
        window = now - start
        p50, p95, p99 = hist.percentiles((50.0, 95.0, 99.0))
        metrics: dict[str, Any] = {
            "window_s": round(window, 3),
            "requests": requests,
            "errors": errors,
            "error_rate": errors / requests if requests else 0.0,
            "throughput_rps": round(requests / window, 3) if window > 0 else None,
            "latency_p50_ms": _ms(p50), "latency_p95_ms": _ms(p95), "latency_p99_ms": _ms(p99),
            "latency_mean_ms": _ms(hist.mean_s),
        }
        probe = self._probe
        metrics["cpu_percent"] = probe.cpu_percent() if probe else None
        metrics["rss_mib"] = probe.rss_mib() if probe else None
        metrics["temperature_c"] = probe.temperature_c() if probe else None
        metrics.update(extra or {})
        return metrics


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or not math.isfinite(seconds) else round(seconds * 1000.0, 4)


class Publisher(Protocol):
    """What the sender needs of an MQTT client (``paho.mqtt.client.Client`` has both)."""

    def publish(self, topic: str, payload: bytes, qos: int) -> Any:
        """Queue a message; the result's ``rc`` (when present) is 0 on success."""

    def is_connected(self) -> bool:
        """Whether the client is connected to the broker now."""


class TelemetrySender:
    """Delivers a device's outbox to the fleet over MQTT, in order, until the fleet acknowledges storage.

    Wire it up: pass the paho client; make the command dispatcher call :meth:`on_ack` with each
    ``telemetry-ack``'s ``seq``; optionally register :meth:`on_connect` / :meth:`on_disconnect` as (or call
    them from) paho's callbacks (without them a reconnect is noticed at the next :meth:`pump`); call
    :meth:`submit` once per telemetry interval and :meth:`pump` now and then (each ``submit`` pumps).

    Args:
        client: The MQTT client.
        device_id: This device (its ``telemetry`` topic is where entries go).
        outbox: The durable outbox of this device.
        clock: Monotonic seconds, for the resend timer.
        wall: Unix seconds, for ``sent_at``.
        resend_after_s: Resend everything unacknowledged when the oldest entry in flight has waited this long.
        max_in_flight: Most entries published and not yet acknowledged.
        qos: MQTT QoS of the publications.
    """

    def __init__(self, client: Publisher, device_id: str, outbox: Outbox, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 resend_after_s: float = 30.0, max_in_flight: int = 32, qos: int = 1) -> None:
        if resend_after_s <= 0 or max_in_flight < 1:
            raise ValueError("resend_after_s must be > 0 and max_in_flight >= 1")
        self._client, self._outbox = client, outbox
        self.topic = device_topic(device_id, "telemetry")
        self._clock, self._wall = clock, wall
        self.resend_after_s, self.max_in_flight, self.qos = resend_after_s, max_in_flight, qos
        self._lock = threading.RLock()
        self._in_flight: deque[tuple[int, float]] = deque()  # (seq, when published), in seq order
        self._acked = outbox.acked
        self._next = self._acked + 1  # the next seq to publish
        self._online = False
        self.published = 0  # publications, resends included
        self.resends = 0  # go-back-N restarts (reconnects and timeouts)

    @property
    def in_flight(self) -> int:
        """How many entries are published and not yet acknowledged."""
        return len(self._in_flight)

    def submit(self, metrics: Mapping[str, Any], sent_at: float | None = None) -> Telemetry:
        """Append ``metrics`` to the outbox (durably, with the next seq) and publish what may be published.

        Raises:
            StorageError: The outbox cannot be written.
            ProtocolError: ``metrics`` cannot be a telemetry message.
        """
        message = self._outbox.append(metrics, self._wall() if sent_at is None else sent_at)
        self.pump()
        return message

    def pump(self) -> int:
        """Publish pending entries up to the in-flight bound; resend after a reconnect or a timeout.

        Returns how many messages were published. Does nothing while the client is disconnected.

        Raises:
            StorageError: The outbox cannot be read.
        """
        with self._lock:
            if not self._client.is_connected():
                self._online = False
                return 0
            now = self._clock()
            if not self._online or (self._in_flight and now - self._in_flight[0][1] >= self.resend_after_s):
                self._online = True
                self._go_back()
            room = self.max_in_flight - len(self._in_flight)
            sent = 0
            for message in self._outbox.pending(limit=room, after=self._next - 1) if room > 0 else ():
                info = self._client.publish(self.topic, message.to_bytes(), self.qos)
                if getattr(info, "rc", 0) != 0:  # lost the connection meanwhile: a reconnect resends
                    break
                self._in_flight.append((message.seq, now))
                self._next = message.seq + 1
                sent += 1
            self.published += sent
            return sent

    def on_ack(self, seq: int) -> None:
        """The fleet has stored every entry up to ``seq``: trim the outbox and publish more.

        Raises:
            StorageError: The outbox cannot be written.
        """
        with self._lock:
            if seq <= self._acked:
                return
            self._outbox.ack(seq)
            self._acked = seq
            while self._in_flight and self._in_flight[0][0] <= seq:
                self._in_flight.popleft()
            self._next = max(self._next, seq + 1)
        self.pump()

    def on_connect(self, *args: Any) -> None:
        """The client (re)connected: resend everything unacknowledged, in order.

        Usable as paho's ``on_connect`` (a failed connection's reason code is ignored) or called bare.
        """
        if len(args) >= 4 and getattr(args[3], "is_failure", False):
            return
        with self._lock:
            self._online = False  # pump() goes back to the first unacknowledged entry
        self.pump()

    def on_disconnect(self, *args: Any) -> None:
        """The client lost its connection (usable as paho's ``on_disconnect``)."""
        with self._lock:
            self._online = False

    def _go_back(self) -> None:
        if self._in_flight:
            self.resends += 1
        self._in_flight.clear()
        self._next = self._acked + 1
