"""The registry resolves every path it builds from a bundle inside ``DIR/repository/targets/``, and keeps its
secrets readable by their owner only, whatever the umask."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, TargetFile

from edgeml.errors import BundleError, RegistryError
from edgeml.fleet.audit.log import open_audit, record
from edgeml.fleet.registry import tuf_repo
from edgeml.fleet.registry.keys import generate
from edgeml.fleet.registry.repository import Registry
from tests.conftest import RunCli
from tests.fleet.conftest import MakeBundle, tree_hash

EVIL_TARGET = "../../../../../escaped"  # from repository/targets/digits/1.0.0: out of the registry entirely
SHA = "ab" * 32


def _with_target(bundle: Path, target: str) -> Path:
    """``bundle`` with its manifest's target replaced (the members, and their hashes, unchanged)."""
    dest = bundle.with_name("evil.edgeml")
    with zipfile.ZipFile(bundle) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "manifest.json":
                data = json.dumps({**json.loads(data), "target": target}).encode()
            zout.writestr(info, data)
    return dest


def _state(registry: Registry) -> tuple[str, int, list[int], list[dict[str, object]]]:
    """What a publish changes: the served tree, the signed targets version, the audit log and the versions."""
    log = open_audit(registry.dir)
    try:
        seqs = [e.seq for e in log.entries()]
    finally:
        log.db.close()
    version = Metadata.from_file(str(registry.metadata_dir / "targets.json")).signed.version
    return tree_hash(registry.dir / "repository"), version, seqs, registry.database().versions()


