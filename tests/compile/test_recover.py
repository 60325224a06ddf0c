"""``edgeml compile --recover``: an INT8 target that fails its gate searches for an artifact that passes.

The models are built here with onnx.helper from random weights (no training): a teacher MLP or CNN whose
FP32 argmax gives the labels (the samples with the clearest margin), so the reference accuracy is 100% and
every point lost is INT8's doing. Three failure shapes:

* an **outlier hidden channel**: one unit of the first layer 1,000x larger, the next layer's weights for it
  divided by 1,000 (the FP32 function unchanged): equalization fixes it, every layer stays INT8;
* an **outlier input feature**: one input 1,000x larger than the others, nothing before it to absorb a
  scale: one layer must stay in float;
* a **Sigmoid** between the layers (equalization cannot pass through it).

Every candidate runs on the real runtime (onnxruntime, LiteRT); TensorRT engines only where TensorRT and a
GPU exist (marked ``tensorrt``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeml.bundle import Bundle, Manifest  # noqa: E402
from edgeml.compile import CompileOptions, compile_model  # noqa: E402
from edgeml.compile.equalize import find_positions, rescale  # noqa: E402
from edgeml.compile.mixed import Island, search_float_set  # noqa: E402
from edgeml.compile.recover_graph import GraphIndex, assign_names, layer_macs  # noqa: E402
from edgeml.errors import BundleError  # noqa: E402
from edgeml.recovery import check_recovery  # noqa: E402

F, H, C = 16, 32, 10


def _model(nodes: list[Any], inits: dict[str, np.ndarray], in_shape: list[Any], out_dim: int) -> Any:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_dim])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp(weights: list[np.ndarray], biases: list[np.ndarray], *, named: bool, act: str = "Relu") -> Any:
    """Gemm (transB) layers with ``act`` between them; node names ``fc0``, ``act0``... or none at all."""
    nodes, inits, current = [], {}, "x"
    for i, (w, b) in enumerate(zip(weights, biases)):
        inits[f"w{i}"], inits[f"b{i}"] = w, b
        out = "logits" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out], transB=1,
                                      name=f"fc{i}" if named else ""))
        current = out
        if i < len(weights) - 1:
            nodes.append(helper.make_node(act, [out], [f"a{i}"], name=f"act{i}" if named else ""))
            current = f"a{i}"
    return _model(nodes, inits, ["N", weights[0].shape[1]], weights[-1].shape[0])


def convnet(*, outlier: float = 1000.0) -> Any:
    """Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten-Gemm, unnamed, channel 3 of the first conv 1,000x."""
    rng = np.random.default_rng(3)
    w0, b0 = rng.normal(0, 0.3, (8, 3, 3, 3)), rng.normal(0, 0.1, 8)
    w1, b1 = rng.normal(0, 0.2, (8, 8, 3, 3)), rng.normal(0, 0.1, 8)
    w2 = rng.normal(0, 2.0, (C, 8))
    w0[3] *= outlier
    b0[3] *= outlier
    w1[:, 3] /= outlier
    node = helper.make_node
    nodes = [node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]), node("Relu", ["c0"], ["r0"]),
             node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), node("Relu", ["c1"], ["r1"]),
             node("GlobalAveragePool", ["r1"], ["p"]), node("Flatten", ["p"], ["f"]),
             node("Gemm", ["f", "w2", "b2"], ["logits"], transB=1)]
    return _model(nodes, {"w0": w0, "b0": b0, "w1": w1, "b1": b1, "w2": w2, "b2": np.zeros(C)},
                  ["N", 3, 8, 8], C)


def _run(model: Any, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _save(model: Any, x: np.ndarray, out: Path) -> dict[str, Path]:
    """The model, 128 calibration samples, and 300 validation samples labelled by the model's own argmax
    (those with the clearest margin)."""
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    ref = _run(model, x)
    top2 = np.sort(ref, axis=1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0]) > np.quantile(top2[:, 1] - top2[:, 0], 0.3)
    np.savez(out / "calib.npz", x=x[:128])
    np.savez(out / "val.npz", x=x[keep][:300], labels=ref[keep].argmax(1)[:300])
    return {"model": out / "model.onnx", "calib": out / "calib.npz", "val": out / "val.npz"}


def _outlier_mlp(named: bool) -> tuple[Any, np.ndarray]:
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(0, F**-0.5, (H, F)), rng.normal(0, 0.1, H)
    w1 = rng.normal(0, H**-0.5, (C, H)) * 4
    w1[:, 7] *= 3  # the outlier unit matters: clipping it (percentile, entropy) costs accuracy too
    w0[7] *= 1000
    b0[7] *= 1000
    w1[:, 7] /= 1000
    return mlp([w0, w1], [b0, np.zeros(C)], named=named), rng.normal(0, 1, (2000, F)).astype(np.float32)


@pytest.fixture(scope="module")
def outlier_mlp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The issue's model, with and without node names."""
    out = tmp_path_factory.mktemp("outlier")
    return {kind: _save(*_outlier_mlp(kind == "named"), out / kind) for kind in ("named", "unnamed")}


