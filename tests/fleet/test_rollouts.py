"""Staged rollouts end to end, on SQLite and on a real PostgreSQL: a real Mosquitto, a signed registry, the
distribution service, the rollout controller and real in-process agents serving the digits model.

Every device first commits 1.0.0 (sent directly, as an operator would); then the controller rolls out:
a good version through canary and waves (and a rollback of it), a version that fails on 30% of the devices
(aborted at the canary; nothing sent beyond it; the canary back on 1.0.0), a slow version (aborted on the
p99 signal), a controller SIGKILLed mid-rollout (restarted, it completes), bad input (refused, nothing
written), and the CLI and HTTP front ends (operator tokens, audited actors).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgeml.bundle import Manifest, TensorSpec
from edgeml.bundle_writer import write_bundle
from edgeml.edge_agent.agent import Agent
from edgeml.edge_agent.capabilities import Capabilities, detect
from edgeml.edge_agent.config import load_config
from edgeml.fleet.audit.log import AuditLog, open_audit
from edgeml.fleet.registry.repository import Registry, init_registry
from edgeml.fleet.rollouts.controller import RolloutController
from edgeml.fleet.rollouts.rules import RolloutError, RolloutOptions, order
from edgeml.fleet.rollouts.store import (
    rollback,
    rollout_routes,
    rollout_status,
    set_rollout_state,
    start_rollout,
)
from edgeml.fleet.web.auth import Role, create_token
from edgeml.fleet.web.server import HttpServer, build_app
from edgeml.protocol import PREFIX, Command, parse
from tests.conftest import DigitsModel
from tests.edge_agent.conftest import BROKEN, GOOD, SLOW, DigitsBundles, _graph, digits_bundles  # noqa: F401
from tests.edge_agent.harness import Operator, distribution, plain_broker, write_agent_config
from tests.fleet.conftest import database_url

MIXED = "2.1.0"  # "onnx-new" (golden vectors it does not reproduce) for onnxruntime >= 1.99, "onnx" for the rest
#: Agent health thresholds short enough for tests (no traffic: commit after probation_s).
QUICK = {"min_requests": 0, "max_probation_s": 10, "p99_slack_ms": 8}
ACTOR = "token:alice"


def _mixed_bundles(digits: DigitsModel, bundles: DigitsBundles, out: Path) -> list[Path]:
    """digits 2.1.0 as two targets: ``onnx`` (good) and ``onnx-new`` (for newer devices, broken golden)."""
    import onnxruntime as ort

    with np.load(digits.val) as val:
        golden_in = val["input"].astype(np.float32)[:16]
    paths = []
    for target, minimum, roll in (("onnx", "1.17", 0), ("onnx-new", "1.99", 1)):
        src = out / target
        src.mkdir(parents=True)
        (src / "model.onnx").write_bytes(_graph(digits, "plain"))
        right = ort.InferenceSession(str(src / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"input": golden_in})[0]
        np.savez(src / "golden.npz", **{"in:input": golden_in, "out:output": np.roll(right, roll, axis=1)})
        manifest = Manifest(
            name="digits", version=MIXED, target=target,
            runtime={"name": "onnxruntime", "min_version": minimum, "precision": "fp32", "build": None},
            model={"file": "model.onnx", "format": "onnx"},
            inputs=(TensorSpec("input", ("batch", 1, 8, 8), "float32"),),
            outputs=(TensorSpec("output", ("batch", 10), "float32"),),
            golden={"file": "golden.npz", "count": 16, "atol": 1e-3 * max(1.0, float(np.abs(right).max())),
                    "rtol": 0.0, "top1": True}, created="2026-01-01T00:00:00+00:00")
        write_bundle(out / manifest.filename, manifest, {"model.onnx": src / "model.onnx",
                                                         "golden.npz": src / "golden.npz"})
        paths.append(out / manifest.filename)
    return paths


@dataclass
class Fleet:
    url: str
    registry: Registry
    port: int
    dist: Any
    operator: Operator
    db: Any
    audit: AuditLog
    name: str


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request: pytest.FixtureRequest, digits: DigitsModel, digits_bundles: DigitsBundles,  # noqa: F811
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp(f"rollouts-{request.param}")
    with database_url(request.param, root) as url:
        registry = init_registry(root / "reg", db_url=url)
        for version in ("1.0.0", GOOD, BROKEN, SLOW):
            registry.publish(digits_bundles.paths[version])
        for path in _mixed_bundles(digits, digits_bundles, root / "mixed"):
            registry.publish(path)
        db = registry.database()
        audit = open_audit(registry.dir, db=db)
        with plain_broker() as (port, _), distribution(registry, port) as dist:
            operator = Operator(port)
            try:
                yield Fleet(url, registry, port, dist, operator, db, audit, request.param[:2])
            finally:
                operator.close()
                db.close()


class Recorder:
    """Every update and rollback command the broker carries to a device, by device (after :meth:`clear`)."""

    def __init__(self, port: int) -> None:
        self.commands: dict[str, list[Command]] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"recorder-{uuid.uuid4().hex[:6]}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"{PREFIX}devices/+/commands", qos=1)
        assert subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        command = parse("command", bytes(msg.payload))
        assert isinstance(command, Command)
        if command.type not in ("update", "rollback"):
            return
        with self._lock:
            self.commands.setdefault(msg.topic.split("/")[3], []).append(command)

    def updates(self, device: str, rollout: str) -> list[Command]:
        with self._lock:
            return [c for c in self.commands.get(device, []) if c.args.get("rollout") == rollout]

    def clear(self) -> None:
        with self._lock:
            self.commands.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Devices:
    agents: dict[str, Agent]
    recorder: Recorder
    site: str  # their tag: select={"site": site} selects them only

    def versions(self) -> dict[str, str | None]:
        return {d: a.status()["version"] for d, a in self.agents.items()}


MakeDevices = Callable[..., Devices]


@pytest.fixture
def make_devices(fleet: Fleet, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MakeDevices]:
    """``make_devices(n, tags=..., newer=...)``: n agents on 1.0.0 (tagged ``site=<prefix>`` unless ``tags``),
    recorded in the devices table; ``newer(device_id)``: report onnxruntime 1.99 (so it gets ``onnx-new``)."""
    made: list[Devices] = []

    def make(n: int, tags: dict[str, str] | None = None, newer: Callable[[str], bool] = lambda d: False,
             prefix: str | None = None, plain: Callable[[str], bool] = lambda d: False) -> Devices:
        prefix = prefix or f"{fleet.name}-{request.node.name.split('[')[0][5:17].replace('_', '-')}"
        ids = [f"{prefix}-{i}" for i in range(n)]
        recorder = Recorder(fleet.port)
        root = (fleet.registry.metadata_dir / "1.root.json").read_bytes()
        agents = {}
        for device_id in ids:
            caps = detect()
            if newer(device_id):
                caps = Capabilities({**caps.runtimes, "onnxruntime": "1.99.0"}, caps.arch, providers=caps.providers)
            if plain(device_id):  # cannot apply deltas (no zstandard)
                caps = dataclasses.replace(caps, deltas=[])
            config = load_config(write_agent_config(tmp_path / device_id, device_id, fleet.port, root))
            agents[device_id] = Agent(config, capabilities=caps)
        _record_devices(fleet, agents, tags or {"site": prefix})  # enrolled before they speak, as in the field
        for agent in agents.values():
            agent.start()
        devices = Devices(agents, recorder, (tags or {"site": prefix})["site"])
        made.append(devices)
        with ThreadPoolExecutor(n) as pool:
            ends = list(pool.map(lambda d: _first_install(fleet, d), ids))
        assert [e["state"] for e in ends] == ["committed"] * n, ends
        _wait_installed(fleet, ids, "1.0.0")  # plans read what the devices' states put in the store
        recorder.clear()
        return devices

    yield make
    for devices in made:
        devices.recorder.close()
        for agent in devices.agents.values():
            agent.stop()


def _wait_installed(fleet: Fleet, ids: list[str], version: str, timeout: float = 30.0) -> None:
    t = fleet.db.tables["devices"]
    deadline = time.monotonic() + timeout
    while True:
        with fleet.db.transaction() as conn:
            rows = conn.execute(fleet.db.sa.select(t.c.installed).where(t.c.device_id.in_(ids))).scalars().all()
        if len(rows) == len(ids) and all((r or {}).get("digits") == version for r in rows):
            return
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)


def _first_install(fleet: Fleet, device_id: str) -> dict[str, Any]:
    fleet.operator.wait_for(lambda s: s.states.get(device_id, {}).get("status") in ("idle", "serving"), 30)
    cid = fleet.operator.send(device_id, "update", model="digits", version="1.0.0", target="onnx",
                              thresholds={"probation_s": 0.5, **QUICK})
    return fleet.operator.update_end(device_id, cid)


def _record_devices(fleet: Fleet, agents: dict[str, Agent], tags: dict[str, str]) -> None:
    """What enrollment and the ingest worker would have written: tags, status, capabilities, installed."""
    t = fleet.db.tables["devices"]
    with fleet.db.transaction() as conn:
        for device_id, agent in agents.items():
            conn.execute(t.insert().values(device_id=device_id, tags=tags, revoked=False, status="serving",
                                           capabilities=agent.capabilities.to_dict(),
                                           installed={"digits": "1.0.0"}))


@pytest.fixture
def controller(fleet: Fleet) -> Iterator[RolloutController]:
    with RolloutController(fleet.db, "127.0.0.1", fleet.port, dist=fleet.dist, tick_s=0.2,
                           client_id=f"rollouts.{uuid.uuid4().hex[:8]}") as running:
        yield running


def _options(**changes: Any) -> RolloutOptions:
    base: dict[str, Any] = {"targets": ("onnx",), "canary": 0.25, "waves": (0.5, 1.0),
                            "min_devices": 1, "probation_s": 0.5, "wave_timeout_s": 60.0, "max_failure_rate": 0.1,
                            "device_thresholds": QUICK}
    return RolloutOptions(**{**base, **changes})


def _settled(fleet: Fleet, rollout_id: str, timeout: float = 90.0) -> Any:
    """The rollout once it completed, or aborted with every undo finished."""
    deadline = time.monotonic() + timeout
    while True:
        status = rollout_status(fleet.db, rollout_id)[0]
        undoing = any(d["revert_state"] in ("rollback", "revert", "revert-sent") or
                      (d["state"] in ("notifying", "notified")) for d in status.devices)
        if status.state == "completed" or (status.state == "aborted" and not undoing):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(json.dumps({"state": status.state, "devices": status.devices}, default=str))
        time.sleep(0.2)


def _times(fleet: Fleet, rollout_id: str) -> dict[str, tuple[int, Any, Any]]:
    rd = fleet.db.tables["rollout_devices"]
    with fleet.db.transaction() as conn:
        rows = conn.execute(fleet.db.sa.select(rd).where(rd.c.rollout_id == rollout_id)).all()
    return {r.device_id: (r.wave, r.notified_at, r.finished_at) for r in rows}


def _audit(fleet: Fleet, rollout_id: str) -> list[tuple[str, str]]:
    return [(e.actor, e.action) for e in fleet.audit.entries() if e.details.get("rollout") == rollout_id]


# --- the scenarios ------------------------------------------------------------------------------------------


def test_a_good_rollout_goes_through_every_wave_and_a_rollback_undoes_it(
        fleet: Fleet, make_devices: MakeDevices, controller: RolloutController) -> None:
    devices = make_devices(4)
    other = make_devices(1, tags={"site": "elsewhere"}, prefix=f"{fleet.name}-other")
    rid = start_rollout(fleet.db, fleet.audit, "digits", GOOD, _options(select={"site": devices.site}), actor=ACTOR)
    status = _settled(fleet, rid)
    assert status.state == "completed" and status.abort_reason is None
    assert [sorted(w.items()) for w in status.counts()] == [[("committed", 1)], [("committed", 1)],
                                                            [("committed", 2)]]
    assert devices.versions() == dict.fromkeys(devices.agents, GOOD)
    times = _times(fleet, rid)
    for wave in (1, 2):  # no device of a wave was told before every device of the waves before it finished
        before = max(f for w, _, f in times.values() if w < wave)
        assert all(n >= before for w, n, _ in times.values() if w == wave)
    assert all(len(devices.recorder.updates(d, rid)) == 1 for d in devices.agents)
    outsider = f"{fleet.name}-other-0"
    assert other.recorder.commands.get(outsider) is None and other.versions() == {outsider: "1.0.0"}
    assert _audit(fleet, rid) == [(ACTOR, "rollout.start")]

    back = rollback(fleet.db, fleet.audit, "digits", "1.0.0", actor=ACTOR, select={"site": devices.site},
                    probation_s=0.5, device_thresholds=QUICK)
    status = _settled(fleet, back)
    assert (status.kind, status.state, len(status.devices)) == ("rollback", "completed", 4)
    assert devices.versions() == dict.fromkeys(devices.agents, "1.0.0")
    assert _audit(fleet, back) == [(ACTOR, "rollback")]


def test_devices_on_the_base_of_a_delta_get_the_delta_and_the_others_the_full_bundle(
        fleet: Fleet, make_devices: MakeDevices, controller: RolloutController) -> None:
    """GOOD was published after 1.0.0 with a delta from it: devices serving 1.0.0 that can apply deltas are
    offered it (broadcast too) and rebuild GOOD from their slot; a device that cannot, and one serving a version
    without a delta to GOOD (2.1.0), get the full bundle."""
    devices = make_devices(4, plain=lambda d: d.endswith("-2"))
    ids = sorted(devices.agents)
    elsewhere = ids[3]
    cid = fleet.operator.send(elsewhere, "update", model="digits", version=MIXED, target="onnx",
                              thresholds={"probation_s": 0.5, **QUICK})
    assert fleet.operator.update_end(elsewhere, cid)["state"] == "committed"
    _wait_installed(fleet, [elsewhere], MIXED)
    rid = start_rollout(fleet.db, fleet.audit, "digits", GOOD, _options(select={"site": devices.site}), actor=ACTOR)
    status = _settled(fleet, rid)
    assert status.state == "completed" and devices.versions() == dict.fromkeys(ids, GOOD)
    rows = {d["device_id"]: d for d in status.devices}
    full_length = fleet.registry.targets()[f"digits/{GOOD}/onnx.edgeml"].length
    for device_id in ids:
        (command,) = devices.recorder.updates(device_id, rid)
        transfer = rows[device_id]["transfer"]
        if device_id in ids[:2]:
            assert command.args["delta_from"] == "1.0.0"
            assert command.args["broadcast"]["path"].endswith(".edgeml-delta")
            assert transfer["kind"] == "delta" and transfer["bytes"] < 0.5 * full_length
        else:
            assert "delta_from" not in command.args and command.args["broadcast"]["path"].endswith(".edgeml")
            assert transfer == {"kind": "full", "bytes": full_length, "full_bytes": full_length}
    sent = status.transfer()
    assert (sent["delta"], sent["full"], sent["fallback"], sent["full_bytes"]) == (2, 2, 0, 4 * full_length)
    assert "transfer: 2 delta, 2 full" in _cli(fleet, "rollout", "status", str(fleet.registry.dir), rid)


def test_a_version_failing_on_30_percent_aborts_at_the_canary_and_the_canary_goes_back(
        fleet: Fleet, make_devices: MakeDevices, controller: RolloutController) -> None:
    rid = f"ro-mixed-{fleet.name}"
    ids = order(rid, [f"{fleet.name}-mixed-{i}" for i in range(10)])
    newer = {ids[0], ids[4], ids[7]}  # 3 of 10, one in the canary of 3
    devices = make_devices(10, newer=lambda d: d in newer, prefix=f"{fleet.name}-mixed")
    options = _options(targets=("onnx-new", "onnx"), canary=0.3, waves=(0.6, 1.0), min_devices=3,
                       select={"site": devices.site})
    start_rollout(fleet.db, fleet.audit, "digits", MIXED, options, actor=ACTOR, rollout_id=rid)
    status = _settled(fleet, rid)
    assert status.state == "aborted" and status.abort_reason is not None
    assert status.abort_reason.startswith("failure rate 33% (1 of 3 finished devices)")
    canary = {d["device_id"]: d for d in status.devices if d["wave"] == 0}
    assert sorted(canary) == sorted(ids[:3])
    assert canary[ids[0]]["target"] == "onnx-new" and canary[ids[0]]["state"] == "failed"
    assert "golden" in canary[ids[0]]["reason"]
    assert [(canary[d]["target"], canary[d]["state"], canary[d]["revert_state"]) for d in ids[1:3]] == \
        [("onnx", "committed", "reverted")] * 2
    outside = [d["device_id"] for d in status.devices if d["wave"] > 0]
    assert len(outside) == 7 and all(devices.recorder.updates(d, rid) == [] for d in outside)
    assert all(devices.recorder.commands.get(d, []) == [] for d in outside)  # nothing at all: no rollback either
    assert devices.versions() == dict.fromkeys(devices.agents, "1.0.0")


def test_a_slow_version_aborts_on_the_p99_signal(fleet: Fleet, make_devices: MakeDevices,
                                                  controller: RolloutController,
                                                  digits_bundles: DigitsBundles) -> None:  # noqa: F811
    devices = make_devices(4)
    stop = threading.Event()
    threads = [threading.Thread(target=_traffic, args=(a, digits_bundles.traffic, stop), daemon=True)
               for a in devices.agents.values()]
    for thread in threads:
        thread.start()
    try:
        options = _options(canary=0.5, min_devices=2, max_failure_rate=1.0, max_p99_regression=1.5,
                           select={"site": devices.site},
                           device_thresholds={"min_requests": 20, "max_probation_s": 20, "p99_slack_ms": 8})
        rid = start_rollout(fleet.db, fleet.audit, "digits", SLOW, options, actor=ACTOR)
        status = _settled(fleet, rid)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert status.state == "aborted"
    assert status.abort_reason == "p99 regression past 1.5 on 2 devices (every device rolled back for it)"
    canary = [d for d in status.devices if d["wave"] == 0]
    assert [(d["state"], "p99" in d["reason"]) for d in canary] == [("rolled_back", True)] * 2
    assert all(devices.recorder.updates(d["device_id"], rid) == [] for d in status.devices if d["wave"] > 0)
    assert devices.versions() == dict.fromkeys(devices.agents, "1.0.0")


def _traffic(agent: Agent, inputs: np.ndarray, stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        agent.predict("digits", inputs[i % len(inputs)][None], preprocessed=True)
        i += 1
        time.sleep(0.003)


def test_a_controller_killed_mid_rollout_continues_from_the_store(fleet: Fleet, make_devices: MakeDevices) -> None:
    devices = make_devices(4)
    rid = start_rollout(fleet.db, fleet.audit, "digits", GOOD, _options(select={"site": devices.site}), actor=ACTOR)
    client_id = f"rollouts.{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "edgeml.cli", "fleet", "controller", str(fleet.registry.dir), "--broker-host",
               "127.0.0.1", "--broker-port", str(fleet.port), "--db-url", fleet.url, "--tick", "0.2",
               "--client-id", client_id, "--no-broadcast"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while rollout_status(fleet.db, rid)[0].current_wave < 1:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr and process.stderr.read()
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert rollout_status(fleet.db, rid)[0].state != "completed"
    with RolloutController(fleet.db, "127.0.0.1", fleet.port, dist=fleet.dist, tick_s=0.2, client_id=client_id):
        status = _settled(fleet, rid)
    assert status.state == "completed"
    assert devices.versions() == dict.fromkeys(devices.agents, GOOD)
    for device in devices.agents:  # each device was told once (a resend carries the same command id)
        assert len({c.id for c in devices.recorder.updates(device, rid)}) == 1


def test_a_decision_written_but_not_sent_is_sent_after_a_restart_with_its_command_id(fleet: Fleet) -> None:
    """The state a controller leaves when it dies between writing a decision and publishing its command."""
    site = f"outbox-{fleet.name}"
    _record_plain(fleet, [f"{site}-{i}" for i in range(3)], {"site": site})
    rid = start_rollout(fleet.db, fleet.audit, "digits", GOOD, _options(select={"site": site}, canary=0.3),
                        actor=ACTOR)
    first = next(d["device_id"] for d in rollout_status(fleet.db, rid)[0].devices if d["wave"] == 0)
    t, rd = fleet.db.tables["rollouts"], fleet.db.tables["rollout_devices"]
    with fleet.db.transaction() as conn:
        conn.execute(t.update().where(t.c.id == rid).values(state="canary", broadcast=None,
                                                            wave_started_at=dt.datetime.now(dt.timezone.utc)))
        conn.execute(rd.update().where((rd.c.rollout_id == rid) & (rd.c.device_id == first)).values(
            state="notifying", command_id="c0ffee", notified_at=dt.datetime.now(dt.timezone.utc)))
    recorder = Recorder(fleet.port)
    try:
        with RolloutController(fleet.db, "127.0.0.1", fleet.port, tick_s=0.2, client_id=f"outbox.{fleet.name}"):
            deadline = time.monotonic() + 30
            while rollout_status(fleet.db, rid)[0].devices[0]["state"] != "notified":
                assert time.monotonic() < deadline
                time.sleep(0.1)
        sent = recorder.updates(first, rid)
        assert [(c.id, c.args["version"], c.args["target"]) for c in sent] == [("c0ffee", GOOD, "onnx")]
        assert sent[0].args["thresholds"] == {"probation_s": 0.5, **QUICK}
        assert all(recorder.commands.get(f"{site}-{i}") is None for i in range(3) if f"{site}-{i}" != first)
    finally:
        recorder.close()
        set_rollout_state(fleet.db, fleet.audit, rid, "abort", actor=ACTOR)


# --- changes and bad input ----------------------------------------------------------------------------------


def test_pause_resume_and_abort_are_audited_with_their_actor(fleet: Fleet) -> None:
    site = f"pause-{fleet.name}"
    _record_plain(fleet, [f"{site}-1", f"{site}-2"], {"site": site})
    rid = start_rollout(fleet.db, fleet.audit, "digits", GOOD, _options(select={"site": site}), actor=ACTOR)
    steps = [("pause", "paused"), ("resume", "pending"), ("pause", "paused"), ("abort", "aborted")]
    assert [set_rollout_state(fleet.db, fleet.audit, rid, a, actor="local:bob") for a, _ in steps] == \
        [s for _, s in steps]
    assert _audit(fleet, rid) == [(ACTOR, "rollout.start")] + [("local:bob", f"rollout.{a}") for a, _ in steps]
    assert rollout_status(fleet.db, rid)[0].abort_reason == "aborted by local:bob"
    for action, message in (("resume", "is aborted; it cannot be resumed"), ("abort", "already aborted"),
                            ("pause", "cannot be paused")):
        with pytest.raises(RolloutError, match=message):
            set_rollout_state(fleet.db, fleet.audit, rid, action, actor="local:bob")
    with pytest.raises(RolloutError, match="unknown rollout 'ro-nope'"):
        set_rollout_state(fleet.db, fleet.audit, "ro-nope", "pause", actor="local:bob")


def _record_plain(fleet: Fleet, ids: list[str], tags: dict[str, str]) -> None:
    t = fleet.db.tables["devices"]
    with fleet.db.transaction() as conn:
        for device_id in ids:
            conn.execute(t.insert().values(device_id=device_id, tags=tags, revoked=False, status="offline",
                                           capabilities=detect().to_dict(), installed={"digits": "1.0.0"}))


@pytest.mark.parametrize(("model", "version", "changes", "message"), [
    ("nothing", "1.0.0", {}, "unknown model 'nothing'"),
    ("digits", "9.9.9", {}, "model 'digits' has no version '9.9.9'"),
    ("digits", GOOD, {"select": {"site": "mars"}}, "no enrolled device matches --select site=mars"),
    ("digits", GOOD, {"targets": ("tensorrt-int8",)}, "digits 2.0.0 has none of the targets tensorrt-int8"),
    ("digits", MIXED, {"targets": ("onnx-new",)}, "none of the 2 selected devices can run any of the targets"),
], ids=["unknown-model", "unknown-version", "empty-selection", "unpublished-target", "no-device-fits"])
def test_bad_rollouts_are_refused_and_nothing_is_written(fleet: Fleet, model: str, version: str,
                                                          changes: dict[str, Any], message: str) -> None:
    site = f"bad-{uuid.uuid4().hex[:6]}"
    _record_plain(fleet, [f"{site}-{i}" for i in range(2)], {"site": site})
    before = (_count(fleet, "rollouts"), _count(fleet, "rollout_devices"), _count(fleet, "audit"))
    options = _options(**{"select": {"site": site}, **changes})
    with pytest.raises(RolloutError, match=message):
        start_rollout(fleet.db, fleet.audit, model, version, options, actor=ACTOR)
    assert (_count(fleet, "rollouts"), _count(fleet, "rollout_devices"), _count(fleet, "audit")) == before


def _count(fleet: Fleet, table: str) -> int:
    with fleet.db.transaction() as conn:
        return int(conn.execute(fleet.db.sa.select(fleet.db.sa.func.count()).select_from(
            fleet.db.tables[table])).scalar())


@pytest.mark.parametrize(("args", "message"), [
    (["--canary", "150%"], "--canary must be above 0 and at most 1"),
    (["--select", "site=mars"], "no enrolled device matches --select site=mars"),
], ids=["option-out-of-range", "empty-selection"])
def test_the_cli_explains_bad_input_in_one_line(fleet: Fleet, args: list[str], message: str) -> None:
    before = _count(fleet, "rollouts")
    result = subprocess.run([sys.executable, "-m", "edgeml.cli", "fleet", "rollout", "start", str(fleet.registry.dir),
                             f"digits:{GOOD}", "--targets", "onnx", "--db-url", fleet.url, *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and _count(fleet, "rollouts") == before


def _http(url: str, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, method=method, data=data)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_over_http_changes_need_an_operator_token_and_are_audited_with_it(fleet: Fleet) -> None:
    site = f"http-{fleet.name}"
    _record_plain(fleet, [f"{site}-1", f"{site}-2"], {"site": site})
    viewer = create_token(fleet.db, f"viewer-{fleet.name}", Role.VIEWER)
    operator = create_token(fleet.db, f"carol-{fleet.name}", Role.OPERATOR)
    start = {"model": "digits", "version": GOOD, "options": _options(select={"site": site}).to_dict()}
    with HttpServer(build_app(rollout_routes(fleet.db, fleet.audit)), "127.0.0.1", 0) as server:
        assert _http(server.url, "POST", "/api/rollouts", None, start)[0] == 401
        assert _http(server.url, "POST", "/api/rollouts", viewer, start)[0] == 403
        status, doc = _http(server.url, "POST", "/api/rollouts", operator, start)
        assert status == 201, doc
        rid = doc["id"]
        assert _http(server.url, "POST", f"/api/rollouts/{rid}/abort", viewer, {})[0] == 403
        assert _http(server.url, "POST", f"/api/rollouts/{rid}/abort", operator, {"reason": "test"}) == \
            (200, {"state": "aborted"})
        status, doc = _http(server.url, "GET", f"/api/rollouts/{rid}", viewer)
        assert status == 200 and doc[0]["state"] == "aborted" and len(doc[0]["devices"]) == 2
        bad = {**start, "options": {**start["options"], "canary": 1.5}}
        assert _http(server.url, "POST", "/api/rollouts", operator, bad) == \
            (400, {"error": "--canary must be above 0 and at most 1 (percentages: above 0% to 100%), got 1.5",
                   "hint": None, "status": 400})
        assert _http(server.url, "POST", "/api/rollouts/ro-none/pause", operator, {})[0] == 404
        assert _http(server.url, "POST", f"/api/rollouts/{rid}/pause", operator, {})[0] == 409  # it is aborted
        assert _http(server.url, "POST", "/api/rollouts", operator, {**start, "id": rid})[0] == 409  # id taken
        assert _http(server.url, "POST", "/api/rollouts", operator, {**start, "options": "fast"})[0] == 400
    actor = f"token:carol-{fleet.name}"
    assert _audit(fleet, rid) == [(actor, "rollout.start"), (actor, "rollout.abort")]


def _cli(fleet: Fleet, *args: str) -> str:
    env = {**os.environ, "EDGEML_ACTOR": "local:dave"}
    result = subprocess.run([sys.executable, "-m", "edgeml.cli", "fleet", *args, "--db-url", fleet.url],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_cli_starts_shows_aborts_and_rolls_back(fleet: Fleet) -> None:
    site = f"cli-{fleet.name}"
    _record_plain(fleet, [f"{site}-{i}" for i in range(4)], {"site": site})
    reg = str(fleet.registry.dir)
    out = _cli(fleet, "rollout", "start", reg, f"digits:{GOOD}", "--targets", "tensorrt-int8,onnx", "--select",
               f"site={site}", "--canary", "25%", "--waves", "50%,100%", "--min-devices", "1", "--id", f"{site}-r1",
               "--probation", "30s", "--threshold", "min_requests=0")
    assert out.strip() == f"rollout {site}-r1: digits {GOOD}, canary 1 devices, then waves of 1, 2"
    shown = _cli(fleet, "rollout", "status", reg, f"{site}-r1")
    assert shown.splitlines()[:4] == [f"{site}-r1  rollout  digits:{GOOD}  pending", "  canary: pending 1",
                                      "  wave 1: pending 1", "  wave 2: pending 2"]
    assert _cli(fleet, "rollout", "abort", reg, f"{site}-r1", "--reason", "wrong day").strip() == \
        f"rollout {site}-r1: aborted"
    assert _cli(fleet, "rollback", reg, "digits", "--to", "1.0.0", "--select", f"site={site}").startswith("rollback ")
    back = next(s for s in rollout_status(fleet.db) if s.kind == "rollback" and s.options["select"] == {"site": site})
    assert back.counts() == [{"committed": 4}, {}]  # the devices already run 1.0.0
    assert _audit(fleet, f"{site}-r1") == [("local:dave", "rollout.start"), ("local:dave", "rollout.abort")]
    assert _audit(fleet, back.id) == [("local:dave", "rollback")]
