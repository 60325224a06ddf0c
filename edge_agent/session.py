"""One device's side of the fleet protocol, shared by the agent and the fleet simulator's devices.

A :class:`DeviceSession` takes the commands that arrive on the device's ``commands`` topic (validated by
:func:`edgeml.protocol.parse`; a malformed one is answered with a ``rejected`` event, at most one a second),
accepts updates (refusing an incompatible one, deferring one while the clock is unsynchronised, answering
``busy`` while another runs), runs them through its :class:`~edgeml.edge_agent.update.machine.UpdateMachine`
in a worker thread that exists only while there is work, fetches bundles and deltas through
:class:`~edgeml.edge_agent.tuf_client.TufClient` over the MQTT fetcher (listening to a rollout's broadcast when
the command names one), and reports every transition as an ``update`` event.

What legitimately differs between a real agent (:mod:`edgeml.edge_agent.agent`) and a simulated device
(:mod:`edgeml.fleet.sim.device`) is its :class:`SessionPolicy`: where telemetry acknowledgements and capture
commands go, how the retained state is published, whether the clock is synchronised, how many downloads may
run at once, and what else an update's end is recorded in. Everything else is this one module, so a fleet
tested against the simulator meets the agent's behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from edgeml.capabilities import Capabilities
from edgeml.edge_agent.device_messages import (
    ack_seq,
    device_event,
    rollback_reason,
    update_event,
    update_request,
)
from edgeml.edge_agent.serving import ModelHost
from edgeml.edge_agent.update.machine import UpdateMachine
from edgeml.edge_agent.update.states import TERMINAL, State
from edgeml.edge_agent.update.store import UpdateRecord, UpdateRequest
from edgeml.errors import ConfigError, EdgeMLError
from edgeml.protocol import Cause, Command, DeviceEvent, PongEvent, ProtocolError, RejectedEvent, RollbackEvent, parse

if TYPE_CHECKING:  # imported when the first update comes (python-tuf and its stack cost memory)
    from edgeml.edge_agent.mqtt_fetcher import MqttFetcher
    from edgeml.edge_agent.tuf_client import TufClient, VerifiedBundle

__all__ = ["DeviceSession", "SessionPolicy"]

_log = logging.getLogger(__name__)
#: the states after which the device's retained state changes (what it serves, or that it stopped updating)
_STATE_CHANGES = frozenset({State.SWITCH, State.COMMITTED, State.ROLLED_BACK, State.FAILED})


@dataclass
class SessionPolicy:
    """What differs between a real agent and a simulated device; the rest of a session is the same.

    Attributes:
        trusted_root: The TUF root metadata the device was provisioned with.
        capabilities: What the device can run, now (updates are checked against it; deltas are applied only
            when it lists a delta format).
        send_event: Publishes an event (None: nothing).
        publish_state: Publishes the device's retained state.
        on_ack: A ``telemetry-ack`` command's sequence number goes here.
        on_capture: ``capture`` and ``upload-ack`` commands go here.
        clock_synced: Updates are deferred while it says False (signed metadata expiry needs a true clock).
        fetch_gate: Entered around each download (the simulator bounds downloads at once).
        stopped: Exceptions that mean the process is stopping in the middle of an update: the update stops
            where it is and its record resumes it, as after a power cut.
        on_outcome: Called with each update's terminal record.
        fetch_timeout_s: The MQTT fetcher's timeout per request.
    """

    trusted_root: bytes
    capabilities: Callable[[], Capabilities]
    send_event: Callable[[DeviceEvent | None], None]
    publish_state: Callable[[], None]
    on_ack: Callable[[int], None]
    on_capture: Callable[[Command], None]
    clock_synced: Callable[[], bool] = lambda: True
    fetch_gate: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    stopped: tuple[type[BaseException], ...] = ()
    on_outcome: Callable[[UpdateRecord], None] | None = None
    fetch_timeout_s: float = 30.0


class DeviceSession:
    """Commands, updates and downloads of one device.

    Args:
        device_id: The device's id (its MQTT client id and topics).
        state_dir: Its state directory (update record, slots, downloads, TUF metadata, partial downloads).
        client: Its connected (or connecting) paho client.
        connected: Set while the client is connected (downloads wait for it).
        host: The model host its updates switch.
        policy: What differs between the agent and a simulated device.
        machine_options: Passed on to :class:`UpdateMachine` (clock, drift, output_shift, threads, poll_s,
            runtimes).
    """

    def __init__(self, device_id: str, state_dir: Path, client: mqtt.Client, connected: threading.Event,
                 host: ModelHost, policy: SessionPolicy, **machine_options: Any) -> None:
        self.device_id, self.state_dir, self.client, self.connected = device_id, state_dir, client, connected
        self.policy = policy
        deltas = bool(policy.capabilities().deltas)
        self.machine = UpdateMachine(state_dir, host, self.fetch, on_transition=self._on_transition,
                                     fetch_delta=self.fetch_delta if deltas else None, **machine_options)
        self.updating = False
        self._fetcher: MqttFetcher | None = None
        self._pending: deque[tuple[Command | None, UpdateRequest | None]] = deque()
        self._deferred: list[tuple[Command, UpdateRequest]] = []
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._rejected_at = -1e9
        self._rejected_quiet = 0

    # --- commands -------------------------------------------------------------------------------------------

    def on_command(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """paho's callback for the ``commands`` topic: parse, act, and answer what cannot be acted on."""
        try:
            command = parse("command", bytes(msg.payload))
            assert isinstance(command, Command)
            self.handle(command)
        except ProtocolError as exc:
            self.reject(str(exc))
        except Exception:  # a bug must not take the device down; it is logged with its traceback
            _log.exception("%s: command handling failed", self.device_id)
            self.reject("internal error")

    def reject(self, reason: str) -> None:
        """Log and report a rejected command; at most one event per second (a flood is counted, not echoed)."""
        now = time.monotonic()
        with self._lock:
            if now - self._rejected_at < 1.0:
                self._rejected_quiet += 1
                return
            quiet, self._rejected_quiet, self._rejected_at = self._rejected_quiet, 0, now
        _log.warning("%s: rejected a command: %s%s", self.device_id, reason,
                     f" ({quiet} more since the last report)" if quiet else "")
        self.policy.send_event(device_event(RejectedEvent, self.device_id, reason=reason[:500], suppressed=quiet))

    def handle(self, command: Command) -> None:
        """Act on one validated command (called on the MQTT thread; never blocks on an update).

        Raises:
            ProtocolError: Its arguments are malformed.
        """
        if command.type == "telemetry-ack":
            self.policy.on_ack(ack_seq(command))
        elif command.type == "ping":
            self.policy.send_event(device_event(PongEvent, self.device_id, id=command.id))
        elif command.type == "update":
            self.accept_update(command)
        elif command.type == "rollback":
            accepted = self.machine.request_rollback(rollback_reason(command))
            self.policy.send_event(device_event(RollbackEvent, self.device_id, id=command.id, accepted=accepted))
        elif command.type in ("capture", "upload-ack"):
            self.policy.on_capture(command)

    def accept_update(self, command: Command) -> None:
        """Queue an update, or say why not now: ``incompatible`` (this device cannot run the target) or
        ``deferred`` (the clock is unsynchronised: it runs once the clock is, see :meth:`retry_deferred`)."""
        request = update_request(command)
        runtime = command.args.get("runtime")
        why = self.policy.capabilities().incompatibility(runtime) if isinstance(runtime, dict) else None
        if why is not None:
            self._refuse(request, "incompatible", why, Cause.INCOMPATIBLE)
        elif not self.policy.clock_synced():
            with self._lock:
                self._deferred.append((command, request))
            self._refuse(request, "deferred", "clock unsynced", Cause.CLOCK)
        else:
            self._enqueue((command, request))

    def _refuse(self, request: UpdateRequest, state: str, reason: str, cause: Cause) -> None:
        self.policy.send_event(update_event(self.device_id, request, state, reason=reason, cause=cause.value))

    # --- the update worker ----------------------------------------------------------------------------------

    def resume(self) -> None:
        """Finish an interrupted update (in the worker): call once at start, after the active slot serves."""
        self._enqueue((None, None))

    def retry_deferred(self) -> None:
        """Queue the updates deferred for the clock, once it is synchronised (called periodically)."""
        if self._deferred and self.policy.clock_synced():
            with self._lock:
                deferred, self._deferred = self._deferred, []
            for item in deferred:
                self._enqueue(item)

    def close(self, timeout: float = 5.0) -> None:
        """Take no more updates; wait up to ``timeout`` for the running step to return (the record resumes the
        update at the next start)."""
        with self._lock:
            self._closed = True
            self._pending.clear()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    def _enqueue(self, item: tuple[Command | None, UpdateRequest | None]) -> None:
        with self._lock:
            if self._closed:
                return
            self._pending.append(item)
            if self.updating:
                return  # the running worker takes it next
            self.updating = True
            self._worker = threading.Thread(target=self._work, name=f"edgeml-update-{self.device_id}", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._pending or self._closed:
                        self._pending.clear()
                        self.updating = False
                        return
                    command, request = self._pending.popleft()
                if not self._run(command, request):
                    with self._lock:
                        self._pending.clear()
                        self.updating = False
                    return
        finally:
            self.policy.publish_state()

    def _run(self, command: Command | None, request: UpdateRequest | None) -> bool:
        """Run one queued item; False when the process is stopping."""
        try:
            if request is None:
                self.machine.resume()
            else:
                assert command is not None
                self._listen_broadcast(command)
                self.machine.start(request)
        except ConfigError as exc:  # another update is in progress
            if request is not None:
                self._refuse(request, "busy", exc.message, Cause.BUSY)
        except self.policy.stopped:
            return False
        except Exception:
            _log.exception("%s: the update failed", self.device_id)
        return True

    def _on_transition(self, record: UpdateRecord, frm: State | None, event: str, to: State) -> None:
        self.policy.send_event(update_event(self.device_id, record, to.value, event=event, reason=record.reason,
                                            cause=record.cause))
        if to in TERMINAL and self.policy.on_outcome is not None:
            self.policy.on_outcome(record)
        if to in _STATE_CHANGES:
            self.policy.publish_state()

    # --- downloads ------------------------------------------------------------------------------------------

    def _ensure_fetcher(self) -> MqttFetcher:
        from edgeml.edge_agent.mqtt_fetcher import MqttFetcher

        if self._fetcher is None:
            if not self.connected.wait(30):
                raise EdgeMLError("not connected to the broker; the download will be retried")
            self._fetcher = MqttFetcher(self.client, self.device_id, timeout=self.policy.fetch_timeout_s,
                                        partial_dir=self.state_dir / "partial")
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

    def _tuf(self) -> TufClient:
        from edgeml.edge_agent.mqtt_fetcher import METADATA_URL, TARGETS_URL
        from edgeml.edge_agent.tuf_client import TufClient

        return TufClient(self.policy.trusted_root, self.state_dir / "tuf", self.state_dir / "downloads",
                         METADATA_URL, TARGETS_URL, fetcher=self._ensure_fetcher())

    def fetch(self, name: str, version: str, target: str) -> VerifiedBundle:
        """The verified bundle (the update machine's ``fetch``)."""
        with self.policy.fetch_gate():
            return self._tuf().fetch(name, version, target)

    def fetch_delta(self, name: str, version: str, target: str, base: str, slot: Path) -> VerifiedBundle:
        """The bundle rebuilt from a signed delta and ``slot`` (the update machine's ``fetch_delta``)."""
        with self.policy.fetch_gate():
            return self._tuf().fetch_delta(name, version, target, base, slot)
