"""Read-only views of the fleet for the dashboard and its JSON API: overview, devices, telemetry, audit.

Plain functions over the registry's :class:`~edgeml.fleet.store.db.Database` (SQLite or PostgreSQL); the routes in
:mod:`~edgeml.fleet.web.dashboard` only parse the query string and call them, and the tests call them directly.

Online or offline: a device is **online** when its last reported status is not ``"offline"`` (the broker's
last will sets it when the device drops) *and* it was heard from (``last_seen``: telemetry or a state
message) within ``stale_after_s`` seconds (:data:`DEFAULT_STALE_S`); anything else, a device never heard from
included, is **offline**. A device whose agent died without the broker noticing yet thus turns offline once
it has been silent for that long. Revoked devices are counted apart, as neither.

Telemetry series (:func:`telemetry_series`) cut the window ``[now - since_s, now]`` into ``buckets`` equal
buckets and give, per version (``model:version`` as the device reported it in the telemetry row) or per
device, the mean of the metric over the windows received in each bucket; buckets without windows have no point.
Metric names are paths into the telemetry's ``metrics`` (:data:`METRICS`; ``drift.score`` and ``output_drift.score``,
the output shift, are nested). They are
read from the rollups (:mod:`~edgeml.fleet.telemetry.rollups`), never from the rows: per minute for windows up
to :data:`MINUTE_WINDOW_S`, per hour beyond (the buckets are then at least an hour wide). A rollup row counts in
the bucket its last instant falls in, so a series' cost grows with the versions (or devices) and the window's
minutes or hours, not with how often devices report. The devices' latest numbers come from their running totals
(``telemetry_devices``), one row per device.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from edgeml.errors import ConfigError
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import as_utc, utcnow
from edgeml.fleet.store.schema import sa
from edgeml.fleet.telemetry.figures import SERIES_METRICS, floor_time
from edgeml.fleet.telemetry.rollups import HOUR, MINUTE, read_window

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_STALE_S",
    "GROUPINGS",
    "MAX_SINCE_S",
    "METRICS",
    "MINUTE_WINDOW_S",
    "audit_entries",
    "device_list",
    "fleet_overview",
    "is_online",
    "rollout_waves",
    "telemetry_series",
]

#: Seconds without a message after which a device counts as offline.
DEFAULT_STALE_S = 120.0
#: Buckets of a telemetry series.
DEFAULT_BUCKETS = 60
#: The longest telemetry window, in seconds (7 days).
MAX_SINCE_S = 7 * 86400
#: Metrics a series can be drawn of: name -> path into the telemetry's ``metrics``.
METRICS: dict[str, tuple[str, ...]] = {
    "latency_p50_ms": ("latency_p50_ms",),
    "latency_p99_ms": ("latency_p99_ms",),
    "error_rate": ("error_rate",),
    "drift.score": ("drift", "score"),
    "output_drift.score": ("output_drift", "score"),
}
#: The longest window drawn from the minute rollups, in seconds (6 hours); longer ones use the hour rollups.
MINUTE_WINDOW_S = 6 * 3600
#: How a series is split: one line per version, or per device.
GROUPINGS = ("version", "device")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")




def _iso(value: dt.datetime | None) -> str | None:
    value = as_utc(value)
    return None if value is None else value.isoformat(timespec="seconds")


def _number(value: Any) -> float | None:
    """``value`` if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def is_online(status: str | None, last_seen: dt.datetime | None, now: dt.datetime,
              stale_after_s: float = DEFAULT_STALE_S) -> bool:
    """Whether a device counts as online (see the module docstring for the rule).

    Args:
        status: Its last reported status (None: never reported).
        last_seen: When it was last heard from (None: never).
        now: The present (timezone-aware).
        stale_after_s: Seconds of silence after which it is offline.
    """
    seen = as_utc(last_seen)
    return status != "offline" and seen is not None and (now - seen).total_seconds() <= stale_after_s


# --- overview ----------------------------------------------------------------------------------------------


