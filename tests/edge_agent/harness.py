"""A small real fleet for agent tests: Mosquitto, a signed registry, the distribution service, and an
operator's MQTT client that sends commands and collects what devices publish.

Everything is real (broker, TUF metadata, distribution over MQTT); only the rollout logic is replaced by
the test sending ``update`` commands itself.
"""

from __future__ import annotations

import base64
import json
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgeml.fleet.registry.distribution import DistributionService
from edgeml.fleet.registry.repository import Registry
from edgeml.protocol import PREFIX, Command, Telemetry, device_topic, parse
from tests.fleet.mosquitto import anonymous_mosquitto


@dataclass
class Observed:
    """What the operator's client saw, per device."""

    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    telemetry: dict[str, dict[int, Telemetry]] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)  # telemetry received twice, per device


class Operator:
    """The fleet side of the tests: sends commands, records events, states and telemetry (acking it)."""

    def __init__(self, port: int, ack: bool = True, username: str | None = None, password: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.seen = Observed()
        self.ack = ack
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"operator-{uuid.uuid4().hex[:6]}")
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("localhost" if tls else "127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(f"{PREFIX}devices/+/events", 1), (f"{PREFIX}devices/+/state", 1),
                               (f"{PREFIX}devices/+/telemetry", 1)])
        if not subscribed.wait(10):
            raise RuntimeError("operator could not subscribe")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device, channel = msg.topic.split("/")[3:5]
        with self._cond:
            if channel == "events":
                self.seen.events.setdefault(device, []).append(json.loads(msg.payload))
            elif channel == "state" and msg.payload:
                self.seen.states[device] = json.loads(msg.payload)
            elif channel == "telemetry":
                t = parse("telemetry", bytes(msg.payload))
                assert isinstance(t, Telemetry)
                stored = self.seen.telemetry.setdefault(device, {})
                if t.seq in stored:
                    self.seen.duplicates[device] = self.seen.duplicates.get(device, 0) + 1
                stored[t.seq] = t
                if self.ack:
                    high = -1
                    while high + 1 in stored:
                        high += 1
                    if high >= 0:
                        self.send(device, "telemetry-ack", seq=high)
            self._cond.notify_all()

    def send(self, device: str, kind: str, **args: Any) -> str:
        command = Command(id=uuid.uuid4().hex[:12], type=kind, args=args, issued_at=time.time())
        self.client.publish(device_topic(device, "commands"), command.to_bytes(), qos=1)
        return command.id

    def wait_for(self, what: Callable[[Observed], Any], timeout: float = 60.0) -> Any:
        """Wait until ``what(seen)`` is truthy; returns it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = what(self.seen)
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out; events so far: {json.dumps(self.seen.events)[-3000:]}")
                self._cond.wait(min(left, 0.5))

    def update_end(self, device: str, command_id: str, timeout: float = 90.0) -> dict[str, Any]:
        """The terminal (or refusal) event of update ``command_id`` on ``device``."""
        final = {"committed", "rolled_back", "failed", "incompatible", "busy"}
        try:
            return dict(self.wait_for(lambda s: next((e for e in s.events.get(device, []) if e.get("type") == "update"
                                                      and e.get("id") == command_id and e.get("state") in final),
                                                     None), timeout))
        except TimeoutError:  # say what this device did, not the tail of every device's events
            with self._cond:
                mine = [(e.get("id"), e.get("state"), e.get("event"), e.get("reason")) for e in
                        self.seen.events.get(device, [])]
                state = self.seen.states.get(device)
            raise TimeoutError(f"update {command_id} on {device} did not end in {timeout:g} s; its events: {mine}; "
                               f"its last state: {state}") from None

    def states_of(self, device: str, command_id: str) -> list[str]:
        return [e["state"] for e in self.seen.events.get(device, []) if e.get("id") == command_id]


@contextmanager
def plain_broker(persistence: bool = False) -> Iterator[tuple[int, Path]]:
    """An anonymous plain-TCP Mosquitto on 127.0.0.1 (TLS and ACLs are tested in tests/fleet)."""
    with anonymous_mosquitto(persistence) as (port, broker_dir):
        yield port, broker_dir


def write_agent_config(home: Path, device_id: str, port: int, root: bytes, **settings: Any) -> Path:
    """A bootstrap file and an ``agent.toml`` for a device on the plain test broker; returns the TOML path."""
    home.mkdir(parents=True, exist_ok=True)
    boot = {"device_id": device_id, "username": device_id, "password": "unused", "host": "127.0.0.1",
            "port": port, "ca_pem": None, "tuf_root_b64": base64.b64encode(root).decode()}
    (home / "bootstrap.json").write_text(json.dumps(boot))
    values = {"bootstrap": "bootstrap.json", "state_dir": "state", "api_port": 0, "tls": False,
              "clock": "assume-synced", "telemetry_interval_s": 0.5, "threads": 1, **settings}
    lines = ["[agent]"] + [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
                           for k, v in values.items()]
    (home / "agent.toml").write_text("\n".join(lines) + "\n")
    return home / "agent.toml"


@contextmanager
def distribution(registry: Registry, port: int) -> Iterator[DistributionService]:
    with DistributionService(registry.dir, "127.0.0.1", port) as service:
        yield service


def drain(q: queue.Queue[Any]) -> list[Any]:
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    return items
