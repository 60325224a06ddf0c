"""Function-preserving rescaling that takes outlier channels out of an activation, keeping every layer INT8.

An activation ``x`` feeding linear layers (Conv, Gemm, MatMul with constant weights) can have channel ``i``
divided by ``s_i > 0`` when the op that computes it can absorb the division, and the consumers' weights for
input channel ``i`` are multiplied by ``s_i``: the FP32 function is unchanged, but the activation's range,
which one INT8 scale must cover, loses its outliers. Between the absorber and the consumers, only ops that
commute with a positive per-channel scale may sit: Relu, LeakyRelu, PRelu, max/average pooling, Identity,
Dropout, an Add of a constant (scaled too), and a Flatten/Reshape/Squeeze that keeps the channels
(``N x C x 1 x 1`` to ``N x C``).

* **Equalization** (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
  Correction"), where the absorber is itself a linear layer: ``s_i = sqrt(r1_i / r2_i)``, with ``r1_i`` the
  range of the absorber's output channel ``i`` weights and ``r2_i`` that of the consumers' input channel
  ``i`` weights, iterated over chains of layers until the scales settle. Data-free.
* **Smoothing** (SmoothQuant, Xiao et al. 2023), where the absorber is an affine op (a Mul by a constant,
  BatchNormalization, LayerNormalization) and equalization does not apply, and as a second, data-driven
  candidate everywhere: ``s_i = max|x_i|^a / max|w_i|^(1-a)`` (``a = 0.5``) from the calibration data,
  divided by its median so that ordinary channels stay as they were.

A position whose tensor is also a graph output, or is read by anything but the scaled consumers, is left
alone. :func:`rescale` writes the rescaled model; the caller checks its FP32 parity with the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml._deps import require
from edgeml.compile.data import Dataset
from edgeml.compile.recover_graph import GraphIndex, assign_names

__all__ = ["Position", "RescalePlan", "find_positions", "rescale"]

_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
                          "GlobalMaxPool", "Identity", "Dropout"})
_RESHAPES = frozenset({"Flatten", "Reshape", "Squeeze"})
_AFFINE = frozenset({"Mul", "BatchNormalization", "LayerNormalization"})
_ALPHA = 0.5
_SCALE_LIMIT = 1e6
_ITERATIONS = 20
_MAX_SAMPLES = 256


@dataclass
class Position:
    """One activation whose channels can be rescaled.

    Attributes:
        tensor: The activation the consumers read.
        absorber: The node whose output channels are divided by the scales.
        chain: Nodes between the absorber and ``tensor`` (an Add of a constant among them is scaled too).
        consumers: The linear layers whose input channels are multiplied by the scales.
        axis: The channel axis at the absorber's output (1 for NCHW, -1 for features last).
        channels: How many channels.
    """

    tensor: str
    absorber: Any
    chain: list[Any]
    consumers: list[Any]
    axis: int
    channels: int

    @property
    def kind(self) -> str:
        return "equalize" if self.absorber.op_type in ("Conv", "Gemm", "MatMul") else "smooth"

    @property
    def layers(self) -> list[str]:
        return [self.absorber.name, *(c.name for c in self.consumers)]


@dataclass
class RescalePlan:
    """What :func:`rescale` did: each position's kind, layers and channel count."""

    positions: list[dict[str, Any]] = field(default_factory=list)
    names_assigned: int = 0  # nodes that had no name (the layers' names in ``positions`` are the given ones)


def _attr(node: Any, name: str, default: Any) -> Any:
    helper = require("onnx.helper", "compile")
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _consumer_axis(node: Any, tensor: str, g: GraphIndex) -> tuple[int, int] | None:
    """(channel axis of ``tensor`` for this consumer, channel count), or None when it cannot be scaled."""
    if not node.input or node.input[0] != tensor or len(node.input) < 2:
        return None
    w = g.const(node.input[1])
    if w is None or tensor in node.input[1:]:
        return None
    if node.op_type == "Conv":
        group = int(_attr(node, "group", 1))
        if group == 1:
            return 1, w.shape[1]
        if w.shape[1] == 1 and group == w.shape[0]:  # depthwise
            return 1, w.shape[0]
        return None
    if node.op_type == "Gemm" and not _attr(node, "transA", 0) and w.ndim == 2:
        return -1, w.shape[1] if _attr(node, "transB", 0) else w.shape[0]
    if node.op_type == "MatMul" and w.ndim == 2:
        return -1, w.shape[0]
    return None


