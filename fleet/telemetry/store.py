"""The fleet's telemetry store: devices' telemetry rows, their bookkeeping and rollups, and their current state.

One row per ``(device_id, seq)`` in the ``telemetry`` table (:mod:`edgeml.fleet.store.schema`); a row already stored
is dropped, so that a device may resend anything it was not sure of. What is a duplicate is decided in the
transaction that stores the batch, from the device's books in ``telemetry_devices`` read under a lock
(:mod:`~edgeml.fleet.telemetry.writers`): a seq at or below its contiguous high, or one of the seqs stored above
a gap (``telemetry_pending``), is stored already (:func:`~edgeml.fleet.telemetry.figures.plan_batch`).

**The contiguous high** of a device (:meth:`TelemetryStore.contiguous_high`) is what the fleet may acknowledge to
it: devices number their telemetry from 0, and the contiguous high is the largest ``N`` such that every seq
``0..N`` is stored (None while seq 0 is not). A gap (a message lost on the way and not yet resent) holds it back,
so the device keeps the missing entry and everything after it. It is kept in ``telemetry_devices`` by the same
transaction that stores the rows, so it is exact the moment they commit, costs one indexed read whatever the
history, and survives any deletion of old rows: retention (:mod:`~edgeml.fleet.telemetry.maintenance`) never
touches the books, and a freshly started worker acknowledges exactly what was stored.

With the rows, the same transaction adds to each device's running totals (windows, requests, errors: counters
that only grow, whatever retention deletes), its latest row's numbers, and the minute rollups per device and per
version (:mod:`~edgeml.fleet.telemetry.rollups`). Every statement covers the whole batch: the cost of a batch
grows with its rows and devices, never with the history stored.

Device state (:meth:`TelemetryStore.update_state`) goes into the ``devices`` row of an enrolled device:
status, ``installed`` as ``{model: version}``, capabilities and ``last_seen``. Only enrolled devices have a
row: a row made here would make a later enrollment of that id fail, so the state of an unknown device is
not recorded (the method returns False).

Times: ``received_at`` and ``last_seen`` are the server's clock (UTC); ``sent_at`` is the device's clock in
Unix seconds, kept as sent.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from edgeml.errors import ConfigError
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import Database, as_utc, utcnow
from edgeml.fleet.store.schema import sa
from edgeml.fleet.telemetry.figures import Book, Figures, figures, floor_time, plan_batch
from edgeml.fleet.telemetry.writers import _SQLITE_JSON, Writer, bind, writer_for
from edgeml.protocol import State, Telemetry

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = ["BatchResult", "TelemetryStore"]

_DEVICES_PER_QUERY = 500  # device ids per read of the books

try:  # msgspec writes a window's metrics in a seventh of json.dumps's time (the fleet extra installs it)
    import msgspec

    _ENCODE: Any = msgspec.json.Encoder().encode
except ImportError:
    _ENCODE = None


def metrics_text(metrics: dict[str, Any]) -> str:
    """A window's metrics as the JSON text its row stores. Metrics that came through the protocol hold finite
    numbers only (:mod:`edgeml.protocol.codec`); a NaN or an infinity put there by a caller that bypassed it is
    written as null (by msgspec; without it, json.dumps writes NaN, which PostgreSQL refuses)."""
    if _ENCODE is not None:
        try:
            return str(_ENCODE(metrics).decode())
        except (TypeError, ValueError, OverflowError):  # not JSON: the standard library says so as it always did
            pass
    return json.dumps(metrics)


class _Prepared(NamedTuple):
    """What a batch's store needs of each row that no device's books decide, by ``(device_id, seq)`` (the first
    of repeats, as :func:`~edgeml.fleet.telemetry.figures.plan_batch` keeps)."""

    figures: dict[tuple[str, int], Figures]
    texts: dict[tuple[str, int], str]  # its metrics as JSON text (:func:`metrics_text`)


def _prepare(rows: Sequence[Telemetry]) -> _Prepared:
    """A batch's :class:`_Prepared`, worked out before the transaction takes its lock: on SQLite one writer at a
    time holds it, and each worker of a group waits out the others' time under it."""
    read: dict[tuple[str, int], Figures] = {}
    texts: dict[tuple[str, int], str] = {}
    for r in rows:
        key = (r.device_id, r.seq)
        if key not in read:
            read[key] = figures(r.metrics)
            texts[key] = metrics_text(r.metrics)
    return _Prepared(read, texts)


