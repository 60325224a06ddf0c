"""Models from the wild: anonymous and named dims, ``--input-shape`` for ONNX sources, and a parity gate that
judges every output relative to its own magnitude, on the user's data or on several generated distributions.

Real onnxruntime everywhere. The "converters" that get a model subtly wrong are test backends registered in
the target table (a real converter bug is not reproducible on demand); they build an ONNX model that
onnxruntime runs through the real gate, exactly as a backend's output is judged.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeml.bundle import Bundle, TensorSpec
from edgeml.compile import TARGETS, CompileOptions, Target, compile_model
from edgeml.compile.backends.base import Backend, BuildContext, BuildResult
from edgeml.compile.backends.onnx_fp32 import simplified_fp32
from edgeml.compile.data import load_dataset
from edgeml.compile.gate import judge
from edgeml.compile.shapes import parse_input_shapes, resolve_input_shapes
from edgeml.errors import ConfigError, DataError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

CLASSES = 1000


def _save(nodes: list[Any], inits: list[Any], inputs: list[Any], outputs: list[Any], path: Path) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _detector(path: Path, dims: list[Any], seed: int = 0) -> Path:
    """A text-detector-shaped FCN: image in, a probability map at half resolution out."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((1, 8, 1, 1)) * 0.5).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([-0.5], np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
             helper.make_node("Sigmoid", ["c2"], ["prob"])]
    return _save(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                 [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [dims[0], 1, "?", "?"])], path)


def _two_inputs(path: Path) -> Path:
    """An image and a mask whose height and width are named: the names tie them."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["gray"], axes=[1], keepdims=0),
             helper.make_node("Mul", ["gray", "mask"], ["masked"]),
             helper.make_node("Sigmoid", ["masked"], ["prob"])]
    return _save(nodes, [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"]),
                             helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", "H", "W"])],
                 [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", "H", "W"])], path)


def _classifier(path: Path, seed: int = 0) -> Path:
    """A classic ImageNet-style head on a tiny body: 1,000-class softmax, every probability about 1e-3."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((16, CLASSES)) * 0.2).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["p1"]),
             helper.make_node("Flatten", ["p1"], ["f1"]),
             helper.make_node("Gemm", ["f1", "w2", "b2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    return _save(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])],
                 [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [-1, CLASSES])], path)


# --- dims --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("shape", "arrays", "message"),
    [
        ((-1, 3, "?", "?"), {"x": (256, 3, 48, 192)}, None),
        ((0, 3, 0, 0), {"x": (5, 3, 7, 9)}, None),
        (("?", 3, "?", "?"), {"x": (5, 3, 48, 192)}, None),
        (("N", 3, "H", "H"), {"x": (5, 3, 48, 48)}, None),
        (("N", 3, "H", "H"), {"x": (5, 3, 48, 192)}, "dims named 'H' are one size"),
        ((-1, 3, "?", "?"), {"x": (5, 4, 48, 192)}, r"expected shape Nx3x\?x\?, .* has 5x4x48x192 \(dim 1 must be 3\)"),
        ((-1, 3, "?", "?"), {"x": (5, 3, 48)}, "4 dims, not 3"),
        ((1, 3, 8, 8), {"x": (7, 3, 8, 8)}, None),  # a fixed batch of 1 takes any number of samples, one by one
        ((2, 3, 8, 8), {"x": (6, 3, 8, 8)}, None),  # a fixed batch of 2: any multiple of 2, two at a time
        ((2, 3, 8, 8), {"x": (5, 3, 8, 8)}, r"dim 0 must be 2 \(or a multiple of it\)"),
    ],
    ids=["paddle-minus-one-and-question-marks", "zero-dims", "question-batch", "named-equal", "named-differ",
         "fixed-channel", "rank", "fixed-batch-one", "fixed-batch-two", "fixed-batch-two-odd"],
)
def test_anonymous_dims_match_any_size_and_a_repeated_name_ties_dims(
        tmp_path: Path, shape: tuple[int | str, ...], arrays: dict[str, tuple[int, ...]], message: str | None) -> None:
    np.savez(tmp_path / "d.npz", **{k: np.zeros(v, np.float32) for k, v in arrays.items()})  # type: ignore[arg-type]
    specs = (TensorSpec("x", shape, "float32"),)
    if message is None:
        ds = load_dataset(tmp_path / "d.npz", specs, role="calibration")
        assert ds.inputs["x"].shape == arrays["x"]
    else:
        with pytest.raises(DataError, match=message):
            load_dataset(tmp_path / "d.npz", specs, role="calibration")


