"""Static INT8 quantization with onnxruntime (QDQ format), shared by onnx-int8, tensorrt-int8 and the
diagnosis that tries remedies.

Defaults follow what measured fastest on CPU: uint8 activations, int8 per-channel weights. TensorRT wants
symmetric int8 activations and weights instead (:func:`tensorrt_qdq_settings`).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgeml._deps import require
from edgeml.compile.data import Dataset
from edgeml.errors import ConversionError, DataError
from edgeml.progress import noop

__all__ = ["QdqSettings", "batch_size_of", "prepare_for_quantization", "quantize_qdq", "tensorrt_qdq_settings"]

_MIN_OPSET = 13  # per-channel QuantizeLinear needs the axis attribute


@dataclass(frozen=True)
class QdqSettings:
    """How to quantize.

    Attributes:
        method: ``minmax``, ``entropy`` or ``percentile``.
        per_channel: Per-channel weight scales.
        activation_type: ``uint8`` or ``int8``.
        symmetric: Symmetric activations and weights (TensorRT's explicit quantization).
        exclude_nodes: Node names left in float.
        exclude_op_types: Op types left in float.
        percentile: The percentile for ``percentile`` calibration.
    """

    method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    symmetric: bool = False
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    percentile: float = 99.99


def tensorrt_qdq_settings(base: QdqSettings) -> QdqSettings:
    """The form TensorRT's explicit quantization expects: symmetric int8, per-channel weights."""
    return replace(base, activation_type="int8", symmetric=True, per_channel=True)


def batch_size_of(model_path: Path) -> int:
    """16 when the first input has a dynamic batch axis, else its fixed batch size."""
    onnx = require("onnx", "compile")
    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
        return 16
    return 16


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def prepare_for_quantization(fp32: Path, out: Path) -> Path:
    """Upgrade to opset >= 13 and run onnxruntime's pre-processing (shape inference, BN folding)."""
    onnx = require("onnx", "compile")
    model = onnx.load(str(fp32))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    src = fp32
    if opset < _MIN_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, _MIN_OPSET)
        except Exception as exc:
            raise ConversionError(f"cannot upgrade the model from opset {opset} to {_MIN_OPSET} for INT8: "
                                  f"{exc}") from exc
    changed = _without_initializer_inputs(model)
    if opset < _MIN_OPSET or changed:
        src = out.with_name(out.stem + ".opset13.onnx")
        onnx.save(model, str(src))
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
        onnx.checker.check_model(onnx.load(str(out)))  # it has dropped a constant that a node still reads
    except Exception:
        # Pre-processing is an optimisation; quantize the plain model when it fails.
        onnx.save(onnx.load(str(src)), str(out))
    return out


def _without_initializer_inputs(model: Any) -> bool:
    """An IR 3 model lists its weights (and an upgrade's new constants) as graph inputs too; once onnxruntime's
    pre-processing merges equal constants, the calibration would ask to be fed the merged ones. From IR 4 on
    they need not be inputs (and opset 13 needs IR 7). Returns whether ``model`` changed."""
    inits = {i.name for i in model.graph.initializer}
    kept = [v for v in model.graph.input if v.name not in inits]
    changed = len(kept) != len(model.graph.input) or model.ir_version < 7
    if len(kept) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)
    model.ir_version = max(model.ir_version, 7)
    return changed


class _Reader:
    """onnxruntime CalibrationDataReader over a Dataset, reporting progress per batch."""

    def __init__(self, data: Dataset, batch: int, tick: Callable[[int], None]) -> None:
        batches = list(data.batches(batch))
        if len(batches) > 1 and len(next(iter(batches[-1].values()))) != batch:
            batches.pop()  # a model with a fixed batch takes only whole batches; a dynamic one loses a few samples
        self._batches = iter(batches)
        self._tick = tick

    def get_next(self) -> dict[str, Any] | None:
        item = next(self._batches, None)
        if item is not None:
            self._tick(1)
        return item

    def rewind(self) -> None:  # pragma: no cover - part of the ORT interface
        pass


def quantize_qdq(prepared: Path, out: Path, calib: Dataset | None, settings: QdqSettings,
                 tick: Callable[[int], None] = noop) -> Path:
    """Quantize ``prepared`` (from :func:`prepare_for_quantization`) into a QDQ model at ``out``.

    Raises:
        DataError: No calibration data.
        ConversionError: onnxruntime's quantizer failed.
    """
    if calib is None:
        raise DataError("INT8 targets need calibration data", hint="pass --calib DATA (.npz, .npy or images)")
    q = require("onnxruntime.quantization", "compile")
    onnx = require("onnx", "compile")
    model = onnx.load(str(prepared), load_external_data=False)
    op_types = None
    if settings.exclude_op_types:
        op_types = sorted({n.op_type for n in model.graph.node} - set(settings.exclude_op_types))
    unknown = set(settings.exclude_nodes) - {n.name for n in model.graph.node}
    if unknown:
        raise DataError(f"--exclude-node names no node of the model: {', '.join(sorted(unknown))}")
    methods = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
               "percentile": q.CalibrationMethod.Percentile}
    act = q.QuantType.QUInt8 if settings.activation_type == "uint8" else q.QuantType.QInt8
    extra = {"ActivationSymmetric": settings.symmetric, "WeightSymmetric": True,
             "CalibPercentile": settings.percentile, "CalibMovingAverage": False}
    try:
        with _quiet():
            q.quantize_static(
                str(prepared), str(out), _Reader(calib, batch_size_of(prepared), tick),
                quant_format=q.QuantFormat.QDQ, per_channel=settings.per_channel,
                activation_type=act, weight_type=q.QuantType.QInt8,
                calibrate_method=methods[settings.method], op_types_to_quantize=op_types,
                nodes_to_exclude=list(settings.exclude_nodes) or None, extra_options=extra,
            )
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConversionError(f"onnxruntime quantization failed: {first}") from exc
    return out
