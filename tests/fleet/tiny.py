"""A tiny real bundle for fleet tests: an ONNX MatMul (batch, 4) -> (batch, 2), golden vectors, 300 kB of padding.

Small enough to publish many versions in a test, real enough that a device's smoke test runs it on
onnxruntime and checks its golden vectors. ``scale`` changes the weights (and so the outputs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeml.bundle import Manifest, TensorSpec
from edgeml.bundle_writer import write_bundle

__all__ = ["GOLDEN", "tiny_bundle", "tiny_model"]

GOLDEN = 8


def tiny_model(scale: float) -> bytes:
    """A real ONNX model: (batch, 4) -> (batch, 2) logits, a MatMul with fixed weights times ``scale``."""
    from onnx import TensorProto, helper, numpy_helper

    w = (np.arange(8, dtype=np.float32).reshape(4, 2) - 3.5) * scale
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["output"])], "tiny",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def tiny_bundle(out: Path, version: str, scale: float) -> Path:
    import onnxruntime as ort

    src = out / f"src-{version}"
    src.mkdir(parents=True)
    (src / "model.onnx").write_bytes(tiny_model(scale))
    (src / "pad.bin").write_bytes(np.random.default_rng(1).bytes(300_000))  # two broadcast chunks
    x = np.random.default_rng(0).standard_normal((GOLDEN, 4)).astype(np.float32)
    y = ort.InferenceSession(str(src / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.savez(src / "golden.npz", **{"in:input": x, "out:output": y})
    manifest = Manifest(
        name="tiny", version=version, target="onnx",
        runtime={"name": "onnxruntime", "min_version": "1.17", "precision": "fp32", "build": None},
        model={"file": "model.onnx", "format": "onnx"}, inputs=(TensorSpec("input", ("batch", 4), "float32"),),
        outputs=(TensorSpec("output", ("batch", 2), "float32"),),
        golden={"file": "golden.npz", "count": GOLDEN, "atol": 1e-4, "rtol": 0.0, "top1": True},
        created="2026-01-01T00:00:00+00:00")
    dest = out / manifest.filename
    write_bundle(dest, manifest, {"model.onnx": src / "model.onnx", "golden.npz": src / "golden.npz",
                                  "pad.bin": src / "pad.bin"})
    return dest
