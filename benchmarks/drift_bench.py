"""Drift benchmark: edgeml's streaming monitor against scipy's two-sample KS test on the same windows.

Data: ``features`` independent N(0, 1) inputs; the reference is a sample of ``n_ref`` of them, summarised with
:func:`edgeml.refstats.compute_reference_stats` for edgeml (10 quantile bins per feature) and kept whole for
scipy. Both detectors see the same stream and are evaluated at the same points on the same windows (the
newest ``window`` samples every ``stride``), with the same per-test threshold: ``alpha / (features x looks)``
(Bonferroni over the features and over the overlapping looks). scipy's baseline is
``scipy.stats.ks_2samp(reference[:, j], window[:, j])`` per feature.

- samples to flag (median over trials): a 0.5-sigma mean shift of one feature, from the start of the stream
  and after 1,000 drift-free samples (counted from the onset); goal <= 500;
- false-positive rate on drift-free streams: per evaluated window, and per trial of ``window`` samples
  (interim looks included); goal <= 1 %;
- ``observe()`` cost in microseconds per sample for a digits-sized input (N x 1 x 8 x 8, 10 classes), per batch
  size, and as a share of a model costing 10 or 50 us per sample (goal <= 3 %).

Usage:  python benchmarks/drift_bench.py [--trials 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
from scipy import stats

from edgeml.edge_agent.drift import DriftConfig, DriftMonitor
from edgeml.refstats import compute_reference_stats

FEATURES = 4
N_REF = 2000
SHIFT_SIGMA = 0.5
ONSET = 1000
MAX_SAMPLES = 3000
BATCH = 50


def _detectors(mon: DriftMonitor, ref: np.ndarray, stream: np.ndarray) -> tuple[list[int], list[int]]:
    """Window ends flagged by the monitor and by scipy's ks_2samp on the same windows."""
    ours, theirs = [], []
    cfg = mon.config
    for start in range(0, stream.shape[0], BATCH):
        for w in mon.observe(stream[start:start + BATCH]):
            if w.flagged:
                ours.append(w.end)
            window = stream[max(0, w.end - cfg.window):w.end]
            p = min(stats.ks_2samp(ref[:, j], window[:, j]).pvalue for j in range(ref.shape[1]))
            if p < mon.threshold:
                theirs.append(w.end)
    return ours, theirs


def _first(ends: list[int], after: int) -> float:
    later = [e - after for e in ends if e > after]
    return float(later[0]) if later else float("inf")


def detection(trials: int, seed: int, config: DriftConfig) -> dict[str, Any]:
    """Samples to flag and false-positive rates of both detectors over ``trials`` seeded trials."""
    rng = np.random.default_rng(seed)
    shift = np.zeros(FEATURES)
    shift[0] = SHIFT_SIGMA
    out: dict[str, list[float]] = {k: [] for k in ("ours_start", "scipy_start", "ours_onset", "scipy_onset")}
    fp_windows = {"ours": 0, "scipy": 0}
    fp_trials = {"ours": 0, "scipy": 0}
    n_windows = 0
    for _ in range(trials):
        ref = rng.standard_normal((N_REF, FEATURES))
        refstats = compute_reference_stats({"input": ref})
        start = rng.standard_normal((MAX_SAMPLES, FEATURES)) + shift
        ours, theirs = _detectors(DriftMonitor.from_refstats(refstats, config), ref, start)
        out["ours_start"].append(_first(ours, 0))
        out["scipy_start"].append(_first(theirs, 0))
        onset = rng.standard_normal((ONSET + MAX_SAMPLES, FEATURES))
        onset[ONSET:] += shift
        ours, theirs = _detectors(DriftMonitor.from_refstats(refstats, config), ref, onset)
        out["ours_onset"].append(_first(ours, ONSET))
        out["scipy_onset"].append(_first(theirs, ONSET))
        clean = rng.standard_normal((MAX_SAMPLES, FEATURES))
        ours, theirs = _detectors(DriftMonitor.from_refstats(refstats, config), ref, clean)
        n_windows += MAX_SAMPLES // config.stride
        for name, ends in (("ours", ours), ("scipy", theirs)):
            fp_windows[name] += len(ends)
            fp_trials[name] += any(e <= config.window for e in ends)
    result: dict[str, Any] = {k: float(np.median(v)) for k, v in out.items()}
    result.update({f"{k}_p90": float(np.percentile(v, 90)) for k, v in out.items()})
    for name in ("ours", "scipy"):
        result[f"{name}_fp_window"] = fp_windows[name] / n_windows
        result[f"{name}_fp_trial"] = fp_trials[name] / trials
    result["windows"] = n_windows
    return result


