"""The registry database's schema: every table as a module-level object, and the one datetime column type.

Queries import the tables from here (``from edgeml.fleet.store import schema`` then ``schema.devices``), so
mypy sees every column a query names. :class:`UTCDateTime` is the only datetime column type: it stores UTC and
gives back timezone-aware UTC datetimes on every backend (SQLite stores naive values). Migrations
(:mod:`.db`) add what an older database lacks, as defined here; append a migration whenever this changes.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from edgeml._deps import require

if TYPE_CHECKING:
    import sqlalchemy as sa
else:
    sa = require("sqlalchemy", "fleet")

__all__ = ["ROLLUP_LATEST", "ROLLUP_MAXES", "ROLLUP_SUMS", "TABLES", "TELEMETRY_DEFAULT_PARTITION", "UTCDateTime",
           "metadata"]


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """``DateTime(timezone=True)`` that binds UTC and reads back aware UTC datetimes (SQLite's come back naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"a naive datetime cannot be stored (say its timezone): {value!r}")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


metadata = sa.MetaData()

models = sa.Table("models", metadata, sa.Column("id", sa.Integer, primary_key=True),
                   sa.Column("name", sa.String(64), nullable=False, unique=True))
versions = sa.Table(
    "versions", metadata, sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
    sa.Column("version", sa.String(128), nullable=False), sa.Column("target", sa.String(64), nullable=False),
    sa.Column("runtime", sa.JSON, nullable=False), sa.Column("tuf_path", sa.String(512), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False), sa.Column("length", sa.BigInteger, nullable=False),
    sa.Column("targets_version", sa.Integer, nullable=False),
    sa.Column("published_at", UTCDateTime(), server_default=sa.func.now()),
    sa.UniqueConstraint("model_id", "version", "target"))
channels = sa.Table(
    "channels", metadata, sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.String(128), nullable=False), sa.UniqueConstraint("model_id", "name"))
devices = sa.Table(
    "devices", metadata, sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("device_id", sa.String(128), nullable=False, unique=True),
    sa.Column("channel", sa.String(64)), sa.Column("created_at", UTCDateTime()),
    sa.Column("tags", sa.JSON), sa.Column("password_hash", sa.String(256)),
    sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("last_seen", UTCDateTime()), sa.Column("installed", sa.JSON),
    sa.Column("status", sa.String(32)), sa.Column("capabilities", sa.JSON))
deployments = sa.Table(
    "deployments", metadata, sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("device_id", sa.Integer, sa.ForeignKey("devices.id"), nullable=False),
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id"), nullable=False),
    sa.Column("state", sa.String(32), nullable=False), sa.Column("updated_at", UTCDateTime()))
schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))
# telemetry as devices sent it: one row per (device, seq). Kept unique by the ingest transaction, which reads
# telemetry_devices (the contiguous high) and telemetry_pending under a lock, not by an index: on PostgreSQL the
# table is partitioned by day of received_at (a unique index would have to include it), and retention drops whole
# partitions. Rows are read by device and time only (the index), so nothing here has to scan the table.
telemetry = sa.Table(
    "telemetry", metadata,
    sa.Column("device_id", sa.String(128), nullable=False), sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("sent_at", sa.Float, nullable=False),
    sa.Column("received_at", UTCDateTime(), nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Index("telemetry_device_time", "device_id", "received_at"),
    postgresql_partition_by="RANGE (received_at)")
#: The partition of ``telemetry`` that takes rows no daily partition covers (PostgreSQL only).
TELEMETRY_DEFAULT_PARTITION = "telemetry_default"


def _default_partition(table: sa.Table, connection: Any, **_: Any) -> None:
    """PostgreSQL: a partitioned table takes no row without a partition; the default one takes any."""
    if connection.dialect.name == "postgresql":
        name = connection.dialect.identifier_preparer.format_table(table)
        connection.exec_driver_sql(f'CREATE TABLE IF NOT EXISTS "{TELEMETRY_DEFAULT_PARTITION}" '
                                   f"PARTITION OF {name} DEFAULT")


sa.event.listen(telemetry, "after_create", _default_partition)
#: PostgreSQL storage of the tables every batch updates in place: room on each page for the new row versions, so
#: that an update that changes no indexed column stays on its page and adds no index entry (a HOT update).
_UPDATED_IN_PLACE = {"fillfactor": 70}
# Per device, kept by the ingest transaction with its rows (retention never touches it): what acknowledgements
# need (the contiguous high, and the seqs stored above a gap in telemetry_pending), running totals that only grow,
# and the latest row's numbers. Reads that would sum or search telemetry read this instead.
telemetry_devices = sa.Table(
    "telemetry_devices", metadata,
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("contiguous_high", sa.BigInteger),  # every seq 0..N stored (None: seq 0 is not)
    sa.Column("pending", sa.Integer, nullable=False, server_default="0"),  # rows in telemetry_pending
    sa.Column("last_seq", sa.BigInteger),  # the highest seq stored
    sa.Column("windows", sa.BigInteger, nullable=False, server_default="0"),  # rows ever stored
    sa.Column("requests", sa.Float, nullable=False, server_default="0"),  # sums of the numeric values ever stored
    sa.Column("errors", sa.Float, nullable=False, server_default="0"),
    sa.Column("first_received_at", UTCDateTime()), sa.Column("last_received_at", UTCDateTime()),
    sa.Column("latest_received_at", UTCDateTime()),  # of the row with last_seq
    sa.Column("latest_metrics", sa.JSON), postgresql_with=_UPDATED_IN_PLACE)
telemetry_pending = sa.Table(
    "telemetry_pending", metadata, sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True))
