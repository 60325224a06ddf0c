"""The update machine in one process: real bundles, real onnxruntime, a real model host; the registry and
the clock are in-memory fakes of their real interfaces (``fetch`` and ``Clock``). Tables of (what goes
wrong, the chain of states expected, the reason reported)."""

from __future__ import annotations

import contextlib
import math
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeml.bundle import sha256_file
from edgeml.edge_agent.serving import ModelHost
from edgeml.edge_agent.tuf_client import VerifiedBundle
from edgeml.edge_agent.update import steps
from edgeml.edge_agent.update.health import Thresholds
from edgeml.edge_agent.update.machine import UpdateMachine
from edgeml.edge_agent.update.states import State
from edgeml.edge_agent.update.store import UpdateRecord, UpdateRequest
from edgeml.errors import ConfigError, EdgeMLError, UpdateVerificationError
from edgeml.protocol import Cause
from tests.edge_agent.conftest import BROKEN, GOOD, SLOW, SOFT, UNLOADABLE, DigitsBundles

#: 15 ms of latency slack, as in test_update_crash.py: a good model on a loaded shared core must not look slow
#: (the slow version takes ~60 ms a request, see conftest.SLOW_TARGET_MS)
LIMITS = Thresholds(probation_s=1.0, min_requests=10, max_probation_s=5.0, smoke_latency_budget_s=0.02,
                    p99_slack_ms=15.0)
PRE = ["notified", "download", "verify", "stage", "smoke_test"]
FULL = [*PRE, "switch", "probation"]


class FakeRegistry:
    """``fetch`` like TufClient's: copies a bundle into the download dir; can refuse or hand a tampered file."""

    def __init__(self, bundles: dict[str, Path], downloads: Path) -> None:
        self.bundles, self.downloads = bundles, downloads
        self.refuse: dict[str, str] = {}  # version -> UpdateVerificationError kind
        self.tamper: set[str] = set()
        self.calls = 0

    def fetch(self, name: str, version: str, target: str) -> VerifiedBundle:
        self.calls += 1
        if version in self.refuse:
            raise UpdateVerificationError(f"refused {name} {version}", kind=self.refuse[version])
        self.downloads.mkdir(parents=True, exist_ok=True)
        dest = self.downloads / self.bundles[version].name
        shutil.copyfile(self.bundles[version], dest)
        sha = sha256_file(dest)
        if version in self.tamper:
            with open(dest, "r+b") as fh:
                fh.seek(200)
                fh.write(b"\xff\xfe")
        return VerifiedBundle(dest, name, version, target, sha)


@dataclass
class FakeClock:
    """Time moves only when someone sleeps; each sleep first serves a few requests (live traffic)."""

    now: float = 1_000_000.0
    on_sleep: list[Callable[[], None]] = field(default_factory=list)

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        for hook in self.on_sleep:
            hook()
        self.now += seconds


@dataclass
class Rig:
    """A device with 1.0.0 committed and serving, and its machine."""

    machine: UpdateMachine
    host: ModelHost
    registry: FakeRegistry
    clock: FakeClock
    traffic: np.ndarray
    drift: dict[str, float] = field(default_factory=dict)
    transitions: list[tuple[str, float]] = field(default_factory=list)

    def serve(self, n: int, inputs: np.ndarray | None = None) -> None:
        data = self.traffic if inputs is None else inputs
        for i in range(n):
            with contextlib.suppress(EdgeMLError):  # failures are counted by the host's stats
                self.host.predict({"input": data[i % len(data)][None]})

    def update(self, version: str, **limits: Any) -> UpdateRecord:
        return self.machine.start(UpdateRequest("digits", version, "onnx", rollout="r1",
                                                thresholds=Thresholds(**{**LIMITS.to_dict(), **limits})))


def make_machine(state_dir: Path, host: ModelHost, registry: FakeRegistry, clock: FakeClock,
                 transitions: list[tuple[str, float]] | None = None,
                 drift: dict[str, float] | None = None) -> UpdateMachine:
    def note(record: UpdateRecord, frm: State | None, event: str, to: State) -> None:
        if transitions is not None:
            transitions.append((to.value, time.perf_counter()))

    return UpdateMachine(state_dir, host, registry.fetch, clock=clock, on_transition=note, poll_s=0.05,
                         drift=lambda version: (drift or {}).get(version))


