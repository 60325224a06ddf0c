"""``edgeml agent``: run the on-device agent and ask it how it is doing."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["agent_app"]

agent_app = typer.Typer(name="agent", help="The on-device agent: serve, update, report.", no_args_is_help=True)

ConfigPath = Annotated[Path, typer.Option("--config", "-c", help="The agent's agent.toml.")]


@agent_app.command("run")
def run_command(config: ConfigPath = Path("/etc/edgeml/agent.toml"),
                verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at debug level.")] = False) -> None:
    """Run the agent until SIGTERM or Ctrl-C (under systemd: Type=notify with a watchdog)."""
    import logging

    from edgeml.edge_agent.agent import Agent
    from edgeml.edge_agent.config import load_config

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(load_config(config))
    signal.signal(signal.SIGTERM, lambda *_: agent._stop.set())
    agent.start()
    api = agent.api
    typer.echo(f"agent {agent.device_id}: serving {agent.status()['version'] or 'no model yet'}; "
               f"API on http://{agent.config.api_host}:{api.port if api else '-'}"
               + (f" and {agent.config.api_socket}" if agent.config.api_socket else ""), err=True)
    try:
        agent._stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        agent.stop()
    typer.echo("agent stopped", err=True)


@agent_app.command("status")
def status_command(config: ConfigPath = Path("/etc/edgeml/agent.toml"),
                   as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show what the agent serves and its last update (from the running agent, else from its state directory)."""
    from edgeml.edge_agent.config import load_config

    cfg = load_config(config)
    doc = _ask_running(cfg.api_host, cfg.api_port) or _from_disk(cfg.state_dir)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    update = doc.get("update") or {}
    typer.echo(f"device   {cfg.bootstrap.device_id} ({doc.get('status', 'not running')})")
    typer.echo(f"model    {doc.get('model') or '-'} {doc.get('version') or ''} (slot {doc.get('slot') or '-'})")
    if update:
        typer.echo(f"update   {update.get('version')} {update.get('state')}"
                   + (f": {update['reason']}" if update.get("reason") else ""))


@agent_app.command("install-service")
def install_service_command(
    config: ConfigPath = Path("/etc/edgeml/agent.toml"),
    unit_path: Annotated[Path | None, typer.Option(
        "--unit-path", help="Where to write the unit (default: /etc/systemd/system/edgeml-agent.service).")] = None,
    executable: Annotated[Path | None, typer.Option(
        "--executable", help="The edgeml script to run (default: this installation's).")] = None,
    user: Annotated[str, typer.Option("--user", help="System user (and group) the agent runs as.")] = "edgeml",
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Must equal state_dir in agent.toml.")]
    = Path("/var/lib/edgeml"),
    watchdog: Annotated[int, typer.Option("--watchdog", help="WatchdogSec= in seconds.")] = 30,
    create_user: Annotated[bool, typer.Option("--create-user", help="useradd --system the user if missing.")] = False,
    no_start: Annotated[bool, typer.Option("--no-start", help="Only write the unit: no systemctl.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a different unit at the same path.")] = False,
    print_only: Annotated[bool, typer.Option("--print", "--dry-run", help="Print the unit; change nothing.")]
    = False,
) -> None:
    """Install the agent as a systemd service (Type=notify, watchdog, restart on failure) and start it."""
    from edgeml.edge_agent.service import ServiceSettings, current_executable, install_service, render_unit

    settings = ServiceSettings(executable=(executable or current_executable()).absolute(),
                               config=config.absolute(), user=user, group=user, state_dir=state_dir.absolute(),
                               watchdog_s=watchdog)
    if print_only:
        typer.echo(render_unit(settings), nl=False)
        return
    result = install_service(settings, unit_path=unit_path, create_user=create_user, start=not no_start,
                             force=force)
    typer.echo(f"{'wrote' if result.written else 'unchanged'} {result.unit_path}"
               + ("; created user " + user if result.user_created else "")
               + ("; enabled and started " + result.unit_path.name if not no_start else ""), err=True)
    typer.echo(f"the agent reads {config} and its bootstrap file as user {user!r}: "
               f"`chown {user}: <bootstrap.json>` (keep it 0600)", err=True)


def _ask_running(host: str, port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v1/status", timeout=2) as response:
            return dict(json.loads(response.read()))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _from_disk(state_dir: Path) -> dict[str, Any]:
    from edgeml.edge_agent.update.slots import Slots
    from edgeml.edge_agent.update.store import RecordStore

    active = Slots(state_dir).active() if state_dir.exists() else None
    record = RecordStore(state_dir / "update.json").load() if state_dir.exists() else None
    return {"status": "not running", "model": record.model if active and record else None,
            "version": active.version if active else None,
            "slot": active.slot if active else None,
            "update": None if record is None else {"version": record.version, "state": record.state,
                                                   "reason": record.reason}}
