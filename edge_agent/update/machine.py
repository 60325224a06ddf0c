"""The update state machine: runs the steps through the transition table until a terminal state.

:meth:`UpdateMachine.start` accepts an update request; :meth:`UpdateMachine.resume` runs on every boot:
it first serves the model the active-slot pointer names (verified), then continues an interrupted
update from where :data:`~.states.RESUME` says. The record is persisted on entering every state, before
that state's step runs, and ``on_transition`` is called right after each write (progress reports; the
crash tests kill the process there). A crash during probation counts against the new model
(``record.crashes``); a state entered more than ``max_visits`` times is abandoned (the loop guard).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgeml.edge_agent.runtimes.base import open_runtime
from edgeml.edge_agent.serving import ModelHost, RuntimeFactory, load_model
from edgeml.errors import ConfigError
from edgeml.protocol import Cause

from .slots import Slots
from .states import RESUME, TERMINAL, TRANSITIONS, Event, State
from .steps import STEPS, Clock, Fetch, FetchDelta, SystemClock, UpdateContext
from .store import RecordStore, UpdateRecord, UpdateRequest

__all__ = ["MAX_VISITS", "Transition", "UpdateMachine"]

#: The loop guard: a state entered more often than this is abandoned (rollback or abort).
MAX_VISITS = 3

#: ``on_transition(record, from_state, event, to_state)``, called after the record is persisted in ``to_state``.
Transition = Callable[[UpdateRecord, State | None, str, State], None]


class UpdateMachine:
    """Drives one device's updates.

    Args:
        state_dir: The agent's state directory (``update.json`` and ``slots/`` live there).
        host: The model host that serves requests.
        fetch: ``fetch(name, version, target) -> VerifiedBundle`` (e.g. :meth:`TufClient.fetch`).
        clock: Wall clock and sleep (default: the real ones).
        drift: ``drift(version)`` -> the live drift score, or None (default: no drift check).
        output_shift: ``output_shift(version)`` -> the live output-shift score, or None (default: no check).
        fetch_delta: Rebuilds a bundle from a signed delta and the active slot (default None: full bundles only).
        runtimes: Makes the runtime of every model it loads (default: the runtime registry's).
        on_transition: Progress callback, called after each persisted transition.
        threads: Runtime threads for the models it loads.
        poll_s: How often probation looks at the health numbers.
        max_visits: The loop guard's limit.
    """

    def __init__(self, state_dir: str | Path, host: ModelHost, fetch: Fetch, *, clock: Clock | None = None,
                 drift: Callable[[str], float | None] | None = None, on_transition: Transition | None = None,
                 threads: int = 1, poll_s: float = 0.05, max_visits: int = MAX_VISITS,
                 output_shift: Callable[[str], float | None] | None = None,
                 fetch_delta: FetchDelta | None = None, runtimes: RuntimeFactory = open_runtime) -> None:
        self.state_dir = Path(state_dir)
        self.store = RecordStore(self.state_dir / "update.json")
        self.slots = Slots(self.state_dir)
        self.host = host
        self.fetch = fetch
        self.fetch_delta = fetch_delta
        self.runtimes = runtimes
        self.clock = clock or SystemClock()
        self.drift = drift
        self.output_shift = output_shift
        self.on_transition = on_transition
        self.threads = threads
        self.poll_s = poll_s
        self.max_visits = max_visits
        self._interrupt: str | None = None

    def request_rollback(self, reason: str) -> bool:
        """Ask the update on probation to roll back now (the fleet aborted its rollout).

        Returns:
            True when an update is on probation or about to be (it will roll back with ``reason``); False
            when there is nothing to roll back (no update running, or it has not switched).
        """
        record = self.store.load()
        if record is None or record.current not in (State.SWITCH, State.PROBATION):
            return False
        self._interrupt = reason
        return True

    def boot(self) -> None:
        """Serve the model the active-slot pointer names, after checking it (no-op if one already serves).

        Raises:
            BundleIntegrityError: The active slot was damaged after it was staged.
            RuntimeBackendError: Its runtime refuses it.
        """
        info = self.slots.active()
        active = self.host.active
        if info is None or (active is not None and (active.slot, active.version) == (info.slot, info.version)):
            return
        self.slots.verify(info)
        self.host.swap(load_model(self.slots.path(info.slot), info.slot, threads=self.threads, runtimes=self.runtimes),
                       keep_previous=False)

    def start(self, request: UpdateRequest) -> UpdateRecord:
        """Accept ``request`` and run it to a terminal state; returns the final record.

        A request with the id of the update in progress continues that update; one with the id of the update
        that last ended changes nothing and reports its end again (the fleet may resend a command).

        Raises:
            ConfigError: The request is malformed, or another update is in progress.
            StorageError: The record cannot be written.
        """
        request = request.validated()
        existing = self.store.load()
        if existing is not None and existing.id == request.id and existing.current in TERMINAL:
            self._notify(existing, existing.current, "repeat", existing.current)  # a resent command: say how it ended
            return existing
        if existing is not None and existing.current not in TERMINAL:
            if existing.id == request.id:
                self.boot()
                return self._run(existing)
            raise ConfigError(f"update {existing.id} to {existing.model} {existing.version} is in progress "
                              f"({existing.state}); it must finish first")
        self.boot()
        record = UpdateRecord.new(request)
        self.store.save(record)
        self._notify(record, None, "start", State.NOTIFIED)
        return self._run(record)

    def resume(self) -> UpdateRecord | None:
        """On boot: serve the active slot, then finish an interrupted update (None when there is none).

        Raises:
            StorageError: The record or the pointer is unreadable.
        """
        self.boot()
        record = self.store.load()
        if record is None or record.current in TERMINAL:
            return record
        crashed_in = record.current
        if crashed_in is State.PROBATION:
            record.crashes += 1  # the agent died while the new model was on probation
        record.enter("resume", RESUME[crashed_in], self.clock.time())
        self.store.save(record)
        self._notify(record, crashed_in, "resume", record.current)
        return self._run(record)

    def _run(self, record: UpdateRecord) -> UpdateRecord:
        self._interrupt = None
        ctx = UpdateContext(record, self.store, self.slots, self.host, self.fetch, self.clock, self.drift,
                            self.threads, self.poll_s, interrupt=lambda: self._interrupt,
                            output_shift=self.output_shift, fetch_delta=self.fetch_delta, runtimes=self.runtimes)
        while record.current not in TERMINAL:
            state = record.current
            event = self._guard(record) or STEPS[state](ctx)
            nxt = TRANSITIONS[(state, event)]
            record.enter(event.value, nxt, self.clock.time())
            self.store.save(record)  # persisted before the next step runs
            self._notify(record, state, event.value, nxt)
        return record

    def _guard(self, record: UpdateRecord) -> Event | None:
        state = record.current
        visits = record.visits.get(state.value, 0)
        if visits > self.max_visits and (state, Event.LOOP) in TRANSITIONS:
            record.reason = (f"loop guard: entered {state.value} {visits} times (the agent keeps stopping "
                             f"there); {record.reason or 'no other reason recorded'}")
            record.cause = Cause.LOOP.value
            return Event.LOOP
        return None

    def _notify(self, record: UpdateRecord, frm: State | None, event: str, to: State) -> None:
        if self.on_transition is not None:
            self.on_transition(record, frm, event, to)
