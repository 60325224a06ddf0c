"""``tflite`` and ``tflite-int8``: LiteRT models from one onnx2tf conversion of the simplified FP32 ONNX.

One onnx2tf run per compile writes both files (FP32, and full-integer INT8 when ``tflite-int8`` is asked
for and calibration data is given); it is cached in ``ctx.shared["onnx2tf"]``. onnx2tf runs in a
subprocess (:mod:`._onnx2tf_worker`), in a scratch directory of its own, with its output in a log file
there, under a time limit, and without network: the sample images it would otherwise download are
written into that directory from the user's calibration data (or generated).

Every target keeps the ONNX model's input contract: the input layout stays NCHW (onnx2tf is told to keep
it), the TFLite inputs and outputs carry the ONNX names in the ONNX graph's order, and every output has
the ONNX layout (the worker transposes back any output onnx2tf left channels-last). The INT8 model takes
and returns int8 tensors; the LiteRT runtime quantizes and dequantizes with their scales.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeml._deps import ONNX2TF_INSTALL, require
from edgeml.compile.backends.base import Backend, BuildContext, BuildResult
from edgeml.compile.backends.onnx_fp32 import simplified_fp32
from edgeml.compile.data import Dataset
from edgeml.errors import ConversionError, DataError, MissingExtraError

__all__ = ["CONVERT_TIMEOUT_S", "LITERT_MIN_VERSION", "SAMPLE_IMAGES", "Onnx2tfConversion", "TFLiteBackend",
           "convert_with_onnx2tf", "sample_images", "shared_conversion"]

#: Seconds one onnx2tf conversion may take before it is killed.
CONVERT_TIMEOUT_S = 900.0
#: The file onnx2tf reads from its working directory, and downloads when it is absent.
SAMPLE_IMAGES = "calibration_image_sample_data_20x128x128x3_float32.npy"
#: The minimum runtime recorded in the manifest, in tflite-runtime / TensorFlow numbering (the files' own
#: ``min_runtime_version`` metadata asks for less).
LITERT_MIN_VERSION = "2.14"

_SHARED_KEY = "onnx2tf"
_WORKER = "edgeml.compile.backends._onnx2tf_worker"
_OP_HINT = "use the onnx or onnx-int8 target, or replace that op"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Onnx2tfConversion:
    """The products of one onnx2tf run.

    Attributes:
        float32: The FP32 model.
        int8: The full-integer model (int8 inputs and outputs), or None when it was not asked for.
        calib_samples: Samples the INT8 model was calibrated on (0 without one).
        seconds: Wall time of the subprocess.
        workdir: The subprocess's working directory (holds the log and the sample images).
        log: The subprocess's output.
        sample_sha256: Hash of the sample images written for onnx2tf, as written.
        network_attempts: Connections onnx2tf tried and the worker refused (0 on every successful run).
        inputs: (name, shape signature) of each TFLite input, in ONNX order (-1: dynamic).
        outputs: (name, shape signature) of each TFLite output, in ONNX order.
        transposed: Outputs onnx2tf left channels-last, transposed back to the ONNX layout.
        max_abs_errors: Per output, the FP32 model's max abs error against onnxruntime on the worker's check
            inputs (calibration samples, else noise); empty when the model's shapes left nothing to run.
        int8_error: Why the INT8 model asked for was not written while the FP32 one was (None otherwise).
    """

    float32: Path
    int8: Path | None
    calib_samples: int
    seconds: float
    workdir: Path
    log: Path
    sample_sha256: str
    network_attempts: int
    inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()
    outputs: tuple[tuple[str, tuple[int, ...]], ...] = ()
    transposed: tuple[str, ...] = ()
    max_abs_errors: tuple[float, ...] = ()
    int8_error: str | None = None


class TFLiteBackend(Backend):
    """Builds ``tflite`` (FP32) or ``tflite-int8`` (full integer) from the shared onnx2tf conversion."""

    def _build_impl(self, ctx: BuildContext) -> BuildResult:
        int8 = self.target.quantized
        if int8 and ctx.calib is None:
            raise DataError(f"{self.target.name} needs calibration data",
                            hint="pass --calib DATA (.npz, .npy or images)")
        conversion = shared_conversion(ctx, int8=int8)
        produced = conversion.int8 if int8 else conversion.float32
        if produced is None:  # the INT8 quantization failed; the FP32 target of the same run still ships
            raise ConversionError(f"{self.target.name}: {conversion.int8_error or 'onnx2tf wrote no INT8 model'}",
                                  hint="use the tflite (FP32) or onnx-int8 target for this model")
        out = ctx.workdir / self.target.name / "model.tflite"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(produced, out)
        return BuildResult(
            files={"model.tflite": out}, model_file="model.tflite", model_format="tflite",
            runtime={"name": "litert", "min_version": LITERT_MIN_VERSION, "precision": self.target.precision,
                     "build": None},
            eval_path=out, eval_runtime="litert", notes=self._notes(ctx, conversion),
        )

    def _notes(self, ctx: BuildContext, conversion: Onnx2tfConversion) -> list[str]:
        notes = [f"onnx2tf {conversion.seconds:.1f} s (one conversion for every TFLite target), "
                 "NCHW input kept, ONNX input/output names"]
        if conversion.transposed:
            notes.append(f"onnx2tf wrote {', '.join(conversion.transposed)} channels-last; "
                         "transposed back to the ONNX layout")
        if conversion.max_abs_errors and not self.target.quantized:
            worst = max(conversion.max_abs_errors)
            notes.append(f"FP32 TFLite vs onnxruntime on a few samples: max abs error {worst:.3g}")
        if not self.target.quantized:
            return notes
        o = ctx.options
        weights = "per-channel" if o.per_channel else "per-tensor"
        notes.append(f"full integer: int8 inputs/outputs, int8 {weights} weights, "
                     f"TFLite min/max calibration on {conversion.calib_samples} samples")
        if o.calibration_method != "minmax":
            notes.append(f"--calibration-method {o.calibration_method} does not apply to tflite-int8 "
                         "(TFLite calibrates min/max)")
        if o.exclude_nodes or o.exclude_op_types:
            notes.append("--exclude-node/--exclude-op-type do not apply to tflite-int8 (every op is integer)")
        return notes


def shared_conversion(ctx: BuildContext, *, int8: bool) -> Onnx2tfConversion:
    """The run's onnx2tf conversion, converting on first use (INT8 too when the run asks for tflite-int8)."""
    cached: Onnx2tfConversion | None = ctx.shared.get(_SHARED_KEY)
    if cached is not None and (cached.int8 is not None or cached.int8_error is not None or not int8):
        return cached
    want_int8 = ctx.calib is not None and (int8 or "tflite-int8" in ctx.options.targets)
    calib = ctx.calib.take(ctx.options.calib_samples) if ctx.calib is not None else None
    label = "converting with onnx2tf"
    if want_int8 and calib is not None:
        label += f" (with INT8, {len(calib)} calibration samples)"
    with ctx.progress.task(label, None):
        conversion = convert_with_onnx2tf(
            simplified_fp32(ctx).eval_path, Path(tempfile.mkdtemp(prefix="onnx2tf-", dir=ctx.workdir)),
            calib=calib, int8=want_int8, per_channel=ctx.options.per_channel)
    _check_contract(conversion, ctx)
    ctx.shared[_SHARED_KEY] = conversion
    return conversion


