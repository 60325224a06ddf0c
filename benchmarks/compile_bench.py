"""Compile benchmark: size, accuracy and latency of every CPU target against FP32, measured in one run.

Models: the digits CNN (8x8x1), and a MobileNetV2-style network trained briefly on digits upsampled to
96x96x3 (accuracy), then the same architecture at 224x224 (size and latency only). Latency is p50/p99
at batch 1 on this host, one thread and all threads; ratios are against the same runtime's FP32 model
measured in the same run (onnx-int8 vs onnx, tflite-int8 vs tflite), because these machines are noisy.

Usage:  python benchmarks/compile_bench.py [--quick] [--out benchmarks/results-compile.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.compile import CompileOptions, TargetOutcome, compile_model
from edgeml.train.digits import digits_arrays, export_onnx, fit
from edgeml.train.models import mobilenet_v2, small_cnn

TARGETS = ("onnx", "onnx-int8", "tflite", "tflite-int8")
BASE = {"onnx": "onnx", "onnx-int8": "onnx", "tflite": "tflite", "tflite-int8": "tflite"}
GOALS = {"drop": 0.5, "size": 0.35, "onnx-int8": 0.6, "tflite-int8": 0.75}


def _prepare(name: str, work: Path, size: int, channels: int, epochs: int, factory: Any,
             train: bool = True) -> tuple[Path, Path, Path | None]:
    d = digits_arrays(size=size, channels=channels, seed=0)
    model = factory()
    if train:
        t0 = time.perf_counter()
        fit(model, d["x_train"], d["y_train"], epochs=epochs, seed=0, lr=2e-3)
        print(f"[{name}] trained {epochs} epochs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    onnx_path = work / f"{name}.onnx"
    export_onnx(model.eval(), d["x_val"][:1], str(onnx_path))
    calib = work / f"{name}-calib.npz"
    n_cal = 128 if size <= 96 else 32
    np.savez(calib, input=d["x_train"][:n_cal])
    val = None
    if train:
        val = work / f"{name}-val.npz"
        np.savez(val, input=d["x_val"], labels=d["y_val"])
    return onnx_path, calib, val


def _run(name: str, onnx_path: Path, calib: Path, val: Path | None, work: Path, budget: float) -> list[TargetOutcome]:
    options = CompileOptions(targets=TARGETS, name=name, version="1.0.0", gate=val is not None,
                             max_accuracy_drop=100.0, bench_budget_s=budget)
    t0 = time.perf_counter()
    report = compile_model(str(onnx_path), options, work / f"dist-{name}", calib=calib, val=val)
    print(f"[{name}] compiled {len(TARGETS)} targets in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for o in report.outcomes:
        if o.status != "written":
            print(f"[{name}] {o.target}: {o.status} {o.error or (o.gate and o.gate.reason)}", file=sys.stderr)
    return report.outcomes


def _rows(name: str, outcomes: list[TargetOutcome]) -> list[dict[str, Any]]:
    by = {o.target: o for o in outcomes if o.status == "written"}
    rows = []
    for target in TARGETS:
        o, base = by.get(target), by.get(BASE[target])
        if o is None or base is None:
            rows.append({"model": name, "target": target, "status": "failed"})
            continue
        m = o.gate.metrics if o.gate else {}
        lat1, latn = o.latency["threads_1"], o.latency["threads_all"]
        b1, bn = base.latency["threads_1"], base.latency["threads_all"]
        rows.append({
            "model": name, "target": target, "status": "ok",
            "size_kib": o.size_bytes / 1024, "size_ratio": o.size_bytes / by["onnx"].size_bytes,
            "accuracy": m.get("accuracy"), "ref_accuracy": m.get("reference_accuracy"),
            "agreement": m.get("top1_agreement"),
            "drop": (100 * (m["reference_accuracy"] - m["accuracy"])) if "accuracy" in m else None,
            "p50_1": lat1["p50_ms"], "p99_1": lat1["p99_ms"], "p50_n": latn["p50_ms"],
            "ratio_1": lat1["p50_ms"] / b1["p50_ms"], "ratio_n": latn["p50_ms"] / bn["p50_ms"],
        })
    return rows


def _fmt(v: Any, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | target | size | size vs FP32 | accuracy (FP32) | drop pts | agreement | p50 / p99 ms 1 thread "
            "| p50 vs FP32 (1 thread) | p50 vs FP32 (all threads) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['target']} | failed |" + " |" * 7)
            continue
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}% ({100 * r['ref_accuracy']:.2f}%)"
        lines.append(
            f"| {r['model']} | {r['target']} | {r['size_kib']:.0f} KiB | {r['size_ratio']:.2f}x | {acc} | "
            f"{_fmt(r['drop'], '.2f')} | {_fmt(r['agreement'] and 100 * r['agreement'], '.2f', '%')} | "
            f"{r['p50_1']:.3f} / {r['p99_1']:.3f} | {r['ratio_1']:.2f}x | {r['ratio_n']:.2f}x |"
        )
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r["status"] != "ok" or not r["target"].endswith("int8"):
            continue
        if r["drop"] is not None:
            out.append(f"{r['model']} {r['target']}: drop {r['drop']:.2f} <= {GOALS['drop']} "
                       f"{'MET' if r['drop'] <= GOALS['drop'] else 'MISSED'}")
        if r["model"].startswith("mobilenet"):
            out.append(f"{r['model']} {r['target']}: size {r['size_ratio']:.2f}x <= {GOALS['size']} "
                       f"{'MET' if r['size_ratio'] <= GOALS['size'] else 'MISSED'}")
            goal = GOALS[r["target"]]
            out.append(f"{r['model']} {r['target']}: p50 1-thread {r['ratio_1']:.2f}x <= {goal} "
                       f"{'MET' if r['ratio_1'] <= goal else 'MISSED'}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and shorter timing (smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results-compile.md"))
    args = parser.parse_args()
    budget = 0.5 if args.quick else 3.0
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeml-bench-") as tmp:
        work = Path(tmp)
        cases = [
            ("digits-cnn", 8, 1, 3 if args.quick else 10, lambda: small_cnn(), True),
            ("mobilenet-96", 96, 3, 1 if args.quick else 3, lambda: mobilenet_v2(10, 0.5), True),
            ("mobilenet-224", 224, 3, 0, lambda: mobilenet_v2(10, 1.0), False),
        ]
        for name, size, ch, epochs, factory, train in cases:
            onnx_path, calib, val = _prepare(name, work, size, ch, epochs, factory, train)
            rows += _rows(name, _run(name, onnx_path, calib, val, work, budget))
    text = table(rows)
    verdicts = goals(rows)
    header = f"Host: {platform.machine()}, {platform.python_version()}, batch 1, {time.strftime('%Y-%m-%d')}\n\n"
    args.out.write_text(header + text + "\n\n" + "\n".join(f"- {g}" for g in verdicts) + "\n")
    print(text)
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
