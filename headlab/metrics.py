"""Metrics on model outputs: classification scores, confidence intervals, perplexity, chance checks.

Everything here is a pure function of arrays (no model calls), so each can be checked by hand.
Labels are integer class indices ``0..C-1``; predictions may also be ``-1`` for "no answer" (a
greedy generation that named no label), which counts as wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

__all__ = [
    "CI",
    "first_sustained_layer",
    "head_label_test",
    "layer_readout",
    "accuracy",
    "benjamini_hochberg",
    "bootstrap_ci",
    "bootstrap_rows",
    "bootstrap_two_way",
    "chance_warnings",
    "classification_report",
    "confusion_matrix",
    "impact_category",
    "macro_f1",
    "parse_generated_label",
    "permutation_correlation",
    "rank_agreement",
    "residualize",
    "roc_auc",
    "wilson_interval",
]


def accuracy(labels: ArrayLike, preds: ArrayLike) -> float:
    """Fraction of ``preds`` equal to ``labels``."""
    y, p = np.asarray(labels), np.asarray(preds)
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"labels {y.shape} and preds {p.shape} must be equal, non-empty shapes.")
    return float((y == p).mean())


def confusion_matrix(labels: ArrayLike, preds: ArrayLike, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes + 1)`` counts: row = true class, column = predicted class, last column
    = no answer (``pred == -1``)."""
    y, p = np.asarray(labels), np.asarray(preds)
    cm = np.zeros((n_classes, n_classes + 1), dtype=int)
    for t, q in zip(y, p):
        cm[t, q if q >= 0 else n_classes] += 1
    return cm


