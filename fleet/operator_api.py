"""What the operator's CLI does to the fleet, on the registry's database here or on a remote fleet server.

``edgeml fleet rollout ...``, ``edgeml fleet rollback`` and ``edgeml fleet telemetry`` work in two places:

* :class:`LocalFleet`: on this machine, with the registry directory and its database (the actor in the
  audit log is the local user);
* :class:`RemoteFleet`: against ``edgeml fleet serve``'s HTTP API (the command's FLEET argument is then the
  server's URL) with an operator token; the server checks the token's role and audits the change under the
  token's name, exactly as for the dashboard.

The remote client guards its token: it never follows a redirect (a redirect would carry the token to
whatever host the server names; it is reported, with its ``Location``, as an error), it refuses plain
``http://`` to a host that is not this machine unless told ``insecure``, and it reads at most
:data:`MAX_RESPONSE_BYTES` of an answer. The token itself comes from ``--token-file`` or ``$EDGEML_TOKEN``
(:func:`~edgeml.fleet.web.auth.operator_token`), never from the command line.

Both offer the same methods and raise the same errors, so the CLI does not care which one it has.
:func:`telemetry_routes` is the server side of :meth:`RemoteFleet.telemetry`.
"""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.errors import ConfigError, ConflictError, EdgeMLError, NotFoundError, RegistryError
from edgeml.fleet.rollouts.rules import RolloutOptions
from edgeml.fleet.rollouts.store import RolloutStatus

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = ["MAX_RESPONSE_BYTES", "LocalFleet", "RemoteFleet", "open_fleet", "telemetry_routes"]

