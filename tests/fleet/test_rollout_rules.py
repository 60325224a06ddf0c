"""The pure rollout rules: options, planning (canary sizes, target choice, order) and the per-tick decision,
as tables; every decision is checked against the invariant that no device beyond the current wave is told."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from edgeml.fleet.rollouts.rules import (
    AbortRollout,
    Action,
    AdvanceWave,
    CompleteRollout,
    DeviceFacts,
    DeviceRow,
    DeviceSignals,
    NotifyDevices,
    RolloutError,
    RolloutOptions,
    RolloutView,
    TellRollback,
    TimeOut,
    choose_target,
    decide,
    order,
    parse_duration,
    parse_fraction,
    parse_selection,
    plan,
)

ORT = {"name": "onnxruntime", "min_version": "1.17", "precision": "int8"}
TRT = {"name": "tensorrt", "min_version": "10.0", "precision": "int8"}
CPU = {"runtimes": {"onnxruntime": "1.20.1"}, "arch": "x86_64"}
JETSON = {"runtimes": {"onnxruntime": "1.20.1", "tensorrt": "10.3.0"}, "arch": "aarch64", "compute_capability": "8.7"}
AVAILABLE = {"tensorrt-int8": TRT, "onnx-int8": ORT}


def options(**changes: Any) -> RolloutOptions:
    base: dict[str, Any] = {"targets": ("tensorrt-int8", "onnx-int8"), "canary": 0.05, "waves": (0.25, 0.5, 1.0),
                            "min_devices": 3, "max_failure_rate": 0.1, "wave_timeout_s": 60.0}
    return RolloutOptions(**{**base, **changes})


def fleet(n: int, caps: dict[str, Any] = CPU, **tags: str) -> list[DeviceFacts]:
    return [DeviceFacts(f"dev-{i:03d}", {"site": "lab", **tags}, caps, {"digits": "1.0.0"}) for i in range(n)]


@pytest.mark.parametrize(("text", "value"), [("5%", 0.05), ("100%", 1.0), ("0.25", 0.25), (" 50 % ", 0.5),
                                             ("ten%", None), ("", None)])
def test_fractions(text: str, value: float | None) -> None:
    if value is None:
        with pytest.raises(RolloutError, match="percentage"):
            parse_fraction(text, "--canary")
    else:
        assert parse_fraction(text, "--canary") == pytest.approx(value)


@pytest.mark.parametrize(("text", "seconds"), [("10m", 600.0), ("30s", 30.0), ("1h", 3600.0), ("2.5", 2.5),
                                               ("500ms", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "--wave-timeout") == pytest.approx(seconds)


def test_selection() -> None:
    assert parse_selection("site=lab, tier=canary") == {"site": "lab", "tier": "canary"}
    assert parse_selection("") == {}
    with pytest.raises(RolloutError, match="TAG=VALUE"):
        parse_selection("site")


@pytest.mark.parametrize(("changes", "message"), [
    ({"canary": 0.0}, "--canary must be above 0"),
    ({"canary": 1.5}, "--canary must be above 0 and at most 1"),
    ({"max_failure_rate": -0.01}, "--max-failure-rate must be at least 0"),
    ({"max_failure_rate": 1.01}, "--max-failure-rate"),
    ({"max_drift": 2.0}, "--max-drift"),
    ({"waves": (0.5, 0.25, 1.0)}, "--waves must be increasing"),
    ({"waves": (0.25, 0.5)}, "ending at 100%"),
    ({"waves": ()}, "--waves"),
    ({"min_devices": 0}, "--min-devices"),
    ({"max_p99_regression": 1.0}, "--max-p99-regression"),
    ({"wave_timeout_s": 0.0}, "--wave-timeout"),
    ({"targets": ()}, "--targets"),
    ({"targets": ("onnx", "onnx")}, "distinct"),
    ({"device_thresholds": {"nonsense": 1.0}}, "unknown health threshold"),
])
def test_bad_options_are_refused_with_the_option_named(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(RolloutError, match=message):
        options(**changes)


def test_options_round_trip_and_the_thresholds_sent_to_agents() -> None:
    opts = options(max_p99_regression=1.5, max_drift=0.2, probation_s=30.0, device_thresholds={"min_requests": 0})
    assert RolloutOptions.from_dict(opts.to_dict()) == opts
    assert opts.thresholds() == {"probation_s": 30.0, "p99_factor": 1.5, "max_drift": 0.2, "min_requests": 0}


@pytest.mark.parametrize(("n", "canary", "min_devices", "waves", "sizes"), [
    (100, 0.05, 3, (0.25, 0.5, 1.0), [5, 20, 25, 50]),
    (20, 0.05, 3, (0.25, 0.5, 1.0), [3, 2, 5, 10]),  # max(ceil(1), 3) = 3
    (4, 0.05, 3, (0.5, 1.0), [3, 0, 1]),  # a wave smaller than the canary is empty
    (2, 0.05, 3, (1.0,), [2, 0]),  # min_devices beyond the fleet: all of it
    (10, 0.34, 1, (0.5, 1.0), [4, 1, 5]),
    (6, 1.0, 1, (1.0,), [6, 0]),
])
def test_wave_sizes(n: int, canary: float, min_devices: int, waves: tuple[float, ...], sizes: list[int]) -> None:
    out = plan("ro-1", "digits", "2.0.0", fleet(n), options(canary=canary, min_devices=min_devices, waves=waves),
               AVAILABLE)
    assert [sum(1 for a in out if a.wave == w) for w in range(len(waves) + 1)] == sizes
    assert all(a.state == "pending" and a.previous == "1.0.0" for a in out)


def test_the_order_is_reproducible_per_rollout_and_differs_between_rollouts() -> None:
    devices = fleet(40)
    first = plan("ro-a", "digits", "2.0.0", devices, options(), AVAILABLE)
    assert first == plan("ro-a", "digits", "2.0.0", list(reversed(devices)), options(), AVAILABLE)
    other = plan("ro-b", "digits", "2.0.0", devices, options(), AVAILABLE)
    assert {a.device_id for a in first if a.wave == 0} != {a.device_id for a in other if a.wave == 0}
    assert [a.device_id for a in first] == order("ro-a", [d.device_id for d in devices])


def test_each_device_gets_the_first_target_it_can_run() -> None:
    devices = [*fleet(2, JETSON), DeviceFacts("pi-1", {"site": "lab"}, {"runtimes": {"litert": "1.2"}, "arch": "arm"}),
               DeviceFacts("new-1", {"site": "lab"}, None), DeviceFacts("cpu-1", {"site": "lab"}, CPU)]
    out = {a.device_id: a for a in plan("ro-1", "digits", "2.0.0", devices, options(min_devices=1), AVAILABLE)}
    assert out["dev-000"].target == "tensorrt-int8" and out["dev-001"].target == "tensorrt-int8"
    assert {out["pi-1"].state, out["new-1"].state} == {"incompatible"}
    assert "onnxruntime is not installed" in (out["pi-1"].reason or "")
    assert "never reported" in (out["new-1"].reason or "")
    assert out["cpu-1"].target == "onnx-int8"
    assert [a.device_id for a in out.values()][-2:] == order("ro-1", ["pi-1", "new-1"])  # incompatible: last


def test_choose_target_explains_every_refusal() -> None:
    assert choose_target(JETSON, ["tensorrt-int8", "onnx-int8"], AVAILABLE) == ("tensorrt-int8", "")
    target, why = choose_target(CPU, ["tflite-int8", "tensorrt-int8"], AVAILABLE)
    assert target is None and "tflite-int8: not published" in why and "tensorrt is not installed" in why


@pytest.mark.parametrize(("devices", "available", "changes", "message"), [
    (fleet(3), AVAILABLE, {"select": {"site": "mars"}}, "no enrolled device matches --select site=mars"),
    ([DeviceFacts("d1", {}, CPU, revoked=True)], AVAILABLE, {}, "no enrolled device matches"),
    (fleet(3), {"tflite-int8": ORT}, {}, "none of the targets"),
    (fleet(3, {"runtimes": {}, "arch": "x"}), AVAILABLE, {}, "none of the 3 selected devices can run"),
])
def test_plans_that_cannot_be_made(devices: list[DeviceFacts], available: dict[str, Any], changes: dict[str, Any],
                                   message: str) -> None:
    with pytest.raises(RolloutError, match=message):
        plan("ro-1", "digits", "2.0.0", devices, options(**changes), available)


def test_devices_already_on_the_version_count_as_committed_and_are_never_reverted() -> None:
    devices = [DeviceFacts("a", {}, CPU, {"digits": "2.0.0"}), DeviceFacts("b", {}, CPU, {})]
    out = {a.device_id: a for a in plan("ro-1", "digits", "2.0.0", devices, options(min_devices=1), AVAILABLE)}
    assert (out["a"].state, out["a"].previous) == ("committed", None)
    assert (out["b"].state, out["b"].previous) == ("pending", None)


# --- decide -------------------------------------------------------------------------------------------------

NOW = 1000.0


def view(state: str = "canary", wave: int = 0, started: float | None = NOW - 10, **changes: Any) -> RolloutView:
    return RolloutView("ro-1", state, wave, started, options(**{"waves": (0.5, 1.0), **changes}))


def rows(*spec: tuple[str, int, str] | tuple[str, int, str, str]) -> list[DeviceRow]:
    """(device, wave, state[, cause]); notified devices were notified 5 s ago. The reason text names no signal:
    the rules must read the cause, never the words."""
    out = []
    for item in spec:
        device, wave, state = item[:3]
        cause = item[3] if len(item) > 3 else None  # type: ignore[misc]
        notified = NOW - 5 if state not in ("pending", "incompatible") else None
        reason = "the agent said no" if cause else None
        out.append(DeviceRow(device, wave, state, reason, notified, "1.0.0", None, cause))
    return out


def check_invariant(rollout: RolloutView, devices: Sequence[DeviceRow], actions: list[Action]) -> None:
    """Nobody beyond the current wave is told anything, and only waiting devices are notified."""
    current = rollout.last_wave if rollout.state == "completed" else rollout.current_wave
    waves = {d.device_id: d.wave for d in devices}
    states = {d.device_id: d.state for d in devices}
    for action in actions:
        if isinstance(action, NotifyDevices):
            assert rollout.state not in ("aborted", "paused", "pending")
            assert all(waves[d] <= current for d in action.device_ids), (action, current)
            assert all(states[d] in ("pending", "timed_out") for d in action.device_ids)


ALL_ON = frozenset({"a", "b", "c", "d", "e", "f"})
CANARY_OK = (("a", 0, "committed"), ("b", 0, "committed"), ("c", 0, "committed"), ("d", 1, "pending"),
             ("e", 1, "pending"), ("f", 1, "pending"))
CASES: list[tuple[str, RolloutView, list[DeviceRow], frozenset[str], list[Action]]] = [
    ("pending-starts-the-canary", view("pending", started=None), rows(*CANARY_OK), ALL_ON, [AdvanceWave(0)]),
    ("canary-notifies-only-the-canary", view(), rows(("a", 0, "pending"), ("b", 0, "pending"), ("c", 0, "pending"),
                                                     ("d", 1, "pending")), ALL_ON, [NotifyDevices(("a", "b", "c"))]),
    ("offline-devices-wait", view(), rows(("a", 0, "pending"), ("b", 0, "pending"), ("c", 1, "pending")),
     frozenset({"a"}), [NotifyDevices(("a",))]),
    ("canary-in-flight-waits", view(), rows(("a", 0, "committed"), ("b", 0, "notified"), ("c", 0, "committed"),
                                            ("d", 1, "pending")), ALL_ON, []),
    ("canary-passes", view(), rows(*CANARY_OK), ALL_ON, [AdvanceWave(1)]),
    ("wave-notifies", view("wave-1", 1), rows(*CANARY_OK), ALL_ON, [NotifyDevices(("d", "e", "f"))]),
    ("last-wave-completes", view("wave-2", 2), rows(*CANARY_OK[:3], ("d", 1, "committed"), ("e", 2, "committed"),
                                                    ("f", 2, "incompatible")), ALL_ON, [CompleteRollout()]),
    ("one-of-three-fails-at-the-canary", view(min_devices=2), rows(("a", 0, "committed"), ("b", 0, "failed", "golden"),
                                                      ("c", 0, "notified"), ("d", 1, "pending")), ALL_ON,
     [AbortRollout("failure rate 50% (1 of 2 finished devices) exceeds 10%"), TellRollback("rollback", ("c",)),
      TellRollback("revert", ("a",))]),
    ("failure-rate-at-the-limit-passes", view(max_failure_rate=1 / 3), rows(
        ("a", 0, "committed"), ("b", 0, "failed"), ("c", 0, "committed"), ("d", 1, "pending")), ALL_ON,
     [AdvanceWave(1)]),
    ("too-few-finished-to-judge", view(), rows(("a", 0, "failed"), ("b", 0, "committed"), ("c", 0, "notified"),
                                               ("d", 1, "pending")), ALL_ON, []),
    ("small-wave-judged-at-its-size", view(min_devices=5), rows(("a", 0, "failed"), ("b", 0, "committed")),
     ALL_ON, [AbortRollout("failure rate 50% (1 of 2 finished devices) exceeds 10%"),
              TellRollback("revert", ("b",))]),
    ("incompatible-devices-do-not-count", view(), rows(("a", 0, "committed"), ("b", 0, "committed"),
                                                       ("c", 0, "committed"), ("x", 0, "incompatible"),
                                                       ("y", 0, "incompatible")), ALL_ON, [AdvanceWave(1)]),
    ("p99-rollbacks-abort-on-the-signal", view(max_p99_regression=1.5, max_failure_rate=1.0), rows(
        ("a", 0, "rolled_back", "latency"), ("b", 0, "rolled_back", "latency"),
        ("c", 0, "rolled_back", "latency"), ("d", 1, "pending")), ALL_ON,
     [AbortRollout("p99 regression past 1.5 on 3 devices (every device rolled back for it)")]),
    ("p99-without-a-limit-is-only-a-failure", view(max_failure_rate=1.0), rows(
        ("a", 0, "rolled_back", "latency"), ("b", 0, "committed"), ("c", 0, "committed")), ALL_ON,
     [AdvanceWave(1)]),
    ("paused-does-nothing", view("paused"), rows(("a", 0, "pending")), ALL_ON, []),
    ("completed-catches-up-late-devices", view("completed", 2), [
        DeviceRow("a", 0, "committed", None, NOW - 50), DeviceRow("b", 1, "timed_out", "no result", None),
        DeviceRow("c", 2, "timed_out", "no result", NOW - 50)], ALL_ON, [NotifyDevices(("b",))]),
    ("aborted-undoes-without-repeating", view("aborted"), [
        DeviceRow("a", 0, "committed", None, NOW, "1.0.0", "revert-sent"),
        DeviceRow("b", 0, "committed", None, NOW, "1.0.0", "rollback-sent"),  # the rollback came before the switch
        DeviceRow("c", 0, "notified", None, NOW, "1.0.0", "rollback-sent"),
        DeviceRow("d", 0, "notified", None, NOW, "1.0.0", None),
        DeviceRow("e", 0, "committed", None, NOW, None, None)], ALL_ON,
     [TellRollback("rollback", ("d",)), TellRollback("revert", ("b",))]),
    ("aborted-times-out-silent-devices-only", view("aborted", wave_timeout_s=60.0, started=NOW - 500), [
        DeviceRow("a", 0, "notified", None, NOW - 61, "1.0.0", "rollback-sent"),
        DeviceRow("b", 0, "notified", None, NOW - 59, "1.0.0", "rollback-sent"),
        DeviceRow("c", 1, "pending", None, None, "1.0.0")], ALL_ON, [TimeOut(("a",))]),
]


@pytest.mark.parametrize(("name", "rollout", "devices", "online", "expected"), CASES, ids=[c[0] for c in CASES])
def test_decide(name: str, rollout: RolloutView, devices: list[DeviceRow], online: frozenset[str],
                expected: list[Action]) -> None:
    actions = decide(rollout, devices, NOW, online)
    check_invariant(rollout, devices, actions)
    assert actions == expected


def test_timeouts_count_as_failures_and_offline_devices_time_out_from_the_wave_start() -> None:
    rollout = view(wave_timeout_s=60.0, started=NOW - 61, min_devices=2)
    devices = [DeviceRow("a", 0, "notified", None, NOW - 61, "1.0.0"), DeviceRow("b", 0, "pending", None, None),
               DeviceRow("c", 0, "notified", None, NOW - 30, "1.0.0"), DeviceRow("d", 1, "pending", None, None)]
    actions = decide(rollout, devices, NOW, frozenset({"a", "c", "d"}))
    check_invariant(rollout, devices, actions)
    assert actions[0] == TimeOut(("a", "b"))
    assert isinstance(actions[1], AbortRollout) and "2 of 2 finished" in actions[1].reason
    assert actions[2:] == [TellRollback("rollback", ("c",))]


@pytest.mark.parametrize(("values", "limit", "aborts"), [
    ([0.1, 0.1, 0.3], 0.2, False),  # the median, not the worst device
    ([0.1, 0.3, 0.3], 0.2, True),
    ([0.2, 0.2, 0.2], 0.2, False),  # at the limit is not past it
    ([0.9, 0.9], 0.2, False),  # two measured devices of a canary of three: not yet
])
def test_drift_signal_uses_the_median_of_the_measured_devices(values: list[float], limit: float,
                                                               aborts: bool) -> None:
    rollout = view(max_drift=limit)
    devices = [DeviceRow(d, 0, "notified", None, NOW - 1, "1.0.0") for d in "abc"]
    signals = {d: DeviceSignals(drift=v) for d, v in zip("abc", values, strict=False)}
    actions = decide(rollout, devices, NOW, ALL_ON, signals)
    check_invariant(rollout, devices, actions)
    assert any(isinstance(a, AbortRollout) and a.reason.startswith("drift past") for a in actions) == aborts


def test_measured_p99_ratio_aborts_before_any_device_rolls_back() -> None:
    rollout = view(max_p99_regression=1.5)
    devices = [DeviceRow(d, 0, "committed", None, NOW - 1, "1.0.0") for d in "abc"]
    signals = {d: DeviceSignals(p99_ratio=2.0) for d in "abc"}
    actions = decide(rollout, devices, NOW, ALL_ON, signals)
    assert actions[0] == AbortRollout("p99 regression past 1.5 on 3 devices (median 2)")
    assert actions[1:] == [TellRollback("revert", ("a", "b", "c"))]


def test_no_device_beyond_the_canary_is_ever_notified_while_it_runs() -> None:
    """Every reachable canary situation (states of three canary devices, online or not)."""
    states = ("pending", "notifying", "notified", "committed", "rolled_back", "failed", "incompatible", "timed_out")
    rollout = view()
    for i in range(len(states) ** 3):
        canary = [states[i // len(states) ** k % len(states)] for k in range(3)]
        devices = [DeviceRow(d, 0, s, None, None if s in ("pending", "incompatible") else NOW - 1, "1.0.0")
                   for d, s in zip("abc", canary, strict=True)]
        devices += [DeviceRow(d, 1, "pending") for d in "def"]
        actions = decide(rollout, devices, NOW, ALL_ON)
        check_invariant(rollout, devices, actions)
        if any(isinstance(a, AdvanceWave) for a in actions):
            assert all(s in ("committed", "incompatible") for s in canary), canary


@pytest.mark.parametrize(("cause", "reason", "aborts_on"), [
    ("latency", "too slow on this device", "p99 regression"),
    ("error_rate", "requests failed", "error rate"),
    ("drift", "inputs moved", "drift"),
    ("confidence", "p99 latency, error rate and drift all mentioned", None),  # words alone count for nothing
    (None, "p99 latency 40 ms exceeds 3 ms", None),
])
def test_signals_read_the_cause_never_the_reason(cause: str | None, reason: str, aborts_on: str | None) -> None:
    rollout = view(max_p99_regression=1.5, max_error_rate=0.1, max_drift=0.5, max_failure_rate=1.0)
    devices = [DeviceRow(d, 0, "rolled_back", reason, NOW - 1, "1.0.0", None, cause) for d in "abc"]
    aborts = [a.reason for a in decide(rollout, devices, NOW, ALL_ON, {}) if isinstance(a, AbortRollout)]
    assert [r.split(" past ")[0] for r in aborts] == ([aborts_on] if aborts_on else [])
