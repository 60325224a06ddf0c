"""Agent benchmark: what serving through the agent costs against the bare runtime, measured in one run.

Model: the digits CNN (1 x 8 x 8 input, 10 classes), trained briefly and compiled to ``onnx`` and ``tflite``
bundles with reference statistics, installed in an agent's slot. The agent runs without a broker (it keeps
retrying in the background), as a device does while offline.

- in-process: ``Agent.predict`` (validation, health numbers, telemetry, drift) against onnxruntime's own
  ``session.run`` on the same model file, one thread, at batch 1 (goal <= 1.10x) and batch 32 (goal <= 1.03x);
  ``Runtime.infer`` is shown between the two;
- local HTTP: ``POST /v1/models/digits:predict`` on a kept-alive connection, p50 against the in-process p50
  (goal <= +1 ms);
- accounting: throughput of ``Agent.predict`` with and without telemetry and drift (the model host's drift
  sampler and telemetry sink detached) (goal <= 3%);
- memory: RSS of a process running the agent against a bare process that imports numpy, the same runtime and
  paho and runs the same model (goal <= 20 MiB above), for onnxruntime and LiteRT;
- rollback: from the failing check (a rollback decision during probation) to the old model serving (goal
  <= 1 s);
- drift: samples to flag a 0.5-sigma shift and false-positive rate against scipy's KS (benchmarks/drift_bench.py).

Each case is timed in rounds interleaved with the others (so that a noisy moment hits every case), and the
medians over rounds are reported.

Usage:  python benchmarks/agent_bench.py [--calls 180000] [--rounds 15] [--out benchmarks/results-agent.md]
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

GOALS = {"batch_1": 1.10, "batch_32": 1.03, "http_ms": 1.0, "accounting": 0.03, "rss_mib": 20.0, "rollback_s": 1.0}
PATHS = ("session.run", "Runtime.infer", "Agent.predict, no accounting", "Agent.predict")

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
    """(p50 wall seconds per call, calls per second of this thread's CPU time) over ``calls`` calls.

    Throughput is counted in the calling thread's CPU time (``time.thread_time``): on a machine shared with
    other work, time the scheduler gives to other processes does not count against whichever path was running.
    """
    samples = np.empty(calls)
    cpu = time.thread_time()
    for i in range(calls):
        t = time.perf_counter()
        fn()
        samples[i] = time.perf_counter() - t
    return float(np.median(samples)), calls / (time.thread_time() - cpu)


def in_process(config: Path, x: np.ndarray, calls: int, rounds: int, v2: Path) -> dict[str, Any]:
    """Agent.predict against session.run and Runtime.infer at batch 1 and 32, interleaved rounds; with and
    without accounting; then the local HTTP API and rollbacks to ``v2``. Run it in a process of its own
    (:func:`serving`): one that has imported torch and TensorFlow to build the bundles holds millions of
    objects, whose garbage collections then fall on whichever path allocates most."""
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
    sampler, sink = agent.host.sampler, agent.host.sink

    def accounting(on: bool) -> None:  # the drift sampler and the telemetry's latency sink
        agent.host.sampler = sampler if on else None
        agent.host.sink = sink if on else None

    out: dict[str, Any] = {}
    for batch in (1, 32):
        b = np.ascontiguousarray(x[:batch])
        cases: dict[str, tuple[Callable[[], Any], bool]] = {
            "session.run": (lambda b=b: session.run(None, {"input": b}), True),
            "Runtime.infer": (lambda b=b: runtime.infer({"input": b}), True),
            "Agent.predict, no accounting": (lambda b=b: agent.predict("digits", b, preprocessed=True), False),
            "Agent.predict": (lambda b=b: agent.predict("digits", b, preprocessed=True), True),
        }
        n = max(100, calls // rounds // (10 if batch > 1 else 1))
        measured: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
        for fn, on in cases.values():  # warm up
            accounting(on)
            _timed(fn, n // 10)
        for _ in range(rounds):  # interleaved, so that a noisy moment hits every case
            for name, (fn, on) in cases.items():
                accounting(on)
                measured[name].append(_timed(fn, n))
        accounting(True)
        base, full = measured["session.run"], measured["Agent.predict"]
        out[f"batch {batch}"] = {name: {"p50_us": 1e6 * statistics.median(r[0] for r in rs),
                                        "rate": statistics.median(r[1] for r in rs),
                                        # the ratio within each round, whose cases ran one after the other
                                        "vs_session": statistics.median(b[1] / r[1] for b, r in zip(base, rs)),
                                        "vs_full": statistics.median(f[1] / r[1] for f, r in zip(full, rs))}
                                 for name, rs in measured.items()}
    out["http"] = over_http(agent, x[:1], 3000)
    out["rollback"] = rollback_time(agent, v2)
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


def rollback_time(agent: Any, v2: Path) -> dict[str, float]:
    """Put 2.0.0 on probation, decide to roll back, and time until 1.0.0 serves again (5 repetitions)."""
    from edgeml.edge_agent.tuf_client import VerifiedBundle
    from edgeml.edge_agent.update.health import Thresholds
    from edgeml.edge_agent.update.store import UpdateRequest

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


SERVING_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from benchmarks.agent_bench import in_process
config, inputs, calls, rounds, v2 = sys.argv[1:]
out = in_process(Path(config), np.load(inputs), int(calls), int(rounds), Path(v2))
print(json.dumps(out))
"""


def serving(config: Path, inputs: Path, calls: int, rounds: int, v2: Path) -> dict[str, Any]:
    """:func:`in_process` in a fresh process that imports what a device's does (no torch, no TensorFlow)."""
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", SERVING_SCRIPT, str(config), str(inputs), str(calls), str(rounds),
                           str(v2)], capture_output=True, text=True, timeout=1200, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the serving measurement failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def rss(config: Path, runtime: str, model: Path, inputs: Path) -> dict[str, float]:
    """RSS (MiB) of the agent process and of the bare process, each measured after 2,000 predictions."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    agent = subprocess.run([sys.executable, "-c", AGENT_SCRIPT, str(config), str(inputs)], capture_output=True,
                           text=True, timeout=300, env=env, check=True)
    bare = subprocess.run([sys.executable, "-c", BARE_SCRIPT, runtime, str(model), str(inputs)],
                          capture_output=True, text=True, timeout=300, env=env, check=True)
    a, b = json.loads(agent.stdout.strip().splitlines()[-1]), json.loads(bare.stdout.strip().splitlines()[-1])
    return {"agent_mib": a["rss_kib"] / 1024, "bare_mib": b["rss_kib"] / 1024}


def run(calls: int, rounds: int, drift_trials: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="edgeml-agent-bench-"))
    try:
        bundles, v2, x = build_bundles(work)
        np.save(work / "inputs.npy", x)
        out: dict[str, Any] = {}
        config = agent_home(work, "bench-ort", bundles["1.0.0/onnx"])
        out["serving"] = serving(config, work / "inputs.npy", calls, rounds, v2)
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


def _verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else "MISSED"


def table(r: dict[str, Any]) -> str:
    s = r["serving"]
    one, many = s["batch 1"], s["batch 32"]
    lines = [f"Host: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, digits CNN "
             "(1x8x8, 10 classes), one thread. Calls/s per second of the calling thread's CPU time; p50 and "
             "calls/s are medians over interleaved rounds, ratios the medians of the ratios within each round.", "",
             "| path | batch 1: p50 us | calls/s | vs session.run | batch 32: p50 us | calls/s | vs session.run |",
             "|---|---|---|---|---|---|---|"]
    for name in PATHS:
        cells = []
        for m in (one, many):
            cells += [f"{m[name]['p50_us']:.1f}", f"{m[name]['rate']:,.0f}", f"{m[name]['vs_session']:.2f}x"]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    ratio1, ratio32 = one["Agent.predict"]["vs_session"], many["Agent.predict"]["vs_session"]
    lost = 1 - one["Agent.predict, no accounting"]["vs_full"]  # full / no-accounting throughput
    lost32 = 1 - many["Agent.predict, no accounting"]["vs_full"]
    http_extra = (s["http"]["json_p50_us"] - one["Agent.predict"]["p50_us"]) / 1000
    raw_extra = (s["http"]["raw_p50_us"] - one["Agent.predict"]["p50_us"]) / 1000
    rb = s["rollback"]
    lines += ["", "| measure | value | goal |", "|---|---|---|",
              f"| Agent.predict vs session.run, batch 1 (throughput) | {ratio1:.2f}x | "
              f"<= {GOALS['batch_1']:.2f}x: {_verdict(ratio1, GOALS['batch_1'])} |",
              f"| Agent.predict vs session.run, batch 32 (throughput) | {ratio32:.2f}x | "
              f"<= {GOALS['batch_32']:.2f}x: {_verdict(ratio32, GOALS['batch_32'])} |",
              f"| throughput lost to telemetry + drift accounting, batch 1 / batch 32 | {100 * lost:.1f}% / "
              f"{100 * lost32:.1f}% | <= 3%: {_verdict(max(lost, lost32), GOALS['accounting'])} |",
              f"| local HTTP p50, JSON (over in-process) | +{http_extra:.2f} ms | <= +1 ms: "
              f"{_verdict(http_extra, GOALS['http_ms'])} |",
              f"| local HTTP p50, raw bytes (over in-process) | +{raw_extra:.2f} ms | <= +1 ms: "
              f"{_verdict(raw_extra, GOALS['http_ms'])} |",
              f"| rollback: decision to old model serving | {rb['median_ms']:.1f} ms (max {rb['max_ms']:.1f}) | "
              f"<= 1 s: {_verdict(rb['max_ms'], 1000)} |"]
    for runtime, m in r["rss"].items():
        extra = m["agent_mib"] - m["bare_mib"]
        lines.append(f"| RSS with {runtime}: agent {m['agent_mib']:.0f} MiB vs bare {m['bare_mib']:.0f} MiB | "
                     f"+{extra:.1f} MiB | <= +20 MiB: {_verdict(extra, GOALS['rss_mib'])} |")
    d = r["drift"]
    lines.append(f"| drift, samples to flag 0.5 sigma (median after onset): edgeml / scipy KS | "
                 f"{d['ours_onset']:.0f} / {d['scipy_onset']:.0f} | <= 500: {_verdict(d['ours_onset'], 500)} |")
    lines.append(f"| drift, false positives per trial: edgeml / scipy KS | {100 * d['ours_fp_trial']:.2f}% / "
                 f"{100 * d['scipy_fp_trial']:.2f}% | <= 1%: {_verdict(d['ours_fp_trial'], 0.01)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=180000, help="calls per case at batch 1 (a tenth at 32)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds the calls are split into")
    parser.add_argument("--drift-trials", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = table(run(args.calls, args.rounds, args.drift_trials))
    print(text)
    if args.out:
        args.out.write_text("# Agent benchmark\n\n" + text)


if __name__ == "__main__":
    main()
