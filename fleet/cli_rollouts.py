"""``edgeml fleet rollout ...``, ``edgeml fleet rollback`` and ``edgeml fleet telemetry``.

Each command acts on FLEET: a registry directory (its database, here), or a fleet server's URL (its HTTP API,
with an operator token from ``$EDGEML_TOKEN`` or ``--token-file``; plain ``http://`` only to this machine
unless ``--insecure``): :mod:`edgeml.fleet.operator_api`. Only typer is imported here; each command imports
what it needs when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeml.fleet.cli_options import DbUrl, Insecure, RemovedToken, TokenFile, refuse_secret_argument

__all__ = ["register"]

rollout_app = typer.Typer(name="rollout", help="Staged rollouts with automatic abort.", no_args_is_help=True)
RolloutId = Annotated[str, typer.Argument(help="The rollout's id (from `rollout start`).")]


Fleet = Annotated[str, typer.Argument(metavar="FLEET", help="The registry directory, or a fleet server's URL "
                                      "(https://HOST:8470) to act through its API with an operator token "
                                      "($EDGEML_TOKEN or --token-file).")]


@dataclass(frozen=True)
class _Remote:
    """How to reach a remote fleet (ignored for a registry directory)."""

    token_file: Path | None = None
    insecure: bool = False


def _remote(token: str | None, token_file: Path | None, insecure: bool) -> _Remote:
    refuse_secret_argument("--token", token, "$EDGEML_TOKEN or --token-file FILE")
    return _Remote(token_file, insecure)


def _fleet(target: str, db_url: str | None, remote: _Remote) -> Any:
    """The fleet to act on: the registry's database here, or a remote server's API (close it after use)."""
    from edgeml.fleet.operator_api import open_fleet

    return open_fleet(target, db_url, token_file=remote.token_file, insecure=remote.insecure)


def _thresholds(items: list[str] | None) -> dict[str, float]:
    from edgeml.fleet.rollouts.rules import RolloutError

    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise RolloutError(f"bad --threshold {item!r}", hint="use NAME=NUMBER, e.g. min_requests=50")
    return out


def _output_shift(text: str | None) -> dict[str, float | None]:
    """``--max-output-shift``: nothing given (the options' default), ``off`` (None), or a number."""
    from edgeml.fleet.rollouts.rules import RolloutError

    if text is None:
        return {}
    if text.strip().lower() in ("off", "none"):
        return {"max_output_shift": None}
    try:
        return {"max_output_shift": float(text)}
    except ValueError:
        raise RolloutError(f"--max-output-shift must be a number from 0 to 1 or 'off', got {text!r}") from None


@rollout_app.command("start")
def rollout_start_command(
    fleet: Fleet,
    model_version: Annotated[str, typer.Argument(metavar="MODEL:VERSION", help="What to roll out.")],
    targets: Annotated[str, typer.Option("--targets", help="Compile targets in order of preference, "
                                         "comma-separated; each device gets the first it can run.")],
    select: Annotated[str, typer.Option("--select", help="TAG=VALUE[,TAG=VALUE]: the devices (all tags must "
                                        "match; empty: every device).")] = "",
    canary: Annotated[str, typer.Option("--canary", help="Canary size, a percentage of the devices.")] = "5%",
    waves: Annotated[str, typer.Option("--waves", help="Cumulative percentages after each wave.")] = "25%,50%,100%",
    wave_timeout: Annotated[str, typer.Option("--wave-timeout", help="Time a device may take (30s, 10m).")] = "10m",
    probation: Annotated[str, typer.Option("--probation", help="Probation on each device.")] = "5m",
    max_failure_rate: Annotated[str, typer.Option("--max-failure-rate", help="Abort above this.")] = "10%",
    min_devices: Annotated[int, typer.Option("--min-devices", help="Smallest canary; finished devices "
                                             "needed before the failure rate counts.")] = 3,
    max_p99_regression: Annotated[float | None, typer.Option("--max-p99-regression",
                                                             help="Abort when new/previous p99 exceeds this.")] = None,
    max_error_rate: Annotated[str | None, typer.Option("--max-error-rate", help="Abort above this error rate.")] = None,
    max_drift: Annotated[float | None, typer.Option("--max-drift", help="Abort above this drift score.")] = None,
    max_output_shift: Annotated[str | None, typer.Option(
        "--max-output-shift", help="Abort above this output-shift score (0..1; default: the agents' limit, 0.5; "
        "'off': not judged by the fleet).")] = None,
    threshold: Annotated[list[str] | None, typer.Option("--threshold", help="More agent health thresholds, "
                                                        "NAME=NUMBER (repeatable).")] = None,
    rollout_id: Annotated[str | None, typer.Option("--id", help="The rollout's id (default: a new one).")] = None,
    token_file: TokenFile = None,
    insecure: Insecure = False,
    token: RemovedToken = None,
    db_url: DbUrl = None,
) -> None:
    """Plan a staged rollout; the controller (`edgeml fleet serve`) carries it out."""
    from edgeml.fleet.rollouts.rules import (
        RolloutError,
        RolloutOptions,
        parse_duration,
        parse_fraction,
        parse_selection,
    )

    model, sep, version = model_version.partition(":")
    if not sep or not model or not version:
        raise RolloutError(f"expected MODEL:VERSION, got {model_version!r}", hint="e.g. digits:2.0.0")
    options = RolloutOptions(
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()), select=parse_selection(select),
        canary=parse_fraction(canary, "--canary"),
        waves=tuple(parse_fraction(w, "--waves") for w in waves.split(",") if w.strip()),
        wave_timeout_s=parse_duration(wave_timeout, "--wave-timeout"),
        probation_s=parse_duration(probation, "--probation"),
        max_failure_rate=parse_fraction(max_failure_rate, "--max-failure-rate"), min_devices=min_devices,
        max_p99_regression=max_p99_regression, max_drift=max_drift, device_thresholds=_thresholds(threshold),
        max_error_rate=None if max_error_rate is None else parse_fraction(max_error_rate, "--max-error-rate"),
        **_output_shift(max_output_shift))
    target = _fleet(fleet, db_url, _remote(token, token_file, insecure))
    try:
        rid = target.start(model, version, options, rollout_id)
        status = target.status(rid)[0]
    finally:
        target.close()
    sizes = [sum(n for s, n in wave.items() if s != "incompatible") for wave in status.counts()]
    typer.echo(f"rollout {rid}: {model} {version}, canary {sizes[0]} devices, then waves of "
               f"{', '.join(map(str, sizes[1:]))}" + (f" ({n} incompatible)" if (n := sum(
                   w.get("incompatible", 0) for w in status.counts())) else ""))


