"""Schema upgrades of the registry database on SQLite and on a real PostgreSQL: a database made with the
first release's schema (no device columns, no version table) is upgraded the first time it is opened, in
one transaction, keeping its rows; opening it again changes nothing."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest

from edgeml.errors import RegistryError
from edgeml.fleet.store import db as fleet_db
from edgeml.fleet.store.db import MIGRATIONS, SCHEMA_VERSION, Database
from edgeml.protocol import Telemetry

sa = pytest.importorskip("sqlalchemy")

NEW_DEVICE_COLUMNS = {"tags", "password_hash", "revoked", "last_seen", "installed", "status", "capabilities"}
ALL_STEPS = [version for version, _, _ in MIGRATIONS]  # what a first-release database runs
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
def url(db_url: str) -> str:
    """SQLite, then PostgreSQL (tests/fleet/conftest.py)."""
    return db_url


def _v1_tables() -> tuple[Any, dict[str, Any]]:
    """The first release's schema (commit 118b9a6), written out here so that it never follows _tables."""
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
            sa.Column("channel", sa.String(64)), sa.Column("created_at", sa.DateTime(timezone=True))),
        "deployments": sa.Table(
            "deployments", meta, sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("device_id", sa.Integer, sa.ForeignKey("devices.id"), nullable=False),
            sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id"), nullable=False),
            sa.Column("state", sa.String(32), nullable=False), sa.Column("updated_at", sa.DateTime(timezone=True))),
    }
    return meta, t


def make_v1_database(url: str) -> None:
    """Create the first release's tables at ``url`` and fill them with one row each (two devices)."""
    meta, t = _v1_tables()
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            meta.create_all(conn)
            model = conn.execute(t["models"].insert().values(name="digits")).inserted_primary_key[0]
            version = conn.execute(t["versions"].insert().values(
                model_id=model, version="1.0.0", target="onnx-fp32", runtime={"name": "onnxruntime"},
                tuf_path="digits/1.0.0/onnx-fp32.edgeml", sha256="ab" * 32, length=1234,
                targets_version=2)).inserted_primary_key[0]
            conn.execute(t["channels"].insert().values(model_id=model, name="stable", version="1.0.0"))
            device = conn.execute(t["devices"].insert().values(device_id="cam-1", channel="stable",
                                                               created_at=T0)).inserted_primary_key[0]
            conn.execute(t["devices"].insert().values(device_id="cam-2", channel=None, created_at=T0))
            conn.execute(t["deployments"].insert().values(device_id=device, version_id=version, state="installed",
                                                          updated_at=T0))
    finally:
        engine.dispose()


