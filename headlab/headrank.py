"""Head rankings that reproduce: a designed noise experiment, honest intervals, a settled top-k.

Estimand: for head ``h`` under a noise setting, ``theta_h = E_prompt E_noise[drop]``, the expected drop
of the logit difference toward the correct label when Gaussian noise is added to the head's output at
every position of the prompt. The seed scripts draw fresh noise for every prompt; the exact engine
(:func:`headlab.engine.sweep_heads`) runs the shared few-shot prefix once per edit, so all prompts of
one call share the prefix's draw. Both estimate the same ``theta_h`` (each prompt's noise has the
same distribution); they differ in variance. This module spends the engine's evaluations so that the
variance is small and fully accounted for:

* **Prefix-draw groups.** The prompts are split into label-balanced groups of ``prompts_per_group``;
  each group gets its own noise draw (the prefix is still run once per edit and group). The prefix
  noise then has as many independent draws as there are groups, not one per seed. A group, with its
  prompts and its draws, is the unit of independent replication for intervals (a cluster).
* **Antithetic pairs.** Every draw ``eps`` is also evaluated as ``-eps`` and the two drops averaged:
  the part of the drop that is odd in ``eps`` (above all the first-order term, mean zero and
  large) cancels exactly; the even part, which carries the expected effect, stays.
* **Two draws per prompt.** Each group is measured under ``draws`` independent draws, so one run splits
  into halves on the same prompts with disjoint noise (the noise-only reproducibility) and the
  variance separates into prompts, prefix noise and query noise (:func:`headlab.stats.variance_components`).
* **Label balance.** Every group holds both labels equally, so the label effect, and noise that merely
  shifts the model toward one label (it moves the two labels' drops in opposite directions), cancel
  in every group mean instead of adding variance.
* **Common prompts.** Every head is measured on the same groups of prompts, so comparisons between
  heads are paired (a prompt that is fragile for every head does not reorder them).
* **Racing for the top-k.** Phase 1 measures every head; each later phase adds new groups (new
  prompts, new draws) only for the heads whose rank interval still crosses the top-``k`` boundary,
  until none does (the top-k is *settled*) or the phases are used up.

Statistics (:mod:`headlab.stats`): each head's mean over its groups, a cluster bootstrap (groups
resampled within each phase, the same draw for every head) for 95% intervals and for rank intervals,
cluster-robust t tests with Holm (family-wise) and Benjamini-Hochberg (false discovery) corrections.
How far a run reproduces, what the antithetic pairs bought and the check against the seeds' semantics
(fresh noise at every position of every prompt) are in :mod:`headlab.rankcheck`.

Results are resumable: with a :class:`headlab.shards.ShardStore` made with ``lm=`` (its keys then hold
the model's computation identity), every group is one shard keyed by the design, the group's prompts
(their token ids and indices), the heads and their noise scales, written under the store's lock.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from headlab import engine, metrics, stats
from headlab.edits import ABLATIONS, MODES, Setting, seed_for
from headlab.engine import CleanRun
from headlab.models import LoadedModel
from headlab.progress import report
from headlab.schema import Field, check_record, check_variant
from headlab.shards import ShardStore, config_hash, run_grid
from headlab.sweeps import SETTING_FIELDS

__all__ = [
    "AUTO_SIZE",
    "DESIGN_FIELDS",
    "RankDesign",
    "ablation_observations",
    "accuracy_drops",
    "balanced_order",
    "compute_used",
    "effect_column",
    "group_seed",
    "phase_log",
    "race",
    "rank_table",
    "replicate_pools",
    "run_groups",
    "significance_counts",
]

NOISE_MODES = tuple(m for m in MODES if m not in ABLATIONS)

#: The run size a chapter uses when it leaves ``prompts_per_group`` / ``phases`` at 0 / ``[]``, by device.
#: ``cpu``: about the 15 minutes the seed-based chapter took on 2 cores (it cannot reach the stability
#: targets there; the chapter says how far it gets). ``cuda``: sized for the targets.
AUTO_SIZE = {"cpu": {"prompts_per_group": 4, "phases": (4, 2)},
             "cuda": {"prompts_per_group": 8, "phases": (32, 8, 8)}}

#: The schema of a design's run sizes (:mod:`headlab.schema`); its noise setting (``mode``, ``level``,
#: ``seed``) is checked against :data:`headlab.sweeps.SETTING_FIELDS` of the noise modes.
DESIGN_FIELDS = {
    "prompts_per_group": Field("int", low=2, help="an even integer >= 2 (groups are label-balanced)"),
    "phases": Field("list", items=Field("int", low=2), nonempty=True,
                    help="a non-empty list of integers >= 2 (groups per phase)"),
    "draws": Field("int", low=1),
    "antithetic": Field("bool"),
    "top_k": Field("int", low=1),
    "level_ci": Field("float", low=0, high=1, help="a number strictly between 0 and 1"),
}


@dataclass(frozen=True)
class RankDesign:
    """How one ranking run spends its evaluations.

    Attributes:
        mode, level: the noise setting (``absolute``, ``fraction_of_max`` or ``fraction_of_std`` of
            :data:`headlab.edits.MODES`, and its level; resolved per head by
            :meth:`headlab.edits.Setting.edit`).
        prompts_per_group: prompts sharing one prefix draw; even, half of each label.
        phases: groups per phase. Phase 1 measures every head; each later phase measures only the
            heads still tied at the top-``top_k`` boundary.
        draws: independent noise draws per prompt (each with its own prefix draw per group). With two,
            the run splits into two halves on the same prompts with disjoint noise, which measures
            how much the noise alone moves the ranking and separates prompt from noise variance.
        antithetic: evaluate each draw as ``+eps`` and ``-eps`` and average the two drops.
        top_k: the size of the top set the racing settles.
        seed: noise seed of the run; runs with different seeds draw independent noise.
        level_ci: coverage of intervals and rank intervals (and the racing rule).
    """

    mode: str = "fraction_of_std"
    level: float = 3.0
    prompts_per_group: int = 4
    phases: tuple[int, ...] = (16,)
    draws: int = 2
    antithetic: bool = True
    top_k: int = 10
    seed: int = 0
    level_ci: float = 0.95

    def __post_init__(self) -> None:
        # the one validation: the setting by the sweeps' schema, the sizes by DESIGN_FIELDS
        what = "RankDesign"
        setting = check_variant({"mode": self.mode, "level": self.level, "seed": self.seed}, "mode",
                                {m: SETTING_FIELDS[m] for m in NOISE_MODES}, what)
        sizes = check_record({k: getattr(self, k) for k in DESIGN_FIELDS}, DESIGN_FIELDS, what)
        if sizes["prompts_per_group"] % 2:
            raise ValueError(f"{what}: prompts_per_group={self.prompts_per_group}; expected "
                             f"{DESIGN_FIELDS['prompts_per_group'].describe()}.")
        if sizes["level_ci"] in (0.0, 1.0):
            raise ValueError(f"{what}: level_ci={self.level_ci}; expected {DESIGN_FIELDS['level_ci'].describe()}.")
        sizes["phases"] = tuple(sizes["phases"])
        for key, value in {**setting, **sizes}.items():
            object.__setattr__(self, key, value)

    @property
    def setting(self) -> Setting:
        """The noise setting (mode and level; each group gets its own seed, :func:`group_seed`)."""
        return Setting(self.mode, self.level)

    @property
    def n_groups(self) -> int:
        return sum(self.phases)

    @property
    def n_prompts(self) -> int:
        """Prompts the run may use (all phases)."""
        return self.n_groups * self.prompts_per_group

    def key(self) -> dict[str, Any]:
        """What changes the numbers of one group (its shard key): not ``phases``, ``top_k`` or
        ``level_ci``, which only decide which heads and groups are measured (a run with a further phase
        reuses the groups already measured)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("phases", "top_k", "level_ci")}


