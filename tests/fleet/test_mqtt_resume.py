"""Resumable target downloads over MQTT: a device killed mid-download resumes from its fsynced chunks.

Real Mosquitto, real registry, real distribution service; the device runs in a subprocess (this module
run as a script) so that it can be SIGKILLed mid-download.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgeml.edge_agent.mqtt_fetcher import METADATA_URL, TARGETS_URL, MqttFetcher
from edgeml.edge_agent.tuf_client import TufClient
from edgeml.fleet.registry.distribution import MAX_CHUNK, DistributionService
from edgeml.fleet.registry.repository import Registry
from tests.fleet.conftest import MakeBundle
from tests.fleet.test_mqtt_transport import broker_port  # noqa: F401  (the module's Mosquitto fixture)

DEVICE = "cam-resume"
REPO = Path(__file__).resolve().parents[2]


def _download(port: int, root: Path, device_dir: Path) -> str:
    """The device: fetch digits 1.0.0 over MQTT with resuming on; returns the bundle's sha256."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEVICE)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        fetcher = MqttFetcher(client, DEVICE, timeout=10, partial_dir=device_dir / "partial")
        tuf = TufClient(root.read_bytes(), device_dir / "metadata", device_dir / "bundles", METADATA_URL,
                        TARGETS_URL, fetcher=fetcher)
        got = tuf.fetch("digits", "1.0.0", "onnx-fp32")
        return hashlib.sha256(got.path.read_bytes()).hexdigest()
    finally:
        client.disconnect()
        client.loop_stop()


def _device(port: int, root: Path, device_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.fleet.test_mqtt_resume", str(port), str(root),
                             str(device_dir)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def slow_service(registry: Registry, broker_port: int) -> Iterator[DistributionService]:  # noqa: F811
    with DistributionService(registry.dir, "127.0.0.1", broker_port, chunk_delay_s=0.08) as svc:
        yield svc


def test_a_killed_download_resumes_from_the_chunks_on_disk(registry: Registry, make_bundle: MakeBundle,
                                                            slow_service: DistributionService,
                                                            broker_port: int,  # noqa: F811
                                                            tmp_path: Path) -> None:
    published = registry.publish(make_bundle("1.0.0", payload=os.urandom(2_000_000)))
    size = next(registry.targets_dir.rglob("*.edgeml")).stat().st_size
    root, device_dir = registry.metadata_dir / "1.root.json", tmp_path / "device"
    partial = device_dir / "partial"

    first = _device(broker_port, root, device_dir)
    try:
        deadline = time.monotonic() + 20
        on_disk = 0
        while on_disk < 0.3 * size:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, f"only {on_disk} of {size} B after 20 s"
            lengths = list(partial.glob("*.len")) if partial.exists() else []
            text = lengths[0].read_text() if lengths else "0"
            on_disk = int(text) if text.isdigit() else 0
            time.sleep(0.02)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    (part,) = partial.glob("*.part")
    recorded = int(next(partial.glob("*.len")).read_text())
    assert recorded >= on_disk and part.stat().st_size >= recorded and recorded < size
    assert recorded % MAX_CHUNK == 0  # whole chunks only

    slow_service.chunk_delay_s = 0.0
    time.sleep(0.3)  # let the service answer the killed device's last in-flight request before counting
    before = slow_service.served_bytes
    second = _device(broker_port, root, device_dir)
    out, err = second.communicate(timeout=30)
    assert second.returncode == 0, err
    refetched = slow_service.served_bytes - before
    assert out.strip() == published.sha256
    assert refetched < size - recorded + MAX_CHUNK, (refetched, size, recorded)
    assert not list(partial.iterdir())  # completed: nothing left to reuse
    print(f"\n{recorded} of {size} B on disk at the kill; {refetched} B re-fetched (metadata included)")


if __name__ == "__main__":
    print(_download(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
