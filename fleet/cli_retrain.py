"""``edgeml fleet capture label`` and ``edgeml fleet retrain``: field data to labels, and to a gated candidate.

Only typer and the standard library are imported here; each command imports what it needs when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeml.fleet.cli_options import DbUrl

__all__ = ["label_command", "register", "retrain_command"]

Labels = Annotated[Path | None, typer.Option("--labels", help="The operator's CSV: sha256,label (a class index "
                                             "or name), e.g. the dataset's labels.csv once filled.")]
TeacherOpt = Annotated[Path | None, typer.Option("--teacher", help="A teacher that labels the rest: an ONNX "
                                                 "model, or a finished FP32 `edgeml train` run directory.")]
MinConfidence = Annotated[float | None, typer.Option("--min-confidence", min=0.0, max=1.0, help="Teacher labels "
                                                     "below this top-1 probability stay unlabeled (counted).")]


def label_command(
    dataset: Annotated[Path, typer.Argument(help="A dataset folder written by `edgeml fleet capture pull`.")],
    labels: Labels = None,
    teacher: TeacherOpt = None,
    min_confidence: MinConfidence = None,
) -> None:
    """Label a pulled dataset: writes train.npz (labeled samples only) and labels.json (sources, counts)."""
    from edgeml.fleet.capture.label import label_dataset

    report = label_dataset(dataset, csv_path=labels, teacher=teacher, min_confidence=min_confidence)
    sources = ", ".join(f"{k} {v}" for k, v in sorted(report.by_source.items())) or "none"
    why = ", ".join(f"{k} {v}" for k, v in sorted(report.unlabeled.items())) or "none"
    typer.echo(f"labeled {report.labeled} of {report.total} samples ({sources}); unlabeled {report.unlabeled_total} "
               f"({why}), left out of training")
    if report.teacher_agreement is not None:
        typer.echo(f"teacher agrees with the CSV on {100 * report.teacher_agreement:.1f}% of the samples both label")
    typer.echo(f"train on it: edgeml train CONFIG --extra-data {dataset}")


def _pull_filters(version: str | None, device: str | None, tag: str | None, reason: str | None,
                  since: str | None, until: str | None) -> dict[str, object]:
    from edgeml.fleet.cli_capture import _when

    out = {"version": version, "device": device, "tag": tag, "reason": reason,
           "since": _when(since, "--since"), "until": _when(until, "--until")}
    return {k: v for k, v in out.items() if v is not None}


def retrain_command(
    model: Annotated[str, typer.Argument(help="The model's name in the registry.")],
    registry: Annotated[Path, typer.Option("--registry", help="The registry directory (capture store, "
                                           "database; the candidate is published there).")],
    from_capture: Annotated[Path, typer.Option("--from-capture", help="A pulled dataset folder, or the capture "
                                               "store to pull from (usually the registry directory).")],
    labels: Labels = None,
    teacher: TeacherOpt = None,
    min_confidence: MinConfidence = None,
    runs: Annotated[Path, typer.Option("--runs", help="Where training runs live (the base run is found here, "
                                       "the candidate's run is written here).")] = Path("runs"),
    base_run: Annotated[Path | None, typer.Option("--base-run", help="The run to fine-tune and compare against "
                                                  "(default: the run that produced the deployed version).")] = None,
    work: Annotated[Path | None, typer.Option("--work", help="Work folder (default RUNS/retrain-MODEL-TIME).")
                    ] = None,
    holdout: Annotated[float, typer.Option("--holdout", help="Fraction of the labeled field samples held out "
                                           "for the gate and the comparison.")] = 0.3,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="New weights instead of fine-tuning.")
                            ] = False,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Override the base run's epochs.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Override the base run's learning rate.")] = None,
    target: Annotated[list[str] | None, typer.Option("--target", "-t", help="Compile target (repeatable; "
                                                     "default onnx).")] = None,
    max_accuracy_drop: Annotated[float, typer.Option("--max-accuracy-drop", help="Compile gate budget, points "
                                                     "(INT8 targets).")] = 1.0,
    max_regression: Annotated[float, typer.Option("--max-regression", help="Points the candidate may lose "
                                                  "against the deployed model on the original validation set.")
                              ] = 1.0,
    version: Annotated[str | None, typer.Option("--version", help="The candidate's version (default: the next "
                                                "free patch version).")] = None,
    channel: Annotated[str | None, typer.Option("--channel", help="Point this channel at the candidate "
                                                "(default: none).")] = None,
    pull_version: Annotated[str | None, typer.Option("--pull-version", help="Pull only samples captured by "
                                                     "this model version.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="Pull only this device's samples.")] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Pull only this capture tag's samples.")] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Pull only low_confidence, drift or command.")
                      ] = None,
    since: Annotated[str | None, typer.Option("--since", help="Pull samples captured since (ISO-8601 or 7d).")
                     ] = None,
    until: Annotated[str | None, typer.Option("--until", help="Pull samples captured before.")] = None,
    db_url: DbUrl = None,
) -> None:
    """Pull, label, fine-tune, compare, compile (gated on the original validation set and held-out field data)
    and publish the candidate; prints the rollout command. Nothing rolls out without an operator."""
    from edgeml.fleet.capture.retrain import RetrainRefused, RetrainSettings, retrain
    from edgeml.progress import RichProgress

    settings = RetrainSettings(
        model=model, registry=registry, capture=from_capture, runs=runs, work=work, base_run=base_run,
        labels=labels, teacher=teacher, min_confidence=min_confidence, holdout=holdout, from_scratch=from_scratch,
        epochs=epochs, lr=lr, targets=tuple(target or ("onnx",)), max_accuracy_drop=max_accuracy_drop,
        max_regression=max_regression, version=version, channel=channel,
        pull=_pull_filters(pull_version, device, tag, reason, since, until), db_url=db_url)
    try:
        result = retrain(settings, RichProgress())
    except RetrainRefused as exc:
        _print_accuracy(exc.result.accuracy)
        raise
    _print_accuracy(result.accuracy)
    for pub in result.published:
        typer.echo(f"published {pub['path']} sha256 {pub['sha256'][:16]}…")
    typer.echo(f"candidate run: {result.run_dir}; report: {result.work / 'retrain.json'}")
    typer.echo("nothing is rolled out; when ready:")
    typer.echo(f"  {result.rollout_command}")


def _print_accuracy(accuracy: dict[str, dict[str, float]]) -> None:
    if not accuracy:
        return
    typer.echo(f"{'data':<16}{'deployed':>10}{'candidate':>11}")
    for name, acc in accuracy.items():
        typer.echo(f"{name:<16}{100 * acc['deployed']:>9.2f}%{100 * acc['candidate']:>10.2f}%")


def register(fleet_app: typer.Typer) -> None:
    """Add ``retrain`` to ``edgeml fleet`` and ``label`` to ``edgeml fleet capture``."""
    from edgeml.fleet.cli_capture import capture_app

    capture_app.command("label", no_args_is_help=True)(label_command)
    fleet_app.command("retrain", no_args_is_help=True)(retrain_command)
