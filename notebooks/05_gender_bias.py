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
# # Gender bias: which heads attend differently to "he" and "she", and do they cause the bias?
#
# **Differential attention.** WinoBias (Zhao et al., 2018) pairs a *pro-stereotyped* sentence
# ("The mechanic gave the clerk a present because **he** won the lottery") with an
# *anti-stereotyped* one that differs only in the pronoun ("… because **she** won …"). Winogender
# (Rudinger et al., 2018) gives male and female versions of each sentence. Because the two sentences
# of a pair are the same tokens except one, every head's attention can be compared position by
# position: a paired difference per sentence pair, averaged over pairs with a bootstrap interval.
#
# Two attention measures per head and sentence:
#
# * **on the pronoun**: the attention the pronoun receives, averaged over the tokens after it (the
#   seed's measure: do later tokens look at "he" and "she" differently?);
# * **pronoun → referent**: the attention from the pronoun to the noun it refers to (WinoBias marks
#   that noun; in Winogender it is the occupation or the other participant), a coreference-like link.
#
# **A causal measure.** Attention differences say nothing about what the model *does*. So we cut each
# WinoBias sentence right before its pronoun ("The mechanic gave the clerk a present because") and
# read the model's log-probability of the stereotyped against the anti-stereotyped pronoun,
# $b = \log p(\text{pro}) - \log p(\text{anti})$ (> 0: the model prefers the stereotype). Then we
# ablate the $k$ most differential heads, and, for comparison, $k$ random heads (several random sets),
# and measure how $b$ moves.

# %% tags=["parameters"]
model: str = "smollm2-135m"  # embedded name, .gguf path, local directory or hub id
device: str = "auto"  # "auto", "cpu" or "cuda"
dtype: str = "auto"  # "auto" (fp32 on CPU, bf16 on CUDA), "float32", "bfloat16", "float16"
split: str = "dev"  # WinoBias split: "dev" or "test"
max_pairs: int = 200  # WinoBias pairs drawn at random (seeded) for attention and prompts (0: all 767)
k_list: list = [0, 10]  # numbers of heads ablated at once (0: the clean model)
n_random: int = 8  # random head sets per k
modes: list = ["zero", "mean"]  # "zero" and/or "mean" ablation of the heads' outputs
n_reference: int = 16  # Wikipedia windows for the mean head outputs (mean ablation)
reference_tokens: int = 64  # tokens per reference window
n_boot: int = 1000  # bootstrap resamples for the intervals
seed: int = 0  # seeds the random head sets and the bootstraps
batch_size: int = 16  # sentences per forward pass (results do not depend on it)
torch_threads: int = 0  # CPU threads for torch (0: torch's default; 1 is faster on a busy machine)
results_dir: str = "results/gender_bias"  # shards, tables and the run's config

# %% tags=["hide-input"]
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from headlab import ablation, attention, bias, chapter, data, engine, metrics, plots, records

t_start = time.time()
params = chapter.parameters(globals())
lm = chapter.load(params, attn_implementation="eager")
tok = lm.tokenizer
timings = {}
pd.Series(lm.describe()).to_frame("model")

# %% [markdown]
# ## The pairs
#
# `headlab.data.bias_pairs` keeps pairs whose sentences differ in exactly one word, a gendered
# pronoun; `headlab.bias.encode_pairs` then keeps those whose token sequences differ in exactly
# one position (the pronoun is one token in both), so positions line up.

# %%
wb_pairs = data.bias_pairs("winobias", split)
if max_pairs:
    wb_pairs = wb_pairs.sample(n=min(max_pairs, len(wb_pairs)), random_state=seed).sort_index().reset_index(drop=True)
wg_pairs = data.bias_pairs("winogender")
wb, wg = bias.encode_pairs(tok, wb_pairs), bias.encode_pairs(tok, wg_pairs)
for name, enc_, read in (("WinoBias", wb, wb_pairs), ("Winogender", wg, wg_pairs)):
    if not len(enc_):
        raise ValueError(f"No {name} pair survives tokenisation (all {len(read)} dropped): this tokenizer splits "
                         f"the pronouns ({tok.tokenize(' he')} / {tok.tokenize(' she')}) or the text around them "
                         "differently, so the two sentences of a pair cannot be compared position by position.")
pd.DataFrame({"pairs read": [len(wb_pairs), len(wg_pairs)],
              "dropped (words)": [wb_pairs.attrs["dropped"], wg_pairs.attrs["dropped"]],
              "dropped (tokens)": [wb.dropped, wg.dropped], "kept": [len(wb), len(wg)],
              "a / b": ["pro / anti", "male / female"]}, index=["WinoBias " + split, "Winogender"])

