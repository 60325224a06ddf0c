"""The fleet simulator on a real fleet: Mosquitto, a signed registry, the distribution service broadcasting
each rollout, and the tests' operator sending update commands and reading what the devices publish.

Every simulated device verifies its download for real (TUF metadata over MQTT, the target's signed hash,
the bundle's member hashes) and runs the real update machine; the runtime is the stand-in unless a test
says otherwise.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from typer.testing import CliRunner

from edgeml.fleet.registry.distribution import DistributionService
from edgeml.fleet.registry.repository import Registry, init_registry
from edgeml.fleet.sim.simulator import PI, STANDIN_LABEL, Knobs, Simulator, parse_tags
from tests.edge_agent.harness import Operator, distribution, plain_broker
from tests.fleet.tiny import tiny_bundle as _bundle

CHAIN = ["notified", "download", "verify", "stage", "smoke_test", "switch", "probation", "commit", "committed"]
#: Short probation, enough synthetic requests to judge, slack for a shared 2-core machine.
FAST = {"probation_s": 0.5, "min_requests": 10, "max_probation_s": 20.0, "p99_factor": 3.0, "p99_slack_ms": 8.0,
        "smoke_latency_budget_s": 0.05}


@dataclass
class Fleet:
    port: int
    registry: Registry
    service: DistributionService
    operator: Operator
    root: bytes

    def path(self, version: str) -> str:
        """The repository path of a version's bundle (what a broadcast names)."""
        found = next((self.registry.targets_dir / "tiny" / version).glob("*.edgeml"))
        return str(found.relative_to(self.registry.dir / "repository"))

    def rollout(self, sim: Simulator, version: str, thresholds: dict[str, Any] | None = None,
                **args: Any) -> dict[str, dict[str, Any]]:
        """Broadcast ``version`` and tell every device to install it; device id -> its update's end."""
        rollout_id = f"r-{uuid.uuid4().hex[:8]}"
        path = self.path(version)
        self.service.broadcast(rollout_id, [path])
        ids = {p.device_id: self.operator.send(p.device_id, "update", model="tiny", version=version, target="onnx",
                                               rollout=rollout_id, thresholds=thresholds or FAST,
                                               broadcast={"rollout": rollout_id, "path": path}, **args)
               for p in sim.profiles}
        return {device: self.operator.update_end(device, cid, timeout=120) for device, cid in ids.items()}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    pytest.importorskip("onnxruntime")
    work = tmp_path_factory.mktemp("sim")
    registry = init_registry(work / "reg")
    for version, scale in (("1.0.0", 1.0), ("2.0.0", 1.5)):
        registry.publish(_bundle(work, version, scale))
    root = (registry.metadata_dir / "1.root.json").read_bytes()
    with plain_broker() as (port, _), distribution(registry, port) as service:
        operator = Operator(port)
        try:
            yield Fleet(port, registry, service, operator, root)
        finally:
            operator.close()


def _sim(fleet: Fleet, n: int, prefix: str, processes: int = 1, **knobs: Any) -> Simulator:
    settings = {"rps": 40.0, "latency_ms": 2.0, "telemetry_interval_s": 0.5, **knobs}
    return Simulator("127.0.0.1", fleet.port, fleet.root, n, Knobs(**settings), processes=processes, prefix=prefix)


def test_twenty_devices_commit_from_a_broadcast(fleet: Fleet) -> None:
    with _sim(fleet, 20, "ok") as sim:
        ends = fleet.rollout(sim, "1.0.0")
        assert {e["state"] for e in ends.values()} == {"committed"}
        for device in sim.devices:
            assert fleet.operator.states_of(device.device_id, ends[device.device_id]["id"]) == CHAIN
            assert device.session._fetcher is not None and device.session._fetcher.stats["broadcast_bytes"] > 300_000
            assert (device.state_dir / "tuf" / "timestamp.json").is_file()  # its own trusted metadata
        fleet.operator.wait_for(lambda s: all(s.states.get(d.device_id, {}).get("version") == "1.0.0"
                                              and s.states[d.device_id]["status"] == "serving"
                                              for d in sim.devices), 30)
        state = fleet.operator.seen.states["ok-00003"]
        assert state["clock_synced"] is True and "tensorrt" in state["capabilities"]["runtimes"]
        summary = sim.summary()
        assert summary["versions"] == {"1.0.0": 20} and summary["updates"] == {"committed": 20}
        assert summary["runtime"].startswith(STANDIN_LABEL)
    fleet.operator.wait_for(lambda s: s.states["ok-00000"]["status"] == "offline", 10)


