"""ONNX models the project did not write: classic CNN graphs built node by node with ``onnx.helper``, the
way public model zoos (Caffe2/ONNX model zoo, old exporters) wrote them, at old opsets and with the same
operation spelled in different ways.

Each builder returns a checked :class:`onnx.ModelProto` with small sizes (3 x 32 x 32 input, a few
channels) and random weights fixed by a seed. :func:`zoo_models` writes them all once per session; the
``zoo_models`` fixture is registered for every test under ``tests/compile`` by ``tests/compile/conftest.py``
(the TFLite tests reuse the same graphs).

The graphs:

* ``alexnet_opset8``: CaffeNet style: Conv(+group), Relu, LRN, MaxPool, Reshape to [1, -1] with a shape
  initializer, Gemm with transB=1, Dropout, Softmax. Fixed batch 1, like the zoo's files.
* ``squeezenet_opset9``: fire modules (squeeze 1x1, expand 1x1 and 3x3 joined by Concat), AveragePool,
  a 1x1 classifier conv, GlobalAveragePool, Flatten, Softmax. Fixed batch 1.
* ``batchnorm_opset9``: Conv without bias + BatchNormalization (epsilon, momentum attributes), Relu,
  MaxPool, Flatten, Gemm; logits out; dynamic batch.
* ``mixed_ops_opset9``: Pad as its own op (opset-9 attribute form), Conv with auto_pad SAME_UPPER (stride 2,
  so the padding is asymmetric), a residual Sum of three branches, Reshape with a [0, -1] initializer and
  a classifier written as MatMul + Add; dynamic batch.
* ``pad_reflect_opset11``: Pad with its pads as an input (opset 11) in reflect mode, a Conv with explicit
  asymmetric pads, Clip with min/max inputs, ReduceMean and a Gemm with alpha/beta; dynamic batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # without the compile extra the fixture skips; importing this module still works
    onnx = None  # type: ignore[assignment]

__all__ = ["BUILDERS", "INPUT_SHAPE", "NUM_CLASSES", "build_zoo", "zoo_models"]

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


class _Graph:
    """Collects nodes and initializers; names every node (zoo files do) and draws weights from one seed."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def weight(self, name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        std = scale if scale is not None else float(np.sqrt(2.0 / fan_in))
        return self.const(name, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, **attrs: Any) -> str:
        outs = [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{name}_node", **attrs))
        return outs[0]

    def conv(self, x: str, name: str, cin: int, cout: int, k: int, *, bias: bool = True, group: int = 1,
             **attrs: Any) -> str:
        inputs = [x, self.weight(f"{name}_w", (cout, cin // group, k, k))]
        if bias:
            inputs.append(self.weight(f"{name}_b", (cout,), scale=0.1))
        return self.node("Conv", inputs, name, kernel_shape=[k, k], group=group, **attrs)

    def model(self, name: str, x: str, y: str, batch: int | str, opset: int, out_shape: list[Any]) -> Any:
        ir_version = 3 if opset <= 8 else 4 if opset <= 9 else 5 if opset <= 10 else 6
        inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, *INPUT_SHAPE])]
        if ir_version < 4:  # IR 3 files list every weight as a graph input too, as the old zoo's do
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        graph = helper.make_graph(self.nodes, name, inputs,
                                  [helper.make_tensor_value_info(y, TensorProto.FLOAT, out_shape)],
                                  initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="zoo-style-builder", ir_version=ir_version)
        onnx.checker.check_model(model, full_check=True)
        return model


def alexnet_opset8() -> Any:
    g = _Graph(seed=8)
    x = "data_0"
    h = g.conv(x, "conv1", 3, 8, 5, pads=[2, 2, 2, 2], strides=[1, 1])
    h = g.node("Relu", [h], "relu1")
    h = g.node("LRN", [h], "norm1", size=5, alpha=1e-4, beta=0.75, bias=1.0)
    h = g.node("MaxPool", [h], "pool1", kernel_shape=[3, 3], strides=[2, 2])  # 32 -> 15
    h = g.conv(h, "conv2", 8, 16, 3, pads=[1, 1, 1, 1], group=2)
    h = g.node("Relu", [h], "relu2")
    h = g.node("LRN", [h], "norm2", size=5, alpha=1e-4, beta=0.75, bias=1.0)
    h = g.node("MaxPool", [h], "pool2", kernel_shape=[3, 3], strides=[2, 2])  # 15 -> 7
    h = g.node("Reshape", [h, g.const("flatten_shape", np.array([1, -1], np.int64))], "flatten")
    h = g.node("Gemm", [h, g.weight("fc6_w", (32, 16 * 7 * 7)), g.weight("fc6_b", (32,), 0.1)], "fc6",
               transB=1)
    h = g.node("Relu", [h], "relu6")
    h = g.node("Dropout", [h], "drop6", ratio=0.5)
    h = g.node("Gemm", [h, g.weight("fc8_w", (NUM_CLASSES, 32)), g.weight("fc8_b", (NUM_CLASSES,), 0.1)],
               "fc8", transB=1, alpha=1.0, beta=1.0)
    y = g.node("Softmax", [h], "prob_1")
    return g.model("alexnet", x, y, 1, 8, [1, NUM_CLASSES])


def squeezenet_opset9() -> Any:
    g = _Graph(seed=9)

    def fire(x: str, name: str, cin: int, squeeze: int, expand: int) -> str:
        s = g.node("Relu", [g.conv(x, f"{name}_squeeze1x1", cin, squeeze, 1)], f"{name}_relu_squeeze")
        e1 = g.node("Relu", [g.conv(s, f"{name}_expand1x1", squeeze, expand, 1)], f"{name}_relu_e1")
        e3 = g.node("Relu", [g.conv(s, f"{name}_expand3x3", squeeze, expand, 3, pads=[1, 1, 1, 1])],
                    f"{name}_relu_e3")
        return g.node("Concat", [e1, e3], f"{name}_concat", axis=1)

    x = "data"
    h = g.node("Relu", [g.conv(x, "conv1", 3, 8, 3, strides=[2, 2])], "relu_conv1")  # 32 -> 15
    h = g.node("MaxPool", [h], "pool1", kernel_shape=[3, 3], strides=[2, 2])  # 15 -> 7
    h = fire(h, "fire2", 8, 4, 8)
    h = fire(h, "fire3", 16, 4, 8)
    h = g.node("AveragePool", [h], "pool3", kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
               count_include_pad=0)
    h = g.node("Dropout", [h], "drop9", ratio=0.5)
    h = g.node("Relu", [g.conv(h, "conv10", 16, NUM_CLASSES, 1)], "relu_conv10")
    h = g.node("GlobalAveragePool", [h], "pool10")
    h = g.node("Flatten", [h], "flatten10", axis=1)
    y = g.node("Softmax", [h], "softmaxout_1", axis=1)
    return g.model("squeezenet", x, y, 1, 9, [1, NUM_CLASSES])


def batchnorm_opset9() -> Any:
    g = _Graph(seed=10)

    def conv_bn(x: str, name: str, cin: int, cout: int) -> str:
        h = g.conv(x, name, cin, cout, 3, bias=False, pads=[1, 1, 1, 1])
        bn = [h, g.const(f"{name}_bn_scale", g.rng.uniform(0.5, 1.5, cout).astype(np.float32)),
              g.const(f"{name}_bn_bias", g.rng.uniform(-0.2, 0.2, cout).astype(np.float32)),
              g.const(f"{name}_bn_mean", g.rng.uniform(-0.3, 0.3, cout).astype(np.float32)),
              g.const(f"{name}_bn_var", g.rng.uniform(0.5, 2.0, cout).astype(np.float32))]
        h = g.node("BatchNormalization", bn, f"{name}_bn", epsilon=1e-5, momentum=0.9)
        return g.node("Relu", [h], f"{name}_relu")

    x = "input"
    h = conv_bn(x, "conv1", 3, 8)
    h = g.node("MaxPool", [h], "pool1", kernel_shape=[2, 2], strides=[2, 2])  # 32 -> 16
    h = conv_bn(h, "conv2", 8, 16)
    h = g.node("MaxPool", [h], "pool2", kernel_shape=[2, 2], strides=[2, 2])  # 16 -> 8
    h = g.node("Flatten", [h], "flatten", axis=1)
    y = g.node("Gemm", [h, g.weight("fc_w", (16 * 8 * 8, NUM_CLASSES)), g.weight("fc_b", (NUM_CLASSES,), 0.1)],
               "logits")
    return g.model("batchnorm", x, y, "N", 9, ["N", NUM_CLASSES])


def mixed_ops_opset9() -> Any:
    g = _Graph(seed=11)
    x = "image"
    h = g.node("Pad", [x], "pad0", mode="constant", pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.0)
    h = g.node("Relu", [g.conv(h, "conv0", 3, 8, 3)], "relu0")  # 34 -> 32
    h = g.node("Relu", [g.conv(h, "down", 8, 8, 3, strides=[2, 2], auto_pad="SAME_UPPER")], "relu_down")  # 16
    a = g.conv(h, "branch_a", 8, 8, 3, auto_pad="SAME_UPPER")
    b = g.conv(h, "branch_b", 8, 8, 1)
    h = g.node("Relu", [g.node("Sum", [h, a, b], "residual_sum")], "relu_sum")
    h = g.node("MaxPool", [h], "pool", kernel_shape=[2, 2], strides=[2, 2])  # 16 -> 8
    h = g.node("Reshape", [h, g.const("reshape_shape", np.array([0, -1], np.int64))], "reshape")
    h = g.node("MatMul", [h, g.weight("fc_w", (8 * 8 * 8, NUM_CLASSES))], "fc_matmul")
    y = g.node("Add", [h, g.weight("fc_b", (NUM_CLASSES,), 0.1)], "logits")
    return g.model("mixed_ops", x, y, "batch", 9, ["batch", NUM_CLASSES])


def pad_reflect_opset11() -> Any:
    g = _Graph(seed=12)
    x = "pixels"
    pads = g.const("pads", np.array([0, 0, 2, 1, 0, 0, 2, 1], np.int64))
    h = g.node("Pad", [x, pads], "pad_reflect", mode="reflect")  # 32x32 -> 36x34
    h = g.conv(h, "conv", 3, 8, 3, strides=[2, 2], pads=[0, 1, 1, 0])  # -> 17x16
    h = g.node("Clip", [h, g.const("clip_min", np.array(0.0, np.float32)),
                        g.const("clip_max", np.array(6.0, np.float32))], "relu6")
    h = g.node("ReduceMean", [h], "spatial_mean", axes=[2, 3], keepdims=0)
    y = g.node("Gemm", [h, g.weight("fc_w", (8, NUM_CLASSES)), g.weight("fc_b", (NUM_CLASSES,), 0.1)], "logits",
               alpha=0.5, beta=2.0)
    return g.model("pad_reflect", x, y, "batch", 11, ["batch", NUM_CLASSES])


BUILDERS: dict[str, Callable[[], Any]] = {
    "alexnet_opset8": alexnet_opset8,
    "squeezenet_opset9": squeezenet_opset9,
    "batchnorm_opset9": batchnorm_opset9,
    "mixed_ops_opset9": mixed_ops_opset9,
    "pad_reflect_opset11": pad_reflect_opset11,
}


def build_zoo(directory: Path) -> dict[str, Path]:
    """Write every zoo graph as ``directory/<name>.onnx``; returns {name: path}."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, build in BUILDERS.items():
        paths[name] = directory / f"{name}.onnx"
        onnx.save(build(), str(paths[name]))
    return paths


@pytest.fixture(scope="session")
def zoo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{name: path} of the zoo-style ONNX files, written once per session."""
    pytest.importorskip("onnx")
    return build_zoo(tmp_path_factory.mktemp("zoo"))
