"""``edgeml train`` as a library call: validate the data, train, export, write the run directory.

:func:`train_run` is what the CLI and the tests call. The run id is a hash of the dataset hash, the config
hash and the edgeml version, so the same data and config always map to the same id (and, with the same
seed, to the same metrics). See :mod:`edgeml.rundir` for the layout of the run directory.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml import __version__
from edgeml.bundle import check_name, check_semver
from edgeml.errors import BundleError, ConfigError, DataError
from edgeml.fsutil import atomic_write_bytes, ensure_writable_dir
from edgeml.rundir import RUN_RECORD, RUN_SCHEMA, default_version, make_run_id, read_run_record, write_json
from edgeml.train.card import (
    classification_metrics,
    export_with_parity,
    model_card_markdown,
    onnx_outputs,
    write_refstats,
)
from edgeml.train.config import TrainingConfig, config_from_dict, load_config
from edgeml.train.data import SplitData, load_training_data
from edgeml.train.finetune import InitSource, check_fits, init_source, load_init_weights
from edgeml.train.trainer import Dist, Trainer, init_distributed, latest_checkpoint
from edgeml.train.validate import Finding, validate

__all__ = ["RunPlan", "RunResult", "plan_run", "train_run"]

_CALIB_SAMPLES = 512


@dataclass
class RunPlan:
    """Everything decided before training: the checked data, the hashes, the run id, name and version."""

    cfg: TrainingConfig
    data: SplitData
    warnings: list[Finding]
    dataset_sha256: str
    config_sha256: str
    run_id: str
    name: str
    version: str
    init: InitSource | None = None

    @property
    def num_classes(self) -> int:
        return self.cfg.data.num_classes or len(self.data.data.class_names)


@dataclass
class RunResult:
    """A finished run: where it is and its final numbers."""

    run_dir: Path
    run_id: str
    history: list[dict[str, Any]]
    card: dict[str, Any] = field(default_factory=dict)
    parity_max_abs: float = 0.0


def plan_run(cfg: TrainingConfig) -> RunPlan:
    """Load and validate the data and derive the run identity.

    The run id hashes the dataset hash (extra data included), the config hash and, when fine-tuning, the
    init run's weights.

    Raises:
        DataValidationError: A fatal data finding (names the bad files or rows).
        ConfigError: An invalid model name or version, or an init run that is not finished or does not match.
    """
    init = init_source(cfg)
    sd = load_training_data(cfg)
    warnings = validate(sd, cfg)
    dataset, config = sd.digest(), cfg.digest()
    if init is not None:
        check_fits(init, cfg, tuple(sd.data.x.shape[1:]), cfg.data.num_classes or len(sd.data.class_names))
    identity = config if init is None else hashlib.sha256(f"{config}|init:{init.sha256}".encode()).hexdigest()
    run_id = make_run_id(dataset, identity)
    try:
        name = check_name(cfg.model.name)
        version = check_semver(cfg.model.version or default_version(run_id))
    except BundleError as exc:
        raise ConfigError(f"[model]: {exc.message}") from exc
    return RunPlan(cfg, sd, warnings, dataset, config, run_id, name, version, init)


def _record(plan: RunPlan, status: str, dist: Dist, **extra: Any) -> dict[str, Any]:
    return {"schema": RUN_SCHEMA, "run_id": plan.run_id, "name": plan.name, "version": plan.version,
            "status": status, "dataset_sha256": plan.dataset_sha256, "config_sha256": plan.config_sha256,
            "edgeml_version": __version__, "base_dir": plan.cfg.base_dir, "world_size": dist.world,
            "warnings": [w.to_dict() for w in plan.warnings],
            **({"init_from": plan.init.to_dict()} if plan.init else {}),
            **({"sources": plan.data.sources} if len(plan.data.sources) > 1 else {}), **extra}


def _start(plan: RunPlan, run_dir: Path, dist: Dist, config_text: tuple[str, str] | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", plan.cfg.to_dict())
    if config_text:
        atomic_write_bytes(run_dir / f"config.original{config_text[0]}", config_text[1].encode())
    manifest = plan.data.manifest()
    manifest["split_seed"] = plan.cfg.data.split_seed
    write_json(run_dir / "data_manifest.json", manifest)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(run_dir / RUN_RECORD, _record(plan, "training", dist, started=started))


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    import json

    atomic_write_bytes(run_dir / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n"
                                                          for r in history).encode())


def _save_arrays(plan: RunPlan, run_dir: Path) -> None:
    (run_dir / "data").mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        x, y = plan.data.arrays(split)
        if not len(x):
            continue
        target = run_dir / "data" / ("calib.npz" if split == "train" else f"{split}.npz")
        arrays = {"input": _calibration(plan, x)} if split == "train" else {"input": x, "labels": y}
        with open(target.with_suffix(".tmp"), "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        target.with_suffix(".tmp").replace(target)


def _calibration(plan: RunPlan, x: np.ndarray) -> np.ndarray:
    """Calibration samples: the first ones; with extra data, spread evenly over the whole train split so that
    every source (appended after the base data) is represented."""
    if len(plan.data.sources) == 1 or len(x) <= _CALIB_SAMPLES:
        return x[:_CALIB_SAMPLES]
    return x[np.linspace(0, len(x) - 1, _CALIB_SAMPLES).round().astype(np.int64)]


def _finish(plan: RunPlan, trainer: Trainer, run_dir: Path) -> RunResult:
    torch = trainer.torch
    buf = __import__("io").BytesIO()
    torch.save(trainer.model.state_dict(), buf)
    atomic_write_bytes(run_dir / "model.pt", buf.getvalue())
    x_val, y_val = plan.data.arrays("val")
    parity = export_with_parity(trainer.model, x_val, run_dir / "model.onnx", opset=plan.cfg.export.opset,
                                atol=plan.cfg.export.parity_atol)
    write_refstats(run_dir / "refstats.json", x_val, onnx_outputs(run_dir / "model.onnx", x_val))
    _save_arrays(plan, run_dir)
    card = _card(plan, trainer, parity)
    write_json(run_dir / "model_card.json", card)
    atomic_write_bytes(run_dir / "model_card.md", model_card_markdown(card).encode())
    final = {s: {"accuracy": m["accuracy"], "n": m["n"]} for s, m in card["metrics"].items()}
    record = _record(plan, "complete", trainer.dist, parity_max_abs=parity, metrics=final,
                     epochs=len(trainer.history), opset=plan.cfg.export.opset,
                     finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    old = read_run_record(run_dir)
    record["started"] = old.get("started")
    write_json(run_dir / RUN_RECORD, record)
    return RunResult(run_dir, plan.run_id, trainer.history, card, parity)


def _card(plan: RunPlan, trainer: Trainer, parity: float) -> dict[str, Any]:
    d = plan.data
    names = d.data.class_names or [str(i) for i in range(plan.num_classes)]
    metrics = {}
    sources = d.source_array() if len(d.sources) > 1 else None
    for split in ("val", "test"):
        idx = d.index[split]
        if len(idx):
            slices = d.data.slices[idx] if d.data.slices is not None else None
            metrics[split] = classification_metrics(trainer.logits(d.data.x[idx]), d.data.y[idx], names, slices,
                                                    sources[idx] if sources is not None else None)
    extra: dict[str, Any] = {"init_from": plan.init.to_dict()} if plan.init else {}
    if sources is not None:
        extra["sources"] = d.sources
    return {**extra, "name": plan.name, "version": plan.version, "run_id": plan.run_id, "arch": plan.cfg.model.arch,
            "epochs": len(trainer.history), "data": plan.cfg.data.source if plan.cfg.data.train is None
            else plan.cfg.data.train, "dataset_sha256": plan.dataset_sha256, "metrics": metrics,
            "opset": plan.cfg.export.opset, "parity_max_abs": parity,
            "warnings": [w.line() for w in plan.warnings]}


def _resume_plan(run_dir: Path) -> tuple[RunPlan, dict[str, Any]]:
    import json

    record = read_run_record(run_dir)
    raw = json.loads((run_dir / "config.json").read_text())
    plan = plan_run(config_from_dict(raw, base_dir=record.get("base_dir", ".")))
    if plan.dataset_sha256 != record["dataset_sha256"]:
        raise DataError(f"the training data changed since run {record['run_id']} started "
                        f"(dataset sha256 {plan.dataset_sha256[:12]} != {record['dataset_sha256'][:12]})",
                        hint="start a new run instead of resuming")
    return plan, record


def train_run(config: str | Path | TrainingConfig | None, output: str | Path = "runs", *,
              resume: str | Path | None = None, log: Callable[[str], None] | None = None,
              on_epoch: Callable[[list[dict[str, Any]]], None] | None = None) -> RunResult | None:
    """Train from ``config`` into ``output/<name>-<run id>``, or continue the run ``resume``.

    Returns:
        The result on rank 0; None on the other ranks of a distributed run.

    Raises:
        ConfigError: Bad config, or the run directory exists already (resume it or remove it).
        DataValidationError: The data failed a fatal check; nothing is written.
        DataError: On resume, the data no longer matches the run's dataset hash.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    dist = init_distributed()
    text: tuple[str, str] | None = None
    if resume is not None:
        run_dir = Path(resume)
        plan, record = _resume_plan(run_dir)
        if record.get("status") == "complete":
            log(f"run {run_dir} is already complete")
            return RunResult(run_dir, plan.run_id, _read_history(run_dir)) if dist.main else None
    else:
        if not isinstance(config, TrainingConfig):
            if config is None:
                raise ConfigError("give a CONFIG file, or --resume RUN_DIR")
            text = (Path(config).suffix, Path(config).read_text(encoding="utf-8"))
            config = load_config(config)
        plan = plan_run(config)
        run_dir = Path(output) / f"{plan.name}-{plan.run_id}"
        if dist.main and (run_dir / RUN_RECORD).exists():
            raise ConfigError(f"run directory {run_dir} exists (same data, config and edgeml version)",
                              hint=f"continue it with --resume {run_dir}, or remove it to start over")
        if dist.main:
            ensure_writable_dir(Path(output))
            _start(plan, run_dir, dist, text)
    return _train(plan, run_dir, dist, log, on_epoch, resume is not None)


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    import json

    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _train(plan: RunPlan, run_dir: Path, dist: Dist, log: Callable[[str], None],
           on_epoch: Callable[[list[dict[str, Any]]], None] | None, resuming: bool) -> RunResult | None:
    x_tr, y_tr = plan.data.arrays("train")
    x_val, y_val = plan.data.arrays("val")
    trainer = Trainer(plan.cfg, x_tr, y_tr, x_val, y_val, plan.num_classes, run_dir, dist, log)
    ckpt = latest_checkpoint(run_dir) if resuming else None
    if plan.init is not None and ckpt is None:
        load_init_weights(trainer.model, plan.init)
        log(f"fine-tuning from run {plan.init.run_id} ({plan.init.run_dir})")
    if ckpt is not None:
        trainer.resume(ckpt)
        log(f"resuming {run_dir} after epoch {trainer.start_epoch}")

    def epoch_done(history: list[dict[str, Any]]) -> None:
        _write_metrics(run_dir, history)
        if on_epoch:
            on_epoch(history)

    trainer.fit(epoch_done)
    result = _finish(plan, trainer, run_dir) if dist.main else None
    if dist.world > 1:  # every rank leaves together, after rank 0 has written the run
        import torch.distributed as torch_dist

        torch_dist.barrier()
        torch_dist.destroy_process_group()
    return result