@pytest.mark.parametrize(("mode", "final", "reason"), [
    ("smoke", "failed", "smoke test: golden vectors"),
    ("errors", "rolled_back", "probation: error rate"),
])
def test_exactly_the_chosen_devices_fail_the_bad_version(fleet: Fleet, mode: str, final: str, reason: str) -> None:
    knobs = {"fail": 0.3, "fail_mode": mode, "bad_versions": ("2.0.0",)}
    with _sim(fleet, 20, f"fail-{mode}", **knobs) as sim:
        chosen = {p.device_id for p in sim.profiles if "fail" in p.faults}
        assert len(chosen) == 6 and chosen == {p.device_id for p in Knobs(**knobs).profiles(20, f"fail-{mode}")
                                               if "fail" in p.faults}
        assert {e["state"] for e in fleet.rollout(sim, "1.0.0").values()} == {"committed"}
        ends = fleet.rollout(sim, "2.0.0")
        bad = {d for d, e in ends.items() if e["state"] == final}
        assert bad == chosen, {d: ends[d]["reason"] for d in bad - chosen}
        assert all(reason in (ends[d]["reason"] or "") for d in bad), [ends[d] for d in bad]
        assert {e["state"] for d, e in ends.items() if d not in chosen} == {"committed"}
        versions = {d.device_id: d.host.active.version for d in sim.devices if d.host.active}
        assert {versions[d] for d in chosen} == {"1.0.0"} and len(versions) == 20


@pytest.mark.parametrize(("knob", "reason"), [("slow", "p99 latency"), ("drift", "drift score")])
def test_slow_and_drifting_devices_roll_back(fleet: Fleet, knob: str, reason: str) -> None:
    knobs = {knob: 0.25, "slow_factor": 4.0, "latency_ms": 5.0, "rps": 30.0, "bad_versions": ("2.0.0",)}
    thresholds = {**FAST, "min_requests": 15, "p99_factor": 2.0, "p99_slack_ms": 5.0}
    with _sim(fleet, 8, f"{knob}", **knobs) as sim:
        chosen = {p.device_id for p in sim.profiles if knob in p.faults}
        assert len(chosen) == 2
        assert {e["state"] for e in fleet.rollout(sim, "1.0.0", thresholds).values()} == {"committed"}
        ends = fleet.rollout(sim, "2.0.0", thresholds)
        assert {d for d, e in ends.items() if e["state"] == "rolled_back"} == chosen, ends
        assert all(reason in ends[d]["reason"] for d in chosen)


def test_pi_devices_refuse_a_tensorrt_requirement(fleet: Fleet) -> None:
    with _sim(fleet, 10, "mixed", pi_fraction=0.4) as sim:
        pis = {p.device_id for p in sim.profiles if p.capabilities is PI}
        assert len(pis) == 4
        ends = fleet.rollout(sim, "1.0.0", runtime={"name": "tensorrt", "min_version": "8.6", "precision": "fp16"})
        assert {d for d, e in ends.items() if e["state"] == "incompatible"} == pis
        assert {ends[d]["reason"] for d in pis} == {"tensorrt is not installed on this device"}
        assert {e["state"] for d, e in ends.items() if d not in pis} == {"committed"}
        states = fleet.operator.seen.states
        assert all(list(states[d]["capabilities"]["runtimes"]) == ["litert"] for d in pis)


