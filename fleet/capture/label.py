"""Labels for a pulled capture dataset: an operator's CSV keyed by sample sha256, and/or a teacher model.

Reads a folder written by ``edgeml fleet capture pull`` (``samples.npz`` with ``x`` and ``sha256``) and writes
into it::

    train.npz     x, y (int64 class index) and sha256 of the labeled samples only: what ``edgeml train``
                  reads as extra data (``--extra-data DIR`` or ``data.extra``)
    labels.json   where each label came from (``csv`` or ``teacher``), the teacher's prediction and confidence
                  for every sample it saw, and the counts: labeled, unlabeled, and why

A label from the CSV wins over the teacher's (a person looked at the sample). A teacher label below
``min_confidence`` is not used: that sample stays unlabeled, out of training, and is counted. The teacher is
any ONNX model run with onnxruntime, or a finished ``edgeml train`` run (its exported FP32 ``model.onnx``).
Both files are written atomically, ``labels.json`` last.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml._deps import require
from edgeml.errors import ConfigError, DataError, ModelError
from edgeml.fsutil import atomic_write_bytes

__all__ = ["LABELS_SCHEMA", "LabelReport", "Teacher", "label_dataset", "load_samples", "read_label_csv"]

LABELS_SCHEMA = "edgeml.capture-labels/1"
_BATCH = 256


@dataclass
class LabelReport:
    """What :func:`label_dataset` did.

    Attributes:
        path: The dataset folder.
        total: Samples in the dataset.
        labeled: Samples written to ``train.npz``.
        by_source: Labeled samples per source (``csv``, ``teacher``).
        unlabeled: Samples left out, per reason (``no_label``, ``below_min_confidence``).
        classes: Labeled samples per class index.
        teacher_agreement: Where both the CSV and the teacher labeled a sample, the fraction they agree on.
    """

    path: Path
    total: int
    labeled: int
    by_source: dict[str, int] = field(default_factory=dict)
    unlabeled: dict[str, int] = field(default_factory=dict)
    classes: dict[int, int] = field(default_factory=dict)
    teacher_agreement: float | None = None

    @property
    def unlabeled_total(self) -> int:
        return sum(self.unlabeled.values())


def load_samples(dataset: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays (input name -> N x ...) and sample hashes of a pulled dataset.

    Raises:
        DataError: Not a pulled dataset, or its arrays disagree with its hashes.
    """
    path = Path(dataset) / "samples.npz"
    if not path.is_file():
        raise DataError(f"{dataset} is not a capture dataset (no samples.npz)",
                        hint="write one with `edgeml fleet capture pull MODEL --out DIR`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    hashes = [str(h) for h in arrays.pop("sha256", [])]
    names = ["x"]
    if (Path(dataset) / "inputs.json").is_file():
        names = list(json.loads((Path(dataset) / "inputs.json").read_text()))
    inputs = {n: arrays[n] for n in names if n in arrays}
    if not inputs or any(len(a) != len(hashes) for a in inputs.values()):
        raise DataError(f"{path}: expected {', '.join(names)} and sha256 of one length, found "
                        f"{', '.join(f'{k} {v.shape}' for k, v in arrays.items())}")
    return inputs, hashes


def read_label_csv(path: Path, class_names: list[str] | None = None) -> dict[str, int]:
    """sha256 -> class index from the operator's CSV (``sha256,label``; empty labels are skipped).

    A label is a class index, or a class name when ``class_names`` is known.

    Raises:
        DataError: No sha256/label columns, a label that is neither, or one sample given two labels (the
            rows are named).
    """
    try:
        rows = list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8-sig"))))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels {path}: {exc}") from exc
    if rows and not {"sha256", "label"} <= set(rows[0]):
        raise DataError(f"{path} needs the columns sha256,label (found {', '.join(rows[0])})")
    out: dict[str, int] = {}
    bad: list[str] = []
    for n, row in enumerate(rows, start=2):
        sha, text = (row.get("sha256") or "").strip().lower(), (row.get("label") or "").strip()
        if not text:
            continue
        if text.lstrip("-").isdigit():
            value = int(text)
        elif class_names and text in class_names:
            value = class_names.index(text)
        else:
            bad.append(f"row {n}: label {text!r} is not a class index" + (" or name" if class_names else ""))
            continue
        if value < 0:
            bad.append(f"row {n}: negative label {value}")
        elif out.get(sha, value) != value:
            bad.append(f"row {n}: {sha[:12]} labeled {out[sha]} and {value}")
        out[sha] = value
    if bad:
        raise DataError(f"{path}: {len(bad)} bad label(s): {'; '.join(bad[:10])}", hint="fix those rows")
    return out


