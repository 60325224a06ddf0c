"""Operator tokens on SQLite and on a real PostgreSQL: created once and stored as a hash, refused when
missing, unknown or revoked (401) or when the role is too low (403), through a real HTTP listener; the remote
CLI's token from a file only its owner reads, or from the environment."""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeml.errors import ConfigError, RegistryError
from edgeml.fleet.audit.log import AuditLog, open_audit
from edgeml.fleet.registry.repository import init_registry
from edgeml.fleet.web.auth import (
    AuthError,
    ForbiddenError,
    Principal,
    Role,
    authenticate,
    bearer_token,
    create_token,
    list_tokens,
    operator_token,
    read_secret,
    require,
    revoke_token,
)
from edgeml.fleet.web.routes import ApiCall, api_route
from edgeml.fleet.web.server import HttpServer, build_app
from tests.conftest import RunCli


@pytest.fixture
def log(db_url: str, tmp_path: Path) -> Iterator[AuditLog]:
    registry = init_registry(tmp_path / "reg", db_url=db_url)
    audit = open_audit(registry.dir, db_url=db_url)
    yield audit
    audit.db.close()


def test_create_authenticate_revoke(log: AuditLog) -> None:
    db = log.db
    token = create_token(db, "alice", "operator", audit=log, actor="local:root")
    assert token.startswith("edgeml_") and len(token) == len("edgeml_") + 43
    with db.transaction() as conn:
        stored = conn.execute(db.sa.text("SELECT token_hash FROM tokens WHERE name = 'alice'")).scalar()
    assert stored == hashlib.sha256(token.encode()).hexdigest()  # only the hash is stored
    assert list_tokens(db)[0].last_used_at is None
    assert authenticate(db, token) == Principal("alice", Role.OPERATOR)
    [record] = list_tokens(db)
    assert (record.name, record.role, record.revoked, record.last_used_at is not None) == (
        "alice", Role.OPERATOR, False, True)
    revoke_token(db, "alice", audit=log, actor="local:root")
    with pytest.raises(AuthError, match="'alice' is revoked"):
        authenticate(db, token)
    assert [(e.actor, e.action, e.subject, e.details) for e in log.entries()] == [
        ("local:root", "token.create", "alice", {"role": "operator"}),
        ("local:root", "token.revoke", "alice", {})]
    assert log.verify().ok


def test_using_a_token_writes_the_database_at_most_once_a_minute(log: AuditLog) -> None:
    """A dashboard refresh is 8 authenticated calls every 5 s per open tab: none of them may write."""
    db = log.db
    token = create_token(db, "viewer", "viewer", audit=log, actor="local:root")
    statements: list[str] = []
    db.sa.event.listen(db.engine, "before_cursor_execute",
                       lambda conn, cursor, statement, *args: statements.append(statement))
    for _ in range(16):
        authenticate(db, token)
    writes = [s for s in statements if s.lstrip().upper().startswith("UPDATE")]
    assert len(writes) == 1  # the first use is recorded
    with db.transaction() as conn:  # a minute later the next use is recorded again
        conn.execute(db.tables["tokens"].update().values(last_used_at=db.sa.func.datetime("now", "-2 minutes")
                                                         if conn.dialect.name == "sqlite" else
                                                         db.sa.text("now() - interval '2 minutes'")))
    statements.clear()
    authenticate(db, token)
    authenticate(db, token)
    assert len([s for s in statements if s.lstrip().upper().startswith("UPDATE")]) == 1


@pytest.mark.parametrize(("name", "role", "error", "message"), [
    ("bad name!", "viewer", ConfigError, "bad token name"),
    ("", "viewer", ConfigError, "bad token name"),
    ("bob", "root", ConfigError, "unknown role 'root'"),
    ("taken", "admin", RegistryError, "a token named 'taken' exists"),
])
def test_bad_tokens_are_refused(log: AuditLog, name: str, role: str, error: type[Exception], message: str) -> None:
    create_token(log.db, "taken", Role.VIEWER)
    with pytest.raises(error, match=message):
        create_token(log.db, name, role)
    assert [t.name for t in list_tokens(log.db)] == ["taken"]


