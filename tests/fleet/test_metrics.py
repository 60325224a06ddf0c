"""``GET /metrics`` on SQLite and a real PostgreSQL: a signed registry with published versions, enrolled
devices with reported state, stored telemetry and rollouts, scraped over real HTTP from the fleet's HTTP
listener and parsed with prometheus_client's own parser; every value is checked against the store.
Ingest counters come from a real ``IngestWorker`` on a real Mosquitto. The Grafana dashboard is checked to use
only names that a scrape exports, and the SQL statements per scrape are counted for 3 and for 50 devices.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgeml.errors import ConfigError
from edgeml.fleet.audit.log import AuditLog, open_audit
from edgeml.fleet.registry.repository import init_registry
from edgeml.fleet.rollouts.rules import RolloutOptions
from edgeml.fleet.rollouts.store import rollout_status, set_rollout_state, start_rollout
from edgeml.fleet.store.db import Database
from edgeml.fleet.telemetry.ingest import REJECT_REASONS, IngestSettings, IngestWorker
from edgeml.fleet.telemetry.store import TelemetryStore
from edgeml.fleet.web.auth import create_token
from edgeml.fleet.web.metrics import metrics_routes
from edgeml.fleet.web.server import HttpServer, build_app
from edgeml.protocol import State, Telemetry, device_topic
from tests.fleet.conftest import MakeBundle
from tests.fleet.mosquitto import anonymous_mosquitto

sa = pytest.importorskip("sqlalchemy")
parser = pytest.importorskip("prometheus_client.parser")

DASHBOARD = Path(__file__).resolve().parents[2] / "fleet" / "grafana" / "edgeml-fleet.json"
CAPS = {"runtimes": {"onnxruntime": "1.20.0"}, "arch": "x86_64", "compute_capability": None, "l4t": None,
        "providers": ["CPUExecutionProvider"]}
#: device -> (status, installed version or None: never reported, revoked)
DEVICES = {"cam-a": ("serving", "1.0.0", False), "cam-b": ("serving", "1.0.0", False),
           "cam-c": ("updating", "1.1.0", False), "cam-d": ("offline", "1.1.0", False),
           "cam-e": ("serving", "1.0.0", True), "cam-f": (None, None, False)}
#: device -> its telemetry windows: (requests, errors, p50 ms, p99 ms, version, drift score or None)
WINDOWS: dict[str, list[tuple[Any, ...]]] = {
    "cam-a": [(10, 1, 2.0, 8.0, "1.0.0", None), (20, 0, 2.5, 9.5, "1.0.0", 0.0), (30, 3, 3.0, 12.0, "1.0.0", 0.25)],
    "cam-b": [(5, 0, 1.5, 6.0, "1.0.0", None), (7, 1, 1.75, 7.25, "1.0.0", 0.0)],
    "cam-c": [(40, 2, 4.0, 20.0, "1.1.0", 0.5)],
    "cam-d": [(0, 0, None, None, "1.1.0", None)],  # a window without requests: no latency
}
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def metrics_of(requests: int, errors: int, p50: float | None, p99: float | None, version: str,
               drift: float | None) -> dict[str, Any]:
    """Telemetry metrics shaped as the agent sends them (edge_agent/telemetry.py and telemetry_loop.py)."""
    return {"window_s": 60.0, "requests": requests, "errors": errors,
            "error_rate": errors / requests if requests else 0.0, "latency_p50_ms": p50, "latency_p95_ms": p99,
            "latency_p99_ms": p99, "model": "digits", "version": version, "slot": "a", "status": "serving",
            "drift": None if drift is None else {"score": drift, "flagged": drift > 0, "n": 256},
            # the output shift (edge_agent/drift.py DriftWindow.output_metrics), here twice the drift score
            "output_drift": None if drift is None else {"score": 2 * drift, "flagged": drift > 0.2,
                                                        "against": {"own": 2 * drift}}}


@dataclass
class Fleet:
    db: Database
    audit: AuditLog
    store: TelemetryStore
    seqs: Counter[str]
    http: HttpServer | None = None

    def serve(self, **options: Any) -> None:
        """Serve ``/metrics`` (:func:`metrics_routes` with ``options``) on a free port."""
        self.http = HttpServer(build_app(metrics_routes(self.db, **options)), "127.0.0.1", 0)
        self.http.start()

    def enroll(self, name: str, status: str | None, version: str | None, revoked: bool = False) -> None:
        with self.db.transaction() as conn:
            conn.execute(self.db.tables["devices"].insert().values(device_id=name, revoked=False))
        if status is not None:  # its state, recorded while it was enrolled (a revoked device's never is)
            state = State(name, status, "digits" if version else None, version, capabilities=CAPS)
            assert self.store.update_state(name, state) is True
        if revoked:
            with self.db.transaction() as conn:
                conn.execute(self.db.tables["devices"].update().where(
                    self.db.tables["devices"].c.device_id == name).values(revoked=True))
            assert self.store.update_state(name, State(name, "offline")) is False

    def send(self, name: str, *windows: tuple[Any, ...]) -> None:
        rows = []
        for window in windows:
            rows.append(Telemetry(name, self.seqs[name], 1_700_000_000.0 + self.seqs[name], metrics_of(*window)))
            self.seqs[name] += 1
        assert self.store.insert_batch(rows) == len(rows)

    def scrape(self, headers: dict[str, str] | None = None) -> Samples:
        assert self.http is not None
        with urllib.request.urlopen(urllib.request.Request(self.http.url + "/metrics", headers=headers or {}),
                                    timeout=30) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return parse(response.read().decode())


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][frozenset(labels.items())]


def series(samples: Samples, name: str, key: str) -> dict[str, float]:
    """``{label key's value: sample value}`` of a family with one varying label."""
    return {dict(labels)[key]: v for labels, v in samples.get(name, {}).items()}


@pytest.fixture
def fleet(db_url: str, tmp_path: Path, make_bundle: MakeBundle) -> Iterator[Fleet]:
    """A registry with digits 1.0.0 and 1.1.0 published, its database and audit log (serve() starts /metrics)."""
    registry = init_registry(tmp_path / "reg", db_url=db_url)
    registry.publish(make_bundle("1.0.0"))
    registry.publish(make_bundle("1.1.0", payload=b"model-bytes-1.1"))
    db = registry.database()
    audit = open_audit(registry.dir, db=db)
    fleet = Fleet(db, audit, TelemetryStore(db), Counter())
    try:
        yield fleet
    finally:
        if fleet.http is not None:
            fleet.http.stop()
        db.close()


def populate(fleet: Fleet) -> None:
    """The fleet of DEVICES and WINDOWS, a rollout of 1.1.0 (canary of one, then a wave) and an aborted one."""
    for name, (status, version, revoked) in DEVICES.items():
        fleet.enroll(name, status, version, revoked)
    for name, windows in WINDOWS.items():
        fleet.send(name, *windows)
    options = RolloutOptions(targets=("onnx-fp32",), canary=0.2, waves=(1.0,), min_devices=1)
    start_rollout(fleet.db, fleet.audit, "digits", "1.1.0", options, actor="token:alice", rollout_id="ro-main")
    start_rollout(fleet.db, fleet.audit, "digits", "1.0.0", options, actor="token:alice", rollout_id="ro-old")
    set_rollout_state(fleet.db, fleet.audit, "ro-old", "abort", actor="token:alice", reason="test")


def ts(at: Any) -> float:
    return float(at.timestamp())


# --- the values -------------------------------------------------------------------------------------------


def test_a_scrape_reports_exactly_what_the_store_holds(fleet: Fleet) -> None:
    populate(fleet)
    fleet.serve()
    m = fleet.scrape()
    summary = {s["device_id"]: s for s in fleet.store.devices_summary()}

    # devices: statuses of the non-revoked, revoked, installed versions, last seen
    live = [s for s in summary.values() if not s["revoked"]]
    expected = Counter({"serving": 0, "idle": 0, "updating": 0, "offline": 0})
    expected.update(s["status"] or "unknown" for s in live)
    assert series(m, "edgeml_devices", "status") == dict(expected)
    assert expected == {"serving": 2, "idle": 0, "updating": 1, "offline": 1, "unknown": 1}
    assert value(m, "edgeml_devices_revoked") == sum(s["revoked"] for s in summary.values()) == 1
    installed = Counter((k, v) for s in live for k, v in s["installed"].items())
    assert {(dict(k)["model"], dict(k)["version"]): v for k, v in m["edgeml_devices_installed"].items()} \
        == dict(installed) == {("digits", "1.0.0"): 2, ("digits", "1.1.0"): 2}
    assert series(m, "edgeml_device_last_seen_timestamp_seconds", "device") == \
        {d: ts(s["last_seen"]) for d, s in summary.items() if not s["revoked"] and s["last_seen"] is not None}

    # each device's latest row, and its counters over every row
    for name in WINDOWS:
        rows = fleet.store.latest(name, 1000)
        latest = rows[0]["metrics"]
        labels = {"device": name, "model": "digits", "version": latest["version"]}
        for metric, key, scale in (("latency_p50_seconds", "latency_p50_ms", 1e-3),
                                   ("latency_p99_seconds", "latency_p99_ms", 1e-3), ("error_ratio", "error_rate", 1.0)):
            if latest[key] is None:
                assert frozenset(labels.items()) not in m.get(f"edgeml_device_{metric}", {})
            else:
                assert value(m, f"edgeml_device_{metric}", **labels) == pytest.approx(latest[key] * scale, rel=1e-12)
        drift = latest["drift"]
        assert m["edgeml_device_drift_score"].get(frozenset(labels.items())) == (drift and drift["score"])
        shift = latest["output_drift"]
        assert m["edgeml_device_output_shift_score"].get(frozenset(labels.items())) == (shift and shift["score"])
        assert value(m, "edgeml_device_requests_total", device=name) == sum(r["metrics"]["requests"] for r in rows)
        assert value(m, "edgeml_device_errors_total", device=name) == sum(r["metrics"]["errors"] for r in rows)
        assert value(m, "edgeml_device_telemetry_last_received_timestamp_seconds", device=name) == \
            ts(summary[name]["last_received_at"])
    assert value(m, "edgeml_device_requests_total", device="cam-a") == 60
    assert value(m, "edgeml_device_latency_p99_seconds", device="cam-a", model="digits", version="1.0.0") == 0.012

    # per version: the mean (and max) of the devices' latest values
    v1 = {"model": "digits", "version": "1.0.0"}
    assert value(m, "edgeml_version_devices_reporting", **v1) == 2
    assert value(m, "edgeml_version_mean_latency_p99_seconds", **v1) == pytest.approx((12.0 + 7.25) / 2e3, rel=1e-12)
    assert value(m, "edgeml_version_max_latency_p99_seconds", **v1) == pytest.approx(0.012, rel=1e-12)
    assert value(m, "edgeml_version_mean_error_ratio", **v1) == pytest.approx((3 / 30 + 1 / 7) / 2, rel=1e-12)
    assert value(m, "edgeml_version_mean_drift_score", **v1) == 0.125
    assert value(m, "edgeml_version_mean_output_shift_score", **v1) == 0.25
    assert value(m, "edgeml_version_max_output_shift_score", **v1) == 0.5
    v11 = {"model": "digits", "version": "1.1.0"}
    assert value(m, "edgeml_version_devices_reporting", **v11) == 2  # cam-d reports no latency: left out of means
    assert value(m, "edgeml_version_mean_latency_p50_seconds", **v11) == pytest.approx(0.004, rel=1e-12)
    assert value(m, "edgeml_version_mean_error_ratio", **v11) == pytest.approx((2 / 40 + 0.0) / 2, rel=1e-12)

    # rollouts: every (wave, state) count of rollout_status, the info series, the aborted count
    statuses = rollout_status(fleet.db)
    expected_devices = {(s.id, s.model, s.version, str(w), state): n
                        for s in statuses for w, counts in enumerate(s.counts()) for state, n in counts.items()}
    got = {tuple(dict(k)[x] for x in ("rollout", "model", "version", "wave", "state")): v
           for k, v in m["edgeml_rollout_devices"].items()}
    assert got == expected_devices
    main = next(s for s in statuses if s.id == "ro-main")
    assert sum(n for (r, *_), n in got.items() if r == "ro-main") == len(main.devices) == 5  # every non-revoked one
    assert {dict(k)["rollout"]: (dict(k)["state"], v) for k, v in m["edgeml_rollout_info"].items()} == \
        {s.id: (s.state, 1.0) for s in statuses} == {"ro-main": ("pending", 1.0), "ro-old": ("aborted", 1.0)}
    assert value(m, "edgeml_rollouts_aborted_total") == 1
    assert series(m, "edgeml_rollouts", "state") == {"pending": 1, "aborted": 1}
    assert series(m, "edgeml_rollout_current_wave", "rollout") == {"ro-main": 0, "ro-old": 0}

    # the telemetry table
    assert value(m, "edgeml_telemetry_rows") == sum(s["telemetry_rows"] for s in summary.values()) == 7
    assert value(m, "edgeml_telemetry_last_received_timestamp_seconds") == \
        max(ts(s["last_received_at"]) for s in summary.values() if s["last_received_at"])
    assert not any(name.startswith("edgeml_ingest_") for name in m)  # no worker given


def test_a_change_in_the_store_shows_in_the_next_scrape(fleet: Fleet) -> None:
    populate(fleet)
    fleet.serve()
    before = fleet.scrape()
    fleet.send("cam-b", (100, 50, 9.0, 90.0, "1.1.0", 0.75))
    assert fleet.store.update_state("cam-b", State("cam-b", "offline", "digits", "1.1.0", capabilities=CAPS))
    fleet.enroll("cam-g", "idle", None)
    set_rollout_state(fleet.db, fleet.audit, "ro-main", "pause", actor="token:alice")
    after = fleet.scrape()

    assert series(before, "edgeml_devices", "status")["offline"] == 1
    assert series(after, "edgeml_devices", "status") == {"serving": 1, "idle": 1, "updating": 1, "offline": 2,
                                                         "unknown": 1}
    assert value(after, "edgeml_device_requests_total", device="cam-b") == \
        value(before, "edgeml_device_requests_total", device="cam-b") + 100 == 112
    assert value(after, "edgeml_device_latency_p99_seconds", device="cam-b", model="digits", version="1.1.0") == 0.09
    assert frozenset({"device": "cam-b", "model": "digits", "version": "1.0.0"}.items()) \
        not in after["edgeml_device_latency_p99_seconds"]  # the old version's series is gone
    assert value(after, "edgeml_version_devices_reporting", model="digits", version="1.1.0") == 3
    assert value(after, "edgeml_version_devices_reporting", model="digits", version="1.0.0") == 1
    assert value(after, "edgeml_telemetry_rows") == value(before, "edgeml_telemetry_rows") + 1
    assert series(after, "edgeml_rollouts", "state") == {"paused": 1, "aborted": 1}


def test_a_token_is_required_when_asked(fleet: Fleet) -> None:
    populate(fleet)
    fleet.serve(require_token=True)
    with pytest.raises(urllib.error.HTTPError) as missing:
        fleet.scrape()
    assert missing.value.code == 401 and missing.value.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(urllib.error.HTTPError) as wrong:
        fleet.scrape({"Authorization": "Bearer edgeml_not-a-token"})
    assert wrong.value.code == 401
    token = create_token(fleet.db, "prometheus", "viewer")
    m = fleet.scrape({"Authorization": f"Bearer {token}"})
    assert value(m, "edgeml_devices_revoked") == 1


def test_an_operator_role_can_be_required(fleet: Fleet) -> None:
    with pytest.raises(ConfigError, match="unknown role 'root'"):
        metrics_routes(fleet.db, require_token=True, token_role="root")
    fleet.serve(require_token=True, token_role="operator")
    viewer = create_token(fleet.db, "grafana", "viewer")
    with pytest.raises(urllib.error.HTTPError) as low:
        fleet.scrape({"Authorization": f"Bearer {viewer}"})
    assert low.value.code == 403
    operator = create_token(fleet.db, "ops", "operator")
    assert value(fleet.scrape({"Authorization": f"Bearer {operator}"}), "edgeml_telemetry_rows") == 0


def test_a_database_failure_is_a_503(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'missing' / 'fleet.db'}")  # its folder does not exist
    with HttpServer(build_app(metrics_routes(db)), "127.0.0.1", 0) as http, \
            pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(http.url + "/metrics", timeout=30)
    assert failed.value.code == 503 and json.loads(failed.value.read()) == {
        "error": "the fleet's database is unavailable", "hint": "try again shortly; the fleet server's log says why",
        "status": 503}


def test_malformed_telemetry_values_are_left_out(fleet: Fleet) -> None:
    fleet.enroll("cam-x", "serving", "1.0.0")
    bad = {"requests": "many", "errors": True, "latency_p50_ms": "fast", "latency_p99_ms": [9.0],
           "error_rate": None, "drift": {"score": "high"}, "output_drift": {"score": None}, "model": "digits",
           "version": "1.0.0"}
    good = metrics_of(4, 1, 1.0, 2.0, "1.0.0", None)
    assert fleet.store.insert_batch([Telemetry("cam-x", 0, 1.0, good), Telemetry("cam-x", 1, 2.0, bad)]) == 2
    fleet.serve()
    m = fleet.scrape()
    assert value(m, "edgeml_device_requests_total", device="cam-x") == 4  # only numbers are summed
    assert value(m, "edgeml_device_errors_total", device="cam-x") == 1
    for metric in ("latency_p50_seconds", "latency_p99_seconds", "error_ratio", "drift_score", "output_shift_score"):
        assert not m.get(f"edgeml_device_{metric}"), metric
    assert value(m, "edgeml_version_devices_reporting", model="digits", version="1.0.0") == 1


# --- ingest counters, and the Grafana dashboard ------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def ingesting(fleet: Fleet) -> Iterator[tuple[Fleet, IngestWorker, int]]:
    """The populated fleet served with a real IngestWorker on a real Mosquitto."""
    populate(fleet)
    with anonymous_mosquitto() as (port, _), \
            IngestWorker(fleet.db, "127.0.0.1", port, settings=IngestSettings(flush_ms=20)) as worker:
        fleet.serve(ingest=worker)
        yield fleet, worker, port


def test_ingest_counters_are_the_workers(ingesting: tuple[Fleet, IngestWorker, int]) -> None:
    fleet, worker, port = ingesting
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="metrics-test")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for seq in range(2, 6):  # cam-b has seqs 0 and 1 stored
            payload = Telemetry("cam-b", seq, 1.0, metrics_of(1, 0, 1.0, 2.0, "1.0.0", None)).to_bytes()
            client.publish(device_topic("cam-b", "telemetry"), payload, qos=1).wait_for_publish(10)
        client.publish(device_topic("cam-b", "telemetry"), b"[not telemetry", qos=1).wait_for_publish(10)
        client.publish(device_topic("cam-e", "telemetry"), Telemetry("cam-e", 0, 1.0, {}).to_bytes(),
                       qos=1).wait_for_publish(10)  # revoked
        wait_for(lambda: worker.stats()["stored"] == 4 and sum(worker.stats()["rejected"].values()) == 2,
                 "the worker to store 4 rows and reject 2 messages")
        wait_for(lambda: worker.stats()["acks"] >= 1 and worker.stats()["queued"] == 0, "the acknowledgement")
    finally:
        client.disconnect()
        client.loop_stop()
    stats = worker.stats()
    m = fleet.scrape()
    assert worker.stats() == stats  # nothing moved meanwhile
    for name in ("received", "states", "stored", "duplicates", "acks", "batches", "store_errors", "connects"):
        assert value(m, f"edgeml_ingest_{name}_total") == stats[name], name
    assert series(m, "edgeml_ingest_rejected_total", "reason") == \
        {**dict.fromkeys(REJECT_REASONS, 0), "malformed": 1, "revoked": 1}
    assert value(m, "edgeml_ingest_queued") == 0
    assert value(m, "edgeml_ingest_stored_total") == 4 and value(m, "edgeml_ingest_received_total") == 6  # rejects too
    assert value(m, "edgeml_device_requests_total", device="cam-b") == 12 + 4


