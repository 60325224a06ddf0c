"""Models the project did not write (see :mod:`tests.compile.zoo`) through the real pipeline.

FP32: the ``onnx`` bundle must compute what the ORIGINAL file computes in onnxruntime, on the pipeline's
generated inputs and on inputs fed here after extracting the bundle. INT8: the ``onnx-int8`` bundle of the
well-conditioned graphs must pass a top-1 agreement gate and replay its own golden vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeml.bundle import Bundle, Manifest, TensorSpec
from edgeml.compile import CompileOptions, compile_model
from edgeml.compile.data import generated_inputs
from tests.compile.zoo import BUILDERS, INPUT_SHAPE, NUM_CLASSES

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

#: name -> (default-domain opset, batch dimension as the file declares it)
EXPECTED: dict[str, tuple[int, int | str]] = {
    "alexnet_opset8": (8, 1),
    "squeezenet_opset9": (9, 1),
    "batchnorm_opset9": (9, "N"),
    "mixed_ops_opset9": (9, "batch"),
    "pad_reflect_opset11": (11, "batch"),
}
#: pad_reflect's random classifier has top-1 margins of ~0.05, inside INT8's rounding, so its top-1 is
#: not a meaningful INT8 check; every other graph is gated on agreement.
INT8_MODELS = ("alexnet_opset8", "squeezenet_opset9", "batchnorm_opset9", "mixed_ops_opset9")
INT8_BUDGET_POINTS = 25.0


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    """Outputs of ``path`` in onnxruntime; a model with a fixed batch of 1 is fed one sample at a time."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    if session.get_inputs()[0].shape[0] == 1:
        return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    return np.asarray(session.run(None, {name: x})[0])


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"


def _compile(model: Path, out: Path, target: str, **kwargs: Any) -> Manifest:
    options = CompileOptions(targets=(target,), benchmark=False, name="zoo", version="1.0.0",
                             **kwargs.pop("options", {}))
    report = compile_model(str(model), options, out, **kwargs)
    (outcome,) = report.outcomes
    assert outcome.status == "written", outcome.error or (outcome.gate and outcome.gate.reason)
    assert outcome.bundle == out / f"zoo-1.0.0-{target}.edgeml" and outcome.bundle.is_file()
    assert sorted(p.name for p in out.iterdir()) == [outcome.bundle.name]  # no scratch directory left
    assert outcome.manifest is not None
    return outcome.manifest


def test_every_builder_is_a_valid_model_of_its_opset(zoo_models: dict[str, Path]) -> None:
    assert set(zoo_models) == set(BUILDERS) == set(EXPECTED)
    for name, path in zoo_models.items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset == EXPECTED[name][0], name


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fp32_bundle_computes_what_the_original_computes(zoo_models: dict[str, Path], name: str,
                                                         tmp_path: Path) -> None:
    original = zoo_models[name]
    opset, batch = EXPECTED[name]
    manifest = _compile(original, tmp_path / "dist", "onnx")

    assert manifest.gate["status"] == "passed" and manifest.gate["metric"] == "parity"
    # no data given: parity was judged on three generated distributions, every output within 0.1% of its scale
    assert manifest.gate["data"] == "generated inputs: standard normal, uniform [0, 1), uniform [0, 255]"
    gate = manifest.metrics["gate"]
    assert gate["parity_inputs"] == ["standard normal", "uniform [0, 1)", "uniform [0, 255]"]
    assert [row["name"] for row in gate["outputs"]] == [manifest.outputs[0].name]
    assert 0 <= gate["max_relative_error"] <= 1e-3
    # Weights listed as graph inputs (IR 3, alexnet) are initializers, not model inputs.
    assert manifest.inputs == (TensorSpec(onnx.load(str(original)).graph.input[0].name, (batch, *INPUT_SHAPE),
                                          "float32"),)
    assert manifest.outputs[0].shape == (batch, NUM_CLASSES)
    assert manifest.provenance["source_opset"] == opset

    with Bundle(tmp_path / "dist" / manifest.filename) as bundle:
        bundle.extract(tmp_path / "x")
    model_path = tmp_path / "x" / manifest.model["file"]
    onnx.checker.check_model(onnx.load(str(model_path)), full_check=True)

    # The inputs the pipeline generated for its parity gate, and the golden vectors it stored.
    generated = generated_inputs(manifest.inputs).inputs[manifest.inputs[0].name]
    reference = _run(original, generated)
    _assert_close(_run(model_path, generated), reference)
    assert manifest.golden is not None
    golden = np.load(tmp_path / "x" / "golden.npz")
    k = manifest.golden["count"]
    np.testing.assert_array_equal(golden[f"in:{manifest.inputs[0].name}"], generated[:k])
    _assert_close(golden[f"out:{manifest.outputs[0].name}"], reference[:k])

    # Sixteen inputs of our own, on another scale than the generated ones.
    x = (np.random.default_rng(16).uniform(-3.0, 3.0, (16, *INPUT_SHAPE))).astype(np.float32)
    _assert_close(_run(model_path, x), _run(original, x))


@pytest.mark.parametrize("name", INT8_MODELS)
def test_int8_bundle_passes_an_agreement_gate(zoo_models: dict[str, Path], name: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    np.savez(tmp_path / "calib.npz", data=rng.standard_normal((64, *INPUT_SHAPE)).astype(np.float32))
    np.savez(tmp_path / "val.npz", data=rng.standard_normal((64, *INPUT_SHAPE)).astype(np.float32))
    manifest = _compile(zoo_models[name], tmp_path / "dist", "onnx-int8", calib=tmp_path / "calib.npz",
                        val=tmp_path / "val.npz",
                        options={"metric": "agreement", "max_accuracy_drop": INT8_BUDGET_POINTS})

    assert manifest.runtime["precision"] == "int8"
    assert manifest.gate["status"] == "passed" and manifest.gate["metric"] == "agreement"
    gate = manifest.metrics["gate"]
    assert gate["samples"] == 64
    assert manifest.gate["drop"] == pytest.approx(100 * (1 - gate["top1_agreement"]))
    assert 0.0 <= manifest.gate["drop"] <= INT8_BUDGET_POINTS
    assert manifest.provenance["calibration_data_sha256"] != manifest.provenance["validation_data_sha256"]

    with Bundle(tmp_path / "dist" / manifest.filename) as bundle:
        bundle.extract(tmp_path / "x")
    model_path = tmp_path / "x" / manifest.model["file"]
    ops = {n.op_type for n in onnx.load(str(model_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert manifest.golden is not None
    golden = np.load(tmp_path / "x" / "golden.npz")
    got = _run(model_path, golden[f"in:{manifest.inputs[0].name}"])
    expected = golden[f"out:{manifest.outputs[0].name}"]
    assert float(np.abs(got - expected).max()) <= manifest.golden["atol"]
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
