"""TensorRT and cuda-python, imported on demand, and the process's one TensorRT logger.

Nothing imports ``tensorrt`` or ``cuda`` at module level: :func:`require_tensorrt` and :func:`require_cudart`
do, when called, and raise :class:`~edgeml.errors.MissingExtraError` naming where each comes from.

Map::

    require_tensorrt() / require_cudart()   import on demand, or say how to install
    cuda_ok()                               unpack a cuda-python (error, value...) result, or raise
    shared_logger()                         the one trt.ILogger of this process (TensorRT keeps the first)
    capture_log()                           collect TensorRT's errors, forward its warnings, for one call
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from edgeml._deps import require
from edgeml.errors import ConversionError, EdgeMLError, MissingExtraError

__all__ = ["capture_log", "cuda_ok", "require_cudart", "require_tensorrt", "shared_logger"]

_TENSORRT_HINT = ("on a Jetson, TensorRT comes with JetPack (sudo apt install python3-libnvinfer); "
                  "elsewhere: pip install tensorrt cuda-python")


def require_tensorrt() -> ModuleType:
    """Import ``tensorrt`` or raise MissingExtraError saying where TensorRT comes from."""
    try:
        return require("tensorrt", "tensorrt")
    except MissingExtraError as exc:
        exc.hint = _TENSORRT_HINT
        raise


def require_cudart() -> ModuleType:
    """cuda-python's CUDA runtime bindings (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    with contextlib.suppress(ImportError):
        from cuda.bindings import runtime

        return runtime
    try:
        from cuda import cudart
    except ImportError as exc:
        err = MissingExtraError("cuda-python", "tensorrt")
        err.hint = _TENSORRT_HINT
        raise err from exc
    return cudart


def cuda_ok(cudart: ModuleType, result: Any, what: str, error: type[EdgeMLError] = ConversionError) -> Any:
    """Unpack a cuda-python ``(error, value...)`` result; a CUDA error becomes ``error`` naming ``what``."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise error(f"CUDA {what} failed: {getattr(err, 'name', err)}",
                    hint="check that an NVIDIA GPU and its driver are present")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass
class _LogState:
    """Where the process-wide TensorRT logger sends messages right now."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    sinks: list[Callable[[int, str], None]] = field(default_factory=list)
    logger: Any = None


_LOG = _LogState()


def shared_logger(trt: ModuleType) -> Any:
    """The one ``trt.ILogger`` of this process.

    TensorRT keeps the logger of the first Builder or Runtime for the whole process, so a logger per call
    would lose messages (or be called after it was freed); this one forwards to :func:`capture_log` sinks.
    """
    with _LOG.lock:
        if _LOG.logger is None:

            class _Logger(trt.ILogger):  # type: ignore[name-defined]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    for sink in list(_LOG.sinks):
                        sink(int(severity), msg)

            _LOG.logger = _Logger()
        return _LOG.logger


@contextlib.contextmanager
def capture_log(trt: ModuleType, log: Callable[[str], None] | None = None) -> Iterator[list[str]]:
    """Collect TensorRT's error messages (yielded list) and pass warnings and errors to ``log``."""
    errors: list[str] = []
    severity = trt.ILogger.Severity
    worst_error, warning = int(severity.ERROR), int(severity.WARNING)

    def sink(level: int, msg: str) -> None:
        if level <= worst_error:
            errors.append(msg.strip())
        if log is not None and level <= warning:
            log(f"TensorRT: {msg.strip()}")

    with _LOG.lock:
        _LOG.sinks.append(sink)
    try:
        yield errors
    finally:
        with _LOG.lock:
            _LOG.sinks.remove(sink)
