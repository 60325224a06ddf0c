"""Device enrollment and revocation against a real registry and a real Mosquitto over TLS."""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from edgeml.fleet.broker import verify_password, write_broker_config
from edgeml.fleet.registry import init_registry
from edgeml.protocol import Telemetry, device_topic
from tests.conftest import RunCli, require_service
from tests.fleet.mosquitto import MOSQUITTO, run_mosquitto

WAIT = 5.0


def _broker_pid(conf: Path) -> int:
    """The pid of the mosquitto process started with ``-c conf`` (by this test)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(conf).encode() in argv and argv[0].endswith(b"mosquitto"):
                return int(entry.name)
    raise AssertionError(f"no mosquitto running with {conf}")


def _connect(bootstrap: dict[str, object], port: int, ca: Path) -> tuple[mqtt.Client, ReasonCode]:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(ca))
    client.username_pw_set(str(bootstrap["username"]), str(bootstrap["password"]))
    connack: queue.Queue[ReasonCode] = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: connack.put(rc)
    client.connect(str(bootstrap["host"]), port)
    client.loop_start()
    return client, connack.get(timeout=WAIT)


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
    fleet_pw = write_broker_config(broker_dir, [], hostname="localhost")["fleet"]
    for name, tag in (("cam-a", "site=lab"), ("cam-b", "site=roof")):
        r = run_cli("fleet", "devices", "enroll", registry.dir, name, "--broker-dir", broker_dir, "--tag", tag)
        assert r.returncode == 0, r.stderr
    files = {n: broker_dir / "credentials" / f"{n}.bootstrap.json" for n in ("cam-a", "cam-b")}
    boot = {n: json.loads(p.read_text()) for n, p in files.items()}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files.values())
    assert boot["cam-a"]["ca_pem"] == (broker_dir / "tls" / "ca.crt").read_text()
    root_json = (registry.dir / "repository" / "metadata" / "root.json").read_bytes()
    assert base64.b64decode(boot["cam-a"]["tuf_root_b64"]) == root_json
    hashes = dict(line.split(":", 1) for line in (broker_dir / "passwd").read_text().splitlines())
    assert verify_password(hashes["fleet"], fleet_pw)  # the fleet user's login survives regeneration

    with run_mosquitto(broker_dir) as port:
        ca = root / "ca.crt"
        ca.write_text(str(boot["cam-a"]["ca_pem"]))  # the device trusts only what its bootstrap file says
        cam_a, rc = _connect(boot["cam-a"], port, ca)
        assert not rc.is_failure, rc
        msg = Telemetry(device_id="cam-a", seq=1, sent_at=1.0, metrics={"fps": 30.0})
        info = cam_a.publish(device_topic("cam-a", "telemetry"), msg.to_bytes(), qos=1)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published()
        _close(cam_a)

        pid = _broker_pid(broker_dir / "test.conf")
        r = run_cli("fleet", "devices", "revoke", registry.dir, "cam-a", "--broker-dir", broker_dir,
                    "--broker-pid", str(pid))
        assert r.returncode == 0, r.stderr
        assert "user cam-a" not in (broker_dir / "acl").read_text()
        deadline = time.monotonic() + WAIT
        while True:  # the reload is asynchronous: retry until the broker refuses
            client, rc = _connect(boot["cam-a"], port, ca)
            _close(client)
            if rc.is_failure or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert rc.is_failure and rc.value in (0x86, 0x87), rc  # bad user name or password / not authorized
        cam_b, rc = _connect(boot["cam-b"], port, ca)
        _close(cam_b)
        assert not rc.is_failure, rc

    r = run_cli("fleet", "devices", "ls", registry.dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "TAGS", "ENROLLED", "REVOKED"] and "LAST SEEN" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["cam-a"][1] == "site=lab" and rows["cam-a"][4] == "yes"
    assert rows["cam-b"][4] == "no"


def test_duplicate_and_unknown_refused(root: Path, run_cli: RunCli) -> None:
    registry = init_registry(root / "reg")
    broker_dir = root / "broker"
    write_broker_config(broker_dir, [], hostname="localhost")
    args = ("fleet", "devices", "enroll", registry.dir, "cam-a", "--broker-dir", broker_dir)
    assert run_cli(*args).returncode == 0
    before = (broker_dir / "passwd").read_text()
    r = run_cli(*args)
    assert r.returncode == 2 and "already enrolled" in r.stderr, r
    assert (broker_dir / "passwd").read_text() == before  # nothing rewritten
    r = run_cli("fleet", "devices", "revoke", registry.dir, "cam-z", "--broker-dir", broker_dir)
    assert r.returncode == 2 and "no device 'cam-z' is enrolled" in r.stderr, r
    r = run_cli("fleet", "devices", "enroll", registry.dir, "Bad_Id", "--broker-dir", broker_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    assert not os.path.exists(broker_dir / "credentials" / "Bad_Id.bootstrap.json")
