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
# not. Zero- and mean-ablation of the same heads are run beside it, so we can see whether noise and
# ablation point at the same heads.
#
# **What exactly is perturbed.** A head's output is its slice $z_h \in \mathbb{R}^{d_\text{head}}$ of
# the input of the attention output projection ($W_O$), at every position of the prompt (the shared
# few-shot prefix and the query). We add $\sigma\,\varepsilon$ with
# $\varepsilon \sim \mathcal{N}(0, I)$ drawn independently for each prompt, head, position and noise
# seed (the shared prefix gets one draw per head and seed, as it is the same text for every prompt),
# so a prompt's result never depends on what else is in its batch.
#
# **Noise scale.** `absolute`: $\sigma$ = level. `fraction_of_max` (seed 000's mode):
# $\sigma$ = level $\times \max |z_h|$, the largest absolute coordinate of that head's output over
# every position of the prefix and of all evaluated queries in the clean run. `fraction_of_std`:
# $\sigma$ = level $\times$ the standard deviation of the same values, a scale less dominated by one
# outlier coordinate.
#
# **Effect measures.** The primary measure is the drop in the mean *logit difference* toward the
# correct label ($\log p(\text{correct}) - \log p(\text{other})$, averaged over prompts): it is
# continuous and moves long before an answer flips. Accuracy and macro-F1 drops (at the calibrated
# threshold of the baseline chapter) stand beside it, as in the seed scripts, and are sorted into
# seed 001's impact categories: **HIGH** > 10, **MEDIUM** 5-10, **LOW** < 5 percentage points of
# accuracy change.
#
# **How it is computed.** `headlab.engine.sweep_heads` scores each (head, prompt) pair with one
# forward pass on the label-token logits, puts many pairs with different heads in one batch, reuses
# the clean shared-prefix keys/values and the clean hidden states before the perturbed layer, and
# gives the same numbers as running each perturbed prompt on its own (this is tested). Results are
# written to one shard per (setting, layer), so a killed run resumes where it stopped.

# %% tags=["parameters"]
model: str = "smollm2-135m"  # embedded name, .gguf path, local directory or hub id
device: str = "auto"  # "auto", "cpu" or "cuda"
dtype: str = "auto"  # "auto" (fp32 on CPU, bf16 on CUDA), "float32", "bfloat16", "float16"
device_map: str = ""  # "auto": spread a model too big for one GPU over all GPUs (accelerate); "": off
data_source: str = "rotten_tomatoes"  # used only when the baseline recorded no split
split_seed: int = 0  # used only when the baseline recorded no split
prompt_config: str = "results/baseline/prompt_config.json"  # written by the baseline chapter
n_prompts: int = 0  # test prompts scored under every perturbation; 0: auto, 64 on a GPU, 24 on CPU
noise_mode: str = "fraction_of_std"  # "absolute", "fraction_of_max" or "fraction_of_std"
noise_levels: list = [3.0]  # noise std in units of the mode's scale, e.g. [0.3, 1.0, 3.0]
noise_seeds: list = [0, 1]  # independent noise draws per level
ablations: list = ["zero"]  # companion ablations of each head: "zero", "mean" ([] to skip)
extra_noise_modes: dict = {}  # further {mode: levels}, e.g. {"fraction_of_max": [0.5]} (seed 000)
layers: list = []  # layers to sweep; []: all
batch_size: int = 64  # (head, prompt) rows per forward pass
n_boot: int = 1000  # bootstrap resamples for the ranking intervals
torch_threads: int = 0  # CPU threads for torch (0: torch's default; 1 is faster on a busy machine)
results_dir: str = "results/noise"  # shards, tables and the run's config

# %% tags=["hide-input"]
import time
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from headlab import chapter, metrics, plots, records, sweeps, tasks, widgets

t_start = time.time()
params = chapter.parameters(globals())
# No attention weights are needed here, so the faster fused attention is used.
lm = chapter.load(params, attn_implementation="sdpa")
pd.Series(lm.describe()).to_frame("model")

# %% [markdown]
# ## The task and its clean baseline
#
# The prompt (format, number of shots, shot draw, decision threshold) is the one the baseline chapter
# chose on its dev split; the prompts scored here come from its test split.

# %%
n_prompts = params["n_prompts"] = n_prompts or (64 if lm.device.type == "cuda" else 24)
config, splits, validated = tasks.load_prompt_setup(prompt_config, tasks.PromptConfig("plain", 8, 0),
                                                    source=data_source, seed=split_seed)
if not validated:
    display(Markdown(f"**Warning:** `{prompt_config}` not found; using an unvalidated default prompt. "
                     "Run the baseline chapter first."))
