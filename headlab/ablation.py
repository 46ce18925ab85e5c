"""Set ablation: ablate a set of components (the top-k by a score, or k at random) and compare the two.

One generic sweep, :func:`set_ablation_sweep`, serves every chapter. It chooses the sets from a
:class:`Pool`, scores each with a caller-given :data:`Scorer`, computes the clean model once and saves
every grid point as a resumable shard (:mod:`headlab.shards`). Chapters differ only in the pool and the
scorer:

* 03: heads ranked by induction score, scored on repeated random tokens
  (:func:`induction_ablation_sweep` = :func:`head_pool` + :func:`repeated_tokens_scorer`);
* 05: heads ranked by any per-head score, scored on sentence pairs by their log-likelihoods
  (:func:`pair_ablation_sweep` = :func:`head_pool` + :func:`pair_scorer`); prompts scored on label
  tokens are :func:`label_scorer`;
* 06: a layer's FFN neurons ranked by activation, scored by next-token loss on text
  (:func:`neuron_ablation_sweep` = :func:`neuron_pools` + :func:`text_loss_scorer`).

Every sweep returns rows with the same columns: ``model, mode, <pool column>, set_type, k,
permutation, sequence``, the scorer's values, each value's change from the clean model
(``<value>_change``) and the ablated ``members`` (``"L3H1 L5H2"``; neurons ``"L3N7"``).
:func:`top_vs_random` compares the top set with the random sets (permutation p-value, band, verdict)
in one table for all three chapters (:func:`share_random_sets`: several rankings, one set of random
sets); :func:`ablation_summary` gives the curves' means and intervals.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from numpy.typing import ArrayLike
from torch import Tensor

from headlab import bias, engine, metrics, perplexity
from headlab.bias import EncodedPairs
from headlab.edits import seed_for
from headlab.engine import EncodedPrompts
from headlab.induction import RepeatedTokens, repeat_metrics
from headlab.interventions import ablate_heads, ablate_neurons
from headlab.models import LoadedModel
from headlab.neurons import NeuronStats
from headlab.schema import Field, check_value
from headlab.shards import ShardStore, computation_identity, config_hash, run_grid

#: Layer ranges heads are chosen from. ``bottom_half``: layers ``0 .. n//2 - 1`` (nearer the input);
#: ``top_half``: layers ``n//2 .. n - 1`` (nearer the output; it gets the extra layer of an odd count).
#: Seed 002 used ``top`` for the layers nearer the *input*; here the names follow the usual picture of
#: a stack with the output on top.
LAYER_RANGES = ("full", "top_half", "bottom_half")

#: ``top``: the k highest-scoring units of the pool (one set per k); ``random``: k units drawn at
#: random from the pool, a new draw per permutation.
SET_TYPES = ("top", "random")

ABLATION_MODES = ("zero", "mean")

#: What "at least as extreme as the top set" means in :func:`compare_to_random`.
ALTERNATIVES = ("less", "greater", "two-sided")

#: A set of components: ``{layer: sorted indices}`` (heads or neurons), as
#: :func:`headlab.interventions.ablate_heads` and :func:`~headlab.interventions.ablate_neurons` take it.
Members = dict[int, list[int]]

#: ``(mode, members) -> {value name: (n_items,) array}``; empty ``members`` is the clean model (``mode``
#: is then irrelevant). A scorer must give each item the same value whatever else is scored with it.
Scorer = Callable[[str, Members], Mapping[str, ArrayLike]]

_ROW_COLUMNS = ("model", "mode", "set_type", "k", "permutation", "sequence", "members")


def layer_range(n_layers: int, name: str) -> range:
    """The layers of one of :data:`LAYER_RANGES` in a model with ``n_layers`` layers."""
    half = n_layers // 2
    ranges = {"full": range(n_layers), "bottom_half": range(half), "top_half": range(half, n_layers)}
    if name not in ranges:
        raise ValueError(f"layer range {name!r}; choose one of {LAYER_RANGES}.")
    return ranges[name]


def by_layer(units: Iterable[tuple[int, int]]) -> Members:
    """``(layer, index)`` pairs as ``{layer: sorted indices}`` (layers in order)."""
    out: Members = {}
    for layer, index in sorted((int(a), int(b)) for a, b in units):
        out.setdefault(layer, []).append(index)
    return out


def members_label(members: Members, letter: str = "H") -> str:
    """``{3: [1], 5: [2]}`` -> ``"L3H1 L5H2"`` (``letter="N"`` for neurons)."""
    return " ".join(f"L{layer}{letter}{i}" for layer, idx in sorted(members.items()) for i in idx)


# --------------------------------------------------------------------------------------------------
# Choosing sets
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pool:
    """The components a set is chosen from (heads of a layer range, neurons of a layer) and their score.

    Attributes:
        units: ``(layer, index)`` of every component (index: head or neuron), sorted.
        scores: one per unit; the top set is the ``k`` largest (ties: lower layer, then lower index;
            NaN last).
        stream: names the random draws: a random set depends only on ``(seed, stream, permutation, k)``,
            so it is the same whatever the grid, the other ``k``, the chunking or the batch.
        exclude_top: draw random sets from the units outside the top-``k`` set (else from all units,
            the top set included: then the top set is one of the possible random draws).
        letter: unit letter in set labels (``"H"``: ``L3H1``, ``"N"``: ``L3N1``).
    """

    units: tuple[tuple[int, int], ...]
    scores: tuple[float, ...]
    stream: str
    exclude_top: bool = False
    letter: str = "H"

    def __post_init__(self) -> None:
        if len(self.units) != len(self.scores):
            raise ValueError(f"{len(self.units)} units but {len(self.scores)} scores.")
        if list(self.units) != sorted(set(self.units)):
            raise ValueError("units must be distinct and sorted by (layer, index).")

    def __len__(self) -> int:
        return len(self.units)

    def max_k(self, set_type: str) -> int:
        """The largest set of ``set_type`` the pool can give."""
        return len(self) // 2 if set_type == "random" and self.exclude_top else len(self)

    def _top_units(self, k: int) -> list[tuple[int, int]]:
        layer, index = np.array(self.units, dtype=np.int64).reshape(-1, 2).T
        order = np.lexsort((index, layer, -np.asarray(self.scores, dtype=float)))  # NaN last
        return [self.units[i] for i in order[:k]]

    def choose(self, set_type: str, k: int, permutation: int = 0, seed: int = 0) -> Members:
        """The set of ``set_type`` and size ``k`` (``permutation`` and ``seed`` key random draws only)."""
        if set_type not in SET_TYPES:
            raise ValueError(f"set_type={set_type!r}; choose one of {SET_TYPES}.")
        if not 0 <= k <= self.max_k(set_type):
            raise ValueError(f"k={k}: a {set_type} set of this pool ({len(self)} units) has "
                             f"0..{self.max_k(set_type)} units.")
        top = self._top_units(k)
        if set_type == "top":
            return by_layer(top)
        excluded = set(top) if self.exclude_top else set()
        candidates = [u for u in self.units if u not in excluded]
        gen = torch.Generator().manual_seed(seed_for(seed, self.stream, permutation, k))
        return by_layer(candidates[i] for i in torch.randperm(len(candidates), generator=gen)[:k].tolist())

    def top(self, k: int) -> Members:
        """The ``k`` highest-scoring units."""
        return self.choose("top", k)

    def random(self, k: int, permutation: int = 0, seed: int = 0) -> Members:
        """``k`` units drawn uniformly without replacement, keyed by ``(seed, stream, permutation, k)``."""
        return self.choose("random", k, permutation, seed)

    def key(self) -> dict[str, Any]:
        """What the pool's sets depend on (part of the shard keys)."""
        return {"stream": self.stream, "exclude_top": self.exclude_top,
                "units": config_hash({"u": self.units, "s": [round(float(s), 8) for s in self.scores]})}


