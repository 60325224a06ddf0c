"""The fleet's HTTP listener: one Starlette app on uvicorn (h11), served from a background thread.

* :func:`build_app` makes the app from routes (:mod:`~edgeml.fleet.web.routes` builds them): it adds the
  request guard and :func:`error_response`, the one place where an exception becomes an HTTP status;
  :func:`fleet_app` is the whole fleet's app (the JSON API, the dashboard, ``/metrics``, the repository).
* :class:`HttpServer` runs an app: :meth:`~HttpServer.start` listens (port 0: a free one, then in
  :attr:`~HttpServer.port`), :meth:`~HttpServer.stop` stops; a context manager too.

What the listener guarantees, whatever the route (limits in :class:`HttpSettings`):

* no request desynchronisation: h11 parses each message by its ``Content-Length`` or chunked framing, and
  a body that a route does not read (a 404, a 405, an early 401) is read and dropped, never parsed as the
  next request; a body refused for its size or its slowness closes the connection;
* a request with both ``Content-Length`` and ``Transfer-Encoding`` is refused with 400 and the connection
  closed (a proxy could frame it differently);
* a request path is percent-decoded once, as strict UTF-8; ``.`` and ``..`` segments, backslashes, NUL and
  anything but a path starting with ``/`` are refused with 400 before any route sees them;
* bounded work: at most ``max_connections`` connections (more get 503), route code runs on at most
  ``threads`` threads, a body is limited to ``max_body_bytes`` while it is read;
* timeouts: ``head_timeout_s`` for a request line and headers (a client that trickles them is cut off),
  ``body_timeout_s`` for a body (408), ``keep_alive_s`` for an idle connection.

Errors: a route raises the project's errors and :data:`STATUSES` maps them (a subclass before its parent):
:class:`~edgeml.fleet.web.auth.AuthError` 401, ``ForbiddenError`` 403, :class:`~edgeml.errors.NotFoundError` 404,
:class:`~edgeml.errors.ConflictError` 409, :class:`~edgeml.errors.ConfigError` (bad input) 400,
:class:`~edgeml.errors.RegistryError` (the database) 503, anything else 500. The body is always JSON
``{"error": message, "hint": hint or null, "status": code}``; a 503 and a 500 say only what happened, never
the database's URL, a file path or an exception's text (those go to the server's log).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from edgeml.errors import ConfigError, ConflictError, EdgeMLError, MissingExtraError, NotFoundError, RegistryError
from edgeml.fleet.web.auth import AuthError, ForbiddenError

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

try:
    import anyio
    import h11
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import BaseRoute
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as exc:  # the fleet extra is not installed
    raise MissingExtraError(exc.name or "starlette", "fleet") from exc

__all__ = [
    "DEFAULT_PORT",
    "STATUSES",
    "HttpServer",
    "HttpSettings",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "build_app",
    "error_response",
    "fleet_app",
    "json_response",
    "repository_server",
    "status_of",
]

_log = logging.getLogger(__name__)

#: Default port of ``edgeml fleet serve``'s HTTP listener.
DEFAULT_PORT = 8470


@dataclass(frozen=True)
class HttpSettings:
    """Limits of the HTTP listener.

    Attributes:
        max_body_bytes: Largest request body, counted while it is read (the API's requests are small).
        max_connections: Connections served at once; a request on one more is answered 503.
        threads: Threads that run route code (database queries, file reads) at once.
        head_timeout_s: Seconds a client may take to send a request line and its headers.
        body_timeout_s: Seconds a client may take to send a request body (then 408).
        keep_alive_s: Seconds an idle keep-alive connection is kept open.
        shutdown_s: Seconds :meth:`HttpServer.stop` lets requests in progress finish.
        max_head_bytes: Largest request line plus headers.
    """

    max_body_bytes: int = 1024 * 1024
    max_connections: int = 256  # uvicorn's limit_concurrency; its 503 is plain text
    threads: int = 16
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: int = 5
    shutdown_s: int = 5
    max_head_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        numbers = {name: getattr(self, name) for name in self.__dataclass_fields__}
        bad = sorted(name for name, value in numbers.items() if not value > 0)
        if bad:
            raise ConfigError(f"HTTP settings must be positive: {', '.join(bad)}")


class RequestTooLargeError(EdgeMLError):
    """A request body over :attr:`HttpSettings.max_body_bytes` (HTTP 413)."""


class RequestTimeoutError(EdgeMLError):
    """A request body that did not arrive within :attr:`HttpSettings.body_timeout_s` (HTTP 408)."""


#: The one table from errors to statuses; the first class that matches wins (subclasses first).
STATUSES: tuple[tuple[type[BaseException], int], ...] = (
    (ForbiddenError, 403),
    (AuthError, 401),
    (NotFoundError, 404),
    (ConflictError, 409),
    (RequestTooLargeError, 413),
    (RequestTimeoutError, 408),
    (ConfigError, 400),
    (RegistryError, 503),
)
_UNAVAILABLE = ("the fleet's database is unavailable", "try again shortly; the fleet server's log says why")
_INTERNAL = ("internal server error", "the fleet server's log has the details")


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``value`` as a JSON response."""
    return _JSON(value, status, headers)


def status_of(exc: BaseException) -> int:
    """The HTTP status of ``exc``: Starlette's own (no route, wrong method), else from :data:`STATUSES`."""
    if isinstance(exc, HTTPException):
        return exc.status_code
    return next((code for cls, code in STATUSES if isinstance(exc, cls)), 500)


def error_response(exc: BaseException, method: str = "GET") -> Response:
    """The JSON response for ``exc``: its :func:`status_of` and ``{"error", "hint", "status"}``.

    Args:
        exc: What a route (or the listener) raised.
        method: The request's method (for a 405's message).
    """
    status, headers = status_of(exc), {}
    if isinstance(exc, HTTPException):
        message = f"{method} is not allowed here" if status == 405 else HTTPStatus(status).phrase.lower()
        hint = None
        for name, value in (exc.headers or {}).items():  # Starlette lists a route's methods in set order
            if name.lower() == "allow":
                headers[name] = ", ".join(sorted(m.strip() for m in value.split(",")))
    elif status == 503:
        _log.warning("HTTP request failed on the database: %s", exc)
        message, hint = _UNAVAILABLE
    elif status == 500 or not isinstance(exc, EdgeMLError):
        status, (message, hint) = 500, _INTERNAL
    else:
        message, hint = exc.message, exc.hint
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="edgeml"'
    if status in (408, 413):
        headers["Connection"] = "close"  # the rest of the body is not read: this connection is done
    return json_response({"error": message, "hint": hint, "status": status}, status, headers)


async def _on_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, EdgeMLError) and status_of(exc) == 500:  # other exceptions: uvicorn logs them
        _log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(exc, request.method)


