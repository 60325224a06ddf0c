"""The rules a bundle's manifest must follow, with no I/O: size limits, field patterns, bounded JSON.

:mod:`edgeml.bundle` reads and writes the archives; every check on what a manifest says lives here, so that
one module states what a reader trusts. A bundle is untrusted input: the registry and the device build
paths from its name, version, target and member names, and a hostile archive may try to fill a disk or
exhaust memory. So, when a manifest is read:

* name, version (semver) and target are short identifiers with no ``/``, ``..``, NUL or control
  characters; other identifiers (runtime, precision, format, dtype) follow the same alphabet;
* numbers are finite and in range (JSON's ``NaN`` and ``1e999`` are refused), object keys are unique;
* member paths are relative and normalised (no ``.``, ``..`` or empty parts, no backslash, no drive),
  unique even ignoring case, and no member is another's folder;
* the member count, each member's size, the total unpacked size, the manifest's bytes and its JSON nesting
  stay within :class:`BundleLimits`.

Each refusal is a :class:`~edgeml.errors.BundleError` naming the field and what it should be.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgeml.errors import BundleError, ConfigError
from edgeml.protocol.codec import nests_deeper

__all__ = [
    "DEFAULT_LIMITS",
    "DIRECTORY_BYTES_PER_ENTRY",
    "MANIFEST_NAME",
    "BundleLimits",
    "check_files",
    "check_golden",
    "check_json",
    "check_labels",
    "check_member_name",
    "check_name",
    "check_object",
    "check_reference",
    "check_runtime",
    "check_semver",
    "check_target",
    "check_tensor",
    "check_tensor_list",
    "check_text",
    "load_json",
    "shown",
]

MANIFEST_NAME = "manifest.json"
_MiB, _GiB = 1024 * 1024, 1024 * 1024 * 1024


@dataclass(frozen=True)
class BundleLimits:
    """How large a bundle a reader accepts; everything is checked before a member is decompressed.

    The defaults fit real models with room to spare (one ONNX file stops at 2 GiB, protobuf's limit; larger
    weights go to external-data members) while keeping a hostile archive from filling a device's disk or
    memory. Pass other limits to one reader: ``Bundle(path, limits=BundleLimits(max_total_bytes=...))``.

    Raises:
        ConfigError: A limit is not a positive integer.
    """

    max_members: int = 1024  # files the manifest lists, besides manifest.json (archive entries alike)
    max_member_bytes: int = 4 * _GiB  # unpacked size of one member, bytes
    max_total_bytes: int = 8 * _GiB  # unpacked size of all members together, bytes
    max_manifest_bytes: int = 8 * _MiB  # manifest.json, bytes
    max_json_depth: int = 32  # nesting of arrays and objects in manifest.json (a real one nests about 6)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"bundle limit {name} must be a positive integer, got {value!r}")


#: The limits every reader uses unless given others.
DEFAULT_LIMITS = BundleLimits()
#: Central directory bytes allowed per archive entry (46 fixed, the name, a zip64 extra; real ones < 200).
DIRECTORY_BYTES_PER_ENTRY = 8 * 1024

# Every pattern is matched with fullmatch: "$" alone would let a trailing newline through.
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TARGET = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")  # the compile targets' names: onnx, onnx-int8, tflite...
_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # runtime name, precision, model format, dtype
_VERSION_TEXT = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}")  # a runtime's min_version, e.g. 1.17
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_VERSION = 128  # characters of a version (the registry's column)
_MAX_TEXT = 1024  # characters of a tensor name, symbolic dimension, label or created time
_MAX_PATH, _MAX_PART = 1024, 255  # characters of a member path, and of one of its parts
_MAX_TENSORS, _MAX_RANK, _MAX_DIM = 1024, 32, 2**31 - 1
_MAX_LABELS = 100_000
_MAX_COUNT = 2**31 - 1  # golden vectors


def check_semver(version: str) -> str:
    """Return ``version`` if it is a semantic version (2.0.0) of at most 128 characters, else raise BundleError."""
    if not isinstance(version, str) or len(version) > _MAX_VERSION or not _SEMVER.fullmatch(version):
        raise BundleError(f"version {shown(version)} is not a semantic version (e.g. 1.2.0 or 1.2.0-rc.1)")
    return version


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid model name (lowercase letters, digits, '.', '_', '-')."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BundleError(
            f"model name {shown(name)} is invalid: use 1-64 lowercase letters, digits, '.', '_' or '-'"
        )
    return name


def check_target(target: str) -> str:
    """Return ``target`` if it is a valid target id (``onnx``, ``onnx-int8``: lowercase letters, digits, '-')."""
    if not isinstance(target, str) or not _TARGET.fullmatch(target):
        raise BundleError(
            f"target {shown(target)} is invalid: use 1-64 lowercase letters, digits or '-', starting with a "
            "letter or digit (a compile target's name, e.g. onnx-int8)"
        )
    return target


def shown(value: object) -> str:
    """``repr(value)``, cut to 80 characters: messages quote hostile input without repeating all of it."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range for a number")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):  # json keeps the last of two equal keys: a reader must not pick silently
        twice = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"key {shown(twice)} appears twice in one object")
    return doc


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float,
                            object_pairs_hook=_unique_keys)


