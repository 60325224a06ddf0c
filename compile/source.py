"""Where the model comes from: an ONNX file, or a PyTorch factory exported to ONNX here.

:func:`load_source` checks the model (onnx.checker, shape inference) and returns a :class:`SourceModel`
whose ``path`` is an ONNX file every backend starts from.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml._deps import require
from edgeml.bundle import TensorSpec, sha256_file
from edgeml.compile.shapes import ANONYMOUS, InputShapes, apply_input_shapes, is_anonymous, resolve_input_shapes
from edgeml.errors import ConfigError, ModelError

__all__ = ["SourceModel", "load_source", "onnx_tensor_specs"]

#: The oldest default-domain opset onnxruntime runs, and the opset older models are upgraded to.
_ORT_MIN_OPSET, UPGRADE_OPSET = 7, 13
_FACTORY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
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
    """TensorSpecs of ONNX ValueInfos (graph inputs or outputs); anonymous dims become ``"?"``
    (:mod:`edgeml.compile.shapes`)."""
    specs = []
    for v in values:
        if skip and v.name in skip:
            continue
        tt = v.type.tensor_type
        dims: list[int | str] = []
        for d in tt.shape.dim:
            dim: int | str = int(d.dim_value) if d.HasField("dim_value") else d.dim_param
            dims.append(ANONYMOUS if is_anonymous(dim) else dim)  # ?, '', -1, 0: any size, tied to nothing
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


def _from_onnx(path: Path, workdir: Path | None = None, input_shapes: InputShapes | None = None) -> SourceModel:
    model = _check_onnx(path)
    inits = {i.name for i in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    prov: dict[str, Any] = {"source_format": "onnx", "producer": model.producer_name or None}
    commit = _git_commit(path)
    if commit:
        prov["git_commit"] = commit
    src = SourceModel(
        path=path,
        original=str(path),
        inputs=onnx_tensor_specs(model.graph.input, inits),
        outputs=onnx_tensor_specs(model.graph.output),
        sha256=sha256_file(path),
        opset=int(opset),
        provenance=prov,
    )
    if workdir is None:
        return src
    upgraded = _upgraded(model, opset)
    if upgraded is not None:  # onnxruntime runs opset 7 and later only: the whole pipeline works on the upgrade
        model = upgraded
        src = dataclasses.replace(src, provenance=dict(prov, upgraded_from_opset=int(opset)))
    if input_shapes is not None:
        return _with_fixed_shapes(src, model, workdir, input_shapes)
    if _unknown_as_numbers(model) or upgraded is not None:  # runtimes read a 0 (or -1) as that size
        return _rewritten(src, model, workdir / "source-normalized.onnx", {})
    return src


def _upgraded(model: Any, opset: int) -> Any | None:
    """``model`` converted to opset :data:`UPGRADE_OPSET` when it is older than onnxruntime runs (opset 7; the
    old model zoos' files are opset 3 to 6), weights no longer listed as inputs; None when it needs none.

    Raises:
        ModelError: The ONNX version converter cannot upgrade it.
    """
    if not 0 < opset < _ORT_MIN_OPSET:
        return None
    onnx = require("onnx", "compile")
    from onnx import version_converter

    try:
        new = version_converter.convert_version(model, UPGRADE_OPSET)
        inits = {i.name for i in new.graph.initializer}
        kept = [v for v in new.graph.input if v.name not in inits]
        del new.graph.input[:]
        new.graph.input.extend(kept)
        new.ir_version = max(new.ir_version, 7)
        onnx.checker.check_model(new)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"the model is at opset {opset}, older than onnxruntime runs (7), and the ONNX version "
                         f"converter cannot upgrade it: {first}",
                         hint=f"export it again at opset {UPGRADE_OPSET} or later") from exc
    return new


def _unknown_as_numbers(model: Any) -> bool:
    """Clear every graph input/output dim declared as a number <= 0 (``0`` and ``-1`` meaning "any size" in
    some converters' files); True when there was one."""
    found = False
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.Clear()
                found = True
    if found:
        del model.graph.value_info[:]  # intermediate annotations may say 0 too; the runtimes infer them
    return found


def _with_fixed_shapes(src: SourceModel, model: Any, workdir: Path, shapes: InputShapes) -> SourceModel:
    """``src`` rewritten with the ``--input-shape`` dims: every backend builds (and the manifest records) those."""
    fixed = resolve_input_shapes(src.inputs, shapes)
    _unknown_as_numbers(model)
    return _rewritten(src, apply_input_shapes(model, fixed), workdir / "source-fixed.onnx", fixed)


def _rewritten(src: SourceModel, proto: Any, out: Path, fixed: dict[str, tuple[int, ...]]) -> SourceModel:
    """The source as ``proto``, checked and saved at ``out``; ``fixed`` goes into the provenance."""
    onnx = require("onnx", "compile")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        given = f" with --input-shape {_shapes_text(fixed)}" if fixed else ""
        raise ModelError(f"{src.original}{given} fails the ONNX checker: {first}") from exc
    onnx.save(proto, str(out))
    inits = {i.name for i in proto.graph.initializer}
    prov = dict(src.provenance, input_shapes={k: list(v) for k, v in fixed.items()}) if fixed else src.provenance
    return SourceModel(path=out, original=src.original, inputs=onnx_tensor_specs(proto.graph.input, inits),
                       outputs=onnx_tensor_specs(proto.graph.output), sha256=src.sha256, opset=src.opset,
                       provenance=prov)


def _shapes_text(fixed: dict[str, tuple[int, ...]]) -> str:
    return " ".join(f"{name}:{','.join(map(str, shape))}" for name, shape in fixed.items())


def _import_factory(spec: str) -> Any:
    """``package.module:function``, importable from the environment or from the current directory (as
    ``python -m`` would find it), so that a project's own models work from its root."""
    module_name, _, attr = spec.partition(":")
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)  # last: an installed package of the same name wins
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {spec!r}: {exc}",
                          hint="give package.module:function importable from here (the current directory "
                               "is searched too)") from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _torch_shape(spec: str, shapes: InputShapes | None) -> tuple[int, ...]:
    """The export shape of a PyTorch factory's single input (``--input-shape 1,3,96,96`` or ``input:...``)."""
    if isinstance(shapes, Mapping):
        if set(shapes) != {"input"}:
            raise ConfigError(f"a PyTorch model ({spec}) has one input, named 'input': pass --input-shape "
                              "1,3,96,96 (or input:1,3,96,96)")
        shapes = shapes["input"]
    if not shapes:
        raise ConfigError(f"a PyTorch model ({spec}) needs --input-shape, e.g. --input-shape 1,3,96,96")
    return tuple(shapes)


