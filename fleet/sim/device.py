"""One simulated device (:class:`SimDevice`) and the stand-in runtime (:class:`SimRuntime`) of the fleet
simulator; :mod:`edgeml.fleet.sim.simulator` runs many of them and says what differs from the real agent."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as mqtt

from edgeml.bundle import MANIFEST_NAME, Manifest
from edgeml.edge_agent import serving
from edgeml.edge_agent.device_messages import (
    device_event,
    publish_event,
    publish_state,
    set_last_will,
    state_message,
)
from edgeml.edge_agent.outbox import Outbox
from edgeml.edge_agent.runtimes.base import Runtime, open_runtime
from edgeml.edge_agent.session import DeviceSession, SessionPolicy
from edgeml.edge_agent.telemetry import Aggregator, TelemetrySender
from edgeml.edge_agent.update.store import UpdateRecord
from edgeml.errors import EdgeMLError, RuntimeBackendError
from edgeml.fleet.sim.knobs import DeviceProfile
from edgeml.protocol import (
    CaptureEvent,
    Command,
    DeviceEvent,
    device_topic,
)

if TYPE_CHECKING:
    from edgeml.fleet.sim.simulator import Simulator

__all__ = ["SimDevice", "SimRuntime"]

_log = logging.getLogger(__name__)


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
        self.host = serving.ModelHost([self._observe])
        self.aggregator = Aggregator()
        self.outbox = Outbox(self.state_dir / "telemetry.sqlite", self.device_id)
        self.client = self._mqtt_client()
        self.sender = TelemetrySender(self.client, self.device_id, self.outbox)
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker confirmed the commands subscription
        self._commands_mid = -1
        self.outcomes: list[dict[str, Any]] = []  # terminal update records (as dicts), in order
        policy = SessionPolicy(trusted_root=sim.root, capabilities=lambda: profile.capabilities,
                               send_event=self.send_event, publish_state=self.publish_state, on_ack=self.sender.on_ack,
                               on_capture=self._on_capture, fetch_gate=lambda: sim.fetch_slots, stopped=(_Stopped,),
                               on_outcome=self._on_outcome)
        self.session = DeviceSession(self.device_id, self.state_dir, self.client, self.connected, self.host, policy,
                                     clock=sim.clock, drift=self.drift, poll_s=sim.knobs.poll_s,
                                     runtimes=self.open_runtime)
        self.machine = self.session.machine
        self._inputs: tuple[str, dict[str, np.ndarray]] | None = None
        self._row = 0
        self._owed = 0.0
        self._busy = False

    # --- connection and state ---------------------------------------------------------------------------

    def _mqtt_client(self) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device_id, clean_session=False)
        set_last_will(client, self.device_id, self.capabilities())
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = lambda *a: self.connected.clear()
        client.message_callback_add(device_topic(self.device_id, "commands"),
                                    lambda *args: self.session.on_command(*args))
        return client

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if mid == self._commands_mid and not any(r.is_failure for r in reasons):
            self.subscribed.set()  # commands sent from now on reach it

    def capabilities(self) -> dict[str, Any]:
        """The capabilities it reports (with its tags under ``"tags"``)."""
        return {**self.profile.capabilities.to_dict(), "tags": dict(self.profile.tags)}

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            _log.error("%s: the broker refused the connection: %s", self.device_id, reason)
            return
        self._commands_mid = client.subscribe(device_topic(self.device_id, "commands"), qos=1)[1] or -1
        self.connected.set()
        self.publish_state()
        self.sender.on_connect()

    @property
    def updating(self) -> bool:
        """Whether an update is running (or queued)."""
        return self.session.updating

    def status(self) -> str:
        """``updating``, ``serving`` or ``idle``, as the agent reports it."""
        return "updating" if self.updating else "serving" if self.host.active is not None else "idle"

    def publish_state(self, status: str | None = None) -> None:
        """Publish the retained state message."""
        message = state_message(self.device_id, status or self.status(), self.host.active, self.capabilities(), True)
        publish_state(self.client, message)

    def send_event(self, event: DeviceEvent | None) -> None:
        """Publish an event on the device's events topic (None: nothing)."""
        publish_event(self.client, event)

    # --- what the session leaves to it ---------------------------------------------------------------------

    def handle(self, command: Command) -> None:
        """Act on one validated command, as the agent does (never blocks on an update)."""
        self.session.handle(command)

    def _on_capture(self, command: Command) -> None:
        if command.type == "capture":  # a simulated device captures nothing
            self.send_event(device_event(CaptureEvent, self.device_id, id=command.id, entries=0, bytes=0))

    def _on_outcome(self, record: UpdateRecord) -> None:
        self.outcomes.append({"id": record.id, "rollout": record.rollout, "model": record.model,
                              "version": record.version, "target": record.target, "state": record.state,
                              "reason": record.reason, "cause": record.cause})

    def open_runtime(self, name: str, model_path: str | Path, *, threads: int = 0, **options: Any) -> Runtime:
        """This device's runtime factory (the update machine's): the stand-in or the runtime the bundle names,
        with the device's faults applied to misbehaving versions."""
        knobs = self.sim.knobs
        inner = SimRuntime(Path(model_path), threads=threads, latency_ms=knobs.latency_ms) if knobs.standin \
            else open_runtime(name, model_path, threads=threads, **options)
        return _DeviceRuntime(inner, self)

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
        self.session.close(timeout=0)
        self.publish_state("offline")
        self.client.disconnect()
        self.host.close()
        self.outbox.close()


