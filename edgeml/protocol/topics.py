"""The topic tree, device ids, and what each device may publish and subscribe to.

See :mod:`edgeml.protocol` for the tree. Device ids (also their broker user names and, enforced by the
broker, their MQTT client ids) match ``[a-z0-9][a-z0-9-]{0,62}``. Fleet processes use client ids with a
``.`` (:func:`fleet_client_id`), which no device id can equal.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid

from edgeml.protocol.codec import ProtocolError

__all__ = [
    "DEVICE_CHANNELS_IN",
    "DEVICE_CHANNELS_OUT",
    "DIST_FILTER",
    "PREFIX",
    "acl_for_device",
    "device_topic",
    "dist_chunk_topic",
    "dist_file_filter",
    "dist_file_id",
    "dist_info_topic",
    "dist_topic",
    "fleet_client_id",
    "is_device_id",
    "parse_device_topic",
    "tcp_no_delay",
    "validate_device_id",
]

PREFIX = "edgeml/v1/"
DEVICE_CHANNELS_OUT = ("state", "telemetry", "events", "requests", "uploads")  # device -> fleet
DEVICE_CHANNELS_IN = ("commands", "replies")  # fleet -> device
#: What every device may subscribe to besides its own commands and replies: the broadcast files.
DIST_FILTER = f"{PREFIX}dist/#"
_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_DEVICE_CHANNELS = frozenset(DEVICE_CHANNELS_OUT + DEVICE_CHANNELS_IN)
_DEVICE_TOPIC_PREFIX = f"{PREFIX}devices/"


@functools.lru_cache(maxsize=1 << 16)
def is_device_id(name: str) -> bool:
    """Whether ``name`` matches the device id pattern (remembered: every message names its device)."""
    return _ID_RE.fullmatch(name) is not None


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a valid device id (``[a-z0-9][a-z0-9-]{0,62}``).

    Raises:
        ProtocolError: It is not.
    """
    if not isinstance(device_id, str) or not is_device_id(device_id):
        raise ProtocolError(f"invalid device id {str(device_id)[:80]!r}",
                            hint="use 1-63 lowercase letters, digits or '-', not starting with '-'")
    return device_id


def fleet_client_id(role: str, unique: bool = True) -> str:
    """An MQTT client id for a fleet process: ``edgeml.<role>[.<random>]``; the dot keeps it out of the
    device id alphabet, so no device's (broker-enforced) client id can ever equal it.

    Args:
        role: What the process is, e.g. ``"rollouts"``, ``"ingest"``.
        unique: Append 12 random hex digits (a clean session per process); False for a stable id whose
            persistent session outlives restarts.
    """
    return f"edgeml.{role}" + (f".{uuid.uuid4().hex[:12]}" if unique else "")


def device_topic(device_id: str, channel: str) -> str:
    """The topic of one device's channel, e.g. ``edgeml/v1/devices/cam-1/telemetry``.

    Raises:
        ProtocolError: The device id or the channel is invalid.
    """
    validate_device_id(device_id)
    if channel not in _DEVICE_CHANNELS:
        raise ProtocolError(f"unknown device channel {channel!r}")
    return f"{_DEVICE_TOPIC_PREFIX}{device_id}/{channel}"


def parse_device_topic(topic: str) -> tuple[str, str]:
    """Split a device topic into ``(device_id, channel)``.

    Raises:
        ProtocolError: ``topic`` is not a device topic of this protocol version.
    """
    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) != 5 or not topic.startswith(_DEVICE_TOPIC_PREFIX):
        raise ProtocolError(f"not an edgeml device topic: {str(topic)[:120]!r}")
    device_id, channel = parts[3], parts[4]
    validate_device_id(device_id)
    if channel not in _DEVICE_CHANNELS:
        raise ProtocolError(f"unknown device channel {channel[:40]!r}")
    return device_id, channel


def dist_topic(rollout_id: str, suffix: str = "") -> str:
    """The distribution topic of a rollout (``edgeml/v1/dist/{rollout_id}[/suffix]``).

    Raises:
        ProtocolError: The rollout id is invalid or ``suffix`` contains wildcards.
    """
    validate_device_id(rollout_id)  # same alphabet as device ids
    if any(c in suffix for c in "#+\0"):
        raise ProtocolError(f"invalid distribution topic suffix {suffix!r}")
    return f"{PREFIX}dist/{rollout_id}" + (f"/{suffix.strip('/')}" if suffix.strip("/") else "")


def tcp_no_delay(sock: object) -> None:
    """Send small MQTT packets at once on ``sock`` (a client's socket after connect; None is ignored).

    Request/response and acknowledgements otherwise wait on Nagle's algorithm against the peer's delayed
    ACK (about 40 ms a round trip). paho-mqtt does not set it; the broker side is ``set_tcp_nodelay true``.
    """
    import contextlib
    import socket

    with contextlib.suppress(AttributeError, OSError):  # not a TCP socket (Unix, websocket): nothing to do
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]


def dist_file_id(path: str) -> str:
    """The id of a repository path (``targets/...``) in broadcast topics: 16 hex digits of its sha256."""
    return hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]


def dist_info_topic(rollout_id: str, path: str) -> str:
    """The retained :class:`~edgeml.protocol.DistInfo` topic of one broadcast file."""
    return dist_topic(rollout_id, f"{dist_file_id(path)}/info")


def dist_chunk_topic(rollout_id: str, path: str, index: int) -> str:
    """The retained topic of chunk ``index`` of one broadcast file."""
    return dist_topic(rollout_id, f"{dist_file_id(path)}/{int(index)}")


def dist_file_filter(rollout_id: str, path: str) -> str:
    """The subscription that receives one broadcast file: its info and all its chunks."""
    return dist_topic(rollout_id, dist_file_id(path)) + "/#"


def is_reply_topic(topic: object) -> bool:
    """Whether ``topic`` is some device's ``replies`` topic."""
    try:
        return isinstance(topic, str) and parse_device_topic(topic)[1] == "replies"
    except ProtocolError:
        return False


def acl_for_device(device_id: str) -> list[tuple[str, str]]:
    """The broker permissions of one device as ``(access, topic filter)`` pairs, the policy every broker
    configuration is generated from (:mod:`edgeml.fleet.devices.broker`; docs/security.md for other brokers).

    Access is ``publish`` (the device may send to that topic), ``subscribe`` (it may subscribe with exactly
    that filter, or, for a filter ending in ``#``, any filter under it) or ``receive`` (the broker may deliver
    messages of those topics to it). Anything not listed is denied, ``#``, other devices' topics and
    shared subscriptions (``$share/...``) included.

    Raises:
        ProtocolError: The device id is invalid.
    """
    rules = [("publish", device_topic(device_id, ch)) for ch in DEVICE_CHANNELS_OUT]
    for channel in DEVICE_CHANNELS_IN:
        rules += [("subscribe", device_topic(device_id, channel)), ("receive", device_topic(device_id, channel))]
    rules += [("subscribe", DIST_FILTER), ("receive", DIST_FILTER)]
    return rules
