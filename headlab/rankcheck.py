"""Checks of a head ranking made by :mod:`headlab.headrank`: does it reproduce, where does its
uncertainty come from, what did the antithetic pairs buy, and does the design estimate what the seed
scripts estimate?

* :func:`halves` / :func:`stability` -- one run split two ways into independent half-runs of equal
  size: by draw (the same prompts, disjoint noise) and by group (disjoint prompts and disjoint noise).
  The halves' rank agreement is the reproducibility of a run of half the size; :func:`spearman_brown`
  predicts it for the full run and :func:`size_factor` says how much larger a run must be to reach a
  target.
* :func:`variance_table` -- each head's variance components (prompts, prefix noise, query noise;
  :func:`headlab.stats.variance_components`) and their shares of the variance of the run's estimate.
* :func:`antithetic_efficiency` -- the pairs' variance reduction per evaluation.
* :func:`reference_effects` / :func:`reference_check` -- the seeds' semantics (fresh noise at every
  position of every prompt, through the plain hooks) on a few heads, and the z test of the design
  against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from numpy.typing import ArrayLike

from headlab import metrics, stats
from headlab.edits import HeadEdit, seed_for
from headlab.engine import CleanRun
from headlab.headrank import RankDesign, effect_column, rank_table
from headlab.interventions import noise_heads
from headlab.models import LoadedModel
from headlab.tasks import FewShotTask

__all__ = [
    "agreement",
    "antithetic_efficiency",
    "halves",
    "reference_check",
    "reference_effects",
    "size_factor",
    "spearman_brown",
    "stability",
    "variance_table",
]


def agreement(rankings: dict[str, pd.DataFrame], value: str = "effect") -> pd.DataFrame:
    """Spearman, Kendall and top-10 overlap of the head rankings of independent runs, every pair."""
    wide = pd.concat({name: r.set_index(["layer", "head"])[value] for name, r in rankings.items()}, axis=1)
    return metrics.rank_agreement(wide.dropna())


def halves(obs: pd.DataFrame) -> dict[str, dict[str, pd.DataFrame]]:
    """Two ways to split one run into two independent half-runs of equal size.

    * ``"noise"``: draw 0 vs draw 1 -- the same prompts under disjoint noise (needs ``draws == 2``);
    * ``"prompts"``: even vs odd groups (within each phase) -- disjoint prompts and disjoint noise.

    How well the halves' rankings agree is the stability of a run of half the size; see
    :func:`spearman_brown` for the full run.
    """
    out = {}
    if "draw" in obs and obs["draw"].nunique() == 2:
        d = sorted(obs["draw"].unique())
        out["noise"] = {f"draw {d[0]}": obs[obs["draw"] == d[0]], f"draw {d[1]}": obs[obs["draw"] == d[1]]}
    rank = obs.groupby("phase")["group"].rank(method="dense").astype(int)
    out["prompts"] = {"even groups": obs[rank % 2 == 0], "odd groups": obs[rank % 2 == 1]}
    return out


def spearman_brown(r: ArrayLike, factor: float = 2.0) -> np.ndarray:
    """The agreement of two runs ``factor`` times as large as two runs that agree at ``r``:
    ``factor r / (1 + (factor - 1) r)`` (errors shrink as 1/size; applied here to rank correlations,
    an approximation that treats ranks like scores); NaN where ``r <= 0`` (nothing to extrapolate)."""
    r = np.asarray(r, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(r > 0, factor * r / (1 + (factor - 1) * r), np.nan)


def size_factor(r: ArrayLike, target: float = 0.9) -> np.ndarray:
    """How many times larger two runs that agree at ``r`` must be to agree at ``target`` (Spearman-Brown
    solved for the factor; 1 when ``r`` already reaches it, NaN when ``r <= 0``)."""
    r = np.asarray(r, dtype=float)
    if not 0 < target < 1:
        raise ValueError(f"target={target} must be in (0, 1).")
    with np.errstate(invalid="ignore", divide="ignore"):
        k = target * (1 - r) / (r * (1 - target))
    return np.where(r > 0, np.maximum(k, 1.0), np.nan)


def stability(obs: pd.DataFrame, top_k: int = 10, n_boot: int = 200,
              target: float = 0.9) -> tuple[pd.DataFrame, dict[str, dict[str, pd.DataFrame]]]:
    """Rank agreement of the halves of one run (:func:`halves`), and what it predicts for the full run.

    Returns:
        ``(table, rankings)``: one row per split (``split``, ``a``, ``b``, ``spearman``, ``kendall``,
        ``top10_overlap``, ``spearman_full`` -- predicted for two independent full runs -- and
        ``size_for_target``: how many times larger than this run two runs must be to agree at
        ``target``); and each half's :func:`headlab.headrank.rank_table`, by split.
    """
    rows, rankings = [], {}
    for split, parts in halves(obs).items():
        rankings[split] = {name: rank_table(part, top_k=top_k, n_boot=n_boot) for name, part in parts.items()}
        rows.append(agreement(rankings[split]).assign(split=split))
    table = pd.concat(rows, ignore_index=True)
    table["spearman_full"] = spearman_brown(table["spearman"])
    table["size_for_target"] = size_factor(table["spearman_full"], target)
    cols = ["split", "a", "b", "spearman", "kendall", "top10_overlap", "spearman_full", "size_for_target"]
    return table[cols + [c for c in table.columns if c not in cols]], rankings


def variance_table(obs: pd.DataFrame, balance: str | None = "label") -> pd.DataFrame:
    """Where each head's uncertainty comes from, on the run's first phase.

    Components by :func:`headlab.stats.variance_components` (``balance``: the column every group holds
    equally, whose differences cancel in group means), then what each adds to the variance of the
    phase's mean (:func:`headlab.stats.design_variance` with the phase's own prompts, groups and draws).

    Returns:
        One row per head: ``var_prompt, var_prefix, var_query``, ``from_prompts, from_prefix,
        from_query``, ``variance`` and ``share_prompts, share_prefix, share_query``.

    Raises:
        ValueError: fewer than two draws per prompt, or fewer than two prompts of each label per group.
    """
    first = obs[obs["phase"] == obs["phase"].min()]
    first = first.assign(effect=effect_column(first))
    comp = stats.variance_components(first, "effect", balance=balance)
    n_groups = int(first["group"].nunique())
    return stats.design_variance(comp, n_prompts=int(first["prompt"].nunique()), n_groups=n_groups,
                                 draws=int(first["draw"].nunique()))


def antithetic_efficiency(obs: pd.DataFrame) -> pd.DataFrame:
    """How much the antithetic pairs buy, per head, at equal evaluations.

    ``efficiency = var(group mean of single drops) / (2 var(group mean of pair means))``: a pair costs
    two evaluations, so above 1 the pairs beat twice as many groups of single draws (new prompts, new
    noise). Computed on phase 1 (every head on the same groups).
    """
    if "drop_minus" not in obs:
        raise ValueError("no antithetic pairs in these observations (drop_minus missing).")
    first = obs[obs["phase"] == obs["phase"].min()]
    first = first.assign(pair=effect_column(first))
    g = first.groupby(["layer", "head", "group"])[["drop_plus", "pair"]].mean()
    v = g.groupby(["layer", "head"]).var()
    out = v.rename(columns={"drop_plus": "var_single", "pair": "var_pair"}).reset_index()
    out["efficiency"] = out["var_single"] / (2 * out["var_pair"])
    return out


@torch.inference_mode()
def reference_effects(lm: LoadedModel, task: FewShotTask, design: RankDesign, heads: Sequence[tuple[int, int]],
                      prompts: Sequence[int], draws: int = 2, scales: dict[tuple[int, int], float] | None = None,
                      clean: CleanRun | None = None) -> pd.DataFrame:
    """The seeds' semantics on a few heads: fresh noise at every position of every prompt.

    Each (head, prompt, draw) is one plain full forward of the whole prompt with the noise hooked in
    (:func:`headlab.interventions.noise_heads` with no shared prefix: the prefix positions get the
    prompt's own draw too), no engine and no antithetic pairing. Its mean estimates the same
    ``theta_h`` as the design, with one independent cluster per prompt.

    Args:
        task: the :class:`headlab.tasks.FewShotTask`.
        design: gives the noise mode, level and seed.
        heads: ``(layer, head)`` pairs.
        prompts: task indices.
        draws: independent draws per prompt (a batch of that many rows per forward).
        scales: noise std per head; default from ``clean`` (the design's mode and level).

    Returns:
        One row per (head, prompt, draw): ``layer, head, prompt, draw, drop``.
    """
    enc = task.encode(lm)
    if scales is None:
        if clean is None:
            raise ValueError("reference_effects needs `scales` or the `clean` run to compute them from.")
        scales = {(layer, h): design.setting.edit(layer, h, clean).scale for layer, h in heads}
    idx = torch.tensor(task.label_ids(lm), device=lm.device)
    y = task.labels
    rows = []
    seed = seed_for("reference", design.seed)
    for p in prompts:
        p = int(p)
        sgn = 1.0 if y[p] == 1 else -1.0
        ids = enc.full(p)[None].to(lm.device)
        lp = torch.log_softmax(lm.model(input_ids=ids).logits[:, -1].float(), -1)[:, idx].cpu()
        clean_ld = float(lp[0, 1] - lp[0, 0]) * sgn
        batch = ids.expand(draws, -1)
        for layer, h in heads:
            edit = HeadEdit("noise", layer, h, scales[(layer, h)], seed)
            with noise_heads(lm, [edit], samples=[f"{p}/{r}" for r in range(draws)]):
                out = lm.model(input_ids=batch).logits[:, -1].float()
            lpn = torch.log_softmax(out, -1)[:, idx].cpu()
            for r in range(draws):
                rows.append({"layer": layer, "head": h, "prompt": p, "draw": r,
                             "drop": clean_ld - float(lpn[r, 1] - lpn[r, 0]) * sgn})
    return pd.DataFrame(rows)


def reference_check(ranking: pd.DataFrame, reference: pd.DataFrame, n_boot: int = 1000,
                    z_crit: float = 1.96) -> pd.DataFrame:
    """The design's effects (a :func:`headlab.headrank.rank_table`) against the seeds' semantics
    (:func:`reference_effects`, ranked with one cluster per prompt), head by head.

    Returns:
        One row per reference head: ``effect, effect_low, effect_high, se`` with suffixes ``_design``
        and ``_reference``, their ``difference``, ``z = difference / sqrt(se_design^2 + se_reference^2)``
        and ``agree`` (``|z| < z_crit``).
    """
    cols = ["layer", "head", "effect", "effect_low", "effect_high", "se"]
    ref = rank_table(reference.assign(phase=1), "drop", cluster="prompt", n_boot=n_boot)
    out = ranking[cols].merge(ref[cols], on=["layer", "head"], suffixes=("_design", "_reference"))
    out["difference"] = out["effect_design"] - out["effect_reference"]
    out["z"] = out["difference"] / np.hypot(out["se_design"], out["se_reference"])
    out["agree"] = out["z"].abs() < z_crit
    return out
