"""Fixtures of the fleet tests: a real registry, real bundles, and a real HTTP server serving it."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edgeml.bundle import Manifest, TensorSpec
from edgeml.bundle_writer import write_bundle
from edgeml.fleet.registry.repository import Registry, init_registry
from tests.conftest import require_service

MakeBundle = Callable[..., Path]
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextmanager
def database_url(kind: str, root: Path) -> Iterator[str]:
    """A database URL: ``sqlite`` in ``root``, or ``postgresql``: a fresh schema on the local server (dropped
    after)."""
    if kind == "sqlite":
        yield f"sqlite:///{root / 'fleet.db'}"
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


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test twice: on SQLite, and on its own schema of the local PostgreSQL."""
    with database_url(request.param, tmp_path) as url:
        yield url


def manifest(name: str = "digits", version: str = "1.0.0", target: str = "onnx-fp32") -> Manifest:
    """A small valid manifest."""
    return Manifest(
        name=name, version=version, target=target,
        runtime={"name": "onnxruntime", "min_version": "1.17", "precision": "fp32", "build": None},
        model={"file": "model.onnx", "format": "onnx"},
        inputs=(TensorSpec("input", ("batch", 4), "float32"),),
        outputs=(TensorSpec("output", ("batch", 2), "float32"),),
        created="2025-01-01T00:00:00+00:00",
    )


@pytest.fixture
def make_bundle(tmp_path: Path) -> MakeBundle:
    """Write a bundle: ``make_bundle(version="1.0.0", payload=b"...", name=..., target=...)``."""

    def make(version: str = "1.0.0", payload: bytes = b"model-bytes", **fields: Any) -> Path:
        src = tmp_path / "src" / hashlib.sha256(payload + version.encode()).hexdigest()[:12]
        src.mkdir(parents=True, exist_ok=True)
        (src / "model.onnx").write_bytes(payload)
        m = manifest(version=version, **fields)
        dest = tmp_path / "bundles" / m.filename
        dest.parent.mkdir(exist_ok=True)
        write_bundle(dest, m, {"model.onnx": src / "model.onnx"})
        return dest

    return make


@pytest.fixture
def registry(tmp_path: Path, request: pytest.FixtureRequest) -> Registry:
    """A new registry; parametrize indirectly with init_registry keyword arguments to change it."""
    return init_registry(tmp_path / "reg", **getattr(request, "param", {}))


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve_repository(registry: Registry) -> Iterator[str]:
    """Serve ``DIR/repository`` over HTTP on 127.0.0.1; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(registry.dir / "repository")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def served(registry: Registry) -> Iterator[str]:
    """Serve ``DIR/repository`` over HTTP on 127.0.0.1; yields the base URL."""
    with serve_repository(registry) as url:
        yield url


def tree_hash(directory: Path) -> str:
    """One sha256 over every file's relative path and content under ``directory``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
