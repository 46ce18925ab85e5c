"""Weight-sensitivity sweeps: perplexity of a token stream under one weight edit per grid point.

A grid point is a dict with a ``kind`` (:data:`WEIGHT_KINDS`) and that kind's keys;
:func:`weight_setting` turns it into a weight edit of :mod:`headlab.weights`, :func:`weight_sweep`
scores the stream under each edit (recomputing only from the first edited layer), and
:func:`nll_summary` / :func:`break_probability` summarise the per-token results with intervals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from headlab import metrics, perplexity, weights
from headlab.edits import seed_for
from headlab.models import parse_weight_name, weight_names
from headlab.schema import Field, check_variant
from headlab.shards import ShardStore, config_hash, run_grid

#: Kinds of weight setting understood by :func:`weight_setting` (the ``kind`` key of a grid point).
#: ``dense``: no edit. ``ablate``: one matrix (``layer``, ``matrix``) zeroed or set to its mean
#: (``mode``). ``magnitude`` / ``wanda``: every layer matrix pruned to ``sparsity``, the scores compared
#: within ``group`` (required; :data:`headlab.weights.PRUNE_GROUPS`: ``"row"``, ``"matrix"`` or
#: ``"global"``). ``heads``: a
#: ``fraction`` of all heads removed, least important first (``order="ranking"``) or in a random order
#: (``order="random"``, ``seed``). ``noise``: Gaussian noise of ``level`` x each matrix's std on every
#: layer matrix (``seed``). ``bitflip``: bit ``bit`` of format ``fmt`` (bfloat16, float16 or float32)
#: flipped in one random weight (``trial``, ``seed``). ``zero_entries``: single weights zeroed (``entries``, see :func:`entries_text`).
WEIGHT_KINDS = ("dense", "ablate", "magnitude", "wanda", "heads", "noise", "bitflip", "zero_entries")


def _bit_field(fmt: str | None = None) -> Field:
    """The ``bit`` key of a bit-flip point: an index below the width of ``fmt`` or one of its bit names
    (the widest format's range and every name when ``fmt`` is None or unknown)."""
    from headlab.weights import BIT_POSITIONS, bit_width

    if fmt in BIT_POSITIONS:
        width, names = bit_width(fmt), sorted(BIT_POSITIONS[fmt])
        return Field(("int", "str"), low=0, high=width - 1, help=f"an integer in 0..{width - 1} or one of {names}")
    width = max(bit_width(f) for f in BIT_POSITIONS)
    names = sorted({n for pos in BIT_POSITIONS.values() for n in pos})
    return Field(("int", "str"), low=0, high=width - 1,
                 help=f"an integer below the format's width (16 or 32) or one of {names}")


def weight_point_fields(lm: Any, fmt: str | None = None) -> dict[str, dict[str, Field]]:
    """The schema of a grid point of each kind (:data:`WEIGHT_KINDS`) for model ``lm``.

    Other keys of a point are labels carried into the tables (e.g. ``method``); a key that looks like
    a misspelling of one of the kind's keys is refused. ``fmt``: the bit-flip format whose width bounds
    ``bit`` (None: the widest format's).
    """
    from headlab.weights import BIT_POSITIONS, PRUNE_GROUPS

    seed = Field("int", low=0)
    sparsity = Field("float", low=0, high=1)
    group = Field("str", choices=list(PRUNE_GROUPS))
    return {
        "dense": {},
        "ablate": {"layer": Field("int", low=0, high=lm.n_layers - 1),
                   "matrix": Field("str", choices=[c for c, _ in lm.adapter.weights]),
                   "mode": Field("str", choices=["zero", "mean"])},
        "magnitude": {"sparsity": sparsity, "group": group},
        "wanda": {"sparsity": sparsity, "group": group},
        "heads": {"fraction": Field("float", low=0, high=1), "order": Field("str", choices=["ranking", "random"]),
                  "seed": Field("int", low=0, default=0)},
        "noise": {"level": Field("float", low=0), "seed": seed},
        "bitflip": {"bit": _bit_field(fmt), "fmt": Field("str", choices=sorted(BIT_POSITIONS)),
                    "trial": Field("int", low=0), "seed": seed},
        "zero_entries": {"entries": Field("str", nonempty=True, help="a text 'NAME:ROW:COL ...' (entries_text)")},
    }


def check_weight_point(lm: Any, point: Any, where: str = "weight grid point") -> dict[str, Any]:
    """Check one grid point against :func:`weight_point_fields`; return it with defaults filled in.

    A bit-flip point's ``bit`` is bounded by its own format's width (0..15 for bfloat16 / float16,
    0..31 for float32). ``magnitude`` / ``wanda`` points need ``group`` (:data:`headlab.weights.PRUNE_GROUPS`).

    Raises:
        ValueError: an unknown kind or key, a missing key or a bad value, naming it and what is allowed.
    """
    from headlab.weights import BIT_POSITIONS

    what = f"{where} {point!r}"
    fmt = point.get("fmt") if isinstance(point, Mapping) and point.get("kind") == "bitflip" else None
    out = check_variant(point, "kind", weight_point_fields(lm, fmt if isinstance(fmt, str) else None), what,
                        labels=True)
    if out["kind"] == "bitflip" and isinstance(out["bit"], str) and out["bit"] not in BIT_POSITIONS[out["fmt"]]:
        raise ValueError(f"{what}: bit={out['bit']!r}; choose {_bit_field(out['fmt']).describe()}.")
    if out["kind"] == "zero_entries":
        try:
            for name in parse_entries(out["entries"]):
                parse_weight_name(lm, name)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
    return out


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
    if order == "random":
        gen = torch.Generator().manual_seed(seed_for(seed, "head-prune-order"))
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
    point = check_weight_point(lm, point)
    kind = point["kind"]
    names = weight_names(lm)
    if kind == "dense":
        return nullcontext(), 0, {}
    if kind == "ablate":
        name = f"L{point['layer']}.{point['matrix']}"
        fns = {"zero": weights.zero_weights, "mean": weights.mean_weights}
        if point.get("mode") not in fns:
            raise ValueError(f"ablation mode={point.get('mode')!r} in {point}; choose 'zero' or 'mean'.")
        return fns[point["mode"]](lm, [name]), int(point["layer"]), {"weight": name}
    if kind in ("magnitude", "wanda"):
        group = point["group"]
        if kind == "magnitude":
            return weights.prune_magnitude(lm, names, float(point["sparsity"]), group), 0, {}
        if wanda_norms is None:
            raise ValueError("kind='wanda' needs wanda_norms (headlab.weights.wanda_input_norms).")
        return weights.prune_wanda(lm, wanda_norms, float(point["sparsity"]), group), 0, {}
    if kind == "heads":
        order = head_prune_order(lm.n_layers, lm.n_heads, point["order"], head_ranking,
                                 int(point.get("seed", 0)))
        k = round(float(point["fraction"]) * len(order))
        heads = _heads_dict(order[:k])
        return weights.prune_heads(lm, heads), min(heads, default=0), {"n_heads": k}
    if kind == "noise":
        return weights.noise_weights(lm, names, float(point["level"]), int(point["seed"])), 0, {}
    if kind == "bitflip":
        # The same random weight for every bit and format of one trial (a paired comparison).
        name, r, c = weights.random_weight_entries(lm, 1, int(point["seed"]), key=int(point["trial"]))[0]
        before = weights.out_in(lm, name)[r, c].detach().reshape(1)
        after = weights.flip_bit(before, point["bit"], point["fmt"])
        ctx = weights.flip_weight_bits(lm, {name: [(r, c)]}, point["bit"], point["fmt"])
        # ``rounded``: the weight in the flip's format before the flip (differs from ``value`` when
        # that format is narrower than the weight's dtype: the flip then also rounds the weight)
        info = {"weight": name, "row": r, "col": c, "value": float(before), "flipped": float(after),
                "rounded": float(weights.round_to_format(before, point["fmt"]))}
        return ctx, int(parse_weight_name(lm, name)[0]), info
    entries = parse_entries(point["entries"])
    return weights.zero_weight_entries(lm, entries), min(parse_weight_name(lm, n)[0] for n in entries), {}


def weight_sweep(lm: Any, windows: Any, points: Iterable[dict[str, Any]], out_dir: str | Path,
                 base: dict[str, Any] | None = None, *, wanda_norms: dict | None = None,
                 head_ranking: pd.DataFrame | None = None,
                 progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-token NLL of ``windows`` under the weight edit of each grid point; one resumable shard per point.

    Each edit is applied inside its context manager (weights restored bit-exactly after every point)
    and only the blocks from the first edited layer on are recomputed
    (:func:`headlab.perplexity.windows_nll`).

    Args:
        lm: the model.
        windows: :class:`headlab.perplexity.TextWindows` of the evaluation stream.
        points: grid points, each with ``kind`` (:data:`WEIGHT_KINDS`) and its keys.
        out_dir: shard folder.
        base: extra configuration every shard depends on (e.g. hashes of the calibration data or the
            head ranking); the model fingerprint and the token windows are always part of it.
        wanda_norms, head_ranking: inputs of the ``wanda`` and ``heads`` kinds.

    Returns:
        ``(tokens, info)``: one row per (point, scored token) with the point's keys, ``position`` (index
        among scored tokens), ``window`` and ``nll``; one row per point with what was edited.
    """
    points = list(points)
    for i, p in enumerate(points):  # fail before any work on a bad grid
        check_weight_point(lm, p, f"weight grid point {i}")
    points = [dict(p) for p in points]
    if not points:
        raise ValueError("points is empty; give at least one dict with 'kind' (one of "
                         f"{list(WEIGHT_KINDS)}).")
    store = ShardStore(out_dir, {"model": lm.fingerprint or lm.spec, **(base or {}),
                                 "windows": config_hash({"ids": windows.ids.tolist(),
                                                         "first": windows.first.tolist()})}, lm=lm)

    def compute(point: dict[str, Any]) -> dict[str, pd.DataFrame]:
        ctx, first_layer, info = weight_setting(lm, point, wanda_norms=wanda_norms, head_ranking=head_ranking)
        with ctx:
            nll, win = perplexity.windows_nll(lm, windows, from_layer=first_layer)
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
