"""The models the emulated Pi is given, made once with ``edgeml compile`` and cached.

* ``digits`` 1.0.0, ``tflite-int8`` (what a Pi runs) and ``onnx-int8``: the demo's digits CNN, through the
  accuracy gate;
* ``digits`` 2.0.0, ``tflite-int8``: the demo's broken release, its logits divided by ten by an export bug
  (:func:`edgeml.demo._broken_copy`): the top-1 class is unchanged, so the compile gate and the device's
  golden vectors (computed from the same model) pass it, and only its confidence on live traffic, during
  probation, shows that it is broken.

The bundles are cached under the Pi cache, keyed by the code that makes them (compile, train, the bundle and
reference-statistics formats, the demo's model), so a change there makes them again (about two minutes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT

__all__ = ["PiBundles", "pi_bundles"]

_SOURCES = ("compile", "train", "edgeml/bundle.py", "edgeml/bundle_writer.py", "edgeml/refstats.py",
            "edgeml/demo/__init__.py")
_TRAIN = """
import sys
from pathlib import Path
from edgeml.demo import _broken_copy, _train
work = Path(sys.argv[1])
_broken_copy(_train(work), work / "digits-v2-broken.onnx")
"""


@dataclass(frozen=True)
class PiBundles:
    """The cached bundles and the data they were made from."""

    v1_tflite: Path
    v1_onnx: Path
    v2_tflite: Path
    val: Path  # .npz with "input" (N x 1 x 8 x 8 float32) and "labels"


def _key() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES:
        path = REPO_ROOT / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(REPO_ROOT)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def _edgeml(*args: str | Path, cwd: Path) -> None:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "edgeml.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"edgeml {' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def pi_bundles(cache: Path) -> PiBundles:
    """The bundles, compiled now or taken from ``cache``."""
    out = cache / f"bundles-{_key()}"
    if not (out / "done").is_file():
        for old in cache.glob("bundles-*"):
            shutil.rmtree(old, ignore_errors=True)
        work = out.with_name(out.name + ".tmp")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        proc = subprocess.run([sys.executable, "-c", _TRAIN, str(work)], capture_output=True, text=True,
                              timeout=900, check=False, cwd=work)
        if proc.returncode != 0:
            raise RuntimeError(f"training the digits model failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        common = ("--calib", "calib.npz", "--val", "val.npz", "--name", "digits", "--max-accuracy-drop", "1.0")
        _edgeml("compile", "digits.onnx", "--target", "tflite-int8", "--target", "onnx-int8", *common,
                "--version", "1.0.0", "-o", "dist", cwd=work)
        _edgeml("compile", "digits-v2-broken.onnx", "--target", "tflite-int8", *common, "--version", "2.0.0",
                "-o", "dist", cwd=work)
        (work / "done").write_text("")
        work.rename(out)
    dist = out / "dist"
    return PiBundles(v1_tflite=dist / "digits-1.0.0-tflite-int8.edgeml", v1_onnx=dist / "digits-1.0.0-onnx-int8.edgeml",
                     v2_tflite=dist / "digits-2.0.0-tflite-int8.edgeml", val=out / "val.npz")
