"""Prometheus ``/metrics`` for the fleet server: devices, their latest telemetry, rollouts and ingestion.

:func:`metrics_routes` serves ``GET /metrics`` on the fleet's HTTP listener in the Prometheus text
exposition format. A :class:`FleetCollector` on a private ``CollectorRegistry`` reads the
registry database afresh on every scrape (nothing is cached between scrapes, no global registry is touched),
so what Prometheus sees is what the database holds at that moment.

**Cost of a scrape**: four ``SELECT`` statements in one read transaction, whatever the number of devices or
rollouts (no per-device or per-rollout query), and none of them reads a telemetry row: the ``devices`` table;
the devices' running totals and latest windows (``telemetry_devices``, kept by the ingest transaction); the
rollouts joined to their devices counted by wave and state; and the versions' minute rollups of the last
:data:`RECENT_MINUTES` minutes. Its cost is proportional to devices, rollouts and versions, never to the history
stored. With ``require_token`` the token check adds two statements.

Exported series (all prefixed ``edgeml_``; units in the names, ratios as 0..1):

=================================================  ===========================================================
``devices{status}``                                non-revoked enrolled devices by last reported status
                                                   (``unknown``: never reported)
``devices_revoked``                                revoked devices
``devices_installed{model,version}``               non-revoked devices that report ``model`` at ``version``
``device_last_seen_timestamp_seconds{device}``     when each device was last heard (Unix seconds)
``device_latency_p50_seconds``, ``..._p99_...``    each device's latest telemetry window, labelled
``device_error_ratio``, ``device_drift_score``,    ``{device,model,version}`` (the model it was measured on)
``device_output_shift_score``
``device_requests_total{device}``, ``..._errors``  sums over every window ever stored of the device (counters:
                                                   running totals, which retention never lowers)
``device_telemetry_last_received_timestamp_...``   when its latest stored row arrived
``version_devices_reporting{model,version}``       devices whose latest telemetry is on that version, and
``version_mean_latency_p50_seconds`` and friends   the mean (and max) of their latest values
``version_5m_windows{model,version}``, ``..._      the version's windows, requests and errors received in the
requests``, ``..._errors``                         last 5 minutes (its minute rollups), and over those windows
``version_5m_mean_latency_p99_seconds`` and        the mean p50, mean and max p99, mean error rate, mean and
friends                                            max drift score, mean and max output shift
``rollout_info{rollout,model,version,state}``      1 per rollout; ``rollout_current_wave{rollout}``
``rollout_devices{rollout,model,version,wave,      devices of each rollout by wave and state
state}``
``rollouts{state}``, ``rollouts_aborted_total``    rollouts by state; how many were aborted
``telemetry_rows``, ``telemetry_last_received_.`` rows ever stored (retention does not lower it); when the
                                                   newest arrived
``ingest_*_total``, ``ingest_rejected_total{       an :class:`~edgeml.fleet.telemetry.ingest.IngestWorker`'s counters,
reason}``, ``ingest_queued``                       when one is given
=================================================  ===========================================================

The per-device counters carry only the ``device`` label, so that ``rate()`` stays continuous when a device
changes version. ``fleet/grafana/edgeml-fleet.json`` is a Grafana dashboard over exactly these names.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeml.fleet.store import schema
from edgeml.fleet.store.db import utcnow
from edgeml.fleet.store.schema import sa
from edgeml.fleet.telemetry.figures import Rollup, floor_time, number
from edgeml.fleet.web.prometheus_text import Family, counter, gauge

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database
    from edgeml.fleet.web.auth import Role

__all__ = ["CONTENT_TYPE", "METRICS_PATH", "FleetCollector", "metrics_routes", "render"]

#: Where the route is served.
METRICS_PATH = "/metrics"
#: The text format ``generate_latest`` writes (prometheus_client >= 0.22 calls 1.0.0 "latest"; every Prometheus reads
#: 0.0.4, and the names here need none of 1.0.0's escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Statuses always exported (as 0 when no device has them), so that dashboards show 0 rather than no data.
_BASE_STATUSES = ("serving", "idle", "updating", "offline")
_SUMMED = ("requests", "errors")  # telemetry metrics summed over every stored window of a device
#: Minutes of the versions' rollups in the ``edgeml_version_5m_*`` families (the current one included).
RECENT_MINUTES = 5


def _timestamp(value: Any) -> float | None:
    """Unix seconds of a stored time (SQLite gives naive UTC datetimes back)."""
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()


@dataclass
class _Snapshot:
    """What one scrape read from the database."""

    devices: list[Any] = field(default_factory=list)  # rows: device_id, status, revoked, installed, last_seen
    telemetry: list[Any] = field(default_factory=list)  # rows: device_id, rows, last_at, requests, errors, metrics
    rollouts: list[Any] = field(default_factory=list)  # rows: id, model, version, state, current_wave
    waves: list[Any] = field(default_factory=list)  # rows: rollout_id, wave, state, n
    recent: dict[tuple[str, str], Rollup] = field(default_factory=dict)  # (model, version) -> the last 5 minutes


def _read(db: Database) -> _Snapshot:
    """The four queries of a scrape, in one read transaction: devices, their running totals, rollouts with their
    devices counted by wave and state, and the versions' minute rollups of the last :data:`RECENT_MINUTES`.

    Raises:
        RegistryError: The database failed.
    """
    d, t, r, rd = schema.devices, schema.telemetry_devices, schema.rollouts, schema.rollout_devices
    vm = schema.telemetry_version_minute
    waves = (sa.select(rd.c.rollout_id, rd.c.wave, rd.c.state, sa.func.count().label("n"))
             .group_by(rd.c.rollout_id, rd.c.wave, rd.c.state).subquery())
    rollouts = sa.select(r.c.id, r.c.model, r.c.version, r.c.state, r.c.current_wave, waves.c.wave,
                         waves.c.state.label("device_state"), waves.c.n).select_from(
        r.outerjoin(waves, waves.c.rollout_id == r.c.id))
    since = floor_time(utcnow(), 60) - dt.timedelta(minutes=RECENT_MINUTES - 1)
    snap = _Snapshot()
    with db.transaction() as conn:
        snap.devices = conn.execute(sa.select(d.c.device_id, d.c.status, d.c.revoked, d.c.installed,
                                              d.c.last_seen)).all()
        snap.telemetry = conn.execute(sa.select(t.c.device_id, t.c.windows.label("rows"),
                                                t.c.last_received_at.label("last_at"), t.c.requests, t.c.errors,
                                                t.c.latest_metrics.label("metrics"))
                                      .where(t.c.windows > 0)).all()
        joined = conn.execute(rollouts).all()
        recent = conn.execute(sa.select(vm).where(vm.c.bucket >= since)).all()
    seen = {}
    for row in joined:
        seen[row.id] = row
        if row.wave is not None:
            snap.waves.append(_Wave(row.id, row.wave, row.device_state, row.n))
    snap.rollouts = list(seen.values())
    for row in recent:
        snap.recent.setdefault((row.model, row.version), Rollup()).merge(Rollup.of_row(row))
    return snap


@dataclass(frozen=True)
class _Wave:
    rollout_id: str
    wave: int
    state: str
    n: int


# --- families built from a snapshot (no I/O) -----------------------------------------------------------------


def _device_families(snap: _Snapshot) -> Iterator[Family]:

    statuses: Counter[str] = Counter(dict.fromkeys(_BASE_STATUSES, 0))
    installed: Counter[tuple[str, str]] = Counter()
    seen = gauge("edgeml_device_last_seen_timestamp_seconds",
                             "When the device was last heard (state or telemetry), Unix seconds", labels=["device"])
    revoked = 0
    for row in snap.devices:
        if row.revoked:
            revoked += 1
            continue
        statuses[row.status or "unknown"] += 1
        for model, version in dict(row.installed or {}).items():
            installed[(str(model), str(version))] += 1
        at = _timestamp(row.last_seen)
        if at is not None:
            seen.add_metric([row.device_id], at)
    by_status = gauge("edgeml_devices", "Enrolled, non-revoked devices by their last reported status "
                                  "('unknown': never reported)", labels=["status"])
    for status, n in sorted(statuses.items()):
        by_status.add_metric([status], n)
    yield by_status
    yield gauge("edgeml_devices_revoked", "Revoked devices", value=revoked)
    per_version = gauge("edgeml_devices_installed", "Non-revoked devices reporting this model version "
                                    "as installed", labels=["model", "version"])
    for (model, version), n in sorted(installed.items()):
        per_version.add_metric([model, version], n)
    yield per_version
    yield seen


#: (metric suffix, telemetry key, scale, help) of the per-device and per-version gauges.
_GAUGES = (
    ("latency_p50_seconds", "latency_p50_ms", 1e-3, "median inference latency of the latest telemetry window"),
    ("latency_p99_seconds", "latency_p99_ms", 1e-3, "99th percentile inference latency of the latest window"),
    ("error_ratio", "error_rate", 1.0, "fraction of failed requests (0..1) in the latest window"),
    ("drift_score", "drift", 1.0, "drift score of the latest window (0 when not flagged)"),
    ("output_shift_score", "output_drift", 1.0, "output-shift score of the latest window (largest KS distance of "
     "the model's outputs from its reference statistics, 0..1)"),
)
_NESTED = ("drift", "output_drift")  # telemetry keys whose value is {"score": ...}


def _latest_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Gauge suffix -> value from one telemetry row's metrics (missing or non-numeric values left out)."""
    out = {}
    for suffix, key, scale, _ in _GAUGES:
        raw = metrics.get(key)
        value = number(raw.get("score") if type(raw) is dict else None) if key in _NESTED else number(raw)
        if value is not None:
            out[suffix] = value * scale
    return out


