"""Staged rollouts: the store (``rollouts`` and ``rollout_devices``) and the controller that drives them.

The rules live in :mod:`~edgeml.fleet.rollout_rules` (pure); this module does the I/O around them.

* :func:`start_rollout`, :func:`rollback`, :func:`set_rollout_state` (pause, resume, abort) and
  :func:`rollout_status` read and write the database, each change audited in the same transaction.
* :func:`add_rollout_routes` puts them on the fleet's HTTP API: reading needs a viewer token, every change an
  operator token (:func:`~edgeml.fleet.auth.authorized`); the audit log names the token.
* :class:`RolloutController` subscribes to every device's ``events`` and ``state``, and on each tick applies
  the devices' ``update`` events to the store, asks :func:`~edgeml.fleet.rollout_rules.decide` what to do for
  each rollout with work left, writes the decision, and only then sends the commands.

Restart safety: all state is in the database. A device whose command was decided is ``notifying`` until the
broker acknowledged the command (QoS 1), then ``notified``; a controller that starts again sends the
``notifying`` ones (with the same command id) and nothing else, so no device is told twice. Its MQTT session
is persistent (a fixed client id), so the devices' events published while it was down are delivered when it
comes back. A rollout's state changes are compare-and-set, so a pause or an abort from the CLI between a
read and a write is never lost.

Model signals used: the agents' rollback reasons (``p99``, ``error rate``, ``drift``), the drift score of
their ``drift`` events for the new version, and what their telemetry says while they run it (p99 against the
previous version, error rate, drift score: :mod:`~edgeml.fleet.rollout_signals`), read every ``signals_s``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from edgeml.errors import EdgeMLError
from edgeml.fleet import rollout_rules as rules
from edgeml.fleet.rollout_rules import DeviceRow, DeviceSignals, RolloutError, RolloutOptions, RolloutView
from edgeml.fleet.rollout_signals import Judged, telemetry_signals
from edgeml.protocol import PREFIX, Command, ProtocolError, State, device_topic, parse, parse_device_topic

__all__ = ["CONTROLLER_ACTOR", "RolloutController", "RolloutStatus", "add_rollout_routes", "rollback", "rollout_status",
           "set_rollout_state", "start_rollout"]

_log = logging.getLogger(__name__)
_RESULTS = {"committed", "rolled_back", "failed", "incompatible", "busy"}
#: The audit log's actor of what the controller decides by itself (an abort on failures or model signals).
CONTROLLER_ACTOR = "system:rollout-controller"


class _Changed(Exception):
    """The rollout's state changed between the read and the write of a decision."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


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
    now = _now()
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
        values: dict[str, Any] = {"state": new, "updated_at": _now()}
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


# --- the controller -----------------------------------------------------------------------------------------


