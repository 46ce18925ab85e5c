# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Noise perturbation: which attention heads does few-shot sentiment rely on?
#
# We add Gaussian noise to the output of **one** attention head at a time, in every layer, and
# measure how much the model's few-shot sentiment judgement degrades. A head whose perturbation hurts
# a lot carries information the task uses; a head that can be drowned in noise without effect does
# not. Zero-ablation of the same heads runs beside it, so we can see whether noise and ablation point
# at the same heads.
#
# **What exactly is perturbed.** A head's output is its slice $z_h \in \mathbb{R}^{d_\text{head}}$ of
# the input of the attention output projection ($W_O$), at every position of the prompt (the shared
# few-shot prefix and the query). We add $\sigma\,\varepsilon$ with $\varepsilon \sim \mathcal{N}(0, I)$.
# **Noise scale.** `absolute`: $\sigma$ = level. `fraction_of_max` (seed 000's mode): $\sigma$ = level
# $\times \max |z_h|$ over every position of the prefix and of all scored queries in the clean run.
# `fraction_of_std`: $\sigma$ = level $\times$ the standard deviation of the same values.
#
# **What a head's effect is.** $\theta_h = \mathbb{E}_\text{prompt}\,\mathbb{E}_\varepsilon[\text{drop}]$:
# the expected drop of the logit difference toward the correct label
# ($\log p(\text{correct}) - \log p(\text{other})$), over prompts from the test split and over noise
# draws. The seed scripts estimate it with one fresh draw per prompt. Three sources of variance stand
# between a finite experiment and $\theta_h$: which **prompts** were scored, the noise drawn on the
# shared few-shot **prefix**, and the noise drawn on each prompt's own **query** tokens.
#
# **How the experiment is designed** (`headlab.headrank`), so that the ranking reproduces:
#
# * *Prefix-draw groups.* The exact engine runs the shared prefix once per edit, so every prompt of
#   one call shares the prefix's noise: with one call per (head, seed), as this chapter did before,
#   the prefix noise had as many independent draws as seeds (two), however many prompts were scored.
#   Now the prompts are split into small label-balanced groups, each with its own draw; the prefix is
#   still run once per edit and group.
# * *Antithetic pairs.* Every draw $\varepsilon$ is also scored as $-\varepsilon$ and the two drops
#   averaged: the part of the drop that is odd in $\varepsilon$ -- above all the first-order term,
#   zero on average and large -- cancels exactly; the even part, which carries $\theta_h$, stays.
# * *Common prompts.* Every head is scored on the same groups, so comparisons between heads are paired.
# * *Racing.* Phase 1 measures every head; each later phase adds new groups (new prompts, new draws)
#   only for the heads whose rank interval still crosses the top-$k$ boundary.
# * *Honest intervals.* A group with its prompts and draws is the unit of independent replication: a
#   cluster bootstrap over groups (jointly for all heads) gives 95% intervals that contain every
#   source of variance (their coverage is checked by simulation in the test suite), rank intervals
#   (where each head's rank could lie) and p-values corrected for testing every head at once.
# * *Reproducibility, measured.* The design runs three times: runs A and B on the same prompts with
#   disjoint noise seeds, run C on disjoint prompts with another seed. How well independent runs
#   agree is the stability of the ranking; the reported ranking pools all three.
#
# Every number is the exact engine's (`headlab.engine.sweep_heads`, tested equal to a plain forward
# per perturbed prompt); one shard per group is written, so a killed run resumes where it stopped.