def _label(value: Any) -> str:
    return "" if value is None else str(value)


def _telemetry_families(snap: _Snapshot) -> Iterator[Family]:

    gauges = {s: gauge(f"edgeml_device_{s}", f"The device's {h}", labels=["device", "model", "version"])
              for s, _, _, h in _GAUGES}
    counters = {k: counter(f"edgeml_device_{k}", f"Inference {k} over every telemetry window ever "
                                       "stored of the device", labels=["device"]) for k in _SUMMED}
    received = gauge("edgeml_device_telemetry_last_received_timestamp_seconds",
                                 "When the device's latest stored telemetry row arrived, Unix seconds",
                                 labels=["device"])
    per_version: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    rows, last = 0, None
    samples = {suffix: family.samples for suffix, family in gauges.items()}  # appended to directly: 1,000s a scrape
    requests, errors = counters["requests"].samples, counters["errors"].samples
    for row in sorted(snap.telemetry, key=lambda r: r.device_id):
        metrics = row.metrics if isinstance(row.metrics, Mapping) else {}
        model, version = _label(metrics.get("model")), _label(metrics.get("version"))
        values = _latest_values(metrics)
        labels = (row.device_id, model, version)
        for suffix, value in values.items():
            samples[suffix].append((labels, value))
        device = (row.device_id,)
        requests.append((device, float(row.requests or 0)))
        errors.append((device, float(row.errors or 0)))
        at = _timestamp(row.last_at)
        if at is not None:
            received.samples.append((device, at))
            last = at if last is None else max(last, at)
        rows += int(row.rows)
        if model and version:
            per_version[(model, version)].append(values)
    yield from gauges.values()
    yield from counters.values()
    yield received
    yield from _version_families(per_version)
    yield gauge("edgeml_telemetry_rows", "Telemetry rows ever stored (retention does not lower it)",
                            value=rows)
    if last is not None:
        yield gauge("edgeml_telemetry_last_received_timestamp_seconds",
                                "When the newest stored telemetry row arrived, Unix seconds", value=last)


