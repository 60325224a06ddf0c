"""A real fleet for the adversarial tests: the generated broker config on Mosquitto, ``edgeml fleet serve``
processes, an honest agent, and an attacker holding one enrolled device's real credentials.

Two deployments, each module-scoped:

* ``all-in-one``: one ``edgeml fleet serve`` process with every role, SQLite;
* ``split``: two distribution processes and two ingest processes on shared subscriptions, and one process
  with the controller and the web listener, PostgreSQL (what several machines use).

Nothing here is a stand-in: the broker is Mosquitto with the configuration ``broker-config`` writes (TLS,
the dynamic-security plugin), the devices were enrolled with ``edgeml fleet devices enroll``, the fleet runs
as real processes, and the honest device is the real agent with a real onnxruntime model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from edgeml.edge_agent.agent import Agent
from edgeml.edge_agent.config import load_config
from edgeml.fleet.devices.broker import write_broker_config
from edgeml.fleet.devices.enrollment import enroll
from edgeml.fleet.operator_api import LocalFleet
from edgeml.fleet.registry.repository import Registry, init_registry
from edgeml.fleet.rollouts.rules import RolloutOptions
from edgeml.fleet.store.db import Database
from edgeml.protocol import Command, device_topic, fleet_client_id
from tests.conftest import require_service
from tests.fleet.conftest import database_url
from tests.fleet.mosquitto import MOSQUITTO, run_mosquitto
from tests.fleet.tiny import tiny_bundle

HONEST = ("honest-1", "honest-2")
ATTACKER = "attacker"
STOLEN = "stolen-1"  # revoked during a test
WAIT = 10.0
QUICK = {"min_requests": 0, "max_probation_s": 10, "p99_slack_ms": 50}
VERSIONS = tuple(f"{major}.0.0" for major in range(1, 11))  # each rollout installs the next


class Probe:
    """An MQTT v5 client over TLS with blocking helpers: what the attacker (or a test's observer) holds."""

    def __init__(self, deployment: Deployment, user: str, client_id: str | None = None,
                 password: str | None = None) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user if client_id is None else client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set_context(ssl.create_default_context(cafile=str(deployment.ca)))
        self.client.username_pw_set(user, password if password is not None else deployment.creds[user])
        self.user = user
        self.connack: list[ReasonCode] = []
        self.disconnects: list[ReasonCode] = []
        self.messages: list[mqtt.MQTTMessage] = []
        self.acks: dict[int, Any] = {}
        self._cond = threading.Condition()
        self.client.on_connect = lambda c, u, f, rc, p: self._put(self.connack, rc)
        self.client.on_disconnect = lambda c, u, f, rc, p: self._put(self.disconnects, rc)
        self.client.on_message = lambda c, u, m: self._put(self.messages, m)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._ack(mid, rcs)
        self.client.on_publish = lambda c, u, mid, rc, p: self._ack(mid, rc)
        self.port = deployment.port

    def _put(self, into: list[Any], item: Any) -> None:
        with self._cond:
            into.append(item)
            self._cond.notify_all()

    def _ack(self, mid: int, value: Any) -> None:
        with self._cond:
            self.acks[mid] = value
            self._cond.notify_all()

    def wait(self, condition: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
        with self._cond:
            if not self._cond.wait_for(condition, timeout):
                raise AssertionError(f"timed out waiting for {what}")
            return condition()

    def connect(self) -> ReasonCode:
        self.client.connect("localhost", self.port, keepalive=30)
        self.client.loop_start()
        return self.wait(lambda: self.connack[0] if self.connack else None, what="CONNACK")

    def subscribe(self, topic: str) -> ReasonCode:
        _, mid = self.client.subscribe(topic, qos=1)
        return self.wait(lambda: self.acks.get(mid), what=f"SUBACK for {topic}")[0]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publish at QoS 1 and wait for the broker's PUBACK; its reason code's value."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        got = self.wait(lambda: self.acks.get(info.mid), what=f"PUBACK on {topic}")
        return int(got.value)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ServeProcess:
    """One ``edgeml fleet serve`` process; its listener lines are read until it says it is up."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.out = log.open("w")
        environ = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "fleet", "serve", *args], env=environ,
                                     stdout=self.out, stderr=subprocess.STDOUT, text=True)

    def wait_for_line(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            match = re.search(pattern, text, re.M)
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"serve did not print {pattern!r} within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


@dataclass
class Deployment:
    """A running fleet under attack (see the module docstring)."""

    kind: str
    root: Path
    registry: Registry
    db_url: str
    broker_dir: Path
    port: int
    creds: dict[str, str]
    http_url: str
    serves: list[ServeProcess]
    agents: dict[str, Agent] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)
    next_version: int = 1  # VERSIONS[0] is installed by the first rollout

    @property
    def ca(self) -> Path:
        return self.broker_dir / "tls" / "ca.crt"

    def probe(self, user: str, client_id: str | None = None, password: str | None = None) -> Probe:
        probe = Probe(self, user, client_id, password)
        self.probes.append(probe)
        return probe

    def attacker(self) -> Probe:
        """The attacker's connection, with the attacker device's real credentials and client id (the previous
        one is closed first: two connections with one client id would take the session from each other)."""
        for old in [p for p in self.probes if p.user == ATTACKER]:
            old.close()
            self.probes.remove(old)
        probe = self.probe(ATTACKER)
        rc = probe.connect()
        assert not rc.is_failure, rc
        return probe

    def observer(self, *topics: str) -> Probe:
        """A fleet-side subscriber (the fleet user, a fleet client id) to watch what devices publish."""
        probe = self.probe("fleet", client_id=fleet_client_id("test-observer"))
        assert not probe.connect().is_failure
        for topic in topics:
            assert not probe.subscribe(topic).is_failure
        return probe

    def database(self) -> Database:
        return self.registry.database()

    def query(self, sql: str, **params: Any) -> list[Any]:
        db = self.database()
        try:
            with db.transaction() as conn:
                return list(conn.execute(db.sa.text(sql), params))
        finally:
            db.close()

    def telemetry_seqs(self, device: str) -> list[int]:
        return [int(r[0]) for r in self.query("SELECT seq FROM telemetry WHERE device_id = :d ORDER BY seq", d=device)]

    def device_row(self, device: str) -> dict[str, Any]:
        rows = self.query("SELECT status, installed, capabilities, revoked FROM devices WHERE device_id = :d",
                          d=device)
        status, installed, capabilities, revoked = rows[0]
        return {"status": status, "installed": _json(installed), "capabilities": _json(capabilities),
                "revoked": bool(revoked)}

    def command(self, device: str, kind: str, **args: Any) -> str:
        """Send a command as the fleet (its own connection); returns the command id."""
        command = Command(id=os.urandom(6).hex(), type=kind, args=args, issued_at=time.time())
        sender = self.probe("fleet", client_id=fleet_client_id("test-operator"))
        assert not sender.connect().is_failure
        try:
            assert sender.publish(device_topic(device, "commands"), command.to_bytes()) in (0, 0x10)
        finally:
            sender.close()
        return command.id

    def rollout(self, devices: tuple[str, ...] = HONEST, timeout: float = 120.0) -> tuple[str, float, Any]:
        """Roll the next version out to ``devices`` (tag site=honest) and wait for it to settle; returns
        ``(version, seconds, status)``."""
        version = VERSIONS[self.next_version - 1]
        self.next_version += 1
        options = RolloutOptions(targets=("onnx",), canary=0.5, waves=(1.0,), min_devices=1, probation_s=0.5,
                                 wave_timeout_s=timeout, max_failure_rate=0.0, device_thresholds=QUICK,
                                 select={"site": "honest"})
        fleet = LocalFleet(self.registry.dir, db_url=self.db_url)
        try:
            start = time.monotonic()
            rid = fleet.start("tiny", version, options)
            deadline = start + timeout
            while True:
                status = fleet.status(rid)[0]
                if status.state in ("completed", "aborted"):
                    return version, time.monotonic() - start, status
                assert time.monotonic() < deadline, f"rollout {rid} did not settle: {status}"
                time.sleep(0.2)
        finally:
            fleet.log.db.close()

    def http_json(self, path: str) -> Any:
        """GET a fleet API path with a viewer token; the body parsed as strict JSON (no NaN/Infinity)."""
        request = urllib.request.Request(f"{self.http_url}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read(), parse_constant=_refuse_constant)

    token: str = ""


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"the API returned {name}, which is not JSON")


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _agent(deployment: Deployment, name: str, bootstrap: Path) -> Agent:
    home = deployment.root / "agents" / name
    home.mkdir(parents=True)
    boot = json.loads(bootstrap.read_text())
    boot.update(host="localhost", port=deployment.port)
    (home / "bootstrap.json").write_text(json.dumps(boot))
    (home / "bootstrap.json").chmod(0o600)
    (home / "agent.toml").write_text("\n".join([
        "[agent]", 'bootstrap = "bootstrap.json"', 'state_dir = "state"', "api_port = 0", "tls = true",
        'clock = "assume-synced"', "telemetry_interval_s = 0.3", "threads = 1", 'runtimes = ["onnxruntime"]', ""]))
    return Agent(load_config(home / "agent.toml"))


def _serve_args(d: Deployment, *roles: str, http: bool = False) -> list[str]:
    args = [str(d.registry.dir), "--broker-host", "localhost", "--broker-port", str(d.port), "--username", "fleet",
            "--ca", str(d.ca), "--db-url", d.db_url, "--tick", "0.2"]
    args += [item for role in roles for item in ("--role", role)]
    return args + (["--http-port", "0"] if http else ["--no-http"])


def _start_serves(d: Deployment) -> None:
    env = {"EDGEML_BROKER_PASSWORD": d.creds["fleet"]}
    logs = d.root / "logs"
    logs.mkdir(exist_ok=True)
    if d.kind == "all-in-one":
        plans = [((), True)]
    else:  # each role apart; distribution and ingest twice, on shared subscriptions
        plans = [(("dist",), False), (("dist",), False), (("ingest",), False), (("ingest",), False),
                 (("controller", "web"), True)]
    for i, (roles, http) in enumerate(plans):
        serve = ServeProcess(_serve_args(d, *roles, http=http), env, logs / f"serve-{i}.log")
        d.serves.append(serve)
    for serve, (_roles, http) in zip(d.serves, plans, strict=True):
        if http:
            d.http_url = serve.wait_for_line(r"^http: dashboard (http://\S+)/ ,").group(1)
        else:
            serve.wait_for_line(r"^(mqtt|ingest|controller): ")


@pytest.fixture(scope="module", params=[("all-in-one", "sqlite"), ("split", "postgresql")],
                ids=["all-in-one-sqlite", "split-postgresql"])
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    kind, backend = request.param
    if not MOSQUITTO.exists():
        require_service("mosquitto", False, f"{MOSQUITTO} not installed (apt-get install mosquitto)")
    root = Path(tempfile.mkdtemp(prefix=f"edgeml-security-{kind}-"))
    root.chmod(0o755)  # the broker runs as user mosquitto
    try:
        with database_url(backend, root) as url:
            yield from _deploy(kind, root, url)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _deploy(kind: str, root: Path, url: str) -> Iterator[Deployment]:
    registry = init_registry(root / "registry", db_url=url)
    for i, version in enumerate(VERSIONS):
        registry.publish(tiny_bundle(root / "bundles", version, 1.0 + i / 10))
    broker_dir = root / "broker"
    creds = write_broker_config(broker_dir, [], hostname="localhost")
    bootstraps = {}
    for name in (*HONEST, ATTACKER, STOLEN):  # enrolled with the broker stopped (its file is rewritten)
        site = "honest" if name in HONEST else "other"
        bootstraps[name] = enroll(registry.dir, name, broker_dir, tags={"site": site}, db_url=url)
        creds[name] = json.loads(bootstraps[name].read_text())["password"]
    token = _viewer_token(registry, url)
    with run_mosquitto(broker_dir) as port:
        d = Deployment(kind, root, registry, url, broker_dir, port, creds, "", [], token=token)
        try:
            _start_serves(d)
            for name in HONEST:
                d.agents[name] = _agent(d, name, bootstraps[name])
                d.agents[name].start()
            deadline = time.monotonic() + 60
            while not all(d.device_row(name)["capabilities"] for name in HONEST):  # planning reads them
                assert time.monotonic() < deadline, "the honest devices' states never reached the devices table"
                time.sleep(0.2)
            version, _, status = d.rollout()  # the honest devices get their first model
            assert status.state == "completed", status
            yield d
        finally:
            for probe in d.probes:
                probe.close()
            for agent in d.agents.values():
                agent.stop()
            for serve in d.serves:
                serve.stop()


def _viewer_token(registry: Registry, url: str) -> str:
    from edgeml.fleet.audit.log import open_audit
    from edgeml.fleet.web.auth import Role, create_token

    log = open_audit(registry.dir, db_url=url)
    try:
        return create_token(log.db, "security-tests", Role.VIEWER, audit=log, actor="local:tests")
    finally:
        log.db.close()
