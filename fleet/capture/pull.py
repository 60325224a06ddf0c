"""``edgeml fleet capture pull`` and ``ls``: the captured samples as a dataset folder, and their counts.

:func:`pull` writes the folder the labeling step and ``edgeml train`` read (the interface of issue 18)::

    samples.npz       x: the samples stacked (N x the model input without its batch dim, its dtype);
                      sha256: N strings, each the sha256 of the sample's raw array bytes (its identity)
    provenance.jsonl  one object per sample, same order: sha256, device_id, model, version, target,
                      confidence, predicted, drift_score, captured_at (ISO-8601 UTC), reason, tag, trigger
    dataset.json      model, versions, the filters, count, created_at, where it came from, and the sha256 of
                      the whole dataset (over the sorted sample hashes)
    labels.csv        ``sha256,label`` with empty labels, for the operator to fill

A sample two devices sent appears once (the first device's provenance). The folder is written in a temporary
folder and renamed into place: a pull that fails leaves nothing half-written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeml.errors import ConfigError, DataError, StorageError
from edgeml.fleet.store import schema
from edgeml.fleet.store.schema import sa
from edgeml.fsutil import atomic_output_dir

if TYPE_CHECKING:
    from edgeml.fleet.store.db import Database

__all__ = ["CaptureFilters", "PulledDataset", "list_captures", "pull", "select_captures"]


@dataclass(frozen=True)
class PulledDataset:
    """What :func:`pull` wrote: the folder, how many samples, and the dataset's sha256."""

    path: Path
    count: int
    sha256: str


@dataclass(frozen=True)
class CaptureFilters:
    """Which captured samples to take (None: any)."""

    model: str | None = None
    version: str | None = None
    device: str | None = None
    tag: str | None = None
    since: dt.datetime | None = None  # captured at or after (UTC)
    until: dt.datetime | None = None  # captured before (UTC)
    reason: str | None = None  # why the sample was kept (low_confidence, drift, command)

    def where(self) -> list[Any]:
        t = schema.captures
        out = [getattr(t.c, name if name != "device" else "device_id") == getattr(self, name)
               for name in ("model", "version", "device", "tag", "reason") if getattr(self, name) is not None]
        if self.since is not None:
            out.append(t.c.captured_at >= _utc(self.since))
        if self.until is not None:
            out.append(t.c.captured_at < _utc(self.until))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in self.__dict__.items()}


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _database(db: Database | str) -> tuple[Database, bool]:
    if isinstance(db, str):
        from edgeml.fleet.store.db import Database

        return Database(db), True
    return db, False


def _archive_root(store_dir: Path) -> Path:
    """The captures folder: ``store_dir/captures`` for a registry directory, else ``store_dir`` itself."""
    store_dir = Path(store_dir)
    return store_dir / "captures" if (store_dir / "captures").is_dir() else store_dir


def select_captures(db: Database, filters: CaptureFilters, limit: int | None = None) -> list[dict[str, Any]]:
    """The index rows matching ``filters``, oldest capture first (one per sample hash)."""
    t = schema.captures
    query = sa.select(t).where(*filters.where()).order_by(t.c.captured_at, t.c.id)
    if limit is not None:
        query = query.limit(limit)
    with db.transaction() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row["sha256"] not in seen:
            seen.add(row["sha256"])
            unique.append(row)
    return unique


def list_captures(db: Database | str, filters: CaptureFilters | None = None) -> list[dict[str, Any]]:
    """Samples and bytes per device, model, version and reason (the rows of ``capture ls``)."""
    database, own = _database(db)
    t = schema.captures
    f = filters or CaptureFilters()
    query = (sa.select(t.c.device_id, t.c.model, t.c.version, t.c.reason, sa.func.count(), sa.func.sum(t.c.bytes),
                       sa.func.min(t.c.captured_at), sa.func.max(t.c.captured_at))
             .where(*f.where()).group_by(t.c.device_id, t.c.model, t.c.version, t.c.reason)
             .order_by(t.c.model, t.c.version, t.c.device_id, t.c.reason))
    try:
        with database.transaction() as conn:
            return [{"device_id": d, "model": m, "version": v, "reason": r, "samples": int(n), "bytes": int(b or 0),
                     "first": first.isoformat() if first else None, "last": last.isoformat() if last else None}
                    for d, m, v, r, n, b, first, last in conn.execute(query)]
    finally:
        if own:
            database.close()


