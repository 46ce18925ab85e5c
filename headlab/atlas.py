"""The head atlas: every per-head measure the chapters saved, joined into one table per model.

Each chapter saves tidy tables (``headlab.records.save_frames``) into ``<results_root>/<chapter>/``
with a ``config.json`` naming the model. :data:`MEASURES` lists which column of which table is a
per-head measure; :func:`load_atlas` reads whatever exists, checks that every table comes from the
same model (fingerprint), and pivots the measures into one row per ``(layer, head)``.

When several models have results (one results root each), :func:`compare_atlases` puts their heads
side by side: every head at its *relative depth* (layer / (n_layers - 1)) and each measure as a
within-model percentile (models' raw scales differ), averaged per depth bin; and, for every pair of
measures, each model's Spearman correlation, so that it shows which relations between measures hold
in every model and which in one only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headlab import records

__all__ = ["MEASURES", "Atlas", "CrossModel", "Measure", "compare_atlases", "head_profile", "load_atlas",
           "load_atlases", "save_atlas", "spearman_pairs"]


@dataclass(frozen=True)
class Measure:
    """One per-head measure: ``column`` of ``<results_root>/<folder>/<table>.parquet``."""

    name: str
    folder: str
    table: str
    column: str
    chapter: str
    description: str


#: Per-head measures the chapters produce (name, results folder, table, column, producing notebook).
MEASURES: tuple[Measure, ...] = (
    Measure("noise_effect", "noise", "ranking", "effect", "02_noise_perturbation",
            "logit-difference drop when noise is added to the head's output (mean over seeds)"),
    Measure("zero_ablation", "noise", "noise_vs_ablation", "zero_ablation", "02_noise_perturbation",
            "logit-difference drop when the head's output is zeroed"),
    Measure("induction_score", "induction", "scores", "induction_score", "03_induction",
            "attention to the token after the previous occurrence on repeated random tokens"),
    Measure("previous_token_score", "induction", "scores", "previous_token_score", "03_induction",
            "attention to the previous token on repeated random tokens"),
    Measure("entropy", "entropy", "entropy", "entropy", "04_entropy", "mean attention entropy (nats)"),
    Measure("first_token_mass", "entropy", "entropy", "first_token", "04_entropy",
            "mean attention on the first token (attention sink)"),
    Measure("sentiment_r", "entropy", "sentiment_heads", "r", "04_entropy",
            "correlation of the head's attention to sentiment words with the review label"),
    Measure("instruction_effect", "entropy", "instruction_heads", "effect_size", "04_entropy",
            "effect size of attention to instruction tokens, instruction vs plain prompts"),
    Measure("gender_effect", "gender_bias", "ranked_heads", "effect_size", "05_gender_bias",
            "effect size of the head's gendered attention differential"),
)


@dataclass
class Atlas:
    """The joined table and what went into it.

    Attributes:
        table: one row per ``(layer, head)``, one column per measure found (NaN where a table lacks a head).
        long: the same numbers as ``(layer, head, measure, value)`` rows.
        missing: one row per measure not found (``measure``, ``chapter``, ``path``, ``reason``).
        model: the ``config.json`` model description shared by all the tables (``None`` if none had one).
        sources: measure -> the Parquet file it came from.
    """

    table: pd.DataFrame
    long: pd.DataFrame
    missing: pd.DataFrame
    model: dict[str, Any] | None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def measures(self) -> list[str]:
        return [c for c in self.table.columns if c not in ("layer", "head")]


def _model_of(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("model")


def load_atlas(results_root: str | Path, measures: tuple[Measure, ...] = MEASURES,
               model: str | None = None) -> Atlas:
    """Join every per-head measure found under ``results_root`` into one table for one model.

    Args:
        results_root: the folder holding the chapters' results folders (``results`` by default in the book).
        measures: which columns to collect (default :data:`MEASURES`).
        model: if given, the model spec or fingerprint the tables must come from.

    Returns:
        An :class:`Atlas`. Measures whose table does not exist are listed in ``missing``, not raised.

    Raises:
        FileNotFoundError: ``results_root`` is not a folder.
        ValueError: tables from different models (fingerprints differ), a table from another model than
            ``model``, a table without ``layer``/``head``/the measure column, or a head listed twice.
    """
    root = Path(results_root)
    if not root.is_dir():
        raise FileNotFoundError(f"results_root={str(root)!r} is not a folder; run the chapters first.")
    frames, missing, sources = [], [], {}
    seen_model: dict[str, Any] | None = None
    seen_from = ""
    for m in measures:
        path = root / m.folder / f"{m.table}.parquet"
        if not path.exists():
            missing.append({"measure": m.name, "chapter": m.chapter, "path": str(path), "reason": "no table"})
            continue
        desc = _model_of(path.parent)
        if desc is not None:
            if model is not None and model not in (desc.get("spec"), desc.get("fingerprint")):
                raise ValueError(f"{path} comes from model {desc.get('spec')!r} (fingerprint "
                                 f"{desc.get('fingerprint')!r}), not from model={model!r}.")
            if seen_model is None:
                seen_model, seen_from = desc, str(path.parent)
            elif desc.get("fingerprint") != seen_model.get("fingerprint"):
                raise ValueError(
                    f"refusing to join tables of different models: {seen_from} has {seen_model.get('spec')!r} "
                    f"(fingerprint {seen_model.get('fingerprint')!r}), {path.parent} has {desc.get('spec')!r} "
                    f"(fingerprint {desc.get('fingerprint')!r}). Point results_root at one model's results.")
        frame = pd.read_parquet(path)
        need = {"layer", "head", m.column} - set(frame.columns)
        if need:
            raise ValueError(f"{path} lacks columns {sorted(need)} needed for measure {m.name!r}; "
                             f"it has {list(frame.columns)}.")
        dup = frame.duplicated(["layer", "head"])
        if dup.any():
            first = frame.loc[dup, ["layer", "head"]].iloc[0]
            raise ValueError(f"{path}: head L{first['layer']}H{first['head']} appears more than once "
                             f"({int(dup.sum())} duplicate rows); measure {m.name!r} needs one row per head.")
        frames.append(pd.DataFrame({"layer": frame["layer"].astype(int), "head": frame["head"].astype(int),
                                    "measure": m.name, "value": frame[m.column].astype(float)}))
        sources[m.name] = str(path)
    long = (pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame(columns=["layer", "head", "measure", "value"]))
    order = [m.name for m in measures if m.name in sources]
    if frames:
        table = long.pivot(index=["layer", "head"], columns="measure", values="value")[order]
        table = table.reset_index().sort_values(["layer", "head"], ignore_index=True)
        table.columns.name = None
    else:
        table = pd.DataFrame(columns=["layer", "head"])
    return Atlas(table, long, pd.DataFrame(missing, columns=["measure", "chapter", "path", "reason"]),
                 seen_model, sources)


def save_atlas(atlas: Atlas, results_dir: str | Path, params: dict[str, Any]) -> None:
    """Save ``head_atlas``, ``head_atlas_long`` and ``missing_measures`` with a config naming the sources."""
    records.write_config(results_dir, params, None, model=atlas.model, sources=atlas.sources)
    records.save_frames(results_dir, head_atlas=atlas.table, head_atlas_long=atlas.long,
                        missing_measures=atlas.missing)


def spearman_pairs(table: pd.DataFrame, measures: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Spearman correlation between every pair of measure columns and the number of heads in each pair.

    Returns:
        ``(rho, n)``: two square frames indexed by measure (pairwise complete observations).
    """
    measures = measures or [c for c in table.columns if c not in ("layer", "head")]
    values = table[measures].astype(float)
    rho = values.corr(method="spearman")
    present = values.notna().astype(int)
    n = present.T @ present
    return rho, n


