"""Routes for the fleet's HTTP listener (:mod:`~edgeml.fleet.web.server`): the JSON API's and static files.

* :func:`api_route`: a JSON route. Each request is parsed at the edge into an :class:`ApiCall` (path
  parameters, query, the JSON body read within the listener's limits, the caller's
  :class:`~edgeml.fleet.web.auth.Principal` when the route needs a role); the handler runs on the listener's
  thread pool and returns what to send as JSON, or raises the project's errors (mapped to statuses by
  :func:`~edgeml.fleet.web.server.error_response`).
* :func:`static_route` and :func:`file_response`: regular files, GET and HEAD, exact ``Content-Length``,
  ``Content-Type`` from the name, no directory listings, 404 for anything that is not a regular file inside
  the directory (a symlink pointing out included). A file is opened before its headers are sent, so a file
  replaced meanwhile (``timestamp.json`` is renamed into place) is sent whole, old or new.
* :func:`repository_routes`: the registry's ``repository/metadata`` and ``repository/targets``, so that a
  device (or a stock python-tuf ``ngclient.Updater``) can update over HTTP. Nothing here is trusted by the
  device: TUF verifies every byte against the signed metadata.
"""

from __future__ import annotations

import json
import mimetypes
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qs

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from edgeml.errors import ConfigError, NotFoundError, RegistryError
from edgeml.fleet.web.auth import Principal, Role, authorize
from edgeml.fleet.web.server import HttpSettings, RequestTimeoutError, RequestTooLargeError, json_response

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = ["ApiCall", "api_route", "file_response", "read_body", "repository_routes", "static_route"]

_TYPES = {".json": "application/json", ".edgeml": "application/octet-stream"}
_MAX_QUERY_FIELDS = 50
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ApiCall:
    """One API request as a handler sees it: parsed and bounded at the edge.

    Attributes:
        params: The route's path parameters.
        query: The query string (each name maps to its list of values; at most 50 fields).
        body: The JSON object sent (empty for routes without a body).
        principal: Who called (None on routes that need no token).
    """

    params: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, list[str]] = field(default_factory=dict)
    body: Mapping[str, Any] = field(default_factory=dict)
    principal: Principal | None = None

    @property
    def actor(self) -> str:
        """The audit log's actor: the token's (``token:<name>``)."""
        return self.principal.actor if self.principal is not None else "anonymous"


def _settings(request: Request) -> HttpSettings:
    settings = getattr(request.app.state, "http", None)
    return settings if isinstance(settings, HttpSettings) else HttpSettings()


async def read_body(request: Request) -> bytes:
    """The request body, read within the listener's ``max_body_bytes`` and ``body_timeout_s``.

    Raises:
        RequestTooLargeError: The body is (or says it is) larger.
        RequestTimeoutError: It did not arrive in time.
        ConfigError: The client hung up before sending all of it.
    """
    limit, timeout = _settings(request).max_body_bytes, _settings(request).body_timeout_s
    too_large = RequestTooLargeError(f"the request body is over {limit} bytes",
                                     hint="the API's requests are small JSON objects")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise ConfigError("the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await read_body(request)
    try:
        doc = json.loads(raw or b"{}")
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"the request body is not JSON: {str(exc)[:100]}",
                          hint="send a JSON object with Content-Type: application/json") from None
    if not isinstance(doc, dict):
        raise ConfigError("the request body must be a JSON object")
    return doc


def _query(request: Request) -> dict[str, list[str]]:
    try:
        return parse_qs(request.url.query, max_num_fields=_MAX_QUERY_FIELDS)
    except ValueError:
        raise ConfigError(f"more than {_MAX_QUERY_FIELDS} query parameters") from None