def macro_f1(labels: ArrayLike, preds: ArrayLike, n_classes: int | None = None) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class with no true and no
    predicted examples scores 0 (so predicting one label for everything is punished)."""
    y, p = np.asarray(labels), np.asarray(preds)
    n_classes = int(max(y.max(), p.max()) + 1) if n_classes is None else n_classes
    f1s = []
    for c in range(n_classes):
        tp = int(((p == c) & (y == c)).sum())
        fp = int(((p == c) & (y != c)).sum())
        fn = int(((p != c) & (y == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(f1s))


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve for binary ``labels`` (1 = positive) and real ``scores``.

    Computed as the Mann-Whitney U statistic with ties counted as one half: the probability that a
    random positive example scores above a random negative one.
    """
    y, s = np.asarray(labels).astype(bool), np.asarray(scores, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(s).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class CI:
    """A point estimate with a percentile-bootstrap confidence interval."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(
    stat: Callable[..., float],
    *arrays: ArrayLike,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> CI:
    """Percentile bootstrap confidence interval of ``stat(*arrays)``.

    Args:
        stat: function of the arrays (resampled together, row-wise) returning a float.
        arrays: equal-length arrays.
        n_boot: bootstrap resamples.
        level: coverage, e.g. 0.95.
        seed: RNG seed (the interval is reproducible).
        groups: optional group id per row; whole groups are resampled (block bootstrap), e.g. the
            window of each token for perplexity, where neighbouring tokens are not independent.

    Returns:
        :class:`CI` with the statistic on the full data and the percentile interval.
    """
    arrs = [np.asarray(a) for a in arrays]
    n = len(arrs[0])
    if any(len(a) != n for a in arrs) or n == 0:
        raise ValueError("bootstrap_ci needs equal-length, non-empty arrays.")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1).")
    rng = np.random.default_rng(seed)
    value = float(stat(*arrs))
    if groups is None:
        idx_sets = (rng.integers(0, n, n) for _ in range(n_boot))
    else:
        g = np.asarray(groups)
        uniq, inv = np.unique(g, return_inverse=True)
        members = [np.flatnonzero(inv == k) for k in range(len(uniq))]
        idx_sets = (np.concatenate([members[k] for k in rng.integers(0, len(uniq), len(uniq))])
                    for _ in range(n_boot))
    boots = np.array([stat(*(a[idx] for a in arrs)) for idx in idx_sets], dtype=float)
    boots = boots[np.isfinite(boots)]
    alpha = (1 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha]) if len(boots) else (math.nan, math.nan)
    return CI(value, float(low), float(high), level)


def parse_generated_label(text: str, label_words: Sequence[str]) -> int:
    """Index of the label word that a generated continuation starts with or contains first; -1 if none.

    This is how the seed scripts read answers from ``generate``: lower-case the text and look for the
    label words. The first occurring word wins.
    """
    low = text.lower()
    hits = [(low.find(w.lower()), i) for i, w in enumerate(label_words) if w.lower() in low]
    return min(hits)[1] if hits else -1


def classification_report(
    labels: ArrayLike, logprobs: ArrayLike, threshold: float = 0.0, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Accuracy, macro-F1, ROC-AUC and mean logit difference with bootstrap CIs, for a binary task.

    Args:
        labels: true class per prompt, 0 or 1.
        logprobs: ``(n, 2)`` label log-probabilities; the score is the logit difference
            ``logprobs[:, 1] - logprobs[:, 0]`` and the prediction is ``score > threshold``.
        threshold: decision threshold (0 = argmax).

    Returns:
        One row per metric with columns ``metric, value, ci_low, ci_high``. ``logit_diff`` is the mean
        logit difference toward the *correct* label (positive = right on average).
    """
    y = np.asarray(labels).astype(int)
    lp = np.asarray(logprobs, dtype=float)
    if lp.ndim != 2 or lp.shape[1] != 2 or len(lp) != len(y):
        raise ValueError(f"logprobs must be (n, 2) with n = len(labels) = {len(y)}; got {lp.shape}.")
    diff = lp[:, 1] - lp[:, 0]
    pred = (diff > threshold).astype(int)
    signed = np.where(y == 1, diff, -diff)
    rows = []
    for name, fn, arrs in [
        ("accuracy", accuracy, (y, pred)),
        ("macro_f1", lambda a, b: macro_f1(a, b, 2), (y, pred)),
        ("roc_auc", roc_auc, (y, diff)),
        ("logit_diff", lambda s: float(np.mean(s)), (signed,)),
        ("p_correct", lambda s: float(np.mean(s)), (np.exp(np.where(y == 1, lp[:, 1], lp[:, 0])),)),
    ]:
        ci = bootstrap_ci(fn, *arrs, n_boot=n_boot, seed=seed)
        rows.append({"metric": name, "value": ci.value, "ci_low": ci.low, "ci_high": ci.high})
    return pd.DataFrame(rows)


def chance_warnings(
    labels: ArrayLike, preds: ArrayLike, scores: ArrayLike | None = None, n_boot: int = 1000, seed: int = 0
) -> list[str]:
    """Reasons to distrust a configuration as near chance (empty list when it looks fine).

    Flags: the accuracy CI reaches the majority-class rate; one label is predicted for more than 90%
    of prompts; the ROC-AUC CI includes 0.5. A perturbation study of a model at chance measures
    nothing, so chapters print these warnings prominently.
    """
    y, p = np.asarray(labels).astype(int), np.asarray(preds).astype(int)
    out = []
    majority = float(np.bincount(y).max() / len(y))
    acc = bootstrap_ci(accuracy, y, p, n_boot=n_boot, seed=seed)
    if acc.low <= majority:
        out.append(f"accuracy {acc} does not clear the majority-class rate {majority:.3f}")
    share = float(np.bincount(p[p >= 0], minlength=2).max() / len(p))
    if share > 0.9:
        out.append(f"{share:.0%} of prompts get the same predicted label")
    if scores is not None:
        auc = bootstrap_ci(roc_auc, y, np.asarray(scores, dtype=float), n_boot=n_boot, seed=seed)
        if auc.low <= 0.5:
            out.append(f"ROC-AUC {auc} includes 0.5")
    return out


# --------------------------------------------------------------------------------------------------
# Per-item effects: paired bootstrap, rank agreement, impact categories
# --------------------------------------------------------------------------------------------------
def bootstrap_rows(values: ArrayLike, n_boot: int = 1000, level: float = 0.95,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of each row of an ``(items, samples)`` matrix with percentile-bootstrap intervals.

    All rows are resampled with the *same* sample indices in each replicate (a paired bootstrap over
    samples, e.g. prompts), so intervals of different items (heads) are comparable.

    Returns:
        ``(mean, low, high)``, each of length ``items``.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"values must be a non-empty (items, samples) matrix, got shape {x.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1).")
    rng = np.random.default_rng(seed)
    n = x.shape[1]
    boots = np.empty((n_boot, x.shape[0]))
    for b in range(n_boot):
        boots[b] = x[:, rng.integers(0, n, n)].mean(1)
    alpha = (1 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha], axis=0)
    return x.mean(1), low, high