class Teacher:
    """A model that labels samples: an ONNX file, or a finished training run (its FP32 ``model.onnx``).

    Raises:
        ConfigError: The path is neither.
        ModelError: onnxruntime cannot load the model.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from edgeml.rundir import is_run_dir, read_run_record

        p = Path(path)
        self.run_id: str | None = None
        self.class_names: list[str] | None = None
        if is_run_dir(p):
            record = read_run_record(p)
            if record.get("status") != "complete" or not (p / "model.onnx").is_file():
                raise ConfigError(f"teacher run {p} has not finished (no model.onnx)")
            self.run_id = str(record["run_id"])
            manifest = p / "data_manifest.json"
            if manifest.is_file():
                self.class_names = json.loads(manifest.read_text()).get("class_names") or None
            p = p / "model.onnx"
        if not p.is_file() or p.suffix.lower() != ".onnx":
            raise ConfigError(f"teacher {path} is neither an .onnx model nor a training run directory")
        self.path = p
        self.sha256 = hashlib.sha256(p.read_bytes()).hexdigest()
        ort = require("onnxruntime", "ort")
        try:
            self.session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load teacher {p}: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        return {"model": str(self.path), "sha256": self.sha256, "run_id": self.run_id}

    def predict(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Top-1 class and its probability per sample (softmax applied to outputs that are not probabilities).

        Raises:
            ModelError: The teacher's inputs do not match the samples', or its output is not class scores.
        """
        from edgeml.refstats import to_probabilities

        declared = self.session.get_inputs()
        feeds = dict(inputs)
        if len(declared) == 1 and len(feeds) == 1:
            feeds = {declared[0].name: next(iter(feeds.values()))}
        if {d.name for d in declared} != set(feeds):
            raise ModelError(f"teacher {self.path} takes {', '.join(d.name for d in declared)}; the samples are "
                             f"{', '.join(feeds)}")
        n = len(next(iter(feeds.values())))
        probs = []
        for start in range(0, n, _BATCH):
            chunk = {d.name: _as_input(feeds[d.name][start:start + _BATCH], d.type) for d in declared}
            try:
                out = np.asarray(self.session.run(None, chunk)[0])
            except Exception as exc:
                raise ModelError(f"teacher {self.path} failed on the samples: {exc}") from exc
            if out.ndim != 2 or out.shape[1] < 2:
                raise ModelError(f"teacher {self.path} outputs shape {list(out.shape)}, not class scores (N x C)")
            probs.append(to_probabilities(out.astype(np.float64)))
        p = np.concatenate(probs) if probs else np.zeros((0, 2))
        return p.argmax(1).astype(np.int64), p.max(1) if len(p) else np.zeros(0)


def _as_input(x: np.ndarray, onnx_type: str) -> np.ndarray:
    kinds = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
             "tensor(int8)": np.int8}
    want = kinds.get(onnx_type)
    return np.ascontiguousarray(x if want is None or x.dtype == want else x.astype(want))


