"""``edgeml fleet capture ...``: ask devices to upload what they captured, list it, pull it as a dataset.

Only typer and the standard library are imported here; each command imports what it needs when it runs.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeml.fleet.cli_options import DbUrl, Insecure, TokenFile

__all__ = ["register"]

capture_app = typer.Typer(name="capture", no_args_is_help=True,
                          help="Samples the devices captured: ask for uploads, list them, pull a dataset.")

Model = Annotated[str | None, typer.Option("--model", help="Only this model's samples.")]
Version = Annotated[str | None, typer.Option("--version", help="Only this model version's.")]
Device = Annotated[str | None, typer.Option("--device", help="Only this device's.")]
Tag = Annotated[str | None, typer.Option("--tag", help="Only samples uploaded for this capture tag.")]
Reason = Annotated[str | None, typer.Option("--reason", help="Only samples kept for this reason: "
                                            "low_confidence, drift or command.")]
Since = Annotated[str | None, typer.Option("--since", help="Captured at or after this time (ISO-8601, UTC "
                                           "unless it says otherwise), or this long ago (90m, 36h, 7d).")]
Until = Annotated[str | None, typer.Option("--until", help="Captured before this time (same forms).")]
Fleet = Annotated[str, typer.Argument(help="The registry directory, or a fleet server's URL (https://...; a token "
                                      "from $EDGEML_TOKEN or --token-file).")]


def _remote(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def _when(value: str | None, option: str) -> dt.datetime | None:
    from edgeml.errors import ConfigError
    from edgeml.fleet.telemetry.maintenance import parse_duration

    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        try:
            return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=parse_duration(value, option))
        except ConfigError as exc:
            raise ConfigError(f"{option} must be an ISO-8601 time or a duration such as 7d, got {value!r}") from exc
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when


def _filters(model: str | None, version: str | None, device: str | None, tag: str | None, reason: str | None,
             since: str | None, until: str | None) -> Any:
    from edgeml.fleet.capture.pull import CaptureFilters

    return CaptureFilters(model, version, device, tag, _when(since, "--since"), _when(until, "--until"), reason)


def _database(directory: Path, db_url: str | None) -> Any:
    from edgeml.fleet.registry.repository import Registry

    return Registry(directory, db_url=db_url).database()


@capture_app.command("ls")
def capture_ls_command(fleet: Fleet, model: Model = None, version: Version = None, device: Device = None,
                       tag: Tag = None, reason: Reason = None, since: Since = None, until: Until = None,
                       as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
                       db_url: DbUrl = None, token_file: TokenFile = None, insecure: Insecure = False) -> None:
    """Count the captured samples the fleet holds, per model, version, device and reason."""
    from edgeml.fleet.capture.pull import list_captures

    filters = _filters(model, version, device, tag, reason, since, until)
    if _remote(fleet):
        from edgeml.fleet.capture.remote import remote_list
        from edgeml.fleet.web.auth import operator_token

        rows = remote_list(fleet, operator_token(token_file), filters, insecure=insecure)
    else:
        db = _database(Path(fleet), db_url)
        try:
            rows = list_captures(db, filters)
        finally:
            db.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = [("MODEL", "VERSION", "DEVICE", "REASON", "SAMPLES", "BYTES", "LAST CAPTURED")]
    table += [(r["model"] or "-", r["version"] or "-", r["device_id"], r["reason"], str(r["samples"]),
               f"{r['bytes']:,}", (r["last"] or "-")[:19]) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    typer.echo(f"{sum(r['samples'] for r in rows)} samples", err=True)


@capture_app.command("pull")
def capture_pull_command(fleet: Fleet,
                         model: Annotated[str, typer.Option("--model", help="The model whose samples to pull.")],
                         out: Annotated[Path, typer.Option("--out", help="The dataset folder to write (new).")],
                         version: Version = None, device: Device = None, tag: Tag = None, reason: Reason = None,
                         since: Since = None, until: Until = None, db_url: DbUrl = None,
                         token_file: TokenFile = None, insecure: Insecure = False) -> None:
    """Write the matching samples as a dataset folder: samples.npz, provenance.jsonl, dataset.json, labels.csv."""
    from edgeml.fleet.capture.pull import pull

    f = _filters(model, version, device, tag, reason, since, until)
    if _remote(fleet):
        from edgeml.fleet.capture.remote import remote_pull
        from edgeml.fleet.web.auth import operator_token

        result = remote_pull(fleet, operator_token(token_file), out, f, insecure=insecure)
    else:
        db = _database(Path(fleet), db_url)
        try:
            result = pull(db, fleet, out, model=model, version=f.version, device=f.device, tag=f.tag,
                          since=f.since, until=f.until, reason=f.reason)
        finally:
            db.close()
    typer.echo(f"{result.count} samples in {result.path} (dataset sha256 {result.sha256[:16]}…); "
               f"fill {result.path / 'labels.csv'} or label them with a teacher")


@capture_app.command("request")
def capture_request_command(
    devices: Annotated[list[str], typer.Argument(help="The devices to ask.")],
    tag: Annotated[str | None, typer.Option("--tag", help="A label stored with every sample of this request.")
                   ] = None,
    max_samples: Annotated[int | None, typer.Option("--max-samples", min=1, help="At most this many samples "
                                                    "per device (the oldest first).")] = None,
    rate: Annotated[int | None, typer.Option("--rate", min=1, help="Upload at most this many bytes a second per "
                                             "device (the device caps it with its own limit).")] = None,
    drift: Annotated[bool | None, typer.Option("--drift/--no-drift", help="Also upload, at most hourly, when "
                                               "the device flags drift (kept on the device until changed).")
                     ] = None,
    no_upload: Annotated[bool, typer.Option("--no-upload", help="Only change --drift; upload nothing now.")
                         ] = False,
    broker_host: Annotated[str, typer.Option("--broker-host", help="The MQTT broker's host.")] = "localhost",
    broker_port: Annotated[int, typer.Option("--broker-port", min=1, max=65535, help="Its port.")] = 1883,
    username: Annotated[str | None, typer.Option("--username", help="Broker user (the fleet user).")] = None,
    password_file: Annotated[Path | None, typer.Option("--password-file", help="A file (mode 0600) holding its "
                                                       "password (default: $EDGEML_BROKER_PASSWORD).")] = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="The broker's CA certificate (TLS).")] = None,
) -> None:
    """Ask devices to upload their captured samples (a ``capture`` command each); the fleet server stores them."""
    from edgeml.fleet.capture.request import send_capture
    from edgeml.fleet.cli import _broker_password, _tls_context
    from edgeml.protocol.messages import CaptureArgs
    from edgeml.protocol.uploads import MAX_SAMPLES

    args = CaptureArgs(upload=not no_upload, tag=tag, max_samples=max_samples or MAX_SAMPLES, bytes_per_s=rate,
                       drift=drift)
    ids = send_capture(devices, args, broker_host, broker_port, username=username,
                       password=_broker_password(None, password_file), tls=_tls_context(ca))
    for device, command_id in ids.items():
        typer.echo(f"{device}: capture command {command_id} sent")


def register(fleet_app: typer.Typer) -> None:
    """Add ``capture ...`` to ``edgeml fleet``."""
    fleet_app.add_typer(capture_app)