def test_a_name_ties_dims_across_inputs(tmp_path: Path) -> None:
    specs = (TensorSpec("x", ("N", 3, "H", "W"), "float32"), TensorSpec("mask", ("N", "H", "W"), "float32"))
    np.savez(tmp_path / "ok.npz", x=np.zeros((4, 3, 48, 192), np.float32), mask=np.zeros((4, 48, 192), np.float32))
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3, 48, 192), np.float32), mask=np.zeros((4, 32, 192), np.float32))
    assert len(load_dataset(tmp_path / "ok.npz", specs)) == 4
    with pytest.raises(DataError, match="input 'mask'.*dims named 'H' are one size, but input 'x' dim 2 is 48 and "
                                        "input 'mask' dim 1 is 32"):
        load_dataset(tmp_path / "bad.npz", specs)


@pytest.mark.parametrize("dims", [[-1, 3, "?", "?"], ["", 3, "", ""], [0, 3, 0, 0]],
                         ids=["minus-one-and-question-marks", "empty-dim-params", "zeros"])
def test_a_model_from_the_wild_compiles_with_calibration_data_of_any_matching_shape(
        tmp_path: Path, dims: list[Any]) -> None:
    model = _detector(tmp_path / "det.onnx", dims)
    rng = np.random.default_rng(1)
    for h, w in ((48, 192), (32, 64)):  # two data shapes, both fine for a model that fixes none
        np.savez(tmp_path / "calib.npz", x=rng.uniform(0, 1, (48, 3, h, w)).astype(np.float32))
        np.savez(tmp_path / "val.npz", x=rng.uniform(0, 1, (16, 3, h, w)).astype(np.float32))
        out = tmp_path / f"dist-{h}x{w}"
        report = compile_model(str(model), CompileOptions(targets=("onnx", "onnx-int8"), max_error=0.05,
                                                          benchmark=False, version="1.0.0"),
                               out, calib=tmp_path / "calib.npz", val=tmp_path / "val.npz")
        assert report.ok, [(o.target, o.status, o.gate and o.gate.reason, o.error) for o in report.outcomes]
        with Bundle(out / "det-1.0.0-onnx-int8.edgeml") as bundle:
            m = bundle.manifest
        assert m.inputs == (TensorSpec("x", ("?", 3, "?", "?"), "float32"),)  # anonymous: recorded as "?"
        assert m.metrics["gate"]["samples"] == 16 and m.metrics["gate"]["max_abs_error"] <= 0.05


