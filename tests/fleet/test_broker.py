"""The generated broker configuration, checked on its own and enforced by a real Mosquitto over TLS."""

from __future__ import annotations

import json
import queue
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from edgeml.errors import ConfigError
from edgeml.fleet.devices.broker import (
    DYNSEC_FILE,
    MESSAGE_SIZE_LIMIT,
    dynsec_config,
    hash_password,
    mosquitto_conf,
    verify_password,
    write_broker_config,
)
from edgeml.protocol import Telemetry, device_topic, fleet_client_id
from tests.conftest import require_service
from tests.fleet.mosquitto import MOSQUITTO, run_mosquitto

DEVICES = ("cam-a", "cam-b")
MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")
WAIT = 5.0  # seconds to wait for something that must happen
QUIET = 1.0  # seconds to wait for something that must not happen


# --- pure configuration ---------------------------------------------------------------------------------------


def test_hash_password_matches_mosquitto_passwd(tmp_path: Path) -> None:
    if not MOSQUITTO_PASSWD.exists():
        pytest.skip("mosquitto_passwd not installed")
    passwd = tmp_path / "passwd"
    subprocess.run([str(MOSQUITTO_PASSWD), "-c", "-b", str(passwd), "alice", "s3cret"], check=True)
    hashed = passwd.read_text().strip().split(":", 1)[1]
    assert hashed.startswith("$7$101$")
    assert verify_password(hashed, "s3cret")
    assert not verify_password(hashed, "s3cret!")
    _, _, iterations, salt, _ = hashed.split("$")
    import base64

    assert hash_password("s3cret", salt=base64.b64decode(salt), iterations=int(iterations)) == hashed


def test_config_layout(tmp_path: Path) -> None:
    creds = write_broker_config(tmp_path / "b", DEVICES, hostname="mqtt.example.com", port=8883, bind="10.0.0.5",
                                plugin=Path("/opt/dynsec.so"))
    out = tmp_path / "b"
    conf = (out / "mosquitto.conf").read_text().splitlines()
    for line in ["allow_anonymous false", "persistence true", "listener 8883 10.0.0.5", "plugin /opt/dynsec.so",
                 f"plugin_opt_config_file {out}/{DYNSEC_FILE}", f"keyfile {out}/tls/server.key",
                 f"message_size_limit {MESSAGE_SIZE_LIMIT}"]:
        assert line in conf
    assert sum(line.startswith("listener") for line in conf) == 1  # TLS only: no plain listener
    assert not any(line.startswith(("password_file", "acl_file")) for line in conf)
    assert set(creds) == {"fleet", "fleet-admin", *DEVICES} and len(set(creds.values())) == 4
    for user, password in creds.items():
        cred_file = out / "credentials" / f"{user}.json"
        assert stat.S_IMODE(cred_file.stat().st_mode) == 0o600
        assert json.loads(cred_file.read_text())["password"] == password
    for private in (out / "tls" / "server.key", out / DYNSEC_FILE, out / "credentials", out / "data"):
        assert stat.S_IMODE(private.stat().st_mode) & 0o077 == 0, private
    doc = json.loads((out / DYNSEC_FILE).read_text())
    clients = {c["username"]: c for c in doc["clients"]}
    assert clients["cam-b"]["clientid"] == "cam-b" and "clientid" not in clients["fleet"]
    assert doc["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": False,
                                       "subscribe": False, "unsubscribe": True}
    cam_b = next(r for r in doc["roles"] if r["rolename"] == "edgeml-device-cam-b")["acls"]
    assert {(a["acltype"], a["topic"]) for a in cam_b} >= {("publishClientSend", "edgeml/v1/devices/cam-b/state"),
                                                           ("subscribeLiteral", "edgeml/v1/devices/cam-b/commands"),
                                                           ("subscribePattern", "edgeml/v1/dist/#")}
    assert not any("cam-a" in a["topic"] or a["topic"].startswith("$") for a in cam_b)


