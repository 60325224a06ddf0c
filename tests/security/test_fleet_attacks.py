"""Attacks on the fleet's own surfaces, against the same running deployment (``edgeml fleet serve`` processes):
its HTTP listener, its registry and its audit log. Narrower cases live beside their modules (the threat table
in docs/security.md names them all)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from tests.security.conftest import Deployment


def _raw_http(deployment: Deployment, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to the web listener and read until it closes the connection or goes quiet."""
    url = urlsplit(deployment.http_url)
    chunks = []
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server may answer and close first
            sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


@pytest.mark.parametrize("first", [b"POST /no-such-route HTTP/1.1", b"POST /api/rollouts HTTP/1.1",
                                   b"DELETE /metadata/root.json HTTP/1.1"])
def test_a_body_is_never_read_as_a_second_request(deployment: Deployment, first: bytes) -> None:
    """Desynchronisation behind a connection-reusing proxy: a body smuggling a request must stay a body."""
    smuggled = b"GET /metadata/timestamp.json HTTP/1.1\r\nHost: x\r\n\r\n"
    data = (first + b"\r\nHost: x\r\nContent-Length: " + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled
            + b"GET /no-such-page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = _raw_http(deployment, data)
    statuses = [line.split(b" ")[1] for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    # the first request is answered; the connection is then closed (or, its body drained, the next real
    # request answered too): never an answer for the smuggled one
    assert 1 <= len(statuses) <= 2 and statuses[0] in (b"401", b"404", b"405"), answer[:2000]
    assert all(s != b"200" for s in statuses) and b'"signed"' not in answer  # timestamp.json was never served


def test_both_lengths_are_refused_and_the_connection_closed(deployment: Deployment) -> None:
    data = (b"POST /api/rollouts HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /metadata/timestamp.json HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = _raw_http(deployment, data)
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1 ") == 1, answer[:500]


@pytest.mark.parametrize(("request_line", "status"), [
    (b"GET /api/rollouts/nope HTTP/1.1", b"401"),  # no token
    (b"GET /metadata/../keys/targets.pem HTTP/1.1", b"400"),
    (b"GET /targets/%2e%2e/keys/targets.pem HTTP/1.1", b"400"),
    (b"GET /metadata/%00 HTTP/1.1", b"400"),
])
def test_errors_are_json_without_internal_details(deployment: Deployment, request_line: bytes, status: bytes) -> None:
    answer = _raw_http(deployment, request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == status, answer[:500]
    doc = json.loads(body)
    assert set(doc) >= {"error", "status"}
    text = body.decode()
    assert "sqlite" not in text and "postgresql" not in text and str(deployment.root) not in text


def test_an_oversized_body_is_refused_while_it_is_read(deployment: Deployment) -> None:
    data = b"POST /api/rollouts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + deployment.token.encode() + \
        b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + \
        b"".join(b"100000\r\n" + b"x" * 0x100000 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
    answer = _raw_http(deployment, data, timeout=30)
    assert answer.split(b" ")[1] in (b"403", b"413"), answer[:300]  # a viewer token: refused either way


def test_the_audit_log_of_everything_above_verifies(deployment: Deployment) -> None:
    """Every enrollment, revocation, token and rollout of this deployment was audited and signed."""
    result = subprocess.run([sys.executable, "-m", "edgeml.cli", "fleet", "audit", "verify",
                             str(deployment.registry.dir), "--db-url", deployment.db_url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
