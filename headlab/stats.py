"""Statistics for rankings of many items (heads) measured on shared, clustered samples.

The head-ranking experiment (:mod:`headlab.headrank`) measures every head on the same prompts. The
prompts are split into *groups*; each group has its own noise draw on the shared few-shot prefix, so a
group -- its prompts together with its prefix draw -- is the unit of independent replication (a
*cluster*). Everything here works on one matrix of cluster means, ``(items, clusters)``, with a weight
(the number of observations) per cell; a cell an item was not measured in has weight 0 (adaptive
designs measure some heads on more clusters than others). ``strata`` label clusters that were drawn
separately (design phases, independent runs), and are resampled separately.

* :func:`cluster_bootstrap` -- replicate estimates of every item from the same resampled clusters
  (so differences and ranks between items keep their pairing);
* :func:`cluster_se` -- the matching analytic (cluster-robust) standard errors and t tests;
* :func:`rank_intervals` -- where each item's rank could lie: simultaneous pairwise comparisons
  (Mogstad, Romano, Shaikh & Wilhelm 2024, "Inference for ranks"), valid with near-ties where
  quantiles of bootstrapped ranks are not;
* :func:`holm` (family-wise error) next to :func:`headlab.metrics.benjamini_hochberg` (false
  discovery rate) for counting items with a non-zero effect;
* :func:`variance_components` -- how much of an estimate's variance comes from prompts, from the
  prefix noise and from the per-prompt (query) noise;
* :func:`top_k_status` -- which items are settled inside / outside the top ``k`` (the racing rule).

All functions are pure numpy; tests check them against hand cases and by simulation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float
from numpy.typing import ArrayLike

__all__ = [
    "cluster_bootstrap",
    "cluster_se",
    "design_variance",
    "effect_interval",
    "holm",
    "percentile_interval",
    "rank_intervals",
    "t_pvalues",
    "top_k_status",
    "variance_components",
]


def _matrix(values: ArrayLike, weights: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.shape[1] == 0 or v.shape[0] == 0:
        raise ValueError(f"values must be a non-empty (items, clusters) matrix, got shape {v.shape}.")
    w = np.isfinite(v).astype(float) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != v.shape:
        raise ValueError(f"weights {w.shape} must have the shape of values {v.shape}.")
    if (w < 0).any() or (~np.isfinite(v) & (w > 0)).any():
        raise ValueError("weights must be >= 0, and 0 wherever a value is missing (NaN).")
    if (w.sum(1) == 0).any():
        bad = np.flatnonzero(w.sum(1) == 0).tolist()
        raise ValueError(f"item(s) {bad} have no observation in any cluster.")
    return np.where(w > 0, v, 0.0), w


def _strata(strata: ArrayLike | None, n: int) -> list[np.ndarray]:
    if strata is None:
        return [np.arange(n)]
    s = np.asarray(strata)
    if s.shape != (n,):
        raise ValueError(f"strata must give one label per cluster ({n}), got shape {s.shape}.")
    return [np.flatnonzero(s == u) for u in pd.unique(s)]


def cluster_bootstrap(
    values: Float[np.ndarray, "items clusters"] | ArrayLike,
    weights: ArrayLike | None = None,
    strata: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> Float[np.ndarray, "n_boot items"]:
    """Bootstrap replicates of every item's weighted mean, resampling whole clusters.

    Each replicate draws, within every stratum, as many clusters as it has, with replacement, and the
    *same* draw is used for every item (a paired bootstrap: differences and ranks between items keep
    their correlation through shared prompts). An item's replicate is
    ``sum_j c_j w_ij v_ij / sum_j c_j w_ij`` with ``c_j`` how often cluster ``j`` was drawn. Resampling
    the top level only (clusters, each with its prompts and noise draws intact) is the hierarchical
    bootstrap that is right for a grand mean: resampling inside the clusters as well would count the
    within-cluster variance twice (Davison & Hinkley 1997, sec. 3.8).

    Args:
        values: ``(items, clusters)`` cluster means; NaN where an item was not measured.
        weights: ``(items, clusters)`` observations behind each mean (default 1 where finite).
        strata: one label per cluster; clusters are resampled within their stratum (default: one).
        n_boot: replicates.
        seed: RNG seed. Without strata the draws are those of
            :func:`headlab.metrics.bootstrap_rows`, so with unit weights both give the same numbers.

    Returns:
        ``(n_boot, items)`` replicate means (NaN for an item that got no observation in a replicate).
    """
    v, w = _matrix(values, weights)
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1.")
    n = v.shape[1]
    parts = _strata(strata, n)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, n))
    for idx in parts:  # with one stratum these are bootstrap_rows' draws, replicate by replicate
        drawn = idx[rng.integers(0, len(idx), (n_boot, len(idx)))]
        np.add.at(counts, (np.repeat(np.arange(n_boot), len(idx)), drawn.ravel()), 1.0)
    num = counts @ (w * v).T  # (n_boot, items)
    den = counts @ w.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def percentile_interval(boots: Float[np.ndarray, "n_boot items"], level: float = 0.95,
                        df: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval ``(low, high)`` of each column of bootstrap replicates.

    With ``df`` (degrees of freedom per column, e.g. clusters - 1) the interval is the *expanded*
    percentile interval (Hesterberg 2015): the quantiles are taken at the wider level whose normal
    quantile equals ``sqrt((df + 1) / df) * t_df``, which undoes the two ways the plain percentile
    interval is too narrow with few clusters (the bootstrap variance is ``(n - 1) / n`` of the
    unbiased one, and normal instead of t quantiles) while keeping the bootstrap's skewness.
    """
    from scipy import stats as sps

    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1).")
    b = np.asarray(boots, dtype=float)
    alpha = np.full(b.shape[1], (1 - level) / 2)
    if df is not None:
        d = np.maximum(np.asarray(df, dtype=float), 1.0)
        z = np.sqrt((d + 1) / d) * sps.t.ppf(1 - alpha, d)
        alpha = sps.norm.sf(z)
    low, high = np.full(b.shape[1], np.nan), np.full(b.shape[1], np.nan)
    ok = np.isfinite(b).any(0)
    for a in np.unique(alpha[ok]):  # columns sharing a level in one call
        cols = np.flatnonzero(ok & (alpha == a))
        low[cols], high[cols] = np.nanquantile(b[:, cols], [a, 1 - a], axis=0)
    return low, high


