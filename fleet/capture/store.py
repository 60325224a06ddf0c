"""The fleet's store of captured samples: content-addressed files plus the ``captures`` index, with retention.

Layout under the registry directory::

    captures/objects/ab/ab12...ef.npy     one sample, named by the sha256 of its raw array bytes
    captures/staging/{device}/...         uploads in flight (:mod:`.receiver`)

A sample's identity is the sha256 of its array's raw bytes (C order), the same on the device, in the index and
in a pulled dataset. One row per (device, sample): a device that sends a sample again adds nothing; two devices
that send the same sample share its file. :meth:`CaptureArchive.enforce` applies the retention limits (samples
and bytes per device, age): the oldest rows go first, and a file goes with its last row.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeml.errors import ConfigError, DataError, StorageError
from edgeml.fleet.store import schema
from edgeml.fleet.store.db import utcnow
from edgeml.fleet.store.schema import sa
from edgeml.protocol.uploads import CaptureSample, UploadBegin

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = ["CaptureArchive", "CaptureRetention", "sample_sha256"]

_log = logging.getLogger(__name__)
_GiB = 1024**3


@dataclass(frozen=True)
class CaptureRetention:
    """How much of what devices uploaded the fleet keeps (the oldest goes first)."""

    max_samples_per_device: int = 20_000  # rows per device
    max_bytes_per_device: int = 2 * _GiB  # bytes of the samples of one device (a shared file counts for each)
    max_age_s: float = 180 * 86400.0  # seconds since a sample was received (0: forever)

    def __post_init__(self) -> None:
        if self.max_samples_per_device < 1 or self.max_bytes_per_device < 1 or self.max_age_s < 0:
            raise ConfigError("capture retention: need max_samples_per_device >= 1, max_bytes_per_device >= 1 "
                              "and max_age_s >= 0")


def sample_sha256(array: np.ndarray) -> str:
    """The identity of a sample: sha256 hex of its raw array bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _write_object(path: Path, data: bytes) -> None:
    """Write a sample file under a temporary name and rename it into place (the caller flushes the disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write captured sample {path}: {exc.strerror}") from exc


def load_sample(npy: bytes, meta: CaptureSample) -> np.ndarray:
    """The array of one uploaded sample, checked against its metadata.

    Raises:
        DataError: Not a plain ``.npy`` array (pickled objects are refused), or not the declared shape/dtype.
    """
    try:
        array = np.load(io.BytesIO(npy), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"sample {meta.seq}: not a .npy array: {str(exc)[:120]}") from exc
    if not isinstance(array, np.ndarray) or list(array.shape) != meta.shape or str(array.dtype) != meta.dtype:
        raise DataError(f"sample {meta.seq}: holds {getattr(array, 'shape', '?')} {getattr(array, 'dtype', '?')}, "
                        f"declared {meta.shape} {meta.dtype}")
    return array


class CaptureArchive:
    """The captured samples of a registry (see the module docstring).

    Args:
        db: The registry database.
        registry_dir: The registry directory (``captures/`` is created in it).
        retention: What is kept.
    """

    def __init__(self, db: Database, registry_dir: Path, retention: CaptureRetention | None = None) -> None:
        self.db, self.retention = db, retention or CaptureRetention()
        self.root = Path(registry_dir) / "captures"
        self.objects = self.root / "objects"

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / f"{sha256}.npy"

    def add(self, device_id: str, begin: UploadBegin, samples: list[tuple[CaptureSample, bytes]]
            ) -> tuple[int, int, int]:
        """Store one upload's samples; returns ``(stored, duplicates, invalid)``.

        A sample whose bytes are not a plain array of its declared shape and dtype is left out and counted.
        """
        rows, seen, invalid, written = [], set(), 0, 0
        now = utcnow()
        score = begin.drift.get("score") if begin.drift else None
        for meta, npy in samples:
            try:
                array = load_sample(npy, meta)
            except DataError as exc:
                _log.warning("upload %s from %s: %s", begin.upload, device_id, exc.message)
                invalid += 1
                continue
            sha = sample_sha256(array)
            if sha in seen:
                continue
            seen.add(sha)
            path = self.object_path(sha)
            if not path.exists():
                _write_object(path, npy)
                written += 1
            rows.append({
                "device_id": device_id, "sha256": sha, "model": meta.model, "version": meta.version,
                "target": meta.target, "path": str(path.relative_to(self.root)), "bytes": len(npy),
                "shape": list(meta.shape), "dtype": meta.dtype, "confidence": meta.confidence,
                "predicted": meta.predicted, "drift_score": None if score is None else float(score),
                "captured_at": dt.datetime.fromtimestamp(meta.captured_at, dt.timezone.utc), "received_at": now,
                "reason": meta.reason, "trigger": begin.trigger, "tag": begin.tag, "upload_id": begin.upload,
                "command_id": begin.command_id, "seq": meta.seq})
        if written:
            os.sync()  # the files reach the disk before the index names them (one flush, not one per file)
        t = schema.captures
        with self.db.transaction() as conn:
            have = {r[0] for r in conn.execute(sa.select(t.c.sha256).where(
                t.c.device_id == device_id, t.c.sha256.in_([r["sha256"] for r in rows])))} if rows else set()
            new = [r for r in rows if r["sha256"] not in have]
            if new:
                conn.execute(t.insert(), new)
        self.enforce(device_id)
        return len(new), len(samples) - len(new) - invalid, invalid

    def enforce(self, device_id: str | None = None) -> int:
        """Apply the retention limits (to one device's rows, or every device's); returns the rows removed."""
        t, r = schema.captures, self.retention
        doomed: list[int] = []
        with self.db.transaction() as conn:
            if r.max_age_s > 0:
                cutoff = utcnow() - dt.timedelta(seconds=r.max_age_s)
                doomed += [row[0] for row in conn.execute(sa.select(t.c.id).where(t.c.received_at < cutoff))]
            devices = [device_id] if device_id is not None else \
                [row[0] for row in conn.execute(sa.select(t.c.device_id).distinct())]
            for device in devices:
                rows = conn.execute(sa.select(t.c.id, t.c.bytes).where(t.c.device_id == device)
                                    .order_by(t.c.received_at.desc(), t.c.id.desc())).all()
                total = 0
                for i, (row_id, size) in enumerate(rows):
                    total += size
                    if i >= r.max_samples_per_device or total > r.max_bytes_per_device:
                        doomed.append(row_id)
            doomed = sorted(set(doomed))
            if not doomed:
                return 0
            shas = set()
            for start in range(0, len(doomed), 500):
                part = doomed[start:start + 500]
                shas |= {row[0] for row in conn.execute(sa.select(t.c.sha256).where(t.c.id.in_(part)))}
                conn.execute(t.delete().where(t.c.id.in_(part)))
            kept = {row[0] for row in conn.execute(sa.select(t.c.sha256).where(t.c.sha256.in_(sorted(shas))))}
        for sha in shas - kept:
            self.object_path(sha).unlink(missing_ok=True)
        return len(doomed)

    def summary(self) -> list[dict[str, Any]]:
        """Samples and bytes held per device, model and version (for ``capture ls`` and the dashboard)."""
        t = schema.captures
        query = (sa.select(t.c.device_id, t.c.model, t.c.version, sa.func.count(), sa.func.sum(t.c.bytes),
                           sa.func.max(t.c.received_at))
                 .group_by(t.c.device_id, t.c.model, t.c.version).order_by(t.c.device_id, t.c.model, t.c.version))
        with self.db.transaction() as conn:
            return [{"device_id": d, "model": m, "version": v, "samples": int(n), "bytes": int(b or 0),
                     "last_received": last} for d, m, v, n, b, last in conn.execute(query)]
