"""Telemetry for the scale tests: seeded windows of many shapes, and what their rollups must be, computed here from
the raw rows with plain Python (not with the store's own figures code), so that a test compares two independent
computations."""

from __future__ import annotations

import datetime as dt
import math
import random
from typing import Any

import pytest
import sqlalchemy as sa

from edgeml.fleet.store.db import Database, as_utc

#: Rollup value columns compared by the tests.
SUMS = ("windows", "requests", "errors", "p50_sum", "p50_n", "p99_sum", "p99_n", "sp99_sum", "sp99_n", "err_sum",
        "err_n", "drift_sum", "drift_n", "shift_sum", "shift_n")
MAXES = ("p99_max", "drift_max", "shift_max")
#: Scores kept as the bucket's latest (column prefix -> the metrics key whose "score" it is).
LATEST = {"drift": "drift", "shift": "output_drift"}


def window(rng: random.Random, version: str | None, model: str | None = "digits") -> dict[str, Any]:
    """One telemetry window's metrics, sometimes with values that are not numbers (they must not count)."""
    requests = rng.choice([0, 5, 10, 100, 250])
    errors = rng.randint(0, requests // 10) if requests else 0
    metrics: dict[str, Any] = {"requests": requests, "errors": errors, "error_rate": errors / requests if requests
                               else 0.0, "latency_p50_ms": round(rng.uniform(1, 5), 3) if requests else None,
                               "latency_p99_ms": round(rng.uniform(5, 50), 3) if requests else None}
    if version is not None:
        metrics["version"] = version
    if model is not None:
        metrics["model"] = model
    if rng.random() < 0.3:
        metrics["drift"] = {"score": round(rng.random(), 4), "flagged": False}
    if rng.random() < 0.3:
        metrics["output_drift"] = {"score": round(rng.random(), 4), "flagged": False, "against": {"own": 0.1}}
    if rng.random() < 0.05:  # junk a reader must leave out
        metrics.update({"requests": "many", "errors": True, "latency_p99_ms": [1.0], "drift": {"score": "high"},
                        "output_drift": {"score": None}})
    return metrics


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def floor(at: dt.datetime, seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(math.floor(at.timestamp() / seconds) * seconds, dt.timezone.utc)


def raw_rows(db: Database) -> list[dict[str, Any]]:
    """Every stored telemetry row: device_id, seq, received_at, metrics."""
    t = db.tables["telemetry"]
    with db.transaction() as conn:
        return [{"device_id": r.device_id, "seq": int(r.seq), "received_at": as_utc(r.received_at),
                 "metrics": r.metrics} for r in conn.execute(sa.select(t))]


def expected(rows: list[dict[str, Any]], seconds: int, devices: bool) -> dict[tuple[Any, ...], dict[str, Any]]:
    """What the rollup rows must hold: key (device_id?, bucket, model, version) -> column -> value.

    ``drift_last`` (``shift_last``) is given as the set of scores of the bucket's latest drift (output-shift) windows
    (equal times may tie)."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        m = r["metrics"]
        key = ((r["device_id"],) if devices else ()) + (floor(r["received_at"], seconds), m.get("model") or "",
                                                         m.get("version") or "")
        b = out.setdefault(key, {**dict.fromkeys(SUMS, 0.0), **dict.fromkeys(MAXES), "drift_at": None,
                                 "drift_last": set(), "shift_at": None, "shift_last": set()})
        requests, errors = number(m.get("requests")), number(m.get("errors"))
        p50, p99, err = number(m.get("latency_p50_ms")), number(m.get("latency_p99_ms")), number(m.get("error_rate"))
        b["windows"] += 1
        b["requests"] += requests or 0.0
        b["errors"] += errors or 0.0
        for value, total, n in ((p50, "p50_sum", "p50_n"), (p99, "p99_sum", "p99_n"), (err, "err_sum", "err_n")):
            if value is not None:
                b[total] += value
                b[n] += 1
        if p99 is not None:
            b["p99_max"] = p99 if b["p99_max"] is None else max(b["p99_max"], p99)
            if (requests or 0) > 0:
                b["sp99_sum"] += p99
                b["sp99_n"] += 1
        for name, path in LATEST.items():
            score = number(m[path].get("score")) if isinstance(m.get(path), dict) else None
            if score is None:
                continue
            b[f"{name}_sum"] += score
            b[f"{name}_n"] += 1
            b[f"{name}_max"] = score if b[f"{name}_max"] is None else max(b[f"{name}_max"], score)
            if b[f"{name}_at"] is None or r["received_at"] > b[f"{name}_at"]:
                b[f"{name}_at"], b[f"{name}_last"] = r["received_at"], {score}
            elif r["received_at"] == b[f"{name}_at"]:
                b[f"{name}_last"].add(score)
    return out


def stored_rollups(db: Database, table: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """A rollup table as key -> column -> value (the same shape as :func:`expected`)."""
    t = db.tables[table]
    keys = [c.name for c in t.primary_key.columns]
    with db.transaction() as conn:
        rows = conn.execute(sa.select(t)).mappings().all()
    out = {}
    for r in rows:
        key = tuple(as_utc(r[k]) if k == "bucket" else r[k] for k in keys)
        if "device_id" in keys:  # (device_id, bucket, model, version) as in expected()
            key = (r["device_id"], as_utc(r["bucket"]), r["model"], r["version"])
        out[key] = {c: r[c] for c in (*SUMS, *MAXES, *(f"{n}_last" for n in LATEST))} | \
            {f"{n}_at": as_utc(r[f"{n}_at"]) for n in LATEST}
    return out


def assert_rollups_match(stored: dict[tuple[Any, ...], dict[str, Any]],
                         want: dict[tuple[Any, ...], dict[str, Any]]) -> None:
    """Every bucket, every column: counts exactly, sums to 1e-9, the latest drift and output-shift scores one of
    the latest."""
    assert sorted(stored) == sorted(want)
    for key, w in want.items():
        s = stored[key]
        for column in SUMS:
            exact = column.endswith("_n") or column == "windows"
            assert s[column] == (w[column] if exact else pytest.approx(w[column], rel=1e-9, abs=1e-9)), (key, column)
        for column in MAXES:
            assert s[column] == w[column], (key, column)
        for name in LATEST:
            last = s[f"{name}_last"]
            assert s[f"{name}_at"] == w[f"{name}_at"], (key, name)
            assert (last is None and not w[f"{name}_last"]) or last in w[f"{name}_last"], (key, name)
