"""TensorRT: the build config and its validation, the engine cache key, device facts, the engine cache, the
backends' TensorRT-ready ONNX (checked structurally and run in onnxruntime), and real engine builds.

Everything runs everywhere except the tests marked ``tensorrt``: they build engines with the real
TensorRT and run them through :class:`TensorRTRuntime`, and skip (saying why) without TensorRT,
cuda-python or an NVIDIA GPU. Run them on a Jetson or a GPU host with ``pytest -m tensorrt``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeml.bundle import TensorSpec
from edgeml.compile.backends.base import BuildContext, BuildResult
from edgeml.compile.data import Dataset
from edgeml.compile.options import CompileOptions
from edgeml.compile.source import load_source
from edgeml.compile.targets import backend_for, get_target
from edgeml.edge_agent.runtimes.base import open_runtime, runtime_for
from edgeml.edge_agent.runtimes.tensorrt import TensorRTRuntime
from edgeml.errors import (
    ConfigError,
    ConversionError,
    DataError,
    EdgeMLError,
    MissingExtraError,
    RuntimeBackendError,
)
from edgeml.tensorrt import (
    BUILD_SCHEMA,
    EngineCache,
    ShapeProfile,
    TensorRTBuildConfig,
    build_engine,
    compute_capability_from_device_tree,
    cuda_ok,
    device_facts,
    engine_cache_key,
    parse_l4t_release,
    require_cudart,
)
from tests.compile.zoo import BUILDERS

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SHA = "ab" * 32
PROFILE = ShapeProfile("input", (1, 3, 16, 16), (1, 3, 16, 16), (8, 3, 16, 16))
CONFIG = TensorRTBuildConfig("int8", 512, (PROFILE,), 4)


# --- the build config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TensorRTBuildConfig(), CONFIG,
                                    replace(CONFIG, precision="fp16", profiles=())])
def test_build_config_round_trips(config: TensorRTBuildConfig) -> None:
    data = config.to_dict()
    assert data["schema"] == BUILD_SCHEMA
    assert TensorRTBuildConfig.from_dict(json.loads(json.dumps(data))) == config
    assert TensorRTBuildConfig.from_json(config.to_json()) == config


def _mutated(**changes: Any) -> dict[str, Any]:
    data = CONFIG.to_dict()
    for key, value in changes.items():
        if value is _DELETE:
            del data[key]
        else:
            data[key] = value
    return data


_DELETE = object()
_P = PROFILE.to_dict()


@pytest.mark.parametrize(("data", "message"), [
    (_mutated(precision="fp32"), "precision must be one of fp16, int8"),
    (_mutated(precision=_DELETE), "has no precision"),
    (_mutated(workspace_mb=0), "workspace_mb must be an integer at least 1"),
    (_mutated(workspace_mb="1024"), "workspace_mb must be an integer"),
    (_mutated(workspace_mb=True), "workspace_mb must be an integer"),
    (_mutated(builder_optimization_level=6), "between 0 and 5"),
    (_mutated(builder_optimization_level=-1), "between 0 and 5"),
    (_mutated(builder_optimization_level=2.5), "between 0 and 5"),
    (_mutated(schema="edgeml.tensorrt-build/2"), "this edgeml reads"),
    (_mutated(schema=_DELETE), "this edgeml reads"),
    (_mutated(max_batch=8), "unknown keys: max_batch"),
    (_mutated(profiles={"input": _P}), "profiles must be a list"),
    (_mutated(profiles=[{**_P, "min": [2, 3, 16, 16], "opt": [1, 3, 16, 16]}]), "min <= opt <= max"),
    (_mutated(profiles=[{**_P, "max": [8, 3, 16]}]), "different ranks"),
    (_mutated(profiles=[{**_P, "min": [0, 3, 16, 16]}]), "dimension must be an integer at least 1"),
    (_mutated(profiles=[{**_P, "min": []}]), "non-empty list of dimensions"),
    (_mutated(profiles=[{**_P, "input": ""}]), "needs an input name"),
    (_mutated(profiles=[{"input": "input", "min": [1]}]), "needs exactly"),
    (_mutated(profiles=[_P, _P]), "more than one profile"),
    ([1, 2], "must be a JSON object"),
])
def test_build_config_rejects_bad_values(data: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TensorRTBuildConfig.from_dict(data)


def test_build_config_rejects_bad_json() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        TensorRTBuildConfig.from_json(b"{precision: int8")


def test_build_config_for_inputs_profiles_only_dynamic_batch() -> None:
    specs = [TensorSpec("input", ("batch", 3, 16, 16), "float32"), TensorSpec("scale", (1, 4), "float32")]
    config = TensorRTBuildConfig.for_inputs(specs, "int8")
    assert config.profiles == (PROFILE,)
    assert (config.precision, config.workspace_mb, config.builder_optimization_level) == ("int8", 1024, 3)
    with pytest.raises(ConfigError, match=r"input 'input' has dynamic dimensions \[0, 2\]"):
        TensorRTBuildConfig.for_inputs([TensorSpec("input", ("batch", 3, "h", 16), "float32")])


# --- what identifies an engine ------------------------------------------------------------------------------

_KEY_ARGS: dict[str, Any] = {"bundle_sha256": SHA, "trt_version": "10.3.0", "compute_capability": "8.7",
                             "l4t_version": "36.4.0", "config": CONFIG}
_KEY_CHANGES = [
    ("bundle_sha256", "cd" * 32), ("trt_version", "10.3.1"), ("trt_version", "8.6.2"),
    ("compute_capability", "7.2"), ("compute_capability", None), ("l4t_version", "36.3.0"),
    ("l4t_version", None), ("config", replace(CONFIG, precision="fp16")),
    ("config", replace(CONFIG, workspace_mb=1024)), ("config", replace(CONFIG, builder_optimization_level=3)),
    ("config", replace(CONFIG, profiles=(replace(PROFILE, max=(16, 3, 16, 16)),))),
    ("config", replace(CONFIG, profiles=(replace(PROFILE, opt=(4, 3, 16, 16)),))),
    ("config", replace(CONFIG, profiles=())),
]


def test_cache_key_is_stable() -> None:
    key = engine_cache_key(**_KEY_ARGS)
    same = engine_cache_key(**{**_KEY_ARGS, "config": TensorRTBuildConfig.from_json(CONFIG.to_json())})
    assert key == same and len(key) == 64 and int(key, 16) >= 0


def test_cache_key_changes_with_every_field() -> None:
    keys = [engine_cache_key(**{**_KEY_ARGS, f: v}) for f, v in _KEY_CHANGES]
    keys.append(engine_cache_key(**_KEY_ARGS))
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize(("field", "value"), [("bundle_sha256", "AB" * 32), ("bundle_sha256", "ab" * 31),
                                              ("bundle_sha256", ""), ("trt_version", "")])
def test_cache_key_rejects_bad_identity(field: str, value: str) -> None:
    with pytest.raises(ConfigError):
        engine_cache_key(**{**_KEY_ARGS, field: value})


# --- device facts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, "
     "DATE: Mon May  6 17:34:21 UTC 2024\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n",
     "36.3.0"),
    ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
     "DATE: Wed Jan  8 01:49:37 UTC 2025\n", "36.4.3"),
    ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
     "DATE: Tue Aug  1 19:57:35 UTC 2023\n", "35.4.1"),
    ("# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref, EABI: aarch64, "
     "DATE: Fri Jun  9 04:25:08 UTC 2023\n", "32.7.4"),
    ("#R36 (release),REVISION:2.0", "36.2.0"),
    ("", None),
    ("Ubuntu 22.04.4 LTS", None),
    ("# R36 (pre-release), REVISION: 3.0", None),
])
def test_l4t_release_parser(text: str, expected: str | None) -> None:
    assert parse_l4t_release(text) == expected


@pytest.mark.parametrize(("compatible", "expected"), [
    (b"nvidia,p3768-0000+p3767-0005\0nvidia,p3767-0005\0nvidia,tegra234\0", "8.7"),
    (b"nvidia,p2822-0000+p2888-0004\0nvidia,galen\0nvidia,tegra194\0", "7.2"),
    (b"nvidia,p3449-0000-b00+p3448-0002-b00\0nvidia,jetson-nano\0nvidia,tegra210\0", "5.3"),
    (b"raspberrypi,4-model-b\0brcm,bcm2711\0", None),
    (b"", None),
])
def test_compute_capability_from_device_tree(compatible: bytes, expected: str | None) -> None:
    assert compute_capability_from_device_tree(compatible) == expected


def test_device_facts_read_the_jetson_files(tmp_path: Path) -> None:
    (tmp_path / "release").write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic\n")
    (tmp_path / "compatible").write_bytes(b"nvidia,p3737-0000+p3701-0005\0nvidia,tegra234\0")
    facts = device_facts(release_file=tmp_path / "release", compatible_file=tmp_path / "compatible",
                         probe_cuda=False)
    assert (facts.l4t_version, facts.compute_capability) == ("36.4.0", "8.7")
    absent = tmp_path / "absent"
    none = device_facts(release_file=absent, compatible_file=absent, probe_cuda=False)
    assert (none.l4t_version, none.compute_capability) == (None, None)


# --- the engine cache --------------------------------------------------------------------------------------


def test_engine_cache_stores_atomically_and_builds_once(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    key, other = engine_cache_key(**_KEY_ARGS), engine_cache_key(**{**_KEY_ARGS, "trt_version": "10.4.0"})
    assert cache.get(key) is None and cache.keys() == []
    builds: list[int] = []

    def build() -> bytes:
        builds.append(1)
        return b"engine-bytes"

    assert cache.get_or_build(key, build) == (b"engine-bytes", False)
    assert cache.get_or_build(key, build) == (b"engine-bytes", True)
    assert len(builds) == 1
    cache.put(other, b"other")
    assert sorted(os.listdir(cache.directory)) == sorted([f"{key}.engine", f"{other}.engine"])  # no temps
    assert cache.prune(keep=[key]) == [other] and cache.keys() == [key]
    cache.discard(key)
    cache.discard(key)
    assert cache.keys() == []


@pytest.mark.parametrize("key", ["../" + "a" * 61, "A" * 64, "a" * 63, ""])
def test_engine_cache_refuses_keys_that_are_not_hashes(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError):
        EngineCache(tmp_path).put(key, b"x")


# --- the backend: TensorRT-ready ONNX --------------------------------------------------------------------


def _context(model: Path, workdir: Path, calib: np.ndarray, **options: Any) -> BuildContext:
    workdir.mkdir(parents=True, exist_ok=True)
    source = load_source(str(model), workdir)
    opts = CompileOptions(targets=("tensorrt-fp16", "tensorrt-int8"), **options)
    return BuildContext(source, opts, Dataset({"input": calib}, source="calib"), workdir)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"input": x})[0]
    return out


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small CNN (Conv+BN+ReLU x2, MaxPool, GAP, Linear; 3x16x16 -> 10) with a dynamic batch, built
    for both TensorRT targets with calibration on random-but-fixed data."""
    from edgeml.train.digits import export_onnx
    from edgeml.train.models import small_cnn

    work = tmp_path_factory.mktemp("trt-cnn")
    torch.manual_seed(0)
    model = small_cnn(in_channels=3, width=8).eval()
    x = np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32)
    export_onnx(model, x, str(work / "cnn.onnx"))
    ctx = _context(work / "cnn.onnx", work / "build", x)
    built = {t: backend_for(get_target(t)).build(ctx) for t in ("tensorrt-fp16", "tensorrt-int8")}
    return {"onnx": work / "cnn.onnx", "x": x, "built": built, "ctx": ctx}


