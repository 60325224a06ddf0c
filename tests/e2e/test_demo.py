"""``edgeml demo --ci``: the whole loop as a user runs it, then the real state behind its summary.

The first run starts from nothing (training, compiling, a new registry, Mosquitto with TLS and ACLs); the
second reuses all of it, on the embedded broker. After each, the test reads what the summary claims from
where it lives: each agent's own status (from its state directory), the rollout records and the audit log in
the registry's database, and the telemetry rows with drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgeml.fleet.audit.log import open_audit
from edgeml.fleet.registry.repository import Registry
from edgeml.fleet.rollouts.controller import CONTROLLER_ACTOR
from edgeml.fleet.rollouts.store import rollout_status
from tests.conftest import RunCli, require_service
from tests.fleet.mosquitto import MOSQUITTO

AGENTS = {"cam-1": "onnxruntime", "cam-2": "onnxruntime", "pi-1": "litert"}


def _demo(run_cli: RunCli, workdir: Path, *extra: str) -> tuple[str, dict[str, Any]]:
    result = run_cli("demo", "--ci", "--workdir", workdir, "--http-port", "0", "--timeout", "600", *extra,
                     timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stdout, json.loads((workdir / "summary.json").read_text())


def _check_state(run_cli: RunCli, workdir: Path, summary: dict[str, Any]) -> None:
    for name, runtime in AGENTS.items():  # each agent's own record, read from its state directory
        status = run_cli("agent", "status", "--config", workdir / "agents" / name / "agent.toml", "--json")
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        assert (doc["model"], doc["version"]) == ("digits", "1.0.0"), doc
        assert summary["agents"][name] == {"runtime": runtime, "model": "digits", "version": "1.0.0"}

    registry = Registry(workdir / "registry")
    db = registry.database()
    try:
        v1 = rollout_status(db, summary["v1"]["rollout"])[0]
        assert v1.state == "completed" and v1.version == "1.0.0"
        assert {d["device_id"]: (d["state"], d["target"]) for d in v1.devices} == {
            "cam-1": ("committed", "onnx-int8"), "cam-2": ("committed", "onnx-int8"),
            "pi-1": ("committed", "tflite-int8")}
        assert sorted(d["wave"] for d in v1.devices) == [0, 1, 2]  # one device per wave

        v2 = rollout_status(db, summary["v2"]["rollout"])[0]
        assert v2.state == "aborted" and v2.version == "2.0.0"
        assert v2.abort_reason == summary["v2"]["abort_reason"]
        assert v2.abort_reason.startswith("failure rate 100% (2 of 2 finished devices) exceeds 10%")
        canary = [d for d in v2.devices if d["wave"] == 0]
        assert len(canary) == 2 and all(d["state"] == "rolled_back" and "confidence" in d["reason"] for d in canary)
        outside = [d for d in v2.devices if d["wave"] > 0]
        assert len(outside) == 1 and outside[0]["notified_at"] is None and outside[0]["state"] == "pending"

        entries = open_audit(registry.dir, db=db).entries()
        rollout_ids = {e.details.get("rollout") for e in entries if e.action == "rollout.start"}
        assert {v1.id, v2.id} <= rollout_ids
        aborts = [(e.actor, e.details["rollout"], e.details["reason"]) for e in entries if e.action == "rollout.abort"]
        assert (CONTROLLER_ACTOR, v2.id, v2.abort_reason) in aborts
        assert sum(e.action == "device.enroll" for e in entries) == 3
        assert sum(e.action == "publish" for e in entries) == 4  # 2 versions x 2 targets, once

        t = db.tables["telemetry"]
        with db.transaction() as conn:
            rows = conn.execute(db.sa.select(t.c.metrics).where(t.c.device_id == summary["drift"]["device"])).all()
        flagged = [r.metrics["drift"] for r in rows if (r.metrics.get("drift") or {}).get("flagged")]
        assert len(flagged) >= summary["drift"]["flagged_windows"] >= 1
        assert max(f["score"] for f in flagged) >= summary["drift"]["score"] > 0
    finally:
        db.close()
    verify = run_cli("fleet", "audit", "verify", workdir / "registry")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_demo_tells_the_whole_story_and_a_second_run_reuses_it(run_cli: RunCli, tmp_path: Path) -> None:
    pytest.importorskip("onnx2tf")
    require_service("mosquitto", MOSQUITTO.exists(), f"{MOSQUITTO} not installed (apt-get install mosquitto)")
    workdir = tmp_path / "demo"

    out, summary = _demo(run_cli, workdir)
    assert "training a small CNN" in out and "Mosquitto on mqtts://localhost:" in out
    assert summary["broker"].startswith("Mosquitto (TLS")
    assert "v2 2.0.0: rollout" in out and "never notified (outside the canary)" in out
    assert summary["traffic"]["ok"] > 100 and summary["traffic"]["errors"] == 0
    assert summary["dashboard"].startswith("http://127.0.0.1:") and "#token=edgeml_" in summary["dashboard"]
    _check_state(run_cli, workdir, summary)

    out, again = _demo(run_cli, workdir, "--broker", "embedded")
    assert "reusing the trained model" in out and "reusing the 2.0.0 bundles" in out
    assert "already published digits-1.0.0-onnx-int8.edgeml" in out and "enrolled" not in out
    assert again["broker"].startswith("embedded") and again["v2"]["rollout"] != summary["v2"]["rollout"]
    _check_state(run_cli, workdir, again)

    _sigterm_stops_everything(workdir, tmp_path)  # a third run, with Mosquitto, stopped halfway


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (read from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _sigterm_stops_everything(workdir: Path, tmp_path: Path) -> None:
    """SIGTERM to a running demo: agents, then the fleet server, then Mosquitto stop within seconds, and no
    process the demo started is left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    log = (tmp_path / "demo.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "demo", "--ci", "--workdir", str(workdir),
                             "--http-port", "0", "--timeout", "600"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while "agent pi-1 (litert) running" not in (tmp_path / "demo.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "demo.log").read_text()[-3000:]
            time.sleep(0.2)
        children = _children(proc.pid)
        assert len(children) >= 4, children  # Mosquitto and three agents, each in a session of its own
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [c for c in children if _alive(c)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "Traceback" not in (tmp_path / "demo.log").read_text()
