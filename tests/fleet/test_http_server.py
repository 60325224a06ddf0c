"""The fleet's HTTP listener itself, over real sockets: no request desynchronisation, the body limit enforced
while reading, timeouts for slow clients, bounded connections and threads, and the one error mapping.

Requests are written byte for byte on a raw socket where framing matters (pipelining, smuggling, trickling);
responses are parsed from the same buffered stream, so that a response the server should not have sent would
be seen.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from edgeml.errors import ConfigError, ConflictError, EdgeMLError, NotFoundError, RegistryError
from edgeml.fleet.registry.repository import Registry
from edgeml.fleet.web.auth import AuthError, ForbiddenError, Role, create_token
from edgeml.fleet.web.routes import ApiCall, api_route, static_route
from edgeml.fleet.web.server import (
    HttpServer,
    HttpSettings,
    RequestTimeoutError,
    RequestTooLargeError,
    build_app,
    error_response,
)

SMUGGLED = b"GET /hit HTTP/1.1\r\nHost: fleet\r\n\r\n"
SECRET_PATH = "/srv/edgeml/registry/keys/targets.pem"


class Listener:
    """A listener with a counting GET /hit, a POST /echo that needs an operator token, and static files."""

    def __init__(self, registry: Registry, tmp_path: Path, settings: HttpSettings) -> None:
        self.hits = 0
        self.echoed: list[dict[str, Any]] = []
        self.db = registry.database()
        self.token = create_token(self.db, "ops", Role.OPERATOR)
        (tmp_path / "files").mkdir()
        (tmp_path / "files" / "a.txt").write_bytes(b"file a\n")

        def hit(call: ApiCall) -> dict[str, int]:
            self.hits += 1
            return {"hits": self.hits}

        def echo(call: ApiCall) -> dict[str, Any]:
            self.echoed.append(dict(call.body))
            return dict(call.body)

        self.app = build_app([api_route("/hit", hit), api_route("/echo", echo, methods=["POST"], body=True,
                                                                  db=self.db, role=Role.OPERATOR),
                              static_route("/files/", tmp_path / "files")], settings)
        self.http = HttpServer(self.app, "127.0.0.1", 0)

    def connect(self, timeout: float = 10.0) -> tuple[socket.socket, BinaryIO]:
        sock = socket.create_connection(("127.0.0.1", self.http.port), timeout=timeout)
        return sock, sock.makefile("rb")


def read_response(stream: BinaryIO) -> tuple[int, dict[str, str], bytes] | None:
    """The next response on ``stream`` (status, headers, body), or None when the server closed."""
    line = stream.readline()
    if not line:
        return None
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while (header := stream.readline()) not in (b"\r\n", b""):
        name, _, value = header.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers.get("content-length", "0")))


def closed(sock: socket.socket, stream: BinaryIO, within: float = 5.0) -> bool:
    """Whether the server closes the connection within ``within`` seconds without sending anything more."""
    sock.settimeout(within)
    try:
        return stream.read(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


@pytest.fixture
def listener(registry: Registry, tmp_path: Path) -> Iterator[Listener]:
    server = Listener(registry, tmp_path, HttpSettings(max_body_bytes=1024, head_timeout_s=1.0, body_timeout_s=1.0))
    with server.http:
        yield server
    server.db.close()


def _chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


# (request whose body is a smuggled request, status it gets, whether the connection then stays usable)
REFUSED = {
    "404": (b"POST /nowhere HTTP/1.1\r\nHost: fleet\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
            404, True),
    "405": (b"PUT /files/a.txt HTTP/1.1\r\nHost: fleet\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
            405, True),
    "401-before-the-body": (b"POST /echo HTTP/1.1\r\nHost: fleet\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
                            + SMUGGLED, 401, True),
    "404-chunked": (b"POST /nowhere HTTP/1.1\r\nHost: fleet\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + _chunked(SMUGGLED), 404, True),
    "length-and-chunked": (b"POST /hit HTTP/1.1\r\nHost: fleet\r\nContent-Length: 5\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(SMUGGLED), 400, False),
    "bad-path": (b"POST /files/../a.txt HTTP/1.1\r\nHost: fleet\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
                 + SMUGGLED, 400, False),
}


def nothing_more(sock: socket.socket, stream: BinaryIO, within: float = 0.5) -> bool:
    """Whether no byte arrives within ``within`` seconds (the connection left open)."""
    sock.settimeout(within)
    try:
        stream.read(1)
    except TimeoutError:
        return True
    return False


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_body_sent_to_a_refused_request_is_never_parsed_as_a_request(listener: Listener, case: str) -> None:
    first, status, reusable = REFUSED[case]
    sock, stream = listener.connect()
    with sock:
        sock.sendall(first + b"GET /files/a.txt HTTP/1.1\r\nHost: fleet\r\n\r\n")  # pipelined, one write
        response = read_response(stream)
        assert response is not None and response[0] == status
        assert json.loads(response[2])["status"] == status
        if not reusable:  # refused before its framing could be trusted: nothing more on this connection
            assert closed(sock, stream)
            assert listener.hits == 0
            return
        second = read_response(stream)
        assert second is not None and second[::2] == (200, b"file a\n")
        sock.sendall(b"GET /hit HTTP/1.1\r\nHost: fleet\r\n\r\n")
        third = read_response(stream)
        assert third is not None and json.loads(third[2]) == {"hits": 1}  # the real /hit; the smuggled one never ran
        assert nothing_more(sock, stream)
    assert listener.hits == 1


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_over_the_limit_is_refused_while_it_is_read(listener: Listener, framing: str) -> None:
    body = json.dumps({"pad": "x" * 2000}).encode()
    head = f"POST /echo HTTP/1.1\r\nHost: fleet\r\nAuthorization: Bearer {listener.token}\r\n".encode()
    sock, stream = listener.connect()
    with sock:
        if framing == "length":  # the declared length is refused before a byte of the body is read
            sock.sendall(head + f"Content-Length: {len(body)}\r\n\r\n".encode())
        else:  # no length declared: counted while read, refused at the limit
            sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(body), 256):
                part = body[i:i + 256]
                sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        response = read_response(stream)
        assert response is not None and response[0] == 413 and response[1]["connection"] == "close"
        assert json.loads(response[2]) == {"error": "the request body is over 1024 bytes",
                                           "hint": "the API's requests are small JSON objects", "status": 413}
        assert closed(sock, stream)
    assert listener.echoed == []
    small = http.client.HTTPConnection("127.0.0.1", listener.http.port, timeout=10)
    small.request("POST", "/echo", body=b'{"a": 1}', headers={"Authorization": f"Bearer {listener.token}"})
    assert small.getresponse().read() == b'{"a":1}' and listener.echoed == [{"a": 1}]
    small.close()


def test_a_client_that_trickles_its_request_head_is_cut_off(listener: Listener) -> None:
    sock, stream = listener.connect()
    with sock:
        started = time.monotonic()
        sock.sendall(b"GET /hit HTTP/1.1\r\nHost: fleet\r\n")
        cut = False
        for _ in range(40):  # a header byte every 0.1 s: 4 s of trickling, the head timeout is 1 s
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            time.sleep(0.1)
        cut = cut or closed(sock, stream, within=1.0)
    assert cut and time.monotonic() - started < 4.0
    assert listener.hits == 0


def test_a_client_that_trickles_its_body_gets_408(listener: Listener) -> None:
    sock, stream = listener.connect()
    with sock:
        sock.sendall(f"POST /echo HTTP/1.1\r\nHost: fleet\r\nAuthorization: Bearer {listener.token}\r\n"
                     "Content-Length: 100\r\n\r\n{".encode())
        response = read_response(stream)  # the body timeout is 1 s; 99 bytes never come
        assert response is not None and response[0] == 408 and response[1]["connection"] == "close"
        assert json.loads(response[2])["error"] == "the request body did not arrive within 1 s"
        assert closed(sock, stream)
    assert listener.echoed == []


def test_an_idle_keep_alive_connection_is_closed(registry: Registry, tmp_path: Path) -> None:
    server = Listener(registry, tmp_path, HttpSettings(keep_alive_s=1))
    with server.http:
        sock, stream = server.connect()
        with sock:
            sock.sendall(b"GET /hit HTTP/1.1\r\nHost: fleet\r\n\r\n")
            assert read_response(stream) is not None
            assert closed(sock, stream, within=5.0)
    server.db.close()


def test_connections_beyond_the_limit_are_refused(registry: Registry, tmp_path: Path) -> None:
    server = Listener(registry, tmp_path, HttpSettings(max_connections=4))
    with server.http:
        held, statuses = [], []
        try:
            for _ in range(6):  # keep-alive connections, each held open after its request
                sock, stream = server.connect()
                held.append(sock)
                sock.sendall(b"GET /hit HTTP/1.1\r\nHost: fleet\r\n\r\n")
                response = read_response(stream)
                statuses.append(response[0] if response else None)
        finally:
            for sock in held:
                sock.close()
        served = statuses.count(200)
        assert 1 <= served <= 4 and statuses == [200] * served + [503] * (6 - served)
        deadline = time.monotonic() + 10
        while True:  # once they are closed, new connections are served again
            sock, stream = server.connect()
            with sock:
                sock.sendall(b"GET /hit HTTP/1.1\r\nHost: fleet\r\n\r\n")
                response = read_response(stream)
            if response is not None and response[0] == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert response is not None and response[0] == 200
    server.db.close()


def test_route_code_runs_on_a_bounded_thread_pool(tmp_path: Path) -> None:
    lock, running, peak = threading.Lock(), [0], [0]

    def slow(call: ApiCall) -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return "done"

    with HttpServer(build_app([api_route("/slow", slow)], HttpSettings(threads=2)), port=0) as http_server:
        def call() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=30)
            conn.request("GET", "/slow")
            assert conn.getresponse().read() == b'"done"'
            conn.close()

        callers = [threading.Thread(target=call) for _ in range(6)]
        for t in callers:
            t.start()
        for t in callers:
            t.join()
    assert peak[0] == 2


# --- one mapping from errors to statuses -------------------------------------------------------------------

DB_FAILURE = RegistryError("registry database postgresql+psycopg://fleet:s3cret@db.internal:5432/fleet failed: "
                           "OperationalError: connection refused")
ERRORS = [  # (raised by the route, status, error, hint)
    (AuthError("no operator token", hint="send a token"), 401, "no operator token", "send a token"),
    (ForbiddenError("token 'v' is a viewer; this needs operator"), 403, "token 'v' is a viewer; this needs operator",
     None),
    (NotFoundError("unknown rollout 'ro-x'"), 404, "unknown rollout 'ro-x'", None),
    (ConflictError("rollout ro-x is aborted; it cannot be paused"), 409, "rollout ro-x is aborted; it cannot be "
     "paused", None),
    (ConfigError("bad value 'x' for query parameter 'limit'", hint="a number"), 400,
     "bad value 'x' for query parameter 'limit'", "a number"),
    (RequestTooLargeError("too large"), 413, "too large", None),
    (RequestTimeoutError("too slow"), 408, "too slow", None),
    (DB_FAILURE, 503, "the fleet's database is unavailable", "try again shortly; the fleet server's log says why"),
    (EdgeMLError(f"cannot read {SECRET_PATH}"), 500, "internal server error", "the fleet server's log has the "
     "details"),
    (KeyError(SECRET_PATH), 500, "internal server error", "the fleet server's log has the details"),
]


@pytest.mark.parametrize(("exc", "status", "error", "hint"), ERRORS, ids=[type(e[0]).__name__ for e in ERRORS])
def test_every_error_becomes_one_status_and_one_shape(tmp_path: Path, exc: BaseException, status: int, error: str,
                                                      hint: str | None) -> None:
    def fail(call: ApiCall) -> None:
        raise exc

    def fail_plain(request: Any) -> PlainTextResponse:
        raise exc

    routes = [api_route("/fail", fail), Route("/fail-plain", fail_plain)]
    with HttpServer(build_app(routes), port=0) as http_server:
        for path in ("/fail", "/fail-plain"):
            conn = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=10)
            conn.request("GET", path)
            response = conn.getresponse()
            raw = response.read()
            conn.close()
            assert (response.status, response.getheader("Content-Type")) == (status, "application/json")
            assert json.loads(raw) == {"error": error, "hint": hint, "status": status}
            for secret in ("s3cret", "db.internal", "psycopg", "OperationalError", SECRET_PATH, "KeyError"):
                assert secret not in raw.decode()
            assert (response.getheader("WWW-Authenticate") is not None) == (status == 401)
    assert error_response(exc).status_code == status


def test_a_stopped_listener_frees_its_port(tmp_path: Path) -> None:
    server = HttpServer(build_app([]), port=0)
    server.stop()  # not started: nothing to do
    with server:
        port = server.port
        assert port > 0
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with HttpServer(build_app([]), port=port) as again:  # the same port is free to listen on again
        assert again.port == port


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="must be positive: max_body_bytes, threads"):
        HttpSettings(max_body_bytes=0, threads=-1)