# %% [markdown]
# ## Differential attention per head
#
# For each pair and head, the measure on sentence *a* minus the same measure on sentence *b*; the
# table gives the mean over pairs with a 95% paired bootstrap interval
# (`headlab.bias.head_differences`) and the standardised mean difference $d_z$ (mean / sd of
# the paired differences). For WinoBias the difference is pro − anti. The same WinoBias pairs are
# also compared as male − female (the pronoun's gender, whatever the stereotype), which is what
# Winogender measures.

# %%
def measures(enc):
    """Both measures on both sentences of every pair, one forward pass per sentence: {name: (a, b)}."""
    after, pron = enc.after_pronoun(), [[p] for p in enc.pronoun]
    spans = {"on_pronoun": (after, pron), "pronoun_to_referent": (pron, enc.referent)}
    a, b = (attention.span_attentions(lm, s, spans, batch_size) for s in (enc.a, enc.b))
    return {name: (a[name], b[name]) for name in spans}


t0 = time.time()
att_wb, att_wg = measures(wb), measures(wg)
timings["attention"] = time.time() - t0
male_a = torch.tensor(wb_pairs["a_male"].to_numpy()[wb.index])
diffs = {}
for name, (a, b) in att_wb.items():
    diffs[("winobias", "pro − anti", name)] = bias.head_differences(a, b, n_boot, seed, ("a", "b"))
    mf = torch.where(male_a[:, None, None], a - b, b - a)  # male − female per pair
    diffs[("winobias", "male − female", name)] = bias.head_differences(mf, torch.zeros_like(mf), n_boot, seed)
for name, (a, b) in att_wg.items():
    diffs[("winogender", "male − female", name)] = bias.head_differences(a, b, n_boot, seed, ("a", "b"))
print(f"attention on {2 * (len(wb) + len(wg))} sentences in {timings['attention']:.0f} s")
overview = pd.DataFrame([{"data": d, "contrast": c, "measure": m, "heads with CI > 0": int((f["diff_low"] > 0).sum()),
                          "heads with CI < 0": int((f["diff_high"] < 0).sum()), "max |diff|": f["diff"].abs().max(),
                          "pairs": int(f["n"].iloc[0])} for (d, c, m), f in diffs.items()])
overview.round(4)

# %% [markdown]
# ### The most differential heads
#
# Heads ranked by the absolute standardised pro − anti difference $|d_z|$ of the attention **on the
# pronoun** over WinoBias (the ranking the ablation below uses): $d_z$ is the mean paired difference
# over its standard deviation, so a head whose difference is consistent across pairs ranks above one
# whose mean is carried by a few pairs (all heads are measured on the same pairs, so this is the
# ranking by the paired t statistic). Beside it: the same head's male − female difference on
# WinoBias and on Winogender, and its pro − anti difference from the pronoun to the referent.

# %%
main = diffs[("winobias", "pro − anti", "on_pronoun")].copy()
main["abs_effect"] = main["effect_size"].abs()
ranked = main.sort_values(["abs_effect", "layer", "head"], ascending=[False, True, True]).reset_index(drop=True)
ranked["rank"] = np.arange(1, len(ranked) + 1)
extra = {"wb_male_female": ("winobias", "male − female", "on_pronoun"),
         "wg_male_female": ("winogender", "male − female", "on_pronoun"),
         "referent_pro_anti": ("winobias", "pro − anti", "pronoun_to_referent")}
for col, key in extra.items():
    ranked = ranked.merge(diffs[key][["layer", "head", "diff"]].rename(columns={"diff": col}), on=["layer", "head"])
top_table = ranked[["rank", "layer", "head", "mean_a", "mean_b", "diff", "diff_low", "diff_high", "effect_size",
                    *extra]].head(15)
top_table.round(4)

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 0.2 * lm.n_layers + 1.8))
for ax, key, title in zip(axes, [("winobias", "pro − anti", "on_pronoun"), ("winobias", "male − female", "on_pronoun"),
                                 ("winogender", "male − female", "on_pronoun")],
                          ["WinoBias pro − anti", "WinoBias male − female", "Winogender male − female"]):
    plots.head_heatmap(diffs[key], "diff", f"{title}\n(attention on the pronoun)", ax=ax)
fig.tight_layout()

# %%
fig = plots.ranked_effects(ranked, top=15, value="diff",
                           title="WinoBias pro − anti attention on the pronoun (top 15 by |d_z|)")