def convert_with_onnx2tf(model: Path, workdir: Path, *, calib: Dataset | None, int8: bool,
                         per_channel: bool = True, timeout: float = CONVERT_TIMEOUT_S) -> Onnx2tfConversion:
    """Convert ``model`` with onnx2tf in a subprocess whose working directory is ``workdir``.

    Args:
        model: An FP32 ONNX model (not modified).
        workdir: An empty scratch directory; the worker's files, log and outputs stay there.
        calib: Data keyed by the model's input names, in its layout (needed for ``int8``).
        int8: Also write the full-integer model.
        per_channel: Per-channel weight scales for the INT8 model.
        timeout: Seconds before the subprocess is killed.

    Raises:
        MissingExtraError: onnx2tf is not installed.
        DataError: ``int8`` without calibration data.
        ConversionError: onnx2tf failed (the message names the ONNX op it could not convert, when known),
            ran out of time, or wrote a model LiteRT cannot run.
    """
    if importlib.util.find_spec("onnx2tf") is None:  # not imported: that would load TensorFlow here
        raise MissingExtraError("onnx2tf", "tflite", also=ONNX2TF_INSTALL)
    if int8 and calib is None:
        raise DataError("INT8 TFLite needs calibration data", hint="pass --calib DATA (.npz, .npy or images)")
    job = _write_job(model, workdir, calib, int8, per_channel)
    log = workdir / "onnx2tf.log"
    start = time.monotonic()
    returncode = _run_worker(workdir, log, timeout)
    seconds = time.monotonic() - start
    result_path = Path(job["result"])
    result: dict[str, Any] = json.loads(result_path.read_text()) if result_path.is_file() else {"ok": False}
    if not result.get("ok"):
        raise _conversion_error(result, log, returncode, timeout)
    if result.get("custom_ops"):
        raise ConversionError(f"onnx2tf wrote a model with ops LiteRT's builtin kernels lack: "
                              f"{', '.join(result['custom_ops'])}", hint="use the onnx or onnx-int8 target")
    return Onnx2tfConversion(
        float32=Path(result["float32"]), int8=Path(result["int8"]) if result.get("int8") else None,
        calib_samples=len(calib) if int8 and calib is not None else 0, seconds=seconds, workdir=workdir,
        log=log, sample_sha256=job["sample_sha256"], network_attempts=int(result.get("network_attempts", 0)),
        inputs=tuple((t["name"], tuple(t["shape"])) for t in result["inputs"]),
        outputs=tuple((t["name"], tuple(t["shape"])) for t in result["outputs"]),
        transposed=tuple(result.get("transposed", ())),
        max_abs_errors=tuple(result.get("max_abs_errors", ())), int8_error=result.get("int8_error"),
    )


