"""Fixtures of the agent's update tests: real bundles of the trained digits model, a real signed registry
serving them over HTTP, and helpers to build model hosts and machines on them.

``digits_bundles`` (one session) writes, from the ``digits`` model:

* ``1.0.0`` and ``2.0.0``: good models (2.0.0 scales the logits by 1.02, so its outputs differ);
* ``2.0.1``: golden vectors that the model does not reproduce (a broken build);
* ``2.0.2``: the same logits behind a heavy side branch (tens of ms per request: too slow);
* ``2.0.3``: a model file onnxruntime refuses (valid bundle hashes, garbage content);
* ``2.0.4``: the logits scaled by 0.1: the same classes, but its confidence on live data collapses.

Golden vectors are computed with onnxruntime the way ``edgeml compile`` stores them (``in:``/``out:``
arrays, ``atol`` = 1e-3 x output scale, ``top1``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeml.bundle import Manifest, TensorSpec
from edgeml.bundle_writer import write_bundle
from tests.conftest import DigitsModel

GOLDEN_COUNT = 16
GOOD, BROKEN, SLOW, UNLOADABLE, SOFT = "2.0.0", "2.0.1", "2.0.2", "2.0.3", "2.0.4"


@dataclass(frozen=True)
class DigitsBundles:
    """Bundle files by version, and live-traffic inputs (validation samples past the golden ones)."""

    paths: dict[str, Path]
    traffic: np.ndarray


#: what a request to the slow version should take on the machine running the tests, whatever its speed (the
#: latency judge allows 15 ms of slack; a fixed amount of work took 50 ms on one 2-core machine, 14 on another)
SLOW_TARGET_MS = 60.0


def _slow_layers(digits: DigitsModel) -> int:
    """How many 1024x1024 MatMul layers make the slow version take :data:`SLOW_TARGET_MS` here."""
    import time

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(_graph(digits, "slow", layers=50), options, providers=["CPUExecutionProvider"])
    x = {session.get_inputs()[0].name: np.zeros((1, 1, 8, 8), np.float32)}
    session.run(None, x)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        session.run(None, x)
        best = min(best, time.perf_counter() - start)
    return int(min(5000, max(100, np.ceil(50 * SLOW_TARGET_MS / 1000 / best))))


def _graph(digits: DigitsModel, kind: str, layers: int = 300) -> bytes:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(digits.onnx))
    graph = model.graph
    out = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{o}_raw" if o == out else o for o in node.output]
    if kind in ("scaled", "soft"):
        factor = 1.02 if kind == "scaled" else 0.1
        graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "scale"))
        graph.node.append(helper.make_node("Mul", [f"{out}_raw", "scale"], [out]))
    elif kind == "slow":
        rng = np.random.default_rng(0)
        w0 = (rng.standard_normal((64, 1024)) / 8).astype(np.float32)
        w = (rng.standard_normal((1024, 1024)) / np.sqrt(1024)).astype(np.float32)
        graph.initializer.extend([numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w, "w"),
                                  numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
        nodes = [helper.make_node("Flatten", [graph.input[0].name], ["flat"], axis=1),
                 helper.make_node("MatMul", ["flat", "w0"], ["h0"])]
        for i in range(layers):
            nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
        nodes += [helper.make_node("ReduceSum", [f"h{layers}"], ["heavy"], keepdims=1),
                  helper.make_node("Mul", ["heavy", "zero"], ["nothing"]),
                  helper.make_node("Add", [f"{out}_raw", "nothing"], [out])]
        graph.node.extend(nodes)
    else:
        graph.node.append(helper.make_node("Identity", [f"{out}_raw"], [out]))
    return model.SerializeToString()


def write_digits_bundle(dest_dir: Path, version: str, model_bytes: bytes, golden_in: np.ndarray,
                        golden_out: np.ndarray | None = None) -> Path:
    """A bundle of the digits model ``model_bytes`` with golden vectors (computed here unless given)."""
    import onnxruntime as ort

    src = dest_dir / f"src-{version}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "model.onnx").write_bytes(model_bytes)
    if golden_out is None:
        session = ort.InferenceSession(str(src / "model.onnx"), providers=["CPUExecutionProvider"])
        golden_out = session.run(None, {"input": golden_in})[0]
    np.savez(src / "golden.npz", **{"in:input": golden_in, "out:output": golden_out})
    scale = max(1.0, float(np.abs(golden_out).max()))
    manifest = Manifest(
        name="digits", version=version, target="onnx",
        runtime={"name": "onnxruntime", "min_version": "1.17", "precision": "fp32", "build": None},
        model={"file": "model.onnx", "format": "onnx"},
        inputs=(TensorSpec("input", ("batch", 1, 8, 8), "float32"),),
        outputs=(TensorSpec("output", ("batch", 10), "float32"),),
        golden={"file": "golden.npz", "count": len(golden_in), "atol": 1e-3 * scale, "rtol": 0.0, "top1": True},
        created="2026-01-01T00:00:00+00:00",
    )
    dest = dest_dir / manifest.filename
    write_bundle(dest, manifest, {"model.onnx": src / "model.onnx", "golden.npz": src / "golden.npz"})
    return dest


@pytest.fixture(scope="session")
def digits_bundles(digits: DigitsModel, tmp_path_factory: pytest.TempPathFactory) -> DigitsBundles:
    out = tmp_path_factory.mktemp("bundles")
    with np.load(digits.val) as val:
        x = val["input"].astype(np.float32)
    golden_in = x[:GOLDEN_COUNT]
    plain, scaled = _graph(digits, "plain"), _graph(digits, "scaled")
    paths = {
        "1.0.0": write_digits_bundle(out, "1.0.0", plain, golden_in),
        GOOD: write_digits_bundle(out, GOOD, scaled, golden_in),
        SLOW: write_digits_bundle(out, SLOW, _graph(digits, "slow", layers=_slow_layers(digits)), golden_in),
        SOFT: write_digits_bundle(out, SOFT, _graph(digits, "soft"), golden_in),
        UNLOADABLE: write_digits_bundle(out, UNLOADABLE, b"not an onnx model", golden_in,
                                        np.zeros((GOLDEN_COUNT, 10), np.float32)),
    }
    import onnxruntime as ort

    session = ort.InferenceSession(plain, providers=["CPUExecutionProvider"])
    right = session.run(None, {"input": golden_in})[0]
    paths[BROKEN] = write_digits_bundle(out, BROKEN, scaled, golden_in, np.roll(right, 1, axis=1))
    return DigitsBundles(paths, x[GOLDEN_COUNT:])


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class ServedRegistry:
    """A signed registry holding every digits bundle, served over HTTP."""

    url: str
    root: Path  # the trusted root metadata (1.root.json) a device is provisioned with


@pytest.fixture(scope="session")
def served_registry(digits_bundles: DigitsBundles, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[ServedRegistry]:
    from edgeml.fleet.registry.repository import init_registry

    registry = init_registry(tmp_path_factory.mktemp("registry") / "reg")
    for path in digits_bundles.paths.values():
        registry.publish(path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(registry.dir / "repository")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ServedRegistry(f"http://127.0.0.1:{server.server_address[1]}", registry.metadata_dir / "1.root.json")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="session")
def compiled(digits: DigitsModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """digits 3.0.0 compiled for onnxruntime and LiteRT, with golden vectors and reference statistics."""
    from edgeml.compile import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("compiled")
    options = CompileOptions(targets=("onnx", "tflite"), name="digits", version="3.0.0", benchmark=False)
    report = compile_model(str(digits.onnx), options, out, calib=digits.calib, val=digits.val)
    assert report.ok, [(o.target, o.status) for o in report.outcomes]
    return {o.target: o.bundle for o in report.outcomes if o.bundle is not None}
