"""The fleet dashboard: a static page (``fleet/web/``) and the read-only JSON API it draws.

:func:`dashboard_routes` are the fleet server's routes for it (:func:`~edgeml.fleet.web.server.fleet_app`):

* ``GET /api/overview``: devices online/offline/revoked, versions installed per model, incompatible devices of
  each model's newest rollout, rollouts per state (:func:`~edgeml.fleet.web.views.fleet_overview`; the
  online rule is in :mod:`~edgeml.fleet.web.views`).
* ``GET /api/devices``: every enrolled device with its tags, status and latest telemetry numbers.
* ``GET /api/telemetry?metric=M&by=version|device&since=SECONDS&model=NAME&buckets=N``: one metric
  (``latency_p50_ms``, ``latency_p99_ms``, ``error_rate``, ``drift.score``, ``output_drift.score``: the output
  shift) bucketed over the window, one series per version or device. Defaults: ``by=version``, ``since=3600``,
  every model, 60 buckets. Drawn from the telemetry rollups, never the rows: per minute for windows up to 6 hours,
  per hour beyond (then at most one bucket an hour); ``resolution_s`` in the answer says which, and the page shows
  it.
* ``GET /api/audit?limit=N``: the newest audit entries (default 50).
* ``GET /api/rollout-waves``: every rollout, newest first, with its devices counted by wave and state (what the
  rollout cards draw; :func:`~edgeml.fleet.web.views.rollout_waves`): its size grows with the rollouts, not with
  their devices.
* ``GET /`` and ``/dashboard/...``: the page itself (HTML, JS, CSS; no token needed, it holds no data).

Every ``/api/`` route needs a viewer token (401 without a valid one). A bad query (an unknown or repeated
parameter, a value out of range) is a 400, a database that cannot be reached a 503, each as the listener's
JSON error (:func:`~edgeml.fleet.web.server.error_response`). Rollouts with every device are served at
``/api/rollouts`` by :func:`~edgeml.fleet.rollouts.store.rollout_routes`; the page reads the counts instead.

The page asks for a token (kept in the tab's ``sessionStorage``; ``/#token=...`` sets it and is then removed
from the address bar), sends it as ``Authorization: Bearer``, and refreshes every few seconds. It sets its
text with ``textContent`` only, and a Content-Security-Policy forbids inline scripts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.errors import ConfigError
from edgeml.fleet.web.views import (
    DEFAULT_BUCKETS,
    DEFAULT_STALE_S,
    audit_entries,
    device_list,
    fleet_overview,
    rollout_waves,
    telemetry_series,
)

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = ["WEB_DIR", "dashboard_routes", "parse_query"]

#: The page's files (installed as package data ``edgeml.fleet: web/*``).
WEB_DIR = Path(__file__).resolve().parent / "static"
_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
}


def parse_query(query: Mapping[str, list[str]], spec: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    """The query parameters named in ``spec``, each converted by its function.

    Args:
        query: The parsed query string (:attr:`~edgeml.fleet.web.routes.ApiCall.query`).
        spec: Parameter name -> converter (``int``, ``float``, ``str``); absent parameters are left out.

    Raises:
        ConfigError: An unknown or repeated parameter, or a value its converter refuses.
    """
    unknown = sorted(set(query) - set(spec))
    if unknown:
        raise ConfigError(f"unknown query parameter {unknown[0]!r}", hint="known: " + ", ".join(sorted(spec)))
    out: dict[str, Any] = {}
    for name, values in query.items():
        if len(values) != 1:
            raise ConfigError(f"query parameter {name!r} is given {len(values)} times; give it once")
        try:
            out[name] = spec[name](values[0])
        except ValueError:
            raise ConfigError(f"bad value {values[0]!r} for query parameter {name!r}") from None
    return out


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(text)
    return value


def dashboard_routes(db: Database, audit: Any, *, stale_after_s: float = DEFAULT_STALE_S, web_dir: Path | None = None,
                     clock: Callable[[], dt.datetime] | None = None) -> list[Any]:
    """The dashboard's page and JSON API (Starlette routes for :func:`~edgeml.fleet.web.server.build_app`).

    Args:
        db: The registry's database (tokens, devices, telemetry, rollouts).
        audit: Its :class:`~edgeml.fleet.audit.log.AuditLog`.
        stale_after_s: Seconds of silence after which a device counts as offline.
        web_dir: Where the page's files are (default: :data:`WEB_DIR`).
        clock: The present, as an aware datetime (default: the system clock).
    """
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from edgeml.fleet.web.auth import Role
    from edgeml.fleet.web.routes import ApiCall, api_route, file_response

    web = Path(web_dir) if web_dir is not None else WEB_DIR

    def now() -> dt.datetime:
        return clock() if clock is not None else dt.datetime.now(dt.timezone.utc)

    def overview(call: ApiCall) -> Any:
        parse_query(call.query, {})
        return fleet_overview(db, now=now(), stale_after_s=stale_after_s)

    def devices(call: ApiCall) -> Any:
        parse_query(call.query, {})
        return device_list(db, now=now(), stale_after_s=stale_after_s)

    def telemetry(call: ApiCall) -> Any:
        q = parse_query(call.query, {"metric": str, "by": str, "since": _finite, "model": str, "buckets": int})
        if "metric" not in q:
            raise ConfigError("the query parameter 'metric' is required",
                              hint="latency_p50_ms, latency_p99_ms, error_rate, drift.score or output_drift.score")
        return telemetry_series(db, q["metric"], by=q.get("by", "version"), since_s=q.get("since", 3600.0),
                                model=q.get("model"), buckets=q.get("buckets", DEFAULT_BUCKETS), now=now())

    def waves(call: ApiCall) -> Any:
        parse_query(call.query, {})
        return rollout_waves(db)

    def audit_log(call: ApiCall) -> Any:
        return audit_entries(audit, parse_query(call.query, {"limit": int}).get("limit", 50))

    def page(name: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await run_in_threadpool(file_response, web / name, _FILES[name], _PAGE_HEADERS)

        return endpoint

    return [
        *(api_route(path, handler, db=db, role=Role.VIEWER) for path, handler in (
            ("/api/overview", overview), ("/api/devices", devices), ("/api/telemetry", telemetry),
            ("/api/audit", audit_log), ("/api/rollout-waves", waves))),
        *(Route(path, page("index.html"), methods=["GET"]) for path in ("/", "/dashboard", "/dashboard/")),
        *(Route(f"/dashboard/{name}", page(name), methods=["GET"]) for name in _FILES),
    ]
