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
# Three attention measures per head and sentence:
#
# * **on the pronoun**: the attention the pronoun receives, averaged over the tokens after it (the
#   seed's measure: do later tokens look at "he" and "she" differently?);
# * **pronoun → referent**: the attention from the pronoun to the noun it refers to (WinoBias marks
#   that noun; in Winogender it is the occupation or the other participant), a coreference-like link;
# * **prefix end → referent**: the attention from the token *before* the pronoun (the position that
#   predicts it) to the referent.
#
# **What the model prefers, measured for every pair.** Cutting a sentence before its pronoun and
# comparing $\log p(\text{pro}) - \log p(\text{anti})$ is not defined for every WinoBias pair: in
# *type 1* sentences the clause **after** the pronoun decides whom it refers to, so the same prefix
# ("The developer argued with the designer because") occurs once with a masculine and once with a
# feminine stereotyped pronoun, and the two values cancel (exact negatives for the same two forms).
# So the main measure compares whole sentences, as CrowS-Pairs (Nangia et al., 2020) does:
#
# $$s = \log P(\text{pro sentence}) - \log P(\text{anti sentence})
#     = \underbrace{\log p(\text{pro} \mid \text{prefix}) - \log p(\text{anti} \mid \text{prefix})}_{\text{pronoun term}}
#     + \underbrace{\textstyle\sum_{t > \text{pronoun}} \log p(x_t \mid \text{pro}, x_{<t}) - \log p(x_t \mid \text{anti}, x_{<t})}_{\text{continuation term}},$$
#
# summed over every token of the sentence: the tokens before the pronoun are the same in both
# sentences and have the same probabilities, so they contribute exactly 0 and the sum starts at the
# pronoun (`headlab.bias.pair_scores`). $s > 0$: the model finds the stereotyped sentence more likely.
# The **continuation term** asks how much better the rest of the sentence fits the stereotyped
# pronoun, i.e. whether the model links the pronoun to the referent that the stereotype predicts; it
# is defined for every pair. The **pronoun term** alone (the next-pronoun preference) is used only on
# *type 2* pairs, whose prefix fixes the referent by syntax ("The chief thanked the housekeeper and
# gave [her] some tips"); no two of them share a prefix.
#
# **Two hypotheses, tested by ablation against random heads** (hypotheses, not results):
#
# * **H1.** Later tokens read the pronoun through attention to it; the heads whose attention *on the
#   pronoun* differs most between pro and anti sentences carry the stereotype-congruent link to the
#   rest of the sentence. Ablating them changes the **continuation term** (read at the positions after
#   the pronoun, where these heads were selected) more than ablating as many random heads.
# * **H2.** The pronoun is predicted at the position before it; heads that attend most from there to
#   the **referent** bring the occupation (and its stereotyped gender) to that position. Ablating them
#   changes the **pronoun term on type-2 pairs** more than ablating as many random heads.
#
# Random heads are drawn uniformly from all heads, independently of either ranking, so both top sets
# are compared with the same random sets: a permutation test with $p = (1 + \#\{\text{random sets
# moving the measure at least as far}\}) / (1 + n)$, resolution $1/(n+1)$.

# %% tags=["parameters"]
model: str = "smollm2-135m"  # embedded name, .gguf path, local directory or hub id
device: str = "auto"  # "auto", "cpu" or "cuda"
dtype: str = "auto"  # "auto" (fp32 on CPU, bf16 on CUDA), "float32", "bfloat16", "float16"
split: str = "dev"  # WinoBias split: "dev" or "test"
max_pairs: int = 200  # WinoBias pairs drawn at random (seeded) for attention and the clean measures (0: all)
n_ablation_pairs: int = 40  # of those, pairs scored under every ablation, half type 1, half type 2 (0: all)
k_list: list = [0, 10]  # numbers of heads ablated at once (0: the clean model)
n_random: int = 100  # random head sets per (mode, k): p-value resolution 1 / (n_random + 1)
modes: list = ["mean"]  # "zero" and/or "mean" ablation of the heads' outputs
n_reference: int = 16  # Wikipedia windows for the mean head outputs (mean ablation)
reference_tokens: int = 64  # tokens per reference window
n_boot: int = 1000  # bootstrap resamples for the intervals
seed: int = 0  # seeds the pair draws, the random head sets and the bootstraps
batch_size: int = 16  # sentences per forward pass (results do not depend on it)
torch_threads: int = 0  # CPU threads for torch (0: torch's default; 1 is faster on a busy machine)
results_dir: str = "results/gender_bias"  # shards, tables and the run's config

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from headlab import ablation, attention, bias, chapter, data, metrics, plots, records

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
# one position (the pronoun is one token in both), so positions line up. The table counts, per
# WinoBias type, the pairs whose prefix also begins a pair with the genders swapped
# (`headlab.bias.prefix_twins`): their next-pronoun values cancel, which is why the pronoun term is
# used on type 2 only.