def rank_agreement(scores: pd.DataFrame) -> pd.DataFrame:
    """Spearman and Kendall correlation between every pair of columns (e.g. one column per seed).

    Args:
        scores: one row per item (head), one column per replicate.

    Returns:
        One row per column pair with ``spearman``, ``kendall`` and ``top10_overlap`` (shared items
        among each column's ten highest).
    """
    from scipy import stats

    cols = list(scores.columns)
    if len(cols) < 2:
        raise ValueError(f"rank_agreement needs at least two columns, got {cols}.")
    rows = []
    for i, a in enumerate(cols):
        for b in cols[i + 1:]:
            x, y = scores[a].to_numpy(float), scores[b].to_numpy(float)
            k = min(10, len(x))
            top = len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k]))
            rows.append({"a": a, "b": b, "spearman": float(stats.spearmanr(x, y).statistic),
                         "kendall": float(stats.kendalltau(x, y).statistic), "top10_overlap": top})
    return pd.DataFrame(rows)


#: Impact categories of seed 001, on the absolute change of a score in percentage points.
IMPACT_BINS = ((10.0, "HIGH"), (5.0, "MEDIUM"), (0.0, "LOW"))


def impact_category(change_points: ArrayLike) -> np.ndarray:
    """``HIGH`` (>10), ``MEDIUM`` (5-10) or ``LOW`` (<5) for absolute changes in percentage points."""
    c = np.abs(np.asarray(change_points, dtype=float))
    return np.where(c > 10, "HIGH", np.where(c >= 5, "MEDIUM", "LOW"))


def bootstrap_two_way(values: ArrayLike, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> CI:
    """Mean of a ``(groups, items)`` matrix with a percentile interval that resamples rows and columns.

    Each replicate draws the rows (e.g. random head sets) and the columns (e.g. sequences) with
    replacement, independently, and averages the resampled matrix; a single row resamples columns only.
    NaN cells (an item missing in one group) are ignored in the means.

    Returns:
        :class:`CI` of the overall mean.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"values must be a non-empty (groups, items) matrix, got shape {x.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1).")
    rng = np.random.default_rng(seed)
    g, n = x.shape
    boots = np.array([np.nanmean(x[np.ix_(rng.integers(0, g, g) if g > 1 else np.zeros(1, int),
                                          rng.integers(0, n, n))]) for _ in range(n_boot)])
    alpha = (1 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha])
    return CI(float(np.nanmean(x)), float(low), float(high), level)


# --------------------------------------------------------------------------------------------------
# Correlation with a label: permutation p-values and false discovery rate
# --------------------------------------------------------------------------------------------------
def permutation_correlation(values: ArrayLike, labels: ArrayLike, n_perm: int = 1000,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pearson correlation of every column of ``values`` with ``labels``, with permutation p-values.

    The labels are shuffled ``n_perm`` times (the same shuffles for every column); the two-sided
    p-value of column ``j`` is ``(1 + #{perm: |r_perm_j| >= |r_j|}) / (1 + n_perm)`` (never 0). The
    family-wise p-value compares ``|r_j|`` with the *largest* ``|r|`` over all columns in each shuffle
    (a max-statistic correction: it controls the chance of any false positive among the columns).

    Args:
        values: ``(n_items, n_columns)``, e.g. attention mass per text and head.
        labels: ``(n_items,)`` numbers (0/1 labels give the point-biserial correlation).

    Returns:
        ``(r, p, p_familywise)``, each ``(n_columns,)``; a constant column gets ``r = 0``, ``p = 1``.
    """
    x = np.asarray(values, dtype=float)
    y = np.asarray(labels, dtype=float)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) < 3:
        raise ValueError(f"values must be (n, columns) and labels (n,) with n >= 3; got {x.shape} and {y.shape}.")
    if not np.isfinite(x).all() or not np.isfinite(y).all():
        raise ValueError("values and labels must be finite (drop NaN items first).")
    if n_perm < 1:
        raise ValueError(f"n_perm={n_perm} must be >= 1.")
    xc = x - x.mean(0)
    sx = np.sqrt((xc ** 2).sum(0))
    xz = np.divide(xc, sx, out=np.zeros_like(xc), where=sx > 0)  # unit-norm columns (zero if constant)
    rng = np.random.default_rng(seed)

    def corr(yy: np.ndarray) -> np.ndarray:
        yc = yy - yy.mean(0)
        return xz.T @ (yc / np.sqrt((yc ** 2).sum(0)))

    r = corr(y[:, None])[:, 0]
    perms = np.stack([rng.permutation(y) for _ in range(n_perm)], 1)  # (n, n_perm)
    null = np.abs(corr(perms))  # (columns, n_perm)
    tol = 1e-12
    p = (1 + (null >= np.abs(r)[:, None] - tol).sum(1)) / (1 + n_perm)
    p_fw = (1 + (null.max(0)[None, :] >= np.abs(r)[:, None] - tol).sum(1)) / (1 + n_perm)
    return r, p, p_fw


