"""Model signals of a rollout from the telemetry rollups: each device's p99 ratio, error rate, drift score and
output shift.

The rollout controller judges a new version not only by what the agents decide (their rollback reasons) but
by what they report while they run it. For every device of a rollout that has been told to update, this
module reads the device's minute rollups (``telemetry_device_minute``, written by the ingest workers with the rows,
:mod:`~edgeml.fleet.telemetry.store`) and computes:

* ``p99_ratio``: the median over minutes of the device's p99 on the new version, over the same median on the
  version it had before (``previous``), both only from windows that served requests (a minute's windows are
  averaged first). A device whose previous version reported no latency has no ratio (nothing to compare with).
* ``error_rate``: errors over requests, summed over its windows on the new version.
* ``drift``: the drift score of its latest window on the new version that carried one.
* ``output_shift``: likewise, the output-shift score (the agents' ``output_drift``: how far the model's outputs
  moved from the bundle's reference statistics; any model type) of its latest window that carried one.

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
import json
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from edgeml.fleet.rollouts.rules import DeviceSignals
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import as_utc, utcnow
from edgeml.fleet.telemetry.figures import floor_time
from edgeml.fleet.telemetry.writers import bind

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from edgeml.fleet.store.db import Database

__all__ = ["CHUNK", "LAG_S", "MAX_MINUTES", "Judged", "RolloutSignals", "SignalWatcher", "telemetry_signals"]

_log = logging.getLogger(__name__)

#: Device ids per query of the devices' minutes.
CHUNK = 2000
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


# A minute rollup row as the driver gives it (times in the driver's form: comparable among themselves):
# (device_id, bucket, version, requests, errors, sp99_sum, sp99_n, drift_last, drift_at, shift_last, shift_at)
_Row = tuple[Any, ...]
_COLUMNS = "device_id, bucket, version, requests, errors, sp99_sum, sp99_n, drift_last, drift_at, shift_last, shift_at"
_NONE = DeviceSignals()  # a device without signals (left out of the answer)


@dataclass
class _Track:
    """One device's folded minutes (what its signals are made of), and its minutes not final yet."""

    previous: str | None
    since: Any  # the minute it was notified in, in the driver's form: new-version minutes from here count
    key: tuple[str | None, dt.datetime]  # (previous, notified_at) it was made for
    new_p99: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_MINUTES))
    old_p99: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_MINUTES))
    requests: float = 0.0
    errors: float = 0.0
    drift: tuple[Any, float] | None = None
    shift: tuple[Any, float] | None = None
    open_rows: list[_Row] = field(default_factory=list)  # minutes at or after the reader's folded_until
    windows: int | None = None  # its count of windows when open_rows were read (None: read them)
    signals: DeviceSignals | None = None  # worked out from the above (None: to do)

    def fold(self, version: str, row: _Row) -> None:
        """Count one minute rollup row of the device."""
        _, bucket, row_version, requests, errors, sp99_sum, sp99_n, drift_last, drift_at, shift_last, shift_at = row
        p99 = sp99_sum / sp99_n if sp99_n else None
        if row_version == version and bucket >= self.since:
            self.requests += requests
            self.errors += errors
            if p99 is not None:
                self.new_p99.append(p99)
            if drift_at is not None and drift_last is not None and (self.drift is None or drift_at >= self.drift[0]):
                self.drift = (drift_at, float(drift_last))
            if shift_at is not None and shift_last is not None and (self.shift is None or shift_at >= self.shift[0]):
                self.shift = (shift_at, float(shift_last))
        elif self.previous is not None and row_version == self.previous and p99 is not None:
            self.old_p99.append(p99)

    def work_out(self, version: str) -> DeviceSignals:
        """The signals: the folded minutes with the open ones counted too."""
        if self.signals is None:
            copy = _Track(self.previous, self.since, self.key, deque(self.new_p99, MAX_MINUTES),
                          deque(self.old_p99, MAX_MINUTES), self.requests, self.errors, self.drift, self.shift)
            for row in self.open_rows:
                copy.fold(version, row)
            signals = DeviceSignals(p99_ratio=_median_ratio(copy.new_p99, copy.old_p99),
                                    error_rate=copy.errors / copy.requests if copy.requests else None,
                                    drift=copy.drift[1] if copy.drift else None,
                                    output_shift=copy.shift[1] if copy.shift else None)
            self.signals = _NONE if signals == _NONE else signals
        return self.signals


