"""Telemetry at fleet scale: the reads that must not grow with history, timed against stores of 100k to 10M rows.

For each store (SQLite in a temporary directory; PostgreSQL in a fresh schema of ``--db-url``) and each size, a
fresh database is filled with synthetic history for 1,000 enrolled devices reporting every 10 s up to now (rows in
the project's schema, bulk-inserted, not through MQTT: ``generate_series`` on PostgreSQL, ``executemany`` on
SQLite; the fleet moved from digits 1.0.0 to 1.1.0 twelve minutes ago). What the ingest transaction keeps besides
the rows (each device's books and running totals, the minute rollups) is derived from the rows in SQL, the hour
rollups by :class:`~edgeml.fleet.telemetry.maintenance.Maintenance`. A rollout of 1.1.0 to the 1,000 devices is
recorded, and a second fleet of 10,000 devices gets the minute rollups of a one-report-a-minute rollout 12 minutes
in (60 baseline minutes on 1.0.0, then 1.1.0): the rollout-signal read's goal is for 10,000 devices.

Timed, median of ``--repeat`` after one warm-up, in this process:

* the Prometheus scrape (``render``), one dashboard refresh (the 8 calls the page makes: overview, rollouts,
  devices, audit, four telemetry series of the last hour by version), the devices summary (``devices ls``), and a
  restarted worker's first read of 1,000 contiguous highs;
* the rollout-signal read, as the controller's watcher does it: the first read of a rollout (every device's
  history since the baseline), then the steady read every few seconds after (minutes that closed, and the open
  ones), for the 1,000-device and the 10,000-device rollouts; and the memory the 10,000-device reader keeps.

Then ingestion while retention runs (``--ingest``): :func:`benchmarks.ingest_bench.measure` against a store holding a
backlog of rows older than the retention, with maintenance running in a loop meanwhile; the ratio to a raw paho
subscriber measured in the same run (goal >= 0.7x, as in ``fleet_bench.py``).

Usage:  python benchmarks/telemetry_scale_bench.py [--rows 100000 1000000 10000000] [--backends sqlite postgresql]
            [--db-url postgresql+psycopg://postgres@127.0.0.1:5432/test] [--repeat 5] [--ingest] [--out FILE]
        python benchmarks/telemetry_scale_bench.py --merge LOG [LOG ...] --out FILE   (the table of earlier runs)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.*: ingest_bench

import sqlalchemy as sa

from benchmarks import ingest_bench
from edgeml.fleet.audit.log import AuditLog
from edgeml.fleet.rollouts.rules import RolloutOptions
from edgeml.fleet.rollouts.signals import Judged, RolloutSignals
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import Database, as_utc
from edgeml.fleet.telemetry.figures import ROLLUP_COLUMNS as _ROLLUP_COLUMNS
from edgeml.fleet.telemetry.maintenance import Maintenance, RetentionSettings
from edgeml.fleet.telemetry.store import TelemetryStore
from edgeml.fleet.web.metrics import render
from edgeml.fleet.web.views import audit_entries, device_list, fleet_overview, rollout_waves, telemetry_series
from edgeml.protocol import Telemetry

GOAL_MS = 100.0  # each read at 10M rows on PostgreSQL
GOAL_FLAT = 2.0  # and within this factor from the smallest size to the largest
GOAL_SIGNALS_MS = 200.0  # the rollout-signal read of a 10,000-device rollout
GOAL_INGEST = ingest_bench.GOAL
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEVICES = 1000  # the enrolled fleet whose history fills the store
INTERVAL_S = 10.0  # each of them reports this often
ROLLOUT_MINUTES = 12  # the fleet moved to 1.1.0 this long ago; the 10,000-device rollout started this long ago
_CHUNK = 50_000  # rows per executemany (SQLite)


# --- filling a store ----------------------------------------------------------------------------------------


def _metrics(d: int, s: int, version: str) -> dict[str, Any]:
    """What an agent reports every window (edge_agent/telemetry.py's shape), varied by device and seq."""
    requests = 40 + (d * 7 + s * 13) % 60
    errors = 1 if (d + s) % 7 == 0 else 0
    p50 = 2.0 + (d * 3 + s * 5) % 100 / 100
    p99 = p50 * (3.6 if version == "1.1.0" else 3.0)
    return {"window_s": INTERVAL_S, "requests": requests, "errors": errors, "error_rate": errors / requests,
            "latency_p50_ms": p50, "latency_p95_ms": p99 * 0.9, "latency_p99_ms": p99, "model": "digits",
            "version": version, "slot": "a", "status": "serving",
            "drift": {"score": (d * 11 + s * 17) % 100 / 1000, "flagged": False, "n": 256}}


def fill_fleet(db: Database, rows: int, end: dt.datetime) -> None:
    """``rows`` rows of history for :data:`DEVICES` enrolled devices, one every :data:`INTERVAL_S` up to ``end``."""
    per = -(-rows // DEVICES)
    first = end - dt.timedelta(seconds=INTERVAL_S * per)
    switch = end - dt.timedelta(minutes=ROLLOUT_MINUTES)
    devices = schema.devices
    with db.transaction() as conn:
        conn.execute(devices.insert(), [{"device_id": f"dev-{d:05d}", "revoked": False, "status": "serving",
                                         "installed": {"digits": "1.1.0"}, "last_seen": end, "tags": {"site": "b"}}
                                        for d in range(DEVICES)])
    if db.engine.dialect.name == "postgresql":
        days = (end.date() - first.date()).days + 1
        Maintenance(db).create_partitions(first.date() + dt.timedelta(days=k) for k in range(days))
        _fill_postgresql(db, per, end, switch)
        return
    from edgeml.fleet.telemetry.writers import bind

    when = bind(schema.telemetry.c.received_at, db.engine.dialect)

    def rows_of() -> Iterator[tuple[Any, ...]]:
        for s in range(per):
            for d in range(DEVICES):
                at = end - dt.timedelta(seconds=INTERVAL_S * (per - 1 - s), milliseconds=5 * d)
                yield (f"dev-{d:05d}", s, at.timestamp(), when(at),
                       json.dumps(_metrics(d, s, "1.1.0" if at >= switch else "1.0.0")))

    batch: list[tuple[Any, ...]] = []
    for row in rows_of():
        batch.append(row)
        if len(batch) == _CHUNK:
            _insert_sqlite(db, batch)
            batch = []
    if batch:
        _insert_sqlite(db, batch)


def _insert_sqlite(db: Database, rows: list[tuple[Any, ...]]) -> None:
    with db.transaction() as conn:
        conn.exec_driver_sql("INSERT INTO telemetry (device_id, seq, sent_at, received_at, metrics) "
                             "VALUES (?, ?, ?, ?, ?)", rows)


def _fill_postgresql(db: Database, per: int, end: dt.datetime, switch: dt.datetime) -> None:
    """The same rows as SQLite's, made by the server (``generate_series``) one day of seqs at a time."""
    step = 8640  # seqs per statement (a day at 10 s)
    for low in range(0, per, step):
        with db.transaction() as conn:
            conn.exec_driver_sql(
                "INSERT INTO telemetry (device_id, seq, sent_at, received_at, metrics) "
                "SELECT 'dev-' || lpad(d::text, 5, '0'), s, extract(epoch FROM t), t, json_build_object("
                "'window_s', %(interval)s, 'requests', r, 'errors', e, 'error_rate', e::float8 / r, "
                "'latency_p50_ms', p50, 'latency_p95_ms', p50 * k * 0.9, 'latency_p99_ms', p50 * k, "
                "'model', 'digits', 'version', v, 'slot', 'a', 'status', 'serving', 'drift', json_build_object("
                "'score', ((d * 11 + s * 17) %% 100) / 1000.0, 'flagged', false, 'n', 256)) "
                "FROM generate_series(0, %(devices)s - 1) d, generate_series(%(low)s, %(high)s - 1) s, "
                "LATERAL (SELECT %(end)s - (%(per)s - 1 - s) * interval '10 seconds' - d * interval '5 ms' AS t) a, "
                "LATERAL (SELECT 40 + (d * 7 + s * 13) %% 60 AS r, CASE WHEN (d + s) %% 7 = 0 THEN 1 ELSE 0 END AS e, "
                "2.0 + ((d * 3 + s * 5) %% 100) / 100.0 AS p50, CASE WHEN t >= %(switch)s THEN '1.1.0' ELSE "
                "'1.0.0' END AS v, CASE WHEN t >= %(switch)s THEN 3.6 ELSE 3.0 END AS k) b",
                {"interval": INTERVAL_S, "devices": DEVICES, "low": low, "high": min(per, low + step), "end": end,
                 "per": per, "switch": switch})


def derive(db: Database) -> None:
    """What the ingest transaction would have kept, from the rows in SQL: each device's books and totals (every
    seq from 0 is stored), its latest window, and the minute rollups per device and per version."""
    pg = db.engine.dialect.name == "postgresql"
    # PostgreSQL: each row's json parsed once (as jsonb), not once per value; SQLite's json_extract is cheap
    num = (lambda path: f"(metrics #>> '{{{','.join(path)}}}')::float8") if pg else \
        (lambda path: f"json_extract(metrics, '$.{'.'.join(path)}')")
    text = (lambda key: f"coalesce(metrics ->> '{key}', '')") if pg else \
        (lambda key: f"coalesce(json_extract(metrics, '$.{key}'), '')")
    rows = "(SELECT device_id, seq, received_at, metrics::jsonb AS metrics FROM telemetry) t" if pg else "telemetry"
    minute = "date_trunc('minute', received_at)" if pg else "strftime('%Y-%m-%d %H:%M:00.000000', received_at)"
    values = (f"SELECT device_id, received_at, {minute} AS bucket, {text('model')} AS model, {text('version')} AS "
              f"version, {num(['requests'])} AS req, {num(['errors'])} AS err, {num(['latency_p50_ms'])} AS p50, "
              f"{num(['latency_p99_ms'])} AS p99, {num(['error_rate'])} AS er, {num(['drift', 'score'])} AS drift "
              f"FROM {rows}")
    sums = ("count(*), coalesce(sum(req), 0), coalesce(sum(err), 0), coalesce(sum(p50), 0), count(p50), "
            "coalesce(sum(p99), 0), count(p99), coalesce(sum(CASE WHEN req > 0 THEN p99 END), 0), "
            "count(CASE WHEN req > 0 THEN p99 END), coalesce(sum(er), 0), count(er), coalesce(sum(drift), 0), "
            "count(drift), max(p99), max(drift), max(drift), max(received_at)")  # drift_last: max, not the latest
    columns = "windows, requests, errors, p50_sum, p50_n, p99_sum, p99_n, sp99_sum, sp99_n, err_sum, err_n, " \
              "drift_sum, drift_n, p99_max, drift_max, drift_last, drift_at"
    with db.transaction() as conn:
        if pg:  # the groups in memory rather than spilled to disk (10M rows: 31 min with the default 4 MB)
            conn.exec_driver_sql("SET LOCAL work_mem = '512MB'")
        conn.exec_driver_sql(f"INSERT INTO telemetry_device_minute (device_id, bucket, model, version, {columns}) "
                             f"SELECT device_id, bucket, model, version, {sums} FROM ({values}) x "
                             "GROUP BY device_id, bucket, model, version")
        merged = ", ".join(f"max({c})" if c in ("p99_max", "drift_max", "drift_last", "drift_at") else f"sum({c})"
                           for c in columns.split(", "))
        conn.exec_driver_sql(f"INSERT INTO telemetry_version_minute (bucket, model, version, {columns}) "
                             f"SELECT bucket, model, version, {merged} FROM telemetry_device_minute "
                             "GROUP BY bucket, model, version")
        conn.exec_driver_sql(
            "INSERT INTO telemetry_devices (device_id, contiguous_high, pending, last_seq, windows, requests, errors, "
            "first_received_at, last_received_at, latest_received_at) SELECT device_id, max(seq), 0, max(seq), "
            f"count(*), sum({num(['requests'])}), sum({num(['errors'])}), min(received_at), max(received_at), "
            f"max(received_at) FROM {rows} GROUP BY device_id")
        conn.exec_driver_sql("UPDATE telemetry_devices SET latest_metrics = (SELECT metrics FROM telemetry t WHERE "
                             "t.device_id = telemetry_devices.device_id ORDER BY received_at DESC LIMIT 1)")
        if pg:
            conn.exec_driver_sql("ANALYZE")


def record_rollout(db: Database, now: dt.datetime) -> None:
    """A completed rollout of 1.1.0 to the fleet (what the dashboard's rollout list shows)."""
    started = now - dt.timedelta(minutes=ROLLOUT_MINUTES)
    options = RolloutOptions(targets=("onnx-fp32",), canary=0.05, waves=(0.5, 1.0)).to_dict()
    with db.transaction() as conn:
        conn.execute(schema.rollouts.insert().values(
            id="ro-bench", kind="rollout", model="digits", version="1.1.0", options=options, state="completed",
            current_wave=2, created_by="bench", created_at=started, updated_at=now))
        conn.execute(schema.rollout_devices.insert(), [
            {"rollout_id": "ro-bench", "device_id": f"dev-{d:05d}", "wave": 0 if d < 50 else 1 if d < 500 else 2,
             "target": "onnx-fp32", "previous": "1.0.0", "state": "committed", "notified_at": started,
             "finished_at": started} for d in range(DEVICES)])


def fill_rollout_minutes(db: Database, n: int, now: dt.datetime) -> dt.datetime:
    """Minute rollups of ``n`` more devices in a rollout :data:`ROLLOUT_MINUTES` in, one report a minute: an hour of
    baseline on 1.0.0, then 1.1.0 from the minute after it started. Returns when it started."""
    started = now - dt.timedelta(minutes=ROLLOUT_MINUTES)
    first = started - dt.timedelta(minutes=60)
    minutes = [first + dt.timedelta(minutes=m) for m in range(60 + ROLLOUT_MINUTES + 1)]
    from edgeml.fleet.telemetry.figures import Figures, Rollup, floor_time

    rows = []
    for i in range(n):
        for at in minutes:
            version = "1.1.0" if at > started else "1.0.0"
            rollup = Rollup()
            p99 = 6.0 + i % 10 / 10 + (1.5 if version == "1.1.0" else 0.0)
            rollup.add(Figures("digits", version, 60.0, float(i % 3 == 0), 2.0, p99, 0.01, 0.02), at)
            rows.append({"device_id": f"ro-{i:05d}", "bucket": floor_time(at, 60), "model": "digits",
                         "version": version, **dict(zip(_ROLLUP_COLUMNS, rollup.values(), strict=True))})
        if len(rows) >= _CHUNK or i == n - 1:
            with db.transaction() as conn:
                conn.execute(schema.telemetry_device_minute.insert(), rows)
            rows = []
    last = len(minutes) - 1  # the books of a device that sent one window a minute, seq 0 on
    with db.transaction() as conn:
        conn.execute(schema.telemetry_devices.insert(), [
            {"device_id": f"ro-{i:05d}", "contiguous_high": last, "last_seq": last, "windows": last + 1,
             "requests": 60.0 * (last + 1), "errors": 0.0, "first_received_at": minutes[0],
             "last_received_at": minutes[-1], "latest_received_at": minutes[-1]} for i in range(n)])
    return started


# --- timing -------------------------------------------------------------------------------------------------


@contextmanager
def fresh_store(backend: str, base_url: str) -> Iterator[tuple[Database, str]]:
    """A new, empty database: SQLite in a temporary directory, or a new schema of ``base_url`` (dropped after)."""
    if backend == "sqlite":
        root = Path(tempfile.mkdtemp(prefix="edgeml-scale-"))
        url = f"sqlite:///{root / 'fleet.db'}"
        db = Database(url)
        try:
            db.create()
            yield db, url
        finally:
            db.close()
            shutil.rmtree(root, ignore_errors=True)
        return
    import sqlalchemy as sa

    name = f"edgeml_scale_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    url = f"{base_url}?options=-csearch_path%3D{name}"
    db = Database(url)
    try:
        db.create()
        yield db, url
    finally:
        db.close()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        admin.dispose()


@contextmanager
def kept_store(backend: str, base_url: str, rows: int) -> Iterator[tuple[Database, str, bool]]:
    """The store of ``rows`` rows that ``--keep`` leaves in place for a later run (a PostgreSQL schema
    ``edgeml_scale_keep_<rows>``, or ``edgeml-scale-keep/<rows>.db`` in the temporary directory):
    ``(db, url, filled)``, ``filled`` False when it is new (then fill it)."""
    if backend == "sqlite":
        root = Path(tempfile.gettempdir()) / "edgeml-scale-keep"
        root.mkdir(exist_ok=True)
        url = f"sqlite:///{root / f'{rows}.db'}"
    else:
        name = f"edgeml_scale_keep_{rows}"
        admin = sa.create_engine(base_url)
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{name}"')
        admin.dispose()
        url = f"{base_url}?options=-csearch_path%3D{name}"
    db = Database(url)
    try:
        db.create()
        with db.transaction() as conn:  # the last step of a fill: the rollout recorded
            filled = conn.execute(sa.select(sa.func.count()).select_from(schema.rollouts)
                                  .where(schema.rollouts.c.id == "ro-bench")).scalar() == 1
        yield db, url, filled
    finally:
        db.close()


def catch_up(db: Database, now: dt.datetime) -> int:
    """The fleet's reports from the store's newest row until ``now`` (at most the last hour), one every
    :data:`INTERVAL_S` per device, stored as ingestion stores them (rows, books, minute rollups): a store filled
    a while ago then holds what a live fleet's would in the windows the reads look at (the scrape's last 5
    minutes, the dashboard's last hour). Returns the rows stored."""
    t = schema.telemetry_devices
    with db.transaction() as conn:
        books = {d: (int(s), as_utc(at)) for d, s, at in conn.execute(
            sa.select(t.c.device_id, t.c.last_seq, t.c.last_received_at).where(t.c.device_id.like("dev-%")))}
    if not books:
        return 0
    newest = max(at for _, at in books.values())
    step = dt.timedelta(seconds=INTERVAL_S)
    at, k, stored = max(newest + step, now - dt.timedelta(hours=1)), 1, 0
    store = TelemetryStore(db)
    while at <= now:
        batch = [Telemetry(d, seq + k, at.timestamp(), _metrics(int(d[4:]), seq + k, "1.1.0"))
                 for d, (seq, _) in sorted(books.items())]
        stored += store.insert_batch(batch, received_at=at)
        at, k = at + step, k + 1
    return stored


def _ms(fn: Callable[[], Any], repeat: int) -> float:
    """Median milliseconds of ``fn`` over ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def dashboard_refresh(db: Database, audit: AuditLog) -> None:
    """The 8 calls of one refresh of the dashboard page (fleet/web/static/app.js), as its routes make them."""
    fleet_overview(db)
    rollout_waves(db)
    device_list(db)
    audit_entries(audit, 50)
    for metric in ("latency_p50_ms", "latency_p99_ms", "error_rate", "drift.score"):
        telemetry_series(db, metric, by="version", since_s=3600)


def _signal_reads(db: Database, judged: list[Judged], started: dt.datetime, repeat: int) -> dict[str, float]:
    """The first read of a rollout's signals, then the steady one (median), in ms. Before each steady read, a
    twelfth of the devices report a window through the store (untimed): what 5 s bring at one report a minute."""
    reader = RolloutSignals(db, "1.1.0", started)
    began = time.perf_counter()
    first = reader.read(judged)
    cold = (time.perf_counter() - began) * 1000
    assert len(first) == len(judged), f"signals of {len(first)} of {len(judged)} devices"
    store, ids = TelemetryStore(db), [j.device_id for j in judged]
    t = schema.telemetry_devices
    with db.transaction() as conn:
        seqs = {d: int(s) for d, s in conn.execute(sa.select(t.c.device_id, t.c.last_seq)
                                                  .where(t.c.device_id.like(ids[0][:3] + "%")))}
    times = []
    for k in range(repeat + 1):
        batch = ids[k % 12::12]
        store.insert_batch([Telemetry(i, seqs[i] + 1 + k, time.time(), _metrics(n, seqs[i] + 1 + k, "1.1.0"))
                            for n, i in enumerate(batch)])
        began = time.perf_counter()
        reader.read(judged)
        times.append((time.perf_counter() - began) * 1000)
    return {"first": cold, "steady": statistics.median(times[1:])}


def _reader_memory(db: Database, judged: list[Judged], started: dt.datetime) -> tuple[float, float]:
    """MiB the reader keeps after its first read, and the peak of a steady read (tracemalloc)."""
    tracemalloc.start()
    reader = RolloutSignals(db, "1.1.0", started)
    reader.read(judged)
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    reader.read(judged)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return kept / 2**20, peak / 2**20


def disk_bytes(db: Database, url: str) -> dict[str, int]:
    """Bytes on disk: the raw rows (table and indexes), the minute and hour rollups, and everything."""
    if db.engine.dialect.name == "sqlite":
        path = Path(db.engine.url.database or "")
        sizes = {"total": sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))}
        try:
            with db.engine.connect() as conn:
                rows = conn.exec_driver_sql("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").all()
            by = dict(rows)
            sizes["raw"] = sum(v for k, v in by.items() if k == "telemetry" or k.startswith("telemetry_device_time"))
            sizes["minutes"] = sum(v for k, v in by.items() if "minute" in k)
            sizes["hours"] = sum(v for k, v in by.items() if "_hour" in k)
        except Exception:  # dbstat is an optional SQLite module
            pass
        return sizes
    with db.engine.connect() as conn:
        def size(where: str) -> int:
            return int(conn.exec_driver_sql(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace n ON "
                f"n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r' AND {where}").scalar())
        return {"raw": size("(c.relname = 'telemetry_default' OR c.relname LIKE 'telemetry\\_p%%')"),
                "minutes": size("c.relname LIKE '%%minute'"), "hours": size("c.relname LIKE '%%\\_hour'"),
                "total": size("true")}


def measure(backend: str, rows: int, base_url: str, repeat: int, rollout_devices: int) -> dict[str, Any]:
    """Fill one fresh store with ``rows`` rows and time every read; the measurements."""
    now = dt.datetime.now(dt.timezone.utc)
    out: dict[str, Any] = {"backend": backend, "rows": rows}
    with fresh_store(backend, base_url) as (db, url):
        began = time.perf_counter()
        fill_fleet(db, rows, now)
        out["fill_s"] = time.perf_counter() - began
        began = time.perf_counter()
        derive(db)
        Maintenance(db, RetentionSettings(raw_s=0, minute_s=0, hour_s=0, pause_s=0)).run_once()  # the hours
        record_rollout(db, now)
        out["derive_s"] = time.perf_counter() - began
        out["disk"] = disk_bytes(db, url)
        audit, store = AuditLog(db, None), TelemetryStore(db)
        fleet = [f"dev-{d:05d}" for d in range(DEVICES)]
        out["scrape_ms"] = _ms(lambda: render(db), repeat)
        out["dashboard_ms"] = _ms(lambda: dashboard_refresh(db, audit), repeat)
        out["summary_ms"] = _ms(store.devices_summary, repeat)
        out["highs_ms"] = _ms(lambda: TelemetryStore(db).contiguous_highs(fleet), repeat)
        fleet_started = now - dt.timedelta(minutes=ROLLOUT_MINUTES)
        judged = [Judged(d, "1.0.0", fleet_started) for d in fleet]
        out["signals_1k"] = _signal_reads(db, judged, fleet_started, repeat)
        started = fill_rollout_minutes(db, rollout_devices, now)  # after the fleet's reads: not part of the fleet
        many = [Judged(f"ro-{i:05d}", "1.0.0", started) for i in range(rollout_devices)]
        out["signals_10k"] = _signal_reads(db, many, started, repeat)
        out["signals_10k_mib"] = _reader_memory(db, many, started)
    return out


def interleaved(backend: str, sizes: list[int], base_url: str, repeat: int, keep: bool = False) -> list[dict[str, Any]]:
    """The scrape, a dashboard refresh, the devices summary and a restarted worker's highs of one store per size,
    timed in turns (one call of each read on each store per round, ``repeat`` rounds after a warm-up one), so that
    whatever else loads the machine weighs on every size alike: on a shared machine the flatness goal compares
    like with like only so. Every store first catches up with the clock (:func:`catch_up`: the larger ones take
    half an hour to fill). ``keep``: the stores of :func:`kept_store`, filled only when new and left for the next
    run. Returns one result per size (medians, ms)."""
    from contextlib import ExitStack

    fleet = [f"dev-{d:05d}" for d in range(DEVICES)]
    with ExitStack() as stack:
        stores = []
        for rows in sizes:
            if keep:
                db, _, filled = stack.enter_context(kept_store(backend, base_url, rows))
            else:
                db, _ = stack.enter_context(fresh_store(backend, base_url))
                filled = False
            if not filled:
                began, now = time.perf_counter(), dt.datetime.now(dt.timezone.utc)
                fill_fleet(db, rows, now)
                derive(db)
                Maintenance(db, RetentionSettings(raw_s=0, minute_s=0, hour_s=0, pause_s=0)).run_once()
                record_rollout(db, now)
                print(f"{backend} {rows:,} rows filled in {time.perf_counter() - began:.0f} s", file=sys.stderr,
                      flush=True)
            stores.append((rows, db))
        caught = {rows: catch_up(db, dt.datetime.now(dt.timezone.utc)) for rows, db in stores}
        timed = []
        for rows, db in stores:
            audit, store = AuditLog(db, None), TelemetryStore(db)
            reads = {"scrape_ms": lambda db=db: render(db),
                     "dashboard_ms": lambda db=db, audit=audit: dashboard_refresh(db, audit),
                     "summary_ms": store.devices_summary,
                     "highs_ms": lambda db=db: TelemetryStore(db).contiguous_highs(fleet)}
            timed.append((rows, reads, {k: [] for k in reads}))
        for round_ in range(repeat + 1):
            for _, reads, times in timed:
                for key, fn in reads.items():
                    began = time.perf_counter()
                    fn()
                    if round_:
                        times[key].append((time.perf_counter() - began) * 1000)
        return [{"backend": backend, "rows": rows, "interleaved": True, "load": os.getloadavg()[0],
                 "caught_up": caught[rows], **{k: statistics.median(v) if v else None for k, v in times.items()}}
                for rows, _, times in timed]


def ingest_during_retention(backend: str, base_url: str, backlog: int) -> dict[str, Any]:
    """:func:`ingest_bench.measure` on a store with ``backlog`` rows past the retention, maintenance looping."""
    with fresh_store(backend, base_url) as (db, url):
        fill_fleet(db, backlog, dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10))
        derive(db)
        stop, reports = threading.Event(), []
        maintenance = Maintenance(db, RetentionSettings(raw_s=7 * 86400, pause_s=0.02))

        def loop() -> None:
            while not stop.is_set():
                reports.append(maintenance.run_once())

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            result = ingest_bench.measure(100, 100, url, workers=1)
        finally:
            stop.set()
            maintenance._stop.set()  # ends the run in progress after its current transaction
            thread.join(120)
        result["retention_deleted"] = sum(r.raw_deleted for r in reports)
        result["partitions_dropped"] = sum(len(r.partitions_dropped) for r in reports)
        result["retention_runs"] = len(reports)
        result["backlog"] = backlog
    return result


def _per_row(size: int | None, rows: int) -> str:
    return f"{size / rows:,.0f} B" if size else "-"


def _fmt_ms(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def table(results: list[dict[str, Any]], ingest: list[dict[str, Any]]) -> str:
    """The measurements as markdown, with the goals."""
    lines = [f"{os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d')}; {DEVICES:,} devices reporting every {INTERVAL_S:g} s; milliseconds, "
             "median of the repeats.", "",
             "| store | rows | /metrics scrape | dashboard refresh (8 calls) | devices summary | restarted worker's "
             "1,000 highs | rollout signals, 1,000 devices: first / steady | rollout signals, 10,000 devices: first "
             "/ steady | disk per raw row |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        raw = r["disk"].get("raw")
        lines.append(
            f"| {r['backend']} | {r['rows']:,} | {_fmt_ms(r['scrape_ms'])} | {_fmt_ms(r['dashboard_ms'])} | "
            f"{_fmt_ms(r['summary_ms'])} | {_fmt_ms(r['highs_ms'])} | {_fmt_ms(r['signals_1k']['first'])} / "
            f"{_fmt_ms(r['signals_1k']['steady'])} | {_fmt_ms(r['signals_10k']['first'])} / "
            f"{_fmt_ms(r['signals_10k']['steady'])} | {_per_row(raw, r['rows'])} |")
    lines += ["", *_verdicts(results)]
    for r in results:
        kept, peak = r["signals_10k_mib"]
        lines.append(f"- {r['backend']} {r['rows']:,} rows: filled in {r['fill_s']:.0f} s, derived in "
                     f"{r['derive_s']:.0f} s; 10,000-device signal reader keeps {kept:.1f} MiB, a steady read peaks at "
                     f"{peak:.1f} MiB; disk {json.dumps({k: f'{v / 2**20:,.0f} MiB' for k, v in r['disk'].items()})}")
    for i in ingest:
        dropped = f", {i['partitions_dropped']} daily partitions dropped" if i.get("partitions_dropped") else ""
        lines.append(f"- ingestion into {i['backend']} while retention runs ({i['backlog']:,} rows past the retention, "
                     f"{i['retention_deleted']:,} deleted one by one meanwhile{dropped}, in {i['retention_runs']} "
                     "runs): "
                     f"{10000 / i['ingest_s']:,.0f} msg/s against a raw paho subscriber's {10000 / i['raw_s']:,.0f}: "
                     f"{i['ratio']:.2f}x (goal >= {GOAL_INGEST:.2f}x: "
                     f"{'met' if i['ratio'] >= GOAL_INGEST else 'MISSED'})")
    return "\n".join(lines) + "\n"


def _verdicts(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for backend in sorted({r["backend"] for r in results}):
        mine = sorted((r for r in results if r["backend"] == backend), key=lambda r: r["rows"])
        small, large = mine[0], mine[-1]
        for key, name in (("scrape_ms", "scrape"), ("dashboard_ms", "dashboard refresh"),
                          ("summary_ms", "devices summary"), ("highs_ms", "restarted worker's highs")):
            flat = large[key] / small[key]
            goal = f"<= {GOAL_MS:.0f} ms at {large['rows']:,}: {'met' if large[key] <= GOAL_MS else 'MISSED'}; " \
                if backend == "postgresql" else ""
            out.append(f"- {backend} {name}: {goal}{small['rows']:,} -> {large['rows']:,} rows "
                       f"{flat:.2f}x (goal <= {GOAL_FLAT:g}x: {'met' if flat <= GOAL_FLAT else 'MISSED'})")
        steady = large["signals_10k"]["steady"]
        out.append(f"- {backend} rollout-signal read, 10,000 devices, steady: {_fmt_ms(steady)} ms (goal <= "
                   f"{GOAL_SIGNALS_MS:.0f} ms: {'met' if steady <= GOAL_SIGNALS_MS else 'MISSED'})")
    return out


def _reachable(url: str) -> bool:
    try:
        engine = sa.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except sa.exc.SQLAlchemyError as exc:
        print(f"PostgreSQL at {url} cannot be reached, skipped: {str(exc).splitlines()[0]}", file=sys.stderr)
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--backends", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite", "postgresql"])
    parser.add_argument("--db-url", default=POSTGRES, help="PostgreSQL server (a schema is made per store)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rollout-devices", type=int, default=10_000)
    parser.add_argument("--ingest", action="store_true", help="also measure ingestion while retention runs")
    parser.add_argument("--ingest-only", action="store_true", help="measure only ingestion while retention runs")
    parser.add_argument("--interleaved", action="store_true",
                        help="only the four fleet reads, every size's store filled first and timed in turns")
    parser.add_argument("--keep", action="store_true",
                        help="with --interleaved: fill the stores only where an earlier --keep run did not, and "
                             "leave them for the next (drop them yourself: PostgreSQL schemas edgeml_scale_keep_*, "
                             "SQLite files in $TMPDIR/edgeml-scale-keep); --repeat 0 only fills them")
    parser.add_argument("--backlog", type=int, default=300_000, help="rows past the retention for --ingest")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="LOG",
                        help="measure nothing: the table of the JSON lines earlier runs printed (runs of one size "
                             "each, e.g. 100k and 1M first, 10M later)")
    args = parser.parse_args()
    results, ingest = [], []
    if args.merge:
        for line in (ln for log in args.merge for ln in log.read_text().splitlines() if ln.startswith("{")):
            result = json.loads(line)
            (ingest if "ingest_s" in result else results).append(result)
        results.sort(key=lambda r: (r["backend"], r["rows"]))
        args.backends = []  # measured already
    for backend in [b for b in args.backends if b == "sqlite" or _reachable(args.db_url)]:
        if args.interleaved:
            for result in interleaved(backend, sorted(args.rows), args.db_url, args.repeat, args.keep):
                print(json.dumps(result), flush=True)
            continue
        for rows in [] if args.ingest_only else sorted(args.rows):
            result = measure(backend, rows, args.db_url, args.repeat, args.rollout_devices)
            print(json.dumps(result, default=str), flush=True)
            results.append(result)
        if args.ingest or args.ingest_only:
            result = ingest_during_retention(backend, args.db_url, args.backlog)
            print(json.dumps(result, default=str), flush=True)
            ingest.append(result)
    text = table(results, ingest)
    print(text)
    if args.out:
        args.out.write_text("# Telemetry at scale\n\n" + text)


if __name__ == "__main__":
    main()
