"""A device installs only ``edgeml[agent,ort]`` (or ``edgeml[agent,litert]``) into a fresh virtual
environment, and with that alone it runs the agent: TLS to the broker with its enrollment credentials,
TUF-verified download over MQTT, the model served. torch, tensorflow and sqlalchemy are never imported
(nor installed).

The environment is built from a wheel of this checkout; its dependencies come from the package index
(pip's cache makes later runs quick).
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeml.fleet.devices.broker import write_broker_config
from edgeml.fleet.devices.enrollment import enroll
from edgeml.fleet.registry.distribution import DistributionService
from edgeml.fleet.registry.repository import init_registry
from tests.conftest import REPO_ROOT
from tests.edge_agent.conftest import DigitsBundles
from tests.edge_agent.harness import Operator
from tests.fleet.mosquitto import run_mosquitto

HEAVY = ("torch", "tensorflow", "sqlalchemy", "onnx", "edgeml.fleet", "edgeml.compile", "edgeml.train")

DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from edgeml.edge_agent.agent import Agent
    from edgeml.edge_agent.config import load_config

    agent = Agent(load_config(Path(sys.argv[1])))
    agent.start()
    print(json.dumps({"started": True}), flush=True)
    deadline = time.monotonic() + 120
    def done():
        update = agent.status()["update"]
        return update is not None and update["state"] in ("committed", "rolled_back", "failed")
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)
    import numpy as np
    result = agent.predict("digits", np.zeros((2, 1, 8, 8), np.float32), preprocessed=True)
    heavy = sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)
    print(json.dumps({"version": result.version, "runtime": agent.host.active.runtime.name,
                      "heavy": heavy, "top1": result.top1}), flush=True)
    agent.stop()
""")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO_ROOT)],
                   check=True, capture_output=True, timeout=300)
    return next(out.glob("edgeml-*.whl"))


def _venv(where: Path, wheel: Path, extras: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{wheel}[{extras}]"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return python


@pytest.fixture
def tls_fleet(digits_bundles: DigitsBundles, compiled: dict[str, Path]) -> Iterator[tuple[Path, Path, Operator]]:
    """A TLS broker with ACLs, a registry with 1.0.0 (onnx) and 3.0.0 (tflite), one enrolled device."""
    root = Path(tempfile.mkdtemp(prefix="edgeml-install-"))
    root.chmod(0o755)
    try:
        registry = init_registry(root / "reg")
        registry.publish(digits_bundles.paths["1.0.0"])
        registry.publish(compiled["tflite"])
        fleet_pw = write_broker_config(root / "broker", [], hostname="localhost")["fleet"]
        bootstrap = enroll(registry.dir, "pi-7", root / "broker", tags={"site": "lab"}, broker_host="localhost")
        with run_mosquitto(root / "broker") as port:
            doc = json.loads(bootstrap.read_text())
            (root / "device").mkdir()
            (root / "device" / "bootstrap.json").write_text(json.dumps({**doc, "port": port}))
            context = ssl.create_default_context(cafile=str(root / "broker" / "tls" / "ca.crt"))
            with DistributionService(registry.dir, "localhost", port, username="fleet", password=fleet_pw,
                                     tls=context):
                operator = Operator(port, username="fleet", password=fleet_pw, tls=context)
                try:
                    yield root / "device", root, operator
                finally:
                    operator.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(("extras", "version", "target", "runtime"), [
    ("agent,ort", "1.0.0", "onnx", "onnxruntime"),
    ("agent,litert", "3.0.0", "tflite", "litert"),
])
def test_a_device_with_only_the_agent_extras_enrolls_fetches_verifies_and_serves(
        wheel: Path, tls_fleet: tuple[Path, Path, Operator], tmp_path: Path, extras: str, version: str,
        target: str, runtime: str) -> None:
    device_dir, _, operator = tls_fleet
    python = _venv(tmp_path / "venv", wheel, extras)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=True, timeout=120)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not installed & {"torch", "tensorflow", "sqlalchemy", "tf-keras", "onnx"}, installed
    (device_dir / "agent.toml").write_text('[agent]\nbootstrap = "bootstrap.json"\nstate_dir = "state"\n'
                                           'api_port = 0\nclock = "assume-synced"\n')
    (device_dir / "device.py").write_text(DEVICE_SCRIPT)
    proc = subprocess.Popen([str(python), str(device_dir / "device.py"), str(device_dir / "agent.toml"),
                             json.dumps(HEAVY)], cwd=device_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        operator.wait_for(lambda s: s.states.get("pi-7", {}).get("status") == "idle", 120)
        cid = operator.send("pi-7", "update", model="digits", version=version, target=target,
                            thresholds={"probation_s": 0.2, "max_probation_s": 0.5})
        end = operator.update_end("pi-7", cid, timeout=120)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert end["state"] == "committed", (end, err[-3000:])
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["version"] == version and result["runtime"] == runtime and len(result["top1"]) == 2
    assert result["heavy"] == [], f"the agent imported {result['heavy']}"
