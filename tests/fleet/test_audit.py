"""The audit log on SQLite and on a real PostgreSQL: a hash chain whose heads are signed into the database
and into ``DIR/audit/heads.log``; every kind of tampering is reported at the right seq, concurrent appends
from several processes make one gapless chain, and ``edgeml fleet audit verify`` exits 0 or 1."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeml.errors import ConfigError, MetadataError, RegistryError
from edgeml.fleet.audit.log import ACTIONS, GENESIS, AuditLog, HeadSigner, SignedHead, entry_hash, open_audit, record
from edgeml.fleet.registry.keys import generate
from edgeml.fleet.registry.repository import Registry, init_registry
from tests.conftest import REPO_ROOT, RunCli

ENTRIES = 5
PROCESSES, EACH = 4, 25


@pytest.fixture
def registry(db_url: str, tmp_path: Path) -> Registry:
    return init_registry(tmp_path / "reg", db_url=db_url)


@pytest.fixture
def log(registry: Registry, db_url: str) -> Iterator[AuditLog]:
    audit = open_audit(registry.dir, db_url=db_url)
    yield audit
    audit.db.close()


def _fill(log: AuditLog, n: int = ENTRIES) -> None:
    for i in range(1, n + 1):
        log.append(f"local:user{i}", ACTIONS[i % len(ACTIONS)], f"digits/1.{i}.0", {"i": i, "tags": ["a", "b"]})


def _sql(log: AuditLog, statement: str, **params: Any) -> None:
    with log.db.transaction() as conn:
        conn.execute(log.db.sa.text(statement), params)


def test_appends_make_a_signed_chain(log: AuditLog) -> None:
    _fill(log)
    entries = log.entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert [e.prev_hash for e in entries] == [GENESIS] + [e.hash for e in entries[:-1]]
    assert all(e.hash == entry_hash(e.seq, e.at, e.actor, e.action, e.subject, e.details, e.prev_hash)
               for e in entries)
    assert entries[2].details == {"i": 3, "tags": ["a", "b"]} and entries[2].actor == "local:user3"
    in_db, in_file = log.heads()
    assert [h.seq for h in in_db] == [1, 2, 3, 4, 5] and in_file == in_db
    assert [e.seq for e in log.entries(limit=2)] == [4, 5]
    report = log.verify()
    assert (report.ok, report.entries, report.last_seq, report.heads_checked) == (True, 5, 5, 10)
    assert report.summary() == "ok: 5 entries, last seq 5, 10 signed heads checked"


def test_sign_head_again_and_empty_log(log: AuditLog) -> None:
    assert log.sign_head() is None and log.verify().ok
    _fill(log, 2)
    head = log.sign_head()
    assert head is not None and head.seq == 2 and head.hash == log.entries()[-1].hash
    assert log.verify().heads_checked == 6


def _rechain_from(log: AuditLog, seq: int) -> None:
    """An attacker who edits seq's details and recomputes every hash and link after it (but cannot sign)."""
    _sql(log, "UPDATE audit SET subject = 'evil' WHERE seq = :seq", seq=seq)
    prev = next(e.hash for e in log.entries() if e.seq == seq - 1) if seq > 1 else GENESIS
    for e in log.entries():
        if e.seq >= seq:
            digest = entry_hash(e.seq, e.at, e.actor, e.action, e.subject, e.details, prev)
            _sql(log, "UPDATE audit SET prev_hash = :p, hash = :h WHERE seq = :s", p=prev, h=digest, s=e.seq)
            prev = digest


def _forge_db_head(log: AuditLog, seq: int) -> None:
    forged = HeadSigner(generate()).sign(seq, log.entries()[seq - 1].hash)
    _sql(log, "UPDATE audit_heads SET signature = :sig WHERE seq = :seq", sig=forged.signature, seq=seq)