_TIMEOUT_S = 30.0
#: The largest answer the remote client reads.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class LocalFleet:
    """The fleet through the registry's database on this machine (close it after use).

    Args:
        directory: The registry directory.
        db_url: Its database URL (None: the registry's default).
    """

    def __init__(self, directory: Path, db_url: str | None = None) -> None:
        from edgeml.fleet.audit.log import local_actor, open_audit

        self.log = open_audit(directory, db_url=db_url)
        self.db, self.actor = self.log.db, local_actor()

    def start(self, model: str, version: str, options: RolloutOptions, rollout_id: str | None = None) -> str:
        from edgeml.fleet.rollouts.store import start_rollout

        return start_rollout(self.db, self.log, model, version, options, actor=self.actor, rollout_id=rollout_id)

    def status(self, rollout_id: str | None = None) -> list[RolloutStatus]:
        from edgeml.fleet.rollouts.store import rollout_status

        return rollout_status(self.db, rollout_id)

    def change(self, rollout_id: str, action: str, reason: str | None = None) -> str:
        from edgeml.fleet.rollouts.store import set_rollout_state

        return set_rollout_state(self.db, self.log, rollout_id, action, actor=self.actor, reason=reason)

    def rollback(self, model: str, to: str, *, select: dict[str, str], targets: Sequence[str] | None,
                 wave_timeout_s: float, probation_s: float) -> str:
        from edgeml.fleet.rollouts.store import rollback

        return rollback(self.db, self.log, model, to, actor=self.actor, select=select, targets=targets,
                        wave_timeout_s=wave_timeout_s, probation_s=probation_s)

    def telemetry(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        from edgeml.fleet.telemetry.store import TelemetryStore

        return [_jsonable(r) for r in TelemetryStore(self.db).latest(device_id, limit)]

    def close(self) -> None:
        self.db.close()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Answers a redirect with the 3xx itself (as an HTTPError): the token is never sent to the new place."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


def _segment(text: str) -> str:
    """``text`` as one path segment (a '/' or '?' in an id cannot reach another route)."""
    return urllib.parse.quote(text, safe="")


def _loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _checked_url(url: str, insecure: bool) -> str:
    """``url`` without a trailing slash, if it is a fleet server's base URL the token may be sent to.

    Raises:
        ConfigError: Not http(s), no host, user info or a query in it, or plain http to another machine.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{url!r} is not a fleet server URL", hint="use https://HOST[:PORT]")
    if parts.username is not None or parts.query or parts.fragment:
        raise ConfigError(f"a fleet server URL has no user, query or fragment: {parts.scheme}://{parts.hostname}...",
                          hint="give the token with --token-file or $EDGEML_TOKEN, and the URL alone")
    if parts.scheme == "http" and not _loopback(parts.hostname) and not insecure:
        raise ConfigError(f"refusing to send an operator token over plain http to {parts.hostname}",
                          hint="use https://, or --insecure on a network you trust (anyone on the path can "
                               "read the token)")
    return url.rstrip("/")


#: An error status of the fleet server -> the error the client raises (the server's own mapping, reversed).
_ERRORS: dict[int, type[EdgeMLError]] = {400: ConfigError, 404: NotFoundError, 409: ConflictError,
                                         413: ConfigError, 503: RegistryError}


class RemoteFleet:
    """The fleet through a fleet server's HTTP API.

    Args:
        url: The server's base URL, e.g. ``https://fleet.example:8470``.
        token: An operator token (:func:`~edgeml.fleet.web.auth.operator_token` finds the user's).
        insecure: Allow plain ``http://`` to a host other than this machine.

    Raises:
        ConfigError: A URL that is not http(s), or plain http to another host without ``insecure``.
    """

    def __init__(self, url: str, token: str, *, insecure: bool = False) -> None:
        self.url = _checked_url(url, insecure)
        self.headers = {"Authorization": f"Bearer {token}"}
        self._opener = urllib.request.build_opener(_NoRedirects)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={**self.headers, "Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=_TIMEOUT_S) as response:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise self._refused(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"cannot reach the fleet server at {self.url}: {getattr(exc, 'reason', exc)}",
                              hint="check the URL and that `edgeml fleet serve` runs there") from exc
        if len(raw) > MAX_RESPONSE_BYTES:
            raise EdgeMLError(f"the fleet server at {self.url} sent more than {MAX_RESPONSE_BYTES} bytes")
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise EdgeMLError(f"the fleet server at {self.url} answered {path} with something that is not JSON",
                              hint="is FLEET the URL of `edgeml fleet serve`?") from None

    def _refused(self, exc: urllib.error.HTTPError) -> EdgeMLError:
        """The project's error for an error status of the server."""
        from edgeml.fleet.web.auth import AuthError, ForbiddenError

        with exc:
            if 300 <= exc.code < 400:
                where = "".join(c for c in str(exc.headers.get("Location") or "nowhere") if c.isprintable())[:300]
                return ConfigError(f"{self.url} answered {exc.code}, a redirect to {where}; edgeml does not follow "
                                   "redirects, so that the operator token goes nowhere else",
                                   hint="give the final URL as FLEET if you trust it")
            try:
                doc = json.loads(exc.read(64 * 1024))
                message, hint = str(doc["error"]), doc.get("hint")
            except (ValueError, KeyError, TypeError, AttributeError, OSError):
                message, hint = f"HTTP {exc.code} {exc.reason}", None
        message = f"{self.url}: {message}"
        if exc.code == 401:
            return AuthError(message, hint=hint or "check the token (--token-file or $EDGEML_TOKEN)")
        if exc.code == 403:
            return ForbiddenError(message, hint=hint or "this needs a token with a higher role")
        return _ERRORS.get(exc.code, EdgeMLError)(message, hint=hint if isinstance(hint, str) else None)

    def start(self, model: str, version: str, options: RolloutOptions, rollout_id: str | None = None) -> str:
        doc = {"model": model, "version": version, "options": options.to_dict(), "id": rollout_id}
        return str(self._call("POST", "/api/rollouts", doc)["id"])

    def status(self, rollout_id: str | None = None) -> list[RolloutStatus]:
        docs = self._call("GET", "/api/rollouts" + (f"/{_segment(rollout_id)}" if rollout_id else ""))
        return [RolloutStatus(**doc) for doc in docs]

    def change(self, rollout_id: str, action: str, reason: str | None = None) -> str:
        return str(self._call("POST", f"/api/rollouts/{_segment(rollout_id)}/{_segment(action)}",
                              {"reason": reason})["state"])

    def rollback(self, model: str, to: str, *, select: dict[str, str], targets: Sequence[str] | None,
                 wave_timeout_s: float, probation_s: float) -> str:
        doc = {"model": model, "to": to, "select": select, "targets": list(targets) if targets else None,
               "wave_timeout_s": wave_timeout_s, "probation_s": probation_s}
        return str(self._call("POST", "/api/rollback", doc)["id"])

    def telemetry(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/api/devices/{_segment(device_id)}/telemetry?limit={int(limit)}"))

    def close(self) -> None:
        pass


def open_fleet(target: str, db_url: str | None = None, *, token_file: Path | None = None,
               insecure: bool = False) -> LocalFleet | RemoteFleet:
    """A :class:`RemoteFleet` when ``target`` is an ``http(s)://`` URL, else a :class:`LocalFleet` on the
    registry directory ``target``.

    Args:
        target: A registry directory, or a fleet server's URL.
        db_url: The registry's database URL (local only).
        token_file: A file holding the operator token (remote only; default: ``$EDGEML_TOKEN``).
        insecure: Allow plain ``http://`` to another host (remote only).

    Raises:
        AuthError: A URL without a token (no ``token_file``, ``$EDGEML_TOKEN`` unset).
        ConfigError: A URL the token must not be sent to, or an unusable ``token_file``.
        RegistryError: ``target`` is not a registry directory.
    """
    if target.startswith(("http://", "https://")):
        from edgeml.fleet.web.auth import operator_token

        return RemoteFleet(target, operator_token(token_file), insecure=insecure)
    return LocalFleet(Path(target), db_url)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()}


def telemetry_routes(db: Database) -> list[Any]:
    """``GET /api/devices/ID/telemetry?limit=N`` (viewer): a device's newest telemetry rows, newest first."""
    from edgeml.fleet.telemetry.store import TelemetryStore
    from edgeml.fleet.web.auth import Role
    from edgeml.fleet.web.dashboard import parse_query
    from edgeml.fleet.web.routes import ApiCall, api_route

    store = TelemetryStore(db)

    def latest(call: ApiCall) -> list[dict[str, Any]]:
        device = call.params["id"]
        if not _DEVICE_ID.fullmatch(device):
            raise NotFoundError(f"no device {device[:130]!r}", hint="device ids are letters, digits, '.', '_', '-'")
        limit = parse_query(call.query, {"limit": int}).get("limit", 20)
        if not 1 <= limit <= 10_000:
            raise ConfigError("limit must be a whole number from 1 to 10000")
        return [_jsonable(r) for r in store.latest(device, limit)]

    return [api_route("/api/devices/{id}/telemetry", latest, db=db, role=Role.VIEWER)]
