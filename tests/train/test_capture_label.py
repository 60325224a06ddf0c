"""Labeling a pulled capture dataset: the operator's CSV, a teacher (ONNX file or training run), both; counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeml.errors import ConfigError, DataError, ModelError
from edgeml.fleet.capture.label import label_dataset
from edgeml.fleet.capture.retrain import next_version, split_field_data
from tests.train.capture_format import write_capture_dataset
from tests.train.conftest import edgeml

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _teacher(path: Path, weights: np.ndarray, bias: np.ndarray) -> Path:
    """A linear ONNX classifier: logits = x @ weights + bias (input ``features``, N x F float32)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["logits"])],
        "teacher", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", weights.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", weights.shape[1]])],
        [numpy_helper.from_array(weights.astype(np.float32), "w"),
         numpy_helper.from_array(bias.astype(np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture
def field(tmp_path: Path) -> tuple[Path, list[str], np.ndarray, Path]:
    """12 samples of 3 features; the teacher predicts the largest feature, confident in proportion to the gap."""
    x = np.zeros((12, 3), np.float32)
    true = np.arange(12) % 3
    x[np.arange(12), true] = np.linspace(0.2, 6.0, 12)  # the first samples are nearly uniform: low confidence
    hashes = write_capture_dataset(tmp_path / "ds", x, model="m", version="1.0.0")
    return tmp_path / "ds", hashes, true, _teacher(tmp_path / "teacher.onnx", np.eye(3), np.zeros(3))


def _labels_doc(ds: Path) -> dict:
    return json.loads((ds / "labels.json").read_text())


def test_csv_labels_only_the_rows_filled_and_counts_the_rest(field: tuple) -> None:
    ds, hashes, true, _ = field
    (ds / "labels.csv").write_text("sha256,label\n" + "".join(f"{h},{true[i] if i % 2 else ''}\n"
                                                            for i, h in enumerate(hashes)))
    report = label_dataset(ds, csv_path=ds / "labels.csv")
    assert (report.total, report.labeled, report.unlabeled) == (12, 6, {"no_label": 6})
    with np.load(ds / "train.npz") as npz:
        assert list(npz["y"]) == [int(true[i]) for i in range(1, 12, 2)]
        assert list(npz["sha256"]) == hashes[1::2] and npz["x"].shape == (6, 3)
    doc = _labels_doc(ds)
    assert doc["counts"]["labeled"] == 6 and doc["counts"]["unlabeled"] == 6 and doc["teacher"] is None


def test_teacher_labels_with_its_confidence_and_min_confidence_keeps_doubtful_ones_out(field: tuple) -> None:
    ds, hashes, true, teacher = field
    report = label_dataset(ds, teacher=teacher, min_confidence=0.8)
    doc = _labels_doc(ds)
    conf = [s["teacher_confidence"] for s in doc["samples"]]
    assert conf == sorted(conf) and conf[0] < 0.5 < 0.95 < conf[-1]  # recorded for every sample
    low = sum(c < 0.8 for c in conf)
    assert 0 < low < 12
    assert report.unlabeled == {"below_min_confidence": low} and report.labeled == 12 - low
    with np.load(ds / "train.npz") as npz:
        assert list(npz["y"]) == [int(t) for t, c in zip(true, conf) if c >= 0.8]  # the teacher is right here
    assert doc["teacher"]["sha256"] and doc["min_confidence"] == 0.8
    assert all(s.get("source") == "teacher" for s in doc["samples"] if "label" in s)


def test_csv_wins_over_the_teacher_and_agreement_is_measured(field: tuple) -> None:
    ds, hashes, true, teacher = field
    wrong = (true[0] + 1) % 3
    (ds / "labels.csv").write_text(f"sha256,label\n{hashes[0]},{wrong}\n{hashes[5]},{true[5]}\n")
    report = label_dataset(ds, csv_path=ds / "labels.csv", teacher=teacher)
    assert report.by_source == {"csv": 2, "teacher": 10} and report.labeled == 12
    assert report.teacher_agreement == 0.5  # the teacher disagrees with the operator's (wrong) first label
    with np.load(ds / "train.npz") as npz:
        assert int(npz["y"][0]) == wrong


@pytest.mark.parametrize("csv_text, error, match", [
    ("sha256,label\n{h0},cat\n", DataError, "label 'cat' is not a class index"),
    ("sha256,label\n{h0},1\n{h0},2\n", DataError, "labeled 1 and 2"),
    ("hash,class\n{h0},1\n", DataError, "needs the columns sha256,label"),
    ("sha256,label\n" + "ab" * 32 + ",1\n", ConfigError, "labels none of the 12 samples"),
])
def test_bad_csv_is_refused_naming_the_rows(field: tuple, csv_text: str, error: type, match: str) -> None:
    ds, hashes, _, _ = field
    (ds / "labels.csv").write_text(csv_text.format(h0=hashes[0]))
    with pytest.raises(error, match=match):
        label_dataset(ds, csv_path=ds / "labels.csv")
    assert not (ds / "train.npz").exists()


def test_teacher_that_does_not_fit_and_missing_labels_are_refused(field: tuple, tmp_path: Path) -> None:
    ds, _, _, _ = field
    with pytest.raises(ModelError, match="failed on the samples"):
        label_dataset(ds, teacher=_teacher(tmp_path / "wide.onnx", np.ones((5, 2)), np.zeros(2)))  # 5 features
    with pytest.raises(ConfigError, match="give labels"):
        label_dataset(ds)
    with pytest.raises(ConfigError, match="neither an .onnx model nor a training run"):
        label_dataset(ds, teacher=tmp_path)
    with pytest.raises(DataError, match="is not a capture dataset"):
        label_dataset(tmp_path, teacher=tmp_path / "teacher.onnx")


def test_field_split_is_seeded_by_sample_hash(field: tuple, tmp_path: Path) -> None:
    ds, _, _, teacher = field
    label_dataset(ds, teacher=teacher)
    counts = split_field_data(ds, tmp_path, 0.25)
    assert counts == {"train": 9, "holdout": 3}
    first = np.load(tmp_path / "field-holdout.npz")["input"]
    split_field_data(ds, tmp_path, 0.25)
    assert np.array_equal(np.load(tmp_path / "field-holdout.npz")["input"], first)


@pytest.mark.parametrize("current, taken, expected", [("1.0.0", set(), "1.0.1"), ("1.0.0", {"1.0.1"}, "1.0.2"),
                                                      ("0.0.0-rabc", set(), "0.0.1"), ("2.3.4+build", set(), "2.3.5")])
def test_next_version(current: str, taken: set[str], expected: str) -> None:
    assert next_version(current, taken) == expected


def test_cli_label_prints_the_counts(field: tuple, tmp_path: Path) -> None:
    ds, _, _, teacher = field
    proc = edgeml("fleet", "capture", "label", ds, "--teacher", teacher, "--min-confidence", "0.8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = _labels_doc(ds)
    assert f"labeled {doc['counts']['labeled']} of 12 samples (teacher {doc['counts']['labeled']}); unlabeled " \
           f"{doc['counts']['unlabeled']} (below_min_confidence {doc['counts']['unlabeled']})" in proc.stdout
    assert f"--extra-data {ds}" in proc.stdout


def test_retrain_pulls_from_the_capture_store_and_names_the_missing_base_run(tmp_path: Path) -> None:
    """``--from-capture REGISTRY``: the samples are pulled (A's pull) into the work folder, their version read
    from the provenance, and with no bundle of that version naming a run, retrain stops before training."""
    import hashlib
    import io

    from edgeml.fleet.capture.retrain import RetrainSettings, retrain
    from edgeml.fleet.capture.store import CaptureArchive
    from edgeml.fleet.registry.repository import init_registry
    from edgeml.protocol.uploads import CaptureSample, UploadBegin

    registry = init_registry(tmp_path / "registry")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        buf = io.BytesIO()
        np.save(buf, rng.standard_normal(3).astype(np.float32))
        samples.append((CaptureSample(seq=i, captured_at=1.7e9 + i, shape=[3], dtype="float32", model="m",
                                      version="1.4.0", confidence=0.3), buf.getvalue()))
    stream = b"".join(b for _, b in samples)
    begin = UploadBegin(device_id="cam-1", upload="u1", size=len(stream), sha256=hashlib.sha256(stream).hexdigest(),
                        chunk=4096, samples=6, trigger="command", tag="t1")
    db = registry.database()
    try:
        CaptureArchive(db, registry.dir).add("cam-1", begin, samples)
    finally:
        db.close()
    settings = RetrainSettings(model="m", registry=registry.dir, capture=registry.dir, runs=tmp_path / "runs",
                               work=tmp_path / "work", teacher=tmp_path / "none.onnx", pull={"tag": "t1"})
    with pytest.raises(ConfigError, match="m 1.4.0 has no published bundle naming its training run"):
        retrain(settings)
    with np.load(tmp_path / "work" / "capture" / "samples.npz") as npz:
        assert npz["x"].shape == (6, 3)
