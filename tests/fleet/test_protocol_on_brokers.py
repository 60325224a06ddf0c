"""The device protocol on both brokers the project supports, a real Mosquitto and the embedded amqtt broker:
a published bundle is fetched over MQTT request/reply and verified by TUF; a retained State and a last will
reach a subscriber that comes later; a Command reaches only the device it is addressed to."""

from __future__ import annotations

import hashlib
import os
import queue
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgeml.edge_agent.mqtt_fetcher import METADATA_URL, TARGETS_URL, MqttFetcher
from edgeml.edge_agent.tuf_client import TufClient
from edgeml.fleet.registry.distribution import MAX_CHUNK, DistributionService
from edgeml.fleet.registry.repository import Registry
from edgeml.protocol import PREFIX, Command, State, device_topic, parse
from tests.fleet.brokers import BROKERS, plain_broker
from tests.fleet.conftest import MakeBundle

Address = tuple[str, int]
Inbox = queue.Queue[mqtt.MQTTMessage]


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> Iterator[Address]:
    with plain_broker(request.param) as address:
        yield address


def connect(broker: Address, client_id: str, inbox: Inbox | None = None, start: bool = True) -> mqtt.Client:
    """A connected MQTT 3.1.1 client; messages go to ``inbox``; its network loop runs if ``start``."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    if inbox is not None:
        client.on_message = lambda c, u, m: inbox.put(m)
    client.connect(*broker, keepalive=30)
    if start:
        client.loop_start()
    return client


def subscribe(client: mqtt.Client, topic: str) -> None:
    """Subscribe at QoS 1 and wait for the broker's acknowledgement."""
    acked: queue.Queue[list[mqtt.ReasonCode]] = queue.Queue()
    client.on_subscribe = lambda c, u, mid, reasons, props: acked.put(reasons)
    client.subscribe(topic, qos=1)
    assert not any(r.is_failure for r in acked.get(timeout=5))


def close(*clients: mqtt.Client) -> None:
    for client in clients:
        client.disconnect()
        client.loop_stop()


def test_a_published_bundle_is_fetched_and_verified(broker: Address, registry: Registry, make_bundle: MakeBundle,
                                                     tmp_path: Path) -> None:
    published = registry.publish(make_bundle("1.0.0", payload=os.urandom(300_000)))
    device = connect(broker, "cam-1")
    try:
        with DistributionService(registry.dir, *broker) as service:
            fetcher = MqttFetcher(device, "cam-1", timeout=10)
            client = TufClient((registry.metadata_dir / "1.root.json").read_bytes(), tmp_path / "meta",
                               tmp_path / "bundles", METADATA_URL, TARGETS_URL, fetcher=fetcher)
            got = client.fetch("digits", "1.0.0", "onnx-fp32")
            fetcher.close()
        size = got.path.stat().st_size
        assert hashlib.sha256(got.path.read_bytes()).hexdigest() == published.sha256 == got.sha256
        assert size == published.length > 6 * MAX_CHUNK
        assert service.served_bytes >= size  # plus the metadata files
    finally:
        close(device)


def test_a_retained_state_reaches_a_late_subscriber(broker: Address) -> None:
    state = State("cam-1", "running", model="digits", version="1.0.0", slot="a", clock_synced=True)
    device = connect(broker, "cam-1")
    device.publish(device_topic("cam-1", "state"), state.to_bytes(), qos=1, retain=True).wait_for_publish(5)
    close(device)

    inbox: Inbox = queue.Queue()
    fleet = connect(broker, "fleet", inbox)
    try:
        subscribe(fleet, f"{PREFIX}devices/+/state")
        msg = inbox.get(timeout=5)
        assert (msg.topic, msg.retain) == (device_topic("cam-1", "state"), True)
        assert parse("state", bytes(msg.payload)) == state
    finally:
        close(fleet)


def test_a_last_will_reaches_a_late_subscriber(broker: Address) -> None:
    online, offline = State("cam-2", "running"), State("cam-2", "offline")
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cam-2", protocol=mqtt.MQTTv311)
    device.will_set(device_topic("cam-2", "state"), offline.to_bytes(), qos=1, retain=True)
    device.connect(*broker, keepalive=30)
    device.loop_start()
    device.publish(device_topic("cam-2", "state"), online.to_bytes(), qos=1, retain=True).wait_for_publish(5)
    device.loop_stop()
    sock = device.socket()
    assert sock is not None
    sock.close()  # the connection drops without DISCONNECT, as when a device loses power

    inbox: Inbox = queue.Queue()
    fleet = connect(broker, "fleet", inbox)
    try:
        subscribe(fleet, device_topic("cam-2", "state"))
        states = [parse("state", bytes(inbox.get(timeout=5).payload))]
        while states[-1] != offline:  # a late subscriber may first see the retained "running", then the will
            msg = inbox.get(timeout=10)
            states.append(parse("state", bytes(msg.payload)))
        assert states[-1] == offline and all(s in (online, offline) for s in states)
    finally:
        close(fleet)

    inbox2: Inbox = queue.Queue()
    later = connect(broker, "fleet-2", inbox2)
    try:
        subscribe(later, device_topic("cam-2", "state"))
        msg = inbox2.get(timeout=5)
        assert msg.retain and parse("state", bytes(msg.payload)) == offline
    finally:
        close(later)


def test_a_command_reaches_only_its_device(broker: Address) -> None:
    inboxes: dict[str, Inbox] = {"cam-1": queue.Queue(), "cam-2": queue.Queue()}
    devices = {name: connect(broker, name, inbox) for name, inbox in inboxes.items()}
    fleet = connect(broker, "fleet")
    try:
        for name, client in devices.items():
            subscribe(client, device_topic(name, "commands"))
        update = Command("c-1", "update", {"model": "digits", "version": "1.0.0"}, issued_at=1.5)
        fleet.publish(device_topic("cam-1", "commands"), update.to_bytes(), qos=1).wait_for_publish(5)
        got = inboxes["cam-1"].get(timeout=5)
        assert (got.topic, parse("command", bytes(got.payload))) == (device_topic("cam-1", "commands"), update)

        ping = Command("c-2", "ping")  # sent after cam-1 had its command: cam-2's first message must be this
        fleet.publish(device_topic("cam-2", "commands"), ping.to_bytes(), qos=1).wait_for_publish(5)
        assert parse("command", bytes(inboxes["cam-2"].get(timeout=5).payload)) == ping
        assert inboxes["cam-1"].empty() and inboxes["cam-2"].empty()
    finally:
        close(fleet, *devices.values())
