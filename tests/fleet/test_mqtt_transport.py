"""Bundles over MQTT: the distribution service answers a device's TufClient through a real Mosquitto."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgeml.edge_agent.mqtt_fetcher import METADATA_URL, TARGETS_URL, MqttFetcher
from edgeml.edge_agent.tuf_client import TufClient
from edgeml.errors import UpdateVerificationError
from edgeml.fleet.registry.distribution import MAX_CHUNK, DistributionService
from edgeml.fleet.registry.repository import Registry
from edgeml.protocol import Request, device_topic
from tests.fleet.conftest import MakeBundle
from tests.fleet.mosquitto import anonymous_mosquitto

DEVICE = "cam-1"


@pytest.fixture(scope="module")
def broker_port() -> Iterator[int]:
    """An anonymous plain-TCP Mosquitto on 127.0.0.1 (the ACL and TLS are tested in test_broker.py)."""
    with anonymous_mosquitto() as (port, _):
        yield port


@pytest.fixture
def service(registry: Registry, broker_port: int) -> Iterator[DistributionService]:
    with DistributionService(registry.dir, "127.0.0.1", broker_port) as svc:
        yield svc


@pytest.fixture
def device(broker_port: int, service: DistributionService, registry: Registry,
           tmp_path: Path) -> Iterator[TufClient]:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEVICE)
    client.connect("127.0.0.1", broker_port)
    client.loop_start()
    try:
        fetcher = MqttFetcher(client, DEVICE, timeout=5)
        root = (registry.metadata_dir / "1.root.json").read_bytes()
        yield TufClient(root, tmp_path / "device" / "metadata", tmp_path / "device" / "bundles",
                        METADATA_URL, TARGETS_URL, fetcher=fetcher)
        fetcher.close()
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_bundle_is_downloaded_and_verified_over_mqtt(registry: Registry, make_bundle: MakeBundle,
                                                       device: TufClient) -> None:
    bundle = make_bundle("1.0.0")
    published = registry.publish(bundle)
    got = device.fetch("digits", "1.0.0", "onnx-fp32")
    assert hashlib.sha256(got.path.read_bytes()).hexdigest() == published.sha256 == got.sha256


def test_an_unlisted_target_is_not_found(registry: Registry, device: TufClient) -> None:
    with pytest.raises(UpdateVerificationError) as info:
        device.fetch("digits", "9.9.9", "onnx-fp32")
    assert info.value.kind == "not-found"


def test_a_tampered_target_is_refused(registry: Registry, make_bundle: MakeBundle, device: TufClient,
                                      tmp_path: Path) -> None:
    registry.publish(make_bundle("1.0.0", payload=b"x" * 5000))
    stored = next(registry.targets_dir.rglob("*.edgeml"))
    data = bytearray(stored.read_bytes())
    data[-30] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(UpdateVerificationError, match="does not match the signed hash") as info:
        device.fetch("digits", "1.0.0", "onnx-fp32")
    assert info.value.kind == "arbitrary-file"
    assert not list((tmp_path / "device" / "bundles").rglob("*.edgeml"))


def test_a_1_mb_bundle_travels_in_chunks(registry: Registry, make_bundle: MakeBundle, device: TufClient,
                                         service: DistributionService) -> None:
    bundle = make_bundle("1.0.0", payload=os.urandom(1_000_000))
    published = registry.publish(bundle)
    before = service.served_bytes
    start = time.perf_counter()
    got = device.fetch("digits", "1.0.0", "onnx-fp32")
    seconds = time.perf_counter() - start
    size = got.path.stat().st_size
    assert size > 1_000_000 and size > 10 * MAX_CHUNK
    assert hashlib.sha256(got.path.read_bytes()).hexdigest() == published.sha256
    assert service.served_bytes - before >= size
    print(f"\n{size / 1e6:.2f} MB over MQTT in {seconds:.2f} s: {size / 1e6 / seconds:.1f} MB/s "
          f"({-(-size // MAX_CHUNK)} chunks of {MAX_CHUNK} B)")


def test_two_services_answering_every_request_are_harmless(registry: Registry, make_bundle: MakeBundle,
                                                          device: TufClient, broker_port: int) -> None:
    """Every request answered twice (a second, unshared service; or a QoS 1 redelivery): the duplicates are
    dropped and the file arrives whole."""
    published = registry.publish(make_bundle("1.0.0", payload=os.urandom(300_000)))
    with DistributionService(registry.dir, "127.0.0.1", broker_port) as second:
        got = device.fetch("digits", "1.0.0", "onnx-fp32")
        # it did answer too; its replies may still be on their way when the first service's have completed
        # the file, so give it a moment rather than reading its counter at once
        deadline = time.monotonic() + 15
        while second.served_bytes < published.length and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.served_bytes >= published.length
    assert hashlib.sha256(got.path.read_bytes()).hexdigest() == published.sha256


@pytest.mark.parametrize(("params", "error"), [
    ({"path": "targets/../../offline-keys/root-1.pem", "offset": 0, "length": 10}, "bad-request"),
    ({"path": "/etc/passwd", "offset": 0, "length": 10}, "bad-request"),
    ({"path": "offline-keys/root-1.pem", "offset": 0, "length": 10}, "bad-request"),
    ({"path": "metadata/root.json", "offset": 0, "length": 10**7}, "bad-request"),
    ({"path": "metadata/root.json", "offset": -1, "length": 10}, "bad-request"),
    ({"path": "metadata/nope.json", "offset": 0, "length": 10}, "not-found"),
])
def test_requests_outside_the_repository_are_refused(registry: Registry, params: dict[str, object],
                                                     error: str) -> None:
    service = DistributionService(registry.dir, "127.0.0.1", 1)
    reply = service.answer(Request("c1", device_topic(DEVICE, "replies"), "get", params))
    assert not reply.ok and reply.error is not None and reply.error.startswith(error)


def test_a_symlink_out_of_the_repository_is_refused(registry: Registry) -> None:
    (registry.targets_dir / "escape").symlink_to(registry.dir / "offline-keys")
    service = DistributionService(registry.dir, "127.0.0.1", 1)
    params = {"path": "targets/escape/root-1.pem", "offset": 0, "length": 10}
    reply = service.answer(Request("c1", device_topic(DEVICE, "replies"), "get", params))
    assert not reply.ok and reply.error is not None and reply.error.startswith("bad-request")
