"""Rank stability per unit of compute: today's design vs headlab.headrank's, in one run.

Both designs rank every head by the expected drop of the logit difference under ``fraction_of_std``
noise (the same clean run, the same noise scales, the same exact engine). Each is run as three
independent replicates, A and B on the same prompts with disjoint noise seeds, C on disjoint prompts
with other seeds, and the replicates' rankings are compared at nested budgets:

* **today** (chapter 02 before this design): ``--today-prompts`` prompts (24 by default, the old CPU
  default), one sweep per seed; each (head, seed) has ONE prefix noise draw shared by all prompts, no
  label balance, no antithetic pairs. A budget is a number of seeds.
* **new** (:mod:`headlab.headrank`): label-balanced groups of ``--prompts-per-group`` prompts, each
  group with its own prefix draw, antithetic pairs (``--antithetic``), new prompts with every group.
  A budget is a number of groups (one draw per group in each replicate).

Stability at a budget: Spearman and top-10 overlap of A vs B (noise only) and of A vs C, B vs C
(prompts and noise). The targets: top-10 overlap >= 8 and Spearman >= 0.9. The compute a design needs
is the first budget meeting a target; when no measured budget does, it is extrapolated with the
Spearman-Brown formula from the largest budget (marked ``extrapolated``), unless the design has a
floor there (today's prompts are fixed, so more seeds cannot remove prompt sampling variance: marked
``floor``). Compute is counted as head-prompt evaluations (query rows), prefix passes and engine
seconds (measured per shard on this machine). Shards make a killed run resume.

Usage::

    python benchmarks/bench_rank_stability.py                       # all heads, CPU-sized budgets
    python benchmarks/bench_rank_stability.py --layers 0,3,6,9,12,15,18,21,24,27   # a third of the heads
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headlab import engine, headrank, metrics, rankcheck, stats, tasks
from headlab.edits import Setting, seed_for
from headlab.models import load_model
from headlab.shards import ShardStore, config_hash, run_grid

TARGET_SPEARMAN, TARGET_TOP10 = 0.9, 8


def today_seed(lm, clean, labels, prompts, heads, setting, seed, store, batch_size):
    """Today's design, one seed: every head on ``prompts``, one prefix draw per (head, seed)."""
    rows = [int(p) for p in prompts]
    edits = [Setting(setting.mode, setting.level, seed).edit(layer, h, clean) for layer, h in heads]
    point = {"design": "today", "seed": int(seed), "prompts": rows,
             "tokens": config_hash({"p": clean.enc.prefix.tolist(), "q": [clean.enc.queries[r].tolist() for r in rows]}),
             "heads": config_hash({"h": heads, "scale": [round(e.scale, 7) for e in edits]}),
             "setting": [setting.mode, setting.level]}

    def compute(_):
        y = np.asarray(labels)
        sign = np.where(y == 1, 1.0, -1.0)
        t0 = time.perf_counter()
        lp = engine.sweep_heads(lm, clean, edits, batch_size=batch_size, prompts=[rows] * len(edits))[:, rows]
        clean_ld = ((clean.logprobs[rows, 1] - clean.logprobs[rows, 0]).numpy() * sign[rows])
        drop = clean_ld[None] - (lp[..., 1] - lp[..., 0]).numpy() * sign[rows][None]
        frame = pd.DataFrame({"layer": np.repeat([h[0] for h in heads], len(rows)),
                              "head": np.repeat([h[1] for h in heads], len(rows)),
                              "prompt": np.tile(rows, len(heads)), "seed": int(seed), "drop": drop.reshape(-1),
                              "seconds": 0.0, "evaluations": 0, "prefix_passes": 0})
        frame.loc[0, ["seconds", "evaluations", "prefix_passes"]] = (time.perf_counter() - t0,
                                                                      len(edits) * len(rows), len(edits))
        return {"obs": frame}

    return run_grid([point], compute, store, progress=False)["obs"]


def effects(frame: pd.DataFrame, value: str) -> pd.Series:
    return frame.groupby(["layer", "head"])[value].mean()


def agreement(a: pd.Series, b: pd.Series) -> dict:
    r = metrics.rank_agreement(pd.concat({"a": a, "b": b}, axis=1).dropna()).iloc[0]
    return {"spearman": float(r["spearman"]), "kendall": float(r["kendall"]), "top10": int(r["top10_overlap"])}


def meets(s: dict) -> bool:
    return s["spearman"] >= TARGET_SPEARMAN and s["top10"] >= TARGET_TOP10


