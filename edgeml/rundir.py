"""The run directory: what ``edgeml train`` writes and ``edgeml compile RUN_DIR`` reads.

Layout (``schema = "edgeml.run/1"``)::

    RUN_DIR/
      run.json               the run record: id, name, version, hashes, status, warnings, final metrics
      config.json            the resolved training configuration (defaults included)
      data_manifest.json     files and per-sample hashes of every split, the dataset hash
      metrics.jsonl          one line per epoch
      checkpoints/epoch-NNNN.pt   model, optimiser, schedule and RNG states after each epoch
      model.pt               final state dict          model.onnx   the exported model (dynamic batch)
      refstats.json          reference statistics (edgeml.refstats/2) of the validation data
      model_card.md / model_card.json   overall, per-class and per-slice metrics
      data/calib.npz, data/val.npz, data/test.npz   arrays for `edgeml compile` (input, labels)

This module is stdlib-only so that the compiler can read a run without importing torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from edgeml import __version__
from edgeml.errors import ConfigError
from edgeml.fsutil import atomic_write_bytes

__all__ = ["RUN_RECORD", "RUN_SCHEMA", "RunDefaults", "default_version", "is_run_dir", "make_run_id",
           "read_run_record", "run_defaults", "write_json"]

RUN_SCHEMA = "edgeml.run/1"
RUN_RECORD = "run.json"


def make_run_id(dataset_sha256: str, config_sha256: str, code_version: str = __version__) -> str:
    """The run id: a short hash of the dataset hash, the config hash and the code version."""
    return hashlib.sha256(f"{dataset_sha256}|{config_sha256}|{code_version}".encode()).hexdigest()[:12]


def default_version(run_id: str) -> str:
    """The version of a run whose config names none: a semver pre-release, ``0.0.0-r<run id>``."""
    return f"0.0.0-r{run_id}"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n")


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a run record."""
    p = Path(path)
    return p.is_dir() and (p / RUN_RECORD).is_file()


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """The run record of ``run_dir``.

    Raises:
        ConfigError: No run record, or not one this version can read.
    """
    path = Path(run_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run_dir} is not a training run directory (cannot read {RUN_RECORD}: {exc})") from exc
    if not isinstance(record, dict) or record.get("schema") != RUN_SCHEMA:
        raise ConfigError(f"{path}: unsupported run record schema {record.get('schema')!r} (expected {RUN_SCHEMA})")
    return record


class RunDefaults:
    """What ``edgeml compile RUN_DIR`` takes from a finished run.

    Attributes:
        model: The exported ONNX model.
        name: Model name from the config.
        version: Version from the config, or ``0.0.0-r<run id>``.
        calib: Calibration arrays (from the training split).
        val: Validation arrays with labels.
        refstats: The run's reference statistics file.
        provenance: Run id, dataset and config hashes, for the bundle.
    """

    def __init__(self, run_dir: Path, record: dict[str, Any]) -> None:
        self.model = run_dir / "model.onnx"
        self.name = str(record["name"])
        self.version = str(record["version"])
        self.calib = run_dir / "data" / "calib.npz"
        self.val = run_dir / "data" / "val.npz"
        self.refstats = run_dir / "refstats.json"
        self.provenance = {"training_run": record["run_id"], "training_dataset_sha256": record["dataset_sha256"],
                           "training_config_sha256": record["config_sha256"]}


def run_defaults(run_dir: str | Path) -> RunDefaults:
    """Read a finished run for the compiler.

    Raises:
        ConfigError: Not a run directory, or the run has not finished (no exported model yet).
    """
    record = read_run_record(run_dir)
    if record.get("status") != "complete":
        raise ConfigError(f"training run {run_dir} has not finished (status {record.get('status')!r})",
                          hint=f"finish it with: edgeml train --resume {run_dir}")
    return RunDefaults(Path(run_dir), record)