def _channel_reshape(node: Any, g: GraphIndex) -> bool:
    """A Flatten/Reshape/Squeeze from N x C x 1 x ... to N x C keeps channel i at position i."""
    before, after = g.shapes.get(node.input[0]), g.shapes.get(node.output[0])
    return bool(before and after and len(after) == 2 and len(before) >= 2 and after[1] == before[1]
                and all(d == 1 for d in before[2:]))


def _only_for(tensor: str, node: Any, g: GraphIndex) -> bool:
    return tensor not in g.outputs and [n.name for n in g.consumers.get(tensor, [])] == [node.name]


def _absorbs(node: Any, axis: int, g: GraphIndex) -> bool:
    rank = len(g.shapes.get(node.output[0], ()))
    last = axis == -1 or (rank and axis == rank - 1)
    consts = [g.const(i) for i in node.input[1:]]
    if node.op_type in ("Conv", "Gemm") and any(c is None for c, name in zip(consts, node.input[1:]) if name):
        return False  # a weight or bias computed at run time cannot be rescaled here
    if node.op_type == "Conv":
        return axis == 1 and len(consts) >= 1
    if node.op_type in ("Gemm", "MatMul"):
        ok = bool(last) and len(consts) >= 1 and consts[0] is not None and consts[0].ndim == 2
        return ok and not (node.op_type == "Gemm" and _attr(node, "transA", 0)) and g.const(node.input[0]) is None
    if node.op_type == "BatchNormalization":
        return axis == 1 and len(node.output) == 1
    if node.op_type == "LayerNormalization":
        return bool(last) and int(_attr(node, "axis", -1)) in (-1, rank - 1)
    if node.op_type == "Mul":
        return sum(c is not None for c in consts + [g.const(node.input[0])]) == 1 and rank > 0
    return False


def find_positions(g: GraphIndex) -> list[Position]:
    """Every activation whose channels can be rescaled without changing the model's function."""
    found = []
    for tensor, users in g.consumers.items():
        if tensor in g.outputs or tensor in g.inits or not users:
            continue
        axes = [_consumer_axis(u, tensor, g) for u in users]
        if any(a is None for a in axes) or len({a for a in axes}) != 1:
            continue
        axis, channels = axes[0]  # type: ignore[misc]
        rank = len(g.shapes.get(tensor, ()))
        if axis == 1 and rank == 2:
            axis = -1
        chain: list[Any] = []
        node, current = g.producer.get(tensor), tensor
        while node is not None:
            if chain and not _only_for(current, chain[-1], g):
                node = None
                break
            if node.op_type in _HOMOGENEOUS or (node.op_type in _RESHAPES and _channel_reshape(node, g)):
                axis = 1 if node.op_type in _RESHAPES else axis
            elif node.op_type == "Add" and sum(g.const(i) is not None for i in node.input) == 1:
                pass
            elif _absorbs(node, axis, g):
                break
            else:
                node = None
                break
            chain.append(node)
            current = next(i for i in node.input if g.const(i) is None)
            node = g.producer.get(current)
        if node is not None and (not chain or _only_for(current, chain[-1], g)):
            found.append(Position(tensor, node, chain[::-1], list(users), axis, int(channels)))
    return found


