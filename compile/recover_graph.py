"""Graph facts the INT8 recovery search needs: node names, producers and consumers, compute per layer.

* :func:`assign_names` gives every node without a name (or with a name already taken) a deterministic one,
  ``<OpType>_<index in graph order>``, so that layers of a graph exported without names can be kept in float
  (``--exclude-node`` needs a name). Two runs on the same model assign the same names.
* :func:`layer_macs` counts the multiply-accumulates of each compute layer (Conv, ConvTranspose, Gemm, MatMul)
  per sample, from the shapes that shape inference found, so a float layer's share of compute is reported.
* :func:`float_island` lists the nodes to keep in float so that a tensor is never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeml._deps import require

__all__ = ["COMPUTE_OPS", "PASS_THROUGH", "GraphIndex", "assign_names", "float_island", "layer_macs"]

#: Layers that hold weights and do the arithmetic: what "a layer kept in float" counts.
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Ops between a compute layer and the tensor a diagnosis blames (the same walk as the diagnosis's).
PASS_THROUGH = frozenset({"Relu", "Clip", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                          "Identity", "LeakyRelu", "Sigmoid", "HardSigmoid", "Dropout", "GlobalMaxPool"})


@dataclass
class GraphIndex:
    """Producers, consumers, initializers and inferred shapes of one ONNX model (read-only views)."""

    model: Any

    def __post_init__(self) -> None:
        graph = self.model.graph
        self.producer: dict[str, Any] = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in dict.fromkeys(node.input):
                self.consumers.setdefault(name, []).append(node)
        self.inits: dict[str, Any] = {i.name: i for i in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.shapes: dict[str, tuple[int | None, ...]] = {}
        for value in [*graph.input, *graph.value_info, *graph.output]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                dims = value.type.tensor_type.shape.dim
                self.shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                                                else None for d in dims)

    def const(self, name: str) -> np.ndarray | None:
        """The value of initializer ``name`` (None when it is not a constant)."""
        init = self.inits.get(name)
        if init is None:
            return None
        numpy_helper = require("onnx.numpy_helper", "compile")
        return np.asarray(numpy_helper.to_array(init))


def assign_names(model: Any) -> int:
    """Name every unnamed node, and every node whose name an earlier node took, ``<OpType>_<index>``
    (index: position in graph order; ``_2``, ``_3``... appended while that is taken). In place; returns how
    many nodes were named."""
    taken = {n.name for n in model.graph.node if n.name}
    seen: set[str] = set()
    named = 0
    for index, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.op_type}_{index}"
        name, k = base, 1
        while name in taken or name in seen:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        seen.add(name)
        taken.add(name)
        named += 1
    return named


def name_model_file(src: Path, out: Path) -> tuple[Path, int]:
    """``src`` with :func:`assign_names` applied, saved at ``out`` (``src`` itself when nothing changed)."""
    onnx = require("onnx", "compile")
    model = onnx.load(str(src))
    named = assign_names(model)
    if not named:
        return src, 0
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out, named


def _attr(node: Any, name: str, default: Any) -> Any:
    helper = require("onnx.helper", "compile")
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _prod(dims: tuple[int | None, ...]) -> int | None:
    total = 1
    for d in dims:
        if d is None:
            return None
        total *= d
    return total


def _node_macs(node: Any, g: GraphIndex) -> int:
    """Multiply-accumulates of one compute node per sample (batch dim left out); the weight's size times
    the output positions, or the weight's size alone when the output shape is unknown."""
    weight = g.const(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return 0
    out_shape = g.shapes.get(node.output[0], ())
    if node.op_type == "Conv":  # each output position meets every weight of its channel's filter
        spatial = _prod(out_shape[2:]) if len(out_shape) > 2 else None
        return int(weight.size * (spatial or 1))
    if node.op_type == "ConvTranspose":  # every input position meets every weight
        in_shape = g.shapes.get(node.input[0], ())
        positions = _prod(in_shape[2:]) if len(in_shape) > 2 else None
        return int(weight.size * (positions or 1))
    # Gemm / MatMul: weight size times the rows between the batch dim and the last one
    rows = _prod(out_shape[1:-1]) if len(out_shape) > 2 else 1
    return int(weight.size * (rows or 1))


def layer_macs(model: Any) -> dict[str, int]:
    """Node name -> multiply-accumulates per sample, for every compute layer with a constant weight."""
    g = GraphIndex(model)
    return {n.name: _node_macs(n, g) for n in model.graph.node if n.op_type in COMPUTE_OPS}


def float_island(tensor: str, g: GraphIndex) -> list[str]:
    """Nodes to keep in float so that ``tensor`` is never quantized: its producers back through pass-through
    ops to the compute layer, and every consumer. Names in graph order (unnamed nodes left out)."""
    names: list[str] = []
    node = g.producer.get(tensor)
    while node is not None:
        names.append(node.name)
        if node.op_type not in PASS_THROUGH or not node.input:
            break
        node = g.producer.get(node.input[0])
    names += [n.name for n in g.consumers.get(tensor, [])]
    order = {n.name: i for i, n in enumerate(g.model.graph.node)}
    return sorted({n for n in names if n}, key=lambda n: order.get(n, 0))
