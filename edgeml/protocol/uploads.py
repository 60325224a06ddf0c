"""Capture uploads: a device sends the samples it captured to the fleet, chunked, resumable, acknowledged.

A device packs the samples of one upload into a byte stream (:func:`pack_samples`), writes it and a small
session file to its disk, and sends it on its own ``uploads`` topic (``edgeml/v1/devices/{id}/uploads``)::

    UploadBegin   what follows: upload id, size, sha256 of the stream, chunk size, sample count, why
    UploadChunk   chunk ``index`` of the stream (bytes ``[index * chunk, ...)``), raw bytes after a JSON header

The fleet answers each begin and each chunk with an ``upload-ack`` command on the device's ``commands``
topic (:class:`UploadAck`): ``next``, the first chunk it does not hold (all before it are on the fleet's
disk), and, once the whole stream is stored and indexed, ``done``. The device deletes its samples only after
``done``; a device restarted mid-upload sends the same begin again and continues from the fleet's ``next``;
an upload the fleet already stored is answered ``done`` again (nothing is stored twice).

Frames (both kinds) are ``MAGIC``, a 2-byte big-endian header length, the header (bounded JSON through
:func:`~edgeml.protocol.codec.decode_object`, kind ``"upload"``), then the chunk's raw bytes (empty for a
begin). Raw bytes cost no base64 on the wire; nothing in them is trusted: the fleet checks the assembled
stream against the begin's sha256, then every sample (:func:`iter_samples`).

The stream: ``STREAM_MAGIC``, then per sample a 4-byte length and the sample's metadata
(:class:`CaptureSample`, bounded JSON), a 4-byte length and the sample as a ``.npy`` file.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgeml.protocol.codec import (
    FieldTypes,
    Message,
    ProtocolError,
    check_pattern,
    check_range,
    decode_object,
    field_names,
)
from edgeml.protocol.topics import validate_device_id

__all__ = [
    "MAGIC",
    "MAX_CHUNK",
    "MAX_SAMPLES",
    "MAX_SAMPLE_BYTES",
    "MAX_UPLOAD_BYTES",
    "REASONS",
    "STREAM_MAGIC",
    "TRIGGERS",
    "UPLOAD_TYPES",
    "CaptureSample",
    "UploadAck",
    "UploadBegin",
    "UploadChunk",
    "decode_frame",
    "iter_samples",
    "pack_samples",
]

MAGIC = b"EMU1"
STREAM_MAGIC = b"EMLCAP1\n"
_KiB, _MiB = 1024, 1024 * 1024
#: Largest chunk of an upload (raw bytes in one frame; the broker's message_size_limit is larger).
MAX_CHUNK = 256 * _KiB
#: Largest upload stream (a device splits a larger set of samples into several uploads).
MAX_UPLOAD_BYTES = 64 * _MiB
#: Most samples in one upload.
MAX_SAMPLES = 10_000
#: Largest sample (its .npy file).
MAX_SAMPLE_BYTES = 16 * _MiB
_MAX_META = 4 * _KiB
#: Why an upload was sent: an operator's capture command, or a drift alert on the device.
TRIGGERS = frozenset({"command", "drift"})
#: Why a sample was kept: its top-1 confidence was low, its window drifted, or a command asked for it.
REASONS = frozenset({"low_confidence", "drift", "command"})
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_DTYPE = re.compile(r"(bool|u?int(8|16|32|64)|float(16|32|64))")
_NONE = type(None)
_U16, _U32 = struct.Struct(">H"), struct.Struct(">I")


def _check_common(kind: str, device_id: str, upload: str) -> None:
    validate_device_id(device_id)
    check_pattern(kind, "upload", upload, _TOKEN, "an upload id (a token of up to 64 characters)")


@dataclass(frozen=True, kw_only=True)
class UploadBegin(Message):
    """The start (or restart) of an upload: what the stream holds and why it is sent.

    Attributes:
        device_id: The sending device (checked against the topic).
        upload: The upload's id, chosen by the device (:data:`TOKEN` pattern), the same when it resumes.
        size: Bytes of the stream (1 .. :data:`MAX_UPLOAD_BYTES`).
        sha256: Hex sha256 of the whole stream.
        chunk: Bytes per chunk (1 .. :data:`MAX_CHUNK`).
        samples: How many samples the stream holds (1 .. :data:`MAX_SAMPLES`).
        trigger: Why it is sent (:data:`TRIGGERS`).
        command_id: The capture command that asked for it, if any.
        tag: The command's tag, if any (an operator's label for the collection).
        drift: The drift window that triggered it (its numbers, ``score`` among them), if any.
    """

    device_id: str
    upload: str
    size: int
    sha256: str
    chunk: int
    samples: int
    trigger: str
    command_id: str | None = None
    tag: str | None = None
    drift: dict[str, Any] | None = None
    type: str = "begin"
    schema: str = "edgeml.upload/1"

    KIND: ClassVar[str] = "upload"
    SCHEMA: ClassVar[str] = "edgeml.upload/1"
    TYPES: ClassVar[FieldTypes] = {
        "device_id": (str,), "upload": (str,), "size": (int,), "sha256": (str,), "chunk": (int,),
        "samples": (int,), "trigger": (str,), "command_id": (str, _NONE), "tag": (str, _NONE),
        "drift": (dict, _NONE), "type": (str,)}

    @property
    def count(self) -> int:
        """How many chunks the stream has."""
        return -(-self.size // self.chunk)

    def _validate(self) -> None:
        _check_common("upload", self.device_id, self.upload)
        if self.type != "begin":
            raise ProtocolError(f"upload: type {self.type[:20]!r} is not 'begin'")
        check_range("upload", "size", self.size, 1, MAX_UPLOAD_BYTES)
        check_range("upload", "chunk", self.chunk, 1, MAX_CHUNK)
        check_range("upload", "samples", self.samples, 1, MAX_SAMPLES)
        check_pattern("upload", "sha256", self.sha256, _HEX64, "64 lowercase hex digits")
        if self.trigger not in TRIGGERS:
            raise ProtocolError(f"upload: unknown trigger {self.trigger[:20]!r} (expected one of {sorted(TRIGGERS)})")
        check_pattern("upload", "command_id", self.command_id, _TOKEN, "a command id")
        check_pattern("upload", "tag", self.tag, _TAG, "a tag (up to 64 letters, digits, '.', ':', '_', '-')")
        if self.drift is not None:
            if len(self.drift) > 64:
                raise ProtocolError("upload: the drift window has more than 64 fields")
            score = self.drift.get("score")
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
                raise ProtocolError("upload: the drift window's 'score' must be a number or null")

    def frame(self) -> bytes:
        """The begin as one MQTT payload."""
        return _frame(self.to_bytes(), b"")


@dataclass(frozen=True, kw_only=True)
class UploadChunk(Message):
    """The header of one chunk; the chunk's bytes follow it in the frame (:meth:`frame`).

    Attributes:
        device_id: The sending device.
        upload: The upload's id.
        index: Which chunk (0 .. count - 1).
    """

    device_id: str
    upload: str
    index: int
    type: str = "chunk"
    schema: str = "edgeml.upload/1"

    KIND: ClassVar[str] = "upload"
    SCHEMA: ClassVar[str] = "edgeml.upload/1"
    TYPES: ClassVar[FieldTypes] = {"device_id": (str,), "upload": (str,), "index": (int,), "type": (str,)}

    def _validate(self) -> None:
        _check_common("upload", self.device_id, self.upload)
        if self.type != "chunk":
            raise ProtocolError(f"upload: type {self.type[:20]!r} is not 'chunk'")
        check_range("upload", "index", self.index, 0, MAX_UPLOAD_BYTES)

    def frame(self, data: bytes) -> bytes:
        """The chunk as one MQTT payload (its header, then ``data``)."""
        if len(data) > MAX_CHUNK:
            raise ProtocolError(f"upload: a chunk of {len(data)} bytes exceeds {MAX_CHUNK}")
        return _frame(self.to_bytes(), data)


#: Frame header type -> its class (what :func:`edgeml.protocol.parse` gives for kind ``"upload"``).
UPLOAD_TYPES: dict[str, type[Message]] = {"begin": UploadBegin, "chunk": UploadChunk}


def _frame(header: bytes, data: bytes) -> bytes:
    return b"".join((MAGIC, _U16.pack(len(header)), header, data))


def decode_frame(payload: bytes | bytearray) -> tuple[UploadBegin | UploadChunk, bytes]:
    """Check and decode one frame from an ``uploads`` topic: ``(header, chunk bytes)``.

    The size is checked first (a header of at most ``MAX_BYTES["upload"]``, a chunk of at most
    :data:`MAX_CHUNK`), then the header goes through the bounded JSON codec and its class's checks.

    Raises:
        ProtocolError: Too large, not a frame, a header out of bounds, or bytes after a begin.
    """
    data = bytes(payload)
    if len(data) < 6 or data[:4] != MAGIC:
        raise ProtocolError("upload: not an edgeml upload frame")
    (length,) = _U16.unpack_from(data, 4)
    header, body = data[6:6 + length], data[6 + length:]
    if len(header) != length:
        raise ProtocolError("upload: the frame is shorter than its header length")
    if len(body) > MAX_CHUNK:
        raise ProtocolError(f"upload: a chunk of {len(body)} bytes exceeds {MAX_CHUNK}")
    obj = decode_object("upload", header)
    cls = UPLOAD_TYPES.get(obj["type"]) if isinstance(obj.get("type"), str) else None
    if cls is None:
        raise ProtocolError(f"upload: unknown type {str(obj.get('type'))[:20]!r} (expected one of "
                            f"{sorted(UPLOAD_TYPES)})")
    message = _build(cls, obj)
    if isinstance(message, UploadBegin) and body:
        raise ProtocolError("upload: a begin frame carries no bytes")
    return message, body


def _build(cls: type[Any], obj: dict[str, Any]) -> Any:
    if obj.get("schema") != cls.SCHEMA:
        raise ProtocolError(f"upload: unsupported schema {str(obj.get('schema'))[:40]!r}",
                            hint=f"this edgeml speaks {cls.SCHEMA}; upgrade the older side")
    unknown = sorted(obj.keys() - field_names(cls))
    if unknown:
        raise ProtocolError(f"upload: unknown fields {[u[:40] for u in unknown[:8]]}")
    try:
        return cls(**obj)
    except TypeError as exc:  # missing required fields
        raise ProtocolError(f"upload: {exc}") from exc


@dataclass(frozen=True)
class UploadAck:
    """The arguments of an ``upload-ack`` command: what the fleet holds of an upload.

    Attributes:
        upload: The upload's id.
        next: The first chunk the fleet does not hold (every chunk before it is on its disk).
        done: The whole upload is stored and indexed: the device may delete its samples.
        stored: Samples newly stored (when done).
        duplicates: Samples the fleet already had from this device (when done).
        error: Why the fleet refused the upload (the device drops it: resending would be refused again).
    """

    upload: str
    next: int = 0
    done: bool = False
    stored: int = 0
    duplicates: int = 0
    error: str | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> UploadAck:
        """The checked arguments of an ``upload-ack`` command.

        Raises:
            ProtocolError: A field is missing, unknown or of the wrong type.
        """
        unknown = sorted(set(args) - set(field_names(cls)))
        if unknown:
            raise ProtocolError(f"upload-ack: unknown arguments {unknown[:8]}")
        upload = args.get("upload")
        if not isinstance(upload, str):
            raise ProtocolError("upload-ack: 'upload' is required")
        check_pattern("upload-ack", "upload", upload, _TOKEN, "an upload id")
        ints = {name: args.get(name, 0) for name in ("next", "stored", "duplicates")}
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_UPLOAD_BYTES:
                raise ProtocolError(f"upload-ack: {name!r} must be a count")
        done, error = args.get("done", False), args.get("error")
        if not isinstance(done, bool) or not (error is None or (isinstance(error, str) and len(error) <= 500)):
            raise ProtocolError("upload-ack: 'done' must be a boolean and 'error' a short string or null")
        return cls(upload, ints["next"], done, ints["stored"], ints["duplicates"], error)

    def to_args(self) -> dict[str, Any]:
        """The arguments as the command carries them."""
        out: dict[str, Any] = {"upload": self.upload, "next": self.next, "done": self.done}
        if self.done:
            out.update(stored=self.stored, duplicates=self.duplicates)
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True, kw_only=True)
class CaptureSample(Message):
    """The metadata of one sample in an upload stream.

    Attributes:
        seq: The sample's number in the device's capture store.
        captured_at: When it was captured (Unix seconds, device clock).
        shape: The array's shape (at most 8 dimensions).
        dtype: Its dtype (a plain numeric type: no objects, no byte order other than the machine's).
        reason: Why it was kept (:data:`REASONS`).
        confidence: The model's top-1 probability on it, if known.
        predicted: The model's top-1 class, if known.
        model: The model that served it, if known.
        version: Its version.
        target: Its compile target.
    """

    seq: int
    captured_at: float
    shape: list[int]
    dtype: str
    reason: str = "low_confidence"
    confidence: float | None = None
    predicted: int | None = None
    model: str | None = None
    version: str | None = None
    target: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema: str = "edgeml.capture-sample/1"

    KIND: ClassVar[str] = "upload"
    SCHEMA: ClassVar[str] = "edgeml.capture-sample/1"
    TYPES: ClassVar[FieldTypes] = {
        "seq": (int,), "captured_at": (int, float), "shape": (list,), "dtype": (str,), "reason": (str,),
        "confidence": (int, float, _NONE), "predicted": (int, _NONE), "model": (str, _NONE),
        "version": (str, _NONE), "target": (str, _NONE), "extra": (dict,)}

    def _validate(self) -> None:
        check_range("sample", "seq", self.seq, 0, 2**62)
        check_range("sample", "captured_at", self.captured_at, 0.0, 1e11)
        if len(self.shape) > 8 or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 2**31
                                      for d in self.shape):
            raise ProtocolError("sample: 'shape' must be at most 8 non-negative integers")
        check_pattern("sample", "dtype", self.dtype, _DTYPE, "a numeric dtype such as float32")
        if self.reason not in REASONS:
            raise ProtocolError(f"sample: unknown reason {self.reason[:20]!r} (expected one of {sorted(REASONS)})")
        if self.confidence is not None:
            check_range("sample", "confidence", self.confidence, 0.0, 1.0)
        if self.predicted is not None:
            check_range("sample", "predicted", self.predicted, 0, 2**31)
        check_pattern("sample", "model", self.model, _NAME, "a model name")
        check_pattern("sample", "version", self.version, _VERSION, "a version")
        check_pattern("sample", "target", self.target, _NAME, "a target name")
        if len(self.extra) > 16:
            raise ProtocolError("sample: more than 16 extra fields")

    @classmethod
    def from_bytes(cls, data: bytes) -> CaptureSample:
        """Decode and check one sample's metadata.

        Raises:
            ProtocolError: Too large, not JSON, out of bounds or not a sample's metadata.
        """
        if len(data) > _MAX_META:
            raise ProtocolError(f"sample: metadata of {len(data)} bytes exceeds {_MAX_META}")
        return _build(cls, decode_object("upload", data))


def pack_samples(samples: Iterable[tuple[CaptureSample, bytes]]) -> bytes:
    """The upload stream of ``(metadata, .npy bytes)`` pairs.

    Raises:
        ProtocolError: A sample or the stream is over its limit.
    """
    parts, total, count = [STREAM_MAGIC], len(STREAM_MAGIC), 0
    for meta, npy in samples:
        head = meta.to_bytes()
        if len(head) > _MAX_META or len(npy) > MAX_SAMPLE_BYTES:
            raise ProtocolError(f"sample {meta.seq}: over the limits ({len(head)} bytes of metadata, "
                                f"{len(npy)} of data)")
        parts += [_U32.pack(len(head)), head, _U32.pack(len(npy)), npy]
        total += 8 + len(head) + len(npy)
        count += 1
    if total > MAX_UPLOAD_BYTES or count > MAX_SAMPLES:
        raise ProtocolError(f"upload: {count} samples in {total} bytes exceed {MAX_SAMPLES} / {MAX_UPLOAD_BYTES}")
    return b"".join(parts)


def iter_samples(stream: bytes) -> Iterator[tuple[CaptureSample, bytes]]:
    """The ``(metadata, .npy bytes)`` pairs of an upload stream, each checked as it is read.

    Raises:
        ProtocolError: The stream is malformed or a sample is out of bounds.
    """
    view = memoryview(stream)
    if bytes(view[:len(STREAM_MAGIC)]) != STREAM_MAGIC:
        raise ProtocolError("upload: not a capture stream")
    pos, count = len(STREAM_MAGIC), 0
    while pos < len(view):
        count += 1
        if count > MAX_SAMPLES:
            raise ProtocolError(f"upload: more than {MAX_SAMPLES} samples")
        head, pos = _field(view, pos, _MAX_META)
        npy, pos = _field(view, pos, MAX_SAMPLE_BYTES)
        yield CaptureSample.from_bytes(head), npy


def _field(view: memoryview, pos: int, limit: int) -> tuple[bytes, int]:
    if pos + 4 > len(view):
        raise ProtocolError("upload: the capture stream is truncated")
    (length,) = _U32.unpack_from(view, pos)
    if length > limit or pos + 4 + length > len(view):
        raise ProtocolError(f"upload: a field of {length} bytes is over its limit or past the stream's end")
    return bytes(view[pos + 4:pos + 4 + length]), pos + 4 + length
