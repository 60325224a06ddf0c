"""The remote CLI keeps its operator token to the server it was given: redirects are not followed (a real
server redirecting to a second real server on another port, which must never see the token), plain
``http://`` goes only to this machine unless ``--insecure``, and URLs are checked before anything is sent.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from edgeml.errors import ConfigError, NotFoundError
from edgeml.fleet.operator_api import RemoteFleet
from tests.conftest import RunCli

TOKEN = "edgeml_redirect-test-token-0123456789abcdefghijklmnopqrs"


class Recorder:
    """A real HTTP server on ``host`` that records each request's method, path and headers, and answers
    ``status`` with ``headers`` and ``body`` (default: a JSON list of no rollouts for a 200)."""

    def __init__(self, host: str, status: int = 200, headers: dict[str, str] | None = None,
                 body: bytes | None = None) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                recorder.seen.append((self.command, self.path, dict(self.headers)))
                answer = body if body is not None else b"[]" if status == 200 else b""
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator[Recorder]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_reported_and_the_token_never_reaches_its_target(run_cli: RunCli, code: int) -> None:
    with Recorder("127.0.0.1").running() as elsewhere:
        front = Recorder("127.0.0.1", code, {"Location": f"{elsewhere.url}/api/rollouts"})
        with front.running():
            result = run_cli("fleet", "rollout", "status", front.url, env={"EDGEML_TOKEN": TOKEN})
            fleet = RemoteFleet(front.url, TOKEN)
            with pytest.raises(ConfigError, match=f"answered {code}, a redirect to {elsewhere.url}/api/rollouts"):
                fleet.change("ro-1", "abort", "test")  # a POST, too
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"answered {code}, a redirect to {elsewhere.url}/api/rollouts" in result.stderr
    assert "does not follow redirects" in result.stderr and TOKEN not in result.stderr
    assert [(m, p) for m, p, _ in front.seen] == [("GET", "/api/rollouts"), ("POST", "/api/rollouts/ro-1/abort")]
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for _, _, h in front.seen)
    assert elsewhere.seen == []  # the second server never saw a request, so never the token


def _outward_address() -> str | None:
    """This machine's address on its outward interface (not loopback), if it has one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("203.0.113.1", 9))  # no packet is sent: this only picks the route's source address
        address = str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_plain_http_to_another_host_needs_insecure(run_cli: RunCli) -> None:
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve plain HTTP on")
    with Recorder(address).running() as server:
        refused = run_cli("fleet", "rollout", "status", server.url, env={"EDGEML_TOKEN": TOKEN})
        assert server.seen == []  # refused before anything was sent
        allowed = run_cli("fleet", "rollout", "status", server.url, "--insecure", env={"EDGEML_TOKEN": TOKEN})
    assert refused.returncode == 2 and f"refusing to send an operator token over plain http to {address}" in \
        refused.stderr and "--insecure" in refused.stderr
    assert allowed.returncode == 0, allowed.stderr
    assert [(m, h["Authorization"]) for m, _, h in server.seen] == [("GET", f"Bearer {TOKEN}")]


@pytest.mark.parametrize(("url", "insecure", "message"), [
    ("http://fleet.example:8470", False, "refusing to send an operator token over plain http to fleet.example"),
    ("http://10.0.0.5", False, "over plain http to 10.0.0.5"),
    ("http://[2001:db8::1]:8470", False, "over plain http to 2001:db8::1"),
    ("ftp://fleet.example", True, "is not a fleet server URL"),
    ("https://", False, "is not a fleet server URL"),
    ("https://user:pw@fleet.example", False, "has no user, query or fragment"),
    ("https://fleet.example/?token=x", False, "has no user, query or fragment"),
    ("http://fleet.example:8470", True, None),
    ("https://fleet.example:8470/", False, None),
    ("http://127.0.0.1:8470", False, None),
    ("http://127.9.9.9:8470", False, None),
    ("http://localhost:8470", False, None),
    ("http://[::1]:8470", False, None),
])
def test_urls_the_token_may_be_sent_to(url: str, insecure: bool, message: str | None) -> None:
    if message is None:
        assert RemoteFleet(url, TOKEN, insecure=insecure).url == url.rstrip("/")
    else:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("?", r"\?")) as refused:
            RemoteFleet(url, TOKEN, insecure=insecure)
        assert "pw" not in str(refused.value) and TOKEN not in str(refused.value)


def test_an_error_answer_keeps_the_servers_message_and_hint() -> None:
    body = json.dumps({"error": "unknown rollout 'ro-9'", "hint": "list them", "status": 404}).encode()
    with Recorder("127.0.0.1", 404, body=body).running() as server, pytest.raises(NotFoundError) as missing:
        RemoteFleet(server.url, TOKEN).status("ro-9/../../metrics")
    assert (missing.value.message, missing.value.hint) == (f"{server.url}: unknown rollout 'ro-9'", "list them")
    assert [p for _, p, _ in server.seen] == ["/api/rollouts/ro-9%2F..%2F..%2Fmetrics"]  # one path segment
