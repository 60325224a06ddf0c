"""The artifact bundle: one immutable ``.edgeml`` file per compiled target.

A bundle is a zip archive with ``manifest.json`` at its root and the files the manifest lists (the model,
golden vectors, reference statistics). Every file's sha256 and size are in the manifest, so a bundle can
be verified on its own; the registry signs the bundle's own hash on top (TUF). Readers refuse archives
with links, absolute or ``..`` paths, duplicate or unlisted members, and members larger than the
manifest says (zip bombs).

The manifest (``schema = "edgeml.bundle/1"``)::

    name, version (semver), target, created
    runtime        {"name": "onnxruntime" | "litert" | "tensorrt", "min_version": str,
                    "precision": "fp32" | "fp16" | "int8", "build": {...TensorRT build config...} | null}
    model          {"file": "model.onnx", "format": "onnx" | "tflite"}
    inputs/outputs [{"name", "shape": [int | str], "dtype"}]
    preprocessing  {...} | null       applied by the agent to raw requests
    labels         [str] | null
    metrics        reference and compiled accuracy, agreement, errors, latency on the build host
    gate           {"status": "passed" | "ungated" | "proxy-passed", ...}
    golden         {"file": "golden.npz", "count", "atol", "rtol", "top1"} | null
    refstats       {"file": "refstats.json"} | null     (see edgeml.refstats)
    provenance     source sha256, data hashes, tool versions, git commit
    files          {arcname: {"sha256", "size"}}        every member except manifest.json
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from edgeml.errors import BundleError, BundleIntegrityError, StorageError
from edgeml.fsutil import fsync_dir

__all__ = [
    "BUNDLE_SUFFIX",
    "SCHEMA",
    "Bundle",
    "FileEntry",
    "Manifest",
    "TensorSpec",
    "bundle_filename",
    "check_semver",
    "sha256_file",
    "write_bundle",
]

SCHEMA = "edgeml.bundle/1"
MANIFEST_NAME = "manifest.json"
BUNDLE_SUFFIX = ".edgeml"
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
_CHUNK = 1024 * 1024
_SAMPLE = 256 * 1024  # bytes per sample when judging whether a member compresses
_MIN_SAVING = 0.05  # members that deflate shrinks by less than this are stored

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def check_semver(version: str) -> str:
    """Return ``version`` if it is a semantic version (2.0.0), else raise BundleError."""
    if not _SEMVER.match(version):
        raise BundleError(f"version {version!r} is not a semantic version (e.g. 1.2.0 or 1.2.0-rc.1)")
    return version


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid model name (lowercase letters, digits, '.', '_', '-')."""
    if not _NAME.match(name):
        raise BundleError(
            f"model name {name!r} is invalid: use 1-64 lowercase letters, digits, '.', '_' or '-'"
        )
    return name


