"""The registry's TUF rules, with no I/O: build, change and sign the four top-level roles in memory.

The registry (:mod:`edgeml.fleet.registry.repository`) reads the metadata and keys, calls these functions under its
lock, and writes the results. Every change here bumps the version of each role it touches and re-signs it,
so a client that saw version N never accepts N or lower again (rollback), and every role carries an
expiry (freeze). Snapshot records the length and sha256 of ``targets.json`` and timestamp those of
``snapshot.json``, so a client refuses metadata files mixed from different versions (mix-and-match).
``consistent_snapshot`` is on: metadata is served as ``N.<role>.json`` and targets as
``<dir>/<sha256>.<name>``, so a publish never changes a file a client may be reading.

A target path becomes a file path on the registry and on every device, so :func:`add_target` signs only
paths of normalised relative parts (:func:`check_target_path`): no ``..``, ``.`` or empty part, no
backslash, NUL or control character. The registry also resolves the file under ``repository/targets/``
before writing it (:meth:`edgeml.fleet.registry.repository.Registry.target_file`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from securesystemslib.signer import Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from edgeml.errors import MetadataError, RegistryError, TargetExistsError

__all__ = [
    "ONLINE_ROLES",
    "TOP_LEVEL_ROLES",
    "Expiry",
    "Roles",
    "add_target",
    "add_targets",
    "check_target_path",
    "hashed_target_path",
    "new_repository",
    "resign_timestamp",
    "rotate_root",
    "serialize",
]

#: Roles whose keys live on the registry server (the root keys stay offline).
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
TOP_LEVEL_ROLES = ("root", *ONLINE_ROLES)

#: The four top-level roles by name.
Roles = dict[str, Metadata[Any]]

_M = TypeVar("_M", bound="Metadata[Any]")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]")  # control characters and backslash
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_TARGET_PATH = 512  # characters (the database's tuf_path column)


@dataclass(frozen=True)
class Expiry:
    """How long each role's signature stays valid after it is (re-)signed.

    A device refuses expired metadata, so the timestamp must be re-signed (``edgeml fleet timestamp``)
    more often than ``timestamp``; that is what bounds a freeze attack.
    """

    root: timedelta = timedelta(days=365)  # re-signed offline, on key rotation
    targets: timedelta = timedelta(days=90)  # re-signed on each publish
    snapshot: timedelta = timedelta(days=7)  # re-signed on each publish
    timestamp: timedelta = timedelta(days=1)  # re-signed on each publish and by the refresh job

    def of(self, role: str) -> timedelta:
        """The validity of ``role`` (one of :data:`TOP_LEVEL_ROLES`)."""
        value: timedelta = getattr(self, role)
        return value


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def serialize(md: Metadata[Any]) -> bytes:
    """The canonical bytes of a metadata file as served (indented JSON)."""
    return md.to_bytes(JSONSerializer(compact=False))


def _meta_file(md: Metadata[Any]) -> MetaFile:
    data = serialize(md)
    return MetaFile(version=md.signed.version, length=len(data),
                    hashes={"sha256": hashlib.sha256(data).hexdigest()})


def _sign(md: _M, signers: Sequence[Signer]) -> _M:
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    return md


def _bump(md: _M, signers: Sequence[Signer], validity: timedelta, now: datetime) -> _M:
    md.signed.version += 1
    md.signed.expires = now + validity
    return _sign(md, signers)


def new_repository(root_signers: Sequence[Signer], root_threshold: int, online: Mapping[str, Signer],
                   expiry: Expiry = Expiry(), now: datetime | None = None) -> Roles:
    """Create version 1 of root, targets, snapshot and timestamp, each signed.

    Args:
        root_signers: The offline root keys; all of them sign root v1.
        root_threshold: How many root keys must sign a new root (1 <= threshold <= len(root_signers)).
        online: One signer for each of :data:`ONLINE_ROLES`.
        expiry: Validity of each role.
        now: The signing time (defaults to the current UTC time).

    Raises:
        MetadataError: The threshold does not fit the number of root keys.
    """
    if not 1 <= root_threshold <= len(root_signers):
        raise MetadataError(f"root threshold {root_threshold} needs 1 to {len(root_signers)} root keys")
    now = now or _utcnow()
    root = Root(expires=now + expiry.root, consistent_snapshot=True)
    root.roles["root"] = Role([], threshold=root_threshold)
    for signer in root_signers:
        root.add_key(signer.public_key, "root")
    for role in ONLINE_ROLES:
        root.add_key(online[role].public_key, role)
    roles: Roles = {"root": _sign(Metadata(root), root_signers)}
    roles["targets"] = _sign(Metadata(Targets(expires=now + expiry.targets)), [online["targets"]])
    _refresh_snapshot_and_timestamp(roles, online, expiry, now, first=True)
    return roles


def _refresh_snapshot_and_timestamp(roles: Roles, online: Mapping[str, Signer], expiry: Expiry,
                                    now: datetime, *, first: bool = False) -> None:
    if first:
        roles["snapshot"] = Metadata(Snapshot(expires=now + expiry.snapshot))
        roles["timestamp"] = Metadata(Timestamp(expires=now + expiry.timestamp))
    snapshot: Metadata[Snapshot] = roles["snapshot"]
    snapshot.signed.meta["targets.json"] = _meta_file(roles["targets"])
    if first:
        _sign(snapshot, [online["snapshot"]])
    else:
        _bump(snapshot, [online["snapshot"]], expiry.snapshot, now)
    timestamp: Metadata[Timestamp] = roles["timestamp"]
    timestamp.signed.snapshot_meta = _meta_file(snapshot)
    if first:
        _sign(timestamp, [online["timestamp"]])
    else:
        _bump(timestamp, [online["timestamp"]], expiry.timestamp, now)


def check_target_path(path: str) -> str:
    """Return ``path`` if it is a safe target path: relative, normalised parts, at most 512 characters.

    Raises:
        RegistryError: It is absolute, has a ``..``, ``.`` or empty part, a backslash, NUL or control
            character, or is too long.
    """
    if (not isinstance(path, str) or len(path) > _MAX_TARGET_PATH or _UNSAFE.search(path)
            or any(p in ("", ".", "..") for p in path.split("/"))):
        raise RegistryError(f"refusing target path {str(path)[:80]!r}: a target path is relative, with no '..', '.' "
                            f"or empty part, no backslash or control character, at most {_MAX_TARGET_PATH} "
                            "characters", hint="publish a bundle whose name, version and target are valid")
    return path


def hashed_target_path(path: str, sha256: str) -> str:
    """Where a target is stored and served with consistent snapshots: ``<dir>/<sha256>.<basename>``.

    Raises:
        RegistryError: ``path`` is not a safe target path, or ``sha256`` not 64 lowercase hex digits.
    """
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise RegistryError(f"refusing target {path!r}: its sha256 {sha256!r} is not 64 lowercase hex digits")
    dirname, sep, basename = check_target_path(path).rpartition("/")
    return f"{dirname}{sep}{sha256}.{basename}"


def add_target(roles: Roles, target: TargetFile, online: Mapping[str, Signer], expiry: Expiry = Expiry(),
               now: datetime | None = None) -> bool:
    """Add ``target`` to targets and bump targets, snapshot and timestamp.

    Args:
        roles: The current roles; changed in place.
        target: The new target (path, length, sha256, custom fields).
        online: The online signers.
        expiry: Validity of each role.
        now: The signing time (defaults to the current UTC time).

    Returns:
        False if the same file is already published under that path (nothing changed), else True.

    Raises:
        TargetExistsError: A different file is already published under that path.
        RegistryError: The path is not a safe target path (:func:`check_target_path`); nothing changed.
    """
    check_target_path(target.path)
    targets: Metadata[Targets] = roles["targets"]
    existing = targets.signed.targets.get(target.path)
    if existing is not None:
        if existing.hashes == target.hashes and existing.length == target.length:
            return False
        raise TargetExistsError(
            f"{target.path} is already published with a different file (sha256 "
            f"{existing.hashes.get('sha256', '?')[:16]}…); published versions are immutable",
            hint="publish the new build under a new version",
        )
    targets.signed.targets[target.path] = target
    now = now or _utcnow()
    _bump(targets, [online["targets"]], expiry.targets, now)
    _refresh_snapshot_and_timestamp(roles, online, expiry, now)
    return True


def add_targets(roles: Roles, targets: list[TargetFile], online: Mapping[str, Signer], expiry: Expiry = Expiry(),
                now: datetime | None = None) -> bool:
    """Add several targets in one signed change (a bundle and its deltas): the first is the one that decides.

    Returns:
        False if the first is already published with the same file (nothing changed), else True.

    Raises:
        TargetExistsError: A different file is already published under one of the paths.
        RegistryError: A path is not a safe target path; nothing changed.
    """
    for target in targets:
        check_target_path(target.path)
    signed: Metadata[Targets] = roles["targets"]
    fresh = []
    for i, target in enumerate(targets):
        existing = signed.signed.targets.get(target.path)
        if existing is None:
            fresh.append(target)
        elif existing.hashes != target.hashes or existing.length != target.length:
            raise TargetExistsError(
                f"{target.path} is already published with a different file (sha256 "
                f"{existing.hashes.get('sha256', '?')[:16]}…); published versions are immutable",
                hint="publish the new build under a new version")
        elif i == 0:
            return False
    for target in fresh:
        signed.signed.targets[target.path] = target
    now = now or _utcnow()
    _bump(signed, [online["targets"]], expiry.targets, now)
    _refresh_snapshot_and_timestamp(roles, online, expiry, now)
    return True


def resign_timestamp(roles: Roles, signer: Signer, validity: timedelta, now: datetime | None = None) -> None:
    """Bump and re-sign the timestamp (the periodic refresh that keeps devices updating)."""
    _bump(roles["timestamp"], [signer], validity, now or _utcnow())


def rotate_root(root: Metadata[Root], old_signers: Sequence[Signer], new_signers: Sequence[Signer],
                threshold: int, expiry: Expiry = Expiry(), now: datetime | None = None) -> Metadata[Root]:
    """The next root version, trusting ``new_signers`` instead of the current root keys.

    The new root is signed by the old keys (so devices trusting the current root accept it) and by the
    new keys (so it satisfies its own threshold).

    Args:
        root: The current root; not changed.
        old_signers: At least the current root threshold of current root keys.
        new_signers: The new root keys.
        threshold: The new root threshold.
        expiry: Validity of each role.
        now: The signing time (defaults to the current UTC time).

    Raises:
        MetadataError: Too few old keys, or the threshold does not fit the new keys.
    """
    current = root.signed.roles["root"]
    known = [s for s in old_signers if s.public_key.keyid in current.keyids]
    if len(known) < current.threshold:
        raise MetadataError(f"rotating root needs {current.threshold} current root key(s), got {len(known)}")
    if not 1 <= threshold <= len(new_signers):
        raise MetadataError(f"root threshold {threshold} needs 1 to {len(new_signers)} new root keys")
    new = Metadata[Root].from_bytes(serialize(root))
    for keyid in list(current.keyids):
        new.signed.revoke_key(keyid, "root")
    for signer in new_signers:
        new.signed.add_key(signer.public_key, "root")
    new.signed.roles["root"].threshold = threshold
    new.signed.version += 1
    new.signed.expires = (now or _utcnow()) + expiry.root
    return _sign(new, [*known, *new_signers])