def pull(db: Database | str, store_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
         model: str, version: str | None = None, device: str | None = None, tag: str | None = None,
         since: dt.datetime | None = None, until: dt.datetime | None = None,
         reason: str | None = None, source: str | None = None) -> PulledDataset:
    """Write the captured samples matching the filters as a dataset folder (see the module docstring).

    Args:
        db: The registry database, or its SQLAlchemy URL.
        store_dir: The registry directory (or its ``captures`` folder).
        out_dir: The folder to write; must not exist.
        model: The model whose samples to take.
        version, device, tag, since, until, reason: Further filters (None: any).
        source: Where the dataset came from, for ``dataset.json`` (default: the store's path).

    Raises:
        ConfigError: ``out_dir`` exists, or nothing matches.
        DataError: The matching samples differ in shape or dtype (filter by version).
        StorageError: A sample's file is missing or unreadable.
    """
    out = Path(out_dir).absolute()
    if out.exists():
        raise ConfigError(f"{out} already exists", hint="choose a new output folder")
    filters = CaptureFilters(model, version, device, tag, since, until, reason)
    database, own = _database(db)
    try:
        rows = select_captures(database, filters)
    finally:
        if own:
            database.close()
    if not rows:
        raise ConfigError(f"no captured samples match {json.dumps(filters.to_dict())}",
                          hint="list what the fleet holds with `edgeml fleet capture ls`")
    root = _archive_root(Path(store_dir))
    layouts = {(tuple(r["shape"]), r["dtype"]) for r in rows}
    if len(layouts) > 1:
        raise DataError(f"the matching samples have {len(layouts)} layouts {sorted(layouts)[:4]}: one dataset "
                        "holds one input layout", hint="add --version to take one model version's samples")
    arrays = [_load(root, r) for r in rows]
    hashes = [r["sha256"] for r in rows]
    digest = hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(out.parent, prefix=".capture-pull") as work:
        np.savez(work / "samples.npz", x=np.stack(arrays), sha256=np.array(hashes))
        with (work / "provenance.jsonl").open("w") as fh:
            for r in rows:
                fh.write(json.dumps(_provenance(r), sort_keys=True) + "\n")
        (work / "labels.csv").write_text("sha256,label\n" + "".join(f"{h},\n" for h in hashes))
        (work / "dataset.json").write_text(json.dumps({
            "model": model, "versions": sorted({r["version"] for r in rows if r["version"]}),
            "filters": filters.to_dict(), "count": len(rows), "sha256": digest,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(), "source": source or str(root),
            "schema": "edgeml.capture-dataset/1"}, indent=2, sort_keys=True))
        os.chmod(work, 0o755)
        os.replace(work, out)
    return PulledDataset(out, len(rows), digest)


def _load(root: Path, row: dict[str, Any]) -> np.ndarray:
    path = (root / row["path"]).resolve()
    if not path.is_relative_to(root.resolve()):
        raise StorageError(f"captured sample {row['sha256']} points outside {root}")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot read captured sample {path}: {exc}",
                           hint="retention may have removed it meanwhile; pull again") from exc
    return np.asarray(array)


def _provenance(row: dict[str, Any]) -> dict[str, Any]:
    return {"sha256": row["sha256"], "device_id": row["device_id"], "model": row["model"],
            "version": row["version"], "target": row["target"], "confidence": row["confidence"],
            "predicted": row["predicted"], "drift_score": row["drift_score"],
            "captured_at": row["captured_at"].isoformat(), "reason": row["reason"], "tag": row["tag"],
            "trigger": row["trigger"], "upload_id": row["upload_id"]}
