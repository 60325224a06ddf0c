"""The fleet's telemetry store: devices' telemetry rows and current state in the registry database.

One row per ``(device_id, seq)`` in the ``telemetry`` table (:mod:`edgeml.fleet.store.db`); a row that is already
stored is dropped on insert (``INSERT ... ON CONFLICT DO NOTHING`` through the SQLite and PostgreSQL
dialects' own insert constructs), so that a device may resend anything it was not sure of.

**The contiguous high** of a device (:meth:`TelemetryStore.contiguous_high`) is what the fleet may
acknowledge to it: devices number their telemetry from 0, and the contiguous high is the largest ``N`` such
that every seq ``0..N`` is stored (None while seq 0 is not). A gap (a message lost on the way and not yet
resent) holds it back, so the device keeps the missing entry and everything after it. It is computed in
SQL from the last known value up (one self-join over the ``(device_id, seq)`` unique index, scanning only
rows above it) and cached per device; rows are never deleted below it, so the cache stays a lower bound
even while other ingest processes write the same device's rows. (A retention job that deletes old rows
must keep each device's rows from its contiguous high up, or the acknowledgements of a freshly started
process would stop at the first deleted seq.)

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
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeml.errors import ConfigError, RegistryError
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import Database, as_utc, utcnow
from edgeml.fleet.store.schema import sa
from edgeml.protocol import State, Telemetry

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = ["BatchResult", "TelemetryStore"]

_DEVICES_PER_QUERY = 200  # devices per contiguous-high query
_SQLITE_JSON = sqlite3.sqlite_version_info >= (3, 38)  # json_each built in (earlier builds may lack it)


def _bind(column: Any, dialect: Any) -> Any:
    """The function that turns a Python value into what the driver stores for ``column``."""
    process = column.type.dialect_impl(dialect).bind_processor(dialect)
    return process if process is not None else (lambda value: value)


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
    """Telemetry rows and device state in the registry database (SQLite or PostgreSQL).

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
        self._highs: dict[str, int] = {}  # device -> contiguous high known to be stored (-1: nothing known)
        self.last_seen_s = last_seen_s  # telemetry moves a device's last_seen at most this often (0: every batch)
        self._seen_at: dict[str, float] = {}  # device -> time.monotonic() this store last moved its last_seen

    # --- writing ------------------------------------------------------------------------------------------

    def insert_batch(self, rows: Iterable[Telemetry], received_at: dt.datetime | None = None) -> int:
        """Store telemetry messages, dropping any ``(device_id, seq)`` already stored; returns how many were new.

        Raises:
            RegistryError: The database failed (nothing of the batch was stored).
        """
        return len(self.store_batch(list(rows), received_at=received_at).inserted)

    def store_batch(self, rows: Sequence[Telemetry], states: Sequence[tuple[State, bool]] = (),
                    received_at: dt.datetime | None = None, *, highs: bool = True) -> BatchResult:
        """In one transaction: insert ``rows`` (duplicates dropped), apply ``states``, bump ``last_seen``.

        Args:
            rows: Telemetry messages.
            states: ``(state, seen)`` pairs applied in order; ``seen`` False keeps ``last_seen`` (a retained
                state replayed by the broker says nothing about when the device was last heard).
            received_at: When the rows arrived (default: now).
            highs: Read each device's contiguous high after the commit (off: ``highs`` is empty; the ingest
                worker reads them when its acknowledgements fall due, not after every batch).

        Returns:
            What was inserted, and each device's contiguous high read after the commit.

        Raises:
            RegistryError: The database failed (nothing of the batch was stored).
        """
        at = received_at or utcnow()
        now = time.monotonic()
        touch = {r.device_id for r in rows}
        if self.last_seen_s > 0:
            touch = {d for d in touch if now - self._seen_at.get(d, float("-inf")) >= self.last_seen_s}
        with self.db.transaction() as conn:
            inserted = self._insert(conn, rows, at)
            applied = sum(self._apply_state(conn, s, at if seen else None) for s, seen in states)
            self._touch(conn, touch, at)
        self._seen_at.update(dict.fromkeys(touch, now))
        # After the commit, in a statement of its own: of several processes storing one device's rows, the last
        # to commit then sees every row (inside the transaction, PostgreSQL would hide the others' uncommitted ones)
        after = self.contiguous_highs({r.device_id for r in rows}) if rows and highs else {}
        return BatchResult(frozenset(inserted), len(rows) - len(inserted), after, applied)

    def _insert(self, conn: Connection, rows: Sequence[Telemetry], at: dt.datetime) -> list[tuple[str, int]]:
        if conn.dialect.name == "sqlite" and rows:
            return self._insert_sqlite(conn, rows, at)
        if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg" and rows:
            return self._insert_postgresql(conn, rows, at)
        values = list({(r.device_id, r.seq): {"device_id": r.device_id, "seq": r.seq, "sent_at": float(r.sent_at),
                                              "received_at": at, "metrics": r.metrics} for r in rows}.values())
        from sqlalchemy.dialects import postgresql, sqlite

        insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(conn.dialect.name)
        if insert is None:
            raise RegistryError(f"the telemetry store supports SQLite and PostgreSQL, not {conn.dialect.name}")
        if not values:
            return []
        # one cached statement run as executemany: SQLAlchemy's "insertmanyvalues" sends it as multi-row
        # INSERTs and gathers RETURNING, without compiling a statement per batch size
        stmt = (insert(self.table).on_conflict_do_nothing(index_elements=["device_id", "seq"])
                .returning(self.table.c.device_id, self.table.c.seq))
        return [(d, int(s)) for d, s in conn.execute(stmt, values)]

    def _insert_sqlite(self, conn: Connection, rows: Sequence[Telemetry], at: dt.datetime) -> list[tuple[str, int]]:
        """SQLite: one ``INSERT OR IGNORE`` run by the driver's executemany, with the values converted once
        through the columns' own bind processors (SQLAlchemy's per-row work was most of a batch's cost).

        The rows that were new: all of them when the driver counts as many changes as rows (the usual case);
        otherwise those above the largest id before the insert (SQLite has one writer at a time, so every
        row above it in this transaction is this insert's).
        """
        c, dialect = self.table.c, conn.dialect
        when = _bind(c.received_at, dialect)(at)
        to_json = _bind(c.metrics, dialect)
        unique = {(r.device_id, r.seq): r for r in rows}
        params = [(d, s, float(r.sent_at), when, to_json(r.metrics)) for (d, s), r in unique.items()]
        name = dialect.identifier_preparer.format_table(self.table)
        before = conn.exec_driver_sql(f"SELECT max(id) FROM {name}").scalar()
        result = conn.exec_driver_sql(f"INSERT OR IGNORE INTO {name} (device_id, seq, sent_at, received_at, metrics) "
                                      "VALUES (?, ?, ?, ?, ?)", params)
        if result.rowcount == len(params):
            return list(unique)
        return [(d, int(s)) for d, s in conn.exec_driver_sql(
            f"SELECT device_id, seq FROM {name} WHERE id > ?", (before or 0,))]

    def _insert_postgresql(self, conn: Connection, rows: Sequence[Telemetry], at: dt.datetime) -> list[tuple[str, int]]:
        """PostgreSQL (psycopg 3): one ``INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING
        RETURNING``: five array parameters and the same statement text for any batch size, so the driver
        neither parses thousands of placeholders nor the server a new statement per batch."""
        unique = {(r.device_id, r.seq): r for r in rows}
        columns: list[list[Any]] = [[], [], [], []]
        for (d, s), r in unique.items():  # metrics as SQLAlchemy's JSON type writes them (json.dumps)
            for column, value in zip(columns, (d, s, float(r.sent_at), json.dumps(r.metrics)), strict=True):
                column.append(value)
        name = conn.dialect.identifier_preparer.format_table(self.table)
        # %b: binary parameters (a text array in text format is escaped element by element)
        sql = (f"INSERT INTO {name} (device_id, seq, sent_at, received_at, metrics) "
               "SELECT d, s, t, %s, m::json FROM unnest(%b::text[], %b::bigint[], %b::float8[], %b::text[]) "
               "AS v(d, s, t, m) ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq")
        return [(d, int(s)) for d, s in conn.exec_driver_sql(sql, (at, *columns))]

    def _touch(self, conn: Connection, device_ids: set[str], at: dt.datetime) -> None:
        if not device_ids:
            return
        d = self.devices
        if conn.dialect.name == "sqlite" and _SQLITE_JSON:  # one statement text for any number of devices
            name = conn.dialect.identifier_preparer.format_table(d)
            conn.exec_driver_sql(f"UPDATE {name} SET last_seen = ? WHERE device_id IN (SELECT value FROM json_each(?))",
                                 (_bind(d.c.last_seen, conn.dialect)(at), json.dumps(sorted(device_ids))))
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
        """:meth:`contiguous_high` of several devices, in one query per 200 devices.

        Raises:
            RegistryError: The database failed.
        """
        with self.db.transaction() as conn:
            highs = self._compute_highs(conn, sorted(set(device_ids)))
        self._remember(highs)
        return highs

    def _remember(self, highs: dict[str, int | None]) -> None:
        for device_id, high in highs.items():
            self._highs[device_id] = max(self._highs.get(device_id, -1), -1 if high is None else high)

    def _compute_highs(self, conn: Connection, device_ids: list[str]) -> dict[str, int | None]:
        highs: dict[str, int | None] = {}
        for start in range(0, len(device_ids), _DEVICES_PER_QUERY):
            highs.update(self._highs_query(conn, device_ids[start:start + _DEVICES_PER_QUERY]))
        return highs

    def _highs_query(self, conn: Connection, device_ids: list[str]) -> dict[str, int | None]:
        """End of the run of stored seqs through each device's known high (or through seq 0)."""
        t = self.table
        known = {d: self._highs.get(d, -1) for d in device_ids}
        fresh = [d for d, h in known.items() if h < 0]
        has_zero: set[str] = set()
        if fresh:
            has_zero = set(conn.execute(sa.select(t.c.device_id).where(t.c.device_id.in_(fresh), t.c.seq == 0))
                           .scalars())
        todo = {d: max(h, 0) for d, h in known.items() if h >= 0 or d in has_zero}
        highs: dict[str, int | None] = {d: None for d in device_ids if d not in todo}
        if todo and conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
            highs.update(self._highs_postgresql(conn, todo))
        elif todo and conn.dialect.name == "sqlite" and _SQLITE_JSON:
            highs.update(self._highs_sqlite(conn, todo))
        elif todo:
            # plain SQL text: building the same query as an expression costs more than running it
            terms = " OR ".join(f"(a.device_id = :d{i} AND a.seq >= :s{i})" for i in range(len(todo)))
            name = self.db.engine.dialect.identifier_preparer.format_table(t)
            query = sa.text(f"SELECT a.device_id, MIN(a.seq) FROM {name} a LEFT JOIN {name} b "
                            f"ON b.device_id = a.device_id AND b.seq = a.seq + 1 "
                            f"WHERE b.id IS NULL AND ({terms}) GROUP BY a.device_id")
            params: dict[str, Any] = {}
            for i, (d, low) in enumerate(todo.items()):
                params[f"d{i}"], params[f"s{i}"] = d, low
            highs.update({d: int(s) for d, s in conn.execute(query, params)})
        return highs

    def _highs_sqlite(self, conn: Connection, todo: dict[str, int]) -> dict[str, int]:
        """:meth:`_highs_query`'s run ends on SQLite: the (device, lowest seq) pairs as one JSON object walked by
        ``json_each``, so one statement text serves any number of devices (the driver caches its preparation;
        an ``OR`` of a hundred terms cost 5 ms a batch to prepare, this 1 ms to run)."""
        name = conn.dialect.identifier_preparer.format_table(self.table)
        sql = (f"SELECT a.device_id, MIN(a.seq) FROM json_each(?) AS k "
               f"JOIN {name} a ON a.device_id = k.key AND a.seq >= k.value "
               f"LEFT JOIN {name} b ON b.device_id = a.device_id AND b.seq = a.seq + 1 "
               "WHERE b.id IS NULL GROUP BY a.device_id")
        return {d: int(s) for d, s in conn.exec_driver_sql(sql, (json.dumps(todo),))}

    def _highs_postgresql(self, conn: Connection, todo: dict[str, int]) -> dict[str, int]:
        """:meth:`_highs_query`'s run ends on PostgreSQL: the (device, lowest seq) pairs as two binary array
        parameters (one statement text for any number of devices; psycopg would otherwise rewrite hundreds of
        placeholders per query), each device's run end found by a ``LATERAL`` walk of the ``(device_id, seq)``
        index from its known high to the first gap (a join over the pairs let the planner scan the whole table:
        40 ms a batch at 60,000 rows, growing with the table)."""
        name = conn.dialect.identifier_preparer.format_table(self.table)
        sql = (f"SELECT k.d, h.seq FROM unnest(%b::text[], %b::bigint[]) AS k(d, s) CROSS JOIN LATERAL "
               f"(SELECT a.seq FROM {name} a WHERE a.device_id = k.d AND a.seq >= k.s AND NOT EXISTS "
               f"(SELECT 1 FROM {name} b WHERE b.device_id = k.d AND b.seq = a.seq + 1) ORDER BY a.seq LIMIT 1) h")
        return {d: int(s) for d, s in conn.exec_driver_sql(sql, (list(todo), list(todo.values())))}

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
        """The ``n`` rows of ``device_id`` with the highest seqs, highest first.

        Each row is ``{"device_id", "seq", "sent_at", "received_at", "metrics"}``.

        Raises:
            RegistryError: The database failed.
        """
        t = self.table
        query = sa.select(t).where(t.c.device_id == device_id).order_by(t.c.seq.desc()).limit(n)
        with self.db.transaction() as conn:
            return [self._row(r) for r in conn.execute(query)]

    def series(self, device_id: str | None, metric: str, since: dt.datetime,
               until: dt.datetime | None = None) -> list[dict[str, Any]]:
        """One metric over time: rows received in ``[since, until)`` that carry a numeric ``metric``.

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
        """One entry per enrolled device or device with telemetry, sorted by id.

        Each is ``{"device_id", "enrolled", "revoked", "status", "last_seen", "installed", "capabilities",
        "telemetry_rows", "last_seq", "contiguous_high", "last_received_at"}``.

        Raises:
            RegistryError: The database failed.
        """
        t, d = self.table, self.devices
        agg = sa.select(t.c.device_id, sa.func.count(), sa.func.max(t.c.seq), sa.func.max(t.c.received_at)) \
            .group_by(t.c.device_id)
        with self.db.transaction() as conn:
            stats = {r[0]: r[1:] for r in conn.execute(agg)}
            rows = {r.device_id: r for r in conn.execute(sa.select(d))}
            highs = self._compute_highs(conn, sorted(stats))
        self._remember(highs)
        out = []
        for name in sorted(set(stats) | set(rows)):
            r, (count, last_seq, last_at) = rows.get(name), stats.get(name, (0, None, None))
            out.append({"device_id": name, "enrolled": r is not None, "revoked": bool(r.revoked) if r else False,
                        "status": r.status if r else None, "last_seen": as_utc(r.last_seen) if r else None,
                        "installed": (r.installed if r else None) or {},
                        "capabilities": (r.capabilities if r else None) or {},
                        "telemetry_rows": int(count), "last_seq": None if last_seq is None else int(last_seq),
                        "contiguous_high": highs.get(name), "last_received_at": as_utc(last_at)})
        return out
