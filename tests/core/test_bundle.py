"""The bundle format: manifest round trip, reading and verification, every kind of malformed or unsafe archive."""

from __future__ import annotations

import hashlib
import json
import stat
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeml.bundle import SCHEMA, Bundle, FileEntry, Manifest, TensorSpec
from edgeml.bundle_writer import write_bundle
from edgeml.errors import BundleError, BundleIntegrityError
from tests.conftest import RunCli

MODEL_BYTES = bytes(range(256)) * 40
GOLDEN_BYTES = b"golden vectors"


def _manifest(**changes: Any) -> Manifest:
    fields: dict[str, Any] = {
        "name": "digits", "version": "1.2.0-rc.1+build.7", "target": "onnx-int8",
        "runtime": {"name": "onnxruntime", "min_version": "1.17", "precision": "int8", "build": None},
        "model": {"file": "model.onnx", "format": "onnx"},
        "inputs": (TensorSpec("input", ("batch", 1, 8, 8), "float32"),),
        "outputs": (TensorSpec("output", ("batch", 10), "float32"),),
        "preprocessing": {"kind": "image", "size": [8, 8], "layout": "NCHW"},
        "labels": [str(i) for i in range(10)],
        "metrics": {"gate": {"accuracy": 0.97, "reference_accuracy": 0.975}, "size_bytes": len(MODEL_BYTES)},
        "gate": {"status": "passed", "metric": "accuracy", "drop": 0.5, "budget": 1.0},
        "golden": {"file": "golden.npz", "count": 4, "atol": 0.05, "rtol": 0.0, "top1": True},
        "provenance": {"source": "digits.onnx", "source_sha256": "ab" * 32, "tools": {"onnx": "1.17"}},
        "created": "2025-01-01T00:00:00+00:00",
    }
    fields.update(changes)
    return Manifest(**fields)


def _sources(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "model.onnx").write_bytes(MODEL_BYTES)
    (src / "golden.npz").write_bytes(GOLDEN_BYTES)
    return {"model.onnx": src / "model.onnx", "golden.npz": src / "golden.npz"}


@pytest.fixture
def good(tmp_path: Path) -> tuple[Path, Manifest]:
    dest = tmp_path / "digits-1.2.0-onnx-int8.edgeml"
    return dest, write_bundle(dest, _manifest(), _sources(tmp_path))


def _entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _good_doc() -> dict[str, Any]:
    doc = _manifest().to_dict()
    doc["files"] = {"model.onnx": _entry(MODEL_BYTES), "golden.npz": _entry(GOLDEN_BYTES)}
    return doc


def _zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate member on purpose
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def _archive(doc: dict[str, Any] | None = None, extra: tuple[tuple[str | zipfile.ZipInfo, bytes], ...] = (),
             members: tuple[str, ...] = ("model.onnx", "golden.npz")) -> list[tuple[str | zipfile.ZipInfo, bytes]]:
    content = {"model.onnx": MODEL_BYTES, "golden.npz": GOLDEN_BYTES}
    out: list[tuple[str | zipfile.ZipInfo, bytes]] = []
    if doc is not None:
        out.append(("manifest.json", json.dumps(doc).encode()))
    return out + [(m, content[m]) for m in members] + list(extra)


def _with(**changes: Any) -> dict[str, Any]:
    return {**_good_doc(), **changes}


def _symlink() -> list[tuple[str | zipfile.ZipInfo, bytes]]:
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    doc = _good_doc()
    doc["files"]["link"] = _entry(b"/etc/passwd")
    return _archive(doc, ((info, b"/etc/passwd"),))


def test_manifest_round_trips_through_dict_and_json() -> None:
    manifest = _manifest(files={"model.onnx": FileEntry("00" * 32, 3), "golden.npz": FileEntry("11" * 32, 4)})
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest
    assert manifest.to_json() == Manifest.from_dict(json.loads(manifest.to_json())).to_json()
    assert manifest.filename == "digits-1.2.0-rc.1+build.7-onnx-int8.edgeml"


def test_written_bundle_reads_back_identically_and_verifies(good: tuple[Path, Manifest], tmp_path: Path) -> None:
    dest, written = good
    assert written.files == {"model.onnx": FileEntry(hashlib.sha256(MODEL_BYTES).hexdigest(), len(MODEL_BYTES)),
                             "golden.npz": FileEntry(hashlib.sha256(GOLDEN_BYTES).hexdigest(), len(GOLDEN_BYTES))}
    with Bundle(dest) as bundle:
        assert bundle.manifest == written
        assert bundle.verify() == written.files
        assert bundle.read("model.onnx") == MODEL_BYTES
        out = bundle.extract(tmp_path / "out")
    assert (out / "model.onnx").read_bytes() == MODEL_BYTES
    assert (out / "golden.npz").read_bytes() == GOLDEN_BYTES
    assert Manifest.from_dict(json.loads((out / "manifest.json").read_bytes())) == written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def _tamper(src: Path, dest: Path, member: str, change: Callable[[bytes], bytes]) -> Path:
    """Copy the archive, altering one member's bytes and keeping the manifest as it was."""
    with zipfile.ZipFile(src) as zin:
        members = [(i.filename, zin.read(i)) for i in zin.infolist()]
    return _zip(dest, [(n, change(d) if n == member else d) for n, d in members])


def _flip_first_byte(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]


