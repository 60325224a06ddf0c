"""Options shared by the ``edgeml fleet`` command modules.

Secrets (operator tokens, the broker password) are never option values: every local user can read a
process's arguments. They come from the environment or from a file only their owner can read
(:func:`~edgeml.fleet.web.auth.read_secret`). The old ``--token`` and ``--password`` options are kept, hidden,
only to say so (:func:`refuse_secret_argument`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["DbUrl", "Insecure", "RegistryDir", "RemovedPassword", "RemovedToken", "TokenFile",
           "refuse_secret_argument"]

DbUrl = Annotated[str | None, typer.Option("--db-url", help="SQLAlchemy URL of the registry database "
                                           "(default: $EDGEML_FLEET_DB_URL, else SQLite in DIR).")]
RegistryDir = Annotated[Path, typer.Argument(help="The registry directory.")]
TokenFile = Annotated[Path | None, typer.Option("--token-file", help="A file (mode 0600) holding the operator "
                                                "token for a fleet server's URL (default: $EDGEML_TOKEN).")]
Insecure = Annotated[bool, typer.Option("--insecure", help="Allow plain http:// to a fleet server on another "
                                        "host: the token then crosses the network readable by anyone on the way.")]
RemovedToken = Annotated[str | None, typer.Option("--token", hidden=True, help="Removed: use $EDGEML_TOKEN or "
                                                  "--token-file.")]
RemovedPassword = Annotated[str | None, typer.Option("--password", hidden=True, help="Removed: use "
                                                     "$EDGEML_BROKER_PASSWORD or --password-file.")]


def refuse_secret_argument(option: str, given: str | None, instead: str) -> None:
    """Refuse a secret given as a command-line argument (the value is not repeated).

    Args:
        option: The option, e.g. ``"--token"``.
        given: Its value (None: not given).
        instead: Where the secret goes now, e.g. ``"$EDGEML_TOKEN or --token-file FILE"``.

    Raises:
        ConfigError: ``given`` is not None.
    """
    from edgeml.errors import ConfigError

    if given is not None:
        raise ConfigError(f"{option} is no longer accepted: a secret on the command line is visible to every "
                          f"local user (ps, /proc)", hint=f"use {instead} instead, and replace the exposed secret")