def test_telemetry_flows_with_contiguous_seqs_and_is_labelled(fleet: Fleet) -> None:
    with _sim(fleet, 5, "tele", tags=parse_tags(["site=lab,field"]), drift=0.4) as sim:
        tolerant = {**FAST, "max_drift": 1.0}  # drift on every version: reported, not judged
        assert {e["state"] for e in fleet.rollout(sim, "1.0.0", tolerant).values()} == {"committed"}
        ids = [d.device_id for d in sim.devices]
        seen = fleet.operator.wait_for(lambda s: all(len(s.telemetry.get(d, {})) >= 6 for d in ids), 60)
        assert seen
        drifting = {p.device_id for p in sim.profiles if "drift" in p.faults}
        for device in ids:
            stored = fleet.operator.seen.telemetry[device]
            assert sorted(stored) == list(range(len(stored)))
            last = stored[max(stored)].metrics
            assert last["simulated"] is True and last["runtime"].startswith(STANDIN_LABEL)
            assert last["version"] == "1.0.0" and last["requests"] > 0 and last["error_rate"] == 0.0
            assert last["latency_p50_ms"] == pytest.approx(2.0, rel=0.02)  # the stand-in's nominal latency
            assert last["drift"]["flagged"] is (device in drifting)
        assert len(drifting) == 2
        assert {fleet.operator.seen.states[d]["capabilities"]["tags"]["site"] for d in ids} <= {"lab", "field"}


def test_the_real_runtime_serves_and_verifies(fleet: Fleet) -> None:
    with _sim(fleet, 3, "real", standin=False) as sim:
        assert {e["state"] for e in fleet.rollout(sim, "1.0.0").values()} == {"committed"}
        assert {d.host.active.runtime.name for d in sim.devices if d.host.active} == {"onnxruntime"}
        assert sim.summary()["runtime"].startswith("real runtime")


def test_ping_rollback_and_bad_commands(fleet: Fleet) -> None:
    with _sim(fleet, 1, "cmd") as sim:
        cid = fleet.operator.send("cmd-00000", "ping")
        fleet.operator.wait_for(lambda s: any(e.get("type") == "pong" and e.get("id") == cid
                                              for e in s.events.get("cmd-00000", [])), 10)
        fleet.operator.send("cmd-00000", "update", model="tiny", version="not-a-version", target="onnx")
        fleet.operator.wait_for(lambda s: any(e.get("type") == "rejected" for e in s.events.get("cmd-00000", [])), 10)
        assert {e["state"] for e in fleet.rollout(sim, "1.0.0").values()} == {"committed"}
        path = fleet.path("2.0.0")
        fleet.service.broadcast("r-manual", [path])
        cid = fleet.operator.send("cmd-00000", "update", model="tiny", version="2.0.0", target="onnx",
                                  thresholds={**FAST, "probation_s": 30.0},
                                  broadcast={"rollout": "r-manual", "path": path})
        fleet.operator.wait_for(lambda s: "probation" in fleet.operator.states_of("cmd-00000", cid), 30)
        fleet.operator.send("cmd-00000", "rollback", reason="operator says so")
        end = fleet.operator.update_end("cmd-00000", cid)
        assert end["state"] == "rolled_back" and "fleet: operator says so" in end["reason"]


def test_devices_spread_over_two_processes(fleet: Fleet) -> None:
    sim = _sim(fleet, 6, "procs", processes=2)
    sim.start()
    try:
        assert {e["state"] for e in fleet.rollout(sim, "1.0.0").values()} == {"committed"}
        assert sim.devices == []  # they live in the worker processes
    finally:
        summary = sim.stop()
    assert summary["devices"] == 6 and summary["updates"] == {"committed": 6} and summary["versions"] == {"1.0.0": 6}


@pytest.mark.parametrize("bad", [{"fail": 1.5}, {"fail_mode": "explode"}, {"slow_factor": 0.5}])
def test_bad_knobs_are_refused(bad: dict[str, Any]) -> None:
    from edgeml.errors import ConfigError

    with pytest.raises(ConfigError):
        Simulator("127.0.0.1", 1, b"{}", 2, Knobs(**bad))


def test_the_cli_runs_and_says_the_runtime_is_a_stand_in(fleet: Fleet) -> None:
    from edgeml.cli import app

    result = CliRunner().invoke(app, ["fleet", "simulate", "--devices", "5", "--broker-port", str(fleet.port),
                                      "--registry", str(fleet.registry.dir), "--duration", "5", "--prefix", "cli",
                                      "--telemetry-interval", "1"])
    assert result.exit_code == 0, result.output
    assert STANDIN_LABEL in result.output and "5 devices" in result.output
    assert all(fleet.operator.seen.states[f"cli-{i:05d}"]["status"] == "offline" for i in range(5))
    assert all(len(fleet.operator.seen.telemetry.get(f"cli-{i:05d}", {})) >= 1 for i in range(5))
