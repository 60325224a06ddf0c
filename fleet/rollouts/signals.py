"""Model signals of a rollout from the telemetry rollups: each device's p99 ratio, error rate and drift score.

The rollout controller judges a new version not only by what the agents decide (their rollback reasons) but
by what they report while they run it. For every device of a rollout that has been told to update, this
module reads the device's minute rollups (``telemetry_device_minute``, written by the ingest workers with the rows,
:mod:`~edgeml.fleet.telemetry.store`) and computes:

* ``p99_ratio``: the median over minutes of the device's p99 on the new version, over the same median on the
  version it had before (``previous``), both only from windows that served requests (a minute's windows are
  averaged first). A device whose previous version reported no latency has no ratio (nothing to compare with).
* ``error_rate``: errors over requests, summed over its windows on the new version.
* ``drift``: the drift score of its latest window on the new version that carried one.

Only minutes from the one the device was notified in count for the new version, and only minutes of the previous
version from ``baseline_s`` before the rollout started on count as its baseline, so an old outlier does not decide.
Medians keep each device's latest :data:`MAX_MINUTES` minutes.

Cost: :class:`RolloutSignals` reads incrementally. A device's history since the baseline is read once, when it is
first judged; after that, each read folds the minutes that closed since the last (older than :data:`LAG_S`, so that
no batch can still add to them) and re-reads only the newer ones: a few rows per device, whatever the rollout's age
or the rate devices report at. :func:`telemetry_signals` is one cold read. The controller reads through a
:class:`SignalWatcher`, whose thread does the reading: a tick takes the newest signals it has and never waits.
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeml.fleet.rollouts.rules import DeviceSignals
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import as_utc, utcnow
from edgeml.fleet.store.schema import sa
from edgeml.fleet.telemetry.figures import floor_time

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = ["CHUNK", "LAG_S", "MAX_MINUTES", "Judged", "RolloutSignals", "SignalWatcher", "telemetry_signals"]

_log = logging.getLogger(__name__)

#: Device ids per query of a device's history (SQLite allows a few thousand bound parameters).
CHUNK = 500
#: Minutes that ended this many seconds ago are final: folded once, never read again.
LAG_S = 90.0
#: Minutes of p99 kept per device and version for the medians (4 hours).
MAX_MINUTES = 240


@dataclass(frozen=True)
class Judged:
    """One device to judge: its id, the version it had, and when it was told to update (timezone-aware)."""

    device_id: str
    previous: str | None
    notified_at: dt.datetime


def _median_ratio(new: Iterable[float], old: Iterable[float]) -> float | None:
    new, old = list(new), list(old)
    if not new or not old or statistics.median(old) <= 0:
        return None
    return statistics.median(new) / statistics.median(old)


@dataclass
class _Track:
    """One device's folded minutes: what its signals are made of."""

    previous: str | None
    since: dt.datetime  # the minute it was notified in: new-version minutes from here count
    new_p99: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_MINUTES))
    old_p99: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_MINUTES))
    requests: float = 0.0
    errors: float = 0.0
    drift: tuple[dt.datetime, float] | None = None

    def fold(self, version: str, row: Any) -> None:
        """Count one minute rollup row of the device."""
        bucket = as_utc(row.bucket)
        p99 = row.sp99_sum / row.sp99_n if row.sp99_n else None
        if row.version == version and bucket >= self.since:
            self.requests += row.requests
            self.errors += row.errors
            if p99 is not None:
                self.new_p99.append(p99)
            at = as_utc(row.drift_at)
            if at is not None and row.drift_last is not None and (self.drift is None or at >= self.drift[0]):
                self.drift = (at, float(row.drift_last))
        elif self.previous is not None and row.version == self.previous and p99 is not None:
            self.old_p99.append(p99)

    def with_rows(self, version: str, rows: Iterable[Any]) -> _Track:
        """A copy with ``rows`` (minutes not final yet) counted too."""
        copy = _Track(self.previous, self.since, deque(self.new_p99, MAX_MINUTES), deque(self.old_p99, MAX_MINUTES),
                      self.requests, self.errors, self.drift)
        for row in rows:
            copy.fold(version, row)
        return copy

    def signals(self) -> DeviceSignals:
        return DeviceSignals(p99_ratio=_median_ratio(self.new_p99, self.old_p99),
                             error_rate=self.errors / self.requests if self.requests else None,
                             drift=self.drift[1] if self.drift else None)


