"""Telemetry ingestion on SQLite and a real PostgreSQL, through a real Mosquitto.

The store is tested directly (duplicates dropped, the contiguous high with gaps, device state, the
dashboard queries); the worker with test devices that behave like the agent's sender: every entry stays in
an outbox until a ``telemetry-ack`` covers it, and everything unacknowledged is resent after a reconnect.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeml.errors import ConfigError
from edgeml.fleet.devices.mqtt_client import ReadBuffer
from edgeml.fleet.store.db import Database
from edgeml.fleet.telemetry.ingest import REJECT_REASONS, IngestSettings, IngestWorker, RejectedMessage, check_message
from edgeml.fleet.telemetry.store import TelemetryStore
from edgeml.protocol import MAX_BYTES, Command, State, Telemetry, device_topic, parse
from tests.conftest import require_service
from tests.fleet.mosquitto import (
    MOSQUITTO,
    _give_to_broker_user,
    _wait_listening,
    anonymous_mosquitto,
    free_port,
)

sa = pytest.importorskip("sqlalchemy")

METRICS = {"latency_ms_p50": 3.2, "latency_ms_p99": 9.1, "fps": 29.5, "cpu": 0.41, "temp_c": 51.0}
FAST = IngestSettings(flush_ms=20, reconnect_min_s=0.1, reconnect_max_s=0.5)


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture
def url(db_url: str) -> str:
    """SQLite, then PostgreSQL (tests/fleet/conftest.py)."""
    return db_url


@pytest.fixture
def db(url: str) -> Iterator[Database]:
    database = Database(url)
    database.create()
    yield database
    database.close()


@pytest.fixture
def store(db: Database) -> TelemetryStore:
    return TelemetryStore(db)


def _broker_root() -> Path:
    if not MOSQUITTO.exists():
        require_service("mosquitto", False, f"{MOSQUITTO} not installed (apt-get install mosquitto)")
    root = Path(tempfile.mkdtemp(prefix="edgeml-ingest-"))
    root.chmod(0o755)
    (root / "broker").mkdir()
    return root


@pytest.fixture
def broker_port() -> Iterator[int]:
    """An anonymous Mosquitto of this test alone (no retained state left over from other tests)."""
    with anonymous_mosquitto() as (port, _):
        yield port


def enroll(db: Database, *names: str, revoked: bool = False) -> None:
    """Rows in the devices table (those already there are left as they are)."""
    t = db.tables["devices"]
    with db.transaction() as conn:
        present = set(conn.execute(sa.select(t.c.device_id)).scalars())
        for name in names:
            if name not in present:
                conn.execute(t.insert().values(device_id=name, revoked=revoked))


def tel(device_id: str, seq: int, **metrics: Any) -> Telemetry:
    return Telemetry(device_id, seq, 1_700_000_000.0 + seq, metrics or dict(METRICS))


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def stored_seqs(db: Database, device_id: str) -> list[int]:
    t = db.tables["telemetry"]
    with db.transaction() as conn:
        return list(conn.execute(sa.select(t.c.seq).where(t.c.device_id == device_id).order_by(t.c.seq)).scalars())


def row_count(db: Database) -> int:
    with db.transaction() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(db.tables["telemetry"])).scalar())


# --- the store ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["msgspec", "stdlib"])
@settings(max_examples=100, deadline=None)
@given(metrics=st.dictionaries(st.text(max_size=8), st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=12), max_size=6))
def test_a_rows_metrics_text_reads_back_as_the_device_sent_them(metrics: dict[str, Any], encoder: str) -> None:
    """The JSON text a row stores (msgspec's, or the standard library's where msgspec is missing)."""
    from edgeml.fleet.telemetry import store as store_module

    encode = store_module._ENCODE
    try:
        if encoder == "stdlib":
            store_module._ENCODE = None
        text = store_module.metrics_text(metrics)
    finally:
        store_module._ENCODE = encode
    back = json.loads(text)
    assert back == metrics and json.dumps(back) == json.dumps(metrics)  # the same types: 1 is not 1.0


@pytest.mark.parametrize(("batches", "inserted", "rows"), [
    ([[0, 1, 2]], [3], 3),
    ([[0, 1, 2], [1, 2, 3]], [3, 1], 4),
    ([[0, 0, 1, 1]], [2], 2),  # repeated within one batch
    ([[5], [5], [5]], [1, 0, 0], 1),
])
def test_duplicates_are_dropped(store: TelemetryStore, db: Database, batches: list[list[int]],
                                inserted: list[int], rows: int) -> None:
    assert [store.insert_batch([tel("cam-1", s) for s in batch]) for batch in batches] == inserted
    assert row_count(db) == rows


@pytest.mark.parametrize(("steps", "highs"), [
    ([[]], [None]),
    ([[1, 2]], [None]),  # seq 0 missing
    ([[0]], [0]),
    ([[0, 1, 2, 4]], [2]),
    ([[0, 1, 2, 3, 4, 6, 7, 8, 9], [5]], [4, 9]),  # a gap at 5 holds it at 4 until 5 arrives
    ([[3, 4], [1, 2], [0]], [None, None, 4]),
    ([[0, 1], [2, 3], [5], [4], [6]], [1, 3, 3, 5, 6]),  # the cache only ever moves up from what is stored
])
def test_contiguous_high(store: TelemetryStore, steps: list[list[int]], highs: list[int | None]) -> None:
    got = []
    for seqs in steps:
        store.insert_batch([tel("cam-1", s) for s in seqs])
        got.append(store.contiguous_high("cam-1"))
    assert got == highs
    assert TelemetryStore(store.db).contiguous_high("cam-1") == highs[-1]  # a fresh store computes it from scratch


def test_contiguous_highs_are_per_device(store: TelemetryStore) -> None:
    result = store.store_batch([tel("a", s) for s in (0, 1, 2)] + [tel("b", s) for s in (0, 2)] + [tel("c", 1)])
    assert result.highs == {"a": 2, "b": 0, "c": None}
    assert store.contiguous_highs(["a", "b", "c", "d"]) == {"a": 2, "b": 0, "c": None, "d": None}


def test_telemetry_moves_last_seen_at_most_once_per_interval(db: Database) -> None:
    enroll(db, "cam-1")
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    later = t0 + dt.timedelta(seconds=30)
    throttled, every = TelemetryStore(db, last_seen_s=3600), TelemetryStore(db)
    throttled.store_batch([tel("cam-1", 0)], received_at=t0)
    throttled.store_batch([tel("cam-1", 1)], received_at=later)  # within the interval: last_seen stays
    assert throttled.devices_summary()[0]["last_seen"] == t0
    every.store_batch([tel("cam-1", 2)], received_at=later)
    assert every.devices_summary()[0]["last_seen"] == later
    assert stored_seqs(db, "cam-1") == [0, 1, 2]


def test_state_is_recorded_for_enrolled_devices_only(store: TelemetryStore, db: Database) -> None:
    enroll(db, "cam-1")
    state = State("cam-1", "running", model="digits", version="1.2.0", slot="a",
                  capabilities={"runtimes": ["onnxruntime"]}, clock_synced=True)
    assert store.update_state("cam-1", state) is True
    assert store.update_state("ghost", State("ghost", "running")) is False
    [summary] = store.devices_summary()
    assert (summary["status"], summary["installed"], summary["capabilities"]) == \
        ("running", {"digits": "1.2.0"}, {"runtimes": ["onnxruntime"]})
    seen = summary["last_seen"]
    assert seen is not None and abs((dt.datetime.now(dt.timezone.utc) - seen).total_seconds()) < 60
    assert store.update_state("cam-1", State("cam-1", "offline"), seen=False) is True
    [summary] = store.devices_summary()
    assert (summary["status"], summary["installed"], summary["last_seen"]) == ("offline", {}, seen)
    with pytest.raises(ConfigError):
        store.update_state("cam-2", state)


def test_queries_for_the_dashboard(store: TelemetryStore, db: Database) -> None:
    enroll(db, "cam-1", "cam-3")
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    for minute in range(5):
        at = t0 + dt.timedelta(minutes=minute)
        store.insert_batch([tel("cam-1", minute, fps=10.0 + minute), tel("cam-2", minute, fps=20.0, cpu=0.5)],
                           received_at=at)
    store.insert_batch([tel("cam-2", 9, note="no fps")], received_at=t0 + dt.timedelta(minutes=9))
    latest = store.latest("cam-1", 2)
    assert [(r["seq"], r["metrics"]["fps"]) for r in latest] == [(4, 14.0), (3, 13.0)]
    assert latest[0]["received_at"] == t0 + dt.timedelta(minutes=4)
    since = t0 + dt.timedelta(minutes=3)
    assert [r["value"] for r in store.series("cam-1", "fps", since)] == [13.0, 14.0]
    assert [(r["device_id"], r["value"]) for r in store.series(None, "fps", since)] == \
        [("cam-1", 13.0), ("cam-2", 20.0), ("cam-1", 14.0), ("cam-2", 20.0)]
    assert store.series(None, "fps", t0, until=t0 + dt.timedelta(minutes=1)) == [
        {"device_id": d, "seq": 0, "sent_at": 1_700_000_000.0, "received_at": t0, "value": v}
        for d, v in (("cam-1", 10.0), ("cam-2", 20.0))]
    summary = {s["device_id"]: s for s in store.devices_summary()}
    assert sorted(summary) == ["cam-1", "cam-2", "cam-3"]
    assert [(s["enrolled"], s["telemetry_rows"], s["last_seq"], s["contiguous_high"])
            for s in summary.values()] == [(True, 5, 4, 4), (False, 6, 9, 4), (True, 0, None, None)]
    assert summary["cam-2"]["last_received_at"] == t0 + dt.timedelta(minutes=9)


# --- message checks -----------------------------------------------------------------------------------------

GOOD = tel("cam-1", 0).to_bytes()
TOPIC = device_topic("cam-1", "telemetry")


def _payload(**changes: Any) -> bytes:
    obj = {**json.loads(GOOD), **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


MALFORMED = [  # (case, topic, payload, reason)
    ("not json", TOPIC, b"\xff not json", "malformed"),
    ("json array", TOPIC, b"[1, 2]", "malformed"),
    ("wrong schema", TOPIC, _payload(schema="edgeml.telemetry/9"), "malformed"),
    ("missing field", TOPIC, _payload(seq=...), "malformed"),
    ("unknown field", TOPIC, _payload(extra=1), "malformed"),
    ("negative seq", TOPIC, _payload(seq=-1), "malformed"),
    ("float seq", TOPIC, _payload(seq=1.5), "malformed"),
    ("bool seq", TOPIC, _payload(seq=True), "malformed"),
    ("NaN sent_at", TOPIC, GOOD.replace(b'"sent_at":1700000000.0', b'"sent_at":NaN'), "malformed"),
    ("metrics not an object", TOPIC, _payload(metrics=[1]), "malformed"),
    ("oversized", TOPIC, _payload(metrics={"blob": "x" * MAX_BYTES["telemetry"]}), "oversized"),
    ("device id mismatch", TOPIC, _payload(device_id="cam-2"), "device-mismatch"),
    ("bad device id in topic", "edgeml/v1/devices/CAM_1/telemetry", GOOD, "topic"),
    ("state with a bad status", device_topic("cam-1", "state"),
     json.dumps({"schema": "edgeml.state/1", "device_id": "cam-1", "status": ""}).encode(), "malformed"),
    ("state of another device", device_topic("cam-1", "state"), State("cam-9", "running").to_bytes(),
     "device-mismatch"),
]


@pytest.mark.parametrize(("case", "topic", "payload", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_messages_are_rejected_with_a_reason(case: str, topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(RejectedMessage) as info:
        check_message(topic, payload)
    assert info.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(st.binary(max_size=200),
                         st.dictionaries(st.sampled_from(["schema", "device_id", "seq", "sent_at", "metrics", "x"]),
                                         st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                                   st.text(max_size=10), st.just("edgeml.telemetry/1"),
                                                   st.just("cam-1"), st.dictionaries(st.text(max_size=5),
                                                                                     st.integers()))).map(
                             lambda d: json.dumps(d).encode())))
def test_any_payload_is_either_telemetry_or_a_counted_reject(payload: bytes) -> None:
    try:
        message = check_message(TOPIC, payload)
    except RejectedMessage as exc:
        assert exc.reason in REJECT_REASONS
    else:
        assert isinstance(message, Telemetry) and message.device_id == "cam-1" and message.seq >= 0


# --- the worker, through Mosquitto --------------------------------------------------------------------------


class Device:
    """A device's telemetry sender: an outbox kept until acknowledged, resent in full after each reconnect, and
    with ``resend_after_s`` also when no acknowledgement came for that long."""

    def __init__(self, device_id: str, port: int, resend_after_s: float | None = None) -> None:
        self.device_id = device_id
        self.outbox: dict[int, bytes] = {}
        self.acks: list[int] = []
        self.next_seq = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=False)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self.connected = threading.Event()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(10), f"{device_id} did not connect"
        self._closed = threading.Event()
        if resend_after_s is not None:
            threading.Thread(target=self._resend_unacked, args=(resend_after_s,), daemon=True).start()

    def _resend_unacked(self, after_s: float) -> None:
        seen = -1
        while not self._closed.wait(after_s):
            with self._lock:
                acks, pending = len(self.acks), sorted(self.outbox.items())
            if acks == seen and pending:
                for _, payload in pending:
                    self.client.publish(device_topic(self.device_id, "telemetry"), payload, qos=1)
            seen = acks

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(device_topic(self.device_id, "commands"), qos=1)
        with self._lock:
            pending = sorted(self.outbox.items())
        for _, payload in pending:
            client.publish(device_topic(self.device_id, "telemetry"), payload, qos=1)
        self.connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        command = parse("command", msg.payload)
        assert isinstance(command, Command) and command.type == "telemetry-ack"
        high = int(command.args["seq"])
        with self._lock:
            self.acks.append(high)
            for seq in [s for s in self.outbox if s <= high]:
                del self.outbox[seq]

    def send(self, n: int, hold: tuple[int, ...] = ()) -> None:
        """Write ``n`` new entries to the outbox and publish them, except the seqs in ``hold`` (lost on the way)."""
        for _ in range(n):
            seq, self.next_seq = self.next_seq, self.next_seq + 1
            payload = tel(self.device_id, seq).to_bytes()
            with self._lock:
                self.outbox[seq] = payload
            if seq not in hold:
                self.client.publish(device_topic(self.device_id, "telemetry"), payload, qos=1)

    def resend(self, seqs: range | list[int]) -> None:
        for seq in seqs:
            self.client.publish(device_topic(self.device_id, "telemetry"), tel(self.device_id, seq).to_bytes(), qos=1)

    def acked(self) -> int:
        with self._lock:
            return max(self.acks, default=-1)

    def drained(self) -> bool:
        with self._lock:
            return not self.outbox and self.next_seq > 0 and max(self.acks, default=-1) == self.next_seq - 1

    def close(self) -> None:
        self._closed.set()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def devices(db: Database) -> Iterator[Callable[..., list[Device]]]:
    """Devices enrolled in the registry (the worker refuses the others) and connected to the broker."""
    made: list[Device] = []

    def make(port: int, *names: str, resend_after_s: float | None = None) -> list[Device]:
        enroll(db, *names)
        made.extend(Device(name, port, resend_after_s) for name in names)
        return made[-len(names):]

    yield make
    for device in made:
        device.close()


def test_every_entry_arrives_once_and_is_acknowledged(url: str, db: Database, broker_port: int,
                                                      devices: Callable[..., list[Device]]) -> None:
    with IngestWorker(url, "127.0.0.1", broker_port, settings=FAST) as worker:
        fleet = devices(broker_port, "cam-1", "cam-2", "cam-3")
        for device in fleet:
            device.send(200)
        wait_for(lambda: all(d.drained() for d in fleet), what="every outbox drained")
        stats = worker.stats()
        assert isinstance(worker._client.socket(), ReadBuffer)  # these tests run through the buffered reads
    assert [stored_seqs(db, d.device_id) for d in fleet] == [list(range(200))] * 3
    assert (stats["received"], stats["stored"], stats["duplicates"], stats["rejected"]) == (600, 600, 0, {})
    assert [d.acked() for d in fleet] == [199] * 3
    assert TelemetryStore(db).contiguous_highs([d.device_id for d in fleet]) == {"cam-1": 199, "cam-2": 199,
                                                                                  "cam-3": 199}


def test_resent_entries_are_dropped_counted_and_acknowledged_again(url: str, db: Database, broker_port: int,
                                                                  devices: Callable[..., list[Device]]) -> None:
    with IngestWorker(url, "127.0.0.1", broker_port, settings=FAST) as worker:
        [device] = devices(broker_port, "cam-1")
        device.send(50)
        wait_for(device.drained, what="acknowledged")
        acks_before = len(device.acks)
        device.resend(range(20))  # the device was not sure of these (its ack was lost)
        wait_for(lambda: worker.stats()["duplicates"] == 20 and len(device.acks) > acks_before, what="re-ack")
        stats = worker.stats()
    assert (stats["received"], stats["stored"], stats["duplicates"]) == (70, 50, 20)
    assert row_count(db) == 50 and device.acks[-1] == 49


def test_a_gap_holds_the_ack_until_the_missing_entry_arrives(url: str, broker_port: int,
                                                             devices: Callable[..., list[Device]]) -> None:
    with IngestWorker(url, "127.0.0.1", broker_port, settings=FAST) as worker:
        [device] = devices(broker_port, "cam-1")
        device.send(10, hold=(5,))
        wait_for(lambda: worker.stats()["stored"] == 9 and len(device.acks) == worker.stats()["acks"] > 0,
                 what="9 stored and every ack delivered")
        assert (device.acked(), sorted(device.outbox)) == (4, [5, 6, 7, 8, 9])
        device.resend([5])
        wait_for(device.drained, what="acknowledged through 9")
    assert device.acked() == 9


@pytest.mark.parametrize("acks", ["one-write", "ack-each", "none"])
def test_the_broker_gets_a_puback_for_every_stored_message(url: str, db: Database, broker_port: int, acks: str,
                                                            devices: Callable[..., list[Device]],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A named worker acknowledges each message to the broker once it is stored (a batch's PUBACKs in one write,
    or through paho's ack() one by one): its successor on the same session gets nothing again. Without the
    PUBACKs ("none", the control) the broker redelivers them."""
    client_id = f"ingest-puback-{os.getpid()}"
    with IngestWorker(url, "127.0.0.1", broker_port, client_id=client_id, settings=FAST) as worker:
        if acks == "ack-each":  # as with a paho whose private methods moved
            monkeypatch.setattr("edgeml.fleet.devices.mqtt_client.BUFFERED", False)
        elif acks == "none":
            worker._puback_all = lambda tokens: None  # type: ignore[method-assign]
        (cam,) = devices(broker_port, "cam-1")
        cam.send(300)
        wait_for(cam.drained, what="every entry stored and acknowledged to the device")
    with IngestWorker(url, "127.0.0.1", broker_port, client_id=client_id, settings=FAST) as successor:
        cam.send(5)  # queued after anything the broker still holds for the session
        wait_for(lambda: successor.stats()["received"] >= 5, what="the new entries")
        time.sleep(0.3)
        stats = successor.stats()
    assert stored_seqs(db, "cam-1") == list(range(305))
    if acks == "none":
        assert stats["received"] > 5 and stats["duplicates"] == stats["received"] - 5
    else:
        assert (stats["received"], stats["stored"], stats["duplicates"]) == (5, 5, 0)


