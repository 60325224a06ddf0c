"""Drift detection: shifted inputs and predictions are flagged, drift-free streams are not, memory is bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from scipy import stats

from edgeml.edge_agent.drift import DriftConfig, DriftMonitor, DriftWindow, chi2_sf, ks_pvalue
from edgeml.errors import ConfigError, DataError
from edgeml.refstats import ReferenceStats, compute_reference_stats

N_REF = 4000
N_CLASSES = 5


class _Source:
    """A synthetic input distribution and a fixed linear "model" on it, tabular or image (NCHW / NHWC)."""

    def __init__(self, kind: str, features: int = 4, seed: int = 0) -> None:
        self.kind, self.features = kind, features
        rng = np.random.default_rng(seed)
        self.weights = rng.standard_normal((features, N_CLASSES))

    def sample(self, rng: np.random.Generator, n: int, shift: np.ndarray | None = None) -> np.ndarray:
        """``n`` samples whose feature j (column or channel mean) is N(j, 1) + shift[j]."""
        means = rng.standard_normal((n, self.features)) + np.arange(self.features)
        if shift is not None:
            means = means + shift
        if self.kind == "tabular":
            return means
        pixels = means[:, :, None, None] + 0.3 * rng.standard_normal((n, self.features, 4, 4))
        return pixels if self.kind == "nchw" else pixels.transpose(0, 2, 3, 1)

    def logits(self, x: np.ndarray) -> np.ndarray:
        feats = x if self.kind == "tabular" else x.mean(axis=(2, 3) if self.kind == "nchw" else (1, 2))
        return 2.0 * (feats - np.arange(self.features)) @ self.weights

    @property
    def layout(self) -> str:
        return "NHWC" if self.kind == "nhwc" else "NCHW"

    def reference(self, seed: int = 1) -> ReferenceStats:
        x = self.sample(np.random.default_rng(seed), N_REF)
        return compute_reference_stats({"input": x}, self.logits(x), layout=self.layout)


def _stream(mon: DriftMonitor, src: _Source, rng: np.random.Generator, n: int, batch: int = 50,
            shift: np.ndarray | None = None) -> list[DriftWindow]:
    out: list[DriftWindow] = []
    for _ in range(n // batch):
        x = src.sample(rng, batch, shift)
        out += mon.observe(x, src.logits(x))
    return out


def _shift(src: _Source, feature: int, sigmas: float) -> np.ndarray:
    shift = np.zeros(src.features)
    shift[feature] = sigmas  # the per-sample feature has std 1 (plus a little pixel noise for images)
    return shift


@pytest.mark.parametrize(
    ("kind", "feature", "sigmas"),
    [("tabular", 0, 0.5), ("tabular", 3, -0.5), ("tabular", 2, 1.0), ("nchw", 1, 0.5), ("nhwc", 2, -0.5)],
)
def test_mean_shift_flagged_within_500_samples(kind: str, feature: int, sigmas: float) -> None:
    src = _Source(kind)
    mon = DriftMonitor.from_refstats(src.reference(), DriftConfig(layout=src.layout))
    windows = _stream(mon, src, np.random.default_rng(7), 500, shift=_shift(src, feature, sigmas))
    flagged = [w for w in windows if w.flagged]
    assert flagged and flagged[0].end <= 500
    first = flagged[0]
    assert f"f{feature}" in first.drivers or f"channel{feature}" in first.drivers
    assert first.alert and first.top_features[0].name.endswith(str(feature))
    assert first.top_features[0].shift_sigma == pytest.approx(sigmas, abs=0.25)
    assert first.score >= 0.12  # the KS distance of a 0.5-sigma shift is about 0.2
    assert 0.4 * sigmas**2 <= first.top_features[0].psi <= 2.0 * sigmas**2  # about d ** 2 for a d-sigma shift


def test_shift_after_clean_stream_flagged_within_500_samples_of_onset() -> None:
    src = _Source("tabular")
    mon = DriftMonitor.from_refstats(src.reference())
    rng = np.random.default_rng(11)
    before = _stream(mon, src, rng, 2000)
    after = _stream(mon, src, rng, 1000, shift=_shift(src, 1, 0.5))
    assert len(before) == 2000 // mon.config.stride and not any(w.flagged for w in before)
    first = next(w for w in after if w.flagged)
    assert first.end - 2000 <= 500 and first.alert
    assert [d for d in first.drivers if d.startswith("f")] == ["f1"]  # the model's classes may follow
    later = [w for w in after if w.flagged and w.index > first.index]
    assert later and not any(w.alert for w in later)  # one alert event per episode


@pytest.mark.parametrize("kind", ["tabular", "nchw"])
def test_false_positive_rate_over_200_trials_at_most_one_percent(kind: str) -> None:
    src = _Source(kind)
    ref = src.reference()
    rng = np.random.default_rng(2024)
    trials = 200
    false_alarms = 0
    for _ in range(trials):  # one trial: a window of drift-free samples, interim looks included
        mon = DriftMonitor.from_refstats(ref)
        false_alarms += any(w.flagged for w in _stream(mon, src, rng, mon.config.window))
    assert false_alarms / trials <= 0.01


def test_false_positive_rate_of_sliding_windows_on_a_long_stream() -> None:
    src = _Source("tabular", features=8)
    mon = DriftMonitor.from_refstats(src.reference(), DriftConfig(window=500, stride=100))
    windows = _stream(mon, src, np.random.default_rng(5), 50_000, batch=100)
    assert len(windows) == 500
    assert sum(w.flagged for w in windows) / len(windows) <= 0.01
    assert max(w.score for w in windows) < 0.15


def test_class_distribution_shift_flagged_by_chi_square() -> None:
    src = _Source("tabular")
    mon = DriftMonitor.from_refstats(src.reference())
    rng = np.random.default_rng(3)
    windows: list[DriftWindow] = []
    for _ in range(10):
        x = src.sample(rng, 50)  # the inputs do not change; the model now favours class 0
        logits = src.logits(x)
        logits[:, 0] += 1.5
        windows += mon.observe(x, logits)
    first = next(w for w in windows if w.flagged)
    assert first.end <= 500 and "classes" in first.drivers
    assert not any(n.startswith("f") for n in first.drivers)
    assert first.class_p_value is not None and first.class_p_value < first.threshold
    assert first.class_tv is not None and first.class_tv > 0.1


def test_confidence_drop_flagged_and_mean_confidence_reported() -> None:
    src = _Source("tabular")
    ref = src.reference()
    mon = DriftMonitor.from_refstats(ref)
    rng = np.random.default_rng(4)
    confidences = []
    for _ in range(10):
        x = src.sample(rng, 50)
        probs = np.exp(0.3 * src.logits(x))  # a flatter softmax: the same classes, much less confident
        probs /= probs.sum(axis=1, keepdims=True)
        confidences.append(probs.max(axis=1))
        mon.observe(x, probs)
    last = mon.latest
    assert last is not None and last.flagged and "confidence" in last.drivers
    assert ref.predictions is not None
    assert last.mean_confidence == pytest.approx(np.concatenate(confidences).mean())
    assert mon.mean_confidence == pytest.approx(last.mean_confidence)
    assert last.mean_confidence < ref.predictions.mean_confidence - 0.1


def test_memory_is_bounded_and_batching_does_not_change_results() -> None:
    src = _Source("nchw")
    ref = src.reference()
    config = DriftConfig(window=500, stride=100, history=8)
    one, many = DriftMonitor.from_refstats(ref, config), DriftMonitor.from_refstats(ref, config)
    before = one.memory_bytes()
    x = src.sample(np.random.default_rng(9), 3000)
    logits = src.logits(x)
    big = one.observe(x, logits)
    small = [w for i in range(0, 3000, 7) for w in many.observe(x[i:i + 7], logits[i:i + 7])] + many.flush()
    assert one.memory_bytes() == before == many.memory_bytes()
    assert len(big) == len(small) == 30 and len(one.drain()) == 8 and one.drain() == []
    for a, b in zip(big, small):
        assert (a.end, a.n, a.flagged, a.ks, a.p_values, a.class_chi2) == (b.end, b.n, b.flagged, b.ks, b.p_values,
                                                                          b.class_chi2)
    assert [w.n for w in big[:6]] == [100, 200, 300, 400, 500, 500]


def test_small_batches_are_queued_copied_and_checked_at_once() -> None:
    src = _Source("tabular")
    ref, config = src.reference(), DriftConfig(window=100, stride=100)
    x = src.sample(np.random.default_rng(2), 100)
    logits = src.logits(x)
    (expected,) = DriftMonitor.from_refstats(ref, config).observe(x, logits)
    mon = DriftMonitor.from_refstats(ref, config)
    assert mon.observe(x[:40], logits[:40]) == []  # 40 >= defer: reduced at once, and fixes the sample shape
    buf, out = np.empty((1, 4)), np.empty((1, N_CLASSES))
    windows: list[DriftWindow] = []
    for i in range(40, 100):
        buf[:], out[:] = x[i], logits[i]  # the caller reuses its buffers: the queue holds copies
        windows += mon.observe(buf, out)
    assert windows == [] and mon.samples_seen == 100
    with pytest.raises(DataError, match="3 features"):
        mon.observe(np.zeros((1, 3)))  # a small batch of another shape is checked now, not queued
    with pytest.raises(DataError, match="output classes"):
        mon.observe(np.zeros((1, 4)), np.zeros((1, 3)))
    (window,) = mon.flush()
    assert (window.n, window.ks, window.p_values, window.class_chi2) == (100, expected.ks, expected.p_values,
                                                                         expected.class_chi2)
    assert mon.mean_confidence == pytest.approx(expected.mean_confidence)


def test_concurrent_observe_accounts_every_sample() -> None:
    src = _Source("tabular")
    mon = DriftMonitor.from_refstats(src.reference(), DriftConfig(window=500, stride=100, history=100))
    batches = [src.sample(np.random.default_rng(i), 10) for i in range(200)]

    def worker(part: list[np.ndarray]) -> None:
        for b in part:
            mon.observe(b, src.logits(b))

    threads = [threading.Thread(target=worker, args=(batches[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mon.samples_seen == 2000
    mon.flush()  # batches of 10 are queued and reduced 32 samples at a time
    windows = mon.drain()
    assert len(windows) == 20
    assert sorted(w.end for w in windows) == list(range(100, 2001, 100))


def test_metrics_are_json_and_nonfinite_inputs_are_skipped() -> None:
    src = _Source("tabular")
    mon = DriftMonitor.from_refstats(src.reference())
    x = src.sample(np.random.default_rng(1), 250)
    logits = src.logits(x)
    x[:, 2] = np.nan  # a broken sensor: no finite value in this window
    x[:10, 1] = np.inf
    (window,) = mon.observe(x, logits)
    metrics = json.loads(json.dumps(window.to_metrics(), allow_nan=False))
    assert metrics["n"] == 250 and metrics["flagged"] is False
    assert window.ks[2] == 0.0 and window.p_values[2] == 1.0
    assert window.nonfinite == (0, 10, 250, 0) and metrics["nonfinite"] == 260
    assert {f["name"]: f["mean"] for f in metrics["top_features"]}.get("f2") is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"window": 500, "stride": 300}, "multiple"), ({"stride": 0}, "multiple"), ({"alpha": 0.0}, "alpha"),
     ({"alpha": 1.5}, "alpha"), ({"min_distance": 2.0}, "min_distance"), ({"layout": "CHW"}, "layout"),
     ({"history": 0}, "history")],
)
def test_bad_config_is_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DriftConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("inputs", "probs", "match"),
    [
        (np.zeros((4, 3)), None, "3 features"),
        (np.zeros((4, 5, 2, 2)), None, "5 features"),
        ({"other": np.zeros((4, 4))}, None, "missing"),
        (np.zeros((4, 4)), np.full((3, N_CLASSES), 0.2), "do not fit"),
        (np.zeros((4, 4)), np.full((4, 3), 1 / 3), "3 output classes"),
    ],
)
def test_batches_that_do_not_fit_the_reference_are_refused(inputs: object, probs: object, match: str) -> None:
    mon = DriftMonitor.from_refstats(_Source("tabular").reference())
    with pytest.raises(DataError, match=match):
        mon.observe(inputs, probs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("x", "dof"), [(0.5, 1), (3.84, 1), (12.3, 7), (100.0, 50), (2.0, 9), (400.0, 9)])
def test_chi2_sf_matches_scipy(x: float, dof: int) -> None:
    assert chi2_sf(x, dof) == pytest.approx(stats.chi2.sf(x, dof), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize(("d", "n", "m"), [(0.05, 500, 4000), (0.1, 500, 4000), (0.2, 250, 2000), (0.3, 100, 100)])
def test_ks_pvalue_close_to_scipy_asymptotic(d: float, n: int, m: int) -> None:
    ours = float(ks_pvalue(np.array(d), n, m))
    theirs = float(stats.kstwo.sf(d, round(n * m / (n + m))))
    assert ours == pytest.approx(theirs, rel=0.1)


def test_logits_and_probabilities_give_the_same_window() -> None:
    src = _Source("tabular")
    ref = src.reference()
    x = src.sample(np.random.default_rng(6), 250)
    logits = src.logits(x)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    (a,) = DriftMonitor.from_refstats(ref).observe(x, logits)
    (b,) = DriftMonitor.from_refstats(ref).observe(x, probs)
    assert a.class_chi2 == pytest.approx(b.class_chi2) and a.confidence_ks == pytest.approx(b.confidence_ks)
    assert a.mean_confidence == pytest.approx(float(probs.max(axis=1).mean()))


def test_the_agent_side_needs_no_scipy() -> None:
    code = ("import sys; import edgeml.edge_agent.drift, edgeml.edge_agent.capture; "
            "sys.exit(int(any(m.split('.')[0] in ('scipy', 'torch', 'sklearn') for m in sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
