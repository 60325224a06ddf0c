"""The demo's fleet on this machine: a registry, a broker, the fleet server and three agents, all real.

:class:`DemoFleet` sets up (or reuses, on a second run) everything under the demo's work directory:

* ``registry/``: the signed TUF registry and its SQLite database (``edgeml fleet init``);
* ``broker/``: a Mosquitto layout with TLS and per-device identities (``edgeml fleet broker-config``),
  the devices enrolled in it (``edgeml fleet devices enroll``); Mosquitto runs from a fresh copy of it in a
  temporary directory (it may drop to the ``mosquitto`` user, which must be able to read it). Where Mosquitto
  is not installed, the embedded in-process broker (amqtt, MQTT 3.1.1, anonymous, plain TCP) stands in;
* the fleet server (:class:`~edgeml.fleet.server.FleetServer`) in this process: distribution, ingest, the
  rollout controller and the HTTP listener (dashboard, API, ``/metrics``);
* ``agents/NAME/``: one ``edgeml agent run`` process per device (:data:`AGENTS`), with its ``agent.toml``,
  bootstrap file, state directory and log.

:class:`Traffic` sends inference requests to every agent's local API from a background thread, and can
shift one agent's inputs to inject drift.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.errors import ConfigError
from edgeml.process import start_child, stop_child

__all__ = ["AGENTS", "DemoAgent", "DemoFleet", "Traffic", "free_port"]

MOSQUITTO = ("mosquitto", "/usr/sbin/mosquitto")
#: The demo's devices: two on onnxruntime, one on LiteRT (a Raspberry Pi's runtime).
AGENTS = (("cam-1", "onnxruntime"), ("cam-2", "onnxruntime"), ("pi-1", "litert"))
SITE = "demo"


def free_port(preferred: int = 0) -> int:
    """``preferred`` when it is free on 127.0.0.1, else any free port."""
    for port in ((preferred, 0) if preferred else (0,)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise ConfigError("no free TCP port on 127.0.0.1")


def _mosquitto() -> str | None:
    return next((p for p in (shutil.which(MOSQUITTO[0]), MOSQUITTO[1]) if p and Path(p).exists()), None)


@dataclass
class DemoAgent:
    """One agent process of the demo."""

    name: str
    runtime: str
    home: Path
    api_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.home / "agent.toml"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.api_port}{path}"

    def status(self) -> dict[str, Any] | None:
        """The running agent's ``/v1/status``, or None when it does not answer."""
        try:
            with urllib.request.urlopen(self.url("/v1/status"), timeout=2) as response:
                doc = json.loads(response.read())
                return doc if isinstance(doc, dict) else None
        except (OSError, ValueError):
            return None


