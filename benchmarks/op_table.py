"""Op-compatibility benchmark: which ONNX op types each compile target supports, as measured here.

Models, each compiled by ``edgeml compile`` (the Python API) exactly as a user's would be:

* the small test models the ``onnx`` package ships (``onnx/backend/test/data/pytorch-converted`` and
  ``pytorch-operator``: one PyTorch module or operator each, exported at opset 6-9 with a test input), judged
  on that input;
* the CNN graphs of ``tests/compile/zoo.py`` (written node by node the way old model zoos wrote them);
* torchvision-style architectures built here in plain torch with random weights (torchvision itself is not
  needed): ResNet-18-style, MobileNetV2, SqueezeNet-style, an EfficientNet-style net (SiLU, Hardswish,
  squeeze-and-excitation), a DBNet-style text detector (FPN upsampling, ConvTranspose, a probability map),
  a U-Net-style segmenter (ArgMax), a ViT block (LayerNorm, attention, GELU) and an LSTM tagger; without data,
  so FP32 targets are judged on standard normal, uniform [0, 1) and uniform [0, 255] inputs.

A target **passes** a model when it builds and its gate passes on the target's real runtime: FP32 targets every
output within 0.1% of its magnitude; INT8 targets a max absolute error of at most 10% of the largest FP32
output magnitude (``--max-error``), calibrated on the test input itself (32 uniform images for a whole model).
``edgeml compile`` upgrades a source older than opset 7 to opset 13 itself (noted in the failure list).
Per op type, the table counts the models that contain it and pass; a model with several op types counts for
each, so a partial count points at the models listed under it. Models onnxruntime cannot run, or whose inputs
are not batch-first, count for no op type.

TensorRT targets are not in the table: this host has no TensorRT (their gate runs ONNX Runtime as a proxy).

Usage:  python benchmarks/op_table.py [--quick] [--jobs 2] [--out benchmarks/results-ops.md] [--docs docs/compile.md]
        python benchmarks/op_table.py --only Embedding --merge benchmarks/results-ops.json ...   (measure one again)
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import datetime as _dt
import glob
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.compile.zoo

TARGETS = ("onnx", "onnx-int8", "tflite", "tflite-int8")
START, END = "<!-- op-table:start -->", "<!-- op-table:end -->"
IGNORED_OPS = {"Constant"}


@dataclass
class Result:
    """One model's outcome on every target."""

    name: str
    kind: str  # "operator", "zoo" or "architecture"
    ops: list[str]
    status: dict[str, str] = field(default_factory=dict)  # target -> "pass" | "gate: ..." | "error: ..."
    note: str = ""
    seconds: float = 0.0


# --- the models --------------------------------------------------------------------------------------------

def onnx_test_models(quick: bool) -> list[tuple[str, Path]]:
    """(name, directory) of the onnx package's PyTorch test models, each with test_data_set_0."""
    import onnx

    base = Path(onnx.__file__).parent / "backend" / "test" / "data"
    dirs = sorted(Path(d) for d in glob.glob(str(base / "pytorch-*" / "test_*")) if Path(d, "model.onnx").is_file())
    if quick:
        dirs = dirs[::8]
    return [(d.name.removeprefix("test_"), d) for d in dirs]


