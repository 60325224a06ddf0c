"""Writing a bundle (edgeml.bundle_writer): reproducible archives, members stored or deflated by what deflate
saves, unsafe member names refused, and nothing left behind when the destination cannot be written."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from edgeml.bundle import Bundle
from edgeml.bundle_writer import write_bundle
from edgeml.errors import BundleError, StorageError
from tests.core.test_bundle import _manifest, _sources


def test_rewriting_a_bundle_is_reproducible(tmp_path: Path) -> None:
    dest = tmp_path / "digits-1.2.0-onnx-int8.edgeml"
    written = write_bundle(dest, _manifest(), _sources(tmp_path))
    again = tmp_path / "again.edgeml"
    write_bundle(again, written, _sources(tmp_path))
    assert again.read_bytes() == dest.read_bytes()


def test_members_that_do_not_compress_are_stored(tmp_path: Path) -> None:
    """Random bytes (like float weights, nearly) are stored, so devices do not inflate them on every update;
    a member that deflates well is deflated. Both read back and extract identically."""
    noise = os.urandom(700_000)
    src = _sources(tmp_path)
    src["model.onnx"].write_bytes(noise)
    (tmp_path / "src" / "labels.txt").write_bytes(b"zero\none\n" * 5000)
    src["labels.txt"] = tmp_path / "src" / "labels.txt"
    dest = tmp_path / "mixed.edgeml"
    write_bundle(dest, _manifest(), src)
    with zipfile.ZipFile(dest) as zf:
        kinds = {i.filename: i.compress_type for i in zf.infolist()}
    assert kinds["model.onnx"] == zipfile.ZIP_STORED
    assert kinds["labels.txt"] == kinds["manifest.json"] == zipfile.ZIP_DEFLATED
    with Bundle(dest) as bundle:
        out = bundle.extract(tmp_path / "out")
    assert (out / "model.onnx").read_bytes() == noise
    assert (out / "labels.txt").read_bytes() == b"zero\none\n" * 5000


def test_write_bundle_refuses_an_unsafe_member_name(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="parent-relative"):
        write_bundle(tmp_path / "b.edgeml", _manifest(), {**_sources(tmp_path), "../model.onnx": tmp_path / "src"
                                                                                                 / "model.onnx"})
    assert not (tmp_path / "b.edgeml").exists()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("parent is a file", "Not a directory"),
        ("parent is missing", "No such file or directory"),
        ("destination is a directory", "Is a directory"),
    ],
)
def test_unwritable_destination_raises_storage_error_and_leaves_nothing(layout: str, message: str,
                                                                        tmp_path: Path) -> None:
    # Tests may run as root, where a read-only directory is still writable: use paths that no one can write.
    sources = _sources(tmp_path)
    (tmp_path / "afile").write_bytes(b"x")
    (tmp_path / "adir.edgeml").mkdir()
    dest = {"parent is a file": tmp_path / "afile" / "b.edgeml",
            "parent is missing": tmp_path / "missing" / "b.edgeml",
            "destination is a directory": tmp_path / "adir.edgeml"}[layout]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(StorageError, match=f"cannot write {dest}: {message}"):
        write_bundle(dest, _manifest(), sources)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no temp file left anywhere
