"""A fleet simulator: N lightweight devices in one process (or a few), each speaking the real device protocol.

Every simulated device is its own MQTT connection (all of a process's connections driven by one
:class:`~edgeml.fleet.mqtt_pool.ClientPool` thread) with its own state directory, TUF metadata, telemetry
outbox and update record, and it answers commands as :class:`~edgeml.edge_agent.agent.Agent` does: a
retained ``State`` (with a last will ``offline``), ``update`` commands run through the real
:class:`~edgeml.edge_agent.update.machine.UpdateMachine` (download over :class:`MqttFetcher` with the
broadcast hint, TUF and bundle verification, staging into A/B slots, golden-vector smoke test, switch,
probation judged on live numbers, commit or rollback), ``rollback``, ``ping``, ``capture`` and
``telemetry-ack``, and telemetry through the real outbox and :class:`TelemetrySender`.

What differs from the agent, on purpose:

* The runtime: by default a **stand-in runtime (fixed latency)**, :class:`SimRuntime`, which sleeps a fixed
  time and answers with the bundle's golden outputs (so the smoke test passes) instead of running the
  model; ``Knobs(standin=False)`` runs the runtime the bundle names. The simulator routes models loaded
  from its devices' slots to it by wrapping :func:`edgeml.edge_agent.serving.open_runtime` for paths under
  their state directories only (the update machine has no runtime-factory parameter yet).
* Traffic is synthetic: each serving device gets ``rps`` requests per second, made of its model's golden
  inputs, run on its model and counted in its :class:`ModelHost` health numbers and telemetry (so probation
  judges real counts, errors and confidence). With the stand-in, a live request does not sleep: its nominal
  latency is recorded (see :meth:`SimDevice.serve`); the smoke test's latency baseline does sleep.
* Drift is not computed from inputs: a device chosen to drift reports ``drift_score`` (flagged) for the
  misbehaving versions and 0 otherwise, to the health judge and in telemetry.
* Updates run in a thread per updating device (not one idle worker per device); commands are handled on
  the pool's network thread; rejected commands are reported without the agent's rate limit; a dropped
  connection is not re-established; the clock counts as synchronised; no local HTTP API, capture store or
  systemd notification.

Misbehaviour is chosen deterministically (:class:`Knobs`): for each knob, exactly ``round(fraction * n)``
devices, the first ones in an order given by a seeded hash of their index, misbehave on the versions named
in ``bad_versions`` (every version when empty).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from edgeml.bundle import MANIFEST_NAME, Manifest
from edgeml.edge_agent import serving
from edgeml.edge_agent.capabilities import Capabilities
from edgeml.edge_agent.device_messages import ack_seq, event_payload, rollback_reason, state_message, update_request
from edgeml.edge_agent.mqtt_fetcher import METADATA_URL, TARGETS_URL, MqttFetcher
from edgeml.edge_agent.outbox import Outbox
from edgeml.edge_agent.runtimes.base import RUNTIMES, Runtime
from edgeml.edge_agent.telemetry import Aggregator, TelemetrySender
from edgeml.edge_agent.tuf_client import TufClient, VerifiedBundle
from edgeml.edge_agent.update.machine import UpdateMachine
from edgeml.edge_agent.update.states import State
from edgeml.edge_agent.update.store import UpdateRecord, UpdateRequest
from edgeml.errors import ConfigError, EdgeMLError, RuntimeBackendError
from edgeml.protocol import Command, ProtocolError, device_topic, parse

__all__ = ["JETSON", "PI", "REAL_LABEL", "STANDIN_LABEL", "DeviceProfile", "Knobs", "SimDevice", "SimRuntime",
           "Simulator", "parse_tags"]

_log = logging.getLogger(__name__)

STANDIN_LABEL = "stand-in runtime (fixed latency)"
REAL_LABEL = "real runtime (the one each bundle names)"
#: A Raspberry Pi as the simulator presents it: LiteRT only, no GPU.
PI = Capabilities(runtimes={"litert": "2.16.1"}, arch="aarch64")
#: A Jetson: onnxruntime with the GPU providers and TensorRT.
JETSON = Capabilities(runtimes={"onnxruntime": "1.20.1", "tensorrt": "10.3.0"}, arch="aarch64",
                      compute_capability="8.7", l4t="36.4.0",
                      providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
_TICK_S = 0.1  # the traffic scheduler's period
RUNTIMES.setdefault("sim", "edgeml.fleet.simulate:SimRuntime")  # bundles may name the stand-in directly


def parse_tags(items: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``["site=a,b", "hw=x"]`` -> ``(("site", ("a", "b")), ("hw", ("x",)))``.

    Raises:
        ConfigError: An item is not ``KEY=VALUE[,VALUE...]``.
    """
    out = []
    for item in items:
        key, sep, values = item.partition("=")
        choices = tuple(v for v in values.split(",") if v)
        if not sep or not key or not choices:
            raise ConfigError(f"bad tag distribution {item!r}", hint="use KEY=VALUE[,VALUE...], e.g. site=lab,field")
        out.append((key, choices))
    return tuple(out)


