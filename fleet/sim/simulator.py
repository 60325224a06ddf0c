"""A fleet simulator: N lightweight devices in one process (or a few), each speaking the real device protocol.

Every simulated device is its own MQTT connection (all of a process's connections driven by one
:class:`~edgeml.fleet.sim.mqtt_pool.ClientPool` thread) with its own state directory, TUF metadata, telemetry
outbox and update record, and it answers commands through the agent's own
:class:`~edgeml.edge_agent.session.DeviceSession` (the same code, with a :class:`SessionPolicy` of its own): a
retained ``State`` (with a last will ``offline``), ``update`` commands run through the real
:class:`~edgeml.edge_agent.update.machine.UpdateMachine` (download over :class:`MqttFetcher` with the
broadcast hint, TUF and bundle verification, staging into A/B slots, golden-vector smoke test, switch,
probation judged on live numbers, commit or rollback), ``rollback``, ``ping``, ``capture`` and
``telemetry-ack``, and telemetry through the real outbox and :class:`TelemetrySender`.

What differs from the agent, on purpose:

* The runtime: by default a **stand-in runtime (fixed latency)**, :class:`SimRuntime`, which sleeps a fixed
  time and answers with the bundle's golden outputs (so the smoke test passes) instead of running the
  model; ``Knobs(standin=False)`` runs the runtime the bundle names. Each device's update machine is given
  the device's runtime factory (:meth:`SimDevice.open_runtime`); nothing global is replaced.
* Traffic is synthetic: each serving device gets ``rps`` requests per second, made of its model's golden
  inputs, run on its model and counted in its :class:`ModelHost` health numbers and telemetry (so probation
  judges real counts, errors and confidence). With the stand-in, a live request does not sleep: its nominal
  latency is recorded (see :meth:`SimDevice.serve`); the smoke test's latency baseline does sleep.
* Drift is not computed from inputs: a device chosen to drift reports ``drift_score`` (flagged) for the
  misbehaving versions and 0 otherwise, to the health judge and in telemetry.
* Its session policy: downloads at once are bounded per process (``fetch_slots``); the clock counts as
  synchronised; ``capture`` answers that nothing was captured; an update's end is also kept in
  :attr:`SimDevice.outcomes`; stopping the simulator stops an update where it is (its record resumes it).
  Commands are handled on the pool's network thread; a dropped connection is not re-established; no local
  HTTP API, capture store or systemd notification.

Misbehaviour is chosen deterministically (:class:`Knobs`): for each knob, exactly ``round(fraction * n)``
devices, the first ones in an order given by a seeded hash of their index, misbehave on the versions named
in ``bad_versions`` (every version when empty).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgeml.errors import ConfigError, EdgeMLError
from edgeml.fleet.sim.device import SimDevice, SimRuntime, _Clock
from edgeml.fleet.sim.knobs import JETSON, PI, REAL_LABEL, STANDIN_LABEL, DeviceProfile, Knobs, parse_tags
from edgeml.protocol import ProtocolError, device_topic

__all__ = ["JETSON", "PI", "REAL_LABEL", "STANDIN_LABEL", "DeviceProfile", "Knobs", "SimDevice", "SimRuntime",
           "Simulator", "parse_tags"]

_log = logging.getLogger(__name__)
_TICK_S = 0.1  # the traffic scheduler's period


class Simulator:
    """N simulated devices on one broker, in this process or spread over ``processes`` worker processes.

    Example::

        with Simulator("127.0.0.1", 1883, root, 200, Knobs(fail=0.3, bad_versions=("2.0.0",))) as sim:
            ...  # the fleet sends update commands; sim.devices, sim.summary()

    Args:
        broker_host: The broker's host (plain TCP, anonymous).
        port: Its port.
        root: The registry's trusted root metadata (bytes of ``1.root.json``) every device starts from.
        n: How many devices.
        knobs: How they behave (default: :class:`Knobs()`, all healthy, stand-in runtime).
        workdir: Where device state lives (default: a new folder under /dev/shm when present, else the
            temporary directory, removed by :meth:`stop`).
        processes: Worker processes (1: every device in this process; more: none here, ``devices`` is empty).
        prefix: Device ids are ``{prefix}-{index:05d}``.

    Raises:
        ConfigError: A bad count, prefix or knob.
    """

    def __init__(self, broker_host: str, port: int, root: bytes, n: int, knobs: Knobs | None = None,
                 workdir: str | Path | None = None, processes: int = 1, prefix: str = "sim",
                 shard: tuple[int, ...] | None = None) -> None:
        if n < 1 or processes < 1:
            raise ConfigError(f"need at least one device and one process, got {n} and {processes}")
        try:
            device_topic(f"{prefix}-{n - 1:05d}", "state")
        except ProtocolError as exc:
            raise ConfigError(f"bad device id prefix {prefix!r}: {exc.message}") from exc
        self.broker_host, self.port, self.root, self.n = broker_host, port, root, n
        self.knobs = (knobs or Knobs()).validated()
        self.processes, self.prefix = processes, prefix
        k = self.knobs
        self.label = f"{STANDIN_LABEL}, {k.latency_ms:g} ms per call" if k.standin else REAL_LABEL
        self._own_workdir = workdir is None
        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="edgeml-sim-", dir=shm))
        self.profiles = k.profiles(n, prefix)
        self._shard = shard if shard is not None else tuple(range(n))
        self.devices: list[SimDevice] = []
        self.stopping = threading.Event()
        self.clock = _Clock(self.stopping)
        self.fetch_slots = threading.BoundedSemaphore(k.fetch_concurrency)
        self._pool: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._ticker: threading.Thread | None = None
        self._children: list[Any] = []
        self._summaries: Any = None
        self._stop_children: Any = None

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> None:
        """Connect every device (each publishes its retained state) and start traffic and telemetry.

        Raises:
            ConfigError: Devices did not connect within ``timeout`` seconds.
        """
        if self.processes > 1:
            self._start_children(timeout)
            return
        from edgeml.fleet.sim.mqtt_pool import ClientPool

        self._pool = ClientPool()
        self._pool.start()
        for index in self._shard:
            device = SimDevice(self.profiles[index], self)
            self.devices.append(device)
            try:
                device.machine.boot()
                device.client.connect(self.broker_host, self.port, keepalive=60)
                sock = device.client.socket()
                if isinstance(sock, socket.socket):  # small requests must not wait for delayed ACKs (Nagle)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, EdgeMLError) as exc:
                self.stop()
                raise ConfigError(f"{device.device_id} cannot start: {exc}",
                                  hint="is the broker running on --broker-host/--broker-port?") from exc
            self._pool.add(device.client)
        deadline = time.monotonic() + timeout
        for device in self.devices:  # connected, and subscribed: a command sent once start() returns arrives
            if not (device.connected.wait(max(0.0, deadline - time.monotonic()))
                    and device.subscribed.wait(max(0.0, deadline - time.monotonic()))):
                self.stop()
                raise ConfigError(f"{device.device_id} did not connect within {timeout} s")
        self._executor = ThreadPoolExecutor(self.knobs.traffic_threads, thread_name_prefix="sim-traffic")
        self._ticker = threading.Thread(target=self._tick, name="sim-ticker", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        interval = self.knobs.telemetry_interval_s
        next_report = time.monotonic() + interval
        assert self._executor is not None
        while not self.stopping.wait(_TICK_S):
            owed = self.knobs.rps * _TICK_S
            for device in self.devices:
                count = device.owe(owed)
                if count:
                    self._executor.submit(device.serve, count)
            if time.monotonic() >= next_report:
                next_report += interval
                for device in self.devices:
                    self._executor.submit(self._report, device)

    @staticmethod
    def _report(device: SimDevice) -> None:
        try:
            device.report()
        except EdgeMLError as exc:
            _log.warning("%s: telemetry report failed: %s", device.device_id, exc)

    def summary(self) -> dict[str, Any]:
        """Devices by status, by serving version, by their latest update's end, and telemetry sent (of the
        devices in this process: with several processes, only :meth:`stop` returns the whole fleet's)."""
        return {
            "devices": len(self.devices), "runtime": self.label,
            "status": dict(Counter(d.status() for d in self.devices)),
            "versions": dict(Counter(d.host.active.version if d.host.active else "-" for d in self.devices)),
            "updates": dict(Counter(d.outcomes[-1]["state"] for d in self.devices if d.outcomes)),
            "telemetry_sent": sum(d.sender.published for d in self.devices),
        }

    def stop(self) -> dict[str, Any]:
        """Stop traffic and updates, say offline, disconnect; returns the final :meth:`summary`."""
        if self._children:
            summary = self._gather()
            self._cleanup()
            return summary
        summary = self.summary()
        self.stopping.set()
        if self._ticker is not None:
            self._ticker.join(10)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        for device in self.devices:
            try:
                device.close()
            except EdgeMLError as exc:
                _log.warning("%s: %s", device.device_id, exc)
        if self._pool is not None:
            time.sleep(0.3)  # let the pool send the last messages and the disconnects
            self._pool.stop()
            self._pool = None
        self.devices = []
        self._cleanup()
        return summary

    def _cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- several processes ----------------------------------------------------------------------------

    def _start_children(self, timeout: float) -> None:
        ctx = mp.get_context("spawn")
        ready, self._summaries, self._stop_children = ctx.Queue(), ctx.Queue(), ctx.Event()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for k in range(self.processes):
            shard = self._shard[k::self.processes]
            args = (self.broker_host, self.port, self.root, self.n, self.knobs, str(self.workdir), self.prefix, shard,
                    ready, self._summaries, self._stop_children)
            child = ctx.Process(target=_child_main, args=args, name=f"sim-{k}", daemon=True)
            child.start()
            self._children.append(child)
        for _ in self._children:
            try:
                error = ready.get(timeout=timeout)
            except Exception:
                error = f"a simulator process did not start within {timeout} s"
            if error:
                self._stop_children.set()
                raise ConfigError(str(error))

    def _gather(self) -> dict[str, Any]:
        """Stop the worker processes and merge the summaries each sends as it stops."""
        self._stop_children.set()
        out: dict[str, Any] = {"devices": 0, "runtime": self.label, "status": Counter(), "versions": Counter(),
                               "updates": Counter(), "telemetry_sent": 0}
        for _ in self._children:
            part = self._summaries.get(timeout=120)
            out["devices"] += part["devices"]
            out["telemetry_sent"] += part["telemetry_sent"]
            for key in ("status", "versions", "updates"):
                out[key].update(part[key])
        for child in self._children:
            child.join(30)
        self._children = []
        return {k: dict(v) if isinstance(v, Counter) else v for k, v in out.items()}


def _child_main(host: str, port: int, root: bytes, n: int, knobs: Knobs, workdir: str, prefix: str,
                shard: tuple[int, ...], ready: Any, summaries: Any, stop: Any) -> None:
    """A worker process: its shard of the devices, until ``stop``."""
    if knobs.nice:
        os.nice(knobs.nice)
    sim = Simulator(host, port, root, n, knobs, workdir, 1, prefix, shard=shard)
    try:
        sim.start()
    except EdgeMLError as exc:
        ready.put(exc.message)
        return
    ready.put("")
    parent = os.getppid()
    while not stop.wait(1.0):
        if os.getppid() != parent:  # the simulator was killed (SIGKILL leaves no time to say stop): end too
            sim.stop()
            return
    summaries.put(sim.stop())
