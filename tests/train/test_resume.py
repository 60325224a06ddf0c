"""A run killed with SIGKILL mid-epoch and resumed ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.train.conftest import DigitsRun, edgeml


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _kill_mid_epoch(config: Path, out: Path, stall: str) -> Path:
    env = {**os.environ, "EDGEML_TRAIN_STALL": stall}
    proc = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "train", str(config), "-o", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=out.parent)
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if "stalled at epoch" in line:
                break
        else:
            raise AssertionError(f"trainer exited ({proc.wait()}) without reaching the stall point")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    (run_dir,) = out.iterdir()
    return run_dir


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(digits_run: DigitsRun, tmp_path: Path) -> None:
    run_dir = _kill_mid_epoch(digits_run.config, tmp_path / "runs", "4:7")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "training"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"epoch-000{i}.pt" for i in (1, 2, 3)]
    assert not (run_dir / "model.onnx").exists()

    proc = edgeml("train", "--resume", run_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr and "after epoch 3" in proc.stderr

    ref = torch.load(digits_run.run_dir / "model.pt", weights_only=True)
    got = torch.load(run_dir / "model.pt", weights_only=True)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    assert _metrics(run_dir) == _metrics(digits_run.run_dir)
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["run_id"] == digits_run.record["run_id"] and rec["metrics"] == digits_run.record["metrics"]


def test_resume_of_a_complete_run_changes_nothing(digits_run: DigitsRun, tmp_path: Path) -> None:
    before = (digits_run.run_dir / "model.pt").read_bytes()
    proc = edgeml("train", "--resume", digits_run.run_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "already complete" in proc.stderr
    assert (digits_run.run_dir / "model.pt").read_bytes() == before


def test_starting_the_same_run_again_is_refused(digits_run: DigitsRun) -> None:
    proc = edgeml("train", digits_run.config, "-o", digits_run.run_dir.parent, cwd=digits_run.config.parent)
    assert proc.returncode == 2
    assert "exists" in proc.stderr and "--resume" in proc.stderr
