"""Model signals of a rollout from the telemetry store: each device's p99 ratio, error rate and drift score.

The rollout controller judges a new version not only by what the agents decide (their rollback reasons) but
by what they report while they run it. For every device of a rollout that has been told to update, this
module reads the device's telemetry rows (``telemetry`` table, written by the ingest workers) and computes:

* ``p99_ratio``: the median ``latency_p99_ms`` of the device's windows on the new version, over the median of
  its windows on the version it had before (``previous``), both only from windows that served requests.
  A device whose previous version reported no latency has no ratio (there is nothing to compare with).
* ``error_rate``: errors over requests, summed over its windows on the new version.
* ``drift``: the drift score of its latest window on the new version that carried one.

Only windows received after the device was notified count for the new version, and only windows of the
previous version received up to ``baseline_s`` before the rollout started count as its baseline, so an old
outlier does not decide. One query per tick reads the rows of the devices that need judging (in chunks of
:data:`CHUNK`); the controller asks at most every few seconds (see ``RolloutController``).
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeml.fleet.rollouts.rules import DeviceSignals
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import as_utc
from edgeml.fleet.store.schema import sa

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = ["CHUNK", "Judged", "telemetry_signals"]

#: Device ids per query (SQLite allows a few thousand bound parameters; PostgreSQL far more).
CHUNK = 500


@dataclass(frozen=True)
class Judged:
    """One device to judge: its id, the version it had, and when it was told to update (timezone-aware)."""

    device_id: str
    previous: str | None
    notified_at: dt.datetime


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _signals(version: str, previous: str | None, notified_at: dt.datetime,
             rows: Iterable[tuple[dt.datetime, Mapping[str, Any]]]) -> DeviceSignals:
    new_p99: list[float] = []
    old_p99: list[float] = []
    requests = errors = 0.0
    drift: tuple[dt.datetime, float] | None = None
    for received_at, metrics in rows:
        served = (_number(metrics.get("requests")) or 0.0) > 0
        p99 = _number(metrics.get("latency_p99_ms"))
        row_version = metrics.get("version")
        if row_version == version and received_at >= notified_at:
            requests += _number(metrics.get("requests")) or 0.0
            errors += _number(metrics.get("errors")) or 0.0
            if served and p99 is not None:
                new_p99.append(p99)
            score = _number((metrics.get("drift") or {}).get("score")) if isinstance(metrics.get("drift"), dict) \
                else None
            if score is not None and (drift is None or received_at >= drift[0]):
                drift = (received_at, score)
        elif previous is not None and row_version == previous and served and p99 is not None:
            old_p99.append(p99)
    ratio = None
    if new_p99 and old_p99 and statistics.median(old_p99) > 0:
        ratio = statistics.median(new_p99) / statistics.median(old_p99)
    return DeviceSignals(p99_ratio=ratio, error_rate=errors / requests if requests else None,
                         drift=drift[1] if drift else None)



def telemetry_signals(db: Database, version: str, devices: Iterable[Judged], started_at: dt.datetime, *,
                      baseline_s: float = 3600.0) -> dict[str, DeviceSignals]:
    """The telemetry signals of each device on ``version`` (devices without any are left out).

    Args:
        db: The fleet database (its ``telemetry`` table).
        version: The rollout's new version.
        devices: The devices to judge.
        started_at: When the rollout started (the baseline ends there).
        baseline_s: How far before ``started_at`` the previous version's windows count.

    Raises:
        RegistryError: The database failed.
    """
    judged = {d.device_id: d for d in devices}
    t = schema.telemetry
    since = as_utc(started_at) - dt.timedelta(seconds=baseline_s)
    rows: dict[str, list[tuple[dt.datetime, Mapping[str, Any]]]] = {}
    ids = sorted(judged)
    with db.transaction() as conn:
        for start in range(0, len(ids), CHUNK):
            query = sa.select(t.c.device_id, t.c.received_at, t.c.metrics).where(
                t.c.device_id.in_(ids[start:start + CHUNK]) & (t.c.received_at >= since))
            for device_id, received_at, metrics in conn.execute(query):
                if isinstance(metrics, dict):
                    rows.setdefault(device_id, []).append((as_utc(received_at), metrics))
    out = {}
    for device_id, device_rows in rows.items():
        d = judged[device_id]
        signals = _signals(version, d.previous, as_utc(d.notified_at), device_rows)
        if signals != DeviceSignals():
            out[device_id] = signals
    return out