def dashboard_exprs(doc: Any) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets (rows' nested panels too) and template queries."""
    exprs: list[str] = []
    stack = list(doc["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        exprs.extend(t["expr"] for t in panel.get("targets", []))
    for var in doc.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query))
    return exprs


def test_the_grafana_dashboard_uses_only_exported_metrics(ingesting: tuple[Fleet, IngestWorker, int]) -> None:
    fleet, _, _ = ingesting
    doc = json.loads(DASHBOARD.read_text())
    assert doc["schemaVersion"] >= 36
    assert [(i["name"], i["type"], i["pluginId"]) for i in doc["__inputs"]] == \
        [("DS_PROMETHEUS", "datasource", "prometheus")]
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in panels)
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("online", "offline", "versions per model", "rollout progress", "p50 latency per version",
                  "p99 latency per version", "p50 latency per device", "p99 latency per device", "error rate",
                  "drift score", "output shift per version", "output shift per device", "ingest rate"):
        assert topic in titles, topic
    exported = set()
    for name in fleet.scrape():  # sample names (counters with _total); no histograms are exported
        exported.add(name)
    used = {name for expr in dashboard_exprs(doc) for name in re.findall(r"edgeml_[a-z0-9_]+", expr)}
    assert len(dashboard_exprs(doc)) >= 30 and len(used) >= 25
    assert used <= exported, sorted(used - exported)


