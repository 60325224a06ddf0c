"""``edgeml compile``: source -> every target -> gate on the real runtime -> latency -> bundle.

Each target is built, run and judged on its own; a target that fails (conversion or gate) writes nothing,
the others still ship, and the run as a whole reports failure. All work happens in a hidden scratch
directory inside the output directory; only finished bundles are renamed into place.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.util
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml import __version__
from edgeml.bundle import Manifest, bundle_filename, check_name, check_semver
from edgeml.bundle_writer import write_bundle
from edgeml.compile.backends.base import BuildContext, BuildResult
from edgeml.compile.data import Dataset, ImagePreprocessing, generated_sets, load_dataset
from edgeml.compile.diagnose import Diagnosis, calibration_warnings, candidate_remedies, diagnose, try_remedies
from edgeml.compile.gate import GateResult, combine_parity, judge, resolve_metric, run_model
from edgeml.compile.options import CompileOptions
from edgeml.compile.recover import RecoveryResult
from edgeml.compile.shapes import shape_text
from edgeml.compile.source import SourceModel, load_source
from edgeml.compile.targets import Target, backend_for, get_target
from edgeml.edge_agent.runtimes.base import latency_ms, open_runtime
from edgeml.errors import BundleError, ConfigError, DataError, EdgeMLError, MissingExtraError
from edgeml.fsutil import atomic_output_dir, atomic_write_bytes, ensure_writable_dir
from edgeml.progress import Progress
from edgeml.refstats import compute_reference_stats

__all__ = ["CompileReport", "TargetOutcome", "compile_model"]

_EXTRA_MODULES = {"compile": ("onnx", "onnxruntime"), "tflite": ("onnx2tf", "tensorflow", "ai_edge_litert")}


@dataclass
class TargetOutcome:
    """What happened to one target."""

    target: str
    status: str  # "written" | "gate-failed" | "error"
    bundle: Path | None = None
    gate: GateResult | None = None
    latency: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0
    error: EdgeMLError | None = None
    diagnosis: Diagnosis | None = None
    notes: list[str] = field(default_factory=list)
    manifest: Manifest | None = None
    warnings: list[str] = field(default_factory=list)
    recovery: RecoveryResult | None = None  # what --recover tried (and found, when the status is "written")


@dataclass
class CompileReport:
    """The result of a compile run: one outcome per target, plus the reference numbers."""

    source: SourceModel
    outcomes: list[TargetOutcome]
    reference_size: int

    @property
    def ok(self) -> bool:
        return all(o.status == "written" for o in self.outcomes)


def _check_extras(targets: list[Target]) -> None:
    for extra in sorted({t.extra for t in targets}):
        for module in _EXTRA_MODULES.get(extra, ()):
            if importlib.util.find_spec(module) is None:
                also = "pip install --no-deps onnx2tf==1.29.24" if extra == "tflite" else None
                raise MissingExtraError(module, extra, also=also)


def _identity(source: SourceModel, options: CompileOptions) -> tuple[str, str]:
    try:
        name = check_name(options.name or source.stem)
        version = check_semver(options.version or f"0.0.0-dev.h{source.sha256[:8]}")
    except BundleError as exc:
        raise ConfigError(exc.message) from exc
    return name, version


def _load_data(path: str | Path | None, source: SourceModel, pre: ImagePreprocessing | None,
               role: str) -> Dataset | None:
    return None if path is None else load_dataset(path, source.inputs, preprocessing=pre, role=role)


def _tool_versions(targets: list[Target]) -> dict[str, str]:
    versions = {"edgeml": __version__, "python": platform.python_version(), "numpy": np.__version__}
    mods = ["onnx", "onnxruntime", "onnxslim"] + (["onnx2tf", "tensorflow"] if any(
        t.extra == "tflite" for t in targets) else [])
    for mod in mods:
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:
            continue
    return versions


def compile_model(model: str, options: CompileOptions, out_dir: str | Path, *,
                  calib: str | Path | None = None, val: str | Path | None = None,
                  preprocessing: ImagePreprocessing | None = None, checkpoint: Path | None = None,
                  progress: Progress | None = None) -> CompileReport:
    """Compile ``model`` to every target in ``options`` and write one bundle per passing target.

    Args:
        model: An ``.onnx`` path, ``package.module:factory``, or a training run directory (then name,
            version, calib and val default to the run's).
        options: Targets, gate budget, quantization settings.
        out_dir: Where bundles are written (created if needed).
        calib: Calibration data (INT8 targets).
        val: Validation data for the gate (INT8 targets need it unless ``options.gate`` is False).
        preprocessing: For image-folder data.
        checkpoint: State dict for a PyTorch factory.
        progress: Progress sink (default: silent).

    Raises:
        EdgeMLError: A problem that stops every target (bad model, bad data, unknown target, unwritable
            output, missing extra). Per-target failures are reported in the returned outcomes instead.
    """
    progress = progress or Progress()
    from edgeml.rundir import is_run_dir, run_defaults

    if is_run_dir(model):  # `edgeml compile RUN_DIR`: name, version, calib and val come from the run
        trained = run_defaults(model)
        options = dataclasses.replace(options, name=options.name or trained.name,
                                      version=options.version or trained.version)
        calib = calib if calib is not None else trained.calib
        val = val if val is not None else trained.val
    targets = [get_target(t) for t in dict.fromkeys(options.targets)]
    _check_extras(targets)
    out = ensure_writable_dir(out_dir)
    with atomic_output_dir(out, "compile") as work:
        source = load_source(model, work, input_shape=options.input_shape, checkpoint=checkpoint,
                             opset=options.opset)
        name, version = _identity(source, options)
        calib_data = _load_data(calib, source, preprocessing, "calibration")
        val_data = _load_data(val, source, preprocessing, "validation")
        if calib_data is None and any(t.quantized for t in targets):
            raise DataError("INT8 targets need calibration data: pass --calib DATA (.npz, .npy or images)")
        if options.gate and val_data is None and any(t.quantized for t in targets):
            raise DataError("INT8 targets are gated on validation data: pass --val DATA",
                            hint="or --no-gate to build them anyway (the manifest then says 'ungated')")
        given = val_data or calib_data
        gate_sets = [given] if given is not None else generated_sets(source.inputs, preprocessing)
        with progress.task("FP32 reference (onnxruntime)", None):
            references = [_reference(source, data) for data in gate_sets]
        if options.gate and any(t.quantized for t in targets):
            resolve_metric(options, gate_sets[0].labels, references[0][0])  # a gate that cannot judge stops all
        ctx = BuildContext(source, options, calib_data, work, progress)
        run = _Run(ctx, name, version, gate_sets[0], references[0], out, targets,
                   list(zip(gate_sets[1:], references[1:])),
                   "validation data" if val_data is not None else "calibration data")
        outcomes = [run.target(t) for t in targets]
        reference_size = source.path.stat().st_size  # an exported or shape-fixed source lives in ``work``
    return CompileReport(source, outcomes, reference_size)


def _reference(source: SourceModel, data: Dataset) -> list[np.ndarray]:
    """The source's outputs on ``data`` in onnxruntime; generated inputs the model cannot take say what to pass."""
    try:
        return run_model("onnxruntime", source.path, data)
    except EdgeMLError as exc:
        if data.generated is None:
            raise
        shapes = ", ".join(f"{s.name} {shape_text(s.shape)}" for s in source.inputs)
        raise DataError(f"the model does not run on generated inputs of its declared shapes ({shapes}): "
                        f"{exc.message}", hint="pass --val DATA (samples as the device will see them), or fix "
                        "its unknown dims with --input-shape NAME:1,3,H,W") from exc


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (an infinite relative error) as None: JSON has no inf or NaN."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class _Run:
    """The state shared by the targets of one compile run.

    ``gate_data`` and ``reference`` are what every target is judged on (the user's data, else the first
    generated set); without data, FP32/FP16 targets are also judged on ``more_sets`` (other generated
    distributions, with the source's outputs on them).
    """

    ctx: BuildContext
    name: str
    version: str
    gate_data: Dataset
    reference: list[np.ndarray]
    out: Path
    targets: list[Target]
    more_sets: list[tuple[Dataset, list[np.ndarray]]] = field(default_factory=list)
    role: str = "validation data"  # what the user's gate data is, for messages

    def target(self, target: Target) -> TargetOutcome:
        progress = self.ctx.progress
        try:
            with progress.task(f"building {target.name}", None):
                built = backend_for(target).build(self.ctx)
            with progress.task(f"gating {target.name} in {built.eval_runtime}", None):
                compiled = run_model(built.eval_runtime, built.eval_path, self.gate_data)
                verdict = self._gate(target, built, compiled)
            warnings = self._warnings(target)
            recovery = None
            if not verdict.passed:
                notes = list(built.notes)
                try:
                    diag = self._diagnose(target, built)
                except EdgeMLError as exc:  # the verdict stands; say why there is no diagnosis
                    diag, notes = None, [*notes, f"diagnosis unavailable: {exc.message}"]
                try:
                    recovery = self._recover(target, verdict) if self.ctx.options.recover and target.quantized else None
                except EdgeMLError as exc:  # the plain verdict stands; say why the search stopped
                    notes.append(f"--recover stopped: {exc.message}")
                if recovery is None or recovery.built is None or recovery.verdict is None:
                    return TargetOutcome(target.name, "gate-failed", gate=verdict, diagnosis=diag, notes=notes,
                                         warnings=warnings, recovery=recovery)
                built, verdict = recovery.built, recovery.verdict
                compiled = recovery.compiled or compiled
            lat = self._latency(target, built) if self.ctx.options.benchmark else {}
            manifest = self._write(target, built, verdict, compiled, lat, recovery.record if recovery else None)
        except EdgeMLError as exc:
            return TargetOutcome(target.name, "error", error=exc)
        path = self.out / manifest.filename
        size = built.files[built.model_file].stat().st_size
        return TargetOutcome(target.name, "written", path, verdict, lat, size, notes=built.notes,
                             manifest=manifest, warnings=warnings, recovery=recovery)

    def _recover(self, target: Target, plain: GateResult) -> RecoveryResult:
        """``--recover``: search calibrations, rescalings and float layers for an artifact that passes."""
        from edgeml.compile.recover import Recovery

        def judge_built(built: BuildResult) -> tuple[GateResult, list[np.ndarray]]:
            compiled = run_model(built.eval_runtime, built.eval_path, self.gate_data)
            return self._verdict(target, compiled), compiled

        def parity(path: Path) -> GateResult:  # a rescaled FP32 model against the source
            got = run_model("onnxruntime", path, self.gate_data)
            return judge(self.reference, got, None, self.ctx.options, precision="fp32", names=self._names,
                         inputs=self._label(self.gate_data))

        return Recovery(self.ctx, target, self.gate_data, judge_built, parity, plain).run()

    @property
    def _names(self) -> list[str]:
        return [o.name for o in self.ctx.source.outputs]

    def _label(self, data: Dataset) -> str:
        return data.generated or f"{self.role} {data.source}"

    def _verdict(self, target: Target, compiled: list[np.ndarray]) -> GateResult:
        verdict = judge(self.reference, compiled, self.gate_data.labels, self.ctx.options,
                        precision=target.precision, names=self._names, inputs=self._label(self.gate_data))
        if target.quantized and not self.ctx.options.gate:
            verdict.passed, verdict.reason = True, ""
        return verdict

    def _gate(self, target: Target, built: BuildResult, compiled: list[np.ndarray]) -> GateResult:
        """The verdict on the gate data; FP32/FP16 targets without user data also on every other generated set."""
        verdict = self._verdict(target, compiled)
        if target.quantized or not self.more_sets:
            return verdict
        verdicts = [(self._label(self.gate_data), verdict)]
        for data, reference in self.more_sets:
            got = run_model(built.eval_runtime, built.eval_path, data)
            verdicts.append((self._label(data), judge(reference, got, None, self.ctx.options,
                                                      precision=target.precision, names=self._names,
                                                      inputs=self._label(data))))
        return combine_parity(verdicts)

    def _warnings(self, target: Target) -> list[str]:
        """What the user should know about how ``target`` was judged."""
        if self.gate_data.generated is None:
            return []
        labels = ", ".join(self._label(d) for d in [self.gate_data, *(d for d, _ in self.more_sets)])
        return [f"{target.name} was judged on generated inputs only ({labels}): pass --val DATA with samples as "
                "the device will see them (.npz, .npy or an image folder) to check it on real inputs and to ship "
                "reference statistics for drift and output-shift monitoring (--calib DATA too for INT8 targets)"]

    def _diagnose(self, target: Target, built: BuildResult) -> Diagnosis | None:
        """Rank tensors and measure remedies with onnxruntime (a proxy for TFLite)."""
        if not target.quantized or self.ctx.calib is None:
            return None
        from edgeml.compile.backends.onnx_int8 import prepared_model, settings_from_options
        from edgeml.compile.quantize import quantize_qdq

        prepared = prepared_model(self.ctx)
        settings = settings_from_options(self.ctx)
        if target.runtime == "tensorrt":  # remedies must be tried in the form TensorRT gets
            from edgeml.compile.quantize import tensorrt_qdq_settings

            settings = tensorrt_qdq_settings(settings)
        qdq = built.quantized_onnx
        if qdq is None:  # e.g. tflite-int8: diagnose the equivalent ONNX Runtime quantization
            qdq = quantize_qdq(prepared, self.ctx.workdir / "diag-qdq.onnx", self.ctx.calib, settings)
        with self.ctx.progress.task(f"diagnosing {target.name}", None):
            diag = diagnose(prepared, qdq, self.gate_data)
            remedies = candidate_remedies(diag, prepared, settings, self.ctx.options.diagnose_remedies)
            calib = self.ctx.calib.take(self.ctx.options.calib_samples)

            def judge_fn(path: Path) -> tuple[bool, float]:
                v = self._verdict(target, run_model("onnxruntime", path, self.gate_data))
                return v.passed, v.drop

            try_remedies(remedies, prepared, calib, self.ctx.workdir, judge_fn)
        diag.remedies = remedies
        diag.warnings = calibration_warnings(self.ctx.calib, self.gate_data)
        diag.proxy = "onnx-int8" if built.quantized_onnx is None else None  # e.g. tflite-int8 (onnx2tf quantizes)
        return diag

    def _latency(self, target: Target, built: BuildResult) -> dict[str, Any]:
        sample = {k: v[:1] for k, v in self.gate_data.inputs.items()}
        result: dict[str, Any] = {"host": f"{platform.machine()} {platform.processor() or ''}".strip(),
                                  "cores": os.cpu_count(), "runtime": built.eval_runtime}
        budget = self.ctx.options.bench_budget_s
        with self.ctx.progress.task(f"benchmarking {target.name}", None):
            for label, threads in (("threads_1", 1), ("threads_all", 0)):
                with open_runtime(built.eval_runtime, built.eval_path, threads=threads) as rt:
                    result[label] = latency_ms(rt, sample, budget_s=budget)
        return result

    def _write(self, target: Target, built: BuildResult, verdict: GateResult, compiled: list[np.ndarray],
               lat: dict[str, Any], recovery: dict[str, Any] | None = None) -> Manifest:
        tdir = self.ctx.workdir / f"bundle-{target.name}"
        tdir.mkdir(parents=True, exist_ok=True)
        files = dict(built.files)
        golden = self._golden(target, verdict, compiled, tdir / "golden.npz")
        files["golden.npz"] = tdir / "golden.npz"
        refstats = None
        if self.gate_data.generated is None:  # statistics of noise would describe nothing the device sees
            layout = (self.gate_data.preprocessing or {}).get("layout", "NCHW")
            stats = compute_reference_stats(self.gate_data.inputs, dict(zip(self._names, compiled)),
                                            layout=layout)
            atomic_write_bytes(tdir / "refstats.json", stats.to_json())
            files["refstats.json"] = tdir / "refstats.json"
            refstats = {"file": "refstats.json", "data": self.gate_data.source}
        manifest = Manifest(
            name=self.name, version=self.version, target=target.name, runtime=built.runtime,
            model={"file": built.model_file, "format": built.model_format},
            inputs=self.ctx.source.inputs, outputs=self.ctx.source.outputs,
            preprocessing=self.gate_data.preprocessing, labels=self.gate_data.class_names,
            metrics={"gate": _json_safe(verdict.metrics), "latency": lat,
                     "size_bytes": built.files[built.model_file].stat().st_size,
                     "reference_size_bytes": self.ctx.source.path.stat().st_size},
            gate=self._gate_block(target, built, verdict), golden=golden, refstats=refstats,
            provenance=self._provenance(), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            recovery=_json_safe(recovery) if recovery is not None else None,
        )
        return write_bundle(self.out / bundle_filename(self.name, self.version, target.name), manifest, files)

    def _gate_block(self, target: Target, built: BuildResult, verdict: GateResult) -> dict[str, Any]:
        status = "ungated" if target.quantized and not self.ctx.options.gate else "passed"
        if built.proxy and status == "passed":
            status = "proxy-passed"
        data = self.gate_data.source
        if self.gate_data.generated is not None:
            data = "generated inputs: " + ", ".join(self._label(d) for d in [self.gate_data,
                                                                              *(d for d, _ in self.more_sets)])
        return _json_safe({"status": status, "metric": verdict.metric, "drop": verdict.drop, "budget": verdict.budget,
                           "runtime": built.eval_runtime, "proxy": built.proxy, "data": data})

    def _golden(self, target: Target, verdict: GateResult, compiled: list[np.ndarray], path: Path) -> dict[str, Any]:
        """Write the golden vectors; their tolerances are per output, on that output's own magnitude."""
        k = min(self.ctx.options.golden_count, len(self.gate_data))
        arrays = {f"in:{n}": v[:k] for n, v in self.gate_data.inputs.items()}
        arrays.update({f"out:{spec.name}": arr[:k] for spec, arr in zip(self.ctx.source.outputs, compiled)})
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        rows = {row["name"]: row for row in verdict.metrics.get("outputs", [])}
        options = self.ctx.options
        per_output: dict[str, dict[str, Any]] = {}
        for i, (spec, ref) in enumerate(zip(self.ctx.source.outputs, self.reference)):
            finite = np.abs(ref[np.isfinite(ref)]) if ref.size else np.zeros(1)
            magnitude = float(finite.max()) if finite.size else 0.0
            if target.quantized:  # integer kernels differ between ARM and x86 by a few quantization steps
                mean_err = float(rows.get(spec.name, {}).get("mean_abs_error", 0.0))
                atol = max(0.05 * magnitude, 4.0 * mean_err, options.parity_atol)
            else:
                atol = options.parity_rtol * magnitude + options.parity_atol
            top1 = i == 0 and ref.ndim == 2 and ref.shape[1] >= 2 and options.max_error is None \
                and ":" not in options.metric
            per_output[spec.name] = {"atol": atol, "rtol": 0.0, "top1": top1}
        return {"file": "golden.npz", "count": k, "rtol": 0.0,
                "atol": max((o["atol"] for o in per_output.values()), default=options.parity_atol),
                "top1": bool(per_output and next(iter(per_output.values()))["top1"]), "outputs": per_output}

    def _provenance(self) -> dict[str, Any]:
        src = self.ctx.source
        prov = dict(src.provenance, source=src.original, source_sha256=src.sha256, source_opset=src.opset,
                    tools=_tool_versions(self.targets), build_host=platform.platform())
        if self.ctx.calib is not None:
            prov["calibration_data_sha256"] = self.ctx.calib.digest()
        prov["validation_data_sha256"] = self.gate_data.digest()
        return prov
