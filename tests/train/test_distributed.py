"""Two CPU processes (torchrun, gloo, DistributedDataParallel) reach the single-process accuracy."""

from __future__ import annotations

import json
from pathlib import Path

from edgeml.train.cli import torchrun_argv
from tests.train.conftest import DigitsRun, edgeml


def test_torchrun_command_line() -> None:
    argv = torchrun_argv(2, ["cfg.toml", "--output", "runs"])
    assert argv[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert argv[6:] == ["edgeml.cli", "train", "cfg.toml", "--output", "runs"]


def test_two_process_ddp_matches_single_process_accuracy(digits_run: DigitsRun, tmp_path: Path) -> None:
    proc = edgeml("train", digits_run.config, "--nproc", "2", "-o", tmp_path / "runs", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "complete" and rec["world_size"] == 2
    single = digits_run.record["metrics"]["val"]["accuracy"]  # type: ignore[index]
    assert abs(rec["metrics"]["val"]["accuracy"] - single) <= 0.01
    # only rank 0 logged epochs and wrote checkpoints
    assert proc.stderr.count("val acc") == 12
    assert len(list((run_dir / "checkpoints").iterdir())) == 12