# --- cost ---------------------------------------------------------------------------------------------------


def test_statements_per_scrape_do_not_grow_with_the_devices(fleet: Fleet) -> None:
    statements: list[str] = []
    sa.event.listen(fleet.db.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *rest: statements.append(statement))
    fleet.serve()
    fleet.scrape()  # the first use of the database checks its schema

    def count(n_devices: int) -> tuple[int, float]:
        for i in range(len(fleet.seqs), n_devices):
            name = f"dev-{i:03d}"
            fleet.enroll(name, "serving", "1.0.0")
            fleet.send(name, (i + 1, 0, 1.0, 2.0, "1.0.0", None), (1, 0, 1.0, 2.0, "1.0.0", None))
        statements.clear()
        m = fleet.scrape()
        return len(statements), value(m, "edgeml_version_devices_reporting", model="digits", version="1.0.0")

    few, reporting_few = count(3)
    many, reporting_many = count(50)
    assert (reporting_few, reporting_many) == (3, 50)
    assert few == many == 4, statements
    assert len(fleet.seqs) == 50


def test_the_text_is_what_prometheus_client_writes(fleet: Fleet) -> None:
    """``render`` writes the exposition text itself (generate_latest costs ~30 µs a sample): byte for byte the same."""
    from prometheus_client import CollectorRegistry, generate_latest

    from edgeml.fleet.web.metrics import FleetCollector, render

    populate(fleet)
    fleet.send("cam-a", (1, 0, 1.0, 2.0, 'version "quoted"\\and\nnewline', 0.5))  # a label value to escape
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet.db))
    assert render(fleet.db) == generate_latest(registry)


