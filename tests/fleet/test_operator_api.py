"""The operator's CLI against a remote fleet server: the same commands, a URL instead of a directory, a token.

A real HTTP server with the fleet's routes runs in this process; the CLI runs as a real subprocess. The token
comes from ``$EDGEML_TOKEN`` or ``--token-file``, never from an argument.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeml.edge_agent.capabilities import detect
from edgeml.fleet.audit.log import open_audit
from edgeml.fleet.operator_api import telemetry_routes
from edgeml.fleet.registry.repository import Registry
from edgeml.fleet.rollouts.store import rollout_routes, rollout_status
from edgeml.fleet.telemetry.store import TelemetryStore
from edgeml.fleet.web.auth import create_token
from edgeml.fleet.web.routes import repository_routes
from edgeml.fleet.web.server import HttpServer, build_app
from edgeml.protocol import Telemetry
from tests.conftest import RunCli
from tests.fleet.conftest import MakeBundle


@dataclass
class Remote:
    registry: Registry
    http: HttpServer
    db: Any
    audit: Any
    tokens: dict[str, str]


@pytest.fixture
def remote(registry: Registry, make_bundle: MakeBundle) -> Iterator[Remote]:
    registry.publish(make_bundle("1.0.0"))
    registry.publish(make_bundle("2.0.0"))
    db = registry.database()
    audit = open_audit(registry.dir, db=db)
    caps = detect().to_dict()
    with db.transaction() as conn:
        conn.execute(db.tables["devices"].insert(), [
            {"device_id": f"cam-{i}", "tags": {"site": "lab"}, "revoked": False, "status": "serving",
             "capabilities": caps, "installed": {"digits": "1.0.0"}} for i in range(3)])
    TelemetryStore(db).insert_batch([Telemetry(device_id="cam-0", seq=s, sent_at=100.0 + s, metrics={
        "version": "1.0.0", "requests": 10 * s, "errors": s, "latency_p50_ms": 1.5, "latency_p99_ms": 4.25,
        "drift": {"score": 0.5, "flagged": True} if s == 2 else None}) for s in range(3)])
    tokens = {role: create_token(db, f"{role}-1", role, audit=audit, actor="local:test")
              for role in ("viewer", "operator")}
    http = HttpServer(build_app([*rollout_routes(db, audit), *telemetry_routes(db), *repository_routes(registry.dir)]),
                      "127.0.0.1", 0)
    http.start()
    try:
        yield Remote(registry, http, db, audit, tokens)
    finally:
        http.stop()
        db.close()


def token_file(tmp_path: Path, token: str) -> Path:
    """``token`` in a file only its owner reads."""
    path = tmp_path / f"token-{token[-6:]}"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def test_rollouts_through_the_remote_api_are_audited_under_the_token(remote: Remote, run_cli: RunCli,
                                                                     tmp_path: Path) -> None:
    url, operator = remote.http.url, {"EDGEML_TOKEN": remote.tokens["operator"]}
    started = run_cli("fleet", "rollout", "start", url, "digits:2.0.0", "--targets", "onnx-fp32", "--canary", "34%",
                      "--waves", "100%", "--min-devices", "1", "--id", "ro-remote", env=operator)
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "rollout ro-remote: digits 2.0.0, canary 2 devices, then waves of 1"

    shown = run_cli("fleet", "rollout", "status", url, "ro-remote", env={"EDGEML_TOKEN": remote.tokens["viewer"]})
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[:3] == ["ro-remote  rollout  digits:2.0.0  pending",
                                             "  canary: pending 2", "  wave 1: pending 1"]

    refused = run_cli("fleet", "rollout", "abort", url, "ro-remote", "--token-file",
                      token_file(tmp_path, remote.tokens["viewer"]), env=operator)  # the file wins
    assert refused.returncode != 0 and "this needs operator" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    aborted = run_cli("fleet", "rollout", "abort", url, "ro-remote", "--reason", "testing", "--token-file",
                      token_file(tmp_path, remote.tokens["operator"]), env={"EDGEML_TOKEN": ""})
    assert aborted.returncode == 0 and aborted.stdout.strip() == "rollout ro-remote: aborted", aborted.stderr
    again = run_cli("fleet", "rollout", "abort", url, "ro-remote", env=operator)
    assert again.returncode != 0 and "rollout ro-remote is already aborted" in again.stderr
    unknown = run_cli("fleet", "rollout", "status", url, "ro-nope", env=operator)
    assert unknown.returncode != 0 and "unknown rollout 'ro-nope'" in unknown.stderr
    back = run_cli("fleet", "rollback", url, "digits", "--to", "1.0.0", "--select", "site=lab", "--probation", "1m",
                   env=operator)
    assert back.returncode == 0, back.stderr

    assert rollout_status(remote.db, "ro-remote")[0].state == "aborted"
    rollback = next(s for s in rollout_status(remote.db) if s.kind == "rollback")
    assert rollback.options["probation_s"] == 60.0 and len(rollback.devices) == 3
    assert [(e.actor, e.action) for e in remote.audit.entries()][-3:] == [
        ("token:operator-1", "rollout.start"), ("token:operator-1", "rollout.abort"), ("token:operator-1", "rollback")]


@pytest.mark.parametrize(("args", "env", "message"), [
    ([], {"EDGEML_TOKEN": "not-a-token"}, "unknown operator token"),
    ([], {"EDGEML_TOKEN": ""}, "no operator token for the remote fleet server"),
    (["--token", "edgeml_on-the-command-line"], {"EDGEML_TOKEN": ""}, "--token is no longer accepted"),
])
def test_a_remote_call_without_a_good_token_is_refused(remote: Remote, run_cli: RunCli, args: list[str],
                                                       env: dict[str, str], message: str) -> None:
    result = run_cli("fleet", "rollout", "status", remote.http.url, *args, env=env)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert "on-the-command-line" not in result.stderr


def test_a_token_file_that_others_can_read_is_refused(remote: Remote, run_cli: RunCli, tmp_path: Path) -> None:
    loose = token_file(tmp_path, remote.tokens["viewer"])
    loose.chmod(0o644)
    result = run_cli("fleet", "rollout", "status", remote.http.url, "--token-file", loose, env={"EDGEML_TOKEN": ""})
    assert result.returncode == 2 and f"chmod 600 {loose}" in result.stderr
    assert remote.tokens["viewer"] not in result.stderr


def test_an_unreachable_server_is_one_clear_line(run_cli: RunCli) -> None:
    result = run_cli("fleet", "rollout", "status", "http://127.0.0.1:9", env={"EDGEML_TOKEN": "t"})
    assert result.returncode != 0 and "cannot reach the fleet server at http://127.0.0.1:9" in result.stderr


@pytest.mark.parametrize("where", ["local", "remote"])
def test_telemetry_of_a_device_locally_and_remotely(remote: Remote, run_cli: RunCli, where: str) -> None:
    target = str(remote.registry.dir) if where == "local" else remote.http.url
    viewer = {"EDGEML_TOKEN": remote.tokens["viewer"]}
    table = run_cli("fleet", "telemetry", target, "cam-0", env=viewer)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["SEQ", "RECEIVED", "VERSION", "REQUESTS", "ERRORS", "P50", "MS", "P99", "MS",
                                "DRIFT"]
    assert [line.split()[:1] + line.split()[3:] for line in lines[1:]] == [
        ["2", "1.0.0", "20", "2", "1.5", "4.25", "0.5", "flagged"], ["1", "1.0.0", "10", "1", "1.5", "4.25", "-"],
        ["0", "1.0.0", "0", "0", "1.5", "4.25", "-"]]
    rows = run_cli("fleet", "telemetry", target, "cam-0", "--json", "--limit", "1", env=viewer)
    assert [json.loads(line)["metrics"]["drift"] for line in rows.stdout.splitlines()] == [
        {"score": 0.5, "flagged": True}]
