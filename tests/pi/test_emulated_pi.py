"""An emulated Raspberry Pi: the Pi image made from its Dockerfile in arm64 Debian 12 under qemu, and the agent
run the way the image runs it, against a real fleet on this machine (``make test-pi``).

1. The image holds what the Dockerfile and the README say: Debian's Python 3.11, ``edgeml[agent,litert,delta]`` in
   ``/opt/edgeml`` and ``edgeml[agent,ort]`` in a venv of its own, nothing heavy; each runtime passes a
   bundle's golden vectors on arm64.
2. The device, enrolled on the running broker, runs the image's ENTRYPOINT as its USER (UID 10001). A
   ``tflite-int8`` bundle is rolled out: downloaded and verified (TUF over MQTT), smoke-tested (golden
   vectors), switched and committed after probation under live traffic; the image's HEALTHCHECK passes; after
   a restart the agent serves it again from its slot.
3. A broken 2.0.0 (logits divided by ten) is rolled out: during probation its confidence collapses on live
   traffic, the device rolls back by itself and the fleet aborts the rollout.
4. Its telemetry reaches the fleet's store with drift windows, and inputs that shift are flagged there.

Start-up time, RSS and installed size are measured inside, and labelled as emulated: qemu runs the agent's
code 10-200x slower than a Pi would, and its RSS includes the emulator's own memory.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.deploy.dockerfile import stages
from tests.fleet.mosquitto import MOSQUITTO, free_port
from tests.pi import arm64
from tests.pi.bundles import PiBundles
from tests.pi.conftest import ARTIFACTS, record
from tests.pi.fleet import HostFleet, host_fleet, wait_for
from tests.pi.image import JETSON_VENV, ORT_VENV, PiImage

DEVICE = "pi-1"
HEAVY = {"torch", "tensorflow", "tensorflow-cpu", "tf-keras", "sqlalchemy", "onnx"}
#: Device health limits of both rollouts: a short probation judged on at least 20 live requests; latency
#: slack for emulation, whose timing is noise (this test is about verification, golden vectors and confidence).
THRESHOLDS = ("--threshold", "min_requests=20", "--threshold", "p99_slack_ms=2000", "--threshold",
              "max_probation_s=300")
ROLLOUT = ("--select", "site=pi", "--canary", "100%", "--waves", "100%", "--min-devices", "1",
           "--wave-timeout", "10m", "--max-failure-rate", "0%", *THRESHOLDS)

pytestmark = pytest.mark.timeout(3600)  # a cold build of the image (Debian, then pip under emulation) included

_PROBE = """
import importlib.metadata as md, json, platform, sys
print(json.dumps({"python": platform.python_version(), "machine": platform.machine(),
                  "dists": {d.metadata["Name"].lower(): d.version for d in md.distributions()}}))
"""
_GOLDEN = """
import json, sys
from pathlib import Path
import numpy as np
from edgeml.edge_agent.serving import load_model
from edgeml.edge_agent.update.health import compare_golden
from edgeml.edge_agent.update.slots import Slots
slots = Slots(Path(sys.argv[2]))
slots.stage(sys.argv[1], "a")
model = load_model(slots.path("a"), "a")
golden = model.manifest.golden
with np.load(slots.path("a") / golden["file"]) as data:
    inputs = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
    expected = {k[4:]: data[k] for k in data.files if k.startswith("out:")}
verdict = compare_golden(model.runtime.infer(inputs), expected, golden, model.manifest.runtime["precision"])
heavy = sorted(m for m in ("torch", "tensorflow", "sqlalchemy", "onnx", "edgeml.fleet") if m in sys.modules)
from edgeml.edge_agent.capabilities import detect
print(json.dumps({"runtime": model.runtime.name, "golden": verdict, "heavy": heavy, "numpy": np.__version__,
                  "capabilities": detect().to_dict()}))