# %%
wb_all = data.bias_pairs("winobias", split)
wb_pairs = wb_all
if max_pairs:
    wb_pairs = wb_all.sample(n=min(max_pairs, len(wb_all)), random_state=seed).sort_index().reset_index(drop=True)
wg_pairs = data.bias_pairs("winogender")
wb, wg = bias.encode_pairs(tok, wb_pairs), bias.encode_pairs(tok, wg_pairs)
for name, enc_, read in (("WinoBias", wb, wb_pairs), ("Winogender", wg, wg_pairs)):
    if not len(enc_):
        raise ValueError(f"No {name} pair survives tokenisation (all {len(read)} dropped): this tokenizer splits "
                         f"the pronouns ({tok.tokenize(' he')} / {tok.tokenize(' she')}) or the text around them "
                         "differently, so the two sentences of a pair cannot be compared position by position.")
wb_kept = wb_pairs.iloc[wb.index].reset_index(drop=True)  # row i <-> encoded pair i
twins_all = bias.prefix_twins(wb_all)
type2 = wb_kept["referent_in_prefix"].to_numpy()
if bias.prefix_twins(wb_kept[type2]).any() or wb_kept.loc[type2, "prefix"].duplicated().any():
    raise ValueError("type-2 pairs share a prefix: the next-pronoun measure would count one prefix twice.")
pd.DataFrame({
    "pairs": [int((wb_all["type"] == t).sum()) for t in (1, 2)] + [len(wg_pairs)],
    "with a swapped-gender prefix twin": [int(twins_all[wb_all["type"] == t].sum()) for t in (1, 2)]
    + [int(bias.prefix_twins(wg_pairs).sum())],
    "drawn": [int((wb_pairs["type"] == t).sum()) for t in (1, 2)] + [len(wg_pairs)],
    "kept (tokens align)": [int((wb_kept["type"] == t).sum()) for t in (1, 2)] + [len(wg)],
    "a / b": ["pro / anti", "pro / anti", "male / female"]},
    index=[f"WinoBias {split} type 1", f"WinoBias {split} type 2", "Winogender"])

# %% [markdown]
# ## Differential attention per head
#
# For each pair and head, the measure on sentence *a* minus the same measure on sentence *b*; the
# table gives the mean over pairs with a 95% paired bootstrap interval
# (`headlab.bias.head_differences`) and the standardised mean difference $d_z$ (mean / sd of
# the paired differences). For WinoBias the difference is pro − anti. The same WinoBias pairs are
# also compared as male − female (the pronoun's gender, whatever the stereotype), which is what
# Winogender measures. (The prefix-end measure is the same in both sentences of a pair, which share
# every token up to the pronoun, so it has no pro − anti difference; it enters the H2 ranking below.)

# %%
def measures(enc):
    """The three measures on both sentences of every pair, one forward pass per sentence: {name: (a, b)}."""
    after, pron = enc.after_pronoun(), [[p] for p in enc.pronoun]
    spans = {"on_pronoun": (after, pron), "pronoun_to_referent": (pron, enc.referent),
             "prefix_end_to_referent": ([[p - 1] for p in enc.pronoun], enc.referent)}
    a, b = (attention.span_attentions(lm, s, spans, batch_size) for s in (enc.a, enc.b))
    return {name: (a[name], b[name]) for name in spans}


