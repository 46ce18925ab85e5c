"""Resumable sweeps: one Parquet shard per grid point, named by a hash of its configuration.

A sweep is a list of configuration dicts and a function that turns one configuration into a tidy
frame. :class:`ShardStore` writes each frame atomically (temporary file + rename) next to a JSON
copy of its configuration; a rerun skips every point whose shard exists, so a sweep killed midway
resumes where it stopped and ends with the same table as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import math
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["ABLATION_MODES", "HEAD_TYPES", "LAYER_RANGES", "MODES", "ShardStore", "ablation_heads",
           "ablation_summary", "config_hash", "head_edits", "head_sweep", "induction_ablation_sweep", "induction_vs_random",
           "WEIGHT_KINDS", "break_probability", "entries_text", "head_prune_order", "layer_range",
           "neuron_ablation_sets", "neuron_ablation_sweep", "nll_summary", "parse_entries", "rank_heads",
           "ranked_ablation_sweep", "run_grid", "seed_agreement", "top_heads", "weight_setting",
           "weight_sweep"]


def config_hash(config: dict[str, Any], length: int = 12) -> str:
    """Stable short hash of a JSON-able configuration (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class ShardStore:
    """A folder of result shards keyed by configuration.

    Args:
        root: folder to write into (created).
        base: configuration shared by every shard (model fingerprint, task, ...). It is part of every
            key, so changing it never reuses stale shards.
    """

    def __init__(self, root: str | Path, base: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base = dict(base or {})

    def key(self, config: dict[str, Any]) -> str:
        return config_hash({**self.base, **config})

    def path(self, config: dict[str, Any], table: str = "") -> Path:
        # sorted, like the hash: the same configuration names the same file whatever its key order
        readable = "-".join(f"{k}={v}" for k, v in sorted(config.items()) if isinstance(v, (int, float, str)))
        readable = "".join(c if c.isalnum() or c in "=-_." else "_" for c in readable)[:80]
        suffix = f".{table}" if table else ""
        return self.root / f"{readable}-{self.key(config)}{suffix}.parquet"

    def _marker(self, config: dict[str, Any]) -> Path:
        return self.path(config).with_suffix(".json")

    def done(self, config: dict[str, Any]) -> bool:
        return self._marker(config).exists()

    def save(self, config: dict[str, Any], frames: dict[str, pd.DataFrame]) -> None:
        """Write the tables of one grid point atomically; the JSON marker (written last) means done."""
        tables = {}
        for name, frame in frames.items():
            path = self.path(config, name)
            tmp = path.with_suffix(".parquet.tmp")
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, path)
            tables[name] = path.name
        record = {"config": {**self.base, **config}, "tables": tables}
        tmp = self._marker(config).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, self._marker(config))

    def load(self, config: dict[str, Any]) -> dict[str, pd.DataFrame]:
        record = json.loads(self._marker(config).read_text())
        return {name: pd.read_parquet(self.root / fname) for name, fname in record["tables"].items()}


