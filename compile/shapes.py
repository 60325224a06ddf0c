"""Tensor dims from models in the wild: which sizes data may have, and fixing them with ``--input-shape``.

ONNX writes a dim as a number, a named symbol (``batch``, ``height``) or nothing at all, and converters
disagree on how to say "unknown": Paddle2ONNX and several TensorFlow converters write ``?``, others an empty
``dim_param``, ``-1`` or ``0``. The rules here:

* An **anonymous** dim (``?``, an empty ``dim_param``, a negative or zero ``dim_value``) matches any size,
  independently of every other anonymous dim. :func:`edgeml.compile.source.onnx_tensor_specs` records it
  as ``"?"``.
* A **named** dim matches any size, but every dim with the same name (in any input) must get the same
  size: that is what the name means in ONNX.
* A **fixed** dim must match exactly, except the batch dim: a model with a fixed batch of B takes any
  multiple of B samples (they are run B at a time).

``--input-shape`` (:func:`parse_input_shapes`, :func:`resolve_input_shapes`) fixes the dims the artifact is
built for, per input (``x:1,3,48,192``); a bare shape (``1,3,48,192``) is for a single-input model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgeml.bundle import TensorSpec
from edgeml.errors import ConfigError

__all__ = ["ANONYMOUS", "InputShapes", "apply_input_shapes", "is_anonymous", "mismatch", "parse_input_shapes",
           "resolve_input_shapes", "shape_text"]

#: How an anonymous dim is recorded in a :class:`TensorSpec` (and so in a bundle's manifest).
ANONYMOUS = "?"

#: ``--input-shape`` values: one shape for a single-input model, or input name -> shape.
InputShapes = tuple[int, ...] | Mapping[str, tuple[int, ...]]


def is_anonymous(dim: int | str) -> bool:
    """True for a dim that matches any size on its own: ``?``, empty, or a number <= 0."""
    if isinstance(dim, str):
        return dim.strip() in ("", ANONYMOUS)
    return dim <= 0


def shape_text(shape: Sequence[int | str]) -> str:
    """``Nx3x?x?``: the batch dim as ``N`` unless fixed, anonymous dims as ``?``, named ones by name."""
    parts = []
    for i, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            parts.append(str(d))
        elif i == 0:
            parts.append("N")
        else:
            parts.append(ANONYMOUS if is_anonymous(d) else str(d))
    return "x".join(parts)


def mismatch(specs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    """The first input whose array in ``arrays`` (input name -> batch) does not fit ``specs``, and why (e.g.
    ``dim 2 must be 8``); None when all fit.

    Inputs missing from ``arrays`` are skipped (the caller names them).
    """
    bound: dict[str, tuple[int, str, int]] = {}  # symbol -> (size, input, dim)
    for spec in specs:
        arr = arrays.get(spec.name)
        if arr is None:
            continue
        expected = tuple(spec.shape)
        if arr.ndim != len(expected):
            return spec.name, f"{len(expected)} dims, not {arr.ndim}"
        for i, (want, got) in enumerate(zip(expected, arr.shape)):
            if is_anonymous(want):
                continue
            if isinstance(want, int):
                if want != got and not (i == 0 and got % want == 0):  # a fixed batch: run B samples at a time
                    return spec.name, f"dim {i} must be {want}" + (" (or a multiple of it)" if i == 0 else "")
                continue
            seen = bound.setdefault(want, (got, spec.name, i))
            if seen[0] != got:
                return spec.name, (f"dims named {want!r} are one size, but input {seen[1]!r} dim {seen[2]} is "
                                   f"{seen[0]} and input {spec.name!r} dim {i} is {got}")
    return None


def parse_input_shapes(texts: Sequence[str] | str | None) -> InputShapes | None:
    """``--input-shape`` values: ``1,3,96,96`` (one input) or ``name:1,3,48,192`` (repeatable).

    Raises:
        ConfigError: Not a list of positive integers, a name given twice, or a bare shape beside others.
    """
    if texts is None or isinstance(texts, str):
        texts = [texts] if texts else []
    named: dict[str, tuple[int, ...]] = {}
    bare: tuple[int, ...] | None = None
    for text in texts:
        name, sep, dims = text.rpartition(":") if ":" in text else ("", "", text)
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
        except ValueError as exc:
            raise ConfigError(f"--input-shape {text!r} is not a list of integers like 1,3,96,96 "
                              "(or name:1,3,96,96)") from exc
        if not shape or min(shape) < 1:
            raise ConfigError(f"--input-shape {text!r}: every dim must be a positive integer")
        if not sep:
            if bare is not None or len(texts) > 1:
                raise ConfigError("several --input-shape values must each name their input, e.g. "
                                  "--input-shape x:1,3,48,192 --input-shape mask:1,48,192")
            bare = shape
        elif name in named:
            raise ConfigError(f"--input-shape gives input {name!r} twice")
        else:
            named[name] = shape
    return bare if bare is not None else (named or None)


def resolve_input_shapes(specs: Sequence[TensorSpec], shapes: InputShapes) -> dict[str, tuple[int, ...]]:
    """Every input's fixed shape: the ones given, and the others with the dims their names bind.

    A named dim fixed in one input is fixed to the same size in every input that uses the name; an input
    that still has an unknown dim keeps it.

    Raises:
        ConfigError: An unknown input name, a bare shape for a model with several inputs, a rank that
            differs from the model's, a size that contradicts a fixed dim, or one name given two sizes.
    """
    by_name = {s.name: s for s in specs}
    if not isinstance(shapes, Mapping):
        if len(specs) != 1:
            raise ConfigError(f"the model has {len(specs)} inputs ({', '.join(by_name)}): name each one, e.g. "
                              f"--input-shape {specs[0].name}:{','.join('1' for _ in specs[0].shape)}")
        shapes = {specs[0].name: tuple(shapes)}
    unknown = [n for n in shapes if n not in by_name]
    if unknown:
        raise ConfigError(f"--input-shape names {', '.join(map(repr, unknown))}, which the model does not have "
                          f"(its inputs: {', '.join(by_name)})")
    symbols: dict[str, int] = {}
    for name, shape in shapes.items():
        declared = by_name[name].shape
        if len(shape) != len(declared):
            raise ConfigError(f"--input-shape {name}:{','.join(map(str, shape))} has {len(shape)} dims; input "
                              f"{name!r} has {len(declared)} ({shape_text(declared)})")
        for i, (want, got) in enumerate(zip(declared, shape)):
            if isinstance(want, int) and want > 0 and want != got:
                raise ConfigError(f"--input-shape {name}:{','.join(map(str, shape))} contradicts input {name!r}: "
                                  f"dim {i} is fixed to {want} ({shape_text(declared)})")
            named = isinstance(want, str) and not is_anonymous(want)
            if named and symbols.setdefault(str(want), got) != got:
                raise ConfigError(f"--input-shape gives the dim named {want!r} two sizes: {symbols[str(want)]} "
                                  f"and {got}")
    fixed: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in shapes:
            fixed[spec.name] = tuple(shapes[spec.name])
            continue
        dims = [symbols.get(d, d) if isinstance(d, str) else d for d in spec.shape]
        if all(isinstance(d, int) and d > 0 for d in dims) and any(isinstance(d, str) for d in spec.shape):
            fixed[spec.name] = tuple(int(d) for d in dims)
    return fixed


def apply_input_shapes(model: Any, fixed: Mapping[str, tuple[int, ...]]) -> Any:
    """A copy of the ONNX ``model`` whose graph inputs have the ``fixed`` shapes, shapes re-inferred.

    The annotations of intermediate tensors (``value_info``) are dropped, since they may name the old
    symbols; shape inference writes them again, and the outputs get the dims it infers.
    """
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for value in graph.input:
        shape = fixed.get(value.name)
        if shape is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = int(size)
    del graph.value_info[:]
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    for value in probe.graph.output:  # declared output dims may name the old symbols: let inference decide
        value.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # inference is a nicety: the runtimes work out the shapes themselves
        return out
    outputs = {v.name: v for v in inferred.graph.output}
    for value in graph.output:
        new = outputs.get(value.name)
        if new is None or not new.type.tensor_type.HasField("shape"):
            continue
        dims = new.type.tensor_type.shape.dim
        if len(dims) == len(value.type.tensor_type.shape.dim) and all(d.HasField("dim_value") for d in dims):
            value.type.tensor_type.shape.CopyFrom(new.type.tensor_type.shape)
    return out