def test_dynsec_hashes_verify() -> None:
    doc = dynsec_config(hash_password("f"), hash_password("a"), {"cam-1": hash_password("secret")})
    cam = next(c for c in doc["clients"] if c["username"] == "cam-1")
    import base64
    import hashlib

    digest = hashlib.pbkdf2_hmac("sha512", b"secret", base64.b64decode(cam["salt"]), cam["iterations"])
    assert base64.b64encode(digest).decode() == cam["password"]


@pytest.mark.parametrize("devices", [("cam-a", "cam-a"), ("fleet",), ("fleet-admin",), ("Bad_Id",)])
def test_config_rejects_bad_devices(tmp_path: Path, devices: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        write_broker_config(tmp_path / "b", devices)
    assert not (tmp_path / "b").exists()


def test_config_refuses_existing_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        write_broker_config(tmp_path, DEVICES)


def test_conf_uses_base_dir() -> None:
    conf = mosquitto_conf(Path("/etc/mosquitto/edgeml"), port=1234)
    assert f"plugin_opt_config_file /etc/mosquitto/edgeml/{DYNSEC_FILE}" in conf and "listener 1234\n" in conf


# --- a real broker ----------------------------------------------------------------------------------------------


class Broker:
    """A running broker and the generated directory it uses."""

    def __init__(self, directory: Path, port: int, creds: dict[str, str]) -> None:
        self.directory, self.port, self.creds = directory, port, creds
        self.ca = directory / "tls" / "ca.crt"


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    if not MOSQUITTO.exists():
        require_service("mosquitto", False, f"{MOSQUITTO} not installed (apt-get install mosquitto)")
    root = Path(tempfile.mkdtemp(prefix="edgeml-broker-"))
    root.chmod(0o755)  # the broker runs as user mosquitto
    try:
        creds = write_broker_config(root / "broker", DEVICES, hostname="localhost")
        with run_mosquitto(root / "broker") as port:
            yield Broker(root / "broker", port, creds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Probe:
    """A paho MQTT v5 client over TLS with blocking helpers."""

    def __init__(self, broker: Broker, user: str | None, password: str | None = None,
                 client_id: str | None = None) -> None:
        if client_id is None:  # a device's client id is its name (the broker insists); fleet processes have a '.'
            client_id = fleet_client_id("test") if user in (None, "fleet", "fleet-admin", "intruder") else user
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(broker.ca))
        if user is not None:
            self.client.username_pw_set(user, password if password is not None else broker.creds[user])
        self.connack: queue.Queue[ReasonCode] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.acks: dict[int, Any] = {}
        self.acked = threading.Condition()
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._ack(mid, rcs)
        self.client.on_publish = lambda c, u, mid, rc, p: self._ack(mid, rc)
        self.port = broker.port

    def _ack(self, mid: int, value: Any) -> None:
        with self.acked:
            self.acks[mid] = value
            self.acked.notify_all()

    def connect(self) -> ReasonCode:
        self.client.connect("localhost", self.port)
        self.client.loop_start()
        try:
            return self.connack.get(timeout=WAIT)
        finally:
            if not self.client.is_connected():
                self.close()

    def wait_ack(self, mid: int) -> Any:
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.acks, timeout=WAIT), f"no ack for mid {mid}"
            return self.acks[mid]

    def subscribe(self, topic: str) -> ReasonCode:
        _, mid = self.client.subscribe(topic, qos=1)
        return self.wait_ack(mid)[0]

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        return self.wait_ack(self.client.publish(topic, payload, qos=1).mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def connect(broker: Broker) -> Iterator[Any]:
    probes: list[Probe] = []

    def make(user: str) -> Probe:
        probe = Probe(broker, user)
        probes.append(probe)
        rc = probe.connect()
        assert not rc.is_failure, f"{user} refused: {rc}"
        return probe

    yield make
    for probe in probes:
        probe.close()


def test_device_publishes_own_telemetry_to_fleet(connect: Any) -> None:
    fleet, cam_a = connect("fleet"), connect("cam-a")
    topic = device_topic("cam-a", "telemetry")
    assert not fleet.subscribe(topic).is_failure
    message = Telemetry(device_id="cam-a", seq=7, sent_at=1.5, metrics={"fps": 30.0})
    assert cam_a.publish(topic, message.to_bytes()).value == 0
    got = fleet.messages.get(timeout=WAIT)
    assert got.topic == topic and got.payload == message.to_bytes()


def test_device_cannot_read_other_devices_commands(connect: Any) -> None:
    fleet, cam_a = connect("fleet"), connect("cam-a")
    for topic in (device_topic("cam-b", "commands"), "edgeml/v1/devices/+/commands", "#", "edgeml/v1/#",
                  "$share/ingest/edgeml/v1/devices/+/telemetry", "$share/x/edgeml/v1/devices/cam-a/commands"):
        assert cam_a.subscribe(topic).value == 0x87, topic  # the broker refuses the subscription itself
    assert not cam_a.subscribe(device_topic("cam-a", "commands")).is_failure
    assert not cam_a.subscribe("edgeml/v1/dist/r-1/0123456789abcdef/#").is_failure
    assert fleet.publish(device_topic("cam-b", "commands"), b'{"x":1}').value == 0x10  # no matching subscribers
    with pytest.raises(queue.Empty):
        cam_a.messages.get(timeout=QUIET)
    assert fleet.publish(device_topic("cam-a", "commands"), b'{"x":2}').value == 0  # its own arrive
    assert cam_a.messages.get(timeout=WAIT).topic == device_topic("cam-a", "commands")


def test_device_cannot_publish_as_another(connect: Any) -> None:
    fleet, cam_a = connect("fleet"), connect("cam-a")
    assert not fleet.subscribe("edgeml/v1/devices/+/telemetry").is_failure
    rc = cam_a.publish(device_topic("cam-b", "telemetry"), b"forged")
    assert rc.value == 0x87, rc  # not authorized
    with pytest.raises(queue.Empty):
        fleet.messages.get(timeout=QUIET)


@pytest.mark.parametrize(("user", "password"), [(None, None), ("cam-a", "wrong"), ("intruder", "x")])
def test_bad_logins_refused(broker: Broker, user: str | None, password: str | None) -> None:
    rc = Probe(broker, user, password).connect()
    assert rc.is_failure and rc.value in (0x86, 0x87), rc  # bad user name or password / not authorized


def test_plain_tcp_gets_no_connack(broker: Broker) -> None:
    connect_packet = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"  # MQTT 3.1.1 CONNECT, empty client id
    with socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT) as s:
        s.sendall(connect_packet)
        try:
            reply = s.recv(16)
        except (TimeoutError, ConnectionResetError):
            reply = b""
    assert not reply.startswith(b"\x20"), reply  # no CONNACK over plain TCP


@pytest.mark.parametrize("client_id", ["cam-b", "edgeml.rollouts", "edgeml.ingest.0123", "", "x"])
def test_a_device_connects_only_with_its_own_client_id(broker: Broker, client_id: str) -> None:
    rc = Probe(broker, "cam-a", client_id=client_id).connect()
    assert rc.is_failure and rc.value == 0x87, rc


def test_oversized_messages_do_not_reach_the_fleet(connect: Any) -> None:
    fleet, cam_a = connect("fleet"), connect("cam-a")
    assert not fleet.subscribe(device_topic("cam-a", "events")).is_failure
    cam_a.client.publish(device_topic("cam-a", "events"), b"x" * (MESSAGE_SIZE_LIMIT + 1), qos=1)
    with pytest.raises(queue.Empty):
        fleet.messages.get(timeout=QUIET)
