"""Operator tokens on SQLite and on a real PostgreSQL: created once and stored as a hash, refused when
missing, unknown or revoked (401) or when the role is too low (403), through a real HttpServer."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeml.errors import ConfigError, RegistryError
from edgeml.fleet.audit import AuditLog, open_audit
from edgeml.fleet.auth import (
    AuthError,
    ForbiddenError,
    Principal,
    Role,
    authenticate,
    authorized,
    bearer_token,
    create_token,
    list_tokens,
    remote_headers,
    require,
    revoke_token,
)
from edgeml.fleet.http_server import HttpServer, Request, Response
from edgeml.fleet.registry import init_registry
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


def test_remote_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEML_TOKEN", raising=False)
    with pytest.raises(AuthError, match="no operator token"):
        remote_headers()
    assert remote_headers("t1") == {"Authorization": "Bearer t1"}
    monkeypatch.setenv("EDGEML_TOKEN", "t2")
    assert remote_headers() == {"Authorization": "Bearer t2"}


@dataclass(frozen=True)
class Api:
    url: str
    tokens: dict[str, str]


@pytest.fixture
def api(log: AuditLog) -> Iterator[Api]:
    """A real HttpServer: GET /api/status for viewers, POST /api/rollouts/NAME/abort for operators."""
    tokens = {role.label: create_token(log.db, role.label, role) for role in Role}
    tokens["revoked"] = create_token(log.db, "former", Role.ADMIN)
    revoke_token(log.db, "former")

    def status(request: Request, principal: Principal) -> Response:
        return Response.json({"you": principal.name})

    def abort(request: Request, principal: Principal) -> Response:
        log.append(principal.actor, "rollout.abort", request.params["name"], {})
        return Response.json({"aborted": request.params["name"]})

    server = HttpServer("127.0.0.1", 0)
    server.add_route("GET", "/api/status", authorized(log.db, Role.VIEWER)(status))
    server.add_route("POST", r"/api/rollouts/(?P<name>[^/]+)/abort", authorized(log.db, Role.OPERATOR)(abort))
    with server:
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
        assert body == {"error": error, "status": status}
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
