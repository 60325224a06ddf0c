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
    return {"status": "not running", "version": active.version if active else None,
            "slot": active.slot if active else None,
            "update": None if record is None else {"version": record.version, "state": record.state,
                                                   "reason": record.reason}}
