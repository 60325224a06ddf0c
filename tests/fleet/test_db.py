"""The registry database on SQLite and on a real PostgreSQL: ten concurrent publishes from separate CLI
processes are all signed and listed, versions strictly increase, and the database agrees with TUF."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tuf.api.metadata import Metadata

from edgeml.fleet.registry.repository import init_registry
from edgeml.fleet.store.db import Database, json_loads
from edgeml.fleet.store.schema import sa
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


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_JSON, st.sampled_from(["", " ", "\n", "\t "]), st.sampled_from(["", " ", "\n", "x", "]", ","]),
       st.booleans())
def test_the_json_columns_read_documents_as_json_loads_does(value: object, before: str, after: str,
                                                            as_bytes: bool) -> None:
    """The JSON columns' reader (a shortcut past json.loads's per-call work) gives what json.loads gives, or
    refuses what it refuses, for any document with any whitespace or junk around it, as text or bytes."""
    text = before + json.dumps(value) + after
    data: str | bytes = text.encode() if as_bytes else text
    try:
        expected = json.loads(text)
    except json.JSONDecodeError:
        with pytest.raises(json.JSONDecodeError):
            json_loads(data)
        return
    got = json_loads(data)
    assert json.dumps(got) == json.dumps(expected)  # NaN != NaN: compare the texts


def test_json_columns_come_back_as_they_were_stored(db_url: str) -> None:
    db = Database(db_url)
    db.create()
    doc = {"site": "b", "nested": {"list": [1, 2.5, None, True, "é ✓"], "deep": [[[]]]}, "n": -3}
    d = db.tables["devices"]
    with db.transaction() as conn:
        conn.execute(d.insert().values(device_id="json-1", revoked=False, tags=doc, installed={}))
        assert conn.execute(sa.select(d.c.tags).where(d.c.device_id == "json-1")).scalar() == doc
    db.close()
