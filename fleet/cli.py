"""``edgeml fleet ...``: create a signed registry, publish bundles, refresh the timestamp, rotate root keys, serve,
simulate; the other command groups live in ``cli_devices.py``, ``cli_admin.py`` and ``cli_rollouts.py``.

Only typer and the standard library are imported here; each command imports the registry when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgeml.fleet.cli_admin import register as register_admin_commands
from edgeml.fleet.cli_capture import register as register_capture_commands
from edgeml.fleet.cli_devices import register as register_device_commands
from edgeml.fleet.cli_options import DbUrl, RegistryDir, RemovedPassword, refuse_secret_argument
from edgeml.fleet.cli_retrain import register as register_retrain_commands
from edgeml.fleet.cli_rollouts import register as register_rollout_commands

__all__ = ["fleet_app"]

fleet_app = typer.Typer(name="fleet", help="The signed (TUF) model registry and the fleet server.",
                        no_args_is_help=True)
keys_app = typer.Typer(name="keys", help="Manage the registry's signing keys.", no_args_is_help=True)
fleet_app.add_typer(keys_app)


@fleet_app.command("init")
def init_command(
    directory: Annotated[Path, typer.Argument(help="New registry directory.")],
    root_keys: Annotated[int, typer.Option("--root-keys", min=1, help="Root keys to generate.")] = 1,
    root_threshold: Annotated[int, typer.Option("--root-threshold", min=1,
                                                help="Root keys needed to sign a new root.")] = 1,
    db_url: DbUrl = None,
) -> None:
    """Create a registry: TUF metadata, online keys, offline root keys and the database."""
    from edgeml.fleet.registry.repository import init_registry

    init_registry(directory, root_keys=root_keys, root_threshold=root_threshold, db_url=db_url)
    typer.echo(f"created registry {directory} (serve {directory / 'repository'} to devices)")
    typer.echo(f"WARNING: move {directory / 'offline-keys'} OFF THIS SERVER now: it holds the root keys.",
               err=True)


@fleet_app.command("publish")
def publish_command(
    directory: Annotated[Path, typer.Argument(help="The registry directory.")],
    bundle: Annotated[Path, typer.Argument(help="The .edgeml bundle to publish.")],
    channel: Annotated[str, typer.Option("--channel", help="Channel to point at this version.")] = "stable",
    delta_bases: Annotated[int, typer.Option(
        "--delta-bases", min=0, help="Make deltas from this many of the latest earlier versions (0: none).")] = 3,
    delta_max_ratio: Annotated[float, typer.Option(
        "--delta-max-ratio", min=0.01, max=1.0,
        help="Keep a delta only when it is at most this fraction of the full bundle.")] = 0.6,
    db_url: DbUrl = None,
) -> None:
    """Verify a bundle and publish it as a signed TUF target, with deltas from earlier versions."""
    from edgeml.delta import supported
    from edgeml.fleet.registry.deltas import DeltaSettings
    from edgeml.fleet.registry.repository import Registry

    settings = DeltaSettings(bases=delta_bases, max_ratio=delta_max_ratio)
    result = Registry(directory, db_url=db_url).publish(bundle, channel=channel, deltas=settings)
    state = "published" if result.changed else "already published (unchanged)"
    typer.echo(f"{state}: {result.path} sha256 {result.sha256[:16]}… targets v{result.targets_version}")
    for base, length in result.deltas:
        typer.echo(f"  delta from {base}: {length:,} bytes ({length / result.length:.1%} of {result.length:,})")
    if result.changed and delta_bases and not supported():
        typer.echo("  no deltas: zstandard is not installed (pip install 'edgeml[delta]')", err=True)


@fleet_app.command("timestamp")
def timestamp_command(
    directory: Annotated[Path, typer.Argument(help="The registry directory.")],
    hours: Annotated[float, typer.Option("--hours", min=0.1, help="Validity of the new timestamp.")] = 24.0,
) -> None:
    """Re-sign the timestamp (run it periodically, more often than its validity)."""
    from datetime import timedelta

    from edgeml.fleet.registry.repository import Registry

    version = Registry(directory).refresh_timestamp(timedelta(hours=hours))
    typer.echo(f"timestamp v{version}, valid {hours:g} h")


@keys_app.command("rotate")
def rotate_command(
    role: Annotated[str, typer.Argument(help="The role whose keys to rotate (only 'root' for now).")],
    directory: Annotated[Path, typer.Argument(help="The registry directory.")],
    offline_keys: Annotated[Path | None, typer.Option("--offline-keys",
                                                      help="Root key directory (default DIR/offline-keys).")] = None,
    new_keys: Annotated[int, typer.Option("--new-keys", min=1, help="New root keys to generate.")] = 1,
    threshold: Annotated[int, typer.Option("--threshold", min=1, help="New root threshold.")] = 1,
    db_url: DbUrl = None,
) -> None:
    """Replace the root keys: the new root is signed by the old and the new keys (audited)."""
    from edgeml.errors import ConfigError
    from edgeml.fleet.registry.repository import Registry

    if role != "root":
        raise ConfigError(f"rotating {role!r} keys is not supported yet; only 'root' is")
    version = Registry(directory, db_url=db_url).rotate_root(offline_keys or directory / "offline-keys",
                                                             new_keys=new_keys, threshold=threshold)
    typer.echo(f"root v{version} signed by the old and new root keys")


def _tls_context(ca: Path | None) -> Any:
    """An SSL context trusting ``ca`` (None: plain TCP)."""
    if ca is None:
        return None
    import ssl

    from edgeml.errors import ConfigError

    try:
        return ssl.create_default_context(cafile=str(ca))
    except OSError as exc:  # ssl.SSLError included
        raise ConfigError(f"cannot load the CA certificate {ca}: {exc}",
                          hint="give the broker's CA in PEM (broker-config writes BROKER_DIR/tls/ca.crt)") from exc


def _until_stopped() -> None:
    """Block until SIGTERM or SIGINT (Ctrl-C)."""
    from edgeml.process import wait_for_signal

    wait_for_signal()


Role = Annotated[list[str] | None, typer.Option("--role", help="Run only this part (repeatable): dist, ingest, "
                                                 "controller, web (default: all of them in this process).")]
BrokerHost = Annotated[str, typer.Option("--broker-host", help="The MQTT broker's host.")]
BrokerPort = Annotated[int, typer.Option("--broker-port", min=1, max=65535, help="Its port.")]
BrokerUser = Annotated[str | None, typer.Option("--username", help="Broker user (the fleet user).")]
BrokerPasswordFile = Annotated[Path | None, typer.Option("--password-file", help="A file (mode 0600) holding "
                                                         "its password (default: $EDGEML_BROKER_PASSWORD).")]
BrokerCa = Annotated[Path | None, typer.Option("--ca", help="Connect to the broker over TLS, trusting this CA "
                                               "certificate (PEM).")]
ClientId = Annotated[str, typer.Option("--client-id", help="The controller's MQTT client id; keep it across "
                                       "restarts.")]
Tick = Annotated[float, typer.Option("--tick", min=0.05, help="Seconds between the controller's decisions.")]


def _broker_password(given: str | None, password_file: Path | None) -> str | None:
    """The broker password: from ``--password-file``, else ``$EDGEML_BROKER_PASSWORD``, else None."""
    import os

    from edgeml.fleet.web.auth import read_secret

    refuse_secret_argument("--password", given, "$EDGEML_BROKER_PASSWORD or --password-file FILE")
    if password_file is not None:
        return read_secret(password_file, "broker password")
    return os.environ.get("EDGEML_BROKER_PASSWORD") or None


def _serve(directory: Path, settings: Any) -> None:
    """Run a :class:`~edgeml.fleet.server.FleetServer` until SIGTERM or Ctrl-C."""
    from edgeml.fleet.server import FleetServer

    server = FleetServer(directory, settings, log=typer.echo)
    server.start()
    try:
        typer.echo("Ctrl-C or SIGTERM stops", err=True)
        _until_stopped()
    finally:
        served = server.dist.served_bytes if server.dist is not None else 0
        server.stop()
    typer.echo(f"stopped ({served} bytes served over MQTT)")


@fleet_app.command("serve")
def serve_command(
    directory: Annotated[Path, typer.Argument(help="The registry directory.")],
    role: Role = None,
    broker_host: BrokerHost = "localhost",
    broker_port: BrokerPort = 1883,
    username: BrokerUser = None,
    password_file: BrokerPasswordFile = None,
    password: RemovedPassword = None,
    ca: BrokerCa = None,
    http_host: Annotated[str, typer.Option("--http-host", help="Address of the HTTP listener.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option("--http-port", min=0, max=65535,
                                           help="Port of the HTTP listener (0: a free one).")] = 8470,
    no_http: Annotated[bool, typer.Option("--no-http", help="No HTTP listener (the web role left out).")] = False,
    shared: Annotated[bool | None, typer.Option("--shared/--no-shared", help="Shared subscriptions for "
                                                "distribution and ingest (default: on when roles are split).")
                      ] = None,
    mqtt311: Annotated[bool, typer.Option("--mqtt311", help="Speak MQTT 3.1.1 only (a broker without MQTT 5; "
                                          "run every role in one process then).")] = False,
    metrics_token: Annotated[bool, typer.Option("--metrics-token", help="Require a viewer token on /metrics.")
                             ] = False,
    client_id: ClientId = "edgeml.rollouts",
    tick: Tick = 1.0,
    db_url: DbUrl = None,
    retain_raw: Annotated[str, typer.Option("--retain-raw", help="Keep raw telemetry rows this long (90m, 36h, 7d, "
                                            "2w; 0: forever); whole days on PostgreSQL.")] = "7d",
    retain_minutes: Annotated[str, typer.Option("--retain-minutes", help="Keep the per-minute rollups this long "
                                                "(the dashboard's windows up to 6 h, the rollout signals).")] = "30d",
    retain_hours: Annotated[str, typer.Option("--retain-hours", help="Keep the per-hour rollups this long.")
                            ] = "400d",
    maintenance_every: Annotated[str, typer.Option("--maintenance-every", help="How often telemetry maintenance "
                                                   "runs: hour rollups, retention, partitions.")] = "5m",
    no_maintenance: Annotated[bool, typer.Option("--no-maintenance", help="Run no telemetry maintenance in this "
                                                 "process (another serve process does it).")] = False,
) -> None:
    """Run the fleet server until Ctrl-C or SIGTERM: distribution, telemetry ingest, the rollout controller and
    the HTTP listener (dashboard, JSON API, /metrics, the repository), in this process or split by --role.

    Prints one line per part with its real address. Processes with different roles meet in the database
    (--db-url; PostgreSQL across machines) and on the broker. Each process also runs telemetry maintenance
    (hour rollups, retention, PostgreSQL partitions) unless --no-maintenance; one process at a time does the work.
    """
    from edgeml.fleet.server import ROLES, ServeSettings
    from edgeml.fleet.telemetry.maintenance import RetentionSettings, parse_duration

    roles = frozenset(role or ROLES) - ({"web"} if no_http else set())
    retention = None if no_maintenance else RetentionSettings(
        raw_s=parse_duration(retain_raw, "--retain-raw"), minute_s=parse_duration(retain_minutes, "--retain-minutes"),
        hour_s=parse_duration(retain_hours, "--retain-hours"),
        every_s=parse_duration(maintenance_every, "--maintenance-every"))
    _serve(directory, ServeSettings(
        roles=roles, broker_host=broker_host, broker_port=broker_port, username=username,
        password=_broker_password(password, password_file), tls=_tls_context(ca), http_host=http_host,
        http_port=http_port, db_url=db_url, shared=shared, mqtt5=not mqtt311, tick_s=tick, client_id=client_id,
        metrics_token=metrics_token, retention=retention))


@fleet_app.command("simulate")
def simulate_command(
    devices: Annotated[int, typer.Option("--devices", min=1, help="How many simulated devices.")],
    registry: Annotated[Path, typer.Option("--registry", help="The registry directory (its root metadata is "
                                           "what every device trusts).")],
    broker_host: Annotated[str, typer.Option("--broker-host", help="The MQTT broker's host.")] = "127.0.0.1",
    broker_port: Annotated[int, typer.Option("--broker-port", min=1, max=65535, help="Its port.")] = 1883,
    duration: Annotated[float, typer.Option("--duration", min=0, help="Seconds to run (0: until Ctrl-C).")] = 0.0,
    processes: Annotated[int, typer.Option("--processes", min=1, help="Worker processes.")] = 1,
    fail: Annotated[float, typer.Option("--fail", help="Fraction of devices on which bad versions fail.")] = 0.0,
    fail_mode: Annotated[str, typer.Option("--fail-mode", help="smoke (golden vectors) or errors (live "
                                           "requests).")] = "smoke",
    slow: Annotated[float, typer.Option("--slow", help="Fraction on which bad versions are slower.")] = 0.0,
    slow_factor: Annotated[float, typer.Option("--slow-factor", help="Their latency multiplier.")] = 2.0,
    drift: Annotated[float, typer.Option("--drift", help="Fraction reporting drift on bad versions.")] = 0.0,
    bad_version: Annotated[list[str] | None, typer.Option("--bad-version", help="A version that misbehaves "
                                                          "(repeatable; none given: every version).")] = None,
    pi_fraction: Annotated[float, typer.Option("--pi-fraction", help="Fraction of Raspberry Pi devices (LiteRT "
                                               "only); the others are Jetsons.")] = 0.0,
    tags: Annotated[list[str] | None, typer.Option("--tags", help="KEY=VALUE[,VALUE...]: each device gets one "
                                                   "value (repeatable).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every choice.")] = 0,
    real_runtime: Annotated[bool, typer.Option("--real-runtime", help="Run the runtime each bundle names "
                                               "instead of the fixed-latency stand-in.")] = False,
    latency_ms: Annotated[float, typer.Option("--latency-ms", help="The stand-in's latency per call.")] = 2.0,
    rps: Annotated[float, typer.Option("--rps", help="Synthetic requests per second per device.")] = 5.0,
    telemetry_interval: Annotated[float, typer.Option("--telemetry-interval", help="Seconds between "
                                                      "telemetry reports.")] = 5.0,
    prefix: Annotated[str, typer.Option("--prefix", help="Device ids are PREFIX-00000, ...")] = "sim",
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Device state (default: a temporary folder, "
                                                 "removed at the end).")] = None,
) -> None:
    """Run N simulated devices that speak the real device protocol and verify every update for real."""
    import signal
    import threading

    from edgeml.errors import ConfigError
    from edgeml.fleet.sim.simulator import Knobs, Simulator, parse_tags

    root_file = registry / "repository" / "metadata" / "1.root.json"
    if not root_file.is_file():
        raise ConfigError(f"{registry} is not a registry (no {root_file})", hint="give the directory of fleet init")
    knobs = Knobs(fail=fail, fail_mode=fail_mode, slow=slow, slow_factor=slow_factor, drift=drift,
                  bad_versions=tuple(bad_version or ()), pi_fraction=pi_fraction, tags=parse_tags(tags or []),
                  seed=seed, standin=not real_runtime, latency_ms=latency_ms, rps=rps,
                  telemetry_interval_s=telemetry_interval)
    sim = Simulator(broker_host, broker_port, root_file.read_bytes(), devices, knobs, workdir, processes, prefix)
    typer.echo(f"simulating {devices} devices ({prefix}-00000...) on {broker_host}:{broker_port} with a {sim.label}")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        sim.start()
        typer.echo("all devices connected; Ctrl-C or SIGTERM stops", err=True)
        stop.wait(duration or None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        summary = sim.stop()
    for key in ("status", "versions", "updates"):
        typer.echo(f"{key:<9} " + (", ".join(f"{k}: {v}" for k, v in sorted(summary[key].items())) or "-"))
    typer.echo(f"telemetry {summary['telemetry_sent']} reports sent; runtime: {summary['runtime']}")


# --- staged rollouts (edgeml.fleet.rollouts.store, edgeml.fleet.rollouts.rules) ---

@fleet_app.command("controller")
def controller_command(
    directory: RegistryDir,
    broker_host: BrokerHost = "localhost",
    broker_port: BrokerPort = 1883,
    username: BrokerUser = None,
    password_file: BrokerPasswordFile = None,
    password: RemovedPassword = None,
    ca: BrokerCa = None,
    client_id: ClientId = "edgeml.rollouts",
    tick: Tick = 1.0,
    broadcast: Annotated[bool, typer.Option("--broadcast/--no-broadcast", help="Broadcast each rollout's files "
                                            "once over MQTT (else devices fetch them with get requests).")] = True,
    db_url: DbUrl = None,
) -> None:
    """Run only the rollout controller (same as `serve --role controller`) until Ctrl-C or SIGTERM.

    Restart-safe: it continues from the database. Its distribution service broadcasts each rollout's files
    and shares the devices' get requests with the other fleet processes (MQTT 5 shared subscription).
    """
    from edgeml.fleet.server import ServeSettings

    _serve(directory, ServeSettings(
        roles=frozenset({"controller"}), broker_host=broker_host, broker_port=broker_port, username=username,
        password=_broker_password(password, password_file), tls=_tls_context(ca), db_url=db_url, tick_s=tick,
        client_id=client_id, broadcast=broadcast))


register_rollout_commands(fleet_app)  # rollout ..., rollback, telemetry (fleet/cli_rollouts.py)
register_device_commands(fleet_app)  # broker-config, devices ... (fleet/cli_devices.py)
register_admin_commands(fleet_app)  # audit ..., tokens ... (fleet/cli_admin.py)
register_capture_commands(fleet_app)  # capture request, ls, pull (fleet/cli_capture.py)
register_retrain_commands(fleet_app)  # capture label, retrain (fleet/cli_retrain.py)
