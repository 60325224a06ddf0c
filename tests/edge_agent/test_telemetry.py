"""Telemetry: histogram accuracy against numpy, the aggregates, the sender's protocol, and delivery through a
real Mosquitto across a broker restart after a simulated hour offline and across a SIGKILL of the device."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeml.edge_agent.outbox import Outbox
from edgeml.edge_agent.telemetry import (
    MAX_LATENCY_S,
    MIN_LATENCY_S,
    RELATIVE_ERROR,
    Aggregator,
    LatencyHistogram,
    SystemProbe,
    TelemetrySender,
)
from edgeml.protocol import Command, Telemetry, device_topic, parse
from tests.conftest import REPO_ROOT, require_service
from tests.edge_agent.telemetry_device import REQUESTS_PER_TICK, Device, SimClock
from tests.fleet.mosquitto import MOSQUITTO, free_port

QS = (0.0, 1.0, 25.0, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0)
TOLERANCE = RELATIVE_ERROR * (1 + 1e-9)


# --- histogram ----------------------------------------------------------------------------------------------


def assert_close_to_numpy(hist: LatencyHistogram, values: np.ndarray) -> None:
    got = np.array(hist.percentiles(QS), dtype=np.float64)
    want = np.percentile(values, QS)
    assert np.all(np.abs(got - want) <= TOLERANCE * want), list(zip(QS, got, want))


@pytest.mark.parametrize("name", ["lognormal-fast", "lognormal-wide", "bimodal", "uniform", "constant", "one",
                                  "pareto-tail"])
@pytest.mark.parametrize("path", ["record", "record_many"])
def test_percentiles_are_within_the_documented_error(name: str, path: str) -> None:
    rng = np.random.default_rng(7)
    values = {
        "lognormal-fast": lambda: rng.lognormal(np.log(30e-6), 0.4, 20_000),
        "lognormal-wide": lambda: rng.lognormal(np.log(2e-3), 2.0, 20_000),
        "bimodal": lambda: np.concatenate([rng.normal(20e-6, 2e-6, 9_000), rng.normal(5e-3, 5e-4, 1_000)]),
        "uniform": lambda: rng.uniform(1e-6, 1.0, 20_000),
        "constant": lambda: np.full(1_000, 42e-6),
        "one": lambda: np.array([0.0123]),
        "pareto-tail": lambda: np.minimum(10e-6 * (1 + rng.pareto(1.5, 20_000)), 99.0),
    }[name]()
    values = np.clip(values, MIN_LATENCY_S, MAX_LATENCY_S)
    hist = LatencyHistogram()
    if path == "record":
        for v in values.tolist():
            hist.record(v)
    else:
        hist.record_many(values)
    assert hist.count == len(values)
    assert hist.mean_s == pytest.approx(float(values.mean()), rel=1e-9)
    assert_close_to_numpy(hist, values)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(MIN_LATENCY_S, MAX_LATENCY_S), min_size=1, max_size=300),
       st.floats(0.0, 100.0))
def test_any_percentile_of_any_sample_is_within_the_error(values: list[float], q: float) -> None:
    hist = LatencyHistogram()
    hist.record_many(np.array(values))
    want = float(np.percentile(values, q))
    got = hist.percentile(q)
    assert got is not None and abs(got - want) <= TOLERANCE * want


@pytest.mark.parametrize(("value", "reported"), [
    (0.0, MIN_LATENCY_S / 2), (3e-7, MIN_LATENCY_S / 2), (250.0, MAX_LATENCY_S), (1e9, MAX_LATENCY_S),
])
def test_values_outside_the_range_are_clamped(value: float, reported: float) -> None:
    scalar, vector = LatencyHistogram(), LatencyHistogram()
    scalar.record(value, n=3)
    vector.record_many(np.full(3, value))
    assert scalar.percentile(50) == vector.percentile(50) == pytest.approx(reported)


def test_merge_and_reset() -> None:
    rng = np.random.default_rng(1)
    a_values, b_values = rng.lognormal(-9, 1, 5_000), rng.lognormal(-6, 0.5, 3_000)
    a, b = LatencyHistogram(), LatencyHistogram()
    a.record_many(a_values)
    b.record_many(b_values)
    a.merge(b)
    assert a.count == 8_000
    assert_close_to_numpy(a, np.concatenate([a_values, b_values]))
    a.reset()
    assert a.count == 0 and a.percentiles([50, 99]) == [None, None] and a.mean_s is None
    with pytest.raises(ValueError, match="within 0..100"):
        b.percentile(101)


# --- aggregates ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("buffer", [1, 7, 4096])
def test_a_window_reports_counts_rates_and_percentiles(buffer: int) -> None:
    clock = SimClock(start=100.0)
    agg = Aggregator(clock=clock.monotonic, buffer=buffer)
    rng = np.random.default_rng(3)
    latencies = rng.lognormal(np.log(40e-6), 0.3, 1_000)
    for i, latency in enumerate(latencies.tolist()):
        agg.record(latency, ok=i % 10 != 0)
    agg.record(2e-3, ok=False, n=20)  # a failed batch of 20
    clock.advance(10.0)
    m = agg.snapshot_and_reset(extra={"model": "digits", "version": "1.2.0", "slot": "b", "drift_psi": 0.02})
    everything = np.concatenate([latencies, np.full(20, 2e-3)])
    assert (m["requests"], m["errors"], m["window_s"]) == (1_020, 120, 10.0)
    assert m["error_rate"] == pytest.approx(120 / 1_020)
    assert m["throughput_rps"] == pytest.approx(102.0)
    for key, q in (("latency_p50_ms", 50), ("latency_p95_ms", 95), ("latency_p99_ms", 99)):
        want = float(np.percentile(everything, q)) * 1000
        assert abs(m[key] - want) <= TOLERANCE * want + 1e-4, key  # + rounding to 0.1 us
    assert m["latency_mean_ms"] == pytest.approx(float(everything.mean()) * 1000, abs=1e-4)
    assert (m["model"], m["version"], m["slot"], m["drift_psi"]) == ("digits", "1.2.0", "b", 0.02)
    assert (m["cpu_percent"], m["rss_mib"], m["temperature_c"]) == (None, None, None)
    Telemetry("cam-1", 0, 0.0, m).to_bytes()  # a valid message

    clock.advance(5.0)
    empty = agg.snapshot_and_reset()
    assert (empty["requests"], empty["errors"], empty["error_rate"], empty["window_s"]) == (0, 0, 0.0, 5.0)
    assert empty["latency_p50_ms"] is None and empty["latency_p99_ms"] is None and empty["throughput_rps"] == 0.0


def test_records_from_many_threads_are_all_counted() -> None:
    agg = Aggregator(buffer=64)
    per_thread, threads = 20_000, 4

    def work(k: int) -> None:
        for i in range(per_thread):
            agg.record(1e-5 * (k + 1), ok=i % 4 != 0)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    m = agg.snapshot_and_reset()
    assert (m["requests"], m["errors"]) == (per_thread * threads, per_thread * threads // 4)
    assert m["latency_mean_ms"] == pytest.approx(0.025, rel=1e-6)  # mean of 10, 20, 30, 40 us


def test_a_nan_latency_does_not_break_the_window() -> None:
    agg = Aggregator(buffer=2)
    for latency in (float("nan"), 1e-3, 1e-3):
        agg.record(latency)
    m = agg.snapshot_and_reset()
    assert m["requests"] == 3 and m["latency_p99_ms"] == pytest.approx(1.0, rel=RELATIVE_ERROR)
    assert m["latency_mean_ms"] is None
    Telemetry("cam-1", 0, 0.0, m).to_bytes()


def test_the_probe_reads_thermal_zones_memory_and_cpu(tmp_path: Path) -> None:
    for zone, text in (("thermal_zone0", "45000\n"), ("thermal_zone1", "52500\n"), ("thermal_zone2", "n/a\n")):
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "temp").write_text(text)
    (tmp_path / "cooling_device0").mkdir()
    probe = SystemProbe(thermal_root=tmp_path)
    assert probe.temperature_c() == 52.5
    assert SystemProbe(thermal_root=tmp_path / "absent").temperature_c() is None
    assert SystemProbe(proc_self=tmp_path / "absent").rss_mib() is None
    if Path("/proc/self/statm").exists():
        rss = probe.rss_mib()
        assert rss is not None and 5 < rss < 4096
    ticks = iter([0.0, 2.0])
    burner = SystemProbe(clock=lambda: next(ticks))
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    cpu = burner.cpu_percent()
    assert cpu is not None and 2.0 <= cpu <= 100.0  # >= 50 ms of CPU over 2 "seconds"


# --- the sender against an in-memory client --------------------------------------------------------------------


class FakeClient:
    """Implements the sender's Publisher interface; records what was published."""

    def __init__(self) -> None:
        self.connected = True
        self.sent: list[int] = []

    def publish(self, topic: str, payload: bytes, qos: int) -> Any:
        assert topic == device_topic("cam-1", "telemetry") and qos == 1
        self.sent.append(parse("telemetry", payload).seq)  # type: ignore[union-attr]
        return None

    def is_connected(self) -> bool:
        return self.connected


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[FakeClient, Outbox, TelemetrySender, SimClock]]:
    client, clock = FakeClient(), SimClock(0.0)
    with Outbox(tmp_path / "o.db", "cam-1") as box:
        yield client, box, TelemetrySender(client, "cam-1", box, clock=clock.monotonic, wall=clock.wall,
                                           resend_after_s=30, max_in_flight=4), clock