def load_json(raw: bytes, what: str, *, max_depth: int = DEFAULT_LIMITS.max_json_depth) -> Any:
    """Parse untrusted JSON from a bundle: UTF-8, finite numbers, no duplicate keys, nesting bounded.

    Args:
        raw: The bytes (their size is the caller's to bound).
        what: What they are, for messages (e.g. ``"manifest.json"``).
        max_depth: The deepest nesting of arrays and objects accepted.

    Raises:
        BundleError: The bytes are not such JSON.
    """
    if nests_deeper(raw, max_depth):  # before the parser: its recursion can crash the process (nests_deeper)
        raise BundleError(f"{what} nests arrays or objects deeper than {max_depth} levels")
    try:
        doc = _DECODER.decode(raw.decode("utf-8"))
    except RecursionError as exc:
        raise BundleError(f"{what} nests arrays or objects deeper than {max_depth} levels") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{what} is not valid JSON: {exc}") from exc
    check_json(doc, what, max_depth)
    return doc


def check_text(value: Any, field: str, *, limit: int = _MAX_TEXT, empty: bool = False) -> str:
    """``value`` if it is a string of at most ``limit`` characters without control characters (and not empty)."""
    if not isinstance(value, str) or len(value) > limit or _CONTROL.search(value) or not (value or empty):
        raise BundleError(f"manifest field {field} must be text of {0 if empty else 1}-{limit} characters without "
                          f"control characters, got {shown(value)}")
    return value


