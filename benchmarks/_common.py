"""Helpers shared by the fleet benchmarks: the test broker's config, a bundle with golden vectors, a helper
distribution service process, resident memory of processes, a raw fan-out receiver.

Not a benchmark itself; imported by ``simulate_bench.py`` and ``fleet_bench.py``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.fleet.mosquitto: the test broker

from edgeml.bundle import Manifest, TensorSpec
from edgeml.bundle_writer import write_bundle
from edgeml.fleet.registry.distribution import DistributionService

__all__ = ["BROKER_CONF", "RemoteDistribution", "cpu_s", "golden_bundle", "pids_running", "raw_receivers", "rss_mib",
           "service_process", "write_broker_conf"]

#: Mosquitto settings for many devices: no Nagle, deep queues, 100 QoS 1 messages in flight per client.
BROKER_CONF = ("listener 1883\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 100000\n"
               "max_inflight_messages 100\n")


def write_broker_conf(broker_dir: Path, conf: str = BROKER_CONF) -> Path:
    """Create ``broker_dir`` with a ``mosquitto.conf`` (for :func:`tests.fleet.mosquitto.run_mosquitto`)."""
    broker_dir.mkdir(parents=True, exist_ok=True)
    (broker_dir / "mosquitto.conf").write_text(conf)
    return broker_dir


def golden_bundle(work: Path, size: int, *, name: str = "bench", version: str = "1.0.0",
                  target: str = "onnx") -> Path:
    """A bundle of ``size`` random model bytes plus 8 golden vectors (so that the smoke test passes with the
    stand-in runtime), written under ``work``; returns its path."""
    src = work / f"src-{name}-{version}-{target}"
    src.mkdir(parents=True)
    (src / "model.onnx").write_bytes(os.urandom(size))
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    np.savez(src / "golden.npz", **{"in:input": x, "out:output": x[:, :2] * 2})
    manifest = Manifest(
        name=name, version=version, target=target,
        runtime={"name": "onnxruntime", "min_version": "1.17", "precision": "fp32", "build": None},
        model={"file": "model.onnx", "format": "onnx"}, inputs=(TensorSpec("input", ("batch", 4), "float32"),),
        outputs=(TensorSpec("output", ("batch", 2), "float32"),),
        golden={"file": "golden.npz", "count": 8, "atol": 1e-4, "rtol": 0.0, "top1": True},
        created="2026-01-01T00:00:00+00:00")
    dest = work / manifest.filename
    write_bundle(dest, manifest, {"model.onnx": src / "model.onnx", "golden.npz": src / "golden.npz"})
    return dest


def service_process(registry_dir: str, port: int, stop: Any, calls: Any = None) -> None:
    """A distribution service (share group ``dist``) in a process of its own, until ``stop``.

    ``calls``: one end of a :func:`multiprocessing.Pipe` on which ``(method, args)`` asks this service to
    run ``broadcast`` or ``unbroadcast`` (see :class:`RemoteDistribution`); the result (or the exception)
    is sent back.
    """
    with DistributionService(Path(registry_dir), "127.0.0.1", port, share_group="dist") as service:
        while not stop.is_set():
            if calls is None:
                stop.wait(1.0)
            elif calls.poll(0.05):
                method, args = calls.recv()
                try:
                    calls.send(getattr(service, method)(*args) if method in ("broadcast", "unbroadcast") else
                               ValueError(f"no such call {method!r}"))
                except Exception as exc:  # handed to the caller, which raises it
                    calls.send(exc)


class RemoteDistribution:
    """``broadcast`` and ``unbroadcast`` of a :class:`DistributionService` run by :func:`service_process` in
    another process (what :class:`~edgeml.fleet.rollouts.controller.RolloutController` calls on its ``dist``), so that
    the process of the controller does not also answer the devices' get requests."""

    def __init__(self, calls: Any) -> None:
        self._calls = calls
        self._lock = threading.Lock()

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            self._calls.send((method, args))
            out = self._calls.recv()
        if isinstance(out, Exception):
            raise out
        return out

    def broadcast(self, rollout_id: str, paths: list[str], *args: Any) -> Any:
        return self._call("broadcast", rollout_id, paths, *args)

    def unbroadcast(self, rollout_id: str, infos: list[Any], *args: Any) -> None:
        self._call("unbroadcast", rollout_id, infos, *args)


def rss_mib(pids: list[int]) -> float:
    """Resident memory of ``pids`` together, in MiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/statm") as fh:
            total += int(fh.read().split()[1])
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by ``pids`` together (threads included, children not)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def pids_running(needle: str) -> list[int]:
    """Processes whose command line contains ``needle`` (e.g. the broker started with a conf under a folder)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle.encode() in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def raw_receivers(names: list[str], port: int, topic: str, size: int, ready: Any, go: Any, results: Any) -> None:
    """A process of raw receivers (the fan-out base): one connection per name, all on one network thread,
    each subscribed to ``topic`` at QoS 1 counting bytes; after ``go`` puts the time the last of them held
    ``size`` bytes on ``results``."""
    from edgeml.fleet.sim.mqtt_pool import ClientPool

    pool = ClientPool()
    pool.start()
    got = [0] * len(names)
    finished: list[float] = []
    done = threading.Semaphore(0)
    subscribed = threading.Semaphore(0)
    clients = []
    for i, name in enumerate(names):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)

        def on_raw(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage, i: int = i) -> None:
            got[i] += len(msg.payload)
            if got[i] == size:
                finished.append(time.monotonic())
                done.release()

        client.on_message = on_raw
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        client.on_subscribe = lambda *a: subscribed.release()
        client.connect("127.0.0.1", port, keepalive=120)
        pool.add(client)
        clients.append(client)
    for _ in names:
        if not subscribed.acquire(timeout=60):
            raise RuntimeError("raw receivers did not subscribe within 60 s")
    ready.put(len(names))
    go.wait()
    for _ in names:
        if not done.acquire(timeout=300):
            raise RuntimeError("raw receivers did not get every byte within 300 s")
    results.put(max(finished))
    for client in clients:
        client.disconnect()
    time.sleep(0.3)
    pool.stop()


def publish_raw(port: int, topic: str, data: bytes, chunk: int, go: Any) -> float:
    """The raw fan-out's sender: ``data`` in ``chunk``-byte QoS 1 messages on ``topic``, once ``go`` is set
    here; returns when the timing started (the receivers report when they got the last byte)."""
    import paho.mqtt.client as mqtt

    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-raw")
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    try:
        time.sleep(0.5)  # CONNACK
        go.set()
        start = time.monotonic()
        sent = [publisher.publish(topic, data[o:o + chunk], qos=1) for o in range(0, len(data), chunk)]
        for message in sent:
            message.wait_for_publish(120)
        return start
    finally:
        publisher.disconnect()
        publisher.loop_stop()
