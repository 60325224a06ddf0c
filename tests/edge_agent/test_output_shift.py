"""The output shift: a model-quality signal for any model type (detectors, segmenters, regressors), on the
same statistics as input drift, and the probation that rolls a model back on it.

Unit tests drive the real :class:`DriftMonitor` and the pure health rules; the last test runs the whole loop
with real parts: a small text detector compiled by ``edgeml compile`` (ONNX Runtime INT8, real gate), published
in a signed registry, distributed over a real Mosquitto, served by a real agent, and a release whose export
scales every output by 0.1 (the compile gate passes it: it matches its own source) rolled back by the agent
on the output shift. The fleet's rollout logic is replaced by update commands (tests/edge_agent/harness.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeml.edge_agent.drift import DriftConfig, DriftMonitor, DriftWindow
from edgeml.edge_agent.update.health import Baseline, HealthSnapshot, Thresholds, compare_golden, judge
from edgeml.protocol import Cause
from edgeml.refstats import ReferenceStats, compute_reference_stats

H, W = 32, 96  # the detector's input size


def text_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """N x 3 x H x W float32 "scanned lines": a paper-grey background with noise and dark word strokes."""
    x = 0.8 + 0.05 * rng.standard_normal((n, 1, H, W))
    for i in range(n):
        for _ in range(int(rng.integers(2, 6))):
            top, left = int(rng.integers(4, H - 10)), int(rng.integers(0, W - 20))
            x[i, 0, top:top + int(rng.integers(4, 8)), left:left + int(rng.integers(8, 20))] -= 0.6
    tint = 1.0 + 0.05 * rng.standard_normal((n, 3, 1, 1))
    return np.clip(x * tint, 0.0, 1.0).astype(np.float32)


def detector_outputs(x: np.ndarray, scale: float = 1.0) -> dict[str, np.ndarray]:
    """A stand-in detector in numpy (unit tests): a probability map of dark strokes, and a box count."""
    dark = 1.0 - x.mean(axis=1, keepdims=True)
    prob = scale / (1.0 + np.exp(-12.0 * (dark - 0.45)))
    return {"prob": prob[:, :, ::2, ::2], "count": scale * prob.reshape(len(x), -1).mean(axis=1, keepdims=True)}


def _reference(seed: int, scale: float = 1.0, n: int = 400) -> ReferenceStats:
    x = text_images(np.random.default_rng(seed), n)
    return compute_reference_stats({"x": x}, detector_outputs(x, scale))


def _stream(monitor: DriftMonitor, rng: np.random.Generator, n: int, scale: float = 1.0,
            batch: int = 25) -> list[DriftWindow]:
    windows: list[DriftWindow] = []
    for _ in range(n // batch):
        x = text_images(rng, batch)
        outputs = detector_outputs(x, scale)
        windows += monitor.observe(x, None, outputs)  # no class scores: a detector
    return windows


# --- the monitor ---------------------------------------------------------------------------------------------

def test_a_detector_with_scaled_outputs_shifts_while_its_inputs_do_not_drift() -> None:
    ref = _reference(seed=1)
    monitor = DriftMonitor(ref)
    assert monitor.output_feature_names[:4] == ("prob.mean", "prob.std", "prob.min", "prob.max")
    clean = _stream(monitor, np.random.default_rng(2), 1000)
    assert clean and all(not w.output_flagged and not w.flagged for w in clean)
    assert max(w.output_score or 1.0 for w in clean) < 0.2  # noise: well under the 0.5 limit
    bad = _stream(DriftMonitor(ref), np.random.default_rng(3), 1000, scale=0.1)
    assert all(w.output_flagged and (w.output_score or 0.0) >= 0.8 for w in bad)
    assert all(not w.flagged and w.score < 0.2 for w in bad)  # the inputs are as before: no input drift
    top = bad[-1].output_metrics()
    assert top is not None and top["flagged"] and top["against"] == {"own": pytest.approx(bad[-1].output_score)}
    assert "prob.max" in top["drivers"] and json.loads(json.dumps(top)) == top


def test_a_release_whose_own_reference_is_scaled_is_caught_against_the_model_it_replaced() -> None:
    """The demo's broken export: its own reference statistics were computed on its own scaled outputs, so
    only the comparison with the replaced model's sketches shows the shift."""
    v1, v2 = _reference(seed=1), _reference(seed=4, scale=0.1)
    alone = _stream(DriftMonitor(v2), np.random.default_rng(5), 750, scale=0.1)
    assert all(not w.output_flagged for w in alone)
    windows = _stream(DriftMonitor(v2, baseline=v1), np.random.default_rng(5), 750, scale=0.1)
    last = windows[-1]
    against = dict(last.output_against)
    assert against["own"] < 0.2 < 0.8 <= against["previous"]
    assert last.output_flagged and last.output_score == pytest.approx(against["previous"])
    assert all(name.endswith("@previous") for name in last.output_drivers)