@dataclass(frozen=True)
class Knobs:
    """How the simulated fleet behaves. Fractions choose exactly ``round(fraction * n)`` devices.

    Attributes:
        fail: Fraction of devices whose misbehaving versions fail (see ``fail_mode``).
        fail_mode: ``"smoke"``: wrong outputs on the golden vectors (the update ends ``failed``);
            ``"errors"``: every live request fails (probation ends ``rolled_back`` on the error rate).
        slow: Fraction of devices on which misbehaving versions are ``slow_factor`` times slower.
        slow_factor: Latency multiplier of a slow device (p99 included).
        drift: Fraction of devices that report drift (``drift_score``, flagged) on misbehaving versions.
        drift_score: The drift score such a device reports.
        bad_versions: The versions that misbehave on the chosen devices (empty: every version).
        pi_fraction: Fraction of devices with :data:`PI` capabilities (the others: :data:`JETSON`).
        tags: Tag distributions ``((key, (value, ...)), ...)``: each device gets one value per key.
        seed: Seed of every choice.
        standin: Use :class:`SimRuntime` (True) or the runtime each bundle names (False).
        latency_ms: The stand-in runtime's latency per call, in milliseconds.
        rps: Synthetic requests per second per serving device.
        telemetry_interval_s: Seconds between telemetry reports.
        fetch_concurrency: Downloads in flight at once per process (the others wait their turn).
        poll_s: How often probation looks at the health numbers.
        traffic_threads: Threads that run the synthetic requests, per process.
    """

    fail: float = 0.0
    fail_mode: str = "smoke"
    slow: float = 0.0
    slow_factor: float = 2.0
    drift: float = 0.0
    drift_score: float = 0.9
    bad_versions: tuple[str, ...] = ()
    pi_fraction: float = 0.0
    tags: tuple[tuple[str, tuple[str, ...]], ...] = ()
    seed: int = 0
    standin: bool = True
    latency_ms: float = 2.0
    rps: float = 5.0
    telemetry_interval_s: float = 5.0
    fetch_concurrency: int = 32
    poll_s: float = 0.2
    traffic_threads: int = 16

    def validated(self) -> Knobs:
        """These knobs, after checking them.

        Raises:
            ConfigError: A fraction outside 0..1, an unknown fail mode or a non-positive rate or size.
        """
        for name in ("fail", "slow", "drift", "pi_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a fraction within 0..1, got {value}")
        if self.fail_mode not in ("smoke", "errors"):
            raise ConfigError(f"unknown fail mode {self.fail_mode!r}", hint="use smoke or errors")
        if self.slow_factor < 1.0 or self.latency_ms < 0 or self.rps < 0:
            raise ConfigError("slow factor must be >= 1, latency and rps >= 0")
        if self.telemetry_interval_s <= 0 or min(self.fetch_concurrency, self.traffic_threads) < 1 or self.poll_s <= 0:
            raise ConfigError("telemetry interval and poll must be > 0, concurrency and threads >= 1")
        return self

    def _rank(self, kind: str, index: int) -> bytes:
        return hashlib.sha256(f"{self.seed}:{kind}:{index}".encode()).digest()

    def chosen(self, kind: str, fraction: float, n: int) -> frozenset[int]:
        """Exactly ``round(fraction * n)`` device indices for ``kind``, the same for the same seed."""
        order = sorted(range(n), key=lambda i: self._rank(kind, i))
        return frozenset(order[:round(fraction * n)])

    def profiles(self, n: int, prefix: str) -> list[DeviceProfile]:
        """Every device's identity, capabilities, tags and faults."""
        sets = {k: self.chosen(k, getattr(self, k), n) for k in ("fail", "slow", "drift")}
        pis = self.chosen("pi", self.pi_fraction, n)
        out = []
        for i in range(n):
            tags = {key: values[int.from_bytes(self._rank(f"tag:{key}", i)[:4], "big") % len(values)]
                    for key, values in self.tags}
            faults = frozenset(k for k, members in sets.items() if i in members)
            out.append(DeviceProfile(i, f"{prefix}-{i:05d}", PI if i in pis else JETSON, tags, faults))
        return out