def test_same_size_tampering_is_caught_on_verify_read_and_extract(good: tuple[Path, Manifest],
                                                                  tmp_path: Path) -> None:
    bad = _tamper(good[0], tmp_path / "bad.edgeml", "model.onnx", _flip_first_byte)
    with Bundle(bad) as bundle:  # sizes match, so it opens
        with pytest.raises(BundleIntegrityError, match=r"model\.onnx does not match its sha256"):
            bundle.verify()
        with pytest.raises(BundleIntegrityError, match="sha256"):
            bundle.read("model.onnx")
        assert bundle.read("golden.npz") == GOLDEN_BYTES
        with pytest.raises(BundleIntegrityError):
            bundle.extract(tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()  # the partial output is removed
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_size_tampering_is_caught_on_open(good: tuple[Path, Manifest], tmp_path: Path) -> None:
    bad = _tamper(good[0], tmp_path / "bad.edgeml", "golden.npz", lambda d: d + b"!")
    with pytest.raises(BundleIntegrityError, match=f"golden.npz is {len(GOLDEN_BYTES) + 1} bytes, the manifest "
                                                   f"says {len(GOLDEN_BYTES)}"):
        Bundle(bad)


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in _good_doc().items() if k != key}


def _plus(name: str, data: bytes = b"x") -> list[tuple[str | zipfile.ZipInfo, bytes]]:
    """The good archive with one more member."""
    return _archive(_good_doc(), ((name, data),))


MALFORMED = [
    pytest.param(_plus("../evil"), r"'\.\./evil' has an absolute or parent-relative path", id="parent-path"),
    pytest.param(_plus("a/../../evil"), "parent-relative", id="nested-parent-path"),
    pytest.param(_plus("/etc/evil"), "'/etc/evil' has an absolute", id="absolute-path"),
    pytest.param(_plus("C:/evil"), "'C:/evil' has an absolute", id="windows-drive"),
    pytest.param(_symlink(), "'link' is a link; bundles hold plain files only", id="symlink"),
    pytest.param(_plus("extra.bin"), "'extra.bin' is not listed in the manifest", id="unlisted-member"),
    pytest.param(_archive(None), "has no manifest.json at its root", id="missing-manifest"),
    pytest.param(_plus("model.onnx", MODEL_BYTES), "'model.onnx' appears twice", id="duplicated-member"),
    pytest.param(_archive(_good_doc(), members=("model.onnx",)), "listed files are missing: golden.npz",
                 id="listed-file-missing"),
    pytest.param(_archive(_with(schema="edgeml.bundle/99")), "unsupported bundle schema 'edgeml.bundle/99'",
                 id="bad-schema"),
    pytest.param(_archive(_without("schema")), "unsupported bundle schema None", id="no-schema"),
    pytest.param(_archive(_with(version="1.2")), "version '1.2' is not a semantic version", id="invalid-semver"),
    pytest.param(_archive(_with(version="01.2.0")), "not a semantic version", id="semver-leading-zero"),
    pytest.param(_archive(_with(name="Digits Model")), "model name 'Digits Model' is invalid", id="invalid-name"),
    pytest.param(_archive(_without("runtime")), "missing or has a malformed field", id="missing-field"),
    pytest.param(_archive(_with(inputs=[{"name": "x"}])), "malformed tensor spec", id="malformed-tensor"),
    pytest.param(_archive(_with(model={"file": "other.onnx", "format": "onnx"})),
                 "refers to 'other.onnx', which it does not list", id="model-not-listed"),
    pytest.param([("manifest.json", b"[1, 2]")], "manifest.json is not a JSON object", id="manifest-not-object"),
    pytest.param([("manifest.json", b"{not json")], "manifest.json is not valid JSON", id="manifest-not-json"),
]


@pytest.mark.parametrize(("members", "message"), MALFORMED)
def test_malformed_or_unsafe_archives_are_refused(members: list[tuple[str | zipfile.ZipInfo, bytes]], message: str,
                                                  tmp_path: Path) -> None:
    path = _zip(tmp_path / "bad.edgeml", members)
    with pytest.raises(BundleError, match=message):
        Bundle(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"just some text, not a zip", "not a valid zip archive"), (b"", "not a valid zip archive"),
     (b"PK\x03\x04 truncated local header", "not a valid zip archive")],
    ids=["text", "empty", "truncated-zip"],
)
def test_non_zip_files_are_refused(content: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / "x.edgeml"
    path.write_bytes(content)
    with pytest.raises(BundleError, match=message):
        Bundle(path)


def test_missing_bundle_is_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle"):
        Bundle(tmp_path / "absent.edgeml")


def test_cli_verify_and_inspect_a_good_bundle(good: tuple[Path, Manifest], run_cli: RunCli) -> None:
    dest, written = good
    code, out, err = run_cli("verify", dest)
    assert (code, err) == (0, "")
    assert out.strip() == f"ok: {dest} (2 files verified)"

    code, out, err = run_cli("inspect", dest)
    assert code == 0, err
    assert out.splitlines()[0] == f"digits 1.2.0-rc.1+build.7  target onnx-int8  ({SCHEMA})"
    assert "precision int8" in out and "gate        passed (accuracy: 0.5, budget 1.0)" in out

    code, out, err = run_cli("inspect", "--json", dest)
    assert code == 0, err
    assert Manifest.from_dict(json.loads(out)) == written


@pytest.mark.parametrize("command", ["verify", "inspect"])
@pytest.mark.parametrize(
    ("change", "message"),
    [(_flip_first_byte, "model.onnx does not match its sha256"), (lambda d: d[:-1], "model.onnx is 10239 bytes")],
    ids=["same size", "shorter"],
)
def test_cli_refuses_a_tampered_bundle_in_one_line(good: tuple[Path, Manifest], run_cli: RunCli, tmp_path: Path,
                                                   command: str, change: Callable[[bytes], bytes],
                                                   message: str) -> None:
    bad = _tamper(good[0], tmp_path / "bad.edgeml", "model.onnx", change)
    code, out, err = run_cli(command, bad)
    assert code != 0
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
