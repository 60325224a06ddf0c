"""Delta updates: how many bytes a new version of a deployed model costs a device, by how it was changed.

A MobileNet-style network (MobileNetV1 layout, depthwise-separable blocks, 10 classes, 3x96x96 input; about
3.2 M parameters) is "trained" (version 1.0.0: a few SGD steps on synthetic images from a fixed initialisation)
and then changed the four ways a deployed model usually is:

* ``head-only``: the classifier retrained (backbone frozen, its BatchNorm statistics too);
* ``last-blocks``: the last three blocks and the classifier retrained;
* ``full``: every weight trained for one (synthetic) epoch;
* ``re-calibration``: the same weights, INT8 calibrated on other data (``onnx-int8`` only: for ``onnx`` the bundle
  would be the same).

Each version is compiled by ``edgeml compile`` (``onnx`` and ``onnx-int8``, ungated: the weights are random) into
real bundles; the delta from 1.0.0 is made with :func:`edgeml.delta.make_delta` (zstd patch-from over the
inflated bundle, level 19) and applied with :func:`edgeml.delta.apply_delta` (the rebuilt bundle checked against
its sha256), both timed. For comparison, bsdiff4 (when installed) diffs the same inflated bundle against the same
base bytes. Then the head-only case is rolled out to 1,000 devices, on paper from measured sizes: what each device
fetches (the TUF timestamp, snapshot and targets metadata, then the target) with full bundles, with deltas, and
with the delta broadcast once (retained chunks) to every device on the base.

Usage:  python benchmarks/delta_bench.py [--out benchmarks/results-delta.md] [--devices 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeml.delta import _inflated_view, apply_delta, base_of_bundle, make_delta, read_header

CHANGES = ("head-only", "last-blocks", "full", "re-calibration")
GOALS = {"head-only": 0.10, "last-blocks": 0.30}
INPUT = (3, 96, 96)


def _mobilenet(torch: Any, classes: int = 10) -> Any:
    nn = torch.nn

    def separable(cin: int, cout: int, stride: int) -> Any:
        return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                             nn.ReLU6(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())

    plan = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
            *[(512, 512, 1)] * 5, (512, 1024, 2), (1024, 1024, 1)]
    blocks = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()),
              *(separable(*p) for p in plan)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, classes))


def _train(torch: Any, model: Any, trainable: list[Any], seed: int, steps: int = 4) -> None:
    """A few SGD steps on synthetic images; only ``trainable`` modules learn (and update BatchNorm stats)."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    for module in trainable:
        module.train()
    params = [p for m in trainable for p in m.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    for _ in range(steps):
        x = torch.rand((16, *INPUT), generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def _export(torch: Any, model: Any, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros((1, *INPUT)),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}})
    return path


def _compile(onnx: Path, version: str, calib: Path, out: Path, targets: tuple[str, ...]) -> dict[str, Path]:
    from edgeml.compile import CompileOptions, compile_model

    options = CompileOptions(targets=targets, name="mbnet", version=version, gate=False, benchmark=False,
                             calib_samples=32, golden_count=4)
    report = compile_model(str(onnx), options, out, calib=calib)
    return {o.target: o.bundle for o in report.outcomes if o.bundle is not None}


def build(work: Path) -> dict[str, dict[str, Path]]:
    """change -> target -> bundle (``base`` is 1.0.0)."""
    import copy

    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = work / "calib.npz"
    np.savez(calib, input=rng.random((32, *INPUT), dtype=np.float32))
    other = work / "calib-other.npz"
    np.savez(other, input=np.random.default_rng(1).random((32, *INPUT), dtype=np.float32) * 0.8)
    base = _mobilenet(torch)
    _train(torch, base, list(base), seed=0)
    bundles = {"base": _compile(_export(torch, base, work / "base.onnx"), "1.0.0", calib, work / "base",
                                ("onnx", "onnx-int8"))}
    for i, change in enumerate(("head-only", "last-blocks", "full"), 1):
        model = copy.deepcopy(base)
        trainable = {"head-only": [model[-1]], "last-blocks": list(model[-4:]), "full": list(model)}[change]
        _train(torch, model, trainable, seed=i)
        bundles[change] = _compile(_export(torch, model, work / f"{change}.onnx"), f"1.{i}.0", calib, work / change,
                                   ("onnx", "onnx-int8"))
    bundles["re-calibration"] = _compile(work / "base.onnx", "1.4.0", other, work / "recal", ("onnx-int8",))
    return bundles


def changed_share(base: Path, new: Path) -> float:
    """The share of the weights' bytes (ONNX initializers) that differ between two models."""
    import onnx
    from onnx import numpy_helper

    old = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(base)).graph.initializer}
    changed = total = 0
    for t in onnx.load(str(new)).graph.initializer:
        array = numpy_helper.to_array(t)
        total += array.nbytes
        if t.name not in old or old[t.name].shape != array.shape or not np.array_equal(old[t.name], array):
            changed += array.nbytes
    return changed / total