@pytest.fixture(scope="module")
def input_outlier(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three Gemm layers, unnamed, input feature 0 1,000x the others: nothing before the input can absorb a
    scale, so the first layer must read it in float."""
    rng = np.random.default_rng(1)
    w = [rng.normal(0, F**-0.5, (H, F)), rng.normal(0, H**-0.5, (H, H)), rng.normal(0, H**-0.5, (C, H)) * 4]
    w[0][:, 0] *= 3 / 1000
    x = rng.normal(0, 1, (2000, F)).astype(np.float32)
    x[:, 0] *= 1000
    model = mlp(w, [rng.normal(0, 0.1, H), rng.normal(0, 0.1, H), np.zeros(C)], named=False)
    return _save(model, x, tmp_path_factory.mktemp("input-outlier"))


def _options(target: str = "onnx-int8", **kw: Any) -> CompileOptions:
    return CompileOptions(targets=(target,), benchmark=False, name="m", version="1.0.0", **kw)


def _compile(files: dict[str, Path], out: Path, **kw: Any) -> Any:
    report = compile_model(str(files["model"]), _options(**kw), out, calib=files["calib"], val=files["val"])
    return report.outcomes[0]


def _float_compute_nodes(bundle: Path) -> set[str]:
    """Compute layers of a bundle's QDQ model whose weight is not dequantized from INT8 (kept in float)."""
    with Bundle(bundle) as b:
        model = onnx.load_from_string(b.read("model.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node if n.op_type in ("Gemm", "Conv", "MatMul")
            and getattr(producers.get(n.input[1]), "op_type", None) != "DequantizeLinear"}


# -- the searches, end to end --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["named", "unnamed"])
def test_outlier_channel_passes_by_equalization_with_every_layer_int8(
        outlier_mlp: dict[str, dict[str, Path]], kind: str, tmp_path: Path) -> None:
    files = outlier_mlp[kind]
    plain = _compile(files, tmp_path / "plain")
    assert plain.status == "gate-failed" and plain.gate.drop > 50  # the 87 points, here 91
    outcome = _compile(files, tmp_path / "recovered", recover=True)
    assert outcome.status == "written", outcome.recovery.lines() if outcome.recovery else outcome.error
    record = outcome.manifest.recovery
    assert record["stage"] == "rescale" and record["float_nodes"] == [] and record["float_layers"] == []
    assert [r["kind"] for r in record["rescaled"]] == ["equalize"]
    assert record["rescaled"][0]["layers"] == (["fc0", "fc1"] if kind == "named" else ["Gemm_0", "Gemm_2"])
    assert record["drop"] <= 1.0 < 50 < record["plain_drop"]
    assert record["fp32_parity"] < 1e-5
    # calibration was measured first and failed
    stages = [c.stage for c in outcome.recovery.tried]
    assert stages[:4] == ["calibration"] * 4 and all(not c.passed for c in outcome.recovery.tried[:4])
    assert _float_compute_nodes(outcome.bundle) == set()  # every Gemm reads INT8 weights
    with Bundle(outcome.bundle) as b:
        assert b.manifest.recovery == record  # through the strict reader


def test_input_outlier_keeps_the_fewest_layers_in_float(input_outlier: dict[str, Path], tmp_path: Path) -> None:
    outcome = _compile(input_outlier, tmp_path, recover=True)
    assert outcome.status == "written", outcome.recovery.lines() if outcome.recovery else outcome.error
    record = outcome.manifest.recovery
    assert record["stage"] == "mixed"
    assert [layer["name"] for layer in record["float_layers"]] == ["Gemm_0"]  # a name given by the compiler
    assert record["names_assigned"] == 5 and record["float_nodes"] == ["Gemm_0"]
    macs = [F * H, H * H, H * C]
    assert record["float_compute_share"] == pytest.approx(macs[0] / sum(macs), abs=1e-6)
    assert _float_compute_nodes(outcome.bundle) == {"Gemm_0"}  # the other two layers stay INT8
    tried = outcome.recovery.tried
    assert {c.stage for c in tried[:-1]} <= {"calibration", "rescale"} and not any(c.passed for c in tried[:-1])


def test_equalization_through_convolutions_and_global_pooling(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x = (rng.normal(0, 0.5, (1500, 3, 8, 8)) + rng.normal(0, 2, (1500, 3, 1, 1))).astype(np.float32)
    files = _save(convnet(), x, tmp_path / "data")
    outcome = _compile(files, tmp_path / "out", recover=True)
    assert outcome.status == "written"
    record = outcome.manifest.recovery
    assert record["stage"] == "rescale" and record["float_nodes"] == []
    # conv0 -> conv1 through Relu, and conv1 -> the Gemm through GlobalAveragePool and Flatten
    assert [r["layers"] for r in record["rescaled"]] == [["Conv_0", "Conv_2"], ["Conv_2", "Gemm_6"]]


def test_where_equalization_cannot_apply_a_float_layer_passes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    w0, w1 = rng.normal(0, F**-0.5, (H, F)), rng.normal(0, H**-0.5, (C, H)) * 8
    w0[5] *= 1000  # a pre-activation outlier; Sigmoid does not commute with a scale
    model = mlp([w0, w1], [rng.normal(0, 0.1, H), np.zeros(C)], named=False, act="Sigmoid")
    files = _save(model, rng.normal(0, 1, (2000, F)).astype(np.float32), tmp_path / "data")
    outcome = _compile(files, tmp_path / "out", recover=True)
    assert outcome.status == "written"
    assert any("rescaling does not apply" in n for n in outcome.recovery.notes)
    record = outcome.manifest.recovery
    assert record["stage"] == "mixed" and [f["name"] for f in record["float_layers"]] == ["Gemm_0"]


def test_smoothing_where_the_absorber_is_not_a_linear_layer(tmp_path: Path) -> None:
    """Gemm -> Sigmoid -> Mul(per-channel gamma, one 1,000x) -> Gemm: the Mul absorbs the scale."""
    rng = np.random.default_rng(5)
    w1, gamma = rng.normal(0, H**-0.5, (C, H)) * 4, np.ones(H)
    gamma[9], w1[:, 9] = 1000.0, w1[:, 9] / 1000
    node = helper.make_node
    nodes = [node("Gemm", ["x", "w0", "b0"], ["h"], transB=1), node("Sigmoid", ["h"], ["a"]),
             node("Mul", ["a", "g"], ["s"]), node("Gemm", ["s", "w1", "b1"], ["logits"], transB=1)]
    model = _model(nodes, {"w0": rng.normal(0, F**-0.5, (H, F)), "b0": rng.normal(0, 0.1, H), "g": gamma,
                           "w1": w1, "b1": np.zeros(C)}, ["N", F], C)
    files = _save(model, rng.normal(0, 1, (2000, F)).astype(np.float32), tmp_path / "data")
    outcome = _compile(files, tmp_path / "out", recover=True)
    assert outcome.status == "written"
    record = outcome.manifest.recovery
    assert record["rescaled"] == [{"kind": "smooth", "layers": ["Mul_2", "Gemm_3"], "channels": H}]
    assert record["float_nodes"] == []


def test_tensorrt_int8_candidates_keep_float_layers_out_of_qdq(input_outlier: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """tensorrt-int8 is searched in the form TensorRT receives (its gate's onnxruntime proxy); a layer kept
    in float has no Q/DQ pair on its weight, so TensorRT's explicit quantization leaves it in float."""
    outcome = _compile(input_outlier, tmp_path, target="tensorrt-int8", recover=True)
    assert outcome.status == "written"
    record = outcome.manifest.recovery
    assert record["stage"] == "mixed" and record["float_nodes"] == ["Gemm_0"]
    with Bundle(outcome.bundle) as b:
        model = onnx.load_from_string(b.read("model.onnx"))
        assert b.manifest.gate["status"] == "proxy-passed"
    producers = {o: n for n in model.graph.node for o in n.output}
    weight_source = {n.name: getattr(producers.get(n.input[1]), "op_type", None)
                     for n in model.graph.node if n.op_type == "Gemm"}
    assert weight_source == {"Gemm_0": None, "Gemm_2": "DequantizeLinear", "Gemm_4": "DequantizeLinear"}


def test_the_time_budget_bounds_the_search(outlier_mlp: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    outcome = _compile(outlier_mlp["named"], tmp_path, recover=True, recover_budget_s=1e-6)
    assert outcome.status == "gate-failed" and not list(tmp_path.glob("*.edgeml"))
    assert len(outcome.recovery.tried) <= 1
    assert any("time budget" in n for n in outcome.recovery.notes)


def test_a_fixed_batch_zoo_graph_is_diagnosed_and_recovered(zoo_models: dict[str, Path], tmp_path: Path) -> None:
    """AlexNet as the old zoo wrote it (batch fixed to 1, LRN, Dropout, Softmax), judged strictly (no top-1
    change at all): its tensors are ranked batch by batch, and the search ends with an artifact that passes."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", data_0=rng.random((64, 3, 32, 32), dtype=np.float32))
    options = _options(max_accuracy_drop=0.0, metric="agreement", calib_samples=32)
    plain = compile_model(str(zoo_models["alexnet_opset8"]), options, tmp_path / "plain", calib=tmp_path / "data.npz",
                          val=tmp_path / "data.npz").outcomes[0]
    assert plain.status == "gate-failed" and plain.diagnosis is not None and plain.diagnosis.ranking
    options = _options(max_accuracy_drop=0.0, metric="agreement", calib_samples=32, recover=True)
    outcome = compile_model(str(zoo_models["alexnet_opset8"]), options, tmp_path / "out", calib=tmp_path / "data.npz",
                            val=tmp_path / "data.npz").outcomes[0]
    assert outcome.status == "written" and outcome.gate.drop == 0.0
    assert outcome.manifest.recovery["stage"] in ("rescale", "mixed")


# -- the CLI and the bundle ----------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_suggests_recover_then_recovers_and_inspect_shows_it(outlier_mlp: dict[str, dict[str, Path]],
                                                                 tmp_path: Path) -> None:
    files = outlier_mlp["unnamed"]
    common = [str(files["model"]), "-t", "onnx-int8", "--calib", str(files["calib"]), "--val", str(files["val"]),
              "--name", "m", "--version", "1.0.0", "--no-benchmark"]
    plain = _cli("compile", *common, "-o", str(tmp_path / "plain"))
    assert plain.returncode == 1 and "try --recover" in plain.stdout and "Traceback" not in plain.stderr
    assert not list((tmp_path / "plain").glob("*.edgeml"))
    recovered = _cli("compile", *common, "-o", str(tmp_path / "out"), "--recover", "--recover-budget", "120")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert "recovered by --recover: rescale: minmax, equalize of 1 activation(s), every layer INT8" in recovered.stdout
    assert "recovering onnx-int8 [5]" in recovered.stderr  # progress, one line per candidate
    bundle = tmp_path / "out" / "m-1.0.0-onnx-int8.edgeml"
    shown = _cli("inspect", str(bundle))
    assert shown.returncode == 0 and "recovery    rescale: minmax, equalize of 1 activation(s)" in shown.stdout
    manifest = json.loads(_cli("inspect", "--json", str(bundle)).stdout)
    assert manifest["recovery"]["rescaled"][0]["layers"] == ["Gemm_0", "Gemm_2"]


def _record(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "stage": "mixed", "metric": "accuracy", "plain_drop": 43.7, "drop": 0.0, "budget": 1.0,
        "calibration": {"method": "minmax", "percentile": None},
        "rescaled": [{"kind": "equalize", "layers": ["a", "b"], "channels": 32}], "fp32_parity": 1e-7,
        "float_nodes": ["Gemm_0"], "float_layers": [{"name": "Gemm_0", "op_type": "Gemm", "compute_share": 0.3}],
        "float_compute_share": 0.3, "names_assigned": 5, "candidates": 7, "seconds": 0.5, "budget_s": 300.0}
    base.update(changes)
    return base


@pytest.mark.parametrize(("changes", "message"), [
    ({"stage": "guess"}, "recovery.stage"),
    ({"extra": 1}, "unknown key 'extra'"),
    ({"calibration": {"method": "minmax"}}, "no 'percentile'"),
    ({"calibration": {"method": "kl", "percentile": None}}, "calibration.method"),
    ({"rescaled": [{"kind": "equalize", "layers": ["a\n"], "channels": 3}]}, "layers"),
    ({"rescaled": [{"kind": "rotate", "layers": [], "channels": 3}]}, "kind"),
    ({"float_layers": [{"name": "x", "op_type": "Gemm", "compute_share": 1.5}]}, "compute_share"),
    ({"float_compute_share": -0.1}, "float_compute_share"),
    ({"candidates": True}, "candidates"),
    ({"seconds": "1"}, "seconds"),
    ({"drop": float("nan")}, "drop"),
    ({"float_nodes": "Gemm_0"}, "float_nodes"),
])
def test_the_recovery_block_is_checked_strictly(changes: dict[str, Any], message: str) -> None:
    assert check_recovery(_record()) == _record()
    with pytest.raises(BundleError, match=message.replace("(", r"\(")):
        check_recovery(_record(**changes))


def test_manifest_round_trip_keeps_recovery_and_omits_it_when_absent() -> None:
    spec = {"name": "x", "shape": [1, 2], "dtype": "float32"}
    data = {"schema": "edgeml.bundle/1", "name": "m", "version": "1.0.0", "target": "onnx-int8",
            "runtime": {"name": "onnxruntime", "min_version": "1.17", "precision": "int8", "build": None},
            "model": {"file": "model.onnx", "format": "onnx"}, "inputs": [spec], "outputs": [spec],
            "files": {"model.onnx": {"sha256": "a" * 64, "size": 1}}}
    plain = Manifest.from_dict(data)
    assert plain.recovery is None and "recovery" not in plain.to_dict()
    recovered = Manifest.from_dict(dict(data, recovery=_record()))
    assert Manifest.from_dict(json.loads(recovered.to_json()))
    assert json.loads(recovered.to_json())["recovery"] == _record()


# -- the parts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_driven", [False, True])
@pytest.mark.parametrize("which", ["mlp", "conv"])
def test_rescaling_keeps_the_fp32_function_and_removes_the_outlier(which: str, data_driven: bool,
                                                                   tmp_path: Path) -> None:
    from edgeml.compile.data import Dataset

    if which == "mlp":
        model, x = _outlier_mlp(named=False)
        hidden = "a0"
    else:
        model, x = convnet(), np.random.default_rng(6).normal(0, 1, (256, 3, 8, 8)).astype(np.float32)
        hidden = "r0"
    onnx.save(model, str(tmp_path / "src.onnx"))
    plan = rescale(tmp_path / "src.onnx", tmp_path / "out.onnx", Dataset({"x": x[:128]}), data_driven=data_driven)
    assert plan is not None
    rescaled = onnx.load(str(tmp_path / "out.onnx"))
    before, after = _run(model, x), _run(rescaled, x)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()  # FP32 parity, far inside the gate's 1e-3

    def spread(m: Any) -> float:  # the largest channel range over the median one, at the hidden activation
        probe = onnx.ModelProto()
        probe.CopyFrom(m)
        probe.graph.output.append(helper.make_tensor_value_info(hidden, TensorProto.FLOAT, None))
        act = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            [hidden], {"x": x})[0]
        ranges = np.abs(np.moveaxis(act, 1, 0).reshape(act.shape[1], -1)).max(axis=1)
        return float(ranges.max() / np.median(ranges))

    assert spread(model) > 300 and spread(rescaled) < 20


@pytest.mark.parametrize("data_driven", [False, True])
def test_rescaling_a_sequence_model_with_matmul_bias_and_layernorm(data_driven: bool, tmp_path: Path) -> None:
    """N x T x F through MatMul + Add (the bias torch exports for 3-D inputs), Relu, MatMul + Add, then a
    LayerNormalization whose scale has an outlier channel, then MatMul: equalization across the Add chain,
    smoothing into the LayerNorm's scale and bias; the FP32 function stays."""
    from edgeml.compile.data import Dataset

    rng = np.random.default_rng(7)
    gamma = np.ones(H)
    gamma[4] = 1000.0
    w2 = rng.normal(0, H**-0.5, (H, C))
    w2[4] /= 1000.0
    node = helper.make_node
    nodes = [node("MatMul", ["x", "w0"], ["m0"]), node("Add", ["m0", "b0"], ["h0"]), node("Relu", ["h0"], ["a0"]),
             node("MatMul", ["a0", "w1"], ["m1"]), node("Add", ["m1", "b1"], ["h1"]),
             node("LayerNormalization", ["h1", "g", "beta"], ["n"], axis=-1),
             node("MatMul", ["n", "w2"], ["m2"]), node("ReduceMean", ["m2"], ["logits"], axes=[1], keepdims=0)]
    graph = helper.make_graph(
        nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, F])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", C])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in {
            "w0": rng.normal(0, F**-0.5, (F, H)) * np.r_[np.ones(H - 1), 300.0], "b0": rng.normal(0, 0.1, H),
            "w1": rng.normal(0, H**-0.5, (H, H)), "b1": rng.normal(0, 0.1, H), "g": gamma,
            "beta": rng.normal(0, 0.1, H) * gamma, "w2": w2}.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "src.onnx"))
    x = rng.normal(0, 1, (64, 4, F)).astype(np.float32)
    plan = rescale(tmp_path / "src.onnx", tmp_path / "out.onnx", Dataset({"x": x}), data_driven=data_driven)
    assert plan is not None
    kinds = {tuple(p["layers"]): p["kind"] for p in plan.positions}
    assert kinds[("LayerNormalization_5", "MatMul_6")] == "smooth"
    assert kinds[("MatMul_0", "MatMul_3")] == ("smooth" if data_driven else "equalize")
    before, after = _run(model, x), _run(onnx.load(str(tmp_path / "out.onnx")), x)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()


def test_positions_stop_at_ops_that_do_not_commute_with_a_scale() -> None:
    rng = np.random.default_rng(0)
    w = [rng.normal(size=(H, F)), rng.normal(size=(C, H))]
    b = [np.zeros(H), np.zeros(C)]
    relu = GraphIndex(onnx.shape_inference.infer_shapes(mlp(w, b, named=True)))
    assert [(p.tensor, p.kind, p.layers) for p in find_positions(relu)] == [("a0", "equalize", ["fc0", "fc1"])]
    sigmoid = GraphIndex(onnx.shape_inference.infer_shapes(mlp(w, b, named=True, act="Sigmoid")))
    assert find_positions(sigmoid) == []
    # a hidden activation that is also a graph output cannot change
    model = mlp(w, b, named=True)
    model.graph.output.append(helper.make_tensor_value_info("a0", TensorProto.FLOAT, None))
    assert find_positions(GraphIndex(model)) == []


def test_names_are_assigned_deterministically_and_uniquely() -> None:
    rng = np.random.default_rng(0)
    model = mlp([rng.normal(size=(H, F)), rng.normal(size=(C, H))], [np.zeros(H), np.zeros(C)], named=False)
    model.graph.node[1].name = "Gemm_0"  # a taken name: the unnamed Gemm at index 0 must not collide
    model.graph.node[2].name = "Gemm_0"  # a duplicate: renamed
    again = onnx.ModelProto()
    again.CopyFrom(model)
    assert assign_names(model) == 2
    assert [n.name for n in model.graph.node] == ["Gemm_0_2", "Gemm_0", "Gemm_2"]
    assign_names(again)
    assert [n.name for n in again.graph.node] == [n.name for n in model.graph.node]
    assert assign_names(model) == 0
    assert layer_macs(onnx.shape_inference.infer_shapes(model)) == {"Gemm_0_2": F * H, "Gemm_2": H * C}


def test_mixed_search_is_greedy_then_pruned_back() -> None:
    islands = [Island(f"t{i}", (f"n{i}",)) for i in range(12)]
    calls: list[tuple[str, ...]] = []

    def passes(nodes: tuple[str, ...]) -> bool:  # the gate passes once n2 and n7 are both in float
        calls.append(nodes)
        return {"n2", "n7"} <= set(nodes)

    assert search_float_set(islands, passes) == ("n2", "n7")
    # prefixes growing ~1.4x (not one candidate per prefix), a bisection, then each island pruned back
    assert [len(c) for c in calls[:7]] == [1, 2, 3, 4, 6, 8, 7]
    assert len(calls) == 6 + 1 + 8  # growing to 8, bisecting 7, one pruning trial per island of the 8
    assert search_float_set(islands, lambda nodes: False) is None
    assert search_float_set(islands[:3], lambda nodes: None) is None  # out of time


# -- other runtimes -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_tflite_int8_recovers_by_equalization_in_litert(outlier_mlp: dict[str, dict[str, Path]],
                                                        tmp_path: Path) -> None:
    """onnx2tf converts the rescaled model and LiteRT runs it; TFLite calibrates min/max itself, and is
    full-integer, so calibration and mixed precision do not apply (the notes say so)."""
    import importlib.util

    if importlib.util.find_spec("onnx2tf") is None or importlib.util.find_spec("ai_edge_litert") is None:
        pytest.skip("onnx2tf or LiteRT is not installed (pip install 'edgeml[tflite]')")
    outcome = _compile(outlier_mlp["named"], tmp_path, target="tflite-int8", recover=True)
    assert outcome.status == "written", outcome.recovery.lines() if outcome.recovery else outcome.error
    record = outcome.manifest.recovery
    assert record["stage"] == "rescale" and record["float_nodes"] == [] and record["plain_drop"] > 50
    assert [c.stage for c in outcome.recovery.tried] == ["rescale"]
    assert any("calibration methods do not apply" in n for n in outcome.recovery.notes)
    with Bundle(outcome.bundle) as b:
        assert b.manifest.runtime["name"] == "litert" and b.manifest.gate["runtime"] == "litert"


