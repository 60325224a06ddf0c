"""``edgeml demo``: the main job end to end on embedded defaults.

Trains a small CNN on the built-in digits data (scikit-learn's bundled copy, offline), exports it to ONNX,
and compiles it to every CPU target plus a TensorRT-ready bundle, with the accuracy gate on. A second run
reuses the trained model. This module composes the packages; nothing else in the core imports them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from edgeml.errors import EdgeMLError

__all__ = ["DEMO_TARGETS", "run_demo"]

DEMO_TARGETS = ("onnx", "onnx-int8", "tflite", "tflite-int8", "tensorrt-int8")


def _train(workdir: Path) -> Path:
    from edgeml.train.digits import digits_arrays, export_onnx, fit
    from edgeml.train.models import small_cnn

    model_path = workdir / "digits.onnx"
    if model_path.is_file() and (workdir / "val.npz").is_file():
        print(f"reusing the trained model {model_path}")
        return model_path
    print("training a small CNN on the built-in digits data (8 epochs)…")
    data = digits_arrays(seed=0)
    model = fit(small_cnn(), data["x_train"], data["y_train"], epochs=8, seed=0)
    np.savez(workdir / "calib.npz", input=data["x_train"][:256])
    np.savez(workdir / "val.npz", input=data["x_val"], labels=data["y_val"])
    export_onnx(model, data["x_val"], str(workdir / "digits.tmp.onnx"))
    (workdir / "digits.tmp.onnx").replace(model_path)
    return model_path


def run_demo(workdir: Path, targets: tuple[str, ...] = DEMO_TARGETS) -> bool:
    """Train, compile and verify; returns True when every target shipped."""
    from edgeml.bundle import Bundle
    from edgeml.compile import CompileOptions, compile_model
    from edgeml.compile.cli import print_report
    from edgeml.progress import RichProgress

    workdir.mkdir(parents=True, exist_ok=True)
    model = _train(workdir)
    if importlib.util.find_spec("onnx2tf") is None:
        print("onnx2tf is not installed: skipping the TFLite targets (pip install --no-deps onnx2tf==1.29.24)")
        targets = tuple(t for t in targets if not t.startswith("tflite"))
    options = CompileOptions(targets=targets, name="digits", version="1.0.0", max_accuracy_drop=1.0)
    report = compile_model(str(model), options, workdir / "dist", calib=workdir / "calib.npz",
                           val=workdir / "val.npz", progress=RichProgress())
    print_report(report)
    for outcome in report.outcomes:
        if outcome.bundle is None:
            continue
        try:
            with Bundle(outcome.bundle) as bundle:
                bundle.verify()
        except EdgeMLError as exc:
            print(f"verification failed for {outcome.bundle}: {exc}")
            return False
    shipped = [o.bundle.name for o in report.outcomes if o.bundle]
    print(f"\n{len(shipped)} of {len(report.outcomes)} bundles written and verified in {workdir / 'dist'}")
    print("next: edgeml inspect", workdir / "dist" / shipped[0] if shipped else "")
    return report.ok
