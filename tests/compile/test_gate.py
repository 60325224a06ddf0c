"""The accuracy gate: real onnxruntime INT8 builds that pass, fail, get diagnosed and get fixed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeml.bundle import Bundle
from edgeml.compile import CompileOptions, compile_model
from edgeml.compile.data import Dataset
from edgeml.compile.diagnose import channel_sqnr, fake_quantize
from edgeml.compile.gate import judge

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained MLP on digits, plus a copy with one known culprit layer.

    The culprit: unit 7 of the second Linear gets a bias of 3000 and no outgoing weight, so the FP32
    function is unchanged but that layer's activations hold an extreme outlier that stretches the
    per-tensor INT8 range until every informative unit rounds to zero.
    """
    from edgeml.train.digits import digits_arrays, export_onnx, fit
    from edgeml.train.models import mlp

    out = tmp_path_factory.mktemp("mlp")
    d = digits_arrays()
    x, xv = d["x_train"].reshape(len(d["x_train"]), -1), d["x_val"].reshape(len(d["x_val"]), -1)
    model = fit(mlp(64, 10, (64, 64)), x, d["y_train"], epochs=15)
    export_onnx(model, xv, str(out / "good.onnx"))
    with torch.no_grad():
        model[2].bias[7] = 3000.0
        model[4].weight[:, 7] = 0.0
    export_onnx(model, xv, str(out / "culprit.onnx"))
    np.savez(out / "calib.npz", input=x[:256])
    np.savez(out / "const.npz", input=np.full_like(x[:64], 0.5))
    np.savez(out / "val.npz", input=xv, labels=d["y_val"])
    np.savez(out / "val_nolabels.npz", input=xv)
    return {p.stem: p for p in out.iterdir()}


def _options(**kw: object) -> CompileOptions:
    base: dict[str, object] = {"targets": ("onnx", "onnx-int8"), "benchmark": False, "name": "digits",
                               "version": "1.0.0"}
    base.update(kw)
    return CompileOptions(**base)  # type: ignore[arg-type]


def test_good_model_passes_with_parity_and_accuracy(digits_mlp: dict[str, Path], tmp_path: Path) -> None:
    report = compile_model(str(digits_mlp["good"]), _options(), tmp_path, calib=digits_mlp["calib"],
                           val=digits_mlp["val"])
    assert report.ok, [(o.target, o.status, o.gate and o.gate.reason) for o in report.outcomes]
    fp32, int8 = report.outcomes
    assert fp32.gate is not None and int8.gate is not None
    assert fp32.gate.metric == "parity" and fp32.gate.metrics["max_abs_error"] < 1e-4
    assert fp32.gate.metrics["reference_accuracy"] >= 0.9
    assert int8.gate.metric == "accuracy" and int8.gate.drop <= 1.0
    assert int8.gate.metrics["top1_agreement"] >= 0.97
    with Bundle(tmp_path / "digits-1.0.0-onnx-int8.edgeml") as b:
        assert b.manifest.gate["status"] == "passed"
        assert b.manifest.metrics["size_bytes"] < b.manifest.metrics["reference_size_bytes"]
        b.verify()


def test_constant_calibration_fails_the_gate_and_writes_nothing(digits_mlp: dict[str, Path], tmp_path: Path) -> None:
    report = compile_model(str(digits_mlp["good"]), _options(targets=("onnx-int8",)), tmp_path,
                           calib=digits_mlp["const"], val=digits_mlp["val"])
    (outcome,) = report.outcomes
    assert outcome.status == "gate-failed"
    assert outcome.gate is not None and outcome.gate.drop > outcome.gate.budget
    assert list(tmp_path.iterdir()) == []  # no bundle, no scratch directory left behind
    assert outcome.diagnosis is not None and any("barely varies" in w for w in outcome.diagnosis.warnings)