def snapshot(url: str) -> dict[str, Any]:
    """Every table's columns and rows (sorted), read with plain SQLAlchemy."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            out: dict[str, Any] = {}
            for name in sorted(inspector.get_table_names()):
                table = sa.Table(name, sa.MetaData(), autoload_with=conn)
                out[name] = ([c.name for c in table.columns],
                             sorted(tuple(str(v) for v in r) for r in conn.execute(sa.select(table))))
            return out
    finally:
        engine.dispose()


def _devices(db: Database) -> list[dict[str, Any]]:
    t = db.tables["devices"]
    with db.transaction() as conn:
        return [dict(r) for r in conn.execute(sa.select(t).order_by(t.c.id)).mappings()]


def test_an_old_database_is_upgraded_when_first_used(url: str) -> None:
    make_v1_database(url)
    before = snapshot(url)
    db = Database(url)
    assert db.schema_version() == 1
    assert [(r["name"], r["version"], r["length"]) for r in db.versions()] == [("digits", "1.0.0", 1234)]
    assert db.schema_version() == SCHEMA_VERSION == ALL_STEPS[-1]

    after = snapshot(url)
    assert set(after["devices"][0]) - set(before["devices"][0]) == NEW_DEVICE_COLUMNS
    assert after["schema_version"] == (["version"], [(str(SCHEMA_VERSION),)])
    for name in ("models", "versions", "channels", "deployments"):
        assert after[name] == before[name]
    devices = _devices(db)
    assert [(d["device_id"], d["channel"], d["revoked"], d["tags"], d["installed"]) for d in devices] == [
        ("cam-1", "stable", False, None, None), ("cam-2", None, False, None, None)]
    assert db.channels() == {("digits", "stable"): "1.0.0"}

    with db.transaction() as conn:  # the new columns take values
        conn.execute(db.tables["devices"].insert().values(device_id="cam-3", tags={"site": "a"}, revoked=True,
                                                          password_hash="x", last_seen=T0, installed={"m": "1"}))
    assert [(d["tags"], d["revoked"]) for d in _devices(db)][2] == ({"site": "a"}, True)
    db.close()


def test_opening_again_is_a_no_op(url: str) -> None:
    make_v1_database(url)
    first = Database(url)
    assert first.upgrade() == ALL_STEPS
    first.close()
    upgraded = snapshot(url)
    for _ in range(2):
        again = Database(url)
        assert again.upgrade() == []
        again.create()  # what `edgeml fleet init` runs: also a no-op now
        again.close()
    assert snapshot(url) == upgraded


def test_a_new_database_starts_at_the_latest_version(url: str) -> None:
    db = Database(url)
    assert db.schema_version() is None
    assert db.upgrade() == []  # nothing to upgrade: create() makes the tables
    db.create()
    assert db.schema_version() == SCHEMA_VERSION
    assert db.upgrade() == []
    assert snapshot(url)["schema_version"] == (["version"], [(str(SCHEMA_VERSION),)])
    db.close()


def test_a_database_with_the_columns_but_no_version_table_is_stamped(url: str) -> None:
    """Databases created between the device columns and the version table: nothing to add, only the stamp."""
    db = Database(url)
    tables = [t for name, t in db.tables.items() if name != "schema_version"]
    db.meta.create_all(db.engine, tables=tables)
    assert db.schema_version() == 1
    assert db.upgrade() == ALL_STEPS
    assert db.schema_version() == SCHEMA_VERSION
    assert set(snapshot(url)["devices"][0]) >= NEW_DEVICE_COLUMNS
    db.close()


def _failing_step(sa_: Any, conn: Any, tables: dict[str, Any]) -> None:
    raise sa_.exc.OperationalError("ALTER TABLE ...", {}, Exception("disk full"))


def test_a_failing_step_leaves_the_database_as_it_was(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make_v1_database(url)
    before = snapshot(url)
    monkeypatch.setattr(fleet_db, "MIGRATIONS", (*fleet_db.MIGRATIONS, (3, "fails", _failing_step)))
    monkeypatch.setattr(fleet_db, "SCHEMA_VERSION", 3)
    db = Database(url)
    with pytest.raises(RegistryError, match="disk full"):
        db.upgrade()
    db.close()
    assert snapshot(url) == before  # step 2's columns were rolled back with the rest


def test_a_database_from_a_newer_edgeml_is_refused(url: str) -> None:
    db = Database(url)
    db.create()
    with db.engine.begin() as conn:
        conn.execute(db.tables["schema_version"].update().values(version=SCHEMA_VERSION + 1))
    fresh = Database(url)
    with pytest.raises(RegistryError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        fresh.versions()
    fresh.close()
    db.close()


def test_concurrent_openers_upgrade_once(url: str) -> None:
    make_v1_database(url)
    results: list[list[int] | Exception] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def open_it() -> None:
        db = Database(url)
        start.wait()
        try:
            applied: list[int] | Exception = db.upgrade()
        except Exception as exc:  # collected and reported by the assertion below
            applied = exc
        finally:
            db.close()
        with lock:
            results.append(applied)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results, key=lambda r: r if isinstance(r, list) else [-1]) == [[], [], [], ALL_STEPS]
    assert snapshot(url)["schema_version"] == (["version"], [(str(SCHEMA_VERSION),)])


# --- schema 6: telemetry at fleet scale, from a schema-5 database with telemetry rows -------------------------


def _v5_telemetry(meta: Any) -> Any:
    """The telemetry table of schemas 3 to 5 (an id, unique (device_id, seq)), written out here."""
    return sa.Table(
        "telemetry", meta, sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("device_id", sa.String(128), nullable=False), sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("sent_at", sa.Float, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False), sa.UniqueConstraint("device_id", "seq"),
        sa.Index("telemetry_device_time", "device_id", "received_at"))


V5_TABLES = {"models", "versions", "channels", "devices", "deployments", "schema_version", "audit", "audit_heads",
             "tokens", "rollouts", "rollout_devices"}


def make_v5_database(url: str, rows: list[dict[str, Any]]) -> None:
    """The tables of schema 5 (as defined now, but telemetry as it was), stamped 5, with ``rows`` of telemetry.
    Columns added after schema 5 are there too: later steps only add what is missing."""
    from edgeml.fleet.store import schema

    meta = sa.MetaData()
    for table in schema.metadata.sorted_tables:
        if table.name in V5_TABLES:
            table.to_metadata(meta)
    telemetry = _v5_telemetry(meta)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            meta.create_all(conn)
            conn.execute(meta.tables["schema_version"].insert().values(version=5))
            conn.execute(telemetry.insert(), rows)
    finally:
        engine.dispose()


def _shape(url: str) -> dict[str, Any]:
    """Each table's columns (name, type, nullable), primary key and index names."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            return {name: (sorted((c["name"], type(c["type"]).__name__, c["nullable"])
                                  for c in inspector.get_columns(name)),
                           inspector.get_pk_constraint(name)["constrained_columns"],
                           sorted(i["name"] for i in inspector.get_indexes(name)))
                    for name in sorted(inspector.get_table_names())}
    finally:
        engine.dispose()


