"""Staged rollouts end to end: real Mosquitto, the fleet server split into processes, simulated devices.

The fleet server runs as two parts that meet in the database (SQLite, then the local PostgreSQL) and on the
broker, as a scaled-out deployment would: this process runs ``dist``, ``ingest`` and ``web`` (shared
subscriptions), and ``edgeml fleet serve --role controller`` runs as a real subprocess, which one test
SIGKILLs mid-rollout. The devices are :class:`~edgeml.fleet.sim.simulator.Simulator` devices: each has its own
MQTT connection, verifies every download with TUF and runs the real update machine, with the stand-in
runtime (fixed latency) so that a slow version is exactly ``slow_factor`` times slower.
"""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeml.fleet.registry.repository import Registry, init_registry
from edgeml.fleet.rollouts.controller import CONTROLLER_ACTOR
from edgeml.fleet.rollouts.rules import RolloutOptions, order
from edgeml.fleet.rollouts.store import rollout_status, start_rollout
from edgeml.fleet.server import FleetServer, ServeSettings
from edgeml.fleet.sim.simulator import Knobs, Simulator
from tests.edge_agent.harness import plain_broker
from tests.fleet.conftest import database_url
from tests.fleet.test_rollouts import Recorder
from tests.fleet.test_serve import ServeProcess
from tests.fleet.test_simulate import _bundle

ACTOR = "local:e2e"
#: Device health thresholds for a shared 2-core machine: short probation, slack on latency.
QUICK = {"min_requests": 10, "max_probation_s": 60.0, "p99_factor": 3.0, "p99_slack_ms": 8.0,
         "smoke_latency_budget_s": 0.05}


@dataclass
class Fleet:
    url: str
    registry: Registry
    port: int
    db: Any
    audit: Any
    server: FleetServer
    controller: ServeProcess | None = None
    client_id: str = ""

    def start_controller(self, tmp: Path) -> None:
        args = [str(self.registry.dir), "--role", "controller", "--broker-host", "127.0.0.1", "--broker-port",
                str(self.port), "--db-url", self.url, "--tick", "0.2", "--client-id", self.client_id]
        self.controller = ServeProcess(args, {}, tmp)
        line = self.controller.next_line(60)
        assert line.startswith("mqtt: serving") or line.startswith("controller:"), line
        while not line.startswith("controller:"):
            line = self.controller.next_line(60)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp(f"e2e-{request.param}")
    with database_url(request.param, root) as url, plain_broker() as (port, _):
        registry = init_registry(root / "reg", db_url=url)
        for version, scale in (("1.0.0", 1.0), ("2.0.0", 1.5), ("3.0.0", 2.0)):
            registry.publish(_bundle(root, version, scale))
        settings = ServeSettings(roles=frozenset({"dist", "ingest", "web"}), broker_host="127.0.0.1",
                                 broker_port=port, http_port=0, db_url=url, shared=True)
        with FleetServer(registry.dir, settings) as server:
            fleet = Fleet(url, registry, port, server.db, server.audit, server,
                          client_id=f"e2e.controller-{uuid.uuid4().hex[:6]}")
            fleet.start_controller(root)
            try:
                yield fleet
            finally:
                assert fleet.controller is not None
                fleet.controller.kill()


def _simulator(fleet: Fleet, n: int, site: str, **knobs: Any) -> Simulator:
    """``n`` simulated devices (not started), recorded in the devices table as enrollment would, tagged
    ``site``."""
    settings = {"rps": 40.0, "latency_ms": 2.0, "telemetry_interval_s": 0.5, **knobs}
    root = (fleet.registry.metadata_dir / "1.root.json").read_bytes()
    sim = Simulator("127.0.0.1", fleet.port, root, n, Knobs(**settings), prefix=site)
    t = fleet.db.tables["devices"]
    with fleet.db.transaction() as conn:
        for p in sim.profiles:
            conn.execute(t.insert().values(device_id=p.device_id, tags={"site": site}, revoked=False,
                                           capabilities=p.capabilities.to_dict()))
    return sim