@dataclass
class DemoFleet:
    """Everything of the demo but the models; a context manager that stops what it started.

    Args:
        workdir: The demo's work directory.
        http_port: The fleet server's HTTP port (taken: a free one).
        broker: ``auto`` (Mosquitto where installed, else embedded), ``mosquitto`` or ``embedded``.
        log: Where progress lines go.
    """

    workdir: Path
    http_port: int = 8470
    broker: str = "auto"
    log: Any = print
    agents: list[DemoAgent] = field(default_factory=list)
    broker_kind: str = ""
    broker_port: int = 0
    server: Any = None
    _broker: Any = None
    _broker_tmp: Path | None = None

    @property
    def registry_dir(self) -> Path:
        return self.workdir / "registry"

    @property
    def broker_dir(self) -> Path:
        return self.workdir / "broker"

    # --- set-up -----------------------------------------------------------------------------------------

    def registry(self) -> Any:
        """The registry, created on the first run."""
        from edgeml.fleet.registry.repository import Registry, init_registry

        if (self.registry_dir / "registry.json").is_file():
            return Registry(self.registry_dir)
        self.log(f"creating the signed registry in {self.registry_dir}")
        return init_registry(self.registry_dir)

    def enroll(self) -> None:
        """Write the broker layout and enroll the devices (once; a second run reuses them)."""
        from edgeml.fleet.devices.broker import write_broker_config
        from edgeml.fleet.devices.enrollment import enroll

        if not self.broker_dir.exists():
            write_broker_config(self.broker_dir, [], hostname="localhost", port=8883)
        for name, runtime in AGENTS:
            home = self.workdir / "agents" / name
            bootstrap = home / "bootstrap.json"
            if not bootstrap.is_file():
                issued = enroll(self.registry_dir, name, self.broker_dir, tags={"site": SITE, "runtime": runtime},
                                broker_host="localhost")
                home.mkdir(parents=True, exist_ok=True)
                shutil.copy2(issued, bootstrap)
                self.log(f"enrolled {name} ({runtime}); its bootstrap file is {bootstrap}")
            self.agents.append(DemoAgent(name, runtime, home))

    def start_broker(self) -> None:
        """Mosquitto with TLS, passwords and ACLs where installed, else the embedded broker."""
        if self.broker not in ("auto", "mosquitto", "embedded"):
            raise ConfigError(f"unknown broker {self.broker!r}", hint="auto, mosquitto or embedded")
        binary = _mosquitto() if self.broker != "embedded" else None
        if binary is None and self.broker == "mosquitto":
            raise ConfigError("Mosquitto is not installed", hint="apt-get install mosquitto, or --broker embedded")
        if binary is None:
            from edgeml.fleet.devices.embedded_broker import EmbeddedBroker

            self._broker = EmbeddedBroker("127.0.0.1", 0)
            self._broker.start()
            self.broker_kind, self.broker_port = "embedded (amqtt, MQTT 3.1.1, no TLS)", self._broker.port
            self.log(f"embedded broker (amqtt) on mqtt://127.0.0.1:{self.broker_port}"
                     + (" (Mosquitto is not installed)" if self.broker == "auto" else ""))
            return
        from edgeml.fleet.devices.broker import DYNSEC_FILE, mosquitto_conf

        self.broker_port = free_port(18883)
        tmp = Path(tempfile.mkdtemp(prefix="edgeml-demo-broker-"))
        tmp.chmod(0o755)  # as root, Mosquitto drops to user mosquitto, which must read these files
        self._broker_tmp = tmp
        shutil.copy2(self.broker_dir / DYNSEC_FILE, tmp / DYNSEC_FILE)  # the broker rewrites its copy
        shutil.copytree(self.broker_dir / "tls", tmp / "tls")
        (tmp / "data").mkdir()
        conf = mosquitto_conf(tmp, port=self.broker_port, bind="127.0.0.1")
        (tmp / "mosquitto.conf").write_text(conf)
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("mosquitto")
                for path in [tmp, *tmp.rglob("*")]:
                    os.chown(path, user.pw_uid, user.pw_gid)
            except KeyError:
                pass
        logfile = (self.workdir / "logs" / "mosquitto.log")
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with logfile.open("ab") as out:
            self._broker = start_child([binary, "-c", str(tmp / "mosquitto.conf")], stdout=out,
                                       stderr=subprocess.STDOUT)
        _wait_port(self.broker_port, 10.0, lambda: self._broker.poll() is None, logfile)
        self.broker_kind = "Mosquitto (TLS, passwords, per-device ACL)"
        self.log(f"Mosquitto on mqtts://localhost:{self.broker_port} (TLS, passwords, per-device ACL)")

    @property
    def tls(self) -> bool:
        return isinstance(self._broker, subprocess.Popen)

    def start_server(self) -> str:
        """The fleet server in this process; returns the dashboard's base URL."""
        from edgeml.fleet.server import FleetServer, ServeSettings

        creds = json.loads((self.broker_dir / "credentials" / "fleet.json").read_text())
        tls = ssl.create_default_context(cafile=str(self.broker_dir / "tls" / "ca.crt")) if self.tls else None
        settings = ServeSettings(broker_host="localhost" if self.tls else "127.0.0.1", broker_port=self.broker_port,
                                 username=creds["username"] if self.tls else None,
                                 password=creds["password"] if self.tls else None, tls=tls,
                                 http_port=free_port(self.http_port), mqtt5=self.tls, shared=False, tick_s=0.5,
                                 client_id="edgeml.demo-controller")
        self.server = FleetServer(self.registry_dir, settings, log=lambda line: self.log(f"fleet server {line}"))
        self.server.start()
        return str(self.server.http.url)

    def start_agents(self) -> None:
        """One ``edgeml agent run`` process per device, with a fresh ``agent.toml`` (new ports) each run."""
        for agent in self.agents:
            agent.api_port = free_port()
            boot = json.loads((agent.home / "bootstrap.json").read_text())
            boot.update(host="localhost" if self.tls else "127.0.0.1", port=self.broker_port)
            (agent.home / "bootstrap.json").write_text(json.dumps(boot, indent=2))
            os.chmod(agent.home / "bootstrap.json", 0o600)
            agent.config.write_text("\n".join([
                "[agent]", 'bootstrap = "bootstrap.json"', 'state_dir = "state"', f"api_port = {agent.api_port}",
                "telemetry_interval_s = 1.0", "threads = 1", 'clock = "assume-synced"  # one machine, one clock',
                f"tls = {'true' if self.tls else 'false'}", f'runtimes = ["{agent.runtime}"]', ""]))
            logfile = self.workdir / "logs" / f"{agent.name}.log"
            logfile.parent.mkdir(parents=True, exist_ok=True)
            with logfile.open("ab") as out:
                agent.process = start_child(
                    [sys.executable, "-m", "edgeml.cli", "agent", "run", "--config", str(agent.config)],
                    stdout=out, stderr=subprocess.STDOUT, cwd=agent.home)
        for agent in self.agents:
            _wait_port(agent.api_port, 60.0, lambda a=agent: a.process is not None and a.process.poll() is None,
                       self.workdir / "logs" / f"{agent.name}.log")
            self.log(f"agent {agent.name} ({agent.runtime}) running, local API on 127.0.0.1:{agent.api_port}")

    # --- tear-down --------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the agents (SIGTERM, then SIGKILL), then the server, then the broker they all talk to (idempotent).

        The agents and Mosquitto run in sessions of their own (:func:`~edgeml.process.start_child`), so that
        Ctrl-C reaches only the demo, which stops them in this order.
        """
        for agent in self.agents:
            if agent.process is not None and agent.process.poll() is None:
                agent.process.terminate()
        for agent in self.agents:
            stop_child(agent.process, timeout=5)
            agent.process = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        if isinstance(self._broker, subprocess.Popen):
            stop_child(self._broker, timeout=5)
        elif self._broker is not None:
            self._broker.stop()
        self._broker = None
        if self._broker_tmp is not None:
            shutil.rmtree(self._broker_tmp, ignore_errors=True)
            self._broker_tmp = None

    def __enter__(self) -> DemoFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_port(port: int, timeout: float, alive: Any, logfile: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise ConfigError(f"a demo process exited early; see {logfile}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise ConfigError(f"nothing listened on 127.0.0.1:{port} within {timeout:g} s; see {logfile}")


class Traffic:
    """Inference requests to every agent from one background thread (about ``rate`` per second per agent).

    Args:
        agents: The agents.
        inputs: Validation inputs (N x ...), sent row by row, already preprocessed.
        rate: Requests per second per agent.
    """

    def __init__(self, agents: list[DemoAgent], inputs: np.ndarray, rate: float = 20.0) -> None:
        self.agents, self.inputs, self.rate = agents, inputs.astype(np.float32), rate
        self.shift: dict[str, float] = {}  # agent name -> value added to its inputs (drift)
        self.ok = self.errors = self.unavailable = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(1.0 / self.rate):
            for agent in self.agents:
                row = self.inputs[i % len(self.inputs)][None] + self.shift.get(agent.name, 0.0)
                self._send(agent, row)
            i += 1

    def _send(self, agent: DemoAgent, row: np.ndarray) -> None:
        body = json.dumps({"inputs": {"input": row.tolist()}, "preprocessed": True}).encode()
        request = urllib.request.Request(agent.url("/v1/models/digits:predict"), data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                response.read()
            self.ok += 1
        except urllib.error.HTTPError as exc:
            if exc.code in (503, 404):  # no model yet, or switching
                self.unavailable += 1
            else:
                self.errors += 1
        except OSError:
            self.unavailable += 1
