"""The registry's metadata database (SQLAlchemy Core): models, versions, channels, devices, deployments.

SQLite at ``DIR/registry.db`` by default; PostgreSQL (or any SQLAlchemy URL) through ``--db-url`` or
``EDGEML_FLEET_DB_URL``. The signed TUF metadata is the source of truth for what devices may install;
the database indexes it for the server (queries, rollouts, dashboard). Publishes write both under the
registry's lock, in one database transaction that commits after the metadata is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgeml._deps import require
from edgeml.errors import RegistryError

__all__ = ["ENV_DB_URL", "Database", "resolve_url"]

ENV_DB_URL = "EDGEML_FLEET_DB_URL"


def resolve_url(registry_dir: Path, url: str | None) -> str:
    """The database URL: ``url``, else ``$EDGEML_FLEET_DB_URL``, else SQLite at ``DIR/registry.db``."""
    return url or os.environ.get(ENV_DB_URL) or f"sqlite:///{registry_dir.resolve() / 'registry.db'}"


def _tables(sa: Any) -> tuple[Any, dict[str, Any]]:
    meta = sa.MetaData()
    t = {
        "models": sa.Table("models", meta, sa.Column("id", sa.Integer, primary_key=True),
                           sa.Column("name", sa.String(64), nullable=False, unique=True)),
        "versions": sa.Table(
            "versions", meta, sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
            sa.Column("version", sa.String(128), nullable=False), sa.Column("target", sa.String(64), nullable=False),
            sa.Column("runtime", sa.JSON, nullable=False), sa.Column("tuf_path", sa.String(512), nullable=False),
            sa.Column("sha256", sa.String(64), nullable=False), sa.Column("length", sa.BigInteger, nullable=False),
            sa.Column("targets_version", sa.Integer, nullable=False),
            sa.Column("published_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
            sa.UniqueConstraint("model_id", "version", "target")),
        "channels": sa.Table(
            "channels", meta, sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
            sa.Column("name", sa.String(64), nullable=False),
            sa.Column("version", sa.String(128), nullable=False), sa.UniqueConstraint("model_id", "name")),
        "devices": sa.Table(
            "devices", meta, sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("device_id", sa.String(128), nullable=False, unique=True),
            sa.Column("channel", sa.String(64)), sa.Column("created_at", sa.DateTime(timezone=True)),
            sa.Column("tags", sa.JSON), sa.Column("password_hash", sa.String(256)),
            sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
            sa.Column("last_seen", sa.DateTime(timezone=True)), sa.Column("installed", sa.JSON)),
        "deployments": sa.Table(
            "deployments", meta, sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("device_id", sa.Integer, sa.ForeignKey("devices.id"), nullable=False),
            sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id"), nullable=False),
            sa.Column("state", sa.String(32), nullable=False), sa.Column("updated_at", sa.DateTime(timezone=True))),
    }
    return meta, t


class Database:
    """The registry database at ``url``.

    Raises:
        MissingExtraError: SQLAlchemy is not installed (``edgeml[fleet]``).
        RegistryError: The database cannot be reached.
    """

    def __init__(self, url: str) -> None:
        self.sa = require("sqlalchemy", "fleet")
        self.url = url
        self.meta, self.tables = _tables(self.sa)
        try:
            self.engine = self.sa.create_engine(url)
        except (self.sa.exc.SQLAlchemyError, ImportError, ValueError) as exc:
            raise RegistryError(f"cannot open the registry database {self._safe_url()}: {exc}") from exc

    def _safe_url(self) -> str:
        return str(self.sa.engine.make_url(self.url).render_as_string(hide_password=True))

    def create(self) -> None:
        """Create the tables (idempotent)."""
        with self._errors():
            self.meta.create_all(self.engine)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except self.sa.exc.SQLAlchemyError as exc:
            raise RegistryError(f"registry database {self._safe_url()} failed: {exc.__class__.__name__}: "
                                f"{str(exc).splitlines()[0]}") from exc

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A connection in a transaction: commits on success, rolls back on any exception."""
        with self._errors(), self.engine.begin() as conn:
            yield conn

    def record_version(self, conn: Any, fields: dict[str, Any], channel: str | None) -> None:
        """Insert one published version (and point ``channel`` at it) inside ``conn``'s transaction."""
        t, sa = self.tables, self.sa
        model_id = conn.execute(sa.select(t["models"].c.id).where(t["models"].c.name == fields["name"])).scalar()
        if model_id is None:
            model_id = conn.execute(t["models"].insert().values(name=fields["name"])).inserted_primary_key[0]
        row = {k: v for k, v in fields.items() if k != "name"}
        conn.execute(t["versions"].insert().values(model_id=model_id, **row))
        if channel:
            where = (t["channels"].c.model_id == model_id) & (t["channels"].c.name == channel)
            if conn.execute(sa.select(t["channels"].c.id).where(where)).scalar() is None:
                conn.execute(t["channels"].insert().values(model_id=model_id, name=channel,
                                                           version=fields["version"]))
            else:
                conn.execute(t["channels"].update().where(where).values(version=fields["version"]))

    def versions(self) -> list[dict[str, Any]]:
        """Every published version, oldest first, with its model name."""
        t, sa = self.tables, self.sa
        query = (sa.select(t["models"].c.name, t["versions"]).join(t["versions"])
                 .order_by(t["versions"].c.targets_version))
        with self._errors(), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def channels(self) -> dict[tuple[str, str], str]:
        """(model, channel) -> version."""
        t, sa = self.tables, self.sa
        query = sa.select(t["models"].c.name, t["channels"].c.name, t["channels"].c.version).join(t["channels"])
        with self._errors(), self.engine.connect() as conn:
            return {(m, c): v for m, c, v in conn.execute(query)}

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()