def head_profile(table: pd.DataFrame, layer: int, head: int) -> pd.DataFrame:
    """One head's value, rank (1 = largest) and percentile for every measure in the atlas ``table``."""
    hit = table[(table["layer"] == layer) & (table["head"] == head)]
    if hit.empty:
        raise ValueError(f"head L{layer}H{head} is not in the atlas (layers 0..{table['layer'].max()}, "
                         f"heads 0..{table['head'].max()}).")
    rows = []
    for name in (c for c in table.columns if c not in ("layer", "head")):
        col = table[name].astype(float)
        value = float(hit[name].iloc[0])
        rows.append({"measure": name, "value": value,
                     "rank": int(col.rank(ascending=False, method="min")[hit.index[0]]) if pd.notna(value) else None,
                     "of": int(col.notna().sum()),
                     "percentile": float(100 * (col < value).sum() / max(col.notna().sum() - 1, 1))
                     if pd.notna(value) else float("nan")})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Several models
# --------------------------------------------------------------------------------------------------
def load_atlases(results_roots: list[str | Path]) -> dict[str, Atlas]:
    """:func:`load_atlas` of each results root (one model each), keyed by the model's spec.

    Roots whose model has the same spec are told apart by their fingerprint.

    Raises:
        ValueError: two roots holding results of the same model (same fingerprint), or none given.
    """
    if not results_roots:
        raise ValueError("results_roots is empty; give one results folder per model.")
    out: dict[str, Atlas] = {}
    seen: dict[str, str] = {}
    for root in results_roots:
        a = load_atlas(root)
        spec = str((a.model or {}).get("spec", Path(root).name))
        fp = str((a.model or {}).get("fingerprint", ""))
        if fp and fp in seen:
            raise ValueError(f"{root} and {seen[fp]} hold results of the same model (fingerprint {fp!r}).")
        seen[fp] = str(root)
        label = spec if spec not in out else f"{spec} ({fp or root})"
        out[label] = a
    return out


