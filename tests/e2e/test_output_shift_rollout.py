"""A detector's broken release stopped by the output shift, with the real fleet (issue 13, point 3).

A small text detector (no class scores: tests/edge_agent/test_output_shift.py's) is compiled by ``compile_model``
(ONNX Runtime INT8, gated), 1.0.0 and a 2.0.0 whose export scales every output by 0.1 (the compile gate passes it:
it matches its own source), both published in a signed registry (SQLite, then the local PostgreSQL). The fleet runs
as a deployment would: this process runs ``dist``, ``ingest`` and ``web``, and ``edgeml fleet serve --role
controller`` runs as a subprocess; a real Mosquitto carries everything to a real agent, fed images by an application
thread. The controller rolls out 1.0.0, then 2.0.0: the agent's outputs on 2.0.0 move away from the reference
statistics, it rolls back on cause ``output_shift`` (or the controller, reading the same shift from the telemetry
rollups, aborts first and tells it to roll back: both orders are legitimate and both end here), the rollout aborts
on the output-shift rule, and the fleet's API, dashboard data and ``/metrics`` show the shift of 2.0.0.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeml.fleet.registry.repository import init_registry
from edgeml.fleet.rollouts.rules import RolloutOptions
from edgeml.fleet.rollouts.store import rollout_status, start_rollout
from edgeml.fleet.server import FleetServer, ServeSettings
from edgeml.fleet.web.auth import Role, create_token
from tests.e2e.test_fleet_rollouts import Fleet
from tests.edge_agent.harness import plain_broker, write_agent_config
from tests.edge_agent.test_output_shift import H, W, _Camera, _detector_onnx, text_images
from tests.fleet.conftest import database_url

DEVICE, SITE = "cam-textdet", "textdet-e2e"
#: The agent's limits: enough requests on each version that its telemetry reports the output shift for a few
#: windows before it judges (one window every 0.5 s), slack on latency for a shared 2-core machine.
LIMITS = {"min_requests": 1500, "max_probation_s": 90.0, "p99_factor": 5.0, "p99_slack_ms": 20.0,
          "smoke_latency_budget_s": 0.05}


def _compile(work: Path) -> list[Path]:
    """textdet 1.0.0 and its broken 2.0.0 as onnx-int8 bundles."""
    from edgeml.compile import CompileOptions, compile_model

    rng = np.random.default_rng(10)
    np.savez(work / "calib.npz", x=text_images(rng, 64))
    np.savez(work / "val.npz", x=text_images(rng, 96))
    bundles = []
    for version, scale in (("1.0.0", None), ("2.0.0", 0.1)):
        model = _detector_onnx(work / f"textdet-{version}.onnx", scale)
        options = CompileOptions(targets=("onnx-int8",), name="textdet", version=version, max_error=0.05,
                                 input_shape={"x": (1, 3, H, W)}, benchmark=False)
        report = compile_model(str(model), options, work / "dist", calib=work / "calib.npz", val=work / "val.npz")
        (outcome,) = report.outcomes
        assert report.ok and outcome.bundle is not None, (outcome.status, outcome.gate and outcome.gate.reason)
        bundles.append(outcome.bundle)
    return bundles


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    pytest.importorskip("onnxruntime")
    return _compile(tmp_path_factory.mktemp("textdet"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request: pytest.FixtureRequest, bundles: list[Path],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp(f"output-shift-e2e-{request.param}")
    with database_url(request.param, root) as url, plain_broker() as (port, _):
        registry = init_registry(root / "reg", db_url=url)
        for bundle in bundles:
            registry.publish(bundle)
        settings = ServeSettings(roles=frozenset({"dist", "ingest", "web"}), broker_host="127.0.0.1",
                                 broker_port=port, http_port=0, db_url=url, shared=True, metrics_token=True)
        with FleetServer(registry.dir, settings) as server:
            fleet = Fleet(url, registry, port, server.db, server.audit, server,
                          client_id=f"e2e.controller-{uuid.uuid4().hex[:6]}")
            fleet.start_controller(root)
            try:
                yield fleet
            finally:
                assert fleet.controller is not None
                fleet.controller.kill()


def _rollout(fleet: Fleet, version: str) -> str:
    options = RolloutOptions(targets=("onnx-int8",), select={"site": SITE}, canary=1.0, waves=(1.0,), min_devices=1,
                             probation_s=2.0, wave_timeout_s=150.0, max_failure_rate=0.0, device_thresholds=LIMITS)
    return start_rollout(fleet.db, fleet.audit, "textdet", version, options, actor="local:e2e")


def _settled(fleet: Fleet, rollout_id: str, timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        status = rollout_status(fleet.db, rollout_id)[0]
        busy = any(d["revert_state"] in ("rollback", "revert", "revert-sent") or d["state"] in ("notifying", "notified")
                   for d in status.devices)
        if status.state == "completed" or (status.state == "aborted" and not busy):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(json.dumps({"state": status.state, "devices": status.devices}, default=str))
        time.sleep(0.2)


def _get(fleet: Fleet, path: str, token: str) -> bytes:
    request = urllib.request.Request(fleet.server.http.url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return bytes(response.read())


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text exposition (None: absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_detector_release_whose_outputs_shifted_is_stopped_by_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    from edgeml.edge_agent.agent import Agent
    from edgeml.edge_agent.config import load_config

    root = (fleet.registry.metadata_dir / "1.root.json").read_bytes()
    agent = Agent(load_config(write_agent_config(tmp_path / "cam", DEVICE, fleet.port, root)))
    t = fleet.db.tables["devices"]
    with fleet.db.transaction() as conn:  # enrolled before it speaks, as in the field
        conn.execute(t.insert().values(device_id=DEVICE, tags={"site": SITE}, revoked=False,
                                       capabilities=agent.capabilities.to_dict()))
    agent.start()
    camera = _Camera(agent, seed=11)
    try:
        first = _settled(fleet, _rollout(fleet, "1.0.0"))
        assert first.state == "completed", first.devices
        assert agent.status()["version"] == "1.0.0"

        rid = _rollout(fleet, "2.0.0")
        status = _settled(fleet, rid)
        assert status.state == "aborted", status.devices
        assert status.abort_reason.startswith("output shift past 0.5 on 1 devices"), status.abort_reason
        (row,) = status.devices
        assert row["state"] == "rolled_back", row
        if status.abort_reason.endswith("(every device rolled back for it)"):  # the agent judged first
            assert row["cause"] == "output_shift" and row["reason"].startswith("probation: output shift"), row
        deadline = time.monotonic() + 30
        while agent.status()["version"] != "1.0.0" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert agent.status()["version"] == "1.0.0"
        assert agent.telemetry.output_shift_score("2.0.0") > 0.8  # what the agent measured on 2.0.0

        # the fleet's own view of it: the dashboard's API, the device list and /metrics
        token = create_token(fleet.db, f"viewer-{uuid.uuid4().hex[:6]}", Role.VIEWER)
        series = json.loads(_get(fleet, "/api/telemetry?metric=output_drift.score&since=900", token))
        values = {s["key"]: [v for _, v in s["points"]] for s in series["series"]}
        assert max(values["textdet:2.0.0"]) > 0.5, values
        assert max(values["textdet:1.0.0"]) < 0.3, values
        devices = json.loads(_get(fleet, "/api/devices", token))
        (device,) = [d for d in devices if d["device_id"] == DEVICE]
        assert device["telemetry"]["output_shift"] is not None
        text = _get(fleet, "/metrics", token).decode()
        worst = _sample(text, "edgeml_version_5m_max_output_shift_score", model="textdet", version="2.0.0")
        assert worst is not None and worst > 0.5, worst
        assert _sample(text, "edgeml_device_output_shift_score", device=DEVICE) is not None
        assert camera.failures == 0
    finally:
        camera.close()
        agent.stop()
