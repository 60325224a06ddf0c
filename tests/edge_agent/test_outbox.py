"""The telemetry outbox: sequence numbers that survive reopening and acks, trimming, the bound, bad files."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from edgeml.edge_agent.outbox import DROPPED_METRIC, PLACEHOLDER_METRICS, Outbox
from edgeml.errors import StorageError
from edgeml.protocol import ProtocolError

DEV = "cam-1"


def fill(outbox: Outbox, n: int, start: float = 1000.0) -> list[int]:
    return [outbox.append({"i": i}, start + i).seq for i in range(n)]


def test_numbers_start_at_zero_and_survive_reopen_and_acks(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.db"
    with Outbox(path, DEV) as box:
        assert fill(box, 3) == [0, 1, 2]
        assert box.ack(2) == 3
        assert len(box) == 0 and box.pending() == []
    with Outbox(path, DEV) as box:  # everything acked and deleted: numbering still continues
        assert box.next_seq == 3 and box.acked == 2
        assert fill(box, 2) == [3, 4]
    with Outbox(path, DEV) as box:
        got = box.pending()
        assert [(t.seq, t.sent_at, t.metrics) for t in got] == [(3, 1000.0, {"i": 0}), (4, 1001.0, {"i": 1})]
        assert all(t.device_id == DEV for t in got)


@pytest.mark.parametrize(("acks", "left", "deleted"), [
    ([], list(range(10)), []),
    ([3], list(range(4, 10)), [4]),
    ([3, 1], list(range(4, 10)), [4, 0]),  # a stale ack changes nothing
    ([3, 3, 9], [], [4, 0, 6]),
    ([-1], list(range(10)), [0]),
])
def test_ack_deletes_up_to_the_acknowledged_seq(tmp_path: Path, acks: list[int], left: list[int],
                                                deleted: list[int]) -> None:
    with Outbox(tmp_path / "o.db", DEV) as box:
        fill(box, 10)
        assert [box.ack(a) for a in acks] == deleted
        assert [t.seq for t in box.pending(limit=100)] == left
        assert len(box) == len(left)


@pytest.mark.parametrize(("limit", "after", "expected"), [
    (3, -1, [0, 1, 2]), (3, 4, [5, 6, 7]), (100, 7, [8, 9]), (100, 9, []), (0, -1, []),
])
def test_pending_pages_in_seq_order(tmp_path: Path, limit: int, after: int, expected: list[int]) -> None:
    with Outbox(tmp_path / "o.db", DEV) as box:
        fill(box, 10)
        assert [t.seq for t in box.pending(limit=limit, after=after)] == expected


def test_the_bound_drops_the_oldest_and_fills_their_numbers_with_placeholders(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, DEV, max_entries=5) as box:
        fill(box, 8)  # seqs 0..7; 5..7 each pushed one out
        assert box.dropped == 3 and len(box) == 8
        got = box.pending(limit=100)
        assert [t.seq for t in got] == list(range(8))
        assert [t.metrics for t in got[:3]] == [dict(PLACEHOLDER_METRICS)] * 3
        assert [t.metrics.get(DROPPED_METRIC) for t in got[3:]] == [None, None, 1, 1, 1]
        assert got[0].sent_at == 1002.0  # the newest dropped entry's time
        assert [t.seq for t in box.pending(limit=2, after=1)] == [2, 3]
        stored = sqlite3.connect(path).execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        assert stored == 5
    with Outbox(path, DEV, max_entries=5) as box:
        assert box.ack(1) == 0  # placeholders 0 and 1 were never rows
        assert [t.seq for t in box.pending()] == list(range(2, 8))
        box.ack(7)
        assert fill(box, 2) == [8, 9] and box.dropped == 3
        assert [t.metrics for t in box.pending()] == [{"i": 0}, {"i": 1}]


def test_drops_between_appends_are_reported_once(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", DEV, max_entries=2) as box:
        fill(box, 6)
        metrics = [t.metrics for t in box.pending()[-2:]]
        assert metrics == [{"i": 4, DROPPED_METRIC: 1}, {"i": 5, DROPPED_METRIC: 1}]
        assert box.dropped == 4


def test_an_ack_above_every_number_given_out_moves_numbering_past_it(tmp_path: Path) -> None:
    """The fleet stored more of this device than the file knows (a replaced outbox): do not reuse its seqs."""
    with Outbox(tmp_path / "o.db", DEV) as box:
        fill(box, 3)
        box.ack(41)
        assert len(box) == 0 and box.next_seq == 42
        assert fill(box, 1) == [42]


def test_concurrent_appends_get_distinct_contiguous_numbers(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", DEV) as box:
        seqs: list[int] = []
        lock = threading.Lock()

        def work() -> None:
            got = fill(box, 50)
            with lock:
                seqs.extend(got)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(seqs) == list(range(200))
        assert [t.seq for t in box.pending(limit=1000)] == list(range(200))


def test_an_entry_that_could_never_be_sent_is_refused_and_takes_no_number(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", DEV) as box:
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            box.append({"blob": "x" * 70_000}, 1.0)
        with pytest.raises(ProtocolError, match="cannot encode"):
            box.append({"bad": float("nan")}, 1.0)
        assert box.next_seq == 0 and fill(box, 1) == [0]


def write_garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database" * 100)


def write_other_schema(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE state (x TEXT)")
    db.commit()
    db.close()


@pytest.mark.parametrize(("prepare", "message"), [
    (write_garbage, "cannot open the telemetry outbox"),
    (write_other_schema, "cannot open the telemetry outbox"),
])
def test_a_corrupt_file_is_a_storage_error(tmp_path: Path, prepare: object, message: str) -> None:
    path = tmp_path / "o.db"
    prepare(path)  # type: ignore[operator]
    with pytest.raises(StorageError, match=message) as info:
        Outbox(path, DEV)
    assert info.value.hint and "moved aside" in info.value.hint


def test_another_devices_outbox_is_refused(tmp_path: Path) -> None:
    Outbox(tmp_path / "o.db", "cam-1").close()
    with pytest.raises(StorageError, match="belongs to device 'cam-1', not 'cam-2'"):
        Outbox(tmp_path / "o.db", "cam-2")


def test_an_unwritable_location_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(StorageError, match="cannot open"):
        Outbox(tmp_path / "file" / "o.db", DEV)
