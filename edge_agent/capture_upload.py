"""Uploads of the captured samples to the fleet: chunked, rate-bounded, resumable, deleted only once acknowledged.

A ``capture`` command with ``upload`` (:class:`~edgeml.protocol.messages.CaptureArgs`), or a drift alert when the
fleet turned drift uploads on, files a *request*: upload the samples the store holds now (at most
``max_samples``). The worker thread cuts the request into *sessions* of at most ``max_upload_bytes``, each a
stream of samples (:func:`~edgeml.protocol.uploads.pack_samples`) sent on the device's ``uploads`` topic as a
begin frame and chunks (see :mod:`edgeml.protocol.uploads`). Everything lives in ``state_dir/uploads``::

    request.json    what was asked and how much of it is sent (deleted when all is)
    session.blob    the stream of the session in flight (written first)
    session.json    the session: upload id, the store entries it holds, sha256, size (the commit mark)
    policy.json     whether drift alerts upload, and when the last one did

Flow control is go-back-N: at most ``window`` chunks past the fleet's ``next`` are in flight; when no ack
comes within ``ack_timeout_s`` the device sends the begin again and continues from the ``next`` the fleet
answers. The entries of a session are removed from the store only when the fleet acknowledges the whole
session ``done``; an agent killed at any point finds ``session.json`` at its next start and resumes the same
upload id, so the fleet stores every sample once (it answers ``done`` again for an upload it already has).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.edge_agent.capture import CaptureEntry, CaptureStore
from edgeml.edge_agent.device_messages import device_event
from edgeml.errors import ConfigError
from edgeml.fsutil import atomic_write_bytes
from edgeml.protocol import CaptureArgs, CaptureEvent, Command, DriftEvent, ProtocolError, device_topic
from edgeml.protocol.uploads import (
    MAX_CHUNK,
    MAX_SAMPLES,
    MAX_UPLOAD_BYTES,
    CaptureSample,
    UploadAck,
    UploadBegin,
    UploadChunk,
    pack_samples,
)

if TYPE_CHECKING:
    from edgeml.edge_agent.agent import Agent

__all__ = ["CaptureUploader", "UploadSettings"]

_log = logging.getLogger(__name__)
_KiB = 1024


@dataclass(frozen=True)
class UploadSettings:
    """How fast and how much a device uploads."""

    chunk: int = 64 * _KiB  # bytes per chunk (at most edgeml.protocol.uploads.MAX_CHUNK)
    max_upload_bytes: int = 8 * 1024 * _KiB  # bytes of one session's stream; more samples go in the next session
    bytes_per_s: int = 256 * _KiB  # default upload rate, when the command names none
    max_bytes_per_s: int = 4 * 1024 * _KiB  # the fastest this device uploads, whatever the command asks
    window: int = 8  # chunks in flight past the fleet's acknowledgement
    ack_timeout_s: float = 5.0  # seconds without an ack before the begin is sent again
    drift_interval_s: float = 3600.0  # at most one drift-triggered upload per this many seconds

    def __post_init__(self) -> None:
        if not 0 < self.chunk <= MAX_CHUNK or not 0 < self.max_upload_bytes <= MAX_UPLOAD_BYTES:
            raise ConfigError(f"upload chunk must be 1..{MAX_CHUNK} and max_upload_bytes 1..{MAX_UPLOAD_BYTES}")
        if self.bytes_per_s < 1 or self.max_bytes_per_s < 1 or self.window < 1 or self.ack_timeout_s <= 0:
            raise ConfigError("upload rates and window must be at least 1, ack_timeout_s > 0")


class _Bucket:
    """A token bucket of bytes: :meth:`take` sleeps until ``n`` bytes may go (or ``stop`` is set)."""

    def __init__(self, rate: float, stop: threading.Event) -> None:
        self.rate, self.stop = rate, stop
        self.capacity = max(rate, MAX_CHUNK)  # one chunk always fits
        self.tokens, self.last = 0.0, time.monotonic()

    def take(self, n: int) -> bool:
        while not self.stop.is_set():
            now = time.monotonic()
            self.tokens, self.last = min(self.capacity, self.tokens + (now - self.last) * self.rate), now
            if self.tokens >= n:
                self.tokens -= n
                return True
            self.stop.wait((n - self.tokens) / self.rate)
        return False


class CaptureUploader:
    """Uploads one agent's captured samples (see the module docstring).

    Args:
        agent: The agent (its MQTT client, device id, capture store, connection and active model).
        state_dir: The agent's state folder (``uploads/`` is created in it).
        settings: Rates and sizes.
    """

    def __init__(self, agent: Agent, state_dir: Path, settings: UploadSettings | None = None) -> None:
        self.agent, self.settings = agent, settings or UploadSettings()
        self.dir = state_dir / "uploads"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ack: UploadAck | None = None
        self._thread: threading.Thread | None = None
        self.sent_chunks = 0  # chunks published (resends included)
        self.completed = 0  # sessions the fleet acknowledged done
        if not (self.dir / "session.json").exists():  # a stream written before its session: never sent
            (self.dir / "session.blob").unlink(missing_ok=True)

    @property
    def store(self) -> CaptureStore:
        return self.agent.telemetry.capture

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker (a session left by a previous run resumes first)."""
        self._thread = threading.Thread(target=self._worker, name="edgeml-capture-upload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker; a session in flight resumes at the next start."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- inputs (MQTT thread) -------------------------------------------------------------------------------

    def handle(self, command: Command) -> None:
        """Act on a ``capture`` or ``upload-ack`` command.

        Raises:
            ProtocolError: Its arguments are malformed (the agent rejects the command).
        """
        if command.type == "upload-ack":
            ack = UploadAck.from_args(command.args)
            with self._cond:
                self._ack = ack
                self._cond.notify_all()
            return
        args = CaptureArgs.from_args(command.args)
        if args.drift is not None:
            policy = self._read("policy.json") or {}
            self._write("policy.json", {**policy, "drift": args.drift, "bytes_per_s": args.bytes_per_s,
                                        "tag": args.tag})
        if args.upload:
            self._file_request("command", args.max_samples, args.bytes_per_s, args.tag, command.id, None)
        self.agent.send_event(device_event(CaptureEvent, self.agent.device_id, id=command.id,
                                           entries=len(self.store), bytes=self.store.total_bytes))

    def on_drift(self, event: DriftEvent) -> None:
        """A drift alert: upload when the fleet turned drift uploads on and none went out for a while."""
        policy = self._read("policy.json") or {}
        if not policy.get("drift") or time.time() - float(policy.get("last", 0.0)) < self.settings.drift_interval_s \
                or (self.dir / "request.json").exists():
            return
        self._write("policy.json", {**policy, "last": time.time()})
        self._file_request("drift", MAX_SAMPLES, policy.get("bytes_per_s"), policy.get("tag"), None, event.window)

    def on_connect(self) -> None:
        """The broker connection is (back) up: a session waiting for an ack sends its begin again now."""
        with self._cond:
            self._cond.notify_all()

    def _file_request(self, trigger: str, max_samples: int, rate: int | None, tag: str | None,
                      command_id: str | None, drift: dict[str, Any] | None) -> None:
        entries = self.store.list()
        if not entries:
            return
        self._write("request.json", {"trigger": trigger, "remaining": max_samples, "until_seq": entries[-1].seq,
                                     "bytes_per_s": rate, "tag": tag, "command_id": command_id, "drift": drift})
        with self._cond:
            self._cond.notify_all()

    # --- files ----------------------------------------------------------------------------------------------

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            value = json.loads((self.dir / name).read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _write(self, name: str, value: dict[str, Any]) -> None:
        atomic_write_bytes(self.dir / name, json.dumps(value, sort_keys=True).encode())

    # --- the worker -----------------------------------------------------------------------------------------

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                session = self._read("session.json") or self._next_session()
                if session is None:
                    with self._cond:
                        if not (self.dir / "request.json").exists():
                            self._cond.wait(1.0)
                    continue
                self._send(session)
            except Exception:  # a bug or a full disk must not end uploads for good; retried after a pause
                _log.exception("capture upload failed")
                self._stop.wait(self.settings.ack_timeout_s)

    def _next_session(self) -> dict[str, Any] | None:
        """Cut the next session from the request (None: nothing to send; the request is then done)."""
        request = self._read("request.json")
        if request is None:
            return None
        limit = min(int(request["remaining"]), MAX_SAMPLES)
        picked: list[tuple[CaptureEntry, CaptureSample, bytes]] = []
        size = 0
        for entry in self.store.list():
            if entry.seq > request["until_seq"] or len(picked) >= limit:
                break
            try:
                npy = entry.array_path.read_bytes()
                meta = self._sample(entry)
            except (OSError, ProtocolError, ValueError, TypeError) as exc:  # unreadable: drop it, it cannot go
                _log.warning("captured sample %d cannot be uploaded (%s); removed", entry.seq, exc)
                self.store.clear([entry])
                continue
            if picked and size + len(npy) + 1024 > self.settings.max_upload_bytes:
                break
            picked.append((entry, meta, npy))
            size += len(npy) + 1024
        if not picked:
            (self.dir / "request.json").unlink(missing_ok=True)
            return None
        stream = pack_samples((meta, npy) for _, meta, npy in picked)
        upload = uuid.uuid4().hex[:20]
        atomic_write_bytes(self.dir / "session.blob", stream)
        session = {"upload": upload, "seqs": [e.seq for e, _, _ in picked], "size": len(stream),
                   "sha256": hashlib.sha256(stream).hexdigest(), "chunk": self.settings.chunk,
                   "trigger": request["trigger"], "tag": request.get("tag"), "command_id": request.get("command_id"),
                   "drift": request.get("drift"), "bytes_per_s": request.get("bytes_per_s")}
        self._write("session.json", session)  # the commit mark
        return session

    def _sample(self, entry: CaptureEntry) -> CaptureSample:
        meta = entry.metadata
        active = self.agent.host.active
        model = meta.get("model") or (active.manifest.name if active else None)
        version = meta.get("version") or (active.version if active else None)
        target = meta.get("target") or (active.manifest.target if active else None)
        return CaptureSample(seq=int(meta["seq"]), captured_at=float(meta["time"]), shape=list(meta["shape"]),
                             dtype=str(meta["dtype"]), reason=str(meta.get("reason", "low_confidence")),
                             confidence=meta.get("confidence"), predicted=meta.get("predicted"),
                             model=model, version=version, target=target)

    def _send(self, session: dict[str, Any]) -> None:
        """Send one session until the fleet says done (or refuses it); then remove its samples."""
        try:
            stream = (self.dir / "session.blob").read_bytes()
        except OSError:
            stream = b""
        if hashlib.sha256(stream).hexdigest() != session["sha256"]:  # a damaged stream cannot resume: cut anew
            _log.warning("upload %s: its stream is damaged; its samples go in a new upload", session["upload"])
            (self.dir / "session.json").unlink(missing_ok=True)
            return
        begin = UploadBegin(device_id=self.agent.device_id, upload=session["upload"], size=session["size"],
                            sha256=session["sha256"], chunk=session["chunk"], samples=len(session["seqs"]),
                            trigger=session["trigger"], command_id=session.get("command_id"),
                            tag=session.get("tag"), drift=session.get("drift"))
        rate = min(int(session.get("bytes_per_s") or self.settings.bytes_per_s), self.settings.max_bytes_per_s)
        ack = self._transfer(begin, stream, _Bucket(rate, self._stop))
        if ack is None:
            return  # stopping: resumes at the next start
        if ack.error is not None:
            _log.warning("the fleet refused upload %s: %s; the samples stay on the device", begin.upload, ack.error)
            (self.dir / "request.json").unlink(missing_ok=True)
        else:
            seqs = set(session["seqs"])
            self.store.clear([e for e in self.store.list() if e.seq in seqs])
            request = self._read("request.json")
            if request is not None:
                self._write("request.json", {**request, "remaining": int(request["remaining"]) - len(seqs)})
            self.completed += 1
            _log.info("upload %s done: %d samples stored, %d already there", begin.upload, ack.stored,
                      ack.duplicates)
        (self.dir / "session.json").unlink(missing_ok=True)
        (self.dir / "session.blob").unlink(missing_ok=True)

    def _transfer(self, begin: UploadBegin, stream: bytes, bucket: _Bucket) -> UploadAck | None:
        """Go-back-N until the fleet acknowledges the upload done or refuses it; None when stopping."""
        topic = device_topic(self.agent.device_id, "uploads")
        client, s = self.agent.client, self.settings
        acked, sent, begun = -1, 0, False
        waited_since = time.monotonic()
        while not self._stop.is_set():
            with self._cond:
                ack, self._ack = self._ack, None
            if ack is not None and ack.upload == begin.upload:
                if ack.done or ack.error is not None:
                    return ack
                if ack.next > acked:
                    acked, waited_since = ack.next, time.monotonic()
                sent = max(sent, acked)
            if not begun or time.monotonic() - waited_since > s.ack_timeout_s:
                if self.agent._connected.is_set():
                    client.publish(topic, begin.frame(), qos=1)
                begun, sent, waited_since = True, max(acked, 0), time.monotonic()
            if acked >= 0:
                while sent < begin.count and sent < acked + s.window and self.agent._connected.is_set():
                    data = stream[sent * begin.chunk:(sent + 1) * begin.chunk]
                    if not bucket.take(len(data)):
                        return None
                    client.publish(topic, UploadChunk(device_id=begin.device_id, upload=begin.upload,
                                                      index=sent).frame(data), qos=1)
                    self.sent_chunks += 1
                    sent += 1
            with self._cond:
                if self._ack is None and not self._stop.is_set():
                    self._cond.wait(0.5)
        return None