@dataclass(frozen=True)
class BatchResult:
    """What one :meth:`TelemetryStore.store_batch` did.

    Attributes:
        inserted: ``(device_id, seq)`` of the rows that were new.
        duplicates: How many rows were already stored (or repeated within the batch) and dropped.
        highs: Device id -> contiguous high after the commit, for every device with rows in the batch.
        states: How many state updates landed on an enrolled device's row.
    """

    inserted: frozenset[tuple[str, int]]
    duplicates: int
    highs: dict[str, int | None] = field(default_factory=dict)
    states: int = 0


class TelemetryStore:
    """Telemetry rows, their bookkeeping and rollups, and device state in the registry database.

    Args:
        db: A :class:`~edgeml.fleet.store.db.Database`, or a database URL to open one (its schema is created or
            upgraded to the current version).
        last_seen_s: Telemetry moves a device's ``last_seen`` at most once per this many seconds (0: with
            every batch); a device reporting many times a second then costs one row update a second.

    Raises:
        RegistryError: The database cannot be opened or upgraded.
    """

    def __init__(self, db: Database | str, *, last_seen_s: float = 0.0) -> None:
        if isinstance(db, str):
            db = Database(db)
            db.create()
        self.db = db
        self.table = schema.telemetry
        self.devices = schema.devices
        self.last_seen_s = last_seen_s  # telemetry moves a device's last_seen at most this often (0: every batch)
        self._seen_at: dict[str, float] = {}  # device -> time.monotonic() this store last moved its last_seen
        self._booked: set[str] = set()  # devices known to have their telemetry_devices row

    # --- writing ------------------------------------------------------------------------------------------

    def insert_batch(self, rows: Iterable[Telemetry], received_at: dt.datetime | None = None) -> int:
        """Store telemetry messages, dropping any ``(device_id, seq)`` already stored; returns how many were new.

        Raises:
            RegistryError: The database failed (nothing of the batch was stored).
        """
        return len(self.store_batch(list(rows), received_at=received_at).inserted)

    def store_batch(self, rows: Sequence[Telemetry], states: Sequence[tuple[State, bool]] = (),
                    received_at: dt.datetime | None = None, *, highs: bool = True) -> BatchResult:
        """In one transaction: insert ``rows`` (duplicates dropped) with their bookkeeping, totals and minute
        rollups, apply ``states``, bump ``last_seen``.

        Args:
            rows: Telemetry messages.
            states: ``(state, seen)`` pairs applied in order; ``seen`` False keeps ``last_seen`` (a retained
                state replayed by the broker says nothing about when the device was last heard).
            received_at: When the rows arrived (default: now).
            highs: Give each device's contiguous high after the commit (off: ``highs`` is empty).

        Returns:
            What was inserted, and each device's contiguous high as the commit left it.

        Raises:
            RegistryError: The database failed (nothing of the batch was stored).
        """
        at = received_at or utcnow()
        now = time.monotonic()
        touch = {r.device_id for r in rows}
        if self.last_seen_s > 0:
            touch = {d for d in touch if now - self._seen_at.get(d, float("-inf")) >= self.last_seen_s}
        prepared = _prepare(rows)  # outside the lock: SQLite lets one writer at a time hold it
        with self.db.transaction() as conn:
            inserted, after = self._store_rows(conn, rows, at, prepared) if rows else ([], {})
            applied = sum(self._apply_state(conn, s, at if seen else None) for s, seen in states)
            self._touch(conn, touch, at)
        self._seen_at.update(dict.fromkeys(touch, now))
        self._booked.update(after)
        return BatchResult(frozenset(inserted), len(rows) - len(inserted), after if highs else {}, applied)

    def _store_rows(self, conn: Connection, rows: Sequence[Telemetry], at: dt.datetime,
                    prepared: _Prepared) -> tuple[list[tuple[str, int]], dict[str, int | None]]:
        """The rows' part of :meth:`store_batch`: lock the books, decide, write. (inserted, highs after)"""
        writer = writer_for(conn)
        writer.begin(conn)
        ids = sorted({r.device_id for r in rows})
        self._ensure(conn, writer, [d for d in ids if d not in self._booked])
        books = self._books(conn, writer, ids)
        missing = [d for d in ids if d not in books]  # known to this store, yet not in the database: make them
        if missing:
            self._ensure(conn, writer, missing)
            books.update(self._books(conn, writer, missing))
        plan = plan_batch(rows, books, at, prepared.figures)
        if plan.rows:
            self._write(conn, writer, plan, at, prepared)
        after = {d: None if b.high < 0 else b.high for d, b in books.items()}
        after.update({d: None if c.high < 0 else c.high for d, c in plan.devices.items()})
        return [(r.device_id, r.seq) for r in plan.rows], after

    @staticmethod
    def _ensure(conn: Connection, writer: Writer, ids: list[str]) -> None:
        """Create the books of ``ids`` (sorted: concurrent creators wait for each other in one order)."""
        for start in range(0, len(ids), _DEVICES_PER_QUERY):
            writer.ensure(conn, ids[start:start + _DEVICES_PER_QUERY])

    @staticmethod
    def _books(conn: Connection, writer: Writer, ids: list[str]) -> dict[str, Book]:
        """The books of ``ids`` (sorted), locked until the transaction ends."""
        books: dict[str, Book] = {}
        for start in range(0, len(ids), _DEVICES_PER_QUERY):
            books.update(writer.books(conn, ids[start:start + _DEVICES_PER_QUERY]))
        return books

    @staticmethod
    def _write(conn: Connection, writer: Writer, plan: Any, at: dt.datetime, prepared: _Prepared) -> None:
        texts = [prepared.texts[(r.device_id, r.seq)] for r in plan.rows]
        writer.insert(conn, plan.rows, at, texts)
        latest = {(d, c.latest.seq) for d, c in plan.devices.items() if c.latest is not None}
        writer.update_devices(conn, plan.devices, at, {(r.device_id, r.seq): text for r, text in zip(plan.rows, texts)
                                                       if (r.device_id, r.seq) in latest})
        added = [(d, s) for d, c in plan.devices.items() for s in sorted(c.pending_added)]
        removed = [(d, s) for d, c in plan.devices.items() for s in sorted(c.pending_removed)]
        if added or removed:
            writer.pending(conn, added, removed)
        minute = floor_time(at, 60)
        writer.upsert(conn, schema.telemetry_device_minute, plan.device_minutes, minute)
        writer.upsert(conn, schema.telemetry_version_minute, plan.version_minutes, minute)

    def _touch(self, conn: Connection, device_ids: set[str], at: dt.datetime) -> None:
        if not device_ids:
            return
        d = self.devices
        if conn.dialect.name == "sqlite" and _SQLITE_JSON:  # one statement text for any number of devices
            name = conn.dialect.identifier_preparer.format_table(d)
            conn.exec_driver_sql(f"UPDATE {name} SET last_seen = ? WHERE device_id IN (SELECT value FROM json_each(?))",
                                 (bind(d.c.last_seen, conn.dialect)(at), json.dumps(sorted(device_ids))))
        elif conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
            name = conn.dialect.identifier_preparer.format_table(d)
            conn.exec_driver_sql(f"UPDATE {name} SET last_seen = %s WHERE device_id = ANY(%b::text[])",
                                 (at, sorted(device_ids)))
        else:
            conn.execute(d.update().where(d.c.device_id.in_(sorted(device_ids))).values(last_seen=at))

    def _apply_state(self, conn: Connection, state: State, seen: dt.datetime | None) -> bool:
        d = self.devices
        values: dict[str, Any] = {"status": state.status, "capabilities": dict(state.capabilities),
                                  "installed": {state.model: state.version} if state.model else {}}
        if seen is not None:
            values["last_seen"] = seen
        # revoked in the same statement: a revocation counts from its commit, whatever a consumer's cache says
        result = conn.execute(d.update().where((d.c.device_id == state.device_id) & (d.c.revoked == sa.false()))
                              .values(**values))
        return bool(result.rowcount)

    def update_state(self, device_id: str, state: State, *, seen: bool = True) -> bool:
        """Record a device's reported state on its enrolled ``devices`` row.

        Args:
            device_id: The device (the one in the state's topic).
            state: Its :class:`~edgeml.protocol.State` (an ``"offline"`` last will included).
            seen: Also set ``last_seen`` to now.

        Returns:
            Whether the device is enrolled and not revoked (other devices' states are not recorded).

        Raises:
            ConfigError: ``state`` is another device's.
            RegistryError: The database failed.
        """
        if state.device_id != device_id:
            raise ConfigError(f"state of device {state.device_id!r} given for device {device_id!r}")
        return self.store_batch([], [(state, seen)]).states == 1

    # --- contiguous high ----------------------------------------------------------------------------------

    def contiguous_high(self, device_id: str) -> int | None:
        """The largest N with every seq 0..N of ``device_id`` stored (None: seq 0 is not stored).

        Raises:
            RegistryError: The database failed.
        """
        return self.contiguous_highs([device_id])[device_id]

    def contiguous_highs(self, device_ids: Iterable[str]) -> dict[str, int | None]:
        """:meth:`contiguous_high` of several devices: one indexed read per 500 devices, whatever their history.

        Raises:
            RegistryError: The database failed.
        """
        ids = sorted(set(device_ids))
        t = schema.telemetry_devices
        highs: dict[str, int | None] = dict.fromkeys(ids)
        with self.db.transaction() as conn:
            for start in range(0, len(ids), _DEVICES_PER_QUERY):
                query = sa.select(t.c.device_id, t.c.contiguous_high).where(
                    t.c.device_id.in_(ids[start:start + _DEVICES_PER_QUERY]))
                highs.update({d: None if h is None else int(h) for d, h in conn.execute(query)})
        return highs

    # --- device flags -------------------------------------------------------------------------------------

    def enrolled(self) -> dict[str, bool]:
        """Every enrolled device id -> whether it is revoked.

        Raises:
            RegistryError: The database failed.
        """
        d = self.devices
        with self.db.transaction() as conn:
            return {name: bool(revoked) for name, revoked in conn.execute(sa.select(d.c.device_id, d.c.revoked))}

    # --- queries for the API and the dashboard ------------------------------------------------------------

    @staticmethod
    def _row(r: Any) -> dict[str, Any]:
        return {"device_id": r.device_id, "seq": int(r.seq), "sent_at": float(r.sent_at),
                "received_at": as_utc(r.received_at), "metrics": r.metrics}

    def latest(self, device_id: str, n: int = 100) -> list[dict[str, Any]]:
        """The ``n`` newest rows of ``device_id`` (by arrival), highest seq first.

        Each row is ``{"device_id", "seq", "sent_at", "received_at", "metrics"}``. One read of the
        ``(device_id, received_at)`` index from its newest end, whatever the device's history.

        Raises:
            RegistryError: The database failed.
        """
        t = self.table
        query = (sa.select(t).where(t.c.device_id == device_id)
                 .order_by(t.c.received_at.desc(), t.c.seq.desc()).limit(n))
        with self.db.transaction() as conn:
            rows = [self._row(r) for r in conn.execute(query)]
        return sorted(rows, key=lambda r: r["seq"], reverse=True)

    def series(self, device_id: str | None, metric: str, since: dt.datetime,
               until: dt.datetime | None = None) -> list[dict[str, Any]]:
        """One metric over time, from the raw rows: rows received in ``[since, until)`` that carry a numeric
        ``metric``. Its cost grows with the rows in the window (the dashboard reads the rollups instead).

        Args:
            device_id: One device, or None for every device.
            metric: The metric's name (a key of the telemetry's ``metrics``).
            since: Earliest ``received_at`` (timezone-aware).
            until: End of the window (default: no end).

        Returns:
            ``{"device_id", "seq", "sent_at", "received_at", "value"}`` in order of arrival, then device and seq.

        Raises:
            RegistryError: The database failed.
        """
        t = self.table
        query = sa.select(t).where(t.c.received_at >= since)
        if until is not None:
            query = query.where(t.c.received_at < until)
        if device_id is not None:
            query = query.where(t.c.device_id == device_id)
        query = query.order_by(t.c.received_at, t.c.device_id, t.c.seq)
        out = []
        with self.db.transaction() as conn:
            for r in conn.execute(query):
                value = (r.metrics or {}).get(metric)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row = self._row(r)
                    del row["metrics"]
                    out.append({**row, "value": value})
        return out

    def devices_summary(self) -> list[dict[str, Any]]:
        """One entry per enrolled device or device with telemetry, sorted by id: two reads, of ``devices`` and
        ``telemetry_devices`` (the running totals), whatever the history.

        Each is ``{"device_id", "enrolled", "revoked", "status", "last_seen", "installed", "capabilities",
        "telemetry_rows", "last_seq", "contiguous_high", "last_received_at"}``; ``telemetry_rows`` counts every
        row ever stored (retention does not lower it).

        Raises:
            RegistryError: The database failed.
        """
        t, d = schema.telemetry_devices, self.devices
        with self.db.transaction() as conn:
            stats = {r.device_id: r for r in conn.execute(sa.select(t.c.device_id, t.c.windows, t.c.last_seq,
                                                                    t.c.contiguous_high, t.c.last_received_at))}
            rows = {r.device_id: r for r in conn.execute(sa.select(d))}
        out = []
        for name in sorted(set(stats) | set(rows)):
            r, s = rows.get(name), stats.get(name)
            out.append({"device_id": name, "enrolled": r is not None, "revoked": bool(r.revoked) if r else False,
                        "status": r.status if r else None, "last_seen": as_utc(r.last_seen) if r else None,
                        "installed": (r.installed if r else None) or {},
                        "capabilities": (r.capabilities if r else None) or {},
                        "telemetry_rows": int(s.windows) if s else 0,
                        "last_seq": None if s is None or s.last_seq is None else int(s.last_seq),
                        "contiguous_high": None if s is None or s.contiguous_high is None else int(s.contiguous_high),
                        "last_received_at": as_utc(s.last_received_at) if s else None})
        return out
