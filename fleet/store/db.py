"""The registry's metadata database (SQLAlchemy Core): models, versions, channels, devices, deployments.

SQLite at ``DIR/registry.db`` by default; PostgreSQL (or any SQLAlchemy URL) through ``--db-url`` or
``EDGEML_FLEET_DB_URL``. The signed TUF metadata is the source of truth for what devices may install;
the database indexes it for the server (queries, rollouts, dashboard). Publishes write both under the
registry's lock, in one database transaction that commits after the metadata is written.

Schema upgrades: the ``schema_version`` table holds the schema's version (one row). A database is
upgraded the first time a :class:`Database` uses it: every step of :data:`MIGRATIONS` above its version
runs, in order, in one transaction (under a lock: ``BEGIN IMMEDIATE`` on SQLite, an advisory lock on
PostgreSQL, so that concurrent openers wait and then find nothing left to do), and the version is
stamped. A database without the table is version 1 (the original schema of the first release); a new one
is created at :data:`SCHEMA_VERSION`. Steps only add what is missing, so a database created by any
release reaches the same schema. A step is appended here whenever :mod:`.schema` changes, never edited.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from edgeml._deps import require
from edgeml.errors import RegistryError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = ["ENV_DB_URL", "MIGRATIONS", "SCHEMA_VERSION", "Database", "as_utc", "is_outage", "resolve_url", "utcnow"]

ENV_DB_URL = "EDGEML_FLEET_DB_URL"
_PG_LOCK_KEY = 0x6564676D6C  # pg_advisory_xact_lock key of schema upgrades ("edgml")


def utcnow() -> dt.datetime:
    """The present, timezone-aware (UTC): what the tables' ``DateTime(timezone=True)`` columns take."""
    return dt.datetime.now(dt.timezone.utc)


@overload
def as_utc(value: dt.datetime) -> dt.datetime: ...


@overload
def as_utc(value: None) -> None: ...


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """A datetime read back from the database, timezone-aware: SQLite returns naive datetimes, which are UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the database is away rather than that it refused the data:
    refused or lost connections, a locked SQLite file, a pool or statement timeout. Worth retrying later; any
    other failure is about what was written (a constraint, a value the column or ``jsonb`` cannot hold)."""
    from sqlalchemy import exc as sa_exc

    outage = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError,
              ConnectionError, TimeoutError)
    seen: BaseException | None = exc
    for _ in range(8):  # RegistryError from a SQLAlchemy error from a driver error
        if seen is None:
            return False
        if isinstance(seen, outage):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def resolve_url(registry_dir: Path, url: str | None) -> str:
    """The database URL: ``url``, else ``$EDGEML_FLEET_DB_URL``, else SQLite at ``DIR/registry.db``."""
    return url or os.environ.get(ENV_DB_URL) or f"sqlite:///{registry_dir.resolve() / 'registry.db'}"