# %% tags=["parameters"]
model: str = "smollm2-135m"  # embedded name, .gguf path, local directory or hub id
device: str = "auto"  # "auto", "cpu" or "cuda"
dtype: str = "auto"  # "auto" (fp32 on CPU, bf16 on CUDA), "float32", "bfloat16", "float16"
device_map: str = ""  # "auto": spread a model too big for one GPU over all GPUs (accelerate); "": off
data_source: str = "rotten_tomatoes"  # used only when the baseline recorded no split
split_seed: int = 0  # used only when the baseline recorded no split
prompt_config: str = "results/baseline/prompt_config.json"  # written by the baseline chapter
noise_mode: str = "fraction_of_std"  # "absolute", "fraction_of_max" or "fraction_of_std"
noise_level: float = 3.0  # noise std in units of the mode's scale
prompts_per_group: int = 4  # prompts sharing one prefix noise draw (even: half of each label)
phases: list = []  # groups per phase of each run; []: auto (CPU [14, 4], CUDA [64, 32, 32])
antithetic: bool = True  # score every draw as +eps and -eps and average
top_k: int = 10  # the top set the racing settles and the chapter reports
run_seeds: list = [0, 1, 2]  # noise seeds of runs A, B (same prompts as A), C (disjoint prompts)
ablations: list = ["zero"]  # companion ablations of each head ("zero", "mean"; [] to skip)
reference_heads: int = 3  # heads checked against the seeds' semantics (fresh noise per prompt)
reference_draws: int = 2  # draws per prompt in that check
layers: list = []  # layers to measure; []: all
batch_size: int = 64  # (head, prompt) rows per forward pass
n_boot: int = 2000  # bootstrap resamples for intervals and rank intervals
torch_threads: int = 0  # CPU threads for torch (0: torch's default; 1 is faster on a busy machine)
results_dir: str = "results/noise"  # shards, tables and the run's config

# %%
import time
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from headlab import chapter, engine, headrank, metrics, plots, records, stats, tasks, widgets
from headlab.shards import ShardStore, config_hash

t_start = time.time()
params = chapter.parameters(globals())
# No attention weights are needed here, so the faster fused attention is used.
lm = chapter.load(params, attn_implementation="sdpa")
pd.Series(lm.describe()).to_frame("model")

# %% [markdown]
# ## The task, the prompt pools and the clean baseline
#
# The prompt (format, number of shots, shot draw, decision threshold) is the one the baseline chapter
# chose on its dev split. Two disjoint pools of test prompts are cut from its test split, each ordered
# so that every group of `prompts_per_group` holds both labels equally: pool 1 for runs A and B, pool 2
# for run C.

# %%
on_gpu = lm.device.type == "cuda"
phases = params["phases"] = [int(g) for g in phases] or ([64, 32, 32] if on_gpu else [14, 4])
if len(run_seeds) != 3 or len(set(run_seeds)) != 3:
    raise ValueError(f"run_seeds={run_seeds}: give three different seeds (runs A, B, C).")
design_a = headrank.RankDesign(noise_mode, noise_level, prompts_per_group, tuple(phases), antithetic, top_k,
                               seed=int(run_seeds[0]))
config, splits, validated = tasks.load_prompt_setup(prompt_config, tasks.PromptConfig("plain", 4, 0),
                                                    source=data_source, seed=split_seed)
if not validated:
    display(Markdown(f"**Warning:** `{prompt_config}` not found; using an unvalidated default prompt. "
                     "Run the baseline chapter first."))
test = tasks.make_task(splits, "test", config)
pools = headrank.replicate_pools(test.labels, prompts_per_group, design_a.n_prompts, n_pools=2)
task = test.subset(np.concatenate(pools))  # pool 1 = prompts 0..n-1, pool 2 = n..2n-1 of `task`
n_pool = design_a.n_prompts
pool_idx = {"P1": np.arange(n_pool), "P2": np.arange(n_pool, 2 * n_pool)}
heads = [(layer, h) for layer in (layers or range(lm.n_layers)) for h in range(lm.n_heads)]
t0 = time.time()
clean = engine.clean_run(lm, task.encode(lm), task.label_ids(lm), batch_size=batch_size)
clean_seconds = time.time() - t0
report = metrics.classification_report(task.labels, clean.logprobs.numpy(), threshold=config.threshold,
                                       n_boot=n_boot)
warn = metrics.chance_warnings(task.labels, task.predictions(clean.logprobs),
                               (clean.logprobs[:, 1] - clean.logprobs[:, 0]).numpy())
display(Markdown(
    f"Prompt: **{config.format}**, {config.k} shots (draw {config.shot_seed}), "
    f"{len(task.encode(lm).prefix)} prefix tokens, threshold {config.threshold:+.2f}. "
    f"Two pools of {n_pool} test prompts ({len(phases)} phase(s) of {phases} groups of {prompts_per_group}). "
    "Chance check: " + ("**NEAR CHANCE: " + "; ".join(warn) + "** - the effects below would measure nothing."
                        if warn else "clear of chance.")))
