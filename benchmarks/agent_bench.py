"""Agent benchmark: what serving through the agent costs against the bare runtime, measured in one run.

Model: the digits CNN (1 x 8 x 8 input, 10 classes), trained briefly and compiled to ``onnx`` and ``tflite``
bundles with reference statistics, installed in an agent's slot. The agent runs without a broker (it keeps
retrying in the background), as a device does while offline.

- in-process: ``Agent.predict`` (validation, telemetry, drift) against onnxruntime's own ``session.run`` on
  the same model file, batch 1, one thread (goal <= 1.05x); ``Runtime.infer`` is shown between the two;
- local HTTP: ``POST /v1/models/digits:predict`` on a kept-alive connection, p50 against the in-process p50
  (goal <= +1 ms);
- accounting: throughput of ``Agent.predict`` with and without the telemetry and drift observers (goal <= 3%);
- memory: RSS of a process running the agent against a bare process that imports numpy, the same runtime and
  paho and runs the same model (goal <= 20 MiB above), for onnxruntime and LiteRT;
- rollback: from the failing check (a rollback decision during probation) to the old model serving (goal
  <= 1 s);
- drift: samples to flag a 0.5-sigma shift and false-positive rate against scipy's KS (benchmarks/drift_bench.py).

Usage:  python benchmarks/agent_bench.py [--calls 3000] [--out benchmarks/results-agent.md]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.drift_bench, tests.edge_agent

GOALS = {"in_process": 1.05, "http_ms": 1.0, "accounting": 0.03, "rss_mib": 20.0, "rollback_s": 1.0}

AGENT_SCRIPT = """
import json, sys, time, numpy as np
from pathlib import Path
from edgeml.edge_agent.agent import Agent
from edgeml.edge_agent.config import load_config
agent = Agent(load_config(Path(sys.argv[1])), clock_check=lambda: True)
agent.start()
x = np.load(sys.argv[2])
for i in range(2000):
    agent.predict("digits", x[i % len(x)][None], preprocessed=True)
agent.telemetry.report()
rss = [l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]
print(json.dumps({"rss_kib": int(rss), "version": agent.host.active.version}))
agent.stop()
"""

BARE_SCRIPT = """
import json, sys, numpy as np
import paho.mqtt.client
runtime, model = sys.argv[1], sys.argv[2]
x = np.load(sys.argv[3])
if runtime == "onnxruntime":
    import onnxruntime as ort
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
    s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    run = lambda b: s.run(None, {"input": b})
else:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=model, num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    def run(b):
        it.set_tensor(inp["index"], b.transpose(0, 2, 3, 1) if len(inp["shape"]) == 4 and inp["shape"][-1] == 1 else b)
        it.invoke()
        return it.get_tensor(out["index"])
for i in range(2000):
    run(x[i % len(x)][None])