def test_two_workers_in_a_share_group_split_the_load_without_duplicates(
        url: str, db: Database, broker_port: int, devices: Callable[..., list[Device]]) -> None:
    with IngestWorker(url, "127.0.0.1", broker_port, settings=FAST) as one, \
            IngestWorker(url, "127.0.0.1", broker_port, settings=FAST) as two:
        fleet = devices(broker_port, "cam-1", "cam-2", "cam-3")
        for device in fleet:
            device.send(200)
        wait_for(lambda: all(d.drained() for d in fleet), what="every outbox drained")
        stats = [one.stats(), two.stats()]
    assert [stored_seqs(db, d.device_id) for d in fleet] == [list(range(200))] * 3
    assert all(s["received"] > 0 for s in stats)
    assert sum(s["received"] for s in stats) == sum(s["stored"] for s in stats) == row_count(db) == 600


def test_malformed_messages_are_counted_and_the_worker_keeps_working(url: str, db: Database, broker_port: int,
                                                                     devices: Callable[..., list[Device]]) -> None:
    enroll(db, "cam-1")
    enroll(db, "cam-bad", revoked=True)
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw")
    raw.connect("127.0.0.1", broker_port)
    raw.loop_start()
    cases = [(t, p) for _, t, p, _ in MALFORMED] + [
        (device_topic("cam-bad", "telemetry"), tel("cam-bad", 0).to_bytes()),  # revoked
        (device_topic("cam-new", "state"), State("cam-new", "running").to_bytes()),  # not enrolled
    ]
    expected = Counter(r for *_, r in MALFORMED) + Counter({"revoked": 1, "unknown-device": 1})
    try:
        with IngestWorker(url, "127.0.0.1", broker_port, settings=FAST) as worker:
            for topic, payload in cases:
                raw.publish(topic, payload, qos=1).wait_for_publish(10)
            [device] = devices(broker_port, "cam-1")
            device.send(3)
            wait_for(device.drained, what="good telemetry stored after the bad")
            wait_for(lambda: sum(worker.stats()["rejected"].values()) == len(cases), what="every reject counted")
            stats = worker.stats()
    finally:
        raw.disconnect()
        raw.loop_stop()
    assert stats["rejected"] == dict(expected)
    assert stored_seqs(db, "cam-1") == [0, 1, 2] and stored_seqs(db, "cam-bad") == []


