"""Fleet benchmark: a single-wave rollout to 1,000 simulated devices, and telemetry ingestion, in one run.

Part 1, the rollout, on the real path: a signed registry with a ~1 MB bundle published, the devices enrolled
in its database (tags, capabilities), :func:`edgeml.fleet.rollouts.store.start_rollout` with one wave (canary
100%, probation 0), and a :class:`~edgeml.fleet.rollouts.controller.RolloutController` whose
:class:`~edgeml.fleet.registry.distribution.DistributionService` broadcasts the bundle once (a second service in a
helper process shares the get requests). The devices are :class:`edgeml.fleet.sim.simulator.Simulator` devices
(stand-in runtime, fixed latency): each refreshes its own TUF metadata over MQTT, takes the bundle from the
broadcast, verifies it, stages it into its inactive slot, smoke-tests the golden vectors, switches and
commits. Timed from ``start_rollout`` until the store (``rollout_devices``) says every device committed.
The base, in the same run and against the same broker: a raw Mosquitto fan-out of the same bytes (one
publisher, the same chunk size, QoS 1) to as many plain connections, timed until each holds every byte.

Part 2, ingestion: :mod:`benchmarks.ingest_bench` in the same run (its own broker): an
:class:`~edgeml.fleet.telemetry.ingest.IngestWorker` storing and acknowledging telemetry against a raw paho QoS 1
subscriber that only counts; SQLite by default, ``--db-url`` for PostgreSQL.

Usage:  python benchmarks/fleet_bench.py [--devices 1000] [--processes 2] [--db-url URL]
                                         [--out benchmarks/results-fleet.md]
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
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.*, tests.fleet.mosquitto

from benchmarks import ingest_bench
from benchmarks._common import (
    RemoteDistribution,
    cpu_s,
    golden_bundle,
    pids_running,
    publish_raw,
    raw_receivers,
    service_process,
    write_broker_conf,
)
from edgeml.fleet.audit.log import open_audit
from edgeml.fleet.registry.distribution import BROADCAST_CHUNK
from edgeml.fleet.registry.repository import init_registry
from edgeml.fleet.rollouts.controller import RolloutController
from edgeml.fleet.rollouts.rules import RolloutOptions
from edgeml.fleet.rollouts.store import start_rollout
from edgeml.fleet.sim.simulator import Knobs, Simulator
from tests.fleet.mosquitto import run_mosquitto

GOAL_S_1000 = 15.0
GOAL_INGEST = ingest_bench.GOAL
RAW_TOPIC = "bench/raw"
_END = ("committed", "rolled_back", "failed", "incompatible", "timed_out")


# --- part 1: the rollout ----------------------------------------------------------------------------------

def _raw_fanout(port: int, devices: int, processes: int, data: bytes, chunk: int) -> float:
    """Seconds from the first publish until each of ``devices`` plain connections holds every byte."""
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    names = [f"raw-{i:05d}" for i in range(devices)]
    procs = [ctx.Process(target=raw_receivers, args=(names[k::processes], port, RAW_TOPIC, len(data), ready, go,
                                                     results), daemon=True) for k in range(processes)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    start = publish_raw(port, RAW_TOPIC, data, chunk, go)
    ends = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
    return max(ends) - start


def _enroll(db: Any, sim: Simulator) -> None:
    """What enrollment and the ingest worker write: one ``devices`` row per device with its capabilities."""
    t = db.tables["devices"]
    rows = [{"device_id": p.device_id, "tags": {"fleet": "bench"}, "revoked": False, "status": "idle",
             "capabilities": p.capabilities.to_dict(), "installed": {}} for p in sim.profiles]
    with db.transaction() as conn:
        conn.execute(t.insert(), rows)


def _wait_committed(db: Any, rollout_id: str, n: int, timeout: float) -> tuple[float, float, dict[str, int]]:
    """Poll the store until every device of the rollout ended; (time.monotonic() then, when the last command
    was marked sent, states by count)."""
    rd, sa = db.tables["rollout_devices"], db.sa
    query = sa.select(rd.c.state, sa.func.count()).where(rd.c.rollout_id == rollout_id).group_by(rd.c.state)
    deadline = time.monotonic() + timeout
    sent = 0.0
    while True:
        with db.transaction() as conn:
            counts = {s: int(c) for s, c in conn.execute(query)}
        if not sent and not counts.get("pending") and not counts.get("notifying"):
            sent = time.monotonic()
        if sum(c for s, c in counts.items() if s in _END) >= n:
            return time.monotonic(), sent or time.monotonic(), counts
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout {rollout_id} not done within {timeout} s: {counts}")
        time.sleep(0.05)


def _finish_times(db: Any, rollout_id: str) -> list[float]:
    rd, sa = db.tables["rollout_devices"], db.sa
    with db.transaction() as conn:
        rows = conn.execute(sa.select(rd.c.notified_at, rd.c.finished_at).where(rd.c.rollout_id == rollout_id)).all()
    return [(f - n).total_seconds() for n, f in rows if n is not None and f is not None]


def rollout(devices: int, processes: int, size: int, tick_s: float, tmpfs: bool = False,
            knobs: Knobs | None = None) -> dict[str, Any]:
    """Part 1: the raw fan-out base, then the real rollout; returns the measurements.

    ``tmpfs``: the registry (its SQLite database included) in /dev/shm, where a commit's fsyncs cost nothing.
    ``knobs``: the simulated devices' (default: no synthetic traffic, the stand-in runtime at 1 ms a call).
    """
    knobs = knobs or Knobs(rps=0.0, telemetry_interval_s=30.0, latency_ms=1.0)
    shm = "/dev/shm" if tmpfs and Path("/dev/shm").is_dir() else None
    work = Path(tempfile.mkdtemp(prefix="edgeml-fleet-bench-", dir=shm))
    work.chmod(0o755)
    try:
        registry = init_registry(work / "registry")
        registry.publish(golden_bundle(work, size))
        path = next(registry.targets_dir.rglob("*.edgeml"))
        data = path.read_bytes()
        root = (registry.metadata_dir / "1.root.json").read_bytes()
        with run_mosquitto(write_broker_conf(work / "broker")) as port:
            raw_s = _raw_fanout(port, devices, processes, data, BROADCAST_CHUNK)
            out = _rollout(registry, port, root, devices, processes, tick_s, pids_running(str(work / "broker")),
                           knobs)
        out.update({"registry_on": "tmpfs" if shm else "disk", "raw_s": raw_s, "bundle_bytes": len(data),
                    "devices": devices, "processes": processes})
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _rollout(registry: Any, port: int, root: bytes, devices: int, processes: int, tick_s: float,
             broker: list[int], knobs: Knobs) -> dict[str, Any]:
    db = registry.database()
    audit = open_audit(registry.dir, db=db)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    calls, served = ctx.Pipe()
    # two distribution services share the get requests, each in a process of its own; the first also
    # broadcasts for the controller (RemoteDistribution), which runs alone in this process
    helpers = [ctx.Process(target=service_process, args=(str(registry.dir), port, stop, end), daemon=True)
               for end in (served, None)]
    for helper in helpers:
        helper.start()
    t0 = time.monotonic()
    sim = Simulator("127.0.0.1", port, root, devices, knobs, processes=processes, prefix="fb")
    sim.start(timeout=300)
    connect_s = time.monotonic() - t0
    try:
        _enroll(db, sim)
        options = RolloutOptions(targets=("onnx",), canary=1.0, waves=(1.0,), probation_s=0.0, min_devices=1,
                                 wave_timeout_s=600.0, device_thresholds={"min_requests": 0,
                                                                          "smoke_latency_budget_s": 0.0})
        with RolloutController(db, "127.0.0.1", port, dist=RemoteDistribution(calls), tick_s=tick_s,
                               client_id="bench.rollouts", audit=audit) as controller:
            deadline = time.monotonic() + 60
            while len(controller.states) < devices and time.monotonic() < deadline:
                time.sleep(0.1)  # the retained states: the controller knows who is online
            groups = {"simulator": [c.pid for c in sim._children], "controller and services":
                      [os.getpid(), *(h.pid or 0 for h in helpers)], "broker": broker}
            before = {k: cpu_s(v) for k, v in groups.items()}
            start = time.monotonic()
            rid = start_rollout(db, audit, "bench", "1.0.0", options, actor="local:bench", rollout_id="bench-r1")
            end, sent, counts = _wait_committed(db, rid, devices, timeout=600)
            cpu = {k: cpu_s(v) - before[k] for k, v in groups.items()}
            per_device = _finish_times(db, rid)
    finally:
        summary = sim.stop()
        stop.set()
        for helper in helpers:
            helper.join(30)
        db.close()
    return {"rollout_s": end - start, "sent_s": sent - start, "counts": counts, "connect_s": connect_s,
            "summary": summary, "median_device_s": statistics.median(per_device) if per_device else None,
            "label": sim.label, "tick_s": tick_s, "cpu": cpu, "nice": knobs.nice,
            "fetch_concurrency": knobs.fetch_concurrency, "rps": knobs.rps}


# --- the table --------------------------------------------------------------------------------------------

def _rollout_rows(r: dict[str, Any]) -> list[str]:
    n, where = r["devices"], f"registry database (SQLite) on {r['registry_on']}"
    goal = GOAL_S_1000 * n / 1000
    ok = r["rollout_s"] <= goal and r["counts"].get("committed", 0) == n
    median = f"{r['median_device_s']:.2f} s" if r["median_device_s"] is not None else "-"
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu"].items())
    return [
        f"| raw Mosquitto fan-out of the same bytes (base), {where} run | {r['raw_s']:.2f} s | "
        f"{n / r['raw_s'] * 60:,.0f} | 1.00x | | |",
        f"| **start_rollout until the store says all committed**, {where} | **{r['rollout_s']:.2f} s** | "
        f"{n / r['rollout_s'] * 60:,.0f} | {r['rollout_s'] / r['raw_s']:.1f}x the base | "
        f"<= {goal:.0f} s: {'met' if ok else 'MISSED'} | {cpu} |",
        f"| every update command sent by the controller, {where} | {r['sent_s']:.2f} s | | | | |",
        f"| median device, decided to result recorded, {where} | {median} | | | | |",
    ]


def table(runs: list[dict[str, Any]], ing: dict[str, Any] | None) -> str:
    """The measurements as markdown."""
    lines = [f"{os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d')}.", ""]
    if runs:
        r = runs[0]
        lines += [
            f"## Rollout: {r['devices']} simulated devices in {r['processes']} processes, one wave", "",
            f"{r['label']}; bundle {r['bundle_bytes'] / 1e6:.2f} MB broadcast once; canary 100%, probation 0; "
            f"controller tick {r['tick_s']:g} s; simulator processes at niceness +{r['nice']}, "
            f"{r['fetch_concurrency']} downloads at once each, {r['rps']:g} synthetic requests/s per device. "
            f"Connection set-up ({r['connect_s']:.1f} s) is not timed. Outcome in the store: "
            + "; ".join(", ".join(f"{k} {v}" for k, v in sorted(x["counts"].items())) for x in runs) + ". "
            "AWS IoT Jobs caps a rollout at 1,000 devices/min.", "",
            "| measure | time | devices/min | vs base | goal | CPU seconds during the rollout |",
            "|---|---|---|---|---|---|",
        ]
        for r in runs:
            lines += _rollout_rows(r)
        lines.append("")
    if ing is not None:
        total = ing["devices"] * ing["messages"]
        lines += [
            f"## Ingestion: {ing['devices']} devices x {ing['messages']} telemetry messages (QoS 1), "
            f"store: {ing['backend']}", "",
            "| phase | messages | seconds | msgs/s | vs raw | goal |", "|---|---|---|---|---|---|",
            f"| raw paho QoS 1 subscriber (counts only, base) | {total} | {ing['raw_s']:.2f} | "
            f"{total / ing['raw_s']:,.0f} | 1.00x | |",
            f"| ingest worker (stored, acknowledged) | {ing['stats']['stored']} | {ing['ingest_s']:.2f} | "
            f"{total / ing['ingest_s']:,.0f} | {ing['ratio']:.2f}x | >= {GOAL_INGEST:.2f}x: "
            f"{'met' if ing['ratio'] >= GOAL_INGEST else 'MISSED'} |",
        ]
        if ing.get("scaled_s"):
            lines.append(
                f"| {ing['workers']} ingest worker processes, one shared subscription (stored, acknowledged) | "
                f"{total} | {ing['scaled_s']:.2f} | {total / ing['scaled_s']:,.0f} | {ing['scaled_ratio']:.2f}x | "
                f">= {GOAL_INGEST:.2f}x: {'met' if ing['scaled_ratio'] >= GOAL_INGEST else 'MISSED'} |")
        lines += [
            "",
            f"Ingest worker: {ing['stats']['batches']} batches "
            f"({ing['stats']['stored'] / max(ing['stats']['batches'], 1):.0f} rows each), {ing['stats']['acks']} "
            f"acks sent, {ing['stats']['duplicates']} duplicates.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2, help="simulator processes")
    parser.add_argument("--size", type=int, default=1_000_000, help="model bytes in the bundle")
    parser.add_argument("--tick", type=float, default=0.2, help="the rollout controller's tick, seconds")
    parser.add_argument("--registry-on", choices=("disk", "tmpfs"), nargs="+", default=["tmpfs", "disk"],
                        help="where the registry and its SQLite database live (one rollout each)")
    parser.add_argument("--nice", type=int, default=0, help="niceness added to the simulator processes")
    parser.add_argument("--fetch-concurrency", type=int, default=32, help="downloads at once per simulator process")
    parser.add_argument("--rps", type=float, default=0.0, help="synthetic requests per second per serving device")
    parser.add_argument("--ingest-devices", type=int, default=100)
    parser.add_argument("--ingest-messages", type=int, default=100, help="messages per device")
    parser.add_argument("--db-url", default=None, help="ingestion store (default: SQLite in a temporary directory)")
    parser.add_argument("--skip", choices=("rollout", "ingest"), default=None, help="run one part only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    knobs = Knobs(rps=args.rps, telemetry_interval_s=30.0, latency_ms=1.0, fetch_concurrency=args.fetch_concurrency,
                  nice=args.nice)
    runs = [] if args.skip == "rollout" else \
        [rollout(args.devices, args.processes, args.size, args.tick, where == "tmpfs", knobs) for where in
         args.registry_on]
    for r in runs:
        print(json.dumps(r, default=str))
    ing = None if args.skip == "ingest" else ingest_bench.measure(args.ingest_devices, args.ingest_messages,
                                                                   args.db_url)
    if ing is not None:
        print(json.dumps(ing, default=str))
    text = table(runs, ing)
    print(text)
    if args.out:
        args.out.write_text("# Fleet benchmark\n\n" + text)


if __name__ == "__main__":
    main()
