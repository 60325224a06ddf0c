"""Fixtures of the emulated Raspberry Pi (``make test-pi``; see tests/pi/arm64.py and tests/pi/image.py).

* ``pi``: the Pi image, built from the Pi Dockerfile in an emulated arm64 Debian 12 (cached), with this
  checkout's edgeml installed by the Dockerfile's own RUN instruction and by the README's command;
* ``pi_bundles``: the digits bundles (a good ``tflite-int8`` 1.0.0, a broken one 2.0.0), made with
  ``edgeml compile`` (cached).

Where this machine cannot emulate arm64 (no root, no user namespaces, no private binfmt_misc, qemu-user-static
or debootstrap missing) the tests are skipped with the reason, or fail under ``EDGEML_REQUIRE_SERVICES=1``.
The numbers measured inside (start-up time, RSS, installed size) are labelled as emulated, written to
``tests-artifacts/pi/emulated.json`` and printed at the end of the run.
"""

from __future__ import annotations

import importlib.util
import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, require_service
from tests.pi import arm64
from tests.pi.bundles import PiBundles, pi_bundles
from tests.pi.image import CACHE, PiImage, pi_image

ARTIFACTS = REPO_ROOT / "tests-artifacts" / "pi"
MEASURED: dict[str, Any] = {}


_BUNDLES: list[Future[PiBundles]] = []


def _start_bundles() -> None:
    """Compile the bundles (host CPUs) while the image builds (mostly one emulated core)."""
    if not _BUNDLES and importlib.util.find_spec("onnx2tf") is not None:
        _BUNDLES.append(ThreadPoolExecutor(1, thread_name_prefix="pi-bundles").submit(pi_bundles, CACHE))


@pytest.fixture(scope="session")
def pi() -> PiImage:
    reason = arm64.unavailable()
    if reason is not None:
        require_service("arm64 emulation", False, reason)
    _start_bundles()
    return pi_image(ARTIFACTS / "logs")


@pytest.fixture(scope="session")
def bundles() -> PiBundles:
    pytest.importorskip("onnx2tf", reason="tflite-int8 needs onnx2tf (pip install --no-deps onnx2tf==1.29.24)")
    _start_bundles()
    return _BUNDLES[0].result()


def record(key: str, value: Any) -> None:
    """Keep an emulated measurement (written and printed at the end of the session)."""
    MEASURED[key] = value
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "emulated.json").write_text(json.dumps({"note": "measured under qemu user-mode emulation "
                                                         "(cortex-a76 model) on an x86_64 host: not a Pi's speed",
                                                         **MEASURED}, indent=1))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not MEASURED:
        return
    terminalreporter.section("emulated Raspberry Pi (qemu user mode on this host: function, not speed)")
    for key, value in MEASURED.items():
        terminalreporter.write_line(f"{key}: {value}")
    terminalreporter.write_line(f"(also in {(ARTIFACTS / 'emulated.json').relative_to(REPO_ROOT)})")
