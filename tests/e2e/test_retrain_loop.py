"""The loop closed, end to end: drift on the devices to a retrained, gated candidate in the registry.

Real parts throughout: ``edgeml train`` runs (the deployed model and a teacher), the signed registry, Mosquitto
(TLS, per-device ACL) or the embedded broker where it is not installed, the fleet server, two ``edgeml agent
run`` processes serving digits 1.0.0 (installed by a rollout), a ``capture`` command, the devices' uploads,
``edgeml fleet capture pull`` and ``edgeml fleet retrain`` as commands.

The drift: the devices' inputs are inverted (``1 - x``, a camera switched to a negative image), which the
deployed model gets mostly wrong. The devices keep the low-confidence inputs, upload them, the fleet pulls
them as a dataset, a teacher (an earlier FP32 run that saw inverted digits) labels them, and the candidate is
fine-tuned from the run that produced 1.0.0. The test measures both models itself, on inverted digits no
part of the chain trained on (the deployed run's test split, inverted) and on the original validation set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

MODEL = "digits"
QUIET = {"min_requests": 5.0, "max_probation_s": 60.0, "p99_slack_ms": 200.0}


def _cli(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _wait(what: str, check: object, timeout: float = 120.0, every: float = 0.3) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = check()  # type: ignore[operator]
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _accuracy(model: Path, x: np.ndarray, y: np.ndarray) -> float:
    from edgeml.fleet.capture.label import Teacher

    pred, _ = Teacher(model).predict({"input": x})
    return float((pred == y).mean())


@dataclass(frozen=True)
class Trained:
    """The deployed run (digits 1.0.0, trained on the digits alone), its bundle, and the teacher run."""

    root: Path
    runs: Path
    base: Path
    teacher: Path
    bundle: Path


@pytest.fixture(scope="module")
def trained() -> Iterator[Trained]:
    # a folder of its own: pytest's basetemp of a long test can be pruned by other sessions meanwhile
    root = Path(tempfile.mkdtemp(prefix="edgeml-retrain-loop-"))
    root.chmod(0o755)  # Mosquitto runs as its own user
    try:
        yield _train(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _train(root: Path) -> Trained:
    from edgeml.compile.options import CompileOptions
    from edgeml.compile.pipeline import compile_model
    from edgeml.train.config import config_from_dict
    from edgeml.train.run import train_run

    quiet = {"log": lambda line: None}
    base = train_run(config_from_dict({"model": {"name": MODEL, "version": "1.0.0"}, "data": {"source": "digits"},
                                       "train": {"epochs": 8, "threads": 2}}, root), root / "runs", **quiet)
    assert base is not None
    with np.load(base.run_dir / "data" / "calib.npz") as calib:  # the teacher sees inverted training inputs
        np.savez(root / "inverted.npz", x=1.0 - calib["input"], y=_labels_of_calib(base.run_dir))
    teacher = train_run(config_from_dict({"model": {"name": "teacher", "arch": "mlp", "hidden": [128, 64]},
                                          "data": {"source": "digits", "extra": ["inverted.npz"]},
                                          "train": {"epochs": 25, "threads": 2, "lr": 0.003}}, root),
                        root / "teachers", **quiet)
    assert teacher is not None
    report = compile_model(str(base.run_dir), CompileOptions(targets=("onnx",), benchmark=False), root / "dist")
    assert report.ok
    bundle = report.outcomes[0].bundle
    assert bundle is not None
    return Trained(root, root / "runs", base.run_dir, teacher.run_dir, bundle)


def _labels_of_calib(run_dir: Path) -> np.ndarray:
    """The labels of ``data/calib.npz`` (the first samples of the train split, from the data manifest)."""
    manifest = json.loads((run_dir / "data_manifest.json").read_text())
    with np.load(run_dir / "data" / "calib.npz") as calib:
        n = len(calib["input"])
    return np.array([s["label"] for s in manifest["splits"]["train"][:n]], np.int64)


@dataclass
class Loop:
    fleet: object
    agents: list[object]
    registry: Path


@pytest.fixture
def loop(trained: Trained) -> Iterator[Loop]:
    """The fleet (registry with 1.0.0, broker, server) and two onnxruntime agents serving 1.0.0."""
    from edgeml.demo.fleet import DemoFleet
    from edgeml.demo.story import _recorded, _rollout, _settled

    work = trained.root / "fleet"
    work.mkdir()
    work.chmod(0o755)
    with DemoFleet(work, http_port=0, log=lambda line: None) as fleet:
        fleet.registry().publish(trained.bundle)
        fleet.enroll()
        fleet.agents = [a for a in fleet.agents if a.runtime == "onnxruntime"]  # the bundle is onnx only
        fleet.start_broker()
        fleet.start_server()
        fleet.start_agents()
        _wait("the agents' state in the fleet", lambda: _recorded(fleet), 90)
        rid = _rollout(fleet, "1.0.0", ("onnx",), canary=1.0, waves=(1.0,), min_devices=1, probation_s=1.0)
        status = _wait("the rollout of 1.0.0", lambda: _settled(fleet, rid), 180)
        assert status.state == "completed", status  # type: ignore[attr-defined]
        _wait("both agents serving 1.0.0", lambda: all((a.status() or {}).get("version") == "1.0.0"
                                                       for a in fleet.agents), 60)
        yield Loop(fleet, fleet.agents, fleet.registry_dir)


def _predict(agent: object, rows: np.ndarray) -> np.ndarray:
    body = json.dumps({"inputs": {"input": rows.tolist()}, "preprocessed": True}).encode()
    request = urllib.request.Request(agent.url(f"/v1/models/{MODEL}:predict"), data=body, method="POST",  # type: ignore[attr-defined]
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        doc = json.loads(response.read())
    return np.asarray(next(iter(doc["outputs"].values())))


def _captured(agent: object) -> set[str]:
    """The sha256 of every sample in the agent's capture store (committed entries: those with their .json)."""
    from edgeml.fleet.capture.store import sample_sha256

    store = agent.home / "state" / "capture"  # type: ignore[attr-defined]
    out = set()
    for meta in store.glob("*.json"):
        try:
            out.add(sample_sha256(np.load(meta.with_suffix(".npy"), allow_pickle=False)))
        except (OSError, ValueError):  # deleted meanwhile (uploaded and acknowledged)
            continue
    return out


