"""The local inference API for applications on the device: HTTP on 127.0.0.1 and on a Unix socket.

Routes::

    POST /v1/models/{name}:predict   run the model (JSON or raw tensor bytes, see below)
    GET  /v1/health                  200 while a verified model serves, 503 otherwise
    GET  /v1/status                  the agent's status (model, version, slot, update state, clock)

A JSON request is ``{"inputs": {"input": [[...]]} | [[...]], "preprocessed": false}``; a raw request has
``Content-Type: application/octet-stream`` with headers ``X-Edgeml-Shape: 1,28,28``, ``X-Edgeml-Dtype:
uint8`` and optionally ``X-Edgeml-Input`` (input name) and ``X-Edgeml-Preprocessed: true``. Unless the
request says it is preprocessed, the agent applies the manifest's preprocessing. The JSON reply is
``{"model", "version", "outputs": {name: nested lists}, "top1": [...], "confidence": [...]}``; with
``Accept: application/octet-stream`` the first output comes back as raw bytes with the same headers.
Errors are JSON ``{"error": message}`` with 400 (bad input), 404 (no such model or route), 413 (too large)
or 503 (no model serving).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socketserver
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeml.errors import EdgeMLError
from edgeml.refstats import to_probabilities

__all__ = ["LocalAPI", "ModelNotFound", "NotServing", "PredictResult", "Predictor"]

_log = logging.getLogger(__name__)
_PREDICT = re.compile(r"^/v1/models/([a-z0-9][a-z0-9._-]{0,63}):predict$")
_DTYPES = {"uint8", "int8", "int32", "int64", "float16", "float32", "float64"}


class ModelNotFound(EdgeMLError):
    """The request names a model this device does not serve."""


class NotServing(EdgeMLError):
    """No verified model is serving (yet)."""


class PredictResult:
    """What one predict call returns: the model, the version that ran, the outputs (read them, do not change
    them); ``top1`` and ``confidence`` are computed on first use.

    A plain class with slots, not a dataclass: it is made once per request, and a frozen dataclass's
    ``__init__`` costs more than a small model's inference does.
    """

    __slots__ = ("_classes", "model", "outputs", "version")

    def __init__(self, model: str, version: str, outputs: dict[str, np.ndarray]) -> None:
        self.model = model
        self.version = version
        self.outputs = outputs
        self._classes: tuple[list[int], list[float]] | None = None

    def __repr__(self) -> str:
        return f"PredictResult(model={self.model!r}, version={self.version!r}, outputs={sorted(self.outputs)})"

    def classes(self) -> tuple[list[int], list[float]]:
        """``(top1, confidence)`` of each row (empty lists for outputs that are not class scores)."""
        if self._classes is None:
            first = next(iter(self.outputs.values()), None)
            if first is None or first.ndim != 2 or first.shape[1] < 2 or not len(first):
                self._classes = ([], [])
            else:
                probs = to_probabilities(first)
                self._classes = ([int(i) for i in probs.argmax(axis=1)], [float(c) for c in probs.max(axis=1)])
        return self._classes

    @property
    def top1(self) -> list[int]:
        """The most probable class of each row (empty for outputs that are not class scores)."""
        return self.classes()[0]

    @property
    def confidence(self) -> list[float]:
        """The probability of that class (softmax applied unless the outputs are probabilities)."""
        return self.classes()[1]


class Predictor(Protocol):
    """What the API serves (the agent implements it)."""

    def predict(self, model: str, inputs: Mapping[str, np.ndarray] | np.ndarray, *,
                preprocessed: bool) -> PredictResult: ...

    def health(self) -> tuple[bool, dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgeml-agent"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave at once (else +40 ms: Nagle vs delayed ACK)
    predictor: Predictor
    max_bytes: int

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("api: " + format, *args)

    def address_string(self) -> str:  # Unix sockets have no (host, port)
        return str(self.client_address[0]) if isinstance(self.client_address, tuple) else "unix"

    def _send(self, code: int, body: bytes, content_type: str = "application/json",
              headers: Mapping[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, doc: Any) -> None:
        self._send(code, json.dumps(doc, separators=(",", ":")).encode())

    def do_GET(self) -> None:
        if self.path == "/v1/health":
            ok, doc = self.predictor.health()
            self._json(200 if ok else 503, doc)
        elif self.path == "/v1/status":
            self._json(200, self.predictor.status())
        else:
            self._json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        match = _PREDICT.match(self.path)
        if match is None:
            self._drain()
            self._json(404, {"error": f"no route {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._json(411, {"error": "Content-Length is required"})
            return
        if length > self.max_bytes:
            self.close_connection = True
            self._json(413, {"error": f"request of {length} bytes exceeds the limit of {self.max_bytes}"})
            return
        body = self.rfile.read(length)
        try:
            inputs, preprocessed = self._inputs(body)
            result = self.predictor.predict(match.group(1), inputs, preprocessed=preprocessed)
        except ModelNotFound as exc:
            self._json(404, {"error": str(exc)})
        except NotServing as exc:
            self._json(503, {"error": str(exc)})
        except (EdgeMLError, ValueError) as exc:
            self._json(400, {"error": str(exc)})
        else:
            self._reply(result)

    def _drain(self) -> None:
        length = self.headers.get("Content-Length", "0")
        if length.isdigit() and int(length) <= self.max_bytes:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _inputs(self, body: bytes) -> tuple[Mapping[str, np.ndarray] | np.ndarray, bool]:
        if self.headers.get("Content-Type", "").startswith("application/octet-stream"):
            return _raw_inputs(body, self.headers)
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"the body is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or "inputs" not in doc:
            raise ValueError('the JSON body must be an object with "inputs"')
        raw = doc["inputs"]
        preprocessed = bool(doc.get("preprocessed", False))
        if isinstance(raw, dict):
            return {str(k): np.asarray(v) for k, v in raw.items()}, preprocessed
        return np.asarray(raw), preprocessed

    def _reply(self, result: PredictResult) -> None:
        if self.headers.get("Accept", "") == "application/octet-stream" and result.outputs:
            name, array = next(iter(result.outputs.items()))
            array = np.ascontiguousarray(array)
            self._send(200, array.tobytes(), "application/octet-stream",
                       {"X-Edgeml-Output": name, "X-Edgeml-Shape": ",".join(map(str, array.shape)),
                        "X-Edgeml-Dtype": str(array.dtype), "X-Edgeml-Version": result.version})
            return
        top1, confidence = result.classes()
        self._json(200, {"model": result.model, "version": result.version,
                         "outputs": {k: v.tolist() for k, v in result.outputs.items()},
                         "top1": top1, "confidence": confidence})


def _raw_inputs(body: bytes, headers: Any) -> tuple[Mapping[str, np.ndarray] | np.ndarray, bool]:
    dtype = headers.get("X-Edgeml-Dtype", "float32")
    if dtype not in _DTYPES:
        raise ValueError(f"X-Edgeml-Dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    try:
        shape = tuple(int(n) for n in headers.get("X-Edgeml-Shape", "").split(","))
    except ValueError:
        raise ValueError("X-Edgeml-Shape must be comma-separated integers, e.g. 1,28,28") from None
    if any(n < 0 for n in shape) or int(np.prod(shape)) * np.dtype(dtype).itemsize != len(body):
        raise ValueError(f"{len(body)} bytes do not hold a {dtype} tensor of shape {list(shape)}")
    array = np.frombuffer(body, dtype=dtype).reshape(shape)
    preprocessed = headers.get("X-Edgeml-Preprocessed", "false").lower() in ("1", "true", "yes")
    name = headers.get("X-Edgeml-Input")
    return ({name: array} if name else array), preprocessed


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class LocalAPI:
    """Serves a :class:`Predictor` over HTTP (TCP, loopback by default) and optionally a Unix socket.

    Args:
        predictor: What to serve.
        host: TCP address (``127.0.0.1``: reachable from this device only).
        port: TCP port; 0 picks a free one (see :attr:`port` after :meth:`start`).
        unix_socket: Path of a Unix socket to serve the same API on (mode 0660), or None.
        max_request_bytes: Largest accepted request body.
    """

    def __init__(self, predictor: Predictor, host: str = "127.0.0.1", port: int = 8471,
                 unix_socket: Path | None = None, max_request_bytes: int = 16 * 1024 * 1024) -> None:
        handler = type("Handler", (_Handler,), {"predictor": predictor, "max_bytes": max_request_bytes})
        self._http = ThreadingHTTPServer((host, port), handler)
        self._http.daemon_threads = True
        self._unix: _UnixServer | None = None
        self.unix_socket = unix_socket
        if unix_socket is not None:
            unix_socket.parent.mkdir(parents=True, exist_ok=True)
            if unix_socket.is_socket():
                unix_socket.unlink()  # left by a killed agent
            unix_handler = type("UnixHandler", (handler,), {"disable_nagle_algorithm": False})  # no TCP there
            self._unix = _UnixServer(str(unix_socket), unix_handler)
            os.chmod(unix_socket, 0o660)
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self._http.server_address[1])

    def start(self) -> None:
        """Serve in background threads."""
        for server in (self._http, self._unix):
            if server is not None:
                thread = threading.Thread(target=server.serve_forever, name="edgeml-api", daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        """Stop serving and close the sockets."""
        for server in (self._http, self._unix):
            if server is not None:
                server.shutdown()
                server.server_close()
        if self.unix_socket is not None and self.unix_socket.is_socket():
            self.unix_socket.unlink()