def test_a_family_is_written_as_prometheus_client_writes_it() -> None:
    """Every float form (Go's exponents, infinities, NaN, -0.0), unsorted label names, and label values holding
    '%', quotes, backslashes and newlines: the same bytes as generate_latest."""
    from prometheus_client import CollectorRegistry, generate_latest

    from edgeml.fleet.web.prometheus_text import counter, gauge

    values = [0.0, -0.0, 0.1, 1.5, 123456.5, 1234567.5, -1234567.5, 1e22, 1e-7, 2.5e300, float("inf"), float("-inf"),
              float("nan"), 10.0**6, 7.0, 123456789.0]
    plain = gauge("edgeml_test_plain", "values\nwith a \\ in the help", labels=["version", "device", "a"])
    odd = counter("edgeml_test_odd", "escaped label values", labels=["z", "b"])
    single = gauge("edgeml_test_single", "no labels", value=1234567.25)
    for i, v in enumerate(values):
        plain.add_metric([f"1.{i}", f"cam-{i}", "%s %d"], v)
        odd.add_metric([f'v "{i}"', "back\\slash\nline%"], abs(v))
    families = [plain, odd, single]

    class Collector:
        def collect(self):  # type: ignore[no-untyped-def]
            return [f.to_client() for f in families]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    out: list[str] = []
    for family in families:
        family.write(out)
    assert "".join(out).encode() == generate_latest(registry)


