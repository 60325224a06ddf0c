"""Schema version 6: telemetry at fleet scale, from a database whose telemetry table is the old one.

The old ``telemetry`` table had an ``id`` and a unique ``(device_id, seq)``; the new one has neither (the ingest
transaction keeps rows unique through the devices' books, :mod:`~edgeml.fleet.telemetry.store`) and is partitioned
by day on PostgreSQL. :func:`upgrade_telemetry`, the migration step, renames the old table, creates the new one,
copies the rows (one ``INSERT ... SELECT``), and writes from them what the ingest transaction would have written:
each device's books and running totals (``telemetry_devices``, ``telemetry_pending``) and the minute rollups. The
old table is read device by device in seq order through its unique index, and the books and rollups are computed
by the same code as the ingest path (:mod:`~edgeml.fleet.telemetry.figures`), so an upgraded store answers as if it
had always been kept. Hour rollups are left to maintenance, which rolls every hour from the oldest minute up.

It runs inside the migration's transaction: a failure leaves the database as it was. Its cost grows with the rows
stored (about 30 µs a row): upgrade a large store in a maintenance window.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from edgeml.fleet.store.db import as_utc
from edgeml.fleet.telemetry.figures import ROLLUP_COLUMNS, Rollup, figures, floor_time

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = ["upgrade_telemetry"]

_OLD = "telemetry_v5"  # the old table while its rows are copied
_PAGE = 5000  # rows of one device read at a time
_NEW_TABLES = ("telemetry_devices", "telemetry_pending", "telemetry_device_minute", "telemetry_version_minute",
               "telemetry_device_hour", "telemetry_version_hour", "telemetry_jobs")


def upgrade_telemetry(sa: Any, conn: Connection, tables: dict[str, Any]) -> None:
    """The migration step: add the new tables, and rebuild an old-shaped ``telemetry`` with its books and rollups.

    Only adds what is missing: a database that has the new tables and table shape is left as it is.
    """
    for name in _NEW_TABLES:
        tables[name].create(conn, checkfirst=True)
    inspector = sa.inspect(conn)
    if "telemetry" not in inspector.get_table_names():
        tables["telemetry"].create(conn)
        return
    if "id" not in {c["name"] for c in inspector.get_columns("telemetry")}:
        return  # already the new shape
    quote = conn.dialect.identifier_preparer.quote
    conn.exec_driver_sql(f"ALTER TABLE telemetry RENAME TO {quote(_OLD)}")
    conn.exec_driver_sql("DROP INDEX IF EXISTS telemetry_device_time")  # index names are per schema: the new one's
    tables["telemetry"].create(conn)
    columns = "device_id, seq, sent_at, received_at, metrics"
    conn.exec_driver_sql(f"INSERT INTO telemetry ({columns}) SELECT {columns} FROM {quote(_OLD)}")
    _backfill(sa, conn, tables)
    conn.exec_driver_sql(f"DROP TABLE {quote(_OLD)}")


class _Device:
    """One device's books and totals, built from its rows in seq order."""

    def __init__(self) -> None:
        self.high, self.last_seq, self.gap = -1, -1, False
        self.pending: list[int] = []
        self.windows, self.requests, self.errors = 0, 0.0, 0.0
        self.first: dt.datetime | None = None
        self.last: dt.datetime | None = None
        self.latest: tuple[dt.datetime, Any] | None = None
        self.minutes: dict[tuple[dt.datetime, str, str], Rollup] = {}

    def add(self, seq: int, at: dt.datetime, metrics: Any) -> Rollup:
        if not self.gap and seq == self.high + 1:
            self.high = seq
        else:
            self.gap = True
            self.pending.append(seq)
        self.last_seq, self.latest = seq, (at, metrics)
        self.windows += 1
        self.first = at if self.first is None else min(self.first, at)
        self.last = at if self.last is None else max(self.last, at)
        f = figures(metrics if isinstance(metrics, dict) else {})
        self.requests += f.requests or 0.0
        self.errors += f.errors or 0.0
        rollup = self.minutes.setdefault((floor_time(at, 60), f.model, f.version), Rollup())
        rollup.add(f, at)
        return rollup


def _backfill(sa: Any, conn: Connection, tables: dict[str, Any]) -> None:
    from edgeml.fleet.store.schema import UTCDateTime

    old = sa.table(_OLD, sa.column("device_id"), sa.column("seq"), sa.column("received_at", UTCDateTime()),
                   sa.column("metrics", sa.JSON()))
    versions: dict[tuple[dt.datetime, str, str], Rollup] = {}
    device_ids = list(conn.execute(sa.select(old.c.device_id).distinct().order_by(old.c.device_id)).scalars())
    for device_id in device_ids:
        device, after = _Device(), -1
        while True:
            page = conn.execute(sa.select(old.c.seq, old.c.received_at, old.c.metrics)
                                .where((old.c.device_id == device_id) & (old.c.seq > after))
                                .order_by(old.c.seq).limit(_PAGE)).all()
            for seq, received_at, metrics in page:
                device.add(int(seq), as_utc(received_at), metrics)
            if len(page) < _PAGE:
                break
            after = int(page[-1][0])
        for (minute, model, version), rollup in device.minutes.items():
            versions.setdefault((minute, model, version), Rollup()).merge(rollup)
        _write_device(conn, tables, device_id, device)
    rows = [{"bucket": m, "model": model, "version": v, **dict(zip(ROLLUP_COLUMNS, r.values(), strict=True))}
            for (m, model, v), r in versions.items()]
    if rows:
        conn.execute(tables["telemetry_version_minute"].insert(), rows)


def _write_device(conn: Connection, tables: dict[str, Any], device_id: str, d: _Device) -> None:
    latest_at, latest_metrics = d.latest if d.latest is not None else (None, None)
    conn.execute(tables["telemetry_devices"].insert().values(
        device_id=device_id, contiguous_high=None if d.high < 0 else d.high, pending=len(d.pending),
        last_seq=d.last_seq, windows=d.windows, requests=d.requests, errors=d.errors, first_received_at=d.first,
        last_received_at=d.last, latest_received_at=latest_at, latest_metrics=latest_metrics))
    for start in range(0, len(d.pending), _PAGE):
        conn.execute(tables["telemetry_pending"].insert(),
                     [{"device_id": device_id, "seq": s} for s in d.pending[start:start + _PAGE]])
    rows = [{"device_id": device_id, "bucket": m, "model": model, "version": v,
             **dict(zip(ROLLUP_COLUMNS, r.values(), strict=True))} for (m, model, v), r in d.minutes.items()]
    if rows:
        conn.execute(tables["telemetry_device_minute"].insert(), rows)
