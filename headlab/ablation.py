"""Set ablation: ablate a chosen set of components (the top-k by some score, or k at random) and score.

Chapter 03 ablates the top-k induction heads against k random heads on repeated random tokens,
chapter 05 the top-k heads of a per-head score against random heads on label tokens, chapter 06 a
layer's top-k FFN neurons against k random neurons of that layer on held-out text. Each grid point is
one resumable shard (:mod:`headlab.shards`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from headlab import engine, metrics, neurons, perplexity
from headlab.edits import seed_for
from headlab.induction import repeat_metrics
from headlab.interventions import ablate_heads, ablate_neurons
from headlab.shards import ShardStore, config_hash, run_grid

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
        gen = torch.Generator().manual_seed(seed_for(seed, "random-heads", permutation, k))
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
    batched pass over all rows of ``batch`` (:func:`headlab.perplexity.token_losses`); the induction
    head set does not depend on the permutation, so it runs as permutation 0 only, and so does k = 0
    (the clean model, computed once and shared by every k = 0 point).

    Args:
        lm: the model.
        batch: :class:`headlab.induction.RepeatedTokens` to score (rows may have different lags).
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
        :func:`headlab.induction.repeat_metrics`) and the ablated ``heads`` (``"L3H1 L5H2"``).
    """
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
            memo[key] = perplexity.token_losses(lm, batch.tokens, heads, mode, means, batch_size)
        return memo[key]

    def compute(point: dict[str, Any]) -> dict[str, pd.DataFrame]:
        frames = []
        for perm in range(point["perm_start"], point["perm_stop"]):
            heads = ablation_heads(scores, point["layer_range"], point["head_type"], point["k"], perm, seed)
            m = repeat_metrics(batch, losses(point["mode"], heads))
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


NEURON_SET_KINDS = ("top", "random")


def neuron_ablation_sets(stats: Any, layer: int, k: int, kind: str, permutation: int = 0, seed: int = 0,
                         by: str = "mean_abs") -> list[int]:
    """The neurons ablated for one grid point: layer ``layer``'s ``k`` neurons with the largest ``by``
    (``kind="top"``), or ``k`` neurons drawn uniformly from the layer's *other* neurons
    (``kind="random"``; the draw depends on ``seed, layer, k, permutation``)."""
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
            nll, clean["hidden"] = perplexity.losses_keeping_inputs(lm, ids, layers, batch_size)
            clean["loss"] = nll.double().mean(1).numpy()
        chosen = neuron_ablation_sets(stats, point["layer"], point["k"], point["kind"], point["permutation"],
                                      seed, by)
        with ablate_neurons(lm, {point["layer"]: chosen}, point["mode"], means):
            loss = perplexity.losses_from(lm, ids, point["layer"], clean["hidden"], batch_size).double().mean(1).numpy()
        return {"rows": pd.DataFrame({
            "model": lm.spec, **point, "sequence": np.arange(len(ids)), "loss": loss,
            "clean_loss": clean["loss"], "delta": loss - clean["loss"], "neurons": " ".join(map(str, chosen))})}

    return run_grid(points, compute, store, progress=progress)["rows"]
