"""A real Mosquitto broker for tests: started on a free port from a generated config, stopped afterwards."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MOSQUITTO = Path("/usr/sbin/mosquitto")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _give_to_broker_user(directory: Path) -> None:
    """As root, Mosquitto drops to user ``mosquitto`` before reading its files: hand them over."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)


@contextmanager
def run_mosquitto(broker_dir: Path, timeout: float = 10.0) -> Iterator[int]:
    """Start Mosquitto with ``broker_dir/mosquitto.conf``, its listener moved to a free port on 127.0.0.1.

    ``broker_dir`` and its parents must be traversable by the ``mosquitto`` user (e.g. under a 0755
    directory made with :func:`tempfile.mkdtemp`). Yields the port; the broker is terminated on exit.
    """
    port = free_port()
    conf = (broker_dir / "mosquitto.conf").read_text()
    conf = re.sub(r"^listener \d+.*$", f"listener {port} 127.0.0.1", conf, flags=re.M)
    test_conf = broker_dir / "test.conf"
    test_conf.write_text(conf + "log_dest stderr\nlog_type all\n")
    _give_to_broker_user(broker_dir)
    log = (broker_dir.parent / "mosquitto.log").open("wb")
    proc = subprocess.Popen([str(MOSQUITTO), "-c", str(test_conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(proc, port, timeout, broker_dir.parent / "mosquitto.log")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {port} within {timeout} s:\n{log.read_text(errors='replace')}")


@contextmanager
def anonymous_mosquitto(persistence: bool = False) -> Iterator[tuple[int, Path]]:
    """An anonymous plain-TCP Mosquitto on a free port of 127.0.0.1 (TLS and ACLs: tests/fleet/test_broker.py).

    Yields ``(port, broker_dir)``; with ``persistence`` the broker keeps its state in ``broker_dir``, so a
    restart with :func:`run_mosquitto` on the same directory finds it. Where Mosquitto is missing the test is
    skipped (or fails under ``EDGEML_REQUIRE_SERVICES=1``).
    """
    from tests.conftest import require_service

    if not MOSQUITTO.exists():
        require_service("mosquitto", False, f"{MOSQUITTO} not installed (apt-get install mosquitto)")
    root = Path(tempfile.mkdtemp(prefix="edgeml-mosquitto-"))
    root.chmod(0o755)  # the broker runs as user mosquitto
    try:
        broker = root / "broker"
        broker.mkdir()
        conf = "listener 1883\nallow_anonymous true\nset_tcp_nodelay true\n"
        if persistence:
            conf += f"persistence true\npersistence_location {broker}/\n"
        (broker / "mosquitto.conf").write_text(conf)
        with run_mosquitto(broker) as port:
            yield port, broker
    finally:
        shutil.rmtree(root, ignore_errors=True)
