"""Long-running commands and the processes they start: stop on SIGINT or SIGTERM, in order, leaving nothing.

* :func:`sigterm_interrupts`: in the main thread, SIGTERM raises :class:`KeyboardInterrupt` like Ctrl-C does, so
  that ``finally`` blocks and context managers stop what the command started (Python's default for SIGTERM is
  to die at once, which orphans children).
* :func:`wait_for_signal`: block until SIGTERM or SIGINT (a server's main thread).
* :func:`start_child`: a child process in a session of its own, so that Ctrl-C in the terminal reaches only the
  command, which then stops its children in dependency order (clients before the broker they talk to).
* :func:`stop_child`: SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["sigterm_interrupts", "start_child", "stop_child", "wait_for_signal"]


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While inside, SIGTERM raises KeyboardInterrupt in the main thread (elsewhere: does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_signal(stop: threading.Event | None = None, poll_s: float = 1.0) -> None:
    """Block until SIGTERM or SIGINT (Ctrl-C), or until ``stop`` is set."""
    stop = stop or threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(poll_s):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_child(args: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
    """Start ``args`` in a session of its own (the terminal's Ctrl-C does not reach it; the parent stops it)."""
    return subprocess.Popen(list(args), start_new_session=True, **popen)


def stop_child(process: subprocess.Popen[Any] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM ``process``, wait up to ``timeout`` seconds, then SIGKILL; returns its exit code (None: no process)."""
    if process is None:
        return None
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
