"""The rollout lifecycle as data: the rollout's phases, each device row's states, the undo (revert) states,
their transition tables, and :func:`has_work`, which says which rows the controller must still act on.

Read the three tables top to bottom to know everything a rollout and its devices can do; the rules
(:mod:`.rules`) decide *which* transition to take, the controller (:mod:`.controller`) writes it, and
:func:`advance` refuses any change the tables do not hold. The values are what the database stores;
each enum is a ``str``, so a stored value and its member compare equal.

A rollout runs ``pending`` -> ``canary`` (wave 0) -> ``wave-1`` ... ``wave-N`` -> ``completed``; it can be
paused and resumed, and aborted from any running or paused phase. Its stored state is the phase with the
wave number for :attr:`Phase.WAVE` (:func:`stored_state`, :func:`phase_of`).

A device row starts ``pending`` (or ``incompatible``, or ``committed`` when the device already runs the
version); a decided update is ``notifying`` until the broker acknowledged the command, then ``notified``
until the device reports a result or the wave times out. After an abort its ``revert_state`` tracks the
undo: a device still updating is told to roll back, one that committed is sent an update back.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

__all__ = [
    "FAILURES",
    "FINISHED",
    "IN_FLIGHT",
    "REVERT_TO_SEND",
    "REVERT_TRANSITIONS",
    "ROLLOUT_TRANSITIONS",
    "ROW_TRANSITIONS",
    "TERMINAL",
    "TERMINAL_PHASES",
    "Phase",
    "RevertEvent",
    "RevertState",
    "RolloutEvent",
    "RowEvent",
    "RowState",
    "advance",
    "has_work",
    "phase_of",
    "resumed",
    "stored_state",
    "work_clause",
]


class Phase(str, Enum):
    """Where a rollout is (stored as is, except WAVE, stored as ``wave-N``)."""

    PENDING = "pending"  # created; its files are not broadcast yet
    CANARY = "canary"  # wave 0 runs
    WAVE = "wave"  # wave N >= 1 runs
    PAUSED = "paused"  # nothing new is sent until it resumes
    COMPLETED = "completed"  # every wave is done (late devices still catch up)
    ABORTED = "aborted"  # stopped; devices that updated are being undone


class RolloutEvent(str, Enum):
    """What moves a rollout."""

    ADVANCE = "advance"  # start the next wave (from pending: the canary)
    COMPLETE = "complete"  # the last wave is done
    ABORT = "abort"  # failures or model signals past the limits, or the operator
    PAUSE = "pause"  # the operator
    RESUME = "resume"  # the operator: back to the phase it was paused in (:func:`resumed`)


class RowState(str, Enum):
    """Where one device of a rollout is."""

    PENDING = "pending"  # selected, not notified yet (its wave has not started, or it is offline)
    NOTIFYING = "notifying"  # an update was decided; its command is sent (again after a restart) until acked
    NOTIFIED = "notified"  # the broker has the command; the device is updating
    COMMITTED = "committed"  # it runs the new version (or already did when the rollout started)
    ROLLED_BACK = "rolled_back"  # it switched, then its probation failed and it went back by itself
    FAILED = "failed"  # the update stopped before the switch, or the device was busy
    INCOMPATIBLE = "incompatible"  # no target fits it (decided at planning, or reported by the device)
    TIMED_OUT = "timed_out"  # no result within the wave timeout of its notification (or of its wave, offline)


class RowEvent(str, Enum):
    """What moves a device row."""

    NOTIFY = "notify"  # the rules decided to send its update
    SENT = "sent"  # the broker acknowledged the command (QoS 1)
    COMMITTED = "committed"  # the device's results, as its update events report them
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    BUSY = "busy"  # another update was in progress on the device: a failure
    INCOMPATIBLE = "incompatible"
    TIMEOUT = "timeout"  # the wave timeout passed


class RevertState(str, Enum):
    """The undo of one device after an abort (NONE: nothing to undo or not decided; stored as NULL)."""

    NONE = "none"
    ROLLBACK = "rollback"  # decided: tell the device, still updating, to roll back
    ROLLBACK_SENT = "rollback-sent"
    REVERT = "revert"  # decided: send the device, which committed, an update back to its previous version
    REVERT_SENT = "revert-sent"
    REVERTED = "reverted"  # it reported the previous version committed
    REVERT_FAILED = "revert-failed"  # it did not, or no target of the previous version fits it any more


class RevertEvent(str, Enum):
    """What moves a row's undo."""

    TELL_ROLLBACK = "tell-rollback"
    TELL_REVERT = "tell-revert"
    SENT = "sent"
    NO_TARGET = "no-target"
    COMMITTED = "committed"
    OTHER_RESULT = "other-result"