def test_drift_to_a_retrained_gated_published_candidate(trained: Trained, loop: Loop) -> None:
    from edgeml.fleet.capture.request import send_capture
    from edgeml.protocol.messages import CaptureArgs

    fleet = loop.fleet
    with np.load(trained.base / "data" / "val.npz") as val:
        x_val, y_val = val["input"], val["labels"]
    with np.load(trained.base / "data" / "test.npz") as test:  # drifted data nothing in the chain trains on
        x_drift, y_drift = 1.0 - test["input"], test["labels"]
    field = _field_inputs(trained.base)  # the devices' inputs after the drift, half each

    # the devices' inputs drift: they serve inverted digits, and keep (a sample of) the low-confidence ones
    sent = 0
    while min(len(_captured(a)) for a in loop.agents) < 150:
        for k, agent in enumerate(loop.agents):
            mine = field[k::len(loop.agents)]
            rows = mine[(sent * 32) % len(mine):][:32]
            served = _predict(agent, rows)
            assert served.shape == (len(rows), 10)
        sent += 1
        assert sent < 800, f"the agents kept only {[len(_captured(a)) for a in loop.agents]} samples"
    time.sleep(2.5)  # the agents file what they kept once per telemetry interval (1 s)
    on_devices = set().union(*(_captured(a) for a in loop.agents))

    # the operator asks for the samples; the devices upload them and delete what the fleet acknowledged
    creds = json.loads((fleet.broker_dir / "credentials" / "fleet.json").read_text())  # type: ignore[attr-defined]
    tls = None
    if fleet.tls:  # type: ignore[attr-defined]
        import ssl

        tls = ssl.create_default_context(cafile=str(fleet.broker_dir / "tls" / "ca.crt"))  # type: ignore[attr-defined]
    host = "localhost" if tls else "127.0.0.1"
    send_capture([a.name for a in loop.agents], CaptureArgs(upload=True, tag="negative-1"), host,  # type: ignore[attr-defined]
                 fleet.broker_port, username=creds["username"] if tls else None,  # type: ignore[attr-defined]
                 password=creds["password"] if tls else None, tls=tls)
    _wait("the devices to upload and delete every sample", lambda: not any(_captured(a) for a in loop.agents), 120)
    stored = len(on_devices)

    # capture pull writes the dataset; retrain labels it with the teacher, fine-tunes, gates and publishes
    dataset = trained.root / "negative-1"
    pulled = _cli("fleet", "capture", "pull", loop.registry, "--model", MODEL, "--tag", "negative-1", "--out", dataset)
    assert pulled.returncode == 0, pulled.stderr
    assert set(np.load(dataset / "samples.npz")["sha256"]) == on_devices  # every sample, once
    done = _cli("fleet", "retrain", MODEL, "--registry", loop.registry, "--from-capture", dataset,
                "--teacher", trained.teacher, "--min-confidence", "0.6", "--runs", trained.runs,
                "--work", trained.root / "retrain", "--epochs", "8", "--holdout", "0.2")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((trained.root / "retrain" / "retrain.json").read_text())
    assert report["base_run"] == str(trained.base)  # found through 1.0.0's bundle provenance
    assert report["version"] == "1.0.1" and report["refused"] is None
    labels = report["labels"]
    assert labels["labeled"] + sum(labels["unlabeled"].values()) == stored and labels["labeled"] >= 200
    assert f"edgeml fleet rollout start {loop.registry} {MODEL}:1.0.1 --targets onnx" in done.stdout

    # measured here: better on the drifted data, no worse on the original validation set
    old, new = trained.base / "model.onnx", Path(report["run_dir"]) / "model.onnx"
    drift_old, drift_new = _accuracy(old, x_drift, y_drift), _accuracy(new, x_drift, y_drift)
    val_old, val_new = _accuracy(old, x_val, y_val), _accuracy(new, x_val, y_val)
    print(f"inverted test digits: deployed {drift_old:.3f}, candidate {drift_new:.3f}; "
          f"original validation: deployed {val_old:.3f}, candidate {val_new:.3f}; "
          f"{stored} samples uploaded, {labels['labeled']} labeled")
    assert drift_new >= drift_old + 0.2
    assert val_new >= val_old - 0.01

    # published, and nothing rolled out: the devices still serve 1.0.0, stable still points at it
    from edgeml.fleet.registry.repository import Registry

    registry = Registry(loop.registry)
    assert f"{MODEL}/1.0.1/onnx.edgeml" in registry.targets()
    db = registry.database()
    try:
        assert db.channels()[(MODEL, "stable")] == "1.0.0"
    finally:
        db.close()
    assert all((a.status() or {}).get("version") == "1.0.0" for a in loop.agents)  # type: ignore[attr-defined]


