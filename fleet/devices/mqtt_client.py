"""A paho MQTT client for the fleet's busiest subscriber, ingest: it reads the broker's stream in large chunks and
acknowledges many messages in one write.

paho reads each incoming packet with three or four ``recv`` calls on the socket (the type byte, each length byte,
then the body), and waits in ``select`` before every packet: for a 400-byte telemetry message that is some five
system calls, a third of what a subscriber spends per message. :class:`BufferedClient` hands paho a socket whose
reads come from a buffer filled up to :data:`CHUNK` bytes at a time, and that reports what it holds through
``pending()``, the hook paho already asks of TLS sockets (which hold decrypted bytes that ``select`` cannot see)
before it decides to wait. Everything else (writes, TLS, reconnects, keepalive) is paho's.

With ``manual_ack``, :meth:`BufferedClient.ack_all` acknowledges a batch of QoS 1 messages with their PUBACK
packets joined into one write, where paho's ``ack()`` queues each alone (and wakes the network thread for each).

Both rest on paho's private methods (paho 2.x): ``_create_socket`` is overridden and ``_packet_queue`` called.
With another paho the client reads and acknowledges as paho does (:data:`BUFFERED` says which), so a paho
upgrade costs speed, never correctness.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt

__all__ = ["BUFFERED", "CHUNK", "BufferedClient", "ReadBuffer"]

CHUNK = 64 * 1024  # bytes asked of the socket per read
#: Whether this paho lets :class:`BufferedClient` buffer its reads and join its acknowledgements.
BUFFERED = paho.mqtt.__version__.startswith("2.") and hasattr(mqtt.Client, "_create_socket") \
    and hasattr(mqtt.Client, "_packet_queue")
_PUBACK = struct.Struct("!BBH")  # a PUBACK without reason code or properties (MQTT 3.1.1 and 5): type, length 2, mid
_PUBACK_TYPE = 0x40


class ReadBuffer:
    """A connected socket (plain or TLS) whose reads are served from a buffer filled ``chunk`` bytes at a time.

    ``recv(n)`` returns at most ``n`` bytes: what the buffer holds, or else what one read of the socket brings
    (raising what the socket raises: ``BlockingIOError`` on a non-blocking socket with nothing to read, the TLS
    want-read errors). ``pending()`` counts the bytes held here and in the TLS layer below. Every other attribute
    is the socket's.
    """

    __slots__ = ("_buf", "_chunk", "_pos", "_sock")

    def __init__(self, sock: Any, chunk: int = CHUNK) -> None:
        self._sock, self._chunk = sock, chunk
        self._buf, self._pos = b"", 0

    def recv(self, size: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            buf = self._sock.recv(max(size, self._chunk))
            if len(buf) <= size:  # all of it (or the end of the stream, b""): nothing to keep
                self._buf, self._pos = b"", 0
                return bytes(buf)
            pos = 0
        end = pos + size
        if end >= len(buf):
            self._buf, self._pos = b"", 0
            return buf[pos:]
        self._buf, self._pos = buf, end
        return buf[pos:end]

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buf) - self._pos + int(inner)

    def send(self, data: bytes | bytearray) -> int:
        return int(self._sock.send(data))

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def close(self) -> None:
        self._buf, self._pos = b"", 0
        self._sock.close()

    def __getattr__(self, name: str) -> Any:  # setsockopt, getpeername, ...: the socket's own
        return getattr(self._sock, name)


class BufferedClient(mqtt.Client):
    """:class:`paho.mqtt.client.Client` reading through a :class:`ReadBuffer` over TCP (with or without TLS); over
    WebSockets or a Unix socket, or with a paho that does not allow it (:data:`BUFFERED`), as paho reads."""

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        if BUFFERED and self._transport == "tcp":
            return ReadBuffer(sock)
        return sock

    def ack_all(self, mids: Iterable[int]) -> None:
        """``ack(mid, 1)`` for each of ``mids`` (QoS 1 messages received on the current connection), in one write."""
        mids = list(mids)
        if not mids:
            return
        if BUFFERED:
            self._packet_queue(_PUBACK_TYPE, b"".join([_PUBACK.pack(_PUBACK_TYPE, 2, mid) for mid in mids]), 0, 0)
            return
        for mid in mids:
            self.ack(mid, 1)
