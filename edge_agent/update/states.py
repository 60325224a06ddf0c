"""The update lifecycle as data: its states, its events, the whole transition table and the resume map.

Read :data:`TRANSITIONS` top to bottom to know everything an update can do. A step
(:mod:`.steps`) runs in each non-terminal state and returns an :class:`Event`; the table gives the next
state. The record is persisted on entering each state, before its step runs (:mod:`.machine`), so after
SIGKILL or power loss the persisted state says what was in progress and :data:`RESUME` says where to
pick up.

An update offered a delta from the version that serves goes NOTIFIED -> PATCH (rebuild the bundle from the
active slot); a patch that fails for any reason continues in DOWNLOAD with the full bundle, so a delta can
make an update cheaper but never make it fail.

Before :attr:`State.SWITCH` the device still serves the old model, so a failure ends in
:attr:`State.ABORT` (discard the candidate) and :attr:`State.FAILED`. From the switch on the new model
may be serving, so a failure ends in :attr:`State.ROLLBACK` (back to the previous slot) and
:attr:`State.ROLLED_BACK`. ``LOOP`` is the loop guard's event: a state entered too many times (the agent
keeps dying in it) is abandoned the same way.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["RESUME", "TERMINAL", "TRANSITIONS", "Event", "State", "next_state"]


class State(str, Enum):
    """Where an update is. The value is what the record stores."""

    NOTIFIED = "notified"  # an update request was accepted and persisted
    PATCH = "patch"  # rebuilding the bundle from the active slot and a signed delta (falls back to DOWNLOAD)
    DOWNLOAD = "download"  # fetching the bundle (TUF-verified; the fetcher resumes partial downloads)
    VERIFY = "verify"  # the downloaded bundle against its signed hash and its own manifest hashes
    STAGE = "stage"  # extracting into the inactive slot
    SMOKE_TEST = "smoke_test"  # loading the staged model, golden vectors, latency baseline
    SWITCH = "switch"  # the active-slot pointer and the serving runtime move to the candidate
    PROBATION = "probation"  # the new model serves under watch
    COMMIT = "commit"  # the new model is kept; the previous runtime is released
    ROLLBACK = "rollback"  # back to the previous slot (post-switch failure)
    ABORT = "abort"  # the candidate is discarded (pre-switch failure); nothing served changed
    COMMITTED = "committed"  # terminal: the new model serves
    ROLLED_BACK = "rolled_back"  # terminal: the previous model serves again; the record says why
    FAILED = "failed"  # terminal: the update never switched; the record says why


class Event(str, Enum):
    """What a step reports."""

    OK = "ok"  # the step did its work
    FAIL = "fail"  # the step found a reason to stop (recorded in ``reason``)
    LOOP = "loop"  # the loop guard: this state was entered too many times
    DELTA = "delta"  # a delta from the version that serves was offered: rebuild rather than download


TERMINAL: frozenset[State] = frozenset({State.COMMITTED, State.ROLLED_BACK, State.FAILED})

S, E = State, Event
#: (state, event) -> next state: the whole lifecycle, one line per transition.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.NOTIFIED, E.OK): S.DOWNLOAD,
    (S.NOTIFIED, E.DELTA): S.PATCH,
    (S.NOTIFIED, E.FAIL): S.FAILED,
    (S.NOTIFIED, E.LOOP): S.FAILED,
    (S.PATCH, E.OK): S.VERIFY,
    (S.PATCH, E.FAIL): S.DOWNLOAD,  # a delta that cannot rebuild the signed bundle: the full bundle instead
    (S.PATCH, E.LOOP): S.DOWNLOAD,
    (S.DOWNLOAD, E.OK): S.VERIFY,
    (S.DOWNLOAD, E.FAIL): S.ABORT,
    (S.DOWNLOAD, E.LOOP): S.ABORT,
    (S.VERIFY, E.OK): S.STAGE,
    (S.VERIFY, E.FAIL): S.ABORT,
    (S.VERIFY, E.LOOP): S.ABORT,
    (S.STAGE, E.OK): S.SMOKE_TEST,
    (S.STAGE, E.FAIL): S.ABORT,
    (S.STAGE, E.LOOP): S.ABORT,
    (S.SMOKE_TEST, E.OK): S.SWITCH,
    (S.SMOKE_TEST, E.FAIL): S.ABORT,
    (S.SMOKE_TEST, E.LOOP): S.ABORT,
    (S.SWITCH, E.OK): S.PROBATION,
    (S.SWITCH, E.FAIL): S.ROLLBACK,
    (S.SWITCH, E.LOOP): S.ROLLBACK,
    (S.PROBATION, E.OK): S.COMMIT,
    (S.PROBATION, E.FAIL): S.ROLLBACK,
    (S.PROBATION, E.LOOP): S.ROLLBACK,
    (S.COMMIT, E.OK): S.COMMITTED,
    (S.COMMIT, E.LOOP): S.COMMITTED,  # committing only releases the old runtime; a crash changes nothing
    (S.ABORT, E.OK): S.FAILED,
    (S.ROLLBACK, E.OK): S.ROLLED_BACK,
}
del S, E

#: persisted state -> the state to run after a crash or power loss. Every step is idempotent, so most
#: states run again; VERIFY goes back to DOWNLOAD, because a download that was not yet durable may be
#: torn (the download step keeps a file whose signed hash still matches and fetches it again otherwise;
#: it also keeps a bundle the patch step rebuilt, which is checked the same way).
RESUME: dict[State, State] = {state: state for state in State}
RESUME[State.VERIFY] = State.DOWNLOAD


def next_state(state: State, event: Event) -> State:
    """The state that follows ``state`` on ``event``.

    Raises:
        KeyError: The table has no such transition (a bug in a step).
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise KeyError(f"no transition from {state.value} on {event.value}") from None
