"""Runs onnx2tf in a process of its own: ``python -m edgeml.compile.backends._onnx2tf_worker job.json``.

onnx2tf calls ``sys.exit`` on errors, writes into the working directory, changes TensorFlow's global state
and prints a great deal, so :mod:`edgeml.compile.backends.tflite` never imports it: it writes a job file,
runs this module with the scratch directory as working directory and its output going to a log file, and
reads the result file this module writes, whatever happened.

Here the network is refused (onnx2tf downloads sample images when it finds none in the working
directory; the parent writes them there from the user's data), onnx2tf converts, and each TFLite file is
given back the ONNX model's input and output names, inputs and outputs in the ONNX graph's order. Then
the FP32 model is run beside onnxruntime on a few inputs: an output onnx2tf left channels-last (it judges
layouts by shape, so a 16 x 16 x 16 map fools it) gets a TRANSPOSE appended, in both files.

The job (JSON object):
    onnx: The model to convert, inputs renamed ``in_000``..., outputs ``out_000``... (onnx2tf rewrites it).
    output_dir: Where onnx2tf writes its files.
    int8: Also write the full-integer model (int8 inputs and outputs), calibrated on ``calibration``.
    per_channel: Per-channel weight scales for the int8 model.
    calibration: ``[[input name, .npy path], ...]`` arrays in the ONNX layout; may be empty.
    keep_nchw: Input names whose layout stays as in the ONNX model.
    input_names, output_names: The original names, in ONNX graph order.
    result: Where to write the result.

The result (JSON object): ``ok``; on success ``float32`` and ``int8`` (paths or null; ``int8_error`` says why
the INT8 model asked for is missing while the FP32 one was written), ``custom_ops``,
``inputs``/``outputs`` (name and shape signature per tensor), ``transposed`` (output names),
``max_abs_errors`` (per output, FP32 TFLite against onnxruntime); on failure ``error`` (one line),
``op_type`` and ``node`` (the ONNX node onnx2tf failed on, when known); always ``network_attempts`` and
``seconds``.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["forbid_network", "main", "run_job"]

#: onnx2tf's names for the files this worker keeps, after the stem of the input file.
_FLOAT32_SUFFIX = "_float32.tflite"
_INT8_SUFFIX = "_full_integer_quant.tflite"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NETWORK_ATTEMPTS: list[str] = []


def forbid_network() -> None:
    """Make every internet connection from this process fail (local Unix sockets still work)."""
    connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: Any) -> None:
        if self.family == getattr(socket, "AF_UNIX", None):
            return connect(self, address)
        return _refuse(address)

    def _refuse(*args: Any, **kwargs: Any) -> Any:
        _NETWORK_ATTEMPTS.append(repr(args[:1]))
        raise OSError("edgeml: the onnx2tf conversion is not allowed to use the network")

    socket.socket.connect = guarded_connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = _refuse  # type: ignore[method-assign]
    socket.create_connection = _refuse
    socket.getaddrinfo = _refuse


def _convert(job: dict[str, Any]) -> None:
    import onnx2tf

    calibration = [[name, path, [0.0], [1.0]] for name, path in job["calibration"]]
    onnx2tf.convert(
        input_onnx_file_path=job["onnx"],
        output_folder_path=job["output_dir"],
        keep_ncw_or_nchw_or_ncdhw_input_names=job["keep_nchw"] or None,
        custom_input_op_name_np_data_path=calibration or None,
        output_integer_quantized_tflite=bool(job["int8"]),
        quant_type="per-channel" if job["per_channel"] else "per-tensor",
        input_quant_dtype="int8",
        output_quant_dtype="int8",
        verbosity="info",
    )


def _index(key: str) -> int | None:
    """The graph position a signature key stands for: ``in_003``/``out_003`` (ONNX names), ``output_3``."""
    match = re.fullmatch(r"(?:in|out)_(\d{3})|output_(\d+)", key)
    return None if match is None else int(match.group(1) or match.group(2))


def _ordered(entries: Any, names: list[str], what: str) -> list[int]:
    """Tensor indices of a signature's entries, in ONNX graph order."""
    by_position = {_index(e.name.decode()): e.tensorIndex for e in entries}
    if None in by_position or sorted(by_position) != list(range(len(names))):  # type: ignore[type-var]
        found = ", ".join(sorted(e.name.decode() for e in entries))
        raise RuntimeError(f"cannot match the TFLite {what} ({found}) to the ONNX {what}")
    for entry in entries:
        entry.name = names[_index(entry.name.decode()) or 0].encode()
    return [by_position[i] for i in range(len(names))]


