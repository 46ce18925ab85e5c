"""Head sweeps on the few-shot task: perturb every head under each setting, then rank the heads.

A *setting* is a noise mode with a level and a seed, or an ablation. :func:`head_sweep` runs it on
every head of every layer through the exact engine (:func:`headlab.engine.sweep_heads`), one resumable
shard per (setting, layer); :func:`rank_heads` turns the per-prompt changes into a ranking with
intervals, and :func:`seed_agreement` says how well noise seeds agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor

from headlab import engine, metrics
from headlab.edits import MODES, Setting
from headlab.models import LoadedModel
from headlab.schema import Field, check_value, check_variant
from headlab.shards import ShardStore, config_hash, run_grid
from headlab.tasks import FewShotTask

__all__ = ["MODES", "SETTING_FIELDS", "head_sweep", "rank_heads", "seed_agreement"]

_NOISE = {"level": Field("float", low=0), "seed": Field("int", low=0, default=0)}
_ABLATE = {"level": Field("float", required=False), "seed": Field("int", required=False)}  # ignored
#: The schema of a setting of each mode (:mod:`headlab.schema`): a noise mode needs a finite
#: ``level >= 0`` (``seed`` defaults to 0); an ablation ignores ``level`` and ``seed``.
SETTING_FIELDS = {m: _NOISE if m not in ("zero", "mean") else _ABLATE for m in MODES}


def head_sweep(
    lm: LoadedModel,
    task: FewShotTask,
    settings: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    layers: Iterable[int] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Perturb every head of every layer under each setting; resumable, one shard per (setting, layer).

    Args:
        lm: the model.
        task: a :class:`headlab.tasks.FewShotTask` (its calibrated threshold is used for accuracy).
        settings: dicts with ``mode`` (see :data:`MODES`), ``level`` and ``seed``, each read as a
            :class:`headlab.edits.Setting` (validated before any work).
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
    settings = list(settings)
    if not settings:
        raise ValueError("settings is empty; give at least one dict with 'mode' (and 'level', 'seed').")
    # fail before any work or file, not at the first bad grid point: keys by the schema, values by Setting
    settings = [check_variant(s, "mode", SETTING_FIELDS, f"setting {i} {s!r}") for i, s in enumerate(settings)]
    for s in settings:
        Setting.parse(s)
    layers = list(range(lm.n_layers)) if layers is None else check_value(
        layers, Field("list", items=Field("int", low=0, high=lm.n_layers - 1), nonempty=True), "layers")
    check_value(batch_size, Field("int", low=1), "batch_size")
    enc = task.encode(lm)
    clean = engine.clean_run(lm, enc, task.label_ids(lm), batch_size=batch_size)
    y = task.labels
    thr = task.config.threshold
    base = _task_scores(y, clean.logprobs, thr)
    store = ShardStore(out_dir, {"model": lm.fingerprint or lm.spec, "task": task.config.__dict__,
                                 "n_prompts": len(y), "prompts": config_hash(enc)}, lm=lm)
    points = [{**s, "layer": layer} for s in settings for layer in layers]

    def compute(point: dict[str, Any]) -> dict[str, pd.DataFrame]:
        setting = Setting.parse(point)
        edits = [setting.edit(point["layer"], h, clean) for h in range(lm.n_heads)]
        lp = engine.sweep_heads(lm, clean, edits, batch_size=batch_size)
        rows = []
        for e, lp_e in zip(edits, lp):
            s = _task_scores(y, lp_e, thr)
            rows.append({"model": lm.spec, "layer": e.layer, "head": e.head, "mode": setting.mode,
                         "level": setting.level, "seed": setting.seed, "scale": e.scale, "n": len(y), **s,
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
            long[k] = getattr(setting, k)
        return {"heads": frame, "prompts": long}

    tables = run_grid(points, compute, store, progress=progress)
    return tables["heads"], tables["prompts"]


def _task_scores(y: np.ndarray, logprobs: Float[Tensor, "N 2"] | np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy / macro-F1 at the calibrated threshold, mean logit difference and p(correct)."""
    lp = np.asarray(logprobs, dtype=float)
    diff = lp[:, 1] - lp[:, 0]
    pred = (diff > threshold).astype(int)
    return {
        "accuracy": metrics.accuracy(y, pred),
        "macro_f1": metrics.macro_f1(y, pred, 2),
        "logit_diff": float(np.mean(np.where(y == 1, diff, -diff))),
        "p_correct": float(np.mean(np.exp(np.where(y == 1, lp[:, 1], lp[:, 0])))),
    }


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
