"""Drift detection on the device: bounded streaming summaries compared with the bundle's reference statistics.

The monitor keeps no raw samples. Each call to :meth:`DriftMonitor.observe` reduces a batch with
:func:`edgeml.refstats.feature_matrix` (one value per feature, or per channel mean for images, exactly as the
reference was summarised) and stages those rows in a buffer of ``stride`` rows. When the buffer is full it is
binned in one vectorised step against the reference quantile edges into integer counts, which go into a ring
of ``window // stride`` blocks; the buffer is then reused. Memory is therefore fixed by the configuration
(``stride x features`` floats plus ``blocks x features x bins`` integers), whatever the number of samples seen.
Batches smaller than ``defer`` samples (batch size 1 serving) are copied into a short queue of at most ``defer``
samples and reduced together, because numpy's fixed cost per call would otherwise dominate.

Every ``stride`` samples the newest ``window`` samples (fewer while the ring fills up) are tested against the
reference:

- each input feature: PSI over the reference bins (empty bins floored at ``psi_epsilon``) and a two-sample
  Kolmogorov-Smirnov test on the binned CDFs, D = max |cdf_ref - cdf_obs| over the bin edges, with the
  asymptotic Kolmogorov p-value for the effective size ``n * n_ref / (n + n_ref)``. Binning can only lower D,
  so the test is conservative: its false-positive rate stays at or below the nominal one;
- the predicted classes: a chi-square test of homogeneity (reference counts vs window counts, classes with
  fewer than ``min_expected`` expected samples pooled), and their total-variation distance;
- the top-1 confidence: the same binned KS test on the reference confidence histogram.

**Multiple testing.** A window is ``flagged`` when any test has p < ``alpha / (tests x looks)``, where
``looks = window // stride`` is the number of overlapping evaluations that see a given sample. By the union
bound the probability of a false alarm is at most ``alpha`` per ``window`` samples of a drift-free stream,
interim looks included. The sliding evaluation is what makes a shift that starts mid-stream visible after a
few hundred samples instead of up to two windows later.

**Score.** ``DriftWindow.score`` is an effect size in [0, 1], independent of the sample size: the largest of
the KS distances (features and confidence) and the class total-variation distance. 0 means the window looks
exactly like the reference, 1 that the distributions do not overlap; noise alone gives a KS distance rarely
above ``1.6 / sqrt(n)`` (about 0.07 for a window of 500; the class distance is noisier with many classes).
Significance (``flagged``) comes from the p-values, not from the score.

**Output shift.** When the reference statistics sketch the model's outputs (``edgeml.refstats/2``), the same
machinery tests the model's live outputs: each output feature (:func:`edgeml.refstats.output_matrix`: the
columns of a narrow output, each sample's mean, std, min and max) gets the binned KS test against the
bundle's own reference and, when given one, against the ``baseline`` reference of the model this one replaced
(so that a release whose outputs are all scaled, with its own reference computed on those scaled outputs,
still shows against what the device served before). These tests form a family of their own, with threshold
``alpha / (output tests x looks)``: ``DriftWindow.output_score`` (the largest output KS distance) and
``output_flagged`` never change the input-drift ``score`` and ``flagged``. This is a model-quality signal that
needs no class scores: a detector's probability map, a regressor's values or boxes shift as much as logits.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeml.edge_agent.drift_stats import (
    ReferenceLayout,
    WindowTotals,
    chi2_sf,
    evaluate_window,
    ks_pvalue,
    top_confidence,
)
from edgeml.edge_agent.drift_window import DriftConfig, DriftWindow, FeatureDrift
from edgeml.errors import DataError
from edgeml.refstats import ReferenceStats, feature_matrix

__all__ = ["DriftConfig", "DriftMonitor", "DriftWindow", "FeatureDrift", "chi2_sf", "ks_pvalue"]

_DEFER_BYTES = 1 << 20
_NO_TOP = np.zeros(0, dtype=np.int64)
_NO_CONF = np.zeros(0)


class DriftMonitor:
    """Streaming drift tests of a model's inputs and predictions against its reference statistics.

    Thread-safe: :meth:`observe` may be called from several request threads. The lock covers queueing a small
    batch or copying a batch's feature rows into the staging buffer and, once per ``stride`` samples, binning
    it; the reduction of a batch and the tests run outside it.

    Args:
        ref: The bundle's reference statistics.
        config: Window sizes and thresholds.
        baseline: The reference statistics of the model this one replaced: its output sketches are compared
            with this model's live outputs too (see the output shift in the module docstring).

    Raises:
        ConfigError: The reference statistics describe no input feature.
    """

    def __init__(self, ref: ReferenceStats, config: DriftConfig | None = None, *,
                 baseline: ReferenceStats | None = None) -> None:
        self.config = config or DriftConfig()
        self._ref = r = ReferenceLayout(ref, self.config.psi_epsilon, baseline)
        k, f, s = self.config.looks, r.n_inputs + r.n_outputs, self.config.stride
        n_classes = 0 if r.classes is None else len(r.classes)
        self._tests = r.n_inputs + (2 if r.classes is not None else 0)
        self._threshold = self.config.alpha / (self._tests * k)
        self._output_threshold = self.config.alpha / (max(r.n_outputs, 1) * k)
        self._offsets = (np.arange(f) * (r.bins + 1))[None, :]
        self._lock = threading.Lock()
        # the ring of `looks` blocks of binned counts, and the staging buffer of the current block
        self._counts = np.zeros((k, f, r.bins + 1), dtype=np.int64)
        self._sums = np.zeros((k, f))
        self._block_n = np.zeros(k, dtype=np.int64)
        self._classes = np.zeros((k, n_classes), dtype=np.int64)
        self._conf = np.zeros((k, len(r.conf_counts)), dtype=np.int64)
        self._conf_sum = np.zeros(k)
        self._conf_n = np.zeros(k, dtype=np.int64)
        self._rows = np.zeros((s, f))
        self._probs = np.zeros((s, n_classes)) if n_classes else None  # allocated on first use otherwise
        self._has_probs = np.zeros(s, dtype=bool)
        self._fill = 0
        self._blocks = 0
        self._last_flagged = False
        self._history: deque[DriftWindow] = deque(maxlen=self.config.history)
        self._latest: DriftWindow | None = None
        # small batches waiting to be reduced: (inputs, probabilities, output feature rows)
        self._pending: list[tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray] | None]] = []
        self._pending_n = 0
        self._sample_shape: tuple[int, ...] | None = None  # set once a batch went through: small ones may wait

    @classmethod
    def from_refstats(cls, ref: ReferenceStats, config: DriftConfig | None = None, *,
                      baseline: ReferenceStats | None = None) -> DriftMonitor:
        """A monitor for the model whose reference statistics are ``ref``.

        Args:
            ref: The bundle's reference statistics.
            config: Window sizes and thresholds (defaults: :class:`DriftConfig`).
            baseline: The replaced model's reference statistics, for the output shift against it.

        Raises:
            ConfigError: The reference statistics describe no input feature.
        """
        return cls(ref, config, baseline=baseline)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The monitored features, in the order of :attr:`DriftWindow.features`."""
        return self._ref.names

    @property
    def output_feature_names(self) -> tuple[str, ...]:
        """The monitored output features (``output.feature``, ``@previous`` against the baseline); empty when
        the reference statistics do not sketch the outputs."""
        return self._ref.output_names

    @property
    def output_threshold(self) -> float:
        """The per-test p-value threshold of the output tests: ``alpha / (output tests x looks)``."""
        return self._output_threshold

    @property
    def threshold(self) -> float:
        """The per-test p-value threshold: ``alpha / (tests x looks)``."""
        return self._threshold

    @property
    def samples_seen(self) -> int:
        """Samples observed since the monitor was created."""
        with self._lock:
            return self._blocks * self.config.stride + self._fill + self._pending_n

    @property
    def latest(self) -> DriftWindow | None:
        """The most recent evaluation, or None before the first ``stride`` samples."""
        return self._latest

    @property
    def mean_confidence(self) -> float | None:
        """Mean top-1 confidence over the newest ``window`` to ``window + stride`` samples (None without any)."""
        self.flush()
        with self._lock:
            staged = self._probs[: self._fill][self._has_probs[: self._fill]] if self._probs is not None else None
            total, count = float(self._conf_sum.sum()), int(self._conf_n.sum())
        if staged is not None and staged.size:
            total += float(top_confidence(staged)[1].sum())
            count += staged.shape[0]
        return total / count if count else None

    def memory_bytes(self) -> int:
        """Bytes held by the monitor's arrays (fixed by the configuration and the reference)."""
        arrays = (self._counts, self._sums, self._block_n, self._classes, self._conf, self._conf_sum,
                  self._conf_n, self._rows, self._has_probs)
        pending = sum(x.nbytes + (p.nbytes if p is not None else 0) + sum(a.nbytes for a in (o or {}).values())
                      for x, p, o in self._pending)
        return sum(a.nbytes for a in arrays) + (self._probs.nbytes if self._probs is not None else 0) + pending

    def drain(self) -> list[DriftWindow]:
        """The evaluations finished since the last call (at most ``history``, oldest first)."""
        with self._lock:
            out = list(self._history)
            self._history.clear()
        return out

    def observe(
        self, inputs: np.ndarray | Mapping[str, np.ndarray], probabilities: np.ndarray | None = None,
        outputs: Mapping[str, np.ndarray] | None = None,
    ) -> list[DriftWindow]:
        """Account one batch; returns the evaluations it completed (usually none).

        Batches smaller than ``config.defer`` samples with the shape of an earlier batch are copied into a short
        queue and reduced together (at most ``defer`` samples and about 1 MiB wait; :meth:`flush` forces it):
        numpy's fixed cost per call would otherwise dominate at batch size 1.

        Args:
            inputs: The batch in the model's input layout (first axis is the batch), or input name -> batch.
            probabilities: The model's outputs on it, shape (batch, classes): probabilities, or logits
                (softmaxed like the reference).
            outputs: Every output of the model on it (output name -> batch), for the output shift; outputs
                the reference does not sketch are ignored, and a missing or reshaped one is left out.

        Raises:
            DataError: The batch does not match the reference statistics' inputs or classes.
        """
        if self._can_defer(inputs, probabilities):
            x = np.array(inputs, copy=True)
            item = (x, None if probabilities is None else np.array(probabilities, copy=True), self._copied(outputs))
            with self._lock:
                self._pending.append(item)
                self._pending_n += x.shape[0]
                if self._pending_n < self.config.defer:
                    return []
                items, self._pending, self._pending_n = self._pending, [], 0
            return self._ingest_queued(items)
        windows = self._ingest(inputs, probabilities, self._output_rows(inputs, outputs))
        if isinstance(inputs, np.ndarray) and inputs.size * inputs.itemsize * self.config.defer <= (
                _DEFER_BYTES * max(inputs.shape[0], 1)):
            self._sample_shape = inputs.shape[1:]
        return windows

    def flush(self) -> list[DriftWindow]:
        """Reduce the queued small batches now; returns the evaluations this completed."""
        with self._lock:
            items, self._pending, self._pending_n = self._pending, [], 0
        return self._ingest_queued(items)

    def _can_defer(self, inputs: np.ndarray | Mapping[str, np.ndarray], probabilities: np.ndarray | None) -> bool:
        """A small array batch shaped like one already accepted (so it cannot fail later, in another call)."""
        if not isinstance(inputs, np.ndarray) or inputs.shape[0] >= self.config.defer:
            return False
        if inputs.shape[1:] != self._sample_shape:
            return False
        if probabilities is None:
            return True
        classes = self._ref.classes
        width = len(classes) if classes is not None else self._probs.shape[1] if self._probs is not None else -1
        return isinstance(probabilities, np.ndarray) and probabilities.shape == (inputs.shape[0], width)

    def _output_rows(self, inputs: np.ndarray | Mapping[str, np.ndarray],
                     outputs: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
        """The batch's output feature columns (NaN where an output is missing or reshaped)."""
        if not self._ref.n_outputs:
            return None
        first = inputs if isinstance(inputs, np.ndarray) else next(iter(inputs.values()), None)
        n = int(np.shape(first)[0]) if first is not None and np.ndim(first) else 0
        return self._ref.output_rows(outputs, n)

    def _copied(self, outputs: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        """Copies of the sketched outputs of a batch that waits in the queue (None: nothing to sketch)."""
        if not self._ref.n_outputs or not outputs:
            return None
        return {k: np.array(outputs[k], copy=True) for k in self._ref.output_outputs if k in outputs}

    def _queued_output_rows(self, items: list[tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray] | None]]
                            ) -> np.ndarray | None:
        """The output feature columns of the queued batches, reduced together (one pass per output)."""
        if not self._ref.n_outputs:
            return None
        n = sum(x.shape[0] for x, _, _ in items)
        outs = [o for _, _, o in items]
        if all(o is not None and o.keys() == outs[0].keys() for o in outs):  # type: ignore[union-attr]
            try:
                merged = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}  # type: ignore[index,union-attr]
                return self._ref.output_rows(merged, n)
            except ValueError:  # outputs of different shapes: one batch at a time
                pass
        return np.concatenate([self._ref.output_rows(o, x.shape[0]) for x, _, o in items])

    def _ingest_queued(self, items: list[tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray] | None]]
                       ) -> list[DriftWindow]:
        probs = [p for _, p, _ in items if p is not None]
        if not items or len(probs) not in (0, len(items)):  # a mix of batches with and without outputs
            return [w for x, p, o in items for w in self._ingest(x, p, self._output_rows(x, o))]
        return self._ingest(np.concatenate([x for x, _, _ in items]), np.concatenate(probs) if probs else None,
                            self._queued_output_rows(items))

    def _ingest(
        self, inputs: np.ndarray | Mapping[str, np.ndarray], probabilities: np.ndarray | None,
        out_rows: np.ndarray | None = None,
    ) -> list[DriftWindow]:
        rows = self._feature_rows(inputs)
        probs = self._check_probabilities(probabilities, rows.shape[0])
        if out_rows is not None:
            rows = np.hstack([rows, out_rows])
        snaps: list[WindowTotals] = []
        stride, start = self.config.stride, 0
        with self._lock:
            while start < rows.shape[0]:
                take = min(rows.shape[0] - start, stride - self._fill)
                dst, src = slice(self._fill, self._fill + take), slice(start, start + take)
                self._rows[dst] = rows[src]
                self._has_probs[dst] = probs is not None
                if probs is not None:
                    if self._probs is None:
                        self._probs = np.zeros((stride, probs.shape[1]))
                    self._probs[dst] = probs[src]
                self._fill += take
                start += take
                if self._fill == stride:
                    snaps.append(self._close_block())
        return [self._finish(evaluate_window(self._ref, self.config, snap)) for snap in snaps]

    def _feature_rows(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        names, layout = self._ref.inputs, self.config.layout
        if isinstance(inputs, Mapping):
            missing = [n for n in names if n not in inputs]
            if missing:
                raise DataError(f"drift monitor: inputs {missing} missing from the batch (expected {names})")
            parts = [feature_matrix(inputs[n], layout)[0] for n in names]
        elif len(names) != 1:
            raise DataError(f"drift monitor: the model has inputs {names}; pass a mapping of name -> batch")
        else:
            parts = [feature_matrix(inputs, layout)[0]]
        if len({p.shape[0] for p in parts}) != 1:
            raise DataError("drift monitor: the inputs of one batch have different batch sizes")
        rows = parts[0] if len(parts) == 1 else np.hstack(parts)
        if rows.shape[1] != len(self._ref.names):
            raise DataError(f"drift monitor: the batch has {rows.shape[1]} features (channels or columns), "
                            f"the reference statistics {len(self._ref.names)}",
                            hint="the bundle's refstats were computed for another input shape or layout")
        return rows

    def _check_probabilities(self, probabilities: np.ndarray | None, n: int) -> np.ndarray | None:
        if probabilities is None:
            return None
        probs = np.asarray(probabilities)
        classes = self._ref.classes
        width = len(classes) if classes is not None else None if self._probs is None else self._probs.shape[1]
        if probs.ndim != 2 or probs.shape[0] != n:
            raise DataError(f"drift monitor: probabilities of shape {probs.shape} do not fit a batch of {n}")
        if width is not None and probs.shape[1] != width:
            raise DataError(f"drift monitor: {probs.shape[1]} output classes, the reference has {width}")
        return probs

    def _close_block(self) -> WindowTotals:
        """Bin the full staging buffer into the ring's next block and copy the window totals (lock held)."""
        r, k = self._ref, self._blocks % self.config.looks
        rows = self._rows
        idx = (rows[:, :, None] >= r.edges[None, :, :]).sum(axis=2)
        finite = np.isfinite(rows)
        if not finite.all():
            idx = np.where(finite, idx, r.bins)
            rows = np.where(finite, rows, 0.0)
        flat = np.bincount((idx + self._offsets).ravel(), minlength=self._counts[k].size)
        self._counts[k] = flat.reshape(self._counts[k].shape)
        self._sums[k] = rows.sum(axis=0)
        self._block_n[k] = self.config.stride
        top, conf = top_confidence(self._probs[self._has_probs]) if self._probs is not None else (_NO_TOP, _NO_CONF)
        if r.classes is not None:
            self._classes[k] = np.bincount(top, minlength=len(r.classes))
            self._conf[k] = np.bincount(np.searchsorted(r.conf_edges, conf, side="right"),
                                        minlength=len(r.conf_counts))
        self._conf_sum[k], self._conf_n[k] = conf.sum(), conf.size
        self._blocks += 1
        self._fill = 0
        return WindowTotals(
            index=self._blocks - 1, end=self._blocks * self.config.stride, n=int(self._block_n.sum()),
            counts=self._counts.sum(axis=0), sums=self._sums.sum(axis=0),
            classes=self._classes.sum(axis=0) if r.classes is not None else None,
            confidence=self._conf.sum(axis=0) if r.classes is not None else None,
            conf_sum=float(self._conf_sum.sum()), conf_n=int(self._conf_n.sum()),
        )

    def _finish(self, res: dict[str, Any]) -> DriftWindow:
        """Combine the tests into a window result, record it and track the alert state."""
        snap: WindowTotals = res["snap"]
        ni = self._ref.n_inputs
        ks, p, psi = res["ks"][:ni], res["p"][:ni], res["psi"][:ni]
        names = list(self._ref.names)
        p_vals, dists = list(p), list(ks)
        for name, pk, dk in (("classes", "class_p", "class_tv"), ("confidence", "conf_p", "conf_ks")):
            if res[pk] is not None:
                names.append(name)
                p_vals.append(res[pk])
                dists.append(res[dk])
        p_arr, d_arr = np.asarray(p_vals), np.asarray(dists)
        hit = (p_arr < self._threshold) & (d_arr >= self.config.min_distance)
        order = np.lexsort((-ks, p))[: self.config.top_k]
        top = tuple(self._feature_drift(self._ref.names[j], j, res) for j in order)
        flagged = bool(hit.any())
        outputs = self._output_fields(res, snap)
        with self._lock:
            alert = flagged and not self._last_flagged
            self._last_flagged = flagged
            window = DriftWindow(
                index=snap.index, end=snap.end, n=snap.n, score=float(d_arr.max()), flagged=flagged, alert=alert,
                threshold=self._threshold, min_p_value=float(p_arr.min()), features=self._ref.names,
                ks=tuple(ks.tolist()), p_values=tuple(p.tolist()), psi=tuple(psi.tolist()),
                nonfinite=tuple(snap.counts[:ni, -1].tolist()),
                top_features=top, class_chi2=res["class_chi2"], class_p_value=res["class_p"],
                class_tv=res["class_tv"], confidence_ks=res["conf_ks"], confidence_p_value=res["conf_p"],
                mean_confidence=snap.conf_sum / snap.conf_n if snap.conf_n else None,
                drivers=tuple(name for name, h in zip(names, hit) if h), **outputs,
            )
            self._history.append(window)
            self._latest = window
        return window

    def _feature_drift(self, name: str, column: int, res: dict[str, Any]) -> FeatureDrift:
        return FeatureDrift(name=name, ks=float(res["ks"][column]), p_value=float(res["p"][column]),
                            psi=float(res["psi"][column]), mean=float(res["mean"][column]),
                            shift_sigma=float(res["shift"][column]))

    def _output_fields(self, res: dict[str, Any], snap: WindowTotals) -> dict[str, Any]:
        """The output-shift fields of a window (empty without output sketches or output data in it)."""
        r = self._ref
        ni = r.n_inputs
        seen = snap.counts[ni:, : r.bins].sum(axis=1) > 0
        if not r.n_outputs or not seen.any():
            return {}
        ks, p = res["ks"][ni:], res["p"][ni:]
        hit = (p < self._output_threshold) & (ks >= self.config.min_distance) & seen
        against = []
        for label in ("own", "previous"):
            cols = [j for lab, _, feats, start in r.output_cols if lab == label
                    for j in range(start - ni, start - ni + len(feats))]
            if cols and seen[cols].any():
                against.append((label, float(ks[cols].max())))
        order = [j for j in np.lexsort((-ks, p)) if seen[j]][: self.config.top_k]
        return {"output_score": float(ks[seen].max()), "output_flagged": bool(hit.any()),
                "output_threshold": self._output_threshold, "output_min_p_value": float(p[seen].min()),
                "output_against": tuple(against),
                "output_top": tuple(self._feature_drift(r.output_names[j], ni + j, res) for j in order),
                "output_drivers": tuple(r.output_names[j] for j in np.flatnonzero(hit))}
