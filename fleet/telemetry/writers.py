"""The statements of one ingest transaction, one per kind of change and never one per row, for each driver.

SQLite (sqlite3): the transaction begins with ``BEGIN IMMEDIATE`` (the writer's lock, taken before the devices'
books are read, so that no other process can store their rows in between); ids travel as one JSON array walked
by ``json_each`` and rows through the driver's ``executemany``. PostgreSQL (psycopg 3): the devices' rows of
``telemetry_devices`` are locked with ``SELECT ... ORDER BY device_id FOR UPDATE`` (in id order, so that two
workers never deadlock), and every statement takes its values as binary arrays walked by ``unnest``: the same
statement text for any batch size. Values are converted once, through the columns' own bind processors.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from edgeml.errors import RegistryError
from edgeml.fleet.store import schema
from edgeml.fleet.store.schema import ROLLUP_LATEST, ROLLUP_MAXES, ROLLUP_SUMS
from edgeml.fleet.telemetry.figures import ROLLUP_COLUMNS, Book, DeviceChange, Rollup
from edgeml.protocol import Telemetry

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from edgeml.fleet.store.schema import sa

__all__ = ["Writer", "writer_for"]

_SQLITE_JSON = sqlite3.sqlite_version_info >= (3, 38)  # json_each built in (earlier builds may lack it)


def bind(column: Any, dialect: Any) -> Callable[[Any], Any]:
    """The function that turns a Python value into what the driver stores for ``column``."""
    process = column.type.dialect_impl(dialect).bind_processor(dialect)
    return process if process is not None else (lambda value: value)


def _name(conn: Connection, table: sa.Table) -> str:
    return str(conn.dialect.identifier_preparer.format_table(table))


def _upsert_sets(table: str, greatest: Callable[[str, str], str]) -> str:
    """The ``SET`` of a rollup upsert: sums add, maxima keep the larger, the latest drift and output-shift scores
    win by time."""
    sets = [f"{c} = {table}.{c} + excluded.{c}" for c in ROLLUP_SUMS]
    sets += [f"{c} = {greatest(f'{table}.{c}', f'excluded.{c}')}" for c in ROLLUP_MAXES]
    for name in ROLLUP_LATEST:
        at = f"{name}_at"
        newer = f"excluded.{at} IS NOT NULL AND ({table}.{at} IS NULL OR excluded.{at} >= {table}.{at})"
        sets += [f"{c} = CASE WHEN {newer} THEN excluded.{c} ELSE {table}.{c} END" for c in (f"{name}_last", at)]
    return ", ".join(sets)


class Writer:
    """The ingest transaction's statements on one backend (see the module docstring)."""

    def begin(self, conn: Connection) -> None:
        """Take whatever lock the backend needs before the books are read."""

    def ensure(self, conn: Connection, device_ids: Sequence[str]) -> None:
        """Create the ``telemetry_devices`` rows of ``device_ids`` that do not exist (sorted ids)."""
        raise NotImplementedError

    def books(self, conn: Connection, device_ids: Sequence[str]) -> dict[str, Book]:
        """The devices' bookkeeping, locked until the transaction ends."""
        raise NotImplementedError

    def insert(self, conn: Connection, rows: Sequence[Telemetry], at: dt.datetime, texts: Sequence[str]) -> None:
        """Insert new rows (already known not to be stored), ``texts`` their metrics as JSON."""
        raise NotImplementedError

    def update_devices(self, conn: Connection, changes: Mapping[str, DeviceChange], at: dt.datetime,
                       texts: Mapping[tuple[str, int], str]) -> None:
        """Write each device's new high, pending count, totals and latest row (``texts``: the rows' JSON)."""
        raise NotImplementedError

    def pending(self, conn: Connection, added: list[tuple[str, int]], removed: list[tuple[str, int]]) -> None:
        """Record seqs stored above a gap, and forget those the high has passed."""
        raise NotImplementedError

    def upsert(self, conn: Connection, table: sa.Table, rollups: Mapping[tuple[Any, ...], Rollup],
               bucket: dt.datetime) -> None:
        """Add ``rollups`` (their keys without the bucket) to ``table``'s rows of ``bucket``."""
        raise NotImplementedError


def _keys_with_bucket(table: sa.Table) -> list[str]:
    return [c.name for c in table.primary_key.columns]