def balanced_order(labels: Sequence[int], per_group: int) -> np.ndarray:
    """An order of the prompts in which every consecutive block of ``per_group`` holds each of two
    labels ``per_group / 2`` times (order within a label kept); prompts that do not fill a block are
    left out.

    Balanced groups cancel, in every group mean, the label effect and any noise that shifts the
    model toward one label (it moves the two labels' logit differences in opposite directions).
    """
    y = np.asarray(labels)
    values = np.unique(y)
    if len(values) != 2 or per_group % 2:
        raise ValueError(f"balanced_order needs two labels and an even per_group; got labels {values.tolist()}, "
                         f"per_group={per_group}.")
    half = per_group // 2
    a, b = np.flatnonzero(y == values[0]), np.flatnonzero(y == values[1])
    n_blocks = min(len(a), len(b)) // half
    blocks = [np.concatenate([a[i * half:(i + 1) * half], b[i * half:(i + 1) * half]]) for i in range(n_blocks)]
    return np.concatenate(blocks) if blocks else np.empty(0, dtype=int)


def replicate_pools(labels: Sequence[int], per_group: int, n_prompts: int, n_pools: int = 2) -> list[np.ndarray]:
    """``n_pools`` disjoint prompt pools of ``n_prompts`` each, every block of ``per_group`` label-balanced.

    Pool ``i`` is the ``i``-th run of ``n_prompts`` of :func:`balanced_order`: independent runs on
    disjoint prompt samples (for the reproducibility check) take different pools.
    """
    if n_prompts % per_group:
        raise ValueError(f"n_prompts={n_prompts} must be a multiple of per_group={per_group}.")
    order = balanced_order(labels, per_group)
    if len(order) < n_pools * n_prompts:
        raise ValueError(f"{n_pools} pools of {n_prompts} label-balanced prompts need {n_pools * n_prompts}; "
                         f"the {len(labels)} prompts give {len(order)}.")
    return [order[i * n_prompts:(i + 1) * n_prompts] for i in range(n_pools)]


