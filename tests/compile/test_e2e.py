"""Every CPU target end to end through the real CLI, then each bundle checked the way a device would:
extract, load the model in its runtime, replay the golden vectors within the stored tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeml.bundle import Bundle
from edgeml.edge_agent.runtimes import open_runtime
from edgeml.refstats import ReferenceStats

pytest.importorskip("torch")
pytest.importorskip("onnx2tf")

ALL_CPU = ("onnx", "onnx-int8", "tflite", "tflite-int8", "tensorrt-fp16", "tensorrt-int8")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    from edgeml.train.digits import digits_arrays, export_onnx, fit
    from edgeml.train.models import small_cnn

    work = tmp_path_factory.mktemp("e2e")
    d = digits_arrays(seed=1)
    model = fit(small_cnn(), d["x_train"], d["y_train"], epochs=8, seed=1)
    export_onnx(model, d["x_val"], str(work / "digits.onnx"))
    np.savez(work / "calib.npz", input=d["x_train"][:200])
    np.savez(work / "val.npz", input=d["x_val"], labels=d["y_val"])
    cmd = [sys.executable, "-m", "edgeml.cli", "compile", str(work / "digits.onnx"),
           *[a for t in ALL_CPU for a in ("-t", t)], "--calib", str(work / "calib.npz"),
           "--val", str(work / "val.npz"), "--name", "digits", "--version", "2.0.0", "-o", str(work / "dist"),
           "--max-accuracy-drop", "1.0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return proc, work / "dist"


def test_every_target_ships(compiled: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, dist = compiled
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in dist.iterdir())
    assert names == sorted(f"digits-2.0.0-{t}.edgeml" for t in ALL_CPU)


@pytest.mark.parametrize("target", ALL_CPU)
def test_bundle_replays_its_golden_vectors(compiled: tuple[subprocess.CompletedProcess[str], Path],
                                           target: str, tmp_path: Path) -> None:
    _, dist = compiled
    with Bundle(dist / f"digits-2.0.0-{target}.edgeml") as bundle:
        m = bundle.manifest
        bundle.extract(tmp_path)
    gate = m.metrics["gate"]
    if m.runtime["precision"] == "int8":
        assert 100 * (gate["reference_accuracy"] - gate["accuracy"]) <= 1.0
        assert m.gate["status"] in ("passed", "proxy-passed")
        if m.runtime["name"] != "tensorrt":  # TensorRT-ready QDQ ONNX keeps its graph overhead; engines are built later
            assert m.metrics["size_bytes"] < 0.6 * m.metrics["reference_size_bytes"]
    else:
        assert gate["max_abs_error"] <= 1e-3 * gate["output_scale"]
    runtime = "onnxruntime" if m.runtime["name"] == "tensorrt" else m.runtime["name"]
    golden = np.load(tmp_path / m.golden["file"])
    inputs = {k[3:]: golden[k] for k in golden.files if k.startswith("in:")}
    expected = [golden[k] for k in golden.files if k.startswith("out:")]
    with open_runtime(runtime, tmp_path / m.model["file"], threads=1) as rt:
        got = list(rt.infer(inputs).values())
    assert np.abs(got[0] - expected[0]).max() <= m.golden["atol"]
    assert (got[0].argmax(1) == expected[0].argmax(1)).all()
    stats = ReferenceStats.from_json((tmp_path / "refstats.json").read_bytes())
    assert stats.predictions is not None and sum(stats.predictions.class_counts) == gate["samples"]
    assert len(stats.features["input"]) == 1  # one channel: its per-sample mean
    lat = m.metrics["latency"]
    assert lat["threads_1"]["p50_ms"] > 0 and lat["threads_1"]["p99_ms"] >= lat["threads_1"]["p50_ms"]


def test_tensorrt_bundle_carries_a_build_config(compiled: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, dist = compiled
    with Bundle(dist / "digits-2.0.0-tensorrt-int8.edgeml") as bundle:
        m = bundle.manifest
        config = json.loads(bundle.read("tensorrt_build.json"))
    assert m.runtime["name"] == "tensorrt" and m.runtime["precision"] == "int8"
    assert m.gate["proxy"] and m.gate["status"] == "proxy-passed"
    assert config["precision"] == "int8"


def test_inspect_shows_the_manifest(compiled: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, dist = compiled
    bundle = dist / "digits-2.0.0-tflite-int8.edgeml"
    proc = subprocess.run([sys.executable, "-m", "edgeml.cli", "inspect", str(bundle)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "digits 2.0.0  target tflite-int8" in proc.stdout and "litert" in proc.stdout
