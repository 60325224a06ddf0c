"""The signed fleet registry on disk: TUF metadata, content-addressed bundles, keys and database.

Layout of a registry ``DIR``::

    DIR/registry.json              marks the directory as a registry (schema)
    DIR/.lock                      fcntl lock held around every read-modify-write
    DIR/keys/{targets,snapshot,timestamp}.pem        online keys
    DIR/keys/audit.pem             online key that signs the audit log's head (created on first use)
    DIR/audit/heads.log            every signed audit head, appended (keep it append-only or ship it off)
    DIR/offline-keys/root-N.pem    root keys: move them off the server (see README.txt there)
    DIR/repository/                what a web server (or the distribution service) serves to devices
        metadata/1.root.json root.json N.targets.json targets.json N.snapshot.json snapshot.json
                 timestamp.json
        targets/<name>/<version>/<sha256>.<target>.edgeml
    DIR/registry.db                the SQLite database (unless --db-url / EDGEML_FLEET_DB_URL)

The TUF rules live in :mod:`edgeml.fleet.registry.tuf_repo`; this module reads, locks and writes. Files are written
atomically in dependency order (target, targets, snapshot, then timestamp last), so a client reading
during a publish sees either the old or the new registry.

Paths from a bundle: a target's file name is built from its manifest (name, version, target) and its hash.
The bundle reader refuses unsafe fields, and the registry does not rely on it alone: before anything is
signed, :meth:`Registry.target_file` checks the target path's parts and resolves the file (links included)
to a place inside ``DIR/repository/targets/``, and refuses with :class:`~edgeml.errors.RegistryError`
otherwise. Secrets are readable by their owner only: ``keys/`` and ``offline-keys/`` are 0700 and their
files 0600 (also ``retired/`` after a root rotation), and the SQLite database (with its ``-wal`` and
``-shm``) is created 0600 (:mod:`edgeml.fleet.store.db`).
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml._deps import require
from edgeml.errors import BundleError, MetadataError, RegistryError
from edgeml.fsutil import atomic_output_dir, atomic_write_bytes

if TYPE_CHECKING:  # the registry's database layer (SQLAlchemy) is imported when a publish needs it
    from edgeml.fleet.registry.deltas import DeltaSettings, Made

__all__ = ["SCHEMA", "Published", "Registry", "init_registry"]

SCHEMA = "edgeml.fleet/1"
_MARKER = "registry.json"


@dataclass(frozen=True)
class Published:
    """The result of a publish.

    Attributes:
        path: The TUF target path, ``<name>/<version>/<target>.edgeml``.
        sha256: The bundle's sha256.
        length: Its size in bytes.
        targets_version: The targets version that lists it.
        changed: False when the same file was already published (nothing was written).
        deltas: ``(base version, bytes)`` of each delta published with it.
    """

    path: str
    sha256: str
    length: int
    targets_version: int
    changed: bool
    deltas: tuple[tuple[str, int], ...] = ()


def init_registry(directory: Path, *, root_keys: int = 1, root_threshold: int = 1,
                  db_url: str | None = None) -> Registry:
    """Create a registry in ``directory`` (which must not exist or be empty).

    Args:
        directory: Where to create it.
        root_keys: How many root keys to generate.
        root_threshold: How many of them must sign a new root.
        db_url: SQLAlchemy URL of the database (default: SQLite in the registry).

    Raises:
        RegistryError: The directory is not empty.
        MetadataError: The threshold does not fit the number of root keys.
    """
    require("tuf", "fleet")
    from edgeml.fleet.registry import keys, tuf_repo

    if directory.exists() and any(directory.iterdir()):
        raise RegistryError(f"{directory} is not empty; a registry is created in a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(directory, "init") as work:
        root_signers = [keys.generate() for _ in range(root_keys)]
        online = {role: keys.generate() for role in tuf_repo.ONLINE_ROLES}
        roles = tuf_repo.new_repository(root_signers, root_threshold, online)
        (work / "keys").mkdir(mode=0o700)
        (work / "offline-keys").mkdir(mode=0o700)
        for role, signer in online.items():
            keys.save_signer(signer, work / "keys" / f"{role}.pem")
        for i, signer in enumerate(root_signers, 1):
            keys.save_signer(signer, work / "offline-keys" / f"root-{i}.pem")
        (work / "offline-keys" / "README.txt").write_text(keys.OFFLINE_NOTE)
        (work / "repository" / "metadata").mkdir(parents=True)
        (work / "repository" / "targets").mkdir()
        _write_roles(work / "repository" / "metadata", roles, ("root", "targets", "snapshot", "timestamp"))
        (work / _MARKER).write_text(json.dumps({"schema": SCHEMA}) + "\n")
        for child in work.iterdir():
            child.rename(directory / child.name)
    registry = Registry(directory, db_url=db_url)
    registry.database().create()
    return registry


def _write_roles(metadata_dir: Path, roles: dict[str, Any], changed: tuple[str, ...]) -> None:
    from edgeml.fleet.registry.tuf_repo import serialize

    for role in ("root", "targets", "snapshot", "timestamp"):  # dependency order: timestamp last
        if role not in changed:
            continue
        data = serialize(roles[role])
        if role != "timestamp":
            atomic_write_bytes(metadata_dir / f"{roles[role].signed.version}.{role}.json", data)
        atomic_write_bytes(metadata_dir / f"{role}.json", data)


class Registry:
    """An existing registry.

    Args:
        directory: The registry directory.
        db_url: SQLAlchemy URL of the database (default: ``$EDGEML_FLEET_DB_URL`` or SQLite in the registry).

    Raises:
        RegistryError: ``directory`` is not a registry.
    """

    def __init__(self, directory: Path, *, db_url: str | None = None) -> None:
        self.dir = Path(directory)
        self.metadata_dir = self.dir / "repository" / "metadata"
        self.targets_dir = self.dir / "repository" / "targets"
        self._db_url = db_url
        try:
            marker = json.loads((self.dir / _MARKER).read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{self.dir} is not an edgeml fleet registry (no valid {_MARKER})",
                                hint="create one with `edgeml fleet init DIR`") from exc
        if not isinstance(marker, dict) or marker.get("schema") != SCHEMA:
            raise RegistryError(f"{self.dir}: unsupported registry schema {marker!r} (expected {SCHEMA})")

    def database(self) -> Any:
        """The registry's :class:`~edgeml.fleet.store.db.Database`."""
        from edgeml.fleet.store.db import Database, resolve_url

        return Database(resolve_url(self.dir, self._db_url))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry's exclusive lock (blocks until other writers are done)."""
        try:
            fh = open(self.dir / ".lock", "a+b")  # noqa: SIM115 - held for the whole block
        except OSError as exc:
            raise RegistryError(f"cannot lock {self.dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    def load_roles(self) -> dict[str, Any]:
        """The current root, targets, snapshot and timestamp.

        Raises:
            MetadataError: A file is missing or not valid signed metadata.
        """
        from tuf.api.exceptions import RepositoryError
        from tuf.api.metadata import Metadata
        from tuf.api.serialization import DeserializationError

        roles: dict[str, Any] = {}
        for role in ("root", "targets", "snapshot", "timestamp"):
            path = self.metadata_dir / f"{role}.json"
            try:
                roles[role] = Metadata.from_file(str(path))
            except FileNotFoundError as exc:
                raise MetadataError(f"{path} is missing; the registry is damaged") from exc
            except (OSError, DeserializationError, RepositoryError, ValueError) as exc:
                raise MetadataError(f"{path} is not valid TUF metadata: {exc}") from exc
        return roles

    def online_signers(self) -> dict[str, Any]:
        """The targets, snapshot and timestamp signers from ``DIR/keys``.

        Raises:
            MetadataError: A key file is missing or unreadable.
        """
        from edgeml.fleet.registry.keys import load_signer
        from edgeml.fleet.registry.tuf_repo import ONLINE_ROLES

        return {role: load_signer(self.dir / "keys" / f"{role}.pem") for role in ONLINE_ROLES}

    def targets(self) -> dict[str, Any]:
        """Target path -> TargetFile, as currently signed."""
        return dict(self.load_roles()["targets"].signed.targets)

    def publish(self, bundle: Path, *, channel: str | None = "stable", actor: str | None = None,
                deltas: DeltaSettings | None = None) -> Published:
        """Verify a bundle and publish it as a signed target (recorded in the audit log), with deltas from the
        most recent earlier versions of the same model and target where they are small enough (:mod:`.deltas`).

        Args:
            bundle: The ``.edgeml`` file.
            channel: The channel to point at this version (None: none).
            actor: Who publishes, for the audit log (default: ``$EDGEML_ACTOR`` or the local user).
            deltas: Which deltas to make (default :class:`DeltaSettings`; ``bases=0``: none).

        Raises:
            BundleError: The bundle is malformed or its files do not match its manifest.
            TargetExistsError: A different file is already published under that name/version/target.
            MetadataError: The registry's metadata or keys are missing or damaged.
            RegistryError: The database failed, or the target's file would land outside
                ``repository/targets/`` (:meth:`target_file`); the registry is unchanged.
        """
        from edgeml.bundle import Bundle
        from edgeml.fleet.registry import deltas as deltas_mod
        from edgeml.fleet.registry import tuf_repo

        with Bundle(bundle) as b:  # the user's file: errors name it
            b.verify()
        with atomic_output_dir(self.dir, "publish") as work:
            staged = work / "bundle.edgeml"
            target = _stage(bundle, staged)  # what is signed is this copy, re-verified
            sha = target.hashes["sha256"]
            made = self._deltas(staged, target, deltas or deltas_mod.DeltaSettings())  # earlier versions never change
            with self.locked():
                signers = self.online_signers()
                roles = self.load_roles()
                stored = self.target_file(target.path, sha)  # checked before anything is signed
                delta_files = [(m, deltas_mod.target_file(m, target)) for m in made]
                if not tuf_repo.add_targets(roles, [target, *(f for _, f in delta_files)], signers):
                    return Published(target.path, sha, target.length, roles["targets"].signed.version, False)
                self._commit(staged, stored, roles, target, channel, actor, delta_files)
        return Published(target.path, sha, target.length, roles["targets"].signed.version, changed=True,
                         deltas=tuple((m.base_version, f.length) for m, f in delta_files))

    def _deltas(self, staged: Path, target: Any, settings: DeltaSettings) -> list[Made]:
        from edgeml.fleet.registry import deltas as deltas_mod

        custom = target.custom
        db = self.database()
        try:
            return deltas_mod.make(db, self.target_file, staged, custom["name"], custom["version"], custom["target"],
                                   target.length, settings)
        finally:
            db.close()

    def target_file(self, path: str, sha256: str) -> Path:
        """Where target ``path`` with hash ``sha256`` is stored: resolved, inside ``DIR/repository/targets/``.

        Raises:
            RegistryError: The path has an unsafe part (``..``, ``.``, empty, a backslash or control
                character), or resolves outside the targets directory (through a link).
        """
        from edgeml.fleet.registry.tuf_repo import hashed_target_path

        return _inside(self.targets_dir, hashed_target_path(path, sha256))

    def _commit(self, staged: Path, stored: Path, roles: dict[str, Any], target: Any, channel: str | None,
                actor: str | None, delta_files: list[tuple[Made, Any]]) -> None:
        from edgeml.fleet.audit.log import local_actor, open_audit
        from edgeml.fleet.registry import deltas as deltas_mod

        custom = target.custom
        fields = {"name": custom["name"], "version": custom["version"], "target": custom["target"],
                  "runtime": custom["runtime"], "tuf_path": target.path, "sha256": target.hashes["sha256"],
                  "length": target.length, "targets_version": roles["targets"].signed.version}
        db = self.database()
        try:
            log = open_audit(self.dir, db=db)
            with log.transaction() as conn:
                db.record_version(conn, fields, channel)
                log.append(actor or local_actor(), "publish", target.path,
                           {"sha256": target.hashes["sha256"], "length": target.length, "channel": channel,
                            "targets_version": roles["targets"].signed.version}, conn=conn)
                stored.parent.mkdir(parents=True, exist_ok=True)
                if self.target_file(target.path, target.hashes["sha256"]) != stored:  # a link appeared meanwhile
                    raise RegistryError(f"{stored} moved while it was being published; publish again")
                if not stored.exists():  # content-addressed: an existing name holds the same bytes
                    staged.replace(stored)
                for made, file in delta_files:
                    deltas_mod.record(conn, made, file, custom["name"], custom["version"], custom["target"],
                                      target.length)
                    path = self.target_file(file.path, file.hashes["sha256"])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if not path.exists():
                        atomic_write_bytes(path, made.data)
                _write_roles(self.metadata_dir, roles, ("targets", "snapshot", "timestamp"))
        finally:
            db.close()

    def refresh_timestamp(self, validity: timedelta | None = None) -> int:
        """Re-sign the timestamp with a new version and expiry; returns the new version.

        Run it more often than the timestamp validity (a day by default) so that devices keep updating.
        """
        from edgeml.fleet.registry import tuf_repo

        with self.locked():
            signer = self.online_signers()["timestamp"]
            roles = self.load_roles()
            tuf_repo.resign_timestamp(roles, signer, validity or tuf_repo.Expiry().timestamp)
            _write_roles(self.metadata_dir, roles, ("timestamp",))
            return int(roles["timestamp"].signed.version)

    def rotate_root(self, offline_keys: Path, *, new_keys: int = 1, threshold: int = 1,
                    actor: str | None = None) -> int:
        """Replace the root keys; the new root is signed by the old and new keys (recorded in the audit log).

        The old key files move to ``offline_keys/retired/``. Returns the new root version.

        Raises:
            MetadataError: The offline keys are missing or too few.
        """
        from edgeml.fleet.audit.log import local_actor, record
        from edgeml.fleet.registry import keys, tuf_repo

        with self.locked():
            old = keys.load_root_signers(offline_keys)
            roles = self.load_roles()
            new_signers = [keys.generate() for _ in range(new_keys)]
            roles["root"] = tuf_repo.rotate_root(roles["root"], old, new_signers, threshold)
            version = int(roles["root"].signed.version)
            retired = offline_keys / "retired" / f"root-v{version - 1}"
            retired.mkdir(mode=0o700, parents=True, exist_ok=True)
            _owner_only(offline_keys / "retired", retired)
            for f in sorted(offline_keys.glob("root-*.pem")):
                shutil.move(str(f), retired / f.name)
            for i, signer in enumerate(new_signers, 1):
                keys.save_signer(signer, offline_keys / f"root-{i}.pem")
            _write_roles(self.metadata_dir, roles, ("root",))
            record(self.dir, actor or local_actor(), "keys.rotate", "root",
                   {"version": version, "new_keys": new_keys, "threshold": threshold}, db_url=self._db_url)
            return version


def _inside(area: Path, relative: str) -> Path:
    """``area / relative`` resolved (links followed); RegistryError unless it is strictly inside ``area``."""
    root = area.resolve()
    resolved = (root / relative).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise RegistryError(f"refusing to write {relative!r}: it resolves to {resolved}, outside {area}",
                            hint=f"remove the link under {area} that leads out of it")
    return resolved


def _owner_only(*directories: Path) -> None:
    """chmod 0700 (``mkdir(mode=...)`` is reduced by the umask, and leaves existing directories as they are)."""
    for directory in directories:
        try:
            directory.chmod(0o700)
        except OSError as exc:
            raise RegistryError(f"cannot restrict permissions of {directory}: {exc.strerror}") from exc


def _stage(bundle: Path, staged: Path) -> Any:
    """Copy ``bundle`` to ``staged``, verify the copy and return its TargetFile with the custom fields."""
    from tuf.api.metadata import TargetFile

    from edgeml.bundle import Bundle

    try:
        shutil.copyfile(bundle, staged)
    except OSError as exc:
        raise BundleError(f"cannot read {bundle}: {exc.strerror}") from exc
    try:
        with Bundle(staged) as b:
            b.verify()
            m = b.manifest
    except BundleError as exc:
        raise BundleError(f"{bundle} changed while it was being published; publish it again") from exc
    path = f"{m.name}/{m.version}/{m.target}.edgeml"
    with open(staged, "rb") as fh:
        target = TargetFile.from_data(path, fh, ["sha256"])
    target.unrecognized_fields["custom"] = {"name": m.name, "version": m.version, "target": m.target,
                                            "runtime": m.runtime}
    return target
