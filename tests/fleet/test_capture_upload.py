"""Capture uploads end to end with real parts: Mosquitto with the generated dynamic-security config, an enrolled
device running ``edgeml agent run`` as a process, ``edgeml fleet serve`` as a process, and ``capture pull``.

The agent's capture store is filled on disk before it starts (the store's own format, written by the store's
own class), so that the tests know exactly which samples must arrive.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgeml.edge_agent.capture import CaptureStore
from edgeml.fleet.capture.request import send_capture
from edgeml.fleet.capture.store import sample_sha256
from edgeml.fleet.devices.broker import write_broker_config
from edgeml.fleet.devices.enrollment import enroll
from edgeml.fleet.registry.repository import Registry, init_registry
from edgeml.protocol.messages import CaptureArgs
from tests.conftest import REPO_ROOT, require_service
from tests.fleet.mosquitto import MOSQUITTO, run_mosquitto
from tests.security.conftest import ServeProcess

DEVICES = ("cam-1", "cam-2", "cam-3")


@dataclass
class Fleet:
    root: Path
    registry: Registry
    broker_dir: Path
    port: int
    creds: dict[str, str]
    bootstraps: dict[str, Path]
    serve: ServeProcess

    @property
    def ca(self) -> Path:
        return self.broker_dir / "tls" / "ca.crt"

    def request(self, device: str, **args: object) -> str:
        import ssl

        tls = ssl.create_default_context(cafile=str(self.ca))
        ids = send_capture([device], CaptureArgs(upload=True, **args), "localhost", self.port,  # type: ignore[arg-type]
                           username="fleet", password=self.creds["fleet"], tls=tls)
        return ids[device]

    def rows(self, device: str) -> list[tuple[str, int]]:
        db = self.registry.database()
        try:
            with db.transaction() as conn:
                return [(r[0], int(r[1])) for r in conn.execute(db.sa.text(
                    "SELECT sha256, seq FROM captures WHERE device_id = :d ORDER BY seq"), {"d": device})]
        finally:
            db.close()

    def wait_online(self, device: str) -> None:
        """Wait until the device's state reached the fleet (it is connected and subscribed to its commands)."""
        def online() -> bool:
            db = self.registry.database()
            try:
                with db.transaction() as conn:
                    rows = list(conn.execute(db.sa.text("SELECT status FROM devices WHERE device_id = :d"),
                                             {"d": device}))
            finally:
                db.close()
            return bool(rows) and rows[0][0] not in (None, "offline")

        _wait(online, 60, f"{device} online")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "NO_COLOR": "1", "COLUMNS": "200",
               "EDGEML_BROKER_PASSWORD": self.creds["fleet"]}
        return subprocess.run([sys.executable, "-m", "edgeml.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120, check=False)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    if not MOSQUITTO.exists():
        require_service("mosquitto", False, f"{MOSQUITTO} not installed (apt-get install mosquitto)")
    root = Path(tempfile.mkdtemp(prefix="edgeml-capture-"))
    root.chmod(0o755)  # the broker runs as user mosquitto
    try:
        registry = init_registry(root / "registry")
        broker_dir = root / "broker"
        creds = write_broker_config(broker_dir, [], hostname="localhost")
        bootstraps = {name: enroll(registry.dir, name, broker_dir) for name in DEVICES}
        with run_mosquitto(broker_dir) as port:
            args = [str(registry.dir), "--broker-host", "localhost", "--broker-port", str(port), "--username",
                    "fleet", "--ca", str(broker_dir / "tls" / "ca.crt"), "--tick", "0.2", "--no-http"]
            (root / "logs").mkdir()
            serve = ServeProcess(args, {"EDGEML_BROKER_PASSWORD": creds["fleet"]}, root / "logs" / "serve.log")
            try:
                serve.wait_for_line(r"^capture: uploads from ")
                yield Fleet(root, registry, broker_dir, port, creds, bootstraps, serve)
            finally:
                serve.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _agent_home(fleet: Fleet, name: str) -> Path:
    home = fleet.root / "agents" / name
    home.mkdir(parents=True)
    boot = json.loads(fleet.bootstraps[name].read_text())
    boot.update(host="localhost", port=fleet.port)
    (home / "bootstrap.json").write_text(json.dumps(boot))
    (home / "bootstrap.json").chmod(0o600)
    (home / "agent.toml").write_text("\n".join([
        "[agent]", 'bootstrap = "bootstrap.json"', 'state_dir = "state"', "api_port = 0", "tls = true",
        'clock = "assume-synced"', "telemetry_interval_s = 0.5", "threads = 1", 'runtimes = ["onnxruntime"]', ""]))
    return home


def _fill(home: Path, count: int, width: int, seed: int) -> dict[str, int]:
    """Put ``count`` low-confidence samples of ``width`` float32 values in the agent's capture store; sha -> seq."""
    store = CaptureStore(home / "state" / "capture")
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(count):
        x = rng.standard_normal(width).astype(np.float32)
        entry = store.add(x, {"confidence": 0.3 + i / (10 * count), "predicted": i % 2, "model": "tiny",
                              "version": "1.0.0", "target": "onnx"})
        assert entry is not None
        out[sample_sha256(x)] = entry.seq
    return out


def _start_agent(home: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log = (home / "agent.log").open("a")
    return subprocess.Popen([sys.executable, "-m", "edgeml.cli", "agent", "run", "--config", str(home / "agent.toml")],
                            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_capture_command_uploads_every_sample_and_pull_writes_the_dataset(fleet: Fleet, tmp_path: Path) -> None:
    home = _agent_home(fleet, DEVICES[0])
    expected = _fill(home, 40, 16, seed=1)
    agent = _start_agent(home)
    try:
        fleet.wait_online(DEVICES[0])
        sent = fleet.cli("fleet", "capture", "request", DEVICES[0], "--tag", "field-1", "--rate", str(4 * 1024 * 1024),
                         "--broker-host", "localhost", "--broker-port", str(fleet.port), "--username", "fleet",
                         "--ca", str(fleet.ca))
        assert sent.returncode == 0 and f"{DEVICES[0]}: capture command cap-" in sent.stdout, sent.stderr
        _wait(lambda: len(fleet.rows(DEVICES[0])) == 40, 60, "40 samples in the fleet's index")
        store_dir = home / "state" / "capture"
        _wait(lambda: not list(store_dir.glob("*.json")), 30, "the device to delete what the fleet acknowledged")
    finally:
        _stop(agent)
    assert {sha for sha, _ in fleet.rows(DEVICES[0])} == set(expected)

    out = tmp_path / "ds"
    done = fleet.cli("fleet", "capture", "pull", str(fleet.registry.dir), "--model", "tiny", "--device", DEVICES[0],
                     "--tag", "field-1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    data = np.load(out / "samples.npz")
    assert data["x"].shape == (40, 16) and data["x"].dtype == np.float32
    hashes = list(data["sha256"])
    assert set(hashes) == set(expected) and len(hashes) == 40
    assert [sample_sha256(row) for row in data["x"]] == hashes  # each row is the sample its hash names
    provenance = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert [p["sha256"] for p in provenance] == hashes
    first = provenance[0]
    assert (first["device_id"], first["model"], first["version"], first["target"], first["tag"], first["reason"],
            first["trigger"]) == (DEVICES[0], "tiny", "1.0.0", "onnx", "field-1", "low_confidence", "command")
    assert 0.3 <= first["confidence"] < 0.4 and first["predicted"] in (0, 1) and first["captured_at"].endswith("+00:00")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["count"] == 40 and meta["model"] == "tiny" and meta["versions"] == ["1.0.0"]
    assert (out / "labels.csv").read_text().splitlines()[0] == "sha256,label"
    assert len((out / "labels.csv").read_text().splitlines()) == 41

    listing = fleet.cli("fleet", "capture", "ls", str(fleet.registry.dir), "--json")
    assert listing.returncode == 0, listing.stderr
    rows = [r for r in json.loads(listing.stdout) if r["device_id"] == DEVICES[0]]
    assert [(r["model"], r["version"], r["reason"], r["samples"]) for r in rows] == \
        [("tiny", "1.0.0", "low_confidence", 40)]
    again = fleet.cli("fleet", "capture", "pull", str(fleet.registry.dir), "--model", "tiny", "--out", str(out))
    assert again.returncode != 0 and "already exists" in again.stdout + again.stderr


def test_a_device_killed_mid_upload_resumes_and_loses_or_repeats_no_sample(fleet: Fleet) -> None:
    device = DEVICES[1]
    home = _agent_home(fleet, device)
    expected = _fill(home, 150, 1024, seed=2)  # ~620 KB: ten 64 KiB chunks
    staging = fleet.registry.dir / "captures" / "staging" / device
    agent = _start_agent(home)
    try:
        fleet.wait_online(device)
        fleet.request(device, bytes_per_s=100_000)  # ~6 s for the whole upload
        _wait(lambda: any(p.stat().st_size >= 128 * 1024 for p in staging.glob("*.part")), 60,
              "part of the upload on the fleet's disk")
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        assert agent.returncode == -signal.SIGKILL
        partial = sum(p.stat().st_size for p in staging.glob("*.part"))
        assert 0 < partial < 600_000 and fleet.rows(device) == []  # killed mid-upload: nothing stored yet
        assert len(list((home / "state" / "capture").glob("*.json"))) == 150  # nothing deleted on the device
        agent = _start_agent(home)
        _wait(lambda: len(fleet.rows(device)) >= 150, 90, "the resumed upload to be stored")
        _wait(lambda: not list((home / "state" / "capture").glob("*.json")), 30, "the device to delete its samples")
    finally:
        _stop(agent)
    rows = fleet.rows(device)
    assert len(rows) == 150 and {sha for sha, _ in rows} == set(expected)  # none lost, none twice
    assert sorted(seq for _, seq in rows) == sorted(expected.values())
    done = [json.loads(p.read_text()) for p in staging.glob("*.done")]
    assert [(d["stored"], d["duplicates"]) for d in done] == [(150, 0)]  # one upload, resumed, stored once
    assert not list(staging.glob("*.part"))