def fleet_overview(db: Database, *, now: dt.datetime | None = None,
                   stale_after_s: float = DEFAULT_STALE_S) -> dict[str, Any]:
    """The fleet at a glance.

    Returns ``{"devices": {"total", "online", "offline", "revoked"}, "versions": {model: {version: devices}},
    "incompatible": {"devices", "device_ids", "by_rollout"}, "rollouts": {state: count}, "stale_after_s",
    "generated_at"}``. ``total`` counts the devices not revoked (online + offline); ``versions`` counts what
    those devices report installed. ``incompatible`` is about each model's newest rollout: the devices no
    target of its version fits (a later rollout that fits them clears them).

    Args:
        db: The registry's database.
        now: The present (default: the clock).
        stale_after_s: Seconds of silence after which a device is offline.

    Raises:
        RegistryError: The database failed.
    """
    now = now or utcnow()
    d, t, rd = schema.devices, schema.rollouts, schema.rollout_devices
    with db.transaction() as conn:
        devices = conn.execute(sa.select(d.c.device_id, d.c.status, d.c.last_seen, d.c.revoked, d.c.installed)).all()
        rollouts = conn.execute(sa.select(t.c.id, t.c.model, t.c.state, t.c.created_at)).all()
        newest: dict[str, Any] = {}
        for r in sorted(rollouts, key=lambda r: (as_utc(r.created_at), r.id)):
            newest[r.model] = r.id
        incompatible = conn.execute(sa.select(rd.c.rollout_id, rd.c.device_id).where(
            rd.c.rollout_id.in_(sorted(newest.values())) & (rd.c.state == "incompatible"))).all()
    live = [r for r in devices if not r.revoked]
    online = sum(is_online(r.status, r.last_seen, now, stale_after_s) for r in live)
    versions: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in live:
        for model, version in sorted((r.installed or {}).items()):
            versions[str(model)][str(version)] += 1
    by_rollout: dict[str, int] = defaultdict(int)
    for rollout_id, _ in incompatible:
        by_rollout[rollout_id] += 1
    states: dict[str, int] = defaultdict(int)
    for r in rollouts:
        states[r.state] += 1
    return {
        "devices": {"total": len(live), "online": online, "offline": len(live) - online,
                    "revoked": len(devices) - len(live)},
        "versions": {m: dict(sorted(v.items())) for m, v in sorted(versions.items())},
        "incompatible": {"devices": len({dev for _, dev in incompatible}),
                         "device_ids": sorted({dev for _, dev in incompatible}), "by_rollout": dict(by_rollout)},
        "rollouts": dict(sorted(states.items())),
        "stale_after_s": stale_after_s,
        "generated_at": _iso(now),
    }


# --- rollouts ----------------------------------------------------------------------------------------------


def rollout_waves(db: Database) -> list[dict[str, Any]]:
    """Every rollout, newest first, with its devices counted by wave and state: what the dashboard's rollout
    cards draw. Two queries, the devices counted by the database, so that the answer grows with the rollouts and
    their waves, not with their devices (``GET /api/rollouts`` lists every device of every rollout).

    Each is ``{"id", "kind", "model", "version", "state", "current_wave", "abort_reason", "created_by",
    "options", "waves"}``, ``waves`` holding one ``{state: devices}`` per wave (canary first), as
    :meth:`~edgeml.fleet.rollouts.store.RolloutStatus.counts` gives them.

    Raises:
        RegistryError: The database failed.
    """
    t, rd = schema.rollouts, schema.rollout_devices
    with db.transaction() as conn:
        rollouts = conn.execute(sa.select(t.c.id, t.c.kind, t.c.model, t.c.version, t.c.state, t.c.current_wave,
                                          t.c.abort_reason, t.c.created_by, t.c.options)
                                .order_by(t.c.created_at.desc(), t.c.id)).all()
        counted = conn.execute(sa.select(rd.c.rollout_id, rd.c.wave, rd.c.state, sa.func.count())
                               .group_by(rd.c.rollout_id, rd.c.wave, rd.c.state)).all()
    by_rollout: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for rollout_id, wave, state, n in counted:
        by_rollout[rollout_id].append((int(wave), str(state), int(n)))
    out = []
    for r in rollouts:
        options = dict(r.options or {})
        waves: list[dict[str, int]] = [{} for _ in range(len(options.get("waves") or ()) + 1)]
        for wave, state, n in sorted(by_rollout.get(r.id, ())):
            if 0 <= wave < len(waves):
                waves[wave][state] = n
        out.append({"id": r.id, "kind": r.kind, "model": r.model, "version": r.version, "state": r.state,
                    "current_wave": r.current_wave, "abort_reason": r.abort_reason, "created_by": r.created_by,
                    "options": options, "waves": waves})
    return out