Rig = tuple[FakeClient, Outbox, TelemetrySender, SimClock]


def submit(sender: TelemetrySender, n: int) -> None:
    for i in range(n):
        sender.submit({"i": i})


def test_at_most_max_in_flight_are_published_and_acks_let_more_go(rig: Rig) -> None:
    client, box, sender, _ = rig
    submit(sender, 10)
    assert client.sent == [0, 1, 2, 3] and sender.in_flight == 4
    sender.on_ack(1)
    assert client.sent == [0, 1, 2, 3, 4, 5] and len(box) == 8
    sender.on_ack(1)  # a repeated ack changes nothing
    sender.on_ack(5)
    assert client.sent == list(range(10)) and sender.in_flight == 4
    sender.on_ack(9)
    assert len(box) == 0 and sender.in_flight == 0 and client.sent == list(range(10))


def test_nothing_is_published_while_disconnected_and_a_reconnect_resends_in_order(rig: Rig) -> None:
    client, box, sender, _ = rig
    submit(sender, 2)
    sender.on_ack(0)
    client.connected = False
    sender.on_disconnect()
    submit(sender, 5)  # seqs 2..6 while offline
    assert client.sent == [0, 1] and len(box) == 6
    client.connected = True
    sender.on_connect()
    assert client.sent == [0, 1, 1, 2, 3, 4]  # everything unacked, from the first, in order
    sender.on_ack(4)
    assert client.sent[-2:] == [5, 6]


