"""Simulator benchmark: N simulated devices commit a single-wave rollout of a ~1 MB model from a broadcast.

Real Mosquitto, a real signed registry, the distribution service broadcasting the bundle once (retained),
(one instance here, one in a helper process, sharing the get requests) and
:class:`edgeml.fleet.sim.simulator.Simulator` devices with the stand-in runtime (fixed latency): each device
refreshes its own TUF metadata over MQTT, takes the bundle from the broadcast, verifies it (signed hash,
member hashes, manifest), stages it into its inactive slot, smoke-tests the golden vectors, switches and
commits (probation 0). A small operator client sends the update commands and counts ``committed`` events.

Measured: time from the broadcast until every device has committed (the command fan-out included), the
median device, connection set-up (not timed), and resident memory per device (idle, and after the commit).

Usage:  python benchmarks/simulate_bench.py [--devices 1000] [--processes 2] [--out benchmarks/results-simulate.md]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.fleet.mosquitto: the test broker

from benchmarks._common import golden_bundle, rss_mib, service_process, write_broker_conf
from edgeml.fleet.registry.distribution import DistributionService
from edgeml.fleet.registry.repository import init_registry
from edgeml.fleet.sim.simulator import Knobs, Simulator
from edgeml.protocol import PREFIX, Command, device_topic
from tests.fleet.mosquitto import run_mosquitto

GOAL_S_1000 = 15.0
THRESHOLDS = {"probation_s": 0.0, "min_requests": 0, "smoke_latency_budget_s": 0.0}


class _Counter:
    """The operator: sends update commands, records when each device committed (or ended otherwise)."""

    def __init__(self, port: int) -> None:
        self.ends: dict[str, tuple[str, float]] = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-op-{uuid.uuid4().hex[:6]}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"{PREFIX}devices/+/events", qos=1)
        time.sleep(0.5)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        doc = json.loads(msg.payload)
        if doc.get("type") == "update" and doc.get("state") in ("committed", "failed", "rolled_back", "incompatible"):
            with self.cond:
                self.ends[doc["device_id"]] = (doc["state"], time.monotonic())
                self.cond.notify_all()

    def send(self, device: str, **args: Any) -> None:
        command = Command(id=uuid.uuid4().hex[:12], type="update", args=args, issued_at=time.time())
        self.client.publish(device_topic(device, "commands"), command.to_bytes(), qos=1)

    def wait(self, n: int, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.ends) >= n, timeout):
                raise TimeoutError(f"only {len(self.ends)} of {n} devices finished within {timeout} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(devices: int, processes: int, size: int, fetch_concurrency: int) -> dict[str, Any]:
    """One rollout to ``devices`` simulated devices; returns the measurements."""
    work = Path(tempfile.mkdtemp(prefix="edgeml-sim-bench-"))
    work.chmod(0o755)
    try:
        write_broker_conf(work / "broker")
        registry = init_registry(work / "registry")
        registry.publish(golden_bundle(work, size))
        path = str(next(registry.targets_dir.rglob("*.edgeml")).relative_to(registry.dir / "repository"))
        bundle_bytes = (registry.dir / "repository" / path).stat().st_size
        root = (registry.metadata_dir / "1.root.json").read_bytes()
        with run_mosquitto(work / "broker") as port:
            ctx = mp.get_context("spawn")
            stop = ctx.Event()
            helper = ctx.Process(target=service_process, args=(str(registry.dir), port, stop), daemon=True)
            helper.start()  # a second service in its own process takes half of the get requests
            try:
                with DistributionService(registry.dir, "127.0.0.1", port, share_group="dist") as service:
                    out = _rollout(devices, processes, port, root, service, path, fetch_concurrency)
                    out.update({"bundle_bytes": bundle_bytes, "served_bytes": service.served_bytes})
                    return out
            finally:
                stop.set()
                helper.join(30)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _rollout(devices: int, processes: int, port: int, root: bytes, service: DistributionService, path: str,
             fetch_concurrency: int) -> dict[str, Any]:
    knobs = Knobs(rps=1.0, telemetry_interval_s=30.0, fetch_concurrency=fetch_concurrency, latency_ms=1.0)
    operator = _Counter(port)
    before = rss_mib([os.getpid()])
    t0 = time.monotonic()
    sim = Simulator("127.0.0.1", port, root, devices, knobs, processes=processes, prefix="b")
    sim.start(timeout=300)
    connect_s = time.monotonic() - t0
    pids = [c.pid for c in sim._children] if processes > 1 else [os.getpid()]
    idle = rss_mib(pids) - (0 if processes > 1 else before)
    try:
        start = time.monotonic()
        service.broadcast("bench-r1", [path])
        for profile in sim.profiles:
            operator.send(profile.device_id, model="bench", version="1.0.0", target="onnx", rollout="bench-r1",
                          thresholds=THRESHOLDS, broadcast={"rollout": "bench-r1", "path": path})
        operator.wait(devices, timeout=600)
        ends = [t for _, t in operator.ends.values()]
        loaded = rss_mib(pids) - (0 if processes > 1 else before)
    finally:
        summary = sim.stop()
        operator.close()
    states = {s for s, _ in operator.ends.values()}
    return {"devices": devices, "processes": processes, "connect_s": connect_s, "all_s": max(ends) - start,
            "median_s": statistics.median(ends) - start, "states": sorted(states), "summary": summary,
            "idle_mib_per_device": idle / devices, "loaded_mib_per_device": loaded / devices,
            "fetch_concurrency": fetch_concurrency, "label": sim.label}


def table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = [f"Stand-in runtime (fixed latency) on every device; {os.cpu_count()} cores ({platform.machine()}); "
             f"bundle {results[0]['bundle_bytes'] / 1e6:.2f} MB broadcast once; probation 0. Connection set-up "
             "is not timed. Memory: resident set of the simulator processes per device (idle: connected, no "
             "model; loaded: after the commit).", "",
             "| devices | processes | downloads at once / process | all committed | median device | "
             "devices/min | idle MiB/device | loaded MiB/device | outcome | goal (1,000 in 15 s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        goal = GOAL_S_1000 * r["devices"] / 1000
        lines.append(f"| {r['devices']} | {r['processes']} | {r['fetch_concurrency']} | {r['all_s']:.2f} s | "
                     f"{r['median_s']:.2f} s | {r['devices'] / r['all_s'] * 60:,.0f} | "
                     f"{r['idle_mib_per_device']:.2f} | {r['loaded_mib_per_device']:.2f} | "
                     f"{', '.join(r['states'])} | <= {goal:.0f} s: {'met' if r['all_s'] <= goal else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--size", type=int, default=1_000_000, help="model bytes in the bundle")
    parser.add_argument("--fetch-concurrency", type=int, default=32, help="downloads at once per process")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = [run(n, args.processes, args.size, args.fetch_concurrency) for n in args.devices]
    for r in results:
        print(json.dumps({k: v for k, v in r.items()}, default=str))
    text = table(results)
    print(text)
    if args.out:
        args.out.write_text("# Simulator benchmark\n\n" + text)


if __name__ == "__main__":
    main()