def _shape(tensor: Any) -> list[int]:
    shape = tensor.shapeSignature if tensor.shapeSignature is not None else tensor.shape
    return [int(d) for d in shape] if shape is not None else []


def _restore_io(path: Path, inputs: list[str], outputs: list[str]) -> list[str]:
    """Give the TFLite tensors the ONNX names, inputs and outputs in ONNX order; return its custom ops."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]
    if model.signatureDefs:
        graph.inputs = _ordered(model.signatureDefs[0].inputs, inputs, "inputs")
        graph.outputs = _ordered(model.signatureDefs[0].outputs, outputs, "outputs")
    for index, name in [*zip(graph.inputs, inputs), *zip(graph.outputs, outputs)]:
        graph.tensors[index].name = name.encode()
    flatbuffer_utils.write_model(model, str(path))
    return sorted({c.customCode.decode() for c in model.operatorCodes if c.customCode})


def _describe(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Name and shape signature of each input and output."""
    from tensorflow.lite.tools import flatbuffer_utils

    graph = flatbuffer_utils.read_model(str(path)).subgraphs[0]
    def describe(indices: Any) -> list[dict[str, Any]]:
        return [{"name": graph.tensors[i].name.decode(), "shape": _shape(graph.tensors[i])} for i in indices]

    return {"inputs": describe(graph.inputs), "outputs": describe(graph.outputs)}


def _sample_feed(job: dict[str, Any], model: Any) -> dict[str, np.ndarray] | None:
    """Inputs for the layout check, in graph order: calibration samples, else seeded noise; None when the
    model's shapes leave nothing to try."""
    rng = np.random.default_rng(0)
    calibration = dict(job["calibration"])
    inits = {i.name for i in model.graph.initializer}
    feed = {}
    for value in (v for v in model.graph.input if v.name not in inits):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        batch = dims[0] if dims and dims[0] else 2
        if value.name in calibration:
            feed[value.name] = np.load(calibration[value.name])[:batch]
        elif dims and None not in dims[1:]:
            floating = value.type.tensor_type.elem_type in (1, 10, 11)  # float, float16, double
            shape = [batch, *(int(d) for d in dims[1:] if d is not None)]
            feed[value.name] = rng.random(shape, dtype=np.float32) if floating else np.zeros(shape, np.int64)
        else:
            return None  # a dynamic non-batch dimension without data: no shape to try
        if len(feed[value.name]) != batch and dims and dims[0]:
            return None
    return feed


def _tflite_outputs(path: Path, feed: list[np.ndarray]) -> list[np.ndarray]:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - TensorFlow's own interpreter runs the same kernels
        from tensorflow.lite import Interpreter
    interp = Interpreter(model_path=str(path))
    details = interp.get_input_details()
    for detail, arr in zip(details, feed):
        interp.resize_tensor_input(detail["index"], list(arr.shape), strict=False)
    interp.allocate_tensors()
    for detail, arr in zip(details, feed):
        interp.set_tensor(detail["index"], arr.astype(detail["dtype"]))
    interp.invoke()
    return [interp.get_tensor(d["index"]) for d in interp.get_output_details()]