class _BadRequest(ConfigError):
    pass


def _decoded_path(raw: bytes) -> str:
    """The request target's path, percent-decoded once; raises _BadRequest for anything unsafe."""
    if not raw.startswith(b"/"):
        raise _BadRequest("the request path must start with '/'", hint="send an origin-form target: GET /path")
    try:
        path = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _BadRequest("the request path is not UTF-8") from None
    if "\0" in path or "\\" in path or any(seg in (".", "..") for seg in path.split("/")):
        raise _BadRequest("the request path must not contain '.' or '..' segments, backslashes or NUL")
    return path


class _RequestGuard:
    """ASGI middleware in front of every route: refuses an unsafe path, and a request framed two ways
    (``Content-Length`` and ``Transfer-Encoding``: a proxy and this server could split it differently), with
    400; gives the routes the path as :func:`_decoded_path` decoded it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope["path"].encode()
            names = {name.lower() for name, _ in scope["headers"]}
            try:
                if b"content-length" in names and b"transfer-encoding" in names:
                    raise _BadRequest("a request must not have both Content-Length and Transfer-Encoding")
                scope = {**scope, "path": _decoded_path(raw.partition(b"?")[0])}
            except _BadRequest as exc:
                response = error_response(exc, scope["method"])
                response.headers["Connection"] = "close"  # whatever follows on this connection is not trusted
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(routes: Sequence[BaseRoute], settings: HttpSettings | None = None) -> Starlette:
    """A Starlette app serving ``routes`` behind the request guard and the error mapping.

    Args:
        routes: Starlette routes (e.g. from :func:`~edgeml.fleet.web.routes.api_route`).
        settings: The listener's limits (routes read ``max_body_bytes`` and ``body_timeout_s`` from
            ``app.state.http``).
    """
    from starlette.middleware import Middleware

    settings = settings or HttpSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads
        yield

    app = Starlette(routes=list(routes), middleware=[Middleware(_RequestGuard)], lifespan=lifespan,
                    exception_handlers={Exception: _on_error, HTTPException: _on_error, EdgeMLError: _on_error})
    app.router.redirect_slashes = False  # a path is served as it is named, or not at all
    app.state.http = settings
    return app


def fleet_app(registry_dir: Path, db: Database, audit: Any, *, ingest: Any = None, capture: Any = None,
              metrics_token: bool = False, settings: HttpSettings | None = None, **dashboard: Any) -> Starlette:
    """The fleet server's whole app: the JSON API, the dashboard, ``/metrics`` and the repository.

    Args:
        registry_dir: The registry directory (its ``repository/`` is served read-only).
        db: The registry's database.
        audit: Its audit log.
        ingest: An ingest worker whose counters ``/metrics`` exports (None: none).
        capture: A capture upload receiver whose counters ``/metrics`` exports (None: none).
        metrics_token: Require a viewer token on ``/metrics``.
        settings: The listener's limits.
        **dashboard: Options of :func:`~edgeml.fleet.web.dashboard.dashboard_routes` (``stale_after_s``, ``clock``).

    Raises:
        RegistryError: ``registry_dir`` is not a registry.
    """
    from edgeml.fleet.capture.web import capture_routes
    from edgeml.fleet.operator_api import telemetry_routes
    from edgeml.fleet.rollouts.store import rollout_routes
    from edgeml.fleet.web.dashboard import dashboard_routes
    from edgeml.fleet.web.metrics import metrics_routes
    from edgeml.fleet.web.routes import repository_routes

    return build_app([*rollout_routes(db, audit), *dashboard_routes(db, audit, **dashboard), *telemetry_routes(db),
                      *metrics_routes(db, ingest=ingest, capture=capture, require_token=metrics_token),
                      *capture_routes(db, registry_dir), *repository_routes(registry_dir)], settings)


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head (``head_timeout_s``).

    uvicorn times out idle keep-alive connections but not a client that sends a request line and headers a
    byte at a time; this closes a connection whose head is not complete in time.
    """

    head_timeout_s = HttpSettings.head_timeout_s
    _head_timer: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiting = self.conn.their_state is h11.IDLE
        if waiting and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)
        elif not waiting and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            _log.debug("closing a connection whose request head took over %s s", self.head_timeout_s)
            self.transport.close()