class RolloutSignals:
    """The signals of one rollout's devices, read incrementally from the minute rollups (module docstring).

    Each read: every judged device's count of windows (``telemetry_devices``, moved by the same transactions as its
    minute rollups: one short row per device); the minutes not final yet of the devices whose count moved; and,
    when minutes closed, those folded from what was read before. A device judged for the first time has its
    history since the baseline read once.

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
        self._bound = bind(schema.telemetry_device_minute.c.bucket, db.engine.dialect)
        self._pg = db.engine.dialect.name == "postgresql"
        self.since = floor_time(as_utc(started_at) - dt.timedelta(seconds=baseline_s), 60)
        self.folded_until: dt.datetime | None = None  # every tracked device's minutes before this are folded
        self._tracks: dict[str, _Track] = {}
        self._answer: dict[str, DeviceSignals] = {}  # the devices with signals -> them

    def read(self, devices: Iterable[Judged], now: dt.datetime | None = None) -> dict[str, DeviceSignals]:
        """The signals of ``devices`` (those without any are left out).

        Raises:
            RegistryError: The database failed.
        """
        judged = {d.device_id: d for d in devices}
        closed = max(self.since, floor_time((now or utcnow()) - dt.timedelta(seconds=self.lag_s), 60))
        folded = self.folded_until or closed
        with self.db.transaction() as conn:
            tracks = self._tracks
            fresh = [d for d in judged.values() if d.device_id not in tracks or
                     tracks[d.device_id].key != (d.previous, d.notified_at)]
            for d in fresh:
                self._answer.pop(d.device_id, None)
                tracks[d.device_id] = _Track(d.previous, self._bound(floor_time(as_utc(d.notified_at), 60)),
                                             (d.previous, d.notified_at))
            for ids in _chunks([d.device_id for d in fresh]):  # their history, read once
                for row in self._rows(conn, ids, self.since, folded):
                    self._tracks[row[0]].fold(self.version, row)
            counts = self._moved(conn, {i: tracks[i].windows for i in judged})
            for ids in _chunks(list(counts)):  # the minutes not final yet, of the devices that reported since
                rows: dict[str, list[_Row]] = {i: [] for i in ids}
                for row in self._rows(conn, ids, folded, None):
                    rows[row[0]].append(row)
                for i in ids:
                    track = tracks[i]
                    track.open_rows, track.windows, track.signals = rows[i], counts[i], None
                    self._answer.pop(i, None)
        if closed > folded:
            self._fold_until(self._bound(closed))
        self.folded_until = closed
        for device_id, track in self._tracks.items():
            if track.signals is None:
                signals = track.work_out(self.version)
                if signals is not _NONE:
                    self._answer[device_id] = signals
        if judged.keys() == self._tracks.keys():
            return dict(self._answer)
        return {i: self._answer[i] for i in judged if i in self._answer}

    def _moved(self, conn: Connection, known: dict[str, int | None]) -> dict[str, int]:
        """The devices whose count of windows is not ``known`` (None: not read yet) -> their count: the database
        compares, so that only those rows come back."""
        if self._pg:
            return dict(conn.exec_driver_sql(
                "SELECT t.device_id, t.windows FROM unnest(%s::text[], %s::bigint[]) AS k(d, w) JOIN "
                "telemetry_devices t ON t.device_id = k.d WHERE t.windows IS DISTINCT FROM k.w",
                (_pg_array(known), "{" + ",".join("NULL" if w is None else str(w) for w in known.values()) + "}")
            ).all())
        return dict(conn.exec_driver_sql(
            "SELECT t.device_id, t.windows FROM json_each(?) AS k JOIN telemetry_devices t ON t.device_id = k.key "
            "WHERE t.windows IS NOT k.value", (json.dumps(known),)).all())

    def _fold_until(self, closed: Any) -> None:
        """Fold every tracked device's open minutes before ``closed`` (they are final now)."""
        for device_id, track in self._tracks.items():
            final = [r for r in track.open_rows if r[1] < closed]
            if final:
                for row in final:
                    track.fold(self.version, row)
                track.open_rows = [r for r in track.open_rows if r[1] >= closed]
                track.signals = None
                self._answer.pop(device_id, None)

    def _rows(self, conn: Connection, ids: list[str], start: dt.datetime, end: dt.datetime | None) -> list[_Row]:
        """Minute rows of ``ids`` in ``[start, end)`` of the new version and of their previous ones."""
        previous = (self._tracks[i].previous for i in ids)
        versions = sorted({self.version, *(p for p in previous if p is not None)})
        mark = "%s" if self._pg else "?"
        where = f"bucket >= {mark}" + (f" AND bucket < {mark}" if end is not None else "")
        times = [self._bound(start)] + ([self._bound(end)] if end is not None else [])
        rows = self._select(conn, f"SELECT {_COLUMNS} FROM telemetry_device_minute WHERE {where} AND version "
                                  f"IN ({', '.join([mark] * len(versions))}) AND device_id ", ids, [*times, *versions])
        return sorted(rows, key=lambda r: r[1])

    def _select(self, conn: Connection, sql: str, ids: list[str], params: list[Any] | None = None) -> list[_Row]:
        """``sql`` ending in ``device_id `` completed with ``IN ids``, through the driver (no type conversion)."""
        if self._pg:
            rows = conn.exec_driver_sql(sql + "= ANY(%s::text[])", (*(params or ()), _pg_array(ids))).all()
        else:
            rows = conn.exec_driver_sql(sql + "IN (SELECT value FROM json_each(?))",
                                        (*(params or ()), json.dumps(ids))).all()
        return cast("list[_Row]", rows)  # rows as the driver gives them: no per-row conversion


def _pg_array(ids: Iterable[str]) -> str:
    """A ``text[]`` literal of ``ids``: one text parameter (psycopg dumps a list at ~4 µs an element)."""
    return "{" + ",".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in ids) + "}"


def _chunks(ids: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(ids), CHUNK):
        yield ids[start:start + CHUNK]


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

    def close(self, timeout: float = 5.0) -> None:
        """Forget every rollout and end the thread (its read in progress, if any, finishes first)."""
        with self._lock:
            self._watched.clear()
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

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
