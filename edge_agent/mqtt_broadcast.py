"""A rollout's broadcast, received: one file's retained chunks put back in order, the gaps asked for by get.

The fleet broadcasts a rollout's files as retained messages under ``edgeml/v1/dist/{rollout_id}/`` (see
:mod:`edgeml.protocol`): an ``info`` announcement (size, chunk size, chunk count) and one message per chunk,
numbered. A :class:`BroadcastReceiver` subscribes to one file's messages and keeps them in an inbox, in
memory, until a fetch takes them; it hands out the file's bytes in order, and asks for the chunks that did
not arrive with get requests (all of the file when no announcement comes in time). It belongs to a
:class:`~edgeml.edge_agent.mqtt_fetcher.MqttFetcher`, which does the get requests. Nothing here is trusted:
a chunk that does not fit the announcement is dropped, and ngclient checks the length, hash and signatures
of the result.

Map::

    BroadcastReceiver.listen()    subscribe to one file's broadcast now (on an update command, before the fetch)
    BroadcastReceiver.receive()   the file's bytes from an offset: broadcast chunks as they come, get for gaps
    BroadcastReceiver.stop() / close()   unsubscribe from one file / from all of them
    Pieces                        byte ranges received out of order, handed out in order (get replies too)
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
from tuf.api.exceptions import DownloadError

from edgeml.protocol import DistInfo, ProtocolError, dist_file_filter, parse

__all__ = ["BroadcastReceiver", "Pieces"]


class BroadcastReceiver:
    """The broadcast side of one device's fetcher.

    Args:
        client: The fetcher's paho client (connected, VERSION2 callbacks, loop running).
        subscribe: Subscribes to a topic and waits for the broker's confirmation; raises DownloadError.
        get: ``get(path, start, end)``: the file's bytes from ``start`` to ``end`` (None: to its end), in
            order, by get requests.
        stats: The fetcher's counters; ``stats["broadcast_bytes"]`` grows by each broadcast chunk kept.
    """

    def __init__(self, client: mqtt.Client, subscribe: Callable[[str], None],
                 get: Callable[[str, int, int | None], Iterator[bytes]], stats: dict[str, int]) -> None:
        self.client = client
        self.stats = stats
        self.last_message_at = 0.0  # time.monotonic() of the latest broadcast message
        self._subscribe = subscribe
        self._get = get
        self._listening: dict[tuple[str, str], tuple[str, queue.Queue[tuple[str, Any]]]] = {}

    def listen(self, rollout_id: str, path: str) -> None:
        """Start receiving a broadcast file now, ahead of the fetch that will use it.

        An update command names the rollout and the file it will deliver; listening at once lets the
        broker deliver the chunks while the device is still refreshing its metadata. The chunks wait in
        memory, untrusted, until the fetch of ``path`` takes them (and TUF verifies the result).

        Raises:
            ProtocolError: The rollout id is invalid.
            DownloadError: The broker did not confirm the subscription.
        """
        if (rollout_id, path) in self._listening:
            return
        inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        topic = dist_file_filter(rollout_id, path)

        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            last = msg.topic.rsplit("/", 1)[-1]
            if not msg.payload:
                return  # a cleared retained message
            self.last_message_at = time.monotonic()
            if last == "info":
                inbox.put(("info", bytes(msg.payload)))
            elif last.isdigit():
                inbox.put(("chunk", (int(last), bytes(msg.payload))))

        self.client.message_callback_add(topic, on_message)
        self._listening[(rollout_id, path)] = (topic, inbox)
        try:
            self._subscribe(topic)
        except DownloadError:
            self.stop(rollout_id, path)
            raise

    def stop(self, rollout_id: str, path: str) -> None:
        """Stop listening to one file's broadcast (nothing happens if not listening)."""
        entry = self._listening.pop((rollout_id, path), None)
        if entry is not None:
            self.client.message_callback_remove(entry[0])
            self.client.unsubscribe(entry[0])

    def close(self) -> None:
        """Stop listening to every broadcast."""
        for rollout_id, path in list(self._listening):
            self.stop(rollout_id, path)

    def receive(self, path: str, start: int, rollout_id: str, wait_s: float, stall_s: float) -> Iterator[bytes]:
        """The file's bytes from ``start``: broadcast chunks as they come, get requests for the gaps.

        Args:
            path: The file, as the broadcast's announcement names it (``targets/...``).
            start: Offset of the first byte wanted (a resumed download starts past 0).
            rollout_id: The rollout whose broadcast carries the file.
            wait_s: Seconds to wait for the announcement before getting the whole file by get requests.
            stall_s: Seconds without a new broadcast message after which the missing chunks are asked for.
        """
        self.listen(rollout_id, path)
        try:
            yield from self._assemble(path, start, self._listening[(rollout_id, path)][1], wait_s, stall_s)
        finally:
            self.stop(rollout_id, path)

    def _assemble(self, path: str, start: int, inbox: queue.Queue[tuple[str, Any]], wait_s: float,
                  stall_s: float) -> Iterator[bytes]:
        info: DistInfo | None = None
        early: dict[int, bytes] = {}  # chunks that came before the announcement
        pieces = Pieces(start)
        wait = wait_s
        while info is None or pieces.next < info.size:
            try:
                kind, item = inbox.get(timeout=wait)
            except queue.Empty:
                if info is None:  # no broadcast of this file: get it all
                    yield from self._get(path, pieces.next, None)
                    return
                yield from self._fill_gaps(path, info, pieces)
                continue
            if kind == "info":
                info = _dist_info(item, path)
                if info is None:
                    continue
                for index, data in early.items():
                    self.stats["broadcast_bytes"] += _add_chunk(pieces, info, index, data)
                early.clear()
                wait = stall_s
            elif info is None:
                early[item[0]] = item[1]
            else:
                self.stats["broadcast_bytes"] += _add_chunk(pieces, info, *item)
            yield from pieces.pop_ready()

    def _fill_gaps(self, path: str, info: DistInfo, pieces: Pieces) -> Iterator[bytes]:
        """Ask for the chunks that did not arrive (and yield what becomes contiguous)."""
        for index in range(pieces.next // info.chunk, info.count):
            begin = max(index * info.chunk, pieces.next)
            end = min(info.size, (index + 1) * info.chunk)
            if begin < end and not pieces.covers(begin, end):
                for data in self._get(path, begin, end):
                    pieces.add(begin, data)
                    begin += len(data)
            yield from pieces.pop_ready()


class Pieces:
    """Byte ranges received out of order, handed out in order from ``next``."""

    def __init__(self, start: int) -> None:
        self.next = start
        self._held: dict[int, bytes] = {}

    def add(self, offset: int, data: bytes) -> None:
        if data and offset + len(data) > self.next:
            self._held[offset] = data

    def covers(self, begin: int, end: int) -> bool:
        return any(o <= begin and o + len(d) >= end for o, d in self._held.items())

    def limit(self, size: int | None, end: int | None) -> int | None:
        if size is None:
            return end
        return size if end is None else min(size, end)

    def pop_ready(self) -> Iterator[bytes]:
        while self._held:
            data = self._held.pop(self.next, None)
            if data is None:
                over = [o for o, d in self._held.items() if o < self.next < o + len(d)]
                if not over:
                    for o in [o for o, d in self._held.items() if o + len(d) <= self.next]:
                        del self._held[o]  # wholly behind us
                    return
                o = over[0]
                data = self._held.pop(o)[self.next - o:]
            self.next += len(data)
            yield data


def _dist_info(payload: bytes, path: str) -> DistInfo | None:
    try:
        info = parse("dist", payload)
    except ProtocolError:
        return None
    return info if isinstance(info, DistInfo) and info.path == path else None


def _add_chunk(pieces: Pieces, info: DistInfo, index: int, data: bytes) -> int:
    """Keep a broadcast chunk that fits the announcement; returns the bytes kept."""
    expected = min(info.chunk, info.size - index * info.chunk)
    if 0 <= index < info.count and len(data) == expected:
        pieces.add(index * info.chunk, data)
        return len(data)
    return 0
