"""Run identity: same config and seed give identical metrics; changed data gives a new hash and run id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeml.rundir import default_version, make_run_id
from edgeml.train.config import config_from_dict, load_config
from edgeml.train.run import plan_run, train_run


def _tabular_csv(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(240, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 0.8).astype(int)
    region = np.where(x[:, 3] > 0, "north", "south")
    rows = ["a,b,c,d,target,region"] + [f"{r[0]:.4f},{r[1]:.4f},{r[2]:.4f},{r[3]:.4f},{t},{g}"
                                       for r, t, g in zip(x, y, region)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _csv_config(tmp_path: Path) -> Path:
    _tabular_csv(tmp_path / "table.csv")
    cfg = tmp_path / "tab.toml"
    cfg.write_text('[model]\nname = "tab"\nversion = "1.2.0"\narch = "mlp"\nhidden = [16]\n'
                   '[data]\nsource = "table.csv"\nlabel_column = "target"\nslice_column = "region"\n'
                   "[train]\nepochs = 3\nbatch_size = 32\nseed = 3\n")
    return cfg


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_same_config_and_seed_give_identical_metrics_and_slice_metrics(tmp_path: Path) -> None:
    cfg = load_config(_csv_config(tmp_path))
    a = train_run(cfg, tmp_path / "a", log=lambda line: None)
    b = train_run(cfg, tmp_path / "b", log=lambda line: None)
    assert a is not None and b is not None
    assert a.run_id == b.run_id
    assert _metrics(a.run_dir) == _metrics(b.run_dir) and len(_metrics(a.run_dir)) == 3
    assert a.card["metrics"] == b.card["metrics"]
    assert a.card["version"] == "1.2.0"
    slices = a.card["metrics"]["test"]["per_slice"]
    assert set(slices) == {"north", "south"}
    assert sum(s["n"] for s in slices.values()) == a.card["metrics"]["test"]["n"]
    assert "## Per slice (test)" in (a.run_dir / "model_card.md").read_text()


def test_changed_data_changes_dataset_hash_and_run_id(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(120, 6)).astype(np.float32), np.arange(120) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    cfg = config_from_dict({"model": {"arch": "mlp"}, "data": {"source": "d.npz"}}, base_dir=tmp_path)
    first = plan_run(cfg)
    assert plan_run(cfg).run_id == first.run_id  # stable
    x[5, 2] += 1.0
    np.savez(tmp_path / "d.npz", x=x, y=y)
    second = plan_run(cfg)
    assert second.dataset_sha256 != first.dataset_sha256 and second.run_id != first.run_id
    assert second.config_sha256 == first.config_sha256
    reseeded = plan_run(config_from_dict({"model": {"arch": "mlp"}, "data": {"source": "d.npz"},
                                          "train": {"seed": 1}}, base_dir=tmp_path))
    assert reseeded.config_sha256 != second.config_sha256 and reseeded.run_id != second.run_id


@pytest.mark.parametrize("run_id", ["0123456789ab", "000000000000", "abcdefabcdef"])
def test_default_version_is_valid_semver(run_id: str) -> None:
    from edgeml.bundle import check_semver

    assert check_semver(default_version(run_id)) == f"0.0.0-r{run_id}"


def test_run_id_depends_on_code_version() -> None:
    assert make_run_id("d", "c", "0.1.0") != make_run_id("d", "c", "0.2.0")
