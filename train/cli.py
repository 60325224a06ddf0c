"""``edgeml train``: argument parsing only; the work is :func:`edgeml.train.run.train_run`.

Imports only typer and the standard library at import time, so ``edgeml --help`` stays instant.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeml.errors import ConfigError

__all__ = ["print_summary", "torchrun_argv", "train_command"]


def torchrun_argv(nproc: int, args: list[str]) -> list[str]:
    """The command that runs ``edgeml train ARGS`` in ``nproc`` processes on this machine via torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "edgeml.cli", "train", *args]


def _forwarded(config: Path | None, resume: Path | None, output: Path, mlflow_uri: str | None,
               extra_data: list[Path] | None = None, init_from: Path | None = None) -> list[str]:
    args = [str(config)] if config else []
    args += ["--resume", str(resume)] if resume else []
    args += ["--output", str(output)]
    args += ["--mlflow-uri", mlflow_uri] if mlflow_uri else []
    for path in extra_data or []:
        args += ["--extra-data", str(path)]
    args += ["--init-from", str(init_from)] if init_from else []
    return args


def with_overrides(config: Path, extra_data: list[Path] | None, init_from: Path | None) -> Any:
    """The config file with ``--extra-data`` appended to ``data.extra`` and ``--init-from`` as ``train.init_from``.

    Paths from the command line are relative to the current directory (the config's own, to its folder).
    """
    import dataclasses

    from edgeml.train.config import load_config

    cfg = load_config(config)
    if extra_data:
        extra = (*cfg.data.extra, *(str(p.resolve()) for p in extra_data))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, extra=extra))
    if init_from is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(init_from.resolve())))
    return cfg


def train_command(
    config: Annotated[Path | None, typer.Argument(help="Training config (.toml; .yaml with PyYAML).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue this run directory from its "
                                                "last checkpoint.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Parent folder of run directories.")] = Path("runs"),
    nproc: Annotated[int, typer.Option("--nproc", help="Train with N processes on this machine (torchrun, "
                                       "DistributedDataParallel).")] = 1,
    mlflow_uri: Annotated[str | None, typer.Option("--mlflow-uri", help="Log to this MLflow tracking "
                                                   "server (needs mlflow).")] = None,
    extra_data: Annotated[list[Path] | None, typer.Option("--extra-data", help="More data merged with the "
                          "config's (repeatable): .npz, .csv, an image folder, or a labeled capture dataset "
                          "folder; adds to data.extra.")] = None,
    init_from: Annotated[Path | None, typer.Option("--init-from", help="Fine-tune: start from this finished "
                         "run's weights (same architecture); sets train.init_from.")] = None,
) -> None:
    """Validate the data, train, export to ONNX and write a run directory (see docs/training.md)."""
    if config is None and resume is None:
        raise ConfigError("give a CONFIG file, or --resume RUN_DIR")
    if resume is not None and (extra_data or init_from):
        raise ConfigError("--extra-data and --init-from start a new run; --resume continues one as it began",
                          hint="drop them (the run keeps its own), or start a new run from CONFIG")
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, not {nproc}")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        argv = torchrun_argv(nproc, _forwarded(config, resume, output, mlflow_uri, extra_data, init_from))
        raise typer.Exit(code=subprocess.run(argv, check=False).returncode)
    from edgeml.train.run import train_run
    from edgeml.train.tracking import MlflowTracker

    tracker = MlflowTracker(mlflow_uri) if mlflow_uri else None
    if tracker and os.environ.get("RANK", "0") == "0":
        tracker.start(str(config or resume), {"config": str(config or resume)})
    source = with_overrides(config, extra_data, init_from) if config is not None and (extra_data or init_from) \
        else config
    result = train_run(source, output, resume=resume, on_epoch=tracker.on_epoch if tracker else None)
    if result is None:  # a non-zero rank of a distributed run
        return
    print_summary(result.run_dir, result.history, result.card)
    if tracker:
        tracker.finish(result.run_dir, {f"final_{s}_accuracy": m["accuracy"]
                                        for s, m in result.card.get("metrics", {}).items()})


def print_summary(run_dir: Path, history: list[dict[str, Any]], card: dict[str, Any]) -> None:
    """The final metrics table, on stdout."""
    rows = [("split", "samples", "accuracy")]
    for split, m in card.get("metrics", {}).items():
        rows.append((split, str(m["n"]), f"{100 * m['accuracy']:.2f}%"))
        for source, v in m.get("per_source", {}).items():  # with extra data: each source's share
            rows.append((f"  {split} {source}", str(v["n"]), f"{100 * v['accuracy']:.2f}%"))
    if history:
        last = history[-1]
        rows.append(("train (last epoch)", "-", f"{100 * last['train_accuracy']:.2f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, row in enumerate(rows):
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            typer.echo("  ".join("-" * w for w in widths))
    if card:
        typer.echo(f"ONNX parity (max abs vs PyTorch): {card.get('parity_max_abs', 0.0):.3g}")
    typer.echo(f"run directory: {run_dir}")