def test_revoking_an_unknown_token(log: AuditLog) -> None:
    with pytest.raises(RegistryError, match="no token named 'ghost'"):
        revoke_token(log.db, "ghost", audit=log, actor="local:root")
    assert log.entries() == []


@pytest.mark.parametrize(("have", "need", "allowed"), [
    (Role.VIEWER, Role.VIEWER, True), (Role.VIEWER, Role.OPERATOR, False), (Role.OPERATOR, Role.OPERATOR, True),
    (Role.OPERATOR, Role.ADMIN, False), (Role.ADMIN, Role.OPERATOR, True), (Role.ADMIN, Role.ADMIN, True),
])
def test_roles_are_ordered(have: Role, need: Role, allowed: bool) -> None:
    if allowed:
        require(Principal("p", have), need)
    else:
        with pytest.raises(ForbiddenError, match=f"is a {have.label}; this needs {need.label}"):
            require(Principal("p", have), need)


@pytest.mark.parametrize(("headers", "token"), [
    ({"authorization": "Bearer abc"}, "abc"), ({"authorization": "bearer  abc "}, "abc"),
    ({"authorization": "Basic abc"}, None), ({"authorization": "Bearer"}, None), ({}, None),
])
def test_bearer_token(headers: dict[str, str], token: str | None) -> None:
    assert bearer_token(headers) == token


def test_the_operator_token_comes_from_a_file_or_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    monkeypatch.delenv("EDGEML_TOKEN", raising=False)
    with pytest.raises(AuthError, match="no operator token") as missing:
        operator_token()
    assert "--token-file" in str(missing.value)
    monkeypatch.setenv("EDGEML_TOKEN", "t2")
    assert operator_token() == "t2"
    token_file = tmp_path / "token"
    token_file.write_text("t1\n")
    token_file.chmod(0o600)
    assert operator_token(token_file) == "t1"  # the file wins over the environment


@pytest.mark.parametrize(("content", "mode", "message"), [
    ("secret\n", 0o644, "others may read or change it (mode 644)"),
    ("secret\n", 0o620, "others may read or change it (mode 620)"),
    ("\n\n", 0o600, "is empty"),
    (None, 0o600, "cannot read the operator token"),
    ("dir", 0o700, "is not a regular file"),
])
def test_a_secret_file_must_be_the_owners_alone(tmp_path: Path, content: str | None, mode: int,
                                                message: str) -> None:
    path = tmp_path / "token"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    if path.exists():
        os.chmod(path, mode)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_secret(path, "operator token")


def test_a_secret_is_the_first_line_of_its_file(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text("  s3cret \nignored\n")
    path.chmod(0o400)
    assert read_secret(path, "broker password") == "s3cret"


@dataclass(frozen=True)
class Api:
    url: str
    tokens: dict[str, str]


@pytest.fixture
def api(log: AuditLog) -> Iterator[Api]:
    """A real HTTP listener: GET /api/status for viewers, POST /api/rollouts/NAME/abort for operators."""
    tokens = {role.label: create_token(log.db, role.label, role) for role in Role}
    tokens["revoked"] = create_token(log.db, "former", Role.ADMIN)
    revoke_token(log.db, "former")

    def status(call: ApiCall) -> dict[str, str]:
        assert call.principal is not None
        return {"you": call.principal.name}

    def abort(call: ApiCall) -> dict[str, str]:
        log.append(call.actor, "rollout.abort", call.params["name"], {})
        return {"aborted": call.params["name"]}

    app = build_app([api_route("/api/status", status, db=log.db, role=Role.VIEWER),
                     api_route("/api/rollouts/{name}/abort", abort, methods=["POST"], body=True, db=log.db,
                               role=Role.OPERATOR)])
    with HttpServer(app, "127.0.0.1", 0) as server:
        yield Api(server.url, tokens)


def _call(api: Api, method: str, path: str, authorization: str | None) -> tuple[int, dict[str, object], str | None]:
    request = urllib.request.Request(api.url + path, method=method, data=b"" if method == "POST" else None)
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), response.headers.get("WWW-Authenticate")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers.get("WWW-Authenticate")


