"""Broadcast distribution and shared subscriptions, on a real Mosquitto with real TUF verification.

A rollout's bundle is published once as retained messages; devices take it from the broker and ask the
distribution service only for what they missed. Several services split the get requests through a
shared subscription without answering any twice.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgeml.edge_agent.mqtt_fetcher import METADATA_URL, TARGETS_URL, MqttFetcher
from edgeml.edge_agent.tuf_client import TufClient
from edgeml.fleet.registry.distribution import DistributionService
from edgeml.fleet.registry.repository import Registry
from edgeml.protocol import DistInfo, ProtocolError, dist_chunk_topic
from tests.fleet.conftest import MakeBundle
from tests.fleet.test_mqtt_transport import broker_port  # noqa: F401  (the module's Mosquitto fixture)

CHUNK = 64 * 1024


@contextmanager
def device(port: int, registry: Registry, home: Path, name: str, **fetcher_args: object) -> Iterator[
        tuple[TufClient, MqttFetcher]]:
    """A device: its own connection, fetcher and TUF client (nothing shared with other devices)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        fetcher = MqttFetcher(client, name, timeout=5, **fetcher_args)  # type: ignore[arg-type]
        root = (registry.metadata_dir / "1.root.json").read_bytes()
        yield TufClient(root, home / name / "metadata", home / name / "bundles", METADATA_URL, TARGETS_URL,
                        fetcher=fetcher), fetcher
    finally:
        client.disconnect()
        client.loop_stop()


def _target_path(registry: Registry) -> tuple[str, int]:
    stored = next(registry.targets_dir.rglob("*.edgeml"))
    return str(stored.relative_to(registry.dir / "repository")), stored.stat().st_size


@pytest.fixture
def service(registry: Registry, broker_port: int) -> Iterator[DistributionService]:  # noqa: F811
    with DistributionService(registry.dir, "127.0.0.1", broker_port) as svc:
        yield svc