def api_route(path: str, handler: Callable[[ApiCall], Any], *, methods: Sequence[str] = ("GET",),
              db: Database | None = None, role: Role | None = None, status: int = 200, body: bool = False) -> Route:
    """A JSON API route.

    The token is checked first (when ``role`` is set), then the body is read (when ``body``), then
    ``handler`` runs on the listener's thread pool. What it returns is sent as JSON with ``status`` (a
    Starlette ``Response`` is sent as it is); what it raises is mapped by
    :func:`~edgeml.fleet.web.server.error_response`.

    Args:
        path: The Starlette path, e.g. ``"/api/rollouts/{id}"``.
        handler: A function from :class:`ApiCall` to a JSON-serializable value.
        methods: The HTTP methods (a GET route answers HEAD too).
        db: The registry's database (needed with ``role``).
        role: The lowest role allowed (None: no token needed).
        status: The status of a successful answer.
        body: Whether the request carries a JSON object (an empty body is ``{}``).

    Raises:
        ConfigError: ``role`` without ``db``.
    """
    if role is not None and db is None:
        raise ConfigError(f"route {path} needs a role but was given no database")
    guard = (db, role) if db is not None and role is not None else None

    async def endpoint(request: Request) -> Response:
        principal = await run_in_threadpool(authorize, guard[0], request.headers, guard[1]) if guard else None
        doc = await _json_object(request) if body else {}
        call = ApiCall(dict(request.path_params), _query(request), doc, principal)
        result = await run_in_threadpool(handler, call)
        return result if isinstance(result, Response) else json_response(result, status)

    endpoint.__name__ = getattr(handler, "__name__", "endpoint")
    return Route(path, endpoint, methods=list(methods))


class _OpenFile(Response):
    """An open regular file as the body; its size (taken from the open file) is the ``Content-Length``."""

    def __init__(self, fh: IO[bytes], media_type: str, headers: Mapping[str, str]) -> None:
        self.fh, self.size = fh, os.fstat(fh.fileno()).st_size
        super().__init__(None, 200, {**headers, "Content-Length": str(self.size)}, media_type)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            left = 0 if scope["method"] == "HEAD" else self.size
            while left > 0:
                chunk = await anyio.to_thread.run_sync(self.fh.read, min(_CHUNK, left))
                if not chunk:  # truncated in place meanwhile: the short body makes uvicorn close the connection
                    break
                left -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})
            if left or self.size == 0 or scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.fh.close()


def _media_type(path: Path) -> str:
    return _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _open_inside(root: Path, rel: str) -> IO[bytes]:
    """``root/rel`` opened for reading, if it is a regular file inside ``root`` once symlinks are resolved."""
    if not rel or rel.endswith("/"):
        raise NotFoundError("not found")  # no directory listings
    path = (root / rel).resolve()
    if not path.is_relative_to(root) or not path.is_file():  # a symlink pointing out, a directory, nothing
        raise NotFoundError("not found")
    try:
        return path.open("rb")
    except OSError:  # removed or unreadable since it was looked at
        raise NotFoundError("not found") from None


def file_response(path: Path, media_type: str | None = None, headers: Mapping[str, str] | None = None) -> Response:
    """A response that sends the regular file ``path`` (GET and HEAD); blocking: call it from a thread.

    Raises:
        NotFoundError: ``path`` is not a regular file, or cannot be opened.
    """
    path = Path(path)
    return _OpenFile(_open_inside(path.parent.resolve(), path.name), media_type or _media_type(path), headers or {})


def static_route(prefix: str, directory: Path, *, cache_control: str | None = None) -> Route:
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
    root = Path(directory).resolve()
    headers = {"Cache-Control": cache_control} if cache_control else {}

    def serve(rel: str) -> Response:
        fh = _open_inside(root, rel)
        return _OpenFile(fh, _media_type(Path(rel)), headers)

    async def endpoint(request: Request) -> Response:
        return await run_in_threadpool(serve, request.path_params["rel"])

    return Route(prefix + "{rel:path}", endpoint, methods=["GET"])


def repository_routes(registry_dir: Path) -> list[Route]:
    """``/metadata/...`` and ``/targets/...`` from ``registry_dir/repository``.

    Metadata is sent with ``Cache-Control: no-cache`` (``timestamp.json`` changes in place); targets are
    immutable (their names start with their hash).

    Raises:
        RegistryError: ``registry_dir`` has no ``repository/metadata`` directory.
    """
    repository = Path(registry_dir) / "repository"
    if not (repository / "metadata").is_dir():
        raise RegistryError(f"{registry_dir} is not a registry: {repository / 'metadata'} is missing",
                            hint="create one with `edgeml fleet init DIR`")
    return [static_route("/metadata/", repository / "metadata", cache_control="no-cache"),
            static_route("/targets/", repository / "targets")]