def head_pool(scores: pd.DataFrame, column: str, layers: str = "full") -> Pool:
    """The heads of a layer range ranked by a per-head score; random heads are drawn from the whole
    range (top heads included), keyed by ``(seed, permutation, k)``.

    Args:
        scores: one row per head of the model with ``layer``, ``head`` and ``column``.
        column: the score ranking the heads (largest first).
        layers: one of :data:`LAYER_RANGES`.
    """
    missing = [c for c in ("layer", "head", column) if c not in scores.columns]
    if missing:
        raise ValueError(f"scores lack column(s) {missing}; they have {list(scores.columns)}.")
    rng = layer_range(int(scores["layer"].max()) + 1, layers)
    sel = scores[scores["layer"].isin(list(rng))].sort_values(["layer", "head"])
    return Pool(tuple(zip(sel["layer"].astype(int), sel["head"].astype(int))),
                tuple(sel[column].astype(float)), stream="random-heads", exclude_top=False, letter="H")


def neuron_pools(stats: NeuronStats, layers: Iterable[int], by: str = "mean_abs") -> dict[int, Pool]:
    """One pool per layer: its neurons ranked by ``by`` (a :meth:`~headlab.neurons.NeuronStats.frame`
    column); random neurons are drawn from the layer's neurons *outside* the top-k set."""
    frame = stats.frame()
    allowed = [c for c in frame.columns if c not in ("layer", "neuron")]
    if by not in allowed:
        raise ValueError(f"by={by!r}; choose one of {allowed}.")
    pools = {}
    for layer in layers:
        stats.slot(int(layer))  # raises for layers without statistics
        sel = frame[frame["layer"] == layer].sort_values("neuron")
        pools[int(layer)] = Pool(tuple((int(layer), int(n)) for n in sel["neuron"]),
                                 tuple(sel[by].astype(float)),
                                 stream=f"random-neurons/L{int(layer)}", exclude_top=True, letter="N")
    return pools


