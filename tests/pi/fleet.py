"""The host side of the emulated Pi's test: a real fleet run the way an operator runs it.

Mosquitto with the configuration ``edgeml fleet broker-config`` writes (TLS, the dynamic-security plugin), a
registry made and filled with ``edgeml fleet init`` and ``publish``, the device enrolled on the running broker
with ``edgeml fleet devices enroll --control``, and ``edgeml fleet serve`` (every role, SQLite) as its own
process with the broker password in ``$EDGEML_BROKER_PASSWORD``. Rollouts start with ``edgeml fleet rollout
start``; their status and the stored telemetry are read through :func:`edgeml.fleet.operator_api.open_fleet`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.fleet.mosquitto import run_mosquitto

__all__ = ["HostFleet", "host_fleet", "wait_for"]

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout: float, every: float = 0.5) -> T:
    """``check()`` once it is truthy; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def edgeml(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """``edgeml ARGS`` as a subprocess; its stdout (AssertionError with its output when it fails)."""
    environ = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "edgeml.cli", *map(str, args)], capture_output=True, text=True,
                          env=environ, timeout=timeout, check=False)
    assert proc.returncode == 0, f"edgeml {' '.join(map(str, args))}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


@dataclass
class HostFleet:
    """A running fleet (see the module docstring)."""

    root: Path
    port: int
    serve: subprocess.Popen[str]
    serve_log: Path
    bootstraps: dict[str, Path] = field(default_factory=dict)

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    def enroll(self, device: str, **tags: str) -> Path:
        """``edgeml fleet devices enroll`` on the running broker; returns the bootstrap file."""
        out = edgeml("fleet", "devices", "enroll", self.registry, device, "--broker-dir", self.broker,
                     "--control", f"mqtts://localhost:{self.port}", "--broker-host", "localhost",
                     "--broker-port", str(self.port), *[f"--tag={k}={v}" for k, v in tags.items()])
        match = re.search(r"bootstrap file (\S+) ", out)
        assert match, out
        self.bootstraps[device] = Path(match.group(1))
        return self.bootstraps[device]

    def rollout(self, model_version: str, targets: str, *options: str) -> str:
        """``edgeml fleet rollout start``; returns the rollout id."""
        out = edgeml("fleet", "rollout", "start", self.registry, model_version, "--targets", targets, *options)
        match = re.search(r"rollout (\S+):", out)
        assert match, out
        return match.group(1)

    def status(self, rollout_id: str) -> Any:
        """The rollout's status (state, devices with their state and reason)."""
        from edgeml.fleet.operator_api import open_fleet

        fleet = open_fleet(str(self.registry))
        try:
            return fleet.status(rollout_id)[0]
        finally:
            fleet.close()

    def settled(self, rollout_id: str) -> Any:
        """The rollout's status once it completed or aborted and no device is still busy, else None."""
        status = self.status(rollout_id)
        busy = any(d["state"] in ("pending", "notifying", "notified") and status.state != "aborted"
                   or d["revert_state"] in ("rollback", "revert", "revert-sent") for d in status.devices)
        return status if status.state in ("completed", "aborted") and not busy else None

    def telemetry(self, device: str, limit: int = 100) -> list[dict[str, Any]]:
        """The device's stored telemetry, newest first."""
        from edgeml.fleet.operator_api import open_fleet

        fleet = open_fleet(str(self.registry))
        try:
            return list(fleet.telemetry(device, limit))
        finally:
            fleet.close()

    def device_row(self, device: str) -> dict[str, Any] | None:
        """The device's row in the store (status, installed versions, capabilities), or None."""
        with sqlite3.connect(self.registry / "registry.db") as db:
            row = db.execute("SELECT status, installed, capabilities FROM devices WHERE device_id = ?",
                             (device,)).fetchone()
        if row is None:
            return None
        return {"status": row[0], "installed": _json(row[1]), "capabilities": _json(row[2])}


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@contextmanager
def host_fleet(root: Path, bundles: list[Path]) -> Iterator[HostFleet]:
    """Start the fleet in ``root`` (a fresh folder the ``mosquitto`` user can traverse) with ``bundles`` published."""
    registry, broker = root / "registry", root / "broker"
    edgeml("fleet", "init", registry)
    for bundle in bundles:
        edgeml("fleet", "publish", registry, bundle, "--channel", "stable")
    edgeml("fleet", "broker-config", broker, "--hostname", "localhost")
    password = json.loads((broker / "credentials" / "fleet.json").read_text())["password"]
    with ExitStack() as stack:
        port = stack.enter_context(run_mosquitto(broker))
        log = root / "serve.log"
        out = stack.enter_context(log.open("w"))
        env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "EDGEML_BROKER_PASSWORD": password}
        serve = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "fleet", "serve", str(registry),
                                  "--broker-host", "localhost", "--broker-port", str(port), "--username", "fleet",
                                  "--ca", str(broker / "tls" / "ca.crt"), "--tick", "0.2", "--http-port", "0"],
                                 env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        stack.callback(_stop, serve)
        wait_for("edgeml fleet serve to listen", lambda: serve.poll() is not None
                 or re.search(r"^http: ", log.read_text(), re.M), 90)
        assert serve.poll() is None, f"edgeml fleet serve exited:\n{log.read_text()[-3000:]}"
        yield HostFleet(root, port, serve, log)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
