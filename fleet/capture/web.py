"""The captured samples on the fleet's HTTP side: counts and drift-triggered uploads for the dashboard, a pull.

Routes (:func:`capture_routes`, mounted by :func:`~edgeml.fleet.web.server.fleet_app`):

* ``GET /api/captures?model=&version=&device=&tag=&reason=&since=&until=``: samples and bytes per device,
  model, version and reason (viewer); ``since`` is seconds before now or an ISO-8601 time, ``until`` an ISO-8601
  time;
* ``GET /api/captures/drift?limit=N``: the uploads a drift alert triggered, newest first: device, model version,
  the window's drift score, when, how many samples, and the filters that pull exactly them (viewer);
* ``POST /api/captures/pull`` with ``{"model", "version", "device", "tag", "reason", "since", "until"}``: the
  dataset folder of :func:`~edgeml.fleet.capture.pull.pull` as a tar (operator: it hands out field data);
* ``GET /dashboard/captures.js``: the dashboard's captures section (``fleet/web/static/captures.js``).
"""

from __future__ import annotations

import datetime as dt
import io
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.errors import ConfigError
from edgeml.fleet.store import schema
from edgeml.fleet.store.schema import sa

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = ["capture_routes", "drift_uploads"]

_SCRIPT = Path(__file__).resolve().parent.parent / "web" / "static" / "captures.js"
_MAX_PULL_SAMPLES = 100_000


def drift_uploads(db: Database, limit: int = 50) -> list[dict[str, Any]]:
    """The uploads that drift alerts triggered, newest first, each with what pulls its samples."""
    t = schema.captures
    query = (sa.select(t.c.device_id, t.c.upload_id, t.c.model, t.c.version, sa.func.max(t.c.drift_score),
                       sa.func.min(t.c.received_at), sa.func.count(), sa.func.min(t.c.captured_at),
                       sa.func.max(t.c.captured_at))
             .where(t.c.trigger == "drift")
             .group_by(t.c.device_id, t.c.upload_id, t.c.model, t.c.version)
             .order_by(sa.func.min(t.c.received_at).desc()).limit(limit))
    with db.transaction() as conn:
        rows = conn.execute(query).all()
    return [{"device_id": d, "upload_id": u, "model": m, "version": v, "drift_score": score,
             "received_at": received.isoformat(), "samples": int(n),
             "pull": {"model": m, "version": v, "device": d, "since": first.isoformat(),
                      "until": (last + dt.timedelta(microseconds=1)).isoformat()}}
            for d, u, m, v, score, received, n, first, last in rows]


def _time(value: Any, name: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"{name!r} must be an ISO-8601 time") from None
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when


def _since(value: str | None) -> dt.datetime | None:
    """``since`` of ``GET /api/captures``: seconds before now (the dashboard's), or an ISO-8601 time (the CLI's)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return _time(value, "since")
    if not 0 <= seconds < 1e10:
        raise ConfigError(f"'since' must be seconds before now or an ISO-8601 time, got {value[:40]!r}")
    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)


def _tar(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return buf.getvalue()


def capture_routes(db: Database, registry_dir: Path) -> list[Any]:
    """The routes above (Starlette routes for :func:`~edgeml.fleet.web.server.build_app`)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from edgeml.fleet.capture.pull import CaptureFilters, list_captures, pull
    from edgeml.fleet.web.auth import Role
    from edgeml.fleet.web.dashboard import parse_query
    from edgeml.fleet.web.routes import ApiCall, api_route, file_response

    def counts(call: ApiCall) -> Any:
        q = parse_query(call.query, {"model": str, "version": str, "device": str, "tag": str, "reason": str,
                                     "since": str, "until": str})
        since, until = _since(q.pop("since", None)), _time(q.pop("until", None), "until")
        rows = list_captures(db, CaptureFilters(**q, since=since, until=until))
        return {"captures": rows, "samples": sum(r["samples"] for r in rows)}

    def drift(call: ApiCall) -> Any:
        return {"uploads": drift_uploads(db, parse_query(call.query, {"limit": int}).get("limit", 50))}

    def pull_tar(call: ApiCall) -> Any:
        body = dict(call.body)
        known = {"model", "version", "device", "tag", "reason", "since", "until"}
        unknown = sorted(set(body) - known)
        if unknown or not isinstance(body.get("model"), str):
            raise ConfigError(f"a pull needs 'model' and takes only {sorted(known)}; got {sorted(body)}")
        if any(not isinstance(body.get(k), (str, type(None))) for k in known):
            raise ConfigError("every pull filter is a string")
        with tempfile.TemporaryDirectory(prefix="edgeml-pull-") as tmp:
            result = pull(db, registry_dir, Path(tmp) / "dataset", model=body["model"], version=body.get("version"),
                          device=body.get("device"), tag=body.get("tag"), reason=body.get("reason"),
                          since=_time(body.get("since"), "since"), until=_time(body.get("until"), "until"))
            if result.count > _MAX_PULL_SAMPLES:
                raise ConfigError(f"{result.count} samples match; pull at most {_MAX_PULL_SAMPLES} over HTTP",
                                  hint="narrow the filters, or pull on the fleet host")
            data = _tar(result.path)
        return Response(data, media_type="application/x-tar",
                        headers={"X-Edgeml-Count": str(result.count), "X-Edgeml-Sha256": result.sha256})

    async def script(request: Request) -> Response:
        return await run_in_threadpool(file_response, _SCRIPT, "text/javascript; charset=utf-8",
                                       {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    return [api_route("/api/captures", counts, db=db, role=Role.VIEWER),
            api_route("/api/captures/drift", drift, db=db, role=Role.VIEWER),
            api_route("/api/captures/pull", pull_tar, db=db, role=Role.OPERATOR, methods=("POST",), body=True),
            Route("/dashboard/captures.js", script, methods=["GET"])]