# --------------------------------------------------------------------------------------------------
# Scorers: what one set does to the model's output, one value per item
# --------------------------------------------------------------------------------------------------
def repeated_tokens_scorer(lm: LoadedModel, batch: RepeatedTokens,
                           means: Mapping[int, Float[Tensor, "H dh"]] | None = None,
                           batch_size: int = 8) -> Scorer:
    """Heads ablated, repeated random tokens scored: ``p_correct, loss_early, loss_late, icl`` per row
    (:func:`headlab.induction.repeat_metrics` of :func:`headlab.perplexity.token_losses`)."""

    def score(mode: str, heads: Members) -> dict[str, np.ndarray]:
        nll = perplexity.token_losses(lm, batch.tokens, heads, mode, means, batch_size)
        return {name: v.numpy() for name, v in repeat_metrics(batch, nll).items()}

    return score


def label_scorer(lm: LoadedModel, enc: EncodedPrompts, label_ids: Sequence[int],
                 measures: Mapping[str, Callable[[Float[Tensor, "n labels"]], ArrayLike]],
                 means: Mapping[int, Float[Tensor, "H dh"]] | None = None, batch_size: int = 16) -> Scorer:
    """Heads ablated, prompts scored on label tokens (:func:`headlab.engine.label_logprobs`); each
    measure turns the ``(n_prompts, n_labels)`` log-probabilities into one value per prompt."""
    if not measures:
        raise ValueError("measures is empty; give at least one name -> function of the log-probabilities.")

    def score(mode: str, heads: Members) -> dict[str, np.ndarray]:
        with ablate_heads(lm, heads, mode, means) if heads else nullcontext():
            lp = engine.label_logprobs(lm, enc, list(label_ids), batch_size=batch_size)
        return {name: np.asarray(fn(lp), dtype=float) for name, fn in measures.items()}

    return score


def pair_scorer(lm: LoadedModel, enc: EncodedPairs, means: Mapping[int, Float[Tensor, "H dh"]] | None = None,
                batch_size: int = 16) -> Scorer:
    """Heads ablated, sentence pairs scored by :func:`headlab.bias.pair_scores`: ``sentence, pronoun,
    after, p_pair`` per pair (log-likelihood contrasts of sentence ``a`` minus sentence ``b``)."""

    def score(mode: str, heads: Members) -> dict[str, np.ndarray]:
        with ablate_heads(lm, heads, mode, means) if heads else nullcontext():
            values = bias.pair_scores(lm, enc, batch_size)
        return {name: v.numpy() for name, v in values.items()}

    return score


def text_loss_scorer(lm: LoadedModel, ids: Int[Tensor, "n s"], layers: Sequence[int],
                     means: Mapping[int, Float[Tensor, " N"]] | None = None, batch_size: int = 8) -> Scorer:
    """Neurons ablated, mean next-token ``loss`` (nats) of every row of ``ids``.

    The first call runs the clean model once and keeps the residual stream entering each of ``layers``
    (:func:`headlab.perplexity.losses_keeping_inputs`); an ablated set then recomputes from its lowest
    layer only (:func:`headlab.perplexity.losses_from`), which must be one of ``layers``.
    """
    layers = sorted(int(x) for x in layers)
    kept: dict[str, Any] = {}

    def score(mode: str, chosen: Members) -> dict[str, np.ndarray]:
        if not kept:
            nll, kept["hidden"] = perplexity.losses_keeping_inputs(lm, ids, layers, batch_size)
            kept["clean"] = nll.double().mean(1).numpy()
        if not chosen:
            return {"loss": kept["clean"]}
        first = min(chosen)
        if first not in layers:
            raise ValueError(f"neurons of layer {first} ablated but only layers {layers} were kept.")
        with ablate_neurons(lm, chosen, mode, means):
            nll = perplexity.losses_from(lm, ids, first, kept["hidden"], batch_size)
        return {"loss": nll.double().mean(1).numpy()}

    return score


# --------------------------------------------------------------------------------------------------
# The generic sweep
# --------------------------------------------------------------------------------------------------
def _check_choices(name: str, values: list, allowed: Sequence) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{name}(s) {bad or values} invalid; choose from {tuple(allowed)}.")


