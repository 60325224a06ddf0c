"""Telemetry maintenance, run by the fleet server itself: hour rollups, retention, and PostgreSQL's partitions.

:meth:`Maintenance.run_once`, every ``RetentionSettings.every_s`` in a thread of ``edgeml fleet serve``:

1. **One process at a time.** It takes the ``maintenance`` lease in ``telemetry_jobs`` in a transaction that
   begins with the lock migrations take (:meth:`~edgeml.fleet.store.db.Database.lock`), renews it while it works,
   and gives it back at the end; a process that dies holding it loses it after ``lease_s``. Every serve process may
   run the thread: one works, the others find the lease taken and wait for the next round.
2. **Partitions (PostgreSQL).** ``telemetry`` is partitioned by day of ``received_at`` (``telemetry_pYYYYMMDD``),
   with a default partition for rows no day covers. The days from today to ``partitions_ahead`` days on are
   created ahead (rows of such a day already in the default partition move into it).
3. **Hour rollups**, as hours close: every hour that ended ``lag_s`` ago or more and is not rolled yet is written
   from its minute rows (:func:`~edgeml.fleet.telemetry.rollups.roll_hour`), with the watermark, in one
   transaction per hour.
4. **Retention.** Raw rows older than ``raw_s``: on PostgreSQL whole days are dropped (``DROP TABLE`` of the
   partition, under a short ``lock_timeout`` so that ingestion never queues behind it for long: a refused lock is
   tried again next round) and the default partition is pruned by rows; on SQLite rows are deleted device by
   device through the ``(device_id, received_at)`` index. Minute rollups older than ``minute_s`` (never one whose
   hour is not rolled yet) and hour rollups older than ``hour_s``. Every delete takes at most ``chunk_rows`` rows
   per transaction, with a pause between, so that ingest workers waiting for the write lock get it.

What retention never touches: ``telemetry_devices`` and ``telemetry_pending``, the books acknowledgements are made
from (:mod:`~edgeml.fleet.telemetry.store`), and the running totals ``/metrics`` counts from. So a device whose old
rows are gone keeps being acknowledged exactly, and its counters never go down. A retention of 0 keeps forever.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from edgeml.errors import ConfigError
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import as_utc, utcnow
from edgeml.fleet.store.schema import TELEMETRY_DEFAULT_PARTITION, sa
from edgeml.fleet.telemetry.figures import floor_time
from edgeml.fleet.telemetry.rollups import HOUR, JOB, roll_hour, rolled_until

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from edgeml.fleet.store.db import Database

__all__ = ["Maintenance", "MaintenanceReport", "RetentionSettings", "parse_duration", "partition_name"]

_log = logging.getLogger(__name__)
_DAY = 86400
_DEVICES_PER_TRANSACTION = 200  # devices looked at per delete transaction of raw rows


@dataclass(frozen=True)
class RetentionSettings:
    """How long telemetry is kept, and how maintenance runs (times in seconds; a retention of 0 keeps forever)."""

    raw_s: float = 7 * _DAY  # raw telemetry rows (on PostgreSQL, dropped by whole days once the day is this old)
    minute_s: float = 30 * _DAY  # minute rollups: the dashboard up to 6 hours back, and the rollout signals
    hour_s: float = 400 * _DAY  # hour rollups: the dashboard's longer windows
    every_s: float = 300.0  # between two runs
    start_s: float = 30.0  # from the server's start to its first run
    lag_s: float = 120.0  # an hour is rolled up once it ended this long ago
    partitions_ahead: int = 3  # PostgreSQL: days of partitions created ahead
    chunk_rows: int = 5000  # rows deleted per transaction
    pause_s: float = 0.02  # between two delete transactions, at least
    max_share: float = 0.25  # of the time retention runs, at most this share in delete transactions (0..1]: the
    # pause after each is at least (1 - max_share) / max_share times what it took, so that ingestion, which waits
    # for SQLite's one writer and shares the server's CPU and GIL, keeps the rest
    lease_s: float = 600.0  # how long a run holds the lease without renewing it

    def __post_init__(self) -> None:
        numbers = {name: getattr(self, name) for name in ("raw_s", "minute_s", "hour_s", "every_s", "start_s",
                                                            "lag_s", "pause_s")}
        bad = [f"{name}={value!r}" for name, value in numbers.items()
               if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e12]
        if not 0 < self.max_share <= 1:
            bad.append(f"max_share={self.max_share!r}")
        if self.every_s <= 0 or self.lease_s <= 0 or self.chunk_rows < 1 or self.partitions_ahead < 0:
            bad.append(f"every_s={self.every_s!r}, lease_s={self.lease_s!r}, chunk_rows={self.chunk_rows!r}, "
                       f"partitions_ahead={self.partitions_ahead!r}")
        if bad:
            raise ConfigError(f"telemetry retention: bad settings {', '.join(bad)}",
                              hint="retentions and intervals are seconds >= 0 (0: keep forever); every_s and "
                                   "lease_s > 0, chunk_rows >= 1")


@dataclass
class MaintenanceReport:
    """What one :meth:`Maintenance.run_once` did (``ran`` False: another process held the lease)."""

    ran: bool = False
    hours_rolled: int = 0
    partitions_created: list[str] = field(default_factory=list)
    partitions_dropped: list[str] = field(default_factory=list)
    raw_deleted: int = 0
    minute_deleted: int = 0
    hour_deleted: int = 0
    seconds: float = 0.0


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": _DAY, "w": 7 * _DAY}


def parse_duration(text: str, what: str) -> float:
    """Seconds from a duration such as ``90s``, ``30m``, ``36h``, ``7d``, ``2w``, or ``0`` (keep forever).

    Args:
        text: The duration.
        what: What it is for, for the message (e.g. ``--retain-raw``).

    Raises:
        ConfigError: Not a duration.
    """
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:]) if value else None
    number = value[:-1] if unit else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 1e12 or (unit is None and seconds != 0):
        raise ConfigError(f"{what}: {text!r} is not a duration",
                          hint="a number with a unit: 90s, 30m, 36h, 7d, 2w; or 0 to keep forever")
    return seconds


def partition_name(day: dt.date) -> str:
    """The name of ``telemetry``'s partition of one UTC day."""
    return f"telemetry_p{day:%Y%m%d}"


