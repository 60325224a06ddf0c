"""Many MQTT connections driven by one network thread, for the simulator and the benchmarks.

A real device runs one paho client with its own network thread (``loop_start``). Simulating a thousand
devices that way costs two thousand threads; :class:`ClientPool` instead drives every client's socket
from one thread with :mod:`selectors` through paho's external-loop API (``loop_read``, ``loop_write``,
``loop_misc``). Each client is still its own connection with its own session, and code written for a
device (publish from any thread, callbacks on the network thread) runs unchanged on top of it.

Clients are added after ``connect()`` (which sends CONNECT); the pool reads the CONNACK and everything
after it. A client whose connection drops is removed from the pool (reconnecting is the caller's job).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["ClientPool"]

_log = logging.getLogger(__name__)
_TICK_S = 0.05  # longest wait of the network thread; bounds the delay of a publish from another thread


class ClientPool:
    """Runs the network I/O of many paho clients in one background thread.

    Example::

        pool = ClientPool()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sim-1")
        client.connect("127.0.0.1", 1883)
        pool.add(client)
        pool.start()
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._clients: dict[mqtt.Client, Any] = {}  # client -> its registered socket
        self._writing: set[mqtt.Client] = set()  # clients whose socket is watched for writability too
        self._to_write: set[mqtt.Client] = set()  # clients that queued packets since the last round
        self._added: list[mqtt.Client] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ident = 0  # the network thread's id, once it runs

    def add(self, client: mqtt.Client) -> None:
        """Hand a connected client (``connect()`` returned) to the pool; safe from any thread."""
        client.on_socket_register_write = self._on_register_write
        with self._lock:
            self._added.append(client)
        self._wake()

    def start(self) -> None:
        """Start the network thread."""
        self._thread = threading.Thread(target=self._run, name="mqtt-pool", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the network thread (clients stay as they are; disconnect them first for a clean close)."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __len__(self) -> int:
        return len(self._clients) + len(self._added)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # paho calls this once when a client's queue of outgoing packets stops being empty, from whichever
        # thread published; only those clients are written, not every client after every wake-up
        with self._lock:
            self._to_write.add(client)
        if threading.get_ident() != self._ident:  # the network thread itself writes before it selects again
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full buffer means a wake-up is already pending
            self._wake_w.send(b"\0")

    def _write(self, client: mqtt.Client) -> None:
        """Send what the client has queued; watch its socket for writability while some remains (the
        socket's buffer was full) and stop watching once all is sent."""
        sock = self._clients.get(client)
        if sock is None:
            return
        if client.want_write() and client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
            self._drop(client)
            return
        wants = client.want_write()
        if wants != (client in self._writing):
            try:
                self._selector.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if wants else 0), client)
            except (KeyError, ValueError, OSError):  # its socket was closed meanwhile (a disconnect)
                self._drop(client)
                return
            if wants:
                self._writing.add(client)
            else:
                self._writing.discard(client)

    def _admit(self) -> None:
        with self._lock:
            added, self._added = self._added, []
        for client in added:
            sock = client.socket()
            if sock is None:
                _log.warning("pool: client %s is not connected; ignored", client._client_id)
                continue
            self._selector.register(sock, selectors.EVENT_READ, client)
            self._clients[client] = sock
        with self._lock:
            self._to_write.update(c for c in added if c in self._clients)  # what they queued before the pool knew them

    def _drop(self, client: mqtt.Client) -> None:
        sock = self._clients.pop(client, None)
        self._writing.discard(client)
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(sock)

    def _run(self) -> None:
        self._ident = threading.get_ident()
        last_misc = time.monotonic()
        while not self._stop.is_set():
            self._admit()
            for key, events in self._selector.select(timeout=0 if self._to_write else _TICK_S):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        while self._wake_r.recv(4096):
                            pass
                    continue
                client = key.data
                if events & selectors.EVENT_READ and client in self._clients and \
                        client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                    self._drop(client)
                if events & selectors.EVENT_WRITE:
                    self._write(client)
            with self._lock:
                queued, self._to_write = self._to_write, set()
            for client in queued:
                self._write(client)
            now = time.monotonic()
            if now - last_misc >= 1.0:
                last_misc = now
                for client in list(self._clients):
                    client.loop_misc()
                    if client.want_write():  # a safety net: nothing waits longer than a second
                        self._write(client)
