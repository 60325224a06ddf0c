"""The telemetry outbox: a device's telemetry kept on disk (SQLite) until the fleet says it has stored it.

Every entry gets the device's next sequence number when it is appended. Numbers start at 0, increase by 1
and are never reused: the counter is persisted in the same transaction as the entry, so it survives
deletes, restarts, SIGKILL and (with ``synchronous=FULL`` on the write-ahead log) power loss. The fleet
acknowledges the highest *contiguous* sequence number it has stored (``telemetry-ack`` with ``{"seq": N}``);
:meth:`Outbox.ack` then deletes every entry ``<= N``. A broker's PUBACK proves nothing about storage, so
nothing else deletes an entry.

**The bound.** At most ``max_entries`` entries are kept. Appending past it drops the oldest ones, but their
sequence numbers are not forgotten: the fleet cannot acknowledge past a gap, so the outbox remembers the
dropped range (two integers) and :meth:`Outbox.pending` hands out one small placeholder per dropped number
(``metrics == {"outbox_placeholder": True}``), which fills the gap at the fleet. The next appended entry
carries how many entries were dropped since the last report in ``metrics["outbox_dropped"]``;
:attr:`Outbox.dropped` counts them all.

Thread-safe: one connection behind a lock. A corrupt, unreadable or unwritable file raises
:class:`~edgeml.errors.StorageError`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from edgeml.errors import StorageError
from edgeml.protocol import Telemetry, validate_device_id

__all__ = ["DROPPED_METRIC", "PLACEHOLDER_METRICS", "Outbox"]

#: Key of the count of entries dropped (since the previous report) in the next appended entry's metrics.
DROPPED_METRIC = "outbox_dropped"
#: The metrics of the placeholder sent in place of an entry the bound dropped.
PLACEHOLDER_METRICS: Mapping[str, Any] = {"outbox_placeholder": True}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    device_id TEXT NOT NULL,
    next_seq INTEGER NOT NULL,          -- the number the next appended entry gets
    acked INTEGER NOT NULL,             -- highest seq the fleet acknowledged (-1: none)
    dropped_through INTEGER NOT NULL,   -- highest seq the bound dropped (-1: none)
    dropped_at REAL NOT NULL,           -- sent_at of the newest dropped entry
    dropped_total INTEGER NOT NULL,
    dropped_unreported INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (seq INTEGER PRIMARY KEY, sent_at REAL NOT NULL, metrics TEXT NOT NULL);
"""


@dataclass
class _State:
    next_seq: int
    acked: int
    dropped_through: int
    dropped_at: float
    dropped_total: int
    dropped_unreported: int


