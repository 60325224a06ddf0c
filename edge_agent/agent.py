"""The on-device agent: serves the model, takes updates from the fleet, reports telemetry and drift.

One :class:`Agent` per device wires the pieces together:

* :class:`~edgeml.edge_agent.serving.ModelHost` serves the active slot; the local API
  (:mod:`~edgeml.edge_agent.api`) and the Python API (:meth:`Agent.predict`) call it.
* :class:`~edgeml.edge_agent.update.machine.UpdateMachine` runs updates in a thread of their own, with
  downloads through :class:`~edgeml.edge_agent.tuf_client.TufClient` over the MQTT fetcher.
* MQTT: commands arrive on the device's ``commands`` topic (validated; anything malformed is logged and
  answered with a ``rejected`` event, never a crash), progress and alerts leave on ``events``, the retained
  ``state`` carries status and capabilities, and a last will marks the device offline.
* Telemetry: per-request accounting (the model host's sink and sampler), a drift monitor per model version,
  and a periodic report through the on-disk outbox.

Events (on ``edgeml/v1/devices/{id}/events``; the classes of :mod:`edgeml.protocol.events`):
``update`` for every transition of an update (with its ``cause`` when it fails or rolls back) and for
refusals (``incompatible``, ``deferred``, ``busy``), ``drift`` alerts, ``rejected`` commands, and the answers
to ``ping``, ``rollback`` and ``capture``.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as mqtt

from edgeml.edge_agent.api import LocalAPI, ModelNotFound, NotServing, PredictResult
from edgeml.edge_agent.capabilities import Capabilities, detect
from edgeml.edge_agent.capture_upload import CaptureUploader
from edgeml.edge_agent.config import AgentConfig
from edgeml.edge_agent.device_messages import (
    publish_event,
    publish_state,
    set_last_will,
    state_message,
)
from edgeml.edge_agent.host import SystemdNotifier, clock_synced
from edgeml.edge_agent.serving import FeedSpec, ModelHost
from edgeml.edge_agent.session import DeviceSession, SessionPolicy
from edgeml.edge_agent.telemetry_loop import TelemetryLoop
from edgeml.errors import ConfigError, EdgeMLError
from edgeml.protocol import (
    Command,
    DeviceEvent,
    DriftEvent,
    device_topic,
    tcp_no_delay,
)

if TYPE_CHECKING:  # imported when the first update comes (python-tuf and its stack cost memory)

    pass

__all__ = ["Agent"]

_log = logging.getLogger(__name__)


class Agent:
    """The agent of one device.

    Args:
        config: Its settings (see :mod:`~edgeml.edge_agent.config`).
        capabilities: What the device can run (default: detected).
        clock_check: Whether the clock is synchronised (default: :func:`~edgeml.edge_agent.host.clock_synced`
            with the configured mode).
    """

    def __init__(self, config: AgentConfig, *, capabilities: Capabilities | None = None,
                 clock_check: Any = None) -> None:
        self.config = config
        self.device_id = config.bootstrap.device_id
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._detect = capabilities is None
        self.capabilities = capabilities or self._detected()
        self._clock_check = clock_check or (lambda: clock_synced(config.clock))
        self.host = ModelHost()
        self.client = self._mqtt_client()
        self.telemetry = TelemetryLoop(self, self.state_dir)  # the host's telemetry sink and drift sampler
        self.uploads = CaptureUploader(self, self.state_dir)  # captured samples to the fleet (capture command)
        self._connected = threading.Event()
        policy = SessionPolicy(
            trusted_root=config.bootstrap.tuf_root, capabilities=lambda: self.capabilities, send_event=self.send_event,
            publish_state=self._publish_state, on_ack=self.telemetry.on_ack, on_capture=self.uploads.handle,
            clock_synced=lambda: bool(self._clock_check()))
        self.session = DeviceSession(self.device_id, self.state_dir, self.client, self._connected, self.host, policy,
                                     drift=self.telemetry.drift_score, output_shift=self.telemetry.output_shift_score,
                                     threads=config.threads)
        self.machine = self.session.machine
        self.notifier = SystemdNotifier()
        self.api: LocalAPI | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def updating(self) -> bool:
        """Whether an update is running (or queued)."""
        return self.session.updating

    def _detected(self) -> Capabilities:
        """This device's capabilities, with only the runtimes the config offers."""
        found = detect()
        offered = self.config.runtimes
        if offered is None:
            return found
        return dataclasses.replace(found, runtimes={k: v for k, v in found.runtimes.items() if k in offered})

    # --- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve the active model, connect, start the API, the updater and telemetry (returns at once).

        Raises:
            ConfigError: The API address is taken or the broker address is unusable.
        """
        try:
            self.machine.boot()
        except EdgeMLError as exc:  # a damaged slot: keep running (updates can repair it), say so
            _log.error("cannot serve the active slot: %s", exc)
        if self._detect:
            self.capabilities = self._detected()  # now with the execution providers of a loaded onnxruntime
        self.telemetry.start()
        self.uploads.start()
        try:
            self.api = LocalAPI(self, self.config.api_host, self.config.api_port, self.config.api_socket,
                                self.config.max_request_bytes)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.config.api_host}:{self.config.api_port}: {exc.strerror}",
                              hint="set api_port in agent.toml to a free port") from exc
        self.api.start()
        boot = self.config.bootstrap
        self.client.connect_async(boot.host, boot.port, keepalive=30)
        self.client.loop_start()
        thread = threading.Thread(target=self._tick_worker, name="edgeml-tick-worker", daemon=True)
        thread.start()
        self._threads.append(thread)
        self.session.resume()  # an interrupted update first
        self.notifier.notify("READY=1")

    def stop(self) -> None:
        """Stop everything; the state on disk stays consistent (an update resumes at the next start)."""
        self._stop.set()
        self.session.close()
        if self.api is not None:
            self.api.stop()
        self.uploads.stop()
        self.telemetry.stop()
        try:
            self._publish_state("offline")
        finally:
            self.client.disconnect()
            self.client.loop_stop()
        for thread in self._threads:
            thread.join(timeout=5)
        self.host.close()

    def run_forever(self) -> None:
        """Start and block until :meth:`stop` (or SIGTERM/Ctrl-C through the caller)."""
        self.start()
        self._stop.wait()

    # --- the Python inference API (also behind the local HTTP API) -----------------------------------------

    def predict(self, model: str, inputs: Mapping[str, np.ndarray] | np.ndarray, *,
                preprocessed: bool = False) -> PredictResult:
        """Run the active model on ``inputs``.

        Args:
            model: The model name (must be the one this device serves).
            inputs: One array (for the model's first input) or input name -> array.
            preprocessed: The inputs are already what the model takes (skip the manifest's preprocessing).

        Raises:
            NotServing: No verified model serves yet.
            ModelNotFound: This device serves another model.
            ValueError: The inputs do not fit the model (not counted as a model error).
        """
        active = self.host.active
        if active is None:
            raise NotServing("no model is serving yet")
        spec = active.feed_spec
        if spec is None:
            spec = active.feed_spec = FeedSpec.of(active.manifest)
        if model != spec.model:
            raise ModelNotFound(f"this device serves {spec.model!r}, not {model!r}")
        # The common case checked in a few comparisons: one preprocessed array of the right dtype and shape.
        if preprocessed and type(inputs) is np.ndarray and inputs.dtype is spec.dtype \
                and inputs.shape[1:] == spec.tail and inputs.flags.c_contiguous:
            ran, outputs = self.host.serve({spec.first: inputs}, inputs.shape[0])
        else:
            feeds = spec.feeds(inputs, preprocessed)
            ran, outputs = self.host.serve(feeds, next(iter(feeds.values())).shape[0])
        return PredictResult(spec.model, ran.version, outputs)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether a verified model serves, with the status."""
        status = self.status()
        return self.host.active is not None, status

    def status(self) -> dict[str, Any]:
        """What this agent is doing: model, version, slot, update, clock, broker connection."""
        active = self.host.active
        record = self.machine.store.load()
        return {
            "device_id": self.device_id, "status": self._status_word(),
            "model": active.manifest.name if active else None, "version": active.version if active else None,
            "slot": active.slot if active else None, "connected": self._connected.is_set(),
            "clock_synced": bool(self._clock_check()),
            "update": None if record is None else {"id": record.id, "version": record.version,
                                                   "state": record.state, "reason": record.reason},
            "capabilities": self.capabilities.to_dict(),
        }

    def _status_word(self) -> str:
        if self.updating:
            return "updating"
        return "serving" if self.host.active is not None else "idle"

    # --- MQTT ------------------------------------------------------------------------------------------

    def _mqtt_client(self) -> mqtt.Client:
        boot = self.config.bootstrap
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device_id, clean_session=False)
        client.username_pw_set(boot.username, boot.password)
        if self.config.tls:
            context = ssl.create_default_context(cadata=boot.ca_pem) if boot.ca_pem else ssl.create_default_context()
            client.tls_set_context(context)
        set_last_will(client, self.device_id, self.capabilities.to_dict())
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.message_callback_add(device_topic(self.device_id, "commands"),
                                    lambda *args: self.session.on_command(*args))
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            _log.error("the broker refused the connection: %s", reason)
            return
        tcp_no_delay(client.socket())
        client.subscribe(device_topic(self.device_id, "commands"), qos=1)
        self._connected.set()
        self._publish_state()
        self.telemetry.on_connect()
        self.uploads.on_connect()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()

    def _publish_state(self, status: str | None = None) -> None:
        message = state_message(self.device_id, status or self._status_word(), self.host.active,
                                self.capabilities.to_dict(), bool(self._clock_check()))
        publish_state(self.client, message)

    def send_event(self, event: DeviceEvent | None) -> None:
        """Publish an event on the device's events topic (QoS 1; queued by paho while offline); None: nothing."""
        publish_event(self.client, event)
        if isinstance(event, DriftEvent):
            self.uploads.on_drift(event)

    def handle(self, command: Command) -> None:
        """Act on one validated command (called on the MQTT thread; never blocks on an update)."""
        self.session.handle(command)

    # --- periodic work ---------------------------------------------------------------------------------

    def _tick_worker(self) -> None:
        interval = min(self.config.telemetry_interval_s, self.notifier.watchdog_interval_s or 1e9, 1.0)
        next_report = time.monotonic() + self.config.telemetry_interval_s
        while not self._stop.wait(interval):
            self.notifier.notify("WATCHDOG=1")
            self.session.retry_deferred()
            if time.monotonic() >= next_report:
                next_report += self.config.telemetry_interval_s
                try:
                    self.telemetry.report()
                except Exception:
                    _log.exception("telemetry report failed")