def set_ablation_sweep(
    score: Scorer,
    pools: Mapping[Any, Pool],
    out_dir: str | Path,
    *,
    key: Mapping[str, Any],
    items: pd.DataFrame,
    pool_column: str = "pool",
    modes: Iterable[str] = ("zero",),
    set_types: Iterable[str] = SET_TYPES,
    k_list: Iterable[int] = (0, 5, 10),
    n_random: int = 100,
    seed: int = 0,
    perm_chunk: int = 1,
    progress: bool = True,
) -> pd.DataFrame:
    """Ablate the top-k or k random units of every pool and score each set; resumable.

    Grid: mode x pool x set type x k x permutation (the top set, and k = 0, have permutation 0 only).
    Each point, or chunk of ``perm_chunk`` random sets, is one shard; a rerun reads the shards already
    saved, so a killed sweep resumes where it stopped and ends with the same table. The clean model
    (k = 0) is scored once, lazily, and shared by every k = 0 row and every ``<value>_change``; a set
    that recurs (the same top heads in two layer ranges) is scored once per call.

    Args:
        score: the :data:`Scorer` (e.g. :func:`repeated_tokens_scorer`, :func:`label_scorer`,
            :func:`text_loss_scorer`).
        pools: pool name -> :class:`Pool` (a layer range's heads, a layer's neurons).
        out_dir: shard folder.
        key: everything else the values depend on (model fingerprint, hashes of tokens, means): part
            of every shard's key, so a change never reuses stale shards.
        items: one row per scored item, ``len(items)`` = the length of every value array; its columns
            (e.g. ``lag``) are copied into every set's rows.
        pool_column: name of the pool column of the rows (``"layer_range"``, ``"layer"``).
        modes: ``"zero"`` and/or ``"mean"``, passed to ``score``.
        set_types: entries of :data:`SET_TYPES`.
        k_list: set sizes (0: the clean model).
        n_random: random sets per (mode, pool, k > 0); :func:`top_vs_random` says how many a band needs.
        seed: keys the random sets (with the pool's stream, the permutation and k).
        perm_chunk: random sets per shard.

    Returns:
        One row per (mode, pool, set_type, k, permutation, sequence) with ``mode``, ``pool_column``,
        ``set_type``, ``k``, ``permutation``, ``sequence`` (item index), the item columns, every value,
        ``<value>_change`` (value - clean value) and ``members`` (:func:`members_label`).
    """
    modes, set_types = list(modes), list(set_types)
    _check_choices("mode", modes, ABLATION_MODES)
    _check_choices("set type", set_types, SET_TYPES)
    k_list = sorted(set(check_value(k_list, Field("list", items=Field("int", low=0), nonempty=True), "k_list")))
    if not pools:
        raise ValueError("pools is empty.")
    for name, pool in pools.items():
        for st in set_types:
            if max(k_list) > pool.max_k(st):
                raise ValueError(f"k={max(k_list)} exceeds the largest {st} set ({pool.max_k(st)}) of "
                                 f"{pool_column} {name!r} ({len(pool)} units).")
    check_value(n_random, Field("int", low=1), "n_random")
    check_value(perm_chunk, Field("int", low=1), "perm_chunk")
    if pool_column in _ROW_COLUMNS or pool_column in items.columns:
        raise ValueError(f"pool_column={pool_column!r} clashes with a row or item column.")
    store = ShardStore(out_dir, {**key, "seed": seed, "pools": {str(n): p.key() for n, p in pools.items()}})
    points = [{"mode": m, pool_column: name, "set_type": st, "k": k, "perm_start": a,
               "perm_stop": min(n_sets, a + perm_chunk)}
              for m in modes for name in pools for st in set_types for k in k_list
              for n_sets in [1 if st == "top" or k == 0 else n_random] for a in range(0, n_sets, perm_chunk)]
    memo: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def scored(mode: str, members: Members) -> dict[str, np.ndarray]:
        memo_key = (mode if members else "clean", members_label(members))
        if memo_key not in memo:
            values = {name: np.asarray(v) for name, v in score(mode, members).items()}
            bad = {n: v.shape for n, v in values.items() if v.shape != (len(items),)}
            clash = set(values) & ({*_ROW_COLUMNS, pool_column, *items.columns})
            if not values or bad or clash:
                raise ValueError(f"score returned {bad or clash or 'nothing'}; it must return "
                                 f"{{name: ({len(items)},) array}} with names unlike the row columns.")
            memo[memo_key] = values
        return memo[memo_key]

    def compute(point: dict[str, Any]) -> dict[str, pd.DataFrame]:
        pool, clean = pools[point[pool_column]], scored(point["mode"], {})
        frames = []
        for perm in range(point["perm_start"], point["perm_stop"]):
            members = pool.choose(point["set_type"], point["k"], perm, seed)
            values = scored(point["mode"], members)
            frames.append(pd.DataFrame({
                "mode": point["mode"], pool_column: point[pool_column], "set_type": point["set_type"],
                "k": point["k"], "permutation": perm, "sequence": np.arange(len(items)),
                **{c: items[c].to_numpy() for c in items.columns}, **values,
                **{f"{n}_change": v - clean[n] for n, v in values.items()},
                "members": members_label(members, pool.letter)}))
        return {"rows": pd.concat(frames, ignore_index=True)}

    return run_grid(points, compute, store, progress=progress)["rows"]


