"""Bounded JSON for every message that crosses the device/fleet boundary, and the messages' shared base.

What a device sends is untrusted: this module turns its bytes into plain Python values only when they are
within bounds, and raises :class:`ProtocolError` (never another exception) otherwise:

* size: the payload is checked against its kind's limit (:data:`MAX_BYTES`) before anything decodes it;
* JSON: UTF-8, one object, no ``NaN``/``Infinity`` literals, no duplicate-free guarantees beyond Python's
  (the last value of a repeated key wins, as in every JSON parser the fleet uses);
* depth: containers nest at most :data:`MAX_DEPTH` levels;
* numbers: integers within a signed 64-bit range (a database column or a float conversion downstream
  cannot overflow), floats finite (``1e999`` decodes to infinity in Python: refused);
* strings: no NUL and no unpaired surrogates (PostgreSQL's ``jsonb`` rejects both, which would make a
  stored row poison a whole batch).

The exact check walks every value. Most payloads cannot break any rule, and that is decided from their
bytes at C speed (:func:`_needs_walk`): no ``\\u`` escape (the only way to write NUL or a surrogate in
valid UTF-8 JSON), no run of 19 digits (every shorter integer is within 64 bits), no exponent of three
digits (every float with a shorter one is finite), and fewer opening brackets than :data:`MAX_DEPTH`.
Only payloads that fail that test are walked; ``tests/core/test_protocol_bounds.py`` checks that the two
agree on generated JSON.

:class:`Message` is the base of the frozen dataclasses in :mod:`.messages` and :mod:`.events`: each
declares its JSON types per field and checks its own patterns and ranges in ``_validate``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any, ClassVar

from edgeml.errors import EdgeMLError

__all__ = ["INT64_MAX", "MAX_BYTES", "MAX_DEPTH", "FieldTypes", "Message", "ProtocolError", "check_json",
           "decode_object", "nests_deeper"]

_KiB = 1024
#: Largest accepted payload per kind, in bytes (checked before decoding).
MAX_BYTES: dict[str, int] = {
    "command": 16 * _KiB,
    "request": 16 * _KiB,
    "reply": 64 * _KiB,
    "telemetry": 64 * _KiB,
    "state": 16 * _KiB,
    "event": 16 * _KiB,
    "dist": 4 * _KiB,
    "upload": 4 * _KiB,  # the JSON header of an upload frame (its chunk's raw bytes: uploads.MAX_CHUNK)
}
#: Deepest nesting of JSON containers in any message (the message object itself is level 1).
MAX_DEPTH = 10
INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)
# Anything that might break a rule below: a \u escape, 19 digits in a row, a 3-digit exponent.
# The same three tests without a regular expression (whose alternation cost ~14 µs on a 400-byte telemetry
# message, a third of the ingest worker's check): digits become "0", exponent letters "e", signs "+", so that
# a run of 19 digits or a 3-digit exponent is a plain substring of the translated bytes.
_FOLD = bytes.maketrans(b"0123456789eE-", b"0000000000ee+")
_RUN, _EXP, _SIGNED_EXP = b"0" * 19, b"e000", b"e+000"
_SURROGATE = re.compile("[\ud800-\udfff]")


class ProtocolError(EdgeMLError):
    """A topic or an MQTT message does not follow the edgeml protocol (malformed, too large, unknown version)."""


def check_size(kind: str, data: bytes | bytearray) -> None:
    """Raise :class:`ProtocolError` when ``data`` is over the limit of ``kind`` (:data:`MAX_BYTES`)."""
    if len(data) > MAX_BYTES[kind]:
        raise ProtocolError(f"{kind}: payload of {len(data)} bytes exceeds the limit of {MAX_BYTES[kind]}")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one decoder: json.loads builds one per call
_FAST: Any = None  # msgspec's decoder, made on first use (importing msgspec costs the CLI's start-up ~7 ms)
_FAST_ERRORS: tuple[type[Exception], ...] = ()


def _fast() -> Any:
    """msgspec's JSON decoder (it reads a telemetry message in a quarter of the time; the fleet extra installs it),
    or False where msgspec is not installed (a device's install: the standard library only)."""
    global _FAST, _FAST_ERRORS
    if _FAST is None:
        try:
            import msgspec
        except ImportError:
            _FAST = False
        else:
            _FAST_ERRORS = (msgspec.MsgspecError,)  # first: a thread that sees the decoder catches its errors
            _FAST = msgspec.json.Decoder()
    return _FAST


def _decode(data: bytes) -> object:
    """``data`` as JSON: msgspec when installed, and the standard library on anything msgspec refuses, so that
    what is accepted and how every error reads are the standard library's. msgspec gives the same values for
    every document it accepts; it refuses a few more (numbers that overflow to infinity, escaped unpaired
    surrogates), which the standard library decodes and the bounds then refuse
    (``tests/core/test_protocol_bounds.py``)."""
    fast = _FAST if _FAST is not None else _fast()
    if fast:
        try:
            return fast.decode(data)
        except _FAST_ERRORS:
            pass
    return _DECODER.decode(data.decode("utf-8"))


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def nests_deeper(data: bytes, limit: int) -> bool:
    """True when the JSON text ``data`` opens more than ``limit`` arrays or objects inside each other.

    Decided on the bytes, before any parser sees them: Python's C decoder recurses once per level and guards
    itself only with the interpreter's recursion limit, which a library may raise far above what the thread's
    stack holds (a deeply nested document then crashes the process instead of raising RecursionError).
    Brackets inside strings do not count; malformed text may count as deeper than it is (it fails to parse
    anyway).
    """
    if data.count(b"{") + data.count(b"[") <= limit:
        return False
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    level = 0
    for byte in brackets:
        if byte in b"[{":
            level += 1
            if level > limit:
                return True
        else:
            level -= 1
    return False


def _needs_walk(payload: bytes) -> bool:
    """False when no value in ``payload`` can break a bound (see the module docstring); True: check them."""
    if b"\\u" in payload or payload.count(b"{") + payload.count(b"[") > MAX_DEPTH:
        return True
    folded = payload.translate(_FOLD)
    return _RUN in folded or _EXP in folded or _SIGNED_EXP in folded


def check_json(value: object, *, what: str = "value", depth: int = MAX_DEPTH) -> None:
    """Check a decoded JSON value against the bounds (depth, 64-bit integers, finite floats, clean strings).

    Raises:
        ProtocolError: Naming the first value out of bounds.
    """
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            _check_scalar(item, what)
            continue
        if level > depth:
            raise ProtocolError(f"{what}: JSON nested deeper than {depth} levels")
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, level + 1))
            else:
                _check_scalar(child, what)