t0 = time.time()
att_wb, att_wg = measures(wb), measures(wg)
timings["attention"] = time.time() - t0
male_a = torch.tensor(wb_kept["a_male"].to_numpy())
diffs = {}
for name in ("on_pronoun", "pronoun_to_referent"):
    a, b = att_wb[name]
    diffs[("winobias", "pro − anti", name)] = bias.head_differences(a, b, n_boot, seed, ("a", "b"))
    mf = torch.where(male_a[:, None, None], a - b, b - a)  # male − female per pair
    diffs[("winobias", "male − female", name)] = bias.head_differences(mf, torch.zeros_like(mf), n_boot, seed)
    a, b = att_wg[name]
    diffs[("winogender", "male − female", name)] = bias.head_differences(a, b, n_boot, seed, ("a", "b"))
print(f"attention on {2 * (len(wb) + len(wg))} sentences in {timings['attention']:.0f} s")
overview = pd.DataFrame([{"data": d, "contrast": c, "measure": m, "heads with CI > 0": int((f["diff_low"] > 0).sum()),
                          "heads with CI < 0": int((f["diff_high"] < 0).sum()), "max |diff|": f["diff"].abs().max(),
                          "pairs": int(f["n"].iloc[0])} for (d, c, m), f in diffs.items()])
overview.round(4)

# %% [markdown]
# ### The two rankings
#
# **H1 ranking**: heads by the absolute standardised pro − anti difference $|d_z|$ of the attention
# **on the pronoun** over WinoBias, a statistic taken at the positions after the pronoun; $d_z$ is the
# mean paired difference over its standard deviation, so a head whose difference is consistent across
# pairs ranks above one whose mean is carried by a few pairs. Beside it: the same head's male − female
# difference on WinoBias and on Winogender, and its pro − anti difference from the pronoun to the
# referent. **H2 ranking**: heads by their mean attention from the token before the pronoun to the
# referent, over the type-2 pairs (the position where the pronoun term is read).

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
to_ref = att_wb["prefix_end_to_referent"][0][torch.tensor(type2)]  # (type-2 pairs, L, H); equal in a and b
found = ~torch.isnan(to_ref).flatten(1).any(1)
referent_heads = attention.scores_frame({"to_referent": to_ref[found].mean(0)})  # ranked, largest first
print(f"H2 ranking: attention from the token before the pronoun to the referent, mean over {int(found.sum())} "
      f"type-2 pairs (of {int(type2.sum())}; the others have no referent span)")
referent_heads[["rank", "layer", "head", "to_referent_score"]].head(15).round(4)

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
# ## What does the model prefer?
#
# Per pair (`headlab.bias.pair_scores`): the whole-sentence difference $s$, its continuation term
# and, on type-2 pairs only, its pronoun term; also $g = \log P(\text{male sentence}) - \log
# P(\text{female sentence})$ (= $\pm s$) and the probability the pair's two pronouns get together
# after the prefix. Means over pairs with 95% bootstrap intervals.

# %%
t0 = time.time()
clean_pairs = pd.DataFrame({k: v.numpy() for k, v in bias.pair_scores(lm, wb, batch_size).items()})
timings["clean"] = time.time() - t0
clean_pairs = clean_pairs.assign(gender=np.where(wb_kept["a_male"], 1, -1) * clean_pairs["sentence"],
                                 type=wb_kept["type"].to_numpy())
rows_of = {"sentence s, all pairs": ("sentence", None), "sentence s, type 1": ("sentence", 1),
           "sentence s, type 2": ("sentence", 2), "continuation term, all pairs": ("after", None),
           "pronoun term (next pronoun), type 2": ("pronoun", 2), "male − female sentence g, all pairs": ("gender", None),
           "p(either pronoun), type 2": ("p_pair", 2)}
clean_ci, clean_rows = {}, []
for label, (col, typ) in rows_of.items():
    v = clean_pairs[col] if typ is None else clean_pairs.loc[clean_pairs["type"] == typ, col]
    if not np.isfinite(v).all():
        raise ValueError(f"{label}: {int((~np.isfinite(v)).sum())} pairs without a finite value.")
    clean_ci[label] = metrics.bootstrap_ci(np.mean, v.to_numpy(), n_boot=n_boot, seed=seed)
    clean_rows.append({"measure": label, "mean": clean_ci[label].value, "low": clean_ci[label].low,
                       "high": clean_ci[label].high, "share > 0": float((v > 0).mean()), "pairs": len(v)})
pd.DataFrame(clean_rows).round(4)