"""


def _python(pi: PiImage, venv: str, script: str, *args: str) -> dict[str, Any]:
    out = pi.machine.run([f"{venv}/bin/python", "-c", script, *args], timeout=900).stdout
    return json.loads(out.strip().splitlines()[-1])


def _golden(pi: PiImage, venv: str, bundle: Path) -> dict[str, Any]:
    """The bundle's golden vectors run by ``venv``'s edgeml on arm64, and what it detects."""
    inside = "/tmp/golden-check"
    shutil.rmtree(pi.machine.path(inside), ignore_errors=True)
    pi.machine.path(inside).mkdir(parents=True)
    shutil.copy(bundle, pi.machine.path(f"{inside}/{bundle.name}"))
    try:
        return _python(pi, venv, _GOLDEN, f"{inside}/{bundle.name}", f"{inside}/state")
    finally:
        shutil.rmtree(pi.machine.path(inside), ignore_errors=True)


def _du_mib(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return round(int(out.split()[0]) / 1024, 1)


def test_the_image_holds_what_the_dockerfile_and_the_readme_say(pi: PiImage, bundles: PiBundles) -> None:
    assert pi.facts["machine"] == "aarch64"
    tag = re.fullmatch(r"debian:(\d+)(?:\.(\d+))?-slim", stages("raspberrypi")[-1].image)
    assert tag is not None and pi.facts["debian"].split(".")[0] == tag.group(1), (pi.facts, tag)
    docker, readme = _python(pi, "/opt/edgeml", _PROBE), _python(pi, ORT_VENV, _PROBE)
    for found in (docker, readme):
        assert found["machine"] == "aarch64" and found["python"].startswith("3.11."), found  # Debian 12's Python
        assert {"edgeml", "paho-mqtt", "tuf", "cryptography", "numpy"} <= set(found["dists"]), found["dists"]
        assert not set(found["dists"]) & HEAVY, found["dists"]
    assert "ai-edge-litert" in docker["dists"] and "onnxruntime" not in docker["dists"]
    assert "onnxruntime" in readme["dists"] and "ai-edge-litert" not in readme["dists"]

    for venv, bundle, runtime in (("/opt/edgeml", bundles.v1_tflite, "litert"), (ORT_VENV, bundles.v1_onnx,
                                                                                   "onnxruntime")):
        result = _golden(pi, venv, bundle)
        assert (result["runtime"], result["golden"], result["heavy"]) == (runtime, None, []), result
        assert list(result["capabilities"]["runtimes"]) == [runtime] and result["capabilities"]["arch"] == "aarch64"

    record("python (emulated arm64 Debian)", f"{docker['python']} on Debian {pi.facts['debian']}")
    for venv, what in (("/opt/edgeml", "edgeml[agent,litert,delta], the image"),
                       (ORT_VENV, "edgeml[agent,ort], the README")):
        record(f"installed size, {venv} ({what})", f"{_du_mib(pi.machine.path(venv))} MiB")


def test_what_can_run_of_the_jetson_image_runs_on_arm64(pi: PiImage, bundles: PiBundles) -> None:
    """Dockerfile.jetson's pins and extras installed on arm64 by its own pip RUN (see
    :func:`tests.pi.image.jetson_command` for what stands in for what) run the agent's onnxruntime path and
    pass golden vectors with numpy 1.x. Not run: JetPack's Python 3.10, TensorRT, CUDA, the GPU."""
    args = {k: v for k, _, v in (a.partition("=") for a in stages("jetson")[-1].all("ARG"))}
    found = _python(pi, JETSON_VENV, _PROBE)
    dists = found["dists"]
    assert dists["numpy"] == args["NUMPY_VERSION"] and dists["cuda-python"] == args["CUDA_PYTHON_VERSION"], dists
    assert dists["onnxruntime"].split(".")[:2] == args["ORT_VERSION"].split(".")[:2], dists
    assert {"edgeml", "paho-mqtt", "tuf", "cryptography"} <= set(dists) and not set(dists) & HEAVY, dists
    result = _golden(pi, JETSON_VENV, bundles.v1_onnx)
    assert (result["runtime"], result["golden"], result["heavy"], result["numpy"]) == \
        ("onnxruntime", None, [], args["NUMPY_VERSION"]), result
    capabilities = result["capabilities"]
    assert set(capabilities["runtimes"]) == {"onnxruntime"} and capabilities["compute_capability"] is None, capabilities
    record("Jetson userland (emulated, Debian's Python, not JetPack's 3.10)",
           f"Python {found['python']}, numpy {dists['numpy']}, cuda-python {dists['cuda-python']}, onnxruntime "
           f"{dists['onnxruntime']} (CPU, for NVIDIA's onnxruntime-gpu {args['ORT_VERSION']}): golden vectors pass")


# --- the device against a fleet -------------------------------------------------------------------------