class RolloutController:
    """Drives every rollout in the database over MQTT, one tick at a time, in a thread of its own.

    Args:
        db: The registry's database.
        broker_host: The broker's host.
        broker_port: Its port.
        dist: A started :class:`~edgeml.fleet.distribution.DistributionService` to broadcast each rollout's
            files once (None: devices fetch them with get requests).
        username: Broker user (the fleet user).
        password: Its password.
        tls: SSL context for a TLS listener (None: plain TCP).
        client_id: The MQTT client id; keep it stable across restarts (the session keeps events meanwhile).
        record_states: Write the devices' reported states (status, capabilities, installed) to the ``devices``
            table, which plans read (turn it off where an ingest worker with state on does it).
        tick_s: Seconds between ticks.
        signals_s: Seconds between reads of the telemetry signals of a rollout with model thresholds.
        audit: The audit log, where the controller's own aborts are appended (actor :data:`CONTROLLER_ACTOR`).
        clock: Unix time source.
    """

    def __init__(self, db: Any, broker_host: str, broker_port: int, *, dist: Any = None, username: str | None = None,
                 password: str | None = None, tls: ssl.SSLContext | None = None,
                 client_id: str = "edgeml-rollouts", record_states: bool = True, tick_s: float = 1.0,
                 signals_s: float = 5.0, audit: Any = None, clock: Callable[[], float] = time.time) -> None:
        from edgeml.fleet.telemetry_store import TelemetryStore

        self.db, self.dist, self.tick_s, self.signals_s, self.clock = db, dist, tick_s, signals_s, clock
        self.audit = audit
        self._telemetry: dict[str, tuple[float, dict[str, DeviceSignals]]] = {}  # rollout -> (read at, signals)
        self._store = TelemetryStore(db) if record_states else None
        self.broker = (broker_host, broker_port)
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set_context(tls)
        self._subscribed = threading.Event()
        self._inbox: queue.SimpleQueue[tuple[str, bytes, bool]] = queue.SimpleQueue()
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = lambda c, u, msg: self._inbox.put((msg.topic, bytes(msg.payload), msg.retain))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.states: dict[str, State] = {}
        self._drift: dict[tuple[str, str], float] = {}
        self._events: list[tuple[str, dict[str, Any]]] = []  # update events received, not yet recorded
        self._states_seen: list[tuple[State, bool]] = []  # states received, not yet recorded
        self._targets: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe, and tick in a background thread.

        Raises:
            EdgeMLError: Not connected and subscribed within ``timeout``.
        """
        try:
            self._client.connect(*self.broker, keepalive=30)
        except (OSError, ValueError) as exc:
            raise EdgeMLError(f"rollouts: cannot connect to the broker at {self.broker}: {exc}") from exc
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise EdgeMLError(f"rollouts: not subscribed at {self.broker} within {timeout} s")
        self._thread = threading.Thread(target=self._run, name="edgeml-rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop ticking and disconnect (the session stays on the broker)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> RolloutController:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe([(f"{PREFIX}devices/+/events", 1), (f"{PREFIX}devices/+/state", 1)])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a database or broker hiccup must not end the controller; the next tick retries
                _log.exception("rollout tick failed")
            self._stop.wait(self.tick_s)

    # --- one tick -------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Apply the events received, then decide, record and send for each rollout with work left."""
        self._apply_inbox()
        for rollout_id in self._rollouts_with_work():
            self._step(rollout_id)

    def _apply_inbox(self) -> None:
        """Record the states and update events received; kept for the next tick if the database fails."""
        events, states = self._events, self._states_seen
        while not self._inbox.empty():
            topic, payload, retained = self._inbox.get_nowait()
            try:
                device_id, channel = parse_device_topic(topic)
                if channel == "state":
                    if payload:
                        state = parse("state", payload)
                        assert isinstance(state, State)
                        self.states[device_id] = state
                        states.append((state, not retained))
                    continue
                doc = json.loads(payload)
            except (ProtocolError, ValueError) as exc:
                _log.warning("ignored a message on %s: %s", topic, exc)
                continue
            if isinstance(doc, dict) and doc.get("type") == "drift" and isinstance(doc.get("window"), dict):
                score = doc["window"].get("score")
                if isinstance(score, (int, float)):
                    self._drift[(device_id, str(doc.get("version")))] = float(score)
            elif isinstance(doc, dict) and doc.get("type") == "update" and isinstance(doc.get("rollout"), str):
                events.append((device_id, doc))
        if states and self._store is not None:
            self._store.store_batch([], states)
        states.clear()
        if events:
            with self.db.transaction() as conn:
                for device_id, doc in events:
                    self._apply_event(conn, device_id, doc)
            events.clear()

    def _apply_event(self, conn: Any, device_id: str, doc: dict[str, Any]) -> None:
        rd, sa = self.db.tables["rollout_devices"], self.db.sa
        row = conn.execute(sa.select(rd).where((rd.c.rollout_id == doc["rollout"]) &
                                               (rd.c.device_id == device_id))).first()
        state, reason = doc.get("state"), str(doc.get("reason") or "")[:1000] or None
        if row is None or state not in _RESULTS:
            return
        if doc.get("id") == row.command_id and row.state in rules.IN_FLIGHT | {"timed_out"}:
            new = "failed" if state == "busy" else state
            reason = f"busy: {reason}" if state == "busy" else reason
            conn.execute(rd.update().where(rd.c.id == row.id).values(state=new, reason=reason, finished_at=_now()))
        elif doc.get("id") == row.revert_id and row.revert_state == "revert-sent":
            conn.execute(rd.update().where(rd.c.id == row.id).values(
                revert_state="reverted" if state == "committed" else "revert-failed"))

    def _rollouts_with_work(self) -> list[str]:
        t, rd, sa = self.db.tables["rollouts"], self.db.tables["rollout_devices"], self.db.sa
        waiting = (rd.c.state.in_(sorted(rules.IN_FLIGHT)) | rd.c.revert_state.in_(("rollback", "revert"))
                   | ((t.c.state == "aborted") & (rd.c.state == "committed") & rd.c.previous.isnot(None)
                      & (rd.c.revert_state.is_(None) | (rd.c.revert_state == "rollback-sent")))
                   | ((t.c.state == "completed") & (rd.c.state == "timed_out") & rd.c.notified_at.is_(None)))
        query = (sa.select(t.c.id).select_from(t.outerjoin(rd, rd.c.rollout_id == t.c.id))
                 .where(t.c.state.notin_(("completed", "aborted")) | waiting).distinct())
        with self.db.transaction() as conn:
            return sorted(conn.execute(query).scalars())

    def _load(self, conn: Any, rollout_id: str) -> tuple[Any, RolloutView, list[DeviceRow]]:
        t, rd, sa = self.db.tables["rollouts"], self.db.tables["rollout_devices"], self.db.sa
        row = conn.execute(sa.select(t).where(t.c.id == rollout_id)).one()
        view = RolloutView(row.id, row.state, row.current_wave, _ts(row.wave_started_at),
                           RolloutOptions.from_dict(row.options))
        devices = [DeviceRow(d.device_id, d.wave, d.state, d.reason, _ts(d.notified_at), d.previous, d.revert_state)
                   for d in conn.execute(sa.select(rd).where(rd.c.rollout_id == rollout_id))]
        return row, view, devices

    def _step(self, rollout_id: str) -> None:
        with self.db.transaction() as conn:
            row, view, devices = self._load(conn, rollout_id)
        online = {d for d, s in self.states.items() if s.status != "offline"}
        now = self.clock()
        signals = self._signals(row, view, devices, now)
        actions = rules.decide(view, devices, now, online, signals)
        if any(isinstance(a, rules.AdvanceWave) and a.wave == 0 for a in actions) and row.broadcast is None:
            self._broadcast(row)
        if actions and not self._record(row, actions, now):
            return  # the rollout changed meanwhile (paused, aborted): decide again next tick
        self._send(rollout_id)
        if any(isinstance(a, (rules.AbortRollout, rules.CompleteRollout)) for a in actions):
            self._unbroadcast(rollout_id)

    def _signals(self, row: Any, view: RolloutView, devices: list[DeviceRow], now: float) -> dict[str, DeviceSignals]:
        """Each device's model signals: drift events, and telemetry read at most every ``signals_s``."""
        options = view.options
        wanted = (options.max_p99_regression, options.max_error_rate, options.max_drift) != (None, None, None)
        cached = self._telemetry.get(row.id)
        stale = cached is None or now - cached[0] >= self.signals_s
        if wanted and stale and row.state not in ("completed", "aborted"):
            judged = [Judged(d.device_id, d.previous, _at(d.notified_at)) for d in devices
                      if d.notified_at is not None and d.state in ("notified", "committed", "rolled_back")]
            cached = (now, telemetry_signals(self.db, row.version, judged, row.created_at) if judged else {})
            self._telemetry[row.id] = cached
        measured = cached[1] if cached else {}
        out = {}
        for d in devices:
            t = measured.get(d.device_id, DeviceSignals())
            event = self._drift.get((d.device_id, row.version))
            drift = max((v for v in (event, t.drift) if v is not None), default=None)
            out[d.device_id] = DeviceSignals(p99_ratio=t.p99_ratio, error_rate=t.error_rate, drift=drift)
        return out

    def _record(self, row: Any, actions: list[rules.Action], now: float) -> bool:
        """Write the decision; False when the rollout's state changed since it was read (nothing written)."""
        values: dict[str, Any] = {"updated_at": _now()}
        try:
            self._write(row, actions, now, values)
        except _Changed:
            return False
        if "abort_reason" in values:
            _log.warning("rollout %s aborted: %s", row.id, values["abort_reason"])
        return True

    def _write(self, row: Any, actions: list[rules.Action], now: float, values: dict[str, Any]) -> None:
        t, rd = self.db.tables["rollouts"], self.db.tables["rollout_devices"]
        where = rd.c.rollout_id == row.id
        with self.audit.transaction() if self.audit is not None else self.db.transaction() as conn:
            for a in actions:
                if isinstance(a, rules.TimeOut):
                    conn.execute(rd.update().where(where & rd.c.device_id.in_(a.device_ids)).values(
                        state="timed_out", reason="no result within the wave timeout", finished_at=_at(now)))
                elif isinstance(a, rules.NotifyDevices):
                    for device_id in a.device_ids:
                        conn.execute(rd.update().where(where & (rd.c.device_id == device_id)).values(
                            state="notifying", command_id=uuid.uuid4().hex[:16], notified_at=_at(now),
                            finished_at=None, reason=None))
                elif isinstance(a, rules.TellRollback):
                    conn.execute(rd.update().where(where & rd.c.device_id.in_(a.device_ids)).values(
                        revert_state=a.how, revert_id=uuid.uuid4().hex[:16]))
                elif isinstance(a, rules.AbortRollout):
                    values.update(state="aborted", abort_reason=a.reason)
                elif isinstance(a, rules.AdvanceWave):
                    values.update(state=rules.wave_state(a.wave), current_wave=a.wave, wave_started_at=_at(now))
                elif isinstance(a, rules.CompleteRollout):
                    values.update(state="completed")
            done = conn.execute(t.update().where((t.c.id == row.id) & (t.c.state == row.state)
                                                 & (t.c.current_wave == row.current_wave)).values(**values))
            if done.rowcount != 1:
                raise _Changed
            if self.audit is not None and "abort_reason" in values:  # the controller's own abort, in the same commit
                self.audit.append(CONTROLLER_ACTOR, "rollout.abort", f"{row.model}:{row.version}",
                                  {"rollout": row.id, "reason": values["abort_reason"], "automatic": True}, conn=conn)

    # --- side effects ---------------------------------------------------------------------------------------

    def _targets_of(self, model: str, version: str) -> dict[str, dict[str, Any]]:
        key = (model, version)
        if key not in self._targets:
            with self.db.transaction() as conn:
                self._targets[key] = _published(self.db, conn, model, version)
        return self._targets[key]

    def _broadcast(self, row: Any) -> None:
        """Publish the rollout's target files once (before any command names them) and remember them."""
        if self.dist is None:
            return
        targets = self._targets_of(row.model, row.version)
        rd, sa = self.db.tables["rollout_devices"], self.db.sa
        with self.db.transaction() as conn:
            used = set(conn.execute(sa.select(rd.c.target).where(rd.c.rollout_id == row.id)
                                    .where(rd.c.target.isnot(None)).distinct()).scalars())
        infos = self.dist.broadcast(row.id, sorted(targets[t]["path"] for t in used))
        t = self.db.tables["rollouts"]
        with self.db.transaction() as conn:
            conn.execute(t.update().where(t.c.id == row.id).values(
                broadcast=[{"path": i.path, "size": i.size, "chunk": i.chunk} for i in infos]))

    def _unbroadcast(self, rollout_id: str) -> None:
        t, sa = self.db.tables["rollouts"], self.db.sa
        with self.db.transaction() as conn:
            infos = conn.execute(sa.select(t.c.broadcast).where(t.c.id == rollout_id)).scalar()
            conn.execute(t.update().where(t.c.id == rollout_id).values(broadcast=None))
        if self.dist is not None and infos:
            from edgeml.protocol import DistInfo

            self.dist.unbroadcast(rollout_id, [DistInfo(**i) for i in infos])

    def _send(self, rollout_id: str) -> None:
        """Send every decided but unacknowledged command of the rollout, then mark it sent."""
        t, rd, sa = self.db.tables["rollouts"], self.db.tables["rollout_devices"], self.db.sa
        with self.db.transaction() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == rollout_id)).one()
            todo = conn.execute(sa.select(rd).where(rd.c.rollout_id == rollout_id).where(
                (rd.c.state == "notifying") | rd.c.revert_state.in_(("rollback", "revert")))).all()
        options = RolloutOptions.from_dict(row.options)
        for d in todo:
            if d.revert_state in ("rollback", "revert"):
                command, after = self._undo_command(row, d, options), {"revert_state": f"{d.revert_state}-sent"}
                match = rd.c.revert_state == d.revert_state
            else:
                command, after, match = self._update_command(row, d, options), {"state": "notified"}, \
                    rd.c.state == "notifying"
            if command is not None and not self._publish(d.device_id, command):
                continue  # the broker did not take it: sent again next tick
            if command is None:
                after = {"revert_state": "revert-failed"}
            with self.db.transaction() as conn:
                conn.execute(rd.update().where((rd.c.id == d.id) & match).values(**after))

    def _update_command(self, row: Any, d: Any, options: RolloutOptions) -> Command:
        target = self._targets_of(row.model, row.version)[d.target]
        args: dict[str, Any] = {"model": row.model, "version": row.version, "target": d.target, "rollout": row.id,
                                "thresholds": options.thresholds(), "runtime": target["runtime"]}
        if row.broadcast:
            args["broadcast"] = {"rollout": row.id, "path": target["path"]}
        return Command(id=d.command_id, type="update", args=args, issued_at=self.clock())

    def _undo_command(self, row: Any, d: Any, options: RolloutOptions) -> Command | None:
        """``rollback`` for a device still updating; an update back to its previous version for one that
        committed (None: no target of that version fits the device any more)."""
        if d.revert_state == "rollback":
            return Command(id=d.revert_id, type="rollback", args={"reason": f"rollout {row.id} was aborted"},
                           issued_at=self.clock())
        try:
            available = self._targets_of(row.model, d.previous)
        except RolloutError:
            return None
        preferred = [*options.targets, *[t for t in available if t not in options.targets]]
        target, _ = rules.choose_target(self._capabilities(d.device_id), preferred,
                                        {t: p["runtime"] for t, p in available.items()})
        if target is None:
            return None
        args = {"model": row.model, "version": d.previous, "target": target, "rollout": row.id,
                "thresholds": options.thresholds(), "runtime": available[target]["runtime"]}
        return Command(id=d.revert_id, type="update", args=args, issued_at=self.clock())

    def _capabilities(self, device_id: str) -> dict[str, Any] | None:
        """What the device reported last: its live state, else the ``devices`` table."""
        state = self.states.get(device_id)
        if state is not None:
            return dict(state.capabilities)
        d = self.db.tables["devices"]
        with self.db.transaction() as conn:
            caps = conn.execute(self.db.sa.select(d.c.capabilities).where(d.c.device_id == device_id)).scalar()
        return dict(caps) if caps else None

    def _publish(self, device_id: str, command: Command, timeout: float = 10.0) -> bool:
        info = self._client.publish(device_topic(device_id, "commands"), command.to_bytes(), qos=1)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):  # not connected: paho refuses to queue
            return False
        return info.is_published()
