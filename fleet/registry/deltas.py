"""Deltas at publish: when a version of a model and target is published, deltas from the most recent earlier
versions of the same model and target are made (:mod:`edgeml.delta`), kept when small enough, and published
beside the full bundle, each a signed TUF target of its own, so that devices never decompress unsigned bytes.

A delta's target path is ``<name>/<version>/<target>.from-<base version>.edgeml-delta``; its custom fields say
what it rebuilds (``name``, ``version``, ``target``) and from what (``delta``: ``base``, ``format``,
``result_sha256``, ``result_length``). The ``deltas`` table indexes them for the rollout controller, which
offers a device the delta whose base is the version the device runs (:func:`find`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.errors import ConfigError
from edgeml.fleet.store import schema
from edgeml.fleet.store.schema import sa

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from edgeml.fleet.store.db import Database

__all__ = ["DeltaPaths", "DeltaSettings", "Made", "find", "make", "record", "target_file"]


@dataclass(frozen=True)
class DeltaSettings:
    """Which deltas a publish makes.

    Attributes:
        bases: Deltas from this many of the most recent earlier versions of the same model and target (0: none).
        max_ratio: Keep a delta only when it is at most this fraction of the full bundle.
    """

    bases: int = 3
    max_ratio: float = 0.6

    def __post_init__(self) -> None:
        if self.bases < 0 or not 0 < self.max_ratio <= 1:
            raise ConfigError(f"deltas: need bases >= 0 and 0 < max_ratio <= 1, got {self.bases}, {self.max_ratio}")


@dataclass(frozen=True)
class Made:
    """One delta made for a publish."""

    base_version: str
    base_sha256: str  # of the base's members as a device's slot holds them (edgeml.delta.base_of_slot)
    path: str  # its target path
    data: bytes


def _bases(db: Database, name: str, target: str, version: str, n: int) -> list[tuple[str, str, str]]:
    """(version, target path, sha256) of the ``n`` most recently published earlier versions."""
    v, m = schema.versions, schema.models
    query = (sa.select(v.c.version, v.c.tuf_path, v.c.sha256).join(m, m.c.id == v.c.model_id)
             .where((m.c.name == name) & (v.c.target == target) & (v.c.version != version))
             .order_by(v.c.targets_version.desc()).limit(n))
    with db.transaction() as conn:
        return [(r.version, r.tuf_path, r.sha256) for r in conn.execute(query)]


def make(db: Database, stored: Callable[[str, str], Path], bundle: Path, name: str, version: str, target: str,
         full_length: int, settings: DeltaSettings) -> list[Made]:
    """The deltas worth publishing with ``bundle``: from each recent base, kept when at most ``max_ratio`` of
    the full bundle. Nothing is made without zstandard (``edgeml[delta]``): a publish never fails for it.

    Args:
        db: The registry database (its published versions).
        stored: Where a published target (path, sha256) is stored.
        bundle: The new bundle (already verified).
        name: Its model.
        version: Its version.
        target: Its compile target.
        full_length: Its size in bytes.
        settings: How many bases, and the size limit.
    """
    from edgeml.delta import delta_path, make_delta, read_header, supported

    if settings.bases == 0 or not supported():
        return []
    out = []
    for base_version, path, sha in _bases(db, name, target, version, settings.bases):
        data = make_delta(stored(path, sha), bundle)
        if len(data) <= settings.max_ratio * full_length:
            header, _ = read_header(data)
            out.append(Made(base_version, header.base_sha256, delta_path(name, version, target, base_version), data))
    return out


def target_file(made: Made, full: Any) -> Any:
    """The TUF target of a delta, with the custom fields that say what it rebuilds (``full``'s bundle)."""
    import io

    from tuf.api.metadata import TargetFile

    from edgeml.delta import FORMAT

    file = TargetFile.from_data(made.path, io.BytesIO(made.data), ["sha256"])
    custom = full.custom
    file.unrecognized_fields["custom"] = {
        "name": custom["name"], "version": custom["version"], "target": custom["target"],
        "delta": {"base": made.base_version, "base_sha256": made.base_sha256, "format": FORMAT,
                  "result_sha256": full.hashes["sha256"], "result_length": full.length}}
    return file


def record(conn: Connection, made: Made, file: Any, name: str, version: str, target: str, full_length: int) -> None:
    """Index a published delta (inside the publish's transaction)."""
    conn.execute(schema.deltas.insert().values(
        model=name, target=target, version=version, base_version=made.base_version, tuf_path=made.path,
        sha256=file.hashes["sha256"], length=file.length, full_length=full_length,
        published_at=dt.datetime.now(dt.timezone.utc)))


def find(conn: Connection, name: str, version: str, target: str, base_version: str) -> dict[str, Any] | None:
    """The published delta of ``name`` ``version`` ``target`` from ``base_version``, or None."""
    d = schema.deltas
    row = conn.execute(sa.select(d).where((d.c.model == name) & (d.c.version == version) & (d.c.target == target)
                                          & (d.c.base_version == base_version))).first()
    return dict(row._mapping) if row is not None else None


class DeltaPaths:
    """The repository paths of published deltas, as the rollout controller offers them (cached: published
    deltas never change, and one that is not there yet is looked up again by a new controller)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._paths: dict[tuple[str, str, str, str], str | None] = {}

    def path(self, model: str, version: str, target: str, base: str) -> str | None:
        """``targets/...`` of the delta that rebuilds ``model`` ``version`` ``target`` from ``base``, or None."""
        key = (model, version, target, base)
        if key not in self._paths:
            from edgeml.fleet.registry.tuf_repo import hashed_target_path

            with self.db.transaction() as conn:
                found = find(conn, *key)
            self._paths[key] = None if found is None else \
                f"targets/{hashed_target_path(found['tuf_path'], found['sha256'])}"
        return self._paths[key]