class Outbox:
    """A device's durable, bounded queue of telemetry, numbered per device.

    Args:
        path: The SQLite file (created with its parent folder when missing).
        device_id: The device; an existing file must belong to it.
        max_entries: Most entries kept; appending past it drops the oldest (see the module docstring).

    Raises:
        StorageError: The file is corrupt, not an outbox, another device's, or cannot be opened or written.
        ProtocolError: ``device_id`` is not a valid device id.
    """

    def __init__(self, path: str | Path, device_id: str, *, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.path = Path(path)
        self.device_id = validate_device_id(device_id)
        self.max_entries = max_entries
        self._lock = threading.Lock()
        with self._translate("open"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            with self._translate("open"):
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                self._init_state()
        except BaseException:
            self._db.close()
            raise

    # --- public API -----------------------------------------------------------------------------------------

    def append(self, metrics: Mapping[str, Any], sent_at: float) -> Telemetry:
        """Store one telemetry entry under the next sequence number, durably, and return it.

        Args:
            metrics: The metrics (a JSON object; it is copied).
            sent_at: When it was produced, in Unix seconds (device clock).

        Raises:
            ProtocolError: The entry would not be a valid telemetry message (not JSON, over the size limit).
            StorageError: It cannot be written.
        """
        with self._lock, self._translate("append to"), self._transaction():
            state = self._read_state()
            self._enforce_bound(state)
            metrics = dict(metrics)
            if state.dropped_unreported:
                metrics[DROPPED_METRIC] = state.dropped_unreported
                state.dropped_unreported = 0
            message = Telemetry(self.device_id, state.next_seq, float(sent_at), metrics)
            message.to_bytes()  # refuses what could never be sent, before it blocks the queue
            self._db.execute("INSERT INTO entries VALUES (?, ?, ?)",
                             (message.seq, message.sent_at, json.dumps(metrics, separators=(",", ":"))))
            state.next_seq += 1
            self._write_state(state)
        return message

    def pending(self, limit: int = 100, after: int = -1) -> list[Telemetry]:
        """The unacknowledged entries with ``seq > after``, in sequence order, at most ``limit``.

        Entries the bound dropped come back as placeholders (``metrics == {"outbox_placeholder": True}``).

        Raises:
            StorageError: The file cannot be read.
        """
        with self._lock, self._translate("read"):
            state = self._read_state()
            start = max(after, state.acked) + 1
            out = [Telemetry(self.device_id, seq, state.dropped_at, dict(PLACEHOLDER_METRICS))
                   for seq in range(start, min(state.dropped_through + 1, start + max(0, limit)))]
            rows = self._db.execute("SELECT seq, sent_at, metrics FROM entries WHERE seq >= ? ORDER BY seq LIMIT ?",
                                    (start, limit - len(out))).fetchall()
        return out + [Telemetry(self.device_id, seq, sent_at, json.loads(text)) for seq, sent_at, text in rows]

    def ack(self, seq: int) -> int:
        """The fleet has stored every entry up to ``seq``: delete them. Returns how many entries were deleted.

        An acknowledgement above every number this outbox gave out means the fleet knows more of this
        device than the file does (it was lost or replaced): numbering continues after ``seq`` so that new
        entries are not mistaken for duplicates.

        Raises:
            StorageError: The file cannot be written.
        """
        seq = int(seq)
        with self._lock, self._translate("write"), self._transaction():
            state = self._read_state()
            if seq <= state.acked:
                return 0
            deleted = self._db.execute("DELETE FROM entries WHERE seq <= ?", (seq,)).rowcount
            state.acked = seq
            state.next_seq = max(state.next_seq, seq + 1)
            self._write_state(state)
        return int(deleted)

    @property
    def next_seq(self) -> int:
        """The sequence number the next appended entry gets."""
        return self._snapshot().next_seq

    @property
    def acked(self) -> int:
        """The highest sequence number the fleet acknowledged (-1 before any)."""
        return self._snapshot().acked

    @property
    def dropped(self) -> int:
        """How many entries the bound has dropped, in this file's whole life."""
        return self._snapshot().dropped_total

    def __len__(self) -> int:
        """How many entries (placeholders included) are waiting for an acknowledgement."""
        state = self._snapshot()
        return state.next_seq - state.acked - 1

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------------------------

    def _init_state(self) -> None:
        row = self._db.execute("SELECT device_id FROM state WHERE id = 0").fetchone()
        if row is None:
            self._db.execute("INSERT OR IGNORE INTO state VALUES (0, ?, 0, -1, -1, 0.0, 0, 0)", (self.device_id,))
        elif row[0] != self.device_id:
            raise StorageError(f"telemetry outbox {self.path} belongs to device {row[0]!r}, not {self.device_id!r}",
                               hint="give each device its own outbox file")

    def _snapshot(self) -> _State:
        with self._lock, self._translate("read"):
            return self._read_state()

    def _read_state(self) -> _State:
        row = self._db.execute("SELECT next_seq, acked, dropped_through, dropped_at, dropped_total, "
                               "dropped_unreported FROM state WHERE id = 0").fetchone()
        return _State(*row)

    def _write_state(self, s: _State) -> None:
        self._db.execute("UPDATE state SET next_seq = ?, acked = ?, dropped_through = ?, dropped_at = ?, "
                         "dropped_total = ?, dropped_unreported = ? WHERE id = 0",
                         (s.next_seq, s.acked, s.dropped_through, s.dropped_at, s.dropped_total,
                          s.dropped_unreported))

    def _enforce_bound(self, state: _State) -> None:
        """Make room for one more entry by dropping the oldest real entries (their seqs become placeholders)."""
        real_from = max(state.acked, state.dropped_through) + 1
        drop = state.next_seq - real_from + 1 - self.max_entries
        if drop <= 0:
            return
        last = real_from + drop - 1
        row = self._db.execute("SELECT MAX(sent_at) FROM entries WHERE seq <= ?", (last,)).fetchone()
        self._db.execute("DELETE FROM entries WHERE seq <= ?", (last,))
        state.dropped_through = last
        state.dropped_at = float(row[0]) if row[0] is not None else state.dropped_at
        state.dropped_total += drop
        state.dropped_unreported += drop

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def _translate(self, verb: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot {verb} the telemetry outbox {self.path}: {exc}",
                               hint="check the disk and the file's permissions; a corrupt outbox can be "
                                    "moved aside (its unsent telemetry is then lost)") from exc
