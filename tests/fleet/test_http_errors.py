"""A database that fails gives the same answer on every route of the fleet's HTTP listener: 503, one JSON
shape, and nothing of the database's URL (its password, host, driver) or of the exception in the body.

The app is :func:`fleet_app` as ``edgeml fleet serve`` builds it, on a real registry whose database is a
PostgreSQL URL with a password pointing at a port where nothing listens, or an SQLite file in a folder that
does not exist.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeml.fleet.audit.log import open_audit
from edgeml.fleet.registry.repository import Registry
from edgeml.fleet.store.db import Database
from edgeml.fleet.web.server import HttpServer, fleet_app
from tests.fleet.mosquitto import free_port

PASSWORD = "pw-s3cret-9f2"
BODY = {"model": "digits", "version": "1.0.0", "options": {}, "to": "1.0.0", "reason": "x"}
#: Every route that reads the database: (method, path, body)
ROUTES = [
    ("GET", "/api/overview", None), ("GET", "/api/devices", None), ("GET", "/api/telemetry?metric=error_rate", None),
    ("GET", "/api/audit", None), ("GET", "/api/rollouts", None), ("GET", "/api/rollouts/ro-1", None),
    ("POST", "/api/rollouts", BODY), ("POST", "/api/rollouts/ro-1/pause", BODY),
    ("POST", "/api/rollouts/ro-1/resume", BODY), ("POST", "/api/rollouts/ro-1/abort", BODY),
    ("POST", "/api/rollback", BODY), ("GET", "/api/devices/cam-1/telemetry?limit=5", None),
    ("GET", "/metrics", None),
]
EXPECTED = {"error": "the fleet's database is unavailable",
            "hint": "try again shortly; the fleet server's log says why", "status": 503}


@pytest.fixture(params=["postgresql", "sqlite"])
def broken(request: pytest.FixtureRequest, registry: Registry, tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A registry served with a database that cannot be reached: yields (its URL, words that must not leak)."""
    if request.param == "postgresql":
        port = free_port()
        url = f"postgresql+psycopg://fleet:{PASSWORD}@127.0.0.1:{port}/fleet"
        leaks = [PASSWORD, str(port), "psycopg", "postgresql", "fleet:"]
    else:
        folder = tmp_path / "no-such-folder"
        url = f"sqlite:///{folder / 'fleet.db'}"
        leaks = [str(folder), "no-such-folder", "sqlite", "fleet.db"]
    yield url, [*leaks, "OperationalError", "Traceback", "sqlalchemy"]


@pytest.mark.parametrize("metrics_token", [False, True])
def test_a_database_failure_is_the_same_503_on_every_route(broken: tuple[str, list[str]], registry: Registry,
                                                           metrics_token: bool) -> None:
    url, leaks = broken
    db = Database(url)
    audit = open_audit(registry.dir, db=db)
    answers = {}
    with HttpServer(fleet_app(registry.dir, db, audit, metrics_token=metrics_token), port=0) as http_server:
        for method, path, body in ROUTES:
            conn = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=30)
            conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                         headers={"Authorization": "Bearer edgeml_" + "x" * 43})
            response = conn.getresponse()
            raw = response.read().decode()
            conn.close()
            answers[(method, path)] = (response.status, response.getheader("Content-Type"), json.loads(raw))
            assert not [word for word in leaks if word in raw], (path, raw)
        files = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=30)
        files.request("GET", "/metadata/root.json")  # the repository needs no database: still served
        assert files.getresponse().status == 200
        files.close()
    db.close()
    assert len(answers) == len(ROUTES)
    assert {path: a for (_, path), a in answers.items() if a != (503, "application/json", EXPECTED)} == {}
