"""Changing who may use the broker: devices added and disabled in Mosquitto's dynamic-security plugin.

Two ways, one for each state of the broker:

* :class:`BrokerControl`: the broker runs. Commands go to the plugin's control topic
  (``$CONTROL/dynamic-security/v1``) as the broker admin (``credentials/fleet-admin.json``); the plugin
  applies them at once and saves its file. Disabling a device also disconnects it if it is connected.
* :func:`sync_file`: the broker is stopped. ``dynamic-security.json`` is rewritten from the registry's
  device list (the fleet's own users kept as they are); the broker reads it when it starts. Never use it on
  a running broker: the plugin keeps its configuration in memory and overwrites the file with it on its
  next change, so the edit would be lost.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeml.errors import ConfigError
from edgeml.fleet.devices.broker import ADMIN_USER, DYNSEC_FILE, RESERVED_USERS, device_client, device_role
from edgeml.fsutil import atomic_write_bytes
from edgeml.protocol import fleet_client_id

__all__ = ["BrokerControl", "sync_file"]

_CONTROL = "$CONTROL/dynamic-security/v1"
_DEVICE_ROLE_PREFIX = "edgeml-device-"


class BrokerControl:
    """The broker admin's connection to a running Mosquitto's dynamic-security plugin.

    Args:
        host: The broker's host.
        port: Its port.
        username: The broker admin's user name.
        password: Its password.
        cafile: The CA to trust for TLS (None: plain TCP, for a test broker on loopback).
        timeout: Seconds to wait for the broker's answer.
    """

    def __init__(self, host: str, port: int, username: str, password: str, *, cafile: Path | None = None,
                 timeout: float = 10.0) -> None:
        self.host, self.port, self.username, self.password = host, port, username, password
        self.cafile, self.timeout = cafile, timeout

    @classmethod
    def from_broker_dir(cls, broker_dir: Path, *, host: str | None = None, port: int | None = None,
                        tls: bool = True) -> BrokerControl:
        """The control of the broker laid out in ``broker_dir`` (its admin credentials and CA).

        Args:
            broker_dir: The directory ``edgeml fleet broker-config`` wrote.
            host: Where to reach the broker (default: the host in the admin's credentials).
            port: Its port (default: the listener's port in the credentials).
            tls: Connect over TLS, trusting ``tls/ca.crt``.

        Raises:
            ConfigError: The admin's credentials are missing or unreadable.
        """
        path = Path(broker_dir) / "credentials" / f"{ADMIN_USER}.json"
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the broker admin's credentials {path}: {exc}",
                              hint="this broker directory predates dynamic security: run `edgeml fleet "
                                   "broker-config` again") from exc
        return cls(host or doc.get("host", "localhost"), port or int(doc.get("port", 8883)), doc["username"],
                   doc["password"], cafile=Path(broker_dir) / "tls" / "ca.crt" if tls else None)

    @property
    def where(self) -> str:
        return f"{'mqtts' if self.cafile else 'mqtt'}://{self.host}:{self.port}"

    def add_device(self, device_id: str, password: str) -> None:
        """Create the device's role and client (user name and client id: its id) on the running broker.

        Raises:
            ConfigError: The broker cannot be reached or refused (e.g. the device exists already).
        """
        role = device_role(device_id)
        self.run([{"command": "createRole", "rolename": role["rolename"], "acls": role["acls"]},
                  {"command": "createClient", "username": device_id, "clientid": device_id, "password": password,
                   "textname": f"edgeml device {device_id}",
                   "roles": [{"rolename": role["rolename"], "priority": 0}]}])

    def disable_device(self, device_id: str) -> None:
        """Disable the device's client: it is disconnected now and cannot connect again.

        Raises:
            ConfigError: The broker cannot be reached or refused (e.g. no such device).
        """
        self.run([{"command": "disableClient", "username": device_id}])

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send ``commands`` to the plugin in one message and return its answers (one per command).

        Raises:
            ConfigError: The broker cannot be reached, refused the admin, did not answer in time, or answered
                a command with an error.
        """
        import paho.mqtt.client as mqtt

        tag = uuid.uuid4().hex
        for i, command in enumerate(commands):
            command["correlationData"] = f"{tag}-{i}"
        answer: dict[str, Any] = {}
        done = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=fleet_client_id("admin"),
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(self.username, self.password)
        if self.cafile is not None:
            client.tls_set_context(ssl.create_default_context(cafile=str(self.cafile)))

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if reason.is_failure:
                answer["error"] = f"the broker refused the admin: {reason}"
                done.set()
            else:
                c.subscribe(f"{_CONTROL}/response", qos=1)

        def on_subscribe(c: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
            if any(r.is_failure for r in reasons):
                answer["error"] = "the broker refused the admin's subscription to the control topic"
                done.set()
            else:
                c.publish(_CONTROL, json.dumps({"commands": commands}), qos=1)

        def on_message(c: Any, userdata: Any, msg: Any) -> None:
            try:
                responses = json.loads(msg.payload).get("responses", [])
            except ValueError:
                return
            mine = [r for r in responses if str(r.get("correlationData", "")).startswith(tag)]
            if mine:
                answer["responses"] = mine
                done.set()

        client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
        try:
            client.connect(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot reach the broker at {self.where} as {self.username}: {exc}",
                              hint="is it running there? For a stopped broker, pass --offline") from exc
        client.loop_start()
        try:
            if not done.wait(self.timeout):
                raise ConfigError(f"the broker at {self.where} did not answer the admin within {self.timeout:g} s")
        finally:
            client.disconnect()
            client.loop_stop()
        if "error" in answer:
            raise ConfigError(f"{self.where}: {answer['error']}", hint="check credentials/fleet-admin.json")
        failed = [f"{r.get('command')}: {r['error']}" for r in answer["responses"] if r.get("error")]
        if failed:
            raise ConfigError(f"the broker at {self.where} refused: {'; '.join(failed)}")
        return list(answer["responses"])


def sync_file(broker_dir: Path, devices: Mapping[str, tuple[str, bool]]) -> None:
    """Rewrite the devices in a stopped broker's ``dynamic-security.json`` (see the module docstring).

    Args:
        broker_dir: The broker directory.
        devices: Every enrolled device id -> (its ``$7$`` password hash, whether it is revoked).

    Raises:
        ConfigError: The file is missing or unreadable, or an id is reserved.
    """
    path = Path(broker_dir) / DYNSEC_FILE
    try:
        stat = path.stat()
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", hint="create the broker directory with "
                          "`edgeml fleet broker-config` (Mosquitto's dynamic-security plugin)") from exc
    bad = sorted(set(devices) & RESERVED_USERS)
    if bad:
        raise ConfigError(f"device ids {bad} are reserved for the fleet's own broker users")
    keep_clients = [c for c in doc.get("clients", []) if c.get("username") in RESERVED_USERS]
    keep_roles = [r for r in doc.get("roles", []) if not str(r.get("rolename", "")).startswith(_DEVICE_ROLE_PREFIX)]
    doc["clients"] = keep_clients + [device_client(d, h, disabled=revoked)
                                     for d, (h, revoked) in sorted(devices.items())]
    doc["roles"] = keep_roles + [device_role(d) for d in sorted(devices)]
    atomic_write_bytes(path, json.dumps(doc, indent=1).encode())
    os.chmod(path, 0o600)
    if (stat.st_uid, stat.st_gid) != (os.geteuid(), os.getegid()) and os.geteuid() == 0:
        os.chown(path, stat.st_uid, stat.st_gid)  # the broker's user must still read (and rewrite) it