def _install_first(fleet: Fleet, site: str) -> None:
    """Every device of ``site`` on 1.0.0, through a one-wave rollout."""
    rid = _rollout(fleet, site, "1.0.0", canary=1.0, waves=(1.0,))
    assert _settled(fleet, rid).state == "completed"


def _rollout(fleet: Fleet, site: str, version: str, rollout_id: str | None = None, **changes: Any) -> str:
    options = {"targets": ("onnx",), "select": {"site": site}, "canary": 0.2, "waves": (0.5, 1.0),
               "min_devices": 2, "probation_s": 0.5, "wave_timeout_s": 60.0, "max_failure_rate": 0.1,
               "device_thresholds": QUICK, **changes}
    return start_rollout(fleet.db, fleet.audit, "tiny", version, RolloutOptions(**options), actor=ACTOR,
                         rollout_id=rollout_id)


def _settled(fleet: Fleet, rollout_id: str, timeout: float = 120.0) -> Any:
    """The rollout once it completed, or aborted with every undo finished."""
    deadline = time.monotonic() + timeout
    while True:
        status = rollout_status(fleet.db, rollout_id)[0]
        undoing = any(d["revert_state"] in ("rollback", "revert", "revert-sent") or
                      d["state"] in ("notifying", "notified") for d in status.devices)
        if status.state == "completed" or (status.state == "aborted" and not undoing):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(json.dumps({"state": status.state, "devices": status.devices}, default=str))
        time.sleep(0.2)


def _versions(sim: Simulator) -> dict[str, str | None]:
    return {d.device_id: d.host.active.version if d.host.active else None for d in sim.devices}


def _wait_versions(sim: Simulator, want: str, timeout: float = 60.0) -> dict[str, str | None]:
    deadline = time.monotonic() + timeout
    while set(_versions(sim).values()) != {want} and time.monotonic() < deadline:
        time.sleep(0.2)
    return _versions(sim)


def test_a_good_rollout_goes_through_every_wave(fleet: Fleet) -> None:
    site = f"good{fleet.url[:2]}"
    with _simulator(fleet, 10, site) as sim:
        _install_first(fleet, site)
        rid = _rollout(fleet, site, "2.0.0")
        status = _settled(fleet, rid)
        assert status.state == "completed" and status.abort_reason is None
        assert [w.get("committed", 0) for w in status.counts()] == [2, 3, 5]  # canary 20%, then 50%, 100%
        waves: dict[int, list[dict[str, Any]]] = {}
        for d in status.devices:
            waves.setdefault(d["wave"], []).append(d)
        for wave in (1, 2):  # no device of a wave is told before every device of the waves before it finished
            assert min(d["notified_at"] for d in waves[wave]) >= max(d["finished_at"] for d in waves[wave - 1])
        assert _wait_versions(sim, "2.0.0") == dict.fromkeys(_versions(sim), "2.0.0")
    actions = [e.action for e in fleet.audit.entries() if e.details.get("rollout") == rid]
    assert actions == ["rollout.start"]


def test_a_version_failing_on_30_percent_aborts_at_the_canary(fleet: Fleet) -> None:
    site = f"fail{fleet.url[:2]}"
    with _simulator(fleet, 10, site, fail=0.3, bad_versions=("3.0.0",)) as sim:
        _install_first(fleet, site)
        failing = {p.device_id for p in sim.profiles if "fail" in p.faults}
        assert len(failing) == 3
        # The canary is the first 4 devices in the rollout's order (a hash of its id): pick an id whose canary
        # holds a failing device, and a healthy one.
        ids = [p.device_id for p in sim.profiles]
        rid = next(f"ro-fail-{i}" for i in range(100) if 0 < len(set(order(f"ro-fail-{i}", ids)[:4]) & failing) < 4)
        recorder = Recorder(fleet.port)
        try:
            _rollout(fleet, site, "3.0.0", rollout_id=rid, canary=0.4, min_devices=3)
            status = _settled(fleet, rid)
            canary = {d["device_id"] for d in status.devices if d["wave"] == 0}
            assert canary == set(order(rid, ids)[:4]) and failing & canary
            assert status.state == "aborted" and status.abort_reason.startswith("failure rate")
            assert status.current_wave == 0
            outside = [d["device_id"] for d in status.devices if d["wave"] > 0]
            assert outside and all(recorder.updates(d, rid) == [] for d in outside)  # never notified
            assert all(d["notified_at"] is None for d in status.devices if d["wave"] > 0)
            assert {d["state"] for d in status.devices if d["device_id"] in failing & canary} == {"failed"}
            aborts = [(e.actor, e.details["reason"]) for e in fleet.audit.entries()
                      if e.action == "rollout.abort" and e.details.get("rollout") == rid]
            assert aborts == [(CONTROLLER_ACTOR, status.abort_reason)]  # the controller's abort, audited
        finally:
            recorder.close()
        assert _wait_versions(sim, "1.0.0") == dict.fromkeys(_versions(sim), "1.0.0")