P, R, V = Phase, RowState, RevertState
#: (phase, event) -> next phase: the whole life of a rollout, one line per transition.
ROLLOUT_TRANSITIONS: dict[tuple[Phase, RolloutEvent], Phase] = {
    (P.PENDING, RolloutEvent.ADVANCE): P.CANARY,
    (P.CANARY, RolloutEvent.ADVANCE): P.WAVE,
    (P.WAVE, RolloutEvent.ADVANCE): P.WAVE,
    (P.CANARY, RolloutEvent.COMPLETE): P.COMPLETED,  # a rollout of one wave
    (P.WAVE, RolloutEvent.COMPLETE): P.COMPLETED,
    (P.PENDING, RolloutEvent.ABORT): P.ABORTED,
    (P.CANARY, RolloutEvent.ABORT): P.ABORTED,
    (P.WAVE, RolloutEvent.ABORT): P.ABORTED,
    (P.PAUSED, RolloutEvent.ABORT): P.ABORTED,
    (P.PENDING, RolloutEvent.PAUSE): P.PAUSED,
    (P.CANARY, RolloutEvent.PAUSE): P.PAUSED,
    (P.WAVE, RolloutEvent.PAUSE): P.PAUSED,
    # (P.PAUSED, RESUME): back to the phase it was paused in, which the table cannot name: resumed()
}

#: (row state, event) -> next row state: the whole life of one device in a rollout.
ROW_TRANSITIONS: dict[tuple[RowState, RowEvent], RowState] = {
    (R.PENDING, RowEvent.NOTIFY): R.NOTIFYING,
    (R.TIMED_OUT, RowEvent.NOTIFY): R.NOTIFYING,  # timed out while offline, never notified: it catches up
    (R.NOTIFYING, RowEvent.SENT): R.NOTIFIED,
    **{(s, e): r for s in (R.NOTIFYING, R.NOTIFIED, R.TIMED_OUT)  # a late result still counts
       for e, r in ((RowEvent.COMMITTED, R.COMMITTED), (RowEvent.ROLLED_BACK, R.ROLLED_BACK),
                    (RowEvent.FAILED, R.FAILED), (RowEvent.BUSY, R.FAILED),
                    (RowEvent.INCOMPATIBLE, R.INCOMPATIBLE))},
    (R.PENDING, RowEvent.TIMEOUT): R.TIMED_OUT,  # offline for the whole wave timeout
    (R.NOTIFYING, RowEvent.TIMEOUT): R.TIMED_OUT,
    (R.NOTIFIED, RowEvent.TIMEOUT): R.TIMED_OUT,
}

#: (revert state, event) -> next revert state: undoing one device after an abort.
REVERT_TRANSITIONS: dict[tuple[RevertState, RevertEvent], RevertState] = {
    (V.NONE, RevertEvent.TELL_ROLLBACK): V.ROLLBACK,
    (V.ROLLBACK, RevertEvent.SENT): V.ROLLBACK_SENT,
    (V.NONE, RevertEvent.TELL_REVERT): V.REVERT,
    (V.ROLLBACK_SENT, RevertEvent.TELL_REVERT): V.REVERT,  # the rollback came after the switch: it committed
    (V.REVERT, RevertEvent.SENT): V.REVERT_SENT,
    (V.REVERT, RevertEvent.NO_TARGET): V.REVERT_FAILED,
    (V.REVERT_SENT, RevertEvent.COMMITTED): V.REVERTED,
    (V.REVERT_SENT, RevertEvent.OTHER_RESULT): V.REVERT_FAILED,
}

