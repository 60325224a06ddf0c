"""Fetch the registry's files over MQTT request/reply: an ngclient ``FetcherInterface`` for :class:`TufClient`.

Configure the client with ``metadata_url="mqtt://edgeml/metadata/"`` and
``targets_url="mqtt://edgeml/targets/"`` (:data:`METADATA_URL`, :data:`TARGETS_URL`); each URL the
Updater asks for becomes a path (``metadata/3.snapshot.json``, ``targets/<name>/<version>/<hash>.<file>``),
fetched chunk by chunk from the fleet's distribution service: ``get`` requests on this device's
``requests`` topic, replies on its ``replies`` topic, with at most ``window`` requests in flight (flow
control) and the chunks put back in order. A missing file raises ``DownloadHTTPError(..., 404)`` as HTTP
would; a silent server raises ``DownloadError``.

With :attr:`MqttFetcher.broadcast` set to a rollout id, a target is first taken from that rollout's
broadcast (retained messages under ``edgeml/v1/dist/{rollout_id}/``, received by
:mod:`edgeml.edge_agent.mqtt_broadcast`): the broker delivers the chunks, and only the chunks that did not
arrive are asked for with ``get``. Without a broadcast of the file, the fetcher falls back to ``get`` after
``broadcast_wait_s``. Nothing here is trusted: ngclient enforces lengths and checks hashes and signatures.

The client passed in must already be connected with its network loop running (``loop_start``); this
fetcher subscribes to the device's replies topic and adds a message callback for it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote

import paho.mqtt.client as mqtt
from tuf.api.exceptions import DownloadError, DownloadHTTPError, DownloadLengthMismatchError
from tuf.ngclient import FetcherInterface

from edgeml.edge_agent.mqtt_broadcast import BroadcastReceiver, Pieces
from edgeml.fsutil import atomic_write_bytes
from edgeml.protocol import MAX_REPLY_DATA, ProtocolError, Reply, Request, device_topic, parse

__all__ = ["METADATA_URL", "SCHEME", "TARGETS_URL", "MqttFetcher"]

SCHEME = "mqtt://edgeml/"
METADATA_URL = f"{SCHEME}metadata/"
TARGETS_URL = f"{SCHEME}targets/"
CHUNK = MAX_REPLY_DATA  # asked per get request: what one reply carries
WINDOW = 8  # get requests in flight per download
CHECKPOINT_BYTES = 1024 * 1024  # bytes received between two resume checkpoints of a target download
CHECKPOINT_S = 1.0  # longest wait, in seconds, between two checkpoints of a download that is receiving


class MqttFetcher(FetcherInterface):
    """Downloads over MQTT for one device.

    Args:
        client: A connected paho client (VERSION2 callbacks) with its loop running.
        device_id: This device's id (its topics are ``edgeml/v1/devices/{device_id}/...``).
        timeout: Seconds to wait for each reply (and for the subscription).
        chunk: Bytes asked per get request (the service answers with at most what fits one reply).
        partial_dir: Where to keep partly downloaded targets so that an interrupted download resumes
            (None: no resuming). Target file names start with their sha256, so a target URL names its
            content; a target's received bytes go to ``<sha256 of the URL>.part``, and at each checkpoint
            (every ``checkpoint_bytes`` received, or ``checkpoint_s`` after the last one) the file is
            fsynced and its sidecar ``.len`` (written atomically) records how many bytes are complete.
            A later fetch of the same URL first yields those bytes, then asks from that offset. Both
            files are deleted once the fetch completes (ngclient then verifies the whole file, so bytes
            resumed from disk are checked like any others). Metadata is never resumed.
        window: Get requests kept in flight.
        broadcast: Rollout id whose broadcast to take targets from (None: get requests only); may be
            changed between fetches.
        broadcast_wait_s: Seconds to wait for a broadcast's announcement before falling back to get.
        stall_s: Seconds without a new broadcast chunk after which the missing chunks are asked for.
        checkpoint_bytes: Bytes received between two resume checkpoints (at most this much is fetched
            again after a crash; each checkpoint costs an fsync and an atomic write).
        checkpoint_s: Longest time, in seconds, between two checkpoints of a download still receiving.

    Raises:
        ProtocolError: ``device_id`` is invalid.
        DownloadError: The broker did not confirm the subscription to the replies topic.
    """

    def __init__(self, client: mqtt.Client, device_id: str, timeout: float = 10.0, chunk: int = CHUNK,
                 partial_dir: Path | None = None, window: int = WINDOW, broadcast: str | None = None,
                 broadcast_wait_s: float = 2.0, stall_s: float = 1.0, checkpoint_bytes: int = CHECKPOINT_BYTES,
                 checkpoint_s: float = CHECKPOINT_S) -> None:
        self.client = client
        self.partial_dir = Path(partial_dir) if partial_dir is not None else None
        self.requests = device_topic(device_id, "requests")
        self.replies = device_topic(device_id, "replies")
        self.timeout = timeout
        self.chunk = min(chunk, MAX_REPLY_DATA)
        self.window = max(1, window)
        self.broadcast = broadcast
        self.broadcast_wait_s = broadcast_wait_s
        self.stall_s = stall_s
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoint_s = checkpoint_s
        self.stats = {"get_bytes": 0, "broadcast_bytes": 0}  # target bytes received each way
        self._lock = threading.Lock()
        self._waiting: dict[str, queue.Queue[Reply]] = {}
        self._broadcast = BroadcastReceiver(client, self._subscribe, self._chunks, self.stats)
        client.message_callback_add(self.replies, self._on_reply)
        self._subscribe(self.replies)

    def _subscribe(self, topic: str) -> None:
        acked: set[int] = set()
        cond = threading.Condition()

        def on_subscribe(c: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
            with cond:
                if all(not r.is_failure for r in reasons):
                    acked.add(mid)
                cond.notify_all()

        with self._lock:  # one subscription at a time: on_subscribe is the client's single callback
            previous = self.client.on_subscribe
            self.client.on_subscribe = on_subscribe  # set before subscribing: the SUBACK may come at once
            try:
                result, mid = self.client.subscribe(topic, qos=1)
                with cond:
                    ok = result == mqtt.MQTT_ERR_SUCCESS and cond.wait_for(lambda: mid in acked, self.timeout)
            finally:
                self.client.on_subscribe = previous
        if not ok:
            raise DownloadError(f"could not subscribe to {topic} (is the client connected?)")

    def close(self) -> None:
        """Stop listening on the replies topic and any broadcast (the client stays connected)."""
        self._broadcast.close()
        self.client.message_callback_remove(self.replies)
        self.client.unsubscribe(self.replies)

    def _on_reply(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            reply = parse("reply", bytes(msg.payload))
        except ProtocolError:
            return  # malformed: the waiting request times out
        assert isinstance(reply, Reply)
        with self._lock:
            waiting = self._waiting.get(reply.correlation_id)
        if waiting is not None:
            waiting.put(reply)

    def _send(self, path: str, offset: int, length: int, answers: queue.Queue[Reply]) -> str:
        cid = uuid.uuid4().hex
        with self._lock:
            self._waiting[cid] = answers
        request = Request(cid, self.replies, "get", {"path": path, "offset": offset, "length": length})
        info = self.client.publish(self.requests, request.to_bytes(), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self._forget([cid])
            raise DownloadError(f"cannot send the request for {path}: {mqtt.error_string(info.rc)}")
        return cid

    def _forget(self, cids: Iterable[str]) -> None:
        with self._lock:
            for cid in cids:
                self._waiting.pop(cid, None)

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = _path_of(url)
        if self.partial_dir is None or not url.startswith(TARGETS_URL):
            yield from self._source(path, 0)
            return
        with self._completed(url, path, None) as fh:
            yield from iter(lambda: fh.read(_READ), b"")

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """ngclient's download: a target with ``partial_dir`` set is handed over as its completed partial
        file (ngclient hashes it and copies it out), not copied into a temporary file first; everything else
        as ngclient does it.

        Raises:
            DownloadError: The download failed.
            DownloadLengthMismatchError: More than ``max_length`` bytes came.
        """
        if self.partial_dir is None or not url.startswith(TARGETS_URL):
            with super().download_file(url, max_length) as fh:
                yield fh
            return
        with self._completed(url, _path_of(url), max_length) as fh:
            yield fh

    @contextlib.contextmanager
    def _completed(self, url: str, path: str, max_length: int | None) -> Iterator[IO[bytes]]:
        """The target's completed partial file, open for reading; removed afterwards (complete: never reused,
        verified or not)."""
        try:
            part = self._download_part(url, path, max_length)
        except DownloadError:
            raise
        except Exception as exc:  # as ngclient's fetch(): only DownloadErrors leave a fetcher
            raise DownloadError(f"failed to download {url}") from exc
        try:
            with part.open("rb") as fh:
                yield fh
        finally:
            _remove(part, part.with_suffix(".len"))

    def _download_part(self, url: str, path: str, max_length: int | None) -> Path:
        """Complete the target's partial file in ``partial_dir`` (resuming from the chunks recorded as
        complete) and return it."""
        assert self.partial_dir is not None
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        stem = self.partial_dir / hashlib.sha256(url.encode()).hexdigest()
        part, length_file = stem.with_suffix(".part"), stem.with_suffix(".len")
        try:
            done = _complete_length(part, length_file)
            with part.open("r+b" if part.exists() else "w+b") as fh:
                fh.truncate(done)  # drop a torn tail beyond the last recorded chunk
                fh.seek(done)
                recorded, at = done, time.monotonic()
                for data in self._source(path, done):
                    done += len(data)
                    if max_length is not None and done > max_length:
                        _remove(part, length_file)
                        raise DownloadLengthMismatchError(f"{path}: more than the {max_length} bytes expected")
                    fh.write(data)
                    if done - recorded >= self.checkpoint_bytes or time.monotonic() - at >= self.checkpoint_s:
                        _checkpoint(fh, length_file, done)  # whole chunks only: ``data`` ends on one
                        recorded, at = done, time.monotonic()
        except OSError as exc:
            raise DownloadError(f"cannot keep the partial download of {path} in {self.partial_dir}: {exc}") from exc
        return part

    def _source(self, path: str, start: int) -> Iterator[bytes]:
        if self.broadcast is not None and path.startswith("targets/"):
            return self._broadcast.receive(path, start, self.broadcast, self.broadcast_wait_s, self.stall_s)
        return self._chunks(path, start)

    # --- get requests ---------------------------------------------------------------------------------------

    def _chunks(self, path: str, start: int, end: int | None = None) -> Iterator[bytes]:
        """The file's bytes from ``start`` (to ``end`` or its end), in order, ``window`` requests in flight."""
        answers: queue.Queue[Reply] = queue.Queue()
        pending: dict[str, int] = {}  # correlation id -> offset asked
        received = Pieces(start)
        size: int | None = None
        asked = start
        try:
            while True:
                limit = received.limit(size, end)
                if limit is not None and received.next >= limit:
                    return
                if not pending:
                    asked = received.next  # nothing in flight (also after a short reply left a gap)
                while (size is not None or not pending) and len(pending) < self.window and \
                        (limit is None or asked < limit):
                    length = self.chunk if limit is None else min(self.chunk, limit - asked)
                    pending[self._send(path, asked, length, answers)] = asked
                    asked += length
                size = self._receive(path, answers, pending, received)
                for data in received.pop_ready():
                    if path.startswith("targets/"):
                        self.stats["get_bytes"] += len(data)
                    yield data
        finally:
            self._forget(pending)

    def _receive(self, path: str, answers: queue.Queue[Reply], pending: dict[str, int], pieces: Pieces) -> int:
        while True:
            try:
                reply = answers.get(timeout=self.timeout)
            except queue.Empty:
                raise DownloadError(f"no reply for {path} at offset {pieces.next} within {self.timeout} s") from None
            offset = pending.pop(reply.correlation_id, None)
            if offset is not None:
                break
            # a second answer to a request already answered (two services answering, a QoS 1 redelivery): drop it
        self._forget([reply.correlation_id])
        if not reply.ok:
            if reply.error == "not-found":
                raise DownloadHTTPError(f"{path} not found", 404)
            raise DownloadError(f"the distribution service refused {path}: {reply.error}")
        result = reply.result if isinstance(reply.result, dict) else {}
        size, data = result.get("size"), result.get("data")
        if not isinstance(size, int) or not isinstance(data, str) or result.get("offset") != offset:
            raise DownloadError(f"malformed reply for {path} at offset {offset}")
        try:
            chunk = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DownloadError(f"malformed data for {path} at offset {offset}: {exc}") from exc
        if not chunk and offset < size:
            raise DownloadError(f"empty reply for {path} at offset {offset} of {size}")
        pieces.add(offset, chunk)
        return size

    # --- broadcast ------------------------------------------------------------------------------------------

    @property
    def last_broadcast_at(self) -> float:
        """``time.monotonic()`` of the latest broadcast message received (0.0: none yet)."""
        return self._broadcast.last_message_at

    def listen(self, rollout_id: str, path: str) -> None:
        """Start receiving a broadcast file now, ahead of the fetch that will use it.

        An update command names the rollout and the file it will deliver; listening at once lets the
        broker deliver the chunks while the device is still refreshing its metadata. The chunks wait in
        memory, untrusted, until the fetch of ``path`` takes them (and TUF verifies the result).

        Raises:
            ProtocolError: The rollout id is invalid.
            DownloadError: The broker did not confirm the subscription.
        """
        self._broadcast.listen(rollout_id, path)


_READ = 1024 * 1024  # bytes read at a time when handing a completed partial download over


def _path_of(url: str) -> str:
    if not url.startswith(SCHEME):
        raise DownloadError(f"not an edgeml MQTT URL: {url!r} (expected {SCHEME}...)")
    return unquote(url[len(SCHEME):])


def _complete_length(part: Path, length_file: Path) -> int:
    """How many bytes of ``part`` are complete chunks (0 when unknown or inconsistent)."""
    try:
        text = length_file.read_text(encoding="ascii").strip()
        size = part.stat().st_size
    except (OSError, UnicodeDecodeError):
        return 0
    if not text.isdigit() or int(text) > size:
        return 0
    return int(text)


def _checkpoint(fh: Any, length_file: Path, done: int) -> None:
    """Make the first ``done`` bytes of the partial file durable, then record that they are complete."""
    fh.flush()
    os.fsync(fh.fileno())
    atomic_write_bytes(length_file, str(done).encode("ascii"))


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
