"""headlab.metrics against hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from headlab.metrics import (
    CI, accuracy, bootstrap_ci, chance_warnings, classification_report, confusion_matrix, macro_f1,
    parse_generated_label, roc_auc,
)


# --------------------------------------------------------------------------------------------------
# accuracy / macro-F1 / confusion matrix
# --------------------------------------------------------------------------------------------------
def test_accuracy():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert accuracy([1], [1]) == 1.0
    assert accuracy([0, 1, 1], [-1, -1, 1]) == pytest.approx(1 / 3)  # no answer counts as wrong


@pytest.mark.parametrize("labels,preds", [([0, 1], [0]), ([], [])])
def test_accuracy_bad_shapes(labels, preds):
    with pytest.raises(ValueError):
        accuracy(labels, preds)


def test_macro_f1_hand_computed():
    y = [0, 0, 0, 1, 1, 1, 1, 1]
    p = [0, 0, 1, 1, 1, 1, 0, 0]
    # class 0: TP=2 FP=2 FN=1 -> 4/7 ; class 1: TP=3 FP=1 FN=2 -> 6/9
    assert macro_f1(y, p) == pytest.approx((4 / 7 + 6 / 9) / 2)
    assert macro_f1(y, y) == 1.0


def test_macro_f1_all_one_label():
    """Predicting 'positive' for everything: F1(pos) = 2*3/(2*3+2) = 0.75, F1(neg) = 0."""
    y = [0, 0, 1, 1, 1]
    p = [1, 1, 1, 1, 1]
    assert macro_f1(y, p, n_classes=2) == pytest.approx(0.75 / 2)
    # accuracy would call this 60%; macro-F1 punishes it
    assert macro_f1(y, p, n_classes=2) < accuracy(y, p)


def test_macro_f1_no_answer_and_absent_class():
    y = [0, 1, 1]
    p = [-1, 1, -1]
    # class 0: TP=0 FP=0 FN=1 -> 0 ; class 1: TP=1 FP=0 FN=1 -> 2/3
    assert macro_f1(y, p, n_classes=2) == pytest.approx(1 / 3)
    # A class nobody has or predicts scores 0 and lowers the mean.
    assert macro_f1([0, 1], [0, 1], n_classes=3) == pytest.approx(2 / 3)


def test_confusion_matrix_with_no_answer():
    y = [0, 0, 1, 1, 1, 0]
    p = [0, 1, 1, -1, -1, 0]
    cm = confusion_matrix(y, p, n_classes=2)
    assert cm.shape == (2, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 2]])
    assert cm.sum() == len(y)
    assert np.trace(cm[:, :2]) / cm.sum() == accuracy(y, p)


# --------------------------------------------------------------------------------------------------
# ROC-AUC
# --------------------------------------------------------------------------------------------------
def _auc_by_definition(y, s) -> float:
    """P(score of a random positive > score of a random negative) + 0.5 P(tie), over all pairs."""
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def test_roc_auc_perfect_reversed_ties():
    y = [0, 0, 1, 1]
    assert roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_roc_auc_hand_computed():
    # positives score 0.35, 0.8 ; negatives 0.1, 0.4, 0.8
    # pairs: 0.35 > 0.1 (1), < 0.4 (0), < 0.8 (0); 0.8 > 0.1 (1), > 0.4 (1), = 0.8 (0.5) -> 3.5 / 6
    y = [0, 1, 0, 1, 0]
    s = [0.1, 0.35, 0.4, 0.8, 0.8]
    assert roc_auc(y, s) == pytest.approx(3.5 / 6)


def test_roc_auc_equals_probability_definition_random():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 40))
        y = rng.integers(0, 2, n)
        y[0], y[1] = 0, 1  # both classes present
        s = rng.integers(0, 6, n).astype(float) if trial % 2 else rng.normal(size=n)  # ties on odd trials
        assert roc_auc(y, s) == pytest.approx(_auc_by_definition(y, s), abs=1e-12)


def test_roc_auc_single_class_is_nan():
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_roc_auc_invariant_to_monotone_transform():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50)
    s = rng.normal(size=50)
    assert roc_auc(y, s) == pytest.approx(roc_auc(y, np.exp(3 * s)))


# --------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------
def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.where(rng.random(200) < 0.8, y, 1 - y)
    ci = bootstrap_ci(accuracy, y, p, n_boot=300, seed=7)
    assert isinstance(ci, CI) and ci.level == 0.95
    assert ci.value == accuracy(y, p)
    assert ci.low <= ci.value <= ci.high
    assert ci.high - ci.low > 0.02  # a real interval, not a point
    # ~ binomial standard error: 1.96 * sqrt(.8 * .2 / 200) = 0.055
    assert 0.06 < ci.high - ci.low < 0.18
    assert bootstrap_ci(accuracy, y, p, n_boot=300, seed=7) == ci
    assert bootstrap_ci(accuracy, y, p, n_boot=300, seed=8) != ci
    assert str(ci).startswith(f"{ci.value:.3f} [")


def test_bootstrap_ci_level_widens_interval():
    x = np.random.default_rng(2).normal(size=100)
    narrow = bootstrap_ci(np.mean, x, n_boot=400, level=0.5)
    wide = bootstrap_ci(np.mean, x, n_boot=400, level=0.99)
    assert wide.low < narrow.low <= narrow.high < wide.high


def test_bootstrap_ci_constant_data():
    ci = bootstrap_ci(np.mean, np.full(10, 3.0), n_boot=50)
    assert (ci.value, ci.low, ci.high) == (3.0, 3.0, 3.0)


def test_block_bootstrap_resamples_whole_groups():
    """Each group is constant, so a statistic that counts distinct values within groups shows that
    every resample consists of whole groups; and with strongly correlated groups the block interval
    is wider than the naive one."""
    groups = np.repeat(np.arange(10), 20)
    group_means = np.random.default_rng(3).normal(size=10) * 3
    x = group_means[groups] + np.random.default_rng(4).normal(size=200) * 0.1

    seen_sizes = []

    def rows_come_in_whole_groups(xs, gs):
        _, counts = np.unique(gs, return_counts=True)
        seen_sizes.append(len(xs))
        assert np.all(counts % 20 == 0)
        return float(np.mean(xs))

    bootstrap_ci(rows_come_in_whole_groups, x, groups, n_boot=50, groups=groups)
    assert seen_sizes and set(seen_sizes) == {200}
    naive = bootstrap_ci(np.mean, x, n_boot=400, seed=0)
    block = bootstrap_ci(np.mean, x, n_boot=400, seed=0, groups=groups)
    assert naive.value == block.value
    assert (block.high - block.low) > 3 * (naive.high - naive.low)
    assert bootstrap_ci(np.mean, x, n_boot=400, seed=0, groups=groups) == block


def test_bootstrap_ci_drops_nan_resamples():
    y = np.array([0] * 19 + [1])  # many resamples have no positive -> roc_auc is nan there
    s = np.linspace(0, 1, 20)
    ci = bootstrap_ci(roc_auc, y, s, n_boot=200)
    assert ci.value == 1.0 and ci.low == 1.0 and ci.high == 1.0


@pytest.mark.parametrize("kwargs", [dict(level=1.0), dict(level=0.0)])
def test_bootstrap_ci_bad_level(kwargs):
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(np.mean, [1.0, 2.0], **kwargs)


def test_bootstrap_ci_bad_arrays():
    with pytest.raises(ValueError):
        bootstrap_ci(accuracy, [0, 1], [0])
    with pytest.raises(ValueError):
        bootstrap_ci(np.mean, [])


# --------------------------------------------------------------------------------------------------
# Generated labels
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    (" positive", 1),
    (" Negative.", 0),
    ("POSITIVE!", 1),
    (" neutral", -1),
    ("", -1),
    (" negative, not positive", 0),  # the first occurring word wins
    (" it is positive or negative", 1),
])
def test_parse_generated_label(text, expected):
    assert parse_generated_label(text, ["negative", "positive"]) == expected


# --------------------------------------------------------------------------------------------------
# Report and chance checks
# --------------------------------------------------------------------------------------------------
def test_classification_report_values():
    y = np.array([0, 0, 1, 1])
    # logprobs (neg, pos); diff = pos - neg = [-2, 1, 3, -1] -> preds [0, 1, 1, 0]
    lp = np.log(np.array([[0.8, 0.1], [0.2, 0.5], [0.04, 0.8], [0.5, 0.2]]))
    rep = classification_report(y, lp, n_boot=100)
    assert list(rep.columns) == ["metric", "value", "ci_low", "ci_high"]
    assert list(rep["metric"]) == ["accuracy", "macro_f1", "roc_auc", "logit_diff", "p_correct"]
    val = dict(zip(rep["metric"], rep["value"]))
    assert val["accuracy"] == 0.5
    assert val["macro_f1"] == pytest.approx(0.5)  # each class: TP=1 FP=1 FN=1 -> 0.5
    diff = lp[:, 1] - lp[:, 0]
    assert val["roc_auc"] == pytest.approx(_auc_by_definition(y, diff))  # = 0.75
    assert val["roc_auc"] == pytest.approx(0.75)
    assert val["logit_diff"] == pytest.approx(np.mean([-diff[0], -diff[1], diff[2], diff[3]]))
    assert val["p_correct"] == pytest.approx(np.mean([0.8, 0.2, 0.8, 0.2]))
    assert np.all(rep["ci_low"] <= rep["value"] + 1e-12) and np.all(rep["value"] <= rep["ci_high"] + 1e-12)


def test_classification_report_bad_shape():
    with pytest.raises(ValueError, match="logprobs"):
        classification_report([0, 1], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="logprobs"):
        classification_report([0, 1, 1], np.zeros((2, 2)))


def test_chance_warnings_constant_predictions():
    y = np.array([0, 1] * 50)
    p = np.ones(100, dtype=int)
    warns = chance_warnings(y, p, scores=np.zeros(100), n_boot=200)
    text = " ".join(warns)
    assert "majority-class" in text
    assert "same predicted label" in text
    assert "ROC-AUC" in text
    assert len(warns) == 3


def test_chance_warnings_perfect_classifier_is_quiet():
    y = np.array([0, 1] * 50)
    scores = np.where(y == 1, 2.0, -2.0) + np.linspace(0, 0.1, 100)
    assert chance_warnings(y, y.copy(), scores=scores, n_boot=200) == []
    assert chance_warnings(y, y.copy(), n_boot=200) == []


def test_chance_warnings_near_chance_accuracy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = rng.integers(0, 2, 60)  # independent of y
    warns = chance_warnings(y, p, n_boot=200)
    assert any("majority-class" in w for w in warns)