def group_seed(design: RankDesign, group: int, draw: int = 0) -> int:
    """The noise seed of one draw of one group of a run (independent across groups, draws and run seeds)."""
    return seed_for("headrank", design.seed, group, draw)


def _check_store(store: ShardStore | None) -> None:
    if store is not None and "computation" not in store.base:
        raise ValueError("the shard store has no computation identity; make it with ShardStore(folder, base, lm=lm) "
                         "so that its keys hold the model's weights, dtype and device.")


def _tokens_key(clean: CleanRun, rows: Sequence[int]) -> str:
    """A hash of the prefix's and of the ``rows``' token ids and of the label ids."""
    return config_hash({"p": clean.enc.prefix.tolist(), "q": [clean.enc.queries[r].tolist() for r in rows],
                        "labels": list(clean.label_ids)})


def run_groups(
    lm: LoadedModel,
    clean: CleanRun,
    labels: Sequence[int],
    design: RankDesign,
    pool: Sequence[int],
    heads: Sequence[tuple[int, int]],
    groups: Sequence[int],
    store: ShardStore | None = None,
    phase: int = 1,
    batch_size: int = 64,
    threshold: float = 0.0,
    progress: bool = True,
) -> pd.DataFrame:
    """Measure ``heads`` on prompt groups ``groups`` of ``pool`` under the design's noise.

    Group ``g`` holds prompts ``pool[g * M:(g + 1) * M]`` (``M = prompts_per_group``; make ``pool``
    with :func:`balanced_order`). For each head it gets ``draws`` noise draws (seeds
    :func:`group_seed`), each one prefix draw shared by its prompts and one query draw per prompt,
    evaluated as ``+eps`` and, with ``antithetic``, as ``-eps``.

    Args:
        store: one shard per group, computed under the store's lock (:func:`headlab.shards.run_grid`):
            a rerun resumes, and processes sharing the folder share the work. It must be made with
            ``lm=`` (:class:`headlab.shards.ShardStore`).
        progress: report progress (elapsed, ETA) through :mod:`headlab.progress`.

    Returns:
        One row per (head, prompt, draw): ``layer, head, phase, group, prompt`` (index into the task),
        ``draw``, ``label``,
        ``drop_plus`` (and ``drop_minus``): the drop of the logit difference toward the correct label,
        ``correct_clean``, ``correct_plus`` (and ``correct_minus``): whether the prediction at
        ``threshold`` (on ``lp(label 1) - lp(label 0)``) is right, clean and under the noise,
        ``seconds`` (the group's wall time, on its first row only) and ``evaluations`` (query rows)
        and ``prefix_passes`` (on the same row).
    """
    _check_store(store)
    M = design.prompts_per_group
    heads = [(int(a), int(b)) for a, b in heads]
    signs = (1, -1) if design.antithetic else (1,)
    y = np.asarray(labels)
    if len(y) != len(clean.enc):
        raise ValueError(f"labels has {len(y)} entries; the clean run has {len(clean.enc)} prompts.")
    sign_y = np.where(y == 1, 1.0, -1.0)
    clean_raw = (clean.logprobs[:, 1] - clean.logprobs[:, 0]).numpy()
    clean_ld = clean_raw * sign_y
    clean_ok = (clean_raw > threshold).astype(int) == y
    base = {hd: design.setting.edit(hd[0], hd[1], clean) for hd in heads}
    heads_key = config_hash({"h": heads, "scale": [round(base[hd].scale, 7) for hd in heads]})
    points = []
    for g in groups:
        rows = [int(p) for p in pool[g * M:(g + 1) * M]]
        if len(rows) < M:
            raise ValueError(f"group {g} needs prompts {g * M}..{(g + 1) * M - 1} of the pool, which has {len(pool)}.")
        points.append({"group": int(g), "phase": int(phase), "heads": heads_key, "prompts": rows,
                       "tokens": _tokens_key(clean, rows), "threshold": float(threshold), **design.key()})

    def compute(point: dict[str, Any]) -> dict[str, pd.DataFrame]:
        g, rows = point["group"], point["prompts"]
        t0 = time.perf_counter()
        R = design.draws
        # one edit per (head, draw, sign): each draw is the group's own prefix draw, shared by its prompts
        edits = [dataclasses.replace(base[hd], seed=group_seed(design, g, r), sign=s)
                 for hd in heads for r in range(R) for s in signs]
        lp = engine.sweep_heads(lm, clean, edits, batch_size=batch_size, prompts=[rows] * len(edits))
        lp = lp[:, rows]  # (E, M, 2)
        raw = (lp[:, :, 1] - lp[:, :, 0]).numpy()
        drop = (clean_ld[rows][None] - raw * sign_y[rows][None]).reshape(len(heads), R, len(signs), M)
        ok = ((raw > threshold).astype(int) == y[rows][None]).reshape(len(heads), R, len(signs), M)
        n = len(heads) * R
        frame = pd.DataFrame({
            "layer": np.repeat([h[0] for h in heads], R * M), "head": np.repeat([h[1] for h in heads], R * M),
            "phase": point["phase"], "group": g, "prompt": np.tile(rows, n),
            "draw": np.tile(np.repeat(np.arange(R), M), len(heads)),
            "label": np.tile(y[rows], n), "correct_clean": np.tile(clean_ok[rows], n),
            "drop_plus": drop[:, :, 0].reshape(-1), "correct_plus": ok[:, :, 0].reshape(-1),
        })
        if design.antithetic:
            frame["drop_minus"] = drop[:, :, 1].reshape(-1)
            frame["correct_minus"] = ok[:, :, 1].reshape(-1)
        frame["seconds"] = 0.0
        frame["evaluations"] = 0
        frame["prefix_passes"] = 0
        frame.loc[0, ["seconds", "evaluations", "prefix_passes"]] = (
            time.perf_counter() - t0, len(edits) * M, len(edits))
        return {"obs": frame}

    if store is not None:
        return run_grid(points, compute, store, progress=progress)["obs"]
    frames = []
    for point in points:
        frames.append(compute(point)["obs"])
        if progress:
            report(f"ranking: group {point['group']} (phase {phase}): {len(heads)} heads x {M} prompts x "
                   f"{design.draws} draws x {len(signs)} signs in {frames[-1]['seconds'].sum():.1f} s")
    return pd.concat(frames, ignore_index=True)


