"""The manifest's preprocessing, applied by the agent to raw requests (numpy only, no imaging library).

A bundle compiled from image data records how raw images became model inputs (``manifest.preprocessing``,
``{"kind": "image", "size": [h, w] | null, "scale": 1/255, "mean": [...], "std": [...], "layout":
"NCHW" | "NHWC", "channels": 1 | 3}``). Applications send raw pixels (uint8, ``H x W``, ``H x W x C`` or a
batch of those) and the agent repeats those steps, so that the model sees what it was trained and
calibrated on. Resizing is bilinear (align-corners off, as PIL's default for upscaling).

:class:`FeedSpec` is what a model's inputs must be, read once per model from its manifest: every request is
preprocessed and checked against it before it reaches the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeml.bundle import Manifest
from edgeml.errors import EdgeMLError

__all__ = ["FeedSpec", "PreprocessError", "preprocess"]


class PreprocessError(EdgeMLError):
    """A raw request cannot be turned into the model's input (wrong shape, channels or kind)."""


def _resize(batch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``N x H x W x C`` float32 to ``N x h x w x C``."""
    n, h, w, c = batch.shape
    th, tw = size
    if (h, w) == (th, tw):
        return batch
    ys = np.clip((np.arange(th, dtype=np.float32) + 0.5) * h / th - 0.5, 0, h - 1)
    xs = np.clip((np.arange(tw, dtype=np.float32) + 0.5) * w / tw - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    top = batch[:, y0][:, :, x0] * (1 - wx) + batch[:, y0][:, :, x1] * wx
    bottom = batch[:, y1][:, :, x0] * (1 - wx) + batch[:, y1][:, :, x1] * wx
    out: np.ndarray = (top * (1 - wy) + bottom * wy).astype(np.float32)
    return out


def _as_nhwc(raw: np.ndarray, channels: int) -> np.ndarray:
    if raw.ndim == 2:  # one grayscale image
        raw = raw[None, :, :, None]
    elif raw.ndim == 3:  # one H x W x C image, or a batch of grayscale N x H x W
        raw = raw[None] if raw.shape[-1] in (1, 3, 4) else raw[..., None]
    if raw.ndim != 4:
        raise PreprocessError(f"raw images must be HxW, HxWxC or NxHxWxC, got shape {list(raw.shape)}")
    have = raw.shape[-1]
    if have == 4:
        raw = raw[..., :3]
        have = 3
    if have == channels:
        return raw
    if have == 3 and channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
        return (raw[..., :1] * 0.299 + raw[..., 1:2] * 0.587 + raw[..., 2:3] * 0.114).astype(np.float32)
    if have == 1 and channels == 3:
        return np.repeat(raw, 3, axis=-1)
    raise PreprocessError(f"the model wants {channels} channel(s), the image has {have}")


def preprocess(raw: np.ndarray, spec: dict[str, Any] | None) -> np.ndarray:
    """Turn raw request data into the model's input with the manifest's ``preprocessing`` spec.

    Args:
        raw: Raw pixels (any numeric dtype; uint8 is the usual).
        spec: ``manifest.preprocessing``; None means the model takes its input as sent.

    Raises:
        PreprocessError: The data does not fit the spec, or the spec is of an unknown kind.
    """
    if spec is None:
        return np.asarray(raw, dtype=np.float32)
    if spec.get("kind") != "image":
        raise PreprocessError(f"unknown preprocessing kind {spec.get('kind')!r}",
                              hint="send inputs already preprocessed (preprocessed=true)")
    channels = int(spec.get("channels", 3))
    batch = _as_nhwc(np.asarray(raw, dtype=np.float32), channels)
    if spec.get("size"):
        batch = _resize(batch, (int(spec["size"][0]), int(spec["size"][1])))
    batch = batch * np.float32(spec.get("scale", 1 / 255))
    mean = np.asarray(spec.get("mean", [0.0]), np.float32)
    std = np.asarray(spec.get("std", [1.0]), np.float32)
    batch = (batch - mean) / std
    if spec.get("layout", "NCHW") == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=np.float32)


@dataclass(frozen=True)
class FeedSpec:
    """What a model's inputs must be, read once from its manifest: the agent checks every request against it.

    Attributes:
        model: The model's name.
        first: The name of its first input (where a bare array goes).
        dtype: The first input's dtype.
        tail: The first input's shape after the batch axis when every dimension of it is fixed, else None.
        inputs: Per input: name, rank, the fixed dimensions after the batch axis as (axis, size), dtype.
        preprocessing: The manifest's preprocessing.
    """

    model: str
    first: str
    dtype: np.dtype[Any]
    tail: tuple[int, ...] | None
    inputs: tuple[tuple[str, int, tuple[tuple[int, int], ...], np.dtype[Any]], ...]
    preprocessing: Any

    @classmethod
    def of(cls, manifest: Manifest) -> FeedSpec:
        specs = tuple((s.name, len(s.shape), tuple((i, d) for i, d in enumerate(s.shape) if i and isinstance(d, int)),
                       np.dtype(s.dtype)) for s in manifest.inputs)
        shape = manifest.inputs[0].shape
        tail = tuple(shape[1:]) if all(isinstance(d, int) for d in shape[1:]) else None
        return cls(manifest.name, specs[0][0], specs[0][3], tail, specs, manifest.preprocessing)  # type: ignore[arg-type]

    def feeds(self, inputs: Mapping[str, np.ndarray] | np.ndarray, preprocessed: bool) -> dict[str, np.ndarray]:
        """The runtime's feeds: preprocessing applied unless ``preprocessed``, names, ranks, fixed dimensions
        and dtypes checked (a bad request is the caller's error, not the model's).

        Raises:
            ValueError: The inputs do not fit the model.
        """
        if not isinstance(inputs, Mapping):
            inputs = {self.first: inputs}
        if len(inputs) != len(self.inputs) or any(name not in inputs for name, *_ in self.inputs):
            raise ValueError(f"the model takes inputs {[s[0] for s in self.inputs]}, got {sorted(inputs)}")
        feeds = {}
        for name, ndim, fixed, dtype in self.inputs:
            raw = inputs[name]
            array = np.asarray(raw) if preprocessed else preprocess(raw, self.preprocessing)
            if array.ndim == ndim - 1:
                array = array[None]
            if array.ndim != ndim or any(array.shape[i] != d for i, d in fixed):
                want = ["N"] + [dict(fixed).get(i, "?") for i in range(1, ndim)]
                raise ValueError(f"input {name!r} must have shape {want}, got {list(array.shape)}")
            if array.dtype != dtype or not array.flags.c_contiguous:
                array = np.ascontiguousarray(array, dtype=dtype)
            feeds[name] = array
        return feeds
