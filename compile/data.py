"""Calibration and validation data: ``.npz``, ``.npy`` or a folder of images, checked against the model.

A :class:`Dataset` holds one array per model input (batch first) and optional integer class labels. Shape
and dtype are checked against the model's inputs here, once, with errors that name the input, the
expected and the given shape.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.bundle import TensorSpec
from edgeml.compile.shapes import is_anonymous, mismatch, shape_text
from edgeml.errors import DataError

__all__ = ["GENERATED", "Dataset", "ImagePreprocessing", "generated_inputs", "generated_sets", "load_dataset"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a raw image becomes a model input; stored in the manifest for the device to repeat.

    Attributes:
        size: (height, width) to resize to; None keeps the size (then all images must agree).
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel std divided by.
        layout: ``NCHW`` or ``NHWC``.
        channels: 1 (grayscale) or 3 (RGB).
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    channels: int = 3

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "image", "size": list(self.size) if self.size else None, "scale": 1 / 255,
                "mean": list(self.mean), "std": list(self.std), "layout": self.layout,
                "channels": self.channels}

    def apply(self, image: Any) -> np.ndarray:
        """PIL image -> float32 array in the configured layout (one sample, no batch axis)."""
        img = image.convert("L" if self.channels == 1 else "RGB")
        if self.size:
            img = img.resize((self.size[1], self.size[0]))
        arr: np.ndarray = np.asarray(img, dtype=np.float32) / 255.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return arr.transpose(2, 0, 1) if self.layout == "NCHW" else arr


@dataclass
class Dataset:
    """Arrays keyed by model input name, plus optional labels.

    Attributes:
        inputs: Input name -> array with the batch on axis 0.
        labels: Integer class labels, one per sample, or None.
        source: Where it came from (for messages and provenance).
        preprocessing: How raw inputs were turned into these arrays (images only).
        class_names: Class names from an image folder's sub-folders.
        generated: For inputs made up here (no data given): the distribution's label; None for real data.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    preprocessing: dict[str, Any] | None = None
    class_names: list[str] | None = field(default=None)
    generated: str | None = None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, n: int) -> Dataset:
        """The first ``n`` samples."""
        labels = self.labels[:n] if self.labels is not None else None
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, labels, self.source, self.preprocessing,
                       self.class_names, self.generated)

    def batches(self, size: int) -> Any:
        """Yield dicts of input arrays, ``size`` samples at a time."""
        for start in range(0, len(self), size):
            yield {k: v[start:start + size] for k, v in self.inputs.items()}

    def digest(self) -> str:
        """sha256 over the arrays (and labels): the data hash recorded in provenance."""
        h = hashlib.sha256()
        for name in sorted(self.inputs):
            arr = np.ascontiguousarray(self.inputs[name])
            h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
            h.update(arr.tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()


def _check_against(specs: Sequence[TensorSpec], inputs: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in inputs:
            raise DataError(f"{source} has no array for model input {spec.name!r} "
                            f"(found: {', '.join(sorted(inputs)) or 'none'})")
        arr = inputs[spec.name]
        want = np.dtype(spec.dtype)
        if arr.dtype.kind != want.kind and not (arr.dtype.kind in "iu" and want.kind in "iu"):
            raise DataError(f"input {spec.name!r}: expected dtype {want}, {source} has {arr.dtype}")
        checked[spec.name] = arr
    found = mismatch(specs, checked)  # anonymous dims match anything; a repeated name ties dims
    if found is not None:
        name, why = found
        spec = next(s for s in specs if s.name == name)
        raise DataError(f"input {name!r}: expected shape {shape_text(spec.shape)}, {source} has "
                        f"{'x'.join(map(str, checked[name].shape))} ({why})")
    return {spec.name: np.ascontiguousarray(checked[spec.name].astype(np.dtype(spec.dtype), copy=False))
            for spec in specs}


def _load_images(folder: Path, pre: ImagePreprocessing) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    from edgeml._deps import require

    image_mod = require("PIL.Image", "compile")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    files: list[tuple[Path, int | None]] = []
    if subdirs:
        for idx, sub in enumerate(subdirs):
            files += [(f, idx) for f in sorted(sub.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
    else:
        files = [(f, None) for f in sorted(folder.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    samples = []
    for f, _ in files:
        try:
            with image_mod.open(f) as img:
                samples.append(pre.apply(img))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {f}: {exc}") from exc
    shapes = {s.shape for s in samples}
    if len(shapes) > 1:
        raise DataError(f"images in {folder} have different sizes {sorted(shapes)[:3]}...",
                        hint="pass --resize HxW")
    labels = np.array([lbl for _, lbl in files], dtype=np.int64) if subdirs else None
    return np.stack(samples), labels, [s.name for s in subdirs] if subdirs else None


def load_dataset(path: str | Path, specs: Sequence[TensorSpec], *,
                 preprocessing: ImagePreprocessing | None = None, role: str = "data") -> Dataset:
    """Load ``path`` and check it fits the model inputs ``specs``.

    Args:
        path: ``.npz`` (arrays keyed by input name, optional ``labels``), ``.npy`` (single-input models),
            or a folder of images (sub-folders = classes).
        specs: The model's inputs.
        preprocessing: For image folders: resize, mean/std, layout.
        role: ``calibration`` or ``validation``, for messages.

    Raises:
        DataError: Missing file, unknown format, wrong shape or dtype, bad labels.
    """
    p = Path(path)
    source = f"{role} data {p}"
    if not p.exists():
        raise DataError(f"{source} does not exist")
    labels: np.ndarray | None = None
    pre_dict = None
    class_names = None
    if p.is_dir():
        if len(specs) != 1:
            raise DataError(f"{source}: an image folder can only feed a single-input model")
        pre = preprocessing or ImagePreprocessing()
        arr, labels, class_names = _load_images(p, pre)
        arrays = {specs[0].name: arr}
        pre_dict = pre.to_dict()
    elif p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise DataError(f"{source} is not a readable .npz file: {exc}") from exc
        labels = arrays.pop("labels", None)
        if len(specs) == 1 and specs[0].name not in arrays and len(arrays) == 1:
            arrays = {specs[0].name: next(iter(arrays.values()))}
    elif p.suffix == ".npy":
        if len(specs) != 1:
            raise DataError(f"{source}: a .npy file can only feed a single-input model; use .npz")
        try:
            arrays = {specs[0].name: np.load(p, allow_pickle=False)}
        except Exception as exc:
            raise DataError(f"{source} is not a readable .npy file: {exc}") from exc
    else:
        raise DataError(f"{source}: unknown format (use .npz, .npy or a folder of images)")
    checked = _check_against(specs, arrays, source)
    sizes = {k: v.shape[0] for k, v in checked.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise DataError(f"{source}: inputs have different or zero sample counts: {sizes}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.ndim != 1 or len(labels) != next(iter(sizes.values())):
            raise DataError(f"{source}: 'labels' must be one integer per sample "
                            f"(got {labels.dtype} with shape {labels.shape})")
    return Dataset(checked, labels, str(p), pre_dict, class_names)


#: The input distributions FP32 parity is judged on when no data is given: label -> kind.
GENERATED = {"standard normal": "normal", "uniform [0, 1)": "unit", "uniform [0, 255]": "pixels"}
#: The label of inputs drawn like images through the given preprocessing.
IMAGE_RANGE = "images through the given preprocessing"


def _generated_shape(spec: TensorSpec, n: int, sizes: dict[str, int]) -> list[int]:
    """Batch ``n``; unknown dims 1, except the spatial dims of a rank-4 input (32); a name keeps one size."""
    shape = [n]
    for i, d in enumerate(spec.shape[1:], start=1):
        if isinstance(d, int) and d > 0:
            shape.append(d)
            continue
        size = 32 if len(spec.shape) == 4 and i >= 2 and spec.shape[1] in (1, 3) else 1
        shape.append(size if is_anonymous(d) else sizes.setdefault(str(d), size))
    return shape


def generated_inputs(specs: Sequence[TensorSpec], n: int = 8, seed: int = 0, *, distribution: str = "normal",
                     preprocessing: ImagePreprocessing | None = None) -> Dataset:
    """Random inputs for a parity check when no data is given.

    Args:
        specs: The model's inputs (unknown dims: 1, or 32 for the height and width of an NCHW image input;
            dims with the same name get the same size).
        n: Samples.
        seed: Random seed.
        distribution: ``normal`` (standard normal), ``unit`` (uniform [0, 1)), ``pixels`` (uniform [0, 255])
            or ``image`` (uniform [0, 1) through ``preprocessing``'s mean and std, in its layout).
        preprocessing: For ``image``.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}
    for spec in specs:
        shape = _generated_shape(spec, n, sizes)
        dtype = np.dtype(spec.dtype)
        if dtype.kind != "f":
            arrays[spec.name] = rng.integers(0, 10, size=shape).astype(dtype)
        elif distribution == "unit":
            arrays[spec.name] = rng.random(shape).astype(dtype)
        elif distribution == "pixels":
            arrays[spec.name] = (255.0 * rng.random(shape)).astype(dtype)
        elif distribution == "image" and preprocessing is not None:
            arrays[spec.name] = _through(rng.random(shape), preprocessing).astype(dtype)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
    label = next((k for k, v in GENERATED.items() if v == distribution), IMAGE_RANGE)
    return Dataset(arrays, None, f"generated inputs ({label})", generated=label)


def _through(unit: np.ndarray, pre: ImagePreprocessing) -> np.ndarray:
    """Uniform [0, 1) pixels normalised with ``pre``'s mean and std along its channel axis."""
    axis = 1 if pre.layout == "NCHW" else unit.ndim - 1
    if unit.ndim < 2:
        return unit
    shape = [1] * unit.ndim
    shape[axis] = -1
    channels = unit.shape[axis]
    mean = np.resize(np.asarray(pre.mean, np.float64), channels).reshape(shape)
    std = np.resize(np.asarray(pre.std, np.float64), channels).reshape(shape)
    return np.asarray((unit - mean) / std)


def generated_sets(specs: Sequence[TensorSpec], preprocessing: ImagePreprocessing | None = None, *,
                   n: int = 8, seed: int = 0) -> list[Dataset]:
    """Every generated input set FP32 parity is judged on without data: :data:`GENERATED`, and inputs drawn
    like images through ``preprocessing`` when it is known. The standard normal set comes first."""
    sets = [generated_inputs(specs, n, seed, distribution=kind) for kind in GENERATED.values()]
    if preprocessing is not None:
        sets.append(generated_inputs(specs, n, seed, distribution="image", preprocessing=preprocessing))
    return sets
