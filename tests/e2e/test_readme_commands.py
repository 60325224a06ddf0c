"""Every command the README and the docs show runs as printed, from a copy of the repository root.

The ``sh`` blocks of README.md, docs/compile.md and docs/training.md are read here (a continued line is one
command); each command either runs, in order, with bash in a scratch folder holding a copy of ``examples/``
(what the repository root has: the commands' own ``runs/``, ``dist/`` and ``registry/`` land there), or matches
one of :data:`NOT_HERE`, each with the reason it cannot run on a test machine and the test that covers it
instead. A new command in those sections runs unless it is added there, so the docs cannot drift from the code.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeml.bundle import Bundle
from tests.conftest import REPO_ROOT

pytest.importorskip("torch")
if importlib.util.find_spec("onnx2tf") is None:  # not imported: that would load TensorFlow here
    pytest.skip("the README's TFLite example needs onnx2tf", allow_module_level=True)

#: (pattern, why it does not run here): a command matching the pattern is not run.
NOT_HERE: list[tuple[str, str]] = [
    (r"^make ", "installs the environment and runs the whole suite (what CI does)"),
    (r"^edgeml fleet serve ", "a server that runs until stopped, against a broker at fleet.example "
                              "(tests/fleet/test_serve.py)"),
    (r"^edgeml fleet devices enroll ", "registers the device on the running broker at fleet.example "
                                       "(tests/fleet/test_devices.py)"),
    (r"^edgeml fleet (rollout|rollback|telemetry) |^EDGEML_TOKEN=", "operates a running fleet with enrolled "
                                                                    "devices (tests/e2e/test_fleet_rollouts.py)"),
    (r"^edgeml agent (run|status) ", "a device with /etc/edgeml/agent.toml (tests/edge_agent)"),
    (r"^curl ", "the local API of a running agent (tests/edge_agent/test_agent.py)"),
    (r"^docker ", "needs a Docker engine (the Dockerfiles are linted in tests/deploy)"),
    (r"^(pip |python3 -m venv |sudo )", "installs into the system (tests/core/test_packaging.py)"),
    (r"^python -m torch\.distributed\.run --nnodes", "needs several machines (one machine: --nproc 2 above)"),
    (r"^edgeml train .*--(extra-data|init-from) ", "needs a labeled dataset pulled from a fleet and an earlier run "
                                                  "(tests/train/test_extra_data.py, tests/e2e/test_retrain_loop.py)"),
]
DOCS = ("README.md", "docs/compile.md", "docs/training.md")


def commands(doc: Path) -> list[str]:
    """The commands of ``doc``'s ``sh`` code blocks, continued lines joined, comments and blank lines left out."""
    found: list[str] = []
    for block in re.findall(r"^```sh\n(.*?)^```", doc.read_text(), flags=re.MULTILINE | re.DOTALL):
        pending = ""
        for line in block.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            found.append(re.sub(r"\s+", " ", pending + line).strip())
            pending = ""
    return found


def _skipped(command: str) -> str | None:
    return next((why for pattern, why in NOT_HERE if re.search(pattern, command)), None)


def _run(command: str, cwd: Path, log: list[str]) -> None:
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    start = time.monotonic()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)
    log.append(f"{time.monotonic() - start:6.1f} s  {command}")
    assert proc.returncode == 0, (f"`{command}` exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def _workspace(tmp: Path) -> Path:
    shutil.copytree(REPO_ROOT / "examples", tmp / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp


def test_the_readme_and_docs_list_their_commands() -> None:
    every = {doc: commands(REPO_ROOT / doc) for doc in DOCS}
    readme = every["README.md"]
    assert "edgeml train examples/digits.toml -o runs/" in readme[2]
    assert any(c.startswith("edgeml compile examples/textdet/textdet.onnx") and "--input-shape x:1,3,48,192" in c
               for c in readme)
    run = [c for cs in every.values() for c in cs if _skipped(c) is None]
    assert len(run) >= 20 and all(c.startswith("edgeml ") for c in run), run
    for pattern, _ in NOT_HERE:  # every exception is still needed: it matches a command the docs show
        assert any(re.search(pattern, c) for cs in every.values() for c in cs), pattern


def test_every_readme_command_runs_as_printed(tmp_path: Path) -> None:
    """The train, compile and registry sections in order: train, resume, DDP, compile the run; a text detector
    from the wild and a PyTorch regressor; inspect and verify; a registry that publishes the digits bundle."""
    root = _workspace(tmp_path)
    log: list[str] = []
    for command in commands(REPO_ROOT / "README.md"):
        if _skipped(command) is None:
            _run(command, root, log)
    print("\n".join(log))
    dist = root / "dist"
    names = sorted(p.name for p in dist.glob("*.edgeml"))
    assert names == ["digits-1.0.0-onnx-int8.edgeml", "regressor-1.0.0-onnx-int8.edgeml",
                     "regressor-1.0.0-onnx.edgeml", "textdet-1.2.0-onnx-int8.edgeml", "textdet-1.2.0-onnx.edgeml",
                     "textdet-1.2.0-tflite-int8.edgeml"]
    with Bundle(dist / "textdet-1.2.0-tflite-int8.edgeml") as bundle:
        m = bundle.manifest
    assert m.inputs[0].shape == (1, 3, 48, 192) and m.provenance["input_shapes"] == {"x": [1, 3, 48, 192]}
    assert m.gate["metric"] == "max-error" and m.metrics["gate"]["max_abs_error"] <= 0.05
    assert m.refstats is not None  # image folders of real text lines: reference statistics of the probability map
    assert (root / "registry" / "offline-keys").is_dir() and (root / "broker").is_dir()
    assert len(list((root / "runs").glob("digits-*/model.onnx"))) == 1
    assert len(list((root / "runs" / "ddp").glob("digits-*/model.onnx"))) == 1


@pytest.mark.parametrize("doc", ["docs/compile.md", "docs/training.md"])
def test_every_docs_command_runs_as_printed(doc: str, tmp_path: Path) -> None:
    root = _workspace(tmp_path)
    log: list[str] = []
    ran = [c for c in commands(REPO_ROOT / doc) if _skipped(c) is None]
    for command in ran:
        _run(command, root, log)
    print("\n".join(log))
    assert ran and list((root / "dist").glob("*.edgeml"))