def test_state_and_last_will_reach_the_devices_table(url: str, db: Database, broker_port: int) -> None:
    enroll(db, "cam-1")
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cam-1")
    device.will_set(device_topic("cam-1", "state"), State("cam-1", "offline").to_bytes(), qos=1, retain=True)
    device.connect("127.0.0.1", broker_port)
    device.loop_start()
    running = State("cam-1", "running", model="digits", version="1.0.0", capabilities={"cpu": 4})
    device.publish(device_topic("cam-1", "state"), running.to_bytes(), qos=1, retain=True).wait_for_publish(10)
    store = TelemetryStore(db)
    with IngestWorker(url, "127.0.0.1", broker_port, settings=FAST):  # gets the retained state on subscribing
        wait_for(lambda: store.devices_summary()[0]["status"] == "running", what="retained state")
        summary = store.devices_summary()[0]
        assert (summary["installed"], summary["capabilities"], summary["last_seen"]) == \
            ({"digits": "1.0.0"}, {"cpu": 4}, None)  # a replayed retained state is not a sighting
        device.socket().close()  # the device vanishes: the broker publishes its last will
        wait_for(lambda: store.devices_summary()[0]["status"] == "offline", what="last will")
    device.loop_stop()
    assert store.devices_summary()[0]["last_seen"] is not None


