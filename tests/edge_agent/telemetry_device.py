"""A device's telemetry path wired the way the agent wires it: aggregator, outbox, sender, paho client, and the
``telemetry-ack`` command handled; time simulated (each tick is one 10 s telemetry interval).

Used in-process by the broker-restart test and as a real process (``python -m tests.edge_agent.telemetry_device
--outbox F --device D --port P --ticks N``) by the SIGKILL test: it prints ``{"seq": n}`` after each entry is
durably appended, and ``{"done": {...}}`` once its outbox is empty after the last tick.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgeml.edge_agent.outbox import Outbox
from edgeml.edge_agent.telemetry import Aggregator, SystemProbe, TelemetrySender
from edgeml.protocol import Command, ProtocolError, device_topic, parse

INTERVAL_S = 10.0  # simulated telemetry interval
REQUESTS_PER_TICK = 50  # synthetic requests recorded per interval (latency 1 ms .. 1.49 ms, every 10th fails)


class SimClock:
    """Monotonic and wall time that move only when told to."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._lock = threading.Lock()
        self._now = start

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    wall = monotonic


class Device:
    """One device's telemetry: an outbox file, a paho client to ``port`` and a simulated clock."""

    def __init__(self, outbox_path: Path, device_id: str, port: int, clock: SimClock | None = None) -> None:
        self.device_id = device_id
        self.clock = clock or SimClock()
        self.outbox = Outbox(outbox_path, device_id)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.sender = TelemetrySender(self.client, device_id, self.outbox, clock=self.clock.monotonic,
                                      wall=self.clock.wall, resend_after_s=30.0, max_in_flight=32)
        self.aggregator = Aggregator(clock=self.clock.monotonic, probe=SystemProbe())
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self.sender.on_disconnect
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(device_topic(self.device_id, "commands"), qos=1)
            self.sender.on_connect()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            command = parse("command", bytes(msg.payload))
        except ProtocolError:
            return
        if isinstance(command, Command) and command.type == "telemetry-ack":
            self.sender.on_ack(int(command.args["seq"]))

    def tick(self) -> int:
        """One simulated interval: some requests, then the window's telemetry appended and pumped. Returns its seq."""
        for i in range(REQUESTS_PER_TICK):
            self.aggregator.record(0.001 + i * 1e-5, ok=i % 10 != 0)
        self.clock.advance(INTERVAL_S)
        metrics = self.aggregator.snapshot_and_reset(extra={"model": "digits", "version": "1.0.0", "slot": "a"})
        return self.sender.submit(metrics).seq

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.outbox.close()


def say(**data: Any) -> None:
    print(json.dumps(data), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outbox", type=Path, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ticks", type=int, required=True)
    parser.add_argument("--tick-sleep", type=float, default=0.01)
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    args = parser.parse_args()
    device = Device(args.outbox, args.device, args.port)
    for _ in range(args.ticks):
        say(seq=device.tick())
        time.sleep(args.tick_sleep)
    deadline = time.monotonic() + args.drain_timeout
    while len(device.outbox) and time.monotonic() < deadline:  # keep time moving so timeouts resend
        device.clock.advance(INTERVAL_S)
        device.sender.pump()
        time.sleep(0.05)
    say(done={"next_seq": device.outbox.next_seq, "acked": device.outbox.acked, "pending": len(device.outbox),
              "published": device.sender.published, "resends": device.sender.resends})
    device.close()


if __name__ == "__main__":
    main()
