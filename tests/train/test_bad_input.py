"""Bad input stops the run before training, with a message naming the bad key, file or row."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeml.errors import ConfigError, DataError, EdgeMLError
from edgeml.train.config import config_from_dict, load_config
from edgeml.train.run import plan_run
from edgeml.train.validate import DataValidationError
from tests.train.conftest import edgeml


def _image(path: Path, size: tuple[int, int] = (8, 8), value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, size=size, dtype=np.uint8), "L").save(path)


def _folder(root: Path, classes: int = 2, per_class: int = 6, seed: int = 0) -> Path:
    for c in range(classes):
        for i in range(per_class):
            _image(root / f"class{c}" / f"{i}.png", value=seed + 100 * c + i)
    return root


def _cfg(tmp: Path, **data: object) -> dict[str, object]:
    return {"model": {"arch": "mlp"}, "data": data}


def missing_path(tmp: Path) -> tuple[dict[str, object], str]:
    return _cfg(tmp, source="nowhere/images"), "nowhere/images does not exist"


def empty_class_folder(tmp: Path) -> tuple[dict[str, object], str]:
    root = _folder(tmp / "imgs")
    (root / "class2").mkdir()
    return _cfg(tmp, source="imgs"), "class2 holds no images"


def corrupt_image(tmp: Path) -> tuple[dict[str, object], str]:
    root = _folder(tmp / "imgs")
    (root / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return _cfg(tmp, source="imgs"), "broken.png"


def mixed_sizes(tmp: Path) -> tuple[dict[str, object], str]:
    root = _folder(tmp / "imgs")
    _image(root / "class0" / "big.png", size=(12, 10), value=999)
    return _cfg(tmp, source="imgs"), "class0/big.png 12x10"


def nan_in_csv(tmp: Path) -> tuple[dict[str, object], str]:
    rows = ["a,b,label"] + [f"{i},{i % 3},{i % 2}" for i in range(30)]
    rows[7] = "nan,1,0"
    (tmp / "t.csv").write_text("\n".join(rows) + "\n")
    return _cfg(tmp, source="t.csv"), "t.csv row 8"  # rows are numbered as file lines (header = 1)


def labels_out_of_range(tmp: Path) -> tuple[dict[str, object], str]:
    y = np.arange(40) % 3
    y[11] = 7
    np.savez(tmp / "d.npz", x=np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32), y=y)
    return _cfg(tmp, source="d.npz", num_classes=3), "d.npz[11] (label 7)"


def overlapping_train_val(tmp: Path) -> tuple[dict[str, object], str]:
    _folder(tmp / "train")
    _folder(tmp / "val", per_class=2, seed=5000)
    _image(tmp / "val" / "class1" / "copy.png", value=103)  # the same pixels as train/class1/3.png
    return _cfg(tmp, train="train", val="val"), "train:train/class1/3.png = val:val/class1/copy.png"


CASES: list[Callable[[Path], tuple[dict[str, object], str]]] = [
    missing_path, empty_class_folder, corrupt_image, mixed_sizes, nan_in_csv, labels_out_of_range,
    overlapping_train_val,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_data_is_fatal_and_named(case: Callable[[Path], tuple[dict[str, object], str]], tmp_path: Path) -> None:
    raw, named = case(tmp_path)
    with pytest.raises(DataValidationError) as info:
        plan_run(config_from_dict(raw, base_dir=tmp_path))
    assert isinstance(info.value, DataError)
    assert named in str(info.value)
    assert all(f.level in ("fatal", "warning") for f in info.value.findings)


def test_mixed_sizes_are_fine_with_resize(tmp_path: Path) -> None:
    raw, _ = mixed_sizes(tmp_path)
    raw["data"]["image_size"] = [8, 8]  # type: ignore[index]
    plan = plan_run(config_from_dict(raw, base_dir=tmp_path))
    assert plan.data.data.x.shape[1:] == (1, 8, 8)


def test_warnings_are_recorded_not_fatal(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(230, 3)).astype(np.float32)
    x[:, 2] = 1.0  # a constant feature
    y = np.array([0] * 200 + [1] * 30)
    y[:3] = 2  # a tiny class
    np.savez(tmp_path / "d.npz", x=x, y=y)
    plan = plan_run(config_from_dict(_cfg(tmp_path, source="d.npz"), base_dir=tmp_path))
    checks = {w.check for w in plan.warnings}
    assert {"tiny-class", "imbalance", "constant-feature"} <= checks


@pytest.mark.parametrize(("text", "key", "suggestion"), [
    ("[train]\nepochz = 3\n", "'epochz'", "'epochs'"),
    ("[modle]\narch = 'mlp'\n", "'modle'", "'model'"),
    ("[data]\nlabel_col = 'y'\n", "'label_col'", "'label_column'"),
])
def test_unknown_config_key_is_named_with_the_closest_valid_one(tmp_path: Path, text: str, key: str,
                                                                suggestion: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert key in info.value.message and suggestion in (info.value.hint or "")


def test_cli_prints_config_errors_in_two_lines(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[train]\nepochz = 3\n")
    proc = edgeml("train", "c.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: c.toml: unknown key 'epochz' in [train]",
                                                "  hint: did you mean 'epochs'?"]


def test_mlflow_flag_without_mlflow_is_one_clear_line(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mlflow is installed here")
    (tmp_path / "c.toml").write_text("[train]\nepochs = 1\n")
    proc = edgeml("train", "c.toml", "--mlflow-uri", "file:./mlruns", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: mlflow is not installed") and "pip install" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_changed_data(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32),
             y=np.arange(60) % 2)
    from edgeml.train.run import train_run

    res = train_run(config_from_dict({"model": {"arch": "mlp"}, "data": {"source": "d.npz"},
                                      "train": {"epochs": 1}}, base_dir=tmp_path), tmp_path / "runs",
                    log=lambda line: None)
    assert res is not None
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).normal(size=(60, 4)).astype(np.float32),
             y=np.arange(60) % 2)
    with pytest.raises(EdgeMLError, match="changed since run"):
        train_run(None, resume=res.run_dir, log=lambda line: None)
