"""The registry database on SQLite and on a real PostgreSQL: ten concurrent publishes from separate CLI
processes are all signed and listed, versions strictly increase, and the database agrees with TUF."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata

from edgeml.fleet.registry.repository import init_registry
from edgeml.fleet.store.db import Database
from tests.fleet.conftest import MakeBundle

PUBLISHERS = 10





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


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_the_sqlite_database_and_its_wal_files_are_created_readable_by_their_owner_only(
        tmp_path: Path, umask: int) -> None:
    """The database holds device password hashes, token hashes and the audit log: 0600 whatever the umask,
    and SQLite gives ``-wal`` and ``-shm`` the database file's mode."""
    previous = os.umask(umask)
    try:
        registry = init_registry(tmp_path / "reg")
        db = registry.database()
        try:
            with db.transaction() as conn:
                conn.execute(db.tables["models"].insert().values(name="digits"))
                files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in registry.dir.glob("registry.db*")}
        finally:
            db.close()
        Database(f"sqlite:///{tmp_path / 'other.db'}").close()  # created on open, before SQLite connects
    finally:
        os.umask(previous)
    assert files == {"registry.db": 0o600, "registry.db-wal": 0o600, "registry.db-shm": 0o600}
    assert stat.S_IMODE((tmp_path / "other.db").stat().st_mode) == 0o600
