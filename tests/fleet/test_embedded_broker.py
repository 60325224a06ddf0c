"""The embedded amqtt broker: a real MQTT 3.1.1 listener in a background thread, started and stopped cleanly."""

from __future__ import annotations

import queue
import socket
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from edgeml.errors import ConfigError

pytest.importorskip("amqtt")

from edgeml.fleet.devices.embedded_broker import EmbeddedBroker


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


def _client(broker: EmbeddedBroker, client_id: str, inbox: queue.Queue[mqtt.MQTTMessage] | None = None) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if inbox is not None:
        client.on_message = lambda c, u, m: inbox.put(m)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def _subscribe(client: mqtt.Client, topic: str, qos: int = 1) -> None:
    done: queue.Queue[object] = queue.Queue()
    client.on_subscribe = lambda c, u, mid, reasons, props: done.put(reasons)
    client.subscribe(topic, qos=qos)
    reasons = done.get(timeout=5)
    assert all(not r.is_failure for r in reasons)  # type: ignore[attr-defined]


def test_port_0_resolves_to_a_listening_port(broker: EmbeddedBroker) -> None:
    assert broker.host == "127.0.0.1" and broker.port > 0
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    with socket.create_connection((broker.host, broker.port), timeout=2):
        pass


@pytest.mark.parametrize(("qos", "payload"), [(0, b"zero"), (1, b"one"), (2, b"two"), (1, bytes(range(256)) * 400)])
def test_a_message_reaches_a_subscriber_intact(broker: EmbeddedBroker, qos: int, payload: bytes) -> None:
    inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    sub = _client(broker, "sub", inbox)
    pub = _client(broker, "pub")
    try:
        _subscribe(sub, "t/#", qos=qos)
        pub.publish("t/x", payload, qos=qos).wait_for_publish(5)
        msg = inbox.get(timeout=5)
        assert (msg.topic, bytes(msg.payload), msg.qos) == ("t/x", payload, qos)
    finally:
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()


def test_a_taken_port_is_a_config_error(broker: EmbeddedBroker) -> None:
    other = EmbeddedBroker(port=broker.port)
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{broker.port}"):
        other.start()
    other.stop()  # nothing to stop: a no-op


def test_stop_closes_the_listener_and_is_idempotent() -> None:
    broker = EmbeddedBroker()
    broker.start()
    port = broker.port
    broker.stop()
    broker.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_it_can_be_started_again_after_stop() -> None:
    broker = EmbeddedBroker()
    with broker:
        first = broker.port
    broker.port = 0
    with broker:
        assert broker.port > 0
        with socket.create_connection(("127.0.0.1", broker.port), timeout=2):
            pass
    assert first > 0


def test_starting_twice_is_refused(broker: EmbeddedBroker) -> None:
    with pytest.raises(ConfigError, match="already started"):
        broker.start()