def label_dataset(dataset: str | os.PathLike[str], *, csv_path: str | os.PathLike[str] | None = None,
                  teacher: str | os.PathLike[str] | Teacher | None = None,
                  min_confidence: float | None = None, class_names: list[str] | None = None) -> LabelReport:
    """Label a pulled dataset and write ``train.npz`` and ``labels.json`` into it (see the module docstring).

    Args:
        dataset: The folder ``edgeml fleet capture pull`` wrote.
        csv_path: The operator's ``sha256,label`` file (``DIR/labels.csv`` once filled).
        teacher: An ONNX model or a finished training run that labels what the CSV does not.
        min_confidence: Teacher labels below this top-1 probability (0..1) are not used.
        class_names: Class names the CSV may use instead of indices (default: the teacher run's).

    Raises:
        ConfigError: Neither labels nor a teacher, a bad ``min_confidence``, or a CSV that names no sample of
            this dataset.
        DataError: An unreadable dataset or CSV.
        ModelError: A teacher that cannot label these samples.
    """
    root = Path(dataset)
    if csv_path is None and teacher is None:
        raise ConfigError("give labels: --labels FILE.csv (sha256,label), --teacher MODEL, or both")
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence {min_confidence} is not between 0 and 1")
    inputs, hashes = load_samples(root)
    judge = teacher if isinstance(teacher, Teacher) or teacher is None else Teacher(teacher)
    names = class_names or (judge.class_names if judge else None)
    given = read_label_csv(Path(csv_path), names) if csv_path is not None else {}
    known = set(hashes)
    if given and not known & set(given):
        raise ConfigError(f"{csv_path} labels none of the {len(hashes)} samples of {root}",
                          hint="it belongs to another pull; label this dataset's labels.csv")
    t_pred, t_conf = judge.predict(inputs) if judge else (None, None)
    samples, keep, labels = [], [], []
    unlabeled: Counter[str] = Counter()
    for i, sha in enumerate(hashes):
        entry: dict[str, Any] = {"sha256": sha}
        if t_pred is not None and t_conf is not None:
            entry.update(teacher_label=int(t_pred[i]), teacher_confidence=round(float(t_conf[i]), 6))
        if sha in given:
            entry.update(label=given[sha], source="csv")
        elif t_pred is not None and t_conf is not None:
            if min_confidence is None or t_conf[i] >= min_confidence:
                entry.update(label=int(t_pred[i]), source="teacher")
            else:
                entry["unlabeled"] = "below_min_confidence"
        else:
            entry["unlabeled"] = "no_label"
        if "label" in entry:
            keep.append(i)
            labels.append(entry["label"])
        else:
            unlabeled[entry["unlabeled"]] += 1
        samples.append(entry)
    report = _report(root, samples, keep, labels, unlabeled, given, known)
    _write(root, inputs, hashes, keep, labels, samples, report, csv_path, judge, min_confidence)
    return report


def _report(root: Path, samples: list[dict[str, Any]], keep: list[int], labels: list[int],
            unlabeled: Counter[str], given: dict[str, int], known: set[str]) -> LabelReport:
    both = [s for s in samples if s.get("source") == "csv" and "teacher_label" in s]
    agreement = (sum(s["label"] == s["teacher_label"] for s in both) / len(both)) if both else None
    report = LabelReport(root, len(samples), len(keep), dict(Counter(s["source"] for s in samples if "source" in s)),
                         dict(unlabeled), dict(sorted(Counter(labels).items())), agreement)
    if set(given) - known:
        report.by_source["csv_rows_not_in_dataset"] = len(set(given) - known)
    return report


def _write(root: Path, inputs: dict[str, np.ndarray], hashes: list[str], keep: list[int], labels: list[int],
           samples: list[dict[str, Any]], report: LabelReport, csv_path: Any, teacher: Teacher | None,
           min_confidence: float | None) -> None:
    idx = np.asarray(keep, np.int64)
    arrays = {name: a[idx] for name, a in inputs.items()}
    buf = io.BytesIO()
    arrays.update(y=np.asarray(labels, np.int64), sha256=np.asarray([hashes[i] for i in keep]))
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(root / "train.npz", buf.getvalue())
    dataset_sha = None
    if (root / "dataset.json").is_file():
        dataset_sha = json.loads((root / "dataset.json").read_text()).get("sha256")
    doc = {"schema": LABELS_SCHEMA, "dataset_sha256": dataset_sha,
           "csv": {"path": str(csv_path), "sha256": hashlib.sha256(Path(csv_path).read_bytes()).hexdigest()}
           if csv_path is not None else None,
           "teacher": teacher.describe() if teacher else None, "min_confidence": min_confidence,
           "counts": {"total": report.total, "labeled": report.labeled, "unlabeled": report.unlabeled_total,
                      "by_source": report.by_source, "unlabeled_by_reason": report.unlabeled,
                      "classes": {str(k): v for k, v in report.classes.items()}},
           "teacher_agreement": report.teacher_agreement, "samples": samples}
    atomic_write_bytes(root / "labels.json", json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n")