def bundle_filename(name: str, version: str, target: str) -> str:
    """The conventional file name of a bundle, e.g. ``digits-1.2.0-onnx-int8.edgeml``."""
    return f"{name}-{version}-{target}{BUNDLE_SUFFIX}"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, shape (ints, or strings for symbolic dims) and numpy dtype name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        try:
            shape = tuple(d if isinstance(d, (int, str)) else int(d) for d in data["shape"])
            return cls(name=str(data["name"]), shape=shape, dtype=str(data["dtype"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"malformed tensor spec in manifest: {data!r}") from exc


@dataclass(frozen=True)
class FileEntry:
    """The recorded hash and size of one bundle member."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a bundle. See the module docstring for the fields."""

    name: str
    version: str
    target: str
    runtime: dict[str, Any]
    model: dict[str, Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocessing: dict[str, Any] | None = None
    labels: list[str] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    golden: dict[str, Any] | None = None
    refstats: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    created: str = ""
    schema: str = SCHEMA

    @property
    def filename(self) -> str:
        return bundle_filename(self.name, self.version, self.target)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "target": self.target,
            "created": self.created,
            "runtime": self.runtime,
            "model": self.model,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "preprocessing": self.preprocessing,
            "labels": self.labels,
            "metrics": self.metrics,
            "gate": self.gate,
            "golden": self.golden,
            "refstats": self.refstats,
            "provenance": self.provenance,
            "files": {k: {"sha256": v.sha256, "size": v.size} for k, v in sorted(self.files.items())},
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Parse and validate a manifest dict.

        Raises:
            BundleError: A required field is missing or malformed, or the schema is unknown.
        """
        if not isinstance(data, Mapping):
            raise BundleError("manifest.json is not a JSON object")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise BundleError(f"unsupported bundle schema {schema!r} (this edgeml reads {SCHEMA})")
        try:
            files = {
                _check_member_name(k): FileEntry(sha256=str(v["sha256"]), size=int(v["size"]))
                for k, v in dict(data["files"]).items()
            }
            manifest = cls(
                name=check_name(str(data["name"])),
                version=check_semver(str(data["version"])),
                target=str(data["target"]),
                created=str(data.get("created", "")),
                runtime=dict(data["runtime"]),
                model=dict(data["model"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
                preprocessing=data.get("preprocessing"),
                labels=data.get("labels"),
                metrics=dict(data.get("metrics") or {}),
                gate=dict(data.get("gate") or {}),
                golden=data.get("golden"),
                refstats=data.get("refstats"),
                provenance=dict(data.get("provenance") or {}),
                files=files,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest.json is missing or has a malformed field: {exc}") from exc
        for ref in (manifest.model, manifest.golden, manifest.refstats):
            if ref is not None and ref.get("file") not in files:
                raise BundleError(f"manifest refers to {ref.get('file')!r}, which it does not list")
        return manifest


def _check_member_name(name: str) -> str:
    path = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or path.is_absolute()
        or ".." in path.parts
        or name.startswith("/")
        or re.match(r"^[A-Za-z]:", name)
    ):
        raise BundleError(f"bundle member {name!r} has an absolute or parent-relative path")
    return name


def write_bundle(
    dest: str | os.PathLike[str], manifest: Manifest, files: Mapping[str, str | os.PathLike[str]]
) -> Manifest:
    """Write a bundle atomically: hashes every file, completes the manifest and renames into place.

    Args:
        dest: The ``.edgeml`` path to create (replaced atomically if it exists).
        manifest: The manifest; its ``files`` field is filled in here.
        files: Archive member name -> path of the file to store.

    Returns:
        The manifest as written (with ``files``).

    Raises:
        StorageError: The destination cannot be written; nothing is left behind.
    """
    entries = {
        _check_member_name(arc): FileEntry(sha256=sha256_file(src), size=os.path.getsize(src))
        for arc, src in files.items()
    }
    final = replace(manifest, files=entries)
    Manifest.from_dict(final.to_dict())  # a bundle we cannot read back is never written
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


class Bundle:
    """A bundle opened for reading. The manifest is parsed and the archive's layout checked on open.

    Use :meth:`verify` to re-check every hash, :meth:`read` for one member (hash-checked), and
    :meth:`extract` to unpack into a directory (hash-checked while writing).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except FileNotFoundError as exc:
            raise BundleError(f"{self.path}: no such bundle") from exc
        except (zipfile.BadZipFile, OSError) as exc:
            raise BundleError(f"{self.path} is not an edgeml bundle (not a valid zip archive)") from exc
        try:
            self.manifest = self._read_manifest()
            self._check_members()
        except BaseException:
            self._zip.close()
            raise

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def _read_manifest(self) -> Manifest:
        try:
            info = self._zip.getinfo(MANIFEST_NAME)
        except KeyError as exc:
            raise BundleError(f"{self.path} has no manifest.json at its root") from exc
        if info.file_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{self.path}: manifest.json is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            data = json.loads(self._zip.read(info))
        except (ValueError, zipfile.BadZipFile) as exc:
            raise BundleError(f"{self.path}: manifest.json is not valid JSON") from exc
        return Manifest.from_dict(data)

    def _check_members(self) -> None:
        seen: set[str] = set()
        for info in self._zip.infolist():
            name = _check_member_name(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BundleError(f"{self.path}: member {name!r} is a link; bundles hold plain files only")
            if name in seen:
                raise BundleError(f"{self.path}: member {name!r} appears twice")
            seen.add(name)
            if info.is_dir() or name == MANIFEST_NAME:
                continue
            entry = self.manifest.files.get(name)
            if entry is None:
                raise BundleError(f"{self.path}: member {name!r} is not listed in the manifest")
            if info.file_size != entry.size:
                raise BundleIntegrityError(
                    f"{self.path}: {name} is {info.file_size} bytes, the manifest says {entry.size}"
                )
        missing = set(self.manifest.files) - seen
        if missing:
            raise BundleError(f"{self.path}: listed files are missing: {', '.join(sorted(missing))}")

    def _stream(self, name: str) -> Any:
        entry = self.manifest.files[name]
        digest = hashlib.sha256()
        size = 0
        try:
            with self._zip.open(name) as fh:
                for block in iter(lambda: fh.read(_CHUNK), b""):
                    size += len(block)
                    if size > entry.size:
                        raise BundleIntegrityError(f"{self.path}: {name} is longer than the manifest says")
                    digest.update(block)
                    yield block
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise BundleIntegrityError(f"{self.path}: {name} cannot be read: {exc}") from exc
        if size != entry.size or digest.hexdigest() != entry.sha256:
            raise BundleIntegrityError(
                f"{self.path}: {name} does not match its sha256 in the manifest (the bundle was altered "
                "or damaged)"
            )

    def read(self, name: str) -> bytes:
        """Return one member's bytes after checking its hash.

        Raises:
            BundleError: The member is not listed.
            BundleIntegrityError: Its content differs from the manifest.
        """
        if name not in self.manifest.files:
            raise BundleError(f"{self.path}: no member {name!r}")
        return b"".join(self._stream(name))

    def verify(self) -> dict[str, FileEntry]:
        """Re-check the hash and size of every listed file; return the entries checked.

        Raises:
            BundleIntegrityError: A file does not match.
        """
        for name in self.manifest.files:
            for _ in self._stream(name):
                pass
        return dict(self.manifest.files)

    def extract(self, dest: str | os.PathLike[str]) -> Path:
        """Unpack every listed file (and manifest.json) into ``dest``, verifying as it writes.

        Raises:
            BundleIntegrityError: A file does not match; the partial output is removed.
        """
        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        try:
            for name in sorted(self.manifest.files):
                target = out / name
                target.parent.mkdir(parents=True, exist_ok=True)
                written.append(target)
                with open(target, "wb") as fh:
                    for block in self._stream(name):
                        fh.write(block)
            (out / MANIFEST_NAME).write_bytes(self.manifest.to_json())
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return out
