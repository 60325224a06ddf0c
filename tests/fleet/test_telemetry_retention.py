"""Telemetry retention on SQLite and a real PostgreSQL, with a real Mosquitto where acknowledgements are concerned.

Retention deletes raw rows (on PostgreSQL it drops whole days' partitions) and old rollups, and never what
acknowledgements and exactly-once storage stand on: a device whose rows were all deleted keeps getting exact acks
from a freshly started worker, and nothing it resends is stored twice. Counters on ``/metrics`` never go down.
One process at a time runs maintenance (a lease), and concurrent writers never store a row twice.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from edgeml.errors import ConfigError
from edgeml.fleet.store.db import Database, as_utc
from edgeml.fleet.telemetry.ingest import IngestSettings, IngestWorker
from edgeml.fleet.telemetry.maintenance import Maintenance, RetentionSettings, parse_duration, partition_name
from edgeml.fleet.telemetry.store import TelemetryStore
from edgeml.fleet.web.metrics import render
from edgeml.protocol import Telemetry
from tests.fleet.mosquitto import anonymous_mosquitto
from tests.fleet.telemetry_data import raw_rows
from tests.fleet.test_ingest import Device, enroll, stored_seqs, tel, wait_for

FAST = IngestSettings(flush_ms=20, reconnect_min_s=0.1, reconnect_max_s=0.5)
WEEK = RetentionSettings(raw_s=7 * 86400, minute_s=30 * 86400, hour_s=90 * 86400, pause_s=0, chunk_rows=7)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.create()
    yield database
    database.close()


def _later(days: float) -> Callable[[], dt.datetime]:
    return lambda: dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)


def _partitions(db: Database) -> set[str]:
    with db.transaction() as conn:
        return set(conn.exec_driver_sql("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                        "WHERE i.inhparent = 'telemetry'::regclass").scalars())


# --- acknowledgements across retention and a restart --------------------------------------------------------


def test_a_device_whose_rows_were_deleted_keeps_exact_acks_after_a_worker_restart(db: Database, db_url: str) -> None:
    with anonymous_mosquitto() as (port, _):
        enroll(db, "cam-1")
        device = Device("cam-1", port)
        try:
            with IngestWorker(db_url, "127.0.0.1", port, settings=FAST):
                device.send(50)
                wait_for(device.drained, what="the first 50 acknowledged")
            if db.engine.dialect.name == "postgresql":  # today's rows move from the default partition to today's
                assert partition_name(dt.datetime.now(dt.timezone.utc).date()) in \
                    Maintenance(db, WEEK).run_once().partitions_created
            report = Maintenance(db, WEEK, clock=_later(8)).run_once()  # a week and a day later: all of them old
            assert stored_seqs(db, "cam-1") == []
            assert report.raw_deleted + (50 if report.partitions_dropped else 0) == 50
            assert TelemetryStore(db).contiguous_high("cam-1") == 49  # the books are not the rows

            with IngestWorker(db_url, "127.0.0.1", port, settings=FAST) as worker:  # a fresh worker: nothing cached
                acks_before = len(device.acks)
                device.resend(range(40, 50))  # the device was unsure of these: they are duplicates, acked again
                wait_for(lambda: worker.stats()["duplicates"] == 10 and len(device.acks) > acks_before,
                         what="the resent entries acknowledged")
                assert device.acked() == 49
                device.send(10, hold=(55,))  # 50..59 with 55 lost on the way: the ack stops below the gap
                wait_for(lambda: worker.stats()["stored"] == 9 and device.acked() == 54, what="the ack up to 54")
                device.resend([55])
                wait_for(device.drained, what="the ack past the gap")
                stats = worker.stats()
        finally:
            device.close()
    assert device.acked() == 59 and max(device.acks) == 59
    assert stored_seqs(db, "cam-1") == list(range(50, 60))  # nothing resent was stored again
    assert (stats["stored"], stats["duplicates"]) == (10, 10)
    [summary] = TelemetryStore(db).devices_summary()
    assert (summary["telemetry_rows"], summary["last_seq"], summary["contiguous_high"]) == (60, 59, 59)


def test_retention_keeps_the_seqs_above_a_gap(db: Database) -> None:
    store = TelemetryStore(db)
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    assert store.insert_batch([tel("cam-1", s) for s in (0, 1, 2, 4, 5, 7)], received_at=old) == 6
    Maintenance(db, WEEK).run_once()
    assert stored_seqs(db, "cam-1") == []
    assert store.insert_batch([tel("cam-1", s) for s in (1, 4, 5, 7)]) == 0  # stored before: dropped
    assert store.contiguous_high("cam-1") == 2
    assert TelemetryStore(db).insert_batch([tel("cam-1", 3)]) == 1  # the gap fills: the high runs past 4 and 5
    assert TelemetryStore(db).contiguous_highs(["cam-1"]) == {"cam-1": 5}
    assert store.insert_batch([tel("cam-1", 6), tel("cam-1", 7), tel("cam-1", 8)]) == 2
    assert store.contiguous_high("cam-1") == 8 and stored_seqs(db, "cam-1") == [3, 6, 8]
    with db.transaction() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(db.tables["telemetry_pending"])).scalar() == 0


# --- exactly once with writers at once --------------------------------------------------------------------------


def test_two_writers_at_once_store_each_row_once(db: Database) -> None:
    """Two stores (two connections, as two ingest workers) write overlapping batches of the same devices at once."""
    devices = [f"cam-{i}" for i in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def write(offset: int) -> None:
        store = TelemetryStore(db)
        try:
            start.wait()
            for base in range(0, 120, 10):
                batch = [tel(d, s) for d in devices for s in range(base + offset, base + offset + 15)]
                store.store_batch(batch[::-1] if offset else batch)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(o,)) for o in (0, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    rows = raw_rows(db)
    assert len(rows) == len({(r["device_id"], r["seq"]) for r in rows}) == 8 * 130
    assert TelemetryStore(db).contiguous_highs(devices) == dict.fromkeys(devices, 129)
    assert {s["device_id"]: s["telemetry_rows"] for s in TelemetryStore(db).devices_summary()} == \
        dict.fromkeys(devices, 130)


# --- /metrics across retention ------------------------------------------------------------------------------


def _counters(db: Database) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(render(db).decode()):
        for sample in family.samples:
            if sample.name in ("edgeml_device_requests_total", "edgeml_device_errors_total"):
                out[f"{sample.name}:{sample.labels['device']}"] = sample.value
            elif sample.name == "edgeml_telemetry_rows":
                out[sample.name] = sample.value
    return out


def test_metrics_counters_are_monotonic_across_retention(db: Database) -> None:
    store = TelemetryStore(db)
    now = dt.datetime.now(dt.timezone.utc)
    for i, days in enumerate((12, 9, 1, 0)):
        store.insert_batch([Telemetry(d, i, 0.0, {"requests": 10 * (i + 1), "errors": i}) for d in ("a", "b")],
                           received_at=now - dt.timedelta(days=days))
    before = _counters(db)
    assert before == {"edgeml_device_requests_total:a": 100, "edgeml_device_errors_total:a": 6,
                      "edgeml_device_requests_total:b": 100, "edgeml_device_errors_total:b": 6,
                      "edgeml_telemetry_rows": 8}
    report = Maintenance(db, WEEK).run_once()
    assert report.raw_deleted == 4 and len(raw_rows(db)) == 4
    assert _counters(db) == before  # the running totals: retention deletes rows, not what was counted
    store.insert_batch([Telemetry("a", 4, 0.0, {"requests": 1, "errors": 1})])
    after = _counters(db)
    assert after["edgeml_device_requests_total:a"] == 101 and after["edgeml_telemetry_rows"] == 9
    assert all(after[k] >= v for k, v in before.items())


# --- rollups and partitions -----------------------------------------------------------------------------------


def test_each_rollup_level_has_its_own_retention(db: Database) -> None:
    store = TelemetryStore(db)
    now = dt.datetime.now(dt.timezone.utc)
    for seq, days in enumerate((100, 40, 20, 3)):
        store.insert_batch([Telemetry("a", seq, 0.0, {"model": "m", "version": "1", "latency_p99_ms": 5.0})],
                           received_at=now - dt.timedelta(days=days))
    report = Maintenance(db, WEEK).run_once()
    assert report.hours_rolled == 4  # the hours with windows (the empty ones between are passed over)
    buckets = {}
    for name in ("telemetry_device_minute", "telemetry_version_minute", "telemetry_device_hour",
                 "telemetry_version_hour"):
        t = db.tables[name]
        with db.transaction() as conn:
            buckets[name] = sorted(round((now - as_utc(b)).total_seconds() / 86400)
                                   for b in conn.execute(sa.select(t.c.bucket)).scalars())
    assert buckets["telemetry_device_minute"] == buckets["telemetry_version_minute"] == [3, 20]  # 30 days
    assert buckets["telemetry_device_hour"] == buckets["telemetry_version_hour"] == [3, 20, 40]  # 90 days
    assert len(raw_rows(db)) == 1  # 7 days
    assert (report.minute_deleted, report.hour_deleted) == (4, 2)


def test_minutes_are_not_deleted_before_their_hour_is_rolled(db: Database) -> None:
    store = TelemetryStore(db)
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)
    store.insert_batch([Telemetry("a", 0, 0.0, {"latency_p99_ms": 5.0})], received_at=old)
    settings = RetentionSettings(raw_s=0, minute_s=3600, hour_s=0, pause_s=0)
    with db.transaction() as conn:  # maintenance has not rolled anything yet, and another process holds the lease
        conn.execute(db.tables["telemetry_jobs"].insert().values(
            name="maintenance", owner="other", lease_until=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)))
    assert Maintenance(db, settings).run_once().ran is False
    with db.transaction() as conn:
        conn.execute(db.tables["telemetry_jobs"].update().values(lease_until=None))
    report = Maintenance(db, settings).run_once()
    assert report.ran and report.minute_deleted == 2  # rolled first, then deleted
    with db.transaction() as conn:
        hours = conn.execute(sa.select(db.tables["telemetry_device_hour"].c.p99_sum)).scalars().all()
    assert hours == [5.0]


def test_one_process_at_a_time(db: Database) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    jobs = db.tables["telemetry_jobs"]
    with db.transaction() as conn:
        conn.execute(jobs.insert().values(name="maintenance", owner="host-b:1:x",
                                          lease_until=now + dt.timedelta(minutes=5)))
    mine = Maintenance(db, WEEK)
    assert mine.run_once().ran is False  # held by another process
    with db.transaction() as conn:  # that process died: its lease runs out
        conn.execute(jobs.update().values(lease_until=now - dt.timedelta(seconds=1)))
    report = mine.run_once()
    assert report.ran
    with db.transaction() as conn:
        row = conn.execute(sa.select(jobs)).one()
    assert (row.owner, row.lease_until, row.details["ran"]) == (mine.owner, None, True)
    assert as_utc(row.last_run_at) >= now
    other = Maintenance(db, WEEK)
    assert other.run_once().ran  # given back at the end of the run: the next one may take it


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgresql_drops_whole_days(db: Database) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    today = now.date()
    report = Maintenance(db, WEEK).run_once()
    assert sorted(report.partitions_created) == [partition_name(today + dt.timedelta(days=k)) for k in range(4)]
    store = TelemetryStore(db)
    store.insert_batch([tel("a", 0)], received_at=now - dt.timedelta(days=20))  # no day's partition: the default
    store.insert_batch([tel("a", 1)], received_at=now)
    with db.transaction() as conn:
        where = dict(conn.exec_driver_sql("SELECT seq, tableoid::regclass::text FROM telemetry").all())
    assert where == {0: "telemetry_default", 1: partition_name(today)}
    later = Maintenance(db, WEEK, clock=lambda: now + dt.timedelta(days=8)).run_once()
    assert later.partitions_dropped == [partition_name(today)] and later.raw_deleted == 1
    assert raw_rows(db) == [] and store.contiguous_high("a") == 1
    assert partition_name(today + dt.timedelta(days=8)) in _partitions(db)


# --- settings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("0", 0), ("90s", 90), ("30m", 1800), ("36h", 129600),
                                               ("7d", 604800), ("2w", 1209600), (" 1.5D ", 129600)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "--retain-raw") == seconds


@pytest.mark.parametrize("text", ["7", "", "d", "-1d", "1y", "nan", "infd", "1e13s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="--retain-raw: .* is not a duration"):
        parse_duration(text, "--retain-raw")


@pytest.mark.parametrize("fields", [{"raw_s": -1}, {"every_s": 0}, {"chunk_rows": 0}, {"lease_s": 0},
                                    {"minute_s": float("nan")}, {"partitions_ahead": -1}])
def test_bad_retention_settings_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="telemetry retention: bad settings"):
        RetentionSettings(**fields)  # type: ignore[arg-type]