def test_one_broadcast_serves_every_device(registry: Registry, make_bundle: MakeBundle, service: DistributionService,
                                           broker_port: int, tmp_path: Path) -> None:  # noqa: F811
    published = registry.publish(make_bundle("1.0.0", payload=os.urandom(600_000)))
    path, size = _target_path(registry)
    (info,) = service.broadcast("r-1", [path], chunk=CHUNK)
    assert info == DistInfo(path=path, size=size, chunk=CHUNK) and info.count == -(-size // CHUNK)
    before = service.served_bytes
    for name in ("cam-1", "cam-2", "cam-3"):  # each subscribes after the publish: retained messages reach it
        with device(broker_port, registry, tmp_path, name, broadcast="r-1") as (tuf, fetcher):
            got = tuf.fetch("digits", "1.0.0", "onnx-fp32")
            assert hashlib.sha256(got.path.read_bytes()).hexdigest() == published.sha256
            assert fetcher.stats == {"broadcast_bytes": size, "get_bytes": 0}
    assert service.broadcast_bytes == size  # published once
    assert service.served_bytes - before < 3 * 20_000  # the gets were metadata only


def test_missed_chunks_are_asked_for_and_only_those(registry: Registry, make_bundle: MakeBundle,
                                                    service: DistributionService, broker_port: int,  # noqa: F811
                                                    tmp_path: Path) -> None:
    published = registry.publish(make_bundle("1.0.0", payload=os.urandom(600_000)))
    path, size = _target_path(registry)
    (info,) = service.broadcast("r-2", [path], chunk=CHUNK)
    missed = [1, 4, info.count - 1]  # the last chunk is shorter: covered too
    for index in missed:  # the device never sees them: delete them from the broker
        service._client.publish(dist_chunk_topic("r-2", path, index), b"", qos=1, retain=True).wait_for_publish(5)
    lost = sum(min(CHUNK, size - i * CHUNK) for i in missed)
    with device(broker_port, registry, tmp_path, "cam-1", broadcast="r-2", stall_s=0.3) as (tuf, fetcher):
        got = tuf.fetch("digits", "1.0.0", "onnx-fp32")
    assert hashlib.sha256(got.path.read_bytes()).hexdigest() == published.sha256
    assert fetcher.stats == {"broadcast_bytes": size - lost, "get_bytes": lost}


def test_without_a_broadcast_the_device_falls_back_to_get(registry: Registry, make_bundle: MakeBundle,
                                                          service: DistributionService, broker_port: int,  # noqa: F811
                                                          tmp_path: Path) -> None:
    published = registry.publish(make_bundle("1.0.0", payload=os.urandom(200_000)))
    _, size = _target_path(registry)
    with device(broker_port, registry, tmp_path, "cam-1", broadcast="r-none", broadcast_wait_s=0.3) as (tuf, f):
        got = tuf.fetch("digits", "1.0.0", "onnx-fp32")
    assert got.sha256 == published.sha256
    assert f.stats == {"broadcast_bytes": 0, "get_bytes": size}


def test_a_tampered_broadcast_is_refused_by_tuf(registry: Registry, make_bundle: MakeBundle,
                                                service: DistributionService, broker_port: int,  # noqa: F811
                                                tmp_path: Path) -> None:
    registry.publish(make_bundle("1.0.0", payload=os.urandom(200_000)))
    path, _ = _target_path(registry)
    service.broadcast("r-3", [path], chunk=CHUNK)
    service._client.publish(dist_chunk_topic("r-3", path, 0), os.urandom(CHUNK), qos=1,
                            retain=True).wait_for_publish(5)
    with device(broker_port, registry, tmp_path, "cam-1", broadcast="r-3") as (tuf, _), \
            pytest.raises(Exception, match="does not match the signed hash") as info:
        tuf.fetch("digits", "1.0.0", "onnx-fp32")
    assert getattr(info.value, "kind", None) == "arbitrary-file"
    assert not list((tmp_path / "cam-1" / "bundles").rglob("*.edgeml"))


def test_unbroadcast_clears_the_retained_messages(registry: Registry, make_bundle: MakeBundle,
                                                  service: DistributionService, broker_port: int,  # noqa: F811
                                                  tmp_path: Path) -> None:
    registry.publish(make_bundle("1.0.0", payload=os.urandom(100_000)))
    path, size = _target_path(registry)
    infos = service.broadcast("r-4", [path], chunk=CHUNK)
    service.unbroadcast("r-4", infos)
    with device(broker_port, registry, tmp_path, "cam-1", broadcast="r-4", broadcast_wait_s=0.3) as (tuf, f):
        tuf.fetch("digits", "1.0.0", "onnx-fp32")
    assert f.stats == {"broadcast_bytes": 0, "get_bytes": size}


@pytest.mark.parametrize("paths", [["metadata/root.json"], ["targets/../offline-keys/root-1.pem"], ["targets/nope"]])
def test_only_targets_in_the_repository_are_broadcast(registry: Registry, service: DistributionService,
                                                      paths: list[str]) -> None:
    with pytest.raises((ProtocolError, FileNotFoundError)):
        service.broadcast("r-5", paths)


@pytest.mark.parametrize("mqtt5", [False, True], ids=["mqtt311", "mqtt5"])
def test_shared_subscription_splits_requests_without_duplicates(registry: Registry, make_bundle: MakeBundle,
                                                                broker_port: int, tmp_path: Path,  # noqa: F811
                                                                mqtt5: bool) -> None:
    published = registry.publish(make_bundle("1.0.0", payload=os.urandom(1_000_000)))
    _, size = _target_path(registry)
    with DistributionService(registry.dir, "127.0.0.1", broker_port, share_group="dist", mqtt5=mqtt5) as one, \
            DistributionService(registry.dir, "127.0.0.1", broker_port, share_group="dist", mqtt5=mqtt5) as two, \
            device(broker_port, registry, tmp_path, "cam-1") as (tuf, fetcher):
        got = tuf.fetch("digits", "1.0.0", "onnx-fp32")
    assert got.sha256 == published.sha256 and fetcher.stats["get_bytes"] == size
    assert one.served_requests > 0 and two.served_requests > 0  # both took a share
    metadata = one.served_bytes + two.served_bytes - size
    assert 0 < metadata < 20_000  # every byte of the target was sent once


def test_a_device_listening_before_the_broadcast_receives_it_live(registry: Registry, make_bundle: MakeBundle,
                                                                   service: DistributionService,
                                                                   broker_port: int, tmp_path: Path) -> None:  # noqa: F811
    published = registry.publish(make_bundle("1.0.0", payload=os.urandom(300_000)))
    path, size = _target_path(registry)
    with device(broker_port, registry, tmp_path, "cam-1", broadcast="r-6") as (tuf, fetcher):
        fetcher.listen("r-6", path)  # as on an update command, before the fleet publishes
        service.broadcast("r-6", [path], chunk=CHUNK)
        got = tuf.fetch("digits", "1.0.0", "onnx-fp32")
        assert fetcher.last_broadcast_at > 0
    assert got.sha256 == published.sha256
    assert fetcher.stats == {"broadcast_bytes": size, "get_bytes": 0}
