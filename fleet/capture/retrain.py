"""``edgeml fleet retrain``: from captured field data to a gated candidate in the registry, in one command.

The steps, each a short function, in order (:func:`retrain`):

1. **dataset**: a folder ``edgeml fleet capture pull`` wrote, or a pull from the registry's capture store;
2. **label**: the operator's CSV and/or a teacher model (:mod:`edgeml.fleet.capture.label`);
3. **split**: the labeled field samples are split (seeded, by sample hash) into a part for training and a
   held-out part that training never sees;
4. **base run**: the training run that produced the deployed version (the version the devices ran when they
   captured, found through its bundle's provenance ``training_run`` among the runs in ``--runs``), or the
   one given;
5. **train**: the base run's config with the field data as extra data, fine-tuned from the base run's
   weights (``train.init_from``) unless asked to train from scratch;
6. **compare**: the deployed model and the candidate (both FP32 ONNX, onnxruntime) on the original
   validation set and on the held-out field data; a candidate worse on the original validation set than
   ``max_regression`` points is refused;
7. **compile**: every target, gated against the original validation set, and again against the held-out
   field data; every target must pass both;
8. **publish**: the bundles go into the signed registry (no channel moves unless asked) and the rollout
   command is printed. Nothing rolls out without an operator.

Everything is written under the work folder (``retrain.json`` holds every number); a refusal raises
:class:`RetrainRefused` after writing it, and nothing is published.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.errors import ConfigError, DataError, EdgeMLError
from edgeml.fsutil import atomic_write_bytes
from edgeml.progress import Progress

__all__ = ["RetrainRefused", "RetrainResult", "RetrainSettings", "deployed_run", "next_version", "retrain",
           "split_field_data"]


class RetrainRefused(EdgeMLError):
    """The candidate was trained but not published: it regressed, or a gate failed (``result`` says which)."""

    def __init__(self, message: str, result: RetrainResult, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.result = result


@dataclass(frozen=True)
class RetrainSettings:
    """One ``edgeml fleet retrain`` run.

    Attributes:
        model: The model's name in the registry.
        registry: The registry directory (its database and capture store; the candidate is published there).
        capture: A pulled capture dataset folder, or the capture store to pull from (the registry directory).
        runs: Where training runs live (the base run is looked up here; the candidate's run is written here).
        work: The work folder (pulled data, field splits, bundles, ``retrain.json``); default
            ``RUNS/retrain-MODEL-<UTC time>``.
        base_run: The run to fine-tune from; default: the run that produced the deployed version.
        labels: The operator's ``sha256,label`` CSV (class indices, or the base run's class names).
        teacher: A teacher: an ONNX model or a finished FP32 training run. Without labels and teacher, the
            dataset must be labeled already (``edgeml fleet capture label``).
        min_confidence: Teacher labels below this top-1 probability stay unlabeled.
        holdout: Fraction of the labeled field samples held out for the gate and the comparison (0..1).
        from_scratch: Train new weights instead of fine-tuning the base run's.
        epochs, lr: Override the base run's ``[train]`` settings (None: keep them).
        targets: Compile targets, e.g. ``("onnx", "onnx-int8")``.
        max_accuracy_drop: The compile gate's budget, in points (INT8 targets).
        max_regression: The candidate may be at most this many points less accurate than the deployed model
            on the original validation set.
        version: The candidate's version (default: the next free patch version after the deployed one).
        channel: Point this channel at the candidate (default: none; a rollout is the operator's step).
        pull: Filters of the pull (version, device, tag, since, until, reason) when ``capture`` is a store.
        db_url: The registry database's URL (default: the registry's own).
        seed: Seed of the field split.
    """

    model: str
    registry: Path
    capture: Path
    runs: Path = Path("runs")
    work: Path | None = None
    base_run: Path | None = None
    labels: Path | None = None
    teacher: Path | None = None
    min_confidence: float | None = None
    holdout: float = 0.3
    from_scratch: bool = False
    epochs: int | None = None
    lr: float | None = None
    targets: tuple[str, ...] = ("onnx",)
    max_accuracy_drop: float = 1.0
    max_regression: float = 1.0
    version: str | None = None
    channel: str | None = None
    pull: dict[str, Any] = field(default_factory=dict)
    db_url: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"--holdout {self.holdout} must be between 0 and 1 (exclusive)")
        if self.max_regression < 0 or not 0 <= self.max_accuracy_drop <= 100:
            raise ConfigError("--max-regression and --max-accuracy-drop are points, at least 0")


@dataclass
class RetrainResult:
    """What :func:`retrain` did; also written to ``WORK/retrain.json``."""

    work: Path
    dataset: Path
    labels: dict[str, Any] = field(default_factory=dict)
    field_split: dict[str, int] = field(default_factory=dict)
    base_run: Path | None = None
    run_dir: Path | None = None
    version: str | None = None
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    published: list[dict[str, Any]] = field(default_factory=list)
    rollout_command: str | None = None
    refused: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _dataset(s: RetrainSettings, work: Path, progress: Progress) -> Path:
    """The pulled dataset: the folder given, or a fresh pull from the capture store into ``WORK/capture``."""
    if (s.capture / "samples.npz").is_file():
        return s.capture
    from edgeml.fleet.capture.pull import pull
    from edgeml.fleet.registry.repository import Registry

    db = Registry(s.registry, db_url=s.db_url).database()
    try:
        with progress.task(f"pulling {s.model}'s captured samples"):
            pulled = pull(db, s.capture, work / "capture", model=s.model, **s.pull)
    finally:
        db.close()
    progress.log(f"pulled {pulled.count} samples (dataset sha256 {pulled.sha256[:12]}) into {pulled.path}")
    return Path(pulled.path)


def split_field_data(dataset: Path, work: Path, holdout: float, seed: int = 0) -> dict[str, int]:
    """Split the labeled samples (``DATASET/train.npz``) into ``WORK/field-train.npz`` and
    ``WORK/field-holdout.npz`` (arrays ``input`` and ``labels``), by a seeded order of the sample hashes.

    Raises:
        DataError: Fewer than 2 labeled samples.
    """
    with np.load(dataset / "train.npz", allow_pickle=False) as npz:
        if "x" not in npz.files:
            raise DataError(f"{dataset / 'train.npz'} holds several inputs ({', '.join(npz.files)}); edgeml train, "
                            "and so retrain, trains single-input models")
        x, y, hashes = npz["x"], npz["y"], [str(h) for h in npz["sha256"]]
    if len(y) < 2:
        raise DataError(f"{len(y)} labeled field sample(s): too few to train on and hold some out",
                        hint="label more samples, or lower --min-confidence")
    order = sorted(range(len(y)), key=lambda i: hashlib.sha256(f"{seed}|{hashes[i]}".encode()).hexdigest())
    n_hold = min(len(y) - 1, max(1, round(holdout * len(y))))
    parts = {"field-holdout": np.sort(order[:n_hold]), "field-train": np.sort(order[n_hold:])}
    for name, idx in parts.items():
        buf = io.BytesIO()
        np.savez(buf, input=x[idx], labels=y[idx])
        atomic_write_bytes(work / f"{name}.npz", buf.getvalue())
    return {"train": int(len(y) - n_hold), "holdout": int(n_hold)}


def _deployed_version(dataset: Path) -> str | None:
    """The version the devices ran when they captured (the most common in the dataset's provenance)."""
    path = dataset / "provenance.jsonl"
    if not path.is_file():
        return None
    versions = [json.loads(line).get("version") for line in path.read_text().splitlines() if line.strip()]
    versions = [v for v in versions if v]
    return max(set(versions), key=versions.count) if versions else None


def _training_run_of(registry: Any, model: str, version: str) -> str | None:
    """The ``training_run`` in the provenance of a published bundle of ``model`` ``version``."""
    from edgeml.bundle import Bundle

    for path, target in sorted(registry.targets().items()):
        custom = target.custom or {}
        if custom.get("name") != model or custom.get("version") != version or "delta" in custom:
            continue  # another model or version, or a delta update (not a bundle)
        with Bundle(registry.target_file(path, target.hashes["sha256"])) as bundle:
            run = bundle.manifest.provenance.get("training_run")
        if run:
            return str(run)
    return None


def deployed_run(registry_dir: Path, model: str, version: str, runs: Path, db_url: str | None = None) -> Path:
    """The training run directory under ``runs`` that produced ``model`` ``version`` (by its bundle's provenance).

    Raises:
        ConfigError: The version is not published, its bundle names no training run, or that run is not
            under ``runs`` (the message says which, and to pass ``--base-run``).
    """
    from edgeml.fleet.registry.repository import Registry
    from edgeml.rundir import is_run_dir, read_run_record

    run_id = _training_run_of(Registry(registry_dir, db_url=db_url), model, version)
    if run_id is None:
        raise ConfigError(f"{model} {version} has no published bundle naming its training run",
                          hint="pass --base-run RUN_DIR (the run to fine-tune and compare against)")
    for candidate in sorted(Path(runs).glob("*")):
        if is_run_dir(candidate) and read_run_record(candidate).get("run_id") == run_id:
            return candidate
    raise ConfigError(f"{model} {version} was trained by run {run_id}, which is not under {runs}",
                      hint="pass --runs DIR (where it lives) or --base-run RUN_DIR")


def next_version(current: str, taken: set[str]) -> str:
    """The next patch version after ``current`` (pre-release and build dropped) that is not ``taken``."""
    core = current.split("+")[0].split("-")[0]
    try:
        major, minor, patch = (int(p) for p in core.split("."))
    except ValueError as exc:
        raise ConfigError(f"cannot derive a version from {current!r}", hint="pass --version X.Y.Z") from exc
    patch += 1
    while f"{major}.{minor}.{patch}" in taken:
        patch += 1
    return f"{major}.{minor}.{patch}"


def _published_versions(s: RetrainSettings) -> set[str]:
    from edgeml.fleet.registry.repository import Registry

    db = Registry(s.registry, db_url=s.db_url).database()
    try:
        return {str(v["version"]) for v in db.versions() if v.get("name") == s.model}
    finally:
        db.close()


def _candidate_config(s: RetrainSettings, base: Path, field_train: Path, version: str) -> Any:
    from edgeml.rundir import read_run_record
    from edgeml.train.config import config_from_dict

    record = read_run_record(base)
    if record.get("name") != s.model:
        raise ConfigError(f"run {base} trained {record.get('name')!r}, not {s.model!r}")
    raw = json.loads((base / "config.json").read_text())
    raw["data"]["extra"] = [*raw["data"].get("extra", []), str(field_train.resolve())]
    raw["model"]["version"] = version
    if not s.from_scratch:
        raw["train"]["init_from"] = str(base.resolve())
    for key, value in (("epochs", s.epochs), ("lr", s.lr)):
        if value is not None:
            raw["train"][key] = value
    return config_from_dict(raw, base_dir=record.get("base_dir", "."))


def _accuracy(run_dir: Path, data: Path) -> float:
    from edgeml.fleet.capture.label import Teacher

    with np.load(data, allow_pickle=False) as npz:
        x, y = npz["input"], npz["labels"]
    pred, _ = Teacher(run_dir).predict({"input": x})
    return float((pred == y).mean()) if len(y) else 0.0


def _compare(s: RetrainSettings, result: RetrainResult, base: Path, work: Path, progress: Progress) -> None:
    assert result.run_dir is not None
    sets = {"original_val": base / "data" / "val.npz", "field_holdout": work / "field-holdout.npz"}
    with progress.task("comparing the deployed model and the candidate", 4) as tick:
        for name, path in sets.items():
            result.accuracy[name] = {}
            for who, run in (("deployed", base), ("candidate", result.run_dir)):
                result.accuracy[name][who] = _accuracy(run, path)
                tick(1)
    for name, acc in result.accuracy.items():
        progress.log(f"{name}: deployed {100 * acc['deployed']:.2f}%, candidate {100 * acc['candidate']:.2f}%")


def _gate(s: RetrainSettings, result: RetrainResult, base: Path, work: Path, progress: Progress) -> list[Path]:
    """Compile every target twice: gated on the original validation set (those bundles ship) and on the
    held-out field data. Returns the bundles when every target passed both."""
    from edgeml.compile.options import CompileOptions
    from edgeml.compile.pipeline import compile_model

    assert result.run_dir is not None and result.version is not None
    bundles: list[Path] = []
    for name, val, out, bench in (("original_val", base / "data" / "val.npz", work / "bundles", True),
                                  ("field_holdout", work / "field-holdout.npz", work / "gate-field", False)):
        options = CompileOptions(targets=s.targets, name=s.model, version=result.version,
                                 max_accuracy_drop=s.max_accuracy_drop, benchmark=bench)
        progress.log(f"compiling {', '.join(s.targets)} gated on {name.replace('_', ' ')}")
        report = compile_model(str(result.run_dir), options, out, val=val, progress=progress)
        result.gates[name] = {o.target: {"status": o.status, "metric": o.gate.metric if o.gate else None,
                                         "drop": o.gate.drop if o.gate else None,
                                         "reason": (o.gate.reason if o.gate else "") or (str(o.error) if o.error
                                                                                         else "")}
                              for o in report.outcomes}
        if name == "original_val":
            bundles = [o.bundle for o in report.outcomes if o.bundle is not None]
    return bundles


def _labels(s: RetrainSettings, dataset: Path, base: Path, progress: Progress) -> dict[str, Any]:
    """Label the dataset (class names from the base run, for a CSV that names classes); without labels or a
    teacher, the labels ``edgeml fleet capture label`` already wrote into it."""
    from edgeml.fleet.capture.label import label_dataset

    if s.labels is None and s.teacher is None:
        if not (dataset / "labels.json").is_file() or not (dataset / "train.npz").is_file():
            raise ConfigError(f"{dataset} is not labeled yet",
                              hint="give --labels FILE.csv (sha256,label) and/or --teacher MODEL")
        counts = json.loads((dataset / "labels.json").read_text())["counts"]
        progress.log(f"using the labels in {dataset}: {counts['labeled']} of {counts['total']} samples")
        return {"total": counts["total"], "labeled": counts["labeled"], "by_source": counts["by_source"],
                "unlabeled": counts["unlabeled_by_reason"], "teacher_agreement": None}
    names = None
    if (base / "data_manifest.json").is_file():
        names = json.loads((base / "data_manifest.json").read_text()).get("class_names") or None
    with progress.task("labeling the field samples"):
        report = label_dataset(dataset, csv_path=s.labels, teacher=s.teacher, min_confidence=s.min_confidence,
                               class_names=names)
    progress.log(f"labeled {report.labeled} of {report.total} samples ({report.unlabeled_total} unlabeled: "
                 f"{', '.join(f'{k} {v}' for k, v in report.unlabeled.items()) or 'none'})")
    return {"total": report.total, "labeled": report.labeled, "by_source": report.by_source,
            "unlabeled": report.unlabeled, "teacher_agreement": report.teacher_agreement}


def _train(cfg: Any, s: RetrainSettings, what: str, progress: Progress) -> Path:
    """Train the candidate into ``s.runs``; a finished run of the same data and config (a retry) is reused."""
    from edgeml.rundir import read_run_record
    from edgeml.train.run import plan_run, train_run

    plan = plan_run(cfg)
    existing = Path(s.runs) / f"{plan.name}-{plan.run_id}"
    if (existing / "run.json").is_file() and read_run_record(existing).get("status") == "complete":
        progress.log(f"reusing the finished run {existing} (same data, config and weights)")
        return existing
    resume = existing if (existing / "run.json").is_file() else None  # a run stopped midway continues
    with progress.task(f"training {what}", cfg.train.epochs) as tick:
        trained = train_run(None if resume else cfg, s.runs, resume=resume, log=progress.log,
                            on_epoch=lambda history: tick(1))
    if trained is None:
        raise EdgeMLError("training returned no result (a distributed rank)")
    return trained.run_dir


def _write_report(result: RetrainResult) -> None:
    atomic_write_bytes(result.work / "retrain.json",
                       json.dumps(result.to_dict(), indent=1, sort_keys=True, default=str).encode() + b"\n")


def _refuse(result: RetrainResult, message: str, hint: str) -> RetrainRefused:
    result.refused = message
    _write_report(result)
    return RetrainRefused(message, result, hint=hint)


def retrain(s: RetrainSettings, progress: Progress | None = None) -> RetrainResult:
    """Pull, label, train, compare, compile with both gates and publish the candidate (see the module docstring).

    Raises:
        RetrainRefused: The candidate regressed on the original validation set, or a target failed a gate;
            ``retrain.json`` says which, nothing is published.
        EdgeMLError: Anything that stops earlier (no samples, no labels, no base run, bad data...).
    """
    from edgeml.fleet.registry.repository import Registry

    progress = progress or Progress()
    work = Path(s.work or Path(s.runs) / f"retrain-{s.model}-{_now()}")
    work.mkdir(parents=True, exist_ok=True)
    dataset = _dataset(s, work, progress)
    result = RetrainResult(work, dataset)
    deployed = _deployed_version(dataset)
    base = s.base_run
    if base is None:
        if deployed is None:
            raise ConfigError("the captured samples name no model version", hint="pass --base-run RUN_DIR")
        base = deployed_run(s.registry, s.model, deployed, s.runs, s.db_url)
    result.base_run = base
    result.labels = _labels(s, dataset, base, progress)
    result.field_split = split_field_data(dataset, work, s.holdout, s.seed)
    from edgeml.rundir import read_run_record

    result.version = s.version or next_version(deployed or str(read_run_record(base)["version"]),
                                               _published_versions(s))
    cfg = _candidate_config(s, base, work / "field-train.npz", result.version)
    how = "from scratch" if s.from_scratch else f"fine-tuning run {read_run_record(base)['run_id']}"
    result.run_dir = _train(cfg, s, f"{s.model} {result.version} ({how}) on the base data and "
                            f"{result.field_split['train']} field samples", progress)
    _compare(s, result, base, work, progress)
    acc = result.accuracy["original_val"]
    if 100 * (acc["deployed"] - acc["candidate"]) > s.max_regression + 1e-9:
        raise _refuse(result, f"the candidate is {100 * (acc['deployed'] - acc['candidate']):.2f} points less "
                      f"accurate than the deployed model on the original validation set (allowed "
                      f"{s.max_regression:g})", "label more field data, or fine-tune with a lower --lr")
    bundles = _gate(s, result, base, work, progress)
    failed = [f"{t} on {name.replace('_', ' ')}: {g['reason'] or g['status']}" for name, gates in
              result.gates.items() for t, g in gates.items() if g["status"] != "written"]
    if failed:
        raise _refuse(result, f"the gate refused the candidate: {'; '.join(failed)}", "see retrain.json")
    registry = Registry(s.registry, db_url=s.db_url)
    with progress.task(f"publishing {len(bundles)} bundle(s)", len(bundles)) as tick:
        for bundle in bundles:
            pub = registry.publish(bundle, channel=s.channel)
            result.published.append({"path": pub.path, "sha256": pub.sha256, "changed": pub.changed})
            tick(1)
    result.rollout_command = (f"edgeml fleet rollout start {s.registry} {s.model}:{result.version} "
                              f"--targets {','.join(s.targets)}")
    _write_report(result)
    return result
