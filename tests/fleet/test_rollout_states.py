"""The rollout lifecycle tables (fleet/rollouts/states.py) walked, and the controller's query checked against
``has_work`` on every combination of phase, row state, undo state, notification and previous version."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import pytest

from edgeml.fleet.rollouts.states import (
    REVERT_TRANSITIONS,
    ROLLOUT_TRANSITIONS,
    ROW_TRANSITIONS,
    TERMINAL,
    TERMINAL_PHASES,
    Phase,
    RevertState,
    RolloutEvent,
    RowEvent,
    RowState,
    advance,
    has_work,
    phase_of,
    resumed,
    stored_state,
    work_clause,
)
from edgeml.fleet.store.db import Database


def _reachable(table: dict, starts: set) -> set:
    seen, todo = set(starts), list(starts)
    while todo:
        state = todo.pop()
        for (frm, _), to in table.items():
            if frm == state and to not in seen:
                seen.add(to)
                todo.append(to)
    return seen


def test_every_phase_is_reachable_and_the_finished_ones_are_final() -> None:
    assert _reachable(ROLLOUT_TRANSITIONS, {Phase.PENDING}) == set(Phase)
    assert not [k for k in ROLLOUT_TRANSITIONS if k[0] in TERMINAL_PHASES]
    for phase in (Phase.PENDING, Phase.CANARY, Phase.WAVE, Phase.PAUSED):
        assert ROLLOUT_TRANSITIONS[(phase, RolloutEvent.ABORT)] is Phase.ABORTED  # abort from anywhere running


def test_every_row_state_is_reachable_and_only_a_late_device_leaves_a_terminal_one() -> None:
    starts = {RowState.PENDING, RowState.INCOMPATIBLE, RowState.COMMITTED}  # what planning writes
    assert _reachable(ROW_TRANSITIONS, starts) == set(RowState)
    leaving = {frm for (frm, _) in ROW_TRANSITIONS if frm in TERMINAL}
    assert leaving == {RowState.TIMED_OUT}  # a result after the timeout, or an offline device catching up
    assert advance(ROW_TRANSITIONS, RowState.NOTIFIED, RowEvent.BUSY) is RowState.FAILED
    with pytest.raises(KeyError, match="no transition from"):
        advance(ROW_TRANSITIONS, RowState.COMMITTED, RowEvent.NOTIFY)


def test_every_undo_ends_reverted_or_failed() -> None:
    assert _reachable(REVERT_TRANSITIONS, {RevertState.NONE}) == set(RevertState)
    finals = {RevertState.REVERTED, RevertState.REVERT_FAILED, RevertState.ROLLBACK_SENT}
    assert not [k for k in REVERT_TRANSITIONS if k[0] in finals - {RevertState.ROLLBACK_SENT}]


@pytest.mark.parametrize(("stored", "phase"), [("pending", Phase.PENDING), ("canary", Phase.CANARY),
                                               ("wave-1", Phase.WAVE), ("wave-12", Phase.WAVE),
                                               ("paused", Phase.PAUSED), ("aborted", Phase.ABORTED)])
def test_stored_states_round_trip(stored: str, phase: Phase) -> None:
    assert phase_of(stored) is phase
    wave = int(stored[5:]) if stored.startswith("wave-") else 0
    assert stored_state(phase, wave) == stored
    with pytest.raises(ValueError):
        phase_of("wave-x")


def test_resume_goes_back_to_where_it_paused() -> None:
    assert (resumed(False, 0), resumed(True, 0), resumed(True, 3)) == ("pending", "canary", "wave-3")


def test_the_controllers_query_selects_exactly_the_rollouts_with_work(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.create()
    t, rd, sa = db.tables["rollouts"], db.tables["rollout_devices"], db.sa
    now = dt.datetime.now(dt.timezone.utc)
    expected = set()
    phases = [(Phase.PENDING, 0), (Phase.CANARY, 0), (Phase.WAVE, 2), (Phase.PAUSED, 1), (Phase.COMPLETED, 2),
              (Phase.ABORTED, 1)]
    with db.transaction() as conn:
        for i, ((phase, wave), row, revert, notified, previous) in enumerate(itertools.product(
                phases, RowState, RevertState, (False, True), (False, True))):
            rid = f"r{i}"
            conn.execute(t.insert().values(id=rid, kind="rollout", model="m", version="2.0.0", options={},
                                           state=stored_state(phase, wave), current_wave=wave, created_by="t",
                                           created_at=now, updated_at=now))
            conn.execute(rd.insert().values(rollout_id=rid, device_id="d", wave=0, state=row.value,
                                            revert_state=None if revert is RevertState.NONE else revert.value,
                                            notified_at=now if notified else None,
                                            previous="1.0.0" if previous else None))
            if has_work(phase, row, revert, notified=notified, previous=previous):
                expected.add(rid)
        conn.execute(t.insert().values(id="empty-done", kind="rollout", model="m", version="2.0.0", options={},
                                       state="completed", current_wave=0, created_by="t", created_at=now,
                                       updated_at=now))
    query = sa.select(t.c.id).select_from(t.outerjoin(rd, rd.c.rollout_id == t.c.id)).where(work_clause(sa, t, rd))
    with db.transaction() as conn:
        got = set(conn.execute(query.distinct()).scalars())
    db.close()
    assert got == expected
    assert len(expected) > 200  # the check covered both sides of the predicate