def _version_families(per_version: Mapping[tuple[str, str], list[dict[str, float]]]) -> Iterator[Family]:

    labels = ["model", "version"]
    reporting = gauge("edgeml_version_devices_reporting", "Devices whose latest telemetry window is on "
                                  "this model version", labels=labels)
    means = {s: gauge(f"edgeml_version_mean_{s}", f"Mean over the version's devices of the {h}",
                                  labels=labels) for s, _, _, h in _GAUGES}
    maxima = {s: gauge(f"edgeml_version_max_{s}", f"Highest over the version's devices of the {h}",
                                   labels=labels)
              for s, _, _, h in _GAUGES if s in ("latency_p99_seconds", "drift_score", "output_shift_score")}
    for key in sorted(per_version):
        devices = per_version[key]
        reporting.add_metric(list(key), len(devices))
        for suffix in means:
            values = [v[suffix] for v in devices if suffix in v]
            if values:
                means[suffix].add_metric(list(key), math.fsum(values) / len(values))
                if suffix in maxima:
                    maxima[suffix].add_metric(list(key), max(values))
    yield reporting
    yield from means.values()
    yield from maxima.values()


#: (metric suffix, rollup metric or column, how, scale, help) of the ``edgeml_version_5m_*`` gauges.
_RECENT = (
    ("mean_latency_p50_seconds", "latency_p50_ms", "mean", 1e-3, "mean median latency"),
    ("mean_latency_p99_seconds", "latency_p99_ms", "mean", 1e-3, "mean p99 latency"),
    ("max_latency_p99_seconds", "p99_max", "max", 1e-3, "highest p99 latency"),
    ("mean_error_ratio", "error_rate", "mean", 1.0, "mean error rate (0..1)"),
    ("mean_drift_score", "drift.score", "mean", 1.0, "mean drift score"),
    ("max_drift_score", "drift_max", "max", 1.0, "highest drift score"),
    ("mean_output_shift_score", "output_drift.score", "mean", 1.0, "mean output-shift score"),
    ("max_output_shift_score", "shift_max", "max", 1.0, "highest output-shift score"),
)