def _has_baseline(fleet: Fleet, devices: list[str], version: str, rows: int = 2) -> bool:
    t, sa = fleet.db.tables["telemetry"], fleet.db.sa
    with fleet.db.transaction() as conn:
        found = conn.execute(sa.select(t.c.device_id, t.c.metrics).where(t.c.device_id.in_(devices))).all()
    counts = {d: 0 for d in devices}
    for device_id, metrics in found:
        if metrics.get("version") == version and (metrics.get("requests") or 0) > 0:
            counts[device_id] += 1
    return min(counts.values()) >= rows


def test_a_version_with_twice_the_p99_aborts_on_the_telemetry_signal(fleet: Fleet) -> None:
    site = f"slow{fleet.url[:2]}"
    with _simulator(fleet, 6, site, slow=1.0, slow_factor=2.0, bad_versions=("3.0.0",)) as sim:
        _install_first(fleet, site)
        ids = [p.device_id for p in sim.profiles]
        deadline = time.monotonic() + 30
        while not _has_baseline(fleet, ids, "1.0.0"):  # the ingest worker stored the old version's p99
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # The agents would let it through (p99 factor 10): only the fleet's telemetry judge can stop it.
        rid = _rollout(fleet, site, "3.0.0", canary=0.5, min_devices=2, probation_s=30.0, max_failure_rate=1.0,
                       max_p99_regression=1.5, device_thresholds={**QUICK, "p99_factor": 10.0})
        status = _settled(fleet, rid)
        assert status.state == "aborted", status.devices
        match = re.fullmatch(r"p99 regression past 1\.5 on (\d) devices \(median ([\d.]+)\)", status.abort_reason)
        assert match is not None, status.abort_reason
        assert int(match.group(1)) == 3 and 1.6 <= float(match.group(2)) <= 2.6
        assert {d["state"] for d in status.devices if d["wave"] == 0} <= {"rolled_back", "committed"}
        assert all(d["notified_at"] is None for d in status.devices if d["wave"] > 0)
        assert _wait_versions(sim, "1.0.0") == dict.fromkeys(ids, "1.0.0")


def test_a_controller_killed_mid_rollout_continues(fleet: Fleet, tmp_path: Path) -> None:
    site = f"kill{fleet.url[:2]}"
    with _simulator(fleet, 8, site) as sim:
        _install_first(fleet, site)
        rid = _rollout(fleet, site, "2.0.0", canary=0.25, waves=(0.5, 0.75, 1.0), probation_s=1.0)
        deadline = time.monotonic() + 60
        while rollout_status(fleet.db, rid)[0].current_wave < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert fleet.controller is not None
        fleet.controller.proc.send_signal(signal.SIGKILL)
        assert fleet.controller.proc.wait(10) == -signal.SIGKILL
        assert rollout_status(fleet.db, rid)[0].state != "completed"
        fleet.start_controller(tmp_path)  # the same client id: its session kept the devices' events
        status = _settled(fleet, rid)
        assert status.state == "completed"
        assert sum(w.get("committed", 0) for w in status.counts()) == 8
        assert _wait_versions(sim, "2.0.0") == dict.fromkeys(_versions(sim), "2.0.0")