def observe_cost(config: DriftConfig, batch_sizes: tuple[int, ...] = (1, 8, 32, 256)) -> dict[int, float]:
    """Microseconds per sample of ``observe()`` on digits-sized inputs with 10-class probabilities."""
    rng = np.random.default_rng(0)
    x = rng.random((4096, 1, 8, 8), dtype=np.float32)
    logits = rng.standard_normal((4096, 10)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ref = compute_reference_stats({"input": x}, logits)
    cost = {}
    for bs in batch_sizes:
        mon = DriftMonitor.from_refstats(ref, config)
        reps = max(40_000 // bs, 200)
        batches = [(x[i:i + bs], probs[i:i + bs]) for i in range(0, 4096 - bs + 1, bs)]
        t0 = time.perf_counter()
        for i in range(reps):
            xb, pb = batches[i % len(batches)]
            mon.observe(xb, pb)
        cost[bs] = (time.perf_counter() - t0) / (reps * bs) * 1e6
    return cost


def run(trials: int = 200, seed: int = 0) -> dict[str, Any]:
    """The whole benchmark; returns its numbers (``detection`` for the default config, ``cost`` per config)."""
    default = DriftConfig()
    strides = (default.stride, 100)
    return {
        "trials": trials,
        "config": {"window": default.window, "alpha": default.alpha},
        "detection": {f"stride={s}": detection(trials, seed, DriftConfig(stride=s)) for s in strides},
        "cost": {f"stride={s}": observe_cost(DriftConfig(stride=s)) for s in (*strides, 500)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    res = run(args.trials, args.seed)
    cfg = res["config"]
    print(f"window={cfg['window']} alpha={cfg['alpha']} features={FEATURES} n_ref={N_REF} trials={res['trials']}\n")
    print("| config | detector | samples to flag 0.5 sigma, from start (median / p90) | after onset (median / p90) "
          "| FP per window | FP per trial | goal |")
    print("|---|---|---|---|---|---|---|")
    for config, d in res["detection"].items():
        for name, label in (("ours", "edgeml DriftMonitor (binned KS)"), ("scipy", "scipy ks_2samp (raw samples)")):
            met = d[f"{name}_onset"] <= 500 and d[f"{name}_fp_trial"] <= 0.01
            print(f"| {config} | {label} | {d[f'{name}_start']:.0f} / {d[f'{name}_start_p90']:.0f} | "
                  f"{d[f'{name}_onset']:.0f} / {d[f'{name}_onset_p90']:.0f} | {100 * d[f'{name}_fp_window']:.2f}% "
                  f"of {d['windows']} | {100 * d[f'{name}_fp_trial']:.2f}% | {'met' if met else 'MISSED'} "
                  "(<= 500, <= 1%) |")
    print("\n| config | batch | observe() us/sample | share of 10 us/sample model | of 50 us/sample |")
    print("|---|---|---|---|---|")
    for label, costs in res["cost"].items():
        for bs, us in costs.items():
            print(f"| {label} | {bs} | {us:.2f} | {100 * us / 10:.1f}% | {100 * us / 50:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
