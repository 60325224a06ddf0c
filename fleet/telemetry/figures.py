"""What the telemetry store keeps besides the rows, as pure functions: no database, no clock.

* :func:`figures` reads the numbers of one telemetry window (its ``metrics``) the way every reader counts them:
  a finite number (not a bool) counts, anything else is left out.
* :class:`Rollup` sums windows into one bucket (a minute or an hour, of one device or one version): counts and
  sums that merge by adding, the maxima, and the latest drift and output-shift scores. ``mean(metric)`` is what the
  dashboard draws.
* :func:`plan_batch` decides what a batch stores: which rows are new (a seq at or below the device's contiguous
  high, or already stored above a gap, or repeated in the batch, is a duplicate), each device's new contiguous
  high and seqs still above a gap, its running totals and its latest row. The ingest transaction reads the
  devices' books under a lock, asks this, and writes the answer (:mod:`~edgeml.fleet.telemetry.store`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from edgeml.fleet.store.schema import ROLLUP_LATEST, ROLLUP_MAXES, ROLLUP_SUMS
from edgeml.protocol import Telemetry

__all__ = ["ROLLUP_COLUMNS", "SERIES_METRICS", "Book", "BatchPlan", "DeviceChange", "Figures", "Rollup",
           "figures", "floor_time", "number", "plan_batch", "rollup_key"]

#: Every value column of a rollup table, in the order :meth:`Rollup.values` gives them.
ROLLUP_COLUMNS = (*ROLLUP_SUMS, *ROLLUP_MAXES, *(f"{name}_{part}" for name in ROLLUP_LATEST for part in ("last", "at")))
#: Metric name (the dashboard's) -> the (sum, count) columns of its mean in a rollup.
SERIES_METRICS = {"latency_p50_ms": ("p50_sum", "p50_n"), "latency_p99_ms": ("p99_sum", "p99_n"),
                  "error_rate": ("err_sum", "err_n"), "drift.score": ("drift_sum", "drift_n"),
                  "output_drift.score": ("shift_sum", "shift_n")}
_MODEL_LEN, _VERSION_LEN = 64, 128  # the rollup tables' key columns


def number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (bools, strings, NaN and None are not)."""
    kind = type(value)
    if kind is float:  # the usual cases first: this runs a few times for every window stored
        return value if math.isfinite(value) else None
    if kind is int:
        return float(value)
    if kind is bool or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class Figures(NamedTuple):
    """The numbers of one window that the store keeps (None: absent or not a finite number)."""

    model: str  # '' when the window names none
    version: str  # '' when the window names none
    requests: float | None
    errors: float | None
    p50: float | None
    p99: float | None
    error_rate: float | None
    drift: float | None
    shift: float | None = None  # the output shift (``output_drift.score``)


def rollup_key(value: Any, length: int) -> str:
    """A model or version as a rollup key: the string (cut to the column), '' for None, the text of anything else."""
    if type(value) is str and len(value) <= length:
        return value
    if value is None:
        return ""
    return (value if isinstance(value, str) else str(value))[:length]


def figures(metrics: Mapping[str, Any]) -> Figures:
    """The numbers of one telemetry window's ``metrics`` (``drift`` and ``output_drift`` are ``{"score": ...}``)."""
    get = metrics.get
    drift, shift = get("drift"), get("output_drift")
    return Figures(rollup_key(get("model"), _MODEL_LEN), rollup_key(get("version"), _VERSION_LEN),
                   number(get("requests")), number(get("errors")), number(get("latency_p50_ms")),
                   number(get("latency_p99_ms")), number(get("error_rate")),
                   number(drift.get("score")) if type(drift) is dict else None,
                   number(shift.get("score")) if type(shift) is dict else None)


def floor_time(at: dt.datetime, seconds: int) -> dt.datetime:
    """The start of the ``seconds``-long bucket (60: minute, 3600: hour) that holds ``at`` (aware, UTC)."""
    return dt.datetime.fromtimestamp(math.floor(at.timestamp() / seconds) * seconds, dt.timezone.utc)