class _Weights:
    """Initializer values to rescale, cloned where several nodes share one."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.g = GraphIndex(model)
        self.values: dict[str, np.ndarray] = {}
        self.uses: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1

    def get(self, node: Any, index: int) -> np.ndarray:
        name = node.input[index]
        if self.uses.get(name, 0) > 1 and name not in self.values:  # shared: this node gets its own copy
            new = f"{name}_rescaled_{node.name or id(node)}"
            self.uses[name] -= 1
            self.uses[new] = 1
            self.values[new] = np.array(self.g.const(name), copy=True)
            node.input[index] = new
            name = new
        if name not in self.values:
            self.values[name] = np.array(self.g.const(name), copy=True)
        return self.values[name]

    def set(self, node: Any, index: int, value: np.ndarray) -> None:
        self.values[node.input[index]] = value

    def save(self, out: Path) -> None:
        onnx = require("onnx", "compile")
        from onnx import numpy_helper

        graph = self.model.graph
        keep = [i for i in graph.initializer if i.name not in self.values]
        added = [numpy_helper.from_array(v, n) for n, v in self.values.items()]  # each keeps its own dtype
        used = {name for node in graph.node for name in node.input}
        del graph.initializer[:]
        graph.initializer.extend([i for i in keep if i.name in used or i.name in {v.name for v in graph.input}])
        graph.initializer.extend(added)
        onnx.checker.check_model(self.model)
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(self.model, str(out))


def _along(value: np.ndarray, s: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """``value`` (broadcastable to a rank-``rank`` tensor) with channel ``i`` of ``axis`` divided by s_i; the
    result has the channel dimension in full (a scalar constant becomes a per-channel one)."""
    v = value.reshape((1,) * (rank - value.ndim) + value.shape).astype(np.float64)
    shape = [1] * rank
    shape[axis] = len(s)
    return (v / s.reshape(shape)).astype(value.dtype)


def _bias(b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """A Conv/Gemm bias (one value, one per channel, or a Gemm ``C`` of M x N) over the output channels."""
    if b.size == len(s):
        return (b.reshape(-1).astype(np.float64) / s).reshape(b.shape).astype(b.dtype)
    if b.size == 1:
        return (np.full(len(s), float(b.reshape(-1)[0])) / s).astype(b.dtype)
    return (b.astype(np.float64) / s).astype(b.dtype)


def _out_axis(node: Any) -> int:
    """The weight axis of a linear absorber's output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return 1  # MatMul


def _in_axis(node: Any, w: np.ndarray) -> int:
    """The weight axis of a consumer's input channels."""
    if node.op_type == "Conv":
        return 0 if int(_attr(node, "group", 1)) > 1 else 1
    if node.op_type == "Gemm":
        return 1 if _attr(node, "transB", 0) else 0
    return 0  # MatMul


def _ranges(w: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1).astype(np.float64)


def _scale_weight(w: np.ndarray, s: np.ndarray, axis: int, divide: bool) -> np.ndarray:
    shape = [1] * w.ndim
    shape[axis] = len(s)
    factor = s.reshape(shape)
    return (w.astype(np.float64) / factor if divide else w.astype(np.float64) * factor).astype(w.dtype)


def _consumer_range(p: Position, ws: _Weights) -> np.ndarray:
    rows = [_ranges(w, _in_axis(c, w)) for c in p.consumers for w in [ws.get(c, 1)]]
    return np.max(rows, axis=0)


def _apply(p: Position, s: np.ndarray, ws: _Weights) -> None:
    """Divide the absorber's output channels by ``s``, multiply the consumers' input channels by it."""
    a, g = p.absorber, ws.g
    rank = len(g.shapes.get(a.output[0], ())) or 2
    axis = p.axis % rank
    if a.op_type in ("Conv", "Gemm", "MatMul"):
        ws.set(a, 1, _scale_weight(ws.get(a, 1), s, _out_axis(a), divide=True))
        if a.op_type != "MatMul" and len(a.input) > 2 and a.input[2]:
            ws.set(a, 2, _bias(ws.get(a, 2), s))
    elif a.op_type == "Mul":
        k = 1 if g.const(a.input[1]) is not None else 0
        ws.set(a, k, _along(ws.get(a, k), s, axis, rank))
    else:  # BatchNormalization (scale, B), LayerNormalization (Scale, optional B)
        for k in (1, 2):
            if k < len(a.input) and a.input[k]:
                ws.set(a, k, _bias(ws.get(a, k), s))
    for node in p.chain:
        if node.op_type == "Add":  # past a Flatten (N x C x 1 x 1 -> N x C) the channels are the last axis
            k = next(i for i, name in enumerate(node.input) if g.const(name) is not None)
            own = len(g.shapes.get(node.output[0], ())) or rank
            ws.set(node, k, _along(ws.get(node, k), s, axis if own == rank else own - 1, own))
    for c in p.consumers:
        w = ws.get(c, 1)
        ws.set(c, 1, _scale_weight(w, s, _in_axis(c, w), divide=False))