# %%
wb_mf, wg_mf = diffs[("winobias", "male − female", "on_pronoun")], diffs[("winogender", "male − female", "on_pronoun")]
rho_mf = wb_mf["diff"].corr(wg_mf["diff"], method="spearman")
fig = plots.compare_scatter(wb_mf.assign(winogender=wg_mf["diff"].to_numpy()).rename(columns={"diff": "winobias"}),
                            "winobias", "winogender", title="male − female attention on the pronoun, per head")

# %% [markdown]
# ## Does the model prefer the stereotyped pronoun, and do these heads cause it?
#
# Each WinoBias pair gives one prompt: its text up to the pronoun. The label tokens are the five
# pronoun forms (" he", " she", " his", " her", " him"); per prompt the measure is
# $b = \log p(\text{pro}) - \log p(\text{anti})$ for that pair's two forms, and also the gender
# preference $g = \log p(\text{male form}) - \log p(\text{female form})$. Prompts with the same text and
# the same two forms are counted once.
#
# The ablation sweep (`headlab.ablation.ranked_ablation_sweep`) removes the $k$ heads with the largest
# standardised |pro − anti| attention difference $|d_z|$ (*top*), or $k$ heads drawn uniformly from all heads (*random*,
# `n_random` sets per $k$), by zeroing their outputs (*zero*) or replacing them by their mean output
# over Wikipedia text (*mean*, `headlab.attention.head_output_means`), and scores every prompt under
# each ablation with the batched label-token engine (`headlab.engine.label_logprobs`).

# %%
prompts = wb_pairs.assign(pro=wb_pairs["a_pronoun"], anti=wb_pairs["b_pronoun"]).drop_duplicates(["prefix", "pro", "anti"])
forms = ["he", "she", "his", "her", "him"]
label_ids = engine.label_token_ids(lm, forms)
col = {f: i for i, f in enumerate(forms)}
pro_idx = torch.tensor([col[p] for p in prompts["pro"]])
anti_idx = torch.tensor([col[p] for p in prompts["anti"]])
male_idx = torch.where(torch.tensor(prompts["a_male"].to_numpy()), pro_idx, anti_idx)
female_idx = torch.where(torch.tensor(prompts["a_male"].to_numpy()), anti_idx, pro_idx)
rows_ = torch.arange(len(prompts))
enc = engine.encode_prompts(lm, "", list(prompts["prefix"]))
bias_measures = {
    "bias": lambda lp: (lp[rows_, pro_idx] - lp[rows_, anti_idx]).numpy(),
    "gender": lambda lp: (lp[rows_, male_idx] - lp[rows_, female_idx]).numpy(),
    "p_pair": lambda lp: (lp[rows_, pro_idx].exp() + lp[rows_, anti_idx].exp()).numpy(),
}
clean_lp = engine.label_logprobs(lm, enc, label_ids, batch_size=batch_size)
clean = pd.DataFrame({k: fn(clean_lp) for k, fn in bias_measures.items()})
clean_ci = {k: metrics.bootstrap_ci(np.mean, clean[k].to_numpy(), n_boot=n_boot, seed=seed) for k in clean}
pd.DataFrame({"mean": {k: v.value for k, v in clean_ci.items()}, "low": {k: v.low for k, v in clean_ci.items()},
              "high": {k: v.high for k, v in clean_ci.items()}}).assign(prompts=len(prompts)).round(4)

# %%
ref_ids = torch.stack([torch.tensor(tok(t)["input_ids"][:reference_tokens])
                       for t in data.load_wikipedia()["text"][-n_reference:]])
means = attention.head_output_means(lm, ref_ids, batch_size=batch_size) if "mean" in modes else None
t0 = time.time()
abl = ablation.ranked_ablation_sweep(lm, enc, label_ids, ranked, "abs_effect", bias_measures, Path(results_dir) / "shards",
                                     modes=modes, k_list=k_list, n_random=n_random, seed=seed, means=means,
                                     batch_size=batch_size)
timings["ablation"] = time.time() - t0
n_sets = abl.groupby(["mode", "set_type", "k", "permutation"]).ngroups
print(f"{n_sets} (mode, head set) combinations x {len(prompts)} prompts in {timings['ablation']:.0f} s")

# %%
summary = ablation.ablation_summary(abl, "bias_change", by=("mode", "set_type", "k"), n_boot=n_boot, seed=seed)
fig = plots.ablation_curves(summary, "k", "change of log p(pro) − log p(anti)", row=None,
                            title="ablating the most differential heads vs random heads")

