"""TOML and YAML configs describe the same run."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeml.train.config import load_config

pytest.importorskip("yaml")

TOML = """
[model]
name = "digits"
arch = "small_cnn"

[data]
source = "digits"

[train]
epochs = 3
seed = 7
"""

YAML = """
model:
  name: digits
  arch: small_cnn
data:
  source: digits
train:
  epochs: 3
  seed: 7
"""


def test_yaml_and_toml_give_the_same_config(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(TOML)
    (tmp_path / "a.yaml").write_text(YAML)
    assert load_config(tmp_path / "a.toml") == load_config(tmp_path / "a.yaml")
    assert load_config(tmp_path / "a.yaml").train.epochs == 3