@pytest.mark.parametrize("target", ["tensorrt-fp16", "tensorrt-int8"])
def test_backend_emits_onnx_and_build_config(cnn: dict[str, Any], target: str) -> None:
    built: BuildResult = cnn["built"][target]
    precision = target.split("-")[1]
    assert sorted(built.files) == ["model.onnx", "tensorrt_build.json"]
    assert all(p.is_file() for p in built.files.values())
    config = TensorRTBuildConfig.from_json(built.files["tensorrt_build.json"].read_bytes())
    assert config == TensorRTBuildConfig("int8" if precision == "int8" else "fp16", 1024, (PROFILE,), 3)
    assert built.runtime == {"name": "tensorrt", "min_version": "8.6", "precision": precision,
                             "build": config.to_dict()}
    assert (built.model_file, built.model_format, built.eval_runtime) == ("model.onnx", "onnx", "onnxruntime")
    assert built.eval_path == built.files["model.onnx"] and built.proxy and "TensorRT" in built.proxy
    assert built.quantized_onnx == (built.eval_path if precision == "int8" else None)
    dims = onnx.load(str(built.eval_path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 16, 16]


def test_fp16_target_ships_the_fp32_model(cnn: dict[str, Any]) -> None:
    x = cnn["x"]
    expected, got = _run(cnn["onnx"], x), _run(cnn["built"]["tensorrt-fp16"].eval_path, x)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))


