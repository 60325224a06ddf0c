"""The MQTT protocol between devices and the fleet: topic tree, message schemas, broker ACL.

This module is the one place where the topic layout and the message formats are defined. Devices
(``edge_agent``) and the fleet server (``fleet``) both import it; it needs only the standard library.

Topic tree (everything under :data:`PREFIX`, ``edgeml/v1/``)::

    edgeml/v1/devices/{device_id}/state       device -> fleet  State (retained), the device's current status
    edgeml/v1/devices/{device_id}/telemetry   device -> fleet  Telemetry, periodic metrics
    edgeml/v1/devices/{device_id}/events      device -> fleet  free-form events (update progress, errors)
    edgeml/v1/devices/{device_id}/requests    device -> fleet  Request (MQTT 3.1.1 request/response)
    edgeml/v1/devices/{device_id}/commands    fleet -> device  Command
    edgeml/v1/devices/{device_id}/replies     fleet -> device  Reply to a Request (correlation_id)
    edgeml/v1/dist/{rollout_id}/#             fleet -> devices shared distribution of a rollout (broadcast)
    edgeml/v1/dist/{rollout_id}/{file_id}/info       DistInfo (retained): path, size and chunk size of a file
    edgeml/v1/dist/{rollout_id}/{file_id}/{index}    chunk ``index`` of that file (retained, raw bytes)

Device ids (also their broker user names) match ``[a-z0-9][a-z0-9-]{0,62}``. Each device may write only
its own ``state``, ``telemetry``, ``events`` and ``requests`` and read only its own ``commands`` and
``replies`` plus ``edgeml/v1/dist/#``; the fleet user reads and writes everything under ``edgeml/v1/#``
(:func:`acl_for_device`, :func:`mosquitto_acl`).

Broadcast: the fleet publishes a rollout's files once, as retained messages, and every device that
subscribes to ``edgeml/v1/dist/{rollout_id}/{file_id}/#`` (:func:`dist_file_filter`; ``file_id`` is
:func:`dist_file_id` of the file's repository path) receives them from the broker. Chunk payloads are the
file's raw bytes (not JSON): nothing in them is trusted, the device checks the assembled file against the
signed TUF metadata. A device that misses chunks asks the distribution service for just those ranges.

Messages are UTF-8 JSON objects carrying a ``schema`` field such as ``"edgeml.command/1"``. :func:`parse`
checks the size limit of the kind (:data:`MAX_BYTES`) before decoding, then the schema version, the
required fields and their types; anything wrong raises :class:`ProtocolError`, never another exception.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from edgeml.errors import EdgeMLError

__all__ = [
    "COMMAND_TYPES",
    "DEVICE_CHANNELS_IN",
    "DEVICE_CHANNELS_OUT",
    "MAX_BYTES",
    "PREFIX",
    "Command",
    "DistInfo",
    "MAX_DIST_CHUNK",
    "MAX_REPLY_DATA",
    "Message",
    "ProtocolError",
    "Reply",
    "Request",
    "State",
    "Telemetry",
    "acl_for_device",
    "device_topic",
    "dist_chunk_topic",
    "dist_file_filter",
    "dist_file_id",
    "dist_info_topic",
    "dist_topic",
    "mosquitto_acl",
    "parse",
    "parse_device_topic",
    "tcp_no_delay",
    "validate_device_id",
]

PREFIX = "edgeml/v1/"
DEVICE_CHANNELS_OUT = ("state", "telemetry", "events", "requests")  # device -> fleet
DEVICE_CHANNELS_IN = ("commands", "replies")  # fleet -> device
COMMAND_TYPES = frozenset({"update", "rollback", "capture", "ping", "telemetry-ack"})
_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_DEVICE_CHANNELS = frozenset(DEVICE_CHANNELS_OUT + DEVICE_CHANNELS_IN)
_DEVICE_TOPIC_PREFIX = f"{PREFIX}devices/"
_KiB = 1024
# Largest accepted payload per kind, in bytes (checked before decoding).
MAX_BYTES: dict[str, int] = {
    "command": 16 * _KiB,
    "request": 16 * _KiB,
    "reply": 64 * _KiB,
    "telemetry": 64 * _KiB,
    "state": 16 * _KiB,
    "dist": 4 * _KiB,
}
#: Most file bytes one get Reply carries: their base64 plus the JSON envelope fit MAX_BYTES["reply"].
MAX_REPLY_DATA = (MAX_BYTES["reply"] - _KiB) // 4 * 3 // _KiB * _KiB  # 47 KiB
#: Largest chunk of a broadcast file (raw bytes in one retained message).
MAX_DIST_CHUNK = 1024 * _KiB
_FieldTypes = dict[str, tuple[type, ...]]  # field name -> accepted JSON types
Kind = Literal["command", "request", "reply", "telemetry", "state", "dist"]


class ProtocolError(EdgeMLError):
    """A topic or an MQTT message does not follow the edgeml protocol (malformed, too large, unknown version)."""


# --- topics -------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 16)
def _is_device_id(name: str) -> bool:
    """Whether ``name`` matches the device id pattern (remembered: every message names its device)."""
    return _ID_RE.fullmatch(name) is not None


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a valid device id (``[a-z0-9][a-z0-9-]{0,62}``).

    Raises:
        ProtocolError: It is not.
    """
    if not isinstance(device_id, str) or not _is_device_id(device_id):
        raise ProtocolError(f"invalid device id {device_id!r}",
                            hint="use 1-63 lowercase letters, digits or '-', not starting with '-'")
    return device_id


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
        raise ProtocolError(f"not an edgeml device topic: {topic!r}")
    device_id, channel = parts[3], parts[4]
    validate_device_id(device_id)
    if channel not in _DEVICE_CHANNELS:
        raise ProtocolError(f"unknown device channel {channel!r}")
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
    """The retained :class:`DistInfo` topic of one broadcast file."""
    return dist_topic(rollout_id, f"{dist_file_id(path)}/info")


