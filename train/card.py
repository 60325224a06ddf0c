"""After training: ONNX export with a parity check, reference statistics, and the model card.

The model card (``model_card.json`` and ``model_card.md``) holds overall metrics per split, per-class
precision/recall/F1 and, when the data has a slice column, accuracy per slice.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgeml._deps import require
from edgeml.errors import ModelError
from edgeml.fsutil import atomic_write_bytes
from edgeml.refstats import compute_reference_stats

__all__ = ["classification_metrics", "export_with_parity", "model_card_markdown", "onnx_outputs",
           "write_refstats"]


def export_with_parity(model: Any, example: np.ndarray, path: Path, *, opset: int, atol: float) -> float:
    """Export ``model`` to ONNX (input ``input``, output ``output``, dynamic batch) and check it.

    Returns:
        The max abs difference between torch and onnxruntime outputs on ``example``.

    Raises:
        ModelError: The export fails, or differs from torch by more than ``atol`` (scaled by the outputs).
    """
    torch = require("torch", "train")
    tmp = path.with_name(f".{path.name}.tmp")
    model = model.cpu().eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.from_numpy(example[:1]),), str(tmp), dynamo=False,
                              input_names=["input"], output_names=["output"], opset_version=opset,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    except Exception as exc:
        raise ModelError(f"ONNX export failed (opset {opset}): {exc}") from exc
    with torch.no_grad():
        expected = model(torch.from_numpy(example)).numpy()
    got = onnx_outputs(tmp, example)
    parity = float(np.abs(got - expected).max()) if expected.size else 0.0
    if parity > atol * max(1.0, float(np.abs(expected).max())):
        tmp.unlink(missing_ok=True)
        raise ModelError(f"the ONNX export differs from PyTorch by {parity:.3g} (max abs, allowed {atol:g})")
    os.replace(tmp, path)
    return parity


def onnx_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    """Run an ONNX model on ``x`` with onnxruntime (CPU)."""
    ort = require("onnxruntime", "ort")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {"input": x[i:i + 512]})[0] for i in range(0, len(x), 512)]
    return np.concatenate(outs)


def write_refstats(path: Path, x_val: np.ndarray, outputs: np.ndarray) -> None:
    """Reference statistics (edgeml.refstats/2) of the validation inputs and the exported model's outputs."""
    atomic_write_bytes(path, compute_reference_stats({"input": x_val}, outputs).to_json())


def classification_metrics(logits: np.ndarray, y: np.ndarray, class_names: list[str],
                           slices: np.ndarray | None = None, sources: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, and accuracy and count per slice and per data source
    (``base`` and each extra data source) when given."""
    pred = logits.argmax(1) if len(logits) else np.zeros(0, np.int64)
    out: dict[str, Any] = {"n": int(len(y)), "accuracy": float((pred == y).mean()) if len(y) else 0.0}
    per_class = {}
    for c, name in enumerate(class_names):
        tp = int(((pred == c) & (y == c)).sum())
        p_den, r_den = int((pred == c).sum()), int((y == c).sum())
        prec = tp / p_den if p_den else 0.0
        rec = tp / r_den if r_den else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[name] = {"precision": prec, "recall": rec, "f1": f1, "support": r_den}
    out["per_class"] = per_class
    for key, groups in (("per_slice", slices), ("per_source", sources)):
        if groups is not None:  # slices sorted by name, sources in the config's order
            names = sorted(set(groups.tolist())) if key == "per_slice" else list(dict.fromkeys(groups.tolist()))
            out[key] = {str(s): {"accuracy": float((pred[groups == s] == y[groups == s]).mean()),
                                 "n": int((groups == s).sum())} for s in names}
    return out


def model_card_markdown(card: dict[str, Any]) -> str:
    """The model card as markdown."""
    lines = [f"# {card['name']} {card['version']}", "", f"Run `{card['run_id']}`, architecture `{card['arch']}`, "
             f"trained {card['epochs']} epochs on `{card['data']}` (dataset sha256 `{card['dataset_sha256'][:16]}…`).",
             *([f"Fine-tuned from run `{card['init_from']['run_id']}`."] if card.get("init_from") else []),
             *([f"Data sources: {', '.join(f'`{s}`' for s in card['sources'])}."] if card.get("sources") else []),
             "", "## Overall", "", "| split | samples | accuracy |", "|---|---|---|"]
    for split, m in card["metrics"].items():
        lines.append(f"| {split} | {m['n']} | {100 * m['accuracy']:.2f}% |")
    for split, m in card["metrics"].items():
        lines += ["", f"## Per class ({split})", "", "| class | precision | recall | f1 | support |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
                  for c, v in m["per_class"].items()]
        for key, title in (("per_slice", "slice"), ("per_source", "source")):
            if key in m:
                lines += ["", f"## Per {title} ({split})", "", f"| {title} | samples | accuracy |", "|---|---|---|"]
                lines += [f"| {s} | {v['n']} | {100 * v['accuracy']:.2f}% |" for s, v in m[key].items()]
    if card.get("warnings"):
        lines += ["", "## Data warnings", ""] + [f"- {w}" for w in card["warnings"]]
    lines += ["", f"ONNX export: opset {card['opset']}, max abs difference to PyTorch {card['parity_max_abs']:.3g}.",
              ""]
    return "\n".join(lines)