# --- devices -----------------------------------------------------------------------------------------------


def device_list(db: Database, *, now: dt.datetime | None = None,
                stale_after_s: float = DEFAULT_STALE_S) -> list[dict[str, Any]]:
    """Every enrolled device, sorted by id, with the numbers of its latest telemetry row.

    Each is ``{"device_id", "tags", "status", "online", "revoked", "installed", "model", "version",
    "last_seen", "telemetry"}``; ``model``/``version`` are the first (by model name) of ``installed``;
    ``telemetry`` is None without rows, else ``{"seq", "received_at", "latency_p50_ms", "latency_p99_ms",
    "error_rate", "drift_score", "drift_flagged", "output_shift", "output_shift_flagged"}`` (each None where the row
    lacks it; ``output_shift`` is the score of its ``output_drift``).

    Args:
        db: The registry's database.
        now: The present (default: the clock).
        stale_after_s: Seconds of silence after which a device is offline.

    Raises:
        RegistryError: The database failed.
    """
    now = now or utcnow()
    d, t = schema.devices, schema.telemetry_devices
    latest = sa.select(t.c.device_id, t.c.last_seq.label("seq"), t.c.latest_received_at.label("received_at"),
                       t.c.latest_metrics.label("metrics")).where(t.c.last_seq.is_not(None))
    with db.transaction() as conn:
        rows = conn.execute(sa.select(d.c.device_id, d.c.tags, d.c.status, d.c.revoked, d.c.installed, d.c.last_seen)
                            .order_by(d.c.device_id)).all()
        telemetry = {r.device_id: r for r in conn.execute(latest)}
    out = []
    for r in rows:
        installed = {str(k): str(v) for k, v in sorted((r.installed or {}).items())}
        model, version = next(iter(installed.items()), (None, None))
        out.append({"device_id": r.device_id, "tags": dict(r.tags or {}), "status": r.status,
                    "online": bool(not r.revoked and is_online(r.status, r.last_seen, now, stale_after_s)),
                    "revoked": bool(r.revoked), "installed": installed, "model": model, "version": version,
                    "last_seen": _iso(r.last_seen), "telemetry": _latest_doc(telemetry.get(r.device_id))})
    return out


def _latest_doc(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    metrics = row.metrics if isinstance(row.metrics, dict) else {}
    drift: dict[str, Any] = metrics["drift"] if isinstance(metrics.get("drift"), dict) else {}
    shift: dict[str, Any] = metrics["output_drift"] if isinstance(metrics.get("output_drift"), dict) else {}
    flagged, shift_flagged = drift.get("flagged"), shift.get("flagged")
    return {"seq": int(row.seq), "received_at": _iso(row.received_at),
            "latency_p50_ms": _number(metrics.get("latency_p50_ms")),
            "latency_p99_ms": _number(metrics.get("latency_p99_ms")),
            "error_rate": _number(metrics.get("error_rate")), "drift_score": _number(drift.get("score")),
            "drift_flagged": flagged if isinstance(flagged, bool) else None,
            "output_shift": _number(shift.get("score")),
            "output_shift_flagged": shift_flagged if isinstance(shift_flagged, bool) else None}


# --- telemetry ---------------------------------------------------------------------------------------------


def _check_series_args(metric: str, by: str, since_s: float, model: str | None, buckets: int) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}", hint="one of: " + ", ".join(METRICS))
    if by not in GROUPINGS:
        raise ConfigError(f"'by' must be one of {', '.join(GROUPINGS)}, got {by!r}")
    if isinstance(since_s, bool) or not isinstance(since_s, (int, float)) or not 60 <= since_s <= MAX_SINCE_S:
        raise ConfigError(f"'since' must be seconds from 60 to {MAX_SINCE_S}, got {since_s!r}")
    if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets <= 500:
        raise ConfigError(f"'buckets' must be an integer from 1 to 500, got {buckets!r}")
    if model is not None and not _MODEL.fullmatch(model):
        raise ConfigError(f"bad model name {model!r}", hint="letters, digits, '.', '_' or '-', up to 64")