@pytest.fixture
def rig(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[Rig]:
    host, clock = ModelHost(), FakeClock()
    registry = FakeRegistry(digits_bundles.paths, tmp_path / "downloads")
    transitions: list[tuple[str, float]] = []
    drift: dict[str, float] = {}
    machine = make_machine(tmp_path / "state", host, registry, clock, transitions, drift)
    rig = Rig(machine, host, registry, clock, digits_bundles.traffic, drift, transitions)
    first = rig.update("1.0.0")
    assert (first.state, first.reason) == ("committed", None)
    clock.on_sleep.append(lambda: rig.serve(5))
    rig.serve(30)  # the outgoing model's live numbers are the baseline
    transitions.clear()
    yield rig
    host.close()


def _refused(rig: Rig) -> None:
    rig.registry.refuse[GOOD] = "rollback"


def _tampered(rig: Rig) -> None:
    rig.registry.tamper.add(GOOD)


def _bad_requests(rig: Rig) -> None:  # live requests the new model cannot run (wrong shape)
    rig.clock.on_sleep.append(lambda: rig.serve(5, np.zeros((4, 3, 3), np.float32)))


def _drifting(rig: Rig) -> None:
    rig.drift[GOOD] = 0.9


CHAINS = [
    # (case, version, arrange, chain after "notified", reason fragment or None, the cause the fleet reads)
    ("good update", GOOD, None, [*FULL, "commit", "committed"], None, None),
    ("same version", "1.0.0", None, ["notified", "failed"], "1.0.0 is already serving", Cause.ALREADY_SERVING),
    ("tuf refuses", GOOD, _refused, ["notified", "download", "abort", "failed"], "verification failed (rollback)",
     Cause.VERIFICATION),
    ("tampered download", GOOD, _tampered, ["notified", "download", "verify", "abort", "failed"],
     "differs from its signed sha256", Cause.VERIFICATION),
    ("golden vectors fail", BROKEN, None, [*PRE, "abort", "failed"], "smoke test: golden vectors", Cause.GOLDEN),
    ("does not load", UNLOADABLE, None, [*PRE, "abort", "failed"], "does not load or run", Cause.LOAD),
    ("too slow", SLOW, None, [*FULL, "rollback", "rolled_back"], "probation: p99 latency", Cause.LATENCY),
    ("confidence collapses", SOFT, None, [*FULL, "rollback", "rolled_back"], "probation: mean confidence fell",
     Cause.CONFIDENCE),
    ("errors on live data", GOOD, _bad_requests, [*FULL, "rollback", "rolled_back"], "probation: error rate",
     Cause.ERROR_RATE),
    ("drift", GOOD, _drifting, [*FULL, "rollback", "rolled_back"], "probation: drift score 0.900", Cause.DRIFT),
]


@pytest.mark.parametrize(("case", "version", "arrange", "chain", "reason", "cause"), CHAINS,
                         ids=[c[0] for c in CHAINS])
def test_chain_of_states(rig: Rig, case: str, version: str, arrange: Callable[[Rig], None] | None,
                         chain: list[str], reason: str | None, cause: Cause | None) -> None:
    if arrange is not None:
        arrange(rig)
    record = rig.update(version)
    assert record.chain() == chain
    assert record.reason is None if reason is None else reason in (record.reason or ""), record.reason
    assert record.cause == (cause.value if cause else None)
    serving = version if record.state == "committed" else "1.0.0"
    assert rig.host.active is not None and rig.host.active.version == serving
    assert rig.host.previous is None  # committed or rolled back: the other runtime is released
    pointer = rig.machine.slots.active()
    assert pointer is not None and pointer.version == serving
    assert rig.machine.store.load() == record
    assert record.bundle_path is None or not Path(record.bundle_path).exists()  # the download is cleaned up
    if record.state != "committed":  # and so is a failed candidate
        assert record.candidate_slot is None or not rig.machine.slots.path(record.candidate_slot).exists()


def test_rollback_is_a_pointer_swap(rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    """From the failing check to the old model serving: the old runtime stayed loaded, nothing reloads."""
    failed_at: list[float] = []
    real_judge = steps.judge

    def judge(*args: Any) -> Any:
        verdict = real_judge(*args)
        if verdict is not None and not failed_at:
            failed_at.append(time.perf_counter())
        return verdict

    monkeypatch.setattr(steps, "judge", judge)
    old = rig.host.active
    swapped_at: list[float] = []
    real_swap = rig.host.swap

    def swap(model: Any, **kw: Any) -> Any:
        result = real_swap(model, **kw)
        if model is old:
            swapped_at.append(time.perf_counter())
        return result

    monkeypatch.setattr(rig.host, "swap", swap)
    record = rig.update(SLOW)
    assert record.state == "rolled_back"
    assert rig.host.active is old  # the very runtime that served before: a pointer swap
    done = dict(rig.transitions)["rolled_back"]
    with capsys.disabled():
        serving, persisted = 1000 * (swapped_at[0] - failed_at[0]), 1000 * (done - failed_at[0])
        print(f"\nrollback: failing check -> old model serving {serving:.1f} ms, -> rolled_back persisted "
              f"{persisted:.1f} ms")
    assert record.baseline is not None and record.baseline["p99_ms"] < 5.0


def test_first_model_baseline_is_its_own_smoke_test(digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    host, clock = ModelHost(), FakeClock()
    registry = FakeRegistry(digits_bundles.paths, tmp_path / "downloads")
    machine = make_machine(tmp_path / "state", host, registry, clock)
    record = machine.start(UpdateRequest("digits", "1.0.0", "onnx", thresholds=LIMITS))
    assert (record.state, record.active_slot, record.previous_version) == ("committed", None, None)
    assert record.baseline is not None and 0 < record.baseline["p99_ms"] < math.inf  # measured (no timing bound)
    assert record.baseline["confidence"] is not None and 0.3 < record.baseline["confidence"] <= 1.0
    host.close()


def test_a_second_update_while_one_runs_is_refused(rig: Rig) -> None:
    record = UpdateRecord.new(UpdateRequest("digits", GOOD, "onnx", id="u-running"))
    record.enter("ok", State.DOWNLOAD)
    rig.machine.store.save(record)
    with pytest.raises(ConfigError, match="u-running .* is in progress"):
        rig.update(SLOW)


class Died(BaseException):
    """The agent process died here (SIGKILL or power loss): no cleanup ran."""


def _dies(*args: Any) -> Any:
    raise Died()


LOOPS = [
    # (state the agent keeps dying in, chain, final state, serving)
    (State.DOWNLOAD, ["notified", "download", "download", "download", "download", "abort", "failed"], "1.0.0"),
    (State.SMOKE_TEST, [*PRE, "smoke_test", "smoke_test", "smoke_test", "abort", "failed"], "1.0.0"),
    (State.SWITCH, [*PRE, "switch", "switch", "switch", "switch", "rollback", "rolled_back"], "1.0.0"),
    (State.COMMIT, [*FULL, "commit", "commit", "commit", "commit", "committed"], GOOD),
]


@pytest.mark.parametrize(("dies_in", "chain", "serving"), LOOPS, ids=[c[0].value for c in LOOPS])
def test_loop_guard_gives_up_on_a_state_the_agent_keeps_dying_in(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, dies_in: State, chain: list[str], serving: str) -> None:
    monkeypatch.setitem(steps.STEPS, dies_in, _dies)
    with pytest.raises(Died):
        rig.update(GOOD)
    machine = rig.machine
    for _ in range(3):  # reboots
        machine.host.close()
        machine = make_machine(machine.state_dir, ModelHost(), rig.registry, rig.clock)
        try:
            record = machine.resume()
            break
        except Died:
            continue
    assert record is not None and record.chain() == chain
    assert record.reason is not None and f"loop guard: entered {dies_in.value} 4 times" in record.reason
    assert record.cause == Cause.LOOP.value
    assert machine.host.active is not None and machine.host.active.version == serving
    machine.host.close()


def test_requests_keep_being_served_across_the_switch(rig: Rig) -> None:
    """Two threads hammer the host during a real update: no request fails, and each thread sees the old
    model until the switch and the new one after it."""
    rig.clock.on_sleep.clear()
    seen: dict[int, list[str]] = defaultdict(list)
    rig.host.observers.append(lambda version, *rest: seen[threading.get_ident()].append(version))
    stop = threading.Event()

    def client() -> None:
        i = 0
        while not stop.is_set():
            rig.host.predict({"input": rig.traffic[i % len(rig.traffic)][None]})
            i += 1

    threads = [threading.Thread(target=client) for _ in range(2)]
    errors_before = rig.host.stats("1.0.0").errors
    for t in threads:
        t.start()
    rig.clock.on_sleep.append(lambda: time.sleep(0.01))
    record = rig.update(GOOD, p99_slack_ms=1000.0)  # three threads on two cores: latency is not the point here
    stop.set()
    for t in threads:
        t.join()
    assert record.state == "committed"
    assert rig.host.stats("1.0.0").errors == errors_before and rig.host.stats(GOOD).errors == 0
    assert rig.host.stats(GOOD).requests > 0
    assert len(seen) == 2
    for versions in seen.values():
        switched = versions.index(GOOD)
        assert set(versions[:switched]) == {"1.0.0"} and set(versions[switched:]) == {GOOD}


def test_a_resent_command_for_a_finished_update_changes_nothing_and_reports_its_end(tmp_path: Path) -> None:
    """The fleet may send the same update command twice (e.g. a controller restarting): no second update."""
    from edgeml.edge_agent.update.machine import UpdateMachine
    from edgeml.edge_agent.update.store import UpdateRecord, UpdateRequest

    seen: list[tuple[str, str]] = []
    machine = UpdateMachine(tmp_path, ModelHost(), lambda *a: (_ for _ in ()).throw(AssertionError("no fetch")),
                            on_transition=lambda r, f, e, t: seen.append((e, t.value)))
    record = UpdateRecord.new(UpdateRequest("digits", "2.0.0", "onnx", id="u-1"))
    record.state = "committed"
    machine.store.save(record)
    again = machine.start(UpdateRequest("digits", "2.0.0", "onnx", id="u-1"))
    assert again.state == "committed" and seen == [("repeat", "committed")]