class Device:
    """The emulated Pi running the image's ENTRYPOINT as its USER, with a config folder and a fresh volume."""

    def __init__(self, pi: PiImage, bootstrap: Path, log: Path) -> None:
        self.pi, self.log = pi, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        etc, state = pi.machine.path("/etc/edgeml"), pi.machine.path(pi.image.volumes[0])
        shutil.rmtree(state, ignore_errors=True)  # a new volume
        shutil.rmtree(etc, ignore_errors=True)
        state.mkdir(mode=0o750)
        etc.mkdir()
        shutil.copy(bootstrap, etc / f"{DEVICE}.bootstrap.json")
        (etc / "agent.toml").write_text("\n".join([
            "[agent]", f'bootstrap = "{DEVICE}.bootstrap.json"', 'state_dir = "/var/lib/edgeml"',
            f"api_port = {self.port}", 'api_socket = "/run/edgeml/agent.sock"', "telemetry_interval_s = 2",
            # This machine's kernel says its clock is not NTP-synchronised; a Pi keeps "auto" (see the Dockerfile).
            'clock = "assume-synced"', ""]))
        uid, gid = (int(n) for n in pi.uid().split(":"))
        for path in (state, etc / f"{DEVICE}.bootstrap.json"):
            os.chown(path, uid, gid)
        (etc / f"{DEVICE}.bootstrap.json").chmod(0o600)
        self.env = {**pi.image.env, "EDGEML_HEALTH_URL": f"{self.url}/v1/health"}  # as `docker run -e` would
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the agent; returns the seconds until its API answered."""
        out = self.log.open("ab")
        start = time.monotonic()
        self.proc = self.pi.machine.popen(self.pi.image.entrypoint, env=self.env, user=self.pi.uid(),
                                          cwd=self.pi.image.workdir, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        wait_for("the emulated agent's API", lambda: self._alive() and self.status(), 300)
        return time.monotonic() - start

    def _alive(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, \
            f"the agent exited:\n{self.log.read_text(errors='replace')[-4000:]}"
        return True

    def stop(self) -> int:
        return arm64.stop(self.proc) if self.proc is not None else 0

    def clear(self) -> None:
        """Leave no credentials or state behind in the cached image."""
        for inside in ("/etc/edgeml", self.pi.image.volumes[0], "/run/edgeml"):
            path = self.pi.machine.path(inside)
            for child in path.iterdir() if path.is_dir() else ():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/status", timeout=10) as response:
                return dict(json.loads(response.read()))
        except OSError:
            return None

    def healthcheck(self) -> int:
        """The image's HEALTHCHECK, run inside as its USER: its exit status."""
        return self.pi.machine.run(self.pi.image.healthcheck, env=self.env, user=self.pi.uid(), check=False,
                                   timeout=120).returncode

    def rss_mib(self) -> float:
        """VmRSS of the agent's process (qemu running it: the emulator's own memory included)."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        status = Path(f"/proc/{children[0]}/status").read_text()
        return round(int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024, 1)  # type: ignore[union-attr]


class Traffic:
    """Inference requests to the device's local API from a thread: batches of the validation inputs."""

    def __init__(self, url: str, inputs: np.ndarray, batch: int = 10, every_s: float = 0.2) -> None:
        self.port = int(url.rsplit(":", 1)[1])
        self.inputs, self.batch, self.every_s = inputs, batch, every_s
        self.shift = False
        self.answers: list[tuple[float, int]] = []  # (monotonic time, HTTP status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        i = 0
        while not self._stop.wait(self.every_s):
            rows = self.inputs[i % (len(self.inputs) - self.batch):][:self.batch]
            i += self.batch
            if self.shift:  # a camera that went dark and noisy
                rows = rows * 0.3 + 0.5
            body = json.dumps({"inputs": rows.tolist(), "preprocessed": True})
            try:
                conn.request("POST", "/v1/models/digits:predict", body=body,
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                self.answers.append((time.monotonic(), response.status))
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)


@pytest.fixture(scope="module")
def fleet(pi: PiImage, bundles: PiBundles) -> Iterator[HostFleet]:
    if not MOSQUITTO.exists():
        from tests.conftest import require_service

        require_service("mosquitto", False, f"{MOSQUITTO} not installed (apt-get install mosquitto)")
    root = Path(tempfile.mkdtemp(prefix="edgeml-pi-fleet-"))
    root.chmod(0o755)  # the broker runs as user mosquitto
    try:
        with host_fleet(root, [bundles.v1_tflite, bundles.v1_onnx, bundles.v2_tflite]) as running:
            yield running
    finally:
        shutil.copy(root / "serve.log", ARTIFACTS / "serve.log") if (root / "serve.log").exists() else None
        shutil.rmtree(root, ignore_errors=True)