def _torch_architectures() -> dict[str, tuple[Any, tuple[int, ...]]]:
    """name -> (module with random weights, input shape)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from edgeml.train.models import mobilenet_v2

    def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, act: Any = nn.ReLU) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), act())

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, s: int) -> None:
            super().__init__()
            self.a, self.b = conv_bn(cin, cout, s=s), nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                                                    nn.BatchNorm2d(cout))
            self.skip = nn.Identity() if s == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, s, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: Any) -> Any:
            return F.relu(self.b(self.a(x)) + self.skip(x))

    def classifier(body: nn.Module, width: int) -> nn.Module:
        return nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1000), nn.Softmax(1))

    resnet = classifier(nn.Sequential(conv_bn(3, 16, 7, 2), nn.MaxPool2d(3, 2, 1), Basic(16, 16, 1),
                                      Basic(16, 32, 2), Basic(32, 64, 2), Basic(64, 128, 2)), 128)

    class Fire(nn.Module):
        def __init__(self, cin: int, squeeze: int, expand: int) -> None:
            super().__init__()
            self.s = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
            self.e1, self.e3 = nn.Conv2d(squeeze, expand, 1), nn.Conv2d(squeeze, expand, 3, padding=1)

        def forward(self, x: Any) -> Any:
            s = self.s(x)
            return F.relu(torch.cat([self.e1(s), self.e3(s)], 1))

    squeezenet = nn.Sequential(nn.Conv2d(3, 32, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
                               Fire(32, 8, 32), Fire(64, 8, 32), nn.MaxPool2d(3, 2, ceil_mode=True),
                               Fire(64, 16, 64), nn.Dropout(0.5), nn.Conv2d(128, 1000, 1), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Softmax(1))

    class MBConv(nn.Module):
        def __init__(self, cin: int, cout: int, s: int) -> None:
            super().__init__()
            mid = cin * 4
            self.expand, self.dw = conv_bn(cin, mid, 1, act=nn.SiLU), nn.Sequential(
                nn.Conv2d(mid, mid, 3, s, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.Hardswish())
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, mid // 4, 1), nn.SiLU(),
                                    nn.Conv2d(mid // 4, mid, 1), nn.Sigmoid())
            self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.residual = s == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            h = self.dw(self.expand(x))
            h = self.project(h * self.se(h))
            return h + x if self.residual else h

    efficientnet = classifier(nn.Sequential(conv_bn(3, 16, s=2, act=nn.SiLU), MBConv(16, 16, 1), MBConv(16, 24, 2),
                                            MBConv(24, 40, 2), conv_bn(40, 96, 1, act=nn.SiLU)), 96)

    class DBNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c2, self.c3, self.c4 = conv_bn(3, 16, s=2), conv_bn(16, 32, s=2), conv_bn(32, 64, s=2)
            self.l3, self.l4 = nn.Conv2d(32, 32, 1), nn.Conv2d(64, 32, 1)
            self.head = nn.Sequential(conv_bn(32, 16), nn.ConvTranspose2d(16, 16, 2, 2), nn.BatchNorm2d(16),
                                      nn.ReLU(), nn.ConvTranspose2d(16, 1, 2, 2), nn.Sigmoid())

        def forward(self, x: Any) -> Any:
            c3 = self.c3(self.c2(x))
            c4 = self.c4(c3)
            p3 = self.l3(c3) + F.interpolate(self.l4(c4), scale_factor=2.0, mode="bilinear", align_corners=False)
            return self.head(p3)

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d1, self.d2 = conv_bn(3, 16), nn.Sequential(nn.MaxPool2d(2), conv_bn(16, 32))
            self.up = nn.ConvTranspose2d(32, 16, 2, 2)
            self.out = nn.Sequential(conv_bn(32, 16), nn.Conv2d(16, 4, 1))

        def forward(self, x: Any) -> Any:
            a = self.d1(x)
            logits = self.out(torch.cat([a, self.up(self.d2(a))], 1))
            return logits.softmax(1), logits.argmax(1)

    class ViT(nn.Module):
        def __init__(self, dim: int = 64, heads: int = 4) -> None:
            super().__init__()
            self.heads = heads
            self.patch = nn.Conv2d(3, dim, 8, 8)
            self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
            self.fc = nn.Linear(dim, 1000)

        def attention(self, h: Any) -> Any:  # written out: nn.MultiheadAttention's fast path does not export
            n, t, d = h.shape
            q, k, v = self.qkv(h).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            weights = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1)
            return self.proj((weights @ v).transpose(1, 2).reshape(n, t, d))

        def forward(self, x: Any) -> Any:
            t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            t = t + self.attention(self.norm1(t))
            t = t + self.mlp(self.norm2(t))
            return self.fc(t.mean(1)).softmax(-1)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.fc = nn.LSTM(8, 32, batch_first=True), nn.Linear(32, 5)

        def forward(self, x: Any) -> Any:
            return self.fc(self.lstm(x)[0])

    mobilenet = nn.Sequential(mobilenet_v2(num_classes=1000, width_mult=0.5), nn.Softmax(1))
    image = (1, 3, 64, 64)
    vit = ViT()
    for classifier_net in (resnet, mobilenet, squeezenet, efficientnet, vit):
        _sharpen(classifier_net, image)
    return {"resnet18-style": (resnet, image), "mobilenet_v2": (mobilenet, image),
            "squeezenet-style": (squeezenet, image), "efficientnet-style": (efficientnet, image),
            "dbnet-style-detector": (DBNet(), image), "unet-style-segmenter": (UNet(), image),
            "vit-block": (vit, image), "lstm-tagger": ((Tagger()), (1, 16, 8))}


def _sharpen(module: Any, shape: tuple[int, ...], spread: float = 3.0) -> None:
    """Scale the last layer of a random-weight classifier so that its logits spread like a trained one's (std
    ``spread`` on uniform images): random weights give an almost flat softmax, which no classifier has."""
    import torch

    last = [m for m in module.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)][-1]
    seen: list[Any] = []
    handle = last.register_forward_hook(lambda _m, _i, out: seen.append(out))
    module.eval()
    with torch.no_grad():
        module(torch.rand(16, *shape[1:]))
        handle.remove()
        factor = spread / max(float(seen[0].std()), 1e-6)
        last.weight.mul_(factor)
        if getattr(last, "bias", None) is not None:
            last.bias.mul_(factor)


def export_architectures(work: Path, quick: bool) -> list[tuple[str, Path]]:
    import warnings

    import torch

    torch.manual_seed(0)
    out = []
    archs = _torch_architectures()
    for name, (module, shape) in list(archs.items())[: 3 if quick else None]:
        module.eval()
        path = work / f"{name}.onnx"
        example = torch.rand(*shape)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outputs = module(example)
                names = [f"output{i}" for i in range(len(outputs))] if isinstance(outputs, tuple) else ["output"]
                torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=names,
                                  dynamic_axes={n: {0: "batch"} for n in ["input", *names]})
        except Exception as exc:  # said in the table's log, not a reason to measure nothing
            print(f"{name}: the PyTorch export failed: {exc}", file=sys.stderr)
            continue
        out.append((name, path))
    return out


def zoo_models(work: Path) -> list[tuple[str, Path]]:
    import onnx

    from tests.compile.zoo import BUILDERS

    out = []
    for name, build in BUILDERS.items():
        path = work / f"{name}.onnx"
        onnx.save(build(), str(path))
        out.append((name, path))
    return out


# --- measuring one model -------------------------------------------------------------------------------------

def _op_types(model: Any) -> list[str]:
    found: set[str] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            found.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    walk(sub)

    walk(model.graph)
    return sorted(found - IGNORED_OPS)


def _test_inputs(directory: Path, model: Any) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    files = sorted(directory.glob("test_data_set_0/input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    return {n: numpy_helper.to_array(onnx.load_tensor(str(f))) for n, f in zip(names, files)}


def _runnable(path: Path, feed: dict[str, np.ndarray] | None) -> bool:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        if feed is not None:
            session.run(None, feed)
        return True
    except Exception:
        return False


def _status(outcome: Any) -> str:
    if outcome.status == "written":
        return "pass"
    if outcome.status == "gate-failed" and outcome.gate is not None:
        rel = outcome.gate.metrics.get("max_relative_error")
        if rel is not None:
            return f"gate: runs, but off by {100 * rel:.3g}% of the output"
        return f"gate: {outcome.gate.reason}"
    text = outcome.error.message if outcome.error is not None else outcome.status
    return "error: " + re.sub(r"\s+", " ", text).strip()[:160]


def measure(name: str, kind: str, path_text: str, data_dir: str | None) -> Result:
    """Compile one model to every target; never raises (a failure is a result)."""
    start = time.monotonic()
    try:
        return _measure(name, kind, path_text, data_dir)
    except Exception as exc:  # a bug here, or a model this script cannot feed: said in the table, not fatal
        text = re.sub(r"\s+", " ", f"{type(exc).__name__}: {exc}").strip()[:160]
        return Result(name, kind, [], {t: f"error: measuring failed: {text}" for t in TARGETS},
                      seconds=time.monotonic() - start)


def _measure(name: str, kind: str, path_text: str, data_dir: str | None) -> Result:
    import onnx
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # old opsets make onnxruntime warn on every session
    start = time.monotonic()
    path = Path(path_text)
    model = onnx.load(str(path))
    result = Result(name, kind, _op_types(model))
    feed = _test_inputs(Path(data_dir), model) if data_dir else None
    with tempfile.TemporaryDirectory(prefix=f"ops-{name}-") as tmp:
        work = Path(tmp)
        runnable = _as_compiled(model, work)  # what onnxruntime runs: opsets before 7 upgraded, as compile does
        if runnable is not None:
            result.note = f"upgraded from opset {_opset(model)} by edgeml compile"
        if feed is not None and len({len(v) if v.ndim else 1 for v in feed.values()}) > 1:
            result.status = {t: f"error: {NOT_BATCH_FIRST}" for t in TARGETS}
        elif not _runnable(runnable or path, feed):
            result.status = {t: f"error: {NOT_RUNNABLE}" for t in TARGETS}
        elif feed is not None:  # an operator model: its own test input, as it is
            np.savez(work / "data.npz", **feed)  # type: ignore[arg-type]
            result.status = _compile(path, work / "dist", TARGETS, work / "data.npz",
                                     _scale(runnable or path, feed))
        else:  # a whole model: FP32 without data (the generated sets), INT8 on uniform images
            first = model.graph.input[0]
            shape = [d.dim_value or 1 for d in first.type.tensor_type.shape.dim]
            images = {first.name: np.random.default_rng(0).random([32, *shape[1:]], dtype=np.float32)}
            np.savez(work / "data.npz", **images)  # type: ignore[arg-type]
            fp32 = tuple(t for t in TARGETS if not t.endswith("int8"))
            result.status = _compile(path, work / "fp32", fp32, None, 1.0)
            result.status.update(_compile(path, work / "int8", tuple(t for t in TARGETS if t not in fp32),
                                          work / "data.npz", _scale(runnable or path, images)))
    result.seconds = time.monotonic() - start
    return result


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _as_compiled(model: Any, work: Path) -> Path | None:
    """The model upgraded to opset 13 the way ``edgeml compile`` upgrades a source older than opset 7 (for this
    script's own reference run); None when it needs no upgrade or the upgrade fails (compile then says why)."""
    if not 0 < _opset(model) < 7:
        return None
    import onnx
    from onnx import version_converter

    try:
        new = version_converter.convert_version(model, 13)
        inits = {i.name for i in new.graph.initializer}
        kept = [v for v in new.graph.input if v.name not in inits]
        del new.graph.input[:]
        new.graph.input.extend(kept)
        new.ir_version = max(new.ir_version, 7)
        path = work / "upgraded.onnx"
        onnx.save(new, str(path))
        return path
    except Exception:
        return None


#: Why a model is not measured (it counts for no op type).
NOT_RUNNABLE = "the source does not run in onnxruntime"
NOT_BATCH_FIRST = "not batch-first (its inputs' leading sizes differ), which edgeml's data format needs"


def _scale(path: Path, feed: dict[str, np.ndarray]) -> float:
    """The largest FP32 output magnitude on ``feed`` (run in chunks of a fixed batch)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fixed = session.get_inputs()[0].shape[0]
    n = len(next(iter(feed.values())))
    step = fixed if isinstance(fixed, int) and fixed > 0 else n
    refs = [r for i in range(0, n, step) for r in session.run(None, {k: v[i:i + step] for k, v in feed.items()})]
    return max(float(np.abs(r[np.isfinite(r)]).max()) if np.isfinite(r).any() else 0.0 for r in refs)


def _compile(path: Path, out: Path, targets: tuple[str, ...], data: Path | None, scale: float) -> dict[str, str]:
    """Each target's status after one ``compile_model`` run (INT8 gated on 10% of ``scale``)."""
    from edgeml.compile import CompileOptions, compile_model

    samples = len(next(iter(np.load(data).values()))) if data is not None else 1
    options = CompileOptions(targets=targets, name="op", version="1.0.0", benchmark=False,
                             max_error=max(0.1 * scale, 1e-6), calib_samples=samples)
    try:
        report = compile_model(str(path), options, out, calib=data, val=data)
        return {o.target: _status(o) for o in report.outcomes}
    except Exception as exc:  # the whole run stopped (e.g. its data was refused): every target failed
        text = getattr(exc, "message", str(exc))
        return {t: "error: " + re.sub(r"\s+", " ", text).strip()[:160] for t in targets}


# --- the tables -------------------------------------------------------------------------------------------

def supported(target: str, status: str) -> bool:
    """FP32 targets: built and within parity. INT8 targets: built and run in their runtime (how far INT8 moves
    the outputs depends on the weights and the data; the gate judges that per model, and the list says it)."""
    return status == "pass" or (target.endswith("int8") and status.startswith("gate: runs"))


def _cell(passed: int, total: int) -> str:
    if passed == total:
        return f"✓ {total}/{total}"
    return f"✗ 0/{total}" if passed == 0 else f"◐ {passed}/{total}"


def _short(status: str) -> str:
    """A table cell: ``pass``, how far an INT8 build that runs is off, or the failure in a few words."""
    if status == "pass":
        return "pass"
    if status.startswith("gate: runs, but off by "):
        return "runs, off by " + status.removeprefix("gate: runs, but off by ").split()[0]
    text = status.removeprefix("error: ").removeprefix("gate: ")
    return "✗ " + (text if len(text) <= 48 else text[:45].rstrip() + "...")


def op_rows(results: list[Result]) -> list[tuple[str, list[Result]]]:
    by_op: dict[str, list[Result]] = collections.defaultdict(list)
    for r in results:
        for op in r.ops:
            by_op[op].append(r)
    return sorted(by_op.items())


def render(results: list[Result]) -> str:
    """The results as markdown: per op type, per architecture, then every failure."""
    skipped = (f"error: {NOT_RUNNABLE}", f"error: {NOT_BATCH_FIRST}")
    measured = [r for r in results if not all(s in skipped for s in r.status.values())]
    lines = [f"Measured {_dt.date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}: onnxruntime {version('onnxruntime')}, onnx2tf {version('onnx2tf')}, "
             f"TensorFlow {version('tensorflow')}, ai-edge-litert {version('ai-edge-litert')}; "
             f"{len(measured)} models ({sum(r.kind == 'operator' for r in measured)} onnx test models, "
             f"{sum(r.kind == 'zoo' for r in measured)} zoo graphs, "
             f"{sum(r.kind == 'architecture' for r in measured)} architectures), "
             f"{sum(r.seconds for r in results) / 60:.0f} min of compiling (`make bench`: `benchmarks/op_table.py`).",
             "",
             "Per op type: the models containing it that each target supports (✓ all, ◐ some, ✗ none): FP32 "
             "targets built and within 0.1% of every output, INT8 targets built and run (their error is in the "
             "list below when it passes 10% of the output).", "",
             "| op type | models | " + " | ".join(f"`{t}`" for t in TARGETS) + " |",
             "|---|---|" + "---|" * len(TARGETS)]
    for op, rs in op_rows(measured):
        cells = [_cell(sum(supported(t, r.status.get(t, "")) for r in rs), len(rs)) for t in TARGETS]
        lines.append(f"| `{op}` | {len(rs)} | " + " | ".join(cells) + " |")
    lines += ["", "Whole models (zoo graphs and torchvision-style architectures, random weights):", "",
              "| model | " + " | ".join(f"`{t}`" for t in TARGETS) + " |", "|---|" + "---|" * len(TARGETS)]
    for r in (r for r in results if r.kind != "operator"):
        cells = [_short(r.status.get(t, "-")) for t in TARGETS]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    failures = [(r, t, s) for r in results for t, s in r.status.items() if s != "pass"]
    lines += ["", f"What failed ({len(failures)} of {len(results) * len(TARGETS)} builds):", ""]
    for r, t, s in failures:
        note = f" ({r.note})" if r.note else ""
        lines.append(f"- {r.name}{note}, `{t}`: {s}")
    return "\n".join(lines) + "\n"


def write_docs(docs: Path, table: str) -> None:
    """Replace the part of ``docs`` between the op-table markers with ``table``."""
    text = docs.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{docs} has no {START} ... {END} section to replace")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    docs.write_text(f"{head}{START}\n{table}{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="One model in eight, three architectures.")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, (os.cpu_count() or 2))))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results-ops.md"))
    parser.add_argument("--docs", type=Path, default=None, help="Also rewrite the op table in this document.")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="Measure only this model (repeatable); the others come from --merge.")
    parser.add_argument("--merge", type=Path, default=None, metavar="JSON",
                        help="Results of an earlier run (the .json beside its --out) for the models not measured.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="op-table-") as tmp:
        work = Path(tmp)
        jobs: list[tuple[str, str, str, str | None]] = [
            (name, "operator", str(d / "model.onnx"), str(d)) for name, d in onnx_test_models(args.quick)]
        jobs += [(name, "zoo", str(p), None) for name, p in zoo_models(work)]
        jobs += [(name, "architecture", str(p), None) for name, p in export_architectures(work, args.quick)]
        earlier = {r["name"]: Result(**r) for r in json.loads(args.merge.read_text())} if args.merge else {}
        order = {name: i for i, (name, *_) in enumerate(jobs)}
        if args.only:
            jobs = [job for job in jobs if job[0] in set(args.only)]
        print(f"{len(jobs)} models, {args.jobs} at a time", file=sys.stderr)
        results: list[Result] = [r for name, r in earlier.items() if name in order and name not in
                                 {job[0] for job in jobs}]
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(measure, *job): job[0] for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                r = future.result()
                results.append(r)
                print(f"[{len(results)}/{len(order)}] {r.name}: {r.seconds:.0f} s "
                      f"{ {t: s[:90] for t, s in r.status.items()} }", file=sys.stderr)
    results.sort(key=lambda r: order[r.name])
    table = render(results)
    args.out.write_text("# Op compatibility, measured\n\n" + table)
    args.out.with_suffix(".json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    if args.docs is not None:
        write_docs(args.docs, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