report.round(3)

# %% [markdown]
# ## Three runs of the design
#
# Each run measures every head in phase 1, then races: each later phase adds groups only for the
# heads still tied at the top-`top_k` boundary. The table lists what each run spent.

# %%
run_pool = {"A": "P1", "B": "P1", "C": "P2"}
store = ShardStore(Path(results_dir) / "shards", {
    "model": lm.fingerprint or lm.spec, "task": config.__dict__,
    "prompts": config_hash({"q": list(task.queries["text"])}), "heads": config_hash({"h": heads})})
runs, spent = {}, []
for name, seed in zip("ABC", run_seeds):
    design = headrank.RankDesign(noise_mode, noise_level, prompts_per_group, tuple(phases), antithetic, top_k,
                                 seed=int(seed))
    runs[name] = headrank.race(lm, clean, task.labels, design, pool_idx[run_pool[name]], store, heads=heads,
                               batch_size=batch_size, n_boot=n_boot, threshold=config.threshold,
                               progress=lambda s, n=name: print(f"run {n}: {s}", flush=True))
    per_phase = headrank.phase_log(runs[name])
    spent.append({"run": name, "seed": int(seed), "pool": run_pool[name],
                  "heads per phase": per_phase["heads"].tolist(), "groups per phase": per_phase["groups"].tolist(),
                  **headrank.compute_used(runs[name])})
spent = pd.DataFrame(spent)
spent

# %% [markdown]
# ## The ranking
#
# All three runs pooled: a head's effect is its mean drop over every group it was measured on. The
# intervals resample groups (runs A and B share their prompt groups, so a group of pool 1 is resampled
# with both runs' draws; pool 2's groups are clusters of their own), within each phase, jointly for
# all heads. The rank interval says where a head's rank could lie (simultaneous comparisons with every
# other head); `status` says whether it is surely inside the top `top_k` (`in`), surely outside
# (`out`), or tied with heads across the boundary (`tied`).

# %%
pooled = headrank.pool_runs(runs, run_pool)
ranking = headrank.rank_table(pooled, top_k=top_k, n_boot=n_boot, cluster="block", stratum="stratum")
ranking = ranking.merge(headrank.accuracy_drops(pooled), on=["layer", "head"])
ranking["category"] = metrics.impact_category(100 * ranking["accuracy_drop"])
fig = plots.ranked_effects(ranking, top=30, title=f"{noise_mode} noise, level {noise_level:g}: top 30 heads",
                           xlabel="logit-difference drop (95% CI: prompts, prefix and query noise)")

# %%
fig = plots.rank_ranges(ranking, top=30, k=top_k, title=f"where the top 30 heads could rank (95%)")

# %%
cols = ["rank", "layer", "head", "effect", "effect_low", "effect_high", "rank_low", "rank_high", "status",
        "p_holm", "q_bh", "accuracy_drop", "n_clusters"]
ranking[cols].head(20).round(3)

# %% [markdown]
# ## How many heads matter at all?
#
# Each head is tested for a non-zero effect (two-sided t test with the cluster-robust standard error of
# its mean; p-values from the t distribution because a bootstrap cannot resolve p-values near
# 0.05 / number of heads). Holm's correction keeps the chance of *any* false claim at 5%
# (family-wise error rate, valid under any dependence); Benjamini-Hochberg keeps the expected share of
# false claims among the claimed heads at 5% (false discovery rate).

# %%
counts = headrank.significance_counts(ranking)
counts

# %% [markdown]
# Accuracy changes by whole prompts, so most heads fall in seed 001's LOW impact category even when
# the logit difference moves clearly; the logit difference is the primary measure.

# %%
ranking["category"].value_counts().reindex(["HIGH", "MEDIUM", "LOW"]).fillna(0).astype(int).to_frame("heads")

# %% [markdown]
# ## Where the uncertainty comes from
#
# Runs A and B score the same prompts in the same groups with independent draws, so their phase 1
# separates the variance of one run's estimate into its sources (method of moments on the group x
# prompt x draw table; label differences, which cancel in every balanced group, are left out):
# **prompts** (the head's effect differs between prompts), **prefix noise** (one draw shared by a
# group's prompts) and **query noise** (each prompt's own draw, with how its response to the prefix
# draw differs from the group's). Shares are of the variance of one run's phase-1 mean.