def _forge_file_head(log: AuditLog, seq: int) -> None:
    assert log.heads_file is not None
    lines = log.heads_file.read_text().splitlines()
    other = HeadSigner(generate()).sign(seq, "f" * 64)
    doc = json.loads(lines[seq - 1]) | {"hash": "f" * 64, "signature": other.signature}
    lines[seq - 1] = json.dumps(doc)
    log.heads_file.write_text("\n".join(lines) + "\n")


def _truncate(log: AuditLog, seq: int) -> None:
    _sql(log, "DELETE FROM audit WHERE seq >= :seq", seq=seq)
    _sql(log, "DELETE FROM audit_heads WHERE seq >= :seq", seq=seq)


def _forge_tail(log: AuditLog, count: int = 1) -> None:
    """Someone with write access to the database alone appends ``count`` rows with raw SQL, each correctly
    chained to the one before (they cannot sign a head)."""
    last = log.entries()[-1]
    seq, prev = last.seq, last.hash
    for _ in range(count):
        seq += 1
        at = dt.datetime.now(dt.timezone.utc)
        details = {"sha256": "ee" * 32}
        digest = entry_hash(seq, at, "local:eve", "publish", "evil/6.6.6", details, prev)
        stored_at: Any = at if log.db.engine.dialect.name != "sqlite" else at.strftime("%Y-%m-%d %H:%M:%S.%f")
        _sql(log, "INSERT INTO audit (seq, at, actor, action, subject, details, prev_hash, hash) VALUES "
                  "(:seq, :at, 'local:eve', 'publish', 'evil/6.6.6', :details, :prev, :hash)",
             seq=seq, at=stored_at, details=json.dumps(details), prev=prev, hash=digest)
        prev = digest


def _delete_heads(log: AuditLog) -> None:
    _sql(log, "DELETE FROM audit_heads")
    assert log.heads_file is not None
    log.heads_file.unlink()


def _delete_heads_and_forge_tail(log: AuditLog) -> None:
    _delete_heads(log)
    _forge_tail(log)


TAMPERING: list[tuple[str, Callable[[AuditLog], None], str, int]] = [
    ("edit details", lambda log: _sql(log, """UPDATE audit SET details = '{"i": 99}' WHERE seq = 3"""), "edit", 3),
    ("edit actor", lambda log: _sql(log, "UPDATE audit SET actor = 'local:eve' WHERE seq = 1"), "edit", 1),
    ("edit and rechain", lambda log: _rechain_from(log, 2), "edit", 2),
    ("delete middle row", lambda log: _sql(log, "DELETE FROM audit WHERE seq = 3"), "deletion", 3),
    ("delete first row", lambda log: _sql(log, "DELETE FROM audit WHERE seq = 1"), "deletion", 1),
    ("delete last rows and their heads", lambda log: _truncate(log, 4), "truncation", 4),
    ("forge a head in the database", lambda log: _forge_db_head(log, 2), "bad-signature", 2),
    ("forge a head in the file", lambda log: _forge_file_head(log, 4), "bad-signature", 4),
    ("append a forged entry at the tail", _forge_tail, "uncovered", 6),
    ("append three forged entries", lambda log: _forge_tail(log, 3), "uncovered", 6),
    ("delete every signed head", _delete_heads, "uncovered", 1),
    ("delete every head and forge a tail", _delete_heads_and_forge_tail, "uncovered", 1),
]


@pytest.mark.parametrize(("tamper", "kind", "seq"), [c[1:] for c in TAMPERING], ids=[c[0] for c in TAMPERING])
def test_tampering_is_reported_with_kind_and_seq(log: AuditLog, tamper: Callable[[AuditLog], None], kind: str,
                                                  seq: int) -> None:
    _fill(log)
    assert log.verify().ok
    tamper(log)
    report = log.verify()
    assert (report.ok, report.kind, report.bad_seq) == (False, kind, seq), report.problems
    assert report.summary().startswith(f"tampered: {kind} at seq {seq}: ")