def needed(rows: list[dict], key: str, floor: bool) -> dict:
    """The first budget meeting the target for ``key`` ("noise" or "prompts"), or an extrapolation."""
    for r in rows:
        if meets(r[key]):
            return {"status": "measured", **{k: r[k] for k in ("budget", "evaluations", "prefix_passes", "seconds")}}
    last = rows[-1]
    rho = last[key]["spearman"]
    if floor:
        return {"status": "floor", "spearman_reached": rho, **{k: last[k] for k in ("budget", "evaluations", "seconds")}}
    if rho <= 0:
        return {"status": "unreachable", "spearman_reached": rho}
    factor = max(TARGET_SPEARMAN * (1 - rho) / (rho * (1 - TARGET_SPEARMAN)), 1.0)  # Spearman-Brown solved for k
    return {"status": "extrapolated", "factor": factor, "spearman_reached": rho,
            **{k: last[k] * factor for k in ("budget", "evaluations", "prefix_passes", "seconds")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-config", default="results/baseline/prompt_config.json",
                    help="baseline chapter's prompt (falls back to plain, 4 shots, draw 0)")
    ap.add_argument("--mode", default="fraction_of_std")
    ap.add_argument("--level", type=float, default=3.0)
    ap.add_argument("--today-prompts", type=int, default=24)
    ap.add_argument("--today-seeds", default="1,2,4", help="budgets of today's design: seeds per replicate")
    ap.add_argument("--prompts-per-group", type=int, default=4)
    ap.add_argument("--antithetic", type=int, default=1)
    ap.add_argument("--new-groups", default="3,6,12", help="budgets of the new design: groups per replicate")
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layers (heads of other layers are "
                    "left out; compute is reported for the heads measured)")
    ap.add_argument("--compare-prompt", default="quoted:16:0",
                    help="FORMAT:K:SHOT_SEED of the prompt the baseline chose before (the longest-prefix one); "
                         "one seed of today's design on --compare-layers runs with it and with the chosen prompt "
                         "to measure what the prompt costs per evaluation ('' to skip)")
    ap.add_argument("--compare-layers", default="0,10,20")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--shards", default="results/bench/rank_stability_shards")
    ap.add_argument("--out", default="results/bench/rank_stability.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()

    lm = load_model(args.model, device="auto", dtype="auto", attn_implementation="sdpa")
    config, splits, validated = tasks.load_prompt_setup(args.prompt_config, tasks.PromptConfig("plain", 4, 0))
    test = tasks.make_task(splits, "test", config)
    today_budgets = [int(x) for x in args.today_seeds.split(",")]
    new_budgets = [int(x) for x in args.new_groups.split(",")]
    M = args.prompts_per_group
    n_pool = M * -(-max(max(new_budgets) * M, args.today_prompts) // M)  # a multiple of M
    pools = headrank.replicate_pools(test.labels, M, n_pool, n_pools=2)
    task = test.subset(np.concatenate(pools))
    p1, p2 = np.arange(n_pool), np.arange(n_pool, 2 * n_pool)
    layers = range(lm.n_layers) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    heads = [(layer, h) for layer in layers for h in range(lm.n_heads)]
    enc = task.encode(lm)
    print(f"model {args.model} on {lm.device} ({torch.get_num_threads()} threads); prompt {config} "
          f"({'validated' if validated else 'NOT validated: baseline not run'}), prefix {len(enc.prefix)} tokens; "
          f"{len(heads)} heads; pools of {len(p1)} prompts", flush=True)
    clean = engine.clean_run(lm, enc, task.label_ids(lm), batch_size=args.batch_size)
    store = ShardStore(args.shards, {"model": lm.fingerprint or lm.spec, "task": config.__dict__,
                                     "prompts": config_hash({"q": list(task.queries["text"])})}, lm=lm)
    setting = Setting(args.mode, args.level)
    y = task.labels
    # today's prompts: the first prompts of each pool (label-balanced, as head(24) of the test split nearly is)
    today_prompts = {"P1": p1[: args.today_prompts], "P2": p2[: args.today_prompts]}

    # ---- today's design: replicate x seed sweeps -----------------------------------------------
    s_max = max(today_budgets)
    reps = {"A": ("P1", 1000), "B": ("P1", 2000), "C": ("P2", 3000)}
    today_obs = {}
    for name, (pool, base) in reps.items():
        parts = []
        for i in range(s_max):
            parts.append(today_seed(lm, clean, y, today_prompts[pool], heads, setting, base + i, store,
                                    args.batch_size).assign(order=i))
            print(f"today {name}: seed {i + 1}/{s_max} ({parts[-1]['seconds'].sum():.0f} s)", flush=True)
        today_obs[name] = pd.concat(parts, ignore_index=True)

    # ---- new design: replicate x group ------------------------------------------------------------
    g_max = max(new_budgets)
    new_obs = {}
    for name, (pool, base) in reps.items():
        design = headrank.RankDesign(args.mode, args.level, M, (g_max,), draws=1, antithetic=bool(args.antithetic),
                                     seed=seed_for("bench", base))
        new_obs[name] = headrank.run_groups(lm, clean, y, design, p1 if pool == "P1" else p2, heads, range(g_max),
                                            store, batch_size=args.batch_size)
        print(f"new {name}: {g_max} groups ({new_obs[name]['seconds'].sum():.0f} s)", flush=True)

    # ---- stability at nested budgets -------------------------------------------------------------
    def budget_rows(obs: dict, budgets: list[int], select, value: str) -> list[dict]:
        rows = []
        for b in budgets:
            sub = {k: select(o, b) for k, o in obs.items()}
            est = {k: effects(f, value) for k, f in sub.items()}
            used = {k: (int(f["evaluations"].sum()), int(f["prefix_passes"].sum()), float(f["seconds"].sum()))
                    for k, f in sub.items()}
            ab, ac, bc = agreement(est["A"], est["B"]), agreement(est["A"], est["C"]), agreement(est["B"], est["C"])
            prompts = min(ac, bc, key=lambda s: s["spearman"])
            rows.append({"budget": b, "evaluations": np.mean([u[0] for u in used.values()]),
                         "prefix_passes": np.mean([u[1] for u in used.values()]),
                         "seconds": np.mean([u[2] for u in used.values()]),
                         "noise": ab, "prompts": prompts, "prompts_AC": ac, "prompts_BC": bc})
        return rows

    today_rows = budget_rows(today_obs, today_budgets, lambda o, b: o[o["order"] < b], "drop")
    for o in new_obs.values():
        o["effect"] = headrank.effect_column(o)
    new_rows = budget_rows(new_obs, new_budgets, lambda o, b: o[o["group"] < b], "effect")

    # ---- are the intervals honest? z of independent replicates with disjoint prompts and noise ------
    # today's default (2 seeds) with its prompt-bootstrap standard error, the new design at its largest
    # budget with the cluster standard error: with honest errors, |z| < 1.96 for about 95% of heads
    def today_se(frame: pd.DataFrame) -> pd.DataFrame:
        per_prompt = frame.groupby(["layer", "head", "prompt"])["drop"].mean().unstack("prompt")
        est, se, df = stats.cluster_se(per_prompt.to_numpy())
        return pd.DataFrame({"effect": est, "se": se, "df": df}, index=per_prompt.index)

    def z_share(a: pd.DataFrame, c: pd.DataFrame) -> float:
        """Share of heads whose |A - C| is within the two-sided 95% t quantile (df: both estimates')."""
        from scipy import stats as sps

        j = a.merge(c, left_index=True, right_index=True, suffixes=("_a", "_c"))
        t = (j["effect_a"] - j["effect_c"]).abs() / np.hypot(j["se_a"], j["se_c"])
        return float((t < sps.t.ppf(0.975, j["df_a"] + j["df_c"])).mean())
    two = min(2, s_max)
    today_z = z_share(*(today_se(today_obs[k][today_obs[k]["order"] < two]) for k in ("A", "C")))
    new_z = z_share(*(headrank.rank_table(new_obs[k], n_boot=100).set_index(["layer", "head"])[["effect", "se", "df"]]
                      for k in ("A", "C")))
    efficiency = rankcheck.antithetic_efficiency(new_obs["A"]) if args.antithetic else None

    # ---- what one prefix pass and one query row cost (least squares over every shard) ---------------
    parts = [*today_obs.values(), *new_obs.values()]
    shard_rows = pd.concat([o[o["seconds"] > 0][["evaluations", "prefix_passes", "seconds"]] for o in parts])
    coef, *_ = np.linalg.lstsq(shard_rows[["prefix_passes", "evaluations"]].to_numpy(float),
                               shard_rows["seconds"].to_numpy(float), rcond=None)
    unit_cost = {"seconds_per_prefix_pass": float(coef[0]), "seconds_per_query_row": float(coef[1])}

    # ---- what the prompt costs: today's design, one seed, a few layers, chosen vs longer prompt -------
    prompt_cost = None
    if args.compare_prompt:
        fmt, k, shot = args.compare_prompt.split(":")
        cmp_layers = [int(x) for x in args.compare_layers.split(",")]
        cmp_heads = [(layer, h) for layer in cmp_layers for h in range(lm.n_heads)]
        rows = {}
        for name, cfg in [("chosen", config), ("compare", tasks.PromptConfig(fmt, int(k), int(shot)))]:
            t_cmp = tasks.make_task(splits, "test", cfg).subset(np.concatenate(pools)[: args.today_prompts])
            c_cmp = engine.clean_run(lm, t_cmp.encode(lm), t_cmp.label_ids(lm), batch_size=args.batch_size)
            t0 = time.perf_counter()
            engine.sweep_heads(lm, c_cmp, [setting.edit(layer, h, c_cmp) for layer, h in cmp_heads],
                               batch_size=args.batch_size)
            rows[name] = {"prompt": cfg.__dict__, "prefix_tokens": len(t_cmp.encode(lm).prefix),
                          "seconds": time.perf_counter() - t0}
        prompt_cost = {**rows, "layers": cmp_layers, "n_prompts": args.today_prompts,
                       "seconds_ratio_compare_over_chosen": rows["compare"]["seconds"] / rows["chosen"]["seconds"]}

    # ---- report -----------------------------------------------------------------------------------
    result = {"model": args.model, "device": str(lm.device), "threads": torch.get_num_threads(),
              "prompt": config.__dict__, "prefix_tokens": len(enc.prefix), "n_heads": len(heads),
              "args": vars(args), "today": today_rows, "new": new_rows}
    need = {d: {k: needed(rows, k, floor=(d == "today" and k == "prompts")) for k in ("noise", "prompts")}
            for d, rows in (("today", today_rows), ("new", new_rows))}
    result["needed"] = need
    ratios = {}
    for k in ("noise", "prompts"):
        t, n = need["today"][k], need["new"][k]
        if "evaluations" in t and "evaluations" in n and t["status"] != "floor":
            ratios[k] = {"evaluations": t["evaluations"] / n["evaluations"], "seconds": t["seconds"] / n["seconds"]}
    result["ratio_today_over_new"] = ratios
    result["interval_check"] = {
        "today_share_abs_z_below_1.96": today_z, "new_share_abs_z_below_1.96": new_z,
        "note": "z = (replicate A - replicate C) / combined standard error, disjoint prompts and noise; "
                f"today at {two} seeds (prompt-bootstrap error), new at {max(new_budgets)} groups (cluster error); "
                "honest errors give about 0.95 (critical value: t with both estimates' degrees of freedom)"}
    if efficiency is not None:
        result["antithetic_efficiency_median"] = float(efficiency["efficiency"].median())
    result["unit_cost"] = unit_cost
    result["prompt_cost"] = prompt_cost
    result["wall_seconds"] = time.time() - t_start

    def line(d: str, r: dict) -> str:
        return (f"  {d:5s} budget {r['budget']:>3}: {r['evaluations']:>9,.0f} evals, {r['prefix_passes']:>7,.0f} prefix "
                f"passes, {r['seconds']:>7.0f} s | noise: Spearman {r['noise']['spearman']:.2f}, top-10 "
                f"{r['noise']['top10']}/10 | prompts: Spearman {r['prompts']['spearman']:.2f}, top-10 {r['prompts']['top10']}/10")

    print("\nstability of independent replicates (compute per replicate):")
    for d, rows in (("today", today_rows), ("new", new_rows)):
        for r in rows:
            print(line(d, r))
    print("\ncompute to reach Spearman >= 0.9 and top-10 overlap >= 8 (per replicate):")
    for d in ("today", "new"):
        for k in ("noise", "prompts"):
            n = need[d][k]
            desc = (f"{n['evaluations']:,.0f} evals, {n['seconds']:.0f} s" if "evaluations" in n else "")
            factor = f" x{n['factor']:.1f}" if "factor" in n else ""
            print(f"  {d:5s} {k:7s}: {n['status']}{factor} {desc}"
                  + (f" (Spearman reached {n['spearman_reached']:.2f})" if "spearman_reached" in n else ""))
    for k, r in ratios.items():
        print(f"RATIO today/new ({k}): {r['evaluations']:.1f}x evaluations, {r['seconds']:.1f}x seconds")
    print(f"interval check (|z| < 1.96 between disjoint replicates; honest: ~95%): today {today_z:.0%}, new {new_z:.0%}")
    if efficiency is not None:
        print(f"antithetic efficiency (median over heads): {result['antithetic_efficiency_median']:.2f}")
    print(f"unit cost on this machine: {unit_cost['seconds_per_prefix_pass'] * 1e3:.1f} ms per prefix pass, "
          f"{unit_cost['seconds_per_query_row'] * 1e3:.1f} ms per query row (averaged over the heads' layers)")
    if prompt_cost:
        print(f"prompt cost: today's design, {args.today_prompts} prompts, layers {prompt_cost['layers']}: "
              f"{prompt_cost['chosen']['prefix_tokens']}-token prefix {prompt_cost['chosen']['seconds']:.1f} s vs "
              f"{prompt_cost['compare']['prefix_tokens']}-token prefix {prompt_cost['compare']['seconds']:.1f} s "
              f"({prompt_cost['seconds_ratio_compare_over_chosen']:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(f"written {args.out} ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