# %%
ab1 = pooled[pooled["run"].isin(["A", "B"]) & (pooled["phase"] == 1)].copy()
ab1["effect"] = headrank.effect_column(ab1)
ab1["draw"] = ab1["run"]
components = stats.variance_components(ab1, "effect", group="block", balance="label")
variance = stats.design_variance(components, n_prompts=phases[0] * prompts_per_group, n_groups=phases[0])
variance = ranking[["rank", "layer", "head", "effect"]].merge(variance, on=["layer", "head"])
shares = ["share_prompts", "share_prefix", "share_query"]
summary = pd.DataFrame({
    "median share over heads": variance[shares].median(),
    f"median share, top {top_k}": variance.head(top_k)[shares].median(),
    "share of the summed variance": variance[["from_prompts", "from_prefix", "from_query"]].sum().to_numpy()
    / variance["variance"].sum(),
}).rename(index=lambda s: s.replace("share_", ""))
summary.round(3)

# %%
variance[["rank", "layer", "head", "effect", "variance"] + shares].head(15).round(4)

# %% [markdown]
# What the antithetic pairs bought, per head (run A, phase 1): the variance of a group mean of single
# draws over twice the variance of a group mean of pairs. A pair costs two evaluations, so above 1 the
# pairs beat the same number of independent draws.

# %%
efficiency = headrank.antithetic_efficiency(runs["A"]) if antithetic else pd.DataFrame()
efficiency["efficiency"].describe(percentiles=[0.1, 0.5, 0.9]).round(2).to_frame("antithetic efficiency") \
    if antithetic else None

# %% [markdown]
# ## Is the ranking reproducible?
#
# Each run alone is a complete ranking. A vs B: same prompts, disjoint noise seeds (how much the noise
# moves the ranking). A vs C and B vs C: disjoint prompt samples and seeds (everything a reader who
# re-runs the chapter on other prompts would change). The targets: top-10 overlap >= 8 and Spearman
# >= 0.9.

# %%
run_tables = {name: headrank.rank_table(obs, top_k=top_k, n_boot=200) for name, obs in runs.items()}
stability = headrank.agreement(run_tables)
stability["what differs"] = ["noise seeds" if {a, b} == {"A", "B"} else "prompts and noise seeds"
                             for a, b in zip(stability["a"], stability["b"])]
stability.round(3)

# %%
pair = run_tables["A"][["layer", "head", "effect"]].rename(columns={"effect": "run A"})
pair = pair.merge(run_tables["B"][["layer", "head", "effect"]].rename(columns={"effect": "run B"}), on=["layer", "head"])
pair = pair.merge(run_tables["C"][["layer", "head", "effect"]].rename(columns={"effect": "run C"}), on=["layer", "head"])
fig = plots.compare_scatter(pair, "run A", "run B", title="A vs B (disjoint seeds)")

# %%
fig = plots.compare_scatter(pair, "run A", "run C", title="A vs C (disjoint prompts)")

# %% [markdown]
# ## Checked against the seeds' semantics
#
# The seed scripts draw fresh noise at every position of every prompt, prefix included. The plain hook
# path (`headlab.interventions.noise_heads`, no engine, no shared prefix, no antithetic pairs) does
# exactly that; on a few heads (the top two and the head at the top-k boundary) it must estimate the
# same expected effect as the design, within the intervals.

# %%
picks = ranking.iloc[sorted({0, 1, min(top_k, len(ranking)) - 1})][: max(reference_heads, 0)]
ref_heads = list(zip(picks["layer"].astype(int), picks["head"].astype(int)))
t0 = time.time()
ref_obs = headrank.reference_effects(lm, task, design_a, ref_heads, pool_idx["P1"][: phases[0] * prompts_per_group],
                                     draws=reference_draws, clean=clean) if ref_heads else pd.DataFrame()