def _clean(s: np.ndarray) -> np.ndarray:
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    return np.clip(s, 1.0 / _SCALE_LIMIT, _SCALE_LIMIT)


def _nagel(positions: list[Position], ws: _Weights) -> None:
    """Equalize every linear pair, repeating over chains of layers until the scales settle."""
    for _ in range(_ITERATIONS):
        largest = 0.0
        for p in positions:
            r1 = _ranges(ws.get(p.absorber, 1), _out_axis(p.absorber))
            r2 = _consumer_range(p, ws)
            s = _clean(np.sqrt(np.divide(r1, r2, out=np.ones_like(r1), where=(r1 > 0) & (r2 > 0))))
            _apply(p, s, ws)
            largest = max(largest, float(np.abs(np.log(s)).max()))
        if largest < 1e-3:
            return


def _smooth(p: Position, act: np.ndarray, ws: _Weights) -> None:
    """SmoothQuant's migration: ``s = max|x|^a / max|w|^(1-a)``, over its median."""
    w = _consumer_range(p, ws)
    s = np.where(act > 0, act**_ALPHA / np.maximum(w, 1e-12) ** (1 - _ALPHA), 1.0)
    typical = float(np.median(act[act > 0])) if np.any(act > 0) else 1.0
    s = np.where((w <= 0) & (act > 0), act / typical, s)  # read by nothing: shrink to an ordinary size
    s = _clean(s)
    _apply(p, _clean(s / float(np.median(s))), ws)


def channel_ranges(model: Any, tensors: list[str], axes: dict[str, int], calib: Dataset) -> dict[str, np.ndarray]:
    """max |x| per channel of each tensor on (up to 256 samples of) the calibration data, in onnxruntime."""
    onnx = require("onnx", "compile")
    ort = require("onnxruntime", "ort")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    sample = calib.take(_MAX_SAMPLES)
    result: dict[str, np.ndarray] = {}
    first = next((v for v in model.graph.input if v.name in calib.inputs), None)
    dims = first.type.tensor_type.shape.dim if first is not None else []
    fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else 0
    for batch in sample.batches(fixed or 32):  # a model with a fixed batch takes batches of that size
        if fixed and len(next(iter(batch.values()))) != fixed:
            continue
        for name, value in zip(tensors, session.run(tensors, dict(batch))):
            r = _ranges(np.asarray(value), axes[name] % np.asarray(value).ndim)
            result[name] = r if name not in result else np.maximum(result[name], r)
    return result


def rescale(src: Path, out: Path, calib: Dataset, *, data_driven: bool) -> RescalePlan | None:
    """Rescale ``src`` into ``out``; None when nothing in it can be rescaled.

    Args:
        src: An FP32 ONNX model (shapes are inferred here).
        out: Where the rescaled model goes.
        calib: Calibration data (activation ranges for smoothing).
        data_driven: Smooth every position from the activation ranges; otherwise equalize linear pairs from
            their weights and smooth only where equalization does not apply.
    """
    onnx = require("onnx", "compile")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src)))
    named = assign_names(model)  # the record names the layers rescaled; a graph without names gets them here
    ws = _Weights(model)
    positions = find_positions(ws.g)
    if not positions:
        return None
    smooth = positions if data_driven else [p for p in positions if p.kind == "smooth"]
    equal = [] if data_driven else [p for p in positions if p.kind == "equalize"]
    if equal:
        _nagel(equal, ws)
    if smooth:
        acts = channel_ranges(model, [p.tensor for p in smooth], {p.tensor: p.axis for p in smooth}, calib)
        for p in smooth:
            if p.tensor in acts and len(acts[p.tensor]) == p.channels:
                _smooth(p, acts[p.tensor], ws)
    ws.save(out)
    kind = "smooth" if data_driven else None
    return RescalePlan([{"kind": kind or p.kind, "layers": p.layers, "channels": p.channels}
                        for p in [*equal, *smooth]], named)