# %% [markdown]
# ## Do the selected heads cause it? Top heads vs random heads
#
# The sweep (`headlab.ablation.pair_ablation_sweep`) scores a seeded subset of the pairs (half type 1,
# half type 2) under each ablation: the $k$ heads of the H1 ranking, the $k$ heads of the H2 ranking,
# or $k$ heads drawn uniformly from all heads (*random*, `n_random` sets per mode and $k$, shared by
# both rankings), by replacing their outputs with their mean over Wikipedia text (*mean*,
# `headlab.attention.head_output_means`) or zeroing them (*zero*). Each value's change from the clean
# model is per pair.

# %%
if n_ablation_pairs:
    pick = np.concatenate([np.random.default_rng(seed).permutation(np.flatnonzero(wb_kept["type"] == t))
                           [:n_ablation_pairs // 2] for t in (1, 2)])
else:
    pick = np.arange(len(wb))
pick = np.sort(pick)
abl_enc, abl_items = wb.subset(pick), wb_kept.iloc[pick][["type", "a_male"]].reset_index(drop=True)
ref_ids = torch.stack([torch.tensor(tok(t)["input_ids"][:reference_tokens])
                       for t in data.load_wikipedia()["text"][-n_reference:]])
means = attention.head_output_means(lm, ref_ids, batch_size=batch_size) if "mean" in modes else None
t0 = time.time()
common = {"items": abl_items, "modes": modes, "k_list": k_list, "n_random": n_random, "seed": seed,
          "means": means, "batch_size": batch_size}
shards = Path(results_dir) / "shards"
h1 = ablation.pair_ablation_sweep(lm, abl_enc, ranked, "abs_effect", shards, **common)
h2 = ablation.pair_ablation_sweep(lm, abl_enc, referent_heads, "to_referent_score", shards, set_types=["top"], **common)
timings["ablation"] = time.time() - t0
abl = ablation.share_random_sets({"H1": h1, "H2": h2})  # H2's top sets vs H1's random sets (the same draws)
n_sets = sum(h[h["k"] > 0].groupby(["mode", "set_type", "k", "permutation"]).ngroups for h in (h1, h2))
print(f"{n_sets} ablated head sets (+ the clean model) x {len(abl_enc)} pairs "
      f"({int((abl_items['type'] == 2).sum())} of type 2) in {timings['ablation']:.0f} s")

# %%
summary = ablation.ablation_summary(h1, "after_change", by=("mode", "set_type", "k"), n_boot=n_boot, seed=seed)
fig = plots.ablation_curves(summary, "k", "change of the continuation term (nats)", row=None,
                            title="H1: ablating the most differential heads vs random heads")

# %% [markdown]
# The top set against the random sets (`headlab.ablation.top_vs_random`), per ranking, mode and $k$:
# the top set's mean change over pairs (`top`, with a 95% bootstrap interval over pairs), the random
# sets' mean and band (`band` says what it is: a central 95% band needs enough random sets,
# `headlab.ablation.random_sets_needed`; with fewer it is their min-max range), and a two-sided
# permutation p-value: (1 + the number of random sets whose change is at least as large in size) /
# (1 + the number of random sets), resolution `p_resolution` = 1 / (n + 1). The verdict is that test
# at 0.05. H1's measures are taken over all ablation pairs; H2's pronoun term over the type-2 pairs.
# <!-- prose-ok: 95% 0.05 (levels of the interval and of the test, headlab.ablation defaults) -->

# %%
two = "two-sided"
versus = pd.concat([
    ablation.top_vs_random(abl[abl["ranking"] == "H1"], {"after_change": two, "sentence_change": two},
                           by=("ranking", "mode", "k"), n_boot=n_boot, seed=seed).assign(pairs="all"),
    ablation.top_vs_random(abl[(abl["ranking"] == "H2") & (abl["type"] == 2)], {"pronoun_change": two},
                           by=("ranking", "mode", "k"), n_boot=n_boot, seed=seed).assign(pairs="type 2"),
], ignore_index=True)
versus.round(4)

# %% [markdown]
# ## What we saw

# %%
top5 = ", ".join(f"{chapter.head_label(r.layer, r.head)} ({chapter.fmt_ci(r.diff, r.diff_low, r.diff_high, '+.4f')}, "
                 f"d_z {r.effect_size:+.2f})" for r in ranked.head(5).itertuples())
main_row = overview[(overview["data"] == "winobias") & (overview["contrast"] == "pro − anti")
                    & (overview["measure"] == "on_pronoun")].iloc[0]
n1, n2 = int((wb_all["type"] == 1).sum()), int((wb_all["type"] == 2).sum())
ci = {k: chapter.fmt_ci(v.value, v.low, v.high, "+.3f") for k, v in clean_ci.items()}
share = {r["measure"]: r["share > 0"] for r in clean_rows}
lines = [
    f"WinoBias {split}: {int(twins_all[wb_all['type'] == 1].sum())} of {n1} type-1 pairs and "
    f"{int(twins_all[wb_all['type'] == 2].sum())} of {n2} type-2 pairs share their prefix with a pair whose "
    f"stereotyped pronoun has the other gender, so the next-pronoun measure is used on type 2 only.",
    f"{len(wb)} WinoBias pairs and {len(wg)} Winogender pairs were compared. Most differential heads "
    f"(pro − anti attention on the pronoun by |d_z|, mean over pairs [95% CI]): {top5}.",
    f"{main_row['heads with CI > 0']} heads attend more to the pronoun in pro-stereotyped sentences and "
    f"{main_row['heads with CI < 0']} less (95% intervals excluding 0, of {len(ranked)}; no multiple-comparison "
    f"correction). {float(male_a.float().mean()):.0%} of the pro-stereotyped pronouns are masculine, so pro − anti is "
    f"not a male − female contrast; per-head male − female differences on WinoBias and Winogender agree with "
    f"Spearman ρ = {rho_mf:.2f}.",
    f"Clean model, {len(wb)} pairs: log P(pro sentence) − log P(anti sentence) = {ci['sentence s, all pairs']} "
    f"nats (> 0 prefers the stereotype in {share['sentence s, all pairs']:.0%} of pairs; type 1 "
    f"{ci['sentence s, type 1']}, type 2 {ci['sentence s, type 2']}); its continuation term "
    f"{ci['continuation term, all pairs']}; the next-pronoun term on the {int(type2.sum())} type-2 pairs "
    f"{ci['pronoun term (next pronoun), type 2']} (the pair's two pronouns together get probability "
    f"{clean_ci['p(either pronoun), type 2'].value:.3f} there); male − female sentence "
    f"{ci['male − female sentence g, all pairs']}.",
    f"H2 ranking: top heads by attention from the token before the pronoun to the referent: "
    f"{chapter.head_list(referent_heads, 'to_referent_score', 5)}.",
]
names = {"after_change": "continuation term", "sentence_change": "whole-sentence s",
         "pronoun_change": "type-2 pronoun term"}
for r in versus.to_dict("records"):
    outcome = ("supported" if r["verdict"].startswith("top set") else
               "not testable with these random sets" if r["verdict"].startswith("too few") else "not supported")
    lines.append(
        f"{r['ranking']}, {r['mode']} ablation of the top {r['k']} heads: {names[r['measure']]} changes by "
        f"{chapter.fmt_ci(r['top'], r['top_low'], r['top_high'], '+.3f')} over {r['n_items']} pairs vs "
        f"{r['random_mean']:+.3f} for {r['k']} random heads ({r['band']}: {r['random_low']:+.3f} to "
        f"{r['random_high']:+.3f}); {r['verdict']}, p resolution {r['p_resolution']:.3f}: {r['ranking']} is "
        f"{outcome} for this measure at 0.05.")
lines.append(f"Run time: attention {timings['attention']:.0f} s, clean scores {timings['clean']:.0f} s, ablation "
             f"{timings['ablation']:.0f} s ({n_sets} head sets, each of the {n_random} random sets per mode and k "
             f"shared by both rankings).")
chapter.bullets(lines)

# %%
records.write_config(results_dir, params, lm, elapsed_seconds=time.time() - t_start, timings=timings)
records.save_frames(results_dir, ranked_heads=ranked, referent_heads=referent_heads, overview=overview,
                    ablation=abl, ablation_summary=summary, top_vs_random=versus,
                    clean_pairs=clean_pairs.assign(pro=wb_kept["a"], anti=wb_kept["b"]),
                    clean_summary=pd.DataFrame(clean_rows),
                    **{"_".join(k).replace(" − ", "_minus_").replace(" ", "_"): f for k, f in diffs.items()})
print(f"results in {results_dir}/; total {time.time() - t_start:.0f} s")