# --- broker restart -----------------------------------------------------------------------------------------


class RestartableBroker:
    """Mosquitto with persistence on, restarted on the same port."""

    def __init__(self, root: Path) -> None:
        self.dir, self.port = root / "broker", free_port()
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.dir / 'data'}/\nautosave_interval 3600\nlog_dest stderr\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        _give_to_broker_user(self.dir)
        log = (self.dir.parent / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(self.dir / "mosquitto.conf")], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        _wait_listening(self.proc, self.port, 10, self.dir.parent / "mosquitto.log")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)  # saves the persistence file
        self.proc.wait(timeout=10)


@pytest.fixture
def restartable_broker() -> Iterator[RestartableBroker]:
    root = _broker_root()
    broker = RestartableBroker(root)
    broker.start()
    try:
        yield broker
    finally:
        if broker.proc is not None and broker.proc.poll() is None:
            broker.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("named_session", [True, False], ids=["named-worker", "anonymous-worker"])
def test_nothing_is_lost_or_duplicated_across_a_broker_restart(url: str, db: Database, named_session: bool,
                                                               restartable_broker: RestartableBroker,
                                                               devices: Callable[..., list[Device]]) -> None:
    """A named worker's session outlives the restart (the broker queues for it); an anonymous worker's does not,
    so what devices send before it has subscribed again is dropped, and only a device that resends on a
    missing acknowledgement (not only on reconnect) gets it stored. Devices resend on a missing ack in both
    cases, as the agent's TelemetrySender does: an ack in flight at the restart can be lost either way."""
    broker, n = restartable_broker, 300
    client_id = f"ingest-{os.getpid()}" if named_session else None
    with IngestWorker(url, "127.0.0.1", broker.port, client_id=client_id, settings=FAST) as worker:
        fleet = devices(broker.port, "cam-1", "cam-2", "cam-3", resend_after_s=5.0 if named_session else 1.0)

        def produce(device: Device) -> None:
            for _ in range(n // 10):
                device.send(10)
                time.sleep(0.01)

        producers = [threading.Thread(target=produce, args=(d,)) for d in fleet]
        for thread in producers:
            thread.start()
        wait_for(lambda: worker.stats()["stored"] >= n // 3, what="a third stored")
        broker.stop()  # devices keep writing to their outboxes meanwhile
        time.sleep(0.3)
        broker.start()
        for thread in producers:
            thread.join()
        wait_for(lambda: all(d.drained() for d in fleet), timeout=120, what="every outbox drained")
        stats = worker.stats()
    assert [stored_seqs(db, d.device_id) for d in fleet] == [list(range(n))] * 3
    assert row_count(db) == 3 * n == stats["stored"]
    assert stats["connects"] == 2  # the worker was there before and after the restart
    assert [d.acked() for d in fleet] == [n - 1] * 3


# --- poison rows and batch deadlines ------------------------------------------------------------------------


def _refuse_rows_marked_poison(db: Database) -> None:
    """A real database refusal for one row's content: a trigger that fails inserts whose metrics say poison."""
    with db.transaction() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON telemetry WHEN NEW.metrics LIKE '%poison%' "
                "BEGIN SELECT RAISE(ABORT, 'poison row'); END")
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN "
                "IF position('poison' in NEW.metrics::text) > 0 THEN "
                "RAISE EXCEPTION 'poison row' USING ERRCODE = '22023'; "
                "END IF; RETURN NEW; END $$ LANGUAGE plpgsql")
            conn.exec_driver_sql("CREATE TRIGGER refuse_poison BEFORE INSERT ON telemetry FOR EACH ROW "
                                 "EXECUTE FUNCTION refuse_poison()")