def _recent_families(snap: _Snapshot) -> Iterator[Family]:
    """Per version, over the telemetry windows received in the last few minutes: the minute rollups summed."""

    labels, over = ["model", "version"], f"over the windows received in the last {RECENT_MINUTES} minutes"
    counts = {c: gauge(f"edgeml_version_5m_{c}", f"Telemetry {c} of the version {over}", labels=labels)
              for c in ("windows", "requests", "errors")}
    gauges = {s: gauge(f"edgeml_version_5m_{s}", f"The version's {h} {over}", labels=labels)
              for s, _, _, _, h in _RECENT}
    for (model, version), rollup in sorted(snap.recent.items()):
        if not model or not version:
            continue
        for column, family in counts.items():
            family.add_metric([model, version], rollup.get(column))
        for suffix, source, how, scale, _ in _RECENT:
            value = rollup.mean(source) if how == "mean" else getattr(rollup, source)
            if value is not None:
                gauges[suffix].add_metric([model, version], value * scale)
    yield from counts.values()
    yield from gauges.values()


def _rollout_families(snap: _Snapshot) -> Iterator[Family]:

    info = gauge("edgeml_rollout_info", "1 per rollout, labelled with its model, version and state",
                             labels=["rollout", "model", "version", "state"])
    wave = gauge("edgeml_rollout_current_wave", "The rollout's current wave (0: canary)",
                             labels=["rollout"])
    by_state: Counter[str] = Counter()
    names = {}
    for r in sorted(snap.rollouts, key=lambda r: r.id):
        info.add_metric([r.id, r.model, r.version, r.state], 1)
        wave.add_metric([r.id], r.current_wave)
        by_state[r.state] += 1
        names[r.id] = (r.model, r.version)
    devices = gauge("edgeml_rollout_devices", "Devices of a rollout by wave (0: canary) and state",
                                labels=["rollout", "model", "version", "wave", "state"])
    for w in sorted(snap.waves, key=lambda w: (w.rollout_id, w.wave, w.state)):
        model, version = names.get(w.rollout_id, ("", ""))
        devices.add_metric([w.rollout_id, model, version, str(w.wave), w.state], int(w.n))
    counts = gauge("edgeml_rollouts", "Rollouts by state", labels=["state"])
    for state, n in sorted(by_state.items()):
        counts.add_metric([state], n)
    yield from (info, wave, devices, counts)
    yield counter("edgeml_rollouts_aborted", "Rollouts aborted (by the rules or by an operator)",
                              value=by_state["aborted"])


#: IngestWorker.stats() counters exported as ``edgeml_ingest_<name>_total``.
_INGEST_COUNTERS = {
    "received": "Telemetry messages received from the broker",
    "states": "State messages received from the broker",
    "stored": "Telemetry rows stored (new rows)",
    "duplicates": "Telemetry messages dropped as already stored",
    "acks": "Telemetry acknowledgements sent to devices",
    "batches": "Batches written to the database",
    "store_errors": "Failed database writes (retried)",
    "connects": "Successful connections to the broker",
}


def _worker_families(prefix: str, counters: Mapping[str, str], stats: Mapping[str, Any], reasons: Iterable[str],
                     rejected_help: str) -> Iterator[Family]:
    """A worker's ``stats()`` as ``edgeml_<prefix>_<name>_total`` counters, and ``edgeml_<prefix>_rejected_total``
    by reason with every one of ``reasons`` at 0 until it happens."""
    for name, text in counters.items():
        yield counter(f"edgeml_{prefix}_{name}", text, value=int(stats.get(name, 0)))
    rejected = counter(f"edgeml_{prefix}_rejected", rejected_help, labels=["reason"])
    for reason, n in sorted({**dict.fromkeys(reasons, 0), **dict(stats.get("rejected") or {})}.items()):
        rejected.add_metric([reason], int(n))
    yield rejected


def _ingest_families(stats: Mapping[str, Any]) -> Iterator[Family]:
    from edgeml.fleet.telemetry.ingest import REJECT_REASONS

    yield from _worker_families("ingest", _INGEST_COUNTERS, stats, REJECT_REASONS, "Messages rejected, by reason")
    yield gauge("edgeml_ingest_queued", "Messages waiting for the database writer",
                            value=int(stats.get("queued", 0)))