def benjamini_hochberg(p: ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values): reject where ``q <= alpha`` to keep the
    expected false discovery rate among rejections at ``alpha`` (independent or positively
    dependent tests)."""
    pv = np.asarray(p, dtype=float)
    if pv.ndim != 1 or ((pv < 0) | (pv > 1)).any() or np.isnan(pv).any():
        raise ValueError("p must be a 1-D array of p-values in [0, 1].")
    m = len(pv)
    order = np.argsort(pv)
    scaled = pv[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def residualize(values: ArrayLike, covariates: ArrayLike) -> np.ndarray:
    """Residuals of each column of ``values`` after a least-squares fit on ``covariates`` plus an
    intercept (e.g. attention mass on sentiment words with the number of such words regressed out,
    before correlating it with the label).

    Args:
        values: ``(n, columns)``.
        covariates: ``(n,)`` or ``(n, c)``.
    """
    x = np.asarray(values, dtype=float)
    z = np.asarray(covariates, dtype=float)
    z = z[:, None] if z.ndim == 1 else z
    if x.ndim != 2 or len(z) != len(x):
        raise ValueError(f"values {x.shape} must be (n, columns) and covariates {z.shape} have n rows.")
    design = np.column_stack([np.ones(len(z)), z])
    coef, *_ = np.linalg.lstsq(design, x, rcond=None)
    return x - design @ coef


def head_label_test(values: ArrayLike, labels: ArrayLike, covariates: ArrayLike | None = None,
                    n_perm: int = 1000, seed: int = 0, value: str = "mass",
                    label_names: tuple[str, str] = ("negative", "positive")) -> pd.DataFrame:
    """Which heads' per-item measure tracks a binary label: a permutation test for every head.

    For each head, the Pearson correlation over items of ``values`` with ``labels``, its permutation
    p-value, Benjamini-Hochberg q-value and family-wise (max-|r|) p-value
    (:func:`permutation_correlation`, :func:`benjamini_hochberg`); with ``covariates`` the same again on
    the measure with the covariates regressed out (:func:`residualize`), in the ``*_adjusted`` columns.

    Args:
        values: ``(n_items, n_layers, n_heads)``, e.g. attention mass on sentiment words per review.
        labels: ``(n_items,)`` 0/1 labels.
        covariates: ``(n_items,)`` or ``(n_items, c)`` nuisance variables (e.g. number of marked tokens,
            text length), or None.
        n_perm, seed: label shuffles (the same for every head) and their seed.
        value, label_names: name the mean columns ``{value}_{label_names[1]}`` / ``{value}_{label_names[0]}``.

    Returns:
        One row per head (``layer``, ``head``, the two label means, ``r``, ``p``, ``q``, ``p_familywise``
        and the adjusted columns), sorted by ``|r|``, largest first.
    """
    v = np.asarray(values)
    if v.ndim != 3:
        raise ValueError(f"values must be (n_items, n_layers, n_heads); got shape {v.shape}.")
    n, n_layers, n_heads = v.shape
    y = np.asarray(labels)
    x = v.reshape(n, -1)  # (n, L*H), layer-major
    r, p, pfw = permutation_correlation(x, y, n_perm, seed=seed)
    frame = pd.DataFrame({"layer": np.repeat(range(n_layers), n_heads), "head": np.tile(range(n_heads), n_layers),
                          f"{value}_{label_names[1]}": x[y == 1].mean(0), f"{value}_{label_names[0]}": x[y == 0].mean(0),
                          "r": r, "p": p, "q": benjamini_hochberg(p), "p_familywise": pfw})
    if covariates is not None:
        r_adj, p_adj, pfw_adj = permutation_correlation(residualize(x, covariates), y, n_perm, seed=seed)
        frame = frame.assign(r_adjusted=r_adj, p_adjusted=p_adj, q_adjusted=benjamini_hochberg(p_adj),
                             p_familywise_adjusted=pfw_adj)
    return frame.reindex(frame["r"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def layer_readout(logprobs: ArrayLike, ranks: ArrayLike, labels: ArrayLike, n_boot: int = 1000,
                  level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """How well a binary label can be read off each layer (e.g. by the logit lens), with intervals.

    Args:
        logprobs: ``(L, n, 2)`` log-probabilities (over the full vocabulary) of the two label tokens.
        ranks: ``(L, n, 2)`` rank of each label token among all tokens (0 = top token).
        labels: ``(n,)`` correct label per prompt (0 or 1).

    Returns:
        One row per layer: ``layer`` and, each with ``<name>_low`` / ``<name>_high`` bootstrap
        intervals over prompts, ``p_correct`` (mean probability of the correct label token),
        ``logit_diff`` (mean log-probability of the correct minus the wrong label), ``accuracy``
        (share of prompts whose correct label beats the other one), ``roc_auc`` (of
        ``lp[1] - lp[0]``, threshold-free), ``median_rank`` (of the correct label among all tokens)
        and ``top1`` (share of prompts where the correct label is the top token).
    """
    lp, rk, y = np.asarray(logprobs, dtype=float), np.asarray(ranks), np.asarray(labels).astype(int)
    if lp.ndim != 3 or lp.shape[2] != 2 or rk.shape != lp.shape or lp.shape[1] != len(y):
        raise ValueError(f"expected logprobs and ranks of shape (L, n, 2) with n = len(labels) = {len(y)}; got "
                         f"{lp.shape} and {rk.shape}.")
    rows = np.arange(len(y))
    out = []
    for layer in range(lp.shape[0]):
        right, wrong = lp[layer, rows, y], lp[layer, rows, 1 - y]
        rank = rk[layer, rows, y].astype(float)
        diff = lp[layer, :, 1] - lp[layer, :, 0]
        row: dict[str, float] = {"layer": layer}
        stats = {
            "p_correct": (lambda a: float(np.mean(np.exp(a))), (right,)),
            "logit_diff": (lambda a: float(np.mean(a)), (right - wrong,)),
            "accuracy": (lambda a: float(np.mean(a > 0)), (right - wrong,)),
            "roc_auc": (roc_auc, (y, diff)),
            "median_rank": (lambda a: float(np.median(a)), (rank,)),
            "top1": (lambda a: float(np.mean(a == 0)), (rank,)),
        }
        for name, (fn, arrays) in stats.items():
            ci = bootstrap_ci(fn, *arrays, n_boot=n_boot, level=level, seed=seed)
            row.update({name: ci.value, f"{name}_low": ci.low, f"{name}_high": ci.high})
        out.append(row)
    return pd.DataFrame(out)


def first_sustained_layer(frame: pd.DataFrame, column: str, above: float) -> int | None:
    """The first ``layer`` from which ``column`` stays above ``above`` in every later layer (``None``
    if the last layer is not above), e.g. ``first_sustained_layer(readout, "roc_auc_low", 0.5)``."""
    f = frame.sort_values("layer")
    ok = (f[column] > above).to_numpy()
    if not len(ok) or not ok[-1]:
        return None
    i = len(ok) - 1
    while i > 0 and ok[i - 1]:
        i -= 1
    return int(f["layer"].iloc[i])


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> CI:
    """Wilson score interval of a binomial proportion (sound at 0 and ``trials`` successes too).

    Returns:
        :class:`CI` with the observed proportion and the interval; NaNs for ``trials == 0``.
    """
    from scipy import stats

    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(f"need 0 <= successes <= trials; got successes={successes}, trials={trials}.")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1).")
    if trials == 0:
        return CI(math.nan, math.nan, math.nan, level)
    z = float(stats.norm.ppf(1 - (1 - level) / 2))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return CI(p, max(0.0, centre - half), min(1.0, centre + half), level)