# --------------------------------------------------------------------------------------------------
# Heads and neurons: the chapters' sweeps
# --------------------------------------------------------------------------------------------------
def head_ablation_sweep(
    lm: LoadedModel,
    score: Scorer,
    scores: pd.DataFrame,
    column: str,
    out_dir: str | Path,
    *,
    key: Mapping[str, Any],
    items: pd.DataFrame,
    modes: Iterable[str] = ("zero",),
    layer_ranges: Iterable[str] = ("full",),
    set_types: Iterable[str] = SET_TYPES,
    k_list: Iterable[int] = (0, 5, 10),
    n_random: int = 100,
    max_heads: int | None = None,
    seed: int = 0,
    means: Mapping[int, Float[Tensor, "H dh"]] | None = None,
    perm_chunk: int = 1,
    progress: bool = True,
) -> pd.DataFrame:
    """The top-k heads of a per-head score, or k random heads of a layer range, ablated and scored.

    :func:`set_ablation_sweep` over one :func:`head_pool` per layer range; the shards are keyed by
    the model, the score table and (mode ``"mean"``) ``means`` besides ``key``. A new measure is a
    new ``score`` (e.g. :func:`repeated_tokens_scorer`, :func:`label_scorer`); the sweep is the same.

    Args:
        score: the :data:`Scorer`; it must ablate with the same ``means``.
        scores: one row per head of the model with ``layer``, ``head`` and ``column`` (largest first).
        key, items: what the values depend on besides the set, and the items' columns (as in
            :func:`set_ablation_sweep`).
        layer_ranges: entries of :data:`LAYER_RANGES`.
        max_heads: the largest k allowed (``None``: the size of the range).
        means: ``{layer: (n_heads, head_dim)}`` for ``"mean"``
            (:func:`headlab.attention.head_output_means`).
        Others: as in :func:`set_ablation_sweep`.

    Returns:
        :func:`set_ablation_sweep` rows with ``model`` first and the pool column ``layer_range``.
    """
    modes = list(modes)
    k_list = check_value(k_list, Field("list", items=Field("int", low=0), nonempty=True), "k_list")
    if max_heads is not None and [k for k in k_list if k > max_heads]:
        raise ValueError(f"k_list {k_list} has entries above max_heads={max_heads}.")
    if len(scores) != lm.n_layers * lm.n_heads:
        raise ValueError(f"scores has {len(scores)} rows; expected one per head "
                         f"({lm.n_layers} layers x {lm.n_heads} heads).")
    base = {**key, "model": lm.fingerprint or lm.spec, "computation": computation_identity(lm)}
    if "mean" in modes:
        if means is None:
            raise ValueError("mode 'mean' needs `means` (see headlab.attention.head_output_means).")
        base["means"] = config_hash({"m": [means[layer].double().round(decimals=6).tolist()
                                           for layer in sorted(means)]})
    pools = {r: head_pool(scores, column, r) for r in layer_ranges}
    rows = set_ablation_sweep(score, pools, out_dir, key=base, items=items, pool_column="layer_range",
                              modes=modes, set_types=set_types, k_list=k_list, n_random=n_random, seed=seed,
                              perm_chunk=perm_chunk, progress=progress)
    return rows.assign(model=lm.spec)[["model", *rows.columns]]


def induction_ablation_sweep(
    lm: LoadedModel,
    batch: RepeatedTokens,
    scores: pd.DataFrame,
    out_dir: str | Path,
    *,
    modes: Iterable[str] = ("zero",),
    layer_ranges: Iterable[str] = ("full",),
    set_types: Iterable[str] = SET_TYPES,
    k_list: Iterable[int] = (0, 1, 5, 10),
    n_random: int = 100,
    max_heads: int = 50,
    seed: int = 0,
    means: Mapping[int, Float[Tensor, "H dh"]] | None = None,
    batch_size: int = 8,
    perm_chunk: int = 10,
    progress: bool = True,
) -> pd.DataFrame:
    """Chapter 03: :func:`head_ablation_sweep` of the heads ranked by ``induction_score`` with
    :func:`repeated_tokens_scorer` (each set ablated in one batched pass over all rows of ``batch``).

    ``max_heads`` is seed 002's ``--max_heads_abl`` (it used 300 random sets). Rows carry the row's
    ``lag`` and ``p_correct, loss_early, loss_late, icl`` (:func:`headlab.induction.repeat_metrics`)
    with their changes.
    """
    key = {"tokens": config_hash({"t": batch.tokens.tolist(), "lags": batch.lags.tolist()})}
    return head_ablation_sweep(
        lm, repeated_tokens_scorer(lm, batch, means, batch_size), scores, "induction_score", out_dir, key=key,
        items=pd.DataFrame({"lag": batch.lags.numpy()}), modes=modes, layer_ranges=layer_ranges,
        set_types=set_types, k_list=k_list, n_random=n_random, max_heads=max_heads, seed=seed, means=means,
        perm_chunk=perm_chunk, progress=progress)