#: UploadReceiver.stats() counters exported as ``edgeml_capture_<name>_total``.
_CAPTURE_COUNTERS = {
    "stored": "Captured samples archived",
    "duplicates": "Captured samples dropped as already archived",
    "uploads": "Capture uploads finished",
}


def _capture_families(stats: Mapping[str, Any]) -> Iterator[Family]:
    from edgeml.fleet.capture.receiver import REJECT_REASONS

    yield from _worker_families("capture", _CAPTURE_COUNTERS, stats, REJECT_REASONS,
                                "Capture upload frames dropped, by reason")


class FleetCollector:
    """A Prometheus collector that reads the fleet's database on every :meth:`collect`.

    Args:
        db: The registry's :class:`~edgeml.fleet.store.db.Database`.
        ingest: An :class:`~edgeml.fleet.telemetry.ingest.IngestWorker` (anything with its ``stats()``) whose counters
            to export, or None.
        capture: An :class:`~edgeml.fleet.capture.receiver.UploadReceiver` (anything with its ``stats()``) whose
            counters to export, or None.
    """

    def __init__(self, db: Database, ingest: Any = None, capture: Any = None) -> None:
        self.db = db
        self.ingest = ingest
        self.capture = capture

    def describe(self) -> Iterable[Any]:
        """Nothing: registering the collector must not query the database."""
        return []

    def collect(self) -> Iterator[Any]:
        """Every metric family, read fresh (four queries), as prometheus_client's families.

        Raises:
            RegistryError: The database failed.
        """
        for family in self.families():
            yield family.to_client()

    def families(self) -> Iterator[Family]:
        """Every metric family, read fresh (four queries)."""
        snap = _read(self.db)
        stats = self.ingest.stats() if self.ingest is not None else None
        yield from _device_families(snap)
        yield from _telemetry_families(snap)
        yield from _recent_families(snap)
        yield from _rollout_families(snap)
        if stats is not None:
            yield from _ingest_families(stats)
        if self.capture is not None:
            yield from _capture_families(self.capture.stats())


def render(db: Database, ingest: Any = None, capture: Any = None) -> bytes:
    """One scrape's body in the Prometheus text format (version 0.0.4), byte for byte what ``generate_latest``
    writes of a registry holding :class:`FleetCollector`, at a fraction of its cost (families are built and
    written here, without prometheus_client's per-sample objects and checks).

    Args:
        db: The registry's database.
        ingest: An ingest worker whose counters to include, or None.
        capture: A capture upload receiver whose counters to include, or None.

    Raises:
        RegistryError: The database failed.
    """
    out: list[str] = []
    for family in FleetCollector(db, ingest, capture).families():
        family.write(out)
    return "".join(out).encode()


def metrics_routes(db: Database, *, ingest: Any = None, capture: Any = None, require_token: bool = False,
                   token_role: Role | str = "viewer") -> list[Any]:
    """``GET /metrics`` (Prometheus text format), as a route for :func:`~edgeml.fleet.web.server.build_app`.

    By Prometheus convention the route needs no token (the fleet's listener is on 127.0.0.1 by default); with
    ``require_token`` it answers only a bearer token of ``token_role`` or higher (401 without one). A database
    failure is a 503, so that Prometheus marks the target down instead of recording zeros.

    Args:
        db: The registry's :class:`~edgeml.fleet.store.db.Database`.
        ingest: The server's :class:`~edgeml.fleet.telemetry.ingest.IngestWorker`, whose counters to export
            (None: none).
        capture: The server's :class:`~edgeml.fleet.capture.receiver.UploadReceiver`, whose counters to export
            (None: none).
        require_token: Ask for an operator token (``Authorization: Bearer ...``).
        token_role: The lowest role allowed with ``require_token``: a :class:`~edgeml.fleet.web.auth.Role` or its
            name.

    Raises:
        ConfigError: ``token_role`` is not a role.
    """
    from starlette.responses import Response

    from edgeml.fleet.web.auth import Role
    from edgeml.fleet.web.routes import ApiCall, api_route

    role = token_role if isinstance(token_role, Role) else Role.parse(token_role)  # checked even when unused

    def metrics(call: ApiCall) -> Response:
        return Response(render(db, ingest, capture), 200, {"Cache-Control": "no-store"}, CONTENT_TYPE)

    return [api_route(METRICS_PATH, metrics, db=db, role=role if require_token else None)]
