"""Honest evaluation: both protocols, bootstrap intervals (vs scipy and by coverage), per-group table."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import stats

from deepsports.data.annotations import load_annotations
from deepsports.train import quality
from deepsports.train.evaluation import Predictions
from deepsports.train.metrics import bootstrap_interval, rel_l2_rows, spearman_rows


def _predictions(true_score, true_dd, rng, noise=6.0, video=None, clip=None) -> Predictions:
    """Predictions whose execution and difficulty are the truth plus noise (scores on judges' 0.5 steps)."""
    n = len(true_score)
    pred_execution = true_score / true_dd + rng.normal(0.0, noise / 3, n)
    pred_dd = np.round(true_dd + rng.normal(0.0, 0.2, n), 1)  # rounded: ties in the predictions too
    return Predictions(video=np.asarray(video if video is not None else np.zeros(n), dtype=np.int64),
                       clip=np.asarray(clip if clip is not None else np.arange(n), dtype=np.int64),
                       true_score=np.asarray(true_score, float), pred_score=pred_execution * pred_dd,
                       true_difficulty=np.asarray(true_dd, float), pred_difficulty=pred_dd, loss=0.5,
                       pred_execution=pred_execution)


def _random_split(rng, n=120) -> tuple[np.ndarray, np.ndarray]:
    true_dd = rng.choice(np.arange(1.6, 3.8, 0.1).round(1), n)
    execution = np.round(rng.uniform(9, 28, n) * 2) / 2  # sums of judges' half points: many ties
    return np.round(execution * true_dd, 2), true_dd


def _rel_l2(pred, true):
    return 100 * np.mean(((pred - true) / (true.max() - true.min())) ** 2)


def test_both_protocols_match_an_independent_computation():
    rng = np.random.default_rng(7)
    true_score, true_dd = _random_split(rng)
    preds = _predictions(true_score, true_dd, rng)
    report = quality.assess(preds, n_resamples=200)
    m = report.metrics
    score_dd = preds.pred_execution * true_dd
    assert m["spearman"] == pytest.approx(stats.spearmanr(preds.pred_score, true_score).statistic, abs=1e-12)
    assert m["spearman_dd"] == pytest.approx(stats.spearmanr(score_dd, true_score).statistic, abs=1e-12)
    assert m["rel_l2"] == pytest.approx(_rel_l2(preds.pred_score, true_score), rel=1e-12)
    assert m["rel_l2_dd"] == pytest.approx(_rel_l2(score_dd, true_score), rel=1e-12)
    assert m["mse"] == pytest.approx(np.mean((preds.pred_score - true_score) ** 2), rel=1e-12)
    assert m["difficulty_mae"] == pytest.approx(np.mean(np.abs(preds.pred_difficulty - true_dd)), rel=1e-12)
    # Handing the model the true difficulty removes the difficulty's error: a better ranking here.
    assert m["spearman_dd"] > m["spearman"]
    for name in quality.INTERVAL_METRICS:
        assert m[f"{name}_ci_low"] < m[name] < m[f"{name}_ci_high"], name


def test_vectorised_statistics_match_scipy_row_by_row():
    rng = np.random.default_rng(3)
    pred = np.round(rng.normal(size=(6, 30)), 1)
    true = np.round(pred + rng.normal(size=(6, 30)), 1)
    pred[5] = 1.0  # a constant row: no ranking information, 0 as metrics.spearman says
    rho = spearman_rows(pred, true)
    for i in range(5):
        assert rho[i] == pytest.approx(stats.spearmanr(pred[i], true[i]).statistic, abs=1e-12)
        assert rel_l2_rows(pred, true)[i] == pytest.approx(_rel_l2(pred[i], true[i]), rel=1e-12)
    assert rho[5] == 0.0
    assert spearman_rows(pred.T, true.T, axis=0) == pytest.approx(rho, abs=1e-15)


def test_bootstrap_interval_equals_scipy_with_the_unvectorised_statistic():
    rng = np.random.default_rng(11)
    true_score, true_dd = _random_split(rng, n=60)
    pred = _predictions(true_score, true_dd, rng).pred_score
    ours = bootstrap_interval(spearman_rows, pred, true_score, n_resamples=500, seed=5)
    reference = stats.bootstrap((pred, true_score), lambda p, t: stats.spearmanr(p, t).statistic, paired=True,
                                vectorized=False, n_resamples=500, method="BCa", batch=250,
                                rng=np.random.default_rng(5)).confidence_interval
    assert ours == pytest.approx((reference.low, reference.high), abs=1e-12)
    ours_l2 = bootstrap_interval(rel_l2_rows, pred, true_score, n_resamples=500, seed=5)
    reference = stats.bootstrap((pred, true_score), _rel_l2, paired=True, vectorized=False, n_resamples=500,
                                method="BCa", batch=250, rng=np.random.default_rng(5)).confidence_interval
    assert ours_l2 == pytest.approx((reference.low, reference.high), rel=1e-9)
    assert bootstrap_interval(spearman_rows, pred, true_score, n_resamples=500, seed=5) == ours  # seeded
    assert all(math.isnan(v) for v in bootstrap_interval(spearman_rows, pred[:2], true_score[:2]))


def test_bootstrap_interval_covers_a_known_spearman_at_its_nominal_rate():
    """Bivariate normal with Pearson r has population Spearman 6/pi * asin(r/2) (Pearson, 1907)."""
    r, n, replications, confidence = 0.9, 80, 200, 0.95
    rho = 6 / math.pi * math.asin(r / 2)
    rng = np.random.default_rng(2026)
    covered = 0
    for _ in range(replications):
        x = rng.normal(size=n)
        y = r * x + math.sqrt(1 - r * r) * rng.normal(size=n)
        low, high = bootstrap_interval(spearman_rows, x, y, n_resamples=1000, confidence=confidence,
                                       seed=int(rng.integers(2**31)))
        covered += low <= rho <= high
    coverage = covered / replications
    # The coverage of a correct interval is Binomial(replications, confidence) / replications; 4 sd
    # of that keeps a false alarm below 1e-4 and still fails an interval that is 6 points off.
    sd = math.sqrt(confidence * (1 - confidence) / replications)
    assert abs(coverage - confidence) <= 4 * sd, (coverage, sd)


def test_group_table_on_the_synthetic_set(synth_data, tmp_path):
    clips = list(load_annotations(synth_data.annotation_path).values())
    rng = np.random.default_rng(0)
    true_score = np.array([c.final_score for c in clips])
    true_dd = np.array([c.difficulty for c in clips])
    preds = _predictions(true_score, true_dd, rng, video=[c.video for c in clips], clip=[c.clip for c in clips])
    rows = quality.group_table(preds, clips)
    fields = list(dict.fromkeys(row["field"] for row in rows))
    assert fields == ["position", "rotation_type", "armstand", "ss_no", "tw_no", "difficulty"]
    for name in fields[:-1]:
        expected = {}
        for c in clips:
            expected[str(c.extra[name])] = expected.get(str(c.extra[name]), 0) + 1
        got = {row["group"]: row["count"] for row in rows if row["field"] == name}
        assert got == expected, name
    bins = {row["group"]: row["count"] for row in rows if row["field"] == "difficulty"}
    assert sum(bins.values()) == len(clips)
    assert bins.get("<2.0", 0) == int(np.sum(true_dd < 2.0)) and bins.get(">=3.5", 0) == int(np.sum(true_dd >= 3.5))
    for row in rows:
        if row["field"] == "difficulty":
            continue
        mask = np.array([str(c.extra[row["field"]]) == row["group"] for c in clips])
        assert row["score_mae"] == pytest.approx(np.mean(np.abs(preds.pred_score[mask] - true_score[mask])))
        assert row["difficulty_mae"] == pytest.approx(np.mean(np.abs(preds.pred_difficulty[mask] - true_dd[mask])))
        if row["count"] >= quality.MIN_GROUP_CLIPS:  # armstand and tw_no: one group of every clip
            assert row["spearman"] == pytest.approx(stats.spearmanr(preds.pred_score[mask],
                                                                    true_score[mask]).statistic, abs=1e-12)
        else:
            assert math.isnan(row["spearman"]) and math.isnan(row["spearman_dd"])
    assert any(row["count"] >= quality.MIN_GROUP_CLIPS for row in rows)
    assert any(row["count"] < quality.MIN_GROUP_CLIPS for row in rows)

    csv_path = quality.write_group_csv(rows, tmp_path / "groups.csv")
    with open(csv_path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert tuple(read[0]) == quality.GROUP_COLUMNS and len(read) == len(rows)
    assert {r["spearman"] for r in read if int(r["count"]) < quality.MIN_GROUP_CLIPS} == {""}
    png = quality.plot_groups(rows, tmp_path / "groups.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_table_refuses_predictions_without_annotations(synth_data):
    clips = list(load_annotations(synth_data.annotation_path).values())[:5]
    rng = np.random.default_rng(1)
    preds = _predictions(np.full(6, 50.0) + np.arange(6), np.full(6, 2.0), rng, video=[99] * 6, clip=range(6))
    with pytest.raises(ValueError, match=r"6 predicted clip\(s\) have no annotation, e.g. \(99, 0\)"):
        quality.group_table(preds, clips)
