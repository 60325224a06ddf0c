"""The request path kept lean and still exact: every request counted once (health numbers and telemetry,
rows and errors, from many threads), p99 over the newest latencies, a model released only once its
requests are done, inputs checked the same way on the fast path and the general one, and onnxruntime's
compiled ``run`` giving what ``InferenceSession.run`` gives (including its fallback)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgeml.edge_agent.agent import Agent
from edgeml.edge_agent.config import load_config
from edgeml.edge_agent.runtimes.onnxruntime import OnnxRuntime
from edgeml.edge_agent.serving import LoadedModel, ModelHost, ServingStats, load_model
from edgeml.edge_agent.telemetry import RELATIVE_ERROR, Aggregator
from edgeml.edge_agent.update.slots import Slots
from edgeml.errors import RuntimeBackendError
from tests.edge_agent.conftest import DigitsBundles
from tests.edge_agent.harness import write_agent_config


def _model(digits_bundles: DigitsBundles, root: Path, version: str = "1.0.0") -> LoadedModel:
    slots = Slots(root)
    info = slots.stage(digits_bundles.paths[version], "a" if version == "1.0.0" else "b")
    return load_model(slots.path(info.slot), info.slot)


# --- ServingStats ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flush_every", [None, 1, 37, 5000])
def test_stats_keep_the_newest_latencies_and_hand_each_one_to_the_sink_once(flush_every: int | None) -> None:
    rng = np.random.default_rng(0)
    latencies = rng.lognormal(np.log(2e-4), 0.5, 3000)
    rows = rng.integers(1, 6, 3000)
    failed = rng.random(3000) < 0.05
    sink = Aggregator()
    stats = ServingStats(window=64, sink=sink)
    for i, (latency, n, bad) in enumerate(zip(latencies, rows, failed, strict=True)):
        stats.record(float(latency), not bad, None if bad else np.eye(3)[None, i % 3], int(n))
        if flush_every and not (i + 1) % flush_every:
            stats.flush()
    stats.flush()
    snap = stats.snapshot()
    ok = ~failed
    assert (snap.requests, snap.errors) == (3000, int(failed.sum()))
    assert snap.p99_ms == pytest.approx(1000 * np.percentile(latencies[ok][-64:], 99))
    window = sink.snapshot_and_reset()
    assert (window["requests"], window["errors"]) == (int(rows.sum()), int(rows[failed].sum()))
    every_row = np.repeat(latencies, rows)  # a request of n rows counts n times in the percentiles
    assert window["latency_p50_ms"] == pytest.approx(1000 * np.percentile(every_row, 50), rel=RELATIVE_ERROR)
    assert window["latency_mean_ms"] == pytest.approx(1000 * every_row.mean(), abs=1e-4)  # rounded to 0.1 us
    stats.flush()
    assert sink.snapshot_and_reset()["requests"] == 0  # nothing is handed on twice


def test_stats_without_a_sink_still_judge_health() -> None:
    stats = ServingStats(window=8)
    for i in range(20):
        stats.record(0.001 * (i + 1), True, np.array([[0.9, 0.1]]))
    stats.flush()
    snap = stats.snapshot()
    assert (snap.requests, snap.errors) == (20, 0)
    assert snap.p99_ms == pytest.approx(1000 * np.percentile(0.001 * np.arange(13, 21), 99))
    assert snap.confidence == pytest.approx(0.9)


@pytest.mark.parametrize("window", [0, 6, 100])
def test_the_window_must_be_a_power_of_two(window: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        ServingStats(window=window)


# --- ModelHost ---------------------------------------------------------------------------------------------

def test_every_request_from_many_threads_is_counted_once(digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []
    host = ModelHost([lambda version, inputs, outputs, latency, ok: seen.append((version, len(inputs["input"])))],
                     sink=Aggregator())
    host.swap(_model(digits_bundles, tmp_path))
    x = digits_bundles.traffic

    def client(k: int) -> None:
        for i in range(400):
            n = 1 + (i + k) % 7
            host.predict({"input": x[i % 50:][:n]})

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = sum(1 + (i + k) % 7 for k in range(4) for i in range(400))
    with pytest.raises(RuntimeBackendError):
        host.predict({"input": x[:3].astype(np.float64)})  # a model error: counted, with its rows
    host.flush()
    assert host.stats("1.0.0").requests == 1601 and host.stats("1.0.0").errors == 1
    assert len(seen) == 1601 and sum(n for _, n in seen) == rows + 3
    window = host.sink.snapshot_and_reset()  # type: ignore[union-attr]
    assert (window["requests"], window["errors"]) == (rows + 3, 3)
    host.close()


class _Gate:
    """Wraps what the host runs a model with, so that a request can be held inside it."""

    def __init__(self, model: LoadedModel) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.unloaded = False
        inner, runtime = model.run, model.runtime
        original_unload = runtime.unload

        def run(inputs: Any) -> dict[str, np.ndarray]:
            self.entered.set()
            assert self.release.wait(10)
            assert not self.unloaded, "ran on an unloaded runtime"
            return inner(inputs)  # type: ignore[misc]

        def unload() -> None:
            self.unloaded = True
            original_unload()

        model.run = run
        runtime.unload = unload  # type: ignore[method-assign]


def test_a_replaced_model_finishes_its_requests_before_it_is_unloaded(digits_bundles: DigitsBundles,
                                                                      tmp_path: Path) -> None:
    host = ModelHost()
    old, new = _model(digits_bundles, tmp_path), _model(digits_bundles, tmp_path, "2.0.0")
    host.swap(old)
    gate = _Gate(old)
    x = digits_bundles.traffic[:2]
    ran: list[str] = []
    held = threading.Thread(target=lambda: ran.append(host.serve({"input": x})[0].version))
    held.start()
    assert gate.entered.wait(10)
    swapper = threading.Thread(target=host.swap, args=(new,), kwargs={"keep_previous": False})
    swapper.start()
    time.sleep(0.2)
    assert swapper.is_alive() and not gate.unloaded  # waits for the request still running on 1.0.0
    assert host.active is new and host.serve({"input": x})[0].version == "2.0.0"  # later requests: the new one
    gate.release.set()
    held.join(10)
    swapper.join(10)
    assert ran == ["1.0.0"] and gate.unloaded and old.users == 0 and old.retired
    host.close()


def test_a_request_that_takes_a_model_being_released_takes_the_new_one(digits_bundles: DigitsBundles,
                                                                       tmp_path: Path) -> None:
    host = ModelHost()
    old, new = _model(digits_bundles, tmp_path), _model(digits_bundles, tmp_path, "2.0.0")
    host.swap(old)
    old.retired = True  # release() has begun: what a request sees if it took `old` a moment before the swap
    host._active = old
    flip = threading.Timer(0.05, lambda: setattr(host, "_active", new))
    flip.start()
    model, _ = host.serve({"input": digits_bundles.traffic[:1]})
    assert model is new and old.users == 0
    host.close()


# --- Agent.predict: the fast path and the general one check the same things --------------------------------

@pytest.fixture
def agent(digits_bundles: DigitsBundles, tmp_path: Path) -> Any:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_agent_config(tmp_path / "home", "cam-lean", port, b"{}", telemetry_interval_s=3600.0)
    slots = Slots(tmp_path / "home" / "state")
    slots.set_active(slots.stage(digits_bundles.paths["1.0.0"], "a"))
    agent = Agent(load_config(config), clock_check=lambda: True)
    agent.start()
    yield agent
    agent.stop()


def _reference(agent: Agent, x: np.ndarray) -> np.ndarray:
    model_file = agent.machine.slots.path("a") / agent.host.active.manifest.model["file"]  # type: ignore[union-attr]
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": np.ascontiguousarray(x, np.float32)})[0])


@pytest.mark.parametrize(("case", "make"), [
    ("batch, float32, contiguous (fast path)", lambda x: x[:5]),
    ("float64", lambda x: x[:5].astype(np.float64)),
    ("not contiguous", lambda x: np.asfortranarray(x[:5])),
    ("one sample without its batch axis", lambda x: x[0]),
    ("a dict", lambda x: {"input": x[:5]}),
    ("nested lists", lambda x: x[:5].tolist()),
    ("an empty batch", lambda x: x[:0]),
])
def test_inputs_are_accepted_the_same_on_every_path(agent: Agent, digits_bundles: DigitsBundles, case: str,
                                                    make: Any) -> None:
    x = digits_bundles.traffic
    inputs = make(x)
    result = agent.predict("digits", inputs, preprocessed=True)
    expected = _reference(agent, np.asarray(inputs["input"] if isinstance(inputs, dict) else inputs)
                          .reshape(-1, 1, 8, 8))
    assert result.version == "1.0.0" and result.outputs["output"].dtype == np.float32
    np.testing.assert_allclose(result.outputs["output"], expected, rtol=1e-6, atol=1e-6)
    assert result.top1 == [int(i) for i in expected.argmax(axis=1)] and len(result.confidence) == len(expected)


@pytest.mark.parametrize(("inputs", "message"), [
    (np.zeros((2, 1, 8, 7), np.float32), r"must have shape \['N', 1, 8, 8\]"),
    (np.zeros((2, 8, 8), np.float32), r"must have shape"),
    (np.zeros((2, 2, 1, 8, 8), np.float32), r"must have shape"),
    ({"image": np.zeros((1, 1, 8, 8), np.float32)}, r"takes inputs \['input'\]"),
])
def test_inputs_that_do_not_fit_are_the_callers_error_not_the_models(agent: Agent, inputs: Any, message: str) -> None:
    stats = agent.host.stats("1.0.0")
    before = (stats.requests, stats.errors)
    with pytest.raises(ValueError, match=message):
        agent.predict("digits", inputs, preprocessed=True)
    assert (stats.requests, stats.errors) == before


def test_telemetry_counts_the_rows_the_agent_served(agent: Agent, digits_bundles: DigitsBundles) -> None:
    x = digits_bundles.traffic
    agent.telemetry.aggregator.snapshot_and_reset()
    for i in range(3000):  # past the host's hand-over batch, and the last ones only at the report
        agent.predict("digits", x[i % 40:][:1 + i % 3], preprocessed=True)
    agent.telemetry.report()
    metrics = agent.telemetry.outbox.pending(limit=100)[-1].metrics
    assert metrics["requests"] == sum(1 + i % 3 for i in range(3000)) and metrics["errors"] == 0
    assert metrics["version"] == "1.0.0" and metrics["latency_p99_ms"] > 0


# --- onnxruntime's compiled run ----------------------------------------------------------------------------

def test_the_compiled_run_gives_what_session_run_gives_and_falls_back(digits_bundles: DigitsBundles,
                                                                       tmp_path: Path) -> None:
    model = _model(digits_bundles, tmp_path)
    runtime = model.runtime
    assert isinstance(runtime, OnnxRuntime)
    assert runtime._run is not runtime._session.run  # the compiled run is used where onnxruntime has it
    x = digits_bundles.traffic[:7]
    reference = runtime._session.run(None, {"input": x})[0]
    np.testing.assert_array_equal(runtime.infer({"input": x})["output"], reference)

    calls: list[int] = []

    def failing(*args: Any) -> Any:
        calls.append(1)
        raise runtime._ep_fail("the execution provider failed")

    np.testing.assert_array_equal(model.run({"input": x})["output"], reference)  # type: ignore[misc]
    with pytest.raises(RuntimeBackendError, match="inference failed"):  # failures translated on both paths
        model.run({"input": x.astype(np.float64)})  # type: ignore[misc]
    with pytest.raises(RuntimeBackendError, match="inference failed"):
        runtime.infer({"input": x.astype(np.float64)})

    runtime._run = failing  # an execution provider's failure: InferenceSession.run owns the fallback
    np.testing.assert_array_equal(runtime.infer({"input": x})["output"], reference)
    np.testing.assert_array_equal(runtime.runner()({"input": x})["output"], reference)
    runtime._run = runtime._session.run  # an onnxruntime without the compiled session: the public run
    np.testing.assert_array_equal(runtime.infer({"input": x})["output"], reference)
    assert calls == [1, 1]
    runtime.unload()
    with pytest.raises(RuntimeBackendError, match="before load"):
        runtime.infer({"input": x})


# --- the drift sample ------------------------------------------------------------------------------------

def test_the_host_calls_its_sampler_for_one_request_in_the_number_it_returns(digits_bundles: DigitsBundles,
                                                                              tmp_path: Path) -> None:
    calls: list[int] = []
    host = ModelHost()
    host.sampler = lambda version, inputs, outputs, latency: calls.append(len(inputs["input"])) or 3  # type: ignore
    host.swap(_model(digits_bundles, tmp_path))
    for i in range(10):
        host.predict({"input": digits_bundles.traffic[:i + 1]})
    assert calls == [1, 4, 7, 10]  # the first request, then every third
    host.close()


@pytest.mark.parametrize(("step_s", "rows", "every"), [  # steps of 2^-k seconds: exact in floating point
    (2.0 ** -7, 1, 1),  # 128 requests a second: every one
    (2.0 ** -17, 1, 263),  # 131,072 a second: one in ceil(131,072 / DRIFT_REQUESTS_PER_S)
    (2.0 ** -13, 32, 66),  # 8,192 batches of 32 a second: one in ceil(262,144 / DRIFT_ROWS_PER_S)
])
def test_drift_sees_every_request_while_they_are_few_and_a_sample_when_they_are_many(
        agent: Agent, digits_bundles: DigitsBundles, monkeypatch: pytest.MonkeyPatch, step_s: float, rows: int,
        every: int) -> None:
    from types import SimpleNamespace

    from edgeml.edge_agent import telemetry_loop

    clock = [1024.0]
    monkeypatch.setattr(telemetry_loop, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    agent.telemetry._rate_mark = clock[0]
    x = {"input": digits_bundles.traffic[:rows]}
    outputs = agent.host.active.runtime.infer(x)  # type: ignore[union-attr]
    intervals = []
    for _ in range(600):  # the host calls it again after as many requests as it returned
        interval = agent.telemetry.sample("1.0.0", x, outputs, 1e-4)
        clock[0] += step_s * interval
        intervals.append(interval)
    assert intervals[:255] == [1] * 255  # every request until the rate is known (256 requests)
    assert set(intervals[256:]) == {every}  # (the first estimate counts one step less)