def _check_scalar(value: object, what: str) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if not _INT64_MIN <= value <= INT64_MAX:
            raise ProtocolError(f"{what}: integer {str(value)[:24]}... is outside the 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(f"{what}: numbers must be finite, got {value}")
    elif isinstance(value, str) and ("\0" in value or _SURROGATE.search(value)):
        raise ProtocolError(f"{what}: strings must not contain NUL or unpaired surrogates")


def decode_object(kind: str, payload: bytes | bytearray) -> dict[str, Any]:
    """Size-check, decode and bound-check one message of ``kind``: a JSON object within every bound.

    Raises:
        ProtocolError: Too large, not UTF-8 JSON, not an object, or a value out of bounds.
    """
    if not isinstance(payload, (bytes, bytearray)):
        raise ProtocolError(f"{kind}: payload must be bytes, got {type(payload).__name__}")
    check_size(kind, payload)
    data = bytes(payload)
    if nests_deeper(data, MAX_DEPTH):
        raise ProtocolError(f"{kind}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        obj = _decode(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{kind}: payload is not valid UTF-8 JSON: {str(exc)[:200]}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"{kind}: payload must be a JSON object, got {type(obj).__name__}")
    if _needs_walk(data):
        check_json(obj, what=kind)
    return obj


# --- the messages' base -------------------------------------------------------------------------------------

FieldTypes = dict[str, tuple[type, ...]]  # field name -> accepted JSON types
_FIELD_NAMES: dict[type, frozenset[str]] = {}


def field_names(cls: type) -> frozenset[str]:
    """The dataclass field names of a message class (looked up once: every message received is checked)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        import dataclasses

        names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    return names


def check_type(kind: str, name: str, value: object, types: tuple[type, ...]) -> None:
    """Raise :class:`ProtocolError` unless ``value`` is one of ``types`` (a bool is not an int; floats finite)."""
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ProtocolError(f"{kind}: field {name!r} must be {wanted}, got {type(value).__name__}")


def check_pattern(kind: str, name: str, value: str | None, pattern: re.Pattern[str], hint: str) -> None:
    """Raise :class:`ProtocolError` unless ``value`` (when not None) matches ``pattern`` in full."""
    if value is not None and pattern.fullmatch(value) is None:
        raise ProtocolError(f"{kind}: field {name!r} must be {hint}, got {value[:80]!r}")


def check_range(kind: str, name: str, value: float, low: float, high: float) -> None:
    """Raise :class:`ProtocolError` unless ``low <= value <= high``."""
    if not low <= value <= high:
        raise ProtocolError(f"{kind}: field {name!r} must be within [{low:g}, {high:g}], got {value:g}")


_CHECKS: dict[type, tuple[tuple[str, tuple[type, ...]], ...]] = {}  # message class -> (field, types), no schema


class Message:
    """Shared encoding and checks of the message dataclasses (each sets KIND, SCHEMA and TYPES)."""

    KIND: ClassVar[str]
    SCHEMA: ClassVar[str]
    TYPES: ClassVar[FieldTypes]
    schema: str  # a dataclass field in every subclass

    def __post_init__(self) -> None:
        checks = _CHECKS.get(type(self))
        if checks is None:
            declared = self.TYPES
            checks = _CHECKS[type(self)] = tuple((n, declared[n]) for n in field_names(type(self)) if n != "schema")
        for name, allowed in checks:
            value = getattr(self, name)
            if type(value) not in allowed or type(value) is float:  # exact hits pass here; bool only where listed
                check_type(self.KIND, name, value, allowed)  # subclasses, floats (finite?) and every error
        if self.schema != self.SCHEMA:
            raise ProtocolError(f"{self.KIND}: unsupported schema {self.schema!r}",
                                hint=f"this edgeml speaks {self.SCHEMA}; upgrade the older side")
        self._validate()

    def _validate(self) -> None:
        """Checks beyond types (overridden per kind)."""

    def to_dict(self) -> dict[str, Any]:
        """The message's fields as JSON values (not copied)."""
        return {name: getattr(self, name) for name in field_names(type(self))}

    def to_bytes(self) -> bytes:
        """The message as compact UTF-8 JSON.

        Raises:
            ProtocolError: It is larger than the kind's limit or holds values JSON cannot carry.
        """
        try:
            data = json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"{self.KIND}: cannot encode as JSON: {exc}") from exc
        check_size(self.KIND, data)
        return data
