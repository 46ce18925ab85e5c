"""headlab.stats: cluster bootstrap, cluster-robust errors, rank intervals, Holm, variance components."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from headlab import metrics, stats


def test_cluster_bootstrap_unit_weights_is_bootstrap_rows():
    x = np.random.default_rng(0).normal(size=(5, 30))
    boots = stats.cluster_bootstrap(x, n_boot=300, seed=7)
    low, high = stats.percentile_interval(boots)
    _, low_r, high_r = metrics.bootstrap_rows(x, n_boot=300, seed=7)
    np.testing.assert_allclose(low, low_r, atol=1e-12)
    np.testing.assert_allclose(high, high_r, atol=1e-12)


def test_cluster_bootstrap_strata_are_resampled_apart():
    # stratum a holds only 0s, stratum b only 1s, equally many observations: every replicate is 0.5
    x = np.array([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    boots = stats.cluster_bootstrap(x, strata=["a", "a", "a", "b", "b", "b"], n_boot=200)
    np.testing.assert_allclose(boots, 0.5)
    # without strata the share of each stratum varies
    assert np.ptp(stats.cluster_bootstrap(x, n_boot=200)) > 0


def test_cluster_bootstrap_weights_and_missing_cells():
    # item 0 measured on all 4 clusters, item 1 only on the first two (NaN, weight 0 elsewhere)
    v = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 7.0, np.nan, np.nan]])
    w = np.array([[2, 2, 2, 2], [1, 3, 0, 0]], dtype=float)
    boots = stats.cluster_bootstrap(v, w, strata=[0, 0, 1, 1], n_boot=500, seed=1)
    assert np.isfinite(boots).all()  # every replicate draws from stratum 0 where item 1 lives
    assert set(np.unique(boots[:, 1]).round(6)) <= {5.0, 6.5, 7.0}
    est, _, df = stats.cluster_se(v, w, strata=[0, 0, 1, 1])
    assert est[1] == pytest.approx((5 + 21) / 4)
    assert df.tolist() == [2, 1]
    with pytest.raises(ValueError, match="missing"):
        stats.cluster_bootstrap(v, np.ones_like(v))
    with pytest.raises(ValueError, match="no observation"):
        stats.cluster_bootstrap(np.array([[np.nan, np.nan]]))


def test_cluster_se_is_the_standard_error_of_cluster_means():
    x = np.random.default_rng(3).normal(size=(3, 40))
    est, se, df = stats.cluster_se(x)
    np.testing.assert_allclose(est, x.mean(1))
    np.testing.assert_allclose(se, x.std(1, ddof=1) / np.sqrt(40))
    assert (df == 39).all()
    # the bootstrap standard error agrees up to the bootstrap's (n-1)/n and Monte Carlo error
    boots = stats.cluster_bootstrap(x, n_boot=4000, seed=0)
    np.testing.assert_allclose(boots.std(0), se * np.sqrt(39 / 40), rtol=0.06)


def test_t_pvalues_and_holm_hand_cases():
    p = stats.t_pvalues([0.0, 1.0, 10.0], [1.0, 1.0, 1.0], [1e6, 1e6, 1e6])
    np.testing.assert_allclose(p[:2], [1.0, 0.3173], atol=1e-4)
    assert p[2] < 1e-20
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.5]), [0.04, 0.09, 0.09, 0.5])
    q = metrics.benjamini_hochberg([0.01, 0.04, 0.03, 0.5])
    assert (stats.holm([0.01, 0.04, 0.03, 0.5]) >= q).all()  # FWER control is the stricter one
    with pytest.raises(ValueError, match="p-values"):
        stats.holm([0.1, 1.2])


def test_rank_intervals_separated_and_tied_items():
    rng = np.random.default_rng(0)
    truth = np.array([10.0, 5.0, 1.0, 1.0, 1.0, -3.0])
    x = truth[:, None] + rng.normal(size=(6, 60))
    est = x.mean(1)
    boots = stats.cluster_bootstrap(x, n_boot=1000, seed=0)
    low, high = stats.rank_intervals(est, boots)
    assert (low[:2] == [1, 2]).all() and (high[:2] == [1, 2]).all()
    assert (low[2:5] == 3).all() and (high[2:5] == 5).all()  # three tied items share ranks 3..5
    assert low[5] == high[5] == 6
    status = stats.top_k_status(low, high, k=3)
    assert status.tolist() == ["in", "in", "tied", "tied", "tied", "out"]
    low1, _ = stats.rank_intervals(est, boots, items=[0])
    assert low1[0] == 1 and np.isnan(low1[1:]).all()


def test_variance_components_recovers_simulated_components():
    rng = np.random.default_rng(5)
    G, M, R = 200, 4, 3
    s_u, s_v, s_e = 2.0, 1.0, 0.5
    rows = []
    for item in range(2):
        u = rng.normal(0, s_u, (G, M))
        v = rng.normal(0, s_v, (G, R))
        e = rng.normal(0, s_e, (G, M, R))
        y = 3.0 + u[:, :, None] + v[:, None, :] + e
        for g in range(G):
            for m in range(M):
                for r in range(R):
                    rows.append({"layer": 0, "head": item, "group": g, "prompt": g * M + m, "draw": r,
                                 "y": y[g, m, r]})
    vc = stats.variance_components(pd.DataFrame(rows), "y")
    assert len(vc) == 2 and (vc["prompts_per_group"] == M).all() and (vc["draws"] == R).all()
    np.testing.assert_allclose(vc["var_prompt"], s_u ** 2, rtol=0.15)
    np.testing.assert_allclose(vc["var_prefix"], s_v ** 2, rtol=0.2)
    np.testing.assert_allclose(vc["var_query"], s_e ** 2, rtol=0.1)
    one_draw = pd.DataFrame(rows).query("draw == 0")
    with pytest.raises(ValueError, match="2 draws"):
        stats.variance_components(one_draw, "y")


def test_variance_components_balance_removes_what_cancels_in_group_means():
    # label effect +-3 and a prefix draw that moves the two labels in opposite directions (+-w): both
    # cancel in every label-balanced group mean, so with balance= they must not be counted
    rng = np.random.default_rng(2)
    G, R = 300, 2
    rows = []
    for g in range(G):
        v = rng.normal(0, 1.0, R)
        w = rng.normal(0, 2.0, R)
        for m in range(4):
            lab = m % 2
            u = rng.normal(0, 1.5)
            for r in range(R):
                y = (3.0 if lab else -3.0) + u + v[r] + (w[r] if lab else -w[r]) + rng.normal(0, 0.5)
                rows.append({"layer": 0, "head": 0, "group": g, "prompt": g * 4 + m, "draw": r,
                             "label": lab, "y": y})
    frame = pd.DataFrame(rows)
    vc = stats.variance_components(frame, "y", balance="label").iloc[0]
    assert vc["var_prompt"] == pytest.approx(1.5 ** 2, rel=0.2)
    assert vc["var_prefix"] == pytest.approx(1.0, rel=0.25)
    assert vc["var_query"] == pytest.approx(0.25, rel=0.2)
    naive = stats.variance_components(frame, "y").iloc[0]
    assert naive["var_prompt"] > 5 and naive["var_query"] > 2  # label and label x draw counted
    # the design variance of a group mean agrees with the observed variance of group means
    dv = stats.design_variance(stats.variance_components(frame, "y", balance="label"), 4, 1, 1).iloc[0]
    observed = frame[frame["draw"] == 0].groupby("group")["y"].mean().var()
    assert dv["variance"] == pytest.approx(observed, rel=0.25)
    assert dv[["share_prompts", "share_prefix", "share_query"]].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="balanced"):
        stats.variance_components(frame[frame["prompt"] != 0], "y", balance="label")



def test_effect_interval_is_never_narrower_than_the_t_interval():
    from scipy import stats as sps

    x = np.random.default_rng(4).normal(size=(3, 4))  # 4 clusters: the bootstrap cannot resolve the level
    est, se, df = stats.cluster_se(x)
    boots = stats.cluster_bootstrap(x, n_boot=2000)
    low, high = stats.effect_interval(boots, est, se, df)
    half = sps.t.ppf(0.975, 3) * se
    assert (low <= est - half + 1e-12).all() and (high >= est + half - 1e-12).all()
    y = np.random.default_rng(4).normal(size=(3, 400))  # many clusters: the bootstrap's own interval
    est, se, df = stats.cluster_se(y)
    boots = stats.cluster_bootstrap(y, n_boot=2000)
    low, high = stats.effect_interval(boots, est, se, df)
    np.testing.assert_allclose(high - low, 2 * 1.97 * se, rtol=0.1)
