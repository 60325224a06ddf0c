"""The statistics under the drift monitor, without state: the reference laid out for vectorised tests, the
Kolmogorov-Smirnov p-value, the chi-square survival function, the class test (no scipy on a device), and the
evaluation of one window's totals against the reference (:func:`evaluate_window`).

:class:`~edgeml.edge_agent.drift.DriftMonitor` keeps the windows; this module only computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeml.errors import ConfigError
from edgeml.refstats import FeatureStats, ReferenceStats, output_matrix, to_probabilities

if TYPE_CHECKING:
    from edgeml.edge_agent.drift_window import DriftConfig

__all__ = ["ReferenceLayout", "WindowTotals", "chi2_sf", "class_test", "evaluate_window", "ks_pvalue",
           "top_confidence"]

_KS_TERMS = np.arange(1, 21, dtype=np.float64)  # enough: terms past k = 20 are below 1e-30 where used
_KS_SIGNS = np.where(_KS_TERMS % 2 == 1, 1.0, -1.0)


def ks_pvalue(d: np.ndarray, n: np.ndarray, n_ref: np.ndarray) -> np.ndarray:
    """Asymptotic two-sided p-value of two-sample KS distances (Kolmogorov series, Stephens' correction).

    Args:
        d: KS distances.
        n: Window sizes (broadcast with ``d``).
        n_ref: Reference sizes (broadcast with ``d``).
    """
    n = np.asarray(n, dtype=np.float64)
    n_ref = np.asarray(n_ref, dtype=np.float64)
    en = np.sqrt(n * n_ref / np.maximum(n + n_ref, 1.0))
    lam = (en + 0.12 + 0.11 / np.maximum(en, 1e-12)) * np.asarray(d, dtype=np.float64)
    lam = np.maximum(lam, 0.3)  # below 0.3 the series converges slowly, and p is 1 to 1e-6
    series = 2.0 * (_KS_SIGNS * np.exp(-2.0 * np.multiply.outer(lam * lam, _KS_TERMS**2))).sum(axis=-1)
    return np.asarray(np.clip(np.where((n > 0) & (n_ref > 0) & (lam > 0.3), series, 1.0), 0.0, 1.0))


def chi2_sf(x: float, dof: int) -> float:
    """Survival function of the chi-square distribution (regularised upper incomplete gamma, no scipy).

    Args:
        x: The statistic.
        dof: Degrees of freedom (>= 1).
    """
    a, z = 0.5 * dof, 0.5 * x
    if z <= 0.0:
        return 1.0
    log_front = -z + a * math.log(z) - math.lgamma(a)
    if z < a + 1.0:  # series for the lower function P(a, z)
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1.0
            term *= z / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return min(1.0, max(0.0, 1.0 - total * math.exp(log_front)))
    tiny = 1e-300  # modified Lentz continued fraction for Q(a, z)
    b = z + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return min(1.0, max(0.0, math.exp(log_front) * h))


class ReferenceLayout:
    """The reference statistics laid out as padded arrays (features x bins) for vectorised tests.

    Columns: the input features, then the output features against the bundle's own sketches, then those
    against the ``baseline`` sketches (the same live values, binned on the baseline's edges).
    """

    def __init__(self, ref: ReferenceStats, psi_epsilon: float, baseline: ReferenceStats | None = None) -> None:
        feats = [(inp, f) for inp, fl in ref.features.items() for f in fl]
        if not feats:
            raise ConfigError("the reference statistics describe no input feature; drift cannot be monitored")
        self.inputs = list(ref.features)
        self.names = tuple(f.name if len(self.inputs) == 1 else f"{inp}.{f.name}" for inp, f in feats)
        self.n_inputs = len(feats)
        # output name -> (feature names, first column) per reference: own, then previous
        self.output_cols: list[tuple[str, str, tuple[str, ...], int]] = []
        out_feats: list[FeatureStats] = []
        out_names: list[str] = []
        for label, sketches in (("own", ref.outputs), ("previous", baseline.outputs if baseline else {})):
            for output, fl in sketches.items():
                if label == "previous" and [f.name for f in fl] != [f.name for f in ref.outputs.get(output, [])]:
                    continue  # the previous model's output has another shape: nothing to compare
                self.output_cols.append((label, output, tuple(f.name for f in fl), len(feats) + len(out_feats)))
                out_feats += fl
                suffix = "" if label == "own" else "@previous"
                out_names += [f"{output}.{f.name}{suffix}" for f in fl]
        self.output_names = tuple(out_names)
        self.output_outputs = list(dict.fromkeys(o for _, o, _, _ in self.output_cols))
        every = [f for _, f in feats] + out_feats
        nbins = np.array([len(f.counts) for f in every])
        self.bins = int(nbins.max())
        self.edges = np.full((len(every), self.bins - 1), np.inf)  # interior edges, padded with +inf
        self.counts = np.zeros((len(every), self.bins))
        for j, f in enumerate(every):
            self.edges[j, : nbins[j] - 1] = f.bin_edges[1:-1]
            self.counts[j, : nbins[j]] = f.counts
        self.n = self.counts.sum(axis=1)
        self.cdf = np.cumsum(self.counts, axis=1) / np.maximum(self.n, 1.0)[:, None]
        self.mask = (np.arange(self.bins)[None, :] < nbins[:, None]).astype(np.float64)
        self.prop = np.maximum(self.counts / np.maximum(self.n, 1.0)[:, None], psi_epsilon)
        self.log_prop = np.log(self.prop)
        self.mean = np.array([f.mean for f in every])
        std = np.array([f.std for f in every])
        self.inv_std = np.divide(1.0, std, out=np.full_like(std, np.nan), where=std > 0)
        self.classes: np.ndarray | None = None
        self.conf_edges = np.zeros(0)
        self.conf_counts = np.zeros(0)
        self.conf_cdf = np.zeros(0)
        if ref.predictions is not None:
            self.classes = np.asarray(ref.predictions.class_counts, dtype=np.float64)
            self.conf_edges = np.asarray(ref.predictions.confidence_edges[1:-1], dtype=np.float64)
            self.conf_counts = np.asarray(ref.predictions.confidence_counts, dtype=np.float64)
            self.conf_cdf = np.cumsum(self.conf_counts) / max(float(self.conf_counts.sum()), 1.0)

    @property
    def n_outputs(self) -> int:
        """Output feature columns (own and previous)."""
        return len(self.output_names)

    def output_rows(self, outputs: Mapping[str, np.ndarray] | None, n: int) -> np.ndarray:
        """The output feature columns of a batch of ``n``: NaN (left out of the tests) for an output that is
        missing or whose features differ from the reference's (another shape)."""
        rows = np.full((n, self.n_outputs), np.nan)
        if not outputs:
            return rows
        base = self.n_inputs
        computed: dict[str, tuple[np.ndarray, list[str]] | None] = {}
        for _, output, names, start in self.output_cols:
            if output not in computed:
                arr = outputs.get(output)
                computed[output] = output_matrix(arr) if arr is not None and np.ndim(arr) >= 1 \
                    and np.shape(arr)[0] == n else None
            got = computed[output]
            if got is not None and tuple(got[1]) == names:
                rows[:, start - base:start - base + len(names)] = got[0]
        return rows


def top_confidence(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 class and confidence of rows of probabilities; rows of logits are softmaxed like the reference."""
    off = np.abs(probs.sum(axis=1) - 1.0) > 1e-3
    if probs.size and (probs.min() < 0.0 or off.any()):
        logits = off | (probs.min(axis=1) < 0.0)
        probs = probs.copy()
        probs[logits] = to_probabilities(probs[logits])
    top = probs.argmax(axis=1)
    return top, probs[np.arange(top.size), top]


def class_test(ref: np.ndarray, obs: np.ndarray, min_expected: float) -> tuple[float, float, float]:
    """Chi-square test of homogeneity of two class-count vectors; returns (chi2, p-value, TV distance)."""
    n, n_ref = float(obs.sum()), float(ref.sum())
    if n <= 0 or n_ref <= 0:
        return 0.0, 1.0, 0.0
    tv = 0.5 * float(np.abs(obs / n - ref / n_ref).sum())
    keep = (ref + obs) > 0
    ref, obs = ref[keep], obs[keep]
    small = (ref + obs) * n / (n + n_ref) < min_expected
    if small.any() and not small.all():  # pool the rare classes into one category
        ref = np.append(ref[~small], ref[small].sum())
        obs = np.append(obs[~small], obs[small].sum())
    if ref.size < 2:
        return 0.0, 1.0, tv
    total = ref + obs
    e_obs, e_ref = total * n / (n + n_ref), total * n_ref / (n + n_ref)
    chi2 = float(((obs - e_obs) ** 2 / e_obs).sum() + ((ref - e_ref) ** 2 / e_ref).sum())
    return chi2, chi2_sf(chi2, ref.size - 1), tv


@dataclass
class WindowTotals:
    """A window's totals, copied under the monitor's lock and tested outside it (:func:`evaluate_window`)."""

    index: int
    end: int
    n: int
    counts: np.ndarray  # (features, bins + 1), last column: non-finite values
    sums: np.ndarray
    classes: np.ndarray | None
    confidence: np.ndarray | None
    conf_sum: float
    conf_n: int


def evaluate_window(r: ReferenceLayout, cfg: DriftConfig, snap: WindowTotals) -> dict[str, Any]:
    """The tests of one window's totals against the reference (KS and PSI per feature, the class and confidence
    tests where both sides have them), as the monitor's window result is built from them."""
    counts = snap.counts[:, : r.bins].astype(np.float64)
    n_f = counts.sum(axis=1)
    inv = 1.0 / np.maximum(n_f, 1.0)
    ks = np.abs(np.cumsum(counts, axis=1) * inv[:, None] - r.cdf).max(axis=1) * (n_f > 0)
    obs = np.maximum(counts * inv[:, None], cfg.psi_epsilon)
    psi = ((obs - r.prop) * (np.log(obs) - r.log_prop) * r.mask).sum(axis=1) * (n_f > 0)
    mean = snap.sums * inv
    mean[n_f == 0] = np.nan
    out: dict[str, Any] = {"snap": snap, "ks": ks, "psi": psi, "mean": mean, "shift": (mean - r.mean) * r.inv_std,
                           "class_chi2": None, "class_p": None, "class_tv": None, "conf_ks": None, "conf_p": None}
    sizes, ref_sizes, dists = n_f, r.n, ks
    if r.classes is not None and snap.classes is not None and snap.confidence is not None:
        out["class_chi2"], out["class_p"], out["class_tv"] = class_test(
            r.classes, snap.classes.astype(np.float64), cfg.min_expected)
        n_c = float(snap.confidence.sum())
        conf_cdf = np.cumsum(snap.confidence) / max(n_c, 1.0)
        out["conf_ks"] = float(np.abs(conf_cdf - r.conf_cdf).max()) if n_c else 0.0
        sizes, ref_sizes = np.append(n_f, n_c), np.append(r.n, r.conf_counts.sum())
        dists = np.append(ks, out["conf_ks"])
    p = ks_pvalue(dists, sizes, ref_sizes)
    out["p"] = p[: len(ks)]
    if out["conf_ks"] is not None:
        out["conf_p"] = float(p[-1])
    return out
