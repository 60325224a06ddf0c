"""The ``edgeml`` command: a thin root that mounts each package's commands.

Heavy libraries are never imported here; each command imports what it needs when it runs, so
``edgeml --help`` is instant. An :class:`~edgeml.errors.EdgeMLError` is printed in one or two lines with a
non-zero exit; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgeml.compile.cli import compile_command
from edgeml.edge_agent.cli import agent_app
from edgeml.errors import EdgeMLError
from edgeml.fleet.cli import fleet_app
from edgeml.train.cli import train_command

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgeml",
    help="Compile, ship and watch ML models on a fleet of edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("compile", no_args_is_help=True)(compile_command)
app.command("train", no_args_is_help=True)(train_command)
app.add_typer(fleet_app)
app.add_typer(agent_app)


@app.command("inspect")
def inspect_command(
    bundle: Annotated[Path, typer.Argument(help="An .edgeml bundle.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole manifest as JSON.")] = False,
) -> None:
    """Show a bundle's manifest: model, runtime, metrics, gate, provenance (after verifying its files)."""
    from edgeml.bundle import Bundle

    with Bundle(bundle) as b:
        b.verify()  # never present a manifest whose files were altered
        m = b.manifest
    if as_json:
        typer.echo(m.to_json().decode())
        return
    gate = m.gate
    lat = m.metrics.get("latency", {}).get("threads_1", {})
    lines = [
        f"{m.name} {m.version}  target {m.target}  ({m.schema})",
        f"runtime     {m.runtime.get('name')} >= {m.runtime.get('min_version')}  precision "
        f"{m.runtime.get('precision')}",
        "inputs      " + ", ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in m.inputs),
        "outputs     " + ", ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in m.outputs),
        f"gate        {gate.get('status')} ({gate.get('metric')}: {gate.get('drop', 0):.4g}, budget "
        f"{gate.get('budget')})" + (f" via {gate['proxy']}" if gate.get("proxy") else ""),
        f"latency     p50 {lat.get('p50_ms', float('nan')):.2f} ms, p99 {lat.get('p99_ms', float('nan')):.2f} ms "
        "(1 thread, build host)" if lat else "latency     not measured",
        "files       " + ", ".join(f"{k} ({v.size} B)" for k, v in sorted(m.files.items())),
        f"provenance  {json.dumps(m.provenance.get('tools', {}))}",
        f"source      {m.provenance.get('source')} sha256 {str(m.provenance.get('source_sha256'))[:16]}…",
    ]
    if m.recovery is not None:  # what --recover did to pass the gate
        from edgeml.recovery import describe_recovery

        lines[5:5] = [f"recovery    {describe_recovery(m.recovery)}"] + [
            f"            float layer {layer['name']} ({layer['op_type']}, {100 * layer['compute_share']:.1f}% of "
            "compute)" for layer in m.recovery["float_layers"]]
    typer.echo("\n".join(lines))


@app.command("verify")
def verify_command(bundle: Annotated[Path, typer.Argument(help="An .edgeml bundle.")]) -> None:
    """Re-check every file of a bundle against the sha256 and size in its manifest."""
    from edgeml.bundle import Bundle

    with Bundle(bundle) as b:
        checked = b.verify()
    typer.echo(f"ok: {bundle} ({len(checked)} files verified)")


@app.command("demo")
def demo_command(
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its files (a second run reuses them).")]
    = Path(".edgeml-demo"),
    ci: Annotated[bool, typer.Option("--ci", help="Non-interactive: exit after the summary, within --timeout.")]
    = False,
    timeout: Annotated[float, typer.Option("--timeout", min=60, help="Time bound of the whole run, seconds.")]
    = 900.0,
    http_port: Annotated[int, typer.Option("--http-port", min=0, max=65535, help="The dashboard's port "
                                           "(a free one when taken).")] = 8470,
    broker: Annotated[str, typer.Option("--broker", help="auto (Mosquitto where installed, else the embedded "
                                        "broker), mosquitto or embedded.")] = "auto",
) -> None:
    """The whole loop on this machine: train, compile, sign and publish, roll out to three local agents in
    waves, stop a broken release, inject drift; prints the dashboard address and a summary."""
    from edgeml.demo import run_demo

    run_demo(workdir, ci=ci, budget_s=timeout, http_port=http_port, broker=broker)


def main() -> None:
    """Entry point of the ``edgeml`` script."""
    try:
        app()
    except EdgeMLError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
