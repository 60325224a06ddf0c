"""Fixtures for the trainer tests: a digits CNN run done once, through the real CLI, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DIGITS_CONFIG = """
[model]
name = "digits"
arch = "small_cnn"

[data]
source = "digits"

[train]
epochs = 12
seed = 0
"""


def edgeml(*args: str | os.PathLike[str], cwd: Path, env: dict[str, str] | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m edgeml.cli ARGS`` as users do."""
    environ = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=environ, timeout=timeout, check=False)


@dataclass(frozen=True)
class DigitsRun:
    """The uninterrupted reference run."""

    config: Path
    run_dir: Path
    record: dict[str, object]
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> DigitsRun:
    pytest.importorskip("torch")
    work = tmp_path_factory.mktemp("digits-run")
    config = work / "digits.toml"
    config.write_text(DIGITS_CONFIG)
    proc = edgeml("train", config, "-o", work / "runs", cwd=work)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (work / "runs").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    return DigitsRun(config, run_dir, record, proc.stdout, proc.stderr)
