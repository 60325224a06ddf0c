"""Bundles validated on read: every manifest field against its pattern, sizes and counts against BundleLimits
before anything is decompressed, JSON nesting bounded, and zip bombs stopped at the declared size."""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest

from edgeml.bundle import DEFAULT_LIMITS, Bundle, BundleLimits, Manifest, load_json
from edgeml.bundle_writer import write_bundle
from edgeml.errors import BundleError, BundleIntegrityError, ConfigError
from tests.core.test_bundle import GOLDEN_BYTES, MODEL_BYTES, _archive, _entry, _good_doc, _manifest, _sources, _zip

GiB = 1024**3


def _with(**changes: Any) -> dict[str, Any]:
    return {**_good_doc(), **changes}


def _nested(key: str, inner: dict[str, Any]) -> dict[str, Any]:
    """The good manifest with ``key`` (a dict field) updated by ``inner``."""
    doc = _good_doc()
    doc[key] = {**(doc.get(key) or {}), **inner}
    return doc


def _files(**extra: Any) -> dict[str, Any]:
    doc = _good_doc()
    doc["files"] = {**doc["files"], **extra}
    return doc


def _tensor(**changes: Any) -> dict[str, Any]:
    return _with(inputs=[{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32", **changes}])


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


BAD_FIELDS = [
    # what the registry and the device build paths from: name, version, target
    pytest.param(_with(target="../../../../tmp/evil"), r"target '\.\./\.\./\.\./\.\./tmp/evil' is invalid",
                 id="target-parent-path"),
    pytest.param(_with(target="onnx/int8"), "target 'onnx/int8' is invalid", id="target-slash"),
    pytest.param(_with(target="onnx\x00"), r"target 'onnx\\x00' is invalid", id="target-nul"),
    pytest.param(_with(target="onnx\n"), r"target 'onnx\\n' is invalid", id="target-trailing-newline"),
    pytest.param(_with(target=""), "target '' is invalid", id="target-empty"),
    pytest.param(_with(target="-onnx"), "target '-onnx' is invalid", id="target-leading-dash"),
    pytest.param(_with(target="ONNX"), "target 'ONNX' is invalid", id="target-uppercase"),
    pytest.param(_with(target="o" * 65), "target 'ooo.*' is invalid", id="target-too-long"),
    pytest.param(_with(target=7), "target 7 is invalid", id="target-not-text"),
    pytest.param(_with(name="../digits"), r"model name '\.\./digits' is invalid", id="name-parent-path"),
    pytest.param(_with(name="digits\n"), r"model name 'digits\\n' is invalid", id="name-trailing-newline"),
    pytest.param(_with(name="d" * 65), "model name 'ddd.*' is invalid", id="name-too-long"),
    pytest.param(_with(version="1.0.0/../../x"), "is not a semantic version", id="version-slash"),
    pytest.param(_with(version="1.0.0\n"), r"version '1\.0\.0\\n' is not a semantic version", id="version-newline"),
    pytest.param(_with(version="1.0.0-" + "a" * 130), "is not a semantic version", id="version-too-long"),
    pytest.param(_with(version=[1, 0, 0]), r"version \[1, 0, 0\] is not a semantic version", id="version-list"),
    pytest.param(_with(created="2025\x1b[31m"), "field created must be text .* without control characters",
                 id="created-control-character"),
    # runtime, model, tensors
    pytest.param(_nested("runtime", {"name": "../onnxruntime"}), r"runtime\.name '\.\./onnxruntime' is invalid",
                 id="runtime-name-path"),
    pytest.param(_nested("runtime", {"precision": "fp32/x"}), r"runtime\.precision 'fp32/x' is invalid",
                 id="runtime-precision"),
    pytest.param(_nested("runtime", {"min_version": "1.17; rm -rf"}), r"runtime\.min_version .* is invalid",
                 id="runtime-min-version"),
    pytest.param(_nested("runtime", {"build": "fast"}), r"runtime\.build must be a JSON object or null",
                 id="runtime-build-not-object"),
    pytest.param(_with(runtime=["onnxruntime"]), "field runtime must be a JSON object", id="runtime-not-object"),
    pytest.param(_nested("model", {"format": "onnx/../x"}), r"model\.format 'onnx/\.\./x' is invalid",
                 id="model-format"),
    pytest.param(_nested("model", {"file": ["model.onnx"]}), r"refers to \['model\.onnx'\], which it does not",
                 id="model-file-not-text"),
    pytest.param(_tensor(shape=[1.5]), "dimension must be an integer from -1 to 2147483647, got 1.5",
                 id="dim-float"),
    pytest.param(_tensor(shape=[-2]), "dimension must be an integer from -1 to 2147483647, got -2", id="dim-negative"),
    pytest.param(_tensor(shape=[2**31]), "got 2147483648", id="dim-too-large"),
    pytest.param(_tensor(shape=[True]), "got True", id="dim-bool"),
    pytest.param(_tensor(shape=[1] * 33), "has 33 dimensions; at most 32", id="rank-too-high"),
    pytest.param(_tensor(shape=["batch\x00"]), "symbolic dimension must be text", id="dim-control-character"),
    pytest.param(_tensor(dtype="float32/../x"), "dtype 'float32/../x' is invalid", id="dtype"),
    pytest.param(_tensor(name="x" * 1025), "a tensor's name must be text of 1-1024 characters", id="tensor-name-long"),
    pytest.param(_with(inputs={"name": "x"}), "inputs must be a list of at most 1024 tensor specs",
                 id="inputs-not-list"),
    pytest.param(_with(labels=["zero", "one\x00"]), r"labels\[\] must be text", id="label-nul"),
    pytest.param(_with(labels="0123456789"), "labels must be a list", id="labels-not-list"),
    pytest.param(_with(preprocessing=["resize"]), "preprocessing must be a JSON object or null",
                 id="preprocessing-not-object"),
    pytest.param(_nested("golden", {"atol": -0.1}), r"golden\.atol must be a finite number >= 0, got -0\.1",
                 id="golden-negative-atol"),
    pytest.param(_nested("golden", {"count": -1}), r"golden\.count must be an integer from 0", id="golden-count"),
    pytest.param(_nested("golden", {"top1": "yes"}), r"golden\.top1 must be true, false or an agreement",
                 id="golden-top1"),
    pytest.param(_nested("golden", {"outputs": {"prob": {"atol": -1e-3}}}),
                 r"golden\.outputs\['prob'\]\.atol must be a finite number >= 0", id="golden-output-atol"),
    pytest.param(_nested("golden", {"outputs": {"prob": 0.1}}), r"golden\.outputs\['prob'\] must be an object",
                 id="golden-output-not-object"),
    pytest.param(_nested("golden", {"outputs": [0.1]}), r"golden\.outputs must be an object", id="golden-outputs-list"),
    pytest.param(_nested("metrics", {"deep": _deep(40)}), "nests arrays or objects deeper than 32 levels",
                 id="metrics-too-deep"),
    # the files block: hashes, sizes and member paths
    pytest.param(_files(**{"model.onnx": {"sha256": "AB" * 32, "size": len(MODEL_BYTES)}}),
                 "sha256 'ABAB.*' is invalid: expected 64 lowercase hex digits", id="sha256-uppercase"),
    pytest.param(_files(**{"model.onnx": {"sha256": "ab", "size": len(MODEL_BYTES)}}), "sha256 'ab' is invalid",
                 id="sha256-short"),
    pytest.param(_files(**{"model.onnx": {**_entry(MODEL_BYTES), "size": -1}}), "size must be an integer from 0",
                 id="size-negative"),
    pytest.param(_files(**{"model.onnx": {**_entry(MODEL_BYTES), "size": "10240"}}), "got '10240'",
                 id="size-text"),
    pytest.param(_files(**{"model.onnx": {**_entry(MODEL_BYTES), "size": True}}), "got True", id="size-bool"),
    pytest.param(_files(**{"./x": _entry(b"x")}), r"'\./x' is not a normalised relative path", id="member-dot"),
    pytest.param(_files(**{"a//x": _entry(b"x")}), "'a//x' is not a normalised relative path", id="member-empty-part"),
    pytest.param(_files(**{"a/": _entry(b"x")}), "'a/' is not a normalised relative path", id="member-trailing-slash"),
    pytest.param(_files(**{"a\x00x": _entry(b"x")}), "is not a normalised relative path", id="member-nul"),
    pytest.param(_files(**{"a\\..\\x": _entry(b"x")}), "has an absolute or parent-relative path",
                 id="member-backslash"),
    pytest.param(_files(**{"a/../../x": _entry(b"x")}), "parent-relative", id="member-parent-in-manifest"),
    pytest.param(_files(**{"x" * 256: _entry(b"x")}), "at most 1024 characters and 255 per part",
                 id="member-part-long"),
    pytest.param(_files(**{"/".join(["x"] * 513): _entry(b"x")}), "is not a normalised", id="member-path-long"),
    pytest.param(_files(**{"manifest.json": _entry(b"{}")}), "lists manifest.json among its own files",
                 id="member-manifest"),
    pytest.param(_files(**{"Model.onnx": _entry(b"x")}), "'model.onnx' and 'Model.onnx' differ only in case",
                 id="member-case-duplicate"),
    pytest.param(_files(**{"model.onnx/weights": _entry(b"x")}),
                 "member 'model.onnx' is a file, but 'model.onnx/weights' is inside it", id="member-file-and-folder"),
    pytest.param(_with(files=["model.onnx"]), "field files must be a JSON object", id="files-not-object"),
]


@pytest.mark.parametrize(("doc", "message"), BAD_FIELDS)
def test_a_manifest_field_off_its_pattern_is_refused_on_open(doc: dict[str, Any], message: str,
                                                             tmp_path: Path) -> None:
    path = _zip(tmp_path / "bad.edgeml", _archive(doc))
    with pytest.raises(BundleError, match=message):
        Bundle(path)
    with pytest.raises(BundleError, match=message):  # and the same rule holds for a manifest built in memory
        Manifest.from_dict(doc)


BAD_JSON = [
    pytest.param(json.dumps(_good_doc()).replace('"name": "digits"', '"name": "digits", "name": "../evil"'),
                 "key 'name' appears twice in one object", id="duplicate-key"),
    pytest.param(json.dumps(_good_doc()).replace('"drop": 0.5', '"drop": NaN'), "NaN is not a number JSON allows",
                 id="nan"),
    pytest.param(json.dumps(_good_doc()).replace('"drop": 0.5', '"drop": -Infinity'), "-Infinity is not a number",
                 id="infinity"),
    pytest.param(json.dumps(_good_doc()).replace('"drop": 0.5', '"drop": 1e999'), "1e999 is out of range",
                 id="overflowing-float"),
    pytest.param("[" * 100_000 + "]" * 100_000, "nests arrays or objects deeper than 32 levels", id="deep-100000"),
    pytest.param(json.dumps({**_good_doc(), "extra": _deep(32)}), "nests arrays or objects deeper than 32 levels",
                 id="deep-33"),
    pytest.param(b"\xff\xfe{}", "is not valid JSON", id="not-utf8"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_JSON)
def test_manifest_json_is_parsed_strictly_and_its_nesting_bounded(raw: str | bytes, message: str,
                                                                 tmp_path: Path) -> None:
    data = raw.encode() if isinstance(raw, str) else raw
    path = _zip(tmp_path / "bad.edgeml", [("manifest.json", data), ("model.onnx", MODEL_BYTES),
                                           ("golden.npz", GOLDEN_BYTES)])
    with pytest.raises(BundleError, match=message):
        Bundle(path)


def test_json_depth_limit_is_exact() -> None:
    assert load_json(json.dumps(_deep(32)).encode(), "x") == _deep(32)
    with pytest.raises(BundleError, match="x nests arrays or objects deeper than 32 levels"):
        load_json(json.dumps(_deep(33)).encode(), "x")
    assert load_json(b'{"a": {"b": 1}}', "x", max_depth=2) == {"a": {"b": 1}}
    with pytest.raises(BundleError, match="deeper than 1 levels"):
        load_json(b'{"a": {"b": 1}}', "x", max_depth=1)


def test_default_limits_fit_real_models() -> None:
    assert (DEFAULT_LIMITS.max_members, DEFAULT_LIMITS.max_member_bytes, DEFAULT_LIMITS.max_total_bytes,
            DEFAULT_LIMITS.max_manifest_bytes, DEFAULT_LIMITS.max_json_depth) == (1024, 4 * GiB, 8 * GiB,
                                                                                 8 * 1024**2, 32)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_limits_must_be_positive_integers(bad: Any) -> None:
    with pytest.raises(ConfigError, match=f"bundle limit max_members must be a positive integer, got {bad!r}"):
        BundleLimits(max_members=bad)


def _sized(count: int = 0, **sizes: int) -> dict[str, Any]:
    """The good manifest plus ``count`` small members, or members of the given (declared) sizes."""
    doc = _good_doc()
    doc["files"].update({f"extra/{i}.bin": _entry(b"x") for i in range(count)})
    doc["files"].update({name: {"sha256": "ab" * 32, "size": size} for name, size in sizes.items()})
    return doc


@pytest.mark.parametrize(("doc", "limits", "message"), [
    pytest.param(_sized(1023), DEFAULT_LIMITS, "the manifest lists 1025 files; a reader accepts at most 1024",
                 id="members-default"),
    pytest.param(_sized(1), BundleLimits(max_members=2), "lists 3 files; a reader accepts at most 2",
                 id="members-configured"),
    pytest.param(_sized(huge=4 * GiB + 1), DEFAULT_LIMITS,
                 "member 'huge' is 4294967297 bytes unpacked; a reader accepts at most 4294967296 per member",
                 id="member-bytes-default"),
    pytest.param(_good_doc(), BundleLimits(max_member_bytes=len(MODEL_BYTES) - 1),
                 f"member 'model.onnx' is {len(MODEL_BYTES)} bytes unpacked", id="member-bytes-configured"),
    pytest.param(_sized(a=3 * GiB, b=3 * GiB, c=3 * GiB), DEFAULT_LIMITS,
                 r"members add up to \d+ bytes unpacked; a reader accepts at most 8589934592",
                 id="total-bytes-default"),
    pytest.param(_good_doc(), BundleLimits(max_total_bytes=len(MODEL_BYTES)),
                 f"members add up to {len(MODEL_BYTES) + len(GOLDEN_BYTES)} bytes", id="total-bytes-configured"),
])
def test_counts_and_declared_sizes_beyond_the_limits_are_refused_before_any_member_is_read(
        doc: dict[str, Any], limits: BundleLimits, message: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = _zip(tmp_path / "big.edgeml", _archive(doc))
    opened: list[str] = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(str(getattr(
        name, "filename", name))) or real_open(self, name, *a, **k))
    with pytest.raises(BundleError, match=message):
        Bundle(path, limits=limits)
    assert opened == ["manifest.json"]  # only the manifest was read


def test_a_bundle_within_configured_limits_opens(tmp_path: Path) -> None:
    path = _zip(tmp_path / "ok.edgeml", _archive(_good_doc()))
    limits = BundleLimits(max_members=2, max_member_bytes=len(MODEL_BYTES),
                          max_total_bytes=len(MODEL_BYTES) + len(GOLDEN_BYTES), max_json_depth=4)
    with Bundle(path, limits=limits) as bundle:
        assert bundle.verify() == bundle.manifest.files


def test_a_large_manifest_is_refused_by_its_declared_size(tmp_path: Path) -> None:
    path = _zip(tmp_path / "b.edgeml", _archive(_good_doc()))
    size = zipfile.ZipFile(path).getinfo("manifest.json").file_size
    with pytest.raises(BundleError, match=f"manifest.json is {size} bytes; a reader accepts at most 100 "):
        Bundle(path, limits=BundleLimits(max_manifest_bytes=100))


def test_too_many_archive_entries_are_refused_before_zipfile_reads_the_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _zip(tmp_path / "many.edgeml", _archive(_good_doc(), extra=tuple((f"junk/{i}", b"") for i in range(50))))

    def no_directory_read(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("zipfile read the central directory")

    monkeypatch.setattr(zipfile, "ZipFile", no_directory_read)
    with pytest.raises(BundleError, match="has 53 archive entries in a [0-9]+-byte directory; a reader accepts at "
                                          "most 10 members and manifest.json"):
        Bundle(path, limits=BundleLimits(max_members=10))


def _patch_sizes(path: Path, member: str, *, compressed: int | None = None, uncompressed: int | None = None,
                 crc: int | None = None) -> None:
    """Rewrite the sizes (and CRC) a zip records for ``member``, in its local header and the central directory."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for sig, at_crc in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
        name_at = 30 if sig == b"PK\x03\x04" else 46
        start = 0
        while (start := data.find(sig, start)) >= 0:
            length = struct.unpack_from("<H", data, start + (26 if sig == b"PK\x03\x04" else 28))[0]
            if data[start + name_at:start + name_at + length] == name:
                for offset, value in ((at_crc, crc), (at_crc + 4, compressed), (at_crc + 8, uncompressed)):
                    if value is not None:
                        struct.pack_into("<I", data, start + offset, value)
            start += 4
    path.write_bytes(bytes(data))


def test_a_member_that_inflates_past_its_declared_size_yields_only_the_declared_bytes(tmp_path: Path) -> None:
    """A zip bomb whose headers understate the size: reading stops at the declared size, so 64 MiB of
    zeros deflated into 64 KiB never become more than the 16 bytes the manifest and the archive declare."""
    bomb, declared = bytes(64 * 1024**2), 16
    doc = _good_doc()
    doc["files"]["model.onnx"] = _entry(bomb[:declared])
    path = tmp_path / "bomb.edgeml"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(doc))
        zf.writestr("model.onnx", bomb)
        zf.writestr("golden.npz", GOLDEN_BYTES)
    _patch_sizes(path, "model.onnx", uncompressed=declared, crc=zlib.crc32(bomb[:declared]))
    assert path.stat().st_size < 1024**2
    with Bundle(path) as bundle:
        assert bundle.read("model.onnx") == bomb[:declared]
        out = bundle.extract(tmp_path / "out")
    assert (out / "model.onnx").stat().st_size == declared


def test_archive_sizes_that_disagree_with_the_manifest_are_refused_on_open(tmp_path: Path) -> None:
    path = _zip(tmp_path / "big.edgeml", _archive(_good_doc()))
    _patch_sizes(path, "model.onnx", uncompressed=2**31)
    with pytest.raises(BundleIntegrityError, match=f"model.onnx is {2**31} bytes, the manifest says 10240"):
        Bundle(path)


def test_a_stored_member_whose_stored_size_differs_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "stored.edgeml", _archive(_good_doc()))
    _patch_sizes(path, "model.onnx", compressed=len(MODEL_BYTES) + 100)
    with pytest.raises(BundleIntegrityError, match="model.onnx is stored uncompressed in 10340 bytes but declares "
                                                   "10240; the archive is damaged"):
        Bundle(path)


def test_compression_other_than_stored_or_deflate_is_refused(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("golden.npz")
    info.compress_type = zipfile.ZIP_BZIP2
    path = _zip(tmp_path / "bz.edgeml", _archive(_good_doc(), members=("model.onnx",), extra=((info, GOLDEN_BYTES),)))
    with pytest.raises(BundleError, match="member 'golden.npz' uses compression method 12; bundles hold stored or "
                                          "deflated members only"):
        Bundle(path)


@pytest.mark.parametrize(("changes", "message"), [
    ({"target": "../../../etc/evil"}, "target '../../../etc/evil' is invalid"),
    ({"runtime": {"name": "onnxruntime", "precision": float("nan")}}, "field runtime holds nan, which is not a finite"),
    ({"metrics": {"accuracy": float("nan")}}, "field metrics holds nan, which is not a finite JSON value"),
    ({"metrics": {"accuracy": float("inf")}}, "holds inf"),
    ({"provenance": {"when": object()}}, "holds <object object"),
    ({"provenance": {"tools": {1: "onnx"}}}, "field provenance has an object key that is not a string"),
])
def test_write_bundle_refuses_what_a_reader_would_refuse_and_writes_nothing(
        changes: dict[str, Any], message: str, tmp_path: Path) -> None:
    dest = tmp_path / "b.edgeml"
    with pytest.raises(BundleError, match=message.replace(".", r"\.")):
        write_bundle(dest, _manifest(**changes), _sources(tmp_path))
    assert not dest.exists()


def test_write_bundle_refuses_files_beyond_its_limits(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="member 'model.onnx' is 10240 bytes unpacked; a reader accepts at most "
                                          "1000 per member"):
        write_bundle(tmp_path / "b.edgeml", _manifest(), _sources(tmp_path), limits=BundleLimits(max_member_bytes=1000))
    assert not (tmp_path / "b.edgeml").exists()