class RolloutSignals:
    """The signals of one rollout's devices, read incrementally from the minute rollups (module docstring).

    Args:
        db: The fleet database.
        version: The rollout's new version.
        started_at: When the rollout started (the baseline counts from ``baseline_s`` before).
        baseline_s: How far before ``started_at`` the previous version's minutes count.
        lag_s: Minutes that ended this long ago are final.
    """

    def __init__(self, db: Database, version: str, started_at: dt.datetime, *, baseline_s: float = 3600.0,
                 lag_s: float = LAG_S) -> None:
        self.db, self.version, self.lag_s = db, version, lag_s
        self.since = floor_time(as_utc(started_at) - dt.timedelta(seconds=baseline_s), 60)
        self.folded_until: dt.datetime | None = None  # every tracked device's minutes before this are folded
        self._tracks: dict[str, _Track] = {}

    def read(self, devices: Iterable[Judged], now: dt.datetime | None = None) -> dict[str, DeviceSignals]:
        """The signals of ``devices`` (those without any are left out).

        Raises:
            RegistryError: The database failed.
        """
        judged = {d.device_id: d for d in devices}
        closed = max(self.since, floor_time((now or utcnow()) - dt.timedelta(seconds=self.lag_s), 60))
        with self.db.transaction() as conn:
            fresh = [d for d in judged.values() if self._changed(d)]
            for d in fresh:
                self._tracks[d.device_id] = _Track(d.previous, floor_time(as_utc(d.notified_at), 60))
            upto = self.folded_until or closed
            for start in range(0, len(fresh), CHUNK):  # their history, read once
                ids = [d.device_id for d in fresh[start:start + CHUNK]]
                self._fold(self._rows(conn, self.since, upto, ids=ids))
            if upto < closed:  # minutes that closed since the last read, of every device tracked
                self._fold(self._rows(conn, upto, closed))
            self.folded_until = closed
            live: dict[str, list[Any]] = {}
            for row in self._rows(conn, closed, None):
                if row.device_id in judged:
                    live.setdefault(row.device_id, []).append(row)
        out = {}
        for device_id in judged:
            signals = self._tracks[device_id].with_rows(self.version, live.get(device_id, ())).signals()
            if signals != DeviceSignals():
                out[device_id] = signals
        return out

    def _changed(self, d: Judged) -> bool:
        track = self._tracks.get(d.device_id)
        return track is None or track.previous != d.previous or track.since != floor_time(as_utc(d.notified_at), 60)

    def _fold(self, rows: Iterable[Any]) -> None:
        for row in rows:
            track = self._tracks.get(row.device_id)
            if track is not None:
                track.fold(self.version, row)

    def _rows(self, conn: Any, start: dt.datetime, end: dt.datetime | None, ids: list[str] | None = None) -> list[Any]:
        """Minute rows in ``[start, end)`` of the new version and of the devices' previous ones (of ``ids``)."""
        t = schema.telemetry_device_minute
        versions = {self.version, *(x.previous for x in self._tracks.values() if x.previous is not None)}
        where = (t.c.bucket >= start) & t.c.version.in_(sorted(versions))
        if end is not None:
            where &= t.c.bucket < end
        if ids is not None:
            where &= t.c.device_id.in_(ids)
        query = sa.select(t.c.device_id, t.c.bucket, t.c.version, t.c.requests, t.c.errors, t.c.sp99_sum,
                          t.c.sp99_n, t.c.drift_last, t.c.drift_at).where(where).order_by(t.c.bucket)
        return conn.execute(query).all()


def telemetry_signals(db: Database, version: str, devices: Iterable[Judged], started_at: dt.datetime, *,
                      baseline_s: float = 3600.0) -> dict[str, DeviceSignals]:
    """The telemetry signals of each device on ``version`` (devices without any are left out): one cold read.

    Args:
        db: The fleet database (its minute rollups).
        version: The rollout's new version.
        devices: The devices to judge.
        started_at: When the rollout started (the baseline ends there).
        baseline_s: How far before ``started_at`` the previous version's windows count.

    Raises:
        RegistryError: The database failed.
    """
    return RolloutSignals(db, version, started_at, baseline_s=baseline_s).read(devices)


@dataclass
class _Watched:
    reader: RolloutSignals
    judged: list[Judged]
    asked_at: float
    read_at: float = float("-inf")
    result: dict[str, DeviceSignals] = field(default_factory=dict)


class SignalWatcher:
    """Reads rollouts' signals in a thread of its own, so that whoever asks (the controller's tick) never waits.

    :meth:`signals` answers at once with the newest signals read for the rollout (none before the first read) and
    asks for a new read when those are ``every_s`` old. The thread starts on the first question and ends when no
    rollout was asked about for ``idle_s``; a rollout not asked about for that long is forgotten.

    Args:
        db: The fleet database.
        every_s: Seconds between reads of one rollout.
        idle_s: Seconds without questions after which a rollout is forgotten (and the thread ends).
    """

    def __init__(self, db: Database, *, every_s: float = 5.0, idle_s: float = 120.0) -> None:
        self.db, self.every_s, self.idle_s = db, every_s, idle_s
        self._watched: dict[str, _Watched] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def signals(self, rollout_id: str, version: str, started_at: dt.datetime,
                judged: list[Judged]) -> dict[str, DeviceSignals]:
        """The newest signals of the rollout's ``judged`` devices (possibly empty), without waiting for a read."""
        now = time.monotonic()
        with self._lock:
            w = self._watched.get(rollout_id)
            if w is None or w.reader.version != version:
                w = self._watched[rollout_id] = _Watched(RolloutSignals(self.db, version, started_at), judged, now)
            w.judged, w.asked_at = judged, now
            result = w.result
            due = now - w.read_at >= self.every_s
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="rollout-signals", daemon=True)
                self._thread.start()
        if due:
            self._wake.set()
        return {d.device_id: result[d.device_id] for d in judged if d.device_id in result}

    def _run(self) -> None:
        while True:
            self._wake.wait(self.every_s)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                for rollout_id in [r for r, w in self._watched.items() if now - w.asked_at > self.idle_s]:
                    del self._watched[rollout_id]
                if not self._watched:
                    self._thread = None
                    return
                due = [(r, w) for r, w in self._watched.items() if now - w.read_at >= self.every_s]
            for rollout_id, w in due:
                try:
                    result = w.reader.read(list(w.judged))
                except Exception:  # the database may be away for a moment: the next round reads again
                    _log.exception("rollout %s: reading the telemetry signals failed", rollout_id)
                    continue
                with self._lock:
                    w.result, w.read_at = result, now