@rollout_app.command("status")
def rollout_status_command(
    fleet: Fleet,
    rollout_id: Annotated[str | None, typer.Argument(help="One rollout (default: all, newest first).")] = None,
    token_file: TokenFile = None,
    insecure: Insecure = False,
    token: RemovedToken = None,
    db_url: DbUrl = None,
) -> None:
    """Show rollouts: state, and per wave how many devices are in each state."""
    target = _fleet(fleet, db_url, _remote(token, token_file, insecure))
    try:
        rows = target.status(rollout_id)
    finally:
        target.close()
    for r in rows:
        typer.echo(f"{r.id}  {r.kind}  {r.model}:{r.version}  {r.state}" +
                   (f"  ({r.abort_reason})" if r.abort_reason else ""))
        for wave, counts in enumerate(r.counts()):
            shown = ", ".join(f"{s} {n}" for s, n in sorted(counts.items())) or "no devices"
            typer.echo(f"  {'canary' if wave == 0 else f'wave {wave}'}: {shown}")
        sent = r.transfer()
        if sent["delta"] + sent["full"]:
            saved = 1 - sent["bytes"] / sent["full_bytes"] if sent["full_bytes"] else 0.0
            typer.echo(f"  transfer: {sent['delta']} delta, {sent['full']} full"
                       + (f" ({sent['fallback']} fell back from a delta)" if sent["fallback"] else "")
                       + f"; {sent['bytes']:,} of {sent['full_bytes']:,} bytes ({saved:.0%} saved)")
        if rollout_id is not None:
            for d in r.devices:
                typer.echo(f"    {d['device_id']}  wave {d['wave']}  {d['target'] or '-'}  {d['state']}"
                           + (f"  {d['reason']}" if d["reason"] else "")
                           + (f"  revert: {d['revert_state']}" if d["revert_state"] else "")
                           + (f"  [{d['transfer']['kind']} {d['transfer'].get('bytes') or 0:,} B]"
                              if d.get("transfer") else ""))


def _rollout_action(fleet: str, rollout_id: str, action: str, db_url: str | None, remote: _Remote,
                    reason: str | None = None) -> None:
    target = _fleet(fleet, db_url, remote)
    try:
        state = target.change(rollout_id, action, reason)
    finally:
        target.close()
    typer.echo(f"rollout {rollout_id}: {state}")


