"""The telemetry rollups: reading them for a time window, and rolling closed hours up from minutes.

Four tables (:mod:`edgeml.fleet.store.schema`): per device and per version (``model``, ``version``), per minute and
per hour. Minute rows are written by the ingest transaction with the rows they count, so they are exact and
current; hour rows are written by maintenance (:mod:`~edgeml.fleet.telemetry.maintenance`) once an hour has closed,
as the sum of its minute rows (:func:`roll_hour`), and ``telemetry_jobs.done_until`` says up to where.

:func:`read_window` gives the rows of a window at a resolution. At the hour resolution, hours not rolled yet (the
current one, and any maintenance has not reached) come from their minute rows, so a window always ends now. Every
read is bounded by the window: the tables' ``bucket`` index (device tables) or key (version tables) finds it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeml.fleet.store import schema
from edgeml.fleet.store.db import as_utc
from edgeml.fleet.store.schema import sa
from edgeml.fleet.telemetry.figures import ROLLUP_COLUMNS, Rollup

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = ["HOUR", "JOB", "MINUTE", "Bucket", "read_window", "roll_hour", "rolled_until", "tables"]

MINUTE, HOUR = 60, 3600
#: The ``telemetry_jobs`` row of maintenance (its lease, and how far the hours are rolled).
JOB = "maintenance"


def tables(resolution: int) -> tuple[sa.Table, sa.Table]:
    """(device table, version table) of a resolution (:data:`MINUTE` or :data:`HOUR`)."""
    if resolution == MINUTE:
        return schema.telemetry_device_minute, schema.telemetry_version_minute
    return schema.telemetry_device_hour, schema.telemetry_version_hour


@dataclass(frozen=True)
class Bucket:
    """One rollup row of a window: ``device_id`` ('' on the version level), model, version, the bucket's start and
    length in seconds, and the columns asked for."""

    device_id: str
    model: str
    version: str
    start: dt.datetime
    seconds: int
    values: tuple[Any, ...]


def rolled_until(conn: Connection) -> dt.datetime | None:
    """Where the hour rollups end (every hour before it is rolled; None: none is)."""
    j = schema.telemetry_jobs
    return as_utc(conn.execute(sa.select(j.c.done_until).where(j.c.name == JOB)).scalar())


def read_window(conn: Connection, *, devices: bool, resolution: int, start: dt.datetime, end: dt.datetime,
                columns: Sequence[str], model: str | None = None) -> list[Bucket]:
    """The rollup rows of the buckets that overlap ``[start, end]``.

    Args:
        conn: A connection.
        devices: Per device (True) or per version.
        resolution: :data:`MINUTE` or :data:`HOUR`; hours not rolled yet are given as their minutes.
        start: The window's start (aware).
        end: Its end.
        columns: The value columns to give (names of :data:`~edgeml.fleet.telemetry.figures.ROLLUP_COLUMNS`).
        model: Only this model's rows.

    Raises:
        RegistryError: The database failed.
    """
    minutes_after = start - dt.timedelta(seconds=MINUTE)
    if resolution == MINUTE:
        return _read(conn, devices, MINUTE, minutes_after, end, columns, model)
    rolled = rolled_until(conn)
    if rolled is None:
        return _read(conn, devices, MINUTE, minutes_after, end, columns, model)
    hours = _read(conn, devices, HOUR, start - dt.timedelta(seconds=HOUR), end, columns, model, below=rolled)
    return hours + _read(conn, devices, MINUTE, minutes_after, end, columns, model, from_=rolled)


def _read(conn: Connection, devices: bool, resolution: int, after: dt.datetime, until: dt.datetime,
          columns: Sequence[str], model: str | None, *, below: dt.datetime | None = None,
          from_: dt.datetime | None = None) -> list[Bucket]:
    """Rows with ``after < bucket <= until``, and ``bucket < below``, and ``bucket >= from_``."""
    device_table, version_table = tables(resolution)
    t = device_table if devices else version_table
    where = (t.c.bucket > after) & (t.c.bucket <= until)
    if below is not None:
        where &= t.c.bucket < below
    if from_ is not None:
        where &= t.c.bucket >= from_
    if model is not None:
        where &= t.c.model == model
    key = t.c.device_id if devices else sa.literal("")
    query = sa.select(key, t.c.model, t.c.version, t.c.bucket, *(t.c[c] for c in columns)).where(where)
    return [Bucket(r[0], r[1], r[2], as_utc(r[3]), resolution, tuple(r[4:])) for r in conn.execute(query)]


def roll_hour(conn: Connection, hour: dt.datetime) -> int:
    """Write the hour rollups of ``hour`` (its start) from its minute rows, replacing any; returns the device rows.

    Raises:
        RegistryError: The database failed.
    """
    end = hour + dt.timedelta(seconds=HOUR)
    written = 0
    for minute_table, hour_table, keys in ((schema.telemetry_device_minute, schema.telemetry_device_hour,
                                            ("device_id", "model", "version")),
                                           (schema.telemetry_version_minute, schema.telemetry_version_hour,
                                            ("model", "version"))):
        sums: dict[tuple[str, ...], Rollup] = {}
        query = sa.select(minute_table).where((minute_table.c.bucket >= hour) & (minute_table.c.bucket < end))
        for row in conn.execute(query):
            sums.setdefault(tuple(getattr(row, k) for k in keys), Rollup()).merge(Rollup.of_row(row))
        conn.execute(hour_table.delete().where(hour_table.c.bucket == hour))
        if sums:
            conn.execute(hour_table.insert(), [{**dict(zip(keys, key, strict=True)), "bucket": hour,
                                                **dict(zip(ROLLUP_COLUMNS, r.values(), strict=True))}
                                               for key, r in sums.items()])
        if minute_table is schema.telemetry_device_minute:
            written = len(sums)
    return written
