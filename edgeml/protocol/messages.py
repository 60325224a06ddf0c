"""The messages between devices and the fleet, typed and bounded, and :func:`parse` for all of them.

Each message is a frozen dataclass: :meth:`~edgeml.protocol.codec.Message.to_bytes` encodes it,
:func:`parse` decodes one of a kind (size first, then the bounded JSON of :mod:`.codec`, then the schema
version, unknown and missing fields, types, patterns and ranges). Device events live in :mod:`.events`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from edgeml.protocol.codec import (
    INT64_MAX,
    FieldTypes,
    Message,
    ProtocolError,
    check_pattern,
    check_range,
    decode_object,
    field_names,
)
from edgeml.protocol.events import EVENT_TYPES
from edgeml.protocol.topics import is_reply_topic, validate_device_id
from edgeml.protocol.uploads import MAX_SAMPLES, UPLOAD_TYPES

__all__ = [
    "COMMAND_TYPES",
    "CaptureArgs",
    "MAX_DIST_CHUNK",
    "MAX_REPLY_DATA",
    "Command",
    "DistInfo",
    "Kind",
    "Reply",
    "Request",
    "State",
    "Telemetry",
    "UpdateArgs",
    "parse",
]

COMMAND_TYPES = frozenset({"update", "rollback", "capture", "ping", "telemetry-ack", "upload-ack"})
_KiB = 1024
#: Most file bytes one get Reply carries: their base64 plus the JSON envelope fit MAX_BYTES["reply"].
MAX_REPLY_DATA = (64 * _KiB - _KiB) // 4 * 3 // _KiB * _KiB  # 47 KiB
#: Largest chunk of a broadcast file (raw bytes in one retained message).
MAX_DIST_CHUNK = 1024 * _KiB
Kind = Literal["command", "request", "reply", "telemetry", "state", "event", "dist", "upload"]

#: Ids chosen by either side (command ids, correlation ids): short tokens, no spaces or wildcards.
TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
#: Model and target names (as in bundle manifests).
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: Versions: the characters of a semantic version, bounded (the agent checks the full grammar).
VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,63}")
_WORD = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_THRESHOLD = re.compile(r"[a-z][a-z0-9_]{0,47}")
_METRIC = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_MAX_CAPABILITIES = 64  # top-level keys a state's capabilities may have
_MAX_METRICS = 256  # top-level keys of one telemetry's metrics


def _check_keys(kind: str, name: str, value: dict[str, Any], pattern: re.Pattern[str], limit: int) -> None:
    if len(value) > limit:
        raise ProtocolError(f"{kind}: field {name!r} has {len(value)} keys, more than {limit}")
    for key in value:
        check_pattern(kind, f"{name}.{key[:40]}", key, pattern, f"a key matching {pattern.pattern}")


@dataclass(frozen=True)
class Command(Message):
    """A command from the fleet to one device (topic ``.../commands``).

    Attributes:
        id: Unique command id, echoed in the device's events (:data:`TOKEN`).
        type: One of :data:`COMMAND_TYPES`.
        args: Arguments of the command (JSON object; an update's are :class:`UpdateArgs`).
        issued_at: When the fleet issued it, in Unix seconds.
    """

    id: str
    type: str
    args: dict[str, Any] = field(default_factory=dict)
    issued_at: float = 0.0
    schema: str = "edgeml.command/1"

    KIND: ClassVar[str] = "command"
    SCHEMA: ClassVar[str] = "edgeml.command/1"
    TYPES: ClassVar[FieldTypes] = {"id": (str,), "type": (str,), "args": (dict,),
                                                     "issued_at": (int, float)}

    def _validate(self) -> None:
        if not self.id:
            raise ProtocolError("command: 'id' must not be empty")
        check_pattern("command", "id", self.id, TOKEN, "a token of up to 64 letters, digits, '.', ':', '_', '-'")
        if self.type not in COMMAND_TYPES:
            raise ProtocolError(f"command: unknown type {self.type[:40]!r} (expected one of {sorted(COMMAND_TYPES)})")


@dataclass(frozen=True)
class UpdateArgs:
    """The arguments of an ``update`` command, checked once where the device receives it.

    Attributes:
        model: The model name.
        version: The version to install.
        target: The compile target of the bundle.
        rollout: The rollout it belongs to (None: a direct update).
        thresholds: Health limits for probation (name -> number; the agent checks names and meanings).
        runtime: What the bundle needs of the device (the registry's signed custom field, as a hint).
        broadcast: ``{"rollout", "path"}`` when the bundle is broadcast (a hint: the fetch falls back to get).
        delta_from: The version a published delta rebuilds this bundle from, offered because the device
            reported it serves that version (a hint: the device checks its slot and falls back to the bundle).
    """

    model: str
    version: str
    target: str
    rollout: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    runtime: dict[str, Any] | None = None
    broadcast: dict[str, str] | None = None
    delta_from: str | None = None

    @classmethod
    def from_command(cls, command: Command) -> UpdateArgs:
        """The checked arguments of an update command.

        Raises:
            ProtocolError: A field is missing, unknown, of the wrong type or out of its pattern.
        """
        args = command.args
        unknown = sorted(set(args) - set(field_names(cls)))
        if unknown:
            raise ProtocolError(f"update: unknown arguments {unknown[:8]}")
        try:
            model, version, target = args["model"], args["version"], args["target"]
        except KeyError as exc:
            raise ProtocolError(f"update: argument {exc} is required") from exc
        for name, value, pattern in (("model", model, NAME), ("version", version, VERSION),
                                     ("target", target, NAME)):
            if not isinstance(value, str):
                raise ProtocolError(f"update: {name!r} must be a string")
            check_pattern("update", name, value, pattern, f"matching {pattern.pattern}")
        rollout = args.get("rollout")
        if rollout is not None:
            if not isinstance(rollout, str):
                raise ProtocolError("update: 'rollout' must be a string")
            validate_device_id(rollout)  # rollout ids share the device id alphabet
        thresholds = args.get("thresholds") or {}
        if not isinstance(thresholds, dict):
            raise ProtocolError("update: 'thresholds' must be an object")
        _check_keys("update", "thresholds", thresholds, _THRESHOLD, 32)
        for key, value in thresholds.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProtocolError(f"update: threshold {key!r} must be a number")
        runtime, broadcast = args.get("runtime"), args.get("broadcast")
        if runtime is not None and not isinstance(runtime, dict):
            raise ProtocolError("update: 'runtime' must be an object")
        if broadcast is not None:
            if not (isinstance(broadcast, dict) and set(broadcast) == {"rollout", "path"}
                    and all(isinstance(v, str) for v in broadcast.values())):
                raise ProtocolError("update: 'broadcast' must be {\"rollout\": str, \"path\": str}")
            validate_device_id(broadcast["rollout"])
        delta_from = args.get("delta_from")
        if delta_from is not None:
            if not isinstance(delta_from, str):
                raise ProtocolError("update: 'delta_from' must be a string")
            check_pattern("update", "delta_from", delta_from, VERSION, f"matching {VERSION.pattern}")
        return cls(model, version, target, rollout, dict(thresholds), runtime, broadcast, delta_from)

    def to_dict(self) -> dict[str, Any]:
        """The arguments as a command carries them (None values left out)."""
        out: dict[str, Any] = {"model": self.model, "version": self.version, "target": self.target,
                               "thresholds": self.thresholds}
        for name in ("rollout", "runtime", "broadcast", "delta_from"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class Request(Message):
    """A request from a device to the fleet (``.../requests``); the answer is a :class:`Reply` on ``reply_to``.

    Attributes:
        correlation_id: Chosen by the device (:data:`TOKEN`); the reply carries it back.
        reply_to: The device's own ``replies`` topic (consumers check it names the sending device).
        method: What is asked, e.g. ``"get"``.
        params: Parameters of the method (JSON object).
    """

    correlation_id: str
    reply_to: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    schema: str = "edgeml.request/1"

    KIND: ClassVar[str] = "request"
    SCHEMA: ClassVar[str] = "edgeml.request/1"
    TYPES: ClassVar[FieldTypes] = {"correlation_id": (str,), "reply_to": (str,),
                                                     "method": (str,), "params": (dict,)}

    def _validate(self) -> None:
        if not self.correlation_id or not self.method:
            raise ProtocolError("request: 'correlation_id' and 'method' must not be empty")
        check_pattern("request", "correlation_id", self.correlation_id, TOKEN, "a token of up to 64 characters")
        check_pattern("request", "method", self.method, _WORD, "a lowercase word")
        if not is_reply_topic(self.reply_to):
            raise ProtocolError(f"request: 'reply_to' must be a device replies topic, got {self.reply_to[:120]!r}")


@dataclass(frozen=True)
class Reply(Message):
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
    TYPES: ClassVar[FieldTypes] = {
        "correlation_id": (str,), "ok": (bool,), "error": (str, type(None)),
        "result": (dict, list, str, int, float, bool, type(None)),
    }

    def _validate(self) -> None:
        if not self.correlation_id:
            raise ProtocolError("reply: 'correlation_id' must not be empty")
        if self.ok == (self.error is not None):
            raise ProtocolError("reply: 'error' is required when ok is false and forbidden when ok is true")


@dataclass(frozen=True)
class Telemetry(Message):
    """Periodic metrics from a device (``.../telemetry``).

    Attributes:
        device_id: The sending device.
        seq: Sequence number (0 to 2^63 - 1), increasing per device, to detect loss and duplicates.
        sent_at: When it was sent, in Unix seconds (device clock).
        metrics: Metric name -> JSON value (numbers, strings, or small nested objects such as ``drift``),
            at most 256 names.
    """

    device_id: str
    seq: int
    sent_at: float
    metrics: dict[str, Any] = field(default_factory=dict)
    schema: str = "edgeml.telemetry/1"

    KIND: ClassVar[str] = "telemetry"
    SCHEMA: ClassVar[str] = "edgeml.telemetry/1"
    TYPES: ClassVar[FieldTypes] = {"device_id": (str,), "seq": (int,), "sent_at": (int, float),
                                                     "metrics": (dict,)}

    def _validate(self) -> None:
        validate_device_id(self.device_id)
        if not 0 <= self.seq <= INT64_MAX:
            raise ProtocolError(f"telemetry: 'seq' must be within [0, 2^63 - 1], got {str(self.seq)[:24]}")
        check_range("telemetry", "sent_at", self.sent_at, 0.0, 1e11)
        if len(self.metrics) > _MAX_METRICS:
            raise ProtocolError(f"telemetry: more than {_MAX_METRICS} metrics")


@dataclass(frozen=True)
class State(Message):
    """A device's current state (``.../state``, retained).

    Attributes:
        device_id: The device.
        status: What it is doing, e.g. ``"running"``, ``"updating"``, ``"error"`` (a lowercase word).
        model: Name of the active model, if any.
        version: Version of the active model, if any.
        slot: Active A/B slot (``"a"`` or ``"b"``), if any.
        capabilities: What the device can run (runtimes, accelerators, memory): at most 64 keys.
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
    TYPES: ClassVar[FieldTypes] = {
        "device_id": (str,), "status": (str,), "model": (str, type(None)), "version": (str, type(None)),
        "slot": (str, type(None)), "capabilities": (dict,), "clock_synced": (bool,),
    }

    def _validate(self) -> None:
        validate_device_id(self.device_id)
        if not self.status:
            raise ProtocolError("state: 'status' must not be empty")
        check_pattern("state", "status", self.status, _WORD, "a lowercase word")
        check_pattern("state", "model", self.model, NAME, "a model name")
        check_pattern("state", "version", self.version, VERSION, "a version")
        if self.slot not in (None, "a", "b"):
            raise ProtocolError(f"state: 'slot' must be 'a', 'b' or null, got {self.slot[:8]!r}")
        _check_keys("state", "capabilities", self.capabilities, _METRIC, _MAX_CAPABILITIES)


@dataclass(frozen=True)
class DistInfo(Message):
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
    TYPES: ClassVar[FieldTypes] = {"path": (str,), "size": (int,), "chunk": (int,)}

    @property
    def count(self) -> int:
        """How many chunks the file has."""
        return -(-self.size // self.chunk)

    def _validate(self) -> None:
        if not self.path.startswith("targets/") or ".." in self.path.split("/"):
            raise ProtocolError(f"dist: 'path' must be targets/<file>, got {self.path[:120]!r}")
        if not 0 <= self.size <= INT64_MAX or not 0 < self.chunk <= MAX_DIST_CHUNK:
            raise ProtocolError(f"dist: need size >= 0 and 0 < chunk <= {MAX_DIST_CHUNK}, "
                                f"got size={self.size} chunk={self.chunk}")


_CLASSES: dict[str, type[Message]] = {c.KIND: c for c in (Command, Request, Reply, Telemetry, State, DistInfo)}


def parse(kind: Kind | str, payload: bytes | bytearray) -> Any:
    """Decode and check one message of ``kind`` (``"command"``, ``"request"``, ``"event"``, ...).

    An ``event`` is parsed into the class of its ``type`` (:mod:`.events`), an ``upload`` (the JSON header of
    an upload frame; :func:`~edgeml.protocol.uploads.decode_frame` reads whole frames) into
    :class:`~edgeml.protocol.uploads.UploadBegin` or :class:`~edgeml.protocol.uploads.UploadChunk`.

    Args:
        kind: The message kind, which the topic determines.
        payload: The raw MQTT payload.

    Returns:
        The message: a :class:`Command`, :class:`Request`, ... or a :class:`~.events.DeviceEvent` subclass.

    Raises:
        ProtocolError: Unknown kind, payload too large, not JSON, out of bounds, unknown schema version,
            missing or unknown fields, or fields of the wrong type or value.
    """
    if kind in ("event", "upload"):
        obj = decode_object(kind, payload)
        etype, types = obj.get("type"), EVENT_TYPES if kind == "event" else UPLOAD_TYPES
        cls: type[Message] | None = types.get(etype) if isinstance(etype, str) else None
        if cls is None:
            raise ProtocolError(f"{kind}: unknown type {str(obj.get('type'))[:40]!r} "
                                f"(expected one of {sorted(types)})")
    else:
        cls = _CLASSES.get(kind)
        if cls is None:
            raise ProtocolError(f"unknown message kind {str(kind)[:40]!r} (expected one of {[*_CLASSES, 'event']})")
        obj = decode_object(kind, payload)
    if obj.get("schema") != cls.SCHEMA:
        raise ProtocolError(f"{kind}: unsupported schema {str(obj.get('schema'))[:40]!r}",
                            hint=f"this edgeml speaks {cls.SCHEMA}; upgrade the older side")
    unknown = sorted(obj.keys() - field_names(cls))
    if unknown:
        raise ProtocolError(f"{kind}: unknown fields {[u[:40] for u in unknown[:8]]}")
    try:
        return cls(**obj)
    except TypeError as exc:  # missing required fields
        raise ProtocolError(f"{kind}: {exc}") from exc


_CAPTURE_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@dataclass(frozen=True)
class CaptureArgs:
    """The arguments of a ``capture`` command (all optional: without ``upload`` the device only reports counts).

    Attributes:
        upload: Upload the captured samples now.
        tag: A label the operator gives this collection (stored with every sample).
        max_samples: Most samples to upload for this command (the oldest first).
        bytes_per_s: Upload at most this fast (the device caps it with its own limit).
        drift: Turn uploads on (True) or off (False) when the device flags drift; None leaves it as it is.
    """

    upload: bool = False
    tag: str | None = None
    max_samples: int = MAX_SAMPLES
    bytes_per_s: int | None = None
    drift: bool | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> CaptureArgs:
        """The checked arguments of a ``capture`` command.

        Raises:
            ProtocolError: An argument is unknown, of the wrong type or out of range.
        """
        unknown = sorted(set(args) - set(field_names(cls)))
        if unknown:
            raise ProtocolError(f"capture: unknown arguments {unknown[:8]}")
        upload, tag, drift = args.get("upload", False), args.get("tag"), args.get("drift")
        max_samples, rate = args.get("max_samples", MAX_SAMPLES), args.get("bytes_per_s")
        if not isinstance(upload, bool) or not (drift is None or isinstance(drift, bool)):
            raise ProtocolError("capture: 'upload' and 'drift' must be booleans")
        if tag is not None and not isinstance(tag, str):
            raise ProtocolError("capture: 'tag' must be a string")
        check_pattern("capture", "tag", tag, _CAPTURE_TAG, "a tag (up to 64 letters, digits, '.', ':', '_', '-')")
        for name, value in (("max_samples", max_samples), ("bytes_per_s", rate)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ProtocolError(f"capture: {name!r} must be a positive integer")
        return cls(upload, tag, min(int(max_samples), MAX_SAMPLES), rate, drift)

    def to_args(self) -> dict[str, Any]:
        """The arguments as a command carries them (defaults left out)."""
        out: dict[str, Any] = {"upload": self.upload}
        for name in ("tag", "bytes_per_s", "drift"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.max_samples != MAX_SAMPLES:
            out["max_samples"] = self.max_samples
        return out
