"""Fixtures shared by every test package.

* ``digits``: a small CNN trained on the bundled digits, exported to ONNX, with calibration and validation
  data beside it (trained once per session, a few seconds).
* ``run_cli``: the ``edgeml`` command run as a real subprocess, the way users run it.
* :func:`require_service`: skip a test whose external service (broker, database, browser) is absent, or
  fail it where the environment promises the services (``EDGEML_REQUIRE_SERVICES=1``, e.g. in CI).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def require_service(name: str, available: bool, reason: str) -> None:
    """Skip the calling test when the service ``name`` is not available.

    With ``EDGEML_REQUIRE_SERVICES=1`` in the environment the test fails instead, so that a CI job that
    installs Mosquitto, PostgreSQL or Chromium cannot silently skip the tests that need them.

    Args:
        name: The service, e.g. ``"mosquitto"``.
        available: Whether it was found.
        reason: Why it is not available, e.g. ``"mosquitto not on PATH"``.
    """
    if available:
        return
    message = f"{name} unavailable: {reason}"
    if os.environ.get("EDGEML_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} (EDGEML_REQUIRE_SERVICES=1 requires it)", pytrace=False)
    pytest.skip(message)


@dataclass(frozen=True)
class DigitsModel:
    """A trained digits classifier and its data, all as files.

    Attributes:
        onnx: The exported FP32 model (input ``input``, N x 1 x 8 x 8 float32; output ``output``, N x 10).
        calib: ``.npz`` with key ``input`` (200 training samples).
        val: ``.npz`` with keys ``input`` and ``labels`` (the validation split).
        val_accuracy: The model's accuracy on ``val``, computed with onnxruntime.
    """

    onnx: Path
    calib: Path
    val: Path
    val_accuracy: float


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsModel:
    pytest.importorskip("torch")
    import onnxruntime as ort

    from edgeml.train.digits import digits_arrays, export_onnx, fit
    from edgeml.train.models import small_cnn

    work = tmp_path_factory.mktemp("digits")
    data = digits_arrays(seed=0)
    model = fit(small_cnn(), data["x_train"], data["y_train"], epochs=8, seed=0)
    onnx_path = work / "digits.onnx"
    export_onnx(model, data["x_val"], str(onnx_path))
    np.savez(work / "calib.npz", input=data["x_train"][:200])
    np.savez(work / "val.npz", input=data["x_val"], labels=data["y_val"])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": data["x_val"]})[0]
    accuracy = float((logits.argmax(1) == data["y_val"]).mean())
    return DigitsModel(onnx_path, work / "calib.npz", work / "val.npz", accuracy)


class CliResult(NamedTuple):
    """What a CLI subprocess did."""

    returncode: int
    stdout: str
    stderr: str


RunCli = Callable[..., CliResult]


@pytest.fixture
def run_cli(tmp_path: Path) -> RunCli:
    """Run ``edgeml ARGS...`` in a subprocess; returns (returncode, stdout, stderr).

    Keyword arguments:
        prelude: Python statements run in the subprocess before the CLI starts (e.g. to hide a module:
            ``sys.modules['onnx2tf'] = None``); the CLI then runs through ``python -c``.
        env: Extra environment variables.
        timeout: Seconds before the subprocess is killed (default 300).
    """

    def run(*args: str | os.PathLike[str], prelude: str = "", env: Mapping[str, str] | None = None,
            timeout: float = 300) -> CliResult:
        if prelude:
            cmd: Sequence[str] = [sys.executable, "-c", f"import sys\n{prelude}\nfrom edgeml.cli import main\nmain()"]
        else:
            cmd = [sys.executable, "-m", "edgeml.cli"]
        environ = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
        proc = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              cwd=tmp_path, env=environ, check=False)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run