def test_a_reconnect_is_noticed_without_the_callback(rig: Rig) -> None:
    client, _, sender, _ = rig
    submit(sender, 2)
    client.connected = False
    sender.pump()
    client.connected = True
    sender.pump()
    assert client.sent == [0, 1, 0, 1] and sender.resends == 1


@pytest.mark.parametrize(("advance", "resent"), [(29.0, False), (30.0, True), (3600.0, True)])
def test_unacknowledged_entries_are_resent_after_the_timeout(rig: Rig, advance: float, resent: bool) -> None:
    client, _, sender, clock = rig
    submit(sender, 3)
    clock.advance(advance)
    sender.pump()
    assert client.sent == ([0, 1, 2, 0, 1, 2] if resent else [0, 1, 2])


def test_a_failed_paho_connection_is_not_taken_for_a_connection(rig: Rig) -> None:
    client, _, sender, _ = rig
    client.connected = False

    class Failure:
        is_failure = True

    sender.on_connect(None, None, None, Failure(), None)
    assert client.sent == []


# --- through a real broker -------------------------------------------------------------------------------------


class Broker:
    """A Mosquitto that can be killed and started again on the same port."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "mosquitto.conf").write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")

    def start(self) -> None:
        log = (self.root / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(self.root / "mosquitto.conf")], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: self._listening(), 10, "mosquitto to listen")

    def _listening(self) -> bool:
        import socket

        assert self.proc is not None and self.proc.poll() is None, (self.root / "mosquitto.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Receiver:
    """A minimal fleet side: stores telemetry by (device, seq), drops duplicates, acks the contiguous high."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.stored: dict[str, dict[int, Telemetry]] = {}
        self.first_arrivals: dict[str, list[int]] = {}
        self.high: dict[str, int] = {}
        self.duplicates = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-{uuid.uuid4().hex[:8]}")
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.subscribed = threading.Event()  # set on each SUBACK (after every reconnect)
        self.client.on_connect = lambda c, *_: c.subscribe("edgeml/v1/devices/+/telemetry", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        t = parse("telemetry", bytes(msg.payload))
        assert isinstance(t, Telemetry)
        with self.lock:
            rows = self.stored.setdefault(t.device_id, {})
            if t.seq in rows:
                self.duplicates += 1
            else:
                rows[t.seq] = t
                self.first_arrivals.setdefault(t.device_id, []).append(t.seq)
            high = self.high.get(t.device_id, -1)
            while high + 1 in rows:
                high += 1
            self.high[t.device_id] = high
        if high >= 0:
            ack = Command(id=uuid.uuid4().hex, type="telemetry-ack", args={"seq": high})
            client.publish(device_topic(t.device_id, "commands"), ack.to_bytes(), qos=1)

    def seqs(self, device_id: str) -> list[int]:
        with self.lock:
            return sorted(self.stored.get(device_id, {}))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker() -> Iterator[Broker]:
    if not MOSQUITTO.exists():
        require_service("mosquitto", False, f"{MOSQUITTO} not installed (apt-get install mosquitto)")
    root = Path(tempfile.mkdtemp(prefix="edgeml-telemetry-"))
    root.chmod(0o755)
    b = Broker(root)
    b.start()
    try:
        yield b
    finally:
        b.kill()
        shutil.rmtree(root, ignore_errors=True)


def assert_exactly_once_in_order(receiver: Receiver, device_id: str, total: int) -> None:
    assert receiver.seqs(device_id) == list(range(total))  # 0 lost
    arrivals = receiver.first_arrivals[device_id]
    assert arrivals == sorted(arrivals) and len(arrivals) == total  # each stored once, in order


def test_an_hour_offline_and_a_broker_restart_lose_and_duplicate_nothing(broker: Broker, tmp_path: Path) -> None:
    receiver = Receiver(broker.port)
    device = Device(tmp_path / "outbox.db", "cam-1", broker.port)
    started = time.monotonic()
    try:
        wait_for(device.client.is_connected, 10, "the device to connect")
        for _ in range(30):
            device.tick()
        wait_for(lambda: len(device.outbox) == 0, 30, "the first 30 entries to be acknowledged")
        assert receiver.seqs("cam-1") == list(range(30))

        broker.kill()
        wait_for(lambda: not device.client.is_connected(), 30, "the device to notice the broker is gone")
        published = device.sender.published
        offline_from = device.clock.monotonic()
        for _ in range(360):  # one simulated hour, one entry every 10 s
            device.tick()
        assert device.clock.monotonic() - offline_from == 3600.0
        assert len(device.outbox) == 360 and device.sender.published == published

        # The receiver (a plain subscriber, no persistent session) must be back before the device resends, or the
        # broker drops what nobody subscribes to yet and the resend timer sends it again, out of order: hold the
        # device back until the receiver has subscribed again.
        device.client.disconnect()  # stops its reconnect attempts
        device.client.loop_stop()
        receiver.subscribed.clear()
        broker.start()  # same port, empty: no sessions, no retained messages
        wait_for(receiver.subscribed.is_set, 30, "the receiver to subscribe again")
        device.client.connect_async("127.0.0.1", broker.port, keepalive=5)
        device.client.loop_start()
        deadline = time.monotonic() + 60
        while len(device.outbox) or len(receiver.seqs("cam-1")) < device.outbox.next_seq:
            assert time.monotonic() < deadline, f"not drained: {len(device.outbox)} pending"
            device.tick()  # time goes on: more entries, and the resend timer runs
            time.sleep(0.05)
        total = device.outbox.next_seq
        assert_exactly_once_in_order(receiver, "cam-1", total)
        assert device.outbox.acked == total - 1
        last = receiver.stored["cam-1"][total - 1].metrics
        assert (last["requests"], last["errors"], last["slot"]) == (REQUESTS_PER_TICK, REQUESTS_PER_TICK // 10, "a")
        print(f"\n{total} entries (360 appended offline over a simulated hour) in {time.monotonic() - started:.1f} s:"
              f" 0 lost, 0 stored twice; {receiver.duplicates} duplicate deliveries dropped by the store;"
              f" {device.sender.published} publications, {device.sender.resends} go-back resends")
    finally:
        device.close()
        receiver.close()


def test_a_brokers_acknowledgement_is_not_storage(broker: Broker, tmp_path: Path) -> None:
    """Published with nobody subscribed, the broker PUBACKs and discards: the outbox keeps every entry."""
    device = Device(tmp_path / "outbox.db", "cam-3", broker.port)
    receiver: Receiver | None = None
    try:
        wait_for(device.client.is_connected, 10, "the device to connect")
        for _ in range(5):
            device.tick()
        wait_for(lambda: not device.client._out_messages, 10, "the broker's PUBACKs")
        assert len(device.outbox) == 5 and device.sender.in_flight == 5
        receiver = Receiver(broker.port)
        wait_for(lambda: receiver is not None and receiver.client.is_connected(), 10, "the receiver")
        for _ in range(4):  # 40 simulated seconds: past the 30 s resend timer
            device.tick()
            time.sleep(0.05)
        wait_for(lambda: len(device.outbox) == 0, 30, "the acknowledgements")
        # 0..4 come again after the resend timer, behind 5 (published as soon as the receiver was there)
        assert receiver.seqs("cam-3") == list(range(9)) and len(receiver.first_arrivals["cam-3"]) == 9
        assert device.sender.resends >= 1
    finally:
        device.close()
        if receiver:
            receiver.close()


def run_device(outbox: Path, port: int, ticks: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tests.edge_agent.telemetry_device", "--outbox", str(outbox), "--device", "cam-2",
           "--port", str(port), "--ticks", str(ticks), "--tick-sleep", "0.01"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env={**os.environ})


def test_a_device_killed_mid_stream_resumes_without_loss_or_duplicates(broker: Broker, tmp_path: Path) -> None:
    receiver = Receiver(broker.port)
    outbox = tmp_path / "outbox.db"
    try:
        first = run_device(outbox, broker.port, ticks=10_000)
        assert first.stdout is not None
        printed = [json.loads(line)["seq"] for line, _ in zip(first.stdout, range(60))]
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert printed == list(range(60))

        second = run_device(outbox, broker.port, ticks=40)
        out, _ = second.communicate(timeout=120)
        lines = [json.loads(line) for line in out.splitlines()]
        seqs, done = [d["seq"] for d in lines[:-1]], lines[-1]["done"]
        assert seqs[0] >= 60 and seqs == list(range(seqs[0], seqs[0] + 40))  # numbering continued, none reused
        assert done["pending"] == 0 and done["acked"] == done["next_seq"] - 1 == seqs[-1]
        wait_for(lambda: len(receiver.seqs("cam-2")) == done["next_seq"], 10, "the receiver")
        assert_exactly_once_in_order(receiver, "cam-2", done["next_seq"])
        print(f"\nkilled after seq {printed[-1]} (next seq on restart {seqs[0]}); {done['next_seq']} entries"
              f" exactly once; {receiver.duplicates} duplicate deliveries dropped")
    finally:
        receiver.close()
