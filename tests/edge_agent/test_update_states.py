"""The transition table's own properties, and the pure parts around it: health judgement, golden-vector
tolerances, thresholds, the persisted record and the A/B slots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeml.edge_agent.update.health import Baseline, HealthSnapshot, Thresholds, compare_golden, judge
from edgeml.edge_agent.update.slots import Slots
from edgeml.edge_agent.update.states import RESUME, TERMINAL, TRANSITIONS, Event, State, next_state
from edgeml.edge_agent.update.steps import STEPS
from edgeml.edge_agent.update.store import RecordStore, UpdateRecord, UpdateRequest
from edgeml.errors import BundleIntegrityError, ConfigError, StorageError
from edgeml.protocol import Cause
from tests.edge_agent.conftest import GOOD, DigitsBundles

PRE_SWITCH = {State.NOTIFIED, State.DOWNLOAD, State.VERIFY, State.STAGE, State.SMOKE_TEST}
POST_SWITCH = {State.SWITCH, State.PROBATION}


def _reachable(start: State) -> set[State]:
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for (frm, _event), to in TRANSITIONS.items():
            if frm is state and to not in seen:
                seen.add(to)
                todo.append(to)
    return seen


def test_every_state_is_reachable_and_every_path_ends() -> None:
    assert _reachable(State.NOTIFIED) == set(State)
    for state in State:
        assert _reachable(state) & TERMINAL, f"{state.value} cannot reach a terminal state"


def test_every_non_terminal_state_has_a_step_and_a_way_forward() -> None:
    sources = {state for state, _event in TRANSITIONS}
    assert sources == set(State) - TERMINAL == set(STEPS)
    for state in sources:
        assert (state, Event.OK) in TRANSITIONS
    assert not any(state in TERMINAL for state, _event in TRANSITIONS)


@pytest.mark.parametrize("state", sorted(PRE_SWITCH | POST_SWITCH, key=list(State).index), ids=str)
def test_failures_before_the_switch_abort_and_after_it_roll_back(state: State) -> None:
    expected = State.ROLLBACK if state in POST_SWITCH else State.ABORT
    if state is State.NOTIFIED:  # nothing was fetched yet: nothing to clean up
        expected = State.FAILED
    for event in (Event.FAIL, Event.LOOP):
        assert next_state(state, event) is expected


def test_the_safe_paths_have_no_loop_guard_and_cannot_fail() -> None:
    for state in (State.ABORT, State.ROLLBACK, State.COMMIT):
        assert (state, Event.FAIL) not in TRANSITIONS
    assert (State.ABORT, Event.LOOP) not in TRANSITIONS and (State.ROLLBACK, Event.LOOP) not in TRANSITIONS


def test_resume_map_covers_every_state_and_never_skips_verification() -> None:
    assert set(RESUME) == set(State)
    order = list(State)
    for persisted, resume_at in RESUME.items():
        assert order.index(resume_at) <= order.index(persisted)  # resume repeats work, never skips it
    assert RESUME[State.VERIFY] is State.DOWNLOAD
    with pytest.raises(KeyError, match="no transition from committed on ok"):
        next_state(State.COMMITTED, Event.OK)


T = Thresholds(min_requests=10)
B = Baseline(p99_ms=2.0, confidence=0.9)
JUDGE = [
    # (snapshot, cause, reason fragment) or None where the model is healthy
    (HealthSnapshot(requests=100, errors=1, p99_ms=3.0, confidence=0.85, drift=0.1), None, None),
    (HealthSnapshot(requests=9, errors=9, p99_ms=500.0, confidence=0.0), None, None),  # too few requests to judge
    (HealthSnapshot(crashes=2), Cause.CRASH, "the agent died 2 times during probation (limit 2)"),
    (HealthSnapshot(requests=100, errors=6, p99_ms=3.0), Cause.ERROR_RATE,
     "error rate 6.0% over 100 requests exceeds 5.0%"),
    (HealthSnapshot(requests=100, p99_ms=11.01), Cause.LATENCY,
     "p99 latency 11.01 ms exceeds 11.00 ms (3 x baseline 2.00 ms + 5 ms)"),
    (HealthSnapshot(requests=100, p99_ms=11.0), None, None),
    (HealthSnapshot(requests=100, p99_ms=1.0, confidence=0.6), Cause.CONFIDENCE,
     "mean confidence fell from 0.900 to 0.600"),
    (HealthSnapshot(requests=100, p99_ms=1.0, confidence=0.66), None, None),
    (HealthSnapshot(requests=100, p99_ms=1.0, drift=0.7), Cause.DRIFT, "drift score 0.700 exceeds 0.5"),
]


@pytest.mark.parametrize(("snapshot", "cause", "reason"), JUDGE)
def test_judge(snapshot: HealthSnapshot, cause: Cause | None, reason: str | None) -> None:
    got = judge(snapshot, B, T)
    if cause is None:
        assert got is None
    else:
        assert got is not None and got.cause is cause and reason in got.reason, got


def test_judge_without_a_confidence_baseline_skips_that_check() -> None:
    assert judge(HealthSnapshot(requests=100, p99_ms=1.0, confidence=0.1), Baseline(2.0, None), T) is None


_RNG = np.random.default_rng(0)
_WANT = _RNG.standard_normal((40, 10)).astype(np.float32) * 4
_STEP = 0.05  # an int8 output's quantization step


def _flip_one(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    top = int(out[0].argmax())
    out[0, top] = out[0].min() - 1
    return out


GOLDEN = [
    # (precision, actual, reason fragment or None)
    ("fp32", _WANT + 1e-4, None),
    ("fp32", _WANT + 2e-3, "max |error| 0.002 vs the golden vectors exceeds atol 0.001"),
    ("int8", _WANT + _STEP * 0.9, None),  # a step off (ARM vs x86 kernels): passes with int8 slack
    ("int8", _WANT + _STEP * 6, "of values differ from the golden vectors past atol 0.2"),
    ("int8", _flip_one(_WANT), None),  # one top-1 flip in 40 (97.5% >= 95%)
    ("fp32", _flip_one(_WANT), "top-1 agreement 97.5% with the golden vectors < 100.0%"),
    ("fp32", _WANT[:5], "shape (5, 10) != golden (40, 10)"),
    ("fp32", np.full_like(_WANT, np.nan), "non-finite values"),
]


@pytest.mark.parametrize(("precision", "actual", "reason"), GOLDEN)
def test_golden_vectors_allow_for_integer_kernels(precision: str, actual: np.ndarray, reason: str | None) -> None:
    atol = 1e-3 if precision == "fp32" else _STEP
    got = compare_golden({"output": actual}, {"output": _WANT}, {"atol": atol, "rtol": 0.0, "top1": True}, precision)
    assert got is None if reason is None else reason in (got or ""), got


@pytest.mark.parametrize(("data", "message"), [
    ({"p99_factor": "3"}, "p99_factor must be a non-negative number"),
    ({"max_crashes": -1}, "max_crashes must be a non-negative number"),
    ({"p99": 2}, "unknown health threshold 'p99'"),
    ({"max_crashes": True}, "must be a non-negative number"),
])
def test_thresholds_from_the_rollout_are_validated(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Thresholds.from_dict(data)


def test_thresholds_keep_defaults_for_unset_keys() -> None:
    t = Thresholds.from_dict({"p99_factor": 2, "max_crashes": 4.0})
    assert (t.p99_factor, t.max_crashes, t.probation_s) == (2.0, 4, Thresholds().probation_s)
    assert isinstance(t.max_crashes, int) and Thresholds.from_dict(t.to_dict()) == t


@pytest.mark.parametrize(("fields", "message"), [
    ({"model": "Digits"}, "model name 'Digits' is invalid"),
    ({"version": "2"}, "version '2' is not a semantic version"),
    ({"target": "../x"}, "target '../x'"),
])
def test_bad_update_requests_are_refused(fields: dict[str, str], message: str) -> None:
    base = {"model": "digits", "version": "1.0.0", "target": "onnx", **fields}
    with pytest.raises(ConfigError, match=message):
        UpdateRequest(**base).validated()  # type: ignore[arg-type]


def test_record_round_trips_and_a_foreign_file_is_refused(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "update.json")
    assert store.load() is None
    record = UpdateRecord.new(UpdateRequest("digits", "1.0.0", "onnx", rollout="r1").validated())
    record.enter("ok", State.DOWNLOAD, now=5.0)
    record.baseline = {"p99_ms": 1.5, "confidence": None}
    store.save(record)
    assert store.load() == record and record.chain() == ["notified", "download"]
    assert record.visits == {"notified": 1, "download": 1} and record.history == [["notified", "ok", "download", 5.0]]
    assert [p.name for p in tmp_path.iterdir()] == ["update.json"]  # no temporary file left
    (tmp_path / "update.json").write_text('{"schema": "other/1"}')
    with pytest.raises(StorageError, match="not readable"):
        store.load()


def test_slots_stage_into_the_inactive_slot_and_detect_damage(digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    assert slots.active() is None and slots.inactive() == "a"
    first = slots.stage(digits_bundles.paths["1.0.0"], "a")
    slots.set_active(first)
    assert slots.active() == first and slots.inactive() == "b"
    with pytest.raises(StorageError, match="it is the active slot"):
        slots.stage(digits_bundles.paths[GOOD], "a")
    second = slots.stage(digits_bundles.paths[GOOD], "b")
    assert slots.verify(second).version == GOOD and slots.verify(first).version == "1.0.0"
    assert sorted(p.name for p in slots.root.iterdir()) == ["a", "active.json", "b"]
    with open(slots.path("b") / "model.onnx", "r+b") as fh:  # bit rot after staging
        fh.seek(100)
        fh.write(b"\x00\x01")
    with pytest.raises(BundleIntegrityError, match="model.onnx does not match"):
        slots.verify(second)
    slots.remove("a")  # the active slot is never removed
    assert slots.verify(first).version == "1.0.0"


def test_staging_after_a_crash_mid_extraction_starts_clean(digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    half = slots.root / ".staging-crashed"  # what SIGKILL during an extraction leaves
    half.mkdir()
    (half / "model.onnx").write_bytes(b"half a model")
    (slots.root / ".trash-b").mkdir()
    info = slots.stage(digits_bundles.paths[GOOD], "b")
    assert sorted(p.name for p in slots.root.iterdir()) == ["b"]
    assert slots.verify(info).version == GOOD