def _close(got: np.ndarray, ref: np.ndarray) -> bool:
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    return got.shape == ref.shape and bool(np.abs(got.astype(np.float64) - ref).max() <= 1e-3 * scale)


def _layout_fixes(job: dict[str, Any], onnx_bytes: bytes,
                  float32: Path) -> tuple[dict[int, list[int]], list[float]]:
    """Outputs onnx2tf left channels-last (graph position -> permutation back to the ONNX layout), and each
    output's max abs error against onnxruntime once fixed (empty when there was nothing to run).

    Found by running the FP32 TFLite model and the ONNX model on the same inputs: onnx2tf decides an
    output's layout from its shape, which is ambiguous when channels and spatial sizes are equal.
    """
    import onnx
    import onnxruntime

    feed = _sample_feed(job, onnx.load_from_string(onnx_bytes))
    if feed is None:
        return {}, []
    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    fixes, errors = {}, []
    refs = session.run(None, feed)
    for pos, (got, ref) in enumerate(zip(_tflite_outputs(float32, list(feed.values())), refs)):
        perm = [0, got.ndim - 1, *range(1, got.ndim - 1)]
        if got.ndim >= 3 and not _close(got, ref) and _close(got.transpose(perm), ref):
            fixes[pos], got = perm, got.transpose(perm)
        comparable = got.shape == ref.shape and ref.size > 0
        errors.append(float(np.abs(got.astype(np.float64) - ref).max()) if comparable else float("inf"))
    return fixes, errors


