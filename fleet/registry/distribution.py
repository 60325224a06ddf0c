"""The distribution service: serves the registry's ``repository/`` to devices over MQTT request/reply.

A device sends a :class:`~edgeml.protocol.Request` with method ``"get"`` and params
``{"path": "metadata/<file>" | "targets/<file>", "offset": int, "length": int}`` on its own
``requests`` topic; the service answers on the request's ``reply_to`` with a :class:`~edgeml.protocol.Reply`
whose result is ``{"size": total size, "offset": offset, "data": base64 of the bytes}`` (QoS 1). A missing
file is ``ok: false`` with error ``"not-found"``; a path outside the repository or bad params is
``"bad-request"``. The service holds no state per device: the device asks for the next chunk only once the
previous one arrived (flow control), and resuming is asking from another offset.

Each reply carries at most :data:`MAX_CHUNK` bytes so that it fits the protocol's reply size limit; the
device advances by the length of the data it received, and may keep several requests in flight.

Broadcast (:meth:`DistributionService.broadcast`): a rollout's files are published once as retained
messages under ``edgeml/v1/dist/{rollout_id}/`` (see :mod:`edgeml.protocol`), so the broker fans them out
to every device that subscribes, now or later; :meth:`~DistributionService.unbroadcast` clears them. A
device that missed chunks asks for just those ranges with ``get``.

Several services may share the load: with ``share_group`` they subscribe to the requests through a
shared subscription (``$share/{group}/...``, MQTT 5, which Mosquitto also grants to 3.1.1 clients), and the
broker hands each request to one of them. Nothing here verifies anything: the device checks every byte
against the signed TUF metadata.

Requests are untrusted: each is parsed into a typed :class:`~edgeml.protocol.Request`, its ``reply_to``
must be the replies topic of the device it came from, the device must be admitted by the ``roster``
(enrolled, not revoked), and each device may send at most ``max_requests_per_s`` requests a second (a
burst of twice that); anything else is dropped unanswered and counted in :attr:`rejected`. A request
that fails in any other way is logged and dropped; the service keeps serving the others.
"""

from __future__ import annotations

import base64
import logging
import ssl
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgeml.protocol import (
    MAX_DIST_CHUNK,
    MAX_REPLY_DATA,
    PREFIX,
    DistInfo,
    ProtocolError,
    Reply,
    Request,
    dist_chunk_topic,
    dist_info_topic,
    fleet_client_id,
    parse,
    parse_device_topic,
    tcp_no_delay,
)

__all__ = ["BROADCAST_CHUNK", "MAX_CHUNK", "MAX_REQUEST_LENGTH", "DistributionService"]

_log = logging.getLogger(__name__)

#: Largest chunk one reply carries (the protocol's limit for a get reply).
MAX_CHUNK = MAX_REPLY_DATA
#: Largest ``length`` a request may ask for (answered with at most MAX_CHUNK bytes).
MAX_REQUEST_LENGTH = 256 * 1024
#: Default chunk size of a broadcast (raw bytes per retained message).
BROADCAST_CHUNK = 256 * 1024
REQUESTS_FILTER = f"{PREFIX}devices/+/requests"
_AREAS = ("metadata", "targets")
_CACHE_FILE_BYTES = 64 * 1024  # files up to this size (metadata) are kept in memory while unchanged
_CACHE_ENTRIES = 64


class _BadRequest(Exception):
    pass


