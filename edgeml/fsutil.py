"""Crash-safe file writes: everything edgeml writes goes through here.

A file is written to a temporary sibling, flushed and fsynced, renamed over the destination, and the
directory is fsynced, so after a crash or power loss a reader sees either the old content or the new,
never a torn file. :func:`atomic_output_dir` does the same for a whole directory of outputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgeml.errors import StorageError

__all__ = ["atomic_output_dir", "atomic_write_bytes", "ensure_writable_dir", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (no-op where the OS cannot open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    Raises:
        StorageError: The file cannot be written.
    """
    dest = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {dest}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StorageError(f"cannot write {dest}: {exc.strerror}") from exc
    fsync_dir(dest.parent)


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and check that files can be created in it.

    Raises:
        StorageError: It is not a directory, or is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise StorageError(f"output directory {out} is a file, not a directory",
                           hint="choose another -o/--output directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".edgeml-probe-"):
            pass
    except OSError as exc:
        raise StorageError(
            f"output directory {out} is not writable: {exc.strerror or exc}",
            hint="choose another -o/--output directory",
        ) from exc
    return out.resolve()  # absolute: work is handed to subprocesses running elsewhere


@contextlib.contextmanager
def atomic_output_dir(parent: str | os.PathLike[str], prefix: str = "work") -> Iterator[Path]:
    """A scratch directory inside ``parent`` that is removed whatever happens.

    Outputs are built in it and moved into place with :func:`os.replace` only once complete, so an
    interrupted or failed run leaves nothing half-written behind (the scratch directory is hidden and
    deleted on exit).
    """
    base = ensure_writable_dir(parent)
    work = Path(tempfile.mkdtemp(prefix=f".edgeml-{prefix}-", dir=base))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
