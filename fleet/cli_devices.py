"""``edgeml fleet broker-config`` and ``edgeml fleet devices ...``: the broker's configuration, and enrolling,
listing and revoking devices in the registry and on the broker together.

Only typer and the standard library are imported here; each command imports what it needs when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgeml.fleet.cli_options import DbUrl

__all__ = ["register"]

devices_app = typer.Typer(name="devices", help="Enroll, list and revoke devices.", no_args_is_help=True)


def broker_config_command(
    out_dir: Annotated[Path, typer.Argument(help="New directory for the broker configuration.")],
    device: Annotated[list[str] | None, typer.Option(
        "--device", help="A device id (repeat); prefer `edgeml fleet devices enroll`, which keeps the registry in step."
    )] = None,
    hostname: Annotated[str, typer.Option("--hostname", help="Name devices connect to.")] = "localhost",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TLS listener port.")] = 8883,
    bind: Annotated[str | None, typer.Option("--bind", help="IP address the listener binds (default: all).")] = None,
    plugin: Annotated[Path | None, typer.Option("--plugin", help="Path of mosquitto_dynamic_security.so on the "
                                                "broker's host (default: found on this machine).")] = None,
    cafile: Annotated[Path | None, typer.Option("--cafile", help="Existing CA certificate (PEM).")] = None,
    certfile: Annotated[Path | None, typer.Option("--certfile", help="Existing server certificate.")] = None,
    keyfile: Annotated[Path | None, typer.Option("--keyfile", help="Existing server key.")] = None,
) -> None:
    """Write a TLS-only Mosquitto config: each device bound to its own client id and topics (dynamic security)."""
    from edgeml.errors import ConfigError
    from edgeml.fleet.devices.broker import TlsFiles, write_broker_config

    given = [p for p in (cafile, certfile, keyfile) if p is not None]
    if given and len(given) != 3:
        raise ConfigError("--cafile, --certfile and --keyfile go together", hint="give all three or none")
    tls = TlsFiles(cafile, certfile, keyfile) if cafile and certfile and keyfile else None
    creds = write_broker_config(out_dir, device or [], hostname=hostname, port=port, bind=bind, tls=tls,
                                plugin=plugin)
    typer.echo(f"wrote {out_dir / 'mosquitto.conf'} ({len(creds) - 2} devices, TLS port {port}"
               + (f" on {bind}" if bind else "") + ")")
    typer.echo(f"credentials in {out_dir / 'credentials'} (0600): hand each file to its device only; "
               f"the broker must own its files (it rewrites dynamic-security.json): chown -R mosquitto: {out_dir}",
               err=True)


BrokerDir = Annotated[Path, typer.Option("--broker-dir", help="The broker directory (from broker-config).")]
Offline = Annotated[bool, typer.Option("--offline", help="The broker is stopped: rewrite its dynamic-security.json "
                                       "instead of changing the running broker.")]
ControlUrl = Annotated[str | None, typer.Option(
    "--control", help="Reach the running broker as its admin at mqtts://HOST:PORT (or mqtt:// on loopback) "
    "(default: the host and port in BROKER_DIR/credentials/fleet-admin.json).")]


def _control(broker_dir: Path, offline: bool, url: str | None) -> Any:
    """The running broker's control, or None with --offline."""
    from urllib.parse import urlsplit

    from edgeml.errors import ConfigError
    from edgeml.fleet.devices.broker_control import BrokerControl

    if offline:
        return None
    if url is None:
        return BrokerControl.from_broker_dir(broker_dir)
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or not parts.port:
        raise ConfigError(f"bad --control {url!r}", hint="use mqtts://HOST:PORT")
    if parts.scheme == "mqtt" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError("--control over plain mqtt:// is for a broker on this machine only", hint="use mqtts://")
    return BrokerControl.from_broker_dir(broker_dir, host=parts.hostname, port=parts.port,
                                         tls=parts.scheme == "mqtts")


@devices_app.command("enroll")
def devices_enroll_command(
    directory: Annotated[Path, typer.Argument(help="The registry directory.")],
    name: Annotated[str, typer.Argument(help="The new device id (its broker user name).")],
    broker_dir: BrokerDir,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="A tag KEY=VALUE (repeatable).")] = None,
    broker_host: Annotated[str, typer.Option("--broker-host", help="Host the device connects to.")] = "localhost",
    broker_port: Annotated[int | None, typer.Option("--broker-port", min=1, max=65535,
                                                    help="Its TLS port (default: the broker's listener).")] = None,
    offline: Offline = False,
    control: ControlUrl = None,
    db_url: DbUrl = None,
) -> None:
    """Enroll a device: record it, add it to the broker (its own client id and topics), write its bootstrap file."""
    from edgeml.errors import ConfigError
    from edgeml.fleet.devices.enrollment import enroll

    tags: dict[str, str] = {}
    for item in tag or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"bad --tag {item!r}", hint="use KEY=VALUE")
        tags[key] = value
    path = enroll(directory, name, broker_dir, tags=tags, broker_host=broker_host, broker_port=broker_port,
                  control=_control(broker_dir, offline, control), db_url=db_url)
    typer.echo(f"enrolled {name}; bootstrap file {path} (0600): hand it to the device only")
    if offline:
        typer.echo("the broker reads the new device when it starts", err=True)


@devices_app.command("ls")
def devices_ls_command(
    directory: Annotated[Path, typer.Argument(help="The registry directory.")],
    db_url: DbUrl = None,
) -> None:
    """List the enrolled devices."""
    from edgeml.fleet.devices.enrollment import list_devices

    rows = [("NAME", "TAGS", "ENROLLED", "REVOKED", "LAST SEEN", "INSTALLED")]
    for d in list_devices(directory, db_url=db_url):
        rows.append((d.name, ",".join(f"{k}={v}" for k, v in sorted(d.tags.items())) or "-",
                     d.enrolled_at.strftime("%Y-%m-%d %H:%M") if d.enrolled_at else "-",
                     "yes" if d.revoked else "no", d.last_seen.isoformat() if d.last_seen else "-",
                     str(d.installed) if d.installed else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


@devices_app.command("revoke")
def devices_revoke_command(
    directory: Annotated[Path, typer.Argument(help="The registry directory.")],
    name: Annotated[str, typer.Argument(help="The device id to revoke.")],
    broker_dir: BrokerDir,
    offline: Offline = False,
    control: ControlUrl = None,
    db_url: DbUrl = None,
) -> None:
    """Revoke a device: the fleet ignores it, and the broker disables its login (disconnecting it now)."""
    from edgeml.fleet.devices.enrollment import revoke

    revoke(directory, name, broker_dir, control=_control(broker_dir, offline, control), db_url=db_url)
    typer.echo(f"revoked {name}" + ("; the broker disables it when it starts" if offline else
                                    "; the broker disconnected it and refuses it from now on"))


# --- the audit log and operator tokens (edgeml.fleet.audit.log, edgeml.fleet.web.auth) ---


def register(fleet_app: typer.Typer) -> None:
    """Add ``broker-config`` and ``devices ...`` to ``edgeml fleet``."""
    fleet_app.command("broker-config")(broker_config_command)
    fleet_app.add_typer(devices_app)
