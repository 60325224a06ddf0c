"""Writing a bundle: hash every file, complete the manifest, zip, and rename into place atomically.

The format itself (the manifest, :class:`~edgeml.bundle.Bundle` for reading) is in :mod:`edgeml.bundle`;
its field rules and size limits in :mod:`edgeml.bundle_rules`. A bundle is written only if it reads back:
the completed manifest is checked against the same :class:`~edgeml.bundle_rules.BundleLimits` a reader
applies, before anything is written.

Map::

    write_bundle()         the public call: manifest + {arcname: source file} -> .edgeml, atomically
    _worth_compressing()   deflate a member only if it saves at least 5 % (weights are stored as they are)
    _zipinfo()             reproducible member headers (fixed date, 0644)
"""

from __future__ import annotations

import os
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from edgeml.bundle import FileEntry, Manifest, sha256_file
from edgeml.bundle_rules import DEFAULT_LIMITS, MANIFEST_NAME, BundleLimits, check_member_name
from edgeml.errors import StorageError
from edgeml.fsutil import fsync_dir

__all__ = ["write_bundle"]

_CHUNK = 1024 * 1024
_SAMPLE = 256 * 1024  # bytes per sample when judging whether a member compresses
_MIN_SAVING = 0.05  # members that deflate shrinks by less than this are stored


def write_bundle(
    dest: str | os.PathLike[str], manifest: Manifest, files: Mapping[str, str | os.PathLike[str]], *,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> Manifest:
    """Write a bundle atomically: hashes every file, completes the manifest and renames into place.

    Args:
        dest: The ``.edgeml`` path to create (replaced atomically if it exists).
        manifest: The manifest; its ``files`` field is filled in here.
        files: Archive member name -> path of the file to store.
        limits: What the bundle's readers accept; a bundle beyond them is not written.

    Returns:
        The manifest as written (with ``files``).

    Raises:
        BundleError: The manifest or a member name is invalid, or the files exceed ``limits``.
        StorageError: The destination cannot be written; nothing is left behind.
    """
    entries = {
        check_member_name(arc): FileEntry(sha256=sha256_file(src), size=os.path.getsize(src))
        for arc, src in files.items()
    }
    final = replace(manifest, files=entries)
    Manifest.from_dict(final.to_dict(), limits=limits)  # a bundle we cannot read back is never written
    dest_path = Path(dest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest_path.name}.", suffix=".tmp", dir=dest_path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {dest_path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(_zipinfo(MANIFEST_NAME), final.to_json())
            for arc, src in sorted(files.items()):
                info = _zipinfo(arc, compress=_worth_compressing(Path(src)))
                with open(src, "rb") as fh, zf.open(info, "w", force_zip64=True) as out:
                    for block in iter(lambda fh=fh: fh.read(_CHUNK), b""):  # type: ignore[misc]
                        out.write(block)
            zf.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, dest_path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write {dest_path}: {exc.strerror}") from exc
        raise
    fsync_dir(dest_path.parent)
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _worth_compressing(path: Path) -> bool:
    """Whether deflate shrinks the file by at least :data:`_MIN_SAVING`, judged on up to three samples.

    Float weights barely compress and random bytes not at all; a member deflate cannot shrink is stored,
    so that no device spends CPU inflating it on every update (a Raspberry Pi inflates ~100 MB/s).
    """
    size = path.stat().st_size
    if size < _SAMPLE:
        data = path.read_bytes()
    else:
        with open(path, "rb") as fh:
            parts = []
            for at in (0, (size - _SAMPLE) // 2, size - _SAMPLE):
                fh.seek(at)
                parts.append(fh.read(_SAMPLE))
        data = b"".join(parts)
    if not data:
        return False
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return len(packer.compress(data) + packer.flush()) <= len(data) * (1 - _MIN_SAVING)


def _zipinfo(name: str, compress: bool = True) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible archives
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info

