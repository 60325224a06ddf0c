"""Crash safety of updates: SIGKILL at every state of the transition table (and in the middle of a
download), then a restart; and power loss at every durable write. Each ends with a verified model serving
and a record consistent with the active-slot pointer.

The agent runs as a real process (:mod:`tests.edge_agent.update_driver`): a model host under live
traffic, a real TufClient over HTTP against a real signed registry, real onnxruntime.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeml import fsutil
from edgeml.edge_agent.serving import ModelHost, load_model
from edgeml.edge_agent.tuf_client import TufClient
from edgeml.edge_agent.update.health import Thresholds, compare_golden
from edgeml.edge_agent.update.machine import UpdateMachine
from edgeml.edge_agent.update.slots import Slots
from edgeml.edge_agent.update.states import TERMINAL, TRANSITIONS, State
from edgeml.edge_agent.update.store import RecordStore, UpdateRequest
from tests.conftest import REPO_ROOT
from tests.edge_agent.conftest import BROKEN, GOOD, SLOW, DigitsBundles, ServedRegistry

#: short probation; 15 ms of latency slack, so a busy shared CI core does not fail a good model (the slow one
#: takes ~50 ms a request)
THRESHOLDS = {"probation_s": 0.3, "min_requests": 10, "max_probation_s": 5.0, "p99_slack_ms": 15.0}
#: the update that passes through each state, and how it must end
SCENARIO = {State.ABORT: (BROKEN, "failed"), State.ROLLBACK: (SLOW, "rolled_back")}
TABLE_STATES = list(dict.fromkeys(state for state, _event in TRANSITIONS))


class Device:
    """One device's state directory and the driver processes run on it."""

    def __init__(self, state_dir: Path, registry: ServedRegistry, traffic: Path) -> None:
        self.state_dir, self.registry, self.traffic = state_dir, registry, traffic

    def run(self, *args: str, kill: bool = False) -> dict[str, Any]:
        """Run the driver; with ``kill``, SIGKILL it when it reports a kill point. Returns its last report."""
        cmd = [sys.executable, "-m", "tests.edge_agent.update_driver", "--state-dir", str(self.state_dir),
               "--registry", self.registry.url, "--root", str(self.registry.root), "--traffic", str(self.traffic),
               "--thresholds", json.dumps(THRESHOLDS), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
        watchdog = threading.Timer(120, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                report = json.loads(line)
                if "at" in report and kill:
                    proc.kill()  # SIGKILL
                    proc.wait()
                    return report
                if "result" in report:
                    proc.wait()
                    return dict(report["result"])
            proc.wait()
            raise AssertionError(f"driver ended without a result (rc {proc.returncode}): {proc.stderr.read()}")
        finally:
            watchdog.cancel()
            proc.stdout and proc.stdout.close()  # type: ignore[func-returns-value]
            proc.stderr and proc.stderr.close()  # type: ignore[func-returns-value]


def assert_consistent(state_dir: Path, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """A terminal record, the pointer and the serving model agree, and the active slot holds a verified
    model that loads and reproduces its golden vectors. Returns the record as a dict."""
    record = RecordStore(state_dir / "update.json").load()
    assert record is not None and record.current in TERMINAL
    expected = record.version if record.current is State.COMMITTED else record.previous_version
    slots = Slots(state_dir)
    pointer = slots.active()
    assert pointer is not None and pointer.version == expected
    manifest = slots.verify(pointer)
    model = load_model(slots.path(pointer.slot), pointer.slot)
    with np.load(slots.path(pointer.slot) / "golden.npz") as golden:
        actual = model.infer({"input": golden["in:input"]})
        assert compare_golden(actual, {"output": golden["out:output"]}, manifest.golden or {}, "fp32") is None
    model.runtime.unload()
    assert not list(slots.root.glob(".staging-*"))
    if result is not None:
        assert (result["state"], result["serving"], result["pointer"]) == (record.state, expected, expected)
        assert result["errors"] == 0
    return {"state": record.state, "reason": record.reason, "serving": expected, "chain": record.chain(),
            "crashes": record.crashes}


@pytest.fixture(scope="module")
def template(served_registry: ServedRegistry, digits_bundles: DigitsBundles,
             tmp_path_factory: pytest.TempPathFactory) -> Device:
    """A device that installed and committed 1.0.0 (copied by each test)."""
    root = tmp_path_factory.mktemp("device")
    traffic = root / "traffic.npy"
    np.save(traffic, digits_bundles.traffic[:200])
    device = Device(root / "state", served_registry, traffic)
    result = device.run("--version", "1.0.0")
    assert (result["state"], result["serving"]) == ("committed", "1.0.0"), result
    return device


@pytest.fixture
def device(template: Device, tmp_path: Path) -> Device:
    shutil.copytree(template.state_dir, tmp_path / "state")
    return Device(tmp_path / "state", template.registry, template.traffic)


@pytest.mark.parametrize("state", TABLE_STATES, ids=[s.value for s in TABLE_STATES])
def test_sigkill_at_every_state_then_restart(device: Device, state: State) -> None:
    version, outcome = SCENARIO.get(state, (GOOD, "committed"))
    delta = ("--delta-from", "1.0.0") if state is State.PATCH else ()  # the one way into PATCH
    killed = device.run("--version", version, *delta, "--kill-at", state.value, kill=True)
    assert killed == {"at": state.value}
    after = device.run("--resume")
    final = assert_consistent(device.state_dir, after)
    assert final["state"] == outcome, final
    assert final["serving"] == (GOOD if outcome == "committed" else "1.0.0")
    assert state.value in final["chain"] and final["chain"].count(state.value) >= 2  # ran again on resume
    assert after["served"].get(final["serving"], 0) > 0  # the restarted agent served requests


def test_a_delta_update_rebuilds_the_bundle_and_survives_sigkill_mid_download(device: Device) -> None:
    killed = device.run("--version", GOOD, "--delta-from", "1.0.0", "--kill-mid-download", kill=True)
    assert killed == {"at": "mid-download"}  # the delta's own download, in PATCH
    after = device.run("--resume")
    final = assert_consistent(device.state_dir, after)
    assert (final["state"], final["serving"]) == ("committed", GOOD)
    assert final["chain"][:4] == ["notified", "patch", "patch", "verify"], after["transfer"]
    assert after["transfer"]["kind"] == "delta" and after["transfer"]["bytes"] < after["transfer"]["full_bytes"]


def test_sigkill_in_the_middle_of_a_download(device: Device) -> None:
    killed = device.run("--version", GOOD, "--kill-mid-download", kill=True)
    assert killed == {"at": "mid-download"}
    final = assert_consistent(device.state_dir, device.run("--resume"))
    assert (final["state"], final["serving"]) == ("committed", GOOD)
    assert final["chain"][:4] == ["notified", "download", "download", "verify"]


def test_dying_repeatedly_in_probation_rolls_back(device: Device) -> None:
    assert device.run("--version", GOOD, "--kill-at", "probation", kill=True) == {"at": "probation"}
    assert device.run("--resume", "--kill-at", "probation", kill=True) == {"at": "probation"}
    final = assert_consistent(device.state_dir, device.run("--resume"))
    assert (final["state"], final["serving"], final["crashes"]) == ("rolled_back", "1.0.0", 2)
    assert "died 2 times during probation" in final["reason"]
    assert final["chain"][-3:] == ["probation", "rollback", "rolled_back"]


class PowerLoss(BaseException):
    """The machine lost power: nothing after this point ran."""


def _writes_until_power_loss(monkeypatch: pytest.MonkeyPatch, k: int) -> list[Path]:
    """Make the k-th durable write (0-based) die before its rename: its data never becomes visible."""
    real = fsutil.atomic_write_bytes
    done: list[Path] = []

    def write(path: Any, data: bytes) -> None:
        if len(done) == k:
            tmp = Path(path).with_name(f".{Path(path).name}.lost.tmp")
            tmp.write_bytes(data[: len(data) // 2])  # a torn temporary file, as power loss may leave
            raise PowerLoss(str(path))
        real(path, data)
        done.append(Path(path))

    monkeypatch.setattr(fsutil, "atomic_write_bytes", write)
    return done


def _machine(state_dir: Path, registry: ServedRegistry) -> UpdateMachine:
    client = TufClient(registry.root.read_bytes(), state_dir / "metadata", state_dir / "downloads",
                       f"{registry.url}/metadata/", f"{registry.url}/targets/")
    return UpdateMachine(state_dir, ModelHost(), client.fetch, poll_s=0.01)


_FAST = Thresholds(probation_s=0.02, max_probation_s=0.05)


def test_power_loss_at_every_durable_write(device: Device, served_registry: ServedRegistry,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    base = device.state_dir
    clean = base.with_name("clean")
    shutil.copytree(base, clean)
    counted = _writes_until_power_loss(monkeypatch, 10_000)
    record = _machine(clean, served_registry).start(UpdateRequest("digits", GOOD, "onnx", thresholds=_FAST))
    assert record.state == "committed"
    total = len(counted)
    assert total >= len(record.history) + 1  # every state entry was a durable write, plus the pointer
    outcomes = []
    for k in range(total):
        state_dir = base.with_name(f"loss-{k}")
        shutil.copytree(base, state_dir)
        _writes_until_power_loss(monkeypatch, k)
        machine = _machine(state_dir, served_registry)
        with pytest.raises(PowerLoss):
            machine.start(UpdateRequest("digits", GOOD, "onnx", thresholds=_FAST))
        machine.host.close()
        monkeypatch.setattr(fsutil, "atomic_write_bytes", _REAL_WRITE)
        rebooted = _machine(state_dir, served_registry)  # the restart: a new host, the state on disk
        rebooted.resume()
        final = assert_consistent(state_dir)
        assert rebooted.host.active is not None and rebooted.host.active.version == final["serving"]
        rebooted.host.close()
        outcomes.append((final["state"], final["serving"]))
    # a loss before the request was durable forgets it (1.0.0's committed record stays); any later one
    # finishes the update
    assert outcomes == [("committed", "1.0.0")] + [("committed", GOOD)] * (total - 1)


_REAL_WRITE = fsutil.atomic_write_bytes
