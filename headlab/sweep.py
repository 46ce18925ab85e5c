"""Resumable sweeps: one Parquet shard per grid point, named by a hash of its configuration.

A sweep is a list of configuration dicts and a function that turns one configuration into a tidy
frame. :class:`ShardStore` writes each frame atomically (temporary file + rename) next to a JSON
copy of its configuration; a rerun skips every point whose shard exists, so a sweep killed midway
resumes where it stopped and ends with the same table as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["MODES", "ShardStore", "config_hash", "head_edits", "head_sweep", "rank_heads", "run_grid", "seed_agreement"]


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