reference_seconds = time.time() - t0
if ref_heads:
    ref = headrank.rank_table(ref_obs.assign(phase=1), "drop", cluster="prompt", n_boot=n_boot)
    check = picks[["layer", "head", "effect", "effect_low", "effect_high", "se"]].merge(
        ref[["layer", "head", "effect", "effect_low", "effect_high", "se"]], on=["layer", "head"],
        suffixes=("_design", "_reference"))
    check["difference"] = check["effect_design"] - check["effect_reference"]
    check["z"] = check["difference"] / np.hypot(check["se_design"], check["se_reference"])
    check["agree (|z| < 1.96)"] = check["z"].abs() < 1.96
    display(check.round(3))

# %% [markdown]
# ## Where the important heads sit

# %%
fig = plots.head_heatmap(ranking, "effect", title=f"logit-difference drop, {noise_mode} {noise_level:g} (3 runs pooled)")

# %% [markdown]
# ## Does ablation rank heads like noise does?
#
# Zero ablation is deterministic, so only the prompts vary: each head is scored on pool 1's phase-1
# prompts, the intervals resample prompts, and the same tests and corrections apply.

# %%
ablation_tables, compare = {}, ranking[["layer", "head", "effect"]].rename(columns={"effect": "noise"})
abl_prompts = pool_idx["P1"][: phases[0] * prompts_per_group]
t0 = time.time()
for m in ablations:
    obs = headrank.ablation_observations(lm, clean, task.labels, abl_prompts, m, heads=heads, batch_size=batch_size)
    ablation_tables[m] = headrank.rank_table(obs.assign(phase=1), "drop", top_k=top_k, n_boot=n_boot, cluster="prompt")
    compare = compare.merge(ablation_tables[m][["layer", "head", "effect"]].rename(
        columns={"effect": f"{m}_ablation"}), on=["layer", "head"])
ablation_seconds = time.time() - t0
for m in ablations:
    fig = plots.compare_scatter(compare, "noise", f"{m}_ablation", title=f"noise vs {m} ablation")
if ablations:
    display(pd.concat({m: headrank.significance_counts(t) for m, t in ablation_tables.items()}, names=["ablation"]))
    display(pd.concat({m: t[cols[:10]].head(10) for m, t in ablation_tables.items()}, names=["ablation"]).round(3))

# %% [markdown]
# ## Explore
#
# Pick a run (or the mean over runs): the layer x head map of its logit-difference drops. In the static
# book the widget shows its first state; in JupyterLab every choice redraws.

# %%
explore = pd.concat([t.assign(mode=noise_mode, level=noise_level, seed=int(s))
                     for (name, t), s in zip(run_tables.items(), run_seeds)]).rename(columns={"effect": "logit_diff_drop"})
widgets.sweep_explorer(explore, metrics=("logit_diff_drop",))

# %% [markdown]
# ## What we saw

# %%
cal = report.set_index("metric")
sab = stability[stability["what differs"] == "noise seeds"].iloc[0]
spr = stability[stability["what differs"] != "noise seeds"]
status = ranking["status"].value_counts()
tied = ranking[ranking["status"] == "tied"]
holm = counts.set_index("test").loc["Holm (FWER)"]
bh = counts.set_index("test").loc["Benjamini-Hochberg (FDR)"]
evals = int(spent["evaluations"].sum())
sweep_seconds = float(spent["seconds"].sum())


def target(ok: bool) -> str:
    return "meets the target" if ok else "**misses the target**"