def _escaped(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*escaped*"))


def test_a_parent_path_target_is_refused_at_publish_and_nothing_is_written_or_signed(
        registry: Registry, make_bundle: MakeBundle, tmp_path: Path) -> None:
    registry.publish(make_bundle("0.9.0", payload=b"old"))
    before = _state(registry)
    evil = _with_target(make_bundle("1.0.0"), EVIL_TARGET)
    with pytest.raises(BundleError, match=r"target '\.\./\.\./\.\./\.\./\.\./escaped' is invalid"):
        registry.publish(evil)
    assert _state(registry) == before
    assert _escaped(tmp_path) == []
    assert [p.name for p in registry.dir.iterdir() if p.name.startswith(".edgeml-")] == []  # no scratch left


def test_the_registry_refuses_it_even_when_a_reader_lets_it_through(
        registry: Registry, make_bundle: MakeBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: with the bundle's target check disabled, the registry's own path check refuses."""
    import edgeml.bundle

    registry.publish(make_bundle("0.9.0", payload=b"old"))
    before = _state(registry)
    monkeypatch.setattr(edgeml.bundle, "check_target", lambda target: target)
    evil = _with_target(make_bundle("1.0.0"), EVIL_TARGET)
    with pytest.raises(RegistryError, match=r"refusing target path 'digits/1\.0\.0/\.\./\.\./\.\./\.\./\.\./escaped"
                                            r"\.edgeml': a target path is relative, with no '\.\.'"):
        registry.publish(evil)
    assert _state(registry) == before  # nothing signed, recorded or stored
    assert _escaped(tmp_path) == []


def test_cli_publish_of_the_parent_path_bundle_fails_in_one_line(registry: Registry, make_bundle: MakeBundle,
                                                                 run_cli: RunCli, tmp_path: Path) -> None:
    before = _state(registry)
    code, out, err = run_cli("fleet", "publish", registry.dir, _with_target(make_bundle("1.0.0"), EVIL_TARGET))
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.startswith("error: ") and "target '../../../../../escaped' is invalid" in err.splitlines()[0]
    assert _state(registry) == before and _escaped(tmp_path) == []


def test_a_link_under_targets_that_leads_out_is_refused(registry: Registry, make_bundle: MakeBundle,
                                                        tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (registry.targets_dir / "digits").symlink_to(outside, target_is_directory=True)
    before = _state(registry)
    with pytest.raises(RegistryError, match=f"refusing to write 'digits/1.0.0/[0-9a-f]{{64}}.onnx-fp32.edgeml': it "
                                            f"resolves to {outside}/1.0.0/[0-9a-f]{{64}}.onnx-fp32.edgeml, outside "):
        registry.publish(make_bundle("1.0.0"))
    assert _state(registry) == before
    assert list(outside.rglob("*")) == []


@pytest.mark.parametrize(("path", "sha256", "message"), [
    ("digits/1.0.0/../../../x.edgeml", SHA, "refusing target path 'digits/1.0.0/../../../x.edgeml'"),
    ("/etc/x.edgeml", SHA, "refusing target path '/etc/x.edgeml'"),
    ("digits//x.edgeml", SHA, "refusing target path 'digits//x.edgeml'"),
    ("digits/./x.edgeml", SHA, "refusing target path 'digits/./x.edgeml'"),
    ("digits/1.0.0/", SHA, "refusing target path 'digits/1.0.0/'"),
    ("digits\\..\\..\\x.edgeml", SHA, "refusing target path"),
    ("digits/x\x00.edgeml", SHA, "refusing target path"),
    ("digits/x\n.edgeml", SHA, "refusing target path"),
    ("d/" + "x" * 511, SHA, "at most 512 characters"),
    ("digits/1.0.0/onnx.edgeml", "../" * 21 + "x", "its sha256 '../../"),
    ("digits/1.0.0/onnx.edgeml", SHA.upper(), "is not 64 lowercase hex digits"),
])
def test_target_files_resolve_inside_the_targets_directory(registry: Registry, path: str, sha256: str,
                                                           message: str) -> None:
    with pytest.raises(RegistryError, match=message.replace(".", r"\.").replace("/", "/")):
        registry.target_file(path, sha256)


def test_a_safe_target_file_is_the_resolved_content_addressed_path(registry: Registry) -> None:
    got = registry.target_file("digits/1.0.0/onnx-fp32.edgeml", SHA)
    assert got == registry.targets_dir.resolve() / "digits" / "1.0.0" / f"{SHA}.onnx-fp32.edgeml"


def test_add_target_signs_no_unsafe_path() -> None:
    online = {role: generate() for role in tuf_repo.ONLINE_ROLES}
    roles = tuf_repo.new_repository([generate()], 1, online)
    bad = TargetFile(10, {"sha256": SHA}, "digits/../../x.edgeml")
    with pytest.raises(RegistryError, match="refusing target path 'digits/../../x.edgeml'"):
        tuf_repo.add_target(roles, bad, online)
    assert ({r: roles[r].signed.version for r in tuf_repo.TOP_LEVEL_ROLES}, roles["targets"].signed.targets) == (
        {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 1}, {})


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run with umask 000, so that only the modes edgeml asks for protect a file."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("open_umask")
def test_keys_and_the_audit_files_are_readable_by_their_owner_only(tmp_path: Path, make_bundle: MakeBundle) -> None:
    from edgeml.fleet.registry.repository import init_registry

    reg = init_registry(tmp_path / "reg", root_keys=2, root_threshold=1)
    reg.publish(make_bundle("1.0.0"))
    record(reg.dir, "local:a", "keys.rotate", "root")
    reg.rotate_root(reg.dir / "offline-keys")
    private = {p.relative_to(reg.dir): _mode(p) for p in
               [*(reg.dir / "keys").rglob("*"), *(reg.dir / "offline-keys").rglob("*.pem"),
                *(reg.dir / "offline-keys" / "retired").rglob("*"), *(reg.dir / "audit").rglob("*")]}
    folders = [Path(d) for d in ("keys", "offline-keys", "offline-keys/retired", "offline-keys/retired/root-v1",
                                 "audit")]
    assert {Path(p) for p in private} >= {Path("keys/targets.pem"), Path("keys/snapshot.pem"),
                                          Path("keys/timestamp.pem"), Path("keys/audit.pem"),
                                          Path("offline-keys/root-1.pem"),
                                          Path("offline-keys/retired/root-v1/root-1.pem"),
                                          Path("offline-keys/retired/root-v1/root-2.pem"), Path("audit/heads.log")}
    assert {p: m for p, m in private.items() if m != 0o600 and p not in folders} == {}
    assert {d: _mode(reg.dir / d) for d in folders} == {d: 0o700 for d in folders}
    # what a web server serves stays readable
    assert _mode(reg.dir / "offline-keys" / "README.txt") & 0o004