def _add_missing_columns(table: str, names: tuple[str, ...]) -> Callable[[Any, Any, dict[str, Any]], None]:
    """A migration step: ``ALTER TABLE table ADD COLUMN`` for each of ``names`` it lacks, as :mod:`.schema`
    defines it."""

    def step(sa: Any, conn: Connection, tables: dict[str, Any]) -> None:
        present = {c["name"] for c in sa.inspect(conn).get_columns(table)}
        quoted = conn.dialect.identifier_preparer.format_table(tables[table])
        for name in names:
            if name not in present:
                column = sa.schema.CreateColumn(tables[table].c[name]).compile(dialect=conn.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {quoted} ADD COLUMN {column}")

    return step


def _create_missing_tables(*names: str) -> Callable[[Any, Any, dict[str, Any]], None]:
    """A migration step: create each of ``names`` (and its indexes) unless it exists."""

    def step(sa: Any, conn: Connection, tables: dict[str, Any]) -> None:
        for name in names:
            tables[name].create(conn, checkfirst=True)

    return step


def _steps(*steps: Callable[[Any, Any, dict[str, Any]], None]) -> Callable[[Any, Any, dict[str, Any]], None]:
    def run(sa: Any, conn: Connection, tables: dict[str, Any]) -> None:
        for step in steps:
            step(sa, conn, tables)

    return run


def _telemetry_at_scale(sa: Any, conn: Connection, tables: dict[str, Any]) -> None:
    from edgeml.fleet.telemetry.backfill import upgrade_telemetry

    upgrade_telemetry(sa, conn, tables)


#: (version, what changed, step): a database at version N runs every step above N, in order.
MIGRATIONS: tuple[tuple[int, str, Callable[[Any, Any, dict[str, Any]], None]], ...] = (
    (2, "devices: tags, password_hash, revoked, last_seen, installed (enrollment and revocation)",
     _add_missing_columns("devices", ("tags", "password_hash", "revoked", "last_seen", "installed"))),
    (3, "telemetry, audit, audit_heads, tokens; devices: status, capabilities (the fleet server)",
     _steps(_add_missing_columns("devices", ("status", "capabilities")),
            _create_missing_tables("telemetry", "audit", "audit_heads", "tokens"))),
    (4, "rollouts, rollout_devices (staged rollouts)", _create_missing_tables("rollouts", "rollout_devices")),
    (5, "rollout_devices: cause (why a device's update failed, as the agent's Cause)",
     _add_missing_columns("rollout_devices", ("cause",))),
    (6, "telemetry at fleet scale: telemetry without id or unique index (partitioned by day on PostgreSQL), "
        "telemetry_devices and telemetry_pending (books and running totals), minute and hour rollups per device and "
        "per version, telemetry_jobs; the books and minute rollups written from the stored rows",
     _telemetry_at_scale),
    (7, "deltas (bundles rebuilt from an earlier version); rollout_devices: transfer (delta or full, bytes)",
     _steps(_create_missing_tables("deltas"), _add_missing_columns("rollout_devices", ("transfer",)))),
    (8, "telemetry rollups carry the output shift (the agents' output_drift score) as they carry the drift score",
     _steps(*(_add_missing_columns(table, ("shift_sum", "shift_n", "shift_max", "shift_last", "shift_at"))
              for table in ("telemetry_device_minute", "telemetry_version_minute", "telemetry_device_hour",
                            "telemetry_version_hour")))),
    (9, "captures (samples devices uploaded: device, model version, sha256 of a content-addressed file, provenance)",
     _create_missing_tables("captures")),
)
#: The version of the schema ``_tables`` defines.
SCHEMA_VERSION = MIGRATIONS[-1][0]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """SQLite for several fleet processes: write-ahead logging (readers never block the writer, one fsync a
    commit; ``synchronous=FULL`` keeps every commit across a power loss, which the rollout controller's
    "decided, then sent" needs), and a writer waits up to 30 s for another instead of failing at once. WAL needs
    a local filesystem: put a registry shared over NFS on PostgreSQL instead."""
    cursor = dbapi_connection.cursor()
    # the wait first: switching the journal mode takes a lock too (under load it failed at once without it)
    for pragma in ("busy_timeout=30000", "journal_mode=WAL", "synchronous=FULL"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _create_private_file(database: str | None) -> None:
    """Create a SQLite database file readable by its owner only (0600), before SQLite creates it 0644 less the
    umask: it holds device password hashes, token hashes and the audit log. SQLite gives its ``-wal`` and
    ``-shm`` files the database file's mode. An existing file keeps its mode; a path SQLite cannot create is
    left for SQLite to report."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:  # it exists, or its folder does not: SQLite opens it or says why not
        return


_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set by __init__, not in the stubs


def json_loads(data: str | bytes) -> Any:
    """:func:`json.loads` for the JSON columns, less its per-call work (encoding detection, whitespace matching:
    half the cost of a small document, and the dashboard and the scrape read thousands a call). A document with
    whitespace around it, or one that is not JSON, goes to :func:`json.loads`, which reads or refuses it as
    always."""
    text = data if isinstance(data, str) else bytes(data).decode()
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


class Database:
    """The registry database at ``url``.

    Raises:
        MissingExtraError: SQLAlchemy is not installed (``edgeml[fleet]``).
        RegistryError: The database cannot be reached.
    """

    def __init__(self, url: str) -> None:
        self.sa = require("sqlalchemy", "fleet")
        from edgeml.fleet.store import schema

        self.url = url
        self.meta, self.tables = schema.metadata, schema.TABLES
        self._schema_checked = False
        try:
            self.engine = self.sa.create_engine(url, json_deserializer=json_loads)
        except (self.sa.exc.SQLAlchemyError, ImportError, ValueError) as exc:
            raise RegistryError(f"cannot open the registry database {self._safe_url()}: {exc}") from exc
        if self.engine.dialect.name == "sqlite":
            _create_private_file(self.engine.url.database)
            self.sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    def _safe_url(self) -> str:
        return str(self.sa.engine.make_url(self.url).render_as_string(hide_password=True))

    def create(self) -> None:
        """Create the tables, or upgrade older ones, at :data:`SCHEMA_VERSION` (idempotent)."""
        with self._errors(), self.engine.begin() as conn:
            self._lock(conn)
            self._migrate(conn)
            self.meta.create_all(conn)
            self._stamp(conn, SCHEMA_VERSION)
        self._schema_checked = True

    def upgrade(self) -> list[int]:
        """Bring an existing database to :data:`SCHEMA_VERSION`; a new, empty one is left to :meth:`create`.

        Returns:
            The versions of the steps applied (empty when it was up to date).

        Raises:
            RegistryError: The database cannot be read or a step failed (nothing was changed).
        """
        with self._errors():
            with self.engine.connect() as conn:
                if self._version(conn) in (SCHEMA_VERSION, None):
                    self._schema_checked = True
                    return []
            with self.engine.begin() as conn:
                self._lock(conn)
                applied = self._migrate(conn)
                if applied:
                    self._stamp(conn, SCHEMA_VERSION)
        self._schema_checked = True
        return applied

    def schema_version(self) -> int | None:
        """The database's schema version (None: no edgeml tables yet)."""
        with self._errors(), self.engine.connect() as conn:
            return self._version(conn)

    def _version(self, conn: Connection) -> int | None:
        names = set(self.sa.inspect(conn).get_table_names())
        if "schema_version" in names:
            version = conn.execute(self.sa.select(self.sa.func.max(self.tables["schema_version"].c.version))).scalar()
            if version is not None:
                return int(version)
        return 1 if "models" in names else None

    def lock(self, conn: Connection) -> None:
        """Take the lock schema changes take, as the first statement of ``conn``'s transaction (``BEGIN IMMEDIATE``
        on SQLite, a transaction-scoped advisory lock on PostgreSQL): work that must run in one process at a time
        (telemetry maintenance's lease) serializes with migrations and with itself."""
        self._lock(conn)

    def _lock(self, conn: Connection) -> None:
        """Serialize schema changes: the first statement of ``conn``'s transaction."""
        if conn.dialect.name == "sqlite":  # pysqlite begins lazily, and only before DML: begin now, for DDL too
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif conn.dialect.name == "postgresql":
            conn.execute(self.sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})

    def _migrate(self, conn: Connection) -> list[int]:
        """Run the steps above the database's version (read again under the lock); their versions."""
        current = self._version(conn)
        if current is None:
            return []
        if current > SCHEMA_VERSION:
            raise RegistryError(f"the registry database {self._safe_url()} has schema version {current}, newer "
                                f"than this edgeml's {SCHEMA_VERSION}", hint="upgrade edgeml on this server")
        applied = []
        for version, _what, step in MIGRATIONS:
            if version > current:
                step(self.sa, conn, self.tables)
                applied.append(version)
        return applied

    def _stamp(self, conn: Connection, version: int) -> None:
        table = self.tables["schema_version"]
        table.create(conn, checkfirst=True)
        conn.execute(table.delete())
        conn.execute(table.insert().values(version=version))

    def _ensure_schema(self) -> None:
        if not self._schema_checked:
            self.upgrade()

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
        self._ensure_schema()
        with self._errors(), self.engine.begin() as conn:
            yield conn

    def record_version(self, conn: Connection, fields: dict[str, Any], channel: str | None) -> None:
        """Insert one published version (and point ``channel`` at it) inside ``conn``'s transaction."""
        t, sa = self.tables, self.sa
        model_id = conn.execute(sa.select(t["models"].c.id).where(t["models"].c.name == fields["name"])).scalar()
        if model_id is None:
            inserted = conn.execute(t["models"].insert().values(name=fields["name"])).inserted_primary_key
            assert inserted is not None, "an INSERT returns its primary key"
            model_id = inserted[0]
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
        self._ensure_schema()
        with self._errors(), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def channels(self) -> dict[tuple[str, str], str]:
        """(model, channel) -> version."""
        t, sa = self.tables, self.sa
        query = sa.select(t["models"].c.name, t["channels"].c.name, t["channels"].c.version).join(t["channels"])
        self._ensure_schema()
        with self._errors(), self.engine.connect() as conn:
            return {(m, c): v for m, c, v in conn.execute(query)}

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()