def _write_job(model: Path, workdir: Path, calib: Dataset | None, int8: bool,
               per_channel: bool) -> dict[str, Any]:
    """Write onnx2tf's input (a renamed copy), the sample images, the calibration arrays and the job file."""
    onnx = require("onnx", "compile")
    workdir.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(str(model))
    inputs, outputs = _rename_io(proto)
    onnx.save(proto, str(workdir / "model.onnx"))  # a copy: onnx2tf rewrites its input in place
    np.save(workdir / SAMPLE_IMAGES, sample_images(calib))
    calibration = []
    if calib is not None:
        for original, renamed in inputs.items():
            arr = calib.inputs[original]
            path = workdir / f"calib_{renamed}.npy"
            np.save(path, np.ascontiguousarray(arr, np.float32 if arr.dtype.kind == "f" else arr.dtype))
            calibration.append([renamed, str(path)])
    job = {"onnx": str(workdir / "model.onnx"), "output_dir": str(workdir / "out"), "int8": int8,
           "per_channel": per_channel, "calibration": calibration, "keep_nchw": _channels_first(proto, inputs),
           "input_names": list(inputs), "output_names": list(outputs), "result": str(workdir / "result.json"),
           "sample_sha256": _sha256(workdir / SAMPLE_IMAGES)}
    (workdir / "job.json").write_text(json.dumps(job, indent=1))
    return job


def _channels_first(proto: Any, inputs: dict[str, str]) -> list[str]:
    """The renamed inputs whose layout onnx2tf must keep: those of rank 3 to 5 (NCW, NCHW, NCDHW). onnx2tf
    refuses the option for any other rank, and a tabular (N x F) input has no layout to change."""
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in proto.graph.input}
    return [name for name in inputs.values() if 3 <= ranks.get(name, 0) <= 5]


def _rename_io(proto: Any) -> tuple[dict[str, str], dict[str, str]]:
    """Rename graph inputs to ``in_000``... and outputs to ``out_000``... in place.

    onnx2tf sanitizes names and TensorFlow orders signatures by name; with these names the worker can map
    every TFLite tensor back to its ONNX name and position. Returns original -> new, in graph order.
    """
    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    inputs = {v.name: f"in_{i:03d}" for i, v in enumerate(v for v in graph.input if v.name not in inits)}
    outputs = {v.name: f"out_{i:03d}" for i, v in enumerate(graph.output)}
    mapping = {**inputs, **outputs}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = mapping.get(value.name, value.name)
    _rename_uses(graph, mapping)
    return inputs, outputs