def test_capture_counters_are_the_receivers(fleet: Fleet, tmp_path: Path) -> None:
    """The capture upload receiver's counters on /metrics (every reason at 0 until it happens), and the text stays
    what prometheus_client writes with them."""
    import re

    from prometheus_client import CollectorRegistry, generate_latest

    from edgeml.fleet.capture import receiver as receiver_module
    from edgeml.fleet.capture.receiver import REJECT_REASONS, UploadReceiver
    from edgeml.fleet.devices.roster import REVOKED, UNKNOWN
    from edgeml.fleet.web.metrics import FleetCollector, render

    source = Path(receiver_module.__file__).read_text()
    named = set(re.findall(r'_drop\("([a-z-]+)"', source)) | set(re.findall(r'rejected\["([a-z-]+)"\]', source))
    assert named | {REVOKED, UNKNOWN} == set(REJECT_REASONS)  # a new reason gets its zero series too
    receiver = UploadReceiver(fleet.db, tmp_path / "reg", "127.0.0.1", 1)  # frames handed to it directly
    fleet.serve(capture=receiver)
    m = fleet.scrape()
    assert series(m, "edgeml_capture_rejected_total", "reason") == dict.fromkeys(REJECT_REASONS, 0)
    assert receiver.handle(device_topic("cam-a", "uploads"), b"not a frame") is None
    assert receiver.handle(device_topic("cam-a", "uploads"), b"\x00\x00") is None
    m = fleet.scrape()
    assert value(m, "edgeml_capture_rejected_total", reason="malformed") == 2
    assert value(m, "edgeml_capture_stored_total") == value(m, "edgeml_capture_uploads_total") == 0
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet.db, capture=receiver))
    assert render(fleet.db, capture=receiver) == generate_latest(registry)