# %% [markdown]
# The top set against the random sets (`headlab.ablation.top_vs_random`), per mode and $k$ and for each
# measure's change: the top set's mean change over prompts (`top`, with a 95% bootstrap interval over
# prompts), the random sets' mean and band (`band` says what it is: with too few random sets for a
# central 95% band, `headlab.ablation.random_sets_needed`, it is their min-max range), and a two-sided
# permutation p-value: (1 + the number of random sets whose change is at least as large in size) /
# (1 + the number of random sets), resolution 1 / (n + 1). The verdict is that test at 0.05.
# <!-- prose-ok: 95% 0.05 (levels of the interval and of the test, headlab.ablation defaults) -->

# %%
versus = ablation.top_vs_random(abl, {"bias_change": "two-sided", "gender_change": "two-sided",
                                      "p_pair_change": "two-sided"}, by=("mode", "k"), n_boot=n_boot, seed=seed)
versus.round(4)

# %% [markdown]
# ## What we saw

# %% tags=["hide-input"]
top5 = ", ".join(f"{chapter.head_label(r.layer, r.head)} ({chapter.fmt_ci(r.diff, r.diff_low, r.diff_high, '+.4f')}, "
                 f"d_z {r.effect_size:+.2f})" for r in ranked.head(5).itertuples())
main_row = overview[(overview["data"] == "winobias") & (overview["contrast"] == "pro − anti")
                    & (overview["measure"] == "on_pronoun")].iloc[0]
b, g, pp = clean_ci["bias"], clean_ci["gender"], clean_ci["p_pair"]
lines = [
    f"{len(wb)} WinoBias {split} pairs and {len(wg)} Winogender pairs were compared. Most differential heads "
    f"(pro − anti attention on the pronoun by |d_z|, mean over pairs [95% CI]): {top5}.",
    f"{main_row['heads with CI > 0']} heads attend more to the pronoun in pro-stereotyped sentences and "
    f"{main_row['heads with CI < 0']} less (95% intervals excluding 0, of {len(ranked)}; no multiple-comparison "
    f"correction). {float(male_a.float().mean()):.0%} of the pro-stereotyped pronouns are masculine, so pro − anti is "
    f"not a male − female contrast; per-head male − female differences on WinoBias and Winogender agree with "
    f"Spearman ρ = {rho_mf:.2f}.",
    f"Clean model, {len(prompts)} prompts cut before the pronoun: log p(pro) − log p(anti) = {b} "
    f"(> 0 prefers the stereotype; {float((clean['bias'] > 0).mean()):.0%} of prompts); log p(male) − log p(female) "
    f"= {g}; the pair's two pronouns together get probability {pp} at that position.",
]
gender_top = versus[versus["measure"] == "gender_change"].set_index(["mode", "k"])["top"]
for r in versus[versus["measure"] == "bias_change"].to_dict("records"):
    lines.append(f"{r['mode']} ablation of the top {r['k']} differential heads: bias change {r['top']:+.3f} "
                 f"[{r['top_low']:+.3f}, {r['top_high']:+.3f}] vs {r['random_mean']:+.3f} for {r['k']} random heads "
                 f"({r['band']}: {r['random_low']:+.3f} to {r['random_high']:+.3f}); {r['verdict']}; gender "
                 f"preference change {gender_top[(r['mode'], r['k'])]:+.3f}.")
lines.append(f"Run time: attention {timings['attention']:.0f} s, ablation sweep {timings['ablation']:.0f} s ({n_sets} head sets).")
chapter.bullets(lines)

# %% tags=["hide-input"]
records.write_config(results_dir, params, lm, elapsed_seconds=time.time() - t_start, timings=timings)
records.save_frames(results_dir, ranked_heads=ranked, overview=overview, ablation=abl, ablation_summary=summary,
                    top_vs_random=versus, clean_prompts=clean.assign(prefix=prompts["prefix"].to_numpy()),
                    **{"_".join(k).replace(" − ", "_minus_").replace(" ", "_"): f for k, f in diffs.items()})
print(f"results in {results_dir}/; total {time.time() - t_start:.0f} s")

# %% tags=["remove-cell"]
# The chapter's answer for the book's front page.
top3 = ", ".join(f"**L{r['layer']}H{r['head']}** ({r['diff']:+.4f} [{r['diff_low']:+.4f}, {r['diff_high']:+.4f}])"
                 for r in ranked.head(3).to_dict("records"))
records.update_summary(results_dir, top_head=f"L{ranked['layer'].iloc[0]}H{ranked['head'].iloc[0]}",
                       clean_bias=float(clean_ci["bias"].value), headline=(
    f"The heads that attend most differently to stereotyped and anti-stereotyped pronouns (WinoBias) are "
    f"{top3}; the clean model prefers the stereotyped pronoun by log p(pro) − log p(anti) = {clean_ci['bias']} "
    f"over {len(prompts)} prompts."))