@dataclass
class CrossModel:
    """Several models' head atlases side by side.

    Attributes:
        long: ``model, layer, head, n_layers, depth, measure, value, percentile``: ``depth`` is
            ``layer / (n_layers - 1)`` (0 first layer, 1 last); ``percentile`` the head's rank among
            that model's heads on that measure, in ``[0, 1]`` (1 = largest).
        depth_profile: ``model, measure, depth_bin, depth, n_heads, mean, mean_percentile``: per bin
            of relative depth (``depth`` is the bin's centre).
        agreement: one row per pair of measures both present in at least one model: ``measure_a,
            measure_b``, one ``rho[<model>]`` column per model (Spearman over that model's heads, NaN
            where a model lacks a measure), ``n_models``, ``mean_rho``, ``min_rho``, ``max_rho`` and
            ``same_sign`` (every model's rho has the same sign; False with fewer than two models).
    """

    long: pd.DataFrame
    depth_profile: pd.DataFrame
    agreement: pd.DataFrame

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(self.long["model"]))

    def peaks(self) -> pd.DataFrame:
        """Per model and measure, the depth bin whose heads rank highest (``model, measure, depth_bin,
        depth, mean_percentile``); measures flat over depth in a model (no peak) are left out."""
        prof = self.depth_profile
        spread = prof.groupby(["model", "measure"])["mean_percentile"].transform(lambda x: x.max() - x.min())
        varying = prof[spread > 1e-9]  # (equal percentiles averaged over bins of different sizes round apart)
        best = varying.loc[varying.groupby(["model", "measure"], sort=False)["mean_percentile"].idxmax()]
        return best[["model", "measure", "depth_bin", "depth", "mean_percentile"]].reset_index(drop=True)

    def shared_peaks(self) -> pd.DataFrame:
        """Measures whose peak (:meth:`peaks`) is in the same depth bin in every model: ``measure,
        depth_bin, depth``."""
        peaks = self.peaks()
        per = peaks.groupby("measure", sort=False).agg(n_models=("model", "nunique"), n_bins=("depth_bin", "nunique"),
                                                       depth_bin=("depth_bin", "first"), depth=("depth", "first"))
        keep = (per["n_models"] == len(self.models)) & (per["n_bins"] == 1)
        return per.loc[keep, ["depth_bin", "depth"]].reset_index()


