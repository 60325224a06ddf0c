"""A bounded on-disk store of sampled low-confidence inputs, kept for retraining and uploaded on request.

Inputs whose top-1 confidence is below ``threshold`` are kept with probability ``rate``. Each kept sample is
an entry of two files in the store's folder, both written atomically (:func:`edgeml.fsutil.atomic_write_bytes`)::

    000000000042.npy    the sample (one row of the batch, in the model's input layout)
    000000000042.json   its metadata (time, confidence, predicted class, model, caller's extra fields)

The JSON file is written second and is the commit mark: an ``.npy`` without its ``.json`` is the trace of a
crash and is deleted when the store is opened, as are leftover temporary files. The store holds at most
``max_entries`` entries and ``max_bytes`` bytes; the oldest entries are dropped first (``.json`` first, so a
crash while dropping leaves only an orphan ``.npy``). :meth:`CaptureStore.export` packs entries into one tar
file for upload; :meth:`CaptureStore.clear` removes them once the fleet has them.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.errors import ConfigError, DataError, StorageError
from edgeml.fsutil import atomic_write_bytes, ensure_writable_dir
from edgeml.refstats import to_probabilities

__all__ = ["CaptureConfig", "CaptureEntry", "CaptureStore"]

_DIGITS = 12


@dataclass(frozen=True)
class CaptureConfig:
    """Which inputs are captured and how much the store may hold."""

    threshold: float = 0.5  # capture samples whose top-1 confidence (0..1) is below this
    rate: float = 0.05  # probability that an eligible sample is kept (0..1)
    max_entries: int = 500  # entries kept; the oldest are dropped beyond this
    max_bytes: int = 32 * 1024 * 1024  # bytes of .npy + .json files kept; the oldest are dropped beyond this
    seed: int | None = None  # seed of the sampling generator (None: fresh entropy)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 or not 0.0 <= self.rate <= 1.0:
            raise ConfigError("capture threshold and rate must be in [0, 1]")
        if self.max_entries < 1 or self.max_bytes < 1:
            raise ConfigError("capture max_entries and max_bytes must be at least 1")


@dataclass(frozen=True)
class CaptureEntry:
    """One captured sample: its sequence number, files and metadata."""

    seq: int
    array_path: Path
    meta_path: Path
    size: int  # bytes of both files
    metadata: dict[str, Any]

    def load(self) -> np.ndarray:
        """The captured sample.

        Raises:
            StorageError: The file cannot be read.
        """
        try:
            return np.asarray(np.load(self.array_path, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read captured sample {self.array_path}: {exc}") from exc


class CaptureStore:
    """The bounded store in folder ``root`` (created if needed). Thread-safe.

    Args:
        root: The store's folder.
        config: Sampling and bounds.

    Raises:
        StorageError: The folder cannot be created or written.
    """

    def __init__(self, root: str | os.PathLike[str], config: CaptureConfig | None = None) -> None:
        self.config = config or CaptureConfig()
        self.root = ensure_writable_dir(root)
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(self.config.seed)
        self._entries: dict[int, CaptureEntry] = {}
        self._recover()
        self._next = max(self._entries, default=-1) + 1
        with self._lock:
            self._evict()

    def _recover(self) -> None:
        """Load the committed entries; delete temporary files and samples without metadata."""
        for path in sorted(self.root.iterdir()):
            temporary = path.name.startswith(".") and path.name.endswith(".tmp")
            orphan = path.suffix == ".npy" and path.stem.isdigit() and not path.with_suffix(".json").exists()
            if temporary or orphan:
                path.unlink(missing_ok=True)
            elif path.suffix == ".json" and path.stem.isdigit():
                array = path.with_suffix(".npy")
                try:
                    meta = json.loads(path.read_text())
                    size = path.stat().st_size + array.stat().st_size
                except (OSError, ValueError):
                    path.unlink(missing_ok=True)
                    array.unlink(missing_ok=True)
                    continue
                seq = int(path.stem)
                self._entries[seq] = CaptureEntry(seq, array, path, size, meta)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def total_bytes(self) -> int:
        """Bytes held by the committed entries."""
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def offer(
        self, inputs: np.ndarray, probabilities: np.ndarray, *, extra: Mapping[str, Any] | None = None
    ) -> list[CaptureEntry]:
        """Capture a sampled part of a batch's low-confidence samples; returns the entries written.

        Args:
            inputs: The batch (first axis is the batch).
            probabilities: The model's outputs on it, (batch, classes), probabilities or logits.
            extra: JSON-friendly fields added to each entry's metadata (model name and version, say).

        Raises:
            DataError: The batch and the outputs have different lengths.
            StorageError: An entry cannot be written.
        """
        x = np.asarray(inputs)
        probs = to_probabilities(probabilities)
        if probs.shape[0] != x.shape[0]:
            raise DataError(f"capture: {probs.shape[0]} outputs for a batch of {x.shape[0]}")
        conf = probs.max(axis=1)
        with self._lock:
            keep = (conf < self.config.threshold) & (self._rng.random(conf.size) < self.config.rate)
        out = []
        for i in np.flatnonzero(keep):
            meta = {"confidence": float(conf[i]), "predicted": int(probs[i].argmax()), **dict(extra or {})}
            entry = self.add(x[i], meta)
            if entry is not None:
                out.append(entry)
        return out

    def add(self, sample: np.ndarray, metadata: Mapping[str, Any] | None = None) -> CaptureEntry | None:
        """Store one sample unconditionally (then drop the oldest entries past the bounds).

        Returns None when the sample alone is larger than ``max_bytes``.

        Args:
            sample: One sample, any shape.
            metadata: JSON-friendly fields stored with it.

        Raises:
            StorageError: The entry cannot be written.
        """
        buf = io.BytesIO()
        np.save(buf, np.asarray(sample), allow_pickle=False)
        array_bytes = buf.getvalue()
        with self._lock:
            seq = self._next
            self._next += 1
        meta = {"seq": seq, "time": time.time(), "shape": list(np.shape(sample)),
                "dtype": str(np.asarray(sample).dtype), **dict(metadata or {})}
        try:
            meta_bytes = json.dumps(meta, sort_keys=True).encode()
        except (TypeError, ValueError) as exc:
            raise DataError(f"capture metadata is not JSON-serialisable: {exc}") from exc
        size = len(array_bytes) + len(meta_bytes)
        if size > self.config.max_bytes:
            return None
        name = f"{seq:0{_DIGITS}d}"
        array_path, meta_path = self.root / f"{name}.npy", self.root / f"{name}.json"
        atomic_write_bytes(array_path, array_bytes)
        atomic_write_bytes(meta_path, meta_bytes)  # the commit mark
        entry = CaptureEntry(seq, array_path, meta_path, size, meta)
        with self._lock:
            self._entries[seq] = entry
            self._evict()
        return entry

    def _evict(self) -> None:
        """Drop the oldest entries past the bounds (lock held)."""
        total = sum(e.size for e in self._entries.values())
        while self._entries and (len(self._entries) > self.config.max_entries or total > self.config.max_bytes):
            oldest = self._entries.pop(min(self._entries))
            total -= oldest.size
            _remove(oldest)

    def list(self) -> list[CaptureEntry]:
        """The committed entries, oldest first."""
        with self._lock:
            return [self._entries[s] for s in sorted(self._entries)]

    def export(self, dest: str | os.PathLike[str]) -> builtins.list[CaptureEntry]:
        """Write the current entries into one tar file at ``dest`` (atomically); returns the entries packed.

        The tar holds each entry's ``.npy`` and ``.json`` under their names. After a successful upload, pass
        the returned list to :meth:`clear` to remove exactly what the fleet received.

        Args:
            dest: The tar file to write.

        Raises:
            StorageError: An entry cannot be read or the tar cannot be written.
        """
        buf = io.BytesIO()
        with self._lock:  # no entry is dropped while it is being packed
            entries = [self._entries[s] for s in sorted(self._entries)]
            try:
                with tarfile.open(fileobj=buf, mode="w") as tar:
                    for e in entries:
                        tar.add(e.array_path, arcname=e.array_path.name)
                        tar.add(e.meta_path, arcname=e.meta_path.name)
            except OSError as exc:
                raise StorageError(f"cannot export captured samples: {exc}") from exc
        atomic_write_bytes(dest, buf.getvalue())
        return entries

    def clear(self, entries: Iterable[CaptureEntry] | None = None) -> int:
        """Remove the given entries (all without an argument); returns how many were removed.

        Raises:
            StorageError: A file cannot be removed.
        """
        with self._lock:
            seqs = list(self._entries) if entries is None else [e.seq for e in entries if e.seq in self._entries]
            for seq in seqs:
                _remove(self._entries.pop(seq))
        return len(seqs)


def _remove(entry: CaptureEntry) -> None:
    try:
        entry.meta_path.unlink(missing_ok=True)  # uncommit first
        entry.array_path.unlink(missing_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot remove captured sample {entry.array_path}: {exc.strerror}") from exc