def test_output_shift_false_alarms_stay_rare_on_clean_streams() -> None:
    ref = _reference(seed=1, n=1000)
    config = DriftConfig(window=500, stride=250)
    flagged = 0
    trials = 60
    for t in range(trials):
        windows = _stream(DriftMonitor(ref, config), np.random.default_rng(100 + t), 500, batch=50)
        flagged += any(w.output_flagged for w in windows)
    assert flagged / trials <= 0.05  # alpha is 1% per window of 500 samples; binning makes the test conservative


def test_outputs_missing_or_of_another_shape_are_left_out_not_refused() -> None:
    monitor = DriftMonitor(_reference(seed=1), DriftConfig(window=100, stride=100))
    x = text_images(np.random.default_rng(6), 100)
    (window,) = monitor.observe(x)  # no outputs at all: inputs are still monitored
    assert window.output_score is None and window.output_metrics() is None
    wrong = {"prob": np.zeros((100, 1, 4, 4)), "count": np.zeros((100, 3))}  # count has 3 columns, not 1
    (window,) = monitor.observe(x, None, wrong)
    assert window.output_score is not None
    assert all(name.startswith("prob.") for name in window.output_drivers)  # count's features were left out


def test_a_version_1_reference_monitors_inputs_only() -> None:
    doc = json.loads(_reference(seed=1).to_json())
    doc["schema"] = "edgeml.refstats/1"
    old = ReferenceStats.from_dict(doc)
    monitor = DriftMonitor(old, DriftConfig(window=100, stride=100))
    assert monitor.output_feature_names == ()
    x = text_images(np.random.default_rng(7), 100)
    (window,) = monitor.observe(x, None, detector_outputs(x, 0.1))
    assert window.output_score is None and not window.output_flagged


def test_small_batches_with_outputs_give_the_same_window_as_one_batch() -> None:
    ref = _reference(seed=1)
    x = text_images(np.random.default_rng(8), 250)
    out = detector_outputs(x, 0.5)
    one = DriftMonitor(ref, DriftConfig(window=250, stride=250)).observe(x, None, out)
    small = DriftMonitor(ref, DriftConfig(window=250, stride=250))
    got: list[DriftWindow] = []
    for i in range(250):
        got += small.observe(x[i:i + 1], None, {k: v[i:i + 1] for k, v in out.items()})
    got += small.flush()
    assert len(one) == len(got) == 1
    assert got[0].output_score == pytest.approx(one[0].output_score)
    assert got[0].output_drivers == one[0].output_drivers


