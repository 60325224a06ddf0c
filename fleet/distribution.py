"""The distribution service: serves the registry's ``repository/`` to devices over MQTT request/reply.

A device sends a :class:`~edgeml.protocol.Request` with method ``"get"`` and params
``{"path": "metadata/<file>" | "targets/<file>", "offset": int, "length": int}`` on its own
``requests`` topic; the service answers on the request's ``reply_to`` with a :class:`~edgeml.protocol.Reply`
whose result is ``{"size": total size, "offset": offset, "data": base64 of the bytes}`` (QoS 1). A missing
file is ``ok: false`` with error ``"not-found"``; a path outside the repository or bad params is
``"bad-request"``. The service holds no state per device: the device asks for the next chunk only once the
previous one arrived (flow control), and resuming is asking from another offset.

Each reply carries at most :data:`MAX_CHUNK` bytes so that it fits the protocol's reply size limit; the
device advances by the length of the data it received. Nothing here verifies anything: the device checks
every byte against the signed TUF metadata.
"""

from __future__ import annotations

import base64
import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgeml.protocol import MAX_BYTES, PREFIX, ProtocolError, Reply, Request, parse, parse_device_topic

__all__ = ["MAX_CHUNK", "MAX_REQUEST_LENGTH", "DistributionService"]

_log = logging.getLogger(__name__)

#: Largest chunk one reply carries: its base64 plus the JSON envelope must fit MAX_BYTES["reply"].
MAX_CHUNK = (MAX_BYTES["reply"] - 1024) // 4 * 3 // 1024 * 1024
#: Largest ``length`` a request may ask for (answered with at most MAX_CHUNK bytes).
MAX_REQUEST_LENGTH = 256 * 1024
REQUESTS_FILTER = f"{PREFIX}devices/+/requests"
_AREAS = ("metadata", "targets")


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
    """

    def __init__(self, registry_dir: Path, broker_host: str, broker_port: int, username: str | None = None,
                 password: str | None = None, tls: ssl.SSLContext | None = None,
                 chunk_delay_s: float = 0.0) -> None:
        self.chunk_delay_s = chunk_delay_s
        self.repository = Path(registry_dir).resolve() / "repository"
        self.broker_host = broker_host
        self.broker_port = broker_port
        self._subscribed = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgeml-dist-{id(self):x}")
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set_context(tls)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self.served_bytes = 0

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
            raise TimeoutError(f"not subscribed to {REQUESTS_FILTER} on {self.broker_host}:{self.broker_port} "
                               f"within {timeout} s")

    def stop(self) -> None:
        """Disconnect and stop the background thread."""
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
        client.subscribe(REQUESTS_FILTER, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if all(not r.is_failure for r in reasons):
            self._subscribed.set()
        else:
            _log.error("broker refused the subscription to %s: %s", REQUESTS_FILTER, reasons)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            device_id, _ = parse_device_topic(msg.topic)
            request = parse("request", bytes(msg.payload))
        except ProtocolError as exc:
            _log.warning("ignored a malformed request on %s: %s", msg.topic, exc)
            return
        assert isinstance(request, Request)
        if parse_device_topic(request.reply_to)[0] != device_id:
            _log.warning("ignored a request from %s asking for replies on %s", device_id, request.reply_to)
            return
        if self.chunk_delay_s > 0:
            time.sleep(self.chunk_delay_s)
        reply = self.answer(request)
        client.publish(request.reply_to, reply.to_bytes(), qos=1)

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
            with path.open("rb") as fh:
                size = fh.seek(0, 2)
                fh.seek(min(offset, size))
                data = fh.read(min(length, MAX_CHUNK))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return Reply(cid, ok=False, error="not-found")
        except OSError as exc:
            _log.error("cannot read %s: %s", path, exc)
            return Reply(cid, ok=False, error="unavailable")
        self.served_bytes += len(data)
        return Reply(cid, ok=True, result={"size": size, "offset": offset,
                                           "data": base64.b64encode(data).decode("ascii")})

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
