"""Fetch the registry's files over MQTT request/reply: an ngclient ``FetcherInterface`` for :class:`TufClient`.

Configure the client with ``metadata_url="mqtt://edgeml/metadata/"`` and
``targets_url="mqtt://edgeml/targets/"`` (:data:`METADATA_URL`, :data:`TARGETS_URL`); each URL the
Updater asks for becomes a path (``metadata/3.snapshot.json``, ``targets/<name>/<version>/<hash>.<file>``),
fetched chunk by chunk from the fleet's distribution service: one ``get`` request on this device's
``requests`` topic, one reply on its ``replies`` topic, the next request only after the previous reply
(flow control). A missing file raises ``DownloadHTTPError(..., 404)`` as HTTP would; a silent server raises
``DownloadError``. Nothing here is trusted: ngclient enforces lengths and checks hashes and signatures.

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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import paho.mqtt.client as mqtt
from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient import FetcherInterface

from edgeml.fsutil import atomic_write_bytes
from edgeml.protocol import ProtocolError, Reply, Request, device_topic, parse

__all__ = ["METADATA_URL", "SCHEME", "TARGETS_URL", "MqttFetcher"]

SCHEME = "mqtt://edgeml/"
METADATA_URL = f"{SCHEME}metadata/"
TARGETS_URL = f"{SCHEME}targets/"
CHUNK = 256 * 1024  # asked per request; the service answers with what fits one reply


class MqttFetcher(FetcherInterface):
    """Downloads over MQTT for one device.

    Args:
        client: A connected paho client (VERSION2 callbacks) with its loop running.
        device_id: This device's id (its topics are ``edgeml/v1/devices/{device_id}/...``).
        timeout: Seconds to wait for each reply (and for the subscription).
        chunk: Bytes asked per request.
        partial_dir: Where to keep partly downloaded targets so that an interrupted download resumes
            (None: no resuming). Target file names start with their sha256, so a target URL names its
            content; a target's received bytes go to ``<sha256 of the URL>.part``, fsynced after every
            chunk, and its sidecar ``.len`` (written atomically) records how many of them are complete.
            A later fetch of the same URL first yields those bytes, then asks from that offset. Both
            files are deleted once the fetch completes (ngclient then verifies the whole file, so bytes
            resumed from disk are checked like any others). Metadata is never resumed.

    Raises:
        ProtocolError: ``device_id`` is invalid.
        DownloadError: The broker did not confirm the subscription to the replies topic.
    """

    def __init__(self, client: mqtt.Client, device_id: str, timeout: float = 10.0, chunk: int = CHUNK,
                 partial_dir: Path | None = None) -> None:
        self.client = client
        self.partial_dir = Path(partial_dir) if partial_dir is not None else None
        self.requests = device_topic(device_id, "requests")
        self.replies = device_topic(device_id, "replies")
        self.timeout = timeout
        self.chunk = chunk
        self._lock = threading.Lock()
        self._waiting: dict[str, queue.Queue[Reply]] = {}
        client.message_callback_add(self.replies, self._on_reply)
        acked: set[int] = set()
        cond = threading.Condition()

        def on_subscribe(c: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
            with cond:
                if all(not r.is_failure for r in reasons):
                    acked.add(mid)
                cond.notify_all()

        previous = client.on_subscribe
        client.on_subscribe = on_subscribe  # set before subscribing: the SUBACK may come at once
        try:
            result, mid = client.subscribe(self.replies, qos=1)
            with cond:
                ok = result == mqtt.MQTT_ERR_SUCCESS and cond.wait_for(lambda: mid in acked, timeout)
            if not ok:
                raise DownloadError(f"could not subscribe to {self.replies} (is the client connected?)")
        finally:
            client.on_subscribe = previous

    def close(self) -> None:
        """Stop listening on the replies topic (the client stays connected)."""
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

    def _request(self, path: str, offset: int) -> Reply:
        cid = uuid.uuid4().hex
        answer: queue.Queue[Reply] = queue.Queue(maxsize=1)
        with self._lock:
            self._waiting[cid] = answer
        try:
            request = Request(cid, self.replies, "get", {"path": path, "offset": offset, "length": self.chunk})
            info = self.client.publish(self.requests, request.to_bytes(), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise DownloadError(f"cannot send the request for {path}: {mqtt.error_string(info.rc)}")
            try:
                return answer.get(timeout=self.timeout)
            except queue.Empty:
                raise DownloadError(f"no reply for {path} at offset {offset} within {self.timeout} s") from None
        finally:
            with self._lock:
                self._waiting.pop(cid, None)

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(SCHEME):
            raise DownloadError(f"not an edgeml MQTT URL: {url!r} (expected {SCHEME}...)")
        path = unquote(url[len(SCHEME):])
        if self.partial_dir is None or not url.startswith(TARGETS_URL):
            yield from self._chunks(path, 0)
            return
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        stem = self.partial_dir / hashlib.sha256(url.encode()).hexdigest()
        part, length_file = stem.with_suffix(".part"), stem.with_suffix(".len")
        try:
            done = _complete_length(part, length_file)
            with part.open("r+b" if part.exists() else "w+b") as fh:
                fh.truncate(done)  # drop a torn tail beyond the last recorded chunk
                fh.seek(0)
                while fh.tell() < done:
                    data = fh.read(min(self.chunk, done - fh.tell()))
                    if not data:
                        break
                    yield data
                fh.seek(done)
                for data in self._chunks(path, done):
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                    done += len(data)
                    atomic_write_bytes(length_file, str(done).encode("ascii"))
                    yield data
            _remove(part, length_file)  # complete: ngclient verifies it; never reuse it, verified or not
        except OSError as exc:
            raise DownloadError(f"cannot keep the partial download of {path} in {self.partial_dir}: {exc}") from exc

    def _chunks(self, path: str, offset: int) -> Iterator[bytes]:
        while True:
            reply = self._request(path, offset)
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
            if chunk:
                yield chunk
            offset += len(chunk)
            if offset >= size or not chunk:
                return


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


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