def compare_atlases(atlases: dict[str, Atlas], depth_bins: int = 4) -> CrossModel:
    """Compare the per-head measures of several models by relative depth, and which measures agree.

    Args:
        atlases: model label -> its :class:`Atlas` (e.g. from :func:`load_atlases`).
        depth_bins: number of equal bins of relative depth in ``depth_profile``.

    Returns:
        A :class:`CrossModel`.

    Raises:
        ValueError: no atlas, an atlas without measures, or ``depth_bins < 1``.
    """
    if not atlases:
        raise ValueError("No atlases to compare.")
    if depth_bins < 1:
        raise ValueError(f"depth_bins={depth_bins} must be at least 1.")
    longs, pairs = [], []
    for label, a in atlases.items():
        if not a.measures:
            raise ValueError(f"The atlas of {label!r} has no measures (missing: {list(a.missing['measure'])}).")
        n_layers = int((a.model or {}).get("n_layers") or int(a.table["layer"].max()) + 1)
        lg = a.long.dropna(subset=["value"]).copy()
        lg.insert(0, "model", label)
        lg["n_layers"] = n_layers
        lg["depth"] = lg["layer"] / max(n_layers - 1, 1)
        lg["percentile"] = lg.groupby("measure")["value"].rank(pct=True, method="average")
        longs.append(lg[["model", "layer", "head", "n_layers", "depth", "measure", "value", "percentile"]])
        rho, n = spearman_pairs(a.table, a.measures)
        for i, ma in enumerate(a.measures):
            for mb in a.measures[i + 1:]:
                pairs.append({"model": label, "measure_a": ma, "measure_b": mb, "rho": float(rho.loc[ma, mb]),
                              "n_heads": int(n.loc[ma, mb])})
    long = pd.concat(longs, ignore_index=True)
    edges = long["depth"].clip(0, 1) * depth_bins
    long_bins = edges.astype(int).clip(upper=depth_bins - 1)
    prof = (long.assign(depth_bin=long_bins)
            .groupby(["model", "measure", "depth_bin"], sort=False)
            .agg(n_heads=("value", "size"), mean=("value", "mean"), mean_percentile=("percentile", "mean"))
            .reset_index())
    prof.insert(3, "depth", (prof["depth_bin"] + 0.5) / depth_bins)
    agreement = _agreement(pd.DataFrame(pairs, columns=["model", "measure_a", "measure_b", "rho", "n_heads"]),
                           list(atlases))
    return CrossModel(long, prof, agreement)


def _agreement(pairs: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """One row per measure pair, one rho column per model, and how the models agree."""
    cols = ["measure_a", "measure_b", *[f"rho[{m}]" for m in models], "n_models", "mean_rho", "min_rho",
            "max_rho", "same_sign"]
    if pairs.empty:
        return pd.DataFrame(columns=cols)
    # the same pair may come in either order from different models: order each pair by name
    swap = pairs["measure_a"] > pairs["measure_b"]
    pairs.loc[swap, ["measure_a", "measure_b"]] = pairs.loc[swap, ["measure_b", "measure_a"]].to_numpy()
    wide = pairs.pivot_table(index=["measure_a", "measure_b"], columns="model", values="rho")
    wide = wide.reindex(columns=models)
    wide.columns = [f"rho[{m}]" for m in wide.columns]
    values = wide.to_numpy(dtype=float)
    present = ~np.isnan(values)
    out = wide.reset_index()
    out["n_models"] = present.sum(1)
    out["mean_rho"] = np.nanmean(np.where(present, values, np.nan), 1)
    out["min_rho"] = np.nanmin(np.where(present, values, np.inf), 1)
    out["max_rho"] = np.nanmax(np.where(present, values, -np.inf), 1)
    out["same_sign"] = (out["n_models"] >= 2) & ((out["min_rho"] > 0) | (out["max_rho"] < 0))
    out = out.assign(_strength=out["mean_rho"].abs()).sort_values(["same_sign", "_strength"], ascending=False)
    return out[cols].reset_index(drop=True)
