"""Training benchmark: the digits CNN to >= 95% validation accuracy, ONNX export, and `compile RUN_DIR`.

Trains with the real trainer (checkpoints, validation, export, model card: everything `edgeml train` does),
then compiles the run directory to onnx-int8 with no further options. Goal: the whole loop under 2 minutes
on this machine. Prints one table row.

Usage:  python benchmarks/train_bench.py [--epochs 12]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from edgeml.compile import CompileOptions, compile_model
from edgeml.train.config import config_from_dict
from edgeml.train.run import train_run

GOAL_S = 120.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    cfg = config_from_dict({"model": {"name": "digits"}, "train": {"epochs": args.epochs}})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train_run(cfg, Path(tmp) / "runs", log=lambda line: None)
        t_train = time.perf_counter() - t0
        assert result is not None
        t1 = time.perf_counter()
        report = compile_model(str(result.run_dir), CompileOptions(targets=("onnx-int8",)), Path(tmp) / "dist")
        t_compile = time.perf_counter() - t1
    acc = result.card["metrics"]["val"]["accuracy"]
    total = t_train + t_compile
    ok = acc >= 0.95 and report.ok and total < GOAL_S
    print("| host | cores | epochs | val acc | train+export s | compile s | total s | goal |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {platform.machine()} | {os.cpu_count()} | {args.epochs} | {100 * acc:.2f}% | {t_train:.1f} | "
          f"{t_compile:.1f} | {total:.1f} | {'met' if ok else 'MISSED'} (< {GOAL_S:.0f} s, >= 95%) |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