def _field_inputs(run_dir: Path) -> np.ndarray:
    """The devices' inputs after the drift: the deployed run's training split, inverted (float32)."""
    from edgeml.rundir import read_run_record
    from edgeml.train.config import config_from_dict
    from edgeml.train.data import load_training_data

    raw = json.loads((run_dir / "config.json").read_text())
    x, _ = load_training_data(config_from_dict(raw, read_run_record(run_dir)["base_dir"])).arrays("train")
    return np.ascontiguousarray(1.0 - x).astype(np.float32)


def test_a_regressing_candidate_is_refused_and_nothing_is_published(trained: Trained, tmp_path: Path) -> None:
    """The same chain from a dataset folder in the pull format (no devices): a candidate trained from scratch
    for one epoch is worse on the original validation set, so it is refused, recorded, and not published."""
    from edgeml.errors import ConfigError
    from edgeml.fleet.capture.label import label_dataset
    from edgeml.fleet.capture.retrain import RetrainRefused, RetrainSettings, deployed_run, retrain
    from edgeml.fleet.registry.repository import init_registry
    from edgeml.progress import Progress
    from tests.train.capture_format import write_capture_dataset

    registry = init_registry(tmp_path / "registry")
    registry.publish(trained.bundle)
    with pytest.raises(ConfigError, match=r"digits 1.0.0 was trained by run \w+, which is not under"):
        deployed_run(registry.dir, MODEL, "1.0.0", tmp_path)
    with pytest.raises(ConfigError, match="digits 9.9.9 has no published bundle naming its training run"):
        deployed_run(registry.dir, MODEL, "9.9.9", trained.runs)
    assert deployed_run(registry.dir, MODEL, "1.0.0", trained.runs) == trained.base

    write_capture_dataset(tmp_path / "ds", _field_inputs(trained.base)[:200], model=MODEL, version="1.0.0")
    label_dataset(tmp_path / "ds", teacher=trained.teacher)  # labeled beforehand: retrain takes those labels
    before = set(registry.targets())
    settings = RetrainSettings(model=MODEL, registry=registry.dir, capture=tmp_path / "ds", runs=tmp_path / "runs",
                               base_run=trained.base, work=tmp_path / "work", from_scratch=True, epochs=1,
                               max_regression=0.0)
    with pytest.raises(RetrainRefused, match="less accurate than the deployed model on the original validation"):
        retrain(settings)
    lines: list[str] = []
    progress = type("Lines", (Progress,), {"log": lambda self, line: lines.append(line)})()
    with pytest.raises(RetrainRefused):  # a retry in the same work folder reuses the finished candidate run
        retrain(settings, progress)
    assert any(line.startswith("reusing the finished run") for line in lines)
    assert len(list((tmp_path / "runs").iterdir())) == 1
    report = json.loads((tmp_path / "work" / "retrain.json").read_text())
    acc = report["accuracy"]["original_val"]
    assert acc["candidate"] < acc["deployed"] and report["refused"] and report["published"] == []
    assert set(registry.targets()) == before
    assert report["labels"]["labeled"] + sum(report["labels"]["unlabeled"].values()) == 200
