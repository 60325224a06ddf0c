"""What the rollout controller takes from the devices: their states and update events, checked and recorded.

:class:`DeviceIntake` receives every message on the devices' ``state`` and ``events`` topics (on paho's network
thread: :meth:`~DeviceIntake.offer` only queues, within each device's budget) and, once per controller tick,
:meth:`~DeviceIntake.apply` turns them into what the rules read:

* each message is parsed into its typed form (:mod:`edgeml.protocol`) and must name the device whose topic it
  came on; the device must be enrolled and not revoked (:class:`~edgeml.fleet.devices.roster.DeviceRoster`);
  anything else is counted in :attr:`~DeviceIntake.rejected` and dropped, each message on its own;
* a device that sends more than ``max_messages_per_tick`` between two ticks has the excess dropped;
* states update :attr:`~DeviceIntake.states` (who is online, with what capabilities) and, with a store, the
  ``devices`` table; drift events the latest :attr:`~DeviceIntake.drift` score per (device, version);
* update results move the device's row of its rollout through the row transitions
  (:data:`~edgeml.fleet.rollouts.states.ROW_TRANSITIONS`), matched by the command id. A batch the database
  refuses is applied one message at a time (a poison message costs only itself); a database that is away keeps
  them for the next tick.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import TYPE_CHECKING

from edgeml.fleet.devices.roster import DeviceRoster
from edgeml.fleet.rollouts.states import (
    REVERT_TRANSITIONS,
    ROW_TRANSITIONS,
    RevertEvent,
    RevertState,
    RowEvent,
    RowState,
)
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import is_outage, utcnow
from edgeml.fleet.store.schema import sa
from edgeml.protocol import DriftEvent, ProtocolError, State, UpdateEvent, parse, parse_device_topic

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from edgeml.fleet.store.db import Database
    from edgeml.fleet.telemetry.store import TelemetryStore

__all__ = ["RESULTS", "DeviceIntake"]

_log = logging.getLogger(__name__)
#: The update event states that are results (the rest is progress).
RESULTS = frozenset({"committed", "rolled_back", "failed", "incompatible", "busy"})
_LOG_EVERY_S = 60.0  # a device's dropped messages are logged at most once per this many seconds


class DeviceIntake:
    """The devices' states and update events, for the controller (see the module docstring).

    Args:
        db: The registry database.
        store: Where states are recorded (None: kept in memory only, when an ingest worker records them).
        accept_unknown: Take messages from devices that are not enrolled (development brokers only).
        max_messages_per_tick: Most messages kept from one device between two ticks.
    """

    def __init__(self, db: Database, store: TelemetryStore | None = None, *, accept_unknown: bool = False,
                 max_messages_per_tick: int = 1000) -> None:
        self.db, self._store = db, store
        self.roster = DeviceRoster(db, accept_unknown=accept_unknown)
        self.max_messages_per_tick = max_messages_per_tick
        self.states: dict[str, State] = {}
        self.drift: dict[tuple[str, str], float] = {}
        self.rejected: dict[str, int] = {}  # why -> messages not applied (malformed, device-mismatch, ...)
        self._inbox: queue.SimpleQueue[tuple[str, bytes, bool]] = queue.SimpleQueue()
        self._budget: dict[str, int] = {}  # device -> messages kept since the last tick (network thread only)
        self._dropped: dict[str, int] = {}  # device -> messages over budget since the last tick
        self._logged_at: dict[str, float] = {}
        self._events: list[UpdateEvent] = []  # update events received, not yet recorded
        self._states_seen: list[tuple[State, bool]] = []  # states received, not yet recorded

    def offer(self, topic: str, payload: bytes, retained: bool) -> None:
        """Queue a message for the next tick, unless its device is over its budget (paho's network thread)."""
        parts = topic.split("/", 4)
        device = parts[3] if len(parts) == 5 else ""
        used = self._budget.get(device, 0)
        if used >= self.max_messages_per_tick:
            self._dropped[device] = self._dropped.get(device, 0) + 1
            return
        self._budget[device] = used + 1
        self._inbox.put((topic, payload, retained))

    def _refuse(self, why: str, device: str, detail: str) -> None:
        """Count a message not applied; log it at most once a minute per device."""
        self.rejected[why] = self.rejected.get(why, 0) + 1
        now = time.monotonic()
        if now - self._logged_at.get(device, float("-inf")) >= _LOG_EVERY_S:
            if len(self._logged_at) > 100_000:
                self._logged_at.clear()
            self._logged_at[device] = now
            _log.warning("rollouts: dropped a message from %s (%s): %s", device[:64] or "?", why, detail[:300])

    def apply(self) -> None:
        """Record the states and update events received; kept for the next tick if the database is away."""
        self._budget.clear()  # a new tick: every device may send max_messages_per_tick again
        dropped, self._dropped = self._dropped, {}
        for device, count in dropped.items():
            self._refuse("flood", device, f"{count} messages over {self.max_messages_per_tick} between two ticks")
        received: list[tuple[str, State | UpdateEvent | DriftEvent, bool]] = []
        while not self._inbox.empty():
            topic, payload, retained = self._inbox.get_nowait()
            try:
                message = self._check(topic, payload)
            except ProtocolError as exc:
                self._refuse("malformed", topic.split("/")[3] if topic.count("/") == 4 else "", exc.message)
                continue
            except Exception as exc:  # a bug must not cost the other messages
                _log.exception("rollouts: a message on %r failed", topic[:120])
                self._refuse("internal", "", repr(exc))
                continue
            if message is not None:
                received.append((message.device_id, message, retained))
        refused = self.roster.refusals({device for device, _, _ in received})
        for device, message, retained in received:
            if device in refused:
                self._refuse(refused[device], device, "not an enrolled, unrevoked device")
            elif isinstance(message, State):
                self.states[device] = message
                self._states_seen.append((message, not retained))
            elif isinstance(message, DriftEvent):
                if message.score is not None:
                    self.drift[(device, message.version)] = message.score
            elif message.rollout is not None and message.state in RESULTS:
                self._events.append(message)
        self._record_states()
        self._record_events()

    def _check(self, topic: str, payload: bytes) -> State | UpdateEvent | DriftEvent | None:
        """The typed message on ``topic`` (None: nothing the controller uses).

        Raises:
            ProtocolError: Not a device topic, not a valid message, or it names another device.
        """
        device_id, channel = parse_device_topic(topic)
        if channel == "state":
            if not payload:
                return None  # a cleared retained state
            message = parse("state", payload)
        elif channel == "events":
            message = parse("event", payload)
            if not isinstance(message, (UpdateEvent, DriftEvent)):
                return None  # pong, rejected, ... : nothing for the rules
        else:
            raise ProtocolError(f"not a state or events topic: {topic[:120]!r}")
        if message.device_id != device_id:
            raise ProtocolError(f"a {channel} message of {message.device_id!r} on {device_id!r}'s topic")
        return message

    def _record_states(self) -> None:
        states = self._states_seen
        if states and self._store is not None:
            try:
                self._store.store_batch([], states)
            except Exception as exc:
                if is_outage(exc):
                    raise  # kept for the next tick
                _log.warning("rollouts: recording %d states failed (%s); recording them one by one", len(states), exc)
                for one in states:
                    try:
                        self._store.store_batch([], [one])
                    except Exception as single:
                        if is_outage(single):
                            raise
                        self._refuse("poison", one[0].device_id, f"the database refused its state: {single}")
        states.clear()

    def _record_events(self) -> None:
        events = self._events
        if not events:
            return
        try:
            with self.db.transaction() as conn:
                for event in events:
                    self._apply_event(conn, event)
        except Exception as exc:
            if is_outage(exc):
                raise  # kept for the next tick
            for event in events:  # one by one: a poison event costs only itself
                try:
                    with self.db.transaction() as conn:
                        self._apply_event(conn, event)
                except Exception as single:
                    if is_outage(single):
                        raise
                    self._refuse("poison", event.device_id, f"the database refused its event: {single}")
        events.clear()

    def _apply_event(self, conn: Connection, event: UpdateEvent) -> None:
        """Record an update result on the device's row of its rollout (matched by the command id)."""
        state, reason = event.state, event.reason
        rd, d = schema.rollout_devices, schema.devices
        revoked = sa.exists().where((d.c.device_id == event.device_id) & (d.c.revoked == sa.true()))
        row = conn.execute(sa.select(rd).where((rd.c.rollout_id == event.rollout) &
                                               (rd.c.device_id == event.device_id) & ~revoked)).first()
        if row is None:
            return
        result = RowEvent(state)  # RESULTS: committed, rolled_back, failed, incompatible, busy
        moved = ROW_TRANSITIONS.get((RowState(row.state), result))
        if event.id == row.command_id and moved is not None:
            reason = f"busy: {reason}" if result is RowEvent.BUSY else reason
            conn.execute(rd.update().where(rd.c.id == row.id).values(
                state=moved.value, reason=reason, cause=None if moved is RowState.COMMITTED else event.cause,
                finished_at=utcnow(), **({"transfer": event.transfer} if event.transfer is not None else {})))
        elif event.id == row.revert_id and row.revert_state == RevertState.REVERT_SENT.value:
            how = RevertEvent.COMMITTED if result is RowEvent.COMMITTED else RevertEvent.OTHER_RESULT
            conn.execute(rd.update().where(rd.c.id == row.id).values(
                revert_state=REVERT_TRANSITIONS[(RevertState.REVERT_SENT, how)].value))
