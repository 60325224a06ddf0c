"""The digits CNN end to end: train (CLI), the run directory's contents, then `edgeml compile RUN_DIR`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeml.bundle import Bundle
from edgeml.refstats import ReferenceStats
from tests.train.conftest import DigitsRun, edgeml


def test_digits_cnn_reaches_95_percent_and_writes_a_complete_run(digits_run: DigitsRun) -> None:
    rec, run_dir = digits_run.record, digits_run.run_dir
    assert rec["status"] == "complete"
    assert rec["metrics"]["val"]["accuracy"] >= 0.95  # type: ignore[index]
    assert run_dir.name == f"digits-{rec['run_id']}"
    assert rec["version"] == f"0.0.0-r{rec['run_id']}"
    assert float(rec["parity_max_abs"]) < 1e-4  # type: ignore[arg-type]
    for name in ("config.json", "config.original.toml", "data_manifest.json", "metrics.jsonl", "model.pt",
                 "model.onnx", "refstats.json", "model_card.md", "model_card.json", "data/calib.npz",
                 "data/val.npz"):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "checkpoints").glob("epoch-*.pt"))) == 12
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 13))
    stats = ReferenceStats.from_json((run_dir / "refstats.json").read_bytes())
    assert stats.n_samples == rec["metrics"]["val"]["n"]  # type: ignore[index]
    assert stats.predictions is not None and sum(stats.predictions.class_counts) == stats.n_samples
    card = json.loads((run_dir / "model_card.json").read_text())
    assert set(card["metrics"]["val"]["per_class"]) == {str(i) for i in range(10)}
    assert digits_run.stderr.count("epoch ") >= 12  # one progress line per epoch
    assert "val" in digits_run.stdout and "run directory" in digits_run.stdout


def test_splits_are_recorded_and_disjoint(digits_run: DigitsRun) -> None:
    manifest = json.loads((digits_run.run_dir / "data_manifest.json").read_text())
    ids = {s: {e["id"] for e in manifest["splits"][s]} for s in ("train", "val", "test")}
    assert sum(len(v) for v in ids.values()) == 1797
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert manifest["dataset_sha256"] == digits_run.record["dataset_sha256"]


def test_exported_onnx_has_dynamic_batch(digits_run: DigitsRun) -> None:
    sess = ort.InferenceSession(str(digits_run.run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        assert sess.run(None, {"input": np.zeros((n, 1, 8, 8), np.float32)})[0].shape == (n, 10)


def test_compile_run_dir_needs_no_further_flags(digits_run: DigitsRun, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "edgeml.cli", "compile", str(digits_run.run_dir), "--target",
                           "onnx-int8", "-o", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (bundle_path,) = out.glob("*.edgeml")
    rec = digits_run.record
    assert bundle_path.name == f"digits-0.0.0-r{rec['run_id']}-onnx-int8.edgeml"
    with Bundle(bundle_path) as bundle:
        bundle.verify()
        m = bundle.manifest
    assert m.gate["status"] == "passed"
    assert m.provenance["training_run"] == rec["run_id"]
    assert m.refstats is not None and "val.npz" in m.refstats["data"]


def test_unfinished_run_cannot_be_compiled(digits_run: DigitsRun, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    record = dict(digits_run.record, status="training")
    (run / "run.json").write_text(json.dumps(record))
    proc = edgeml("compile", run, "--target", "onnx-int8", "-o", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 2
    assert "has not finished" in proc.stderr and "--resume" in proc.stderr
