"""The registry side: init, publish, what a stock TUF client sees, and refusals that change nothing."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater

from edgeml.errors import BundleError, BundleIntegrityError, MetadataError, RegistryError, TargetExistsError
from edgeml.fleet.registry.repository import Registry, init_registry
from tests.conftest import RunCli
from tests.fleet.conftest import MakeBundle, tree_hash


def test_init_lays_out_a_consistent_snapshot_repository(tmp_path: Path) -> None:
    reg = init_registry(tmp_path / "reg", root_keys=3, root_threshold=2)
    meta = reg.metadata_dir
    assert sorted(p.name for p in meta.iterdir()) == [
        "1.root.json", "1.snapshot.json", "1.targets.json", "root.json", "snapshot.json", "targets.json",
        "timestamp.json"]
    root = Metadata.from_file(str(meta / "root.json")).signed
    assert root.consistent_snapshot is True
    assert (root.roles["root"].threshold, len(root.roles["root"].keyids)) == (2, 3)
    assert sorted(p.name for p in (reg.dir / "offline-keys").iterdir()) == [
        "README.txt", "root-1.pem", "root-2.pem", "root-3.pem"]
    assert "DO NOT BELONG ON THE SERVER" in (reg.dir / "offline-keys" / "README.txt").read_text()
    assert sorted(p.name for p in (reg.dir / "keys").iterdir()) == ["snapshot.pem", "targets.pem", "timestamp.pem"]
    assert (reg.dir / "keys" / "targets.pem").stat().st_mode & 0o077 == 0
    assert reg.database().versions() == []


def test_publish_then_a_stock_ngclient_downloads_the_target(registry: Registry, served: str,
                                                            make_bundle: MakeBundle, tmp_path: Path) -> None:
    bundle = make_bundle("1.0.0")
    first = registry.publish(bundle)
    second = registry.publish(make_bundle("1.1.0", payload=b"v2"))
    assert (first.targets_version, second.targets_version) == (2, 3)
    assert (registry.metadata_dir / "3.targets.json").exists() and (registry.metadata_dir / "3.snapshot.json").exists()
    stored = registry.targets_dir / "digits" / "1.0.0" / f"{first.sha256}.onnx-fp32.edgeml"
    assert stored.read_bytes() == bundle.read_bytes()
    updater = Updater(str(tmp_path / "client"), f"{served}/metadata/", str(tmp_path / "dl"),
                      f"{served}/targets/", bootstrap=(registry.metadata_dir / "1.root.json").read_bytes())
    updater.refresh()
    info = updater.get_targetinfo("digits/1.0.0/onnx-fp32.edgeml")
    assert info is not None and info.custom == {
        "name": "digits", "version": "1.0.0", "target": "onnx-fp32",
        "runtime": {"name": "onnxruntime", "min_version": "1.17", "precision": "fp32", "build": None}}
    downloaded = updater.download_target(info)
    assert Path(downloaded).read_bytes() == bundle.read_bytes()
    assert [r["version"] for r in registry.database().versions()] == ["1.0.0", "1.1.0"]
    assert registry.database().channels() == {("digits", "stable"): "1.1.0"}


def test_republishing_the_same_file_is_a_no_op_and_a_different_file_is_refused(
        registry: Registry, make_bundle: MakeBundle) -> None:
    bundle = make_bundle("1.0.0")
    registry.publish(bundle)
    before = tree_hash(registry.metadata_dir)
    again = registry.publish(bundle)
    assert not again.changed and tree_hash(registry.metadata_dir) == before
    other = make_bundle("1.0.0", payload=b"a different build")
    with pytest.raises(TargetExistsError, match="already published with a different file"):
        registry.publish(other)
    assert tree_hash(registry.metadata_dir) == before
    assert len(registry.database().versions()) == 1


def _rewrite(src: Path, dest: Path, change: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, change.get(info.filename, zin.read(info)))
    return dest


def _wrong_hash(bundle: Path, tmp: Path) -> Path:
    return _rewrite(bundle, tmp / "bad.edgeml", {"model.onnx": b"MODEL-BYTES"})  # same size, other bytes


def _tampered_manifest(bundle: Path, tmp: Path) -> Path:
    with zipfile.ZipFile(bundle) as z:
        doc = json.loads(z.read("manifest.json"))
    doc["files"]["model.onnx"]["sha256"] = "0" * 64
    return _rewrite(bundle, tmp / "bad.edgeml", {"manifest.json": json.dumps(doc).encode()})


def _not_a_zip(bundle: Path, tmp: Path) -> Path:
    (tmp / "bad.edgeml").write_bytes(b"not a zip")
    return tmp / "bad.edgeml"


@pytest.mark.parametrize(("tamper", "error", "message"), [
    (_wrong_hash, BundleIntegrityError, "does not match its sha256"),
    (_tampered_manifest, BundleIntegrityError, "does not match its sha256"),
    (_not_a_zip, BundleError, "not a valid zip archive"),
])
def test_bad_bundles_are_refused_and_the_registry_is_unchanged(
        registry: Registry, make_bundle: MakeBundle, tmp_path: Path, tamper: object, error: type[Exception],
        message: str) -> None:
    registry.publish(make_bundle("0.9.0", payload=b"old"))
    before = tree_hash(registry.dir / "repository")
    bad = tamper(make_bundle("1.0.0"), tmp_path)  # type: ignore[operator]
    with pytest.raises(error, match=message):
        registry.publish(bad)
    assert tree_hash(registry.dir / "repository") == before
    assert [r["version"] for r in registry.database().versions()] == ["0.9.0"]


def test_a_directory_that_is_not_a_registry_is_named(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="is not an edgeml fleet registry"):
        Registry(tmp_path)


def test_a_missing_key_file_is_named_and_nothing_changes(registry: Registry, make_bundle: MakeBundle) -> None:
    (registry.dir / "keys" / "snapshot.pem").unlink()
    before = tree_hash(registry.dir / "repository")
    with pytest.raises(MetadataError, match=r"keys/snapshot.pem is missing"):
        registry.publish(make_bundle())
    assert tree_hash(registry.dir / "repository") == before
    assert registry.database().versions() == []


def test_init_refuses_a_non_empty_directory_and_a_bad_threshold(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(RegistryError, match="is not empty"):
        init_registry(tmp_path / "full")
    with pytest.raises(MetadataError, match="threshold 3 needs 1 to 2"):
        init_registry(tmp_path / "new", root_keys=2, root_threshold=3)


def test_cli_init_publish_and_refusals_in_one_line(run_cli: RunCli, make_bundle: MakeBundle, tmp_path: Path) -> None:
    code, out, err = run_cli("fleet", "init", tmp_path / "r", "--root-keys", "2", "--root-threshold", "2")
    assert code == 0, err
    assert "OFF THIS SERVER" in err
    code, out, err = run_cli("fleet", "publish", tmp_path / "r", make_bundle(), "--channel", "beta")
    assert code == 0, err
    assert "published: digits/1.0.0/onnx-fp32.edgeml" in out and "targets v2" in out
    code, out, err = run_cli("fleet", "publish", tmp_path, make_bundle())
    assert code == 2 and err.startswith("error: ") and "not an edgeml fleet registry" in err
    assert "Traceback" not in err