# --- the health rules ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("snapshot", "cause", "reason"),
    [
        (HealthSnapshot(requests=100, p99_ms=1.0, output_shift=0.9), Cause.OUTPUT_SHIFT,
         "output shift 0.900 exceeds 0.5"),
        (HealthSnapshot(requests=100, p99_ms=1.0, output_shift=0.3), None, None),
        (HealthSnapshot(requests=100, p99_ms=1.0, output_shift=None), None, None),
        (HealthSnapshot(requests=9, p99_ms=1.0, output_shift=0.9), None, None),  # too few requests to judge
        (HealthSnapshot(requests=100, p99_ms=1.0, drift=0.7, output_shift=0.9), Cause.DRIFT, "drift score 0.700"),
    ],
    ids=["shifted", "small-shift", "not-monitored", "too-few-requests", "input-drift-first"],
)
def test_judge_rolls_back_on_the_output_shift(snapshot: HealthSnapshot, cause: Cause | None,
                                              reason: str | None) -> None:
    got = judge(snapshot, Baseline(p99_ms=2.0, confidence=None), Thresholds(min_requests=10))
    assert (got is None) if cause is None else (got is not None and got.cause is cause and reason in got.reason)


def test_the_output_shift_limit_comes_from_the_rollout() -> None:
    limits = Thresholds.from_dict({"max_output_shift": 0.95})
    assert judge(HealthSnapshot(requests=100, p99_ms=1.0, output_shift=0.9), Baseline(2.0), limits) is None
    assert Cause.OUTPUT_SHIFT.value == "output_shift"


def test_golden_vectors_are_judged_per_output_on_their_own_tolerance() -> None:
    rng = np.random.default_rng(9)
    boxes, prob = rng.normal(0, 100, (4, 4)), rng.uniform(0, 1e-2, (4, 1, 8, 8))
    golden = {"atol": 1.0, "rtol": 0.0, "top1": False,
              "outputs": {"boxes": {"atol": 0.1, "rtol": 0.0, "top1": False},
                          "prob": {"atol": 1e-5, "rtol": 0.0, "top1": False}}}
    expected = {"boxes": boxes, "prob": prob}
    assert compare_golden({"boxes": boxes + 0.05, "prob": prob + 5e-6}, expected, golden, "fp32") is None
    why = compare_golden({"boxes": boxes, "prob": prob * 1.1}, expected, golden, "fp32")
    assert why is not None and why.startswith("output prob: max |error|") and "atol 1e-05" in why
    # an older bundle without per-output tolerances: its one atol (1.0) covers both outputs
    assert compare_golden({"boxes": boxes + 0.5, "prob": prob * 1.1}, expected,
                          {"atol": 1.0, "rtol": 0.0, "top1": False}, "fp32") is None


# --- the whole loop ---------------------------------------------------------------------------------------------