def _initializers(model: Any) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def _assert_tensorrt_form(model: Any) -> dict[str, np.ndarray]:
    """What TensorRT's explicit quantization needs: symmetric int8 Q/DQ (zero point 0), per-tensor
    activation scales, Q/DQ pairs on float weights (never DequantizeLinear of an int8/int32 constant), and
    one consumer per DequantizeLinear."""
    onnx.checker.check_model(model)
    inits = _initializers(model)
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for node in quantize:
        zero = inits[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name
    assert all(inits[n.input[1]].ndim == 0 for n in quantize if n.input[0] not in inits)
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert not [n.name for n in dequantize if n.input[0] in inits]
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    assert not [n.name for n in dequantize if uses.get(n.output[0], 0) > 1]
    assert not {i.name for i in model.graph.input} & set(inits)
    return inits


def test_int8_onnx_is_symmetric_with_per_channel_weights(cnn: dict[str, Any]) -> None:
    model = onnx.load(str(cnn["built"]["tensorrt-int8"].eval_path))
    inits = _assert_tensorrt_form(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert len(activations) >= 6  # input, both convs and relus, pooling, classifier output
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert [n.op_type for n in layers] == ["Conv", "Conv", "Gemm"]
    for layer, channels in zip(layers, (8, 16, 10)):
        dq = producer[layer.input[1]]
        q = producer[dq.input[0]]
        weight, scale = inits[q.input[0]], inits[q.input[1]]
        axis = {a.name: a.i for a in q.attribute}["axis"]
        assert (dq.op_type, q.op_type, weight.dtype) == ("DequantizeLinear", "QuantizeLinear", np.float32)
        assert axis == 0 and weight.shape[0] == channels and scale.shape == (channels,)
        assert len(layer.input) == 3 and inits[layer.input[2]].dtype == np.float32  # FP32 bias


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_zoo_graphs_get_the_tensorrt_form(zoo_models: dict[str, Path], name: str, tmp_path: Path) -> None:
    """Old opsets, IR 3 weights-as-inputs, fixed batches and branches shared by several layers."""
    calib = np.random.default_rng(1).standard_normal((32, 3, 32, 32)).astype(np.float32)
    source = load_source(str(zoo_models[name]), tmp_path)
    opts = CompileOptions(targets=("tensorrt-int8",))
    ctx = BuildContext(source, opts, Dataset({source.inputs[0].name: calib}), tmp_path)
    built = backend_for(get_target("tensorrt-int8")).build(ctx)
    _assert_tensorrt_form(onnx.load(str(built.eval_path)))
    batch = source.inputs[0].shape[0]
    x = calib[: batch if isinstance(batch, int) else 8]
    feed = {source.inputs[0].name: x}
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in (built.eval_path.parent / "ort-qdq.onnx", built.eval_path)]
    ort_form, trt_form = (s.run(None, feed)[0] for s in sessions)
    assert np.abs(trt_form - ort_form).max() <= 1e-5 * max(1.0, float(np.abs(ort_form).max()))
    profiles = built.runtime["build"]["profiles"]
    assert profiles == ([] if isinstance(batch, int) else
                        [{"input": source.inputs[0].name, "min": [1, 3, 32, 32], "opt": [1, 3, 32, 32],
                          "max": [8, 3, 32, 32]}])


def test_tensorrt_form_computes_what_onnxruntimes_qdq_computes(cnn: dict[str, Any]) -> None:
    built = cnn["built"]["tensorrt-int8"]
    x = cnn["x"]
    ort_form = _run(built.eval_path.parent / "ort-qdq.onnx", x)
    trt_form = _run(built.eval_path, x)
    assert np.abs(trt_form - ort_form).max() <= 1e-5 * max(1.0, float(np.abs(ort_form).max()))


def test_int8_onnx_agrees_with_fp32_on_a_trained_classifier(digits: Any, tmp_path: Path) -> None:
    calib = np.load(digits.calib)["input"]
    val = np.load(digits.val)
    ctx = _context(digits.onnx, tmp_path, calib)
    built = backend_for(get_target("tensorrt-int8")).build(ctx)
    fp32, int8 = _run(digits.onnx, val["input"]), _run(built.eval_path, val["input"])
    agreement = float((fp32.argmax(1) == int8.argmax(1)).mean())
    accuracy = float((int8.argmax(1) == val["labels"]).mean())
    assert agreement >= 0.97, agreement
    assert 100 * (digits.val_accuracy - accuracy) <= 1.0, (digits.val_accuracy, accuracy)


def test_build_engine_without_tensorrt_names_the_fix(cnn: dict[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, as on a CPU host
    ctx = _context(cnn["onnx"], tmp_path, cnn["x"], build_engine=True)
    with pytest.raises(MissingExtraError) as info:
        backend_for(get_target("tensorrt-fp16")).build(ctx)
    assert info.value.module == "tensorrt" and "JetPack" in str(info.value)


def test_runtime_without_tensorrt_fails_clearly(cnn: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert runtime_for("tensorrt") is TensorRTRuntime and TensorRTRuntime.version() is None
    runtime = open_runtime("tensorrt", cnn["built"]["tensorrt-fp16"].eval_path)
    with pytest.raises(RuntimeBackendError, match="before load"):
        runtime.infer({"input": cnn["x"][:1]})
    with pytest.raises(MissingExtraError, match="tensorrt is not installed"):
        runtime.load()


# --- real TensorRT (Jetson or GPU host) ------------------------------------------------------------------


def _why_no_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"TensorRT is not importable ({exc})"
    try:
        cudart = require_cudart()
        count = cuda_ok(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except (EdgeMLError, RuntimeError) as exc:
        return f"no usable NVIDIA GPU: {exc}"
    return None if count > 0 else "no NVIDIA GPU"


@pytest.fixture
def trt_gpu() -> None:
    reason = _why_no_tensorrt()
    if reason:
        pytest.skip(reason)


def _trt_infer(path: Path, x: np.ndarray, **options: Any) -> np.ndarray:
    with open_runtime("tensorrt", path, **options) as rt:
        return rt.infer({"input": x})["output"]


@pytest.mark.tensorrt
@pytest.mark.usefixtures("trt_gpu")
def test_fp16_engine_matches_fp32_and_is_cached(cnn: dict[str, Any], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    built = cnn["built"]["tensorrt-fp16"]
    x, cache = cnn["x"][:8], tmp_path / "engines"
    expected = _run(cnn["onnx"], x)
    options = {"build_config": built.runtime["build"], "cache_dir": cache}
    got = _trt_infer(built.eval_path, x, **options)
    assert np.abs(got - expected).max() <= 2e-2 * max(1.0, float(np.abs(expected).max()))
    keys = EngineCache(cache).keys()
    assert len(keys) == 1

    def no_build(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the cached engine should have been reused")

    monkeypatch.setattr("edgeml.edge_agent.runtimes.tensorrt.build_engine", no_build)
    with open_runtime("tensorrt", built.eval_path, **options) as rt:
        one = rt.infer({"input": x[:1]})["output"]
        assert np.abs(one - expected[:1]).max() <= 2e-2 * max(1.0, float(np.abs(expected).max()))
        with pytest.raises(DataError, match="outside the engine's range"):
            rt.infer({"input": cnn["x"][:9]})
    assert EngineCache(cache).keys() == keys


@pytest.mark.tensorrt
@pytest.mark.usefixtures("trt_gpu")
def test_int8_engine_keeps_the_accuracy(digits: Any, tmp_path: Path) -> None:
    calib, val = np.load(digits.calib)["input"], np.load(digits.val)
    built = backend_for(get_target("tensorrt-int8")).build(_context(digits.onnx, tmp_path / "b", calib))
    fp32 = _run(digits.onnx, val["input"])
    # the build config travels beside the model in a bundle: the runtime finds it there
    with open_runtime("tensorrt", built.eval_path) as rt:  # one engine build, then batches of up to 8
        int8 = np.concatenate([rt.infer({"input": val["input"][i:i + 8]})["output"]
                               for i in range(0, len(val["input"]), 8)])
    agreement = float((fp32.argmax(1) == int8.argmax(1)).mean())
    accuracy = float((int8.argmax(1) == val["labels"]).mean())
    assert agreement >= 0.97, agreement
    assert 100 * (digits.val_accuracy - accuracy) <= 1.0, (digits.val_accuracy, accuracy)


@pytest.mark.tensorrt
@pytest.mark.usefixtures("trt_gpu")
def test_compile_can_build_the_engine_here(cnn: dict[str, Any], tmp_path: Path) -> None:
    ctx = _context(cnn["onnx"], tmp_path, cnn["x"], build_engine=True)
    built = backend_for(get_target("tensorrt-int8")).build(ctx)
    assert sorted(built.files) == ["model.engine", "model.onnx", "tensorrt_build.json"]
    assert any("engine built here" in n for n in built.notes)
    expected = _run(built.eval_path, cnn["x"][:4])
    got = _trt_infer(built.files["model.engine"], cnn["x"][:4])
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.75


@pytest.mark.tensorrt
@pytest.mark.usefixtures("trt_gpu")
def test_build_engine_reports_parser_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not a model")
    with pytest.raises(ConversionError, match="TensorRT cannot parse bad.onnx"):
        build_engine(bad, TensorRTBuildConfig())
