"""Per-head summaries: paired bootstrap, rank agreement, impact categories, ranking of a sweep table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from headlab import metrics, sweeps


def test_bootstrap_rows_constant_and_paired():
    x = np.array([[1.0] * 20, [3.0] * 20])
    mean, low, high = metrics.bootstrap_rows(x, n_boot=50)
    np.testing.assert_allclose(mean, [1, 3])
    np.testing.assert_allclose(low, [1, 3])
    np.testing.assert_allclose(high, [1, 3])
    rng = np.random.default_rng(0)
    noise = rng.normal(size=200)
    y = np.vstack([noise, noise + 1.0])  # identical rows up to a shift: paired resampling keeps it
    mean, low, high = metrics.bootstrap_rows(y, n_boot=200)
    np.testing.assert_allclose(high - low, (high - low)[0])
    np.testing.assert_allclose(low[1] - low[0], 1.0)
    assert low[0] < noise.mean() < high[0]


def test_bootstrap_rows_bad_input():
    with pytest.raises(ValueError, match="shape"):
        metrics.bootstrap_rows(np.zeros(5))
    with pytest.raises(ValueError, match="level"):
        metrics.bootstrap_rows(np.zeros((2, 3)), level=1.5)


def test_rank_agreement_hand_cases():
    df = pd.DataFrame({"s0": [1, 2, 3, 4, 5.0], "s1": [10, 20, 30, 40, 50.0], "s2": [5, 4, 3, 2, 1.0]})
    r = metrics.rank_agreement(df).set_index(["a", "b"])
    assert r.loc[("s0", "s1"), "spearman"] == pytest.approx(1.0)
    assert r.loc[("s0", "s1"), "kendall"] == pytest.approx(1.0)
    assert r.loc[("s0", "s2"), "spearman"] == pytest.approx(-1.0)
    assert r.loc[("s0", "s1"), "top10_overlap"] == 5
    with pytest.raises(ValueError, match="two columns"):
        metrics.rank_agreement(df[["s0"]])


def test_impact_category_boundaries():
    got = metrics.impact_category([0, 4.99, 5, -7, 10, 10.01, -25])
    assert got.tolist() == ["LOW", "LOW", "MEDIUM", "MEDIUM", "MEDIUM", "HIGH", "HIGH"]


def _fake_sweep():
    """Two layers x two heads, two seeds, 10 prompts: head (1, 0) hurts by 2, (0, 1) by 1, others 0."""
    effect = {(0, 0): 0.0, (0, 1): 1.0, (1, 0): 2.0, (1, 1): 0.0}
    heads, prompts = [], []
    for seed in (0, 1):
        for (layer, head), e in effect.items():
            heads.append({"layer": layer, "head": head, "mode": "absolute", "level": 1.0, "seed": seed,
                          "accuracy_drop": e * 0.06, "macro_f1_drop": e * 0.05, "p_correct_drop": e * 0.1,
                          "logit_diff_drop": e + 0.01 * seed})
            for p in range(10):
                prompts.append({"layer": layer, "head": head, "prompt": p, "mode": "absolute", "level": 1.0,
                                "seed": seed, "logit_diff_change": -e + 0.1 * ((p % 3) - 1)})
    return pd.DataFrame(heads), pd.DataFrame(prompts)


def test_rank_heads_orders_by_effect_with_intervals():
    heads, prompts = _fake_sweep()
    r = sweeps.rank_heads(heads, prompts, "absolute", 1.0, n_boot=100)
    assert [(a, b) for a, b in zip(r["layer"], r["head"])][:2] == [(1, 0), (0, 1)]
    assert r["effect"].iloc[0] == pytest.approx(2.01)  # mean over prompts of the +-0.1 pattern is -0.01
    assert (r["effect_low"] <= r["effect"]).all() and (r["effect"] <= r["effect_high"]).all()
    assert r.loc[0, "category"] == "HIGH" and r.loc[1, "category"] == "MEDIUM"
    assert r["rank"].tolist() == [1, 2, 3, 4] and (r["n_seeds"] == 2).all()


def test_rank_heads_bad_setting_names_what_exists():
    heads, prompts = _fake_sweep()
    with pytest.raises(ValueError, match="noise"):
        sweeps.rank_heads(heads, prompts, "noise", 1.0)
    with pytest.raises(ValueError, match=r"level=2\.0.*absolute"):
        sweeps.rank_heads(heads, prompts, "absolute", 2.0)


def test_seed_agreement():
    heads, _ = _fake_sweep()
    a = sweeps.seed_agreement(heads, "absolute", 1.0)
    assert len(a) == 1 and a["spearman"].iloc[0] == pytest.approx(1.0)
