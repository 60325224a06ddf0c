"""Reference statistics: what is summarised, the numbers, and the versioned JSON format."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edgeml.refstats import (
    CONFIDENCE_BINS,
    MAX_FEATURES,
    SCHEMA,
    ReferenceStats,
    RefStatsError,
    compute_reference_stats,
    feature_matrix,
    output_matrix,
    to_probabilities,
)


def _images(n: int = 60, channels: int = 3) -> np.ndarray:
    """NCHW images whose channel c is centred on 10 * c."""
    rng = np.random.default_rng(0)
    base = 10.0 * np.arange(channels, dtype=np.float32)[None, :, None, None]
    return (base + rng.standard_normal((n, channels, 6, 5))).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_images_give_one_feature_per_channel_with_its_per_sample_mean() -> None:
    x = _images()
    stats = compute_reference_stats({"input": x})
    feats = stats.features["input"]
    assert [f.name for f in feats] == ["channel0", "channel1", "channel2"]
    assert stats.n_samples == 60 and stats.predictions is None
    for c, f in enumerate(feats):
        per_sample = x[:, c].astype(np.float64).mean(axis=(1, 2))
        assert f.n == 60 and sum(f.counts) == 60
        assert f.mean == pytest.approx(per_sample.mean()) and f.std == pytest.approx(per_sample.std())
        assert (f.min, f.max) == (pytest.approx(per_sample.min()), pytest.approx(per_sample.max()))
        assert f.bin_edges[0] == f.min and f.bin_edges[-1] == f.max
        assert len(f.bin_edges) == len(f.counts) + 1 == 11
        assert f.bin_edges == sorted(f.bin_edges)
        assert 10 * c - 1 < f.mean < 10 * c + 1


def test_nhwc_layout_gives_the_same_statistics_as_nchw() -> None:
    x = _images()
    nchw = compute_reference_stats({"input": x})
    nhwc = compute_reference_stats({"input": x.transpose(0, 2, 3, 1)}, layout="NHWC")
    assert len(nhwc.features["input"]) == 3
    for a, b in zip(nchw.features["input"], nhwc.features["input"]):
        assert a.name == b.name and a.counts == b.counts
        assert a.mean == pytest.approx(b.mean) and a.bin_edges == pytest.approx(b.bin_edges)


def test_tabular_columns_are_features_with_quantile_bins() -> None:
    rng = np.random.default_rng(1)
    x = np.column_stack([rng.uniform(0, 1, 1000), rng.normal(5, 2, 1000), np.arange(1000)])
    stats = compute_reference_stats({"table": x}, bins=4)
    feats = stats.features["table"]
    assert [f.name for f in feats] == ["f0", "f1", "f2"]
    for i, f in enumerate(feats):
        assert f.n == 1000 and sum(f.counts) == 1000 and len(f.counts) == 4
        assert f.mean == pytest.approx(x[:, i].mean()) and f.std == pytest.approx(x[:, i].std())
        assert f.counts == [250, 250, 250, 250]  # quantile bins hold equal shares
    assert feats[2].bin_edges == pytest.approx([0.0, 249.75, 499.5, 749.25, 999.0])


def test_several_inputs_are_summarised_separately() -> None:
    stats = compute_reference_stats({"image": _images(n=20), "meta": np.ones((20, 2))})
    assert set(stats.features) == {"image", "meta"}
    assert len(stats.features["image"]) == 3 and len(stats.features["meta"]) == 2
    assert stats.n_samples == 20


@pytest.mark.parametrize(
    ("shape", "names"),
    [((7, 2, 3, 3), ["channel0", "channel1"]), ((7, 4), ["f0", "f1", "f2", "f3"]), ((7,), ["value"]),
     ((7, 2, 5), ["mean"]), ((7, MAX_FEATURES + 10), [f"f{i}" for i in range(MAX_FEATURES)])],
    ids=["image", "tabular", "scalar", "sequence", "wide-table"],
)
def test_feature_matrix_reduces_each_rank(shape: tuple[int, ...], names: list[str]) -> None:
    rows, got = feature_matrix(np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    assert got == names and rows.shape == (7, len(names))


def test_constant_feature_gets_one_bin_around_its_value() -> None:
    (f,) = compute_reference_stats({"x": np.full((9, 1), 3.0)}).features["x"]
    assert f.bin_edges == [2.5, 3.5] and f.counts == [9]
    assert (f.mean, f.std, f.min, f.max) == (3.0, 0.0, 3.0, 3.0)


def test_non_finite_values_are_left_out() -> None:
    x = np.array([[1.0], [2.0], [np.nan], [np.inf], [3.0]])
    (f,) = compute_reference_stats({"x": x}).features["x"]
    assert f.n == 3 and sum(f.counts) == 3 and f.max == 3.0 and f.mean == 2.0


def test_prediction_stats_from_logits_are_softmaxed() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (200, 4))
    preds = compute_reference_stats({"x": rng.normal(size=(200, 2))}, logits).predictions
    assert preds is not None
    probs = _softmax(logits)
    assert preds.class_counts == np.bincount(logits.argmax(1), minlength=4).tolist()
    assert sum(preds.class_counts) == 200 and sum(preds.confidence_counts) == 200
    assert preds.mean_confidence == pytest.approx(probs.max(1).mean())
    assert preds.confidence_edges == pytest.approx(np.linspace(0, 1, CONFIDENCE_BINS + 1).tolist())
    expected, _ = np.histogram(probs.max(1), bins=np.linspace(0, 1, CONFIDENCE_BINS + 1))
    assert preds.confidence_counts == expected.tolist()


def test_prediction_stats_from_probabilities_are_kept_as_given() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1], [0.05, 0.9, 0.05]])
    preds = compute_reference_stats({"x": np.zeros((4, 1))}, probs).predictions
    assert preds is not None
    assert preds.class_counts == [1, 2, 1]
    assert preds.mean_confidence == pytest.approx((0.7 + 0.8 + 0.6 + 0.9) / 4)  # not softmaxed again
    np.testing.assert_array_equal(to_probabilities(probs), probs)
    np.testing.assert_allclose(to_probabilities(np.log(probs) + 5.0), probs)


@pytest.mark.parametrize("outputs", [np.zeros(5), np.zeros((5, 1))], ids=["rank1", "one-column"])
def test_non_classifier_outputs_give_no_prediction_stats(outputs: np.ndarray) -> None:
    assert compute_reference_stats({"x": np.zeros((5, 2))}, outputs).predictions is None


def test_json_round_trip_is_exact() -> None:
    rng = np.random.default_rng(3)
    stats = compute_reference_stats({"input": _images(), "meta": rng.normal(size=(60, 3))},
                                    rng.normal(size=(60, 10)))
    again = ReferenceStats.from_json(stats.to_json())
    assert again == stats
    assert again.to_json() == stats.to_json()
    assert json.loads(stats.to_json())["schema"] == SCHEMA == "edgeml.refstats/2"
    assert ReferenceStats.from_json(stats.to_json().decode()) == stats
    assert list(again.outputs) == ["output"] and again.outputs == stats.outputs


#: A document as edgeml wrote it before output sketches (edgeml.refstats/1), byte for byte.
_V1_DOCUMENT = """{
 "extra": {},
 "features": {"x": [{"bin_edges": [0.0, 9.0, 18.0], "counts": [5, 5], "max": 18.0, "mean": 9.0, "min": 0.0,
   "n": 10, "name": "f0", "std": 5.744562646538029}]},
 "n_samples": 10,
 "predictions": {"class_counts": [4, 3, 3], "confidence_edges": [0.0, 0.5, 1.0], "confidence_counts": [6, 4],
   "mean_confidence": 0.45},
 "schema": "edgeml.refstats/1"
}"""


def test_a_version_1_document_still_reads_without_output_sketches() -> None:
    old = ReferenceStats.from_json(_V1_DOCUMENT)
    assert old.schema == "edgeml.refstats/1" and old.outputs == {} and old.n_samples == 10
    (f,) = old.features["x"]
    assert (f.name, f.counts, f.bin_edges, f.mean) == ("f0", [5, 5], [0.0, 9.0, 18.0], 9.0)
    assert old.predictions is not None and old.predictions.class_counts == [4, 3, 3]
    again = ReferenceStats.from_json(old.to_json())  # written back as it was: still /1, no outputs key
    assert again == old and "outputs" not in json.loads(old.to_json())
    assert json.loads(old.to_json()) == json.loads(_V1_DOCUMENT)


def test_every_output_gets_a_sketch_whatever_the_model_computes() -> None:
    rng = np.random.default_rng(4)
    heatmap = rng.uniform(0, 1, (50, 1, 6, 8))  # a detector's probability map
    boxes = rng.normal(10, 2, (50, 3))  # a regressor: three values per sample
    stats = compute_reference_stats({"image": _images(n=50)}, {"prob": heatmap, "boxes": boxes})
    assert list(stats.outputs) == ["prob", "boxes"]
    assert [f.name for f in stats.outputs["prob"]] == ["mean", "std", "min", "max"]
    assert [f.name for f in stats.outputs["boxes"]] == ["f0", "f1", "f2", "mean", "std", "min", "max"]
    flat = heatmap.reshape(50, -1)
    mean, std, lo, hi = stats.outputs["prob"]
    assert mean.mean == pytest.approx(flat.mean(1).mean()) and std.mean == pytest.approx(flat.std(1).mean())
    assert lo.max == pytest.approx(flat.min(1).max()) and hi.min == pytest.approx(flat.max(1).min())
    assert stats.outputs["boxes"][1].mean == pytest.approx(boxes[:, 1].mean())
    assert all(sum(f.counts) == 50 for fl in stats.outputs.values() for f in fl)
    # the first output is not a class-score vector here (rank 4): no prediction statistics
    assert stats.predictions is None


@pytest.mark.parametrize(
    ("shape", "names"),
    [((7,), ["value"]), ((7, 1), ["value"]), ((7, 2), ["f0", "f1", "mean", "std", "min", "max"]),
     ((7, 40), ["mean", "std", "min", "max"]), ((7, 1, 4, 4), ["mean", "std", "min", "max"])],
    ids=["scalar", "one-column", "regressor", "wide-scores", "map"],
)
def test_output_matrix_reduces_each_output_kind(shape: tuple[int, ...], names: list[str]) -> None:
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    rows, got = output_matrix(x)
    assert got == names and rows.shape == (7, len(names))
    flat = x.reshape(7, -1).astype(np.float64)
    if "max" in names:
        np.testing.assert_allclose(rows[:, names.index("max")], flat.max(1))
        np.testing.assert_allclose(rows[:, names.index("std")], flat.std(1))


def test_a_constant_output_feature_gets_a_narrow_band_that_a_scaled_output_leaves() -> None:
    probs = _softmax(np.random.default_rng(5).normal(0, 2, (80, 100)))  # each row sums to one: mean is 0.01
    stats = compute_reference_stats({"x": np.zeros((80, 1))}, {"probs": probs})
    mean = stats.outputs["probs"][0]
    assert mean.name == "mean" and mean.counts == [0, 80, 0]
    lo, inner_lo, inner_hi, hi = mean.bin_edges
    assert inner_lo == pytest.approx(0.0095) and inner_hi == pytest.approx(0.0105) and lo < inner_lo < hi
    assert not inner_lo <= 0.1 * 0.01 < inner_hi  # the mean of outputs scaled by 0.1 falls outside the band


def _doc(**changes: Any) -> dict[str, Any]:
    doc = json.loads(compute_reference_stats({"x": np.arange(20.0).reshape(10, 2)},
                                             np.eye(10, 3)).to_json())
    doc.update(changes)
    return doc


def _feature(**changes: Any) -> dict[str, Any]:
    doc = _doc()
    doc["features"]["x"][0].update(changes)
    return doc


def _without_feature_field(key: str) -> dict[str, Any]:
    doc = _doc()
    del doc["features"]["x"][0][key]
    return doc


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b"{not json", "not valid JSON", id="not-json"),
        pytest.param(json.dumps([1, 2]), "unsupported reference statistics schema None", id="not-an-object"),
        pytest.param(json.dumps(_doc(schema="edgeml.refstats/3")), "schema 'edgeml.refstats/3'", id="future-schema"),
        pytest.param(json.dumps({k: v for k, v in _doc().items() if k != "schema"}), "schema None", id="no-schema"),
        pytest.param(json.dumps({k: v for k, v in _doc().items() if k != "features"}), "malformed",
                     id="no-features"),
        pytest.param(json.dumps(_doc(features={"x": 5})), "malformed", id="features-not-lists"),
        pytest.param(json.dumps(_without_feature_field("counts")), "malformed", id="feature-field-missing"),
        pytest.param(json.dumps(_feature(colour="red")), "malformed", id="feature-unknown-field"),
        pytest.param(json.dumps(_feature(counts=[1, 2, 3])), r"feature f0: 3 counts need one more edge",
                     id="edges-counts-mismatch"),
        pytest.param(json.dumps(_doc(predictions={"class_counts": [1]})), "malformed", id="predictions-malformed"),
        pytest.param(json.dumps(_doc(n_samples="many")), "malformed", id="n-samples-not-int"),
        pytest.param(json.dumps(_doc(outputs={"y": [{"name": "mean"}]})), "malformed", id="output-sketch-malformed"),
        pytest.param(json.dumps(_doc(outputs={"y": 3})), "malformed", id="outputs-not-lists"),
    ],
)
def test_malformed_documents_are_refused(raw: bytes | str, message: str) -> None:
    with pytest.raises(RefStatsError, match=message):
        ReferenceStats.from_json(raw)
    assert issubclass(RefStatsError, ValueError)