def test_a_row_the_database_refuses_is_set_aside_and_the_rest_of_its_batch_is_stored(
        url: str, db: Database, broker_port: int, devices: Callable[..., list[Device]]) -> None:
    _refuse_rows_marked_poison(db)
    settings = IngestSettings(flush_ms=300, batch_size=500, reconnect_min_s=0.1, reconnect_max_s=0.5)
    with IngestWorker(url, "127.0.0.1", broker_port, settings=settings) as worker:
        honest, bad = devices(broker_port, "cam-1", "cam-bad")
        honest.send(20)
        bad.client.publish(device_topic("cam-bad", "telemetry"), tel("cam-bad", 0, x="poison").to_bytes(), qos=1)
        bad.client.publish(device_topic("cam-bad", "telemetry"), tel("cam-bad", 1).to_bytes(), qos=1)
        honest.send(20)  # the same batches (300 ms each) as the poison row
        wait_for(honest.drained, what="every honest entry stored and acknowledged")
        wait_for(lambda: worker.stats()["rejected"].get("poison") == 1, what="the poison row counted")
        stats = worker.stats()
    assert stored_seqs(db, "cam-1") == list(range(40))
    assert stored_seqs(db, "cam-bad") == [1]  # its other row was stored; only the refused one was set aside
    assert stats["store_errors"] >= 1 and stats["rejected"] == {"poison": 1}