def _matching(value: Any, pattern: re.Pattern[str], field: str, expected: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise BundleError(f"manifest field {field} {shown(value)} is invalid: expected {expected}")
    return value


def _integer(value: Any, field: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BundleError(f"manifest field {field} must be an integer from {low} to {high}, got {shown(value)}")
    return value


def check_object(value: Any, field: str, depth: int, *, optional: bool = False) -> dict[str, Any] | None:
    """A free-form JSON object one level below the manifest's root: plain JSON values, finite numbers,
    the whole manifest nesting at most ``depth`` levels. None when ``optional`` and ``value`` is None."""
    if value is None and optional:
        return None
    if not isinstance(value, Mapping):
        raise BundleError(f"manifest field {field} must be a JSON object{' or null' if optional else ''}, got "
                          f"{shown(value)}")
    check_json(value, f"manifest field {field}", depth, level=1)
    return dict(value)


def check_runtime(value: Any, depth: int) -> dict[str, Any]:
    """The ``runtime`` block: name an id, min_version a version, precision an id, build an object or null."""
    runtime = check_object(value, "runtime", depth) or {}
    _matching(runtime.get("name"), _ID, "runtime.name", "a runtime id such as onnxruntime")
    for key, pattern, expected in (("min_version", _VERSION_TEXT, "a version such as 1.17"),
                                   ("precision", _ID, "fp32, fp16 or int8")):
        if runtime.get(key) is not None:
            _matching(runtime[key], pattern, f"runtime.{key}", expected)
    if runtime.get("build") is not None and not isinstance(runtime["build"], Mapping):
        raise BundleError(f"manifest field runtime.build must be a JSON object or null, got "
                          f"{shown(runtime['build'])}")
    return runtime


def check_reference(value: Any, field: str, files: Mapping[str, Any], depth: int, *,
                    optional: bool = False) -> dict[str, Any] | None:
    """A block naming one member (``model``, ``golden``, ``refstats``): its ``file`` must be in ``files``."""
    ref = check_object(value, field, depth, optional=optional)
    if ref is None:
        return None
    if not isinstance(ref.get("file"), str) or ref["file"] not in files:
        raise BundleError(f"manifest refers to {shown(ref.get('file'))}, which it does not list")
    if field == "model":
        _matching(ref.get("format"), _ID, "model.format", "a model format such as onnx or tflite")
    return ref


def check_golden(value: Any, files: Mapping[str, Any], depth: int) -> dict[str, Any] | None:
    """The ``golden`` block (or None): its file listed, count an integer, atol/rtol finite and >= 0, top1 a
    bool or an agreement in [0, 1]; the same for each entry of ``outputs`` (output name -> its own tolerances),
    when present."""
    golden = check_reference(value, "golden", files, depth, optional=True)
    if golden is None:
        return None
    if "count" in golden:
        _integer(golden["count"], "golden.count", 0, _MAX_COUNT)
    _check_tolerances(golden, "golden")
    outputs = golden.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, Mapping) or len(outputs) > _MAX_TENSORS:
            raise BundleError(f"manifest field golden.outputs must be an object of at most {_MAX_TENSORS} outputs, "
                              f"got {shown(outputs)}")
        for name, spec in outputs.items():
            if not isinstance(spec, Mapping):
                raise BundleError(f"manifest field golden.outputs[{shown(name)}] must be an object, got {shown(spec)}")
            _check_tolerances(spec, f"golden.outputs[{shown(name)}]")
    return golden


def _check_tolerances(block: Mapping[str, Any], field: str) -> None:
    for key in ("atol", "rtol"):
        tol = block.get(key, 0)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
            raise BundleError(f"manifest field {field}.{key} must be a finite number >= 0, got {shown(tol)}")
    top1 = block.get("top1", False)
    if not isinstance(top1, bool) and not (isinstance(top1, (int, float)) and 0 <= top1 <= 1):
        raise BundleError(f"manifest field {field}.top1 must be true, false or an agreement from 0 to 1, got "
                          f"{shown(top1)}")


def check_tensor_list(value: Any, field: str) -> list[Any]:
    """``inputs`` or ``outputs``: a list of at most 1024 tensor specs (each checked by :func:`check_tensor`)."""
    if not isinstance(value, (list, tuple)) or len(value) > _MAX_TENSORS:
        raise BundleError(f"manifest field {field} must be a list of at most {_MAX_TENSORS} tensor specs")
    return list(value)


def check_tensor(data: Any) -> tuple[str, tuple[int | str, ...], str]:
    """One tensor spec as ``(name, shape, dtype)``: a bounded name, at most 32 dims, each an integer from -1
    to 2**31 - 1 or a symbolic name, and a dtype id."""
    if not isinstance(data, Mapping) or not isinstance(data.get("shape"), (list, tuple)):
        raise BundleError(f"malformed tensor spec in manifest: {shown(data)}")
    name = check_text(data.get("name"), "a tensor's name")
    if len(data["shape"]) > _MAX_RANK:
        raise BundleError(f"tensor {name!r} has {len(data['shape'])} dimensions; at most {_MAX_RANK} are allowed")
    shape = tuple(check_text(d, f"tensor {name!r}'s symbolic dimension") if isinstance(d, str)
                  else _integer(d, f"tensor {name!r}'s dimension", -1, _MAX_DIM) for d in data["shape"])
    return name, shape, _matching(data.get("dtype"), _ID, f"tensor {name!r}'s dtype", "a numpy dtype such as float32")


def check_labels(value: Any) -> list[str] | None:
    """``labels``: None, or a list of at most 100,000 texts."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > _MAX_LABELS:
        raise BundleError(f"manifest field labels must be a list of at most {_MAX_LABELS} labels or null")
    try:  # the common case, checked at C speed (join refuses anything but strings)
        if not _CONTROL.search("".join(value)) and (not value or max(map(len, value)) <= _MAX_TEXT):
            return list(value)
    except TypeError:
        pass
    return [check_text(label, "labels[]", empty=True) for label in value]  # finds the label to name


def check_files(value: Any, limits: BundleLimits) -> dict[str, tuple[str, int]]:
    """The ``files`` block as ``{path: (sha256, size)}``: at most ``max_members`` normalised paths, each and all
    within the size limits."""
    if not isinstance(value, Mapping):
        raise BundleError(f"manifest field files must be a JSON object, got {shown(value)}")
    if len(value) > limits.max_members:
        raise BundleError(f"the manifest lists {len(value)} files; a reader accepts at most {limits.max_members} "
                          "(BundleLimits.max_members)")
    files: dict[str, tuple[str, int]] = {}
    for name, entry in value.items():
        if check_member_name(name) == MANIFEST_NAME:
            raise BundleError(f"the manifest lists {MANIFEST_NAME} among its own files")
        if not isinstance(entry, Mapping):
            raise BundleError(f"manifest field files[{name!r}] must be an object with sha256 and size")
        sha = _matching(entry.get("sha256"), _SHA256, f"files[{name!r}].sha256", "64 lowercase hex digits")
        size = _integer(entry.get("size"), f"files[{name!r}].size", 0, 2**63 - 1)
        if size > limits.max_member_bytes:
            raise BundleError(f"member {name!r} is {size} bytes unpacked; a reader accepts at most "
                              f"{limits.max_member_bytes} per member (BundleLimits.max_member_bytes)")
        files[name] = (sha, size)
    total = sum(size for _, size in files.values())
    if total > limits.max_total_bytes:
        raise BundleError(f"the bundle's members add up to {total} bytes unpacked; a reader accepts at most "
                          f"{limits.max_total_bytes} (BundleLimits.max_total_bytes)")
    _check_tree(files)
    return files


def _check_tree(names: Mapping[str, Any]) -> None:
    """Refuse members that are one file where case is ignored, or a file that is also another's folder."""
    folded: dict[str, str] = {}
    for name in names:
        other = folded.setdefault(name.casefold(), name)
        if other != name:
            raise BundleError(f"members {other!r} and {name!r} differ only in case; on many filesystems they "
                              "are one file")
    for name in names:
        parts = name.casefold().split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in folded:
                raise BundleError(f"member {folded['/'.join(parts[:i])]!r} is a file, but {name!r} is inside it")


def check_member_name(name: Any) -> str:
    """``name`` if it is a relative, normalised member path (no ``..``, ``.`` or empty parts, no backslash,
    drive or control character, at most 1024 characters and 255 per part)."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"bundle member {shown(name)} is not a path")
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or ".." in parts or re.match(r"[A-Za-z]:", name):
        raise BundleError(f"bundle member {shown(name)} has an absolute or parent-relative path")
    if len(name) > _MAX_PATH or _CONTROL.search(name) or any(p in ("", ".") or len(p) > _MAX_PART for p in parts):
        raise BundleError(f"bundle member {shown(name)} is not a normalised relative path: no empty or '.' "
                          f"parts, no control characters, at most {_MAX_PATH} characters and {_MAX_PART} per part")
    return name


def check_json(doc: Any, what: str, max_depth: int, *, level: int = 0) -> None:
    """Raise BundleError unless ``doc`` is plain JSON (finite numbers) nesting at most ``max_depth`` containers.

    Iterative, so that a hostile depth cannot exhaust the stack; every node is visited once, leaves by type
    alone (the common case: a manifest's labels and metrics cost microseconds). ``level``: how many
    containers hold ``doc`` (1 for a field of the manifest), counted towards ``max_depth``.
    """
    stack = [(doc, level)]
    while stack:
        node, depth = stack.pop()
        kind = type(node)
        if kind is dict or kind is list:
            is_object = kind is dict
        elif kind in _LEAVES or (kind is float and math.isfinite(node)):
            continue
        elif isinstance(node, (Mapping, list, tuple)):  # built in memory rather than by json
            is_object = isinstance(node, Mapping)
        else:
            raise BundleError(f"{what} holds {shown(node)}, which is not a finite JSON value")
        if depth >= max_depth:
            raise BundleError(f"{what} nests arrays or objects deeper than {max_depth} levels")
        if is_object and not all(type(k) is str for k in node):
            raise BundleError(f"{what} has an object key that is not a string")
        children = node.values() if is_object else node
        stack.extend((child, depth + 1) for child in children if type(child) not in _LEAVES)


_LEAVES = frozenset({str, int, bool, type(None)})
