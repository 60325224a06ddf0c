"""The device side over real HTTP: verified downloads, each TUF attack refused with its own kind and
nothing left behind, and root key rotation followed by a device that trusts only the old root."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from edgeml.edge_agent.tuf_client import TufClient
from edgeml.errors import UpdateVerificationError
from edgeml.fleet.registry.keys import load_signer
from edgeml.fleet.registry.repository import Registry
from tests.conftest import RunCli
from tests.fleet.conftest import MakeBundle

ClientFactory = Callable[[], TufClient]


@pytest.fixture
def client(registry: Registry, served: str, tmp_path: Path) -> ClientFactory:
    """A new device client (same metadata and download dirs each time), trusting root v1."""
    root = (registry.metadata_dir / "1.root.json").read_bytes()
    return lambda: TufClient(root, tmp_path / "device" / "metadata", tmp_path / "device" / "bundles",
                             f"{served}/metadata/", f"{served}/targets/")


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")} if directory.exists() else set()


def test_client_downloads_and_checks_the_manifest(registry: Registry, client: ClientFactory,
                                                  make_bundle: MakeBundle) -> None:
    bundle = make_bundle("1.0.0")
    published = registry.publish(bundle)
    got = client().fetch("digits", "1.0.0", "onnx-fp32")
    assert got.path.read_bytes() == bundle.read_bytes()
    assert (got.name, got.version, got.target, got.sha256) == ("digits", "1.0.0", "onnx-fp32", published.sha256)
    assert _files(got.path.parent) == {"digits-1.0.0-onnx-fp32.edgeml"}


def test_an_unlisted_target_is_not_found(registry: Registry, client: ClientFactory) -> None:
    with pytest.raises(UpdateVerificationError) as info:
        client().fetch("digits", "9.9.9", "onnx-fp32")
    assert info.value.kind == "not-found"


def _write(md: Metadata, path: Path) -> None:
    path.write_bytes(md.to_bytes(JSONSerializer(compact=False)))


def _rollback(registry: Registry, publish: Callable[[str], None], fetch: Callable[[str], object]) -> None:
    publish("1.0.0")
    old = (registry.metadata_dir / "timestamp.json").read_bytes()
    publish("1.1.0")
    fetch("1.1.0")  # the device has now seen timestamp v3
    (registry.metadata_dir / "timestamp.json").write_bytes(old)


def _freeze(registry: Registry, publish: Callable[[str], None], fetch: Callable[[str], object]) -> None:
    publish("1.1.0")
    registry.refresh_timestamp(timedelta(seconds=-60))  # a correctly signed but expired timestamp


def _mix_and_match(registry: Registry, publish: Callable[[str], None], fetch: Callable[[str], object]) -> None:
    publish("1.0.0")
    publish("1.1.0")  # snapshot v3 lists targets v3; serve targets v2's content under that name
    (registry.metadata_dir / "3.targets.json").write_bytes((registry.metadata_dir / "2.targets.json").read_bytes())


def _stored(registry: Registry) -> Path:
    return next(p for p in registry.targets_dir.rglob("*.edgeml") if "/1.1.0/" in str(p))


def _arbitrary_file(registry: Registry, publish: Callable[[str], None], fetch: Callable[[str], object]) -> None:
    publish("1.1.0")
    data = bytearray(_stored(registry).read_bytes())
    data[-30] ^= 0xFF
    _stored(registry).write_bytes(bytes(data))


def _endless_data(registry: Registry, publish: Callable[[str], None], fetch: Callable[[str], object]) -> None:
    publish("1.1.0")
    with _stored(registry).open("ab") as fh:
        fh.write(b"\0" * 1_000_000)


def _unknown_key(registry: Registry, publish: Callable[[str], None], fetch: Callable[[str], object]) -> None:
    publish("1.1.0")
    md = Metadata.from_file(str(registry.metadata_dir / "timestamp.json"))
    md.signed.version += 1
    md.sign(CryptoSigner.generate_ed25519())  # replaces the real signature
    _write(md, registry.metadata_dir / "timestamp.json")


def _below_threshold(registry: Registry, publish: Callable[[str], None], fetch: Callable[[str], object]) -> None:
    md = Metadata.from_file(str(registry.metadata_dir / "root.json"))
    md.signed.version += 1
    md.sign(load_signer(registry.dir / "offline-keys" / "root-1.pem"))  # 1 of the 2 required
    _write(md, registry.metadata_dir / "2.root.json")


@pytest.mark.parametrize("registry", [{"root_keys": 2, "root_threshold": 2}], indirect=True)
def test_a_root_signed_below_threshold_is_refused(registry: Registry, client: ClientFactory,
                                                   make_bundle: MakeBundle, tmp_path: Path) -> None:
    registry.publish(make_bundle("1.0.0"))
    _below_threshold(registry, lambda v: None, lambda v: None)
    with pytest.raises(UpdateVerificationError, match="not signed by enough trusted keys") as info:
        client().fetch("digits", "1.0.0", "onnx-fp32")
    assert info.value.kind == "bad-signature"
    assert _files(tmp_path / "device" / "bundles") == set()


@pytest.mark.parametrize(("attack", "kind", "message"), [
    (_rollback, "rollback", "older metadata than this device has already seen"),
    (_freeze, "freeze", "metadata has expired"),
    (_mix_and_match, "mix-and-match", "does not match the version and hash its parent role signed"),
    (_arbitrary_file, "arbitrary-file", "does not match the signed hash"),
    (_endless_data, "endless-data", "more data than the signed length"),
    (_unknown_key, "bad-signature", "not signed by enough trusted keys"),
])
def test_each_attack_is_refused_with_its_kind_and_leaves_nothing(
        tmp_path: Path, make_bundle: MakeBundle, client: ClientFactory, registry: Registry,
        attack: Callable[..., None], kind: str, message: str) -> None:
    downloads = tmp_path / "device" / "bundles"

    def publish(version: str) -> None:
        registry.publish(make_bundle(version, payload=f"model {version}".encode()))

    def fetch(version: str) -> object:
        return client().fetch("digits", version, "onnx-fp32")

    attack(registry, publish, fetch)
    before = _files(downloads)
    with pytest.raises(UpdateVerificationError, match=message) as info:
        fetch("1.1.0" if attack is not _rollback else "1.0.0")
    assert info.value.kind == kind
    assert _files(downloads) == before


def test_root_rotation_is_followed_by_a_device_that_trusts_the_old_root(
        registry: Registry, client: ClientFactory, make_bundle: MakeBundle, run_cli: RunCli) -> None:
    registry.publish(make_bundle("1.0.0", payload=b"one"))
    device = client()
    device.fetch("digits", "1.0.0", "onnx-fp32")
    old_keys = {p.read_bytes() for p in (registry.dir / "offline-keys").glob("root-*.pem")}
    code, out, err = run_cli("fleet", "keys", "rotate", "root", registry.dir, "--new-keys", "2", "--threshold", "2")
    assert code == 0, err
    assert "root v2" in out
    new_keys = {p.read_bytes() for p in (registry.dir / "offline-keys").glob("root-*.pem")}
    assert len(new_keys) == 2 and not new_keys & old_keys
    registry.publish(make_bundle("1.1.0", payload=b"two"))
    assert client().fetch("digits", "1.1.0", "onnx-fp32").version == "1.1.0"
    trusted = Metadata.from_file(str(device.metadata_dir / "root.json")).signed
    assert trusted.version == 2 and trusted.roles["root"].threshold == 2
    # the retired key alone can no longer move root forward
    md = Metadata.from_file(str(registry.metadata_dir / "root.json"))
    md.signed.version += 1
    md.sign(load_signer(next((registry.dir / "offline-keys" / "retired").rglob("root-1.pem"))))
    _write(md, registry.metadata_dir / "3.root.json")
    with pytest.raises(UpdateVerificationError) as info:
        client().fetch("digits", "1.1.0", "onnx-fp32")
    assert info.value.kind == "bad-signature"


def test_signed_fields_that_differ_from_the_manifest_are_refused(registry: Registry, client: ClientFactory,
                                                                  make_bundle: MakeBundle, tmp_path: Path) -> None:
    """Even with the online targets key, relabelling 1.0.0 as 2.0.0 is caught by the manifest check."""
    from tuf.api.metadata import TargetFile

    from edgeml.fleet.registry import tuf_repo
    from edgeml.fleet.registry.repository import _write_roles

    bundle = make_bundle("1.0.0")
    real = registry.publish(bundle)
    roles = registry.load_roles()
    lie = TargetFile.from_data("digits/2.0.0/onnx-fp32.edgeml", bundle.read_bytes(), ["sha256"])
    lie.unrecognized_fields["custom"] = {"name": "digits", "version": "2.0.0", "target": "onnx-fp32"}
    assert tuf_repo.add_target(roles, lie, registry.online_signers())
    stored = registry.targets_dir / "digits" / "2.0.0" / f"{real.sha256}.onnx-fp32.edgeml"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(bundle.read_bytes())
    _write_roles(registry.metadata_dir, roles, ("targets", "snapshot", "timestamp"))
    with pytest.raises(UpdateVerificationError, match="signed version '2.0.0' differs") as info:
        client().fetch("digits", "2.0.0", "onnx-fp32")
    assert info.value.kind == "manifest-mismatch"
    assert _files(tmp_path / "device" / "bundles") == set()


def test_a_bad_trusted_root_is_refused(registry: Registry, served: str, tmp_path: Path) -> None:
    device = TufClient(b"{not json", tmp_path / "m", tmp_path / "d", f"{served}/metadata/", f"{served}/targets/")
    with pytest.raises(UpdateVerificationError) as info:
        device.fetch("digits", "1.0.0", "onnx-fp32")
    assert info.value.kind == "invalid-metadata"


def test_refreshing_the_timestamp_keeps_devices_updating(registry: Registry, client: ClientFactory,
                                                         make_bundle: MakeBundle, run_cli: RunCli) -> None:
    registry.publish(make_bundle("1.0.0"))
    registry.refresh_timestamp(timedelta(seconds=-60))
    with pytest.raises(UpdateVerificationError):
        client().fetch("digits", "1.0.0", "onnx-fp32")
    code, out, err = run_cli("fleet", "timestamp", registry.dir, "--hours", "2")
    assert code == 0, err
    assert "timestamp v4, valid 2 h" in out
    assert client().fetch("digits", "1.0.0", "onnx-fp32").version == "1.0.0"