def test_a_batch_filled_after_a_queue_timeout_still_commits_in_time(url: str, db: Database, broker_port: int,
                                                                      devices: Callable[..., list[Device]]) -> None:
    """The writer's wait for the queue times out (acks were due) just as a message arrives: the batch it then
    takes must still get its deadline, not wait for the next full batch."""
    settings = IngestSettings(flush_ms=20, batch_size=500, ack_interval_s=0.3)
    worker = IngestWorker(url, "127.0.0.1", broker_port, settings=settings)
    raced: list[int] = []
    device_box: list[Device] = []

    class RacingQueue(queue.Queue):  # type: ignore[type-arg]
        """The writer's queue; its timed wait ends with Empty just as a message is put in."""

        def get(self, block: bool = True, timeout: float | None = None) -> Any:
            try:
                return super().get(block, timeout)
            except queue.Empty:
                if timeout is not None and device_box and not raced:
                    raced.append(1)
                    device_box[0].send(1)
                    wait_for(lambda: self.qsize() > 0, timeout=10, what="the racing message queued")
                raise

    worker._queue = RacingQueue()
    with worker:
        [device] = devices(broker_port, "cam-1")
        device.send(1)
        wait_for(lambda: device.acked() == 0, what="the first row acknowledged (the next ack waits 0.3 s)")
        device_box.append(device)
        device.send(1)  # stored at once; its ack is owed in 0.3 s, so the writer's next wait is a timed one
        wait_for(lambda: raced, timeout=10, what="the writer's timed wait")
        wait_for(lambda: stored_seqs(db, "cam-1") == [0, 1, 2], timeout=10, what="the row that came in the race")
