"""``edgeml demo``: the whole loop on one machine, on embedded defaults.

1. Train a small CNN on the built-in digits data (scikit-learn's bundled copy, offline) and export it.
2. Compile v1 to ``onnx-int8`` and ``tflite-int8`` with the accuracy gate on.
3. Build v2, "broken" the way real releases break: an export bug divides the logits by ten. Its top-1
   accuracy is unchanged, so the compile gate passes it, but on live data its confidence collapses.
4. Create a signed registry, publish both, start a broker (Mosquitto with TLS and ACLs, or the embedded one),
   the fleet server and three agents (two on onnxruntime, one on LiteRT), each a real process.
5. Roll v1 out in waves while traffic flows; roll v2 out: the canary's agents see the confidence drop during
   probation and roll back by themselves, the fleet aborts the rollout, the third agent is never told.
6. Inject drift (one agent's inputs shifted): its telemetry flags it, the store and the dashboard show it.
7. Print a summary (and write ``summary.json``); keep serving the dashboard until Ctrl-C when interactive.

A second run reuses the trained model, the bundles, the registry, the enrolled devices and their agents'
state. This module composes the packages; nothing else in the core imports them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.errors import EdgeMLError
from edgeml.process import sigterm_interrupts

__all__ = ["DEMO_TARGETS", "DemoFailed", "run_demo"]

DEMO_TARGETS = ("onnx-int8", "tflite-int8")
V1, V2 = "1.0.0", "2.0.0"


class DemoFailed(EdgeMLError):
    """The demo's story did not happen as it should (a step timed out, or a result is wrong)."""


def _train(workdir: Path) -> Path:
    from edgeml.train.digits import digits_arrays, export_onnx, fit
    from edgeml.train.models import small_cnn

    model_path = workdir / "digits.onnx"
    if model_path.is_file() and (workdir / "val.npz").is_file():
        print(f"reusing the trained model {model_path}")
        return model_path
    print("training a small CNN on the built-in digits data (8 epochs)…")
    data = digits_arrays(seed=0)
    model = fit(small_cnn(), data["x_train"], data["y_train"], epochs=8, seed=0)
    np.savez(workdir / "calib.npz", input=data["x_train"][:256])
    np.savez(workdir / "val.npz", input=data["x_val"], labels=data["y_val"])
    export_onnx(model, data["x_val"], str(workdir / "digits.tmp.onnx"))
    (workdir / "digits.tmp.onnx").replace(model_path)
    return model_path


def _broken_copy(model: Path, out: Path, factor: float = 0.1) -> Path:
    """The model with every output multiplied by ``factor`` (same classes, collapsed confidence)."""
    import onnx
    from onnx import helper, numpy_helper

    if out.is_file():
        return out
    proto = onnx.load(str(model))
    graph = proto.graph
    for output in graph.output:
        raw = f"{output.name}_before_the_bug"
        for node in graph.node:
            node.output[:] = [raw if name == output.name else name for name in node.output]
        graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), f"{output.name}_bug"))
        graph.node.append(helper.make_node("Mul", [raw, f"{output.name}_bug"], [output.name]))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out


def _compile(model: Path, version: str, workdir: Path, targets: tuple[str, ...]) -> list[Path]:
    """Compile ``model`` as ``digits`` ``version`` (reusing bundles a previous run wrote)."""
    from edgeml.compile import CompileOptions, compile_model
    from edgeml.compile.cli import print_report
    from edgeml.progress import RichProgress

    out = workdir / "dist" / version
    existing = sorted(out.glob("*.edgeml")) if out.is_dir() else []
    if len(existing) == len(targets):
        print(f"reusing the {version} bundles in {out}")
        return existing
    options = CompileOptions(targets=targets, name="digits", version=version, max_accuracy_drop=1.0,
                             bench_budget_s=0.5)
    report = compile_model(str(model), options, out, calib=workdir / "calib.npz", val=workdir / "val.npz",
                           progress=RichProgress())
    print_report(report)
    if not report.ok:
        raise DemoFailed(f"compiling {version} failed the gate or errored; see the report above")
    return [o.bundle for o in report.outcomes if o.bundle is not None]


class _Clock:
    """The demo's time bound: each wait gets what is left."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def wait_for(self, what: str, check: Callable[[], Any], limit_s: float = 180.0, every_s: float = 0.5) -> Any:
        end = min(self.deadline, time.monotonic() + limit_s)
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > end:
                raise DemoFailed(f"timed out waiting for {what}")
            time.sleep(every_s)


def run_demo(workdir: Path, *, ci: bool = False, budget_s: float = 900.0, http_port: int = 8470,
             broker: str = "auto") -> dict[str, Any]:
    """Run the whole loop; returns the summary (also written to ``workdir/summary.json``).

    Args:
        workdir: Where the demo keeps everything (reused by a second run).
        ci: Never wait for Ctrl-C at the end (also when stdin is not a terminal).
        budget_s: The whole run's time bound in seconds.
        http_port: The dashboard's port (a free one when taken).
        broker: ``auto`` (Mosquitto where installed, else the embedded one), ``mosquitto`` or ``embedded``.

    Raises:
        DemoFailed: A step did not happen within the time bound, or ended differently than it should.
    """
    from edgeml.demo.fleet import DemoFleet, Traffic
    from edgeml.demo.story import print_summary, tell_the_story

    clock = _Clock(budget_s)
    workdir = workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    model = _train(workdir)
    targets: tuple[str, ...] = DEMO_TARGETS
    if importlib.util.find_spec("onnx2tf") is None:
        print("onnx2tf is not installed: no tflite-int8, so pi-1 will be incompatible "
              "(pip install --no-deps onnx2tf==1.29.24)")
        targets = ("onnx-int8",)
    bundles = {V1: _compile(model, V1, workdir, targets),
               V2: _compile(_broken_copy(model, workdir / "digits-v2-broken.onnx"), V2, workdir, targets)}
    with np.load(workdir / "val.npz") as val:
        inputs = val["input"]
    with sigterm_interrupts(), DemoFleet(workdir, http_port=http_port, broker=broker) as fleet:
        registry = fleet.registry()
        for paths in bundles.values():
            for path in paths:
                result = registry.publish(path)
                print(f"{'published' if result.changed else 'already published'} {path.name}")
        fleet.enroll()
        fleet.start_broker()
        url = fleet.start_server()
        fleet.start_agents()
        traffic = Traffic(fleet.agents, inputs)
        traffic.start()
        try:
            summary = tell_the_story(fleet, traffic, clock, url, targets)
            summary["traffic"] = {"ok": traffic.ok, "errors": traffic.errors, "unavailable": traffic.unavailable}
            (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            print_summary(summary)
            if not ci and sys.stdin.isatty():
                print(f"\nthe fleet keeps running, traffic too: {summary['dashboard']}  (Ctrl-C stops everything)")
                try:
                    while True:
                        time.sleep(1.0)
                except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (sigterm_interrupts)
                    print("\nstopping the agents, the fleet server and the broker…")
        finally:
            traffic.stop()
    print("stopped cleanly")
    return summary
