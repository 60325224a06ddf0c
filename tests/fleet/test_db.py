"""The registry database on SQLite and on a real PostgreSQL: ten concurrent publishes from separate CLI
processes are all signed and listed, versions strictly increase, and the database agrees with TUF."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata

from edgeml.fleet.registry import init_registry
from tests.conftest import require_service
from tests.fleet.conftest import MakeBundle

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PUBLISHERS = 10


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL: SQLite in tmp_path, or a fresh schema on the local PostgreSQL (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    sqlalchemy = pytest.importorskip("sqlalchemy")
    schema = f"edgeml_test_{uuid.uuid4().hex[:12]}"
    try:
        engine = sqlalchemy.create_engine(POSTGRES)
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    except sqlalchemy.exc.OperationalError as exc:
        require_service("postgresql", False, f"{POSTGRES} unreachable: {str(exc).splitlines()[0]}")
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def test_concurrent_cli_publishes_are_all_signed_and_recorded(db_url: str, tmp_path: Path,
                                                               make_bundle: MakeBundle) -> None:
    registry = init_registry(tmp_path / "reg", db_url=db_url)
    bundles = [make_bundle(f"1.{i}.0", payload=f"build {i}".encode()) for i in range(PUBLISHERS)]
    env = {**os.environ, "EDGEML_FLEET_DB_URL": db_url}
    procs = [subprocess.Popen([sys.executable, "-m", "edgeml.cli", "fleet", "publish", str(registry.dir), str(b)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for b in bundles]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * PUBLISHERS, [err for _, err in results]

    meta = registry.metadata_dir
    listed = [len(Metadata.from_file(str(meta / f"{v}.targets.json")).signed.targets) for v in range(1, 12)]
    assert listed == list(range(PUBLISHERS + 1))  # every version added exactly one target
    snapshots = [Metadata.from_file(str(meta / f"{v}.snapshot.json")).signed for v in range(1, 12)]
    assert [s.meta["targets.json"].version for s in snapshots] == list(range(1, 12))
    assert Metadata.from_file(str(meta / "timestamp.json")).signed.snapshot_meta.version == 11

    targets = Metadata.from_file(str(meta / "targets.json")).signed.targets
    rows = registry.database().versions()
    assert sorted(r["targets_version"] for r in rows) == list(range(2, 12))
    assert {r["tuf_path"]: r["sha256"] for r in rows} == {p: t.hashes["sha256"] for p, t in targets.items()}
    assert {(r["name"], r["version"], r["target"]) for r in rows} == {
        ("digits", f"1.{i}.0", "onnx-fp32") for i in range(PUBLISHERS)}
    channel = registry.database().channels()[("digits", "stable")]
    last = max(rows, key=lambda r: r["targets_version"])
    assert channel == last["version"]
