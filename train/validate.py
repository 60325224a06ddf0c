"""Data checks run before training: fatal findings stop the run, warnings go into the run record.

The checks (each a small function over the loaded, split data):

* schema: one sample shape, numeric values, readable files (found while loading);
* non-finite values (NaN, inf), naming the rows or files;
* label range: every label in ``[0, num_classes)``;
* empty classes (fatal) and tiny classes (warning), class imbalance (warning);
* leakage: identical samples (by content hash) in two splits (fatal unless allowed); duplicates within a
  split (warning);
* value ranges: features far beyond the usual scale, constant features (warnings).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeml.errors import DataError

if TYPE_CHECKING:
    from edgeml.train.config import TrainingConfig
    from edgeml.train.data import SplitData

__all__ = ["DataValidationError", "Finding", "validate"]

_SHOWN = 10  # items named per finding in messages


@dataclass(frozen=True)
class Finding:
    """One result of a data check.

    Attributes:
        level: ``fatal`` (stops the run) or ``warning`` (recorded).
        check: The check's name, e.g. ``non-finite``.
        message: What was found, in one line.
        items: The files, rows or classes concerned.
    """

    level: str
    check: str
    message: str
    items: tuple[str, ...] | list[str] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "check": self.check, "message": self.message, "items": list(self.items)}

    def line(self) -> str:
        shown = ", ".join(self.items[:_SHOWN]) + (f", … ({len(self.items) - _SHOWN} more)"
                                                  if len(self.items) > _SHOWN else "")
        return f"[{self.check}] {self.message}" + (f": {shown}" if shown else "")


class DataValidationError(DataError):
    """The training data failed a fatal check; ``findings`` lists every problem found."""

    def __init__(self, findings: list[Finding]) -> None:
        fatal = [f for f in findings if f.level == "fatal"]
        lines = "\n  ".join(f.line() for f in fatal)
        super().__init__(f"training data failed {len(fatal)} check(s):\n  {lines}",
                         hint="fix the data (or the [data]/[validation] settings) and run again")
        self.findings = findings


def _non_finite(sd: SplitData) -> list[Finding]:
    x = sd.data.x.reshape(len(sd.data.x), -1)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1)) if x.size else np.array([], np.int64)
    if not len(bad):
        return []
    return [Finding("fatal", "non-finite", f"{len(bad)} sample(s) hold NaN or inf", [sd.data.ids[i] for i in bad])]


def _labels(sd: SplitData, cfg: TrainingConfig) -> list[Finding]:
    y, n_cls = sd.data.y, cfg.data.num_classes or len(sd.data.class_names)
    bad = np.flatnonzero((y < 0) | (y >= n_cls))
    if not len(bad):
        return []
    return [Finding("fatal", "label-range", f"{len(bad)} label(s) outside [0, {n_cls})",
                    [f"{sd.data.ids[i]} (label {int(y[i])})" for i in bad])]


def _classes(sd: SplitData, cfg: TrainingConfig) -> list[Finding]:
    n_cls = cfg.data.num_classes or len(sd.data.class_names)
    counts = Counter(int(v) for v in sd.data.y[sd.index["train"]])
    names = sd.data.class_names
    label = [names[c] if c < len(names) else str(c) for c in range(n_cls)]
    out = []
    empty = [label[c] for c in range(n_cls) if counts.get(c, 0) == 0]
    if empty and len(sd.data.y):
        out.append(Finding("fatal", "empty-class", "class(es) with no training samples", empty))
    lim = cfg.validation.min_class_samples
    tiny = [f"{label[c]} ({counts[c]})" for c in range(n_cls) if 0 < counts.get(c, 0) < lim]
    if tiny:
        out.append(Finding("warning", "tiny-class", f"class(es) with fewer than {lim} training samples", tiny))
    present = [v for v in counts.values() if v]
    if present and max(present) > cfg.validation.max_imbalance * min(present):
        out.append(Finding("warning", "imbalance", f"largest class has {max(present)} training samples, "
                           f"smallest {min(present)} (over {cfg.validation.max_imbalance:g}x)"))
    return out


def _duplicates(sd: SplitData, cfg: TrainingConfig) -> list[Finding]:
    where: dict[str, list[tuple[str, int]]] = {}
    for split, idx in sd.index.items():
        for i in idx:
            where.setdefault(sd.data.hashes[i], []).append((split, int(i)))
    leaks: list[str] = []
    dups: list[str] = []
    for places in where.values():
        if len(places) < 2:
            continue
        named = " = ".join(f"{s}:{sd.data.ids[i]}" for s, i in places)
        (leaks if len({s for s, _ in places}) > 1 else dups).append(named)
    out = []
    if leaks:
        level = "warning" if cfg.validation.allow_split_overlap else "fatal"
        out.append(Finding(level, "leakage", f"{len(leaks)} sample(s) appear in more than one split "
                           "(identical content)", leaks))
    if dups:
        out.append(Finding("warning", "duplicates", f"{len(dups)} duplicated sample(s) within a split", dups))
    return out


def _ranges(sd: SplitData, cfg: TrainingConfig) -> list[Finding]:
    x = sd.data.x[sd.index["train"]]
    if not len(x) or not np.isfinite(x).all():
        return []
    flat = x.reshape(len(x), -1)
    out = []
    peak = float(np.abs(flat).max())
    if peak > cfg.validation.max_abs_value:
        out.append(Finding("warning", "value-range", f"values up to {peak:.3g} (beyond "
                           f"{cfg.validation.max_abs_value:g}); normalise the inputs"))
    if flat.ndim == 2 and sd.data.x.ndim == 2:
        const = [f"feature {j}" for j in np.flatnonzero(flat.std(axis=0) == 0)]
        if const:
            out.append(Finding("warning", "constant-feature", "feature(s) constant over the training split", const))
    return out


def validate(sd: SplitData, cfg: TrainingConfig) -> list[Finding]:
    """Run every check; return the warnings.

    Raises:
        DataValidationError: Any fatal finding (loading problems included); the message names the bad
            files or rows.
    """
    findings = list(sd.data.findings)
    if not any(f.level == "fatal" for f in findings):
        if not len(sd.data.y):
            findings.append(Finding("fatal", "schema", "the data source holds no samples"))
        else:
            findings += _non_finite(sd) + _labels(sd, cfg) + _classes(sd, cfg) + _duplicates(sd, cfg)
            findings += _ranges(sd, cfg)
            if not len(sd.index["val"]):
                findings.append(Finding("fatal", "schema", "the validation split is empty"))
    if any(f.level == "fatal" for f in findings):
        raise DataValidationError(findings)
    return findings
