"""``edgeml compile --recover``: when an INT8 target fails its gate, search for an artifact that passes.

Cheapest first, and the first candidate that passes ships:

1. **Calibration** (``onnx-int8``, ``tensorrt-int8``): entropy, then percentile at 99.99, 99.9 and 99.
   Nothing changes in the model; TFLite calibrates min/max itself, so ``tflite-int8`` skips this stage.
2. **Rescaling**, every layer still INT8 (:mod:`edgeml.compile.equalize`): cross-layer equalization of
   linear pairs (smoothing where equalization does not apply), then SmoothQuant-style smoothing from the
   calibration data everywhere. The rescaled FP32 model must pass FP32 parity with the source first; it is
   then quantized by the target's own backend (onnx2tf for ``tflite-int8``), with the user's calibration
   and, on ONNX targets, also with the best one of stage 1.
3. **Mixed precision** (``onnx-int8``, ``tensorrt-int8``; :mod:`edgeml.compile.mixed`): from the best
   candidate so far, the fewest layers kept in float, chosen from a fresh diagnosis's ranking. Nodes without
   names get deterministic ones (:func:`edgeml.compile.recover_graph.assign_names`). ``tflite-int8`` is
   full-integer, so it stops after stage 2.

Every candidate is built by the target's backend and judged by the same gate, on the same runtime, as the
plain artifact. The search stops after the candidate in progress once ``recover_budget_s`` is spent.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.compile.backends.base import BuildContext, BuildResult
from edgeml.compile.data import Dataset
from edgeml.compile.gate import GateResult
from edgeml.compile.targets import Target, backend_for
from edgeml.errors import DataError, EdgeMLError
from edgeml.progress import Progress

__all__ = ["CALIBRATIONS", "Candidate", "Recovery", "RecoveryResult"]

#: Stage 1, in order: (method, percentile).
CALIBRATIONS: tuple[tuple[str, float], ...] = (("entropy", 99.99), ("percentile", 99.99), ("percentile", 99.9),
                                               ("percentile", 99.0))

Judge = Callable[[BuildResult], tuple[GateResult, list[np.ndarray]]]


@dataclass
class Candidate:
    """One artifact the search tried."""

    stage: str  # "calibration" | "rescale" | "mixed"
    method: str
    percentile: float
    fp32: Path | None = None  # the rescaled FP32 model; None: the source's
    rescaled: list[dict[str, Any]] = field(default_factory=list)
    named: int = 0  # nodes the rescaling named
    float_nodes: tuple[str, ...] = ()
    drop: float | None = None
    passed: bool | None = None
    error: str | None = None
    metric: str = ""  # the gate's metric, once judged

    @property
    def label(self) -> str:
        cal = self.method if self.method != "percentile" else f"percentile {self.percentile:g}"
        parts = [cal]
        if self.rescaled:
            kinds = sorted({r["kind"] for r in self.rescaled})
            parts.append(f"{'+'.join(kinds)} of {len(self.rescaled)} activation(s)")
        if self.float_nodes:
            parts.append(f"{len(self.float_nodes)} node(s) in float")
        return ", ".join(parts)

    def line(self) -> str:
        if self.error:
            return f"{self.stage}: {self.label}: {self.error}"
        verdict = "PASSES" if self.passed else "fails"
        word = "max error" if self.metric == "max-error" else "drop"
        drop = f", {word} {self.drop:.4g}" if self.drop is not None and math.isfinite(self.drop) else ""
        if self.metric != "max-error" and drop:
            drop = f", drop {self.drop:.2f}"
        return f"{self.stage}: {self.label}: {verdict}{drop}"


@dataclass
class RecoveryResult:
    """What the search found: the passing artifact (or None), what it tried, and the manifest record."""

    built: BuildResult | None
    verdict: GateResult | None
    compiled: list[np.ndarray] | None
    tried: list[Candidate]
    record: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """Human-readable lines for the CLI."""
        head = (f"  recovered after {len(self.tried)} candidate(s) in {self.seconds:.1f} s:" if self.built
                else f"  --recover found no passing artifact ({len(self.tried)} candidate(s), {self.seconds:.1f} s):")
        return [head, *(f"    {c.line()}" for c in self.tried), *(f"    note: {n}" for n in self.notes)]


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


class Recovery:
    """The search for one target. ``judge`` runs a built candidate through the gate; ``parity`` judges an
    FP32 model against the source (FP32 parity)."""

    def __init__(self, ctx: BuildContext, target: Target, gate_data: Dataset, judge: Judge,
                 parity: Callable[[Path], GateResult], plain: GateResult) -> None:
        self.ctx, self.target, self.gate_data = ctx, target, gate_data
        self.judge, self.parity, self.plain = judge, parity, plain
        self.work = ctx.workdir / f"recover-{target.name}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.options = ctx.options
        self.tried: list[Candidate] = []
        self.notes: list[str] = []
        self.start = time.monotonic()
        self._prepared: dict[str, tuple[Path, int]] = {}
        self._found: tuple[Candidate, BuildResult, GateResult, list[np.ndarray]] | None = None
        self._passing: dict[frozenset[str], tuple[Candidate, BuildResult, GateResult, list[np.ndarray]]] = {}
        self.onnx_based = target.runtime != "litert"

    # -- the search -------------------------------------------------------------------------------------

    def run(self) -> RecoveryResult:
        stages = [self._calibration, self._rescaling, self._mixed]
        for stage in stages:
            if self._found or self._out_of_time():
                break
            stage()
        if not self._found and self._out_of_time():
            self.notes.append(f"stopped at the time budget ({self.options.recover_budget_s:g} s, "
                              "--recover-budget)")
        seconds = time.monotonic() - self.start
        if not self._found:
            return RecoveryResult(None, None, None, self.tried, None, self.notes, seconds)
        cand, built, verdict, compiled = self._found
        if self.options.build_engine and self.target.runtime == "tensorrt":
            built = self._build(cand, "final", engine=True)
        return RecoveryResult(built, verdict, compiled, self.tried, self._record(cand, verdict, seconds),
                              self.notes, seconds)

    def _out_of_time(self) -> bool:
        return time.monotonic() - self.start > self.options.recover_budget_s

    def _user_calibration(self) -> tuple[str, float]:
        return self.options.calibration_method, self.options.calibration_percentile

    def _calibration(self) -> None:
        if not self.onnx_based:
            self.notes.append("calibration methods do not apply to tflite-int8 (TFLite calibrates min/max)")
            return
        method, pct = self._user_calibration()
        for m, p in CALIBRATIONS:
            if (m, p) == (method, pct) or (m == method == "entropy") or self._out_of_time():
                continue
            if self._try(Candidate("calibration", m, p)):
                return

    def _best_calibration(self) -> tuple[str, float]:
        """The stage-1 calibration with the lowest drop, when it beat the user's."""
        cal = [c for c in self.tried if c.stage == "calibration" and c.drop is not None]
        best = min(cal, key=lambda c: c.drop if c.drop is not None else math.inf, default=None)
        if best is not None and best.drop is not None and best.drop < self.plain.drop:
            return best.method, best.percentile
        return self._user_calibration()

    def _rescaling(self) -> None:
        from edgeml.compile.backends.onnx_fp32 import simplified_fp32
        from edgeml.compile.equalize import rescale

        source = simplified_fp32(self.ctx).eval_path
        calib = self._calib()
        for data_driven in (False, True):
            if self._out_of_time():
                return
            out = self.work / f"rescaled-{'smooth' if data_driven else 'equalize'}" / "model.onnx"
            with self.ctx.progress.task(f"recovering {self.target.name}: rescaling "
                                        f"({'smoothing' if data_driven else 'equalization'})", None):
                try:
                    plan = rescale(source, out, calib, data_driven=data_driven)
                except EdgeMLError:
                    raise
                except Exception as exc:  # rescaling is one remedy among three: say why, go on to the next stage
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    self.notes.append(f"rescaling skipped: {type(exc).__name__}: {first}")
                    return
            if plan is None:
                self.notes.append("rescaling does not apply: no activation between linear layers that an op "
                                  "before it can absorb a per-channel scale into")
                return
            parity = self.parity(out)
            method, pct = self._user_calibration()
            if not parity.passed:
                self.tried.append(Candidate("rescale", method, pct, out, plan.positions,
                                            error=f"FP32 parity broken ({parity.reason}); not used"))
                self.ctx.progress.log(f"  {self.tried[-1].line()}")
                continue
            calibrations = dict.fromkeys([(method, pct), self._best_calibration()] if self.onnx_based
                                         else [(method, pct)])
            for m, p in calibrations:
                cand = Candidate("rescale", m, p, out, plan.positions, named=plan.names_assigned)
                cand.rescaled = [dict(r, fp32_parity=_finite(parity.drop)) for r in plan.positions]
                if self._out_of_time() or self._try(cand):
                    return
            if not any(r["kind"] == "equalize" for r in plan.positions):
                return  # every activation was smoothed already: the data-driven variant is the same model

    def _mixed(self) -> None:
        if not self.onnx_based:
            self.notes.append("mixed precision does not apply to tflite-int8 (every op is integer): use onnx-int8 "
                              "or the FP32 tflite target")
            return
        from edgeml.compile.diagnose import diagnose
        from edgeml.compile.mixed import islands, search_float_set

        base = self._base()
        built = self._build(base, "mixed-base")
        prepared, _ = self._named_prepared(base.fp32)
        with self.ctx.progress.task(f"recovering {self.target.name}: ranking tensors for mixed precision", None):
            try:
                ranking = diagnose(prepared, built.quantized_onnx or built.eval_path, self.gate_data).ranking
            except EdgeMLError:
                raise
            except Exception as exc:  # no ranking, no islands: say why instead of failing the whole compile
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                self.notes.append(f"mixed precision skipped: the tensors could not be ranked ({first})")
                return
        onnx = _onnx()
        model = onnx.load(str(prepared), load_external_data=False)
        found = islands([b.tensor for b in ranking], model, excluded=self.options.exclude_nodes)

        def passes(nodes: tuple[str, ...]) -> bool | None:
            if self._out_of_time():
                return None
            cand = dataclasses.replace(base, stage="mixed", float_nodes=nodes, drop=None, passed=None, error=None)
            return self._try(cand, ship=False)

        chosen = search_float_set(found, passes)
        if chosen is not None:
            self._found = self._passing[frozenset(chosen)]

    def _base(self) -> Candidate:
        """The best candidate so far (lowest drop), without float layers; the plain artifact by default."""
        method, pct = self._user_calibration()
        best = Candidate("plain", method, pct, drop=self.plain.drop)
        for c in self.tried:
            if c.error is None and c.drop is not None and best.drop is not None and c.drop < best.drop:
                best = c
        return best

    # -- building and judging ---------------------------------------------------------------------------

    def _calib(self) -> Dataset:
        if self.ctx.calib is None:  # INT8 targets refuse to build without it, before the search starts
            raise DataError("--recover needs calibration data: pass --calib DATA")
        return self.ctx.calib.take(self.options.calib_samples)

    def _named_prepared(self, fp32: Path | None) -> tuple[Path, int]:
        """The quantization-ready model of ``fp32`` (the source's when None), every node named."""
        from edgeml.compile.backends.onnx_int8 import prepared_model
        from edgeml.compile.quantize import prepare_for_quantization
        from edgeml.compile.recover_graph import name_model_file

        key = str(fp32)
        if key not in self._prepared:
            d = self.work / f"prepared-{len(self._prepared)}"
            d.mkdir(parents=True, exist_ok=True)
            src = prepared_model(self.ctx) if fp32 is None else prepare_for_quantization(fp32, d / "prepared.onnx")
            self._prepared[key] = name_model_file(Path(src), d / "named.onnx")
        return self._prepared[key]

    def _build(self, cand: Candidate, tag: str, *, engine: bool = False) -> BuildResult:
        shared: dict[str, Any] = {}
        if cand.fp32 is not None:
            shared["onnx_fp32"] = BuildResult(
                files={"model.onnx": cand.fp32}, model_file="model.onnx", model_format="onnx",
                runtime={"name": "onnxruntime", "precision": "fp32", "build": None}, eval_path=cand.fp32,
                eval_runtime="onnxruntime")
        if self.onnx_based:
            shared["prepared"] = self._named_prepared(cand.fp32)[0]
        options = dataclasses.replace(
            self.options, calibration_method=cand.method, calibration_percentile=cand.percentile,
            exclude_nodes=tuple(dict.fromkeys([*self.options.exclude_nodes, *cand.float_nodes])),
            build_engine=engine)
        workdir = self.work / tag
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = BuildContext(self.ctx.source, options, self.ctx.calib, workdir, Progress(), shared)
        return backend_for(self.target).build(ctx)

    def _try(self, cand: Candidate, *, ship: bool = True) -> bool:
        """Build and judge ``cand``; ship it when it passes (and ``ship``). Returns whether it passed."""
        self.tried.append(cand)
        with self.ctx.progress.task(f"recovering {self.target.name} [{len(self.tried)}]: {cand.label}", None):
            try:
                built = self._build(cand, f"cand-{len(self.tried)}")
                verdict, compiled = self.judge(built)
            except EdgeMLError as exc:
                cand.error, cand.passed = f"error: {exc.message}", False
                self.ctx.progress.log(f"  {cand.line()}")
                return False
        cand.drop, cand.passed, cand.metric = verdict.drop, verdict.passed, verdict.metric
        self.ctx.progress.log(f"  {cand.line()}")
        if verdict.passed:
            self._passing[frozenset(cand.float_nodes)] = (cand, built, verdict, compiled)
            if ship:
                self._found = self._passing[frozenset(cand.float_nodes)]
        return verdict.passed

    def _record(self, cand: Candidate, verdict: GateResult, seconds: float) -> dict[str, Any]:
        """The manifest's ``recovery`` block (see :mod:`edgeml.recovery`)."""
        from edgeml.compile.mixed import float_layers

        layers: list[dict[str, Any]] = []
        named = 0
        if self.onnx_based:
            prepared, named = self._named_prepared(cand.fp32)
            model = _onnx().load(str(prepared), load_external_data=False)
            layers = [f.to_dict() for f in float_layers(cand.float_nodes, model)]
        return {
            "stage": cand.stage, "metric": verdict.metric, "plain_drop": _finite(self.plain.drop),
            "drop": _finite(verdict.drop), "budget": _finite(verdict.budget),
            "calibration": {"method": cand.method,
                            "percentile": cand.percentile if cand.method == "percentile" else None},
            "rescaled": [{"kind": r["kind"], "layers": list(r["layers"]), "channels": int(r["channels"])}
                         for r in cand.rescaled],
            "fp32_parity": next((r.get("fp32_parity") for r in cand.rescaled), None),
            "float_nodes": list(cand.float_nodes), "float_layers": layers,
            "float_compute_share": round(sum(f["compute_share"] for f in layers), 6),
            "names_assigned": named if cand.float_nodes else cand.named,
            "candidates": len(self.tried), "seconds": round(seconds, 3),
            "budget_s": float(self.options.recover_budget_s),
        }


def _onnx() -> Any:
    from edgeml._deps import require

    return require("onnx", "compile")