def test_truncating_the_heads_file_too_goes_unnoticed_only_for_what_it_no_longer_names(log: AuditLog) -> None:
    """Documented limit: the heads file is the anchor; cut it as well and only its remaining lines count."""
    _fill(log)
    _truncate(log, 4)
    assert log.heads_file is not None
    lines = log.heads_file.read_text().splitlines(keepends=True)
    log.heads_file.write_text("".join(lines[:4]))  # still names seq 4
    assert (log.verify().kind, log.verify().bad_seq) == ("truncation", 4)
    log.heads_file.write_text("".join(lines[:3]))
    assert log.verify().ok


def test_a_rolled_back_transaction_leaves_no_entry_and_no_head(log: AuditLog) -> None:
    _fill(log, 1)
    with pytest.raises(RuntimeError), log.transaction() as conn:
        log.append("local:a", "publish", "digits/2.0.0", {}, conn=conn)
        raise RuntimeError("the action failed")
    assert [e.seq for e in log.entries()] == [1]
    assert len(log.heads()[1]) == 1
    log.append("local:a", "publish", "digits/2.0.0")
    assert log.verify().ok and log.verify().last_seq == 2


def test_append_joins_a_transaction_that_already_wrote(registry: Registry) -> None:
    """On SQLite the caller's transaction already holds the write lock; on PostgreSQL the advisory lock."""
    db = registry.database()
    log = open_audit(registry.dir, db=db)
    try:
        with log.transaction() as conn:
            conn.execute(db.tables["models"].insert().values(name="digits"))
            entry = log.append("local:a", "publish", "digits/1.0.0", {"sha256": "ab"}, conn=conn)
        assert entry.seq == 1 and log.verify().ok and len(log.heads()[1]) == 1
        assert [r["name"] for r in db.versions()] == [] and log.db is db
    finally:
        db.close()


