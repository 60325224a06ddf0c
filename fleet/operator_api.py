"""What the operator's CLI does to the fleet, on the registry's database here or on a remote fleet server.

``edgeml fleet rollout ...``, ``edgeml fleet rollback`` and ``edgeml fleet telemetry`` work in two places:

* :class:`LocalFleet`: on this machine, with the registry directory and its database (the actor in the
  audit log is the local user);
* :class:`RemoteFleet`: against ``edgeml fleet serve``'s HTTP API (the command's FLEET argument is then the
  server's URL) with an operator token (``--token`` or ``$EDGEML_TOKEN``); the server checks the token's
  role and audits the change under the token's name, exactly as for the dashboard.

Both offer the same methods and raise the same errors, so the CLI does not care which one it has.
:func:`add_telemetry_routes` is the server side of :meth:`RemoteFleet.telemetry`.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeml.errors import ConfigError
from edgeml.fleet.rollout_rules import RolloutError, RolloutOptions
from edgeml.fleet.rollouts import RolloutStatus

__all__ = ["LocalFleet", "RemoteFleet", "add_telemetry_routes", "open_fleet"]

_TIMEOUT_S = 30.0


class LocalFleet:
    """The fleet through the registry's database on this machine (close it after use).

    Args:
        directory: The registry directory.
        db_url: Its database URL (None: the registry's default).
    """

    def __init__(self, directory: Path, db_url: str | None = None) -> None:
        from edgeml.fleet.audit import local_actor, open_audit

        self.log = open_audit(directory, db_url=db_url)
        self.db, self.actor = self.log.db, local_actor()

    def start(self, model: str, version: str, options: RolloutOptions, rollout_id: str | None = None) -> str:
        from edgeml.fleet.rollouts import start_rollout

        return start_rollout(self.db, self.log, model, version, options, actor=self.actor, rollout_id=rollout_id)

    def status(self, rollout_id: str | None = None) -> list[RolloutStatus]:
        from edgeml.fleet.rollouts import rollout_status

        return rollout_status(self.db, rollout_id)

    def change(self, rollout_id: str, action: str, reason: str | None = None) -> str:
        from edgeml.fleet.rollouts import set_rollout_state

        return set_rollout_state(self.db, self.log, rollout_id, action, actor=self.actor, reason=reason)

    def rollback(self, model: str, to: str, *, select: dict[str, str], targets: Sequence[str] | None,
                 wave_timeout_s: float, probation_s: float) -> str:
        from edgeml.fleet.rollouts import rollback

        return rollback(self.db, self.log, model, to, actor=self.actor, select=select, targets=targets,
                        wave_timeout_s=wave_timeout_s, probation_s=probation_s)

    def telemetry(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        from edgeml.fleet.telemetry_store import TelemetryStore

        return [_jsonable(r) for r in TelemetryStore(self.db).latest(device_id, limit)]

    def close(self) -> None:
        self.db.close()


class RemoteFleet:
    """The fleet through a fleet server's HTTP API.

    Args:
        url: The server's base URL, e.g. ``http://fleet.example:8470``.
        token: An operator token (None: ``$EDGEML_TOKEN``).

    Raises:
        AuthError: No token given and ``$EDGEML_TOKEN`` unset.
    """

    def __init__(self, url: str, token: str | None = None) -> None:
        from edgeml.fleet.auth import remote_headers

        self.url, self.headers = url.rstrip("/"), remote_headers(token)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        from edgeml.fleet.auth import AuthError, ForbiddenError

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={**self.headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = str(json.loads(exc.read()).get("error") or exc.reason)
            except (ValueError, AttributeError):
                message = str(exc.reason)
            if exc.code == 401:
                raise AuthError(f"{self.url}: {message}", hint="check the token ($EDGEML_TOKEN)") from exc
            if exc.code == 403:
                raise ForbiddenError(f"{self.url}: {message}", hint="this needs a token with a higher role") from exc
            raise RolloutError(message) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ConfigError(f"cannot reach the fleet server at {self.url}: {getattr(exc, 'reason', exc)}",
                              hint="check the URL and that `edgeml fleet serve` runs there") from exc

    def start(self, model: str, version: str, options: RolloutOptions, rollout_id: str | None = None) -> str:
        doc = {"model": model, "version": version, "options": options.to_dict(), "id": rollout_id}
        return str(self._call("POST", "/api/rollouts", doc)["id"])

    def status(self, rollout_id: str | None = None) -> list[RolloutStatus]:
        docs = self._call("GET", "/api/rollouts" + (f"/{rollout_id}" if rollout_id else ""))
        return [RolloutStatus(**doc) for doc in docs]

    def change(self, rollout_id: str, action: str, reason: str | None = None) -> str:
        return str(self._call("POST", f"/api/rollouts/{rollout_id}/{action}", {"reason": reason})["state"])

    def rollback(self, model: str, to: str, *, select: dict[str, str], targets: Sequence[str] | None,
                 wave_timeout_s: float, probation_s: float) -> str:
        doc = {"model": model, "to": to, "select": select, "targets": list(targets) if targets else None,
               "wave_timeout_s": wave_timeout_s, "probation_s": probation_s}
        return str(self._call("POST", "/api/rollback", doc)["id"])

    def telemetry(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/api/devices/{device_id}/telemetry?limit={limit}"))

    def close(self) -> None:
        pass


def open_fleet(target: str, db_url: str | None = None, token: str | None = None) -> LocalFleet | RemoteFleet:
    """A :class:`RemoteFleet` when ``target`` is an ``http(s)://`` URL, else a :class:`LocalFleet` on the
    registry directory ``target``.

    Raises:
        AuthError: A URL without a token (and ``$EDGEML_TOKEN`` unset).
        RegistryError: ``target`` is not a registry directory.
    """
    if target.startswith(("http://", "https://")):
        return RemoteFleet(target, token)
    return LocalFleet(Path(target), db_url)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()}


def add_telemetry_routes(server: Any, db: Any) -> None:
    """``GET /api/devices/ID/telemetry?limit=N`` (viewer): a device's newest telemetry rows, newest first."""
    from edgeml.fleet.auth import Role, authorized
    from edgeml.fleet.http_server import Response
    from edgeml.fleet.telemetry_store import TelemetryStore

    store = TelemetryStore(db)

    def latest(request: Any, who: Any) -> Any:
        try:
            limit = int(request.query.get("limit", ["20"])[0])
            if not 1 <= limit <= 10_000:
                raise ValueError
        except ValueError:
            return Response.json({"error": "limit must be a whole number from 1 to 10000", "status": 400}, 400)
        return Response.json([_jsonable(r) for r in store.latest(request.params["id"], limit)])

    server.add_route("GET", r"/api/devices/(?P<id>[A-Za-z0-9][A-Za-z0-9._-]{0,127})/telemetry",
                     authorized(db, Role.VIEWER)(latest))
