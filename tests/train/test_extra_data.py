"""Extra data folders merged with the base data, and fine-tuning from an earlier run (``train.init_from``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeml.errors import ConfigError
from edgeml.train.config import config_from_dict
from edgeml.train.finetune import check_weights
from edgeml.train.run import plan_run, train_run
from edgeml.train.validate import DataValidationError
from tests.train.conftest import edgeml

# the config hashes of these configs before data.extra and train.init_from existed (git 47fab39): a run that
# uses neither keeps its run id
_BEFORE = {"defaults": ({}, "8a2dcbe12e740c0c150b2960d0f9ef6149bee6bd664f37fe907690b9372ff03e"),
           "mlp": ({"model": {"arch": "mlp"}, "data": {"source": "d.npz"}},
                   "f82654db2bf2a4710629ca31be97f6a3cc3dfa55ab75b6095a51d64096f256c0")}


@pytest.mark.parametrize("case", sorted(_BEFORE))
def test_configs_without_the_new_keys_keep_their_hash(case: str) -> None:
    raw, digest = _BEFORE[case]
    cfg = config_from_dict(raw)
    assert cfg.digest() == digest
    assert "extra" not in cfg.to_dict()["data"] and "init_from" not in cfg.to_dict()["train"]


def _blobs(n: int, seed: int, shift: float = 0.0, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Separable classes: class c centred at 2c on the first feature (the others noise, moved by ``shift``)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(scale=0.3, size=(n, 6)).astype(np.float32)
    x[:, 0] += 2.0 * y
    x[:, 1:] += shift
    return x, y.astype(np.int64)


def _base(tmp_path: Path, **train: object) -> dict[str, object]:
    x, y = _blobs(240, 0)
    np.savez(tmp_path / "base.npz", x=x, y=y)
    return {"model": {"arch": "mlp", "hidden": [16]}, "data": {"source": "base.npz"},
            "train": {"epochs": 20, "batch_size": 32, "threads": 1, **train}}


def _with(raw: dict[str, object], section: str, **values: object) -> dict[str, object]:
    return {**raw, section: {**raw.get(section, {}), **values}}  # type: ignore[dict-item]


def test_extra_data_is_merged_split_and_hashed_into_the_run_id(tmp_path: Path) -> None:
    raw = _base(tmp_path)
    x, y = _blobs(100, 1, shift=3.0)
    x[0] = np.load(tmp_path / "base.npz")["x"][7]  # one field sample identical to a base sample
    capture = tmp_path / "capture"
    capture.mkdir()
    np.savez(capture / "train.npz", x=x, y=y)
    before = plan_run(config_from_dict(raw, tmp_path))
    after = plan_run(config_from_dict(_with(raw, "data", extra=["capture"]), tmp_path))
    assert after.dataset_sha256 != before.dataset_sha256 and after.run_id != before.run_id
    assert after.data.sources == ["base", "capture"]
    for split in ("train", "val", "test"):  # the base data keeps its split; the extra data is split too
        base_part = after.data.index[split][after.data.index[split] < 240]
        assert np.array_equal(base_part, before.data.index[split])
    counts = after.data.manifest()["sources"]["capture"]
    assert sum(counts.values()) == 100 and {counts["val"], counts["test"]} <= {14, 15}  # 15% each, but see below
    where = {s for s, idx in after.data.index.items() if 240 in idx}  # the duplicate follows its base twin
    assert where == {s for s, idx in before.data.index.items() if 7 in idx}
    assert not any(f.check == "leakage" for f in after.warnings)
    np.savez(capture / "train.npz", x=x + 1, y=y)  # other field data: another dataset hash, another run
    assert plan_run(config_from_dict(_with(raw, "data", extra=["capture"]), tmp_path)).run_id != after.run_id


@pytest.mark.parametrize("make, expected", [
    (lambda d: np.savez(d / "train.npz", x=np.zeros((20, 5), np.float32), y=np.zeros(20, np.int64)),
     "has samples of shape 5, the base data 6"),
    (lambda d: np.savez(d / "samples.npz", x=np.zeros((20, 6), np.float32)), "has no labels yet"),
    (lambda d: np.savez(d / "train.npz", x=np.zeros((20, 6), np.float32), y=np.full(20, 7)), "outside [0, 3)"),
    (lambda d: np.savez(d / "train.npz", x=np.full((20, 6), np.nan, np.float32), y=np.zeros(20, np.int64)),
     "NaN or inf"),
])
def test_bad_extra_data_fails_validation_on_the_merged_set(tmp_path: Path, make, expected: str) -> None:
    raw = _base(tmp_path)
    (tmp_path / "field").mkdir()
    make(tmp_path / "field")
    with pytest.raises(DataValidationError, match=expected.replace("[", r"\[").replace(")", r"\)")):
        plan_run(config_from_dict(_with(raw, "data", extra=["field"]), tmp_path))


def test_fine_tune_starts_from_the_run_and_the_card_shows_each_source(tmp_path: Path) -> None:
    raw = _base(tmp_path)
    first = train_run(config_from_dict(raw, tmp_path), tmp_path / "runs", log=lambda line: None)
    assert first is not None
    x, y = _blobs(120, 2, shift=1.0)
    np.savez(tmp_path / "field.npz", x=x, y=y)
    tuned_raw = _with(_with(raw, "data", extra=["field.npz"]), "train", init_from=str(first.run_dir), lr=0.003,
                      epochs=4)
    lines: list[str] = []
    tuned = train_run(config_from_dict(tuned_raw, tmp_path), tmp_path / "runs", log=lines.append)
    scratch_raw = _with(_with(raw, "data", extra=["field.npz"]), "train", lr=0.003, epochs=4)
    scratch = train_run(config_from_dict(scratch_raw, tmp_path), tmp_path / "runs", log=lambda line: None)
    assert tuned is not None and scratch is not None
    assert tuned.run_id != scratch.run_id  # the init weights enter the run id
    assert any(f"fine-tuning from run {first.run_id}" in line for line in lines)
    # same data, config and seed: only the start differs, and the fine-tune starts where the first run ended
    assert tuned.history[0]["train_loss"] < 0.5 * scratch.history[0]["train_loss"]
    record = json.loads((tuned.run_dir / "run.json").read_text())
    assert record["init_from"]["run_id"] == first.run_id and record["sources"] == ["base", "field.npz"]
    per_source = tuned.card["metrics"]["val"]["per_source"]
    assert list(per_source) == ["base", "field.npz"] and per_source["field.npz"]["n"] == 18
    assert sum(v["n"] for v in per_source.values()) == tuned.card["metrics"]["val"]["n"]
    card = (tuned.run_dir / "model_card.md").read_text()
    assert "## Per source (val)" in card and f"Fine-tuned from run `{first.run_id}`" in card
    config = json.loads((tuned.run_dir / "config.json").read_text())
    assert config["data"]["extra"] == ["field.npz"] and config["train"]["init_from"] == str(first.run_dir)


def test_fine_tune_refuses_another_architecture(tmp_path: Path) -> None:
    raw = _base(tmp_path, epochs=1)
    first = train_run(config_from_dict(raw, tmp_path), tmp_path / "runs", log=lambda line: None)
    assert first is not None
    other = _with(_with(raw, "model", hidden=[32]), "train", init_from=str(first.run_dir))
    with pytest.raises(ConfigError, match=r"another architecture \(hidden: run \[16\], config \[32\]\)"):
        plan_run(config_from_dict(other, tmp_path))
    x, y = _blobs(240, 0, classes=4)
    np.savez(tmp_path / "four.npz", x=x, y=y)
    classes = _with(_with(raw, "data", source="four.npz"), "train", init_from=str(first.run_dir))
    with pytest.raises(ConfigError, match=r"do not fit this model: shape of 2.weight \(run \[3, 16\], model "
                                          r"\[4, 16\]\)"):
        train_run(config_from_dict(classes, tmp_path), tmp_path / "runs2", log=lambda line: None)
    assert not (tmp_path / "runs2").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="not a training run directory"):
        plan_run(config_from_dict(_with(raw, "train", init_from="nowhere"), tmp_path))


def test_check_weights_names_missing_and_unexpected_tensors() -> None:
    shape = type("T", (), {"shape": (2, 2)})()
    with pytest.raises(ConfigError, match="missing b; unexpected c"):
        check_weights({"a": shape, "b": shape}, {"a": shape, "c": shape}, "r1")


def test_cli_refuses_extra_data_on_resume(tmp_path: Path) -> None:
    proc = edgeml("train", "--resume", tmp_path, "--extra-data", tmp_path, cwd=tmp_path)
    assert proc.returncode != 0 and "--resume continues one as it began" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_mlp_flattens_image_inputs_and_keeps_tabular_keys(tmp_path: Path) -> None:
    from edgeml.train.trainer import build_model

    cfg = config_from_dict({"model": {"arch": "mlp", "hidden": [8]}})
    assert list(build_model(cfg, (6,), 3).state_dict())[0] == "0.weight"  # tabular runs keep their weights' names
    image = build_model(cfg, (1, 4, 4), 3)
    import torch

    assert tuple(image(torch.zeros(2, 1, 4, 4)).shape) == (2, 3)  # it used to fail: mat1 and mat2 shapes ...


def test_extra_classes_are_matched_by_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def table(path: Path, labels: list[str], n: int) -> None:
        rows = ["a,b,label"] + [f"{rng.normal():.4f},{rng.normal():.4f},{labels[i % len(labels)]}" for i in range(n)]
        path.write_text("\n".join(rows) + "\n")

    table(tmp_path / "base.csv", ["cat", "dog", "owl"], 90)
    table(tmp_path / "field.csv", ["dog", "owl"], 40)  # no cat: its own numbering would make dog 0
    table(tmp_path / "odd.csv", ["dog", "yak"], 40)
    raw = {"model": {"arch": "mlp"}, "data": {"source": "base.csv", "extra": ["field.csv"]}}
    plan = plan_run(config_from_dict(raw, tmp_path))
    field = plan.data.source_array() == "field.csv"
    assert plan.data.data.class_names == ["cat", "dog", "owl"]
    assert sorted(set(plan.data.data.y[field].tolist())) == [1, 2]
    raw["data"]["extra"] = ["odd.csv"]  # type: ignore[index]
    with pytest.raises(DataValidationError, match="has classes the base data does not: yak"):
        plan_run(config_from_dict(raw, tmp_path))
