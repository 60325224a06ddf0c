"""`edgeml agent run` as a real process: an agent that keeps dying while a new model is on probation rolls
that model back by itself after restarts, and `edgeml agent status` tells what serves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeml.fleet.registry.repository import Registry, init_registry
from tests.conftest import REPO_ROOT
from tests.edge_agent.conftest import GOOD, DigitsBundles
from tests.edge_agent.harness import Operator, distribution, plain_broker, write_agent_config

DEVICE = "cam-proc"


@pytest.fixture
def fleet(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[tuple[int, Registry, Operator]]:
    registry = init_registry(tmp_path / "reg")
    for version in ("1.0.0", GOOD):
        registry.publish(digits_bundles.paths[version])
    with plain_broker() as (port, _), distribution(registry, port):
        operator = Operator(port)
        try:
            yield port, registry, operator
        finally:
            operator.close()


def _start(config: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "edgeml.cli", "agent", "run", "--config", str(config)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def test_an_agent_dying_during_probation_rolls_the_new_model_back(fleet: tuple[int, Registry, Operator],
                                                                  tmp_path: Path) -> None:
    port, registry, operator = fleet
    root = (registry.metadata_dir / "1.root.json").read_bytes()
    config = write_agent_config(tmp_path / DEVICE, DEVICE, port, root)
    agent = _start(config)
    try:
        operator.wait_for(lambda s: s.states.get(DEVICE, {}).get("status") == "idle", 60)
        first = operator.send(DEVICE, "update", model="digits", version="1.0.0", target="onnx",
                              thresholds={"probation_s": 0.5, "max_probation_s": 1.0})
        assert operator.update_end(DEVICE, first)["state"] == "committed"
        probation = {"probation_s": 600.0, "max_crashes": 2}
        second = operator.send(DEVICE, "update", model="digits", version=GOOD, target="onnx", thresholds=probation)
        for crash in (1, 2):  # killed while the new model is on probation, then started again
            operator.wait_for(lambda s, n=crash: operator.states_of(DEVICE, second).count("probation") >= n, 60)
            _kill(agent)
            agent = _start(config)
        end = operator.update_end(DEVICE, second, timeout=60)
        assert end["state"] == "rolled_back" and "died 2 times" in end["reason"], end
        operator.wait_for(lambda s: s.states.get(DEVICE, {}).get("version") == "1.0.0", 30)
        status = subprocess.run([sys.executable, "-m", "edgeml.cli", "agent", "status", "--config", str(config),
                                 "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True)
        doc = json.loads(status.stdout)
        assert (doc["version"], doc["update"]["state"]) == ("1.0.0", "rolled_back")
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=20)
        except subprocess.TimeoutExpired:
            agent.kill()
    assert agent.returncode == 0, agent.stderr.read() if agent.stderr else ""
