"""The device's verified download of a bundle from the signed registry (TUF, python-tuf's ngclient).

:class:`TufClient` refreshes the registry's metadata (root, timestamp, snapshot, targets: versions,
expiry, signatures, hashes), downloads one target, and opens it as an edgeml bundle whose manifest must
match the signed custom fields. Every python-tuf failure becomes an
:class:`~edgeml.errors.UpdateVerificationError` whose ``kind`` names the attack it stopped; the bundle
is downloaded into a hidden scratch directory and moved into the download directory only once fully
verified, so a refused update leaves nothing behind.

The transport is an ngclient ``FetcherInterface``: HTTP by default; the MQTT distribution service plugs
in its own fetcher.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeml._deps import require
from edgeml.errors import BundleError, UpdateVerificationError

__all__ = ["TufClient", "VerifiedBundle"]

#: (phase, python-tuf exception name) -> (kind, what it means). Checked in order; "*" matches any phase.
_KINDS: tuple[tuple[str, str, str, str], ...] = (
    ("*", "ExpiredMetadataError", "freeze", "the registry's metadata has expired (a freeze attack or a "
                                            "registry whose timestamp is not being refreshed)"),
    ("*", "BadVersionNumberError", "rollback", "the registry offered older metadata than this device has "
                                               "already seen (a rollback attack)"),
    ("*", "EqualVersionNumberError", "rollback", "the registry offered the same metadata version with "
                                                 "different content"),
    ("*", "UnsignedMetadataError", "bad-signature", "metadata is not signed by enough trusted keys"),
    ("*", "DownloadLengthMismatchError", "endless-data", "the server sent more data than the signed "
                                                         "length (an endless-data attack)"),
    ("refresh", "LengthOrHashMismatchError", "mix-and-match", "metadata does not match the version "
                                                              "and hash its parent role signed (mix-and-match)"),
    ("download", "LengthOrHashMismatchError", "arbitrary-file", "the downloaded file does not match the "
                                                                "signed hash (an arbitrary-file attack)"),
    ("*", "DownloadError", "unavailable", "the registry could not be reached"),
    ("*", "RepositoryError", "invalid-metadata", "the registry's metadata is invalid"),
)


@dataclass(frozen=True)
class VerifiedBundle:
    """A downloaded, verified bundle.

    Attributes:
        path: The bundle file in the download directory.
        name: Model name.
        version: Model version.
        target: Compile target.
        sha256: The bundle's signed sha256.
        checked: True when the fetch itself checked the file against its signed hash and its manifest
            against the signed name, version and target (as :meth:`TufClient.fetch` does), so that an update
            may skip hashing the same file again in the same run (staging still hashes every member as it
            extracts it, before anything can be activated); False (the default) for a fetch that promises less.
        length: The bundle's signed length in bytes (None where the fetch does not say).
        fetched_bytes: The bytes fetched for it: the bundle's length, or the delta's for a rebuilt one.
    """

    path: Path
    name: str
    version: str
    target: str
    sha256: str
    checked: bool = False
    length: int | None = None
    fetched_bytes: int | None = None


def _translate(exc: Exception, phase: str, what: str) -> UpdateVerificationError:
    names = {cls.__name__ for cls in type(exc).__mro__}
    for where, name, kind, meaning in _KINDS:
        if where in ("*", phase) and name in names:
            return UpdateVerificationError(f"refused {what}: {meaning} ({type(exc).__name__}: {exc})", kind=kind)
    return UpdateVerificationError(f"refused {what}: {type(exc).__name__}: {exc}", kind="invalid-metadata")


class TufClient:
    """Verified downloads from one registry.

    Args:
        trusted_root: The root metadata the device was provisioned with (bytes of ``1.root.json`` or later).
        metadata_dir: Where the device keeps the metadata it trusts (created if needed).
        download_dir: Where verified bundles are placed.
        metadata_url: Base URL of the registry's ``metadata/`` directory.
        targets_url: Base URL of its ``targets/`` directory.
        fetcher: An ngclient ``FetcherInterface`` (default: HTTP with urllib3).

    Raises:
        MissingExtraError: python-tuf is not installed (``edgeml[agent]``).
    """

    def __init__(self, trusted_root: bytes, metadata_dir: Path, download_dir: Path, metadata_url: str,
                 targets_url: str, fetcher: Any | None = None) -> None:
        self._ngclient = require("tuf.ngclient", "agent")
        self.trusted_root = trusted_root
        self.metadata_dir = Path(metadata_dir)
        self.download_dir = Path(download_dir)
        self.metadata_url = metadata_url
        self.targets_url = targets_url
        self.fetcher = fetcher

    def _updater(self) -> Any:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        trusted = self.metadata_dir / "root.json"
        bootstrap = trusted.read_bytes() if trusted.exists() else self.trusted_root
        return self._ngclient.Updater(str(self.metadata_dir), self.metadata_url, target_base_url=self.targets_url,
                                      fetcher=self.fetcher, bootstrap=bootstrap)

    @contextmanager
    def _phase(self, phase: str, what: str) -> Iterator[None]:
        from tuf.api import exceptions

        try:
            yield
        except (exceptions.RepositoryError, exceptions.DownloadError) as exc:
            raise _translate(exc, phase, what) from exc
        except ValueError as exc:  # bad bootstrap root, malformed metadata JSON
            raise UpdateVerificationError(f"refused {what}: {exc}", kind="invalid-metadata") from exc

    def fetch(self, name: str, version: str, target: str) -> VerifiedBundle:
        """Refresh the metadata, download ``<name>/<version>/<target>.edgeml`` and verify it.

        Raises:
            UpdateVerificationError: Verification failed (``kind`` names why); nothing was downloaded.
        """
        path = f"{name}/{version}/{target}.edgeml"
        what = f"update {path}"
        with self._phase("refresh", what):
            updater = self._updater()
            updater.refresh()
            info = updater.get_targetinfo(path)
        if info is None:
            raise UpdateVerificationError(f"refused {what}: the registry does not list it", kind="not-found")
        with self._scratch(f"{name}-{version}-{target}.edgeml") as (scratch, partial):
            with self._phase("download", what):
                updater.download_target(info, str(partial))
            _check_manifest(partial, info.custom or {}, what)
        return VerifiedBundle(self.download_dir / partial.name, name, version, target, info.hashes["sha256"],
                              checked=True, length=info.length, fetched_bytes=info.length)

    @contextmanager
    def _scratch(self, name: str) -> Iterator[tuple[Path, Path]]:
        """A hidden scratch directory in the download directory and the file ``name`` to build in it, moved into
        the download directory when the block ends without an error; the scratch is removed either way."""
        self.download_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".edgeml-download-", dir=self.download_dir))
        try:
            yield scratch, scratch / name
            os.replace(scratch / name, self.download_dir / name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def fetch_delta(self, name: str, version: str, target: str, base_version: str, base_slot: Path) -> VerifiedBundle:
        """Rebuild ``<name>/<version>/<target>.edgeml`` from the slot serving ``base_version`` and the signed
        delta between them (:mod:`edgeml.delta`): the delta is a TUF target of its own (downloaded and checked
        against its signed hash like any target), its signed fields must name this bundle's signed hash and
        length, the slot must be the delta's base (checked before the download), and the rebuilt file must be
        the signed bundle before it is placed in the download directory.

        Raises:
            UpdateVerificationError: A signature or hash check failed, or the registry lists no such delta.
            DeltaError: The slot is not the delta's base, the patch is damaged, or the result is not the
                signed bundle.
            MissingExtraError: zstandard is not installed (``edgeml[delta]``).
        """
        from edgeml.delta import FORMAT, DeltaError, apply_delta, base_of_slot, delta_path

        path, patch = f"{name}/{version}/{target}.edgeml", delta_path(name, version, target, base_version)
        what = f"delta {patch}"
        with self._phase("refresh", what):
            updater = self._updater()
            updater.refresh()
            full, info = updater.get_targetinfo(path), updater.get_targetinfo(patch)
        if full is None or info is None:
            raise UpdateVerificationError(f"refused {what}: the registry does not list it", kind="not-found")
        spec = (info.custom or {}).get("delta") or {}
        if (spec.get("base"), spec.get("format"), spec.get("result_sha256"), spec.get("result_length")) != (
                base_version, FORMAT, full.hashes.get("sha256"), full.length):
            raise UpdateVerificationError(f"refused {what}: its signed fields do not name {path} from {base_version}",
                                          kind="manifest-mismatch")
        base, _names, _version = base_of_slot(base_slot)
        if spec.get("base_sha256") is not None and hashlib.sha256(base).hexdigest() != spec["base_sha256"]:
            raise DeltaError(f"this device's {base_version} is not the delta's base: its slot was modified")
        with self._scratch(f"{name}-{version}-{target}.edgeml") as (scratch, partial):
            with self._phase("download", what):
                updater.download_target(info, str(scratch / "delta"))
            apply_delta((scratch / "delta").read_bytes(), base, partial, expect_sha256=full.hashes["sha256"],
                        expect_length=full.length)
            _check_manifest(partial, full.custom or {}, f"update {path}")
        return VerifiedBundle(self.download_dir / partial.name, name, version, target, full.hashes["sha256"],
                              checked=True, length=full.length, fetched_bytes=info.length)


def _check_manifest(path: Path, custom: dict[str, Any], what: str) -> None:
    from edgeml.bundle import Bundle

    try:
        with Bundle(path) as bundle:  # the structure and the manifest; members are hashed as they are staged
            manifest = bundle.manifest
    except BundleError as exc:
        raise UpdateVerificationError(f"refused {what}: the signed file is not a valid bundle: {exc}",
                                      kind="manifest-mismatch") from exc
    for field in ("name", "version", "target"):
        if custom.get(field) != getattr(manifest, field):
            raise UpdateVerificationError(
                f"refused {what}: the signed {field} {custom.get(field)!r} differs from the bundle's "
                f"manifest {getattr(manifest, field)!r}", kind="manifest-mismatch")