# Rollups: per minute (written with the rows) and per hour (written by maintenance as hours close), per device
# and per version. The columns are sums and counts so that buckets merge by adding (fleet.telemetry.figures).
# The output shift (shift_*: the agents' ``output_drift`` score, schema 8) is carried like the drift score.
ROLLUP_SUMS = ("windows", "requests", "errors", "p50_sum", "p50_n", "p99_sum", "p99_n", "sp99_sum", "sp99_n",
               "err_sum", "err_n", "drift_sum", "drift_n", "shift_sum", "shift_n")
ROLLUP_MAXES = ("p99_max", "drift_max", "shift_max")
#: Scores whose latest value is kept with its time (``<name>_last``, ``<name>_at``).
ROLLUP_LATEST = ("drift", "shift")


def _rollup_columns() -> list[sa.Column[Any]]:
    counts = {"windows", "p50_n", "p99_n", "sp99_n", "err_n", "drift_n", "shift_n"}
    added = {"shift_sum": "0", "shift_n": "0"}  # columns that migration 8 adds to existing tables
    return [*(sa.Column(name, sa.BigInteger if name in counts else sa.Float, nullable=False,
                        server_default=added.get(name)) for name in ROLLUP_SUMS),
            *(sa.Column(name, sa.Float) for name in ROLLUP_MAXES),
            *(c for name in ROLLUP_LATEST for c in (sa.Column(f"{name}_last", sa.Float),
                                                     sa.Column(f"{name}_at", UTCDateTime())))]


def _device_rollup(name: str, options: dict[str, Any]) -> sa.Table:
    return sa.Table(name, metadata, sa.Column("device_id", sa.String(128), primary_key=True),
                    sa.Column("bucket", UTCDateTime(), primary_key=True),
                    sa.Column("model", sa.String(64), primary_key=True),
                    sa.Column("version", sa.String(128), primary_key=True), *_rollup_columns(),
                    sa.Index(f"{name}_bucket", "bucket"), postgresql_with=options)


def _version_rollup(name: str, options: dict[str, Any]) -> sa.Table:
    return sa.Table(name, metadata, sa.Column("bucket", UTCDateTime(), primary_key=True),
                    sa.Column("model", sa.String(64), primary_key=True),
                    sa.Column("version", sa.String(128), primary_key=True), *_rollup_columns(),
                    postgresql_with=options)


telemetry_device_minute = _device_rollup("telemetry_device_minute", _UPDATED_IN_PLACE)
telemetry_version_minute = _version_rollup("telemetry_version_minute", _UPDATED_IN_PLACE)
telemetry_device_hour = _device_rollup("telemetry_device_hour", {})
telemetry_version_hour = _version_rollup("telemetry_version_hour", {})
# Telemetry maintenance (fleet.telemetry.maintenance): a lease, so that one process at a time rolls up and prunes,
# and how far the hourly rollups have come.
telemetry_jobs = sa.Table(
    "telemetry_jobs", metadata, sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("owner", sa.String(128)), sa.Column("lease_until", UTCDateTime()),
    sa.Column("done_until", UTCDateTime()), sa.Column("last_run_at", UTCDateTime()),
    sa.Column("details", sa.JSON))