def dist_chunk_topic(rollout_id: str, path: str, index: int) -> str:
    """The retained topic of chunk ``index`` of one broadcast file."""
    return dist_topic(rollout_id, f"{dist_file_id(path)}/{int(index)}")


def dist_file_filter(rollout_id: str, path: str) -> str:
    """The subscription that receives one broadcast file: its info and all its chunks."""
    return dist_topic(rollout_id, dist_file_id(path)) + "/#"


def _is_reply_topic(topic: object) -> bool:
    try:
        return isinstance(topic, str) and parse_device_topic(topic)[1] == "replies"
    except ProtocolError:
        return False


# --- messages -----------------------------------------------------------------------------------------------


_FIELD_NAMES: dict[type, frozenset[str]] = {}


def _field_names(cls: type) -> frozenset[str]:
    """The dataclass field names of a message class (looked up once: every message received is checked)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    return names


def _check_type(kind: str, name: str, value: object, types: tuple[type, ...]) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ProtocolError(f"{kind}: field {name!r} must be {wanted}, got {type(value).__name__}")


class _Message:
    """Shared encoding/decoding of the message dataclasses (each sets KIND, SCHEMA and TYPES)."""

    KIND: ClassVar[str]
    SCHEMA: ClassVar[str]
    TYPES: ClassVar[_FieldTypes]
    schema: str  # a dataclass field in every subclass

    def __post_init__(self) -> None:
        kind, types = self.KIND, self.TYPES
        for name in _field_names(type(self)):
            if name != "schema":
                _check_type(kind, name, getattr(self, name), types[name])
        if self.schema != self.SCHEMA:
            raise ProtocolError(f"{self.KIND}: unsupported schema {self.schema!r}",
                                hint=f"this edgeml speaks {self.SCHEMA}; upgrade the older side")
        self._validate()

    def _validate(self) -> None:
        """Checks beyond types (overridden per kind)."""

    def to_bytes(self) -> bytes:
        """The message as compact UTF-8 JSON.

        Raises:
            ProtocolError: It is larger than the kind's limit or holds values JSON cannot carry.
        """
        try:
            fields = {name: getattr(self, name) for name in _field_names(type(self))}  # JSON values: no deep copy
            data = json.dumps(fields, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"{self.KIND}: cannot encode as JSON: {exc}") from exc
        _check_size(self.KIND, data)
        return data


@dataclass(frozen=True)
class Command(_Message):
    """A command from the fleet to one device (topic ``.../commands``).

    Attributes:
        id: Unique command id, echoed in the device's events.
        type: One of :data:`COMMAND_TYPES`.
        args: Arguments of the command (JSON object).
        issued_at: When the fleet issued it, in Unix seconds.
    """

    id: str
    type: str
    args: dict[str, Any] = field(default_factory=dict)
    issued_at: float = 0.0
    schema: str = "edgeml.command/1"

    KIND: ClassVar[str] = "command"
    SCHEMA: ClassVar[str] = "edgeml.command/1"
    TYPES: ClassVar[_FieldTypes] = {"id": (str,), "type": (str,), "args": (dict,),
                                                     "issued_at": (int, float)}

    def _validate(self) -> None:
        if not self.id:
            raise ProtocolError("command: 'id' must not be empty")
        if self.type not in COMMAND_TYPES:
            raise ProtocolError(f"command: unknown type {self.type!r} (expected one of {sorted(COMMAND_TYPES)})")


@dataclass(frozen=True)
class Request(_Message):
    """A request from a device to the fleet (``.../requests``); the answer is a :class:`Reply` on ``reply_to``.

    Attributes:
        correlation_id: Chosen by the device; the reply carries it back.
        reply_to: The device's own ``replies`` topic.
        method: What is asked, e.g. ``"get_rollout"``.
        params: Parameters of the method (JSON object).
    """

    correlation_id: str
    reply_to: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    schema: str = "edgeml.request/1"

    KIND: ClassVar[str] = "request"
    SCHEMA: ClassVar[str] = "edgeml.request/1"
    TYPES: ClassVar[_FieldTypes] = {"correlation_id": (str,), "reply_to": (str,),
                                                     "method": (str,), "params": (dict,)}

    def _validate(self) -> None:
        if not self.correlation_id or not self.method:
            raise ProtocolError("request: 'correlation_id' and 'method' must not be empty")
        if not _is_reply_topic(self.reply_to):
            raise ProtocolError(f"request: 'reply_to' must be a device replies topic, got {self.reply_to!r}")


@dataclass(frozen=True)
class Reply(_Message):
    """The fleet's answer to a :class:`Request`: ``ok`` with a ``result``, or not ``ok`` with an ``error``.

    Attributes:
        correlation_id: The request's correlation id.
        ok: Whether the request succeeded.
        result: The result (any JSON value) when ``ok``.
        error: What went wrong when not ``ok``.
    """

    correlation_id: str
    ok: bool
    result: Any = None
    error: str | None = None
    schema: str = "edgeml.reply/1"

    KIND: ClassVar[str] = "reply"
    SCHEMA: ClassVar[str] = "edgeml.reply/1"
    TYPES: ClassVar[_FieldTypes] = {
        "correlation_id": (str,), "ok": (bool,), "error": (str, type(None)),
        "result": (dict, list, str, int, float, bool, type(None)),
    }

    def _validate(self) -> None:
        if not self.correlation_id:
            raise ProtocolError("reply: 'correlation_id' must not be empty")
        if self.ok == (self.error is not None):
            raise ProtocolError("reply: 'error' is required when ok is false and forbidden when ok is true")


@dataclass(frozen=True)
class Telemetry(_Message):
    """Periodic metrics from a device (``.../telemetry``).

    Attributes:
        device_id: The sending device.
        seq: Sequence number (>= 0), increasing per device, to detect loss and duplicates.
        sent_at: When it was sent, in Unix seconds (device clock).
        metrics: Metric name -> value (JSON object).
    """

    device_id: str
    seq: int
    sent_at: float
    metrics: dict[str, Any] = field(default_factory=dict)
    schema: str = "edgeml.telemetry/1"

    KIND: ClassVar[str] = "telemetry"
    SCHEMA: ClassVar[str] = "edgeml.telemetry/1"
    TYPES: ClassVar[_FieldTypes] = {"device_id": (str,), "seq": (int,), "sent_at": (int, float),
                                                     "metrics": (dict,)}

    def _validate(self) -> None:
        validate_device_id(self.device_id)
        if self.seq < 0:
            raise ProtocolError(f"telemetry: 'seq' must be >= 0, got {self.seq}")


@dataclass(frozen=True)
class State(_Message):
    """A device's current state (``.../state``, retained).

    Attributes:
        device_id: The device.
        status: What it is doing, e.g. ``"running"``, ``"updating"``, ``"error"``.
        model: Name of the active model, if any.
        version: Version of the active model, if any.
        slot: Active A/B slot (``"a"`` or ``"b"``), if any.
        capabilities: What the device can run (runtimes, accelerators, memory).
        clock_synced: Whether the device clock is NTP-synchronised (TUF expiry checks need it).
    """

    device_id: str
    status: str
    model: str | None = None
    version: str | None = None
    slot: str | None = None
    capabilities: dict[str, Any] = field(default_factory=dict)
    clock_synced: bool = False
    schema: str = "edgeml.state/1"

    KIND: ClassVar[str] = "state"
    SCHEMA: ClassVar[str] = "edgeml.state/1"
    TYPES: ClassVar[_FieldTypes] = {
        "device_id": (str,), "status": (str,), "model": (str, type(None)), "version": (str, type(None)),
        "slot": (str, type(None)), "capabilities": (dict,), "clock_synced": (bool,),
    }

    def _validate(self) -> None:
        validate_device_id(self.device_id)
        if not self.status:
            raise ProtocolError("state: 'status' must not be empty")


@dataclass(frozen=True)
class DistInfo(_Message):
    """Announces one broadcast file (``edgeml/v1/dist/{rollout_id}/{file_id}/info``, retained).

    Attributes:
        path: The file's repository path, ``targets/...`` (what the device's TUF client asks for).
        size: Its size in bytes.
        chunk: Bytes per chunk; chunk ``i`` holds bytes ``[i * chunk, min(size, (i + 1) * chunk))``.
    """

    path: str
    size: int
    chunk: int
    schema: str = "edgeml.dist/1"

    KIND: ClassVar[str] = "dist"
    SCHEMA: ClassVar[str] = "edgeml.dist/1"
    TYPES: ClassVar[_FieldTypes] = {"path": (str,), "size": (int,), "chunk": (int,)}

    @property
    def count(self) -> int:
        """How many chunks the file has."""
        return -(-self.size // self.chunk)

    def _validate(self) -> None:
        if not self.path.startswith("targets/") or ".." in self.path.split("/"):
            raise ProtocolError(f"dist: 'path' must be targets/<file>, got {self.path!r}")
        if self.size < 0 or not 0 < self.chunk <= MAX_DIST_CHUNK:
            raise ProtocolError(f"dist: need size >= 0 and 0 < chunk <= {MAX_DIST_CHUNK}, "
                                f"got size={self.size} chunk={self.chunk}")


Message = Command | Request | Reply | Telemetry | State | DistInfo
_CLASSES: dict[str, type[_Message]] = {c.KIND: c for c in (Command, Request, Reply, Telemetry, State, DistInfo)}


def _check_size(kind: str, data: bytes) -> None:
    if len(data) > MAX_BYTES[kind]:
        raise ProtocolError(f"{kind}: payload of {len(data)} bytes exceeds the limit of {MAX_BYTES[kind]}")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one decoder: json.loads builds one per call


def _decode(kind: str, payload: bytes) -> dict[str, Any]:
    try:
        obj = _DECODER.decode(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{kind}: payload is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"{kind}: payload must be a JSON object, got {type(obj).__name__}")
    return obj


def parse(kind: Kind | str, payload: bytes) -> Message:
    """Decode and validate one message of ``kind`` (``"command"``, ``"request"``, ``"reply"``, ...).

    Args:
        kind: The message kind, which the topic determines.
        payload: The raw MQTT payload.

    Raises:
        ProtocolError: Unknown kind, payload too large, not JSON, unknown schema version, missing or
            unknown fields, or fields of the wrong type or value.
    """
    cls = _CLASSES.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r} (expected one of {sorted(_CLASSES)})")
    if not isinstance(payload, (bytes, bytearray)):
        raise ProtocolError(f"{kind}: payload must be bytes, got {type(payload).__name__}")
    _check_size(kind, bytes(payload))
    obj = _decode(kind, bytes(payload))
    if obj.get("schema") != cls.SCHEMA:
        raise ProtocolError(f"{kind}: unsupported schema {obj.get('schema')!r}",
                            hint=f"this edgeml speaks {cls.SCHEMA}; upgrade the older side")
    unknown = sorted(obj.keys() - _field_names(cls))
    if unknown:
        raise ProtocolError(f"{kind}: unknown fields {unknown}")
    try:
        message: Message = cls(**obj)  # type: ignore[assignment]
    except TypeError as exc:  # missing required fields
        raise ProtocolError(f"{kind}: {exc}") from exc
    return message


# --- broker ACL ---------------------------------------------------------------------------------------------


def acl_for_device(device_id: str) -> list[tuple[str, str]]:
    """The broker permissions of one device as ``(access, topic pattern)`` pairs (access: read or write).

    Raises:
        ProtocolError: The device id is invalid.
    """
    rules = [("write", device_topic(device_id, ch)) for ch in DEVICE_CHANNELS_OUT]
    rules += [("read", device_topic(device_id, ch)) for ch in DEVICE_CHANNELS_IN]
    rules.append(("read", f"{PREFIX}dist/#"))
    return rules


def mosquitto_acl(devices: list[str] | tuple[str, ...], fleet_user: str = "fleet") -> str:
    """A Mosquitto ``acl_file``: the fleet user may do anything under ``edgeml/v1/#``, devices what
    :func:`acl_for_device` allows.

    Args:
        devices: Device ids, which are also their broker user names.
        fleet_user: The fleet server's broker user name.

    Raises:
        ProtocolError: A device id is invalid or duplicated, or equals ``fleet_user``.
    """
    validate_device_id(fleet_user)
    if fleet_user in devices or len(set(devices)) != len(devices):
        raise ProtocolError("device ids must be unique and differ from the fleet user name "
                            f"{fleet_user!r}: {list(devices)}")
    lines = ["# edgeml broker ACL (generated by edgeml.protocol.mosquitto_acl); anonymous: no access", "",
             f"user {fleet_user}", f"topic readwrite {PREFIX}#"]
    for device_id in devices:
        lines += ["", f"user {device_id}"]
        lines += [f"topic {access} {pattern}" for access, pattern in acl_for_device(device_id)]
    return "\n".join(lines) + "\n"
