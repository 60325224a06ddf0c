"""Calibration/validation data loading: formats, preprocessing, and the checks against the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeml.bundle import TensorSpec
from edgeml.compile.data import ImagePreprocessing, generated_inputs, load_dataset
from edgeml.errors import DataError

IMG = (TensorSpec("input", ("batch", 3, 16, 16), "float32"),)


def _images(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> Path:
    rng = np.random.default_rng(0)
    for cls, dims in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(dims):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_image_folder_gives_labels_and_preprocessing(tmp_path: Path) -> None:
    root = _images(tmp_path / "imgs", {"cat": [(20, 24)] * 3, "dog": [(30, 30)] * 2})
    pre = ImagePreprocessing(size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ds = load_dataset(root, IMG, preprocessing=pre, role="validation")
    assert ds.inputs["input"].shape == (5, 3, 16, 16) and ds.inputs["input"].dtype == np.float32
    assert ds.labels is not None and ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.class_names == ["cat", "dog"]
    assert ds.preprocessing is not None and ds.preprocessing["size"] == [16, 16]
    assert float(ds.inputs["input"].min()) >= -2.01 and float(ds.inputs["input"].max()) <= 2.01


def test_mixed_image_sizes_without_resize_is_refused(tmp_path: Path) -> None:
    root = _images(tmp_path / "imgs", {"a": [(16, 16), (18, 16)]})
    with pytest.raises(DataError, match="different sizes"):
        load_dataset(root, IMG)


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    root = _images(tmp_path / "imgs", {"a": [(16, 16)]})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(root, IMG, preprocessing=ImagePreprocessing(size=(16, 16)))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"input": np.zeros((4, 3, 8, 8), np.float32)}, "expected shape Nx3x16x16"),
        ({"input": np.zeros((4, 3, 16, 16), np.int64)}, "expected dtype float32"),
        ({"other": np.zeros((4, 3, 16, 16), np.float32), "x": np.zeros(1)}, "no array for model input 'input'"),
        ({"input": np.zeros((4, 3, 16, 16), np.float32), "labels": np.zeros(4, np.float32)}, "'labels' must be"),
        ({"input": np.zeros((4, 3, 16, 16), np.float32), "labels": np.zeros(3, np.int64)}, "'labels' must be"),
    ],
)
def test_npz_checked_against_the_model(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=message):
        load_dataset(path, IMG, role="calibration")


def test_npy_and_float64_are_accepted(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((2, 3, 16, 16)))
    ds = load_dataset(tmp_path / "x.npy", IMG)
    assert ds.inputs["input"].dtype == np.float32 and len(ds) == 2


@pytest.mark.parametrize("name", ["missing.npz", "data.csv"])
def test_missing_or_unknown_format(tmp_path: Path, name: str) -> None:
    if name.endswith(".csv"):
        (tmp_path / name).write_text("1,2\n")
    with pytest.raises(DataError):
        load_dataset(tmp_path / name, IMG)


def test_generated_inputs_fill_symbolic_dims() -> None:
    ds = generated_inputs((TensorSpec("x", ("batch", 4, "h"), "float32"),), n=5)
    assert ds.inputs["x"].shape == (5, 4, 1)
