"""The fleet's capture archive and receiver without a broker: retention (samples, bytes, age; shared files),
the per-device byte rate, resumption from the staging files, on the registry database (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from edgeml.fleet.capture.pull import list_captures, pull
from edgeml.fleet.capture.receiver import ReceiverSettings, UploadReceiver
from edgeml.fleet.capture.store import CaptureArchive, CaptureRetention, sample_sha256
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import Database
from edgeml.protocol import device_topic
from edgeml.protocol.uploads import CaptureSample, UploadBegin, UploadChunk, pack_samples

_TOPIC = device_topic("cam-1", "uploads")


def _samples(count: int, seed: int, width: int = 64) -> list[tuple[CaptureSample, bytes, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        x = rng.standard_normal(width).astype(np.float32)
        buf = io.BytesIO()
        np.save(buf, x)
        out.append((CaptureSample(seq=i, captured_at=1.7e9 + i, shape=[width], dtype="float32", model="tiny",
                                  version="1.0.0", confidence=0.25), buf.getvalue(), x))
    return out


def _begin(device: str, upload: str, stream: bytes, count: int, chunk: int = 4096) -> UploadBegin:
    return UploadBegin(device_id=device, upload=upload, size=len(stream), sha256=hashlib.sha256(stream).hexdigest(),
                       chunk=chunk, samples=count, trigger="drift", tag="t1", drift={"score": 0.42, "flagged": True})


@pytest.fixture
def database(db_url: str) -> Database:
    db = Database(db_url)
    db.create()
    return db


def test_retention_keeps_the_newest_per_device_and_files_still_referenced(database: Database, tmp_path: Path) -> None:
    archive = CaptureArchive(database, tmp_path, CaptureRetention(max_samples_per_device=5, max_bytes_per_device=10**9))
    first = _samples(4, seed=1)
    shared = first[0]
    archive.add("cam-1", _begin("cam-1", "u1", b"x", 4), [(m, b) for m, b, _ in first])
    archive.add("cam-2", _begin("cam-2", "u2", b"x", 1), [(shared[0], shared[1])])  # the same sample, another device
    second = _samples(4, seed=2)
    stored, duplicates, invalid = archive.add("cam-1", _begin("cam-1", "u3", b"x", 4), [(m, b) for m, b, _ in second])
    assert (stored, duplicates, invalid) == (4, 0, 0)
    counts = {r["device_id"]: r["samples"] for r in archive.summary()}
    assert counts == {"cam-1": 5, "cam-2": 1}  # cam-1 kept its 5 newest: 3 of the first upload went
    kept = {r["sha256"] for r in _rows(database, "cam-1")}
    assert {sample_sha256(x) for _, _, x in second} <= kept
    assert sample_sha256(shared[2]) not in kept  # the oldest went from cam-1's rows...
    assert archive.object_path(sample_sha256(shared[2])).exists()  # ...but its file stays: cam-2 still has it
    for _, _, x in first[1:]:
        assert not archive.object_path(sample_sha256(x)).exists() or sample_sha256(x) in kept

    again = archive.add("cam-1", _begin("cam-1", "u4", b"x", 4), [(m, b) for m, b, _ in second])
    assert again == (0, 4, 0)  # a device that sends a sample again adds nothing

    by_bytes = CaptureArchive(database, tmp_path, CaptureRetention(max_bytes_per_device=3 * len(second[0][1])))
    assert by_bytes.enforce("cam-1") == 2 and len(_rows(database, "cam-1")) == 3
    t = schema.captures
    with database.transaction() as conn:  # cam-2's sample was received long ago
        conn.execute(t.update().where(t.c.device_id == "cam-2").values(
            received_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=400)))
    assert CaptureArchive(database, tmp_path).enforce() == 1  # 180 days by default
    assert _rows(database, "cam-2") == [] and not archive.object_path(sample_sha256(shared[2])).exists()


def _rows(db: Database, device: str) -> list[dict[str, object]]:
    t = schema.captures
    with db.transaction() as conn:
        return [dict(r._mapping) for r in conn.execute(schema.sa.select(t).where(t.c.device_id == device))]


def test_the_receiver_resumes_from_its_staging_and_bounds_each_devices_rate(database: Database,
                                                                           tmp_path: Path) -> None:
    samples = _samples(30, seed=3, width=256)
    stream = pack_samples([(m, b) for m, b, _ in samples])
    begin = _begin("cam-1", "up-1", stream, 30)
    receiver = UploadReceiver(database, tmp_path, "localhost", 1)  # never connected: acks are returned, not sent
    assert receiver.handle(_TOPIC, begin.frame()).next == 0  # type: ignore[union-attr]
    for index in range(3):
        chunk = stream[index * begin.chunk:(index + 1) * begin.chunk]
        ack = receiver.handle(_TOPIC, UploadChunk(device_id="cam-1", upload="up-1", index=index).frame(chunk))
        assert ack is not None and ack.next == index + 1
    # a fleet restarted mid-upload: a new receiver on the same files answers where the upload stands
    receiver = UploadReceiver(database, tmp_path, "localhost", 1)
    assert receiver.handle(_TOPIC, begin.frame()).next == 3  # type: ignore[union-attr]
    resent = UploadChunk(device_id="cam-1", upload="up-1", index=1).frame(stream[4096:8192])
    assert receiver.handle(_TOPIC, resent).next == 3  # type: ignore[union-attr]  # a resend is not appended twice
    ack = None
    for index in range(3, begin.count):
        chunk = stream[index * begin.chunk:(index + 1) * begin.chunk]
        ack = receiver.handle(_TOPIC, UploadChunk(device_id="cam-1", upload="up-1", index=index).frame(chunk))
    assert ack is not None and ack.done and (ack.stored, ack.duplicates) == (30, 0)
    assert receiver.handle(_TOPIC, begin.frame()) == ack  # the device asks again: the same answer, nothing stored
    assert [r["samples"] for r in list_captures(database)] == [30]

    dataset = pull(database, tmp_path, tmp_path / "ds", model="tiny", reason="low_confidence")
    data = np.load(dataset.path / "samples.npz")
    assert dataset.count == 30 and np.array_equal(data["x"], np.stack([x for _, _, x in samples]))
    assert (dataset.path / "provenance.jsonl").read_text().count('"drift_score": 0.42') == 30

    slow = UploadReceiver(database, tmp_path, "localhost", 1, settings=ReceiverSettings(bytes_per_s=10_000))
    frames = [UploadChunk(device_id="cam-1", upload="other", index=i).frame(b"z" * 4096) for i in range(10)]
    for frame in frames:
        slow.handle(_TOPIC, frame)
    assert slow.rejected.get("rate", 0) >= 4  # a burst of 20 KB passes, the rest of 41 KB is dropped at once
    assert slow.handle(device_topic("cam-2", "uploads"), frames[0]) is None  # ...by device: cam-2's own bucket
    assert slow.rejected.get("device-mismatch") == 1  # (a frame naming cam-1 on cam-2's topic is not cam-2's)


def test_the_http_api_counts_links_drift_uploads_and_pulls_for_operators(tmp_path: Path) -> None:
    import json
    import tarfile
    import urllib.error
    import urllib.request

    from edgeml.fleet.audit.log import open_audit
    from edgeml.fleet.registry.repository import init_registry
    from edgeml.fleet.web.auth import create_token
    from edgeml.fleet.web.server import HttpServer, fleet_app

    registry = init_registry(tmp_path / "reg")
    db = registry.database()
    audit = open_audit(registry.dir, db=db)
    samples = _samples(6, seed=4)
    CaptureArchive(db, registry.dir).add("cam-1", _begin("cam-1", "drift-7", b"x", 6), [(m, b) for m, b, _ in samples])
    tokens = {role: create_token(db, f"{role}-1", role, audit=audit, actor="local:test")
              for role in ("viewer", "operator")}
    http = HttpServer(fleet_app(registry.dir, db, audit), "127.0.0.1", 0)
    http.start()

    def call(path: str, role: str, body: dict[str, object] | None = None) -> tuple[int, bytes, dict[str, str]]:
        request = urllib.request.Request(f"{http.url}{path}", method="POST" if body is not None else "GET",
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {tokens[role]}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read(), {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), {}

    try:
        status, data, _ = call("/api/captures", "viewer")
        assert status == 200 and json.loads(data)["samples"] == 6
        status, data, _ = call("/api/captures/drift", "viewer")
        (upload,) = json.loads(data)["uploads"]
        assert (upload["device_id"], upload["upload_id"], upload["drift_score"], upload["samples"]) == \
            ("cam-1", "drift-7", 0.42, 6)
        assert call("/api/captures/pull", "viewer", {"model": "tiny"})[0] == 403  # field data: operators only
        status, data, headers = call("/api/captures/pull", "operator", upload["pull"])
        assert status == 200 and headers["x-edgeml-count"] == "6"
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = sorted(tar.getnames())
            x = np.load(io.BytesIO(tar.extractfile("samples.npz").read()))["x"]  # type: ignore[union-attr]
        assert names == ["dataset.json", "labels.csv", "provenance.jsonl", "samples.npz"]
        assert np.array_equal(x, np.stack([s for _, _, s in samples]))
        assert call("/api/captures/pull", "operator", {"model": "tiny", "path": "/etc"})[0] == 400
        # the CLI's remote path: `capture ls|pull https://...` (plain http to this machine is allowed)
        from edgeml.fleet.capture.pull import CaptureFilters
        from edgeml.fleet.capture.remote import remote_list, remote_pull

        rows = remote_list(http.url, tokens["viewer"], CaptureFilters(model="tiny"))
        assert [(r["device_id"], r["samples"]) for r in rows] == [("cam-1", 6)]
        # --since/--until travel as ISO-8601 times: the drift upload's own window holds its 6, after it nothing
        window = {k: dt.datetime.fromisoformat(upload["pull"][k]) for k in ("since", "until")}
        rows = remote_list(http.url, tokens["viewer"], CaptureFilters(model="tiny", **window))
        assert [(r["device_id"], r["samples"]) for r in rows] == [("cam-1", 6)]
        assert remote_list(http.url, tokens["viewer"], CaptureFilters(model="tiny", since=window["until"])) == []
        assert remote_list(http.url, tokens["viewer"], CaptureFilters(model="tiny", until=window["since"])) == []
        assert call("/api/captures?since=86400", "viewer")[0] == 200  # the dashboard's form: seconds before now
        assert call("/api/captures?since=yesterday", "viewer")[0] == 400
        pulled = remote_pull(http.url, tokens["operator"], tmp_path / "remote-ds", CaptureFilters(model="tiny"))
        local = pull(db, registry.dir, tmp_path / "local-ds", model="tiny")
        assert (pulled.count, pulled.sha256) == (local.count, local.sha256) == (6, local.sha256)
        assert (pulled.path / "provenance.jsonl").read_text() == (local.path / "provenance.jsonl").read_text()
        with urllib.request.urlopen(f"{http.url}/dashboard/captures.js", timeout=30) as response:
            assert b"capture-body" in response.read()
        with urllib.request.urlopen(f"{http.url}/", timeout=30) as response:
            assert b"/dashboard/captures.js" in response.read()
    finally:
        http.stop()
        db.close()