ABORT = "/api/rollouts/r1/abort"
NO_TOKEN_HINT = "send 'Authorization: Bearer <token>' (edgeml fleet tokens create)"
CASES = [  # (who, method, path, status, error message or None)
    ("none", "POST", ABORT, 401, "no operator token"),
    ("wrong", "POST", ABORT, 401, "unknown operator token"),
    ("basic", "POST", ABORT, 401, "no operator token"),
    ("revoked", "POST", ABORT, 401, "operator token 'former' is revoked"),
    ("viewer", "POST", ABORT, 403, "token 'viewer' is a viewer; this needs operator"),
    ("operator", "POST", ABORT, 200, None),
    ("admin", "POST", ABORT, 200, None),
    ("none", "GET", "/api/status", 401, "no operator token"),
    ("viewer", "GET", "/api/status", 200, None),
]


def _authorization(api: Api, who: str) -> str | None:
    if who == "none":
        return None
    if who == "wrong":
        return "Bearer edgeml_" + "x" * 43
    if who == "basic":
        return "Basic dXNlcjpwYXNz"
    return f"Bearer {api.tokens[who]}"


@pytest.mark.parametrize(("who", "method", "path", "status", "error"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_http_routes_need_a_token_of_the_right_role(api: Api, log: AuditLog, who: str, method: str, path: str,
                                                    status: int, error: str | None) -> None:
    code, body, challenge = _call(api, method, path, _authorization(api, who))
    assert code == status
    if error is not None:
        hint = NO_TOKEN_HINT if error == "no operator token" else None
        assert body == {"error": error, "hint": hint, "status": status}
        assert challenge == ('Bearer realm="edgeml"' if status == 401 else None)
    aborted = [(e.actor, e.subject) for e in log.entries() if e.action == "rollout.abort"]
    assert aborted == ([(f"token:{who}", "r1")] if path == ABORT and status == 200 else [])


def test_cli_tokens_create_ls_revoke(log: AuditLog, db_url: str, run_cli: RunCli) -> None:
    assert log.heads_file is not None
    registry_dir = log.heads_file.parent.parent  # DIR/audit/heads.log
    env = {"EDGEML_FLEET_DB_URL": db_url}
    created = run_cli("fleet", "tokens", "create", registry_dir, "ops-1", "--role", "operator", env=env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert "shown only now" in created.stderr
    assert authenticate(log.db, token) == Principal("ops-1", Role.OPERATOR)
    listed = run_cli("fleet", "tokens", "ls", registry_dir, env=env)
    assert [line.split()[:2] for line in listed.stdout.splitlines()] == [["NAME", "ROLE"], ["ops-1", "operator"]]
    assert token not in listed.stdout
    again = run_cli("fleet", "tokens", "create", registry_dir, "ops-1", "--role", "admin", env=env)
    assert (again.returncode, again.stderr.splitlines()[0]) == (2, "error: a token named 'ops-1' exists")
    bad_role = run_cli("fleet", "tokens", "create", registry_dir, "x", "--role", "root", env=env)
    assert (bad_role.returncode, bad_role.stderr.splitlines()[0]) == (2, "error: unknown role 'root'")
    assert run_cli("fleet", "tokens", "revoke", registry_dir, "ops-1", env=env).returncode == 0
    with pytest.raises(AuthError, match="revoked"):
        authenticate(log.db, token)
    verify = run_cli("fleet", "audit", "verify", registry_dir, env=env)
    assert (verify.returncode, verify.stdout) == (0, "ok: 2 entries, last seq 2, 4 signed heads checked\n")