def _from_torch(spec: str, workdir: Path, shapes: InputShapes | None, checkpoint: Path | None,
                opset: int) -> SourceModel:
    torch = require("torch", "train")
    input_shape = _torch_shape(spec, shapes)
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
    prov = dict(src.provenance, source_format="pytorch", factory=spec, torch=str(torch.__version__),
                torch_onnx_parity_max_abs=parity)
    if checkpoint is not None:
        prov["checkpoint_sha256"] = sha256_file(checkpoint)
    if parity > 1e-3 * float(np.abs(expected).max()) + 1e-6:  # relative to the output's own magnitude
        raise ModelError(f"ONNX export of {spec} differs from PyTorch by {parity:.3g} (max abs)")
    return SourceModel(path=out_path, original=spec, inputs=src.inputs, outputs=src.outputs,
                       sha256=src.sha256, opset=src.opset, provenance=prov)


def load_source(model: str, workdir: Path, *, input_shape: InputShapes | None = None,
                checkpoint: Path | None = None, opset: int = 17) -> SourceModel:
    """Resolve ``model`` (an .onnx path, ``package.module:factory`` or a training run directory) to a checked
    ONNX model.

    Args:
        model: What the user passed.
        workdir: Scratch space (an exported or shape-fixed model is written there).
        input_shape: ``--input-shape``: the export shape of a PyTorch model; for ONNX models the shapes to
            fix (one shape for a single input, or input name -> shape), recorded in the provenance.
        checkpoint: State dict for a PyTorch factory.
        opset: ONNX opset of a PyTorch export.

    Raises:
        ModelError: The file is missing, truncated, not ONNX, or fails the checker.
        ConfigError: A PyTorch factory cannot be imported or lacks ``--input-shape``; an ``--input-shape``
            that does not fit the model's inputs.
    """
    path = Path(model)
    from edgeml.rundir import is_run_dir, run_defaults

    if is_run_dir(path):  # a training run directory: its exported model.onnx
        run = run_defaults(path)
        src = _from_onnx(run.model, workdir, input_shape)
        return SourceModel(path=src.path, original=str(path), inputs=src.inputs, outputs=src.outputs,
                           sha256=src.sha256, opset=src.opset, provenance={**src.provenance, **run.provenance})
    if path.suffix.lower() == ".onnx" or path.exists():
        if path.exists() and path.is_file() and path.suffix.lower() != ".onnx":
            head = path.read_bytes()[:4]
            if head[:2] == b"PK" or head[:1] in (b"{", b"#", b"<"):
                raise ModelError(f"{path} is not an ONNX model (expected a .onnx file)")
        return _from_onnx(path, workdir, input_shape)
    if _FACTORY.fullmatch(model):  # package.module:function (the dots are not a file suffix)
        return _from_torch(model, workdir, input_shape, checkpoint, opset)
    raise ModelError(f"model {model!r} not found: give an .onnx file or package.module:factory")
