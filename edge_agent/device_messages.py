"""What a device says and understands over MQTT, in one place for the agent and the fleet simulator.

:func:`state_message` and :func:`event_payload` build what a device publishes (:func:`publish_state`,
:func:`publish_event` and :func:`set_last_will` send it on the right topic, QoS and retain flag);
:func:`update_request`, :func:`ack_seq` and :func:`rollback_reason` read what a command asks. Both the real agent
(:mod:`edgeml.edge_agent.agent`) and the simulated devices (:mod:`edgeml.fleet.simulate`) use them, so a
fleet tested against the simulator meets the same messages in the field.
"""

from __future__ import annotations

import json
import time
from typing import Any

from edgeml.edge_agent.serving import LoadedModel
from edgeml.edge_agent.update.health import Thresholds
from edgeml.edge_agent.update.store import UpdateRequest
from edgeml.errors import ConfigError
from edgeml.protocol import Command, ProtocolError, device_topic
from edgeml.protocol import State as StateMessage

__all__ = ["ack_seq", "event_payload", "publish_event", "publish_state", "rollback_reason", "set_last_will",
           "state_message", "update_request"]


def state_message(device_id: str, status: str, active: LoadedModel | None, capabilities: dict[str, Any],
                  clock_synced: bool) -> StateMessage:
    """The retained state of a device serving ``active`` (None: no model yet)."""
    return StateMessage(device_id, status, model=active.manifest.name if active else None,
                        version=active.version if active else None, slot=active.slot if active else None,
                        capabilities=capabilities, clock_synced=clock_synced)


def event_payload(device_id: str, kind: str, **fields: Any) -> bytes:
    """An event for the device's ``events`` topic: ``{"type", "device_id", "at", ...fields}``."""
    doc = {"type": kind, "device_id": device_id, "at": time.time(), **fields}
    return json.dumps(doc, default=str).encode()


def publish_state(client: Any, message: StateMessage) -> None:
    """Publish the device's retained state (QoS 1) with a paho client."""
    client.publish(device_topic(message.device_id, "state"), message.to_bytes(), qos=1, retain=True)


def set_last_will(client: Any, device_id: str, capabilities: dict[str, Any]) -> None:
    """Have the broker publish the device ``offline`` (retained) when its connection dies; before connecting."""
    offline = state_message(device_id, "offline", None, capabilities, False)
    client.will_set(device_topic(device_id, "state"), offline.to_bytes(), qos=1, retain=True)


def publish_event(client: Any, device_id: str, kind: str, **fields: Any) -> None:
    """Publish an event on the device's ``events`` topic (QoS 1: paho queues it while offline)."""
    client.publish(device_topic(device_id, "events"), event_payload(device_id, kind, **fields), qos=1)


def update_request(command: Command) -> UpdateRequest:
    """The update an ``update`` command asks for (model, version, target, rollout, thresholds).

    Raises:
        ProtocolError: A field is missing or malformed.
    """
    args = command.args
    try:
        return UpdateRequest(str(args.get("model", "")), str(args.get("version", "")), str(args.get("target", "")),
                             args.get("rollout"), Thresholds.from_dict(args.get("thresholds")),
                             id=command.id).validated()
    except (ConfigError, TypeError) as exc:
        raise ProtocolError(f"bad update command: {exc}") from exc


def ack_seq(command: Command) -> int:
    """The sequence number a ``telemetry-ack`` command acknowledges.

    Raises:
        ProtocolError: It is not an integer >= 0.
    """
    seq = command.args.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ProtocolError(f"telemetry-ack needs an integer seq >= 0, got {seq!r}")
    return seq


def rollback_reason(command: Command) -> str:
    """Why the fleet asks for a rollback, as the update record will say it."""
    return "fleet: " + str(command.args.get("reason") or "the fleet asked for a rollback")[:500]
