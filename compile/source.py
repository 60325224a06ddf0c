"""Where the model comes from: an ONNX file, or a PyTorch factory exported to ONNX here.

:func:`load_source` checks the model (onnx.checker, shape inference) and returns a :class:`SourceModel`
whose ``path`` is an ONNX file every backend starts from.
"""

from __future__ import annotations

import importlib
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml._deps import require
from edgeml.bundle import TensorSpec, sha256_file
from edgeml.errors import ConfigError, ModelError

__all__ = ["SourceModel", "load_source", "onnx_tensor_specs"]

_ONNX_TO_NUMPY = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                  10: "float16", 11: "float64"}


@dataclass(frozen=True)
class SourceModel:
    """A checked FP32 ONNX model and what is known about where it came from.

    Attributes:
        path: The ONNX file backends read (the user's file, or the export of a PyTorch model).
        original: What the user passed (file path or ``package.module:factory``).
        inputs: Graph inputs (initializers excluded).
        outputs: Graph outputs.
        sha256: Hash of the ONNX file.
        opset: Default-domain opset.
        provenance: Extra facts (torch parity, git commit).
    """

    path: Path
    original: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str
    opset: int
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        base = self.original.rsplit(":", 1)[-1] if ":" in self.original else Path(self.original).stem
        return "".join(c if c.isalnum() or c in "._-" else "-" for c in base.lower()).strip("-._") or "model"


def onnx_tensor_specs(values: Any, skip: set[str] | None = None) -> tuple[TensorSpec, ...]:
    """TensorSpecs of ONNX ValueInfos (graph inputs or outputs)."""
    specs = []
    for v in values:
        if skip and v.name in skip:
            continue
        tt = v.type.tensor_type
        dims: list[int | str] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or f"d{i}")
        specs.append(TensorSpec(v.name, tuple(dims), _ONNX_TO_NUMPY.get(tt.elem_type, "float32")))
    return tuple(specs)


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path.parent), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _check_onnx(path: Path) -> Any:
    onnx = require("onnx", "compile")
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:
        raise ModelError(f"{path} is not a readable ONNX model (truncated or not ONNX): {exc}".strip()) from exc
    if not model.graph.node:
        raise ModelError(f"{path} is not a readable ONNX model: it has no graph nodes")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path} fails the ONNX checker: {first}") from exc
    return model


def _from_onnx(path: Path) -> SourceModel:
    model = _check_onnx(path)
    inits = {i.name for i in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    prov: dict[str, Any] = {"source_format": "onnx", "producer": model.producer_name or None}
    commit = _git_commit(path)
    if commit:
        prov["git_commit"] = commit
    return SourceModel(
        path=path,
        original=str(path),
        inputs=onnx_tensor_specs(model.graph.input, inits),
        outputs=onnx_tensor_specs(model.graph.output),
        sha256=sha256_file(path),
        opset=int(opset),
        provenance=prov,
    )


def _import_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {spec!r}: {exc}") from exc


def _from_torch(spec: str, workdir: Path, input_shape: tuple[int, ...] | None, checkpoint: Path | None,
                opset: int) -> SourceModel:
    torch = require("torch", "train")
    if not input_shape:
        raise ConfigError(f"a PyTorch model ({spec}) needs --input-shape, e.g. --input-shape 1,3,96,96")
    factory = _import_factory(spec)
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        except Exception as exc:
            raise ModelError(f"cannot load checkpoint {checkpoint} into {spec}: {exc}") from exc
    model.eval()
    example = torch.randn(*input_shape)
    out_path = workdir / "source.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(out_path), dynamo=False, input_names=["input"],
                              output_names=["output"], opset_version=opset,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    except Exception as exc:
        raise ModelError(f"PyTorch export of {spec} failed: {exc}") from exc
    src = _from_onnx(out_path)
    ort = require("onnxruntime", "ort")
    sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(example).numpy()
    got = sess.run(None, {"input": example.numpy()})[0]
    parity = float(np.abs(got - expected).max())
    prov = dict(src.provenance, source_format="pytorch", factory=spec, torch=torch.__version__,
                torch_onnx_parity_max_abs=parity)
    if checkpoint is not None:
        prov["checkpoint_sha256"] = sha256_file(checkpoint)
    if parity > 1e-3 * max(1.0, float(np.abs(expected).max())):
        raise ModelError(f"ONNX export of {spec} differs from PyTorch by {parity:.3g} (max abs)")
    return SourceModel(path=out_path, original=spec, inputs=src.inputs, outputs=src.outputs,
                       sha256=src.sha256, opset=src.opset, provenance=prov)


def load_source(model: str, workdir: Path, *, input_shape: tuple[int, ...] | None = None,
                checkpoint: Path | None = None, opset: int = 17) -> SourceModel:
    """Resolve ``model`` (an .onnx path, ``package.module:factory`` or a training run directory) to a checked
    ONNX model.

    Raises:
        ModelError: The file is missing, truncated, not ONNX, or fails the checker.
        ConfigError: A PyTorch factory cannot be imported or lacks ``--input-shape``.
    """
    path = Path(model)
    from edgeml.train.rundir import is_run_dir, run_defaults  # stdlib-only module, no torch

    if is_run_dir(path):  # a training run directory: its exported model.onnx
        run = run_defaults(path)
        src = _from_onnx(run.model)
        return SourceModel(path=src.path, original=str(path), inputs=src.inputs, outputs=src.outputs,
                           sha256=src.sha256, opset=src.opset, provenance={**src.provenance, **run.provenance})
    if path.suffix.lower() == ".onnx" or path.exists():
        if path.exists() and path.is_file() and path.suffix.lower() != ".onnx":
            head = path.read_bytes()[:4]
            if head[:2] == b"PK" or head[:1] in (b"{", b"#", b"<"):
                raise ModelError(f"{path} is not an ONNX model (expected a .onnx file)")
        return _from_onnx(path)
    if ":" in model and not path.suffix:
        return _from_torch(model, workdir, input_shape, checkpoint, opset)
    raise ModelError(f"model {model!r} not found: give an .onnx file or package.module:factory")