def _rows_of(table: sa.Table, rollups: Mapping[tuple[Any, ...], Rollup], bucket: Any,
             when: Callable[[Any], Any] | None = None) -> list[tuple[Any, ...]]:
    """Rows in column order: the key (with the bucket where the table puts it), then the values; ``when``
    converts the drift and output-shift times (a batch has one or two: each is converted once)."""
    at = _keys_with_bucket(table).index("bucket")
    times: dict[Any, Any] = {None: None}
    rows = []
    for key, r in rollups.items():
        *values, drift_at, shift_last, shift_at = r.values()
        if when is not None:
            if drift_at not in times:
                times[drift_at] = when(drift_at)
            if shift_at not in times:
                times[shift_at] = when(shift_at)
            drift_at, shift_at = times[drift_at], times[shift_at]
        rows.append((*key[:at], bucket, *key[at:], *values, drift_at, shift_last, shift_at))
    return rows


class SqliteWriter(Writer):
    """sqlite3: ``BEGIN IMMEDIATE``, ``json_each`` for id lists, ``executemany`` for rows."""

    def __init__(self, conn: Connection) -> None:
        d = conn.dialect
        self.when = bind(schema.telemetry.c.received_at, d)

    def begin(self, conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # pysqlite begins lazily, and only before DML

    def _ids(self, ids: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
        if _SQLITE_JSON:
            return "(SELECT value FROM json_each(?))", (json.dumps(list(ids)),)
        return f"({', '.join('?' * len(ids))})", tuple(ids)

    def ensure(self, conn: Connection, device_ids: Sequence[str]) -> None:
        conn.exec_driver_sql(f"INSERT OR IGNORE INTO {_name(conn, schema.telemetry_devices)} (device_id) VALUES (?)",
                             [(d,) for d in device_ids])

    def books(self, conn: Connection, device_ids: Sequence[str]) -> dict[str, Book]:
        where, params = self._ids(device_ids)
        found = conn.exec_driver_sql(f"SELECT device_id, contiguous_high, last_seq, pending FROM "
                                     f"{_name(conn, schema.telemetry_devices)} WHERE device_id IN {where}",
                                     params).all()
        gapped = [d for d, _, _, pending in found if pending]
        seqs: dict[str, set[int]] = {}
        if gapped:
            where, params = self._ids(gapped)
            for d, s in conn.exec_driver_sql(f"SELECT device_id, seq FROM {_name(conn, schema.telemetry_pending)} "
                                             f"WHERE device_id IN {where}", params):
                seqs.setdefault(d, set()).add(int(s))
        return {d: Book(-1 if h is None else int(h), -1 if s is None else int(s), frozenset(seqs.get(d, ())))
                for d, h, s, _ in found}

    def insert(self, conn: Connection, rows: Sequence[Telemetry], at: dt.datetime, texts: Sequence[str]) -> None:
        when = self.when(at)
        conn.exec_driver_sql(f"INSERT INTO {_name(conn, schema.telemetry)} (device_id, seq, sent_at, received_at, "
                             "metrics) VALUES (?, ?, ?, ?, ?)",
                             [(r.device_id, r.seq, float(r.sent_at), when, text) for r, text in zip(rows, texts)])

    def update_devices(self, conn: Connection, changes: Mapping[str, DeviceChange], at: dt.datetime,
                       texts: Mapping[tuple[str, int], str]) -> None:
        when = self.when(at)
        sql = (f"UPDATE {_name(conn, schema.telemetry_devices)} SET contiguous_high = ?, pending = pending + ?, "
               "last_seq = ?, windows = windows + ?, requests = requests + ?, errors = errors + ?, "
               "first_received_at = CASE WHEN first_received_at IS NULL OR first_received_at > ? THEN ? "
               "ELSE first_received_at END, "
               "last_received_at = CASE WHEN last_received_at IS NULL OR last_received_at < ? THEN ? "
               "ELSE last_received_at END, "
               "latest_received_at = CASE WHEN ? IS NULL THEN latest_received_at ELSE ? END, "
               "latest_metrics = coalesce(?, latest_metrics) WHERE device_id = ?")
        params = []
        for device_id, c in changes.items():
            latest = None if c.latest is None else texts[(device_id, c.latest.seq)]
            params.append((None if c.high < 0 else c.high, len(c.pending_added) - len(c.pending_removed), c.last_seq,
                           c.windows, c.requests, c.errors, when, when, when, when, latest, when, latest, device_id))
        conn.exec_driver_sql(sql, params)

    def pending(self, conn: Connection, added: list[tuple[str, int]], removed: list[tuple[str, int]]) -> None:
        name = _name(conn, schema.telemetry_pending)
        if added:
            conn.exec_driver_sql(f"INSERT OR IGNORE INTO {name} (device_id, seq) VALUES (?, ?)", added)
        if removed:
            conn.exec_driver_sql(f"DELETE FROM {name} WHERE device_id = ? AND seq = ?", removed)

    def upsert(self, conn: Connection, table: sa.Table, rollups: Mapping[tuple[Any, ...], Rollup],
               bucket: dt.datetime) -> None:
        name, keys = _name(conn, table), _keys_with_bucket(table)
        columns = [*keys, *ROLLUP_COLUMNS]
        sets = _upsert_sets(name, lambda a, b: f"max(coalesce({a}, {b}), coalesce({b}, {a}))")  # max(NULL, x) is NULL
        sql = (f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
               f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}")
        conn.exec_driver_sql(sql, _rows_of(table, rollups, self.when(bucket), self.when))


class PostgresWriter(Writer):
    """psycopg 3: ``FOR UPDATE`` in id order, and binary arrays walked by ``unnest`` for every list of values."""

    def ensure(self, conn: Connection, device_ids: Sequence[str]) -> None:
        conn.exec_driver_sql(f"INSERT INTO {_name(conn, schema.telemetry_devices)} (device_id) "
                             "SELECT unnest(%b::text[]) ON CONFLICT DO NOTHING", (list(device_ids),))

    def books(self, conn: Connection, device_ids: Sequence[str]) -> dict[str, Book]:
        ids = (list(device_ids),)
        found = conn.exec_driver_sql(f"SELECT device_id, contiguous_high, last_seq, pending FROM "
                                     f"{_name(conn, schema.telemetry_devices)} WHERE device_id = ANY(%b::text[]) "
                                     "ORDER BY device_id FOR UPDATE", ids).all()
        gapped = [d for d, _, _, pending in found if pending]
        seqs: dict[str, set[int]] = {}
        if gapped:
            for d, s in conn.exec_driver_sql(f"SELECT device_id, seq FROM {_name(conn, schema.telemetry_pending)} "
                                             "WHERE device_id = ANY(%b::text[])", (gapped,)):
                seqs.setdefault(d, set()).add(int(s))
        return {d: Book(-1 if h is None else int(h), -1 if s is None else int(s), frozenset(seqs.get(d, ())))
                for d, h, s, _ in found}

    def insert(self, conn: Connection, rows: Sequence[Telemetry], at: dt.datetime, texts: Sequence[str]) -> None:
        columns: list[list[Any]] = [[r.device_id for r in rows], [r.seq for r in rows],
                                    [float(r.sent_at) for r in rows], list(texts)]
        # %b: binary parameters (a text array in text format is escaped element by element)
        conn.exec_driver_sql(f"INSERT INTO {_name(conn, schema.telemetry)} (device_id, seq, sent_at, received_at, "
                             "metrics) SELECT d, s, t, %s, m::json FROM unnest(%b::text[], %b::bigint[], "
                             "%b::float8[], %b::text[]) AS v(d, s, t, m)", (at, *columns))

    def update_devices(self, conn: Connection, changes: Mapping[str, DeviceChange], at: dt.datetime,
                       texts: Mapping[tuple[str, int], str]) -> None:
        columns: list[list[Any]] = [[] for _ in range(8)]
        for device_id, c in changes.items():
            latest = None if c.latest is None else texts[(device_id, c.latest.seq)]
            values = (device_id, c.high, len(c.pending_added) - len(c.pending_removed), c.last_seq, c.windows,
                      float(c.requests), float(c.errors), latest)
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        name = _name(conn, schema.telemetry_devices)
        conn.exec_driver_sql(
            f"UPDATE {name} AS t SET contiguous_high = NULLIF(v.h, -1), pending = t.pending + v.p, "
            "last_seq = v.ls, windows = t.windows + v.w, requests = t.requests + v.rq, errors = t.errors + v.er, "
            "first_received_at = LEAST(t.first_received_at, %(at)s), "
            "last_received_at = GREATEST(t.last_received_at, %(at)s), "
            "latest_received_at = CASE WHEN v.lm IS NULL THEN t.latest_received_at ELSE %(at)s END, "
            "latest_metrics = COALESCE(v.lm::json, t.latest_metrics) "
            "FROM unnest(%(d)b::text[], %(h)b::bigint[], %(p)b::bigint[], %(ls)b::bigint[], %(w)b::bigint[], "
            "%(rq)b::float8[], %(er)b::float8[], %(lm)b::text[]) AS v(d, h, p, ls, w, rq, er, lm) "
            "WHERE t.device_id = v.d",
            {"at": at, **dict(zip(("d", "h", "p", "ls", "w", "rq", "er", "lm"), columns, strict=True))})

    def pending(self, conn: Connection, added: list[tuple[str, int]], removed: list[tuple[str, int]]) -> None:
        name = _name(conn, schema.telemetry_pending)
        if added:
            conn.exec_driver_sql(f"INSERT INTO {name} (device_id, seq) SELECT * FROM unnest(%b::text[], %b::bigint[]) "
                                 "ON CONFLICT DO NOTHING", ([d for d, _ in added], [s for _, s in added]))
        if removed:
            conn.exec_driver_sql(f"DELETE FROM {name} WHERE (device_id, seq) IN (SELECT * FROM unnest(%b::text[], "
                                 "%b::bigint[]))", ([d for d, _ in removed], [s for _, s in removed]))

    def upsert(self, conn: Connection, table: sa.Table, rollups: Mapping[tuple[Any, ...], Rollup],
               bucket: dt.datetime) -> None:
        """The rows as one JSON document the server reads into rows of the table's own type: a rollup row has
        some 30 columns, and psycopg dumps an array parameter element by element in Python (about 75 µs an
        array of 100 devices), where :func:`json.dumps` writes them all at C speed. A value JSON cannot carry
        (a sum that overflowed to infinity) goes through the arrays instead."""
        name, keys = _name(conn, table), _keys_with_bucket(table)
        columns = [*keys, *ROLLUP_COLUMNS]
        try:
            doc = json.dumps([dict(zip(columns, row, strict=True)) for row in
                              _rows_of(table, rollups, bucket.isoformat(), _isoformat)], allow_nan=False)
        except ValueError:
            self._upsert_arrays(conn, table, rollups, bucket)
            return
        listed = ", ".join(columns)
        sets = _upsert_sets(name, lambda a, b: f"GREATEST({a}, {b})")  # GREATEST ignores NULLs
        conn.exec_driver_sql(f"INSERT INTO {name} ({listed}) SELECT {listed} FROM json_populate_recordset("
                             f"NULL::{name}, %s::json) ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}", (doc,))

    def _upsert_arrays(self, conn: Connection, table: sa.Table, rollups: Mapping[tuple[Any, ...], Rollup],
                       bucket: dt.datetime) -> None:
        """:meth:`upsert` with one array parameter a column."""
        name, keys = _name(conn, table), _keys_with_bucket(table)
        columns = [*keys, *ROLLUP_COLUMNS]
        types = [_pg_array_type(table.c[c]) for c in columns]
        arrays: list[list[Any]] = [[] for _ in columns]
        for row in _rows_of(table, rollups, bucket):
            for array, value in zip(arrays, row, strict=True):
                array.append(value)
        sets = _upsert_sets(name, lambda a, b: f"GREATEST({a}, {b})")  # GREATEST ignores NULLs
        unnest = ", ".join(f"%b::{t}[]" for t in types)
        conn.exec_driver_sql(f"INSERT INTO {name} ({', '.join(columns)}) SELECT * FROM unnest({unnest}) "
                             f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}", tuple(arrays))


def _isoformat(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _pg_array_type(column: Any) -> str:
    """The PostgreSQL array element type that carries ``column``'s values."""
    kind = column.type
    if isinstance(kind, schema.UTCDateTime):
        return "timestamptz"
    for python_type, name in ((str, "text"), (int, "bigint"), (float, "float8")):
        if kind.python_type is python_type:
            return name
    raise RegistryError(f"no array type for the column {column.name!r}")  # a new column type: a bug here


def writer_for(conn: Connection) -> Writer:
    """The :class:`Writer` of ``conn``'s backend.

    Raises:
        RegistryError: Neither SQLite (sqlite3) nor PostgreSQL through psycopg 3.
    """
    dialect = conn.dialect
    if dialect.name == "sqlite":
        return SqliteWriter(conn)
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        return PostgresWriter()
    raise RegistryError(f"the telemetry store writes to SQLite or to PostgreSQL through psycopg 3, not "
                        f"{dialect.name}+{dialect.driver}", hint="use a postgresql+psycopg:// URL")
