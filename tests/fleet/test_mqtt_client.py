"""The buffered reads under the ingest worker's paho client (:mod:`edgeml.fleet.devices.mqtt_client`), on real
sockets. The worker's own tests (tests/fleet/test_ingest.py) run it against Mosquitto, and the security suite over
TLS."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeml.fleet.devices.mqtt_client import BUFFERED, BufferedClient, ReadBuffer


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_small_reads_come_from_one_read_of_the_socket(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    buffered = ReadBuffer(ours)
    peer.sendall(b"\x30\x0bhello world")
    assert buffered.recv(1) == b"\x30"
    assert buffered.pending() == 12  # held here: select() would not see them, paho asks this first
    assert buffered.recv(1) == b"\x0b"
    assert buffered.recv(11) == b"hello world"
    assert buffered.pending() == 0


def test_a_read_returns_what_is_held_without_waiting_for_more(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    ours.setblocking(False)
    buffered = ReadBuffer(ours)
    peer.sendall(b"abcd")
    assert buffered.recv(2) == b"ab"
    assert buffered.recv(100) == b"cd"  # a partial read, as paho expects of a socket
    with pytest.raises(BlockingIOError):
        buffered.recv(100)
    peer.sendall(b"ef")
    assert buffered.recv(100) == b"ef"


def test_the_end_of_the_stream_reads_as_empty(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    buffered = ReadBuffer(ours)
    peer.sendall(b"xy")
    peer.shutdown(socket.SHUT_WR)
    assert buffered.recv(1) == b"x"
    assert buffered.recv(5) == b"y"
    assert buffered.recv(5) == b""


def test_writes_and_everything_else_are_the_sockets(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    buffered = ReadBuffer(ours)
    assert buffered.send(b"ping") == 4 and peer.recv(4) == b"ping"
    assert buffered.fileno() == ours.fileno()
    assert buffered.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
    buffered.close()
    assert ours.fileno() == -1


@settings(max_examples=60, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20),
       sizes=st.lists(st.integers(1, 200), min_size=1, max_size=50), chunk=st.integers(1, 500))
def test_the_stream_read_is_the_stream_sent(chunks: list[bytes], sizes: list[int], chunk: int) -> None:
    ours, peer = socket.socketpair()
    try:
        sent = b"".join(chunks)
        writer = threading.Thread(target=lambda: [peer.sendall(c) for c in chunks] and peer.shutdown(socket.SHUT_WR))
        writer.start()
        buffered, got, i = ReadBuffer(ours, chunk=chunk), bytearray(), 0
        while True:
            data = buffered.recv(sizes[i % len(sizes)])
            assert len(data) <= sizes[i % len(sizes)]
            if not data:
                break
            got += data
            i += 1
        writer.join()
        assert bytes(got) == sent
    finally:
        ours.close()
        peer.close()


def test_this_paho_is_read_through_the_buffer() -> None:
    """The speed-up applies to the paho the project installs (a future paho falls back to its own reads)."""
    assert BUFFERED
    server = socket.create_server(("127.0.0.1", 0))
    try:
        client = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id="t")
        client._host, client._port = "127.0.0.1", server.getsockname()[1]
        sock = client._create_socket()
        assert isinstance(sock, ReadBuffer)
        sock.close()
    finally:
        server.close()
