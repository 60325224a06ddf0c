"""Why did INT8 lose accuracy? Rank the tensors that quantization hurts most, and try remedies.

Like onnxruntime's quantization debugging tools (``qdq_loss_debug``), we expose every quantized activation
of the FP32 model and of the QDQ model as outputs and run both on a few validation samples (keeping the
tensors' shapes, so channels can be told apart). For each quantized tensor we measure:

* ``channel_sqnr_db``: the median over channels of the signal-to-quantization-noise ratio between the
  FP32 model's activation and the same activation quantized with the scale and zero point the QDQ model
  chose for it. This is the *local* damage, and it catches a few outlier channels stretching the range
  until every other channel rounds to zero (a whole-tensor SQNR would look fine there, dominated by the
  outliers).
* ``xmodel_sqnr_db``: SQNR between the FP32 model's tensor and the QDQ model's (the accumulated damage).

Tensors are ranked worst first by local damage, and each is attributed to the layer that computes it
(walking back through Relu, pooling and reshapes). Then remedies are *measured*, not guessed: keep the
worst layer in float, or calibrate with percentile or entropy, each re-quantized and re-judged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeml._deps import require
from edgeml.compile.data import Dataset
from edgeml.compile.quantize import QdqSettings, quantize_qdq

__all__ = ["Diagnosis", "Remedy", "TensorBlame", "diagnose", "try_remedies"]

_PASS_THROUGH = {"Relu", "Clip", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                 "Identity", "LeakyRelu", "Sigmoid", "HardSigmoid", "Dropout", "GlobalMaxPool"}
_MAX_SAMPLES = 64


@dataclass(frozen=True)
class TensorBlame:
    """One quantized tensor and how much quantization hurt it."""

    tensor: str
    layer: str
    op_type: str
    channel_sqnr_db: float
    xmodel_sqnr_db: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Remedy:
    """A change of options, and what it measured when tried."""

    description: str
    flags: str
    settings: QdqSettings
    drop: float | None = None
    passed: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "flags": self.flags, "drop_points": self.drop,
                "passed": self.passed}


@dataclass
class Diagnosis:
    """Ranked tensors (worst first) and measured remedies."""

    ranking: list[TensorBlame]
    remedies: list[Remedy] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    proxy: str | None = None  # the target the remedies' flags apply to when it is not the failing one

    def to_dict(self) -> dict[str, Any]:
        return {"ranking": [b.to_dict() for b in self.ranking], "remedies": [r.to_dict() for r in self.remedies],
                "warnings": list(self.warnings), "remedies_apply_to": self.proxy}

    def lines(self, top: int = 5) -> list[str]:
        """Human-readable lines for the CLI."""
        out = [f"warning: {w}" for w in self.warnings]
        out.append("tensors that diverge most between FP32 and INT8 (worst first):")
        for i, b in enumerate(self.ranking[:top], 1):
            x = f"{b.xmodel_sqnr_db:6.1f}" if b.xmodel_sqnr_db is not None else "   n/a"
            out.append(f"  {i}. layer {b.layer} ({b.op_type}) tensor {b.tensor}: "
                       f"channel SQNR {b.channel_sqnr_db:5.1f} dB, vs FP32 {x} dB")
        if self.remedies and self.proxy:
            out.append(f"  measured on the equivalent {self.proxy} quantization; these flags change {self.proxy}, "
                       "not this target:")
        for r in self.remedies:
            verdict = "not tried" if r.passed is None else ("PASSES" if r.passed else "still fails")
            drop = f", drop {r.drop:.2f} pts" if r.drop is not None else ""
            out.append(f"  try {r.flags}  ({r.description}: {verdict}{drop})")
        return out


class _Reader:
    def __init__(self, data: Dataset) -> None:
        self._items = iter([{k: v[i:i + 1] for k, v in data.inputs.items()} for i in range(len(data))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)

    def __iter__(self) -> _Reader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._items)

    def rewind(self) -> None:  # pragma: no cover - part of the ORT interface
        pass


def _sqnr(signal: np.ndarray, noisy: np.ndarray) -> float:
    noise = float(np.sum((signal - noisy) ** 2))
    power = float(np.sum(signal**2))
    if power == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(power / max(noise, 1e-30)))


def channel_sqnr(pre: Sequence[np.ndarray], post: Sequence[np.ndarray]) -> float:
    """Median per-channel SQNR (channel = axis 1; dead channels skipped)."""
    a = np.concatenate([np.asarray(x, np.float64) for x in pre])
    b = np.concatenate([np.asarray(x, np.float64) for x in post])
    if a.ndim < 2:
        return _sqnr(a, b)
    a2 = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)
    b2 = np.moveaxis(b, 1, 0).reshape(b.shape[1], -1)
    values = [_sqnr(x, y) for x, y in zip(a2, b2) if np.any(x)]
    return float(np.median(values)) if values else float("inf")


def _producers(model: Any) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output}


def _layer_of(tensor: str, producers: dict[str, Any]) -> tuple[str, str]:
    node = producers.get(tensor)
    seen = 0
    while node is not None and node.op_type in _PASS_THROUGH and seen < 8:
        parent = producers.get(node.input[0]) if node.input else None
        if parent is None:
            break
        node, seen = parent, seen + 1
    if node is None:
        return tensor, "input"
    return node.name or tensor, node.op_type


def _quant_params(qdq_model: Any) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """Activation tensor -> (scale, zero point, name of its dequantized tensor) in a QDQ model."""
    numpy_helper = require("onnx.numpy_helper", "compile")
    inits = {i.name: numpy_helper.to_array(i) for i in qdq_model.graph.initializer}
    dq_of = {n.input[0]: n.output[0] for n in qdq_model.graph.node if n.op_type == "DequantizeLinear"}
    params: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    for node in qdq_model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits and node.input[1] in inits:
            zero = inits[node.input[2]] if len(node.input) > 2 and node.input[2] in inits else np.zeros((), np.uint8)
            params[node.input[0]] = (inits[node.input[1]], zero, dq_of.get(node.output[0], ""))
    return params


def fake_quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Quantize then dequantize ``x`` the way QuantizeLinear/DequantizeLinear do (per tensor)."""
    info = np.iinfo(zero.dtype)
    q = np.clip(np.round(x / scale) + zero.astype(np.int64), info.min, info.max)
    return np.asarray((q - zero.astype(np.int64)) * scale)