def _why_no_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"TensorRT is not importable ({exc})"
    from edgeml.tensorrt import cuda_ok, require_cudart

    try:
        cudart = require_cudart()
        count = cuda_ok(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except Exception as exc:
        return f"no usable NVIDIA GPU: {exc}"
    return None if count > 0 else "no NVIDIA GPU"


@pytest.mark.tensorrt
def test_tensorrt_engine_of_a_recovered_mixed_precision_bundle(input_outlier: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """Where TensorRT and a GPU exist: the recovered bundle's engine, built with the real TensorRT, agrees
    with FP32 (its float layer runs in FP16/FP32, the others in INT8)."""
    reason = _why_no_tensorrt()
    if reason:
        pytest.skip(reason)
    from edgeml.edge_agent.runtimes.base import open_runtime

    outcome = _compile(input_outlier, tmp_path / "b", target="tensorrt-int8", recover=True, build_engine=True)
    assert outcome.status == "written" and outcome.manifest.recovery["float_nodes"] == ["Gemm_0"]
    with Bundle(outcome.bundle) as b:
        b.extract(tmp_path / "x")
    val = np.load(input_outlier["val"])
    with open_runtime("tensorrt", tmp_path / "x" / "model.engine") as rt:
        got = np.concatenate([rt.infer({"x": val["x"][i:i + 8]})["logits"] for i in range(0, 64, 8)])
    assert (got.argmax(1) == val["labels"][:64]).mean() >= 0.97
