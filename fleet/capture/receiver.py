"""The fleet's end of capture uploads: frames from devices' ``uploads`` topics, staged, checked, stored, acked.

:class:`UploadReceiver` subscribes to ``edgeml/v1/devices/+/uploads`` and handles each frame in a worker thread
of its own (a bounded queue: a frame that does not fit is dropped and counted, the device sends it again), like
every other consumer of device messages:

* the frame is decoded by :func:`edgeml.protocol.uploads.decode_frame` (sizes checked before anything is
  parsed, the header through the bounded JSON codec), and its ``device_id`` must equal the topic's;
* the device must be enrolled and not revoked (:class:`~edgeml.fleet.devices.roster.DeviceRoster`) and within
  its byte rate (``bytes_per_s``, a burst of twice that);
* an upload is at most ``max_upload_bytes``; one upload per device is staged at a time (a new one replaces
  an older one the device gave up).

Chunks are appended in order to ``captures/staging/{device}/{upload}.part`` (the begin beside it, as
``.json``); every chunk is answered with an ``upload-ack`` whose ``next`` says how much is on disk. When the
last chunk is in, the stream is checked against the begin's sha256, its samples are stored
(:class:`~edgeml.fleet.capture.store.CaptureArchive`), a ``.done`` marker keeps the answer, and the device is
told ``done``. A begin for an upload already done is answered ``done`` again, and a restarted fleet resumes
from its ``.part`` files: neither side loses or repeats a sample. Anything that fails while handling one
frame is logged and counted (``rejected``); the next frame is handled as usual. The archive's retention
limits are applied after each upload to its device, and to every device (age included) every
``retention_every_s``.

One receiver per fleet: it runs in the ``edgeml fleet serve`` process with the controller (the staging files
and the samples are on that host's registry directory, where ``capture pull`` reads them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import queue
import shutil
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from edgeml.errors import ConfigError
from edgeml.fleet.capture.store import CaptureArchive, CaptureRetention
from edgeml.fsutil import atomic_write_bytes
from edgeml.protocol import PREFIX, Command, ProtocolError, device_topic, fleet_client_id, parse_device_topic
from edgeml.protocol.uploads import MAX_UPLOAD_BYTES, UploadAck, UploadBegin, UploadChunk, decode_frame, iter_samples

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = ["REJECT_REASONS", "UPLOADS_FILTER", "ReceiverSettings", "UploadReceiver"]

_log = logging.getLogger(__name__)
UPLOADS_FILTER = f"{PREFIX}devices/+/uploads"
_MiB = 1024 * 1024
_DONE_KEPT = 64  # .done markers kept per device (the newest)


#: Why a frame was dropped (the keys of :meth:`UploadReceiver.stats`'s ``rejected``).
REJECT_REASONS = ("malformed", "device-mismatch", "revoked", "unknown-device", "rate", "too-large", "unknown-upload",
                  "hash-mismatch", "invalid-sample", "queue-full", "internal")


@dataclass(frozen=True)
class ReceiverSettings:
    """Bounds of what the fleet accepts from one device."""

    max_upload_bytes: int = 32 * _MiB  # an upload's stream, at most (the protocol allows 64 MiB)
    bytes_per_s: float = 8 * _MiB  # frames a second per device, in bytes (a burst of twice that)
    queue_frames: int = 256  # frames waiting for the worker; more are dropped (the device resends)
    retention_every_s: float = 3600.0  # how often the retention limits are applied to every device (age included)

    def __post_init__(self) -> None:
        if not 0 < self.max_upload_bytes <= MAX_UPLOAD_BYTES or self.bytes_per_s <= 0 or self.queue_frames < 1:
            raise ConfigError(f"capture receiver: need 0 < max_upload_bytes <= {MAX_UPLOAD_BYTES}, bytes_per_s > 0 "
                              "and queue_frames >= 1")


class UploadReceiver:
    """Receives capture uploads (see the module docstring).

    Args:
        db: The registry database.
        registry_dir: The registry directory (samples go under ``captures/``).
        broker_host: The broker's host.
        broker_port: Its port.
        username: The fleet's broker user, if the broker requires one.
        password: Its password.
        tls: SSL context for a TLS listener (None: plain TCP).
        roster: Which devices may upload (:class:`~edgeml.fleet.devices.roster.DeviceRoster`; None: any device
            the broker lets publish, for tests and benchmarks without enrollment).
        settings: Bounds per device.
        retention: What the archive keeps.
    """

    def __init__(self, db: Database, registry_dir: Path, broker_host: str, broker_port: int,
                 username: str | None = None, password: str | None = None, tls: ssl.SSLContext | None = None,
                 roster: Any = None, settings: ReceiverSettings | None = None,
                 retention: CaptureRetention | None = None) -> None:
        self.archive = CaptureArchive(db, registry_dir, retention)
        self.staging = self.archive.root / "staging"
        self.roster, self.settings = roster, settings or ReceiverSettings()
        self.broker = (broker_host, broker_port)
        self.rejected: dict[str, int] = {}  # why -> frames dropped
        self.stored = self.duplicates = self.uploads_done = 0
        self._buckets: dict[str, tuple[float, float]] = {}
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(self.settings.queue_frames)
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=fleet_client_id("capture"))
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set_context(tls)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_message = self._on_message

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe and handle frames in a worker thread; returns once subscribed.

        Raises:
            ConfigError: The broker cannot be reached or did not grant the subscription in time.
        """
        self.staging.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._worker, name="capture-receiver", daemon=True)
        self._thread.start()
        try:
            self._client.connect(*self.broker, keepalive=30)
        except OSError as exc:
            self.stop()
            raise ConfigError(f"capture: cannot reach the broker at {self.broker[0]}:{self.broker[1]}: {exc}") from exc
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise ConfigError(f"capture: not subscribed to {UPLOADS_FILTER} within {timeout} s")

    def stop(self) -> None:
        """Disconnect and stop the worker (uploads in flight resume from their staging files)."""
        self._client.disconnect()
        self._client.loop_stop()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            _log.error("capture: the broker refused the connection: %s", reason)
            return
        client.subscribe(UPLOADS_FILTER, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._queue.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:
            self._drop("queue-full", msg.topic)

    def _drop(self, why: str, topic: str, detail: str = "") -> None:
        self.rejected[why] = self.rejected.get(why, 0) + 1
        _log.debug("capture: dropped a frame on %s (%s) %s", topic[:120], why, detail[:200])

    # --- the worker -----------------------------------------------------------------------------------------

    def _worker(self) -> None:
        next_retention = time.monotonic()
        while True:
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + self.settings.retention_every_s
                try:
                    self.archive.enforce()
                except Exception:  # the database may be away for a moment: the next round applies them
                    _log.exception("capture: applying the retention limits failed")
            try:
                item = self._queue.get(timeout=min(60.0, self.settings.retention_every_s))
            except queue.Empty:
                continue
            if item is None:
                return
            try:
                self.handle(*item)
            except Exception as exc:  # one frame's failure (a bug, a full disk, the database) stops nothing else
                _log.exception("capture: a frame on %r failed", item[0][:120])
                self._drop("internal", item[0], repr(exc))

    def handle(self, topic: str, payload: bytes) -> UploadAck | None:
        """Check and act on one frame; returns the ack sent (None: the frame was dropped)."""
        try:
            device_id, channel = parse_device_topic(topic)
            if channel != "uploads":
                raise ProtocolError(f"not an uploads topic: {topic[:120]!r}")
            frame, data = decode_frame(payload)
        except ProtocolError as exc:
            self._drop("malformed", topic, exc.message)
            return None
        if frame.device_id != device_id:
            self._drop("device-mismatch", topic, f"names {frame.device_id}")
            return None
        if not self._within_rate(device_id, len(payload)):
            self._drop("rate", topic)
            return None
        if self.roster is not None:
            why = self.roster.refusal(device_id)
            if why is not None:
                self._drop(why, topic)
                return None
        ack = self._begin(device_id, frame) if isinstance(frame, UploadBegin) else self._chunk(device_id, frame, data)
        if ack is not None:
            command = Command(id=f"ua-{uuid.uuid4().hex[:12]}", type="upload-ack", args=ack.to_args(),
                              issued_at=time.time())
            self._client.publish(device_topic(device_id, "commands"), command.to_bytes(), qos=1)
        return ack

    def _within_rate(self, device_id: str, size: int) -> bool:
        now, rate = time.monotonic(), self.settings.bytes_per_s
        tokens, last = self._buckets.get(device_id, (2 * rate, now))
        tokens = min(2 * rate, tokens + (now - last) * rate)
        if tokens < size:
            self._buckets[device_id] = (tokens, now)
            return False
        self._buckets[device_id] = (tokens - size, now)
        return True

    # --- staging --------------------------------------------------------------------------------------------

    def _paths(self, device_id: str, upload: str) -> tuple[Path, Path, Path]:
        base = self.staging / device_id
        return base / f"{upload}.json", base / f"{upload}.part", base / f"{upload}.done"

    def _begin(self, device_id: str, begin: UploadBegin) -> UploadAck:
        meta, part, done = self._paths(device_id, begin.upload)
        if done.exists():
            return UploadAck(**json.loads(done.read_text()))
        if begin.size > self.settings.max_upload_bytes:
            self._drop("too-large", device_id)
            return UploadAck(begin.upload, error=f"too-large: the fleet accepts {self.settings.max_upload_bytes} "
                                                 "bytes an upload")
        known = json.loads(meta.read_text()) if meta.exists() else None
        if known != begin.to_dict():
            self._discard(device_id)  # one upload in flight per device: an older or different one goes
            meta.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(b"")
            atomic_write_bytes(meta, json.dumps(begin.to_dict()).encode())
        have = part.stat().st_size if part.exists() else 0
        if have >= begin.size:
            return self._finish(device_id, begin)
        return UploadAck(begin.upload, next=have // begin.chunk)

    def _discard(self, device_id: str) -> None:
        for path in (self.staging / device_id).glob("*"):
            if path.suffix in (".part", ".json"):
                path.unlink(missing_ok=True)

    def _chunk(self, device_id: str, chunk: UploadChunk, data: bytes) -> UploadAck | None:
        meta, part, done = self._paths(device_id, chunk.upload)
        if done.exists():
            return UploadAck(**json.loads(done.read_text()))
        if not meta.exists():
            self._drop("unknown-upload", device_id)
            return None
        begin = UploadBegin(**json.loads(meta.read_text()))
        have = part.stat().st_size
        nxt = have // begin.chunk
        expected = min(begin.chunk, begin.size - chunk.index * begin.chunk)
        if chunk.index >= begin.count or len(data) != expected:
            self._drop("malformed", device_id, f"chunk {chunk.index} of {len(data)} bytes")
            return None
        if chunk.index != nxt:  # a resend of one held, or one past a gap: say where the fleet is
            return UploadAck(begin.upload, next=nxt)
        with part.open("ab") as fh:
            fh.write(data)
        if have + len(data) >= begin.size:
            return self._finish(device_id, begin)
        return UploadAck(begin.upload, next=nxt + 1)

    def _finish(self, device_id: str, begin: UploadBegin) -> UploadAck:
        meta, part, done = self._paths(device_id, begin.upload)
        stream = part.read_bytes()
        if hashlib.sha256(stream).hexdigest() != begin.sha256:
            self._discard(device_id)
            self._drop("hash-mismatch", device_id)
            return UploadAck(begin.upload, error="hash-mismatch: the stream does not match its sha256")
        try:
            samples = list(iter_samples(stream))
        except ProtocolError as exc:
            self._discard(device_id)
            self._drop("malformed", device_id, exc.message)
            return UploadAck(begin.upload, error=f"malformed: {exc.message[:200]}")
        stored, duplicates, invalid = self.archive.add(device_id, begin, samples)
        if invalid:
            self.rejected["invalid-sample"] = self.rejected.get("invalid-sample", 0) + invalid
        ack = UploadAck(begin.upload, next=begin.count, done=True, stored=stored, duplicates=duplicates)
        atomic_write_bytes(done, json.dumps(dataclasses.asdict(ack)).encode())
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        self.stored, self.duplicates, self.uploads_done = (self.stored + stored, self.duplicates + duplicates,
                                                           self.uploads_done + 1)
        self._prune_done(device_id)
        return ack

    def _prune_done(self, device_id: str) -> None:
        marks = sorted((self.staging / device_id).glob("*.done"), key=lambda p: p.stat().st_mtime)
        for old in marks[:-_DONE_KEPT]:
            old.unlink(missing_ok=True)

    def stats(self) -> dict[str, Any]:
        """Counters for ``/metrics``: ``stored`` (samples archived), ``duplicates`` (samples already archived),
        ``uploads`` (uploads finished) and ``rejected`` (reason -> frames dropped)."""
        return describe(self)

    def forget(self, device_id: str) -> None:
        """Remove a device's staging (for a revoked device whose uploads will never finish)."""
        shutil.rmtree(self.staging / device_id, ignore_errors=True)


def describe(receiver: UploadReceiver) -> dict[str, Any]:
    """The receiver's counters (for logs and tests)."""
    return {"stored": receiver.stored, "duplicates": receiver.duplicates, "uploads": receiver.uploads_done,
            "rejected": dict(receiver.rejected)}