# the audit log: a hash chain (hash = sha256 over prev_hash and the row), heads signed by audit_heads
audit = sa.Table(
    "audit", metadata, sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False, unique=True),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("actor", sa.String(128), nullable=False), sa.Column("action", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(512), nullable=False), sa.Column("details", sa.JSON, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False), sa.Column("hash", sa.String(64), nullable=False))
audit_heads = sa.Table(
    "audit_heads", metadata, sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False), sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("signed_at", UTCDateTime(), nullable=False),
    sa.Column("keyid", sa.String(64), nullable=False), sa.Column("signature", sa.String(256), nullable=False))
# operator tokens for the HTTP API and remote CLI (only a hash of each token is stored)
tokens = sa.Table(
    "tokens", metadata, sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("last_used_at", UTCDateTime()))
# staged rollouts (edgeml.fleet.rollouts.store): the whole controller state, so that it survives a restart
rollouts = sa.Table(
    "rollouts", metadata, sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False), sa.Column("model", sa.String(64), nullable=False),
    sa.Column("version", sa.String(128), nullable=False), sa.Column("options", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False), sa.Column("abort_reason", sa.String(1024)),
    sa.Column("current_wave", sa.Integer, nullable=False),
    sa.Column("wave_started_at", UTCDateTime()), sa.Column("broadcast", sa.JSON),
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False))
rollout_devices = sa.Table(
    "rollout_devices", metadata, sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("rollout_id", sa.String(64), sa.ForeignKey("rollouts.id"), nullable=False),
    sa.Column("device_id", sa.String(128), nullable=False), sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("target", sa.String(64)), sa.Column("previous", sa.String(128)),
    sa.Column("command_id", sa.String(64)), sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(1024)), sa.Column("notified_at", UTCDateTime()),
    sa.Column("finished_at", UTCDateTime()), sa.Column("revert_id", sa.String(64)),
    sa.Column("revert_state", sa.String(16)), sa.Column("cause", sa.String(32)),
    sa.Column("transfer", sa.JSON),  # how its bundle came: {"kind": delta|full, "bytes", "full_bytes", "fallback"}
    sa.UniqueConstraint("rollout_id", "device_id"),
    sa.Index("rollout_devices_state", "rollout_id", "state"))

# deltas (edgeml.fleet.registry.deltas): a version's bundle rebuilt from an earlier version's members
deltas = sa.Table(
    "deltas", metadata, sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model", sa.String(64), nullable=False), sa.Column("target", sa.String(64), nullable=False),
    sa.Column("version", sa.String(128), nullable=False), sa.Column("base_version", sa.String(128), nullable=False),
    sa.Column("tuf_path", sa.String(512), nullable=False), sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("length", sa.BigInteger, nullable=False), sa.Column("full_length", sa.BigInteger, nullable=False),
    sa.Column("published_at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("model", "target", "version", "base_version"))

# captures (edgeml.fleet.capture): samples devices uploaded, one row per device and sample; the sample's bytes
# live in a content-addressed file under the registry's captures/ (``path``), shared by rows with one sha256
captures = sa.Table(
    "captures", metadata, sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("device_id", sa.String(63), nullable=False), sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("model", sa.String(64)), sa.Column("version", sa.String(128)), sa.Column("target", sa.String(64)),
    sa.Column("path", sa.String(256), nullable=False), sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("shape", sa.JSON, nullable=False), sa.Column("dtype", sa.String(16), nullable=False),
    sa.Column("confidence", sa.Float), sa.Column("predicted", sa.Integer), sa.Column("drift_score", sa.Float),
    sa.Column("captured_at", UTCDateTime(), nullable=False), sa.Column("received_at", UTCDateTime(), nullable=False),
    sa.Column("reason", sa.String(16), nullable=False), sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("tag", sa.String(64)), sa.Column("upload_id", sa.String(64), nullable=False),
    sa.Column("command_id", sa.String(64)), sa.Column("seq", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("device_id", "sha256"),
    sa.Index("captures_model_version", "model", "version"), sa.Index("captures_device_received", "device_id",
                                                                         "received_at"))

#: name -> table, for migrations and tests.
TABLES: dict[str, sa.Table] = {t.name: t for t in metadata.sorted_tables}
