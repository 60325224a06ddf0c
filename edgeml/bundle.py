"""The artifact bundle: one immutable ``.edgeml`` file per compiled target.

A bundle is a zip archive with ``manifest.json`` at its root and the files the manifest lists (the model,
golden vectors, reference statistics). Every file's sha256 and size are in the manifest, so a bundle can
be verified on its own; the registry signs the bundle's own hash on top (TUF). This module reads bundles;
:func:`edgeml.bundle_writer.write_bundle` writes them.

A bundle is untrusted input: :class:`Bundle` checks it on open, before anything is decompressed. Every
manifest field must match its pattern and the archive must stay within :class:`BundleLimits` (the rules are
in :mod:`edgeml.bundle_rules`); the central directory's size is checked before zipfile reads it; links,
duplicate or unlisted members and compression other than stored or deflate are refused; and each member's
size in the archive must equal the manifest's, so that nothing inflates beyond what was declared (zip
bombs). Reading stops as soon as a member yields more bytes than it declared.

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
    recovery       {...} | absent     what `edgeml compile --recover` did (see edgeml.recovery)
    files          {arcname: {"sha256", "size"}}        every member except manifest.json
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeml import bundle_rules as rules
from edgeml.bundle_rules import (
    DEFAULT_LIMITS,
    MANIFEST_NAME,
    BundleLimits,
    check_member_name,
    check_name,
    check_semver,
    check_target,
    load_json,
)
from edgeml.errors import BundleError, BundleIntegrityError
from edgeml.recovery import check_recovery

__all__ = [
    "BUNDLE_SUFFIX",
    "DEFAULT_LIMITS",
    "MANIFEST_NAME",
    "SCHEMA",
    "Bundle",
    "BundleLimits",
    "FileEntry",
    "Manifest",
    "TensorSpec",
    "bundle_filename",
    "check_name",
    "check_semver",
    "check_target",
    "load_json",
    "sha256_file",
]

SCHEMA = "edgeml.bundle/1"
BUNDLE_SUFFIX = ".edgeml"
_CHUNK = 1024 * 1024


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
        """Parse and check one tensor spec (see :func:`edgeml.bundle_rules.check_tensor`).

        Raises:
            BundleError: It is malformed.
        """
        name, shape, dtype = rules.check_tensor(data)
        return cls(name=name, shape=shape, dtype=dtype)


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
    recovery: dict[str, Any] | None = None

    @property
    def filename(self) -> str:
        return bundle_filename(self.name, self.version, self.target)

    def to_dict(self) -> dict[str, Any]:
        recovery = {"recovery": self.recovery} if self.recovery is not None else {}  # absent: older readers
        return {
            **recovery,
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
    def from_dict(cls, data: Mapping[str, Any], *, limits: BundleLimits = DEFAULT_LIMITS) -> Manifest:
        """Parse and validate a manifest dict: every field against its pattern, the files against ``limits``.

        Raises:
            BundleError: A required field is missing or malformed, a limit is exceeded, or the schema is
                unknown.
        """
        if not isinstance(data, Mapping):
            raise BundleError("manifest.json is not a JSON object")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise BundleError(f"unsupported bundle schema {rules.shown(schema)} (this edgeml reads {SCHEMA})")
        try:
            files = {k: FileEntry(sha, size) for k, (sha, size) in rules.check_files(data["files"], limits).items()}
            depth = limits.max_json_depth
            return cls(
                name=check_name(data["name"]),
                version=check_semver(data["version"]),
                target=check_target(data["target"]),
                created=rules.check_text(data.get("created", ""), "created", empty=True),
                runtime=rules.check_runtime(data["runtime"], depth),
                model=rules.check_reference(data["model"], "model", files, depth) or {},
                inputs=tuple(map(TensorSpec.from_dict, rules.check_tensor_list(data["inputs"], "inputs"))),
                outputs=tuple(map(TensorSpec.from_dict, rules.check_tensor_list(data["outputs"], "outputs"))),
                preprocessing=rules.check_object(data.get("preprocessing"), "preprocessing", depth, optional=True),
                labels=rules.check_labels(data.get("labels")),
                metrics=rules.check_object(data.get("metrics") or {}, "metrics", depth) or {},
                gate=rules.check_object(data.get("gate") or {}, "gate", depth) or {},
                golden=rules.check_golden(data.get("golden"), files, depth),
                refstats=rules.check_reference(data.get("refstats"), "refstats", files, depth, optional=True),
                provenance=rules.check_object(data.get("provenance") or {}, "provenance", depth) or {},
                files=files,
                recovery=check_recovery(data.get("recovery")),
            )
        except KeyError as exc:
            raise BundleError(f"manifest.json is missing or has a malformed field: {exc}") from exc


def _check_directory_size(path: Path, limits: BundleLimits) -> None:
    """Refuse an archive whose central directory is too large, before zipfile reads all of it into memory.

    Uses zipfile's own search for the end record, so that both read the same directory; where that private
    helper is missing (a future Python), the entry count is still checked once zipfile has read it.
    """
    find_end = getattr(zipfile, "_EndRecData", None)
    if find_end is None:
        return
    with open(path, "rb") as fh:
        end = find_end(fh)
    if end is None:  # not a zip archive: zipfile says so next
        return
    entries, size = int(end[4]), int(end[5])  # zipfile._ECD_ENTRIES_TOTAL, zipfile._ECD_SIZE
    most = limits.max_members + 1
    if entries > most or size > most * rules.DIRECTORY_BYTES_PER_ENTRY:
        raise BundleError(f"{path} has {entries} archive entries in a {size}-byte directory; a reader accepts at "
                          f"most {limits.max_members} members and manifest.json (BundleLimits.max_members)")


class Bundle:
    """A bundle opened for reading. The manifest is parsed and the archive's layout checked on open.

    Use :meth:`verify` to re-check every hash, :meth:`read` for one member (hash-checked), and
    :meth:`extract` to unpack into a directory (hash-checked while writing).

    Args:
        path: The ``.edgeml`` file.
        limits: The largest bundle accepted (see :class:`BundleLimits`).

    Raises:
        BundleError: The file is not a bundle, is malformed or unsafe, or exceeds ``limits``.
        BundleIntegrityError: A member's size in the archive differs from the manifest's.
    """

    def __init__(self, path: str | os.PathLike[str], *, limits: BundleLimits = DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        self.limits = limits
        try:
            _check_directory_size(self.path, limits)
            self._zip = zipfile.ZipFile(self.path)
        except FileNotFoundError as exc:
            raise BundleError(f"{self.path}: no such bundle") from exc
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise BundleError(f"{self.path} is not an edgeml bundle (not a valid zip archive)") from exc
        try:
            self._check_entry_count()
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

    def _check_entry_count(self) -> None:
        entries = len(self._zip.infolist())
        if entries > self.limits.max_members + 1:
            raise BundleError(f"{self.path} has {entries} archive entries; a reader accepts at most "
                              f"{self.limits.max_members} members and manifest.json (BundleLimits.max_members)")

    def _read_manifest(self) -> Manifest:
        try:
            info = self._zip.getinfo(MANIFEST_NAME)
        except KeyError as exc:
            raise BundleError(f"{self.path} has no manifest.json at its root") from exc
        if info.file_size > self.limits.max_manifest_bytes:
            raise BundleError(f"{self.path}: manifest.json is {info.file_size} bytes; a reader accepts at most "
                              f"{self.limits.max_manifest_bytes} (BundleLimits.max_manifest_bytes)")
        try:
            raw = self._zip.read(info)  # zipfile stops at the declared size, and checks the CRC
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
            raise BundleError(f"{self.path}: manifest.json cannot be read: {exc}") from exc
        data = load_json(raw, f"{self.path}: manifest.json", max_depth=self.limits.max_json_depth)
        return Manifest.from_dict(data, limits=self.limits)

    def _check_members(self) -> None:
        seen: set[str] = set()
        for info in self._zip.infolist():
            name = check_member_name(info.filename[:-1] if info.is_dir() else info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BundleError(f"{self.path}: member {name!r} is a link; bundles hold plain files only")
            if name in seen:
                raise BundleError(f"{self.path}: member {name!r} appears twice")
            seen.add(name)
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise BundleError(f"{self.path}: member {name!r} uses compression method {info.compress_type}; "
                                  "bundles hold stored or deflated members only")
            if info.is_dir() or name == MANIFEST_NAME:
                continue
            entry = self.manifest.files.get(name)
            if entry is None:
                raise BundleError(f"{self.path}: member {name!r} is not listed in the manifest")
            if info.file_size != entry.size:
                raise BundleIntegrityError(
                    f"{self.path}: {name} is {info.file_size} bytes, the manifest says {entry.size}"
                )
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                raise BundleIntegrityError(f"{self.path}: {name} is stored uncompressed in {info.compress_size} "
                                           f"bytes but declares {info.file_size}; the archive is damaged")
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
                    if size > entry.size:  # zipfile stops at the declared size, equal to entry.size: a guard
                        raise BundleIntegrityError(f"{self.path}: {name} is longer than the manifest says")
                    digest.update(block)
                    yield block
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
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