chapter.bullets([
    f"Clean: accuracy {cal.loc['accuracy', 'value']:.3f}, mean logit difference "
    f"{cal.loc['logit_diff', 'value']:.2f} on the {len(task.labels)} prompts of both pools.",
    f"Three runs: {evals:,} head-prompt evaluations and {int(spent['prefix_passes'].sum()):,} prefix passes in "
    f"{sweep_seconds:.0f} s ({evals / max(sweep_seconds, 1e-9):.0f} evaluations per second).",
    f"Top heads under {noise_mode} noise at level {noise_level:g} (logit-difference drop, 95% CI, rank interval): "
    + ", ".join(f"{chapter.head_label(r.layer, r.head)} ({chapter.fmt_ci(r.effect, r.effect_low, r.effect_high, '+.2f')}; "
                f"rank {int(r.rank_low)}-{int(r.rank_high)})" for r in ranking.head(5).itertuples()) + ".",
    f"Top-{top_k} boundary: {int(status.get('in', 0))} heads surely in, {int(status.get('tied', 0))} tied across it"
    + (f" ({', '.join(chapter.head_label(a, b) for a, b in zip(tied['layer'], tied['head']))})" if len(tied) <= 25 else "")
    + f", {int(status.get('out', 0))} surely out" + (" - the top set is settled." if not len(tied) else "."),
    f"Heads with a non-zero effect: {int(holm['heads non-zero'])} of {len(ranking)} at a 5% family-wise error rate "
    f"(Holm), {int(bh['heads non-zero'])} at a 5% false discovery rate (Benjamini-Hochberg); "
    f"uncorrected 95% intervals entirely above zero: {int((ranking['effect_low'] > 0).sum())}.",
    f"Where one run's uncertainty comes from (median share over heads): prompts "
    f"{variance['share_prompts'].median():.0%}, prefix noise {variance['share_prefix'].median():.0%}, query noise "
    f"{variance['share_query'].median():.0%}."
    + (f" Antithetic pairs: median efficiency {efficiency['efficiency'].median():.1f}x per evaluation." if antithetic else ""),
    f"Reproducibility, run A vs B (disjoint seeds): Spearman {sab['spearman']:.2f}, top-10 overlap "
    f"{int(sab['top10_overlap'])}/10 - {target(sab['spearman'] >= 0.9 and sab['top10_overlap'] >= 8)}; "
    f"disjoint prompts (A vs C, B vs C): Spearman {spr['spearman'].min():.2f} and {spr['spearman'].max():.2f}, "
    f"top-10 overlap {int(spr['top10_overlap'].min())} and {int(spr['top10_overlap'].max())}/10 - "
    f"{target(spr['spearman'].min() >= 0.9 and spr['top10_overlap'].min() >= 8)}.",
    ("Seeds' semantics check: " + ", ".join(
        f"{chapter.head_label(r.layer, r.head)} design {r.effect_design:+.2f} vs reference {r.effect_reference:+.2f} "
        f"(z = {r.z:+.1f})" for r in check.itertuples())
     + f"; {int(check['agree (|z| < 1.96)'].sum())} of {len(check)} agree within their intervals.") if ref_heads else None,
    "Noise vs ablation: " + ("; ".join(
        f"{m} ablation Spearman ρ = {compare['noise'].corr(compare[f'{m}_ablation'], method='spearman'):.2f}, "
        f"{int(headrank.significance_counts(ablation_tables[m]).set_index('test').loc['Holm (FWER)', 'heads non-zero'])} heads "
        f"non-zero (Holm)" for m in ablations) or "no ablation run") + ".",
])

# %%
records.write_config(results_dir, params, lm, elapsed_seconds=time.time() - t_start,
                     timings={"clean": clean_seconds, "sweep": sweep_seconds, "reference": reference_seconds,
                              "ablation": ablation_seconds},
                     prompt=config.__dict__, phases=phases)
records.save_frames(results_dir, observations=pooled, ranking=ranking, stability=stability, spent=spent,
                    variance=variance, noise_vs_ablation=compare,
                    **({"reference": check} if ref_heads else {}))
records.write_summary(  # headline numbers: one row per run in `headlab grid` summaries
    results_dir, n_prompts=len(task.labels), clean_accuracy=float(cal.loc["accuracy", "value"]),
    clean_logit_diff=float(cal.loc["logit_diff", "value"]),
    top_head=chapter.head_label(ranking["layer"].iloc[0], ranking["head"].iloc[0]),
    top_effect=float(ranking["effect"].iloc[0]), heads_nonzero_holm=int(holm["heads non-zero"]),
    heads_nonzero_bh=int(bh["heads non-zero"]), tied_at_top_k=int(len(tied)),
    spearman_seeds=float(sab["spearman"]), top10_seeds=int(sab["top10_overlap"]),
    spearman_prompts=float(spr["spearman"].min()), top10_prompts=int(spr["top10_overlap"].min()),
    evaluations=evals, sweep_seconds=sweep_seconds)
print(f"results in {results_dir}/ ; total {time.time() - t_start:.0f} s")
