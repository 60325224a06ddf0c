"""What a device reports on its ``events`` topic: one typed, bounded message per event type.

Every event is ``{"schema": "edgeml.event/1", "type", "device_id", "at", ...}`` with the fields of its type:

=============== ====================================================================================
``update``      :class:`UpdateEvent`: progress and result of an update (``state``), and for a result that
                is not a commit its :class:`Cause` (the rollout rules read the cause, never ``reason``)
``drift``       :class:`DriftEvent`: a drift alert for one model version (its window's numbers)
``rejected``    :class:`RejectedEvent`: the device refused a command (how many more it did not report)
``pong``        :class:`PongEvent`: the answer to ``ping``
``rollback``    :class:`RollbackEvent`: whether a ``rollback`` command was accepted
``capture``     :class:`CaptureEvent`: how many low-confidence samples the device keeps
=============== ====================================================================================

The fleet parses them with :func:`edgeml.protocol.parse` (``"event"``); the agent builds them with the
classes here, so a field that one side renames breaks the round-trip test, not a rollout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from edgeml.protocol.codec import INT64_MAX, FieldTypes, Message, ProtocolError, check_pattern, check_range
from edgeml.protocol.topics import validate_device_id

__all__ = [
    "EVENT_TYPES",
    "STEP_EVENTS",
    "TRANSFER_KINDS",
    "UPDATE_STATES",
    "CaptureEvent",
    "Cause",
    "DeviceEvent",
    "DriftEvent",
    "PongEvent",
    "RejectedEvent",
    "RollbackEvent",
    "UpdateEvent",
    "check_transfer",
]

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,63}")
_MAX_REASON = 1000  # characters of a human-readable reason
_NONE = type(None)


class Cause(str, Enum):
    """Why an update ended other than committed, in words a rule can read. The value is what travels."""

    GOLDEN = "golden"  # smoke test: the outputs differ from the bundle's golden vectors
    LOAD = "load"  # the model does not load or run on the device (smoke test, or at the switch)
    LATENCY = "latency"  # probation: p99 latency past the device's limit
    ERROR_RATE = "error_rate"  # probation: too many failed requests
    CONFIDENCE = "confidence"  # probation: mean top-1 confidence fell too far
    DRIFT = "drift"  # probation: the inputs drifted past the limit
    OUTPUT_SHIFT = "output_shift"  # probation: the outputs moved away from the reference (any model type)
    CRASH = "crash"  # probation: the agent died too often
    LOOP = "loop"  # the loop guard: a state was entered too many times
    DOWNLOAD = "download"  # the bundle could not be fetched
    VERIFICATION = "verification"  # the bundle failed its signed hash, its manifest or its member hashes
    STAGING = "staging"  # the bundle could not be unpacked into the slot
    ALREADY_SERVING = "already_serving"  # the device already serves that version
    FLEET = "fleet"  # the fleet asked for the rollback
    INCOMPATIBLE = "incompatible"  # the device cannot run the bundle's runtime
    CLOCK = "clock"  # the device clock is not synchronised (deferred)
    BUSY = "busy"  # another update is in progress
    INTERNAL = "internal"  # anything else (a bug on the device)


_CAUSES = frozenset(c.value for c in Cause)
#: The update lifecycle's states (edge_agent/update/states.py) plus the answers given before it starts.
UPDATE_STATES = frozenset({
    "notified", "patch", "download", "verify", "stage", "smoke_test", "switch", "probation", "commit", "rollback",
    "abort", "committed", "rolled_back", "failed", "incompatible", "deferred", "busy",
})
#: What moved an update into its state: a step's outcome (ok, fail, loop), or the machine starting, resuming
#: after a restart, or repeating how a resent command ended.
STEP_EVENTS = frozenset({"ok", "fail", "loop", "delta", "start", "resume", "repeat"})


def _types(**extra: tuple[type, ...]) -> FieldTypes:
    return {"device_id": (str,), "at": (int, float), "type": (str,), **extra}


@dataclass(frozen=True, kw_only=True)
class DeviceEvent(Message):
    """The fields every event has.

    Attributes:
        device_id: The device (consumers check it equals the topic's).
        at: When it happened, in Unix seconds (device clock).
        type: The event type (:data:`EVENT_TYPES`).
    """

    device_id: str
    at: float
    type: str = ""
    schema: str = "edgeml.event/1"

    KIND: ClassVar[str] = "event"
    SCHEMA: ClassVar[str] = "edgeml.event/1"
    TYPE: ClassVar[str] = ""

    def _validate(self) -> None:
        validate_device_id(self.device_id)
        check_range("event", "at", self.at, 0.0, 1e11)
        if self.type != self.TYPE:
            raise ProtocolError(f"event: type {self.type[:40]!r} is not {self.TYPE!r}")
        self._check()

    def _check(self) -> None:
        """Checks of the type's own fields (overridden)."""


@dataclass(frozen=True, kw_only=True)
class UpdateEvent(DeviceEvent):
    """Progress and result of one update on the device.

    Attributes:
        id: The command id of the update (None for an update the device resumed on its own).
        rollout: The rollout it belongs to, if any.
        model: The model name.
        version: The version being installed.
        target: The bundle's compile target.
        state: Where the update is (:data:`UPDATE_STATES`).
        event: What led there (:data:`STEP_EVENTS`), for lifecycle transitions.
        reason: Why, in words, for people (at most 1,000 characters).
        cause: Why, as a :class:`Cause` value, for rules: set on every failure, rollback and refusal.
        transfer: How the bundle came, once it did: ``kind`` (``delta`` or ``full``), ``bytes`` fetched,
            ``full_bytes`` (the full bundle's size), and ``fallback`` (why a delta offered was not used).
    """

    id: str | None = None
    rollout: str | None = None
    model: str
    version: str
    target: str
    state: str
    event: str | None = None
    reason: str | None = None
    cause: str | None = None
    transfer: dict[str, Any] | None = None
    type: str = "update"

    TYPE: ClassVar[str] = "update"
    TYPES: ClassVar[FieldTypes] = _types(
        id=(str, _NONE), rollout=(str, _NONE), model=(str,), version=(str,), target=(str,),
        state=(str,), event=(str, _NONE), reason=(str, _NONE), cause=(str, _NONE), transfer=(dict, _NONE))

    def _check(self) -> None:
        check_pattern("event", "id", self.id, _TOKEN, "a command id")
        if self.rollout is not None:
            validate_device_id(self.rollout)
        check_pattern("event", "model", self.model, _NAME, "a model name")
        check_pattern("event", "version", self.version, _VERSION, "a version")
        check_pattern("event", "target", self.target, _NAME, "a target name")
        if self.state not in UPDATE_STATES:
            raise ProtocolError(f"event: unknown update state {self.state[:40]!r}")
        if self.event is not None and self.event not in STEP_EVENTS:
            raise ProtocolError(f"event: unknown step event {self.event[:40]!r}")
        if self.reason is not None and len(self.reason) > _MAX_REASON:
            raise ProtocolError(f"event: 'reason' is longer than {_MAX_REASON} characters")
        if self.cause is not None and self.cause not in _CAUSES:
            raise ProtocolError(f"event: unknown cause {self.cause[:40]!r} (expected one of {sorted(_CAUSES)})")
        if self.transfer is not None:
            check_transfer(self.transfer)


#: The kinds of :attr:`UpdateEvent.transfer`: a delta rebuilt on the device, or the full bundle.
TRANSFER_KINDS = frozenset({"delta", "full"})


def check_transfer(transfer: dict[str, Any]) -> None:
    """Check an update event's ``transfer`` (:class:`UpdateEvent`).

    Raises:
        ProtocolError: An unknown key, a kind other than delta/full, a byte count that is not an integer
            from 0 to 2^63-1, or a fallback reason that is not text of at most 1,000 characters.
    """
    unknown = sorted(set(transfer) - {"kind", "bytes", "full_bytes", "fallback"})
    if unknown:
        raise ProtocolError(f"event: unknown transfer fields {unknown[:8]}")
    if transfer.get("kind") not in TRANSFER_KINDS:
        raise ProtocolError(f"event: transfer kind must be one of {sorted(TRANSFER_KINDS)}")
    for name in ("bytes", "full_bytes"):
        value = transfer.get(name)
        if value is not None and (type(value) is not int or not 0 <= value <= INT64_MAX):
            raise ProtocolError(f"event: transfer {name} must be an integer >= 0")
    fallback = transfer.get("fallback")
    if fallback is not None and (not isinstance(fallback, str) or len(fallback) > _MAX_REASON):
        raise ProtocolError(f"event: transfer fallback must be text of at most {_MAX_REASON} characters")


@dataclass(frozen=True, kw_only=True)
class DriftEvent(DeviceEvent):
    """A drift alert: the first flagged window of a model version after an unflagged one.

    Attributes:
        version: The model version whose inputs drifted.
        window: The window's numbers (``score`` among them: a finite number or null).
    """

    version: str
    window: dict[str, Any] = field(default_factory=dict)
    type: str = "drift"

    TYPE: ClassVar[str] = "drift"
    TYPES: ClassVar[FieldTypes] = _types(version=(str,), window=(dict,))

    def _check(self) -> None:
        check_pattern("event", "version", self.version, _VERSION, "a version")
        score = self.window.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise ProtocolError("event: the drift window's 'score' must be a number or null")

    @property
    def score(self) -> float | None:
        """The window's drift score, when it has one."""
        score = self.window.get("score")
        return None if score is None else float(score)


@dataclass(frozen=True, kw_only=True)
class RejectedEvent(DeviceEvent):
    """The device refused a command as malformed (at most one such event a second).

    Attributes:
        reason: Why (at most 1,000 characters).
        suppressed: Refusals since the previous report that were not reported one by one.
    """

    reason: str
    suppressed: int = 0
    type: str = "rejected"

    TYPE: ClassVar[str] = "rejected"
    TYPES: ClassVar[FieldTypes] = _types(reason=(str,), suppressed=(int,))

    def _check(self) -> None:
        if len(self.reason) > _MAX_REASON:
            raise ProtocolError(f"event: 'reason' is longer than {_MAX_REASON} characters")
        check_range("event", "suppressed", self.suppressed, 0, 2**31)


@dataclass(frozen=True, kw_only=True)
class PongEvent(DeviceEvent):
    """The answer to a ``ping`` command (``id``: the command's)."""

    id: str
    type: str = "pong"

    TYPE: ClassVar[str] = "pong"
    TYPES: ClassVar[FieldTypes] = _types(id=(str,))

    def _check(self) -> None:
        check_pattern("event", "id", self.id, _TOKEN, "a command id")


@dataclass(frozen=True, kw_only=True)
class RollbackEvent(DeviceEvent):
    """The answer to a ``rollback`` command: ``accepted`` when an update was on probation (or about to be)."""

    id: str
    accepted: bool
    type: str = "rollback"

    TYPE: ClassVar[str] = "rollback"
    TYPES: ClassVar[FieldTypes] = _types(id=(str,), accepted=(bool,))

    def _check(self) -> None:
        check_pattern("event", "id", self.id, _TOKEN, "a command id")


@dataclass(frozen=True, kw_only=True)
class CaptureEvent(DeviceEvent):
    """The answer to a ``capture`` command: how many low-confidence samples the device keeps, in how many bytes."""

    id: str
    entries: int
    bytes: int
    type: str = "capture"

    TYPE: ClassVar[str] = "capture"
    TYPES: ClassVar[FieldTypes] = _types(id=(str,), entries=(int,), bytes=(int,))

    def _check(self) -> None:
        check_pattern("event", "id", self.id, _TOKEN, "a command id")
        check_range("event", "entries", self.entries, 0, 2**31)
        check_range("event", "bytes", self.bytes, 0, 2**62)


#: Event type -> its class.
EVENT_TYPES: dict[str, type[DeviceEvent]] = {
    c.TYPE: c for c in (UpdateEvent, DriftEvent, RejectedEvent, PongEvent, RollbackEvent, CaptureEvent)
}