def pair_ablation_sweep(
    lm: LoadedModel,
    enc: EncodedPairs,
    scores: pd.DataFrame,
    column: str,
    out_dir: str | Path,
    *,
    items: pd.DataFrame | None = None,
    modes: Iterable[str] = ("zero",),
    layer_ranges: Iterable[str] = ("full",),
    set_types: Iterable[str] = SET_TYPES,
    k_list: Iterable[int] = (0, 5, 10),
    n_random: int = 100,
    seed: int = 0,
    means: Mapping[int, Float[Tensor, "H dh"]] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Chapter 05: :func:`head_ablation_sweep` of the heads ranked by ``column`` with :func:`pair_scorer`.

    Rows carry, per pair and set, ``sentence, pronoun, after, p_pair``
    (:func:`headlab.bias.pair_scores`) and their ``<value>_change``. Random sets do not depend on the
    ranking (:func:`head_pool`), so a second ranking needs only its top sets
    (``set_types=("top",)``) to be compared with the same random sets.

    Args:
        items: one row per pair (e.g. its WinoBias ``type``), copied into its rows; default: none.
        Others: as in :func:`head_ablation_sweep`.
    """
    items = pd.DataFrame(index=range(len(enc))) if items is None else items.reset_index(drop=True)
    if len(items) != len(enc):
        raise ValueError(f"items has {len(items)} rows for {len(enc)} pairs.")
    key = {"pairs": config_hash({"a": [x.tolist() for x in enc.a], "b": [x.tolist() for x in enc.b]}),
           "measures": list(bias.PAIR_MEASURES)}
    return head_ablation_sweep(
        lm, pair_scorer(lm, enc, means, batch_size), scores, column, out_dir, key=key, items=items,
        modes=modes, layer_ranges=layer_ranges, set_types=set_types, k_list=k_list, n_random=n_random,
        seed=seed, means=means, progress=progress)


def neuron_ablation_sweep(
    lm: LoadedModel,
    ids: Int[Tensor, "n s"],
    stats: NeuronStats,
    out_dir: str | Path,
    *,
    layers: Iterable[int],
    k_list: Iterable[int] = (16, 64),
    modes: Iterable[str] = ("zero", "mean"),
    set_types: Iterable[str] = SET_TYPES,
    n_random: int = 100,
    by: str = "mean_abs",
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Chapter 06: a layer's top-k neurons or k random *other* neurons ablated, next-token loss on text.

    :func:`set_ablation_sweep` over :func:`neuron_pools` (ranked by ``by``, one layer at a time) with
    :func:`text_loss_scorer`. Mean ablation uses ``stats.means()``, so the statistics must come from a
    corpus *disjoint* from the held-out rows ``ids``. Rows: ``model``, ``layer``, the row's mean
    next-token ``loss`` (nats) and ``loss_change`` (loss - clean loss).
    """
    layers = check_value(layers, Field("list", items=Field("int", low=0, high=lm.n_layers - 1), nonempty=True),
                         "layers")
    key = {"model": lm.fingerprint or lm.spec, "computation": computation_identity(lm), "by": by,
           "tokens": config_hash({"t": ids.tolist()}),
           "stats": config_hash({"n": stats.count, "m": stats.mean.double().round(decimals=5).tolist()})}
    rows = set_ablation_sweep(
        text_loss_scorer(lm, ids, layers, stats.means(), batch_size), neuron_pools(stats, layers, by),
        out_dir, key=key, items=pd.DataFrame(index=range(len(ids))), pool_column="layer", modes=modes,
        set_types=set_types, k_list=k_list, n_random=n_random, seed=seed, progress=progress)
    return rows.assign(model=lm.spec)[["model", *rows.columns]]


# --------------------------------------------------------------------------------------------------
# Summaries: curves, and the top set against the random sets
# --------------------------------------------------------------------------------------------------
def ablation_summary(rows: pd.DataFrame, value: str, by: Iterable[str] = ("mode", "set_type", "k"),
                     n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean of ``value`` per group of sweep rows with a 95% interval (the curves of the chapters).

    Within a group the values form a (permutation x sequence) matrix; the interval resamples random
    sets and sequences independently (:func:`headlab.metrics.bootstrap_two_way`), so for random sets
    it covers both the choice of units and the choice of sequences, for the single top set the
    sequences only.

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


def share_random_sets(rows: Mapping[str, pd.DataFrame], column: str = "ranking") -> pd.DataFrame:
    """Sweep rows of several rankings of the same units, stacked so that every ranking is compared with
    the same random sets.

    Random sets of a :func:`head_pool` do not depend on its scores, so after one sweep with top and
    random sets a second ranking needs only its top sets (``set_types=("top",)``). The random rows,
    which exactly one frame must hold, are repeated under every ranking's name; each frame's other rows
    (top sets, the clean ``k = 0`` rows) stay under its own name. Pass the result to
    :func:`top_vs_random` with ``column`` in ``by``.

    Args:
        rows: ranking name -> sweep rows (:func:`set_ablation_sweep`).
        column: name of the new ranking column (must not be a column of the rows).

    Returns:
        The stacked rows with ``column`` first.
    """
    if not rows:
        raise ValueError("rows is empty; give ranking name -> sweep rows.")
    clash = [name for name, frame in rows.items() if column in frame.columns]
    if clash:
        raise ValueError(f"column={column!r} is already a column of the rows of {clash}.")
    holders = [name for name, frame in rows.items() if (frame["set_type"] == "random").any()]
    if len(holders) != 1:
        raise ValueError(f"exactly one ranking must hold the random sets; {holders or 'none'} do.")
    shared = rows[holders[0]][rows[holders[0]]["set_type"] == "random"]
    parts = [frame[frame["set_type"] != "random"].assign(**{column: name}) for name, frame in rows.items()]
    parts += [shared.assign(**{column: name}) for name in rows]
    out = pd.concat(parts, ignore_index=True)
    return out[[column, *[c for c in out.columns if c != column]]]


def random_sets_needed(level: float = 0.95) -> int:
    """Fewest random sets whose spread can be a central ``level`` band: 39 for 95%.

    The lowest and highest of ``n`` random sets bracket one more random set with probability
    ``(n - 1) / (n + 1)`` (5 sets: 67%, 8 sets: 78%), so a 95% band needs ``n >= 39``; quantiles of
    fewer sets interpolate inside their range and cover less than they claim.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1).")
    return math.ceil(round((1 + level) / (1 - level), 9))


def compare_to_random(top: float, random: ArrayLike, alternative: str = "two-sided", level: float = 0.95,
                      strict: bool = False) -> dict[str, Any]:
    """One value of the top set against the same value of ``n`` random sets: a permutation test.

    Null hypothesis: the top set is one more random set. ``p_value = (1 + #{random sets at least as
    extreme as the top set}) / (n + 1)``, so its resolution and smallest value is ``1 / (n + 1)``
    (``p_resolution``): 99 random sets resolve p = 0.01, 5 sets cannot go below 0.17. "At least as
    extreme": ``"less"``: random <= top; ``"greater"``: random >= top; ``"two-sided"``: |random| >=
    |top| (for changes from the clean model: moved at least as far, either way).

    The band ``random_low`` .. ``random_high`` (described in ``band``): the central ``level``
    quantiles of the random values when ``n >=`` :func:`random_sets_needed` (39 for 95%; use >= 100
    for a stable band and p resolution 0.01). With fewer sets no ``level`` band exists: the band is
    their min-max range, ``band`` states its real coverage ``(n - 1) / (n + 1)``, and a warning is
    issued (``strict=True``: ValueError instead).

    The ``verdict`` follows from the test at alpha = ``1 - level``: e.g. "top set lower than random
    (p = 0.01, 99 random sets)", "not distinguishable from random (p = 0.42, 99 random sets)", or
    "too few random sets to test ..." when even the most extreme outcome cannot reach alpha
    (``1 / (n + 1) > alpha``: fewer than 19 sets for alpha = 0.05).

    Returns:
        ``top, random_mean, random_low, random_high, band, difference`` (top - random_mean),
        ``p_value, p_resolution, n_random_sets, verdict``.
    """
    result, thin = _compare(top, random, alternative, level)
    _refuse_or_warn([thin] if thin else [], strict)
    return result


def _refuse_or_warn(problems: list[str], strict: bool) -> None:
    """Refuse (``strict``) or warn once about bands that rest on too few random sets."""
    if problems:
        msg = "; ".join(dict.fromkeys(problems))
        if strict:
            raise ValueError(msg + ".")
        warnings.warn(msg + "; reporting their min-max range instead.", UserWarning, stacklevel=3)


def _compare(top: float, random: ArrayLike, alternative: str,
             level: float) -> tuple[dict[str, Any], str | None]:
    """:func:`compare_to_random`'s numbers, and the problem with its band (``None`` if supported)."""
    r = np.asarray(random, dtype=float).reshape(-1)
    r = r[np.isfinite(r)]
    n = len(r)
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r}; choose one of {ALTERNATIVES}.")
    if n == 0:
        raise ValueError("no finite random-set values to compare with.")
    needed, alpha = random_sets_needed(level), 1 - level
    tol = 1e-12 * max(1.0, abs(top))
    extreme = {"less": r <= top + tol, "greater": r >= top - tol,
               "two-sided": np.abs(r) >= abs(top) - tol}[alternative]
    p = (1 + int(extreme.sum())) / (n + 1)
    thin = None
    if n >= needed:
        low, high = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
        band = f"central {level:.0%} of {n} random sets"
    else:
        thin = (f"{n} random sets cannot give a {level:.0%} band (their range covers about "
                f"{(n - 1) / (n + 1):.0%} of random sets); use at least {needed}, better 100")
        low, high = r.min(), r.max()
        band = f"range of {n} random sets (covers ~{(n - 1) / (n + 1):.0%}, not {level:.0%})"
    direction = {"less": "lower than", "greater": "higher than",
                 "two-sided": "larger in size than"}[alternative]
    tested = f"p = {p:.2g}, {n} random sets"
    if 1 / (n + 1) > alpha:
        verdict = (f"too few random sets to test: with {n} the smallest possible p is {1 / (n + 1):.2g} > "
                   f"{alpha:.2g} (need at least {math.ceil(round(1 / alpha - 1, 9))})")
    elif p <= alpha:
        verdict = f"top set {direction} random ({tested})"
    else:
        verdict = f"not distinguishable from random ({tested})"
    return {"top": float(top), "random_mean": float(r.mean()), "random_low": float(low),
            "random_high": float(high), "band": band, "difference": float(top - r.mean()), "p_value": p,
            "p_resolution": 1 / (n + 1), "n_random_sets": n, "verdict": verdict}, thin


