"""The fleet's HTTP server: the registry's ``repository/`` read-only, behind a tiny router.

:func:`repository_server` serves ``/metadata/...`` and ``/targets/...`` from ``DIR/repository`` so that a
device (or any stock python-tuf ``ngclient.Updater``) can update over plain HTTP when MQTT distribution is
not an option. Nothing here is trusted by the device: TUF verifies every byte against the signed metadata.

:class:`HttpServer` is a :class:`~http.server.ThreadingHTTPServer` with a small router, so that later
parts of the fleet server (the JSON API, ``/metrics``, the dashboard) are added to the same listener:

* :meth:`HttpServer.add_route` maps a method and a path pattern (a regular expression matched against the
  whole decoded path; named groups become :attr:`Request.params`) to a handler ``Request -> Response``;
* :meth:`HttpServer.add_static` serves the files under a directory at a path prefix: GET and HEAD only,
  exact ``Content-Length``, ``Content-Type`` from the file name, no directory listings, 404 for anything
  that is not a regular file inside the directory (``..``, symlinks that point out).

Paths are percent-decoded once; a decoded path with a ``.`` or ``..`` segment, a backslash or a NUL is
refused with 400 before any route sees it. Requests are logged at DEBUG only.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from edgeml.errors import ConfigError, RegistryError

__all__ = ["DEFAULT_PORT", "Handler", "HttpServer", "Request", "Response", "repository_server"]

_log = logging.getLogger(__name__)

#: Default port of ``edgeml fleet serve``'s HTTP listener.
DEFAULT_PORT = 8470
_MAX_BODY = 1024 * 1024  # bytes a request body may have (the JSON API's requests are small)
_IDLE_TIMEOUT_S = 30  # an idle keep-alive connection is closed after this many seconds
_TYPES = {".json": "application/json", ".edgeml": "application/octet-stream"}


@dataclass(frozen=True)
class Request:
    """One HTTP request, as a handler sees it.

    Attributes:
        method: ``GET``, ``HEAD``, ``POST``...
        path: The percent-decoded path, without the query.
        params: The named groups of the route's pattern.
        query: The query string, parsed (each name maps to its list of values).
        headers: Request headers (names lower-cased).
        body: The request body (empty for GET and HEAD).
    """

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    query: dict[str, list[str]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    """What a handler returns: a status, headers and either bytes or a file to stream.

    Attributes:
        status: The HTTP status code.
        body: The body (ignored when ``file`` is set).
        content_type: The ``Content-Type`` header.
        headers: More headers.
        file: A file to stream as the body (its size is the ``Content-Length``).
    """

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        """A JSON response."""
        return cls(status, json.dumps(value, separators=(",", ":")).encode(), "application/json")

    @classmethod
    def text(cls, message: str, status: int = 200) -> Response:
        """A plain-text response (one line and a newline)."""
        return cls(status, f"{message}\n".encode())


Handler = Callable[[Request], Response]


class _BadPath(Exception):
    pass


def _decode_path(target: str) -> tuple[str, dict[str, list[str]]]:
    """``(decoded path, parsed query)`` of a request target; raises _BadPath for anything unsafe."""
    raw, _, query = target.partition("?")
    raw = raw.partition("#")[0]
    if raw.startswith(("http://", "https://")):  # absolute form: keep only the path
        raw = "/" + raw.split("/", 3)[3] if raw.count("/") >= 3 else "/"
    if not raw.startswith("/"):
        raise _BadPath("the path must start with /")
    try:
        path = unquote(raw, errors="strict")
    except UnicodeDecodeError as exc:
        raise _BadPath("the path is not UTF-8") from exc
    if "\0" in path or "\\" in path or any(seg in (".", "..") for seg in path.split("/")):
        raise _BadPath("the path must not contain '.', '..', backslashes or NUL")
    return path, parse_qs(query)


class _Static:
    """Files under ``directory`` served at ``prefix`` (GET and HEAD)."""

    def __init__(self, prefix: str, directory: Path, cache_control: str | None) -> None:
        self.prefix = prefix
        self.root = Path(directory).resolve()
        self.cache_control = cache_control

    def __call__(self, request: Request) -> Response:
        rel = request.path[len(self.prefix):]
        if not rel or rel.endswith("/"):
            return Response.text("not found", 404)  # no directory listings
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():  # a symlink pointing out, or no file
            return Response.text("not found", 404)
        ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        return Response(200, content_type=ctype, headers=headers, file=path)


class HttpServer:
    """A threaded HTTP server with a small router.

    Args:
        host: Address to listen on.
        port: TCP port; 0 picks a free one (read it from :attr:`port` after :meth:`start`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.host = host
        self.port = port
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    def add_route(self, method: str, pattern: str, handler: Handler) -> None:
        """Answer ``method`` requests whose whole decoded path matches ``pattern`` with ``handler``.

        Routes are tried in the order they were added. A GET route also answers HEAD (without the body).

        Args:
            method: The HTTP method, e.g. ``"GET"``.
            pattern: A regular expression matched against the whole path; named groups become
                :attr:`Request.params`.
            handler: A function from :class:`Request` to :class:`Response`.

        Raises:
            ConfigError: ``pattern`` is not a valid regular expression.
        """
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"bad route pattern {pattern!r}: {exc}") from exc
        self._routes.append((method.upper(), compiled, handler))

    def add_static(self, prefix: str, directory: Path, cache_control: str | None = None) -> None:
        """Serve the regular files under ``directory`` at ``prefix`` (GET and HEAD).

        Args:
            prefix: The URL prefix, starting and ending with ``/`` (e.g. ``"/targets/"``).
            directory: The directory whose files are served (symlinks that point outside it are not).
            cache_control: A ``Cache-Control`` header for these files (None: none).

        Raises:
            ConfigError: ``prefix`` does not start and end with ``/``.
        """
        if not (prefix.startswith("/") and prefix.endswith("/")):
            raise ConfigError(f"a static prefix must start and end with '/', got {prefix!r}")
        self.add_route("GET", re.escape(prefix) + ".*", _Static(prefix, directory, cache_control))

    def dispatch(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], list[str]]:
        """``(handler, params, allowed methods)`` for a request; handler None if no route takes it."""
        allowed: list[str] = []
        for route_method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if route_method == method or (method == "HEAD" and route_method == "GET"):
                return handler, match.groupdict(), allowed
            allowed.append(route_method)
        return None, {}, allowed

    def start(self) -> None:
        """Listen and serve from a background thread; :attr:`port` is then the real port.

        Raises:
            ConfigError: The server cannot listen on ``host:port`` (e.g. the port is taken).
        """
        handler = type("_BoundHandler", (_RequestHandler,), {"router": self})
        try:
            self._server = _QuietServer((self.host, self.port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen for HTTP on {self.host}:{self.port}: {exc.strerror or exc}",
                              hint="choose another --http-port (0 picks a free one), or --no-http") from exc
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="edgeml-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listener (idempotent)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the listener."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> HttpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up mid-response are routine: log at DEBUG instead of printing a traceback."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        _log.debug("connection from %s failed", client_address, exc_info=True)


class _RequestHandler(BaseHTTPRequestHandler):
    """Turns each request into a :class:`Request` for the router's handler."""

    router: HttpServer
    protocol_version = "HTTP/1.1"
    server_version = "edgeml-fleet"
    sys_version = ""
    timeout = _IDLE_TIMEOUT_S

    def _handle(self) -> None:
        method = self.command
        try:
            path, query = _decode_path(self.path)
        except _BadPath as exc:
            self._send(Response.text(f"bad request: {exc}", 400))
            return
        handler, params, allowed = self.router.dispatch(method, path)
        if handler is None:
            if allowed:
                self._send(Response(405, b"method not allowed\n", headers={"Allow": ", ".join(sorted(allowed))}))
            else:
                self._send(Response.text("not found", 404))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or "Transfer-Encoding" in self.headers:
            self.close_connection = True
            self._send(Response.text("a request body needs a valid Content-Length", 411))
            return
        if length > _MAX_BODY:
            self._send(Response.text(f"request body over {_MAX_BODY} bytes", 413))
            self.close_connection = True
            return
        body = self.rfile.read(length) if length > 0 else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            response = handler(Request(method, path, params, query, headers, body))
        except Exception:  # a bug in a handler: log it, answer 500, keep serving
            _log.exception("%s %s failed", method, path)
            response = Response.text("internal server error", 500)
        self._send(response)

    def _send(self, response: Response) -> None:
        fh = None
        if response.file is not None:
            try:
                fh = response.file.open("rb")
            except OSError:  # removed or unreadable since the handler looked
                response = Response.text("not found", 404)
        try:
            length = os.fstat(fh.fileno()).st_size if fh is not None else len(response.body)
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(length))
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            if fh is not None:
                shutil.copyfileobj(fh, self.wfile, 64 * 1024)
            else:
                self.wfile.write(response.body)
        finally:
            if fh is not None:
                fh.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("%s %s", self.address_string(), format % args)


def repository_server(registry_dir: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> HttpServer:
    """An :class:`HttpServer` serving ``registry_dir/repository``'s ``metadata/`` and ``targets/``.

    Metadata is sent with ``Cache-Control: no-cache`` (``timestamp.json`` changes in place); targets are
    immutable (their names start with their hash). Call :meth:`HttpServer.start` to listen.

    Args:
        registry_dir: The registry directory (the one ``edgeml fleet init`` created).
        host: Address to listen on.
        port: TCP port (0: a free one).

    Raises:
        RegistryError: ``registry_dir`` has no ``repository/metadata`` directory.
    """
    repository = Path(registry_dir) / "repository"
    if not (repository / "metadata").is_dir():
        raise RegistryError(f"{registry_dir} is not a registry: {repository / 'metadata'} is missing",
                            hint="create one with `edgeml fleet init DIR`")
    server = HttpServer(host, port)
    server.add_static("/metadata/", repository / "metadata", cache_control="no-cache")
    server.add_static("/targets/", repository / "targets")
    return server
