"""Device enrollment and revocation against a real registry and a real Mosquitto over TLS."""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from edgeml.fleet.devices.broker import DYNSEC_FILE, write_broker_config
from edgeml.fleet.registry.repository import init_registry
from edgeml.protocol import Telemetry, device_topic
from tests.conftest import RunCli, require_service
from tests.fleet.mosquitto import MOSQUITTO, free_port, run_mosquitto

WAIT = 5.0


def _connect(bootstrap: dict[str, object], port: int, ca: Path,
             client_id: str | None = None) -> tuple[mqtt.Client, ReasonCode, queue.Queue[ReasonCode]]:
    """Connect as the device (its client id is its user name unless told otherwise); also the disconnects."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or str(bootstrap["username"]),
                         protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(ca))
    client.username_pw_set(str(bootstrap["username"]), str(bootstrap["password"]))
    connack: queue.Queue[ReasonCode] = queue.Queue()
    gone: queue.Queue[ReasonCode] = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: connack.put(rc)
    client.on_disconnect = lambda c, u, f, rc, p: gone.put(rc)
    client.connect(str(bootstrap["host"]), port)
    client.loop_start()
    return client, connack.get(timeout=WAIT), gone


def _close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def root() -> Iterator[Path]:
    if not MOSQUITTO.exists():
        require_service("mosquitto", False, f"{MOSQUITTO} not installed (apt-get install mosquitto)")
    directory = Path(tempfile.mkdtemp(prefix="edgeml-devices-"))
    directory.chmod(0o755)  # the broker runs as user mosquitto
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_enroll_connect_revoke(root: Path, run_cli: RunCli) -> None:
    registry = init_registry(root / "reg")
    broker_dir = root / "broker"
    write_broker_config(broker_dir, [], hostname="localhost")
    for name, tag in (("cam-a", "site=lab"), ("cam-b", "site=roof")):  # the broker is stopped: --offline
        r = run_cli("fleet", "devices", "enroll", registry.dir, name, "--broker-dir", broker_dir, "--tag", tag,
                    "--offline")
        assert r.returncode == 0, r.stderr
    files = {n: broker_dir / "credentials" / f"{n}.bootstrap.json" for n in ("cam-a", "cam-b")}
    boot = {n: json.loads(p.read_text()) for n, p in files.items()}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files.values())
    assert boot["cam-a"]["ca_pem"] == (broker_dir / "tls" / "ca.crt").read_text()
    root_json = (registry.dir / "repository" / "metadata" / "root.json").read_bytes()
    assert base64.b64decode(boot["cam-a"]["tuf_root_b64"]) == root_json
    clients = {c["username"] for c in json.loads((broker_dir / DYNSEC_FILE).read_text())["clients"]}
    assert clients == {"fleet", "fleet-admin", "cam-a", "cam-b"}  # the fleet's own users survive the rewrite

    with run_mosquitto(broker_dir) as port:
        ca = root / "ca.crt"
        ca.write_text(str(boot["cam-a"]["ca_pem"]))  # the device trusts only what its bootstrap file says
        cam_a, rc, cam_a_gone = _connect(boot["cam-a"], port, ca)
        assert not rc.is_failure, rc
        msg = Telemetry(device_id="cam-a", seq=1, sent_at=1.0, metrics={"fps": 30.0})
        info = cam_a.publish(device_topic("cam-a", "telemetry"), msg.to_bytes(), qos=1)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published()
        _, rc, _ = _connect(boot["cam-b"], port, ca, client_id="cam-a")  # cam-b cannot take cam-a's session
        assert rc.value == 0x87, rc

        control = ("--control", f"mqtts://localhost:{port}")  # the running broker, as its admin
        r = run_cli("fleet", "devices", "enroll", registry.dir, "cam-c", "--broker-dir", broker_dir, *control)
        assert r.returncode == 0, r.stderr
        cam_c_boot = json.loads((broker_dir / "credentials" / "cam-c.bootstrap.json").read_text())
        cam_c, rc, _ = _connect(cam_c_boot, port, ca)
        assert not rc.is_failure, rc  # enrolled on a running broker: it can connect at once
        _close(cam_c)

        r = run_cli("fleet", "devices", "revoke", registry.dir, "cam-a", "--broker-dir", broker_dir, *control)
        assert r.returncode == 0, r.stderr
        assert cam_a_gone.get(timeout=WAIT).value == 0x98  # administrative action: kicked while connected
        _close(cam_a)
        _, rc, _ = _connect(boot["cam-a"], port, ca)
        assert rc.is_failure and rc.value == 0x87, rc  # and refused from now on
        cam_b, rc, _ = _connect(boot["cam-b"], port, ca)
        _close(cam_b)
        assert not rc.is_failure, rc

    r = run_cli("fleet", "devices", "revoke", registry.dir, "cam-b", "--broker-dir", broker_dir, "--offline")
    assert r.returncode == 0, r.stderr
    with run_mosquitto(broker_dir) as port:  # the stopped broker reads the revocation when it starts
        _, rc, _ = _connect(boot["cam-b"], port, ca)
        assert rc.is_failure, rc
        cam_c, rc, _ = _connect(cam_c_boot, port, ca)  # the live enrollment was saved by the broker itself
        _close(cam_c)
        assert not rc.is_failure, rc

    r = run_cli("fleet", "devices", "ls", registry.dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "TAGS", "ENROLLED", "REVOKED"] and "LAST SEEN" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["cam-a"][1] == "site=lab" and rows["cam-a"][4] == "yes"
    assert rows["cam-b"][4] == "yes" and rows["cam-c"][4] == "no"


def test_enroll_on_a_broker_that_cannot_be_reached_changes_nothing(root: Path, run_cli: RunCli) -> None:
    registry = init_registry(root / "reg")
    broker_dir = root / "broker"
    write_broker_config(broker_dir, [], hostname="localhost")
    before = (broker_dir / DYNSEC_FILE).read_bytes()
    r = run_cli("fleet", "devices", "enroll", registry.dir, "cam-a", "--broker-dir", broker_dir,
                "--control", f"mqtt://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "cannot reach the broker" in r.stderr and "--offline" in r.stderr, r
    assert (broker_dir / DYNSEC_FILE).read_bytes() == before
    assert run_cli("fleet", "devices", "ls", registry.dir).stdout.count("\n") == 1  # only the header
    r = run_cli("fleet", "devices", "enroll", registry.dir, "fleet-admin", "--broker-dir", broker_dir, "--offline")
    assert r.returncode == 2 and "fleet's own broker users" in r.stderr, r


def test_duplicate_and_unknown_refused(root: Path, run_cli: RunCli) -> None:
    registry = init_registry(root / "reg")
    broker_dir = root / "broker"
    write_broker_config(broker_dir, [], hostname="localhost")
    args = ("fleet", "devices", "enroll", registry.dir, "cam-a", "--broker-dir", broker_dir, "--offline")
    assert run_cli(*args).returncode == 0
    before = (broker_dir / DYNSEC_FILE).read_text()
    r = run_cli(*args)
    assert r.returncode == 2 and "already enrolled" in r.stderr, r
    assert (broker_dir / DYNSEC_FILE).read_text() == before  # nothing rewritten
    r = run_cli("fleet", "devices", "revoke", registry.dir, "cam-z", "--broker-dir", broker_dir, "--offline")
    assert r.returncode == 2 and "no device 'cam-z' is enrolled" in r.stderr, r
    r = run_cli("fleet", "devices", "enroll", registry.dir, "Bad_Id", "--broker-dir", broker_dir, "--offline")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    assert not os.path.exists(broker_dir / "credentials" / "Bad_Id.bootstrap.json")
