"""Staged rollouts: the store (``rollouts`` and ``rollout_devices``) and its HTTP API.

The rules live in :mod:`~edgeml.fleet.rollouts.rules` (pure); the controller that carries rollouts out is
:mod:`~edgeml.fleet.rollouts.controller`. This module holds what operators do:

* :func:`start_rollout`, :func:`rollback`, :func:`set_rollout_state` (pause, resume, abort) and
  :func:`rollout_status` read and write the database, each change audited in the same transaction.
* :func:`rollout_routes` puts them on the fleet's HTTP API: reading needs a viewer token, every change an
  operator token (:func:`~edgeml.fleet.web.routes.api_route`); the audit log names the token.

A rollout's state changes are compare-and-set, so a pause or an abort from the CLI between the controller's
read and write is never lost.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeml.errors import ConfigError, ConflictError, NotFoundError
from edgeml.fleet.rollouts import rules
from edgeml.fleet.rollouts.rules import RolloutError, RolloutOptions
from edgeml.fleet.rollouts.states import ROLLOUT_TRANSITIONS, Phase, RolloutEvent, phase_of, resumed, stored_state
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import utcnow
from edgeml.fleet.store.schema import sa
from edgeml.protocol import ProtocolError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from edgeml.fleet.store.db import Database

__all__ = ["RolloutConflictError", "RolloutStatus", "UnknownRolloutError", "rollback", "rollout_routes",
           "rollout_status", "set_rollout_state", "start_rollout"]


class UnknownRolloutError(RolloutError, NotFoundError):
    """No rollout has that id (HTTP 404)."""


class RolloutConflictError(RolloutError, ConflictError):
    """The rollout's state refuses the change: it is finished, changed meanwhile, or its id is taken (HTTP 409)."""


def _ts(value: dt.datetime | None) -> float | None:
    """Unix seconds of a stored time (SQLite returns naive UTC)."""
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()


