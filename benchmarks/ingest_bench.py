"""Ingest benchmark: telemetry stored per second by the ingest worker, against a raw paho QoS 1 subscriber.

N simulated devices (one MQTT connection each, driven by one network thread in a publisher subprocess,
fleet.mqtt_pool) each publish M realistic telemetry messages at QoS 1 as fast as they can. In one run,
against the same Mosquitto and the same publisher connections:

1. raw (the base): a plain paho subscriber (QoS 1) that only counts messages; timed from the go signal to
   the last message received.
2. ingest: an :class:`~edgeml.fleet.telemetry.ingest.IngestWorker` (shared subscription, MQTT 5, batches into the
   store, telemetry-ack commands after each commit, PUBACK after commit); timed from the go signal to the
   last row committed (``stats()["stored"]`` polled every 10 ms).

The goal is ingest >= 70% of the raw receive rate. SQLite in a temporary directory by default;
``--db-url`` for PostgreSQL (device ids are unique per run, so an existing database is only added to).

Usage:  python benchmarks/ingest_bench.py [--devices 100] [--messages 100] [--db-url URL] [--out FILE]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.fleet.mosquitto: the test broker

from edgeml.fleet.sim.mqtt_pool import ClientPool
from edgeml.fleet.telemetry.ingest import TELEMETRY_FILTER, IngestWorker
from edgeml.protocol import Telemetry, device_topic
from tests.fleet.mosquitto import run_mosquitto

GOAL = 0.70


def _metrics(seq: int) -> dict[str, Any]:
    """What a camera device reports every interval (~450 bytes of JSON)."""
    return {"model": "digits", "version": "1.2.0", "slot": "a", "inferences": 300 + seq, "errors": 0,
            "latency_ms_p50": 3.21, "latency_ms_p90": 5.4, "latency_ms_p99": 9.87, "fps": 29.7,
            "cpu": 0.41, "mem_mb": 212.5, "temp_c": 51.2, "gpu": 0.63, "drift_psi": 0.031, "drift_alert": False,
            "top_class_share": {"0": 0.12, "1": 0.09, "7": 0.11}}


def _publisher(names: list[str], port: int, messages: int, ready: Any, go: list[Any], done: Any) -> None:
    """The devices: connect, then on each go signal publish ``messages`` each, interleaved, at QoS 1."""
    pool = ClientPool()
    pool.start()
    clients = []
    for name in names:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
        client.max_inflight_messages_set(100)
        client.connect("127.0.0.1", port, keepalive=120)
        pool.add(client)
        clients.append(client)
    time.sleep(1.0)  # CONNACKs
    rounds = [[[Telemetry(n, base + s, 1.7e9 + s, _metrics(s)).to_bytes() for s in range(messages)] for n in names]
              for base in (max(0, r - 1) * messages for r in range(len(go)))]  # rounds 0 (raw) and 1 share seqs
    ready.set()  # every payload is built before any timing starts
    for signal, payloads in zip(go, rounds, strict=True):
        signal.wait()
        start = time.monotonic()
        infos = [c.publish(device_topic(n, "telemetry"), payloads[i][s], qos=1)
                 for s in range(messages) for i, (c, n) in enumerate(zip(clients, names, strict=True))]
        for info in infos:
            info.wait_for_publish(120)
        done.put(time.monotonic() - start)
    for client in clients:
        client.disconnect()
    time.sleep(0.5)
    pool.stop()


def _raw(port: int, total: int, go: Any, done: Any) -> tuple[float, float]:
    """Phase 1: count messages with a plain subscriber; (seconds to the last one, publisher seconds)."""
    got, finished, subscribed = [0], threading.Event(), threading.Event()
    last = [0.0]

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        got[0] += 1
        if got[0] == total:
            last[0] = time.monotonic()
            finished.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-counter", protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    sub.subscribe(TELEMETRY_FILTER, qos=1)
    subscribed.wait(10)
    start = time.monotonic()
    go.set()
    if not finished.wait(600):
        raise RuntimeError(f"raw subscriber got {got[0]} of {total}")
    publish_s = float(done.get(timeout=600))
    sub.disconnect()
    sub.loop_stop()
    return last[0] - start, publish_s


def _ingest(port: int, db_url: str, total: int, go: Any, done: Any) -> tuple[float, float, dict[str, Any]]:
    """Phase 2: the ingest worker; (seconds to the last row committed, publisher seconds, worker stats)."""
    with IngestWorker(db_url, "127.0.0.1", port) as worker:
        start = time.monotonic()
        go.set()
        deadline = start + 600
        while worker.stats()["stored"] < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest stored {worker.stats()['stored']} of {total}")
            time.sleep(0.01)  # each poll takes the GIL from the worker: not too often
        seconds = time.monotonic() - start
        publish_s = float(done.get(timeout=600))
        stats = worker.stats()
    return seconds, publish_s, stats


def _worker_process(db_url: str, port: int, ready: Any, stop: Any, stored: Any) -> None:
    """One ingest worker of a shared-subscription group, in its own process; ``stored`` counts its rows."""
    with IngestWorker(db_url, "127.0.0.1", port) as worker:
        ready.set()
        while not stop.wait(0.01):
            stored.value = worker.stats()["stored"]
        stored.value = worker.stats()["stored"]


def _scaled(ctx: Any, workers: int, port: int, db_url: str, total: int, go: Any, done: Any) -> tuple[float, float]:
    """Phase 3: ``workers`` ingest processes sharing the telemetry (how ingestion scales out); (seconds to the
    last row committed, publisher seconds)."""
    stop = ctx.Event()
    procs, counters = [], []
    for _ in range(workers):
        ready, counter = ctx.Event(), ctx.Value("q", 0)
        proc = ctx.Process(target=_worker_process, args=(db_url, port, ready, stop, counter), daemon=True)
        proc.start()
        if not ready.wait(120):
            raise RuntimeError("an ingest worker process did not start")
        procs.append(proc)
        counters.append(counter)
    try:
        start = time.monotonic()
        go.set()
        deadline = start + 600
        while sum(c.value for c in counters) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{workers} workers stored {sum(c.value for c in counters)} of {total}")
            time.sleep(0.01)
        seconds = time.monotonic() - start
        return seconds, float(done.get(timeout=600))
    finally:
        stop.set()
        for proc in procs:
            proc.join(30)


def _enroll(db_url: str, names: list[str]) -> None:
    """What enrollment writes: one ``devices`` row per device."""
    from edgeml.fleet.store.db import Database

    db = Database(db_url)
    try:
        db.create()
        with db.transaction() as conn:
            conn.execute(db.tables["devices"].insert(), [{"device_id": n, "revoked": False} for n in names])
    finally:
        db.close()


def measure(devices: int, messages: int, db_url: str | None, workers: int = 2) -> dict[str, Any]:
    """Both phases against one broker and the same publisher connections; returns the measurements.

    ``db_url`` None: SQLite in a temporary directory.
    """
    root = Path(tempfile.mkdtemp(prefix="edgeml-ingest-bench-"))
    root.chmod(0o755)
    try:
        (root / "broker").mkdir()
        (root / "broker" / "mosquitto.conf").write_text(
            "listener 1883\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 0\n")
        url = db_url or f"sqlite:///{root / 'fleet.db'}"
        run_id = uuid.uuid4().hex[:6]
        names = [f"bench-{run_id}-{i}" for i in range(devices)]
        _enroll(url, names)  # the worker stores only enrolled devices' telemetry (not timed)
        total = devices * messages
        ctx = mp.get_context("spawn")
        ready, done = ctx.Event(), ctx.Queue()
        go = [ctx.Event() for _ in range(3 if workers > 1 else 2)]
        with run_mosquitto(root / "broker") as port:
            proc = ctx.Process(target=_publisher, args=(names, port, messages, ready, go, done), daemon=True)
            proc.start()
            if not ready.wait(120):
                raise RuntimeError("publishers did not connect")
            raw_s, raw_pub_s = _raw(port, total, go[0], done)
            ingest_s, ingest_pub_s, stats = _ingest(port, url, total, go[1], done)
            scaled_s = _scaled(ctx, workers, port, url, total, go[2], done)[0] if workers > 1 else None
            proc.join(60)
        return {"devices": devices, "messages": messages, "backend": url.split(":", 1)[0].split("+", 1)[0],
                "raw_s": raw_s, "raw_pub_s": raw_pub_s, "ingest_s": ingest_s, "ingest_pub_s": ingest_pub_s,
                "stats": stats, "ratio": raw_s / ingest_s, "workers": workers, "scaled_s": scaled_s,
                "scaled_ratio": raw_s / scaled_s if scaled_s else None}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(devices: int, messages: int, db_url: str | None) -> str:
    """Measure, and return the results as a markdown table."""
    m = measure(devices, messages, db_url)
    return _table(devices, messages, m["backend"], m["raw_s"], m["raw_pub_s"], m["ingest_s"], m["ingest_pub_s"],
                  m["stats"])


def _table(devices: int, messages: int, backend: str, raw_s: float, raw_pub_s: float, ingest_s: float,
           ingest_pub_s: float, stats: dict[str, Any]) -> str:
    total = devices * messages
    ratio = raw_s / ingest_s
    lines = [
        f"Host: {platform.machine()}, Python {platform.python_version()}, {devices} devices x {messages} messages "
        f"(QoS 1), store: {backend}, {time.strftime('%Y-%m-%d')}",
        "",
        "| phase | messages | seconds | msgs/s | publishers' seconds | vs raw |",
        "|---|---|---|---|---|---|",
        f"| raw paho QoS 1 subscriber (counts only) | {total} | {raw_s:.2f} | {total / raw_s:,.0f} | "
        f"{raw_pub_s:.2f} | 1.00x |",
        f"| ingest worker into {backend} (stored, acknowledged) | {stats['stored']} | {ingest_s:.2f} | "
        f"{total / ingest_s:,.0f} | {ingest_pub_s:.2f} | {ratio:.2f}x |",
        "",
        f"- ingest rate vs raw: {ratio:.0%} (goal >= {GOAL:.0%}) {'MET' if ratio >= GOAL else 'MISSED'}",
        f"- worker: {stats['batches']} batches ({stats['stored'] / max(stats['batches'], 1):.0f} rows each), "
        f"{stats['acks']} acks sent, {stats['duplicates']} duplicates, rejected {stats['rejected'] or 0}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--messages", type=int, default=100, help="messages per device")
    parser.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: SQLite in a temporary directory)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    table = run(args.devices, args.messages, args.db_url)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
