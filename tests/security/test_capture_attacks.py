"""Capture uploads are a device-to-fleet path like the others: what one enrolled device can try with them.

Against the real fleet of conftest (Mosquitto with the generated dynamic-security config, ``edgeml fleet serve``
processes, the honest agents): uploading as another device, past the fleet's bounds, with a forged stream, or
after revocation, is refused, and an honest device's upload meanwhile is stored exactly once.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np

from edgeml.fleet.capture.store import sample_sha256
from edgeml.fleet.devices.broker_control import BrokerControl
from edgeml.protocol import device_topic, fleet_client_id
from edgeml.protocol.uploads import CaptureSample, UploadBegin, UploadChunk, pack_samples
from tests.security.conftest import ATTACKER, HONEST, STOLEN, Deployment, Probe

_MiB = 1024 * 1024


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _stream(count: int, seed: int = 0, width: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        x = rng.standard_normal(width).astype(np.float32)
        samples.append((CaptureSample(seq=i, captured_at=1.7e9, shape=[width], dtype="float32", model="tiny",
                                      version="1.0.0"), _npy(x)))
    return pack_samples(samples)


def _begin(device: str, upload: str, stream: bytes, chunk: int = 64 * 1024, **fields: object) -> UploadBegin:
    values = {"device_id": device, "upload": upload, "size": len(stream), "sha256": hashlib.sha256(stream).hexdigest(),
              "chunk": chunk, "samples": 1, "trigger": "command", **fields}
    return UploadBegin(**values)  # type: ignore[arg-type]


def _send(probe: Probe, device: str, begin: UploadBegin, stream: bytes, topic_device: str | None = None) -> None:
    topic = device_topic(topic_device or device, "uploads")
    probe.client.publish(topic, begin.frame(), qos=1)
    for index in range(begin.count):
        data = stream[index * begin.chunk:(index + 1) * begin.chunk]
        probe.client.publish(topic, UploadChunk(device_id=device, upload=begin.upload, index=index).frame(data), qos=1)


def _acks(probe: Probe, upload: str) -> list[dict[str, object]]:
    out = []
    for m in list(probe.messages):
        if m.topic.endswith("/commands"):
            command = json.loads(m.payload)
            if command["type"] == "upload-ack" and command["args"]["upload"] == upload:
                out.append(command["args"])
    return out


def _captures(d: Deployment, device: str) -> int:
    return int(d.query("SELECT COUNT(*) FROM captures WHERE device_id = :d", d=device)[0][0])


def honest_upload_stored_once(d: Deployment, count: int = 5) -> None:
    """The honest device uploads ``count`` new samples through its real agent; each is stored, once."""
    agent = d.agents[HONEST[0]]
    rng = np.random.default_rng(int(time.time() * 1000) % 2**32)
    hashes = set()
    for _ in range(count):
        x = rng.standard_normal(4).astype(np.float32)
        hashes.add(sample_sha256(x))
        agent.telemetry.capture.add(x, {"confidence": 0.2, "predicted": 0, "model": "tiny", "version": "1.0.0"})
    d.command(HONEST[0], "capture", upload=True, bytes_per_s=_MiB)
    deadline = time.monotonic() + 60
    while True:
        rows = d.query("SELECT sha256 FROM captures WHERE device_id = :d", d=HONEST[0])
        stored = [r[0] for r in rows if r[0] in hashes]
        if len(stored) == count and not len(agent.telemetry.capture):
            break
        assert time.monotonic() < deadline, f"the honest device's upload was not stored ({len(stored)}/{count})"
        time.sleep(0.2)
    assert sorted(stored) == sorted(hashes)  # each once


def test_a_device_cannot_upload_as_another_device(deployment: Deployment) -> None:
    attacker = deployment.attacker()
    stream = _stream(3)
    forged = _begin(HONEST[0], "forged-1", stream)
    # on the victim's topic: the broker refuses the publish itself
    assert attacker.publish(device_topic(HONEST[0], "uploads"), forged.frame()) == 0x87
    # on its own topic, frames naming the victim: the broker passes them, the fleet drops them
    assert not attacker.subscribe(device_topic(ATTACKER, "commands")).is_failure
    _send(attacker, HONEST[0], forged, stream, topic_device=ATTACKER)
    time.sleep(2.0)
    assert _acks(attacker, "forged-1") == []
    staging = deployment.registry.dir / "captures" / "staging"
    assert not (staging / HONEST[0] / "forged-1.part").exists()
    assert _captures(deployment, ATTACKER) == 0
    honest_upload_stored_once(deployment)


def test_uploads_past_the_fleets_bounds_are_refused(deployment: Deployment) -> None:
    attacker = deployment.attacker()
    assert not attacker.subscribe(device_topic(ATTACKER, "commands")).is_failure
    # larger than the fleet accepts (32 MiB; the protocol's limit is 64 MiB): refused with a reason
    huge = _begin(ATTACKER, "huge-1", b"", size=40 * _MiB, sha256="0" * 64)
    attacker.publish(device_topic(ATTACKER, "uploads"), huge.frame())
    attacker.wait(lambda: _acks(attacker, "huge-1"), what="the refusal of a 40 MiB upload")
    assert str(_acks(attacker, "huge-1")[0]["error"]).startswith("too-large")
    # a chunk larger than the protocol's 256 KiB, or of a length that does not fit the begin: dropped unanswered
    stream = _stream(2, seed=5)
    begin = _begin(ATTACKER, "bad-chunk", stream)
    assert attacker.publish(device_topic(ATTACKER, "uploads"), begin.frame()) == 0
    attacker.wait(lambda: _acks(attacker, "bad-chunk"), what="the begin's ack")
    for data in (b"x" * (300 * 1024), stream[:10]):
        header = UploadChunk(device_id=ATTACKER, upload="bad-chunk", index=0).to_bytes()
        frame = b"EMU1" + len(header).to_bytes(2, "big") + header + data
        attacker.publish(device_topic(ATTACKER, "uploads"), frame)
    time.sleep(1.0)
    assert [a["next"] for a in _acks(attacker, "bad-chunk")] == [0]
    # a stream whose bytes do not match its sha256: refused, nothing stored
    lie = _begin(ATTACKER, "lie-1", stream, sha256=hashlib.sha256(b"other").hexdigest())
    _send(attacker, ATTACKER, lie, stream)
    attacker.wait(lambda: any(a.get("error") for a in _acks(attacker, "lie-1")), what="the hash refusal")
    # a pickled object instead of an array, and an array that is not the declared shape: left out, counted
    objects = _npy(np.array([{"rce": 1}], dtype=object))
    wrong = _npy(np.zeros(3, np.float32))
    poison = pack_samples([(CaptureSample(seq=0, captured_at=1.7e9, shape=[1], dtype="float32"), objects),
                           (CaptureSample(seq=1, captured_at=1.7e9, shape=[8], dtype="float32"), wrong)])
    _send(attacker, ATTACKER, _begin(ATTACKER, "poison-1", poison), poison)
    attacker.wait(lambda: any(a.get("done") for a in _acks(attacker, "poison-1")), what="the poison upload's end")
    assert [a["stored"] for a in _acks(attacker, "poison-1") if a.get("done")][0] == 0
    assert _captures(deployment, ATTACKER) == 0
    honest_upload_stored_once(deployment)


def test_a_revoked_device_cannot_upload(deployment: Deployment) -> None:
    from edgeml.fleet.devices.enrollment import revoke

    control = BrokerControl.from_broker_dir(deployment.broker_dir, host="localhost", port=deployment.port)
    revoke(deployment.registry.dir, STOLEN, deployment.broker_dir, control=control, db_url=deployment.db_url)
    assert deployment.probe(STOLEN).connect().value == 0x87  # the broker refuses it
    time.sleep(10.5)  # the consumers' rosters refresh (10 s)
    # what it might have left queued, replayed on its topic (as only the fleet user still can): ignored
    replay = deployment.probe("fleet", client_id=fleet_client_id("test-replay"))
    assert not replay.connect().is_failure
    assert not replay.subscribe(device_topic(STOLEN, "commands")).is_failure
    stream = _stream(2, seed=9)
    _send(replay, STOLEN, _begin(STOLEN, "late-1", stream), stream)
    time.sleep(2.0)
    acks = [m for m in replay.messages if json.loads(m.payload).get("type") == "upload-ack"]
    assert acks == [] and _captures(deployment, STOLEN) == 0
    assert not (deployment.registry.dir / "captures" / "staging" / STOLEN).exists()
    honest_upload_stored_once(deployment)


def test_a_drift_alert_uploads_when_the_fleet_turned_it_on_at_most_hourly(deployment: Deployment) -> None:
    """The honest path of drift uploads: off until a capture command turns it on, then once per hour at most."""
    from edgeml.edge_agent.device_messages import device_event
    from edgeml.protocol import DriftEvent

    agent, device = deployment.agents[HONEST[1]], HONEST[1]
    rng = np.random.default_rng(11)

    def fill(n: int) -> set[str]:
        hashes = set()
        for _ in range(n):
            x = rng.standard_normal(4).astype(np.float32)
            hashes.add(sample_sha256(x))
            agent.telemetry.capture.add(x, {"confidence": 0.1, "predicted": 1, "model": "tiny", "version": "1.0.0"})
        return hashes

    def drift_rows() -> list[tuple[str, float]]:
        return [(r[0], float(r[1])) for r in deployment.query(
            "SELECT sha256, drift_score FROM captures WHERE device_id = :d AND drift_score IS NOT NULL", d=device)]

    alert = device_event(DriftEvent, device, version="1.0.0", window={"score": 0.61, "flagged": True})
    first = fill(3)
    agent.send_event(alert)  # not turned on: nothing leaves the device
    time.sleep(2.0)
    assert drift_rows() == [] and len(agent.telemetry.capture) >= 3
    deployment.command(device, "capture", drift=True, bytes_per_s=_MiB)  # turn it on; upload nothing now
    deadline = time.monotonic() + 30
    while not (agent.uploads.dir / "policy.json").exists():
        assert time.monotonic() < deadline, "the device never kept the drift setting"
        time.sleep(0.1)
    agent.send_event(alert)
    deadline = time.monotonic() + 60
    while not first <= {sha for sha, _ in drift_rows()}:
        assert time.monotonic() < deadline, "the drift alert's upload was not stored"
        time.sleep(0.2)
    assert {score for _, score in drift_rows()} == {0.61}  # each sample linked to the window that sent it
    second = fill(2)
    agent.send_event(alert)  # within the hour: no second upload
    time.sleep(3.0)
    assert not second & {sha for sha, _ in drift_rows()}
    assert second <= {sample_sha256(e.load()) for e in agent.telemetry.capture.list()}
    deployment.command(device, "capture", drift=False)