@dataclass(frozen=True)
class DeviceProfile:
    """One simulated device's identity and faults.

    Attributes:
        index: Its index in the fleet (0..n-1).
        device_id: Its id (``{prefix}-{index:05d}``).
        capabilities: What it reports it can run.
        tags: Its tags (reported in the state's capabilities under ``"tags"``).
        faults: Which of ``fail``, ``slow``, ``drift`` it shows on misbehaving versions.
    """

    index: int
    device_id: str
    capabilities: Capabilities
    tags: dict[str, str] = field(default_factory=dict)
    faults: frozenset[str] = frozenset()


class SimRuntime(Runtime):
    """The stand-in runtime: sleeps ``latency_ms`` per call and answers with the bundle's golden outputs.

    A golden input row gets its golden output row; any other row a golden output row chosen by a hash of
    its bytes; a bundle without golden vectors gets zeros of the manifest's output shapes. The model file
    itself is never read (it only has to exist).
    """

    name = "sim"

    def __init__(self, model_path: str | Path, *, threads: int = 0, latency_ms: float = 2.0, **options: Any) -> None:
        super().__init__(model_path, threads=threads, **options)
        self.latency_s = latency_ms / 1000.0
        self._rows: dict[bytes, int] = {}
        self._golden: dict[str, np.ndarray] = {}
        self._manifest: Manifest | None = None

    def _load_impl(self) -> None:
        slot = self.model_path.parent
        self._manifest = Manifest.from_dict(json.loads((slot / MANIFEST_NAME).read_bytes()))
        golden = self._manifest.golden
        if golden:
            with np.load(slot / golden["file"]) as data:
                first = next(data[k] for k in data.files if k.startswith("in:"))
                self._golden = {k[4:]: data[k] for k in data.files if k.startswith("out:")}
            self._rows = {np.ascontiguousarray(row).tobytes(): i for i, row in enumerate(first)}

    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.latency_s > 0 and not getattr(_live, "on", False):  # live traffic records it instead
            time.sleep(self.latency_s)
        first = np.asarray(next(iter(inputs.values())))
        batch = len(first) if first.ndim else 1
        assert self._manifest is not None
        if not self._golden:
            return {s.name: np.zeros((batch, *[d if isinstance(d, int) else 1 for d in s.shape[1:]]), s.dtype)
                    for s in self._manifest.outputs}
        n = len(self._rows) or 1
        index = [self._rows.get(raw, int.from_bytes(hashlib.blake2b(raw, digest_size=4).digest(), "big") % n)
                 for raw in (np.ascontiguousarray(row).tobytes() for row in first.reshape(batch, -1))]
        return {name: out[index] for name, out in self._golden.items()}


_live = threading.local()  # set while a device's synthetic traffic runs (the "errors" fault hits only that)


class _DeviceRuntime(Runtime):
    """A device's runtime (stand-in or real) with the device's faults applied on misbehaving versions."""

    def __init__(self, inner: Runtime, device: SimDevice) -> None:
        super().__init__(inner.model_path, threads=inner.threads)
        self.inner, self.device = inner, device
        self.name = inner.name
        self.faults: frozenset[str] = frozenset()

    def _load_impl(self) -> None:
        self.inner.load()
        manifest = json.loads((self.model_path.parent / MANIFEST_NAME).read_bytes())
        self.faults = self.device.faults_for(str(manifest.get("version")))

    def fixed_batch(self) -> int | None:
        return self.inner.fixed_batch()

    @property
    def nominal_s(self) -> float | None:
        """The stand-in's latency per call on this device and version (None for a real runtime)."""
        if not isinstance(self.inner, SimRuntime):
            return None
        return self.inner.latency_s * (self.device.sim.knobs.slow_factor if "slow" in self.faults else 1.0)

    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        outputs = self.inner.infer(inputs)
        knobs, live = self.device.sim.knobs, getattr(_live, "on", False)
        if "slow" in self.faults and not (live and self.nominal_s is not None):
            time.sleep((time.perf_counter() - start) * (knobs.slow_factor - 1.0))
        if "fail" in self.faults and knobs.fail_mode == "errors" and live:
            raise RuntimeBackendError("simulated fault: this version fails on live data")
        if "fail" in self.faults and knobs.fail_mode == "smoke" and not live:
            outputs = {k: np.roll(v, 1, axis=-1) + 1.0 for k, v in outputs.items()}
        return outputs

    def _unload_impl(self) -> None:
        self.inner.unload()


