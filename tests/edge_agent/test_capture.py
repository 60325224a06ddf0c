"""The capture store: what is captured, its bounds, crash recovery and the export for upload."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgeml.edge_agent.capture import CaptureConfig, CaptureStore
from edgeml.errors import ConfigError, DataError


def _probs(conf: np.ndarray, classes: int = 4) -> np.ndarray:
    """Probability rows whose top-1 confidence is ``conf`` (class i % classes), the rest spread evenly."""
    rows = np.repeat(((1.0 - conf) / (classes - 1))[:, None], classes, axis=1)
    rows[np.arange(conf.size), np.arange(conf.size) % classes] = conf
    return rows


def _files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_only_low_confidence_samples_are_captured(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path, CaptureConfig(threshold=0.5, rate=1.0, seed=0))
    x = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)
    conf = np.array([0.9, 0.3, 0.6, 0.45, 0.99, 0.26])
    entries = store.offer(x, _probs(conf), extra={"model": "digits", "version": "1.2.0"})
    assert [e.metadata["confidence"] for e in entries] == pytest.approx([0.3, 0.45, 0.26])
    assert [e.metadata["predicted"] for e in entries] == [1, 3, 1]
    assert entries[0].metadata["model"] == "digits" and entries[0].metadata["shape"] == [2, 3]
    np.testing.assert_array_equal(entries[1].load(), x[3])
    assert [e.seq for e in store.list()] == [0, 1, 2]
    assert _files(tmp_path) == [f"{s:012d}.{ext}" for s in range(3) for ext in ("json", "npy")]


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5])
def test_sampling_rate(tmp_path: Path, rate: float) -> None:
    store = CaptureStore(tmp_path, CaptureConfig(threshold=1.0, rate=rate, max_entries=10_000, seed=1))
    n = 400
    kept = len(store.offer(np.zeros((n, 3)), _probs(np.full(n, 0.4))))
    assert abs(kept - rate * n) <= 4 * np.sqrt(n * rate * (1 - rate)) + 1e-9  # within 4 binomial sigmas


@pytest.mark.parametrize(("max_entries", "max_bytes", "kept"), [(10, 10**6, 10), (100, 3000, None), (1, 10**6, 1)])
def test_bounds_drop_the_oldest(tmp_path: Path, max_entries: int, max_bytes: int, kept: int | None) -> None:
    store = CaptureStore(tmp_path, CaptureConfig(max_entries=max_entries, max_bytes=max_bytes))
    for i in range(30):
        store.add(np.full(16, i, dtype=np.float64), {"i": i})
    entries = store.list()
    assert store.total_bytes <= max_bytes and len(entries) <= max_entries
    if kept is not None:
        assert len(entries) == kept
    seqs = [e.seq for e in entries]
    assert seqs == list(range(30 - len(seqs), 30))  # the newest survive, in order
    assert len(_files(tmp_path)) == 2 * len(entries)
    assert store.total_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())


def test_a_sample_larger_than_the_store_is_not_kept(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path, CaptureConfig(max_bytes=1000))
    assert store.add(np.zeros(1000)) is None and len(store) == 0 and _files(tmp_path) == []


def test_reopen_recovers_committed_entries_and_removes_crash_leftovers(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path)
    for i in range(3):
        store.add(np.full(4, i), {"i": i})
    (tmp_path / "000000000003.npy").write_bytes(b"half")  # crashed before its metadata was committed
    (tmp_path / ".000000000004.npy.abcd.tmp").write_bytes(b"torn")  # crashed inside atomic_write_bytes
    (tmp_path / "000000000001.json").write_text("{not json")  # damaged metadata
    reopened = CaptureStore(tmp_path)
    assert [(e.seq, e.metadata["i"]) for e in reopened.list()] == [(0, 0), (2, 2)]
    assert _files(tmp_path) == ["000000000000.json", "000000000000.npy", "000000000002.json", "000000000002.npy"]
    assert reopened.add(np.zeros(2)) is not None and reopened.list()[-1].seq == 3


def test_reopen_applies_smaller_bounds(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path)
    for i in range(5):
        store.add(np.full(4, i))
    assert [e.seq for e in CaptureStore(tmp_path, CaptureConfig(max_entries=2)).list()] == [3, 4]


def test_export_then_clear_what_was_uploaded(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path / "store")
    for i in range(3):
        store.add(np.full((2, 2), i, dtype=np.float32), {"i": i})
    dest = tmp_path / "upload.tar"
    exported = store.export(dest)
    store.add(np.zeros(1), {"i": 3})  # captured while the upload ran
    with tarfile.open(dest) as tar:
        names = sorted(tar.getnames())
        member = tar.extractfile("000000000002.npy")
        assert member is not None
        sample = np.load(io.BytesIO(member.read()))
    assert names == [f"{s:012d}.{ext}" for s in range(3) for ext in ("json", "npy")]
    np.testing.assert_array_equal(sample, np.full((2, 2), 2, dtype=np.float32))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert store.clear(exported) == 3 and [e.metadata["i"] for e in store.list()] == [3]
    assert store.clear() == 1 and _files(tmp_path / "store") == []


def test_mismatched_outputs_are_refused(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path)
    with pytest.raises(DataError, match="3 outputs for a batch of 2"):
        store.offer(np.zeros((2, 4)), _probs(np.full(3, 0.3)))


@pytest.mark.parametrize(
    "kwargs", [{"threshold": 1.5}, {"rate": -0.1}, {"max_entries": 0}, {"max_bytes": 0}],
)
def test_bad_config_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        CaptureConfig(**kwargs)  # type: ignore[arg-type]