def top_vs_random(rows: pd.DataFrame, values: Mapping[str, str], by: Sequence[str] = ("mode", "k"), *,
                  level: float = 0.95, strict: bool = False, n_boot: int = 1000,
                  seed: int = 0) -> pd.DataFrame:
    """The top set against the random sets of the same size, for chapters 03, 05 and 06 alike.

    Per group of ``by`` (rows with ``k = 0`` left out: both are the clean model) every set is reduced
    to its mean over the items, and the top set's mean is tested against the random sets' means by
    :func:`compare_to_random` (p-value with resolution ``1 / (n + 1)``, band, verdict; a warning, or
    with ``strict`` an error, when fewer than :func:`random_sets_needed` sets (39 for 95%) are asked
    to give a band). Groups without a top set or without random sets are left out.

    Args:
        rows: sweep rows (:func:`set_ablation_sweep`) with ``by``, ``set_type``, ``permutation``,
            ``sequence`` and the value columns.
        values: value column -> alternative (:data:`ALTERNATIVES`), e.g. ``{"p_correct": "less"}``.
        by: the columns of one comparison, e.g. ``("mode", "layer_range", "k")``.
        level: band coverage and ``1 - level`` = the test's alpha.
        n_boot, seed: bootstrap over items of the top set's interval.

    Returns:
        One row per (group, value): the ``by`` columns, ``measure`` (the value column), ``alternative``,
        ``top`` (top set's mean over items), ``top_low``/``top_high`` (its ``level`` bootstrap interval
        over items), ``random_mean``, ``random_low``, ``random_high``, ``band``, ``difference``,
        ``p_value``, ``p_resolution``, ``n_random_sets``, ``n_items``, ``verdict``.
    """
    by = list(by)
    missing = [c for c in [*by, "set_type", "permutation", "sequence", *values] if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack column(s) {missing}; they have {list(rows.columns)}.")
    for alternative in values.values():
        if alternative not in ALTERNATIVES:
            raise ValueError(f"alternative={alternative!r}; choose one of {ALTERNATIVES}.")
    rows = rows[rows["k"] > 0] if "k" in rows.columns else rows
    out, thin = [], []
    for key, g in rows.groupby(by, sort=True):
        top_rows, rnd_rows = g[g["set_type"] == "top"], g[g["set_type"] == "random"]
        if top_rows.empty or rnd_rows.empty:
            continue
        if top_rows["permutation"].nunique() != 1:
            raise ValueError(f"group {key} has {top_rows['permutation'].nunique()} top sets; "
                             "add the missing columns to `by`.")
        top_rows = top_rows.sort_values("sequence")
        for measure, alternative in values.items():
            ci = metrics.bootstrap_two_way(top_rows[measure].to_numpy()[None, :], n_boot=n_boot, level=level,
                                           seed=seed)  # (1 set, items): resamples items
            per_set = rnd_rows.groupby("permutation")[measure].mean()
            result, problem = _compare(ci.value, per_set.to_numpy(), alternative, level)
            thin += [problem] if problem else []
            out.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "measure": measure,
                        "alternative": alternative, **result, "top_low": ci.low, "top_high": ci.high,
                        "n_items": len(top_rows)})
    _refuse_or_warn(thin, strict)
    columns = [*by, "measure", "alternative", "top", "top_low", "top_high", "random_mean", "random_low",
               "random_high", "band", "difference", "p_value", "p_resolution", "n_random_sets", "n_items",
               "verdict"]
    return pd.DataFrame(out, columns=columns)
