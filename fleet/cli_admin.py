"""``edgeml fleet audit ...`` and ``edgeml fleet tokens ...``: the signed audit log and the operator tokens.

Only typer and the standard library are imported here; each command imports what it needs when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgeml.fleet.cli_options import DbUrl

__all__ = ["register"]

audit_app = typer.Typer(name="audit", help="Read and verify the fleet's signed audit log.", no_args_is_help=True)
tokens_app = typer.Typer(name="tokens", help="Operator tokens for the HTTP API and the remote CLI.",
                         no_args_is_help=True)


@audit_app.command("ls")
def audit_ls_command(
    directory: Annotated[Path, typer.Argument(help="The registry directory.")],
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the last N entries.")] = None,
    db_url: DbUrl = None,
) -> None:
    """List the audit log's entries, oldest first."""
    import json

    from edgeml.fleet.audit.log import open_audit

    log = open_audit(directory, db_url=db_url, create_key=False)
    try:
        for e in log.entries(limit=limit):
            typer.echo(f"{e.seq:>6}  {e.at.isoformat(timespec='seconds')}  {e.actor}  {e.action}  {e.subject}  "
                       f"{json.dumps(e.details, sort_keys=True)}")
    finally:
        log.db.close()


@audit_app.command("verify")
def audit_verify_command(
    directory: Annotated[Path, typer.Argument(help="The registry directory.")],
    heads: Annotated[Path | None, typer.Option("--heads", help="A copy of heads.log kept off the server, checked "
                                               "instead of DIR/audit/heads.log.", exists=True, dir_okay=False)] = None,
    db_url: DbUrl = None,
) -> None:
    """Recompute the hash chain and check every signed head; exit 1 if the log was tampered with, or if no
    signed head covers its last entries (appended outside edgeml, or their heads deleted)."""
    from edgeml.fleet.audit.log import open_audit

    log = open_audit(directory, db_url=db_url, create_key=False)
    if heads is not None:
        log.heads_file = heads
    try:
        report = log.verify()
    finally:
        log.db.close()
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(code=1)


def _tokens_db(directory: Path, db_url: str | None) -> Any:
    from edgeml.fleet.registry.repository import Registry

    return Registry(directory, db_url=db_url).database()


@tokens_app.command("create")
def tokens_create_command(
    directory: Annotated[Path, typer.Argument(help="The registry directory.")],
    name: Annotated[str, typer.Argument(help="A unique name for the token (e.g. who holds it).")],
    role: Annotated[str, typer.Option("--role", help="viewer, operator or admin.")],
    db_url: DbUrl = None,
) -> None:
    """Create an operator token and print it (only this once: it is stored as a hash)."""
    from edgeml.fleet.audit.log import local_actor, open_audit
    from edgeml.fleet.web.auth import Role, create_token

    parsed = Role.parse(role)
    log = open_audit(directory, db_url=db_url)
    try:
        token = create_token(log.db, name, parsed, audit=log, actor=local_actor())
    finally:
        log.db.close()
    typer.echo(token)
    typer.echo(f"created {parsed.label} token {name!r}; it is shown only now (use it as $EDGEML_TOKEN)", err=True)


@tokens_app.command("ls")
def tokens_ls_command(
    directory: Annotated[Path, typer.Argument(help="The registry directory.")],
    db_url: DbUrl = None,
) -> None:
    """List the operator tokens (names and roles; the tokens themselves are not stored)."""
    from edgeml.fleet.web.auth import list_tokens

    db = _tokens_db(directory, db_url)
    try:
        tokens = list_tokens(db)
    finally:
        db.close()
    rows = [("NAME", "ROLE", "CREATED", "REVOKED", "LAST USED")]
    for t in tokens:
        rows.append((t.name, t.role.label, t.created_at.strftime("%Y-%m-%d %H:%M"), "yes" if t.revoked else "no",
                     t.last_used_at.strftime("%Y-%m-%d %H:%M") if t.last_used_at else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


@tokens_app.command("revoke")
def tokens_revoke_command(
    directory: Annotated[Path, typer.Argument(help="The registry directory.")],
    name: Annotated[str, typer.Argument(help="The token's name.")],
    db_url: DbUrl = None,
) -> None:
    """Revoke an operator token: requests with it are refused from now on."""
    from edgeml.fleet.audit.log import local_actor, open_audit
    from edgeml.fleet.web.auth import revoke_token

    log = open_audit(directory, db_url=db_url)
    try:
        revoke_token(log.db, name, audit=log, actor=local_actor())
    finally:
        log.db.close()
    typer.echo(f"revoked token {name!r}")


# --- the fleet simulator (edgeml.fleet.sim.simulator) ---


def register(fleet_app: typer.Typer) -> None:
    """Add ``audit ...`` and ``tokens ...`` to ``edgeml fleet``."""
    fleet_app.add_typer(audit_app)
    fleet_app.add_typer(tokens_app)