rss = [l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]
print(json.dumps({"rss_kib": int(rss)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_bundles(work: Path) -> tuple[dict[str, Path], Path, np.ndarray]:
    """Train and compile digits 1.0.0 (onnx, tflite) and 2.0.0 (onnx); returns bundles, v2, inputs."""
    from edgeml.compile import CompileOptions, compile_model
    from edgeml.train.digits import digits_arrays, export_onnx, fit
    from edgeml.train.models import small_cnn

    d = digits_arrays(size=8, channels=1, seed=0)
    model = small_cnn()
    fit(model, d["x_train"], d["y_train"], epochs=8, seed=0)
    export_onnx(model.eval(), d["x_val"][:1], str(work / "digits.onnx"))
    np.savez(work / "calib.npz", input=d["x_train"][:200])
    np.savez(work / "val.npz", input=d["x_val"], labels=d["y_val"])
    bundles: dict[str, Path] = {}
    for version, targets in (("1.0.0", ("onnx", "tflite")), ("2.0.0", ("onnx",))):
        report = compile_model(str(work / "digits.onnx"), CompileOptions(targets=targets, name="digits",
                                                                          version=version, benchmark=False),
                               work / "bundles", calib=work / "calib.npz", val=work / "val.npz")
        for outcome in report.outcomes:
            assert outcome.bundle is not None, (outcome.target, outcome.status)
            bundles[f"{version}/{outcome.target}"] = outcome.bundle
    return bundles, bundles["2.0.0/onnx"], d["x_val"].astype(np.float32)


def agent_home(work: Path, name: str, bundle: Path) -> Path:
    """An agent.toml for an offline agent whose slot ``a`` holds ``bundle``; returns the TOML path."""
    from edgeml.edge_agent.update.slots import Slots
    from tests.edge_agent.harness import write_agent_config

    config = write_agent_config(work / name, name, _free_port(), b"{}", telemetry_interval_s=3600.0)
    slots = Slots(work / name / "state")
    slots.set_active(slots.stage(bundle, "a"))
    return config


def _timed(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """(p50 seconds per call, calls per second) over ``calls`` calls."""
    samples = np.empty(calls)
    start = time.perf_counter()
    for i in range(calls):
        t = time.perf_counter()
        fn()
        samples[i] = time.perf_counter() - t
    total = time.perf_counter() - start
    return float(np.median(samples)), calls / total


def in_process(config: Path, x: np.ndarray, calls: int) -> dict[str, Any]:
    """Agent.predict against session.run and Runtime.infer, interleaved rounds; and the accounting cost."""
    import onnxruntime as ort

    from edgeml.edge_agent.agent import Agent
    from edgeml.edge_agent.config import load_config

    agent = Agent(load_config(config), clock_check=lambda: True)
    agent.start()
    assert agent.host.active is not None
    model_file = agent.machine.slots.path("a") / agent.host.active.manifest.model["file"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
    runtime = agent.host.active.runtime
    batch, batch32 = x[:1], np.ascontiguousarray(x[:32])
    observers = list(agent.host.observers)

    def bare_off() -> None:
        agent.host.observers[:] = []

    def bare_on() -> None:
        agent.host.observers[:] = observers

    cases: dict[str, tuple[Callable[[], Any], Callable[[], None]]] = {
        "session.run": (lambda: session.run(None, {"input": batch}), bare_on),
        "Runtime.infer": (lambda: runtime.infer({"input": batch}), bare_on),
        "Agent.predict, no accounting": (lambda: agent.predict("digits", batch, preprocessed=True), bare_off),
        "Agent.predict": (lambda: agent.predict("digits", batch, preprocessed=True), bare_on),
        "session.run, batch 32": (lambda: session.run(None, {"input": batch32}), bare_on),
        "Agent.predict, batch 32": (lambda: agent.predict("digits", batch32, preprocessed=True), bare_on),
    }
    rounds: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(5):  # interleaved, so that a noisy moment hits every case
        for name, (fn, setup) in cases.items():
            setup()
            rounds[name].append(_timed(fn, calls // 5))
    bare_on()
    out = {name: {"p50_us": 1e6 * statistics.median(r[0] for r in rs),
                  "rate": statistics.median(r[1] for r in rs)} for name, rs in rounds.items()}
    out["http"] = over_http(agent, batch, calls // 3)
    out["rollback"] = rollback_time(agent)
    agent.stop()
    return out


def over_http(agent: Any, batch: np.ndarray, calls: int) -> dict[str, float]:
    """p50 of the local HTTP API (JSON and raw bytes) on one kept-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.api.port, timeout=10)
    body = json.dumps({"inputs": batch.tolist(), "preprocessed": True}).encode()
    raw = batch.tobytes()
    raw_headers = {"Content-Type": "application/octet-stream", "X-Edgeml-Shape": "1,1,8,8",
                   "X-Edgeml-Dtype": "float32", "X-Edgeml-Preprocessed": "true"}

    def post(data: bytes, headers: dict[str, str]) -> None:
        conn.request("POST", "/v1/models/digits:predict", body=data, headers=headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status

    json_p50, _ = _timed(lambda: post(body, {"Content-Type": "application/json"}), calls)
    raw_p50, _ = _timed(lambda: post(raw, raw_headers), calls)
    conn.close()
    return {"json_p50_us": json_p50 * 1e6, "raw_p50_us": raw_p50 * 1e6}


def rollback_time(agent: Any) -> dict[str, float]:
    """Put 2.0.0 on probation, decide to roll back, and time until 1.0.0 serves again (5 repetitions)."""
    from edgeml.edge_agent.tuf_client import VerifiedBundle
    from edgeml.edge_agent.update.health import Thresholds
    from edgeml.edge_agent.update.store import UpdateRequest

    v2: Path = agent.bench_v2
    times = []
    for i in range(5):
        copy = agent.state_dir / f"v2-{i}.edgeml"
        shutil.copy(v2, copy)
        from edgeml.bundle import sha256_file

        digest = sha256_file(copy)
        agent.machine.fetch = lambda n, v, t, p=copy, h=digest: VerifiedBundle(p, n, v, t, h)
        request = UpdateRequest("digits", "2.0.0", "onnx", thresholds=Thresholds(probation_s=600, p99_slack_ms=50),
                                id=f"bench-{i}")
        worker = threading.Thread(target=agent.machine.start, args=(request,))
        worker.start()
        while (agent.host.active is None or agent.host.active.version != "2.0.0"
               or agent.machine.store.load().state != "probation"):
            time.sleep(0.005)
        start = time.perf_counter()
        agent.machine.request_rollback("benchmark")
        while agent.host.active.version != "1.0.0":
            time.sleep(0.0002)
        times.append(time.perf_counter() - start)
        worker.join()
    return {"median_ms": 1e3 * statistics.median(times), "max_ms": 1e3 * max(times)}


def rss(config: Path, runtime: str, model: Path, inputs: Path) -> dict[str, float]:
    """RSS (MiB) of the agent process and of the bare process, each measured after 2,000 predictions."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    agent = subprocess.run([sys.executable, "-c", AGENT_SCRIPT, str(config), str(inputs)], capture_output=True,
                           text=True, timeout=300, env=env, check=True)
    bare = subprocess.run([sys.executable, "-c", BARE_SCRIPT, runtime, str(model), str(inputs)],
                          capture_output=True, text=True, timeout=300, env=env, check=True)
    a, b = json.loads(agent.stdout.strip().splitlines()[-1]), json.loads(bare.stdout.strip().splitlines()[-1])
    return {"agent_mib": a["rss_kib"] / 1024, "bare_mib": b["rss_kib"] / 1024}


def run(calls: int, drift_trials: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="edgeml-agent-bench-"))
    try:
        bundles, v2, x = build_bundles(work)
        np.save(work / "inputs.npy", x)
        out: dict[str, Any] = {}
        config = agent_home(work, "bench-ort", bundles["1.0.0/onnx"])
        from edgeml.edge_agent import agent as agent_module

        original = agent_module.Agent.__init__

        def init(self: Any, *a: Any, **k: Any) -> None:
            original(self, *a, **k)
            self.bench_v2 = v2

        agent_module.Agent.__init__ = init  # type: ignore[method-assign]
        out["serving"] = in_process(config, x, calls)
        agent_module.Agent.__init__ = original  # type: ignore[method-assign]
        out["rss"] = {}
        for runtime, key, member in (("onnxruntime", "1.0.0/onnx", "model.onnx"),
                                     ("litert", "1.0.0/tflite", "model.tflite")):
            home = agent_home(work, f"rss-{runtime}", bundles[key])
            model = home.parent / "state" / "slots" / "a" / member
            out["rss"][runtime] = rss(home, runtime, model, work / "inputs.npy")
        from benchmarks import drift_bench

        out["drift"] = drift_bench.detection(drift_trials, 0, drift_bench.DriftConfig())
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(r: dict[str, Any]) -> str:
    s = r["serving"]
    base = s["session.run"]
    lines = [f"Host: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, digits CNN "
             "(1x8x8, 10 classes), batch 1, one thread.", "",
             "| path | p50 us | calls/s | vs session.run at the same batch (throughput) | goal |",
             "|---|---|---|---|---|"]
    for name in ("session.run", "Runtime.infer", "Agent.predict, no accounting", "Agent.predict",
                 "session.run, batch 32", "Agent.predict, batch 32"):
        reference = s["session.run, batch 32"] if "batch 32" in name else base
        ratio = reference["rate"] / s[name]["rate"]
        goal = f"<= {GOALS['in_process']}x: {'met' if ratio <= GOALS['in_process'] else 'MISSED'}" \
            if name.startswith("Agent.predict") and "no accounting" not in name else ""
        lines.append(f"| {name} | {s[name]['p50_us']:.1f} | {s[name]['rate']:,.0f} | {ratio:.2f}x | {goal} |")
    lost = 1 - s["Agent.predict"]["rate"] / s["Agent.predict, no accounting"]["rate"]
    http_extra = (s["http"]["json_p50_us"] - s["Agent.predict"]["p50_us"]) / 1000
    raw_extra = (s["http"]["raw_p50_us"] - s["Agent.predict"]["p50_us"]) / 1000
    rb = s["rollback"]
    lines += ["", "| measure | value | goal |", "|---|---|---|",
              f"| throughput lost to telemetry + drift accounting | {100 * lost:.1f}% | <= 3%: "
              f"{'met' if lost <= GOALS['accounting'] else 'MISSED'} |",
              f"| local HTTP p50, JSON (over in-process) | +{http_extra:.2f} ms | <= +1 ms: "
              f"{'met' if http_extra <= GOALS['http_ms'] else 'MISSED'} |",
              f"| local HTTP p50, raw bytes (over in-process) | +{raw_extra:.2f} ms | <= +1 ms: "
              f"{'met' if raw_extra <= GOALS['http_ms'] else 'MISSED'} |",
              f"| rollback: decision to old model serving | {rb['median_ms']:.1f} ms (max {rb['max_ms']:.1f}) | "
              f"<= 1 s: {'met' if rb['max_ms'] <= 1000 else 'MISSED'} |"]
    for runtime, m in r["rss"].items():
        extra = m["agent_mib"] - m["bare_mib"]
        lines.append(f"| RSS with {runtime}: agent {m['agent_mib']:.0f} MiB vs bare {m['bare_mib']:.0f} MiB | "
                     f"+{extra:.1f} MiB | <= +20 MiB: {'met' if extra <= GOALS['rss_mib'] else 'MISSED'} |")
    d = r["drift"]
    lines.append(f"| drift, samples to flag 0.5 sigma (median after onset): edgeml / scipy KS | "
                 f"{d['ours_onset']:.0f} / {d['scipy_onset']:.0f} | <= 500: "
                 f"{'met' if d['ours_onset'] <= 500 else 'MISSED'} |")
    lines.append(f"| drift, false positives per trial: edgeml / scipy KS | {100 * d['ours_fp_trial']:.2f}% / "
                 f"{100 * d['scipy_fp_trial']:.2f}% | <= 1%: {'met' if d['ours_fp_trial'] <= 0.01 else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--drift-trials", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = table(run(args.calls, args.drift_trials))
    print(text)
    if args.out:
        args.out.write_text("# Agent benchmark\n\n" + text)


if __name__ == "__main__":
    main()