task = tasks.make_task(splits, "test", config).head(n_prompts)
clean_lp = task.logprobs(lm, batch_size=16)
clean = metrics.classification_report(task.labels, clean_lp.numpy(), threshold=config.threshold, n_boot=n_boot)
warn = metrics.chance_warnings(task.labels, task.predictions(clean_lp), (clean_lp[:, 1] - clean_lp[:, 0]).numpy())
display(Markdown(f"Prompt: **{config.format}**, {config.k} shots (draw {config.shot_seed}), threshold "
                 f"{config.threshold:+.2f}; {len(task.labels)} prompts. Chance check: "
                 + ("**NEAR CHANCE: " + "; ".join(warn) + "** - the effects below would measure nothing."
                    if warn else "clear of chance.")))
clean.round(3)

# %% [markdown]
# ## The sweep
#
# One grid point is one (mode, level, seed) setting applied to each head of one layer in turn.

# %%
settings = [{"mode": noise_mode, "level": float(lv), "seed": int(s)} for lv in noise_levels for s in noise_seeds]
settings += [{"mode": m, "level": float(lv), "seed": int(s)}
             for m, lvs in extra_noise_modes.items() for lv in lvs for s in noise_seeds]
settings += [{"mode": m, "level": 0.0, "seed": 0} for m in ablations]
t0 = time.time()
heads, per_prompt = sweeps.head_sweep(lm, task, settings, Path(results_dir) / "shards",
                                     layers=layers or None, batch_size=batch_size)
sweep_seconds = time.time() - t0
n_pairs = len(heads) * len(task.labels)
print(f"{len(heads)} (setting, head) rows x {len(task.labels)} prompts in {sweep_seconds:.0f} s "
      f"({n_pairs / max(sweep_seconds, 1e-9):.0f} head-prompt pairs per second, shards reused when resumed)")
heads.head()

# %% [markdown]
# ## Which heads matter? Ranking under the main noise setting
#
# Heads are ranked by the drop in the logit difference toward the correct label at the strongest main
# noise level, averaged over the noise seeds; the intervals come from a paired bootstrap over prompts.

# %%
main_level = float(max(noise_levels))
ranking = sweeps.rank_heads(heads, per_prompt, noise_mode, main_level, n_boot=n_boot)
fig = plots.ranked_effects(ranking, top=20, title=f"{noise_mode} noise, level {main_level:g}: top 20 heads")

# %%
ranking.head(15).round(3)

# %%
categories = pd.concat({
    f"{m} {lv:g}": pd.Series(metrics.impact_category(100 * g["accuracy_drop"])).value_counts()
    for (m, lv), g in heads.groupby(["mode", "level"])
}, axis=1).T.reindex(columns=["HIGH", "MEDIUM", "LOW"]).fillna(0).astype(int)
categories

# %% [markdown]
# Impact categories count (setting, seed, head) rows by their accuracy change. Accuracy on $n$ prompts
# moves in steps of one prompt ($100/n$ points), so a head that moves the logit difference clearly can
# still have a LOW accuracy change; this is why the logit difference is the primary measure. In this run:

# %% tags=["hide-input"]
clear = ranking[ranking["effect_low"] > 0]
clear_low = int((np.asarray(metrics.impact_category(100 * clear["accuracy_drop"])) == "LOW").sum())
chapter.bullets([
    f"Accuracy on {len(task.labels)} prompts moves in steps of {100 / len(task.labels):.1f} points.",
    "Rows in LOW: " + ", ".join(f"{name}: {int(row['LOW'])} of {int(row.sum())}"
                                for name, row in categories.iterrows()) + ".",
    (f"Of the {len(clear)} heads whose logit-difference drop has its whole 95% interval above zero, {clear_low} "
     "have a mean accuracy drop in LOW."),
])

# %% [markdown]
# ## Where the important heads sit

# %%
main = heads[(heads["mode"] == noise_mode) & np.isclose(heads["level"], main_level)]
fig = plots.head_heatmap(main, "logit_diff_drop", title=f"logit-difference drop, {noise_mode} {main_level:g} (mean over seeds)")

# %%
fig = plots.head_heatmap(main, "accuracy_drop", title=f"accuracy drop, {noise_mode} {main_level:g} (mean over seeds)")

# %%
noise_rows = heads[~heads["mode"].isin(["zero", "mean"])]
if noise_rows["level"].nunique() > 1:  # only meaningful for a grid of levels
    fig = plots.effect_vs_level(noise_rows, "logit_diff_drop", title="mean effect over heads vs noise level")

# %% [markdown]
# ## Is the ranking stable across noise seeds?
#
# The same heads under independent noise draws: Spearman and Kendall correlations of the per-head
# logit-difference drop between seeds, and how many of each seed's top-10 heads the other shares.

# %%
stability = pd.concat([
    sweeps.seed_agreement(heads, m, lv).assign(mode=m, level=lv)
    for (m, lv) in sorted(set(zip(noise_rows["mode"], noise_rows["level"])))
], ignore_index=True) if len(noise_seeds) > 1 else pd.DataFrame()
stability.round(3)

