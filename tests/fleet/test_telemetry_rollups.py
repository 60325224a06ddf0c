"""The telemetry rollups on SQLite and a real PostgreSQL: they equal the aggregates of the raw rows they summarize
(minute rows written with the rows, hour rows rolled by maintenance), the dashboard reads them at the resolution
its window needs, and the rollout signals read from them incrementally give what a cold read gives."""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Iterator

import pytest

from edgeml.fleet.rollouts.rules import DeviceSignals
from edgeml.fleet.rollouts.signals import Judged, RolloutSignals, SignalWatcher, telemetry_signals
from edgeml.fleet.store.db import Database
from edgeml.fleet.store.schema import sa
from edgeml.fleet.telemetry.maintenance import Maintenance, RetentionSettings
from edgeml.fleet.telemetry.store import TelemetryStore
from edgeml.fleet.web.views import telemetry_series
from edgeml.protocol import Telemetry
from tests.fleet.telemetry_data import assert_rollups_match, expected, raw_rows, stored_rollups, window

NOW = dt.datetime.now(dt.timezone.utc).replace(second=20, microsecond=0)
KEEP = RetentionSettings(raw_s=0, minute_s=0, hour_s=0, pause_s=0)  # maintenance that only rolls hours up


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.create()
    yield database
    database.close()


def _fill(store: TelemetryStore, seed: int, hours: float = 3.0) -> None:
    """Batches every ~40 s over ``hours`` before NOW, for 6 devices on 3 versions (one window names no version,
    one no model): seqs out of order, repeated, and one device's seq 7 lost for good (its later rows wait above
    the gap)."""
    rng = random.Random(seed)
    devices = {f"cam-{i}": 0 for i in range(6)}
    versions = {"cam-0": "1.0", "cam-1": "1.0", "cam-2": "2.0", "cam-3": "2.0", "cam-4": None, "cam-5": "3.0"}
    sent: list[Telemetry] = []
    at = NOW - dt.timedelta(hours=hours)
    while at < NOW:
        batch = []
        for device in rng.sample(sorted(devices), rng.randint(1, 6)):
            seq = devices[device]
            devices[device] += 1
            if device == "cam-5" and seq == 7:
                continue  # lost
            model = None if device == "cam-4" and seq % 5 == 0 else "digits"
            batch.append(Telemetry(device, seq, at.timestamp(), window(rng, versions[device], model)))
        batch += rng.sample(sent, min(len(sent), rng.randint(0, 3)))  # resent: already stored
        rng.shuffle(batch)
        sent += batch
        store.insert_batch(batch, received_at=at)
        at += dt.timedelta(seconds=rng.uniform(5, 75))


@pytest.mark.parametrize("seed", [1, 2])
def test_rollups_equal_the_raw_aggregates_they_summarize(db: Database, seed: int) -> None:
    store = TelemetryStore(db)
    _fill(store, seed)
    rows = raw_rows(db)
    assert len({(r["device_id"], r["seq"]) for r in rows}) == len(rows)  # stored once each
    assert store.contiguous_high("cam-5") == 6

    assert_rollups_match(stored_rollups(db, "telemetry_device_minute"), expected(rows, 60, devices=True))
    assert_rollups_match(stored_rollups(db, "telemetry_version_minute"), expected(rows, 60, devices=False))

    report = Maintenance(db, KEEP, clock=lambda: NOW + dt.timedelta(hours=2)).run_once()
    assert report.ran and report.hours_rolled == 4  # the 3 hours of windows touch 4 hours (empty ones are passed)
    assert_rollups_match(stored_rollups(db, "telemetry_device_hour"), expected(rows, 3600, devices=True))
    assert_rollups_match(stored_rollups(db, "telemetry_version_hour"), expected(rows, 3600, devices=False))

    again = Maintenance(db, KEEP, clock=lambda: NOW + dt.timedelta(hours=2)).run_once()
    assert again.ran and again.hours_rolled == 0  # rolled once
    assert_rollups_match(stored_rollups(db, "telemetry_device_hour"), expected(rows, 3600, devices=True))


def test_a_seq_repeated_in_one_batch_is_stored_and_summed_as_its_first_copy(db: Database) -> None:
    """The store works out each row's figures and JSON before its transaction locks the books: the copy it
    stores, the one the totals count and the one the rollups sum must still be the same (the first)."""
    store = TelemetryStore(db)
    rng = random.Random(3)
    first, second = window(rng, "1.0"), window(rng, "2.0")
    first["requests"], second["requests"] = 10, 250
    batch = [Telemetry("cam-0", 0, NOW.timestamp(), first), Telemetry("cam-1", 0, NOW.timestamp(), second),
             Telemetry("cam-0", 0, NOW.timestamp(), second)]
    assert store.insert_batch(batch, received_at=NOW) == 2
    rows = raw_rows(db)
    assert {(r["device_id"], r["metrics"]["version"]) for r in rows} == {("cam-0", "1.0"), ("cam-1", "2.0")}
    assert_rollups_match(stored_rollups(db, "telemetry_device_minute"), expected(rows, 60, devices=True))
    assert_rollups_match(stored_rollups(db, "telemetry_version_minute"), expected(rows, 60, devices=False))
    t = db.tables["telemetry_devices"]
    with db.transaction() as conn:
        assert conn.execute(sa.select(t.c.requests, t.c.windows).where(t.c.device_id == "cam-0")).one() == (10, 1)