def test_culprit_layer_is_ranked_first_and_the_printed_remedy_passes(digits_mlp: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    report = compile_model(str(digits_mlp["culprit"]), _options(targets=("onnx-int8",)), tmp_path / "a",
                           calib=digits_mlp["calib"], val=digits_mlp["val"])
    (outcome,) = report.outcomes
    assert outcome.status == "gate-failed" and outcome.diagnosis is not None
    worst = outcome.diagnosis.ranking[0]
    assert worst.layer == "/2/Gemm"  # the second Linear of the Sequential, where the outlier lives
    assert worst.channel_sqnr_db < 5 < outcome.diagnosis.ranking[1].channel_sqnr_db
    passing = [r for r in outcome.diagnosis.remedies if r.passed]
    assert passing and passing[0].flags.startswith("--exclude-node /2/Gemm")
    # The printed remedy, given back to the real CLI, passes the gate and ships a bundle.
    cmd = [sys.executable, "-m", "edgeml.cli", "compile", str(digits_mlp["culprit"]), "-t", "onnx-int8",
           "--calib", str(digits_mlp["calib"]), "--val", str(digits_mlp["val"]), "-o", str(tmp_path / "b"),
           "--name", "digits", "--version", "1.0.1", "--no-benchmark", *passing[0].flags.split()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "b" / "digits-1.0.1-onnx-int8.edgeml").is_file()


def test_failed_gate_prints_the_diagnosis_through_the_cli(digits_mlp: dict[str, Path], tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "edgeml.cli", "compile", str(digits_mlp["culprit"]), "-t", "onnx-int8",
           "--calib", str(digits_mlp["calib"]), "--val", str(digits_mlp["val"]), "-o", str(tmp_path),
           "--no-benchmark"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "accuracy gate failed" in proc.stdout and "1. layer /2/Gemm" in proc.stdout
    assert "PASSES" in proc.stdout and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.edgeml"))


def test_no_gate_builds_int8_marked_ungated(digits_mlp: dict[str, Path], tmp_path: Path) -> None:
    report = compile_model(str(digits_mlp["good"]), _options(targets=("onnx-int8",), gate=False), tmp_path,
                           calib=digits_mlp["calib"])
    assert report.ok
    with Bundle(next(tmp_path.glob("*.edgeml"))) as b:
        assert b.manifest.gate["status"] == "ungated"


def test_agreement_is_used_without_labels(digits_mlp: dict[str, Path], tmp_path: Path) -> None:
    report = compile_model(str(digits_mlp["good"]), _options(targets=("onnx-int8",)), tmp_path,
                           calib=digits_mlp["calib"], val=digits_mlp["val_nolabels"])
    (outcome,) = report.outcomes
    assert outcome.gate is not None and outcome.gate.metric == "agreement"
    assert outcome.gate.drop == pytest.approx(100 * (1 - outcome.gate.metrics["top1_agreement"]))


@pytest.mark.parametrize(
    ("precision", "noise", "labels", "passed", "metric"),
    [
        ("fp32", 1e-6, True, True, "parity"),
        ("fp32", 1e-1, True, False, "parity"),
        ("int8", 1e-3, True, True, "accuracy"),
        ("int8", 1e-3, False, True, "agreement"),
        ("int8", 50.0, True, False, "accuracy"),
    ],
)
def test_judge_table(precision: str, noise: float, labels: bool, passed: bool, metric: str) -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((200, 10)) * 5
    got = ref + rng.standard_normal(ref.shape) * noise
    y = ref.argmax(1) if labels else None
    verdict = judge([ref], [got], y, _options(), precision=precision)
    assert (verdict.passed, verdict.metric) == (passed, metric)


def test_max_error_gate_for_regressors() -> None:
    ref = np.linspace(0, 1, 100).reshape(100, 1)
    verdict = judge([ref], [ref + 0.02], None, _options(max_error=0.05), precision="int8")
    assert verdict.passed and verdict.metric == "max-error" and verdict.drop == pytest.approx(0.02)
    verdict = judge([ref], [ref + 0.2], None, _options(max_error=0.05), precision="int8")
    assert not verdict.passed


def test_fake_quantize_and_channel_sqnr() -> None:
    x = np.stack([np.linspace(0, 5, 100)] * 3 + [np.full(100, 3000.0)], axis=1)
    scale, zero = np.array(3000 / 255), np.array(0, np.uint8)
    assert channel_sqnr([x], [fake_quantize(x, scale, zero)]) < 10  # the small channel is destroyed
    fine = np.array(5 / 255)
    assert channel_sqnr([x[:, :1]], [fake_quantize(x[:, :1], fine, zero)]) > 30


def test_dataset_digest_changes_with_data() -> None:
    a = Dataset({"input": np.zeros((4, 2), np.float32)})
    b = Dataset({"input": np.ones((4, 2), np.float32)})
    assert a.digest() != b.digest() and a.digest() == Dataset({"input": np.zeros((4, 2), np.float32)}).digest()


@pytest.mark.parametrize(("proxy", "said"), [(None, False), ("onnx-int8", True)])
def test_remedies_for_a_target_they_do_not_change_say_so(proxy: str | None, said: bool) -> None:
    from edgeml.compile.diagnose import Diagnosis, Remedy, TensorBlame
    from edgeml.compile.quantize import QdqSettings

    diag = Diagnosis([TensorBlame("t", "/2/Gemm", "Gemm", 0.0, 45.1)],
                     [Remedy("keep layer /2/Gemm in float", "--exclude-node /2/Gemm", QdqSettings(), 0.33, True)],
                     proxy=proxy)
    lines = diag.lines()
    note = "  measured on the equivalent onnx-int8 quantization; these flags change onnx-int8, not this target:"
    assert (note in lines) is said
    assert lines[-1] == "  try --exclude-node /2/Gemm  (keep layer /2/Gemm in float: PASSES, drop 0.33 pts)"
    assert diag.to_dict()["remedies_apply_to"] == proxy


@pytest.mark.parametrize(("wrong", "passed"), [(3, True), (4, False)])
def test_a_drop_of_exactly_the_budget_passes(wrong: int, passed: bool) -> None:
    """3 more wrong answers out of 300 is a drop of exactly 1 point, whatever binary floats make of 3/300."""
    ref = np.tile(np.eye(10), (30, 1)) * 5.0  # 300 samples, every one right
    labels = ref.argmax(1)
    got = ref.copy()
    got[:wrong] = np.roll(got[:wrong], 1, axis=1)  # ``wrong`` samples now predict another class
    verdict = judge([ref], [got], labels, _options(max_accuracy_drop=1.0), precision="int8")
    assert verdict.metric == "accuracy" and verdict.drop == pytest.approx(wrong / 3)
    assert verdict.passed is passed
