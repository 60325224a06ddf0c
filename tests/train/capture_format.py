"""Capture dataset folders in the format ``edgeml fleet capture pull`` writes (the interface of issue 18), made
from arrays, for the labeling and retraining tests that do not run devices."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np


def write_capture_dataset(out: Path, x: np.ndarray, *, model: str, version: str, device: str = "cam-1",
                          confidence: np.ndarray | None = None) -> list[str]:
    """Write ``out`` (samples.npz, provenance.jsonl, dataset.json, labels.csv) for samples ``x``; returns the
    sample hashes (sha256 of each sample's raw bytes)."""
    out.mkdir(parents=True)
    hashes = [hashlib.sha256(np.ascontiguousarray(s).tobytes()).hexdigest() for s in x]
    np.savez(out / "samples.npz", x=x, sha256=np.array(hashes))
    now = dt.datetime(2026, 12, 3, tzinfo=dt.timezone.utc).isoformat()
    with (out / "provenance.jsonl").open("w") as fh:
        for i, h in enumerate(hashes):
            conf = None if confidence is None else float(confidence[i])
            fh.write(json.dumps({"sha256": h, "device_id": device, "model": model, "version": version,
                                 "target": "onnx", "confidence": conf, "predicted": None, "drift_score": None,
                                 "captured_at": now, "reason": "low_confidence", "tag": None}) + "\n")
    (out / "dataset.json").write_text(json.dumps({
        "model": model, "versions": [version], "filters": {"model": model}, "count": len(hashes),
        "created_at": now, "source": "test", "sha256": hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()}))
    (out / "labels.csv").write_text("sha256,label\n" + "".join(f"{h},\n" for h in hashes))
    return hashes
