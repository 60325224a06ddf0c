"""The rollout controller: carries out every rollout in the database over MQTT, one tick at a time.

:class:`RolloutController` subscribes to every device's ``events`` and ``state``, and on each tick applies
the devices' ``update`` events to the store, asks :func:`~edgeml.fleet.rollouts.rules.decide` what to do for
each rollout with work left, writes the decision, and only then sends the commands. Its own aborts are
appended to the audit log in the same transaction (actor :data:`CONTROLLER_ACTOR`).

Restart safety: all state is in the database. A device whose command was decided is ``notifying`` until the
broker acknowledged the command (QoS 1), then ``notified``; a controller that starts again sends the
``notifying`` ones (with the same command id) and nothing else, so no device is told twice. Its MQTT session
is persistent (a fixed client id), so the devices' events published while it was down are delivered when it
comes back. Run one controller per fleet.

Model signals used: the causes of the agents' rollbacks (``latency``, ``error_rate``, ``drift``), the drift
score of their ``drift`` events for the new version, and what their telemetry says while they run it (p99
against the previous version, error rate, drift score: :mod:`~edgeml.fleet.rollouts.signals`), read every
``signals_s``.

What devices send is untrusted: :class:`~edgeml.fleet.rollouts.intake.DeviceIntake` checks every state and
event (typed, bound to the topic's device, enrolled and not revoked, a per-device budget between ticks)
and records them, each on its own; each rollout is then stepped on its own, so that no device can stall the
decisions of every rollout.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from edgeml.errors import EdgeMLError
from edgeml.fleet.registry.deltas import DeltaPaths
from edgeml.fleet.rollouts import rules
from edgeml.fleet.rollouts.intake import DeviceIntake
from edgeml.fleet.rollouts.rules import DeviceRow, DeviceSignals, RolloutError, RolloutOptions, RolloutView
from edgeml.fleet.rollouts.signals import Judged, SignalWatcher
from edgeml.fleet.rollouts.states import (
    REVERT_TO_SEND,
    REVERT_TRANSITIONS,
    ROW_TRANSITIONS,
    TERMINAL_PHASES,
    Phase,
    RevertEvent,
    RevertState,
    RowEvent,
    RowState,
    phase_of,
    work_clause,
)
from edgeml.fleet.rollouts.store import _at, _published, _ts
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import utcnow
from edgeml.fleet.store.schema import sa
from edgeml.protocol import (
    PREFIX,
    Command,
    State,
    device_topic,
    fleet_client_id,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from edgeml.fleet.store.db import Database

__all__ = ["CONTROLLER_ACTOR", "RolloutController"]

_log = logging.getLogger(__name__)
_RESULTS = frozenset({"committed", "rolled_back", "failed", "incompatible", "busy"})  # update events that are results
#: The audit log's actor of what the controller decides by itself (an abort on failures or model signals).
CONTROLLER_ACTOR = "system:rollout-controller"
#: The controller's MQTT client id: stable (its persistent session keeps the events while it is away), and
#: outside the device id alphabet, so that no device can take it.
CONTROLLER_CLIENT_ID = fleet_client_id("rollouts", unique=False)
_LOG_EVERY_S = 60.0  # a device's dropped messages are logged at most once per this many seconds


def _values(states: frozenset[Any]) -> list[str]:
    return sorted(s.value for s in states)


class _Changed(Exception):
    """The rollout's state changed between the read and the write of a decision."""


