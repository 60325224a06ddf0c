"""``tensorrt-fp16`` / ``tensorrt-int8``: a TensorRT-ready ONNX and the build config for the device.

TensorRT engines only run on the GPU and TensorRT version they were built with, so the bundle ships what
the device builds its engine from (see :mod:`edgeml.tensorrt`):

* ``tensorrt-fp16``: the simplified FP32 ONNX; the device builds with FP16 enabled.
* ``tensorrt-int8``: an explicitly quantized ONNX in the form TensorRT's explicit quantization expects:
  symmetric int8 activations (zero point 0), per-channel symmetric int8 weights written as FP32 weights
  followed by a QuantizeLinear/DequantizeLinear pair, and biases left in FP32. onnxruntime's quantizer
  writes weights and biases pre-quantized (int8/int32 initializers feeding DequantizeLinear), which the
  TensorRT ONNX parser rejects ("only activation types allowed as input to this layer", onnx-tensorrt
  #850); :func:`tensorrt_ready_qdq` rewrites those, with the same numbers.

The gate runs the same ONNX in onnxruntime (a proxy: TensorRT's kernels round differently). With
``--build-engine`` the engine is also built here, for this machine's GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeml._deps import require
from edgeml.compile.backends.base import Backend, BuildContext, BuildResult
from edgeml.compile.backends.onnx_fp32 import simplified_fp32
from edgeml.compile.backends.onnx_int8 import prepared_model, settings_from_options
from edgeml.compile.quantize import batch_size_of, quantize_qdq, tensorrt_qdq_settings
from edgeml.fsutil import atomic_write_bytes
from edgeml.tensorrt import TensorRTBuildConfig, build_engine, device_facts

__all__ = ["MIN_TENSORRT", "TensorRTBackend", "tensorrt_ready_qdq"]

#: The oldest TensorRT whose ONNX parser and explicit quantization the bundles target (JetPack 5.1.2).
MIN_TENSORRT = "8.6"
_PROXY = "onnxruntime on the TensorRT-ready ONNX (TensorRT builds the engine on the device)"
_INT8, _INT32 = 3, 6  # onnx.TensorProto element types
_MIN_IR = 7  # the IR version of opset 13, the least the quantizer leaves (initializers need not be inputs)


def _zero_point(node: Any) -> str | None:
    return node.input[2] if len(node.input) > 2 and node.input[2] else None


def _dequantized(node: Any, inits: dict[str, Any], numpy_helper: Any) -> np.ndarray:
    """What DequantizeLinear ``node`` computes from its constant input, in float32 as onnxruntime does."""
    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    zp_name = _zero_point(node)
    zero = (numpy_helper.to_array(inits[zp_name]).astype(np.int64) if zp_name
            else np.zeros_like(scale, dtype=np.int64))
    if scale.ndim == 1 and scale.size > 1 and q.ndim > 0:  # per channel (one value: per tensor, it broadcasts)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    out: np.ndarray = (q - zero).astype(np.float32) * scale
    return out.astype(np.float32)


def _rewrite_nodes(graph: Any, helper: Any, numpy_helper: Any) -> tuple[list[Any], list[Any]]:
    """New node list and new initializers: int32 DQ constants folded, int8 DQ constants given a Q."""
    inits = {i.name: i for i in graph.initializer}
    nodes: list[Any] = []
    added: list[Any] = []
    requantized: set[str] = set()
    for node in graph.node:
        source = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if source is None or source.data_type not in (_INT8, _INT32):
            nodes.append(node)
            continue
        values = _dequantized(node, inits, numpy_helper)
        if source.data_type == _INT32:  # a bias: TensorRT keeps biases in float and fuses them
            added.append(numpy_helper.from_array(values, node.output[0]))
            continue
        if source.name not in requantized:  # a weight: FP32 constant -> QuantizeLinear -> (this) DQ
            requantized.add(source.name)
            float_name = f"{source.name}_fp32"
            added.append(numpy_helper.from_array(values, float_name))
            zero = _zero_point(node) or f"{source.name}_zero_point_i8"
            if zero not in inits:
                zeros = np.zeros(numpy_helper.to_array(inits[node.input[1]]).shape, np.int8)
                added.append(numpy_helper.from_array(zeros, zero))
            axis = [a.i for a in node.attribute if a.name == "axis"]
            nodes.append(helper.make_node("QuantizeLinear", [float_name, node.input[1], zero], [source.name],
                                          name=f"{source.name}_QuantizeLinear",
                                          **({"axis": axis[0]} if axis else {})))
            node = _with_zero_point(node, zero, helper)
        nodes.append(node)
    return nodes, added


def _with_zero_point(node: Any, zero: str, helper: Any) -> Any:
    if _zero_point(node) == zero:
        return node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return helper.make_node(node.op_type, [node.input[0], node.input[1], zero], list(node.output),
                            name=node.name, **attrs)


def _dedicated_dequantize(nodes: list[Any], graph_outputs: set[str], helper: Any) -> list[Any]:
    """Give every consumer of a shared activation DequantizeLinear its own copy (TensorRT fuses each
    Q/DQ pair into the one layer after it)."""
    consumers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)
    result: list[Any] = []
    for node in nodes:
        result.append(node)
        users = consumers.get(node.output[0], []) if node.op_type == "DequantizeLinear" else []
        shared_with_output = node.output[0] in graph_outputs
        for i, user in enumerate(users[0 if shared_with_output else 1:], start=1):
            name = f"{node.output[0]}_dedicated_{i}"
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            result.append(helper.make_node("DequantizeLinear", list(node.input), [name],
                                           name=f"{node.name}_{i}", **attrs))
            for k, inp in enumerate(user.input):
                if inp == node.output[0]:
                    user.input[k] = name
    return result


def tensorrt_ready_qdq(src: Path, out: Path) -> Path:
    """Rewrite onnxruntime's QDQ model into the form TensorRT's ONNX parser accepts.

    int8 weight initializers feeding DequantizeLinear become FP32 initializers feeding a
    QuantizeLinear/DequantizeLinear pair with the same scales (exactly the same values after the round
    trip); int32 bias initializers feeding DequantizeLinear become FP32 initializers; a DequantizeLinear
    with several consumers is duplicated so each has its own. Initializers and opset domains nothing uses
    any more are dropped. The result computes the same numbers as ``src`` in onnxruntime.

    Raises:
        ConversionError: The rewritten model fails the ONNX checker (wrapped by the backend).
    """
    onnx = require("onnx", "compile")
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    nodes, added = _rewrite_nodes(graph, helper, numpy_helper)
    nodes = _dedicated_dequantize(nodes, {o.name for o in graph.output}, helper)
    produced = {name for n in nodes for name in n.output}
    used = ({name for n in nodes for name in n.input} | {o.name for o in graph.output}) - produced
    kept = [i for i in [*graph.initializer, *added] if i.name in used]
    dropped = {i.name for i in graph.initializer} - {i.name for i in kept}
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # Old (IR < 4) models list every weight as a graph input too; TensorRT wants only the real inputs.
    weights = dropped | {i.name for i in kept}
    inputs = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, _MIN_IR)
    domains = {n.domain for n in nodes} | {"", "ai.onnx"}
    opsets = [o for o in model.opset_import if o.domain in domains]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


class TensorRTBackend(Backend):
    """Builds ``tensorrt-fp16`` and ``tensorrt-int8`` (``self.target.precision``)."""

    def _build_impl(self, ctx: BuildContext) -> BuildResult:
        precision = self.target.precision
        tdir = ctx.workdir / self.target.name
        tdir.mkdir(parents=True, exist_ok=True)
        if precision == "int8":
            onnx_path, notes = self._int8_onnx(ctx, tdir)
        else:
            onnx_path = simplified_fp32(ctx).eval_path
            notes = ["FP32 ONNX; the device builds an FP16 engine (FP32 where FP16 is slower or unsupported)"]
        config = TensorRTBuildConfig.for_inputs(ctx.source.inputs, precision)
        atomic_write_bytes(tdir / "tensorrt_build.json", config.to_json())
        files = {"model.onnx": onnx_path, "tensorrt_build.json": tdir / "tensorrt_build.json"}
        if ctx.options.build_engine:
            files["model.engine"] = self._engine(ctx, onnx_path, config, tdir, notes)
        return BuildResult(
            files=files, model_file="model.onnx", model_format="onnx",
            runtime={"name": "tensorrt", "min_version": MIN_TENSORRT, "precision": precision,
                     "build": config.to_dict()},
            eval_path=onnx_path, eval_runtime="onnxruntime", proxy=_PROXY,
            quantized_onnx=onnx_path if precision == "int8" else None, notes=notes,
        )

    def _int8_onnx(self, ctx: BuildContext, tdir: Path) -> tuple[Path, list[str]]:
        prepared = prepared_model(ctx)
        settings = tensorrt_qdq_settings(settings_from_options(ctx))
        calib = ctx.calib.take(ctx.options.calib_samples) if ctx.calib is not None else None
        total = -(-len(calib) // batch_size_of(prepared)) if calib is not None else None
        with ctx.progress.task(f"calibrating {self.target.name} ({settings.method})", total) as tick:
            ort_qdq = quantize_qdq(prepared, tdir / "ort-qdq.onnx", calib, settings, tick)
        out = tensorrt_ready_qdq(ort_qdq, tdir / "model.onnx")
        return out, [f"explicit INT8 (QDQ): symmetric int8 activations, per-channel symmetric int8 weights, "
                     f"FP32 biases, {settings.method} calibration"]

    def _engine(self, ctx: BuildContext, onnx_path: Path, config: TensorRTBuildConfig, tdir: Path,
                notes: list[str]) -> Path:
        with ctx.progress.task(f"building the {self.target.name} engine with TensorRT", None):
            engine = build_engine(onnx_path, config, log=ctx.progress.log)
        path = tdir / "model.engine"
        atomic_write_bytes(path, engine)
        facts = device_facts()
        notes.append(f"engine built here (TensorRT {facts.tensorrt_version}, compute capability "
                     f"{facts.compute_capability or 'unknown'}); other GPUs or TensorRT versions rebuild it")
        return path
