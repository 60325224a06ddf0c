"""Delta updates: a version's bundle rebuilt on the device from the model it serves and a signed delta.

Real parts throughout: bundles of the trained digits model, a signed registry (python-tuf) served over HTTP, the
agent's TufClient and update machine with real onnxruntime. The format itself (:mod:`edgeml.delta`) is checked on
its own first: byte-exact rebuilds (deflated members included), and every way a delta can be wrong refused with
:class:`~edgeml.delta.DeltaError`. SIGKILL during PATCH is in ``test_update_crash.py``; a rollout offering deltas
to real agents over MQTT is in ``tests/fleet/test_rollouts.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeml.bundle import Manifest, TensorSpec
from edgeml.bundle_writer import write_bundle
from edgeml.delta import (
    DeltaError,
    apply_delta,
    base_of_bundle,
    base_of_slot,
    delta_path,
    make_delta,
    read_header,
)
from edgeml.edge_agent.serving import ModelHost
from edgeml.edge_agent.tuf_client import TufClient
from edgeml.edge_agent.update.health import Thresholds
from edgeml.edge_agent.update.machine import UpdateMachine
from edgeml.edge_agent.update.store import UpdateRecord, UpdateRequest
from edgeml.fleet.registry.deltas import DeltaSettings
from edgeml.fleet.registry.repository import Registry, init_registry
from edgeml.fleet.store import schema
from tests.edge_agent.conftest import BROKEN, GOOD, SOFT, DigitsBundles
from tests.fleet.conftest import serve_repository

QUICK = Thresholds(probation_s=0.02, max_probation_s=0.05)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rebuild(delta: bytes, base_bundle: Path, out: Path) -> bytes:
    header, _ = read_header(delta)
    apply_delta(delta, base_of_bundle(base_bundle)[0], out, expect_sha256=header.result_sha256,
                expect_length=header.result_length)
    return out.read_bytes()


# --- the format ---------------------------------------------------------------------------------------------


def test_a_delta_rebuilds_the_new_bundle_byte_for_byte(digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    old, new = digits_bundles.paths["1.0.0"], digits_bundles.paths[GOOD]
    delta = make_delta(old, new)
    assert _rebuild(delta, old, tmp_path / "out.edgeml") == new.read_bytes()
    assert len(delta) < 0.5 * new.stat().st_size  # the same weights: only the changed graph and golden vectors


def _compressible_bundle(out: Path, version: str, weights: np.ndarray) -> Path:
    """A bundle whose model member deflates well (int8-like weights), so the writer stores it deflated."""
    src = out / f"src-{version}"
    src.mkdir(parents=True)
    (src / "model.onnx").write_bytes(weights.tobytes())
    manifest = Manifest(name="comp", version=version, target="onnx-int8",
                        runtime={"name": "onnxruntime", "min_version": "1.17", "precision": "int8", "build": None},
                        model={"file": "model.onnx", "format": "onnx"},
                        inputs=(TensorSpec("x", ("batch", 4), "float32"),),
                        outputs=(TensorSpec("y", ("batch", 2), "float32"),))
    dest = out / f"comp-{version}.edgeml"
    write_bundle(dest, manifest, {"model.onnx": src / "model.onnx"})
    return dest


def test_deflated_members_are_carried_inflated_and_deflated_again(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = rng.integers(-8, 8, 400_000).astype(np.int8)  # low entropy: deflate saves a lot
    old = _compressible_bundle(tmp_path, "1.0.0", weights)
    tuned = weights.copy()
    tuned[-2_000:] = rng.integers(-8, 8, 2_000)  # a fine-tuned head: the last 0.5% of the weights
    new = _compressible_bundle(tmp_path, "1.1.0", tuned)
    with zipfile.ZipFile(new) as zf:
        assert zf.getinfo("model.onnx").compress_type == zipfile.ZIP_DEFLATED
    delta = make_delta(old, new)
    header, _ = read_header(delta)
    assert header.inflated  # the model member travels inflated
    assert _rebuild(delta, old, tmp_path / "out.edgeml") == new.read_bytes()
    assert len(delta) < 0.1 * new.stat().st_size, (len(delta), new.stat().st_size)


def test_weights_a_fine_tune_moved_travel_as_their_xor_with_the_base(tmp_path: Path) -> None:
    """Every float changed a little (a full fine-tune): the raw bytes match nothing in the base, but their sign
    and exponent bytes are the base's, so the member travels XORed with it and compresses."""
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal(500_000) * 0.05).astype(np.float32)
    old = _compressible_bundle(tmp_path, "1.0.0", weights)
    new = _compressible_bundle(tmp_path, "1.1.0", weights * (1 + 1e-3 * rng.standard_normal(weights.size)
                                                            ).astype(np.float32))
    delta = make_delta(old, new)
    header, _ = read_header(delta)
    assert header.xor  # (the writer may also deflate them: both transforms then apply)
    assert _rebuild(delta, old, tmp_path / "out.edgeml") == new.read_bytes()
    assert len(delta) < 0.75 * new.stat().st_size, (len(delta), new.stat().st_size)