def _device_reported(fleet: HostFleet) -> bool:
    row = fleet.device_row(DEVICE)
    return bool(row and row["capabilities"] and row["status"] in ("idle", "serving"))


def _drift_rows(fleet: HostFleet, version: str) -> list[dict[str, Any]]:
    return [r["metrics"]["drift"] for r in fleet.telemetry(DEVICE)
            if r["metrics"].get("version") == version and isinstance(r["metrics"].get("drift"), dict)]


def test_an_emulated_pi_commits_a_good_model_rolls_back_a_broken_one_and_reports(
        pi: PiImage, bundles: PiBundles, fleet: HostFleet) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = ARTIFACTS / "agent.log"
    log.write_bytes(b"")
    device = Device(pi, fleet.enroll(DEVICE, site="pi"), log)
    with np.load(bundles.val) as val:
        inputs = val["input"].astype(np.float32)
    try:
        startup = device.start()
        assert device.healthcheck() != 0  # no verified model yet: "unhealthy", as the Dockerfile says
        wait_for("the device's state in the fleet's store", lambda: _device_reported(fleet), 120)
        capabilities = fleet.device_row(DEVICE)["capabilities"]  # type: ignore[index]
        assert capabilities["arch"] == "aarch64" and set(capabilities["runtimes"]) == {"litert"}, capabilities

        with Traffic(device.url, inputs) as traffic:
            v1 = fleet.rollout("digits:1.0.0", "tflite-int8", "--probation", "5s", *ROLLOUT)
            status = wait_for(f"rollout {v1} of 1.0.0", lambda: fleet.settled(v1), 900, every=2)
            assert status.state == "completed", (status.state, status.abort_reason, status.devices)
            committed = time.monotonic()
            assert [(d["device_id"], d["target"], d["state"]) for d in status.devices] == \
                [(DEVICE, "tflite-int8", "committed")]
            agent = device.status()
            assert agent is not None and (agent["version"], agent["update"]["state"]) == ("1.0.0", "committed")
            assert device.healthcheck() == 0
            wait_for("telemetry with a drift window of 1.0.0 in the store", lambda: _drift_rows(fleet, "1.0.0"), 300)

            v2 = fleet.rollout("digits:2.0.0", "tflite-int8", "--probation", "2m", *ROLLOUT)
            status = wait_for(f"rollout {v2} of the broken 2.0.0", lambda: fleet.settled(v2), 900, every=2)
            assert status.state == "aborted", (status.state, status.devices)
            (row,) = status.devices
            assert row["state"] == "rolled_back" and "confidence" in row["reason"], row
            agent = device.status()
            assert agent is not None and agent["version"] == "1.0.0", agent
            assert (agent["update"]["version"], agent["update"]["state"]) == ("2.0.0", "rolled_back"), agent

            stored = _drift_rows(fleet, "1.0.0")
            assert stored and all(0 <= d["score"] <= 1 for d in stored) and stored[0]["n"] >= 250, stored[:2]
            traffic.shift = True
            flagged = wait_for("shifted inputs flagged as drift in the store",
                               lambda: [d for d in _drift_rows(fleet, "1.0.0") if d["flagged"]], 600, every=2)
            assert flagged[0]["score"] > 0.2, flagged[0]
            after = [code for at, code in list(traffic.answers) if at > committed]  # 503 only before a model
            assert len(after) >= 20 and set(after) == {200}, sorted(set(after))  # none lost to the switches
            rss = device.rss_mib()
        assert device.stop() == 0

        restarted = time.monotonic()
        device.start()  # the same volume: the committed model serves again
        wait_for("the restarted agent to serve 1.0.0", lambda: (device.status() or {}).get("version") == "1.0.0", 300)
        serving = time.monotonic() - restarted
        assert device.healthcheck() == 0
    finally:
        device.stop()
        device.clear()
    record("agent start-up until its API answers, no model (emulated)", f"{startup:.1f} s")
    record("agent start-up until it serves its committed model, after a restart (emulated)", f"{serving:.1f} s")
    record("agent RSS under traffic, qemu's own memory included (emulated)", f"{rss} MiB")