def test_rollup_sums_that_overflow_are_still_stored(db: Database) -> None:
    """Two finite windows whose sums overflow a float (the PostgreSQL writer's JSON document cannot carry the
    infinity; its arrays can): the batch is stored, and so are the rollups."""
    store = TelemetryStore(db)
    huge = {"model": "digits", "version": "1.0", "requests": 1e308, "errors": 0, "latency_p50_ms": 1e308}
    assert store.insert_batch([Telemetry("cam-0", 0, NOW.timestamp(), huge),
                               Telemetry("cam-0", 1, NOW.timestamp(), huge)], received_at=NOW) == 2
    rollups = stored_rollups(db, "telemetry_version_minute")
    assert [r["windows"] for r in rollups.values()] == [2] and [r["p50_sum"] for r in rollups.values()] == [
        float("inf")]


def test_a_day_window_reads_hours_and_the_open_hour_from_minutes(db: Database) -> None:
    store = TelemetryStore(db)
    _fill(store, 3, hours=10)
    rows = raw_rows(db)
    before = telemetry_series(db, "latency_p99_ms", since_s=86400, now=NOW)  # no hour rolled: all from minutes
    assert (before["resolution_s"], before["buckets"], before["bucket_s"]) == (3600, 24, 3600.0)
    Maintenance(db, KEEP, clock=lambda: NOW).run_once()  # every closed hour rolled; the current one is not
    after = telemetry_series(db, "latency_p99_ms", since_s=86400, now=NOW)
    assert after == before
    # each point is the mean of the raw windows of its version whose hour ends in the point's bucket
    want: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        p99, metrics = r["metrics"].get("latency_p99_ms"), r["metrics"]
        if isinstance(p99, float):
            key = f"digits:{metrics.get('version') or 'unknown'}" if metrics.get("model") else \
                str(metrics.get("version") or "unknown")
            hour_end = (r["received_at"].timestamp() // 3600 + 1) * 3600 - 1e-6
            index = min(int((hour_end - after["start"]) // 3600), 23)  # the open hour ends after now: the last bucket
            want.setdefault(key, {}).setdefault(index, []).append(p99)
    assert {s["key"]: s["rows"] for s in after["series"]} == {k: sum(map(len, v.values())) for k, v in want.items()}
    for s in after["series"]:
        assert [(round(t, 3), pytest.approx(v)) for t, v in s["points"]] == [
            (round(after["start"] + (i + 0.5) * 3600, 3), sum(vs) / len(vs))
            for i, vs in sorted(want[s["key"]].items())]


# --- rollout signals --------------------------------------------------------------------------------------------


def _windows(store: TelemetryStore, device: str, first_seq: int, minutes: list[float], version: str,
             p99: float, errors: int = 0) -> int:
    for i, m in enumerate(minutes):
        metrics = {"model": "digits", "version": version, "requests": 100, "errors": errors, "latency_p99_ms": p99,
                   "drift": {"score": 0.01 * (first_seq + i), "flagged": False}}
        store.insert_batch([Telemetry(device, first_seq + i, 0.0, metrics)], received_at=NOW + dt.timedelta(minutes=m))
    return first_seq + len(minutes)


def test_incremental_signals_equal_a_cold_read(db: Database) -> None:
    store = TelemetryStore(db)
    started = NOW - dt.timedelta(minutes=20)
    judged = [Judged(f"cam-{i}", "1.0", started + dt.timedelta(minutes=2 + i)) for i in range(4)]
    seqs = {}
    for i in range(4):  # a baseline on 1.0, then the new version, the last minutes still open
        seqs[i] = _windows(store, f"cam-{i}", 0, [-50, -30, -21, -19], "1.0", 4.0 + i)
        seqs[i] = _windows(store, f"cam-{i}", seqs[i], [-16 + i, -12, -6, -3], "2.0", 8.0 + i, errors=i)
    reader = RolloutSignals(db, "2.0", started)
    first = reader.read(judged[:2], now=NOW)  # two devices judged at first
    assert first == RolloutSignals(db, "2.0", started).read(judged[:2], now=NOW)
    for i in range(4):  # time passes: more windows, minutes close
        seqs[i] = _windows(store, f"cam-{i}", seqs[i], [-1, 0.5, 1, 2, 2.5], "2.0", 16.0 + i, errors=2 * i)
    later = NOW + dt.timedelta(minutes=4)
    incremental = reader.read(judged, now=later)
    cold = RolloutSignals(db, "2.0", started).read(judged, now=later)
    assert incremental == cold
    # minutes on 2.0: four at 8 ms, four at 16 ms (two windows share the last minute): median 12, baseline 4
    assert incremental["cam-0"].p99_ratio == pytest.approx(3.0)
    assert incremental["cam-3"].error_rate == pytest.approx((3 * 4 + 6 * 5) / 900)
    assert incremental["cam-1"].drift == pytest.approx(0.12)  # its latest window's score (seq 12)
    assert set(incremental) == {"cam-0", "cam-1", "cam-2", "cam-3"}
    assert telemetry_signals(db, "2.0", judged, started) == RolloutSignals(db, "2.0", started).read(judged)


def test_the_watcher_answers_at_once_then_with_what_it_read(db: Database) -> None:
    store = TelemetryStore(db)
    started = NOW - dt.timedelta(minutes=30)
    _windows(store, "cam-0", 0, [-40, -35], "1.0", 5.0)
    _windows(store, "cam-0", 2, [-20, -10], "2.0", 10.0, errors=10)
    judged = [Judged("cam-0", "1.0", started)]
    watcher = SignalWatcher(db, every_s=0.05, idle_s=0.5)
    assert watcher.signals("ro-1", "2.0", started, judged) == {}  # nothing read yet: the caller does not wait
    deadline = time.monotonic() + 30
    while not (got := watcher.signals("ro-1", "2.0", started, judged)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert got == {"cam-0": DeviceSignals(p99_ratio=2.0, error_rate=0.1, drift=pytest.approx(0.03))}
    time.sleep(1.0)  # not asked for longer than idle_s: the thread ends
    assert watcher._thread is None