@dataclass(slots=True)
class Rollup:
    """One bucket's windows: sums and counts (merge by adding), maxima, and the latest drift and output-shift
    scores with their times.

    ``sp99`` counts the p99 of windows that served requests only (what the rollout signals compare); ``p99`` every
    window's, as the dashboard draws it.
    """

    sums: list[float] = field(default_factory=lambda: [0.0] * len(ROLLUP_SUMS))
    p99_max: float | None = None
    drift_max: float | None = None
    drift_last: float | None = None
    drift_at: dt.datetime | None = None
    shift_max: float | None = None
    shift_last: float | None = None
    shift_at: dt.datetime | None = None

    def add(self, f: Figures, at: dt.datetime) -> None:
        """Count one window received at ``at`` (runs for every window stored: kept to plain local operations)."""
        s = self.sums
        _, _, requests, errors, p50, p99, error_rate, drift, shift = f
        s[0] += 1
        if requests is not None:
            s[1] += requests
        if errors is not None:
            s[2] += errors
        if p50 is not None:
            s[3] += p50
            s[4] += 1
        if p99 is not None:
            s[5] += p99
            s[6] += 1
            if self.p99_max is None or p99 > self.p99_max:
                self.p99_max = p99
            if requests is not None and requests > 0:  # a window that served requests
                s[7] += p99
                s[8] += 1
        if error_rate is not None:
            s[9] += error_rate
            s[10] += 1
        if drift is not None:
            s[11] += drift
            s[12] += 1
            if self.drift_max is None or drift > self.drift_max:
                self.drift_max = drift
            if self.drift_at is None or at >= self.drift_at:
                self.drift_last, self.drift_at = drift, at
        if shift is not None:
            s[13] += shift
            s[14] += 1
            if self.shift_max is None or shift > self.shift_max:
                self.shift_max = shift
            if self.shift_at is None or at >= self.shift_at:
                self.shift_last, self.shift_at = shift, at

    def merge(self, other: Rollup) -> None:
        """Add ``other``'s windows to this bucket."""
        self.sums = [a + b for a, b in zip(self.sums, other.sums, strict=True)]
        for name in ROLLUP_MAXES:
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, theirs if mine is None else mine if theirs is None else max(mine, theirs))
        if other.drift_at is not None and (self.drift_at is None or other.drift_at >= self.drift_at):
            self.drift_last, self.drift_at = other.drift_last, other.drift_at
        if other.shift_at is not None and (self.shift_at is None or other.shift_at >= self.shift_at):
            self.shift_last, self.shift_at = other.shift_last, other.shift_at

    def values(self) -> tuple[Any, ...]:
        """The value columns, in :data:`ROLLUP_COLUMNS` order (counts as ints)."""
        s = self.sums
        return (int(s[0]), s[1], s[2], s[3], int(s[4]), s[5], int(s[6]), s[7], int(s[8]), s[9], int(s[10]), s[11],
                int(s[12]), s[13], int(s[14]), self.p99_max, self.drift_max, self.shift_max, self.drift_last,
                self.drift_at, self.shift_last, self.shift_at)

    @classmethod
    def of_row(cls, row: Any) -> Rollup:
        """A bucket read back from a rollup table (anything with the :data:`ROLLUP_COLUMNS` as attributes)."""
        from edgeml.fleet.store.db import as_utc

        return cls([float(getattr(row, name)) for name in ROLLUP_SUMS], row.p99_max, row.drift_max, row.drift_last,
                   as_utc(row.drift_at), row.shift_max, row.shift_last, as_utc(row.shift_at))

    def get(self, column: str) -> float:
        """One of the summed columns."""
        return self.sums[ROLLUP_SUMS.index(column)]

    def mean(self, metric: str) -> float | None:
        """The mean of a :data:`SERIES_METRICS` metric over the windows that carried it (None: none did)."""
        total, n = SERIES_METRICS[metric]
        count = self.get(n)
        return self.get(total) / count if count else None