class _LostLease(Exception):
    """Another process took the lease (this one held it past ``lease_s``): stop where we are."""


class Maintenance:
    """Telemetry maintenance on one database (see the module docstring).

    Args:
        db: The registry database.
        settings: Retention and timing.
        clock: The present (aware), for tests.
    """

    def __init__(self, db: Database, settings: RetentionSettings | None = None, *,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.db, self.settings, self.clock = db, settings or RetentionSettings(), clock
        self.owner = f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.last: MaintenanceReport | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._leased = False  # inside run_once, holding the lease

    # --- the thread ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run :meth:`run_once` in a thread: ``start_s`` from now, then every ``every_s``."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry-maintenance", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (a run in progress stops after its current transaction)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def _run(self) -> None:
        wait = self.settings.start_s
        while not self._stop.wait(wait):
            wait = self.settings.every_s
            try:
                self.run_once()
            except Exception:  # the database may be away for a moment: the next round tries again
                _log.exception("telemetry maintenance failed; trying again in %.0f s", wait)

    # --- one run ------------------------------------------------------------------------------------------

    def run_once(self) -> MaintenanceReport:
        """Take the lease, then create partitions, roll hours up, apply retention, and give the lease back.

        Raises:
            RegistryError: The database failed (what was committed before stays).
        """
        report, began = MaintenanceReport(), time.monotonic()
        if not self._acquire():
            return report
        report.ran, self._leased = True, True
        try:
            if self.db.engine.dialect.name == "postgresql":
                report.partitions_created = self._create_partitions()
            report.hours_rolled = self._roll_hours()
            self._retain(report)
        except _LostLease:
            _log.warning("telemetry maintenance: the lease was taken over; this run stops here")
            return report
        finally:
            report.seconds = time.monotonic() - began
            self.last, self._leased = report, False
        self._release(report)
        return report

    def _acquire(self) -> bool:
        j, now = schema.telemetry_jobs, self.clock()
        until = now + dt.timedelta(seconds=self.settings.lease_s)
        with self.db.transaction() as conn:
            self.db.lock(conn)
            row = conn.execute(sa.select(j.c.owner, j.c.lease_until).where(j.c.name == JOB)).first()
            if row is None:
                conn.execute(j.insert().values(name=JOB, owner=self.owner, lease_until=until))
                return True
            held = row.lease_until is not None and as_utc(row.lease_until) > now
            if held and row.owner != self.owner:
                return False
            conn.execute(j.update().where(j.c.name == JOB).values(owner=self.owner, lease_until=until))
        return True

    def _renew(self, conn: Connection) -> None:
        """Renew the lease in ``conn``'s transaction (the work of that transaction counts only if it is ours)."""
        j = schema.telemetry_jobs
        until = self.clock() + dt.timedelta(seconds=self.settings.lease_s)
        if not conn.execute(j.update().where((j.c.name == JOB) & (j.c.owner == self.owner))
                            .values(lease_until=until)).rowcount:
            raise _LostLease

    def _release(self, report: MaintenanceReport) -> None:
        j = schema.telemetry_jobs
        with self.db.transaction() as conn:
            conn.execute(j.update().where((j.c.name == JOB) & (j.c.owner == self.owner)).values(
                lease_until=None, last_run_at=self.clock(), details=asdict(report)))

    # --- hour rollups -------------------------------------------------------------------------------------

    def _roll_hours(self) -> int:
        """Roll every closed hour not rolled yet that has minutes, oldest first, one transaction each (empty hours
        are passed over in the same transactions); how many were rolled."""
        end = floor_time(self.clock() - dt.timedelta(seconds=self.settings.lag_s), HOUR)
        j = schema.telemetry_jobs
        with self.db.transaction() as conn:
            done = rolled_until(conn)
        rolled = 0
        while (done is None or done < end) and not self._stop.is_set():
            with self.db.transaction() as conn:
                self._renew(conn)
                first = self._first_minute(conn, done)
                hour = None if first is None else floor_time(first, HOUR)
                if hour is None or hour >= end:
                    done = end  # nothing (more) to roll before the end
                else:
                    roll_hour(conn, hour)
                    done = hour + dt.timedelta(seconds=HOUR)
                    rolled += 1
                conn.execute(j.update().where(j.c.name == JOB).values(done_until=done))
        return rolled

    @staticmethod
    def _first_minute(conn: Connection, since: dt.datetime | None) -> dt.datetime | None:
        """The first minute bucket at or after ``since`` (None: from the start) in either minute table."""
        found: list[dt.datetime] = []
        for t in (schema.telemetry_device_minute, schema.telemetry_version_minute):
            query = sa.select(sa.func.min(t.c.bucket))
            if since is not None:
                query = query.where(t.c.bucket >= since)
            first = as_utc(conn.execute(query).scalar())
            if first is not None:
                found.append(first)
        return min(found) if found else None

    # --- retention ----------------------------------------------------------------------------------------

    def _retain(self, report: MaintenanceReport) -> None:
        s, now = self.settings, self.clock()
        if s.raw_s > 0:
            cutoff = now - dt.timedelta(seconds=s.raw_s)
            if self.db.engine.dialect.name == "postgresql":
                report.partitions_dropped = self._drop_partitions(cutoff)
                report.raw_deleted = self._delete_raw(cutoff, TELEMETRY_DEFAULT_PARTITION)
            else:
                report.raw_deleted = self._delete_raw(cutoff, schema.telemetry.name)
        if s.minute_s > 0:
            with self.db.transaction() as conn:
                rolled = rolled_until(conn)
            if rolled is not None:  # never a minute whose hour is not rolled yet
                cutoff = min(now - dt.timedelta(seconds=s.minute_s), rolled)
                report.minute_deleted = sum(self._delete_buckets(t, cutoff) for t in (
                    schema.telemetry_device_minute, schema.telemetry_version_minute))
        if s.hour_s > 0:
            cutoff = now - dt.timedelta(seconds=s.hour_s)
            report.hour_deleted = sum(self._delete_buckets(t, cutoff) for t in (
                schema.telemetry_device_hour, schema.telemetry_version_hour))

    def _repeat(self, step: Callable[[Connection], bool]) -> None:
        """Run ``step`` in transactions of its own (the lease renewed in each, a pause between: ``pause_s``, and
        long enough that the transactions take at most ``max_share`` of the time) until it returns False or
        maintenance stops."""
        s = self.settings
        rest = (1.0 - s.max_share) / s.max_share
        while not self._stop.is_set():
            began = time.monotonic()
            with self.db.transaction() as conn:
                if conn.dialect.name == "sqlite":
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                self._renew(conn)
                more = step(conn)
            if not more:
                return
            self._stop.wait(max(s.pause_s, (time.monotonic() - began) * rest))

    def _by_row_id(self, name: str, where: str) -> str:
        """A ``DELETE`` of at most ``:n`` rows of ``name`` matching ``where``, found through an index."""
        if self.db.engine.dialect.name == "sqlite":
            return f"DELETE FROM {name} WHERE rowid IN (SELECT rowid FROM {name} WHERE {where} LIMIT :n)"
        return f"DELETE FROM {name} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {name} WHERE {where} LIMIT :n))"

    def _delete_buckets(self, table: sa.Table, cutoff: dt.datetime) -> int:
        """Delete ``table``'s rows with ``bucket < cutoff``, ``chunk_rows`` at a time; how many."""
        sql = sa.text(self._by_row_id(self.db.engine.dialect.identifier_preparer.format_table(table),
                                      "bucket < :cutoff"))
        params = {"cutoff": _bound(table.c.bucket, self.db)(cutoff), "n": self.settings.chunk_rows}
        deleted = [0]

        def step(conn: Connection) -> bool:
            n = conn.execute(sql, params).rowcount
            deleted[0] += n
            return bool(n == self.settings.chunk_rows)

        self._repeat(step)
        return deleted[0]

    def _delete_raw(self, cutoff: dt.datetime, table: str) -> int:
        """Delete raw rows received before ``cutoff`` from ``table`` (the telemetry table, or its default
        partition), device by device through the ``(device_id, received_at)`` index; how many."""
        with self.db.transaction() as conn:
            devices = list(conn.execute(sa.select(schema.telemetry_devices.c.device_id)
                                        .order_by(schema.telemetry_devices.c.device_id)).scalars())
        sql = sa.text(self._by_row_id(self.db.engine.dialect.identifier_preparer.quote(table),
                                      "device_id = :d AND received_at < :cutoff"))
        when, chunk = _bound(schema.telemetry.c.received_at, self.db)(cutoff), self.settings.chunk_rows
        deleted, at = [0], [0]  # rows deleted, the device being pruned

        def step(conn: Connection) -> bool:
            in_this = visited = 0
            while at[0] < len(devices) and in_this < chunk and visited < _DEVICES_PER_TRANSACTION:
                in_this += conn.execute(sql, {"d": devices[at[0]], "cutoff": when, "n": chunk - in_this}).rowcount
                visited += 1
                if in_this < chunk:
                    at[0] += 1  # this device has no more (a full chunk: look at it again in the next transaction)
            deleted[0] += in_this
            return at[0] < len(devices)

        self._repeat(step)
        return deleted[0]

    # --- PostgreSQL partitions ----------------------------------------------------------------------------

    def _partitions(self) -> dict[str, dt.date]:
        """The daily partitions of ``telemetry``: name -> day."""
        with self.db.transaction() as conn:
            names = conn.exec_driver_sql("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                         "WHERE i.inhparent = 'telemetry'::regclass").scalars().all()
        out = {}
        for name in names:
            if name.startswith("telemetry_p") and len(name) == 19 and name[11:].isdigit():
                out[name] = dt.datetime.strptime(name[11:], "%Y%m%d").date()
        return out

    def _create_partitions(self) -> list[str]:
        today = self.clock().astimezone(dt.timezone.utc).date()
        return self.create_partitions(today + dt.timedelta(days=k) for k in range(self.settings.partitions_ahead + 1))

    def create_partitions(self, days: Iterable[dt.date]) -> list[str]:
        """PostgreSQL: create the daily partitions of ``days`` that do not exist (e.g. before a bulk load of past
        days); the names of those made. Holds the lease only while this runs inside :meth:`run_once`."""
        present = self._partitions()
        made = []
        for day in days:
            if partition_name(day) not in present and self._create_partition(day):
                made.append(partition_name(day))
        return made

    def _create_partition(self, day: dt.date) -> bool:
        """Create one day's partition: a table of its own, the day's rows moved in from the default partition,
        then attached (which takes no lock that stops inserts into the other partitions). False: not now."""
        name, default = partition_name(day), TELEMETRY_DEFAULT_PARTITION
        low = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
        high = low + dt.timedelta(days=1)
        try:
            with self.db.transaction() as conn:
                if self._leased:
                    self._renew(conn)
                conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
                conn.exec_driver_sql(f'CREATE TABLE "{name}" (LIKE telemetry INCLUDING DEFAULTS)')
                conn.exec_driver_sql(f'WITH moved AS (DELETE FROM "{default}" WHERE received_at >= %s AND '
                                     f'received_at < %s RETURNING *) INSERT INTO "{name}" SELECT * FROM moved',
                                     (low, high))
                conn.exec_driver_sql(f'ALTER TABLE telemetry ATTACH PARTITION "{name}" FOR VALUES FROM '
                                     f"('{low.isoformat()}') TO ('{high.isoformat()}')")  # DDL takes no parameters
        except _LostLease:
            raise
        except Exception as exc:  # a lock not granted in time, a row that arrived meanwhile: next round
            _log.warning("telemetry maintenance: partition %s not created this round: %s", name, exc)
            return False
        return True

    def _drop_partitions(self, cutoff: dt.datetime) -> list[str]:
        """Drop every daily partition whose day ended before ``cutoff``, each under a short lock timeout."""
        dropped = []
        for name, day in sorted(self._partitions().items(), key=lambda item: item[1]):
            if dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc) > cutoff:
                continue
            try:
                with self.db.transaction() as conn:
                    self._renew(conn)
                    conn.exec_driver_sql("SET LOCAL lock_timeout = '500ms'")  # ingestion queues behind it meanwhile
                    conn.exec_driver_sql(f'DROP TABLE "{name}"')
            except _LostLease:
                raise
            except Exception as exc:  # the lock was not granted in time: next round
                _log.warning("telemetry maintenance: partition %s not dropped this round: %s", name, exc)
                continue
            dropped.append(name)
        return dropped


def _bound(column: Any, db: Database) -> Callable[[Any], Any]:
    """What the driver takes for ``column`` (SQLite stores datetimes as text), for statements given as text."""
    from edgeml.fleet.telemetry.writers import bind

    return bind(column, db.engine.dialect)