@rollout_app.command("pause")
def rollout_pause_command(fleet: Fleet, rollout_id: RolloutId, token_file: TokenFile = None,
                          insecure: Insecure = False, token: RemovedToken = None, db_url: DbUrl = None) -> None:
    """Pause a rollout: devices already updating finish; no further device is notified."""
    _rollout_action(fleet, rollout_id, "pause", db_url, _remote(token, token_file, insecure))


@rollout_app.command("resume")
def rollout_resume_command(fleet: Fleet, rollout_id: RolloutId, token_file: TokenFile = None,
                           insecure: Insecure = False, token: RemovedToken = None, db_url: DbUrl = None) -> None:
    """Resume a paused rollout where it stopped."""
    _rollout_action(fleet, rollout_id, "resume", db_url, _remote(token, token_file, insecure))


@rollout_app.command("abort")
def rollout_abort_command(
    fleet: Fleet, rollout_id: RolloutId,
    reason: Annotated[str | None, typer.Option("--reason", help="Why (recorded in the audit log).")] = None,
    token_file: TokenFile = None,
    insecure: Insecure = False,
    token: RemovedToken = None,
    db_url: DbUrl = None,
) -> None:
    """Abort a rollout: no further device is updated, and the updated ones go back to their previous version."""
    _rollout_action(fleet, rollout_id, "abort", db_url, _remote(token, token_file, insecure), reason)


def rollback_command(
    fleet: Fleet,
    model: Annotated[str, typer.Argument(help="The model.")],
    to: Annotated[str, typer.Option("--to", help="The version to go back to.")],
    select: Annotated[str, typer.Option("--select", help="TAG=VALUE[,TAG=VALUE]: the devices.")] = "",
    targets: Annotated[str | None, typer.Option("--targets", help="Targets in order of preference "
                                                "(default: every target of that version).")] = None,
    wave_timeout: Annotated[str, typer.Option("--wave-timeout", help="Time a device may take.")] = "10m",
    probation: Annotated[str, typer.Option("--probation", help="Probation on each device.")] = "5m",
    token_file: TokenFile = None,
    insecure: Insecure = False,
    token: RemovedToken = None,
    db_url: DbUrl = None,
) -> None:
    """Roll the selected devices back to an older version: a new single-wave rollout of it."""
    from edgeml.fleet.rollouts.rules import parse_duration, parse_selection

    target = _fleet(fleet, db_url, _remote(token, token_file, insecure))
    try:
        rid = target.rollback(model, to, select=parse_selection(select),
                              targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None,
                              wave_timeout_s=parse_duration(wave_timeout, "--wave-timeout"),
                              probation_s=parse_duration(probation, "--probation"))
    finally:
        target.close()
    typer.echo(f"rollback {rid}: {model} back to {to}")


def telemetry_command(
    fleet: Fleet,
    device: Annotated[str, typer.Argument(help="The device id.")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="How many reports, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON lines, every metric.")] = False,
    token_file: TokenFile = None,
    insecure: Insecure = False,
    token: RemovedToken = None,
    db_url: DbUrl = None,
) -> None:
    """A device's latest telemetry reports: version, requests, errors, latency p50/p99 and drift."""
    import json

    target = _fleet(fleet, db_url, _remote(token, token_file, insecure))
    try:
        rows = target.telemetry(device, limit)
    finally:
        target.close()
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r, sort_keys=True))
        return
    if not rows:
        typer.echo(f"no telemetry from {device}", err=True)
        return
    table = [("SEQ", "RECEIVED", "VERSION", "REQUESTS", "ERRORS", "P50 MS", "P99 MS", "DRIFT")]
    for r in rows:
        m = r["metrics"] or {}
        drift: dict[str, Any] = m["drift"] if isinstance(m.get("drift"), dict) else {}
        table.append((str(r["seq"]), str(r["received_at"])[:19].replace("T", " "), str(m.get("version") or "-"),
                      str(m.get("requests", "-")), str(m.get("errors", "-")), _num(m.get("latency_p50_ms")),
                      _num(m.get("latency_p99_ms")), _num(drift.get("score")) + (" flagged" if drift.get("flagged")
                                                                                  else "")))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def register(fleet_app: typer.Typer) -> None:
    """Add these commands to ``edgeml fleet``."""
    fleet_app.add_typer(rollout_app)
    fleet_app.command("rollback")(rollback_command)
    fleet_app.command("telemetry")(telemetry_command)