_devices_by_dir: dict[Path, SimDevice] = {}  # state directory -> simulated device (the runtime routing)
_original_open_runtime = serving.open_runtime


def _open_runtime(name: str, model_path: str | Path, *, threads: int = 0, **options: Any) -> Runtime:
    """:func:`serving.open_runtime` for every model; a simulated device's model gets its device runtime."""
    path = Path(model_path)
    device = next((_devices_by_dir[p] for p in path.parents if p in _devices_by_dir), None)
    if device is None:
        return _original_open_runtime(name, model_path, threads=threads, **options)
    knobs = device.sim.knobs
    inner = SimRuntime(path, threads=threads, latency_ms=knobs.latency_ms) if knobs.standin \
        else _original_open_runtime(name, model_path, threads=threads, **options)
    return _DeviceRuntime(inner, device)


class _Stopped(Exception):
    """The simulator stops: an update stops where it is (its record resumes it, as after a power cut)."""


@dataclass
class _Clock:
    stopping: threading.Event

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if self.stopping.wait(seconds):
            raise _Stopped


class SimDevice:
    """One simulated device (see the module docstring for what differs from the real agent).

    Args:
        profile: Its identity and faults.
        sim: The simulator it belongs to (broker, trusted root, knobs, shared pools).
    """

    def __init__(self, profile: DeviceProfile, sim: Simulator) -> None:
        self.profile, self.sim = profile, sim
        self.device_id = profile.device_id
        self.state_dir = (sim.workdir / self.device_id).absolute()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _devices_by_dir[self.state_dir] = self
        self.host = serving.ModelHost([self._observe])
        self.machine = UpdateMachine(self.state_dir, self.host, self._fetch, clock=sim.clock, drift=self.drift,
                                     on_transition=self._on_transition, poll_s=sim.knobs.poll_s)
        self.aggregator = Aggregator()
        self.outbox = Outbox(self.state_dir / "telemetry.sqlite", self.device_id)
        self.client = self._mqtt_client()
        self.sender = TelemetrySender(self.client, self.device_id, self.outbox)
        self.connected = threading.Event()
        self.updating = False
        self.outcomes: list[dict[str, Any]] = []  # terminal update events, in order
        self._fetcher: MqttFetcher | None = None
        self._pending: list[tuple[Command, UpdateRequest]] = []
        self._lock = threading.Lock()
        self._inputs: tuple[str, dict[str, np.ndarray]] | None = None
        self._row = 0
        self._owed = 0.0
        self._busy = False

    # --- connection and state ---------------------------------------------------------------------------

    def _mqtt_client(self) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device_id, clean_session=False)
        offline = state_message(self.device_id, "offline", None, self.capabilities(), False)
        client.will_set(device_topic(self.device_id, "state"), offline.to_bytes(), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *a: self.connected.clear()
        client.message_callback_add(device_topic(self.device_id, "commands"), self._on_command)
        return client

    def capabilities(self) -> dict[str, Any]:
        """The capabilities it reports (with its tags under ``"tags"``)."""
        return {**self.profile.capabilities.to_dict(), "tags": dict(self.profile.tags)}

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            _log.error("%s: the broker refused the connection: %s", self.device_id, reason)
            return
        client.subscribe(device_topic(self.device_id, "commands"), qos=1)
        self.connected.set()
        self.publish_state()
        self.sender.on_connect()

    def status(self) -> str:
        """``updating``, ``serving`` or ``idle``, as the agent reports it."""
        return "updating" if self.updating else "serving" if self.host.active is not None else "idle"

    def publish_state(self, status: str | None = None) -> None:
        """Publish the retained state message."""
        message = state_message(self.device_id, status or self.status(), self.host.active, self.capabilities(), True)
        self.client.publish(device_topic(self.device_id, "state"), message.to_bytes(), qos=1, retain=True)

    def event(self, kind: str, **fields: Any) -> None:
        """Publish an event on the device's events topic."""
        self.client.publish(device_topic(self.device_id, "events"), event_payload(self.device_id, kind, **fields),
                            qos=1)

    # --- commands -----------------------------------------------------------------------------------------

    def _on_command(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            command = parse("command", bytes(msg.payload))
            assert isinstance(command, Command)
            self.handle(command)
        except ProtocolError as exc:
            self.event("rejected", reason=str(exc)[:500], suppressed=0)
        except Exception:
            _log.exception("%s: command handling failed", self.device_id)
            self.event("rejected", reason="internal error", suppressed=0)

    def handle(self, command: Command) -> None:
        """Act on one validated command, as the agent does (never blocks on an update).

        Raises:
            ProtocolError: Its arguments are malformed.
        """
        if command.type == "telemetry-ack":
            self.sender.on_ack(ack_seq(command))
        elif command.type == "ping":
            self.event("pong", id=command.id)
        elif command.type == "update":
            self._accept_update(command)
        elif command.type == "rollback":
            self.event("rollback", id=command.id, accepted=self.machine.request_rollback(rollback_reason(command)))
        elif command.type == "capture":
            self.event("capture", id=command.id, entries=0, bytes=0)

    def _accept_update(self, command: Command) -> None:
        request = update_request(command)
        runtime = command.args.get("runtime")
        why = self.profile.capabilities.incompatibility(runtime) if isinstance(runtime, dict) else None
        if why is not None:
            self._update_event(request, "incompatible", reason=why)
            return
        with self._lock:
            self._pending.append((command, request))
            if self.updating:
                return
            self.updating = True
        threading.Thread(target=self._update_worker, name=f"sim-update-{self.device_id}", daemon=True).start()

    def _update_event(self, request: UpdateRequest, state: str, **fields: Any) -> None:
        self.event("update", id=request.id, rollout=request.rollout, model=request.model, version=request.version,
                   target=request.target, state=state, **fields)

    # --- updates ----------------------------------------------------------------------------------------

    def _update_worker(self) -> None:
        while True:
            with self._lock:
                if not self._pending or self.sim.stopping.is_set():
                    self._pending.clear()
                    self.updating = False
                    break
                command, request = self._pending.pop(0)
            try:
                self._listen_broadcast(command)
                self.machine.start(request)
            except ConfigError as exc:
                self._update_event(request, "busy", reason=exc.message)
            except _Stopped:  # the record resumes the update if this state directory is used again
                break
            except Exception:
                _log.exception("%s: the update failed", self.device_id)
        self.publish_state()

    def _ensure_fetcher(self) -> MqttFetcher:
        if self._fetcher is None:
            if not self.connected.wait(30):
                raise EdgeMLError("not connected to the broker; the download will be retried")
            self._fetcher = MqttFetcher(self.client, self.device_id, timeout=30, partial_dir=self.state_dir / "partial")
        return self._fetcher

    def _listen_broadcast(self, command: Command) -> None:
        hint = command.args.get("broadcast")
        if not isinstance(hint, dict):
            if self._fetcher is not None:
                self._fetcher.broadcast = None
            return
        rollout, path = hint.get("rollout"), hint.get("path")
        if isinstance(rollout, str) and isinstance(path, str):
            try:
                fetcher = self._ensure_fetcher()
                fetcher.broadcast = rollout
                fetcher.listen(rollout, path)
            except Exception as exc:  # only a hint: the fetch falls back to get requests
                _log.warning("%s: cannot listen to broadcast %s: %s", self.device_id, rollout, exc)

    def _fetch(self, name: str, version: str, target: str) -> VerifiedBundle:
        with self.sim.fetch_slots:
            tuf = TufClient(self.sim.root, self.state_dir / "tuf", self.state_dir / "downloads", METADATA_URL,
                            TARGETS_URL, fetcher=self._ensure_fetcher())
            return tuf.fetch(name, version, target)

    def _on_transition(self, record: UpdateRecord, frm: State | None, event: str, to: State) -> None:
        doc = {"id": record.id, "rollout": record.rollout, "model": record.model, "version": record.version,
               "target": record.target, "state": to.value, "event": event, "reason": record.reason}
        self.event("update", **doc)
        if to in (State.COMMITTED, State.ROLLED_BACK, State.FAILED):
            self.outcomes.append(doc)
        if to in (State.SWITCH, State.COMMITTED, State.ROLLED_BACK, State.FAILED):
            self.publish_state()

    def faults_for(self, version: str) -> frozenset[str]:
        """The faults this device shows on ``version``."""
        bad = self.sim.knobs.bad_versions
        return self.profile.faults if not bad or version in bad else frozenset()

    def drift(self, version: str) -> float | None:
        """The drift score of ``version`` for the health judge (None before its first request)."""
        if self.host.stats(version).requests == 0:
            return None
        return self.sim.knobs.drift_score if "drift" in self.faults_for(version) else 0.0

    # --- traffic and telemetry ------------------------------------------------------------------------

    def _observe(self, version: str, inputs: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray] | None,
                 latency_s: float, ok: bool) -> None:
        self.aggregator.record(latency_s, ok)

    def owe(self, requests: float) -> int:
        """Add ``requests`` owed (fractions carry over); the whole number to serve now (0 while busy)."""
        if self.host.active is None:
            self._owed = 0.0
            return 0
        self._owed += requests
        if self._busy or self._owed < 1:
            return 0
        count, self._owed = int(self._owed), self._owed - int(self._owed)
        self._busy = True
        return count

    def serve(self, count: int) -> None:
        """Send ``count`` synthetic requests (golden inputs, one row each) to the active model.

        With the real runtime each goes through :meth:`ModelHost.predict` (wall-clock latency). With the
        stand-in, the request runs without sleeping and its nominal latency (the fixed latency, times the
        slow factor on a slow device) is recorded in the same health numbers: many devices share one
        interpreter here, and their wall-clock tail would measure the simulator's load, not the device's.
        """
        _live.on = True
        try:
            for _ in range(count):
                active = self.host.active
                if active is None:
                    return
                feeds = self._feeds(active)
                runtime = active.runtime
                if isinstance(runtime, _DeviceRuntime) and runtime.nominal_s is not None:
                    self._serve_virtual(active, runtime.nominal_s, feeds)
                else:
                    with contextlib.suppress(EdgeMLError):  # an error is counted by the host
                        self.host.predict(feeds)
        finally:
            _live.on = False
            self._busy = False

    def _serve_virtual(self, model: serving.LoadedModel, latency_s: float, feeds: dict[str, np.ndarray]) -> None:
        try:
            first: np.ndarray | None = next(iter(model.infer(feeds).values()))
        except EdgeMLError:
            first = None
        self.host.stats(model.version).record(latency_s, first is not None, first)
        self.aggregator.record(latency_s, first is not None)

    def _feeds(self, active: serving.LoadedModel) -> dict[str, np.ndarray]:
        cached = self._inputs
        if cached is None or cached[0] != active.version:
            manifest, feeds = active.manifest, {}
            golden = manifest.golden
            if golden:
                with np.load(self.machine.slots.path(active.slot) / golden["file"]) as data:
                    feeds = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
            if not feeds:
                feeds = {s.name: np.zeros((1, *[d if isinstance(d, int) else 1 for d in s.shape[1:]]), s.dtype)
                         for s in manifest.inputs}
            cached = self._inputs = (active.version, feeds)
            self._row = 0
        feeds = cached[1]
        n = len(next(iter(feeds.values())))
        self._row = (self._row + 1) % n
        return {k: v[self._row:self._row + 1] for k, v in feeds.items()}

    def report(self) -> None:
        """Append this interval's metrics to the outbox and send what may be sent."""
        active = self.host.active
        version = active.version if active else None
        score = self.drift(version) if version else None
        extra = {"model": active.manifest.name if active else None, "version": version,
                 "slot": active.slot if active else None, "status": self.status(),
                 "drift": None if score is None else {"score": score, "flagged": score > 0},
                 "dropped": self.outbox.dropped, "captured": 0, "simulated": True, "runtime": self.sim.label}
        self.sender.submit(self.aggregator.snapshot_and_reset(extra=extra))

    def close(self) -> None:
        """Say offline, disconnect and release everything (the state directory stays)."""
        self.publish_state("offline")
        self.client.disconnect()
        self.host.close()
        self.outbox.close()
        _devices_by_dir.pop(self.state_dir, None)


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
        from edgeml.fleet.mqtt_pool import ClientPool

        serving.open_runtime = _open_runtime  # routes only this simulator's slots
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
        for device in self.devices:
            if not device.connected.wait(max(0.0, deadline - time.monotonic())):
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
    sim = Simulator(host, port, root, n, knobs, workdir, 1, prefix, shard=shard)
    try:
        sim.start()
    except EdgeMLError as exc:
        ready.put(exc.message)
        return
    ready.put("")
    stop.wait()
    summaries.put(sim.stop())
