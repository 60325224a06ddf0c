"""Options shared by the ``edgeml fleet`` command modules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["DbUrl", "RegistryDir"]

DbUrl = Annotated[str | None, typer.Option("--db-url", help="SQLAlchemy URL of the registry database "
                                           "(default: $EDGEML_FLEET_DB_URL, else SQLite in DIR).")]
RegistryDir = Annotated[Path, typer.Argument(help="The registry directory.")]