def _activations(model: Any, names: list[str], data: Dataset) -> dict[str, np.ndarray]:
    """Run ``model`` on ``data`` with ``names`` exposed as extra outputs; returns their values."""
    onnx = require("onnx", "compile")
    ort = require("onnxruntime", "ort")
    existing = {o.name for o in model.graph.output}
    wanted = [n for n in names if n]
    for name in wanted:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0].shape
    fixed = first[0] if first and isinstance(first[0], int) and first[0] > 0 else len(data)
    runs = [session.run(wanted, batch) for batch in data.batches(fixed)  # a fixed-batch model: batch by batch
            if len(next(iter(batch.values()))) == fixed or fixed == len(data)]
    return {n: np.concatenate([np.atleast_1d(np.asarray(r[i], np.float64)) for r in runs])
            for i, n in enumerate(wanted)}


def diagnose(fp32: Path, qdq: Path, data: Dataset) -> Diagnosis:
    """Rank the quantized tensors of ``qdq`` by how much quantization damages them on ``data``.

    Local damage is measured on the FP32 model's own activations, quantized with the QDQ model's scales,
    so upstream errors and activations folded into the quantization (Relu) do not blur the picture.
    """
    onnx = require("onnx", "compile")
    sample = data.take(_MAX_SAMPLES)
    float_model = onnx.load(str(fp32), load_external_data=False)
    qdq_model = onnx.load(str(qdq), load_external_data=False)
    params = _quant_params(qdq_model)
    known = {v.name for v in float_model.graph.input} | {n for node in float_model.graph.node for n in node.output}
    suffix = "_QuantizeLinear_Input"  # the quantizer renames graph outputs it quantizes
    params = {(k[: -len(suffix)] if k.endswith(suffix) else k): v for k, v in params.items()}
    params = {k: v for k, v in params.items() if k in known}
    producers = _producers(float_model)
    float_acts = _activations(float_model, list(params), sample)
    post_acts = _activations(qdq_model, [dq for _, _, dq in params.values()], sample)
    ranking = []
    for name, (scale, zero, dq) in params.items():
        x = float_acts[name]
        xmodel = _sqnr(x, post_acts[dq]) if dq in post_acts else None
        local = channel_sqnr([x], [fake_quantize(x, scale.astype(np.float64), zero)])
        layer, op = _layer_of(name, producers)
        ranking.append(TensorBlame(name, layer, op, local, xmodel))
    ranking.sort(key=lambda b: (b.channel_sqnr_db, b.xmodel_sqnr_db if b.xmodel_sqnr_db is not None else 0.0))
    return Diagnosis(ranking)


def calibration_warnings(calib: Dataset, val: Dataset) -> list[str]:
    """Flag calibration data that cannot represent the validation data (e.g. constant samples)."""
    out = []
    for name, arr in calib.inputs.items():
        if name not in val.inputs:
            continue
        c_std, v_std = float(np.std(arr)), float(np.std(val.inputs[name]))
        if v_std > 0 and c_std < 0.05 * v_std:
            out.append(f"calibration input {name!r} barely varies (std {c_std:.3g} vs {v_std:.3g} on the validation "
                       "data): calibrate on representative samples")
    return out


def _float_island(tensor: str, fp32: Path) -> list[str]:
    """Nodes to keep in float so that ``tensor`` is never quantized: its producers back to the compute
    layer and every consumer."""
    onnx = require("onnx", "compile")
    model = onnx.load(str(fp32), load_external_data=False)
    producers = _producers(model)
    names: list[str] = []
    node = producers.get(tensor)
    while node is not None:
        names.append(node.name)
        if node.op_type not in _PASS_THROUGH or not node.input:
            break
        node = producers.get(node.input[0])
    names += [n.name for n in model.graph.node if tensor in n.input]
    return sorted({n for n in names if n})


def candidate_remedies(diag: Diagnosis, fp32: Path, base: QdqSettings, limit: int) -> list[Remedy]:
    """Remedies worth trying, most targeted first."""
    remedies: list[Remedy] = []
    if diag.ranking:
        worst = diag.ranking[0]
        nodes = [n for n in _float_island(worst.tensor, fp32) if n not in base.exclude_nodes]
        if nodes:
            flags = " ".join(f"--exclude-node {n}" for n in nodes)
            remedies.append(Remedy(f"keep layer {worst.layer} in float", flags,
                                   replace(base, exclude_nodes=base.exclude_nodes + tuple(nodes))))
    for method in ("percentile", "entropy"):
        if method != base.method:
            remedies.append(Remedy(f"calibrate with {method}", f"--calibration-method {method}",
                                   replace(base, method=method)))
    return remedies[:limit]


def try_remedies(remedies: list[Remedy], prepared: Path, calib: Dataset, workdir: Path,
                 judge_fn: Callable[[Path], tuple[bool, float]]) -> None:
    """Quantize with each remedy's settings and record whether the gate then passes (in place)."""
    for i, remedy in enumerate(remedies):
        out = workdir / f"remedy{i}.onnx"
        quantize_qdq(prepared, out, calib, remedy.settings)
        remedy.passed, remedy.drop = judge_fn(out)
