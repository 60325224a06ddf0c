"""Training data: load a source (digits, image folder, .npz, .csv) into arrays, split it, hash it.

Loading never stops at the first bad sample: unreadable images, mixed sizes or non-numeric cells become
:class:`~edgeml.train.validate.Finding` records so that one report names every bad file or row. Each
sample keeps an id (file path, row number or index) and a content hash, used for leakage checks, the
data manifest and the dataset hash that goes into the run id.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml._deps import require
from edgeml.train.config import DataConfig, TrainingConfig
from edgeml.train.validate import Finding

__all__ = ["CAPTURE_TRAIN", "SPLITS", "Loaded", "SplitData", "load_training_data", "merge_extra"]

SPLITS = ("train", "val", "test")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Loaded:
    """Samples of one source before splitting.

    Attributes:
        x: Inputs, float32, batch first (NCHW for images).
        y: Integer labels.
        ids: One id per sample (relative file path, ``row N`` or ``index N``).
        hashes: One content hash per sample (file bytes for images, array bytes otherwise).
        class_names: Names of the classes (folder names, CSV label values, or digits).
        slices: Slice name per sample (CSV slice column), or None.
        files: File -> sha256 of every file read (the data manifest).
        findings: Problems met while loading.
        split: Preassigned split name per sample (explicit split paths), or None.
    """

    x: np.ndarray
    y: np.ndarray
    ids: list[str]
    hashes: list[str]
    class_names: list[str]
    slices: np.ndarray | None = None
    files: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    split: np.ndarray | None = None


@dataclass
class SplitData:
    """The loaded data and the index of each split.

    Attributes:
        data: Every sample, the base source's first.
        index: Split name -> sample indices.
        kind: The base source's kind (``digits``, ``images``, ``npz:explicit``...).
        sources: Names of the data sources: ``base`` (the configured source or splits), then each
            ``data.extra`` entry as written in the config.
        source_of: Per sample, its index in ``sources``.
    """

    data: Loaded
    index: dict[str, np.ndarray]
    kind: str
    sources: list[str] = field(default_factory=lambda: ["base"])
    source_of: np.ndarray | None = None

    def source_array(self) -> np.ndarray:
        """The source name of every sample (``base`` for all when there is no extra data)."""
        names = np.asarray(self.sources)
        return names[self.source_of] if self.source_of is not None else np.full(len(self.data.y), "base")

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        idx = self.index[split]
        return self.data.x[idx], self.data.y[idx]

    def digest(self) -> str:
        """The dataset hash: every sample's id, content hash, label and split, in order."""
        h = hashlib.sha256(self.kind.encode())
        for split in SPLITS:
            for i in self.index[split]:
                h.update(f"{split}|{self.data.ids[i]}|{self.data.hashes[i]}|{int(self.data.y[i])}\n".encode())
        return h.hexdigest()

    def manifest(self) -> dict[str, Any]:
        """The data manifest: files with hashes, and the samples of every split."""
        d = self.data
        out = {"kind": self.kind, "dataset_sha256": self.digest(), "class_names": d.class_names,
               "files": d.files, "input_shape": list(d.x.shape[1:]),
               "splits": {s: [{"id": d.ids[i], "sha256": d.hashes[i], "label": int(d.y[i])}
                              for i in self.index[s]] for s in SPLITS}}
        if len(self.sources) > 1:  # which samples came from which source, per split
            of = self.source_array()
            out["sources"] = {name: {s: int((of[self.index[s]] == name).sum()) for s in SPLITS}
                              for name in self.sources}
        return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digits(cfg: DataConfig) -> Loaded:
    datasets = require("sklearn.datasets", "train")
    raw = datasets.load_digits()
    x = (raw.images.astype(np.float32) / 16.0)[:, None]
    if cfg.image_size and tuple(cfg.image_size) != (8, 8):
        hi = (np.arange(cfg.image_size[0]) * 8 // cfg.image_size[0]).astype(np.int64)
        wi = (np.arange(cfg.image_size[1]) * 8 // cfg.image_size[1]).astype(np.int64)
        x = x[:, :, hi][:, :, :, wi]
    if cfg.channels != 1:
        x = np.repeat(x, cfg.channels, axis=1)
    x = np.ascontiguousarray(x)
    return Loaded(x, raw.target.astype(np.int64), [f"index {i}" for i in range(len(x))],
                  [_sha(s.tobytes()) for s in x], [str(i) for i in range(10)],
                  files={"sklearn:digits": _sha(raw.images.tobytes())})


def _read_image(path: Path, cfg: DataConfig, image_mod: Any) -> np.ndarray:
    with image_mod.open(path) as img:
        img = img.convert("L" if cfg.channels == 1 else "RGB")
        if cfg.image_size:
            img = img.resize((cfg.image_size[1], cfg.image_size[0]))
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)).copy()


