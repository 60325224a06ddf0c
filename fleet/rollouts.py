"""Staged rollouts: the store (``rollouts`` and ``rollout_devices``) and its HTTP API.

The rules live in :mod:`~edgeml.fleet.rollout_rules` (pure); the controller that carries rollouts out is
:mod:`~edgeml.fleet.rollout_controller`. This module holds what operators do:

* :func:`start_rollout`, :func:`rollback`, :func:`set_rollout_state` (pause, resume, abort) and
  :func:`rollout_status` read and write the database, each change audited in the same transaction.
* :func:`add_rollout_routes` puts them on the fleet's HTTP API: reading needs a viewer token, every change an
  operator token (:func:`~edgeml.fleet.auth.authorized`); the audit log names the token.

A rollout's state changes are compare-and-set, so a pause or an abort from the CLI between the controller's
read and write is never lost.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgeml.errors import EdgeMLError
from edgeml.fleet import rollout_rules as rules
from edgeml.fleet.db import utcnow
from edgeml.fleet.rollout_rules import RolloutError, RolloutOptions
from edgeml.protocol import ProtocolError

__all__ = ["RolloutStatus", "add_rollout_routes", "rollback", "rollout_status",
           "set_rollout_state", "start_rollout"]


def _ts(value: dt.datetime | None) -> float | None:
    """Unix seconds of a stored time (SQLite returns naive UTC)."""
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()


def _at(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


# --- the store ----------------------------------------------------------------------------------------------


def _published(db: Any, conn: Any, model: str, version: str) -> dict[str, dict[str, Any]]:
    """target -> {"runtime", "path"} of ``model`` ``version`` (path: in the repository), in publication order.

    Raises:
        RolloutError: The model or the version is unknown.
    """
    m, v, sa = db.tables["models"], db.tables["versions"], db.sa
    model_id = conn.execute(sa.select(m.c.id).where(m.c.name == model)).scalar()
    if model_id is None:
        known = sorted(conn.execute(sa.select(m.c.name)).scalars())
        raise RolloutError(f"unknown model {model!r}", hint=f"published models: {', '.join(known) or 'none'}")
    from edgeml.fleet.tuf_repo import hashed_target_path

    rows = conn.execute(sa.select(v.c.version, v.c.target, v.c.runtime, v.c.tuf_path, v.c.sha256)
                        .where(v.c.model_id == model_id).order_by(v.c.targets_version, v.c.id)).all()
    found = {r.target: {"runtime": dict(r.runtime), "path": f"targets/{hashed_target_path(r.tuf_path, r.sha256)}"}
             for r in rows if r.version == version}
    if not found:
        known = sorted({r.version for r in rows})
        raise RolloutError(f"model {model!r} has no version {version!r}",
                           hint=f"published versions: {', '.join(known)}")
    return found


def _facts(db: Any, conn: Any) -> list[rules.DeviceFacts]:
    d = db.tables["devices"]
    query = db.sa.select(d.c.device_id, d.c.tags, d.c.capabilities, d.c.installed, d.c.revoked)
    return [rules.DeviceFacts(r.device_id, dict(r.tags or {}), r.capabilities, dict(r.installed or {}),
                              bool(r.revoked)) for r in conn.execute(query)]


def start_rollout(db: Any, audit: Any, model: str, version: str, options: RolloutOptions, *, actor: str,
                  kind: str = "rollout", rollout_id: str | None = None) -> str:
    """Plan a rollout and store it (the controller starts it); returns its id.

    Args:
        db: The registry's :class:`~edgeml.fleet.db.Database`.
        audit: Its :class:`~edgeml.fleet.audit.AuditLog` (the start is appended in the same transaction).
        model: The model's name.
        version: The version to roll out.
        options: How (validated when built).
        actor: Who asked (``local:<user>``, ``token:<name>``).
        kind: ``rollout``, or ``rollback`` (audited as such).
        rollout_id: Its id (default: a new random one); lowercase letters, digits and ``-``.

    Raises:
        RolloutError: Unknown model or version, an empty selection, or no device that can run a target.
        RegistryError: The database failed; nothing was written.
    """
    rollout_id = rollout_id or f"ro-{secrets.token_hex(5)}"
    try:
        from edgeml.protocol import validate_device_id

        validate_device_id(rollout_id)
    except ProtocolError as exc:
        raise RolloutError(f"invalid rollout id {rollout_id!r}", hint=exc.hint) from exc
    now = utcnow()
    with audit.transaction() as conn:
        available = _published(db, conn, model, version)
        plan = rules.plan(rollout_id, model, version, _facts(db, conn),
                          options, {t: p["runtime"] for t, p in available.items()})
        conn.execute(db.tables["rollouts"].insert().values(
            id=rollout_id, kind=kind, model=model, version=version, options=options.to_dict(), state="pending",
            current_wave=0, created_by=actor, created_at=now, updated_at=now))
        conn.execute(db.tables["rollout_devices"].insert(), [
            {"rollout_id": rollout_id, "device_id": a.device_id, "wave": a.wave, "target": a.target,
             "previous": a.previous, "state": a.state, "reason": a.reason} for a in plan])
        counts = [sum(1 for a in plan if a.wave == w and a.state != "incompatible")
                  for w in range(len(options.waves) + 1)]
        audit.append(actor, "rollback" if kind == "rollback" else "rollout.start", f"{model}:{version}",
                     {"rollout": rollout_id, "options": options.to_dict(), "devices_per_wave": counts,
                      "incompatible": sum(1 for a in plan if a.state == "incompatible")}, conn=conn)
    return rollout_id


def rollback(db: Any, audit: Any, model: str, to_version: str, *, actor: str, select: dict[str, str] | None = None,
             targets: Sequence[str] | None = None, wave_timeout_s: float = 600.0, probation_s: float = 300.0,
             device_thresholds: dict[str, float] | None = None, rollout_id: str | None = None) -> str:
    """Roll the selected devices back to ``to_version``: a new rollout of it in a single wave; returns its id.

    It never aborts on failures (that would leave devices on the version being rolled back).

    Args:
        db: The registry's database.
        audit: Its audit log (the rollback is appended as ``rollback``).
        model: The model.
        to_version: The version to go back to.
        actor: Who asked.
        select: Tags the devices must have (None: every device).
        targets: Targets in order of preference (default: every target of ``to_version``).
        wave_timeout_s: Seconds a device may take.
        probation_s: Probation on each device.
        device_thresholds: More health thresholds for the agents.
        rollout_id: Its id (default: a new one).

    Raises:
        RolloutError: Unknown model or version, or no device to roll back.
    """
    if targets is None:
        with db.transaction() as conn:
            targets = list(_published(db, conn, model, to_version))
    options = RolloutOptions(targets=tuple(targets), select=dict(select or {}), canary=1.0, waves=(1.0,),
                             wave_timeout_s=wave_timeout_s, probation_s=probation_s, max_failure_rate=1.0,
                             min_devices=1, device_thresholds=dict(device_thresholds or {}))
    return start_rollout(db, audit, model, to_version, options, actor=actor, kind="rollback", rollout_id=rollout_id)


def set_rollout_state(db: Any, audit: Any, rollout_id: str, action: str, *, actor: str,
                      reason: str | None = None) -> str:
    """Pause, resume or abort a rollout; returns its new state.

    Args:
        db: The registry's database.
        audit: Its audit log (``rollout.pause|resume|abort``, same transaction).
        rollout_id: The rollout.
        action: ``pause``, ``resume`` or ``abort``.
        actor: Who asked.
        reason: Why (abort only; recorded).

    Raises:
        RolloutError: Unknown rollout or action, or the rollout is not in a state that allows it.
    """
    t, sa = db.tables["rollouts"], db.sa
    with audit.transaction() as conn:
        row = conn.execute(sa.select(t).where(t.c.id == rollout_id)).first()
        if row is None:
            raise RolloutError(f"unknown rollout {rollout_id!r}", hint="list them with `edgeml fleet rollout status`")
        new = _transition(row, action, actor, reason)
        values: dict[str, Any] = {"state": new, "updated_at": utcnow()}
        if action == "resume" and row.wave_started_at is not None:
            values["wave_started_at"] = values["updated_at"]  # offline devices get the whole wave timeout again
        if new == "aborted":
            values["abort_reason"] = f"aborted by {actor}" + (f": {reason}" if reason else "")
        done = conn.execute(t.update().where((t.c.id == rollout_id) & (t.c.state == row.state)).values(**values))
        if done.rowcount != 1:
            raise RolloutError(f"rollout {rollout_id} changed meanwhile; try again")
        audit.append(actor, f"rollout.{action}", f"{row.model}:{row.version}",
                     {"rollout": rollout_id, "from": row.state, "to": new, "reason": reason}, conn=conn)
    return new


def _transition(row: Any, action: str, actor: str, reason: str | None) -> str:
    running = row.state in ("pending", "canary") or row.state.startswith("wave-")
    if action == "pause" and running:
        return "paused"
    if action == "resume" and row.state == "paused":
        return "pending" if row.wave_started_at is None else rules.wave_state(row.current_wave)
    if action == "abort" and row.state not in ("completed", "aborted"):
        return "aborted"
    if action not in ("pause", "resume", "abort"):
        raise RolloutError(f"unknown rollout action {action!r} (pause, resume or abort)")
    raise RolloutError(f"rollout {row.id} is {row.state}; it cannot be {action}d"
                       if action != "abort" else f"rollout {row.id} is already {row.state}")


@dataclass(frozen=True)
class RolloutStatus:
    """A rollout and its devices."""

    id: str
    kind: str
    model: str
    version: str
    state: str
    current_wave: int
    abort_reason: str | None
    created_by: str
    options: dict[str, Any]
    devices: list[dict[str, Any]]

    def counts(self) -> list[dict[str, int]]:
        """Per wave: device state -> count."""
        waves: list[dict[str, int]] = [{} for _ in range(len(self.options["waves"]) + 1)]
        for d in self.devices:
            waves[d["wave"]][d["state"]] = waves[d["wave"]].get(d["state"], 0) + 1
        return waves


def rollout_status(db: Any, rollout_id: str | None = None) -> list[RolloutStatus]:
    """One rollout (``rollout_id``) or all of them, newest first.

    Raises:
        RolloutError: ``rollout_id`` is unknown.
    """
    t, rd, sa = db.tables["rollouts"], db.tables["rollout_devices"], db.sa
    with db.transaction() as conn:
        query = sa.select(t).order_by(t.c.created_at.desc(), t.c.id)
        rows = conn.execute(query if rollout_id is None else query.where(t.c.id == rollout_id)).all()
        if rollout_id is not None and not rows:
            raise RolloutError(f"unknown rollout {rollout_id!r}")
        out = []
        for r in rows:
            devices = conn.execute(sa.select(rd).where(rd.c.rollout_id == r.id).order_by(rd.c.wave, rd.c.id)).all()
            out.append(RolloutStatus(r.id, r.kind, r.model, r.version, r.state, r.current_wave, r.abort_reason,
                                     r.created_by, dict(r.options), [_device_doc(d) for d in devices]))
    return out


def _device_doc(d: Any) -> dict[str, Any]:
    return {"device_id": d.device_id, "wave": d.wave, "target": d.target, "state": d.state, "reason": d.reason,
            "previous": d.previous, "command_id": d.command_id, "revert_state": d.revert_state,
            "notified_at": _ts(d.notified_at), "finished_at": _ts(d.finished_at)}  # Unix seconds


# --- the HTTP API -------------------------------------------------------------------------------------------


def add_rollout_routes(server: Any, db: Any, audit: Any) -> None:
    """Serve rollouts on ``server`` (an :class:`~edgeml.fleet.http_server.HttpServer`).

    ``GET /api/rollouts[/ID]`` (viewer); ``POST /api/rollouts`` with ``{"model", "version", "options",
    "id"?}`` (options as :meth:`RolloutOptions.to_dict` names them, durations in seconds),
    ``POST /api/rollouts/ID/pause|resume|abort`` with ``{"reason"?}``, and ``POST /api/rollback`` with
    ``{"model", "to", "select"?, "targets"?, "wave_timeout_s"?, "probation_s"?}`` (operator). Bad input is a
    400 with ``{"error"}``.

    Args:
        server: The HTTP server (routes are added before it starts).
        db: The registry's database (tokens and rollouts).
        audit: Its audit log.
    """
    from edgeml.fleet.auth import Role, authorized
    from edgeml.fleet.http_server import Response

    def answer(work: Callable[[dict[str, Any]], Any], request: Any, status: int = 200) -> Any:
        try:
            doc = json.loads(request.body or b"{}")
            if not isinstance(doc, dict):
                raise ValueError("the request body must be a JSON object")
            return Response.json(work(doc), status)
        except RolloutError as exc:
            code = 404 if exc.message.startswith("unknown rollout") else 400
            return Response.json({"error": exc.message, "status": code}, code)
        except (EdgeMLError, KeyError, TypeError, ValueError) as exc:
            return Response.json({"error": f"bad request: {exc}", "status": 400}, 400)

    def start(request: Any, who: Any) -> Any:
        return answer(lambda doc: {"id": start_rollout(db, audit, str(doc["model"]), str(doc["version"]),
                                                       RolloutOptions.from_dict(doc["options"]), actor=who.actor,
                                                       rollout_id=doc.get("id"))}, request, 201)

    def change(request: Any, who: Any) -> Any:
        return answer(lambda doc: {"state": set_rollout_state(db, audit, request.params["id"],
                                                              request.params["action"], actor=who.actor,
                                                              reason=doc.get("reason"))}, request)

    def back(request: Any, who: Any) -> Any:
        return answer(lambda doc: {"id": rollback(db, audit, str(doc["model"]), str(doc["to"]), actor=who.actor,
                                                  select=doc.get("select"), targets=doc.get("targets"),
                                                  wave_timeout_s=float(doc.get("wave_timeout_s") or 600.0),
                                                  probation_s=float(doc.get("probation_s") or 300.0))},
                      request, 201)

    def show(request: Any, who: Any) -> Any:
        return answer(lambda doc: [vars(s) for s in rollout_status(db, request.params.get("id"))], request)

    rid = r"(?P<id>[a-z0-9][a-z0-9-]{0,63})"
    server.add_route("GET", r"/api/rollouts", authorized(db, Role.VIEWER)(show))
    server.add_route("GET", rf"/api/rollouts/{rid}", authorized(db, Role.VIEWER)(show))
    server.add_route("POST", r"/api/rollouts", authorized(db, Role.OPERATOR)(start))
    server.add_route("POST", rf"/api/rollouts/{rid}/(?P<action>pause|resume|abort)",
                     authorized(db, Role.OPERATOR)(change))
    server.add_route("POST", r"/api/rollback", authorized(db, Role.OPERATOR)(back))