def test_input_shape_fixes_the_artifact_and_the_manifest_records_it(tmp_path: Path) -> None:
    model = _detector(tmp_path / "det.onnx", [-1, 3, "?", "?"])
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "val.npz", x=rng.uniform(0, 1, (6, 3, 48, 192)).astype(np.float32))
    np.savez(tmp_path / "other.npz", x=rng.uniform(0, 1, (6, 3, 32, 64)).astype(np.float32))
    cli = [sys.executable, "-m", "edgeml.cli", "compile", str(model), "-t", "onnx", "--input-shape", "x:1,3,48,192",
           "--version", "1.0.0", "--no-benchmark"]
    proc = subprocess.run([*cli, "--val", str(tmp_path / "val.npz"), "-o", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with Bundle(tmp_path / "a" / "det-1.0.0-onnx.edgeml") as bundle:
        m = bundle.manifest
        bundle.extract(tmp_path / "x")
    assert m.inputs == (TensorSpec("x", (1, 3, 48, 192), "float32"),)
    assert m.outputs == (TensorSpec("prob", (1, 1, 24, 96), "float32"),)  # inferred from the fixed input
    assert m.provenance["input_shapes"] == {"x": [1, 3, 48, 192]}
    shipped = onnx.load(str(tmp_path / "x" / "model.onnx"))
    assert [d.dim_value for d in shipped.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 48, 192]
    # data of another size no longer fits the artifact: refused up front, in one line
    proc = subprocess.run([*cli, "--val", str(tmp_path / "other.npz"), "-o", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "input 'x': expected shape 1x3x48x192" in proc.stderr and "dim 2 must be 48" in proc.stderr
    assert not list((tmp_path / "b").glob("*.edgeml"))


def test_input_shape_per_input_fixes_the_dims_a_name_ties(tmp_path: Path) -> None:
    model = _two_inputs(tmp_path / "masked.onnx")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "val.npz", x=rng.uniform(0, 1, (4, 3, 48, 192)).astype(np.float32),
             mask=np.ones((4, 48, 192), np.float32))
    report = compile_model(str(model), CompileOptions(targets=("onnx",), benchmark=False, version="1.0.0",
                                                      input_shape={"x": (1, 3, 48, 192)}),
                           tmp_path / "a", val=tmp_path / "val.npz")
    assert report.ok
    m = report.outcomes[0].manifest
    assert m is not None
    # only x was given: the mask's H and W are the same names, so it is fixed too; the output follows
    assert m.inputs == (TensorSpec("x", (1, 3, 48, 192), "float32"), TensorSpec("mask", (1, 48, 192), "float32"))
    assert m.outputs == (TensorSpec("prob", (1, 48, 192), "float32"),)
    both = parse_input_shapes(["x:1,3,48,192", "mask:1,48,192"])
    assert both == {"x": (1, 3, 48, 192), "mask": (1, 48, 192)}
    assert resolve_input_shapes(m.inputs, both) == both  # type: ignore[arg-type]


_TWO = (TensorSpec("x", ("N", 3, "H", "W"), "float32"), TensorSpec("mask", ("N", "H", "W"), "float32"))


@pytest.mark.parametrize(
    ("texts", "specs", "message"),
    [
        (["1,3,48,192"], _TWO, "the model has 2 inputs \\(x, mask\\): name each one"),
        (["img:1,3,48,192"], _TWO, "names 'img', which the model does not have \\(its inputs: x, mask\\)"),
        (["x:1,3,48"], _TWO, "has 3 dims; input 'x' has 4"),
        (["x:1,3,48,192", "mask:1,32,192"], _TWO, "gives the dim named 'H' two sizes: 48 and 32"),
        (["x:1,4,48,192"], _TWO, "contradicts input 'x': dim 1 is fixed to 3"),
        (["x:1,3,0,192"], _TWO, "every dim must be a positive integer"),
        (["x:1,3,a,b"], _TWO, "is not a list of integers"),
        (["x:1,3,4,4", "x:1,3,8,8"], _TWO, "gives input 'x' twice"),
        (["1,3,4,4", "1,3,8,8"], _TWO, "must each name their input"),
    ],
    ids=["bare-for-two-inputs", "unknown-name", "rank", "one-name-two-sizes", "fixed-dim", "zero", "not-numbers",
         "twice", "two-bare"],
)
def test_bad_input_shapes_are_refused_with_what_to_type(texts: list[str], specs: tuple[TensorSpec, ...],
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_input_shapes(specs, parse_input_shapes(texts) or ())


# --- parity relative to each output --------------------------------------------------------------------------

def _rewrite(ctx: BuildContext, edit: Callable[[Any], None]) -> BuildResult:
    fp32 = simplified_fp32(ctx)
    model = onnx.load(str(fp32.eval_path))
    edit(model.graph)
    out = ctx.workdir / "faulty" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return BuildResult(files={"model.onnx": out}, model_file="model.onnx", model_format="onnx",
                       runtime=dict(fp32.runtime), eval_path=out, eval_runtime="onnxruntime")


def _before_softmax(graph: Any) -> None:
    """A converter that scales the logits by 1.1 (the top class stays; every probability moves ~10%)."""
    soft = next(n for n in graph.node if n.op_type == "Softmax")
    graph.initializer.append(numpy_helper.from_array(np.array(1.1, np.float32), "bug_scale"))
    graph.node.insert(list(graph.node).index(soft), helper.make_node("Mul", [soft.input[0], "bug_scale"], ["bugged"]))
    soft.input[0] = "bugged"


def _clipped_input(graph: Any) -> None:
    """A converter that assumes normalised inputs and saturates them at +-10 (invisible on N(0, 1))."""
    name = graph.input[0].name
    for node in graph.node:
        node.input[:] = ["clipped" if i == name else i for i in node.input]
    graph.initializer.extend([numpy_helper.from_array(np.array(-10.0, np.float32), "lo"),
                              numpy_helper.from_array(np.array(10.0, np.float32), "hi")])
    graph.node.insert(0, helper.make_node("Clip", [name, "lo", "hi"], ["clipped"]))


class ScaledLogitsBackend(Backend):
    def _build_impl(self, ctx: BuildContext) -> BuildResult:
        return _rewrite(ctx, _before_softmax)


class ClippedInputBackend(Backend):
    def _build_impl(self, ctx: BuildContext) -> BuildResult:
        return _rewrite(ctx, _clipped_input)


@pytest.fixture
def faulty_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, cls in (("scaled-logits", "ScaledLogitsBackend"), ("clipped-input", "ClippedInputBackend")):
        monkeypatch.setitem(TARGETS, name, Target(name, f"{__name__}:{cls}", "onnxruntime", "fp32", "compile",
                                                  "a converter that gets the model subtly wrong"))


@pytest.mark.usefixtures("faulty_targets")
def test_an_error_large_for_the_output_but_small_in_absolute_terms_fails_parity(tmp_path: Path) -> None:
    model = _classifier(tmp_path / "net.onnx")
    x = np.random.default_rng(4).uniform(0, 1, (32, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x)
    report = compile_model(str(model), CompileOptions(targets=("onnx", "scaled-logits"), benchmark=False,
                                                      version="1.0.0"), tmp_path / "dist", val=tmp_path / "val.npz")
    good, bad = report.outcomes
    assert good.status == "written" and good.gate is not None and good.gate.metrics["max_relative_error"] < 1e-5
    assert bad.status == "gate-failed" and bad.gate is not None and not report.ok
    m = bad.gate.metrics
    # every probability is about 1e-3: the old floor max(1, max|ref|) x 1e-3 would have let this ship
    assert m["max_abs_error"] < 1e-3 * max(1.0, m["output_scale"])
    (row,) = m["outputs"]
    assert row["name"] == "prob" and 0.05 < row["relative_error"] < 0.5
    assert row["relative_error"] == pytest.approx(row["max_abs_error"] / row["max_abs_reference"])
    assert bad.gate.reason.startswith("FP32 parity broken: output 'prob' is off by ")
    assert f"{100 * row['relative_error']:.3g}% of its magnitude on validation data" in bad.gate.reason
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["net-1.0.0-onnx.edgeml"]  # no bundle for it
    assert bad.warnings == []  # judged on the user's data


@pytest.mark.usefixtures("faulty_targets")
def test_without_data_parity_is_judged_on_several_distributions_and_a_warning_says_what_to_pass(
        tmp_path: Path) -> None:
    model = _classifier(tmp_path / "net.onnx")
    options = CompileOptions(targets=("onnx", "clipped-input"), benchmark=False, version="1.0.0")
    report = compile_model(str(model), options, tmp_path / "dist")
    good, bad = report.outcomes
    assert good.status == "written" and bad.status == "gate-failed"
    assert bad.gate is not None
    # identical on standard normal and [0, 1) inputs: only the [0, 255] set shows the converter's bug
    assert "on uniform [0, 255]" in bad.gate.reason and "FP32 parity broken: output 'prob'" in bad.gate.reason
    assert bad.gate.metrics["parity_inputs"] == ["standard normal", "uniform [0, 1)", "uniform [0, 255]"]
    (row,) = bad.gate.metrics["outputs"]
    assert row["inputs"] == "uniform [0, 255]" and row["relative_error"] > 0.01
    for outcome in (good, bad):
        (warning,) = outcome.warnings
        assert "judged on generated inputs only" in warning and "pass --val DATA" in warning
    with Bundle(tmp_path / "dist" / "net-1.0.0-onnx.edgeml") as bundle:
        m = bundle.manifest
    assert m.gate["data"] == "generated inputs: standard normal, uniform [0, 1), uniform [0, 255]"
    assert m.refstats is None  # statistics of noise would describe nothing a device sees
    (row,) = m.metrics["gate"]["outputs"]
    assert set(row) >= {"name", "relative_error", "max_abs_error", "max_abs_reference", "inputs"}
    # the CLI says the same thing: the failure, then the warning
    proc = subprocess.run([sys.executable, "-m", "edgeml.cli", "compile", str(model), "-t", "onnx", "-o",
                           str(tmp_path / "cli"), "--no-benchmark"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "warning: onnx was judged on generated inputs only" in proc.stdout


@pytest.mark.usefixtures("faulty_targets")
def test_image_preprocessing_adds_the_images_own_range_to_the_generated_sets(tmp_path: Path) -> None:
    from edgeml.compile.data import ImagePreprocessing

    model = _classifier(tmp_path / "net.onnx")
    pre = ImagePreprocessing(size=(16, 16), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    report = compile_model(str(model), CompileOptions(targets=("onnx",), benchmark=False, version="1.0.0"),
                           tmp_path / "dist", preprocessing=pre)
    (outcome,) = report.outcomes
    assert outcome.gate is not None
    assert outcome.gate.metrics["parity_inputs"][-1] == "images through the given preprocessing"


def test_each_output_is_judged_on_its_own_scale() -> None:
    rng = np.random.default_rng(5)
    big = rng.normal(0, 100, (64, 4))  # a box regressor in pixels
    small = rng.uniform(0, 1e-3, (64, 50))  # a probability map of small values
    options = CompileOptions(targets=("onnx",))
    noisy = small * (1 + 0.1 * rng.standard_normal(small.shape))  # 10% off, ~1e-4 in absolute terms
    verdict = judge([big, small], [big + 1e-3, noisy], None, options, precision="fp32", names=["boxes", "heat"])
    assert not verdict.passed and "output 'heat'" in verdict.reason
    rows = {r["name"]: r for r in verdict.metrics["outputs"]}
    assert rows["boxes"]["relative_error"] < 1e-4 < rows["heat"]["relative_error"]
    assert verdict.metrics["max_abs_error"] < 1e-3 * verdict.metrics["output_scale"]  # the old rule: a pass
    ok = judge([big, small], [big + 1e-3, small * (1 + 1e-5)], None, options, precision="fp32")
    assert ok.passed and ok.metric == "parity" and ok.drop < options.parity_rtol


def test_golden_tolerances_are_per_output_on_its_own_magnitude(tmp_path: Path) -> None:
    model = _detector(tmp_path / "det.onnx", [-1, 3, "?", "?"])
    rng = np.random.default_rng(6)
    np.savez(tmp_path / "val.npz", x=rng.uniform(0, 1, (8, 3, 16, 16)).astype(np.float32))
    report = compile_model(str(model), CompileOptions(targets=("onnx",), benchmark=False, version="1.0.0"),
                           tmp_path / "dist", val=tmp_path / "val.npz")
    m = report.outcomes[0].manifest
    assert m is not None and m.golden is not None
    prob = m.golden["outputs"]["prob"]
    magnitude = m.metrics["gate"]["outputs"][0]["max_abs_reference"]
    assert prob["atol"] == pytest.approx(1e-3 * magnitude + 1e-6) and prob["top1"] is False
    assert m.golden["atol"] == prob["atol"] and m.golden["top1"] is False  # what an older agent reads


def test_a_detector_head_with_one_output_channel_gets_the_tensorrt_int8_form(tmp_path: Path) -> None:
    """Its conv's per-channel scale has one value (and its bias one too): that is a per-tensor scale."""
    model = _detector(tmp_path / "det.onnx", [-1, 3, "?", "?"])
    rng = np.random.default_rng(7)
    np.savez(tmp_path / "calib.npz", x=rng.uniform(0, 1, (32, 3, 24, 48)).astype(np.float32))
    options = CompileOptions(targets=("tensorrt-int8",), max_error=0.05, benchmark=False, version="1.0.0",
                             input_shape={"x": (1, 3, 24, 48)})  # TensorRT needs the spatial dims fixed
    report = compile_model(str(model), options, tmp_path / "dist", calib=tmp_path / "calib.npz",
                           val=tmp_path / "calib.npz")
    (outcome,) = report.outcomes
    assert outcome.status == "written", outcome.error
    assert outcome.gate is not None and outcome.gate.metrics["max_abs_error"] <= 0.05


@pytest.mark.parametrize("name", ["pytorch-converted/test_AvgPool1d", "pytorch-operator/test_operator_selu",
                                  "pytorch-operator/test_operator_index", "pytorch-operator/test_operator_sqrt"])
def test_old_ir3_models_from_the_onnx_package_get_their_int8_build(name: str, tmp_path: Path) -> None:
    """IR 3, opset 6: weights listed as inputs, constants the opset-13 upgrade adds, constants onnxruntime's
    pre-processing merges; none of them may become an input the calibration has to feed. The sqrt model's test
    input is partly negative: where the source computes NaN there is nothing to compare, and the manifest
    still holds only finite numbers."""
    from onnx import numpy_helper

    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / name
    model = onnx.load(str(folder / "model.onnx"))
    assert model.ir_version == 3
    inits = {i.name for i in model.graph.initializer}
    (first,) = [i.name for i in model.graph.input if i.name not in inits]
    x = numpy_helper.to_array(onnx.load_tensor(str(folder / "test_data_set_0" / "input_0.pb")))
    rng = np.random.default_rng(8)
    batch = np.concatenate([x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype) if x.dtype.kind == "f" else x
                            for _ in range(4)])
    np.savez(tmp_path / "data.npz", **{first: batch})
    expected = numpy_helper.to_array(onnx.load_tensor(str(folder / "test_data_set_0" / "output_0.pb")))
    options = CompileOptions(targets=("onnx", "onnx-int8"), benchmark=False, version="1.0.0", name="op",
                             max_error=0.1 * float(np.nanmax(np.abs(expected))), calib_samples=len(batch))
    report = compile_model(str(folder / "model.onnx"), options, tmp_path / "dist", calib=tmp_path / "data.npz",
                           val=tmp_path / "data.npz")
    assert report.ok, [(o.target, o.status, o.error, o.gate and o.gate.reason) for o in report.outcomes]
