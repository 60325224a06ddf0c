"""Ask devices to upload what they captured: one ``capture`` command each, sent as the fleet."""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from collections.abc import Sequence

import paho.mqtt.client as mqtt

from edgeml.errors import ConfigError
from edgeml.protocol import Command, ProtocolError, device_topic, fleet_client_id, validate_device_id
from edgeml.protocol.messages import CaptureArgs

__all__ = ["capture_command", "send_capture"]


def capture_command(args: CaptureArgs) -> Command:
    """A ``capture`` command carrying ``args``."""
    return Command(id=f"cap-{uuid.uuid4().hex[:12]}", type="capture", args=args.to_args(), issued_at=time.time())


def send_capture(devices: Sequence[str], args: CaptureArgs, broker_host: str, broker_port: int, *,
                 username: str | None = None, password: str | None = None, tls: ssl.SSLContext | None = None,
                 timeout: float = 10.0) -> dict[str, str]:
    """Publish a ``capture`` command to each device (QoS 1, acknowledged by the broker); device -> command id.

    A device that is offline gets it when it reconnects (its session is persistent).

    Raises:
        ConfigError: A device id is invalid, or the broker cannot be reached or did not acknowledge in time.
    """
    try:
        for device in devices:
            validate_device_id(device)
    except ProtocolError as exc:
        raise ConfigError(exc.message, hint=exc.hint) from exc
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=fleet_client_id("capture-request"))
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set_context(tls)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    try:
        client.connect(broker_host, broker_port, keepalive=30)
    except OSError as exc:
        raise ConfigError(f"cannot reach the broker at {broker_host}:{broker_port}: {exc}") from exc
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise ConfigError(f"the broker at {broker_host}:{broker_port} did not accept the connection",
                              hint="check --username, the password and --ca")
        sent, out = [], {}
        for device in devices:
            command = capture_command(args)
            sent.append(client.publish(device_topic(device, "commands"), command.to_bytes(), qos=1))
            out[device] = command.id
        deadline = time.monotonic() + timeout
        for info in sent:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise ConfigError("the broker did not acknowledge the capture commands in time")
        return out
    finally:
        client.disconnect()
        client.loop_stop()
