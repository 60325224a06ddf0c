"""Distribution benchmark: N simulated devices fetch and verify a 1 MB bundle over MQTT, against raw fan-out.

Every device is its own MQTT connection with its own MqttFetcher, TUF client, trusted metadata directory
and verification (python-tuf checks the metadata chain and the target hash, then the bundle's own
member hashes and manifest): nothing is shared between devices except the broker. The devices live in
a few worker processes whose sockets are driven by one network thread each (fleet.mqtt_pool), the way a
fleet simulator holds many connections; each device's fetch runs in its own worker thread.

Phases, in one run, against the same Mosquitto and the same connections:

1. raw fan-out (the base): one publisher sends the bundle's bytes, in the same chunk size, to a topic
   every device subscribes to; timed from the first publish until every device holds every byte.
2. edgeml: the distribution service broadcasts the bundle once (retained), every device is told to
   update: refresh TUF metadata with get requests, take the target from the broadcast, verify.
   Timed from the broadcast until every device has verified. The transfer part is timed from the first
   device starting its target download to the last one holding every byte.

Usage:  python benchmarks/distribution_bench.py [--devices 1000] [--procs 4] [--out benchmarks/results-distribution.md]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.fleet.mosquitto: the test broker

from benchmarks._common import publish_raw
from edgeml.bundle import Manifest, TensorSpec
from edgeml.bundle_writer import write_bundle
from edgeml.edge_agent.mqtt_fetcher import METADATA_URL, TARGETS_URL, MqttFetcher
from edgeml.edge_agent.tuf_client import TufClient
from edgeml.fleet.registry.distribution import BROADCAST_CHUNK, DistributionService
from edgeml.fleet.registry.repository import init_registry
from edgeml.fleet.sim.mqtt_pool import ClientPool
from tests.fleet.mosquitto import run_mosquitto

RAW_TOPIC = "bench/raw"
ROLLOUT = "bench-1"
GOALS = {"seconds_1000": 10.0, "transfer_vs_raw": 0.5}


def _connect(name: str, port: int, pool: ClientPool) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.connect("127.0.0.1", port, keepalive=120)
    pool.add(client)
    if not connected.wait(30):
        raise RuntimeError(f"{name} did not connect")
    return client


def _worker(index: int, names: list[str], port: int, size: int, home: str, root: bytes, path: str,
            ready: Any, go: list[Any], results: Any, threads_per_proc: int) -> None:
    go_raw, go_listen, go_update = go
    pool = ClientPool()
    pool.start()
    clients = [_connect(name, port, pool) for name in names]
    # --- raw fan-out: count bytes per client
    got = [0] * len(clients)
    done = threading.Semaphore(0)
    finished: list[float] = []
    for i, client in enumerate(clients):
        def on_raw(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage, i: int = i) -> None:
            got[i] += len(msg.payload)
            if got[i] == size:
                finished.append(time.monotonic())
                done.release()
        client.message_callback_add(RAW_TOPIC, on_raw)
        client.subscribe(RAW_TOPIC, qos=1)
    fetchers = [MqttFetcher(c, n, timeout=60, broadcast=ROLLOUT) for c, n in zip(clients, names, strict=True)]
    ready.put(index)
    go_raw.wait()
    for _ in clients:
        done.acquire()
    results.put(("raw", index, max(finished)))
    # --- edgeml: each device listens, then refreshes, takes the broadcast and verifies, in its own thread
    go_listen.wait()
    for fetcher in fetchers:
        fetcher.listen(ROLLOUT, path)
    ready.put(index)
    go_update.wait()

    def update(i: int) -> float:
        device = Path(home) / names[i]
        tuf = TufClient(root, device / "metadata", device / "bundles", METADATA_URL, TARGETS_URL, fetcher=fetchers[i])
        got = tuf.fetch("bench", "1.0.0", "onnx-fp32")
        got.path.unlink()  # verified; free the memory of the tmpfs
        return time.monotonic()

    with ThreadPoolExecutor(max_workers=threads_per_proc) as threads:
        verified = list(threads.map(update, range(len(names))))
    results.put(("edgeml", index, {"verified": verified, "received": [f.last_broadcast_at for f in fetchers],
                                   "broadcast_bytes": sum(f.stats["broadcast_bytes"] for f in fetchers),
                                   "get_bytes": sum(f.stats["get_bytes"] for f in fetchers)}))
    for c in clients:
        c.disconnect()
    time.sleep(0.5)
    pool.stop()


def _bundle(work: Path, size: int) -> Path:
    payload = work / "model.onnx"
    payload.write_bytes(os.urandom(size))
    manifest = Manifest(
        name="bench", version="1.0.0", target="onnx-fp32",
        runtime={"name": "onnxruntime", "min_version": "1.17", "precision": "fp32", "build": None},
        model={"file": "model.onnx", "format": "onnx"},
        inputs=(TensorSpec("input", ("batch", 4), "float32"),),
        outputs=(TensorSpec("output", ("batch", 2), "float32"),), created="2026-01-01T00:00:00+00:00")
    dest = work / manifest.filename
    write_bundle(dest, manifest, {"model.onnx": payload})
    return dest


def _service_process(registry_dir: str, port: int, stop: Any) -> None:
    with DistributionService(Path(registry_dir), "127.0.0.1", port, share_group="dist"):
        stop.wait()


def run(devices: int, procs: int, size: int, chunk: int, threads: int = 16) -> dict[str, Any]:
    """Run both phases; returns the measurements."""
    work = Path(tempfile.mkdtemp(prefix="edgeml-dist-bench-"))
    home = Path(tempfile.mkdtemp(prefix="edgeml-dist-devices-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    work.chmod(0o755)
    try:
        (work / "broker").mkdir()
        (work / "broker" / "mosquitto.conf").write_text(
            "listener 1883\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 100000\n"
            "max_inflight_messages 100\n")
        registry = init_registry(work / "registry")
        bundle = _bundle(work, size)
        published = registry.publish(bundle)
        path = str(next(registry.targets_dir.rglob("*.edgeml")).relative_to(registry.dir / "repository"))
        data = (registry.dir / "repository" / path).read_bytes()
        root = (registry.metadata_dir / "1.root.json").read_bytes()
        with run_mosquitto(work / "broker") as port:
            return _phases(devices, procs, threads, port, data, chunk, str(home), root, registry.dir, path,
                           published.sha256)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def _phases(devices: int, procs: int, threads: int, port: int, data: bytes, chunk: int, home: str, root: bytes,
            registry_dir: Path, path: str, sha256: str) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    ready, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    go_raw, go_listen, go_update = ctx.Event(), ctx.Event(), ctx.Event()
    names = [f"sim-{i:05d}" for i in range(devices)]
    t0 = time.monotonic()
    workers = [ctx.Process(target=_worker, args=(k, names[k::procs], port, len(data), home, root, path, ready,
                                                 [go_raw, go_listen, go_update], results, threads))
               for k in range(procs)]
    for w in workers:
        w.start()
    helper = ctx.Process(target=_service_process, args=(str(registry_dir), port, stop))
    helper.start()
    for _ in workers:
        ready.get(timeout=300)
    connect_s = time.monotonic() - t0
    out: dict[str, Any] = {"devices": devices, "procs": procs, "threads": threads, "size": len(data), "chunk": chunk,
                           "connect_s": connect_s}
    with DistributionService(registry_dir, "127.0.0.1", port, share_group="dist") as service:
        start = publish_raw(port, RAW_TOPIC, data, chunk, go_raw)
        ends = [_result(results, "raw")[2] for _ in workers]
        out["raw_s"] = max(ends) - start
        go_listen.set()
        for _ in workers:
            ready.get(timeout=300)
        time.sleep(0.5)
        start = time.monotonic()
        service.broadcast(ROLLOUT, [path], chunk=chunk)
        go_update.set()
        parts = [_result(results, "edgeml")[2] for _ in workers]
        stop.set()
    helper.join(30)
    for w in workers:
        w.join(30)
    verified = [t for p in parts for t in p["verified"]]
    received = [t for p in parts for t in p["received"]]
    out.update({
        "edgeml_s": max(verified) - start,
        "median_device_s": statistics.median(verified) - start,
        "transfer_s": max(received) - start,
        "broadcast_bytes": sum(p["broadcast_bytes"] for p in parts),
        "get_bytes": sum(p["get_bytes"] for p in parts),
        "sha256": sha256,
    })
    return out


def _result(results: Any, phase: str) -> tuple[str, int, Any]:
    try:
        item = results.get(timeout=300)
    except queue.Empty:
        raise RuntimeError(f"a worker did not finish the {phase} phase within 300 s") from None
    if item[0] != phase:
        raise RuntimeError(f"expected a {phase} result, got {item[0]}")
    return item  # type: ignore[no-any-return]


def table(r: dict[str, Any]) -> str:
    """The results as a markdown table."""
    n, size = r["devices"], r["size"]
    raw_rate = n * size / r["raw_s"]
    transfer_rate = n * size / r["transfer_s"]
    ratio = transfer_rate / raw_rate
    ratio_ok = "met" if ratio >= GOALS["transfer_vs_raw"] else "MISSED"
    per_min = n / r["edgeml_s"] * 60
    goal_s = GOALS["seconds_1000"] * n / 1000
    rows = [
        ("raw Mosquitto fan-out (base)", f"{r['raw_s']:.2f} s", f"{raw_rate / 1e6:.0f} MB/s", "", ""),
        ("edgeml fetch + verify, all devices", f"{r['edgeml_s']:.2f} s",
         f"{n * size / r['edgeml_s'] / 1e6:.0f} MB/s", f"{per_min:,.0f} devices/min",
         f"<= {goal_s:.0f} s: {'met' if r['edgeml_s'] <= goal_s else 'MISSED'}"),
        ("edgeml broadcast transfer", f"{r['transfer_s']:.2f} s", f"{transfer_rate / 1e6:.0f} MB/s",
         f"{ratio:.2f}x raw", f">= {GOALS['transfer_vs_raw']:.2f}x: {ratio_ok}"),
        ("median device verified after", f"{r['median_device_s']:.2f} s", "", "", ""),
    ]
    lines = [f"{n} devices in {r['procs']} processes ({r['threads']} updating at once in each), "
             f"bundle {size / 1e6:.2f} MB in {r['chunk'] // 1024} KiB chunks, "
             f"{os.cpu_count()} cores ({platform.machine()}), connections set up in {r['connect_s']:.1f} s "
             "(not timed). "
             f"Target bytes by broadcast {r['broadcast_bytes'] / 1e6:.0f} MB, by get {r['get_bytes'] / 1e6:.1f} MB.",
             "", "| measure | time | throughput | rate | goal |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--size", type=int, default=1_000_000, help="model bytes in the bundle")
    parser.add_argument("--chunk", type=int, default=BROADCAST_CHUNK)
    parser.add_argument("--threads", type=int, default=16, help="devices updating at once per process")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = run(args.devices, args.procs, args.size, args.chunk, args.threads)
    text = table(result)
    print(text)
    if args.out:
        args.out.write_text("# Distribution benchmark\n\n" + text)


if __name__ == "__main__":
    main()