def test_a_schema_5_database_gets_its_telemetry_books_and_rollups(url: str, tmp_path: Any) -> None:
    from tests.fleet.conftest import database_url
    from tests.fleet.telemetry_data import assert_rollups_match, expected, raw_rows, stored_rollups

    at = dt.datetime(2026, 11, 30, 10, 0, 30, tzinfo=dt.timezone.utc)
    metrics = [{"model": "digits", "version": v, "requests": 10, "errors": e, "latency_p99_ms": p,
                "drift": {"score": d}} for v, e, p, d in (("1.0", 0, 4.0, 0.1), ("1.0", 1, 5.0, 0.2),
                                                          ("2.0", 2, 9.0, 0.3))]
    rows = [{"device_id": device, "seq": seq, "sent_at": 1.0 + seq, "metrics": metrics[seq % 3],
             "received_at": at + dt.timedelta(seconds=50 * seq)}
            for device, seqs in (("cam-1", range(8)), ("cam-2", [0, 1, 2, 4, 5]), ("cam-3", [1, 2]))
            for seq in seqs]
    make_v5_database(url, rows)
    db = Database(url)
    assert db.upgrade() == [v for v in ALL_STEPS if v > 5]
    from edgeml.fleet.telemetry.store import TelemetryStore

    store = TelemetryStore(db)
    assert store.contiguous_highs(["cam-1", "cam-2", "cam-3"]) == {"cam-1": 7, "cam-2": 2, "cam-3": None}
    summary = {s["device_id"]: s for s in store.devices_summary()}
    assert {d: (s["telemetry_rows"], s["last_seq"]) for d, s in summary.items()} == {
        "cam-1": (8, 7), "cam-2": (5, 5), "cam-3": (2, 2)}
    stored = raw_rows(db)
    assert sorted((r["device_id"], r["seq"], r["received_at"]) for r in stored) == \
        sorted((r["device_id"], r["seq"], r["received_at"]) for r in rows)
    assert_rollups_match(stored_rollups(db, "telemetry_device_minute"), expected(stored, 60, devices=True))
    assert_rollups_match(stored_rollups(db, "telemetry_version_minute"), expected(stored, 60, devices=False))
    # exactly once goes on from the books: resent rows are dropped, cam-2's gap and cam-3's seq 0 fill
    assert store.insert_batch([Telemetry("cam-2", s, 0.0, {}) for s in (1, 3, 4, 6)] +
                              [Telemetry("cam-3", s, 0.0, {}) for s in (0, 2, 3)]) == 4
    assert store.contiguous_highs(["cam-2", "cam-3"]) == {"cam-2": 6, "cam-3": 3}
    db.close()

    with database_url(url.split(":", 1)[0].split("+")[0], tmp_path / "fresh") as fresh_url:
        (tmp_path / "fresh").mkdir(exist_ok=True)
        fresh = Database(fresh_url)
        fresh.create()
        fresh.close()
        assert _shape(url) == _shape(fresh_url)  # the same schema as a new database's