def effect_interval(boots: Float[np.ndarray, "n_boot items"], estimate: ArrayLike, se: ArrayLike, df: ArrayLike,
                    level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The cluster bootstrap's expanded percentile interval (:func:`percentile_interval` with ``df``),
    never narrower than the t interval ``estimate +- t_df se``.

    With few clusters the bootstrap has few distinct resamples and cannot reach the expanded quantiles
    (with 4 clusters its extremes are about the extreme cluster means), so there the t interval from
    the same cluster-robust standard error, the one the p-values use, takes over.
    """
    from scipy import stats as sps

    low, high = percentile_interval(boots, level, df=df)
    est, s = np.asarray(estimate, dtype=float), np.asarray(se, dtype=float)
    half = sps.t.ppf(1 - (1 - level) / 2, np.maximum(np.asarray(df, dtype=float), 1.0)) * s
    ok = np.isfinite(half)
    return np.where(ok, np.fmin(low, est - half), low), np.where(ok, np.fmax(high, est + half), high)


def cluster_se(
    values: ArrayLike, weights: ArrayLike | None = None, strata: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each item's weighted mean with its cluster-robust standard error and degrees of freedom.

    The variance of the ratio estimator ``sum w v / sum w`` is estimated by linearisation with the
    small-sample factor ``n_s / (n_s - 1)`` per stratum (the stratified analogue of the sample
    variance of cluster means divided by the number of clusters); ``df`` is the number of clusters
    the item was measured in minus the number of strata it spans.

    Returns:
        ``(estimate, se, df)``, each of length ``items`` (``se`` is NaN when ``df < 1``).
    """
    v, w = _matrix(values, weights)
    est = (w * v).sum(1) / w.sum(1)
    var = np.zeros(len(v))
    df = np.zeros(len(v))
    for idx in _strata(strata, v.shape[1]):
        ws = w[:, idx]
        present = ws > 0
        n_s = present.sum(1)
        resid = np.where(present, ws * (v[:, idx] - est[:, None]), 0.0)
        dev = resid - np.where(present, resid.sum(1, keepdims=True) / np.maximum(n_s, 1)[:, None], 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            var += np.where(n_s > 1, n_s / (n_s - 1) * (dev ** 2).sum(1), 0.0)
        df += np.maximum(n_s - 1, 0)
    se = np.sqrt(var) / w.sum(1)
    return est, np.where(df >= 1, se, np.nan), df


def t_pvalues(estimate: ArrayLike, se: ArrayLike, df: ArrayLike) -> np.ndarray:
    """Two-sided p-values of ``estimate = 0`` from t statistics ``estimate / se`` with ``df``.

    A zero standard error gives p = 0 for a non-zero estimate and p = 1 for a zero one.
    """
    from scipy import stats

    est, s, d = (np.asarray(a, dtype=float) for a in (estimate, se, df))
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(s > 0, np.abs(est) / s, np.where(est == 0, 0.0, np.inf))
    p = 2 * stats.t.sf(t, np.maximum(d, 1))
    return np.where(np.isfinite(s) | (s == 0), p, np.nan)


def holm(p: ArrayLike) -> np.ndarray:
    """Holm step-down adjusted p-values: reject where ``p_adj <= alpha`` to keep the chance of *any*
    false rejection at ``alpha``, under any dependence between the tests."""
    pv = np.asarray(p, dtype=float)
    if pv.ndim != 1 or np.isnan(pv).any() or ((pv < 0) | (pv > 1)).any():
        raise ValueError("p must be a 1-D array of p-values in [0, 1].")
    m = len(pv)
    order = np.argsort(pv, kind="stable")
    adj = np.maximum.accumulate(pv[order] * (m - np.arange(m)))
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def rank_intervals(
    estimate: ArrayLike, boots: Float[np.ndarray, "n_boot items"], level: float = 0.95,
    items: Sequence[int] | None = None, inflate: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Confidence intervals for the rank of each item (rank 1 = largest effect).

    For item ``i``, the differences ``theta_j - theta_i`` to every other item get *simultaneous*
    intervals from the bootstrap (the ``level`` quantile of the largest studentised deviation over
    ``j``); the rank of ``i`` then lies between ``1 +`` the number of items surely above it and
    ``n -`` the number surely below it (Mogstad, Romano, Shaikh & Wilhelm 2024, marginal confidence
    sets). Unlike quantiles of bootstrapped ranks, these keep their coverage when items are tied.

    Args:
        estimate: ``(items,)`` point estimates.
        boots: ``(n_boot, items)`` paired replicates (:func:`cluster_bootstrap`).
        level: coverage of each item's interval.
        items: compute only these items (others get NaN); default all.
        inflate: factor on the bootstrap standard deviations of the differences, e.g.
            ``sqrt(n / (n - 1))`` for ``n`` clusters (the bootstrap variance is ``(n - 1) / n`` of the
            unbiased one).

    Returns:
        ``(rank_low, rank_high)`` (floats, NaN where not computed).
    """
    est = np.asarray(estimate, dtype=float)
    b = np.asarray(boots, dtype=float)
    if b.ndim != 2 or b.shape[1] != len(est):
        raise ValueError(f"boots must be (n_boot, {len(est)}), got {b.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1).")
    n = len(est)
    low, high = np.full(n, np.nan), np.full(n, np.nan)
    centred = b - est  # replicate deviations from the estimates
    for i in (range(n) if items is None else items):
        others = np.arange(n) != i
        d = centred[:, others] - centred[:, [i]]  # (n_boot, n-1) deviations of theta_j - theta_i
        sd = np.nanstd(d, 0)
        sd = np.where(sd > 0, sd, np.inf)
        crit = inflate * np.nanquantile(np.nanmax(np.abs(d) / sd, 1), level) if n > 1 else 0.0
        diff = est[others] - est[i]
        above = int((diff - crit * np.where(np.isfinite(sd), sd, 0) > 0).sum())
        below = int((diff + crit * np.where(np.isfinite(sd), sd, 0) < 0).sum())
        low[i], high[i] = 1 + above, n - below
    return low, high


def top_k_status(rank_low: ArrayLike, rank_high: ArrayLike, k: int) -> np.ndarray:
    """``"in"`` (rank surely <= k), ``"out"`` (surely > k) or ``"tied"`` (its rank interval crosses
    the top-``k`` boundary) for each item."""
    lo, hi = np.asarray(rank_low, dtype=float), np.asarray(rank_high, dtype=float)
    if k < 1:
        raise ValueError(f"k={k} must be >= 1.")
    return np.where(hi <= k, "in", np.where(lo > k, "out", "tied"))


def variance_components(frame: pd.DataFrame, value: str, item: Sequence[str] | str = ("layer", "head"),
                        group: str = "group", prompt: str = "prompt", draw: str = "draw",
                        balance: str | None = None) -> pd.DataFrame:
    """Method-of-moments variance components of a nested-crossed design, per item.

    The design: prompts are split into groups; every prompt is measured under each of ``R`` noise
    draws; draw ``r`` of group ``g`` shares one prefix noise among the group's ``M`` prompts. The model
    is ``y[g, m, r] = theta + u[g, m] + v[g, r] + e[g, m, r]``: a prompt effect ``u`` (how the effect
    differs between prompts), a prefix-draw effect ``v`` shared by the group's prompts, and a residual
    ``e``: the prompt's own query noise and how its response to the prefix draw differs from the
    group's. Within each group the prompt x draw table gives the usual two-way mean squares, pooled
    over groups: ``E[MS_prompt] = s2_e + R s2_u``, ``E[MS_draw] = s2_e + M s2_v``,
    ``E[MS_resid] = s2_e``. The mean over ``N = G M`` prompts under ``R`` draws per group then has
    variance ``s2_u / N + s2_v / (G R) + s2_e / (N R)`` (:func:`design_variance`).

    Args:
        frame: one row per (item, group, prompt, draw) with the measured ``value``. Every group must
            have the same prompts under at least two draws (``R >= 2``).
        balance: a column (e.g. the label) every group holds in equal shares. The prompt and residual
            mean squares are then taken within (group, label), so label differences, and draws that
            move the two labels in opposite directions, which cancel in every group mean, are not
            counted (needs >= 2 prompts per label and group).

    Returns:
        One row per item: ``var_prompt``, ``var_prefix``, ``var_query`` (components, clipped at 0),
        ``n_groups``, ``prompts_per_group``, ``draws``.
    """
    item = [item] if isinstance(item, str) else list(item)
    by = [balance] if balance else []
    f = frame.sort_values(item + [group] + by + [prompt, draw], kind="stable")
    cells = f.groupby(item + [group, prompt])[draw]
    n_draws = cells.nunique()
    if (cells.size() != n_draws).any() or n_draws.nunique() != 1:
        raise ValueError("every (item, group, prompt) must be measured once under each of the same number of "
                         f"draws; found {sorted(set(n_draws))} draws per prompt and repeated draws: "
                         f"{bool((cells.size() != n_draws).any())}.")
    R = int(n_draws.iloc[0])
    if R < 2:
        raise ValueError(f"variance_components needs >= 2 draws per prompt; the frame has {R}.")
    per = f.groupby(item + [group] + by)[prompt].nunique()
    if balance and per.groupby(level=list(range(len(item) + 1))).nunique().max() > 1:
        raise ValueError(f"some group is not balanced in {balance!r}: prompts per value {sorted(set(per))}.")
    if per.nunique() != 1:
        raise ValueError(f"groups differ in size ({sorted(set(per))} prompts); the design must be balanced.")
    m_l = int(per.iloc[0])
    if m_l < 2:
        raise ValueError(f"variance_components needs >= 2 prompts per group{' and ' + balance if balance else ''}; "
                         f"the groups have {m_l}.")
    n_items = f.groupby(item).ngroups
    n_groups = f.groupby(item)[group].nunique()
    if n_groups.nunique() != 1:
        raise ValueError(f"items are measured on different numbers of groups {sorted(set(n_groups))}.")
    G = int(n_groups.iloc[0])
    n_lab = f[balance].nunique() if balance else 1
    x = f[value].to_numpy(float).reshape(n_items, G, n_lab, m_l, R)
    m = n_lab * m_l
    dm = x.mean((2, 3))  # (I, G, R) group means per draw: label effects cancel here
    ms_d = m * ((dm - dm.mean(-1, keepdims=True)) ** 2).sum((1, 2)) / (G * (R - 1))
    pm = x.mean(-1, keepdims=True)  # prompt means
    dl = x.mean(-2, keepdims=True)  # draw means within (group, label)
    grand = x.mean((-1, -2), keepdims=True)
    ms_p = R * ((pm - grand) ** 2).sum((1, 2, 3, 4)) / (G * n_lab * (m_l - 1))
    ms_e = ((x - pm - dl + grand) ** 2).sum((1, 2, 3, 4)) / (G * n_lab * (m_l - 1) * (R - 1))
    keys = f.groupby(item, sort=True).size().index.to_frame(index=False)
    return keys.assign(var_prompt=np.maximum((ms_p - ms_e) / R, 0.0), var_prefix=np.maximum((ms_d - ms_e) / m, 0.0),
                       var_query=ms_e, n_groups=G, prompts_per_group=m, draws=R)


def design_variance(components: pd.DataFrame, n_prompts: int, n_groups: int, draws: int = 1) -> pd.DataFrame:
    """What each variance component adds to the variance of a head's mean under a design.

    Args:
        components: from :func:`variance_components`.
        n_prompts, n_groups, draws: the design: ``n_prompts`` prompts in ``n_groups`` prefix-draw
            groups, each prompt measured under ``draws`` draws.

    Returns:
        ``components`` with ``from_prompts = var_prompt / N``, ``from_prefix = var_prefix / (G R)``,
        ``from_query = var_query / (N R)``, their sum ``variance`` and each one's ``share_*``.
    """
    if min(n_prompts, n_groups, draws) < 1:
        raise ValueError(f"n_prompts={n_prompts}, n_groups={n_groups}, draws={draws} must all be >= 1.")
    out = components.copy()
    out["from_prompts"] = out["var_prompt"] / n_prompts
    out["from_prefix"] = out["var_prefix"] / (n_groups * draws)
    out["from_query"] = out["var_query"] / (n_prompts * draws)
    out["variance"] = out[["from_prompts", "from_prefix", "from_query"]].sum(axis=1)
    for k in ("prompts", "prefix", "query"):
        out[f"share_{k}"] = out[f"from_{k}"] / out["variance"].where(out["variance"] > 0)
    return out