def test_every_wrong_delta_is_refused(digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    old, new, other = (digits_bundles.paths[v] for v in ("1.0.0", GOOD, BROKEN))
    delta = make_delta(old, new)
    header, start = read_header(delta)
    base = base_of_bundle(old)[0]
    good = {"expect_sha256": header.result_sha256, "expect_length": header.result_length}
    out = tmp_path / "out.edgeml"
    with pytest.raises(DeltaError, match="is not the delta's base"):
        apply_delta(delta, base_of_bundle(other)[0], out, **good)
    with pytest.raises(DeltaError, match="is not the delta's base"):
        apply_delta(delta, base[:-1] + bytes([base[-1] ^ 1]), out, **good)
    with pytest.raises(DeltaError, match="rebuilds another bundle"):
        apply_delta(delta, base, out, expect_sha256=_sha(b"x"), expect_length=header.result_length)
    damaged = bytearray(delta)
    damaged[start + len(damaged[start:]) // 2] ^= 0xFF
    with pytest.raises(DeltaError, match="damaged"):
        apply_delta(bytes(damaged), base, out, **good)
    with pytest.raises(DeltaError, match="bad magic"):
        apply_delta(b"PK\x03\x04" + delta[4:], base, out, **good)
    for field, spans in (("inflated", [[10, 2**40, 6]]), ("xor", [[0, 10, 2**40]])):  # past the view or the base
        doc = json.loads(delta[12:start])
        doc["view"][field] = spans
        head = json.dumps(doc).encode()
        with pytest.raises(DeltaError, match="header is damaged"):
            apply_delta(delta[:8] + len(head).to_bytes(4, "big") + head + delta[start:], base, out, **good)
    assert not out.exists()  # nothing is written before the result is the signed bundle


def test_the_base_of_a_staged_slot_is_the_base_of_its_bundle(digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    from edgeml.edge_agent.update.slots import Slots

    slots = Slots(tmp_path)
    slots.stage(digits_bundles.paths["1.0.0"], "a")
    assert base_of_slot(slots.path("a")) == base_of_bundle(digits_bundles.paths["1.0.0"])
    with pytest.raises(DeltaError, match="cannot be read"):
        base_of_slot(tmp_path / "missing")


# --- publishing ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(digits_bundles: DigitsBundles, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    reg = init_registry(tmp_path_factory.mktemp("delta-registry") / "reg")
    for version in ("1.0.0", GOOD, SOFT):
        reg.publish(digits_bundles.paths[version])
    return reg


def test_publish_makes_signed_deltas_from_recent_versions(registry: Registry, digits_bundles: DigitsBundles) -> None:
    targets = registry.targets()
    full = targets[f"digits/{SOFT}/onnx.edgeml"]
    for base in ("1.0.0", GOOD):
        delta = targets[delta_path("digits", SOFT, "onnx", base)]
        spec = delta.custom["delta"]
        assert (spec["base"], spec["format"], spec["result_sha256"], spec["result_length"]) == (
            base, "zstd", full.hashes["sha256"], full.length)
        assert spec["base_sha256"] == _sha(base_of_bundle(digits_bundles.paths[base])[0])
        assert delta.length <= 0.6 * full.length
        stored = registry.target_file(delta.path, delta.hashes["sha256"]).read_bytes()
        assert _sha(stored) == delta.hashes["sha256"]
    db = registry.database()
    try:
        with db.transaction() as conn:
            rows = conn.execute(schema.sa.select(schema.deltas.c.version, schema.deltas.c.base_version)).all()
    finally:
        db.close()
    assert sorted(map(tuple, rows)) == [(GOOD, "1.0.0"), (SOFT, "1.0.0"), (SOFT, GOOD)]


def test_publish_keeps_only_deltas_that_save_enough(digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    reg = init_registry(tmp_path / "reg")
    reg.publish(digits_bundles.paths["1.0.0"])
    assert reg.publish(digits_bundles.paths[GOOD], deltas=DeltaSettings(bases=0)).deltas == ()
    assert reg.publish(digits_bundles.paths[SOFT], deltas=DeltaSettings(max_ratio=0.01)).deltas == ()
    assert not [p for p in reg.targets() if p.endswith(".edgeml-delta")]


# --- the device ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(registry: Registry) -> Iterator[str]:
    with serve_repository(registry) as url:
        yield url


class Device:
    def __init__(self, state_dir: Path, url: str, registry: Registry, deltas: bool = True) -> None:
        client = TufClient((registry.metadata_dir / "1.root.json").read_bytes(), state_dir / "metadata",
                           state_dir / "downloads", f"{url}/metadata/", f"{url}/targets/")
        self.machine = UpdateMachine(state_dir, ModelHost(), client.fetch, poll_s=0.01,
                                     fetch_delta=client.fetch_delta if deltas else None)

    def update(self, version: str, delta_from: str | None = None) -> UpdateRecord:
        return self.machine.start(UpdateRequest("digits", version, "onnx", thresholds=QUICK, delta_from=delta_from))

    def close(self) -> None:
        self.machine.host.close()


@pytest.fixture(scope="module")
def on_1(served: str, registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device state directory serving 1.0.0 (copied by each test)."""
    state = tmp_path_factory.mktemp("on-1") / "state"
    device = Device(state, served, registry)
    assert device.update("1.0.0").state == "committed"
    device.close()
    return state


@pytest.fixture
def device_dir(on_1: Path, tmp_path: Path) -> Path:
    shutil.copytree(on_1, tmp_path / "state")
    return tmp_path / "state"


def _end(device_dir: Path, url: str, registry: Registry, delta_from: str | None, deltas: bool = True
         ) -> UpdateRecord:
    device = Device(device_dir, url, registry, deltas)
    try:
        device.machine.boot()
        return device.update(SOFT, delta_from)
    finally:
        device.close()


def test_a_device_rebuilds_the_bundle_from_its_slot_and_the_delta(device_dir: Path, served: str,
                                                                  registry: Registry) -> None:
    record = _end(device_dir, served, registry, "1.0.0")
    assert record.state == "committed" and record.chain()[:3] == ["notified", "patch", "verify"]
    full = registry.targets()[f"digits/{SOFT}/onnx.edgeml"].length
    delta = registry.targets()[delta_path("digits", SOFT, "onnx", "1.0.0")].length
    assert record.transfer == {"kind": "delta", "bytes": delta, "full_bytes": full}


def test_a_modified_slot_falls_back_to_the_full_bundle_before_downloading_the_delta(
        device_dir: Path, served: str, registry: Registry) -> None:
    device = Device(device_dir, served, registry)
    device.machine.boot()  # serving 1.0.0 when its slot changes under it
    active = json.loads((device_dir / "slots" / "active.json").read_text())["slot"]
    golden = device_dir / "slots" / active / "golden.npz"
    golden.write_bytes(golden.read_bytes() + b"\0")
    record = device.update(SOFT, "1.0.0")
    device.close()
    assert record.state == "committed" and record.chain()[:4] == ["notified", "patch", "download", "verify"]
    assert record.transfer is not None and record.transfer["kind"] == "full"
    assert "slot was modified" in record.transfer["fallback"] and record.reason is None


def test_a_tampered_delta_is_refused_by_tuf_and_the_full_bundle_installs(device_dir: Path, served: str,
                                                                         registry: Registry) -> None:
    delta = registry.targets()[delta_path("digits", SOFT, "onnx", GOOD)]
    stored = registry.target_file(delta.path, delta.hashes["sha256"])
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-10] + b"x" * 10)
        device = Device(device_dir, served, registry)
        assert device.update(GOOD).state == "committed"  # now on GOOD, whose delta to SOFT is tampered
        record = device.update(SOFT, GOOD)
        device.close()
    finally:
        stored.write_bytes(original)
    assert record.state == "committed" and "patch" in record.chain() and "download" in record.chain()
    assert record.transfer is not None and record.transfer["kind"] == "full"
    assert "arbitrary-file" in record.transfer["fallback"] or "signed hash" in record.transfer["fallback"]


@pytest.mark.parametrize(("delta_from", "deltas", "why"), [
    (GOOD, True, f"the delta's base is {GOOD}, but this device serves 1.0.0"),
    ("1.0.0", False, "this device cannot apply deltas"),
])
def test_a_delta_the_device_cannot_use_is_skipped(device_dir: Path, served: str, registry: Registry,
                                                  delta_from: str, deltas: bool, why: str) -> None:
    record = _end(device_dir, served, registry, delta_from, deltas)
    assert record.state == "committed" and "patch" not in record.chain()
    assert record.transfer is not None and record.transfer["kind"] == "full" and why in record.transfer["fallback"]
