"""What a device says and understands over MQTT, in one place for the agent and the fleet simulator.

:func:`state_message` and :func:`update_event` build what a device publishes (:func:`publish_state`,
:func:`publish_event` and :func:`set_last_will` send it on the right topic, QoS and retain flag); the
events themselves are the typed classes of :mod:`edgeml.protocol.events`. :func:`update_request`,
:func:`ack_seq` and :func:`rollback_reason` read what a command asks. Both the real agent
(:mod:`edgeml.edge_agent.agent`) and the simulated devices (:mod:`edgeml.fleet.sim.simulator`) use them, so a
fleet tested against the simulator meets the same messages in the field.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edgeml.edge_agent.serving import LoadedModel
from edgeml.edge_agent.update.health import Thresholds
from edgeml.edge_agent.update.store import UpdateRequest
from edgeml.errors import ConfigError
from edgeml.protocol import Command, DeviceEvent, ProtocolError, UpdateArgs, UpdateEvent, device_topic
from edgeml.protocol import State as StateMessage

__all__ = ["ack_seq", "device_event", "publish_event", "publish_state", "rollback_reason", "set_last_will",
           "state_message", "update_event", "update_request"]

_log = logging.getLogger(__name__)
_MAX_REASON = 1000  # characters of a reason an event carries (the protocol's limit)


def state_message(device_id: str, status: str, active: LoadedModel | None, capabilities: dict[str, Any],
                  clock_synced: bool) -> StateMessage:
    """The retained state of a device serving ``active`` (None: no model yet)."""
    return StateMessage(device_id, status, model=active.manifest.name if active else None,
                        version=active.version if active else None, slot=active.slot if active else None,
                        capabilities=capabilities, clock_synced=clock_synced)


def device_event(cls: type[DeviceEvent], device_id: str, **fields: Any) -> DeviceEvent | None:
    """An event of ``cls`` happening now, or None (logged) when a field cannot travel (a report must never
    stop what it reports on)."""
    try:
        return cls(device_id=device_id, at=time.time(), **fields)
    except ProtocolError as exc:
        _log.warning("cannot report a %s event: %s", cls.TYPE, exc)
        return None


def update_event(device_id: str, update: UpdateRequest | Any, state: str, *, event: str | None = None,
                 reason: str | None = None, cause: str | None = None) -> UpdateEvent | None:
    """The ``update`` event of ``update`` (an :class:`UpdateRequest` or an update record) now in ``state``.

    Returns None (and logs why) when the update's own fields cannot travel, e.g. a version longer than the
    protocol allows: a report must never stop the update it reports on.
    """
    try:
        return UpdateEvent(device_id=device_id, at=time.time(), id=update.id or None, rollout=update.rollout,
                           model=update.model, version=update.version, target=update.target, state=state,
                           event=event, reason=reason[:_MAX_REASON] if reason else None, cause=cause,
                           transfer=getattr(update, "transfer", None))
    except ProtocolError as exc:
        _log.warning("cannot report update %s in state %s: %s", update.id, state, exc)
        return None


def publish_state(client: Any, message: StateMessage) -> None:
    """Publish the device's retained state (QoS 1) with a paho client."""
    client.publish(device_topic(message.device_id, "state"), message.to_bytes(), qos=1, retain=True)


def set_last_will(client: Any, device_id: str, capabilities: dict[str, Any]) -> None:
    """Have the broker publish the device ``offline`` (retained) when its connection dies; before connecting."""
    offline = state_message(device_id, "offline", None, capabilities, False)
    client.will_set(device_topic(device_id, "state"), offline.to_bytes(), qos=1, retain=True)


def publish_event(client: Any, event: DeviceEvent | None) -> None:
    """Publish an event on its device's ``events`` topic (QoS 1: paho queues it while offline); None: nothing."""
    if event is None:
        return
    try:
        payload = event.to_bytes()
    except ProtocolError as exc:  # e.g. a drift window too large for one event: the report is dropped
        _log.warning("cannot report a %s event: %s", event.type, exc)
        return
    client.publish(device_topic(event.device_id, "events"), payload, qos=1)


def update_request(command: Command) -> UpdateRequest:
    """The update an ``update`` command asks for (model, version, target, rollout, thresholds).

    Raises:
        ProtocolError: A field is missing or malformed.
    """
    args = UpdateArgs.from_command(command)
    try:
        return UpdateRequest(args.model, args.version, args.target, args.rollout,
                             Thresholds.from_dict(args.thresholds), id=command.id,
                             delta_from=args.delta_from).validated()
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
