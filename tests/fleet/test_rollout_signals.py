"""The rollout's model signals read from the telemetry store, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from edgeml.fleet.rollouts.rules import DeviceSignals
from edgeml.fleet.rollouts.signals import CHUNK, Judged, telemetry_signals
from edgeml.fleet.store.db import Database
from edgeml.fleet.telemetry.store import TelemetryStore
from edgeml.protocol import Telemetry

START = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def store(db_url: str) -> Iterator[TelemetryStore]:
    db = Database(db_url)
    db.create()
    try:
        yield TelemetryStore(db)
    finally:
        db.close()


def _window(store: TelemetryStore, device: str, seq: int, minutes: float, version: str, p99: float | None,
            requests: int = 100, errors: int = 0, drift: Any = None) -> None:
    metrics = {"version": version, "model": "digits", "requests": requests, "errors": errors,
               "latency_p99_ms": p99, "drift": drift}
    store.insert_batch([Telemetry(device_id=device, seq=seq, sent_at=0.0, metrics=metrics)],
                       received_at=START + dt.timedelta(minutes=minutes))


def test_p99_ratio_error_rate_and_drift_per_device(store: TelemetryStore) -> None:
    # dev-a: 4 ms before, 8 ms after (one idle window and one from before the notification are ignored)
    for seq, (minutes, version, p99, requests) in enumerate([(-30, "1.0", 4.0, 100), (-20, "1.0", 4.2, 100),
                                                             (-10, "1.0", 3.8, 100), (2, "1.0", 4.0, 100),
                                                             (6, "2.0", 8.0, 100), (7, "2.0", 50.0, 0),
                                                             (8, "2.0", 8.4, 100)]):
        _window(store, "dev-a", seq, minutes, version, p99, requests, errors=5 if version == "2.0" else 0,
                drift={"score": 0.1 * seq, "flagged": False} if version == "2.0" else None)
    # dev-b: no baseline (it had nothing before), errors only
    _window(store, "dev-b", 0, 6, "2.0", 5.0, requests=10, errors=4)
    # dev-c: old windows only (still downloading); dev-d: rows far before the baseline window
    _window(store, "dev-c", 0, -5, "1.0", 4.0)
    _window(store, "dev-d", 0, -200, "1.0", 4.0)
    _window(store, "dev-d", 1, 6, "2.0", 12.0)
    judged = [Judged("dev-a", "1.0", START + dt.timedelta(minutes=5)), Judged("dev-b", None, START),
              Judged("dev-c", "1.0", START + dt.timedelta(minutes=1)),
              Judged("dev-d", "1.0", START + dt.timedelta(minutes=5))]

    signals = telemetry_signals(store.db, "2.0", judged, START)

    assert signals["dev-a"].p99_ratio == pytest.approx(8.2 / 4.0)  # medians: (8.0, 8.4) over (4.0, 4.2, 3.8, 4.0)
    assert signals["dev-a"].error_rate == pytest.approx(15 / 200)  # 5 errors in each of 3 windows, 200 requests
    assert signals["dev-a"].drift == pytest.approx(0.6)  # the latest window's score
    assert signals["dev-b"] == DeviceSignals(p99_ratio=None, error_rate=0.4, drift=None)
    assert "dev-c" not in signals  # nothing on the new version yet
    assert signals["dev-d"].p99_ratio is None and signals["dev-d"].error_rate == 0.0  # baseline too old


def test_many_devices_are_read_in_chunks(store: TelemetryStore) -> None:
    n = CHUNK + 7
    rows = []
    for i in range(n):
        for seq, (version, p99) in enumerate((("1.0", 2.0), ("2.0", 2.0 + i % 3))):
            rows.append(Telemetry(device_id=f"d-{i:04d}", seq=seq, sent_at=0.0,
                                  metrics={"version": version, "requests": 10, "errors": 0, "latency_p99_ms": p99}))
    store.insert_batch(rows, received_at=START + dt.timedelta(minutes=1))
    judged = [Judged(f"d-{i:04d}", "1.0", START) for i in range(n)]

    signals = telemetry_signals(store.db, "2.0", judged, START)

    assert len(signals) == n
    assert [signals[f"d-{i:04d}"].p99_ratio for i in (0, 1, 2, n - 1)] == [1.0, 1.5, 2.0, 1.0 + ((n - 1) % 3) / 2]