@pytest.mark.parametrize(("action", "details", "message"), [
    ("deploy", {}, "unknown audit action 'deploy'"),
    ("publish", {"x": {1, 2}}, "audit details must be JSON"),
    ("publish", {"x": float("nan")}, "audit details must be JSON"),
])
def test_bad_entries_are_refused(log: AuditLog, action: str, details: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        log.append("local:a", action, "s", details)
    assert log.entries() == []


def test_record_and_actor_from_environment(registry: Registry, db_url: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeml.fleet.audit.log import local_actor

    monkeypatch.setenv("EDGEML_ACTOR", "ci:pipeline-7")
    entry = record(registry.dir, local_actor(), "keys.rotate", "root", {"version": 2}, db_url=db_url)
    assert (entry.seq, entry.actor, entry.action) == (1, "ci:pipeline-7", "keys.rotate")
    monkeypatch.delenv("EDGEML_ACTOR")
    assert local_actor().startswith("local:")
    assert (registry.dir / "keys" / "audit.pem").stat().st_mode & 0o777 == 0o600


def test_reading_needs_no_key_but_verifying_entries_does(registry: Registry, db_url: str,
                                                          run_cli: RunCli) -> None:
    env = {"EDGEML_FLEET_DB_URL": db_url}
    fresh = run_cli("fleet", "audit", "verify", registry.dir, env=env)
    assert (fresh.returncode, fresh.stdout) == (0, "ok: 0 entries, last seq 0, 0 signed heads checked\n")
    assert not (registry.dir / "keys" / "audit.pem").exists()  # reading created no key
    record(registry.dir, "local:a", "publish", "digits/1.0.0", db_url=db_url)
    (registry.dir / "keys" / "audit.pem").unlink()
    log = open_audit(registry.dir, db_url=db_url, create_key=False)
    try:
        assert [e.seq for e in log.entries()] == [1]
        with pytest.raises(MetadataError, match="audit key .* is missing"):
            log.verify()
        with pytest.raises(MetadataError, match="audit key .* is missing"):
            log.append("local:a", "publish", "digits/2.0.0")
    finally:
        log.db.close()
    missing = run_cli("fleet", "audit", "verify", registry.dir, env=env)
    assert (missing.returncode, missing.stderr.splitlines()[0]) == (
        2, "error: the audit key (DIR/keys/audit.pem) is missing")


_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from edgeml.fleet.audit.log import open_audit
    reg, url, who, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    log = open_audit(Path(reg), db_url=url)
    while not (Path(reg) / "go").exists():
        time.sleep(0.01)
    for i in range(n):
        log.append(f"local:{who}", "publish", f"m/{who}/{i}", {"i": i})
    log.db.close()
""")


def test_concurrent_appends_from_processes_make_one_gapless_chain(registry: Registry, db_url: str) -> None:
    open_audit(registry.dir, db_url=db_url).db.close()  # the audit key exists before the race
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(registry.dir), db_url, f"w{k}", str(EACH)],
                              stderr=subprocess.PIPE, text=True, env=env) for k in range(PROCESSES)]
    (registry.dir / "go").touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * PROCESSES, errors
    log = open_audit(registry.dir, db_url=db_url)
    try:
        entries = log.entries()
        assert [e.seq for e in entries] == list(range(1, PROCESSES * EACH + 1))
        for k in range(PROCESSES):  # each process's entries are in its own order
            assert [e.details["i"] for e in entries if e.actor == f"local:w{k}"] == list(range(EACH))
        report = log.verify()
        assert (report.ok, report.entries, report.heads_checked) == (True, 100, 200), report.problems
    finally:
        log.db.close()


def test_heads_file_lines_round_trip(log: AuditLog) -> None:
    _fill(log, 1)
    head = log.heads()[0][0]
    assert SignedHead.from_line(head.to_line()) == head
    assert log.signer.check(head)


def test_cli_audit_ls_and_verify(registry: Registry, db_url: str, run_cli: RunCli) -> None:
    env = {"EDGEML_FLEET_DB_URL": db_url, "EDGEML_ACTOR": "ci:test"}
    created = run_cli("fleet", "tokens", "create", registry.dir, "alice", "--role", "operator", env=env)
    assert created.returncode == 0, created.stderr
    run_cli("fleet", "tokens", "revoke", registry.dir, "alice", env=env)
    listed = run_cli("fleet", "audit", "ls", registry.dir, env=env)
    lines = listed.stdout.splitlines()
    assert [line.split()[2:5] for line in lines] == [["ci:test", "token.create", "alice"],
                                                     ["ci:test", "token.revoke", "alice"]]
    ok = run_cli("fleet", "audit", "verify", registry.dir, env=env)
    assert (ok.returncode, ok.stdout) == (0, "ok: 2 entries, last seq 2, 4 signed heads checked\n")
    log = open_audit(registry.dir, db_url=db_url)
    try:
        _sql(log, "UPDATE audit SET subject = 'bob' WHERE seq = 2")
    finally:
        log.db.close()
    bad = run_cli("fleet", "audit", "verify", registry.dir, env=env)
    assert bad.returncode == 1
    assert bad.stdout == "tampered: edit at seq 2: the row's content does not match its hash\n"


def test_fleet_actions_are_audited_with_their_actor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """publish, enroll, revoke and a root key rotation each append one entry, and the chain verifies."""
    from edgeml.bundle_writer import write_bundle
    from edgeml.fleet.devices.broker import write_broker_config
    from edgeml.fleet.devices.enrollment import enroll, revoke
    from tests.fleet.conftest import manifest

    monkeypatch.setenv("EDGEML_ACTOR", "ci:alice")
    reg = init_registry(tmp_path / "reg")
    (tmp_path / "model.onnx").write_bytes(b"weights")
    bundle = tmp_path / "b.edgeml"
    write_bundle(bundle, manifest(), {"model.onnx": tmp_path / "model.onnx"})
    reg.publish(bundle)
    reg.publish(bundle)  # the same file again changes nothing and records nothing
    write_broker_config(tmp_path / "broker", [], hostname="localhost")
    enroll(reg.dir, "cam-1", tmp_path / "broker", tags={"site": "lab"})
    revoke(reg.dir, "cam-1", tmp_path / "broker", actor="token:ops")
    reg.rotate_root(reg.dir / "offline-keys")
    log = open_audit(reg.dir)
    rows = [(e.actor, e.action, e.subject) for e in log.entries()]
    assert rows == [("ci:alice", "publish", "digits/1.0.0/onnx-fp32.edgeml"), ("ci:alice", "device.enroll", "cam-1"),
                    ("token:ops", "device.revoke", "cam-1"), ("ci:alice", "keys.rotate", "root")]
    assert log.verify().ok


def test_a_forged_tail_is_named_with_how_many_entries_and_since_when(log: AuditLog) -> None:
    _fill(log)
    before = dt.datetime.now(dt.timezone.utc)
    _forge_tail(log, 2)
    report = log.verify()
    assert (report.ok, report.kind, report.bad_seq, report.entries, report.last_seq, len(report.problems)) == (
        False, "uncovered", 6, 7, 7, 1)
    match = re.fullmatch(r"tampered: uncovered at seq 6: 2 entries \(seq 6\.\.7, appended since (\S+)\) are "
                         r"covered by no signed head: written outside edgeml \(with write access to the database\), "
                         r"or their heads were deleted", report.summary())
    assert match is not None, report.summary()
    assert before <= dt.datetime.fromisoformat(match.group(1)) <= dt.datetime.now(dt.timezone.utc)


def test_a_log_whose_heads_were_all_deleted_fails(log: AuditLog) -> None:
    _fill(log, 3)
    _delete_heads(log)
    report = log.verify()
    assert (report.kind, report.bad_seq, report.heads_checked) == ("uncovered", 1, 0)
    assert report.summary().startswith("tampered: uncovered at seq 1: the log has 3 entries (seq 1..3, appended "
                                       "since ")
    assert report.summary().endswith(") and no signed head at all, in the database or the heads file: the heads "
                                     "were deleted")


def test_no_head_is_ever_signed_over_a_forged_tail(log: AuditLog) -> None:
    """An honest append or the server's timer must not launder a forged row by signing a head after it."""
    _fill(log)
    _forge_tail(log)
    heads = log.heads()
    refused = r"the audit log's last entry \(seq 6\) is covered by no signed head: it was written outside edgeml"
    with pytest.raises(RegistryError, match=refused):
        log.append("local:a", "publish", "digits/2.0.0")
    with pytest.raises(RegistryError, match=refused):
        log.sign_head()
    assert [e.seq for e in log.entries()] == [1, 2, 3, 4, 5, 6]
    assert log.heads() == heads
    assert (log.verify().kind, log.verify().bad_seq) == ("uncovered", 6)


def test_heads_in_either_place_cover_the_log(log: AuditLog) -> None:
    """The file can lag the database (a crash between the commit and the write): the database's head covers;
    and the file alone still anchors a log whose database heads were deleted."""
    _fill(log, 3)
    assert log.heads_file is not None
    lines = log.heads_file.read_text()
    log.heads_file.unlink()
    assert log.verify().ok
    log.append("local:a", "publish", "digits/2.0.0")
    assert log.verify().ok and log.verify().heads_checked == 5  # 4 in the database, 1 in the new file
    log.heads_file.write_text(lines + log.heads_file.read_text())
    _sql(log, "DELETE FROM audit_heads")
    report = log.verify()
    assert (report.ok, report.heads_checked) == (True, 4)


def test_an_honest_log_verifies_after_every_operation(log: AuditLog) -> None:
    steps: list[Callable[[], object]] = [
        lambda: log.append("local:a", "publish", "digits/1.0.0"),
        lambda: log.sign_head(),
        lambda: log.append("local:a", "rollout.start", "r-1", {"waves": [1, 10, 100]}),
    ]
    for step in steps:
        step()
        assert log.verify().ok, log.verify().summary()
    with log.transaction() as conn:  # an action's own write and its entry, in one transaction
        conn.execute(log.db.tables["models"].insert().values(name="digits"))
        log.append("local:a", "publish", "digits/1.1.0", conn=conn)
    assert log.verify().ok
    with pytest.raises(RuntimeError), log.transaction() as conn:
        log.append("local:a", "publish", "digits/1.2.0", conn=conn)
        raise RuntimeError("the action failed")
    assert log.verify().ok
    with log.db.transaction() as conn:  # joined without transaction(): the file lags until flush_heads
        log.append("local:a", "token.create", "alice", conn=conn)
    assert log.verify().ok
    log.flush_heads()
    report = log.verify()
    assert (report.ok, report.last_seq, report.heads_checked) == (True, 4, 10)


_APPENDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from edgeml.fleet.audit.log import open_audit
    reg, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    log = open_audit(Path(reg), db_url=url)
    while not (Path(reg) / "go").exists():
        time.sleep(0.01)
    for i in range(n):
        log.append("local:w", "publish", f"m/{i}", {"i": i})
        if i % 10 == 0:
            log.sign_head()
    log.db.close()
""")


def test_verify_while_another_process_appends_never_reports_a_problem(registry: Registry, db_url: str) -> None:
    """Verify reads the heads file, then entries and database heads in one snapshot: a concurrent append
    can look neither uncovered nor truncated."""
    log = open_audit(registry.dir, db_url=db_url)
    try:
        log.append("local:a", "publish", "m/first")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        proc = subprocess.Popen([sys.executable, "-c", _APPENDER, str(registry.dir), db_url, "60"],
                                stderr=subprocess.PIPE, text=True, env=env)
        (registry.dir / "go").touch()
        reports = []
        while proc.poll() is None:
            reports.append(log.verify())
        reports.append(log.verify())
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        assert [r.summary() for r in reports if not r.ok] == []
        assert len(reports) > 2 and reports[-1].last_seq == 61
    finally:
        log.db.close()


def test_cli_audit_verify_fails_on_a_forged_tail(registry: Registry, db_url: str, run_cli: RunCli) -> None:
    env = {"EDGEML_FLEET_DB_URL": db_url}
    for i in range(2):
        record(registry.dir, "local:a", "publish", f"digits/1.{i}.0", db_url=db_url)
    log = open_audit(registry.dir, db_url=db_url)
    try:
        _forge_tail(log)
    finally:
        log.db.close()
    bad = run_cli("fleet", "audit", "verify", registry.dir, env=env)
    assert bad.returncode == 1 and bad.stderr == ""
    assert re.fullmatch(r"tampered: uncovered at seq 3: 1 entry \(seq 3, appended since \S+\) is covered by no "
                        r"signed head: written outside edgeml \(with write access to the database\), or their heads "
                        r"were deleted\n", bad.stdout), bad.stdout


def test_cli_audit_verify_against_a_copy_of_the_heads_kept_off_the_server(registry: Registry, db_url: str,
                                                                          run_cli: RunCli, tmp_path: Path) -> None:
    """Whoever rewrites the database and the server's heads.log can cut the log's end unseen; the copy shipped
    elsewhere still names the last seq."""
    env = {"EDGEML_FLEET_DB_URL": db_url}
    for i in range(4):
        record(registry.dir, "local:a", "publish", f"digits/1.{i}.0", db_url=db_url)
    shipped = tmp_path / "vault-heads.log"
    shipped.write_bytes((registry.dir / "audit" / "heads.log").read_bytes())
    log = open_audit(registry.dir, db_url=db_url)
    try:
        _truncate(log, 3)
        assert log.heads_file is not None
        log.heads_file.write_text("".join(log.heads_file.read_text().splitlines(keepends=True)[:2]))
    finally:
        log.db.close()
    local = run_cli("fleet", "audit", "verify", registry.dir, env=env)
    assert (local.returncode, local.stdout) == (0, "ok: 2 entries, last seq 2, 4 signed heads checked\n")
    off = run_cli("fleet", "audit", "verify", registry.dir, "--heads", shipped, env=env)
    assert (off.returncode, off.stdout) == (1, "tampered: truncation at seq 3: the heads file has a signed head at "
                                               "seq 3, the log ends at seq 2\n")