def _rename_uses(graph: Any, mapping: dict[str, str]) -> None:
    """Rename node inputs and outputs, in subgraphs (If, Loop, Scan bodies) too."""
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _rename_uses(sub, mapping)


def sample_images(calib: Dataset | None, seed: int = 0) -> np.ndarray:
    """The 20 x 128 x 128 x 3 float32 images onnx2tf reads as :data:`SAMPLE_IMAGES`.

    Taken from the first 3-channel NCHW (or NHWC) image input of ``calib``: transposed to NHWC, resized to
    128 x 128 by nearest-neighbour index sampling, repeated to 20 samples. Without such data, uniform noise
    in [0, 1) from ``seed`` (onnx2tf expects images scaled to [0, 1]).
    """
    images = None
    for arr in (calib.inputs.values() if calib is not None else ()):
        if arr.ndim == 4 and arr.dtype.kind == "f" and len(arr) and 3 in (arr.shape[1], arr.shape[3]):
            images = arr.transpose(0, 2, 3, 1) if arr.shape[1] == 3 else arr
            break
    if images is None:
        return np.random.default_rng(seed).random((20, 128, 128, 3), dtype=np.float32)
    rows = np.arange(128) * images.shape[1] // 128
    cols = np.arange(128) * images.shape[2] // 128
    resized = images[:20][:, rows][:, :, cols].astype(np.float32)
    return np.ascontiguousarray(np.resize(resized, (20, 128, 128, 3)))


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_worker(workdir: Path, log: Path, timeout: float) -> int | None:
    """Run the worker with ``workdir`` as working directory; its return code, or None when it timed out."""
    env = dict(os.environ)
    # onnx2tf runs onnxsim as a program: the one beside this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="-1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", _WORKER, str(workdir / "job.json")], cwd=workdir,
                                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: onnxsim dies with it
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def _log_error(log: Path) -> tuple[str | None, str | None]:
    """(unimplemented op type, first ERROR line) from onnx2tf's log."""
    text = _ANSI.sub("", log.read_text(errors="replace")) if log.is_file() else ""
    missing = re.search(r"(\w+) OP is not yet implemented", text)
    first = re.search(r"^ERROR:\s*(\S.*)$", text, re.MULTILINE)
    return (missing.group(1) if missing else None), (first.group(1).strip()[:300] if first else None)


def _conversion_error(result: dict[str, Any], log: Path, returncode: int | None,
                      timeout: float) -> ConversionError:
    if returncode is None:
        return ConversionError(f"onnx2tf did not finish within {timeout:.0f} s",
                               hint="use the onnx or onnx-int8 target, or simplify the model")
    log_op, log_line = _log_error(log)
    op_type = result.get("op_type") or log_op
    node = result.get("node")
    detail = result.get("error") or log_line or f"the converter exited with status {returncode}"
    if op_type:
        where = f"{op_type} node {node!r}" if node else f"the {op_type} op"
        return ConversionError(f"onnx2tf cannot convert {where}: {detail}", hint=_OP_HINT)
    if log_line and log_line not in detail:
        detail = f"{detail}: {log_line}"
    return ConversionError(f"onnx2tf failed: {detail}", hint="use the onnx or onnx-int8 target")


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "x".join(str(d) if isinstance(d, int) and d >= 0 else "N" for d in shape)


def _check_contract(conversion: Onnx2tfConversion, ctx: BuildContext) -> None:
    """The TFLite tensors must have the ONNX model's shapes (e.g. outputs NCHW, not NHWC)."""
    pairs = [*zip(ctx.source.inputs, conversion.inputs), *zip(ctx.source.outputs, conversion.outputs)]
    for spec, (_, shape) in pairs:
        same = len(spec.shape) == len(shape) and all(
            not isinstance(want, int) or got < 0 or want == got for want, got in zip(spec.shape, shape))
        if not same:
            raise ConversionError(
                f"onnx2tf changed the shape of {spec.name!r} from {_shape_text(tuple(spec.shape))} to "
                f"{_shape_text(shape)}", hint="use the onnx or onnx-int8 target")