class RolloutController:
    """Drives every rollout in the database over MQTT, one tick at a time, in a thread of its own.

    Args:
        db: The registry's database.
        broker_host: The broker's host.
        broker_port: Its port.
        dist: A started :class:`~edgeml.fleet.registry.distribution.DistributionService` to broadcast each rollout's
            files once (None: devices fetch them with get requests).
        username: Broker user (the fleet user).
        password: Its password.
        tls: SSL context for a TLS listener (None: plain TCP).
        client_id: The MQTT client id; keep it stable across restarts (the session keeps events meanwhile), and
            outside the device id alphabet (see :func:`~edgeml.protocol.fleet_client_id`).
        record_states: Write the devices' reported states (status, capabilities, installed) to the ``devices``
            table, which plans read (turn it off where an ingest worker with state on does it).
        tick_s: Seconds between ticks.
        signals_s: Seconds between reads of the telemetry signals of a rollout with model thresholds.
        audit: The audit log, where the controller's own aborts are appended (actor :data:`CONTROLLER_ACTOR`).
        clock: Unix time source.
        accept_unknown: Take events and states from devices that are not enrolled (development brokers only).
        max_messages_per_tick: Most messages kept from one device between two ticks (the rest are dropped).
    """

    def __init__(self, db: Database, broker_host: str, broker_port: int, *, dist: Any = None,
                 username: str | None = None, password: str | None = None, tls: ssl.SSLContext | None = None,
                 client_id: str = CONTROLLER_CLIENT_ID, record_states: bool = True, tick_s: float = 1.0,
                 signals_s: float = 5.0, audit: Any = None, clock: Callable[[], float] = time.time,
                 accept_unknown: bool = False, max_messages_per_tick: int = 1000) -> None:
        from edgeml.fleet.telemetry.store import TelemetryStore

        self.db, self.dist, self.tick_s, self.signals_s, self.clock = db, dist, tick_s, signals_s, clock
        self.audit = audit
        self._telemetry: dict[str, tuple[float, dict[str, DeviceSignals]]] = {}  # rollout -> (read at, signals)
        self.intake = DeviceIntake(db, TelemetryStore(db) if record_states else None, accept_unknown=accept_unknown,
                                   max_messages_per_tick=max_messages_per_tick)
        self.broker = (broker_host, broker_port)
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set_context(tls)
        self._subscribed = threading.Event()
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = lambda c, u, msg: self.intake.offer(msg.topic, bytes(msg.payload), msg.retain)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._targets: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._deltas = DeltaPaths(db)

    @property
    def states(self) -> dict[str, State]:
        """The latest state of every device heard from (enrolled and not revoked)."""
        return self.intake.states

    @property
    def rejected(self) -> dict[str, int]:
        """Messages not applied, by why (malformed, device-mismatch, unknown-device, revoked, flood, ...)."""
        return self.intake.rejected

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
        watcher = getattr(self, "_signal_watcher", None)
        if watcher is not None:
            watcher.close()
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
        """Apply the events received, then decide, record and send for each rollout with work left (a rollout
        whose step fails is logged and tried again next tick; the others go on)."""
        self.intake.apply()
        for rollout_id in self._rollouts_with_work():
            try:
                self._step(rollout_id)
            except Exception:
                _log.exception("rollout %s: this tick's step failed; trying again next tick", rollout_id)

    def _rollouts_with_work(self) -> list[str]:
        """The rollouts with a row :func:`~edgeml.fleet.rollouts.states.has_work` holds for, as one query
        (tests/fleet/test_rollout_states.py checks the two agree on every combination)."""
        t, rd = schema.rollouts, schema.rollout_devices
        query = (sa.select(t.c.id).select_from(t.outerjoin(rd, rd.c.rollout_id == t.c.id))
                 .where(work_clause(sa, t, rd)).distinct())
        with self.db.transaction() as conn:
            return sorted(conn.execute(query).scalars())

    def _load(self, conn: Connection, rollout_id: str) -> tuple[Any, RolloutView, list[DeviceRow]]:
        t, rd = schema.rollouts, schema.rollout_devices
        row = conn.execute(sa.select(t).where(t.c.id == rollout_id)).one()
        view = RolloutView(row.id, row.state, row.current_wave, _ts(row.wave_started_at),
                           RolloutOptions.from_dict(row.options))
        devices = [DeviceRow(d.device_id, d.wave, d.state, d.reason, _ts(d.notified_at), d.previous, d.revert_state,
                             d.cause) for d in conn.execute(sa.select(rd).where(rd.c.rollout_id == rollout_id))]
        return row, view, devices

    def _step(self, rollout_id: str) -> None:
        with self.db.transaction() as conn:
            row, view, devices = self._load(conn, rollout_id)
        online = {d for d, s in self.intake.states.items() if s.status != "offline"}
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
        """Each device's model signals: drift events, and telemetry read from the minute rollups by a
        :class:`~edgeml.fleet.rollouts.signals.SignalWatcher` in its own thread, at most every ``signals_s`` (a tick
        takes the newest signals read and never waits for a read; the watcher is made on first use)."""
        options = view.options
        wanted = (options.max_p99_regression, options.max_error_rate, options.max_drift,
                  options.max_output_shift) != (None, None, None, None)
        measured: dict[str, DeviceSignals] = {}
        if wanted and phase_of(row.state) not in TERMINAL_PHASES:
            judged = [Judged(d.device_id, d.previous, _at(d.notified_at)) for d in devices
                      if d.notified_at is not None and d.state in (RowState.NOTIFIED, RowState.COMMITTED,
                                                                     RowState.ROLLED_BACK)]
            watcher = getattr(self, "_signal_watcher", None)
            if watcher is None:
                watcher = self._signal_watcher = SignalWatcher(self.db, every_s=self.signals_s)
            measured = watcher.signals(row.id, row.version, row.created_at, judged) if judged else {}
        out = {}
        for d in devices:
            t = measured.get(d.device_id, DeviceSignals())
            event = self.intake.drift.get((d.device_id, row.version))
            drift = max((v for v in (event, t.drift) if v is not None), default=None)
            out[d.device_id] = DeviceSignals(p99_ratio=t.p99_ratio, error_rate=t.error_rate, drift=drift,
                                             output_shift=t.output_shift)
        return out

    def _record(self, row: Any, actions: list[rules.Action], now: float) -> bool:
        """Write the decision; False when the rollout's state changed since it was read (nothing written)."""
        values: dict[str, Any] = {"updated_at": utcnow()}
        try:
            self._write(row, actions, now, values)
        except _Changed:
            return False
        if "abort_reason" in values:
            _log.warning("rollout %s aborted: %s", row.id, values["abort_reason"])
        return True

    def _write(self, row: Any, actions: list[rules.Action], now: float, values: dict[str, Any]) -> None:
        t, rd = schema.rollouts, schema.rollout_devices
        where = rd.c.rollout_id == row.id
        with self.audit.transaction() if self.audit is not None else self.db.transaction() as conn:
            for a in actions:
                if isinstance(a, rules.TimeOut):
                    conn.execute(rd.update().where(where & rd.c.device_id.in_(a.device_ids)).values(
                        state=RowState.TIMED_OUT.value, reason="no result within the wave timeout", cause=None,
                        finished_at=_at(now)))
                elif isinstance(a, rules.NotifyDevices):
                    for device_id in a.device_ids:
                        conn.execute(rd.update().where(where & (rd.c.device_id == device_id)).values(
                            state=RowState.NOTIFYING.value, command_id=uuid.uuid4().hex[:16], notified_at=_at(now),
                            finished_at=None, reason=None, cause=None))
                elif isinstance(a, rules.TellRollback):
                    conn.execute(rd.update().where(where & rd.c.device_id.in_(a.device_ids)).values(
                        revert_state=a.how.value, revert_id=uuid.uuid4().hex[:16]))
                elif isinstance(a, rules.AbortRollout):
                    values.update(state=Phase.ABORTED.value, abort_reason=a.reason)
                elif isinstance(a, rules.AdvanceWave):
                    values.update(state=rules.wave_state(a.wave), current_wave=a.wave, wave_started_at=_at(now))
                elif isinstance(a, rules.CompleteRollout):
                    values.update(state=Phase.COMPLETED.value)
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

    def _offer(self, row: Any, device_id: str, target: str, previous: str | None) -> tuple[str, str | None]:
        """What a device is told to fetch: ``(repository path, delta base)``; a delta when one was published
        from the version the device serves (``previous``) and the device reported it can apply deltas."""
        full = self._targets_of(row.model, row.version)[target]["path"]
        if previous is None or previous == row.version:
            return full, None
        from edgeml.delta import FORMAT

        if FORMAT not in ((self._capabilities(device_id) or {}).get("deltas") or []):
            return full, None
        path = self._deltas.path(row.model, row.version, target, previous)
        return (full, None) if path is None else (path, previous)

    def _broadcast(self, row: Any) -> None:
        """Publish the rollout's files once (before any command names them) and remember them: each target's
        bundle, or the delta a device will be offered instead (devices on the same base share one)."""
        if self.dist is None:
            return
        rd = schema.rollout_devices
        with self.db.transaction() as conn:
            used = conn.execute(sa.select(rd.c.device_id, rd.c.target, rd.c.previous).where(rd.c.rollout_id == row.id)
                                .where(rd.c.target.isnot(None))).all()
        paths = {self._offer(row, d.device_id, d.target, d.previous)[0] for d in used}
        infos = self.dist.broadcast(row.id, sorted(paths))
        t = schema.rollouts
        with self.db.transaction() as conn:
            conn.execute(t.update().where(t.c.id == row.id).values(
                broadcast=[{"path": i.path, "size": i.size, "chunk": i.chunk} for i in infos]))

    def _unbroadcast(self, rollout_id: str) -> None:
        t = schema.rollouts
        with self.db.transaction() as conn:
            infos = conn.execute(sa.select(t.c.broadcast).where(t.c.id == rollout_id)).scalar()
            conn.execute(t.update().where(t.c.id == rollout_id).values(broadcast=None))
        if self.dist is not None and infos:
            from edgeml.protocol import DistInfo

            self.dist.unbroadcast(rollout_id, [DistInfo(**i) for i in infos])

    def _send(self, rollout_id: str) -> None:
        """Send every decided but unacknowledged command of the rollout, then mark it sent."""
        t, rd = schema.rollouts, schema.rollout_devices
        with self.db.transaction() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == rollout_id)).one()
            todo = conn.execute(sa.select(rd).where(rd.c.rollout_id == rollout_id).where(
                (rd.c.state == RowState.NOTIFYING.value) | rd.c.revert_state.in_(_values(REVERT_TO_SEND)))).all()
        options = RolloutOptions.from_dict(row.options)
        sent: list[tuple[Any, Any, dict[str, Any], Any]] = []  # (row, match, values after, publish info)
        for d in todo:  # publish them all first, then wait for the broker once (QoS 1 acknowledgements)
            if d.revert_state in REVERT_TO_SEND:
                undo = RevertState(d.revert_state)
                command = self._undo_command(row, d, options)
                after = {"revert_state": REVERT_TRANSITIONS[(undo, RevertEvent.SENT)].value}
                match = rd.c.revert_state == undo.value
            else:
                command, match = self._update_command(row, d, options), rd.c.state == RowState.NOTIFYING.value
                after = {"state": ROW_TRANSITIONS[(RowState.NOTIFYING, RowEvent.SENT)].value}
            if command is None:  # no target of its previous version fits it any more
                sent.append((d, match, {"revert_state": REVERT_TRANSITIONS[(RevertState.REVERT,
                                                                            RevertEvent.NO_TARGET)].value}, None))
                continue
            info = self._client.publish(device_topic(d.device_id, "commands"), command.to_bytes(), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break  # not connected: the rest is sent again next tick
            sent.append((d, match, after, info))
        deadline = time.monotonic() + 10.0
        done = []
        for d, match, after, info in sent:
            if info is not None:
                try:  # in slices, so that stop() is not kept waiting by a broker that went away
                    while not info.is_published() and time.monotonic() < deadline and not self._stop.is_set():
                        info.wait_for_publish(0.2)
                except (RuntimeError, ValueError):  # the connection dropped meanwhile
                    continue
                if not info.is_published():
                    continue  # the broker did not take it: sent again next tick
            done.append((d, match, after))
        if done:
            with self.db.transaction() as conn:
                for d, match, after in done:
                    conn.execute(rd.update().where((rd.c.id == d.id) & match).values(**after))

    def _update_command(self, row: Any, d: Any, options: RolloutOptions) -> Command:
        target = self._targets_of(row.model, row.version)[d.target]
        args: dict[str, Any] = {"model": row.model, "version": row.version, "target": d.target, "rollout": row.id,
                                "thresholds": options.thresholds(), "runtime": target["runtime"]}
        path, base = self._offer(row, d.device_id, d.target, d.previous)
        if base is not None:
            args["delta_from"] = base
        if row.broadcast:
            args["broadcast"] = {"rollout": row.id, "path": path}
        return Command(id=d.command_id, type="update", args=args, issued_at=self.clock())

    def _undo_command(self, row: Any, d: Any, options: RolloutOptions) -> Command | None:
        """``rollback`` for a device still updating; an update back to its previous version for one that
        committed (None: no target of that version fits the device any more)."""
        if d.revert_state == RevertState.ROLLBACK.value:
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
        state = self.intake.states.get(device_id)
        if state is not None:
            return dict(state.capabilities)
        d = schema.devices
        with self.db.transaction() as conn:
            caps = conn.execute(sa.select(d.c.capabilities).where(d.c.device_id == device_id)).scalar()
        return dict(caps) if caps else None