def effect_column(obs: pd.DataFrame) -> pd.Series:
    """Each observation's effect: the mean of the antithetic pair's drops (or the single drop)."""
    if "drop_minus" in obs:
        return (obs["drop_plus"] + obs["drop_minus"]) / 2
    return obs["drop_plus"]


def rank_table(obs: pd.DataFrame, value: str = "effect", top_k: int = 10, level: float = 0.95,
               n_boot: int = 2000, seed: int = 0, cluster: str = "group", stratum: str = "phase") -> pd.DataFrame:
    """Rank heads by the mean of ``value`` with intervals that include every source of variance.

    Observations are averaged per (head, cluster); a cluster is the unit of independent replication
    (a prefix-draw group with its prompts and draws; a prompt for deterministic ablation). Clusters
    are resampled within strata (phases, runs), jointly for all heads
    (:func:`headlab.stats.cluster_bootstrap`).

    Args:
        obs: one row per observation with ``layer, head``, ``cluster``, ``stratum`` and ``value``
            (``value="effect"`` is computed from ``drop_plus`` / ``drop_minus`` when absent).
        top_k: the boundary the ``status`` column refers to.
        level: coverage of the effect and rank intervals.

    Returns:
        One row per head, largest effect first: ``effect`` with its interval ``effect_low,
        effect_high`` (:func:`headlab.stats.effect_interval`: expanded percentile, at least the t
        interval), cluster-robust ``se`` and ``df``, the two-sided t-test ``p`` of
        effect 0 with ``p_holm`` (family-wise) and ``q_bh`` (false discovery rate), ``rank`` with its
        confidence interval ``rank_low, rank_high`` (:func:`headlab.stats.rank_intervals`),
        ``status`` (``in`` / ``out`` / ``tied`` at the top-``top_k`` boundary), ``n_clusters`` and
        ``n_obs``.
    """
    if value == "effect" and "effect" not in obs:
        obs = obs.assign(effect=effect_column(obs))
    vals = obs[value].to_numpy(float)
    layer, head = obs["layer"].to_numpy(int), obs["head"].to_numpy(int)
    head_keys, head_id = np.unique(np.stack([layer, head], 1), axis=0, return_inverse=True)
    strat = obs[stratum].to_numpy() if stratum in obs else np.zeros(len(obs), dtype=int)
    s_id = pd.factorize(strat, sort=True)[0]
    c_id = pd.factorize(obs[cluster].to_numpy(), sort=True)[0]
    cl_keys, cl_id = np.unique(np.stack([s_id, c_id], 1), axis=0, return_inverse=True)
    head_id, cl_id = head_id.reshape(-1), cl_id.reshape(-1)
    sums = np.zeros((len(head_keys), len(cl_keys)))
    w = np.zeros_like(sums)
    np.add.at(sums, (head_id, cl_id), vals)
    np.add.at(w, (head_id, cl_id), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.where(w > 0, sums / w, np.nan)  # (heads, clusters) cluster means
    strata = cl_keys[:, 0]
    est, se, df = stats.cluster_se(v, w, strata)
    boots = stats.cluster_bootstrap(v, w, strata, n_boot=n_boot, seed=seed)
    low, high = stats.effect_interval(boots, est, se, df, level)
    n_min = max(int((w > 0).sum(1).min()), 2)
    rank_low, rank_high = stats.rank_intervals(est, boots, level, inflate=float(np.sqrt(n_min / (n_min - 1))))
    p = stats.t_pvalues(est, se, df)
    p_filled = np.nan_to_num(p, nan=1.0)
    out = pd.DataFrame({
        "layer": head_keys[:, 0], "head": head_keys[:, 1],
        "effect": est, "effect_low": low, "effect_high": high, "se": se, "df": df, "p": p,
        "p_holm": stats.holm(p_filled), "q_bh": metrics.benjamini_hochberg(p_filled),
        "rank_low": rank_low, "rank_high": rank_high,
        "n_clusters": (w > 0).sum(1), "n_obs": w.sum(1).astype(int),
    })
    out["status"] = stats.top_k_status(out["rank_low"], out["rank_high"], min(top_k, len(out)))
    out = out.sort_values("effect", ascending=False, kind="stable").reset_index(drop=True)
    out.insert(2, "rank", np.arange(1, len(out) + 1))
    return out


def race(
    lm: LoadedModel,
    clean: CleanRun,
    labels: Sequence[int],
    design: RankDesign,
    pool: Sequence[int],
    store: ShardStore | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 64,
    n_boot: int = 2000,
    threshold: float = 0.0,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the design's phases: every head first, then only the heads tied at the top-k boundary.

    Phase ``i`` uses the next ``design.phases[i]`` groups of ``pool`` (new prompts, new draws). After
    each phase the heads are ranked (:func:`rank_table`); the next phase measures only the heads
    whose rank interval crosses ``design.top_k``. The racing stops early when none does.

    Returns:
        The observations of all phases (:func:`run_groups`).
    """
    heads = [(layer, h) for layer in range(lm.n_layers) for h in range(lm.n_heads)] if heads is None else list(heads)
    if len(pool) < design.n_prompts:
        raise ValueError(f"the design uses up to {design.n_prompts} prompts ({design.n_groups} groups of "
                         f"{design.prompts_per_group}); the pool has {len(pool)}.")
    frames: list[pd.DataFrame] = []
    todo, first = heads, 0
    for phase, n_groups in enumerate(design.phases, start=1):
        if phase > 1:
            table = rank_table(pd.concat(frames, ignore_index=True), top_k=design.top_k, level=design.level_ci,
                               n_boot=n_boot)
            tied = table[table["status"] == "tied"]
            todo = list(zip(tied["layer"].astype(int), tied["head"].astype(int)))
            if progress:
                report(f"ranking: after phase {phase - 1}, {len(todo)} heads tied at the top-{design.top_k} boundary")
            if not todo:
                break
        frames.append(run_groups(lm, clean, labels, design, pool, todo, range(first, first + n_groups), store,
                                 phase=phase, batch_size=batch_size, threshold=threshold, progress=progress))
        first += n_groups
    return pd.concat(frames, ignore_index=True)


def compute_used(obs: pd.DataFrame) -> dict[str, float]:
    """Evaluations (query rows), prefix passes and seconds spent on observations of :func:`run_groups`."""
    return {"evaluations": int(obs["evaluations"].sum()), "prefix_passes": int(obs["prefix_passes"].sum()),
            "seconds": float(obs["seconds"].sum())}


def ablation_observations(lm: LoadedModel, clean: CleanRun, labels: Sequence[int], prompts: Sequence[int],
                          mode: str = "zero", heads: Sequence[tuple[int, int]] | None = None,
                          store: ShardStore | None = None, batch_size: int = 64,
                          progress: bool = True) -> pd.DataFrame:
    """Zero- or mean-ablate each head on ``prompts``; one row per (head, prompt) with its ``drop``.

    Ablation is deterministic, so the only source of variance is the prompts: rank these with
    ``rank_table(obs, "drop", cluster="prompt")``.

    Args:
        store: one shard per call (resumable; made with ``lm=``, see :func:`run_groups`).

    Returns:
        ``layer, head, prompt, label, drop``, and ``seconds`` / ``evaluations`` on the first row.
    """
    _check_store(store)
    if mode not in ABLATIONS:
        raise ValueError(f"mode={mode!r}; use one of {ABLATIONS}.")
    heads = [(layer, h) for layer in range(lm.n_layers) for h in range(lm.n_heads)] if heads is None else \
        [(int(a), int(b)) for a, b in heads]
    y = np.asarray(labels)
    rows = [int(p) for p in prompts]
    if len(y) != len(clean.enc):
        raise ValueError(f"labels has {len(y)} entries; the clean run has {len(clean.enc)} prompts.")
    point = {"ablation": mode, "heads": config_hash({"h": heads}), "prompts": rows, "tokens": _tokens_key(clean, rows)}
    if mode == "mean":  # the means come from every prompt of the clean run
        point["means"] = config_hash({"m": clean.head_mean.double().round(decimals=6).tolist()})

    def compute(_: dict[str, Any]) -> dict[str, pd.DataFrame]:
        sign_y = np.where(y[rows] == 1, 1.0, -1.0)
        edits = [Setting(mode).edit(layer, h, clean) for layer, h in heads]
        t0 = time.perf_counter()
        lp = engine.sweep_heads(lm, clean, edits, batch_size=batch_size, prompts=[rows] * len(edits))[:, rows]
        clean_ld = (clean.logprobs[rows, 1] - clean.logprobs[rows, 0]).numpy() * sign_y
        drop = clean_ld[None] - (lp[:, :, 1] - lp[:, :, 0]).numpy() * sign_y[None]
        frame = pd.DataFrame({"layer": np.repeat([h[0] for h in heads], len(rows)),
                              "head": np.repeat([h[1] for h in heads], len(rows)),
                              "prompt": np.tile(rows, len(heads)), "label": np.tile(y[rows], len(heads)),
                              "drop": drop.reshape(-1), "seconds": 0.0, "evaluations": 0})
        frame.loc[0, ["seconds", "evaluations"]] = (time.perf_counter() - t0, len(edits) * len(rows))
        return {"obs": frame}

    if store is not None:
        return run_grid([point], compute, store, progress=progress)["obs"]
    return compute(point)["obs"]


def accuracy_drops(obs: pd.DataFrame) -> pd.DataFrame:
    """Per head: ``accuracy_drop``, the mean over observations of clean minus noisy correctness (the
    antithetic pair's two answers averaged), in [-1, 1]."""
    noisy = obs["correct_plus"].astype(float)
    if "correct_minus" in obs:
        noisy = (noisy + obs["correct_minus"].astype(float)) / 2
    drop = obs["correct_clean"].astype(float) - noisy
    return drop.groupby([obs["layer"], obs["head"]]).mean().rename("accuracy_drop").reset_index()


def significance_counts(table: pd.DataFrame, level: float = 0.05) -> pd.DataFrame:
    """How many heads of a :func:`rank_table` have a non-zero effect: uncorrected, with Holm's
    family-wise correction and with Benjamini-Hochberg's false discovery rate, each at ``level``.

    Returns:
        One row per correction: ``test``, ``level``, ``heads non-zero``, ``hurt (effect > 0)``,
        ``help (effect < 0)`` and ``of`` (heads tested).
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1).")
    rows = []
    for name, col in [("uncorrected p", "p"), ("Holm (FWER)", "p_holm"), ("Benjamini-Hochberg (FDR)", "q_bh")]:
        sig = table[col] <= level
        rows.append({"test": name, "level": level, "heads non-zero": int(sig.sum()),
                     "hurt (effect > 0)": int((sig & (table["effect"] > 0)).sum()),
                     "help (effect < 0)": int((sig & (table["effect"] < 0)).sum()), "of": len(table)})
    return pd.DataFrame(rows)


def phase_log(obs: pd.DataFrame) -> pd.DataFrame:
    """Per phase of a run: how many heads were measured and on how many groups."""
    return pd.DataFrame({
        "heads": obs.drop_duplicates(["phase", "layer", "head"]).groupby("phase").size(),
        "groups": obs.groupby("phase")["group"].nunique()}).reset_index()