def measure(base: Path, new: Path) -> dict[str, Any]:
    start = time.perf_counter()
    delta = make_delta(base, new)
    made_s = time.perf_counter() - start
    header, _ = read_header(delta)
    base_bytes = base_of_bundle(base)[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        apply_delta(delta, base_bytes, Path(tmp) / "out.edgeml", expect_sha256=header.result_sha256,
                    expect_length=header.result_length)
        applied_s = time.perf_counter() - start
        assert hashlib.sha256((Path(tmp) / "out.edgeml").read_bytes()).hexdigest() == header.result_sha256
    full = new.stat().st_size
    row: dict[str, Any] = {"full": full, "delta": len(delta), "make_s": made_s, "apply_s": applied_s, "bsdiff": None}
    try:
        import bsdiff4
    except ImportError:
        return row
    view, _, _ = _inflated_view(new.read_bytes())
    start = time.perf_counter()
    patch = bsdiff4.diff(base_bytes, view)
    row.update(bsdiff=len(patch), bsdiff_make_s=time.perf_counter() - start)
    return row


def rollout(full: int, delta: int, metadata: int, devices: int) -> dict[str, int]:
    """Bytes on the wire for a rollout to ``devices`` devices on the base (each refreshes TUF metadata first)."""
    return {"full bundles": devices * (metadata + full), "deltas": devices * (metadata + delta),
            "delta broadcast": devices * metadata + delta}


def _metadata_bytes(work: Path, bundles: dict[str, dict[str, Path]]) -> int:
    """The TUF metadata a device refreshes (timestamp, snapshot, targets) in a registry holding these versions
    and their deltas: measured by publishing them."""
    from edgeml.fleet.registry.deltas import DeltaSettings
    from edgeml.fleet.registry.repository import init_registry

    registry = init_registry(work / "registry")
    for change in ("base", *CHANGES):  # each with a delta from the version before (their targets are listed)
        for path in bundles[change].values():
            registry.publish(path, deltas=DeltaSettings(bases=1, max_ratio=1.0))
    meta = registry.metadata_dir
    return sum(max(meta.glob(f"*{role}.json"), key=lambda p: p.stat().st_mtime).stat().st_size
               for role in ("timestamp", "snapshot", "targets"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--devices", type=int, default=1000)
    args = p.parse_args(argv)
    lines = [f"# Delta updates ({platform.machine()}, {time.strftime('%Y-%m-%d')})", "",
             "MobileNet-style model, 10 classes, 3x96x96; delta from 1.0.0. Goals: head-only <= 10%, last blocks "
             "<= 30% of the full bundle.", "",
             "| change | weights changed | target | full bundle | delta (zstd) | delta / full | make | apply | "
             "bsdiff4 (size, make) | goal |", "|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="edgeml-delta-bench-") as tmp:
        work = Path(tmp)
        print("building and compiling 5 versions (onnx, onnx-int8) ...", flush=True)
        bundles = build(work)
        head: dict[str, int] = {}
        for change in CHANGES:
            onnx = work / f"{change}.onnx"
            share = f"{changed_share(work / 'base.onnx', onnx):.1%}" if onnx.exists() else "0% (same model)"
            for target, bundle in sorted(bundles[change].items()):
                r = measure(bundles["base"][target], bundle)
                ratio = r["delta"] / r["full"]
                goal = GOALS.get(change)
                verdict = "" if goal is None else ("met" if ratio <= goal else f"MISSED (<= {goal:.0%})")
                bs = "n/a" if r["bsdiff"] is None else f"{r['bsdiff'] / r['full']:.1%} ({r['bsdiff_make_s']:.1f} s)"
                lines.append(f"| {change} | {share} | {target} | {r['full'] / 1e6:.2f} MB | "
                             f"{r['delta'] / 1e3:.1f} kB | {ratio:.1%} | {r['make_s']:.1f} s | "
                             f"{r['apply_s']:.2f} s | {bs} | {verdict} |")
                print(lines[-1], flush=True)
                if change == "head-only":
                    head[target] = r["delta"], r["full"]  # type: ignore[assignment]
        metadata = _metadata_bytes(work, bundles)
    lines += ["", f"A rollout of the head-only change to {args.devices:,} devices on 1.0.0: bytes on the wire (each "
              f"device first refreshes {metadata / 1e3:.1f} kB of TUF metadata).", "",
              "| target | full bundles | deltas | delta broadcast once |", "|---|---|---|---|"]
    for target, (delta, full) in sorted(head.items()):  # type: ignore[misc]
        r = rollout(full, delta, metadata, args.devices)
        lines.append(f"| {target} | {r['full bundles'] / 1e9:.2f} GB | {r['deltas'] / 1e6:.1f} MB | "
                     f"{r['delta broadcast'] / 1e6:.1f} MB |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