class HttpServer:
    """Serves a Starlette app with uvicorn from a background thread.

    Example::

        with HttpServer(build_app(routes), port=0) as http:
            print(http.url)

    Args:
        app: The ASGI app (:func:`build_app`, :func:`fleet_app`).
        host: Address to listen on.
        port: TCP port; 0 picks a free one (read it from :attr:`port` after :meth:`start`).
        settings: Limits and timeouts (default: the app's, else :class:`HttpSettings`'s defaults).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 settings: HttpSettings | None = None) -> None:
        self.app, self.host, self.port = app, host, port
        state = getattr(app, "state", None)
        self.settings = settings or getattr(state, "http", None) or HttpSettings()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def _listen(self) -> socket.socket:
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"cannot listen for HTTP on {self.host}:{self.port}: {exc.strerror or exc}",
                              hint="check --http-host") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen for HTTP on {self.host}:{self.port}: {exc.strerror or exc}",
                              hint="choose another --http-port (0 picks a free one), or --no-http") from exc
        return sock

    def start(self) -> None:
        """Listen and serve from a background thread; :attr:`port` is then the real port.

        Raises:
            ConfigError: The server cannot listen on ``host:port`` (e.g. the port is taken), or did not start.
        """
        if self._server is not None:
            return
        sock = self._listen()
        self.port = int(sock.getsockname()[1])
        s = self.settings
        protocol = type("_Http", (_GuardedH11,), {"head_timeout_s": s.head_timeout_s})
        config = uvicorn.Config(self.app, http=protocol, ws="none", loop="asyncio", lifespan="on", log_config=None,
                                access_log=False, server_header=False, proxy_headers=False,
                                limit_concurrency=s.max_connections, timeout_keep_alive=s.keep_alive_s,
                                timeout_graceful_shutdown=s.shutdown_s, h11_max_incomplete_event_size=s.max_head_bytes)
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(server, sock), name="edgeml-http", daemon=True)
        self._thread.start()
        while not server.started and self._thread.is_alive():
            self._thread.join(0.01)
        if not server.started:
            self._server = self._thread = None
            sock.close()
            raise ConfigError(f"the HTTP listener on {self.url} did not start", hint="see the log above")

    @staticmethod
    def _run(server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException:  # SystemExit from a failed startup included: start() reports it
            _log.exception("the HTTP listener stopped")

    def stop(self) -> None:
        """Stop serving: requests in progress get ``shutdown_s`` to finish; then the listener is closed
        (idempotent)."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(self.settings.shutdown_s + 5)
        if thread.is_alive():
            server.force_exit = True
            thread.join()
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


def repository_server(registry_dir: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                      settings: HttpSettings | None = None) -> HttpServer:
    """An :class:`HttpServer` serving only ``registry_dir/repository``'s ``metadata/`` and ``targets/``.

    Call :meth:`HttpServer.start` to listen. See :func:`~edgeml.fleet.web.routes.repository_routes`.

    Raises:
        RegistryError: ``registry_dir`` has no ``repository/metadata`` directory.
    """
    from edgeml.fleet.web.routes import repository_routes

    return HttpServer(build_app(repository_routes(registry_dir), settings), host, port)