def _image_files(folder: Path, findings: list[Finding]) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        findings.append(Finding("fatal", "schema", f"{folder} has no class sub-folders (one per class)",
                                [str(folder)]))
    files: list[tuple[Path, int]] = []
    for idx, sub in enumerate(classes):
        found = [f for f in sorted(sub.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
        if not found:
            findings.append(Finding("fatal", "empty-class", f"class folder {sub} holds no images", [str(sub)]))
        files += [(f, idx) for f in found]
    return files, [c.name for c in classes]


def _images(folder: Path, cfg: DataConfig, root: Path) -> Loaded:
    image_mod = require("PIL.Image", "compile")
    findings: list[Finding] = []
    files, classes = _image_files(folder, findings)
    samples, ids, hashes, labels, manifest, bad = [], [], [], [], {}, []
    for f, label in files:
        raw = f.read_bytes()
        rel = str(f.relative_to(root))
        manifest[rel] = _sha(raw)
        try:
            arr = _read_image(f, cfg, image_mod)
        except (OSError, ValueError, SyntaxError) as exc:
            bad.append(f"{f} ({type(exc).__name__})")
            continue
        samples.append(arr)
        ids.append(rel)
        hashes.append(manifest[rel])
        labels.append(label)
    if bad:
        findings.append(Finding("fatal", "corrupt-file", f"{len(bad)} image(s) cannot be read", bad))
    shapes: dict[tuple[int, ...], list[str]] = {}
    for s, i in zip(samples, ids):
        shapes.setdefault(s.shape, []).append(i)
    if len(shapes) > 1:
        common = max(shapes, key=lambda k: len(shapes[k]))
        odd = [f"{i} {'x'.join(map(str, k[1:]))}" for k, v in shapes.items() if k != common for i in v]
        findings.append(Finding("fatal", "schema", f"images differ in size (most are "
                                f"{'x'.join(map(str, common[1:]))}); set data.image_size to resize", odd))
        samples = [s for s in samples if s.shape == common] if common else samples
        keep = set(shapes[common])
        labels = [lb for lb, i in zip(labels, ids) if i in keep]
        hashes = [h for h, i in zip(hashes, ids) if i in keep]
        ids = [i for i in ids if i in keep]
    x = np.stack(samples) if samples else np.zeros((0, cfg.channels, 1, 1), np.float32)
    return Loaded(x, np.asarray(labels, np.int64), ids, hashes, classes, files=manifest, findings=findings)


def _npz(path: Path, root: Path) -> Loaded:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    xs = [k for k in ("x", "input", "inputs", "data") if k in arrays]
    ys = [k for k in ("y", "labels", "label") if k in arrays]
    findings: list[Finding] = []
    if not xs or not ys:
        findings.append(Finding("fatal", "schema", f"{path} needs an input array (x or input) and labels (y or "
                                f"labels); found {', '.join(sorted(arrays)) or 'nothing'}", [str(path)]))
        return Loaded(np.zeros((0, 1), np.float32), np.zeros(0, np.int64), [], [], [], findings=findings)
    x, y = arrays[xs[0]], arrays[ys[0]]
    if x.dtype.kind not in "fiub" or y.dtype.kind not in "iu" or y.ndim != 1 or len(y) != len(x):
        findings.append(Finding("fatal", "schema", f"{path}: inputs must be numeric and labels one integer per "
                                f"sample (got x {x.dtype} {x.shape}, labels {y.dtype} {y.shape})", [str(path)]))
        return Loaded(np.zeros((0, 1), np.float32), np.zeros(0, np.int64), [], [], [], findings=findings)
    x = np.ascontiguousarray(x.astype(np.float32))
    rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    n_cls = int(y.max()) + 1 if len(y) else 0
    return Loaded(x, y.astype(np.int64), [f"{rel}[{i}]" for i in range(len(x))], [_sha(s.tobytes()) for s in x],
                  [str(i) for i in range(n_cls)], files={rel: _sha(path.read_bytes())})


def _csv_rows(path: Path, cfg: DataConfig) -> tuple[list[str], list[list[str]], Finding | None]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return [], [], Finding("fatal", "schema", f"{path} is empty", [str(path)])
    header, body = rows[0], rows[1:]
    if cfg.label_column not in header:
        return header, body, Finding("fatal", "schema", f"{path} has no label column {cfg.label_column!r} "
                                     f"(columns: {', '.join(header)}); set data.label_column", [str(path)])
    if cfg.slice_column and cfg.slice_column not in header:
        return header, body, Finding("fatal", "schema", f"{path} has no slice column {cfg.slice_column!r}",
                                     [str(path)])
    return header, body, None


def _csv(path: Path, cfg: DataConfig, root: Path) -> Loaded:
    header, body, problem = _csv_rows(path, cfg)
    rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    empty = Loaded(np.zeros((0, 1), np.float32), np.zeros(0, np.int64), [], [], [],
                   files={rel: _sha(path.read_bytes())}, findings=[problem] if problem else [])
    if problem:
        return empty
    li = header.index(cfg.label_column)
    si = header.index(cfg.slice_column) if cfg.slice_column else None
    feats = [i for i in range(len(header)) if i not in (li, si)]
    x = np.zeros((len(body), len(feats)), np.float32)
    bad = []
    for r, row in enumerate(body):
        for j, c in enumerate(feats):
            try:
                x[r, j] = float(row[c])
            except (ValueError, IndexError):
                bad.append(f"{rel} row {r + 2} column {header[c]!r}: {row[c] if c < len(row) else '<missing>'!r}")
    raw_labels = [row[li] if li < len(row) else "" for row in body]
    numeric = all(v.strip().lstrip("-").isdigit() for v in raw_labels)
    classes = sorted(set(raw_labels), key=(lambda v: int(v)) if numeric else str)
    y = np.array([int(v) for v in raw_labels] if numeric else [classes.index(v) for v in raw_labels], np.int64)
    if numeric:
        classes = [str(i) for i in range(int(y.max()) + 1)] if len(y) else []
    empty.findings += [Finding("fatal", "schema", f"{len(bad)} non-numeric cell(s)", bad)] if bad else []
    slices = np.array([row[si] for row in body]) if si is not None else None
    return Loaded(x, y, [f"{rel} row {r + 2}" for r in range(len(body))], [_sha(s.tobytes()) for s in x],
                  classes, slices, empty.files, empty.findings)


def _kind(path: Path, cfg: DataConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    if path.is_dir():
        return "images"
    return {".npz": "npz", ".csv": "csv"}.get(path.suffix.lower(), "unknown")


def _load_one(source: str, cfg: TrainingConfig, explicit: bool = False) -> tuple[Loaded, str]:
    if source == "digits" and cfg.data.kind in ("auto", "digits"):
        return _digits(cfg.data), "digits"
    path = cfg.resolve(source)
    if not path.exists():
        return Loaded(np.zeros((0, 1), np.float32), np.zeros(0, np.int64), [], [], [], findings=[
            Finding("fatal", "missing", f"data source {path} does not exist", [str(path)])]), "missing"
    kind, root = _kind(path, cfg.data), Path(cfg.base_dir)
    if kind == "images":
        return _images(path, cfg.data, root if explicit or not path.is_dir() else path), kind
    if kind == "npz":
        return _npz(path, root), kind
    if kind == "csv":
        return _csv(path, cfg.data, root), kind
    return Loaded(np.zeros((0, 1), np.float32), np.zeros(0, np.int64), [], [], [], findings=[
        Finding("fatal", "schema", f"{path}: unknown data format (image folder, .npz, .csv or digits)",
                [str(path)])]), kind


def _concat(parts: list[tuple[str, Loaded]]) -> Loaded:
    first = parts[0][1]
    findings = [f for _, p in parts for f in p.findings]
    shapes = {p.x.shape[1:] for _, p in parts if len(p.x)}
    if len(shapes) > 1:
        findings.append(Finding("fatal", "schema", "splits have different sample shapes",
                                [f"{s}: {'x'.join(map(str, p.x.shape[1:]))}" for s, p in parts]))
        return Loaded(first.x[:0], first.y[:0], [], [], first.class_names, findings=findings)
    names = max((p.class_names for _, p in parts), key=len)
    return Loaded(np.concatenate([p.x for _, p in parts]), np.concatenate([p.y for _, p in parts]),
                  [i for _, p in parts for i in p.ids], [h for _, p in parts for h in p.hashes], names,
                  None if any(p.slices is None for _, p in parts) else np.concatenate([p.slices for _, p in parts
                                                                                       if p.slices is not None]),
                  {k: v for _, p in parts for k, v in p.files.items()}, findings,
                  np.array([s for s, p in parts for _ in p.ids]))


def _random_split(data: Loaded, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Seeded split over groups of identical samples, so a random split never leaks a duplicate."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(data.hashes):
        groups.setdefault(h, []).append(i)
    keys = sorted(groups)
    order = np.random.default_rng(cfg.split_seed).permutation(len(keys))
    n = len(data.hashes)
    n_val, n_test = round(n * cfg.val_fraction), round(n * cfg.test_fraction)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for k in order:
        members = groups[keys[k]]
        split = "val" if len(out["val"]) < n_val else "test" if len(out["test"]) < n_test else "train"
        out[split] += members
    return {s: np.sort(np.asarray(v, np.int64)) for s, v in out.items()}


def load_training_data(cfg: TrainingConfig) -> SplitData:
    """Load the configured source(s) and split them (seeded, or as given by explicit split paths).

    Each ``data.extra`` source is loaded, split with the same fractions and seed, and appended after the base
    data; the base data's split does not change. An extra sample identical to a base sample joins that
    sample's split, so merging never leaks.

    Problems are returned as findings on ``data.findings``; :func:`edgeml.train.validate.validate` judges them.
    """
    d = cfg.data
    if d.train is not None and d.val is not None:
        paths = (("train", d.train), ("val", d.val), ("test", d.test))
        loaded = [(s, _load_one(p, cfg, explicit=True)) for s, p in paths if p is not None]
        data, kind = _concat([(s, lk[0]) for s, lk in loaded]), loaded[0][1][1]
        split = data.split if data.split is not None else np.array([], str)
        index = {s: np.flatnonzero(split == s).astype(np.int64) for s in SPLITS}
        base = SplitData(data, index, f"{kind}:explicit")
    else:
        data, kind = _load_one(d.source, cfg)
        base = SplitData(data, _random_split(data, d), kind)
    for source in d.extra:
        base = merge_extra(base, source, _load_extra(source, cfg), d)
    return base


CAPTURE_TRAIN = "train.npz"  # what `edgeml fleet capture label` writes into a capture dataset folder


def _load_extra(source: str, cfg: TrainingConfig) -> Loaded:
    """One ``data.extra`` entry: a labeled capture dataset folder (its ``train.npz``), or any data source."""
    path = cfg.resolve(source)
    if path.is_dir() and (path / CAPTURE_TRAIN).is_file():
        return _load_one(str(path / CAPTURE_TRAIN), cfg)[0]
    if path.is_dir() and (path / "samples.npz").is_file():  # a pulled capture dataset, not labeled yet
        return Loaded(np.zeros((0, 1), np.float32), np.zeros(0, np.int64), [], [], [], findings=[
            Finding("fatal", "missing", f"capture dataset {path} has no labels yet ({CAPTURE_TRAIN})",
                    [f"label it: edgeml fleet capture label {path} --labels FILE.csv (or --teacher MODEL)"])])
    return _load_one(source, cfg)[0]


def _same_classes(names: list[str], extra: Loaded, source: str) -> tuple[Loaded, Finding | None]:
    """``extra`` with its labels as indices into the base's classes, where its classes have names (image
    folders, CSV label names) rather than indices: an extra folder that lacks a class numbers the others
    differently."""
    own = extra.class_names
    if own == [str(i) for i in range(len(own))] or own == names[:len(own)]:
        return extra, None
    missing = [n for n in own if n not in names]
    if missing:
        return extra, Finding("fatal", "label-range", f"extra data {source} has classes the base data does not",
                              missing)
    index = np.array([names.index(n) for n in own], np.int64)
    y = index[extra.y] if len(extra.y) else extra.y
    return Loaded(extra.x, y, extra.ids, extra.hashes, names, extra.slices, extra.files, extra.findings,
                  extra.split), None


def merge_extra(base: SplitData, source: str, extra: Loaded, d: DataConfig) -> SplitData:
    """``base`` with the samples of ``extra`` (named ``source``) appended and split.

    Args:
        base: The data so far.
        source: The extra source's name (as written in ``data.extra``).
        extra: Its samples.
        d: The data config (fractions and seed of the split).
    """
    b = base.data
    findings = list(extra.findings)
    extra, problem = _same_classes(b.class_names, extra, source)
    findings += [problem] if problem else []
    if len(extra.x) and len(b.x) and extra.x.shape[1:] != b.x.shape[1:]:
        findings.append(Finding("fatal", "schema", f"extra data {source} has samples of shape "
                                f"{'x'.join(map(str, extra.x.shape[1:]))}, the base data "
                                f"{'x'.join(map(str, b.x.shape[1:]))}", [source]))
    if any(f.level == "fatal" for f in findings) or not len(extra.x):
        if not len(extra.x) and not findings:
            findings.append(Finding("fatal", "schema", f"extra data {source} holds no samples", [source]))
        b.findings = b.findings + findings
        return base
    split = _random_split(extra, d)
    where = {b.hashes[i]: s for s in SPLITS for i in base.index[s]}  # an identical base sample decides
    label = np.empty(len(extra.x), dtype=object)
    for s in SPLITS:
        label[split[s]] = s
    for i, h in enumerate(extra.hashes):
        label[i] = where.get(h, label[i])
    offset = len(b.x)
    ids = [f"{source}:{i}" if not i.startswith(source) else i for i in extra.ids]
    merged = Loaded(np.concatenate([b.x, extra.x.astype(b.x.dtype)]), np.concatenate([b.y, extra.y]),
                    b.ids + ids, b.hashes + extra.hashes, b.class_names,
                    None if b.slices is None or extra.slices is None else np.concatenate([b.slices, extra.slices]),
                    {**b.files, **extra.files}, b.findings + findings)
    index = {s: np.concatenate([base.index[s], offset + np.flatnonzero(label == s)]).astype(np.int64)
             for s in SPLITS}
    of = base.source_of if base.source_of is not None else np.zeros(offset, np.int64)
    source_of = np.concatenate([of, np.full(len(extra.x), len(base.sources), np.int64)])
    return SplitData(merged, index, base.kind, [*base.sources, source], source_of)