# %% [markdown]
# ## Does noise rank heads like ablation does?

# %%
compare = ranking[["layer", "head", "effect"]].rename(columns={"effect": "noise"})
for m in ablations:
    r = sweeps.rank_heads(heads, per_prompt, m, n_boot=200)
    compare = compare.merge(r[["layer", "head", "effect"]].rename(columns={"effect": f"{m}_ablation"}),
                            on=["layer", "head"])
for m in ablations:
    fig = plots.compare_scatter(compare, "noise", f"{m}_ablation", title=f"noise vs {m} ablation")
compare.drop(columns=["layer", "head"]).corr(method="spearman").round(3) if ablations else None

# %% [markdown]
# ## Explore
#
# Pick the setting, the seed (or the mean over seeds) and the measure; hover a head for its value and,
# for the logit-difference drop, its 95% interval (paired bootstrap over prompts). Every choice
# redraws, here as in JupyterLab (where this cell shows the ipywidgets explorer).

# %%
from headlab import figures  # noqa: E402

figures.show(figures.sweep_explorer(heads, per_prompt, n_boot=200), widget=lambda: widgets.sweep_explorer(heads))

# %% [markdown]
# ## What we saw

# %% tags=["hide-input"]
above = int((ranking["effect_low"] > 0).sum())
st = stability[(stability["mode"] == noise_mode) & np.isclose(stability["level"], main_level)] if len(stability) else stability
worst = ranking.loc[ranking["accuracy_drop"].idxmax()]
cal = clean.set_index("metric")
chapter.bullets([
    f"Clean: accuracy {cal.loc['accuracy', 'value']:.3f}, mean logit difference "
    f"{cal.loc['logit_diff', 'value']:.2f} on {len(task.labels)} prompts.",
    f"Sweep: {len(heads):,} (setting, head) rows, {n_pairs:,} perturbed prompts in {sweep_seconds:.0f} s.",
    f"Top heads under {noise_mode} noise at level {main_level:g} (logit-difference drop, 95% CI): "
    f"{chapter.head_list(ranking, 'effect', 5, ci=True, fmt='+.2f')}.",
    f"{above} of {len(ranking)} heads have a drop whose whole interval is above zero.",
    f"Largest accuracy drop of any head: {worst['accuracy_drop'] * 100:.1f} points "
    f"({chapter.head_label(worst['layer'], worst['head'])}).",
    "Rank stability between seeds: " + (
        f"Spearman {st['spearman'].mean():.2f}, Kendall {st['kendall'].mean():.2f}, "
        f"top-10 overlap {st['top10_overlap'].mean():.1f}/10" if len(st) else "one seed only") + ".",
    "Noise vs ablation: " + ("; ".join(
        f"{m} ablation Spearman ρ = {compare['noise'].corr(compare[f'{m}_ablation'], method='spearman'):.2f}"
        for m in ablations) or "no ablation run") + ".",
])

# %% tags=["hide-input"]
records.write_config(results_dir, params, lm, elapsed_seconds=time.time() - t_start,
                     timings={"sweep": sweep_seconds}, prompt=config.__dict__)
records.save_frames(results_dir, heads=heads, prompts=per_prompt, ranking=ranking, stability=stability,
                    noise_vs_ablation=compare)
records.write_summary(  # headline numbers: one row per run in `headlab grid` summaries
    results_dir, n_prompts=len(task.labels), clean_accuracy=float(cal.loc["accuracy", "value"]),
    clean_logit_diff=float(cal.loc["logit_diff", "value"]),
    top_head=chapter.head_label(ranking["layer"].iloc[0], ranking["head"].iloc[0]), top_effect=float(ranking["effect"].iloc[0]),
    heads_ci_above_zero=above, max_accuracy_drop=float(ranking["accuracy_drop"].max()),
    seed_spearman=float(st["spearman"].mean()) if len(st) else None, sweep_seconds=sweep_seconds)
print(f"results in {results_dir}/ ; total {time.time() - t_start:.0f} s")

# %% tags=["remove-cell"]
# The chapter's answer for the book's front page.
top3 = ", ".join(f"**L{r.layer}H{r.head}** ({r.effect:+.2f} [{r.effect_low:+.2f}, {r.effect_high:+.2f}])"
                 for r in ranking.head(3).itertuples())
records.update_summary(results_dir, headline=(
    f"Noise on one head at a time ({noise_mode} {main_level:g}, {len(task.labels)} prompts) hurts few-shot "
    f"sentiment most for {top3} (drop of the logit difference, 95% CI); "
    f"{int((ranking['effect_low'] > 0).sum())} of {len(ranking)} heads have an interval above zero."))
