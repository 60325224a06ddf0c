"""Telemetry ingestion: devices' telemetry and state from MQTT into the telemetry store, acknowledged.

An :class:`IngestWorker` subscribes to every device's ``telemetry`` (QoS 1) and, by default, ``state``
topic, checks each message (:func:`check_message`), and hands it to a writer thread that stores batches
(:class:`~edgeml.fleet.telemetry.store.TelemetryStore`, flushed every ``batch_size`` rows or
``flush_ms``), so the MQTT network thread never waits on the database. After a batch commits, the worker
sends each of its devices a ``telemetry-ack`` :class:`~edgeml.protocol.Command` carrying the device's
contiguous high (every seq up to it is stored): the device may then drop those entries from its outbox.
A device is sent at most one ack per ``ack_interval_s``: a device that reports fast gets one ack for all
its rows committed meanwhile, as soon as its interval has passed (at stop, at once); the contiguous highs
are read then, in one query for every device due, rather than after each batch. A device that
resends entries already stored gets the acknowledgement again, so its outbox drains even when an earlier
ack was lost. The worker acknowledges each MQTT message to the broker (PUBACK) only after
its row is committed too, so that with a persistent session (``client_id`` given) the broker redelivers
what the worker had not stored when it died or lost its connection.

Scaling out: with ``share_group`` (the default, ``"ingest"``) the telemetry filter is a shared
subscription (``$share/ingest/edgeml/v1/devices/+/telemetry``), so the broker hands each message to one
worker of the group; duplicates between workers are impossible in the store (each batch's transaction locks its
devices' books and drops what they say is stored, :mod:`~edgeml.fleet.telemetry.store`) and
each worker acknowledges what the database holds, whoever stored it.

State is a plain subscription, not a shared one: the broker sends retained messages to a new
subscription but never to a shared one, and the current state of every device *is* the retained message
(its last will included). Every worker with ``IngestSettings.state`` on writes every state update
(idempotent, last one wins), so in a scale-out deployment turn it on in one process only (the controller
or the first ingest worker). A retained state replayed on (re)subscribing updates the device's status but
not its ``last_seen``.

Devices: the broker authenticates a device and lets it publish only on its own topics, so the topic's
device id must equal the payload's, and the device must be enrolled and not revoked
(:class:`~edgeml.fleet.devices.roster.DeviceRoster`). Telemetry of a device that is not enrolled is stored
only with ``accept_unknown`` on (a development broker without enrollment); its state never is (see
:mod:`~edgeml.fleet.telemetry.store`).

Bad input is never fatal and never blocks other devices: every message is checked against the protocol's
bounds before it is queued (:func:`check_message`); every message that is not stored is counted in
``rejected`` by reason (:data:`REJECT_REASONS`) and acknowledged to the broker so that it is not
redelivered. A batch the database refuses is retried row by row: a row the database refuses on its own
is set aside (counted as ``poison``, logged at most once a minute per device) and the others are stored.
A database that is away (connection refused, locked, timed out) keeps the batch and retries it (counted in
``store_errors``) while the broker holds back further messages (at most ``receive_maximum``
unacknowledged per worker under MQTT 5). Every batch commits within ``flush_ms`` of its first row.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
import uuid
from collections import Counter
from types import TracebackType
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeml.errors import ConfigError, EdgeMLError
from edgeml.fleet.devices.mqtt_client import BufferedClient
from edgeml.fleet.devices.roster import DeviceRoster
from edgeml.fleet.store.db import Database, is_outage
from edgeml.fleet.telemetry.admission import REJECT_REASONS, IngestSettings, RejectedMessage, check_message
from edgeml.fleet.telemetry.store import TelemetryStore
from edgeml.protocol import (
    PREFIX,
    Command,
    State,
    Telemetry,
    device_topic,
    fleet_client_id,
)

__all__ = ["REJECT_REASONS", "STATE_FILTER", "TELEMETRY_FILTER", "IngestSettings", "IngestWorker",
           "RejectedMessage", "check_message"]

_log = logging.getLogger(__name__)

TELEMETRY_FILTER = f"{PREFIX}devices/+/telemetry"
STATE_FILTER = f"{PREFIX}devices/+/state"
_LOG_EVERY_S = 60.0  # a device's rejected messages are logged at most once per this many seconds
_STOP = object()


class _Item(NamedTuple):  # a tuple: one is made per message on the network thread
    message: Telemetry | State
    retained: bool
    token: tuple[int, int, int]  # (connection generation, mid, qos): the PUBACK owed once stored


class IngestWorker:
    """Stores devices' telemetry and state from the broker; see the module docstring.

    Args:
        db: The registry database (a :class:`~edgeml.fleet.store.db.Database` or its URL).
        broker_host: The broker's host name.
        broker_port: The broker's port.
        username: Broker user (the fleet user), if the broker requires one.
        password: Its password.
        tls: An :class:`ssl.SSLContext` for a TLS listener, or None for plain TCP.
        share_group: Shared-subscription group of the telemetry filter (None: a plain subscription, for a
            single worker).
        mqtt5: Speak MQTT 5 (receive maximum, session expiry, reason codes) instead of 3.1.1.
        client_id: A stable MQTT client id makes the worker's session persistent (the broker keeps its
            subscriptions and queued messages while it is away); None: a random id, a clean session.
        settings: Batching and device policy.

    Raises:
        MissingExtraError: SQLAlchemy is not installed.
        RegistryError: The database cannot be opened.
    """

    def __init__(self, db: Database | str, broker_host: str = "127.0.0.1", broker_port: int = 1883, *,
                 username: str | None = None, password: str | None = None, tls: ssl.SSLContext | None = None,
                 share_group: str | None = "ingest", mqtt5: bool = True, client_id: str | None = None,
                 settings: IngestSettings | None = None) -> None:
        self.settings = settings or IngestSettings()
        self.store = TelemetryStore(db, last_seen_s=self.settings.last_seen_s)
        self.broker = (broker_host, broker_port)
        self.telemetry_filter = f"$share/{share_group}/{TELEMETRY_FILTER}" if share_group else TELEMETRY_FILTER
        self._mqtt5, self._persistent = mqtt5, client_id is not None
        self._client = BufferedClient(mqtt.CallbackAPIVersion.VERSION2,  # reads in chunks, acks a batch at once
                                   client_id=client_id or fleet_client_id("ingest"),
                                   protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
                                   clean_session=None if mqtt5 else not self._persistent, manual_ack=True)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set_context(tls)
        self._client.max_inflight_messages_set(1000)  # acks to devices in flight at once
        self._client.reconnect_delay_set(self.settings.reconnect_min_s, self.settings.reconnect_max_s)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._full = threading.Event()  # set when batch_size items are queued (or at stop): wakes the writer
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._received = {"received": 0, "states": 0}  # written by the network thread only: no lock
        self._rejected: Counter[str] = Counter()
        self._generation = 0  # bumped on every (dis)connect: a PUBACK is owed only on the connection it came on
        self._subscribed = threading.Event()
        self._subscribe_error: str | None = None
        self._acked: dict[str, int] = {}  # device -> highest seq this worker acknowledged
        self._acked_at: dict[str, float] = {}  # device -> time.monotonic() of its latest ack
        # device -> whether it resent rows already stored: devices with rows stored since their latest ack, to
        # acknowledge (their contiguous high read then) once their ack interval has passed
        self._ack_owed: dict[str, bool] = {}
        self._next_ack = float("inf")  # time.monotonic() when the first of them is due
        self.roster = DeviceRoster(self.store.db, accept_unknown=self.settings.accept_unknown,
                                   refresh_s=self.settings.enrolled_refresh_s)
        self._logged_at: dict[str, float] = {}  # device -> when one of its rejections was last logged
        self._stopping = threading.Event()
        self._writer: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe and ingest in background threads; returns once subscribed.

        Raises:
            ConfigError: The broker cannot be reached, or refused the subscriptions, within ``timeout``.
        """
        self._writer = threading.Thread(target=self._run_writer, name="ingest-writer", daemon=True)
        self._writer.start()
        properties = None
        if self._mqtt5:
            properties = Properties(PacketTypes.CONNECT)
            properties.ReceiveMaximum = self.settings.receive_maximum
            if self._persistent:
                properties.SessionExpiryInterval = self.settings.session_expiry_s
        host, port = self.broker
        try:
            self._client.connect(host, port, keepalive=30, clean_start=not self._persistent if self._mqtt5
                                 else mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=properties)
        except (OSError, ValueError) as exc:
            self.stop()
            raise ConfigError(f"ingest: cannot connect to the broker at {host}:{port}: {exc}",
                              hint="check the broker's host, port and TLS settings, and that it runs") from exc
        self._client.loop_start()
        if not self._subscribed.wait(timeout) or self._subscribe_error:
            self.stop()
            raise ConfigError(f"ingest: not subscribed at {host}:{port} within {timeout} s: "
                              f"{self._subscribe_error or 'no answer'}",
                              hint="check the fleet user's credentials and ACL")

    def stop(self) -> None:
        """Store and acknowledge what arrived, then disconnect (idempotent)."""
        if self._stopping.is_set():
            return
        if not self._persistent and self._client.is_connected():  # a named session keeps its subscriptions
            done = threading.Event()
            self._client.on_unsubscribe = lambda *args: done.set()
            filters = [self.telemetry_filter] + ([STATE_FILTER] if self.settings.state else [])
            self._client.unsubscribe(filters)
            done.wait(5)
        self._stop_writer()
        self._client.disconnect()
        self._client.loop_stop()

    def _stop_writer(self) -> None:
        """Flush what is queued (one more try if the database is failing) and end the writer thread."""
        self._stopping.set()
        self._queue.put(_STOP)
        self._full.set()
        if self._writer is not None:
            self._writer.join(timeout=60)

    def __enter__(self) -> IngestWorker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Counters for ``/metrics``: ``received`` (telemetry messages), ``states``, ``stored``, ``duplicates``,
        ``acks`` (telemetry-ack commands sent), ``batches``, ``store_errors``, ``connects`` (successful
        connections to the broker), ``queued`` (waiting for the writer) and ``rejected`` (reason -> count)."""
        with self._lock:
            out: dict[str, Any] = {k: self._counts[k] for k in
                                   ("stored", "duplicates", "acks", "batches", "store_errors", "connects")}
            out["rejected"] = dict(self._rejected)
        out.update(self._received)
        out["queued"] = self._queue.qsize()
        return out

    def _count(self, **deltas: int) -> None:
        with self._lock:
            self._counts.update(deltas)

    def _reject(self, reason: str, token: tuple[int, int, int] | None, detail: str, source: str = "") -> None:
        """Count (and acknowledge to the broker) a message not stored; log it at most once a minute per source."""
        now = time.monotonic()
        with self._lock:
            self._rejected[reason] += 1
            loud = now - self._logged_at.get(source, float("-inf")) >= _LOG_EVERY_S
            if loud:
                if len(self._logged_at) > 100_000:  # bounded: sources are topics an attacker can vary
                    self._logged_at.clear()
                self._logged_at[source] = now
        if loud:
            _log.warning("ingest: not stored (%s) from %s: %s", reason, source or "?", detail[:300])
        if token is not None:
            self._puback(token)

    def _puback(self, token: tuple[int, int, int]) -> None:
        generation, mid, qos = token
        if qos > 0 and generation == self._generation:
            self._client.ack(mid, qos)

    def _puback_all(self, tokens: list[tuple[int, int, int]]) -> None:
        """:meth:`_puback` each of ``tokens``: the QoS 1 ones of the current connection in one write."""
        generation, mids = self._generation, []
        for token in tokens:
            if token[2] == 1 and token[0] == generation:
                mids.append(token[1])
            elif token[2]:
                self._puback(token)
        self._client.ack_all(mids)

    # --- MQTT callbacks (network thread) ------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._generation += 1
        if reason.is_failure:
            self._subscribe_error = f"connection refused: {reason}"
            self._subscribed.set()
            return
        self._count(connects=1)
        topics = [(self.telemetry_filter, 1)] + ([(STATE_FILTER, 1)] if self.settings.state else [])
        client.subscribe(topics)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._generation += 1
        if not self._stopping.is_set():
            _log.warning("ingest: disconnected from the broker (%s); reconnecting", reason)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            self._subscribe_error = f"subscriptions refused: {', '.join(refused)}"
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        token = (self._generation, msg.mid, msg.qos)
        try:
            message = check_message(msg.topic, bytes(msg.payload))
        except RejectedMessage as exc:
            for kind, suffix in (("received", "/telemetry"), ("states", "/state")):
                self._received[kind] += msg.topic.endswith(suffix)
            self._reject(exc.reason, token, exc.message, msg.topic[:120])
            return
        except Exception as exc:  # a bug here must not stop the network thread
            _log.exception("ingest: unexpected failure on a message from %r", msg.topic[:120])
            self._reject("internal", token, repr(exc), msg.topic[:120])
            return
        self._received["received" if type(message) is Telemetry else "states"] += 1
        self._queue.put(_Item(message, bool(msg.retain), token))
        if self._queue.qsize() >= self.settings.batch_size:
            self._full.set()  # a whole batch waits: commit it now rather than at the batch's deadline

    # --- writer thread ------------------------------------------------------------------------------------

    def _run_writer(self) -> None:
        """Commit batches: a batch opens with its first row and commits ``flush_ms`` later, or as soon as
        ``batch_size`` rows wait. While it is open the thread sleeps and takes what gathered in one go,
        instead of waking (and taking the GIL from the network thread) for every message."""
        batch: list[_Item] = []
        deadline = float("inf")  # when the open batch must be committed
        flush_s, size = self.settings.flush_ms / 1000, self.settings.batch_size
        stop = False
        while not stop:
            wake = min(deadline, self._next_ack)
            timeout = None if wake == float("inf") else max(0.0, wake - time.monotonic())
            if batch:
                self._full.wait(timeout)
                self._full.clear()
            else:
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    stop = True
                elif item is not None:
                    batch.append(item)
                    deadline = time.monotonic() + flush_s
            stop = self._take_queued(batch) or stop
            if batch and deadline == float("inf"):  # rows taken after a timeout: the batch's clock starts now
                deadline = time.monotonic() + flush_s
            if batch and (stop or len(batch) >= size or time.monotonic() >= deadline):
                for start in range(0, len(batch), size):
                    self._flush(batch[start:start + size])
                batch, deadline = [], float("inf")
            self._send_due_acks(stopping=stop)

    def _take_queued(self, batch: list[_Item]) -> bool:
        """Move every queued item into ``batch``; True when the stop sentinel was among them."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            batch.append(item)

    def _flush(self, batch: list[_Item]) -> None:
        """Store ``batch``. A database that is away: wait and retry (once more only when stopping). A batch the
        database refuses for its content: row by row, setting aside each row it refuses on its own."""
        delay = 0.1
        while batch:
            try:
                self._flush_once(batch)
                return
            except Exception as exc:  # the writer must outlive any database failure
                self._count(store_errors=1)
                if isinstance(exc, EdgeMLError):
                    _log.warning("ingest: storing a batch of %d failed: %s", len(batch), exc)
                else:
                    _log.exception("ingest: storing a batch of %d failed", len(batch))
                if not is_outage(exc):
                    batch = self._row_by_row(batch)
                    if not batch:
                        return
                if self._stopping.is_set():
                    return  # not acknowledged: the broker (named session) or the device sends these again
                self._stopping.wait(delay)
                delay = min(delay * 2, self.settings.retry_max_s)

    def _row_by_row(self, batch: list[_Item]) -> list[_Item]:
        """Store each row of a refused batch alone; set aside the rows refused for their content. Returns the
        rows still to store (from the first that failed because the database went away)."""
        for i, item in enumerate(batch):
            try:
                self._flush_once([item])
            except Exception as exc:
                if is_outage(exc):
                    return batch[i:]
                self._reject("poison", item.token, f"the database refused it: {exc}", item.message.device_id)
        return []

    def _flush_once(self, batch: list[_Item]) -> None:
        keep = self._admit(batch)
        rows = [i.message for i in keep if isinstance(i.message, Telemetry)]
        states = [(i.message, not i.retained) for i in keep if isinstance(i.message, State)]
        result = self.store.store_batch(rows, states, highs=False)  # read when the acks fall due
        self._count(stored=len(result.inserted), duplicates=result.duplicates, batches=1)
        repeated = {r.device_id for r in rows if (r.device_id, r.seq) not in result.inserted}
        for device_id in {r.device_id for r in rows}:
            self._ack_owed[device_id] = self._ack_owed.get(device_id, False) or device_id in repeated
            due = self._acked_at.get(device_id, float("-inf")) + self.settings.ack_interval_s
            self._next_ack = min(self._next_ack, due)
        self._puback_all([item.token for item in keep])

    def _admit(self, batch: list[_Item]) -> list[_Item]:
        """The items whose device may report; the others are rejected (revoked, or unknown when so set)."""
        refused = self.roster.refusals(i.message.device_id for i in batch)
        keep = []
        for item in batch:
            device_id = item.message.device_id
            why = refused.get(device_id)
            if why is None and isinstance(item.message, State) and self.roster.accept_unknown:
                why = self.roster.refusals((device_id,), enrolled_only=True).get(device_id)  # a state needs a row
            if why is not None:
                self._reject(why, item.token, "not an enrolled, unrevoked device", device_id)
            else:
                keep.append(item)
        return keep

    def _send_due_acks(self, stopping: bool = False) -> None:
        """Acknowledge each device whose last ack is at least ``ack_interval_s`` old (every one when stopping):
        a device sending fast gets one ack per interval for all its rows stored meanwhile."""
        now = time.monotonic()
        if not self._ack_owed or (now < self._next_ack and not stopping):
            return
        interval, last = self.settings.ack_interval_s, self._acked_at
        due = [d for d in self._ack_owed if stopping or now - last.get(d, float("-inf")) >= interval]
        try:  # one query for every device due, read after the commits (other workers' rows included)
            highs = self.store.contiguous_highs(due) if due else {}
        except Exception as exc:  # the writer must outlive any database failure: try again a little later
            self._count(store_errors=1)
            _log.warning("ingest: reading the acknowledged highs failed: %s", exc)
            self._next_ack = now + max(interval, 0.1)
            return
        for device_id in due:
            repeated, high = self._ack_owed.pop(device_id), highs.get(device_id)
            if high is not None and (high > self._acked.get(device_id, -1) or repeated):
                self._send_ack(device_id, high)
        self._next_ack = min((last.get(d, float("-inf")) + interval for d in self._ack_owed), default=float("inf"))

    def _send_ack(self, device_id: str, high: int) -> None:
        command = Command(id=uuid.uuid4().hex, type="telemetry-ack", args={"seq": high}, issued_at=time.time())
        self._client.publish(device_topic(device_id, "commands"), command.to_bytes(), qos=1)
        self._acked[device_id] = max(high, self._acked.get(device_id, -1))
        self._acked_at[device_id] = time.monotonic()
        self._count(acks=1)