def _at(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


# --- the store ----------------------------------------------------------------------------------------------


def _published(db: Database, conn: Connection, model: str, version: str) -> dict[str, dict[str, Any]]:
    """target -> {"runtime", "path"} of ``model`` ``version`` (path: in the repository), in publication order.

    Raises:
        RolloutError: The model or the version is unknown.
    """
    m, v = schema.models, schema.versions
    model_id = conn.execute(sa.select(m.c.id).where(m.c.name == model)).scalar()
    if model_id is None:
        known = sorted(conn.execute(sa.select(m.c.name)).scalars())
        raise RolloutError(f"unknown model {model!r}", hint=f"published models: {', '.join(known) or 'none'}")
    from edgeml.fleet.registry.tuf_repo import hashed_target_path

    rows = conn.execute(sa.select(v.c.version, v.c.target, v.c.runtime, v.c.tuf_path, v.c.sha256)
                        .where(v.c.model_id == model_id).order_by(v.c.targets_version, v.c.id)).all()
    found = {r.target: {"runtime": dict(r.runtime), "path": f"targets/{hashed_target_path(r.tuf_path, r.sha256)}"}
             for r in rows if r.version == version}
    if not found:
        known = sorted({r.version for r in rows})
        raise RolloutError(f"model {model!r} has no version {version!r}",
                           hint=f"published versions: {', '.join(known)}")
    return found


def _facts(db: Database, conn: Connection) -> list[rules.DeviceFacts]:
    d = schema.devices
    query = sa.select(d.c.device_id, d.c.tags, d.c.capabilities, d.c.installed, d.c.revoked)
    return [rules.DeviceFacts(r.device_id, dict(r.tags or {}), r.capabilities, dict(r.installed or {}),
                              bool(r.revoked)) for r in conn.execute(query)]


def start_rollout(db: Database, audit: Any, model: str, version: str, options: RolloutOptions, *, actor: str,
                  kind: str = "rollout", rollout_id: str | None = None) -> str:
    """Plan a rollout and store it (the controller starts it); returns its id.

    Args:
        db: The registry's :class:`~edgeml.fleet.store.db.Database`.
        audit: Its :class:`~edgeml.fleet.audit.log.AuditLog` (the start is appended in the same transaction).
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
        rollouts = schema.rollouts
        if conn.execute(sa.select(rollouts.c.id).where(rollouts.c.id == rollout_id)).first() is not None:
            raise RolloutConflictError(f"a rollout with id {rollout_id!r} exists", hint="choose another --id")
        available = _published(db, conn, model, version)
        plan = rules.plan(rollout_id, model, version, _facts(db, conn),
                          options, {t: p["runtime"] for t, p in available.items()})
        conn.execute(schema.rollouts.insert().values(
            id=rollout_id, kind=kind, model=model, version=version, options=options.to_dict(),
            state=Phase.PENDING.value, current_wave=0, created_by=actor, created_at=now, updated_at=now))
        conn.execute(schema.rollout_devices.insert(), [
            {"rollout_id": rollout_id, "device_id": a.device_id, "wave": a.wave, "target": a.target,
             "previous": a.previous, "state": a.state.value, "reason": a.reason} for a in plan])
        counts = [sum(1 for a in plan if a.wave == w and a.state != "incompatible")
                  for w in range(len(options.waves) + 1)]
        audit.append(actor, "rollback" if kind == "rollback" else "rollout.start", f"{model}:{version}",
                     {"rollout": rollout_id, "options": options.to_dict(), "devices_per_wave": counts,
                      "incompatible": sum(1 for a in plan if a.state == "incompatible")}, conn=conn)
    return rollout_id


def rollback(db: Database, audit: Any, model: str, to_version: str, *, actor: str, select: dict[str, str] | None = None,
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


def set_rollout_state(db: Database, audit: Any, rollout_id: str, action: str, *, actor: str,
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
    t = schema.rollouts
    with audit.transaction() as conn:
        row = conn.execute(sa.select(t).where(t.c.id == rollout_id)).first()
        if row is None:
            raise UnknownRolloutError(f"unknown rollout {rollout_id!r}",
                                      hint="list them with `edgeml fleet rollout status`")
        new = _transition(row, action, actor, reason)
        values: dict[str, Any] = {"state": new, "updated_at": utcnow()}
        if action == "resume" and row.wave_started_at is not None:
            values["wave_started_at"] = values["updated_at"]  # offline devices get the whole wave timeout again
        if new == Phase.ABORTED.value:
            values["abort_reason"] = f"aborted by {actor}" + (f": {reason}" if reason else "")
        done = conn.execute(t.update().where((t.c.id == rollout_id) & (t.c.state == row.state)).values(**values))
        if done.rowcount != 1:
            raise RolloutConflictError(f"rollout {rollout_id} changed meanwhile; try again")
        audit.append(actor, f"rollout.{action}", f"{row.model}:{row.version}",
                     {"rollout": rollout_id, "from": row.state, "to": new, "reason": reason}, conn=conn)
    return new


def _transition(row: Any, action: str, actor: str, reason: str | None) -> str:
    """The stored state after ``action``, by the lifecycle table (:data:`~.states.ROLLOUT_TRANSITIONS`)."""
    try:
        event = RolloutEvent(action)
    except ValueError:
        event = None
    if event not in (RolloutEvent.PAUSE, RolloutEvent.RESUME, RolloutEvent.ABORT):
        raise RolloutError(f"unknown rollout action {action!r} (pause, resume or abort)")
    phase = phase_of(row.state)
    if event is RolloutEvent.RESUME and phase is Phase.PAUSED:
        return resumed(row.wave_started_at is not None, row.current_wave)
    after = ROLLOUT_TRANSITIONS.get((phase, event))
    if after is None:
        raise RolloutConflictError(f"rollout {row.id} is {row.state}; it cannot be {action}d"
                                   if event is not RolloutEvent.ABORT else f"rollout {row.id} is already {row.state}")
    return stored_state(after, row.current_wave)


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

    def transfer(self) -> dict[str, int]:
        """How the bundles came to the devices that reported it: counts by kind (``delta``, ``full``, and
        ``fallback`` for a delta offered but not used), the ``bytes`` fetched and the ``full_bytes`` the full
        bundles would have been."""
        out = {"delta": 0, "full": 0, "fallback": 0, "bytes": 0, "full_bytes": 0}
        for d in self.devices:
            t = d.get("transfer") or {}
            if t.get("kind") in ("delta", "full"):
                out[t["kind"]] += 1
                out["fallback"] += 1 if t.get("fallback") else 0
                out["bytes"] += int(t.get("bytes") or 0)
                out["full_bytes"] += int(t.get("full_bytes") or t.get("bytes") or 0)
        return out

    def counts(self) -> list[dict[str, int]]:
        """Per wave: device state -> count."""
        waves: list[dict[str, int]] = [{} for _ in range(len(self.options["waves"]) + 1)]
        for d in self.devices:
            waves[d["wave"]][d["state"]] = waves[d["wave"]].get(d["state"], 0) + 1
        return waves


def rollout_status(db: Database, rollout_id: str | None = None) -> list[RolloutStatus]:
    """One rollout (``rollout_id``) or all of them, newest first.

    Raises:
        RolloutError: ``rollout_id`` is unknown.
    """
    t, rd = schema.rollouts, schema.rollout_devices
    with db.transaction() as conn:
        query = sa.select(t).order_by(t.c.created_at.desc(), t.c.id)
        rows = conn.execute(query if rollout_id is None else query.where(t.c.id == rollout_id)).all()
        if rollout_id is not None and not rows:
            raise UnknownRolloutError(f"unknown rollout {rollout_id!r}")
        out = []
        for r in rows:
            devices = conn.execute(sa.select(rd).where(rd.c.rollout_id == r.id).order_by(rd.c.wave, rd.c.id)).all()
            out.append(RolloutStatus(r.id, r.kind, r.model, r.version, r.state, r.current_wave, r.abort_reason,
                                     r.created_by, dict(r.options), [_device_doc(d) for d in devices]))
    return out


def _device_doc(d: Any) -> dict[str, Any]:
    return {"device_id": d.device_id, "wave": d.wave, "target": d.target, "state": d.state, "reason": d.reason,
            "cause": d.cause, "previous": d.previous, "command_id": d.command_id, "revert_state": d.revert_state,
            "notified_at": _ts(d.notified_at), "finished_at": _ts(d.finished_at),  # Unix seconds
            "transfer": d.transfer}


# --- the HTTP API -------------------------------------------------------------------------------------------


def _text(doc: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = doc.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"the request needs {name!r} as a non-empty string")
    return value


def _seconds(doc: Mapping[str, Any], name: str, default: float) -> float:
    value = doc.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name!r} must be a number of seconds")
    return float(value)


def _options(doc: Mapping[str, Any]) -> RolloutOptions:
    raw = doc.get("options")
    if not isinstance(raw, dict):
        raise ConfigError("the request needs 'options' as an object", hint="as RolloutOptions.to_dict names them")
    try:
        return RolloutOptions.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"bad rollout options: {exc}") from None


def rollout_routes(db: Database, audit: Any) -> list[Any]:
    """Rollouts on the fleet's HTTP API (Starlette routes for :func:`~edgeml.fleet.web.server.build_app`).

    ``GET /api/rollouts[/ID]`` (viewer); ``POST /api/rollouts`` with ``{"model", "version", "options",
    "id"?}`` (options as :meth:`RolloutOptions.to_dict` names them, durations in seconds),
    ``POST /api/rollouts/ID/pause|resume|abort`` with ``{"reason"?}``, and ``POST /api/rollback`` with
    ``{"model", "to", "select"?, "targets"?, "wave_timeout_s"?, "probation_s"?}`` (operator). Bad input is a
    400, an unknown rollout a 404, a change its state refuses a 409.

    Args:
        db: The registry's database (tokens and rollouts).
        audit: Its audit log.
    """
    from edgeml.fleet.web.auth import Role
    from edgeml.fleet.web.routes import ApiCall, api_route

    def start(call: ApiCall) -> dict[str, str]:
        rid = start_rollout(db, audit, str(_text(call.body, "model")), str(_text(call.body, "version")),
                            _options(call.body), actor=call.actor, rollout_id=_text(call.body, "id", required=False))
        return {"id": rid}

    def change(action: str) -> Callable[[ApiCall], dict[str, str]]:
        def run(call: ApiCall) -> dict[str, str]:
            return {"state": set_rollout_state(db, audit, call.params["id"], action, actor=call.actor,
                                               reason=_text(call.body, "reason", required=False))}

        run.__name__ = action
        return run

    def back(call: ApiCall) -> dict[str, str]:
        select, targets = call.body.get("select"), call.body.get("targets")
        if select is not None and not (isinstance(select, dict)
                                       and all(isinstance(v, str) for v in [*select, *select.values()])):
            raise ConfigError("'select' must be an object of tag names to values (strings)")
        if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise ConfigError("'targets' must be a list of target names")
        return {"id": rollback(db, audit, str(_text(call.body, "model")), str(_text(call.body, "to")),
                               actor=call.actor, select=select, targets=targets or None,
                               wave_timeout_s=_seconds(call.body, "wave_timeout_s", 600.0),
                               probation_s=_seconds(call.body, "probation_s", 300.0))}

    def show(call: ApiCall) -> list[dict[str, Any]]:
        return [vars(s) for s in rollout_status(db, call.params.get("id"))]

    viewer, operator = Role.VIEWER, Role.OPERATOR
    return [
        api_route("/api/rollouts", show, db=db, role=viewer),
        api_route("/api/rollouts", start, methods=["POST"], status=201, body=True, db=db, role=operator),
        api_route("/api/rollouts/{id}", show, db=db, role=viewer),
        *(api_route(f"/api/rollouts/{{id}}/{action}", change(action), methods=["POST"], body=True, db=db,
                    role=operator) for action in ("pause", "resume", "abort")),
        api_route("/api/rollback", back, methods=["POST"], status=201, body=True, db=db, role=operator),
    ]