IN_FLIGHT = frozenset({R.NOTIFYING, R.NOTIFIED})
FINISHED = frozenset({R.COMMITTED, R.ROLLED_BACK, R.FAILED, R.TIMED_OUT})
FAILURES = frozenset({R.ROLLED_BACK, R.FAILED, R.TIMED_OUT})
TERMINAL = FINISHED | {R.INCOMPATIBLE}
TERMINAL_PHASES = frozenset({P.COMPLETED, P.ABORTED})
#: Undo decisions whose command is still to be sent.
REVERT_TO_SEND = frozenset({V.ROLLBACK, V.REVERT})


def advance(table: dict[tuple[object, object], object], state: object, event: object) -> object:
    """The state after ``event`` in ``state`` by ``table``.

    Raises:
        KeyError: The table holds no such transition (a bug in whoever asked).
    """
    try:
        return table[(state, event)]
    except KeyError:
        raise KeyError(f"no transition from {state} on {event}") from None


def stored_state(phase: Phase, wave: int = 0) -> str:
    """The rollout state as stored: the phase's value, ``wave-N`` for a wave (``canary`` for wave 0)."""
    if phase in (Phase.CANARY, Phase.WAVE):
        return "canary" if wave == 0 else f"wave-{wave}"
    return phase.value


def resumed(started: bool, wave: int) -> str:
    """The stored state a paused rollout resumes to: the wave it was in, or pending if it never started."""
    return stored_state(Phase.WAVE if wave else Phase.CANARY, wave) if started else Phase.PENDING.value


def phase_of(state: str) -> Phase:
    """The phase of a stored rollout state (``wave-3`` -> WAVE).

    Raises:
        ValueError: Not a rollout state.
    """
    if state.startswith("wave-") and state[5:].isdigit():
        return Phase.WAVE
    return Phase(state)


def has_work(phase: Phase, row: RowState, revert: RevertState, *, notified: bool, previous: bool) -> bool:
    """Whether a row of a rollout in ``phase`` still needs the controller (a rollout that is not finished
    always does). The controller's query selects exactly the rollouts with such a row.

    Args:
        phase: The rollout's phase.
        row: The row's state.
        revert: Its undo state.
        notified: Whether it was ever notified (``notified_at`` is set).
        previous: Whether it had a version before the rollout (something to go back to).
    """
    if phase not in TERMINAL_PHASES:
        return True
    if row in IN_FLIGHT or revert in REVERT_TO_SEND:
        return True  # a result to wait for, or an undo to send
    if phase is Phase.ABORTED:
        return row is R.COMMITTED and previous and revert in (V.NONE, V.ROLLBACK_SENT)  # to update back
    return row is R.TIMED_OUT and not notified  # completed: a device that was offline catches up


def work_clause(sa: Any, rollouts: Any, rows: Any) -> Any:
    """:func:`has_work` as a SQL condition over ``rollouts`` left-joined with their ``rows`` (a rollout with no
    row counts by its phase alone), for the controller's query of the rollouts it must step.

    Args:
        sa: The ``sqlalchemy`` module.
        rollouts: The ``rollouts`` table.
        rows: The ``rollout_devices`` table.
    """
    def values(states: frozenset[Any]) -> list[str]:
        return sorted(s.value for s in states)

    undo_after_abort = ((rollouts.c.state == P.ABORTED.value) & (rows.c.state == R.COMMITTED.value)
                        & rows.c.previous.isnot(None)
                        & (rows.c.revert_state.is_(None) | (rows.c.revert_state == V.ROLLBACK_SENT.value)))
    late_after_completion = ((rollouts.c.state == P.COMPLETED.value) & (rows.c.state == R.TIMED_OUT.value)
                             & rows.c.notified_at.is_(None))
    return (rollouts.c.state.notin_(values(TERMINAL_PHASES)) | rows.c.state.in_(values(IN_FLIGHT))
            | rows.c.revert_state.in_(values(REVERT_TO_SEND)) | undo_after_abort | late_after_completion)