def _add_transposes(path: Path, fixes: dict[int, list[int]]) -> None:
    """Append a TRANSPOSE after each output in ``fixes``; the new tensor takes the output's name and place."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]
    op_index = _transpose_opcode(model, schema)
    for pos, perm in fixes.items():
        old = graph.outputs[pos]
        tensor = graph.tensors[old]
        model.buffers.append(schema.BufferT(data=np.frombuffer(np.array(perm, np.int32).tobytes(), np.uint8)))
        graph.tensors.append(schema.TensorT(
            shape=np.array([len(perm)], np.int32), type=schema.TensorType.INT32, name=tensor.name + b"/perm",
            buffer=len(model.buffers) - 1))
        new = copy.copy(tensor)
        new.shape = np.asarray(tensor.shape)[perm]
        if tensor.shapeSignature is not None:
            new.shapeSignature = np.asarray(tensor.shapeSignature)[perm]
        tensor.name += b"/channels_last"
        graph.tensors.append(new)
        graph.operators.append(schema.OperatorT(
            opcodeIndex=op_index, inputs=[old, len(graph.tensors) - 2], outputs=[len(graph.tensors) - 1],
            builtinOptionsType=schema.BuiltinOptions.TransposeOptions,
            builtinOptions=schema.TransposeOptionsT()))
        graph.outputs[pos] = len(graph.tensors) - 1
        for entry in (e for sig in model.signatureDefs or [] for e in sig.outputs if e.tensorIndex == old):
            entry.tensorIndex = len(graph.tensors) - 1
    flatbuffer_utils.write_model(model, str(path))


def _transpose_opcode(model: Any, schema: Any) -> int:
    """Index of the TRANSPOSE operator code (added when absent), at a version that runs int8 too."""
    code = schema.BuiltinOperator.TRANSPOSE
    for index, opcode in enumerate(model.operatorCodes):
        if max(opcode.builtinCode, opcode.deprecatedBuiltinCode) == code:
            opcode.version = max(opcode.version, 2)
            return index
    model.operatorCodes.append(schema.OperatorCodeT(deprecatedBuiltinCode=code, builtinCode=code, version=2))
    return len(model.operatorCodes) - 1


def _float32_path(job: dict[str, Any]) -> Path:
    return Path(job["output_dir"]) / f"{Path(job['onnx']).stem}{_FLOAT32_SUFFIX}"


def _collect(job: dict[str, Any], onnx_bytes: bytes) -> dict[str, Any]:
    out = Path(job["output_dir"])
    stem = Path(job["onnx"]).stem
    files = {"float32": out / f"{stem}{_FLOAT32_SUFFIX}", "int8": out / f"{stem}{_INT8_SUFFIX}"}
    int8_error = None
    if not job["int8"]:
        files.pop("int8")
    elif not files["int8"].is_file() and files["float32"].is_file():  # the FP32 model still ships
        files.pop("int8")
        int8_error = "onnx2tf wrote the FP32 model but no full-integer one (its INT8 quantization failed)"
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"onnx2tf finished without writing {', '.join(missing)}")
    custom = set()
    for path in files.values():
        custom.update(_restore_io(path, job["input_names"], job["output_names"]))
    fixes, errors = _layout_fixes(job, onnx_bytes, files["float32"])
    for path in files.values():
        if fixes:
            _add_transposes(path, fixes)
    return {"ok": True, "float32": str(files["float32"]), "int8": str(files.get("int8") or "") or None,
            "int8_error": int8_error,
            **_describe(files["float32"]), "custom_ops": sorted(custom),
            "transposed": [job["output_names"][pos] for pos in sorted(fixes)], "max_abs_errors": errors}


def _failed_node(exc: BaseException, onnx_path: str) -> tuple[str | None, str | None]:
    """(op type, node name) of the ONNX node onnx2tf stopped at, when it says."""
    node = getattr(exc, "onnx_op_name", None)
    missing_op = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if missing_op and str(missing_op).startswith("onnx2tf.ops."):
        return str(missing_op).rsplit(".", 1)[1], node
    if not node:
        return None, None
    try:
        import onnx

        names = {node, re.sub("^wa/", "/", node), node.replace("__", ":")}
        graph = onnx.load(onnx_path, load_external_data=False).graph
        return next((n.op_type for n in graph.node if n.name in names), None), node
    except Exception:
        return None, node


def _failure(job: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, SystemExit):
        message = f"onnx2tf stopped (exit status {exc.code})"
    else:
        text = _ANSI.sub("", str(exc)).strip()
        message = text.splitlines()[0][:300] if text else type(exc).__name__
        if "Select TensorFlow op" in text:  # LiteRT's interpreter refused the converted model
            message = ("onnx2tf converted it to TensorFlow ops that LiteRT's built-in kernels lack (Select TF "
                       "ops, which need the Flex delegate)")
    op_type, node = _failed_node(exc, job["onnx"])
    if isinstance(exc, ModuleNotFoundError) and op_type and str(exc.name).endswith(f".{op_type}"):
        message = f"onnx2tf has no converter for {op_type}"
    return {"ok": False, "error": message, "op_type": op_type, "node": node}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Convert as ``job`` says; never raises (failures are described in the returned result)."""
    forbid_network()
    start = time.monotonic()
    try:
        onnx_bytes = Path(job["onnx"]).read_bytes()  # before onnx2tf rewrites the file
        int8_error = None
        try:
            _convert(job)
        except (Exception, SystemExit) as exc:
            if not job["int8"] or not _float32_path(job).is_file():
                raise
            # onnx2tf writes the FP32 model first: its INT8 quantization failed, the FP32 model still ships
            int8_error = f"onnx2tf's INT8 quantization failed: {_failure(job, exc)['error']}"
            job = dict(job, int8=False)
        result = _collect(job, onnx_bytes)
        if int8_error is not None:
            result["int8_error"] = int8_error
    except (Exception, SystemExit) as exc:
        import traceback

        traceback.print_exc()
        result = _failure(job, exc)
    result["network_attempts"] = len(_NETWORK_ATTEMPTS)
    result["seconds"] = round(time.monotonic() - start, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the job file named by the first argument; exit status 0 when the conversion succeeded."""
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(args[0]).read_text())
    result = run_job(job)
    Path(job["result"]).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