def run_grid(
    points: Iterable[dict[str, Any]],
    compute: Callable[[dict[str, Any]], dict[str, pd.DataFrame]],
    store: ShardStore,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Compute every grid point not yet in ``store``; return each table concatenated over all points.

    Args:
        points: configurations, in the order the result should follow.
        compute: configuration -> ``{table name: tidy frame}``.
        store: where shards live.
        progress: print one line per point with elapsed time and an ETA (to stderr).

    Returns:
        ``{table name: concatenation over points}`` (points already done are read from disk).
    """
    points = list(points)
    todo = [p for p in points if not store.done(p)]
    t0, finished = time.time(), 0
    if progress and len(todo) < len(points):
        print(f"resuming: {len(points) - len(todo)} of {len(points)} grid points already saved", file=sys.stderr)
    for p in todo:
        store.save(p, compute(p))
        finished += 1
        if progress:
            spent = time.time() - t0
            eta = spent / finished * (len(todo) - finished)
            print(f"[{finished}/{len(todo)}] {p} done, {spent:.0f} s elapsed, ETA {eta:.0f} s",
                  file=sys.stderr, flush=True)
    loaded = [store.load(p) for p in points]
    names = list(dict.fromkeys(n for d in loaded for n in d))
    return {n: pd.concat([d[n] for d in loaded if n in d], ignore_index=True) for n in names}


# --------------------------------------------------------------------------------------------------
# Head sweeps on the few-shot task
# --------------------------------------------------------------------------------------------------
#: Perturbation modes. ``absolute``: noise std = level. ``fraction_of_max``: std = level x the largest
#: |value| of that head's output slice over every position (shared prefix + all real query tokens) of
#: every evaluated prompt in the clean run (seed 000's "fraction of max", made precise).
#: ``fraction_of_std``: std = level x the standard deviation of the same values. ``zero`` / ``mean``:
#: ablation (level and seed ignored).
MODES = ("absolute", "fraction_of_max", "fraction_of_std", "zero", "mean")


def head_edits(clean: Any, mode: str, level: float, seed: int, layer: int, heads: Iterable[int]) -> list:
    """The :class:`~headlab.interventions.HeadEdit` of each head of ``layer`` under one setting."""
    from headlab.interventions import HeadEdit

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}.")
    heads = list(heads)
    n_layers, n_heads = clean.head_mean.shape[:2]
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range 0..{n_layers - 1}.")
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"head(s) {bad} in layer {layer} out of range 0..{n_heads - 1}.")
    if mode in ("zero", "mean"):
        return [HeadEdit(mode, layer, h) for h in heads]
    if level < 0:
        raise ValueError(f"noise level={level} must be >= 0.")
    ref = {"absolute": None, "fraction_of_max": clean.head_max_abs, "fraction_of_std": clean.head_std}[mode]
    return [HeadEdit("noise", layer, h, level * (1.0 if ref is None else float(ref[layer, h])), seed)
            for h in heads]


def head_sweep(
    lm: Any,
    task: Any,
    settings: Iterable[dict[str, Any]],
    out_dir: str | Path,
    layers: Iterable[int] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Perturb every head of every layer under each setting; resumable, one shard per (setting, layer).

    Args:
        lm: the model.
        task: a :class:`headlab.tasks.FewShotTask` (its calibrated threshold is used for accuracy).
        settings: dicts with ``mode`` (see :data:`MODES`), ``level`` and ``seed``.
        out_dir: shard folder.
        layers: layers to sweep (default: all).
        batch_size: (head, prompt) rows per forward pass.
        progress: print progress with ETA.

    Returns:
        ``(heads, prompts)``: one row per (setting, layer, head) with accuracy, macro-F1, mean logit
        difference toward the correct label, mean probability of the correct label and their drops
        from the clean run; and one row per (setting, layer, head, prompt) with the logit difference
        change, for bootstrap intervals over prompts.
    """
    from headlab import engine

    settings = [dict(s) for s in settings]
    if not settings:
        raise ValueError("settings is empty; give at least one dict with 'mode' (and 'level', 'seed').")
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    for s in settings:  # fail before any work or file, not at the first bad grid point
        if s.get("mode") not in MODES:
            raise ValueError(f"mode={s.get('mode')!r} in setting {s}; choose one of {MODES}.")
        if float(s.get("level", 0.0)) < 0:
            raise ValueError(f"noise level={s['level']} in setting {s} must be >= 0.")
    bad = [layer for layer in layers if not 0 <= layer < lm.n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range 0..{lm.n_layers - 1}.")
    enc = task.encode(lm)
    clean = engine.clean_run(lm, enc, task.label_ids(lm), batch_size=batch_size)
    y = task.labels
    thr = task.config.threshold
    base = _task_scores(y, clean.logprobs, thr)
    store = ShardStore(out_dir, {"model": lm.fingerprint or lm.spec, "task": task.config.__dict__,
                                 "n_prompts": len(y), "prompts": config_hash({"q": list(task.queries["text"])})})
    points = [{**s, "layer": layer} for s in settings for layer in layers]

    def compute(point: dict[str, Any]) -> pd.DataFrame:
        edits = head_edits(clean, point["mode"], float(point.get("level", 0.0)), int(point.get("seed", 0)),
                           point["layer"], range(lm.n_heads))
        lp = engine.sweep_heads(lm, clean, edits, batch_size=batch_size)
        rows = []
        for e, lp_e in zip(edits, lp):
            s = _task_scores(y, lp_e, thr)
            rows.append({"model": lm.spec, "layer": e.layer, "head": e.head, "mode": point["mode"],
                         "level": float(point.get("level", 0.0)), "seed": int(point.get("seed", 0)),
                         "scale": e.scale, "n": len(y), **s,
                         **{f"{k}_drop": base[k] - s[k] for k in base}})
        frame = pd.DataFrame(rows)
        ld = (lp[:, :, 1] - lp[:, :, 0]).numpy()
        sign = (2 * y - 1)[None]
        delta = (ld - (clean.logprobs[:, 1] - clean.logprobs[:, 0]).numpy()[None]) * sign
        long = pd.DataFrame({
            "layer": point["layer"], "head": [e.head for e in edits for _ in y],
            "prompt": [p for _ in edits for p in range(len(y))],
            "logit_diff_change": delta.reshape(-1),
        })
        for k in ("mode", "level", "seed"):
            long[k] = point.get(k, 0)
        return {"heads": frame, "prompts": long}

    tables = run_grid(points, compute, store, progress=progress)
    return tables["heads"], tables["prompts"]


def _task_scores(y: Any, logprobs: Any, threshold: float) -> dict[str, float]:
    """Accuracy / macro-F1 at the calibrated threshold, mean logit difference and p(correct)."""
    import numpy as np

    from headlab import metrics

    lp = np.asarray(logprobs, dtype=float)
    diff = lp[:, 1] - lp[:, 0]
    pred = (diff > threshold).astype(int)
    return {
        "accuracy": metrics.accuracy(y, pred),
        "macro_f1": metrics.macro_f1(y, pred, 2),
        "logit_diff": float(np.mean(np.where(y == 1, diff, -diff))),
        "p_correct": float(np.mean(np.exp(np.where(y == 1, lp[:, 1], lp[:, 0])))),
    }


# --------------------------------------------------------------------------------------------------
# Summaries of a head sweep
# --------------------------------------------------------------------------------------------------
def rank_heads(heads: pd.DataFrame, prompts: pd.DataFrame, mode: str, level: float = 0.0,
               n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Rank heads by their effect under one setting, averaged over noise seeds, with bootstrap CIs.

    The effect is the drop in the mean logit difference toward the correct label (positive: the
    perturbation hurts, so the head helps the task). Per prompt the drop is first averaged over the
    seeds, then a paired bootstrap over prompts gives each head's 95% interval.

    Args:
        heads, prompts: the two tables of :func:`head_sweep`.
        mode, level: the setting to rank (``level`` is ignored for the ablation modes).

    Returns:
        One row per (layer, head), best first: ``effect``, ``effect_low``, ``effect_high``, the mean
        over seeds of ``accuracy_drop`` / ``macro_f1_drop`` / ``p_correct_drop``, ``category`` (seed 001's
        HIGH / MEDIUM / LOW on the accuracy change in percentage points), ``n_seeds`` and ``rank``.
    """
    import numpy as np

    from headlab import metrics

    sel_p = _setting(prompts, mode, level)
    sel_h = _setting(heads, mode, level)
    per_prompt = sel_p.groupby(["layer", "head", "prompt"])["logit_diff_change"].mean().unstack("prompt")
    mean, low, high = metrics.bootstrap_rows(-per_prompt.to_numpy(), n_boot=n_boot, seed=seed)
    out = pd.DataFrame({"effect": mean, "effect_low": low, "effect_high": high}, index=per_prompt.index)
    drops = sel_h.groupby(["layer", "head"]).agg(
        accuracy_drop=("accuracy_drop", "mean"), macro_f1_drop=("macro_f1_drop", "mean"),
        p_correct_drop=("p_correct_drop", "mean"), n_seeds=("seed", "nunique"))
    out = out.join(drops).reset_index()
    out["category"] = metrics.impact_category(100 * out["accuracy_drop"])
    out = out.sort_values("effect", ascending=False, kind="stable").reset_index(drop=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out


def seed_agreement(heads: pd.DataFrame, mode: str, level: float,
                   measure: str = "logit_diff_drop") -> pd.DataFrame:
    """Rank agreement (Spearman, Kendall, top-10 overlap) of the head ranking between noise seeds."""
    from headlab import metrics

    wide = _setting(heads, mode, level).pivot_table(index=["layer", "head"], columns="seed", values=measure)
    return metrics.rank_agreement(wide)


def _setting(frame: pd.DataFrame, mode: str, level: float) -> pd.DataFrame:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}.")
    sel = frame[frame["mode"] == mode]
    if mode not in ("zero", "mean"):
        sel = sel[np.isclose(sel["level"].astype(float), level)]
    if sel.empty:
        have = sorted(set(zip(frame["mode"], frame["level"])))
        raise ValueError(f"No rows for mode={mode!r}, level={level}; the table has (mode, level) in {have}.")
    return sel


# --------------------------------------------------------------------------------------------------
# Induction heads: ablating the top-k induction heads vs k random heads on repeated random tokens
# --------------------------------------------------------------------------------------------------
#: Layer ranges heads are chosen from. ``bottom_half``: layers ``0 .. n//2 - 1`` (nearer the input);
#: ``top_half``: layers ``n//2 .. n - 1`` (nearer the output; it gets the extra layer of an odd count).
#: Seed 002 used ``top`` for the layers nearer the *input*; here the names follow the usual picture of
#: a stack with the output on top.
LAYER_RANGES = ("full", "top_half", "bottom_half")
#: ``induction``: the k heads with the highest induction score in the range; ``random``: k heads drawn
#: uniformly from the range (induction heads included), a new draw per permutation.
HEAD_TYPES = ("induction", "random")
ABLATION_MODES = ("zero", "mean")


def layer_range(n_layers: int, name: str) -> range:
    """The layers of one of :data:`LAYER_RANGES` in a model with ``n_layers`` layers."""
    half = n_layers // 2
    ranges = {"full": range(n_layers), "bottom_half": range(half), "top_half": range(half, n_layers)}
    if name not in ranges:
        raise ValueError(f"layer range {name!r}; choose one of {LAYER_RANGES}.")
    return ranges[name]


def ablation_heads(scores: pd.DataFrame, layer_range_name: str, head_type: str, k: int,
                   permutation: int = 0, seed: int = 0) -> dict[int, list[int]]:
    """The heads ablated at one point of :func:`induction_ablation_sweep`.

    Args:
        scores: one row per head of the model with ``layer``, ``head`` and ``induction_score``
            (:func:`headlab.attention.scores_frame`, or its CSV export read back).
        layer_range_name: one of :data:`LAYER_RANGES`.
        head_type: ``"induction"``: the ``k`` highest-scoring heads of the range (ties: lower layer,
            then lower head); ``"random"``: ``k`` heads of the range drawn without replacement by a
            generator keyed by ``(seed, permutation, k)`` only.
        k: number of heads (0: none).

    Returns:
        ``{layer: sorted heads}`` for :func:`headlab.interventions.ablate_heads` (empty for ``k = 0``).
    """
    import torch

    from headlab.interventions import _seed_for

    if head_type not in HEAD_TYPES:
        raise ValueError(f"head_type={head_type!r}; choose one of {HEAD_TYPES}.")
    n_layers = int(scores["layer"].max()) + 1
    pool = scores[scores["layer"].isin(list(layer_range(n_layers, layer_range_name)))]
    if not 0 <= k <= len(pool):
        raise ValueError(f"k={k} heads requested but layer range {layer_range_name!r} has {len(pool)} heads.")
    if head_type == "induction":
        chosen = pool.sort_values(["induction_score", "layer", "head"], ascending=[False, True, True],
                                  kind="stable").head(k)
    else:
        pool = pool.sort_values(["layer", "head"])
        gen = torch.Generator().manual_seed(_seed_for(seed, "random-heads", permutation, k))
        chosen = pool.iloc[torch.randperm(len(pool), generator=gen)[:k].numpy()]
    out: dict[int, list[int]] = {}
    for layer, head in sorted(zip(chosen["layer"].astype(int), chosen["head"].astype(int))):
        out.setdefault(layer, []).append(head)
    return out


def _heads_label(heads: dict[int, list[int]]) -> str:
    return " ".join(f"L{layer}H{h}" for layer, hs in sorted(heads.items()) for h in hs)


def _check_ablation_grid(n_heads_in: dict[str, int], modes: list, layer_ranges: list, head_types: list,
                         k_list: list, n_permutations: int, max_heads: int, means: Any) -> None:
    """Fail before any work on a bad grid, naming the bad value and the allowed ones."""
    for name, values, allowed in (("mode", modes, ABLATION_MODES), ("head type", head_types, HEAD_TYPES),
                                  ("layer range", layer_ranges, LAYER_RANGES)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"{name}(s) {bad or values} invalid; choose from {allowed}.")
    bad_k = [k for k in k_list if int(k) != k or k < 0 or k > max_heads]
    if bad_k or not k_list:
        raise ValueError(f"k_list entries {bad_k or k_list} invalid; each k must be an integer 0 <= k <= "
                         f"max_heads={max_heads}.")
    for rng in layer_ranges:
        if max(k_list) > n_heads_in[rng]:
            raise ValueError(f"k={max(k_list)} exceeds the {n_heads_in[rng]} heads of layer range {rng!r}.")
    if n_permutations < 1:
        raise ValueError(f"n_permutations={n_permutations} must be >= 1.")
    if "mean" in modes and means is None:
        raise ValueError("mode 'mean' needs `means` (see headlab.attention.head_output_means).")


def induction_ablation_sweep(
    lm: Any,
    batch: Any,
    scores: pd.DataFrame,
    out_dir: str | Path,
    *,
    modes: Iterable[str] = ("zero",),
    layer_ranges: Iterable[str] = ("full",),
    head_types: Iterable[str] = HEAD_TYPES,
    k_list: Iterable[int] = (0, 1, 5, 10),
    n_permutations: int = 20,
    max_heads: int = 50,
    seed: int = 0,
    means: dict | None = None,
    batch_size: int = 8,
    perm_chunk: int = 10,
    progress: bool = True,
) -> pd.DataFrame:
    """Ablate the top-k induction heads or k random heads and score repeated random tokens.

    Each grid point (mode, layer range, head type, k, chunk of ``perm_chunk`` permutations) is one
    resumable shard. Per permutation the chosen heads (:func:`ablation_heads`) are ablated in one
    batched pass over all rows of ``batch`` (:func:`headlab.attention.token_losses`); the induction
    head set does not depend on the permutation, so it runs as permutation 0 only, and so does k = 0
    (the clean model, computed once and shared by every k = 0 point).

    Args:
        lm: the model.
        batch: :class:`headlab.attention.RepeatedTokens` to score (rows may have different lags).
        scores: per-head ``layer, head, induction_score`` (ranks the induction heads).
        out_dir: shard folder.
        modes: ``"zero"`` and/or ``"mean"`` (see :func:`headlab.interventions.ablate_heads`).
        layer_ranges: entries of :data:`LAYER_RANGES`.
        head_types: entries of :data:`HEAD_TYPES`.
        k_list: numbers of heads to ablate (0 = no ablation), each ``<= max_heads``.
        n_permutations: random head sets per k (seed 002 used 300).
        max_heads: the largest k allowed (seed 002's ``--max_heads_abl``).
        seed: keys the random head sets together with the permutation index and k.
        means: ``{layer: (n_heads, head_dim)}`` reference means for ``"mean"``
            (:func:`headlab.attention.head_output_means`).
        batch_size: rows per forward pass (results do not depend on it).
        perm_chunk: permutations per shard.

    Returns:
        One row per (mode, layer_range, head_type, k, permutation, sequence) with the sequence's
        ``lag``, ``p_correct``, ``loss_early``, ``loss_late``, ``icl`` (see
        :func:`headlab.attention.repeat_metrics`) and the ablated ``heads`` (``"L3H1 L5H2"``).
    """
    from headlab import attention

    modes, layer_ranges, head_types = list(modes), list(layer_ranges), list(head_types)
    k_list = sorted({int(k) for k in k_list})
    n_in = {r: int(scores["layer"].isin(list(layer_range(lm.n_layers, r))).sum()) for r in LAYER_RANGES}
    _check_ablation_grid(n_in, modes, layer_ranges, head_types, k_list, n_permutations, max_heads, means)
    if perm_chunk < 1:
        raise ValueError(f"perm_chunk={perm_chunk} must be >= 1.")
    if len(scores) != lm.n_layers * lm.n_heads:
        raise ValueError(f"scores has {len(scores)} rows; expected one per head "
                         f"({lm.n_layers} layers x {lm.n_heads} heads).")
    ranking = scores.sort_values(["layer", "head"])["induction_score"].round(6).tolist()
    base = {"model": lm.fingerprint or lm.spec, "seed": seed,
            "tokens": config_hash({"t": batch.tokens.tolist(), "lags": batch.lags.tolist()}),
            "scores": config_hash({"s": ranking})}
    if means is not None and "mean" in modes:
        base["means"] = config_hash({"m": [means[layer].double().round(decimals=6).tolist()
                                           for layer in sorted(means)]})
    store = ShardStore(out_dir, base)
    points = []
    for mode in modes:
        for rng in layer_ranges:
            for ht in head_types:
                for k in k_list:
                    n_perm = 1 if ht == "induction" or k == 0 else n_permutations
                    for a in range(0, n_perm, perm_chunk):
                        points.append({"mode": mode, "layer_range": rng, "head_type": ht, "k": k,
                                       "perm_start": a, "perm_stop": min(n_perm, a + perm_chunk)})
    memo: dict[tuple, Any] = {}

    def losses(mode: str, heads: dict[int, list[int]]) -> Any:
        key = (mode if heads else "clean", _heads_label(heads))
        if key not in memo:
            memo[key] = attention.token_losses(lm, batch.tokens, heads, mode, means, batch_size)
        return memo[key]

    def compute(point: dict[str, Any]) -> dict[str, pd.DataFrame]:
        frames = []
        for perm in range(point["perm_start"], point["perm_stop"]):
            heads = ablation_heads(scores, point["layer_range"], point["head_type"], point["k"], perm, seed)
            m = attention.repeat_metrics(batch, losses(point["mode"], heads))
            frames.append(pd.DataFrame({
                "model": lm.spec, "mode": point["mode"], "layer_range": point["layer_range"],
                "head_type": point["head_type"], "k": point["k"], "permutation": perm,
                "sequence": np.arange(len(batch)), "lag": batch.lags.numpy(),
                **{name: v.numpy() for name, v in m.items()}, "heads": _heads_label(heads)}))
        return {"rows": pd.concat(frames, ignore_index=True)}

    return run_grid(points, compute, store, progress=progress)["rows"]


def ablation_summary(rows: pd.DataFrame, value: str,
                     by: Iterable[str] = ("mode", "layer_range", "head_type", "k"),
                     n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean of ``value`` per group of :func:`induction_ablation_sweep` rows with a 95% interval.

    Within a group the values form a (permutation x sequence) matrix; the interval resamples random
    head sets and sequences independently (:func:`headlab.metrics.bootstrap_two_way`), so for random
    heads it covers both the choice of heads and the choice of sequences, for the single induction
    set the sequences only.

    Returns:
        One row per group: the ``by`` columns, ``value``, ``low``, ``high``, ``n_permutations``,
        ``n_sequences``.
    """
    from headlab import metrics

    by = list(by)
    missing = [c for c in [*by, value, "permutation", "sequence"] if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack column(s) {missing}; they have {list(rows.columns)}.")
    out = []
    for key, g in rows.groupby(by, sort=True):
        mat = g.pivot_table(index="permutation", columns="sequence", values=value, aggfunc="mean")
        ci = metrics.bootstrap_two_way(mat.to_numpy(), n_boot=n_boot, seed=seed)
        out.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "value": ci.value,
                    "low": ci.low, "high": ci.high, "n_permutations": mat.shape[0],
                    "n_sequences": mat.shape[1]})
    return pd.DataFrame(out)


def induction_vs_random(rows: pd.DataFrame, value: str) -> pd.DataFrame:
    """Top-k induction heads against the distribution of k random heads, per (mode, layer range, k > 0).

    Returns:
        Columns ``mode, layer_range, k``, ``induction`` (mean over sequences), ``random`` (mean over
        permutations of the per-permutation mean), ``random_p2.5`` / ``random_p97.5`` (spread of the
        per-permutation means), ``difference`` (induction - random) and ``frac_random_below``: the
        share of random head sets whose mean ``value`` is below the induction set's.
    """
    per_perm = (rows[rows["k"] > 0].groupby(["mode", "layer_range", "head_type", "k", "permutation"])[value]
                .mean().reset_index())
    out = []
    for (mode, rng, k), g in per_perm.groupby(["mode", "layer_range", "k"], sort=True):
        ind = g.loc[g["head_type"] == "induction", value]
        rnd = g.loc[g["head_type"] == "random", value].to_numpy()
        if ind.empty or len(rnd) == 0:
            continue
        iv = float(ind.iloc[0])
        out.append({"mode": mode, "layer_range": rng, "k": k, "induction": iv, "random": float(rnd.mean()),
                    "random_p2.5": float(np.quantile(rnd, 0.025)),
                    "random_p97.5": float(np.quantile(rnd, 0.975)),
                    "difference": iv - float(rnd.mean()), "frac_random_below": float((rnd < iv).mean()),
                    "n_permutations": len(rnd)})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------------
# Top-k heads of any per-head score vs k random heads, scored on label tokens of prompts
# --------------------------------------------------------------------------------------------------
def top_heads(scores: pd.DataFrame, column: str, k: int) -> dict[int, list[int]]:
    """The ``k`` heads with the largest ``column`` (ties: lower layer, then lower head) as
    ``{layer: sorted heads}`` for :func:`headlab.interventions.ablate_heads`."""
    if column not in scores.columns:
        raise ValueError(f"column {column!r} not in the scores; they have {list(scores.columns)}.")
    if not 0 <= k <= len(scores):
        raise ValueError(f"k={k} must be between 0 and the {len(scores)} heads of the table.")
    chosen = scores.sort_values([column, "layer", "head"], ascending=[False, True, True], kind="stable").head(k)
    out: dict[int, list[int]] = {}
    for layer, head in sorted(zip(chosen["layer"].astype(int), chosen["head"].astype(int))):
        out.setdefault(layer, []).append(head)
    return out


def ranked_ablation_sweep(
    lm: Any,
    enc: Any,
    label_ids: list[int],
    scores: pd.DataFrame,
    column: str,
    measures: dict[str, Callable[[Any], Any]],
    out_dir: str | Path,
    *,
    modes: Iterable[str] = ("zero",),
    k_list: Iterable[int] = (0, 5, 10),
    n_permutations: int = 10,
    seed: int = 0,
    means: dict | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Ablate the top-k heads of a per-head score, or k random heads, and score prompts on label tokens.

    Per (mode, head type, k, permutation) the chosen heads are ablated together
    (:func:`headlab.interventions.ablate_heads`) while :func:`headlab.engine.label_logprobs` scores
    every prompt; each measure turns the ``(n_prompts, n_labels)`` log-probabilities into one value
    per prompt. ``"top"`` heads are :func:`top_heads` of ``column`` (one set, permutation 0);
    ``"random"`` heads are drawn uniformly from all heads by :func:`ablation_heads` (a new set per
    permutation, keyed by ``(seed, permutation, k)``). ``k = 0`` is the clean model. Each setting is a
    resumable shard.

    Args:
        lm: the model.
        enc: prompts (:func:`headlab.engine.encode_prompts`).
        label_ids: label token ids scored at the last position of every prompt.
        scores: one row per head with ``layer``, ``head`` and ``column``.
        column: the score ranking the heads (largest first).
        measures: name -> function of the ``(n_prompts, n_labels)`` log-probability tensor returning
            ``(n_prompts,)`` values (e.g. a log-probability difference between two labels).
        out_dir: shard folder.
        modes: ``"zero"`` and/or ``"mean"`` (``means`` needed, see
            :func:`headlab.attention.head_output_means`).
        k_list: numbers of heads to ablate.
        n_permutations: random head sets per k.

    Returns:
        One row per (mode, head_type, k, permutation, sequence = prompt) with each measure, its change
        from the clean model (``<measure>_change``) and the ablated ``heads``.
    """
    from headlab import engine
    from headlab.interventions import ablate_heads

    modes, k_list = list(modes), sorted({int(k) for k in k_list})
    n_heads_total = lm.n_layers * lm.n_heads
    if len(scores) != n_heads_total:
        raise ValueError(f"scores has {len(scores)} rows; expected one per head ({n_heads_total}).")
    bad = [m for m in modes if m not in ABLATION_MODES]
    if bad or not modes:
        raise ValueError(f"mode(s) {bad or modes} invalid; choose from {ABLATION_MODES}.")
    bad_k = [k for k in k_list if not 0 <= k <= n_heads_total]
    if bad_k or not k_list:
        raise ValueError(f"k_list entries {bad_k or k_list} invalid; each must be in 0..{n_heads_total}.")
    if n_permutations < 1:
        raise ValueError(f"n_permutations={n_permutations} must be >= 1.")
    if "mean" in modes and means is None:
        raise ValueError("mode 'mean' needs `means` (see headlab.attention.head_output_means).")
    if not measures:
        raise ValueError("measures is empty; give at least one name -> function of the log-probabilities.")
    ranking = scores.sort_values(["layer", "head"])[column].round(8).tolist()
    base = {"model": lm.fingerprint or lm.spec, "seed": seed, "labels": list(label_ids),
            "prompts": config_hash({"q": [q.tolist() for q in enc.queries], "p": enc.prefix.tolist()}),
            "scores": config_hash({"s": ranking}), "measures": sorted(measures)}
    if means is not None and "mean" in modes:
        base["means"] = config_hash({"m": [means[layer].double().round(decimals=6).tolist() for layer in sorted(means)]})
    store = ShardStore(out_dir, base)
    clean_lp = engine.label_logprobs(lm, enc, label_ids, batch_size=batch_size)
    clean = {name: np.asarray(fn(clean_lp), dtype=float) for name, fn in measures.items()}
    points = [{"mode": mode, "head_type": ht, "k": k, "permutation": perm}
              for mode in modes for ht in ("top", "random") for k in k_list
              for perm in range(1 if ht == "top" or k == 0 else n_permutations)]

    def compute(point: dict[str, Any]) -> dict[str, pd.DataFrame]:
        if point["head_type"] == "top":
            heads = top_heads(scores, column, point["k"])
        else:
            heads = ablation_heads(scores, "full", "random", point["k"],
                                   point["permutation"], seed)
        if heads:
            with ablate_heads(lm, heads, point["mode"], means):
                lp = engine.label_logprobs(lm, enc, label_ids, batch_size=batch_size)
        else:
            lp = clean_lp
        frame = pd.DataFrame({**point, "model": lm.spec, "sequence": np.arange(len(enc)),
                              "heads": _heads_label(heads)})
        for name, fn in measures.items():
            v = np.asarray(fn(lp), dtype=float)
            frame[name] = v
            frame[f"{name}_change"] = v - clean[name]
        return {"rows": frame}

    return run_grid(points, compute, store, progress=progress)["rows"]


# FFN neuron ablation: top-k neurons of a layer against k random neurons of the same layer
# --------------------------------------------------------------------------------------------------
NEURON_SET_KINDS = ("top", "random")


def neuron_ablation_sets(stats: Any, layer: int, k: int, kind: str, permutation: int = 0, seed: int = 0,
                         by: str = "mean_abs") -> list[int]:
    """The neurons ablated for one grid point: layer ``layer``'s ``k`` neurons with the largest ``by``
    (``kind="top"``), or ``k`` neurons drawn uniformly from the layer's *other* neurons
    (``kind="random"``; the draw depends on ``seed, layer, k, permutation``)."""
    from headlab import neurons

    if kind not in NEURON_SET_KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {NEURON_SET_KINDS}.")
    top = neurons.top_neurons(stats, by, k)
    top = sorted(int(n) for n in top.loc[top["layer"] == layer, "neuron"])
    if kind == "top":
        return top
    return neurons.random_neurons(stats.d_mlp, k, seed, layer, permutation, exclude=top)


def neuron_ablation_sweep(
    lm: Any,
    ids: Any,
    stats: Any,
    out_dir: str | Path,
    *,
    layers: Iterable[int],
    k_list: Iterable[int] = (16, 64),
    modes: Iterable[str] = ("zero", "mean"),
    n_permutations: int = 3,
    by: str = "mean_abs",
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Next-token loss on held-out rows with a layer's top-k neurons or k random neurons ablated.

    Each (mode, layer, k, kind, permutation) is one resumable shard; the top set does not depend on
    the permutation and runs once. Mean ablation uses ``stats.means()``: the statistics must come
    from a corpus *disjoint* from ``ids``.

    Args:
        lm: the model.
        ids: ``(n, s)`` held-out token rows.
        stats: :class:`headlab.neurons.NeuronStats` over the reference corpus (ranks neurons, gives means).
        out_dir: shard folder.
        layers: layers whose neurons are ablated (one layer at a time).
        k_list: numbers of neurons ablated at once (each >= 1).
        modes: ``"zero"`` and/or ``"mean"``.
        n_permutations: random sets per (layer, k).
        by: ranking of the top set (a :meth:`~headlab.neurons.NeuronStats.frame` column).
        seed: keys the random sets.
        batch_size: rows per forward pass (results do not depend on it).

    Returns:
        One row per (mode, layer, k, kind, permutation, sequence): mean next-token ``loss`` of the row,
        its ``clean_loss`` and ``delta`` = loss - clean_loss (nats), and the ablated ``neurons``.
    """
    from headlab.interventions import ablate_neurons

    layers, k_list, modes = [int(x) for x in layers], sorted({int(k) for k in k_list}), list(modes)
    bad_modes = [m for m in modes if m not in ABLATION_MODES]
    if bad_modes:
        raise ValueError(f"modes {bad_modes} not allowed; choose from {ABLATION_MODES}.")
    bad_k = [k for k in k_list if not 1 <= k <= stats.d_mlp // 2]
    if bad_k:
        raise ValueError(f"k_list entries {bad_k} out of range 1..{stats.d_mlp // 2} (half the layer, so that "
                         "random sets can avoid the top set).")
    for layer in layers:
        stats.slot(layer)  # raises for layers without statistics
    if n_permutations < 1:
        raise ValueError(f"n_permutations={n_permutations} must be >= 1.")
    means = stats.means()
    base = {"model": lm.fingerprint or lm.spec, "seed": seed, "by": by,
            "tokens": config_hash({"t": ids.tolist()}),
            "stats": config_hash({"n": stats.count, "m": stats.mean.double().round(decimals=5).tolist()})}
    store = ShardStore(out_dir, base)
    points = [{"mode": m, "layer": layer, "k": k, "kind": kind, "permutation": p}
              for m in modes for layer in layers for k in k_list for kind in NEURON_SET_KINDS
              for p in range(1 if kind == "top" else n_permutations)]
    clean: dict[str, Any] = {}

    def compute(point: dict[str, Any]) -> dict[str, pd.DataFrame]:
        if "loss" not in clean:  # the clean pass also keeps the input of every ablated layer
            nll, clean["hidden"] = _losses_keeping_inputs(lm, ids, layers, batch_size)
            clean["loss"] = nll.double().mean(1).numpy()
        chosen = neuron_ablation_sets(stats, point["layer"], point["k"], point["kind"], point["permutation"],
                                      seed, by)
        with ablate_neurons(lm, {point["layer"]: chosen}, point["mode"], means):
            loss = _losses_from(lm, ids, point["layer"], clean["hidden"], batch_size).double().mean(1).numpy()
        return {"rows": pd.DataFrame({
            "model": lm.spec, **point, "sequence": np.arange(len(ids)), "loss": loss,
            "clean_loss": clean["loss"], "delta": loss - clean["loss"], "neurons": " ".join(map(str, chosen))})}

    return run_grid(points, compute, store, progress=progress)["rows"]


def _losses_keeping_inputs(lm: Any, ids: Any, layers: list[int], batch_size: int) -> tuple[Any, dict[int, Any]]:
    """Clean next-token losses of ``ids`` and the residual stream entering each of ``layers``."""
    import torch

    from headlab import attention
    from headlab.interventions import capture_residual

    before = sorted({layer - 1 for layer in layers if layer > 0})
    nll, kept = [], {layer: [] for layer in before}
    for start in range(0, len(ids), batch_size):
        with capture_residual(lm, before) as res:
            nll.append(attention.token_losses(lm, ids[start:start + batch_size], batch_size=batch_size))
        for layer in before:
            kept[layer].append(res[layer])
    return torch.cat(nll), {layer + 1: torch.cat(h) for layer, h in kept.items()}


def _losses_from(lm: Any, ids: Any, layer: int, hidden: dict[int, Any], batch_size: int) -> Any:
    """Next-token losses with blocks before ``layer`` replaced by their cached clean output ``hidden[layer]``
    (an edit in ``layer`` cannot change them); equal to a full forward up to float rounding."""
    import torch

    from headlab import attention
    from headlab.engine import _skip_layers_before

    if layer == 0:
        return attention.token_losses(lm, ids, batch_size=batch_size)
    out = []
    for start in range(0, len(ids), batch_size):
        with _skip_layers_before(lm, layer, hidden[layer][start:start + batch_size]):
            out.append(attention.token_losses(lm, ids[start:start + batch_size], batch_size=batch_size))
    return torch.cat(out)


# Weight sensitivity: perplexity of a token stream under weight edits
# --------------------------------------------------------------------------------------------------
#: Kinds of weight setting understood by :func:`weight_setting` (the ``kind`` key of a grid point).
#: ``dense``: no edit. ``ablate``: one matrix (``layer``, ``matrix``) zeroed or set to its mean
#: (``mode``). ``magnitude`` / ``wanda``: every layer matrix pruned to ``sparsity``. ``heads``: a
#: ``fraction`` of all heads removed, least important first (``order="ranking"``) or in a random order
#: (``order="random"``, ``seed``). ``noise``: Gaussian noise of ``level`` x each matrix's std on every
#: layer matrix (``seed``). ``bitflip``: bit ``bit`` of format ``fmt`` flipped in one random weight
#: (``trial``, ``seed``). ``zero_entries``: single weights zeroed (``entries``, see :func:`entries_text`).
WEIGHT_KINDS = ("dense", "ablate", "magnitude", "wanda", "heads", "noise", "bitflip", "zero_entries")


def entries_text(entries: Iterable[tuple[str, int, int]]) -> str:
    """``[("L2.mlp.down", 5, 7), ...]`` -> ``"L2.mlp.down:5:7 ..."`` (a readable, hashable grid value)."""
    return " ".join(f"{name}:{r}:{c}" for name, r, c in entries)


def parse_entries(text: str) -> dict[str, list[tuple[int, int]]]:
    """Inverse of :func:`entries_text`, grouped by matrix: ``{name: [(row, col), ...]}``."""
    out: dict[str, list[tuple[int, int]]] = {}
    for item in text.split():
        try:
            name, r, c = item.rsplit(":", 2)
            out.setdefault(name, []).append((int(r), int(c)))
        except ValueError:
            raise ValueError(f"bad weight entry {item!r} in {text!r}; expected 'NAME:ROW:COL'.") from None
    return out


def head_prune_order(n_layers: int, n_heads: int, order: str, ranking: pd.DataFrame | None = None,
                     seed: int = 0) -> list[tuple[int, int]]:
    """All heads in the order they are removed: least important first, or a seeded random order.

    Args:
        order: ``"ranking"`` (reverse of ``ranking``) or ``"random"``.
        ranking: one row per head with ``layer`` and ``head``, most important first (e.g. the noise
            chapter's ``ranking`` table, or :func:`headlab.attention.head_write_norms` sorted).
    """
    import torch

    from headlab.interventions import _seed_for

    if order == "random":
        gen = torch.Generator().manual_seed(_seed_for(seed, "head-prune-order"))
        heads = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
        return [heads[i] for i in torch.randperm(len(heads), generator=gen).tolist()]
    if order != "ranking":
        raise ValueError(f"order={order!r}; choose 'ranking' or 'random'.")
    if ranking is None:
        raise ValueError("order='ranking' needs a ranking frame (layer, head; most important first).")
    pairs = list(zip(ranking["layer"].astype(int), ranking["head"].astype(int)))
    if sorted(pairs) != [(layer, h) for layer in range(n_layers) for h in range(n_heads)]:
        raise ValueError(f"the ranking must list each of the {n_layers} x {n_heads} heads exactly once; "
                         f"it has {len(pairs)} rows.")
    return pairs[::-1]


def _heads_dict(pairs: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, h in sorted(pairs):
        out.setdefault(layer, []).append(h)
    return out


def weight_setting(lm: Any, point: dict[str, Any], *, wanda_norms: dict | None = None,
                   head_ranking: pd.DataFrame | None = None) -> tuple[Any, int, dict[str, Any]]:
    """The weight edit of one grid point (see :data:`WEIGHT_KINDS`).

    Returns:
        ``(context manager, first layer it changes, info)``; ``info`` describes what was edited
        (e.g. the weight a bit flip hit, its value before and after).
    """
    from contextlib import nullcontext

    import torch

    from headlab import interventions as iv
    from headlab.models import parse_weight_name, weight_names

    kind = point.get("kind")
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"kind={kind!r} in {point}; choose one of {WEIGHT_KINDS}.")
    names = weight_names(lm)
    if kind == "dense":
        return nullcontext(), 0, {}
    if kind == "ablate":
        name = f"L{point['layer']}.{point['matrix']}"
        fns = {"zero": iv.zero_weights, "mean": iv.mean_weights}
        if point.get("mode") not in fns:
            raise ValueError(f"ablation mode={point.get('mode')!r} in {point}; choose 'zero' or 'mean'.")
        return fns[point["mode"]](lm, [name]), int(point["layer"]), {"weight": name}
    if kind == "magnitude":
        return iv.prune_magnitude(lm, names, float(point["sparsity"])), 0, {}
    if kind == "wanda":
        if wanda_norms is None:
            raise ValueError("kind='wanda' needs wanda_norms (headlab.interventions.wanda_input_norms).")
        return iv.prune_wanda(lm, wanda_norms, float(point["sparsity"])), 0, {}
    if kind == "heads":
        order = head_prune_order(lm.n_layers, lm.n_heads, point["order"], head_ranking,
                                 int(point.get("seed", 0)))
        k = round(float(point["fraction"]) * len(order))
        heads = _heads_dict(order[:k])
        return iv.prune_heads(lm, heads), min(heads, default=0), {"n_heads": k}
    if kind == "noise":
        return iv.noise_weights(lm, names, float(point["level"]), int(point["seed"])), 0, {}
    if kind == "bitflip":
        # The same random weight for every bit and format of one trial (a paired comparison).
        name, r, c = iv.random_weight_entries(lm, 1, int(point["seed"]), key=int(point["trial"]))[0]
        before = iv._out_in(lm, name)[r, c].detach().float().reshape(1)
        after = iv.flip_bit(before, point["bit"], point["fmt"])
        ctx = iv.flip_weight_bits(lm, {name: [(r, c)]}, point["bit"], point["fmt"])
        info = {"weight": name, "row": r, "col": c, "value": float(before), "flipped": float(after),
                "bf16_rounded": float(before.to(torch.bfloat16).float())}
        return ctx, int(parse_weight_name(lm, name)[0]), info
    entries = parse_entries(point["entries"])
    return iv.zero_weight_entries(lm, entries), min(parse_weight_name(lm, n)[0] for n in entries), {}


def weight_sweep(lm: Any, windows: Any, points: Iterable[dict[str, Any]], out_dir: str | Path,
                 base: dict[str, Any] | None = None, *, wanda_norms: dict | None = None,
                 head_ranking: pd.DataFrame | None = None,
                 progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-token NLL of ``windows`` under the weight edit of each grid point; one resumable shard per point.

    Each edit is applied inside its context manager (weights restored bit-exactly after every point)
    and only the blocks from the first edited layer on are recomputed
    (:func:`headlab.engine.windows_nll`).

    Args:
        lm: the model.
        windows: :class:`headlab.engine.TextWindows` of the evaluation stream.
        points: grid points, each with ``kind`` (:data:`WEIGHT_KINDS`) and its keys.
        out_dir: shard folder.
        base: extra configuration every shard depends on (e.g. hashes of the calibration data or the
            head ranking); the model fingerprint and the token windows are always part of it.
        wanda_norms, head_ranking: inputs of the ``wanda`` and ``heads`` kinds.

    Returns:
        ``(tokens, info)``: one row per (point, scored token) with the point's keys, ``position`` (index
        among scored tokens), ``window`` and ``nll``; one row per point with what was edited.
    """
    from headlab import engine

    points = [dict(p) for p in points]
    for p in points:  # fail before any work on a bad grid
        if p.get("kind") not in WEIGHT_KINDS:
            raise ValueError(f"kind={p.get('kind')!r} in {p}; choose one of {WEIGHT_KINDS}.")
    store = ShardStore(out_dir, {"model": lm.fingerprint or lm.spec, **(base or {}),
                                 "windows": config_hash({"ids": windows.ids.tolist(),
                                                         "first": windows.first.tolist()})})

    def compute(point: dict[str, Any]) -> dict[str, pd.DataFrame]:
        ctx, first_layer, info = weight_setting(lm, point, wanda_norms=wanda_norms, head_ranking=head_ranking)
        with ctx:
            nll, win = engine.windows_nll(lm, windows, from_layer=first_layer)
        keys = {k: v for k, v in point.items()}
        tokens = pd.DataFrame({**keys, "position": np.arange(len(nll)), "window": win.numpy(),
                               "nll": nll.numpy()})
        return {"tokens": tokens, "info": pd.DataFrame([{**keys, **info}])}

    out = run_grid(points, compute, store, progress=progress)
    return out["tokens"], out["info"]


def nll_summary(tokens: pd.DataFrame, by: Iterable[str], reference: np.ndarray, block_tokens: int = 128,
                n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Perplexity per group of :func:`weight_sweep` tokens, with its change from a reference run.

    Intervals are a block bootstrap: the scored tokens are cut into consecutive blocks of
    ``block_tokens`` and whole blocks are resampled (neighbouring tokens are not independent). The
    change is paired: the same resampled blocks for the edited and the reference run.

    Args:
        tokens: rows with ``position`` and ``nll`` (and the ``by`` columns).
        by: columns identifying one setting.
        reference: NLL of the reference (dense) run per position.
        block_tokens: tokens per bootstrap block.
        n_boot: bootstrap resamples (0: no intervals, NaN bounds).

    Returns:
        One row per group: the ``by`` columns, ``perplexity`` with ``ppl_low``/``ppl_high``,
        ``nll_change`` (nats per token) with ``change_low``/``change_high``, ``ppl_ratio``
        (perplexity / reference perplexity), ``n_tokens`` and ``finite`` (all NLLs finite).
    """
    from headlab import metrics

    by = list(by)
    if block_tokens < 1:
        raise ValueError(f"block_tokens={block_tokens} must be >= 1.")
    ref = np.asarray(reference, dtype=np.float64)
    rows = []
    for key, g in tokens.groupby(by, sort=False, dropna=False):
        pos = g["position"].to_numpy()
        nll = g["nll"].to_numpy(np.float64)
        r = ref[pos]
        blocks = pos // block_tokens
        finite = bool(np.isfinite(nll).all())
        ppl = float(np.exp(nll.mean())) if finite else math.inf
        row = {**dict(zip(by, key if isinstance(key, tuple) else (key,))), "perplexity": ppl,
               "nll_change": float(nll.mean() - r.mean()) if finite else math.inf,
               "ppl_ratio": ppl / float(np.exp(r.mean())), "n_tokens": len(nll), "finite": finite}
        if n_boot and finite:
            p = metrics.bootstrap_ci(lambda x: float(np.exp(np.mean(x))), nll, n_boot=n_boot, seed=seed,
                                     groups=blocks)
            d = metrics.bootstrap_ci(lambda x, y: float(np.mean(x) - np.mean(y)), nll, r, n_boot=n_boot,
                                     seed=seed, groups=blocks)
            row.update(ppl_low=p.low, ppl_high=p.high, change_low=d.low, change_high=d.high)
        else:
            row.update(ppl_low=math.nan, ppl_high=math.nan, change_low=math.nan, change_high=math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def break_probability(summary: pd.DataFrame, by: Iterable[str], dense_ppl: float, factor: float = 2.0,
                      level: float = 0.95) -> pd.DataFrame:
    """Share of trials that break the model, per group, with Wilson intervals.

    A trial *breaks* the model when its perplexity is not finite or exceeds ``factor`` x ``dense_ppl``.

    Returns:
        One row per group: the ``by`` columns, ``trials``, ``broken``, ``p_break``, ``low``, ``high``,
        ``median_ratio`` (median perplexity ratio to dense over trials).
    """
    from headlab import metrics

    by = list(by)
    if factor <= 1:
        raise ValueError(f"factor={factor} must be > 1 (a threshold above the dense perplexity).")
    broken = ~np.isfinite(summary["perplexity"]) | (summary["perplexity"] > factor * dense_ppl)
    rows = []
    for key, g in summary.assign(_broken=broken).groupby(by, sort=False):
        ci = metrics.wilson_interval(int(g["_broken"].sum()), len(g), level)
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "trials": len(g),
                     "broken": int(g["_broken"].sum()), "p_break": ci.value, "low": ci.low, "high": ci.high,
                     "median_ratio": float(np.median(g["perplexity"] / dense_ppl))})
    return pd.DataFrame(rows)