# --- a batch --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Book:
    """A device's bookkeeping as stored: contiguous high (-1: seq 0 not stored), highest seq (-1: none), and the
    seqs stored above a gap."""

    high: int = -1
    last_seq: int = -1
    pending: frozenset[int] = frozenset()


@dataclass(slots=True)
class DeviceChange:
    """What a batch changes of one device's bookkeeping and totals."""

    high: int
    last_seq: int
    pending_added: frozenset[int] = frozenset()
    pending_removed: frozenset[int] = frozenset()
    windows: int = 0
    requests: float = 0.0
    errors: float = 0.0
    latest: Telemetry | None = None  # the new row with the highest seq, when it is above every stored one


@dataclass
class BatchPlan:
    """What one batch stores: the new rows, each device's changes, and the minute rollups of the new rows."""

    rows: list[Telemetry]
    devices: dict[str, DeviceChange]
    device_minutes: dict[tuple[str, str, str], Rollup]  # (device, model, version) -> its windows of this batch
    version_minutes: dict[tuple[str, str], Rollup]  # (model, version) -> its windows of this batch


def _advance(book: Book, seqs: list[int]) -> tuple[int, frozenset[int], frozenset[int]]:
    """The contiguous high after ``seqs`` (new, unique) are stored, the seqs now above a gap that were not, and
    those no longer above one."""
    high = book.high
    if not book.pending:
        ordered = sorted(seqs)
        if ordered[0] == high + 1 and ordered[-1] - ordered[0] == len(ordered) - 1:  # the usual case: in order
            return ordered[-1], frozenset(), frozenset()
    above = set(book.pending).union(seqs)
    while high + 1 in above:
        high += 1
        above.discard(high)
    return high, frozenset(above - book.pending), frozenset(book.pending - above)


_NOTHING = Book()


def plan_batch(rows: Sequence[Telemetry], books: Mapping[str, Book], at: dt.datetime,
               read: Mapping[tuple[str, int], Figures] | None = None) -> BatchPlan:
    """Which rows of ``rows`` are new given the devices' ``books``, and everything that changes with them.

    Args:
        rows: The batch (any order, repeats allowed).
        books: Each device's bookkeeping, read under the transaction's lock (a device missing: nothing stored).
        at: When the batch was received (its minute is the rollup bucket).
        read: The :func:`figures` of each ``(device_id, seq)``'s first row in ``rows``, worked out already
            (the store does it before its transaction takes the lock); None: worked out here.
    """
    new: dict[tuple[str, int], Telemetry] = {}
    for r in rows:
        book = books.get(r.device_id, _NOTHING)
        if r.seq > book.high and r.seq not in book.pending:
            new.setdefault((r.device_id, r.seq), r)
    by_device: dict[str, list[Telemetry]] = {}
    for r in new.values():
        by_device.setdefault(r.device_id, []).append(r)
    changes: dict[str, DeviceChange] = {}
    device_minutes: dict[tuple[str, str, str], Rollup] = {}
    version_minutes: dict[tuple[str, str], Rollup] = {}
    for device_id, device_rows in by_device.items():
        book = books.get(device_id, _NOTHING)
        high, added, removed = _advance(book, [r.seq for r in device_rows])
        top = max(device_rows, key=lambda r: r.seq) if len(device_rows) > 1 else device_rows[0]
        requests = errors = 0.0
        for r in device_rows:
            f = figures(r.metrics) if read is None else read[(device_id, r.seq)]
            if f.requests is not None:
                requests += f.requests
            if f.errors is not None:
                errors += f.errors
            key = (device_id, f.model, f.version)
            rollup = device_minutes.get(key)
            if rollup is None:
                rollup = device_minutes[key] = Rollup()
            rollup.add(f, at)
            version = version_minutes.get(key[1:])
            if version is None:
                version = version_minutes[key[1:]] = Rollup()
            version.add(f, at)
        changes[device_id] = DeviceChange(high, max(book.last_seq, top.seq), added, removed, len(device_rows),
                                          requests, errors, top if top.seq > book.last_seq else None)
    return BatchPlan(list(new.values()), changes, device_minutes, version_minutes)
