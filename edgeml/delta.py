"""Deltas between two bundles of one model and target: the bytes a device needs to rebuild the new bundle from
the model it already runs.

A delta rebuilds the new bundle *file*, byte for byte, from the *members* of the base (the files a device keeps
unpacked in its slot): its base is the slot's ``manifest.json`` (as staging writes it) followed by the base
bundle's member files in sorted name order, and its patch is a zstandard frame compressed with that base as a
raw-content dictionary (zstd's ``--patch-from``), so the model weights a fine-tune left unchanged are found in
the base. So the device needs neither the old ``.edgeml`` file nor the registry's zip writer.

A member the bundle stores deflated would hide its content from the patch (one changed weight changes every
compressed byte after it), so the patch is made over the bundle's *inflated view*: each deflated member whose
deflate stream zlib reproduces exactly (at the level the header names) is carried uncompressed, and the device
deflates it again while rebuilding (the method of Google's archive-patcher). A device whose zlib deflates
differently rebuilds a file whose hash differs, and falls back to the full bundle like any failed delta: the
result is checked against the full bundle's signed sha256 and length before anything else happens.

A member that a fine-tune left aligned with its base (the same name and size, and at least a fifth of its bytes
equal where they stand: floats nudged by training keep their sign and exponent bytes) travels XORed with the
base's member, as byte planes when its size is a multiple of 4 (the floats' first bytes together, then the
second...): zeros where bytes are equal, in long runs, which the patch compresses, where the raw bytes would
match nothing. The device XORs it back with its slot's bytes.

Layout of a ``.edgeml-delta`` file::

    b"EDGEMLD1" | 4-byte big-endian header length | header JSON | zstd frame of the inflated view

Header (``edgeml.delta/1``): ``base`` (``version``, ``sha256`` and ``length`` of the base bytes, the member
names in order), ``result`` (``sha256`` and ``length`` of the bundle it rebuilds), ``view`` (its ``length``,
the ``inflated`` spans ``[offset, size, level]`` and the ``xor`` spans ``[offset, size, offset in the base]``).
Nothing in a delta is trusted before its own signed hash is checked (it is a TUF target of its own), and nothing
it produces is used before the result matches the full bundle's signed hash.

zstandard (``pip install 'edgeml[delta]'``) is needed to make or apply one; a device without it simply
receives full bundles.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeml._deps import require
from edgeml.bundle import MANIFEST_NAME, Bundle, Manifest, load_json
from edgeml.errors import BundleError, EdgeMLError
from edgeml.fsutil import atomic_write_bytes

__all__ = ["DELTA_SCHEMA", "FORMAT", "DeltaError", "DeltaHeader", "apply_delta", "base_of_bundle", "base_of_slot",
           "delta_path", "delta_saving", "make_delta", "read_header", "supported"]

DELTA_SCHEMA = "edgeml.delta/1"
#: The delta format name a device advertises in its capabilities when it can apply deltas.
FORMAT = "zstd"
_MAGIC = b"EDGEMLD1"
_MAX_HEADER = 256 * 1024
_LEVEL = 19  # zstd level: deltas are made once, at publish, and fetched by every device
_MAX_WINDOW_LOG = 30  # 1 GiB: what a 32-bit device can still decode
#: deflate levels tried to reproduce a member's stream: zipfile's default (what edgeml writes), then others
_LEVELS = (-1, 9, 1)
_MAX_VIEW = 16 * 1024**3  # the largest inflated view a device decodes (twice the largest bundle allowed)


class DeltaError(EdgeMLError):
    """A delta cannot be made or applied (wrong base, damaged patch, result not the signed bundle)."""


@dataclass(frozen=True)
class DeltaHeader:
    """What a delta says of itself (checked against the base and the result before any use)."""

    base_version: str
    base_sha256: str
    base_length: int
    members: tuple[str, ...]
    result_sha256: str
    result_length: int
    view_length: int = 0
    inflated: tuple[tuple[int, int, int], ...] = ()  # (offset in the view, size, deflate level)
    xor: tuple[tuple[int, int, int], ...] = ()  # (offset in the view, size, offset in the base)

    def to_json(self) -> bytes:
        return json.dumps({"schema": DELTA_SCHEMA, "base": {
            "version": self.base_version, "sha256": self.base_sha256, "length": self.base_length,
            "members": list(self.members)}, "result": {"sha256": self.result_sha256, "length": self.result_length},
            "view": {"length": self.view_length, "inflated": [list(span) for span in self.inflated],
                     "xor": [list(span) for span in self.xor]}},
            sort_keys=True, separators=(",", ":")).encode()

    def check(self) -> None:
        """Raise DeltaError unless the view's spans are in order, inside it, and their levels deflate's."""
        at = 0
        if not 0 <= self.view_length <= _MAX_VIEW:
            raise DeltaError("the delta's header is damaged: view length out of range")
        for offset, size, level in self.inflated:
            if offset < at or size < 0 or offset + size > self.view_length or level not in range(-1, 10):
                raise DeltaError("the delta's header is damaged: inflated spans out of order or range")
            at = offset + size
        at = 0
        for offset, size, base_at in self.xor:
            outside = offset + size > self.view_length or not 0 <= base_at <= self.base_length - size
            if offset < at or size < 0 or outside:
                raise DeltaError("the delta's header is damaged: xor spans out of order or range")
            at = offset + size


def _deflate(data: bytes, level: int) -> bytes:
    packer = zlib.compressobj(level, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def _inflated_view(bundle: bytes) -> tuple[bytes, tuple[tuple[int, int, int], ...], dict[str, tuple[int, int]]]:
    """The bundle with every deflated member whose stream zlib reproduces replaced by its content; the spans it
    inflated, and where each member's content lies in the view (``name -> (offset, size)``: stored members and
    inflated ones)."""
    parts: list[bytes] = []
    spans: list[tuple[int, int, int]] = []
    members: dict[str, tuple[int, int]] = {}
    pos = size = 0  # position in the bundle, and the view's size up to it
    with zipfile.ZipFile(io.BytesIO(bundle)) as zf:
        infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    for info in infos:
        head = info.header_offset
        names, extra = struct.unpack("<HH", bundle[head + 26:head + 30])
        start = head + 30 + names + extra
        if info.compress_type == zipfile.ZIP_STORED:
            members[info.filename] = (size + start - pos, info.file_size)
            continue
        if info.compress_type != zipfile.ZIP_DEFLATED:
            continue
        stream = bundle[start:start + info.compress_size]
        content = zlib.decompressobj(-15).decompress(stream, info.file_size + 1)
        level = next((lv for lv in _LEVELS if _deflate(content, lv) == stream), None)
        if level is None or len(content) != info.file_size:
            continue  # carried as it is
        parts += [bundle[pos:start], content]
        size += start - pos
        spans.append((size, len(content), level))
        members[info.filename] = (size, len(content))
        size += len(content)
        pos = start + info.compress_size
    parts.append(bundle[pos:])
    return b"".join(parts), tuple(spans), members


def _planes(xored: np.ndarray) -> bytes:
    """A XORed span as byte planes when its size is a multiple of 4 (every float's first bytes together, then the
    second...): the sign and exponent bytes training left alone become long runs of zeros."""
    return xored.reshape(-1, 4).T.tobytes() if xored.size % 4 == 0 else xored.tobytes()


def _unxor(span: bytes | memoryview, base: bytes | memoryview) -> bytes:
    """The inverse of :func:`_planes` of the XOR with ``base``."""
    data = np.frombuffer(span, np.uint8)
    if data.size % 4 == 0:
        data = data.reshape(4, -1).T.reshape(-1)
    return np.bitwise_xor(data, np.frombuffer(base, np.uint8)).tobytes()


#: A member of the new bundle is carried XORed with the same member of the base when they have the same size
#: and at least this share of their bytes are equal where they stand (a fine-tune keeps most floats' sign and
#: exponent bytes: the XOR is zero there, which compresses; the raw bytes would not match anywhere).
_XOR_MIN_EQUAL = 0.2


def _xor_members(view: bytes, members: dict[str, tuple[int, int]], base: bytes,
                 base_members: dict[str, tuple[int, int]]) -> tuple[bytes, tuple[tuple[int, int, int], ...]]:
    """``view`` with every member that a fine-tune left aligned with its base XORed with it, and those spans."""
    out = bytearray(view)
    spans = []
    for name, (at, size) in sorted(members.items(), key=lambda m: m[1][0]):
        b, base_size = base_members.get(name, (0, -1))
        if size == 0 or base_size != size or b + size > len(base):
            continue
        new, old = np.frombuffer(view, np.uint8, size, at), np.frombuffer(base, np.uint8, size, b)
        if np.count_nonzero(new == old) >= _XOR_MIN_EQUAL * size:
            out[at:at + size] = _planes(np.bitwise_xor(new, old))
            spans.append((at, size, b))
    return bytes(out), tuple(spans)


def _deflated(view: bytes, spans: tuple[tuple[int, int, int], ...]) -> bytes:
    """The bundle file from its inflated view (the inverse of :func:`_inflated_view`)."""
    parts, pos = [], 0
    for offset, size, level in spans:
        parts += [view[pos:offset], _deflate(view[offset:offset + size], level)]
        pos = offset + size
    parts.append(view[pos:])
    return b"".join(parts)


def delta_path(name: str, version: str, target: str, base_version: str) -> str:
    """The TUF target path of the delta that rebuilds ``name`` ``version`` ``target`` from ``base_version``."""
    return f"{name}/{version}/{target}.from-{base_version}.edgeml-delta"


def _base(chunks: Iterable[bytes]) -> tuple[bytes, str]:
    data = b"".join(chunks)
    return data, hashlib.sha256(data).hexdigest()


def base_of_bundle(bundle: Path) -> tuple[bytes, tuple[str, ...], str]:
    """The base bytes of a bundle file: its members in sorted name order (each checked against the manifest).

    Returns:
        ``(bytes, member names, version)``.
    """
    with Bundle(bundle) as b:
        names = tuple(sorted(b.manifest.files))
        data, _ = _base([b.manifest.to_json(), *(b.read(name) for name in names)])  # as a slot writes it
        return data, names, b.manifest.version


def base_of_slot(slot_dir: Path) -> tuple[bytes, tuple[str, ...], str]:
    """The base bytes of an unpacked slot (what a device keeps): the same as :func:`base_of_bundle` of the
    bundle it was unpacked from.

    Raises:
        DeltaError: The slot's manifest or a member is missing or unreadable.
    """
    try:
        raw = (Path(slot_dir) / MANIFEST_NAME).read_bytes()
        manifest = Manifest.from_dict(load_json(raw, "the slot's manifest"))
        names = tuple(sorted(manifest.files))
        data, _ = _base([raw, *((Path(slot_dir) / name).read_bytes() for name in names)])
    except (OSError, BundleError, ValueError) as exc:
        raise DeltaError(f"the base slot {slot_dir} cannot be read: {exc}") from exc
    return data, names, manifest.version


def make_delta(base_bundle: Path, new_bundle: Path, *, level: int = _LEVEL) -> bytes:
    """A delta that rebuilds ``new_bundle`` from the members of ``base_bundle``.

    Raises:
        MissingExtraError: zstandard is not installed.
        BundleError: A bundle is unreadable or damaged.
    """
    zstd = require("zstandard", "delta")
    base, names, version = base_of_bundle(base_bundle)
    target = Path(new_bundle).read_bytes()
    view, spans, members = _inflated_view(target)
    with Bundle(base_bundle) as b:  # where each member of the base lies in the base bytes
        at, base_members = len(b.manifest.to_json()), {}
        for name in names:
            base_members[name] = (at, b.manifest.files[name].size)
            at += b.manifest.files[name].size
    view, xor = _xor_members(view, members, base, base_members)
    header = DeltaHeader(version, hashlib.sha256(base).hexdigest(), len(base), names,
                         hashlib.sha256(target).hexdigest(), len(target), len(view), spans, xor)
    window = max(10, min(_MAX_WINDOW_LOG, (len(base) + len(view)).bit_length()))
    params = zstd.ZstdCompressionParameters.from_level(level, window_log=window, enable_ldm=True,
                                                       source_size=len(view), write_checksum=True)
    dictionary = zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    patch = zstd.ZstdCompressor(compression_params=params, dict_data=dictionary).compress(view)
    head = header.to_json()
    return _MAGIC + struct.pack(">I", len(head)) + head + patch


def read_header(delta: bytes) -> tuple[DeltaHeader, int]:
    """The header of a delta and where its patch starts.

    Raises:
        DeltaError: Not a delta of this format.
    """
    if len(delta) < len(_MAGIC) + 4 or not delta.startswith(_MAGIC):
        raise DeltaError("not an edgeml delta (bad magic)")
    (size,) = struct.unpack(">I", delta[len(_MAGIC):len(_MAGIC) + 4])
    start = len(_MAGIC) + 4
    if size > _MAX_HEADER or start + size > len(delta):
        raise DeltaError("the delta's header is damaged")
    try:
        doc: Any = json.loads(delta[start:start + size])
        base, result = doc["base"], doc["result"]
        if doc.get("schema") != DELTA_SCHEMA:
            raise DeltaError(f"unsupported delta schema {doc.get('schema')!r} (this edgeml reads {DELTA_SCHEMA})")
        view = doc["view"]
        header = DeltaHeader(str(base["version"]), str(base["sha256"]), int(base["length"]),
                             tuple(str(m) for m in base["members"]), str(result["sha256"]), int(result["length"]),
                             int(view["length"]), tuple((int(a), int(n), int(lv)) for a, n, lv in view["inflated"]),
                             tuple((int(a), int(n), int(b)) for a, n, b in view.get("xor", [])))
    except (ValueError, KeyError, TypeError) as exc:
        raise DeltaError(f"the delta's header is damaged: {exc}") from exc
    header.check()
    return header, start + size


def apply_delta(delta: bytes, base: bytes, out: Path, *, expect_sha256: str, expect_length: int) -> Path:
    """Rebuild a bundle from ``base`` (the device's slot, :func:`base_of_slot`) and write it to ``out``.

    Args:
        delta: The delta file's bytes (already checked against its own signed hash).
        base: The base bytes.
        out: Where the rebuilt bundle goes (written atomically, only once it is the signed bundle).
        expect_sha256: The full bundle's signed sha256.
        expect_length: Its signed length.

    Raises:
        DeltaError: The base is not the delta's, the patch is damaged, or the result is not the signed bundle.
        MissingExtraError: zstandard is not installed.
    """
    zstd = require("zstandard", "delta")
    header, start = read_header(delta)
    if (header.result_sha256, header.result_length) != (expect_sha256, expect_length):
        raise DeltaError("the delta rebuilds another bundle than the one signed for this update")
    if len(base) != header.base_length or hashlib.sha256(base).hexdigest() != header.base_sha256:
        raise DeltaError(f"the device's model is not the delta's base ({header.base_version}): it was modified")
    dictionary = zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    try:
        view = zstd.ZstdDecompressor(dict_data=dictionary, max_window_size=1 << _MAX_WINDOW_LOG).decompress(
            delta[start:], max_output_size=header.view_length)
    except zstd.ZstdError as exc:
        raise DeltaError(f"the delta's patch is damaged: {exc}") from exc
    if len(view) != header.view_length:
        raise DeltaError("the delta's patch is damaged: it rebuilt a view of another length")
    if header.xor:
        unxored = bytearray(view)
        for at, size, base_at in header.xor:
            unxored[at:at + size] = _unxor(memoryview(view)[at:at + size], memoryview(base)[base_at:base_at + size])
        view = bytes(unxored)
    result = _deflated(view, header.inflated)
    if len(result) != expect_length or hashlib.sha256(result).hexdigest() != expect_sha256:
        raise DeltaError("the rebuilt bundle does not match its signed sha256 (a damaged patch, or a zlib that "
                         "deflates differently from the registry's)")
    atomic_write_bytes(out, result)
    return Path(out)


def delta_saving(delta_length: int, full_length: int) -> float:
    """The fraction of the full bundle's bytes a delta saves (0.9: the delta is a tenth)."""
    return 1.0 - delta_length / full_length if full_length else 0.0


def supported() -> bool:
    """Whether this machine can apply deltas (zstandard is importable): a device advertises :data:`FORMAT`."""
    import importlib.util

    return importlib.util.find_spec("zstandard") is not None
