"""The output shift on the fleet side (issue 13): the agents' ``output_drift`` score carried by the telemetry rollups
(schema 8), read by the rollout signals, judged by the rollout rules, and shown by the dashboard's views. On SQLite
and on the local PostgreSQL; the whole loop with a real agent is tests/e2e/test_output_shift_rollout.py."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from edgeml.fleet.rollouts.rules import (
    AbortRollout,
    DeviceRow,
    DeviceSignals,
    RolloutError,
    RolloutOptions,
    RolloutView,
    TellRollback,
    decide,
)
from edgeml.fleet.rollouts.signals import Judged, RolloutSignals, telemetry_signals
from edgeml.fleet.store.db import SCHEMA_VERSION, Database
from edgeml.fleet.telemetry.maintenance import Maintenance, RetentionSettings
from edgeml.fleet.telemetry.store import TelemetryStore
from edgeml.fleet.web.views import device_list, telemetry_series
from edgeml.protocol import Telemetry
from edgeml.thresholds import Thresholds

sa = pytest.importorskip("sqlalchemy")

NOW = 1_000_000.0
START = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.timezone.utc)
ROLLUPS = ("telemetry_device_minute", "telemetry_version_minute", "telemetry_device_hour", "telemetry_version_hour")
SHIFT_COLUMNS = ("shift_sum", "shift_n", "shift_max", "shift_last", "shift_at")


def options(**changes: Any) -> RolloutOptions:
    return RolloutOptions(**{"targets": ("onnx-int8",), "canary": 0.5, "waves": (1.0,), "min_devices": 1,
                             "max_failure_rate": 1.0, **changes})


def view(**changes: Any) -> RolloutView:
    return RolloutView("ro-1", "canary", 0, NOW - 10, options(**changes))


# --- options and rules (pure) ----------------------------------------------------------------------------------

def test_the_default_limit_is_the_agents_own_and_is_sent_only_when_changed() -> None:
    assert options().max_output_shift == Thresholds().max_output_shift == 0.5
    assert "max_output_shift" not in options().thresholds()  # the agents apply the same 0.5 themselves
    assert options(max_output_shift=0.3).thresholds()["max_output_shift"] == 0.3
    assert "max_output_shift" not in options(max_output_shift=None).thresholds()
    stored = options(max_output_shift=0.3).to_dict()
    assert RolloutOptions.from_dict(stored).max_output_shift == 0.3
    older = {k: v for k, v in stored.items() if k != "max_output_shift"}  # a rollout stored before schema 8
    assert RolloutOptions.from_dict(older).max_output_shift == 0.5
    with pytest.raises(RolloutError, match="--max-output-shift must be at least 0 and at most 1"):
        options(max_output_shift=1.5)


def test_a_rollback_for_the_output_shift_aborts_the_rollout_and_says_so() -> None:
    devices = [DeviceRow("a", 0, "rolled_back", "probation: output shift 0.93 exceeds 0.5", NOW - 5, "1.0.0",
                         cause="output_shift"), DeviceRow("b", 1, "pending", previous="1.0.0")]
    actions = decide(view(), devices, NOW, {"a", "b"}, {})
    assert actions == [AbortRollout("output shift past 0.5 on 1 devices (every device rolled back for it)")]


@pytest.mark.parametrize(("values", "limit", "aborts"), [
    ([0.9, 0.1, 0.1], 0.5, False),  # the median, not the worst device
    ([0.9, 0.8, 0.1], 0.5, True),
    ([0.5, 0.5, 0.5], 0.5, False),  # at the limit is not past it
    ([0.9, 0.9, 0.9], None, False),  # --max-output-shift off
])
def test_the_measured_output_shift_aborts_on_the_median_of_the_devices(values: list[float], limit: float | None,
                                                                       aborts: bool) -> None:
    rollout = view(max_output_shift=limit)
    devices = [DeviceRow(d, 0, "committed", None, NOW - 1, "1.0.0") for d in "abc"]
    signals = {d: DeviceSignals(output_shift=v) for d, v in zip("abc", values, strict=True)}
    actions = decide(rollout, devices, NOW, {"a", "b", "c"}, signals)
    assert any(isinstance(a, AbortRollout) for a in actions) == aborts
    if aborts:
        assert actions == [AbortRollout("output shift past 0.5 on 3 devices (median 0.8)"),
                           TellRollback("revert", ("a", "b", "c"))]


# --- the store: rollups, migration 8, signals, views -------------------------------------------------------------

@pytest.fixture
def store(db_url: str) -> Iterator[TelemetryStore]:
    db = Database(db_url)
    db.create()
    try:
        yield TelemetryStore(db)
    finally:
        db.close()


def _window(store: TelemetryStore, device: str, seq: int, minutes: float, version: str, shift: float | None,
            flagged: bool = False) -> None:
    metrics = {"model": "textdet", "version": version, "requests": 100, "errors": 0, "latency_p99_ms": 4.0,
               "output_drift": None if shift is None else {"score": shift, "flagged": flagged,
                                                           "against": {"own": shift}}}
    store.insert_batch([Telemetry(device_id=device, seq=seq, sent_at=0.0, metrics=metrics)],
                       received_at=START + dt.timedelta(minutes=minutes))


def test_rollups_carry_the_output_shift_latest_and_max(store: TelemetryStore) -> None:
    for seq, (minutes, shift) in enumerate([(0.1, 0.2), (0.5, 0.9), (0.7, 0.4), (1.2, None), (61, 0.3)]):
        _window(store, "cam-1", seq, minutes, "2.0.0", shift)
    _window(store, "cam-2", 0, 0.3, "2.0.0", 0.1)
    Maintenance(store.db, RetentionSettings(raw_s=0, minute_s=0, hour_s=0, pause_s=0),
                clock=lambda: START + dt.timedelta(hours=3)).run_once()  # the hours rolled up, nothing deleted
    db = store.db
    with db.transaction() as conn:
        dm, vm, vh = (db.tables[t] for t in ("telemetry_device_minute", "telemetry_version_minute",
                                             "telemetry_version_hour"))
        minute = conn.execute(sa.select(dm).where((dm.c.device_id == "cam-1") & (dm.c.bucket == START))).one()
        version = conn.execute(sa.select(vm).where(vm.c.bucket == START)).one()
        hour = conn.execute(sa.select(vh).where(vh.c.bucket == START)).one()
    assert (minute.shift_n, minute.shift_sum, minute.shift_max, minute.shift_last) == (3, pytest.approx(1.5), 0.9, 0.4)
    assert (version.shift_n, version.shift_max, version.shift_last) == (4, 0.9, 0.4)  # cam-2's 0.1 came earlier
    assert (hour.shift_n, hour.shift_sum, hour.shift_max, hour.shift_last) == (4, pytest.approx(1.6), 0.9, 0.4)


def test_an_older_database_gets_the_output_shift_columns(db_url: str) -> None:
    """A store at schema 7 (the rollups without the shift columns) upgraded by migration 8, its rows kept."""
    db = Database(db_url)
    db.create()
    TelemetryStore(db).insert_batch([Telemetry("cam-1", 0, 0.0, {"model": "m", "version": "1", "requests": 1})],
                                    received_at=START)
    with db.transaction() as conn:
        for table in ROLLUPS:
            for column in SHIFT_COLUMNS:
                conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute(db.tables["schema_version"].update().values(version=7))
    db.close()
    again = Database(db_url)  # the upgrade runs on first use
    try:
        with again.transaction() as conn:
            inspector = sa.inspect(conn)
            for table in ROLLUPS:
                assert set(SHIFT_COLUMNS) <= {c["name"] for c in inspector.get_columns(table)}, table
            assert conn.execute(sa.select(again.tables["schema_version"].c.version)).scalar() == SCHEMA_VERSION >= 8
            dm = again.tables["telemetry_device_minute"]
            assert conn.execute(sa.select(dm.c.windows, dm.c.shift_n, dm.c.shift_max)).one() == (1, 0, None)
        _window(TelemetryStore(again), "cam-1", 1, 0.5, "1", 0.7)
    finally:
        again.close()


def test_rollout_signals_give_each_devices_latest_output_shift(store: TelemetryStore) -> None:
    _window(store, "cam-1", 0, -10, "1.0.0", 0.05)  # the previous version: not counted
    _window(store, "cam-1", 1, 6, "2.0.0", 0.95, flagged=True)
    _window(store, "cam-1", 2, 7, "2.0.0", 0.85, flagged=True)
    _window(store, "cam-2", 0, 6, "2.0.0", None)  # outputs not sketched: no shift
    judged = [Judged("cam-1", "1.0.0", START + dt.timedelta(minutes=5)),
              Judged("cam-2", "1.0.0", START + dt.timedelta(minutes=5))]
    signals = telemetry_signals(store.db, "2.0.0", judged, START)
    assert signals["cam-1"].output_shift == 0.85 and signals["cam-2"].output_shift is None
    reader = RolloutSignals(store.db, "2.0.0", START)  # incrementally: the next window is seen
    reader.read(judged, now=START + dt.timedelta(minutes=8))
    _window(store, "cam-1", 3, 8.5, "2.0.0", 0.6, flagged=True)
    assert reader.read(judged, now=START + dt.timedelta(minutes=9))["cam-1"].output_shift == 0.6


def test_the_dashboard_views_show_the_output_shift_per_version_and_device(store: TelemetryStore) -> None:
    _window(store, "cam-1", 0, 1, "1.0.0", 0.1)
    _window(store, "cam-1", 1, 2, "2.0.0", 0.9, flagged=True)
    _window(store, "cam-2", 0, 2, "2.0.0", 0.7, flagged=True)
    series = telemetry_series(store.db, "output_drift.score", since_s=600, now=START + dt.timedelta(minutes=5))
    means = {s["key"]: [v for _, v in s["points"]] for s in series["series"]}
    assert means == {"textdet:1.0.0": [pytest.approx(0.1)], "textdet:2.0.0": [pytest.approx(0.8)]}
    t = store.db.tables["devices"]
    with store.db.transaction() as conn:
        conn.execute(t.insert(), [{"device_id": d, "revoked": False} for d in ("cam-1", "cam-2")])
    latest = {d["device_id"]: d["telemetry"] for d in device_list(store.db)}
    assert (latest["cam-1"]["output_shift"], latest["cam-1"]["output_shift_flagged"]) == (0.9, True)


def test_the_cli_option_takes_a_number_or_off() -> None:
    from edgeml.fleet.cli_rollouts import _output_shift

    assert _output_shift(None) == {} and _output_shift("0.3") == {"max_output_shift": 0.3}
    assert _output_shift("off") == {"max_output_shift": None}
    with pytest.raises(RolloutError, match="--max-output-shift must be a number from 0 to 1 or 'off'"):
        _output_shift("high")