def _detector_onnx(path: Path, scale: float | None = None) -> Path:
    """The detector as ONNX, declared like a Paddle2ONNX export ([-1, 3, '?', '?']); ``scale`` multiplies every
    output (the broken release)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1 = np.zeros((4, 3, 3, 3), np.float32)
    w1[:, :, 1, 1] = -1.0 / 3.0  # darkness of the centre pixel, four times
    w1[1:, :, 0, 1] = w1[1:, :, 2, 1] = -1.0 / 6.0
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.full(4, 1.0, np.float32), "b1"),
             numpy_helper.from_array(np.full((1, 4, 1, 1), 3.0, np.float32), "w2"),
             numpy_helper.from_array(np.array([-5.4], np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"]),
             helper.make_node("Sigmoid", ["c2"], ["prob" if scale is None else "raw"])]
    if scale is not None:
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), "bug"))
        nodes.append(helper.make_node("Mul", ["raw", "bug"], ["prob"]))
    graph = helper.make_graph(nodes, "textdet", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                [-1, 3, "?", "?"])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [-1, 1, "?", "?"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def detector_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """textdet 1.0.0 and its broken 2.0.0, compiled (onnx-int8, gated on --max-error) and published; a broker and
    the distribution service serving them."""
    from edgeml.compile import CompileOptions, compile_model
    from edgeml.fleet.registry.repository import init_registry
    from tests.edge_agent.harness import Operator, distribution, plain_broker

    work = tmp_path_factory.mktemp("textdet")
    rng = np.random.default_rng(10)
    np.savez(work / "calib.npz", x=text_images(rng, 64))
    np.savez(work / "val.npz", x=text_images(rng, 96))
    registry = init_registry(work / "reg")
    reports = {}
    for version, scale in (("1.0.0", None), ("2.0.0", 0.1)):
        model = _detector_onnx(work / f"textdet-{version}.onnx", scale)
        options = CompileOptions(targets=("onnx-int8",), name="textdet", version=version, max_error=0.05,
                                 input_shape={"x": (1, 3, H, W)}, benchmark=False)
        report = compile_model(str(model), options, work / "dist", calib=work / "calib.npz", val=work / "val.npz")
        assert report.ok, [(o.target, o.status, o.gate and o.gate.reason, o.error) for o in report.outcomes]
        reports[version] = report
        for outcome in report.outcomes:
            assert outcome.bundle is not None
            registry.publish(outcome.bundle)
    with plain_broker() as (port, _), distribution(registry, port):
        operator = Operator(port)
        try:
            yield {"port": port, "registry": registry, "operator": operator, "reports": reports}
        finally:
            operator.close()


class _Camera:
    """An application sending one new image at a time to the agent's Python API, from a background thread
    (failures count once a model served: before the first update there is nothing to serve)."""

    def __init__(self, agent: Any, seed: int) -> None:
        self.agent, self.rng = agent, np.random.default_rng(seed)
        self.stop, self.failures, self.served = threading.Event(), 0, 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.agent.predict("textdet", text_images(self.rng, 1), preprocessed=True)
                self.served += 1
            except Exception:
                self.failures += self.served > 0
            time.sleep(0.001)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def test_a_detector_release_that_scales_its_outputs_is_rolled_back_by_the_output_shift(
        detector_fleet: dict[str, Any], tmp_path: Path) -> None:
    from edgeml.edge_agent.agent import Agent
    from edgeml.edge_agent.config import load_config
    from tests.edge_agent.harness import write_agent_config

    operator, registry = detector_fleet["operator"], detector_fleet["registry"]
    for report in detector_fleet["reports"].values():  # what the compile step recorded for a non-classifier
        (outcome,) = report.outcomes
        assert outcome.manifest.inputs[0].shape == (1, 3, H, W) and outcome.manifest.refstats is not None
    root = (registry.metadata_dir / "1.root.json").read_bytes()
    agent = Agent(load_config(write_agent_config(tmp_path / "cam", "cam-textdet", detector_fleet["port"], root)))
    agent.start()
    limits = {"probation_s": 4.0, "min_requests": 50, "max_probation_s": 30.0, "p99_factor": 5.0,
              "p99_slack_ms": 20.0}

    def update(version: str) -> dict[str, Any]:
        cid = operator.send("cam-textdet", "update", model="textdet", version=version, target="onnx-int8",
                            thresholds=limits)
        return operator.update_end("cam-textdet", cid, timeout=120)

    camera = None
    try:
        operator.wait_for(lambda s: s.states.get("cam-textdet", {}).get("status") in ("idle", "serving"), 20)
        camera = _Camera(agent, seed=11)
        first = update("1.0.0")  # its own reference only: live images like the validation data, no shift
        assert first["state"] == "committed", first
        broken = update("2.0.0")
        assert broken["state"] == "rolled_back" and broken["cause"] == "output_shift", broken
        assert broken["reason"].startswith("probation: output shift ") and "exceeds 0.5" in broken["reason"]
        shift = agent.telemetry.output_shift_score("2.0.0")
        assert shift is not None and shift > 0.8
        assert agent.telemetry.output_shift_score("1.0.0") == 0.0  # 1.0.0 against its own sketches: no shift
        assert agent.status()["version"] == "1.0.0"
        reports = operator.wait_for(lambda s: [t.metrics for t in s.telemetry.get("cam-textdet", {}).values()
                                               if t.metrics.get("version") == "1.0.0"
                                               and t.metrics.get("output_drift")], 20)
        latest = reports[-1]["output_drift"]
        assert latest["flagged"] is False and 0.0 <= latest["score"] < 0.3 and "own" in latest["against"]
        assert camera.failures == 0 and camera.served > 500
    finally:
        if camera is not None:
            camera.close()
        agent.stop()