class DistributionService:
    """Answers devices' ``get`` requests from ``registry_dir/repository``.

    Args:
        registry_dir: The registry directory (the one ``edgeml fleet init`` created).
        broker_host: The broker's host name.
        broker_port: The broker's port.
        username: Broker user (the fleet user), if the broker requires one.
        password: Its password.
        tls: An :class:`ssl.SSLContext` for a TLS listener, or None for plain TCP.
        chunk_delay_s: Seconds to wait before answering each request (for tests that need a slow link).
        share_group: Subscribe to the requests as a member of this shared-subscription group, so that
            several services split the requests between them (None: a plain subscription).
        mqtt5: Speak MQTT 5 (reason codes; needed by brokers that grant shared subscriptions only to
            MQTT 5 clients) instead of 3.1.1.
        roster: Which devices may be served (:class:`~edgeml.fleet.devices.roster.DeviceRoster`; None: any
            device the broker lets publish, for tests and benchmarks without a registry database).
        max_requests_per_s: Most requests a second one device is answered (twice that in a burst).
    """

    def __init__(self, registry_dir: Path, broker_host: str, broker_port: int, username: str | None = None,
                 password: str | None = None, tls: ssl.SSLContext | None = None,
                 chunk_delay_s: float = 0.0, share_group: str | None = None, mqtt5: bool = False,
                 roster: Any = None, max_requests_per_s: float = 400.0) -> None:
        self.chunk_delay_s = chunk_delay_s
        self.roster = roster
        self.max_requests_per_s = max_requests_per_s
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, time.monotonic() of the last)
        self.rejected: dict[str, int] = {}  # why -> requests dropped unanswered
        self.repository = Path(registry_dir).resolve() / "repository"
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.requests_filter = f"$share/{share_group}/{REQUESTS_FILTER}" if share_group else REQUESTS_FILTER
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._cache: OrderedDict[tuple[Path, int, int], bytes] = OrderedDict()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=fleet_client_id("dist"),
                                   protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set_context(tls)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self.served_bytes = 0  # file bytes sent in replies to get requests
        self.served_requests = 0
        self.broadcast_bytes = 0  # file bytes published by broadcast()

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe and serve in a background thread; returns once subscribed.

        Raises:
            TimeoutError: Not subscribed within ``timeout`` seconds.
            OSError: The broker cannot be reached.
        """
        self._client.connect(self.broker_host, self.broker_port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise TimeoutError(f"not subscribed to {self.requests_filter} on {self.broker_host}:{self.broker_port} "
                               f"within {timeout} s")

    def stop(self) -> None:
        """Disconnect and stop the background thread (a broadcast waiting for the broker gives up)."""
        self._stopping.set()
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> DistributionService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- paho callbacks (run on the loop thread) ------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            _log.error("broker refused the connection: %s", reason)
            return
        tcp_no_delay(client.socket())
        client.subscribe(self.requests_filter, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if all(not r.is_failure for r in reasons):
            self._subscribed.set()
        else:
            _log.error("broker refused the subscription to %s: %s", self.requests_filter, reasons)

    def _drop(self, why: str, topic: str, detail: str) -> None:
        self.rejected[why] = self.rejected.get(why, 0) + 1
        _log.debug("dropped a request on %s (%s): %s", topic[:120], why, detail[:200])

    def _admitted(self, device_id: str) -> bool:
        """Whether the device may be served now: within its rate, and (with a roster) enrolled, unrevoked."""
        now = time.monotonic()
        rate = self.max_requests_per_s
        tokens, last = self._buckets.get(device_id, (2 * rate, now))
        tokens = min(2 * rate, tokens + (now - last) * rate)
        if tokens < 1:
            self._buckets[device_id] = (tokens, now)
            return False
        self._buckets[device_id] = (tokens - 1, now)
        if len(self._buckets) > 100_000:
            self._buckets.clear()
        return True

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:  # paho's network thread: nothing a device sends may escape and stop it
            self._serve(client, msg)
        except Exception as exc:
            _log.exception("a request on %r failed", msg.topic[:120])
            self._drop("internal", msg.topic, repr(exc))

    def _serve(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        try:
            device_id, _ = parse_device_topic(msg.topic)
            request = parse("request", bytes(msg.payload))
        except ProtocolError as exc:
            self._drop("malformed", msg.topic, exc.message)
            return
        assert isinstance(request, Request)
        if parse_device_topic(request.reply_to)[0] != device_id:
            self._drop("device-mismatch", msg.topic, f"replies asked on {request.reply_to}")
            return
        if not self._admitted(device_id):
            self._drop("rate", msg.topic, f"over {self.max_requests_per_s:g} requests a second")
            return
        if self.roster is not None:
            why = self.roster.refusal(device_id)
            if why is not None:
                self._drop(why, msg.topic, "not an enrolled, unrevoked device")
                return
        if self.chunk_delay_s > 0:
            time.sleep(self.chunk_delay_s)
        reply = self.answer(request)
        try:
            payload = reply.to_bytes()
        except ProtocolError as exc:  # a bug, not the device's fault: say so and keep serving
            _log.error("cannot encode the reply to %s: %s", device_id, exc)
            payload = Reply(request.correlation_id, ok=False, error="unavailable").to_bytes()
        client.publish(request.reply_to, payload, qos=1)

    # --- the pure part --------------------------------------------------------------------------------------

    def answer(self, request: Request) -> Reply:
        """The reply to one request (no I/O besides reading the requested file)."""
        cid = request.correlation_id
        if request.method != "get":
            return Reply(cid, ok=False, error="unknown-method")
        try:
            path, offset, length = self._params(request.params)
        except _BadRequest as exc:
            return Reply(cid, ok=False, error=f"bad-request: {exc}")
        try:
            size, data = self._read(path, offset, min(length, MAX_CHUNK))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return Reply(cid, ok=False, error="not-found")
        except OSError as exc:
            _log.error("cannot read %s: %s", path, exc)
            return Reply(cid, ok=False, error="unavailable")
        self.served_bytes += len(data)
        self.served_requests += 1
        return Reply(cid, ok=True, result={"size": size, "offset": offset,
                                           "data": base64.b64encode(data).decode("ascii")})

    def _read(self, path: Path, offset: int, length: int) -> tuple[int, bytes]:
        """``(file size, bytes [offset, offset + length))``; small files come from a cache keyed by mtime."""
        st = path.stat()
        if st.st_size > _CACHE_FILE_BYTES:
            with path.open("rb") as fh:
                fh.seek(min(offset, st.st_size))
                return st.st_size, fh.read(length)
        key = (path, st.st_mtime_ns, st.st_size)
        content = self._cache.get(key)
        if content is None:
            content = path.read_bytes()
            self._cache[key] = content
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return len(content), content[offset:offset + length]

    # --- broadcast ------------------------------------------------------------------------------------------

    def broadcast(self, rollout_id: str, paths: list[str], chunk: int = BROADCAST_CHUNK,
                  timeout: float = 60.0) -> list[DistInfo]:
        """Publish files once as retained messages on the rollout's distribution topics.

        Args:
            rollout_id: The rollout (its topics are ``edgeml/v1/dist/{rollout_id}/...``).
            paths: Repository paths of the files, ``targets/...``.
            chunk: Bytes per retained message (at most :data:`~edgeml.protocol.MAX_DIST_CHUNK`).
            timeout: Seconds to wait for the broker to acknowledge every message.

        Returns:
            One :class:`~edgeml.protocol.DistInfo` per file.

        Raises:
            ProtocolError: A path is not ``targets/...`` inside the repository, or the chunk size is invalid.
            FileNotFoundError: A file does not exist.
            TimeoutError: The broker did not acknowledge in time.
        """
        if not 0 < chunk <= MAX_DIST_CHUNK:
            raise ProtocolError(f"broadcast chunk must be 1..{MAX_DIST_CHUNK} bytes, got {chunk}")
        infos, pending = [], []
        deadline = time.monotonic() + timeout
        for rel in paths:
            file, info = self._broadcast_file(rel, chunk)
            with file.open("rb") as fh:
                for index in range(info.count):
                    data = fh.read(chunk)
                    pending.append(self._client.publish(dist_chunk_topic(rollout_id, rel, index), data,
                                                        qos=1, retain=True))
                    self.broadcast_bytes += len(data)
            pending.append(self._client.publish(dist_info_topic(rollout_id, rel), info.to_bytes(), qos=1,
                                                retain=True))
            infos.append(info)
        if not self._acknowledged(pending, deadline):
            raise TimeoutError(f"the broker did not acknowledge the broadcast of {rollout_id} in {timeout} s")
        return infos

    def unbroadcast(self, rollout_id: str, infos: list[DistInfo], timeout: float = 30.0) -> None:
        """Clear a broadcast's retained messages (an empty retained payload deletes one)."""
        pending = []
        for info in infos:
            pending.append(self._client.publish(dist_info_topic(rollout_id, info.path), b"", qos=1, retain=True))
            for index in range(info.count):
                pending.append(self._client.publish(dist_chunk_topic(rollout_id, info.path, index), b"", qos=1,
                                                    retain=True))
        self._acknowledged(pending, time.monotonic() + timeout)

    def _acknowledged(self, pending: list[Any], deadline: float) -> bool:
        """Wait until the broker acknowledged every message (QoS 1), the deadline passes, the connection drops or
        the service stops; whether all were acknowledged."""
        for message in pending:
            while not message.is_published():
                if time.monotonic() >= deadline or self._stopping.is_set() or not self._client.is_connected():
                    return False
                try:
                    message.wait_for_publish(0.2)
                except (RuntimeError, ValueError):  # the message could not be queued: the connection is gone
                    return False
        return True

    def _broadcast_file(self, rel: str, chunk: int) -> tuple[Path, DistInfo]:
        if not rel.startswith("targets/"):
            raise ProtocolError(f"only targets are broadcast, got {rel!r}")
        try:
            path = self._params({"path": rel, "offset": 0, "length": 1})[0]
        except _BadRequest as exc:
            raise ProtocolError(f"cannot broadcast {rel!r}: {exc}") from exc
        return path, DistInfo(path=rel, size=path.stat().st_size, chunk=chunk)

    def _params(self, params: dict[str, Any]) -> tuple[Path, int, int]:
        rel, offset, length = params.get("path"), params.get("offset", 0), params.get("length", MAX_CHUNK)
        if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel or rel.startswith("/"):
            raise _BadRequest("'path' must be a relative path")
        parts = rel.split("/")
        if parts[0] not in _AREAS or len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
            raise _BadRequest(f"'path' must be metadata/<file> or targets/<file>, got {rel!r}")
        for name, value in (("offset", offset), ("length", length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _BadRequest(f"{name!r} must be an integer >= 0")
        if not 0 < length <= MAX_REQUEST_LENGTH:
            raise _BadRequest(f"'length' must be 1..{MAX_REQUEST_LENGTH}")
        path = (self.repository / rel).resolve()
        if not path.is_relative_to(self.repository / parts[0]):  # a symlink pointing out
            raise _BadRequest(f"{rel!r} is outside the repository")
        return path, offset, length