def telemetry_series(db: Database, metric: str, *, by: str = "version", since_s: float = 3600.0,
                     model: str | None = None, buckets: int = DEFAULT_BUCKETS,
                     now: dt.datetime | None = None) -> dict[str, Any]:
    """One metric over the last ``since_s`` seconds, bucketed, one series per version or per device.

    Returns ``{"metric", "by", "model", "since_s", "buckets", "bucket_s", "resolution_s", "start", "end",
    "series"}``; times are Unix seconds; ``resolution_s`` is the rollups' (60 or 3600); ``series`` is a list sorted
    by ``key`` (``model:version``, or the device id) of ``{"key", "points": [[bucket middle, mean], ...], "rows"}``
    with one point per bucket that has windows carrying the metric, ``rows`` counting those windows.

    Args:
        db: The registry's database.
        metric: One of :data:`METRICS` (``drift.score`` is the nested drift score, ``output_drift.score`` the output
            shift).
        by: ``version`` or ``device``.
        since_s: The window, in seconds before ``now`` (60 to :data:`MAX_SINCE_S`).
        model: Only rows of this model (None: every model).
        buckets: How many buckets the window is cut into (1 to 500; at most one per hour past
            :data:`MINUTE_WINDOW_S`).
        now: The end of the window (default: the clock).

    Raises:
        ConfigError: A bad argument (the message names it).
        RegistryError: The database failed.
    """
    _check_series_args(metric, by, since_s, model, buckets)
    end = now or utcnow()
    start = end - dt.timedelta(seconds=since_s)
    resolution = MINUTE if since_s <= MINUTE_WINDOW_S else HOUR
    buckets = min(buckets, max(1, int(since_s // resolution)))
    width = float(since_s) / buckets
    total, count = SERIES_METRICS[metric]
    with db.transaction() as conn:
        rows = read_window(conn, devices=by == "device", resolution=resolution, start=start, end=end,
                           columns=(total, count), model=model)
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    last = dt.timedelta(seconds=resolution) - dt.timedelta(microseconds=1)
    for row in rows:
        value, n = row.values
        if not n:
            continue
        key = row.device_id if by == "device" else _version_key(row.model, row.version)
        at = floor_time(row.start, resolution) + last  # a minute of an hour not rolled yet counts as its hour
        index = min(max(int((at - start).total_seconds() // width), 0), buckets - 1)
        acc = sums[key][index]
        acc[0] += float(value)
        acc[1] += float(n)
    t0 = start.timestamp()
    series = [{"key": key, "rows": int(sum(n for _, n in cells.values())),
               "points": [[round(t0 + (i + 0.5) * width, 3), total / n] for i, (total, n) in sorted(cells.items())]}
              for key, cells in sorted(sums.items())]
    return {"metric": metric, "by": by, "model": model, "since_s": since_s, "buckets": buckets, "bucket_s": width,
            "resolution_s": resolution, "start": t0, "end": end.timestamp(), "series": series}


def _version_key(model: str, version: str) -> str:
    """``model:version`` as the series key ('' stands for a model or version the window did not name)."""
    version = version or "unknown"
    return f"{model}:{version}" if model else version


# --- audit -------------------------------------------------------------------------------------------------


def audit_entries(audit: Any, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` audit entries, newest first: ``{"seq", "at", "actor", "action", "subject", "details"}``.

    Args:
        audit: The registry's :class:`~edgeml.fleet.audit.log.AuditLog`.
        limit: How many (1 to 1000).

    Raises:
        ConfigError: ``limit`` is out of range.
        RegistryError: The database failed.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise ConfigError(f"'limit' must be an integer from 1 to 1000, got {limit!r}")
    return [{"seq": e.seq, "at": _iso(e.at), "actor": e.actor, "action": e.action, "subject": e.subject,
             "details": e.details} for e in reversed(audit.entries(limit=limit))]
