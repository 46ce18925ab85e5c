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
# # Induction heads: which heads copy from context, and what does removing them cost?
#
# An *induction head* (Olsson et al., 2022) completes the pattern `[A][B] … [A] → [B]`: at a token it
# attends to the token that followed the same token earlier in the context and copies it forward. The
# clean probe is a sequence of random tokens repeated once after a BOS token,
# `[BOS, x_1 … x_T, x_1 … x_T]`. The first copy is unpredictable; in the second copy every next token is
# given by the context, and a model with induction heads predicts it.
#
# **Score.** For head $h$ with attention probabilities $A_h$, the induction (prefix-matching) score is
# the mean attention from each token of the second copy to the token after its earlier occurrence,
# $\frac{1}{T}\sum_{j=0}^{T-1} A_h[q_j,\, q_j - T + 1]$ with $q_j = 1 + T + j$. A perfect induction
# head scores 1, a head spreading its attention evenly about $1/\text{position}$, a previous-token head
# 0. Scores are computed here from the model's attention weights
# (`headlab.induction.induction_scores`), never read from a file; the table is exported as CSV.
#
# **Ablation.** We then remove the $k$ highest-scoring heads, or $k$ heads drawn at random, and measure
# how well the model still predicts repeated tokens. Two ablations act on a head's *output* (its slice
# of the attention output projection's input):
# *zero* sets it to 0 at every position, so the head adds nothing (except the projection's bias) to the
# residual stream; *mean* replaces it by its mean over a reference batch of other random sequences.
# Seed 002 described "zero" as setting the head's attention scores to $-\infty$; after the softmax every
# row of that head would be $0/0$ = NaN, which then spreads to every later position and layer. What
# that mode intends — the head contributes nothing — is exactly the zero ablation of its output used
# here (tested to equal zeroing the head's input columns of the output projection).

# %% tags=["parameters"]
model: str = "smollm2-135m"  # embedded name, .gguf path, local directory or hub id
device: str = "auto"  # "auto", "cpu" or "cuda"
dtype: str = "auto"  # "auto" (fp32 on CPU, bf16 on CUDA), "float32", "bfloat16", "float16"
device_map: str = ""  # "auto": spread a model too big for one GPU over all GPUs (accelerate); "": off
n_sequences: int = 16  # random sequences for the scores, the held-out check and the mean ablation
n_sweep_sequences: int = 8  # random sequences scored under every head set of the ablation sweep
seq_len: int = 32  # tokens per copy T: rows are [BOS, x_1..x_T, x_1..x_T]
lags: list = [8, 16, 32]  # repeat distances, each at most seq_len, cycled over the rows of the sweep
seed: int = 0  # seeds the random tokens and the random head sets
n_permutations: int = 50  # random head sets per (mode, range, k); 39 or more give a 95% band; p resolution 1/(n+1)
max_heads: int = 50  # largest number of heads ablated at once (seed 002's --max_heads_abl)
head_type: list = ["top", "random"]  # which heads to ablate: the top-k by induction score and/or k random
k_list: list = [0, 5, 20]  # numbers of heads ablated at once (0: no ablation)
modes: list = ["zero", "mean"]  # "zero" and/or "mean" ablation of the head's output
layer_ranges: list = ["full"]  # "full", "top_half" (layers n//2..n-1), "bottom_half" (0..n//2-1)
n_boot: int = 1000  # bootstrap resamples for the intervals
batch_size: int = 8  # sequences per forward pass (results do not depend on it)
torch_threads: int = 0  # CPU threads for torch (0: torch's default; 1 is faster on a busy machine)
results_dir: str = "results/induction"  # shards, tables (scores.csv for reuse) and the run's config

# %% tags=["hide-input"]
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from headlab import ablation, attention, chapter, induction, perplexity, plots, records

t_start = time.time()
params = chapter.parameters(globals())
lm = chapter.load(params)
pd.Series(lm.describe()).to_frame("model")

# %% [markdown]
# ## The probe
#
# Tokens are drawn from the tokenizer's ordinary vocabulary (special and added tokens such as chat
# markers excluded), all distinct within a row, so each token of the second copy has exactly one earlier
# occurrence. Row $i$ is drawn from a generator keyed by the seed and $i$ only. The scores use one batch
# of rows, a held-out check a second, the mean ablation a third, the ablation sweep a fourth.

# %%
probe = induction.repeated_random_tokens(lm, n_sequences, seq_len, seed=seed)
heldout = induction.repeated_random_tokens(lm, n_sequences, seq_len, seed=seed + 1)
reference = induction.repeated_random_tokens(lm, n_sequences, seq_len, seed=seed + 2)
rows = induction.repeated_random_tokens(lm, n_sweep_sequences, seq_len, seed=seed + 3, lags=lags)
first = lm.tokenizer.convert_ids_to_tokens(probe.tokens[0].tolist())
pd.DataFrame({"first copy": first[probe.start:][:8], "second copy": first[probe.start + seq_len:][:8]},
             index=pd.RangeIndex(1, 9, name="position in copy"))

# %% [markdown]
# ## Induction scores of every head
#
# Beside the induction score we compute the previous-token score (mean attention from each position to
# the one before): induction circuits pair a previous-token head in an earlier layer with the induction
# head that reads its output.

# %%
t0 = time.time()
scores = attention.scores_frame(induction.induction_scores(lm, probe, batch_size=batch_size))
score_seconds = time.time() - t0
scores.head(12).round(3)

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 0.2 * lm.n_layers + 1.8))
plots.head_heatmap(scores, "induction_score", "induction score", center=None, ax=axes[0], cmap="viridis")
plots.head_heatmap(scores, "previous_token_score", "previous-token score", center=None, ax=axes[1], cmap="viridis")
fig.tight_layout()

# %% [markdown]
# ## Does the score mean something? A held-out check
#
# Three checks on sequences the scores never saw: the scores computed again on them (a stable property
# of a head gives the same ranking), the attention patterns of the top heads (an induction head shows
# a stripe $T-1$ positions below the diagonal in the second copy), and the loss on each token of the
# second copy with the top heads removed.

# %%
again = attention.scores_frame(induction.induction_scores(lm, heldout, batch_size=batch_size))
both = scores.merge(again[["layer", "head", "induction_score"]], on=["layer", "head"], suffixes=("", "_heldout"))
rho = both["induction_score"].corr(both["induction_score_heldout"], method="spearman")
overlap = len(set(zip(scores["layer"][:10], scores["head"][:10])) & set(zip(again["layer"][:10], again["head"][:10])))
display(Markdown(f"Held-out scores: Spearman ρ = {rho:.3f} with the probe's; {overlap} of the top 10 heads shared."))
both.head(10).round(3)

# %%
pats = attention.attention_patterns(lm, heldout.tokens[:1])[0]  # (L, H, s, s)
shown = pd.concat([scores.head(4), scores.iloc[[len(scores) // 2]]])  # top 4 and a median head
fig = plots.attention_patterns(np.stack([pats[r.layer, r.head].numpy() for r in shown.itertuples()]),
                               [f"{chapter.head_label(r.layer, r.head)} (rank {r.rank}, score {r.induction_score:.2f})"
                                for r in shown.itertuples()], marks=[heldout.start + seq_len], ncols=5)

# %%
k_show = min(5, max(k_list) if max(k_list) else 5)
pool = ablation.head_pool(scores, "induction_score")
sets = {"clean": {}, f"top {k_show} induction": pool.top(k_show),
        f"{k_show} random (permutation 0)": pool.random(k_show, 0, seed)}
per_token = pd.concat([
    pd.DataFrame(perplexity.token_losses(lm, heldout.tokens, heads, "zero", batch_size=batch_size).numpy())
    .rename_axis("sequence").reset_index().melt("sequence", var_name="position", value_name="loss")
    .assign(condition=name, position=lambda d: d["position"] + 1) for name, heads in sets.items()])
fig = plots.position_loss(per_token, marks=[heldout.start + seq_len],
                          title="held-out sequences, zero ablation (second copy from the dotted line)")

# %% [markdown]
# ## Ablating top-k induction heads vs k random heads
#
# For every mode, layer range and $k$ the chosen heads are ablated together in one batched pass over
# the sweep's rows (`headlab.ablation.induction_ablation_sweep`). The *top* set is the $k$ best-scoring
# heads of the range; random heads are $k$ heads of the range drawn uniformly (induction heads may be
# among them), a new draw per permutation, keyed by (seed, permutation, $k$). The rows repeat a segment of length *lag* (the distance from each
# repeated token back to its earlier occurrence) after a random filler, so every row has the same
# length. Per row we record the mean probability of the correct next token over the second copy
# (`p_correct`) and the in-context score `icl` = loss on the second copy − loss on the same tokens in
# the first copy (nats; more negative = more help from the context). Each grid point is saved as a
# shard, so a killed run resumes where it stopped.

# %%
means = attention.head_output_means(lm, reference.tokens, batch_size=batch_size)
t0 = time.time()
results = ablation.induction_ablation_sweep(
    lm, rows, scores, Path(results_dir) / "shards", modes=modes, layer_ranges=layer_ranges, set_types=head_type,
    k_list=k_list, n_random=n_permutations, max_heads=max_heads, seed=seed, means=means,
    batch_size=batch_size)
sweep_seconds = time.time() - t0
n_sets = results.groupby(["mode", "layer_range", "set_type", "k", "permutation"]).ngroups
print(f"{len(results):,} rows from {n_sets} (setting, head set) combinations in {sweep_seconds:.0f} s")
results.head()

# %% [markdown]
# ### Effect against the number of ablated heads
#
# Bands are 95% bootstrap intervals of the mean: over sequences for the top set, over random head
# sets and sequences for random heads.
# <!-- prose-ok: 95% (the intervals' level, headlab.metrics' default) -->

# %%
by_k = {v: ablation.ablation_summary(results, v, by=("mode", "layer_range", "set_type", "k"), n_boot=n_boot,
                                     seed=seed) for v in ("p_correct", "icl")}
row_facet = "layer_range" if len(layer_ranges) > 1 else None
fig = plots.ablation_curves(by_k["p_correct"], "k", "p(correct repeated token)", row=row_facet)

# %%
fig = plots.ablation_curves(by_k["icl"], "k", "loss late − early (nats)", row=row_facet)

# %% [markdown]
# ### Effect against the lag
#
# The same measure per lag, for each $k > 0$ (first layer range). Lags shorter than the probe's $T$
# have fewer repeated tokens per row, so their intervals are wider.

# %%
main_range = layer_ranges[0]
by_lag = ablation.ablation_summary(results[(results["layer_range"] == main_range)],
                                   "p_correct", by=("mode", "set_type", "k", "lag"), n_boot=n_boot, seed=seed)
fig = plots.ablation_curves(by_lag[by_lag["k"] > 0], "lag", "p(correct repeated token)", row="k",
                            title=f"layer range {main_range}")

# %% [markdown]
# ### Induction set against the random sets
#
# For each setting (`headlab.ablation.top_vs_random`): the top set's mean over rows (`top`, with a 95%
# bootstrap interval over rows), the random sets' mean and band (`band` says what the band is: a
# central 95% band needs enough random sets, `headlab.ablation.random_sets_needed`; with fewer it is
# their min-max range), and a permutation p-value: (1 + the number of random sets that leave
# p(correct) at least as low, or icl at least as high, as the top set) / (1 + the number of random
# sets), so its resolution is 1 / (n + 1). The verdict is that test at 0.05.
# <!-- prose-ok: 95% 0.05 (levels of the interval and of the test, headlab.ablation defaults) -->

# %%
versus = ablation.top_vs_random(results, {"p_correct": "less", "icl": "greater"},
                                by=("mode", "layer_range", "k"), n_boot=n_boot, seed=seed)
versus.round(4) if len(versus) else "(needs both head types)"

# %% [markdown]
# ## What we saw

# %% tags=["hide-input"]
clean = pd.DataFrame({k: v.numpy() for k, v in induction.repeat_metrics(
    rows, perplexity.token_losses(lm, rows.tokens, batch_size=batch_size)).items()}).assign(lag=rows.lags.numpy())
by_lag_clean = clean.groupby("lag")["p_correct"].mean()
lines = [
    f"Top induction heads of {lm.spec} ({n_sequences} sequences of {probe.tokens.shape[1]} tokens): "
    f"{chapter.head_list(scores, 'induction_score', 5, fmt='.2f')}; "
    f"{int((scores['induction_score'] > 0.3).sum())} heads score above 0.3; the top 10 sit in layers "
    f"{', '.join(map(str, sorted(set(scores['layer'][:10]))))} of 0-{lm.n_layers - 1}.",
    f"Held-out sequences: Spearman ρ = {rho:.2f} between the two score tables, {overlap}/10 top heads shared.",
    f"Clean model on the sweep's rows: p(correct repeated token) = {clean['p_correct'].mean():.3f} "
    f"({', '.join(f'lag {lag}: {p:.3f}' for lag, p in by_lag_clean.items())}); loss "
    f"{clean['loss_early'].mean():.2f} nats on the first copy, {clean['loss_late'].mean():.2f} on the second.",
]

# %% tags=["hide-input"]
ks = sorted({min(k for k in k_list if k > 0), max(k_list)}) if max(k_list) > 0 else []
vs_p, vs_icl = (versus[versus["measure"] == m].to_dict("records") for m in ("p_correct", "icl"))
lines += [
    f"{r['mode']} ablation, {r['layer_range']} range, k = {r['k']}: p(correct) {r['top']:.4f} with the top "
    f"induction heads vs {r['random_mean']:.4f} with random heads ({r['band']}: {r['random_low']:.4f} to "
    f"{r['random_high']:.4f}); {r['verdict']}, p resolution {r['p_resolution']:.3f}; icl {v['top']:+.2f} vs "
    f"{v['random_mean']:+.2f} nats "
    f"(clean {clean['icl'].mean():+.2f})."
    for r, v in zip(vs_p, vs_icl) if r["k"] in ks
]
lines.append(f"Run time: scores {score_seconds:.0f} s, ablation sweep {sweep_seconds:.0f} s ({n_sets} head sets on "
             f"{len(rows.tokens)} sequences; {n_permutations} random sets per mode, range and k).")
chapter.bullets(lines)

# %% tags=["hide-input"]
records.write_config(results_dir, params, lm, elapsed_seconds=time.time() - t_start,
                     timings={"scores": score_seconds, "sweep": sweep_seconds})
records.save_frames(results_dir, scores=scores, scores_heldout=again, ablation=results,
                    summary_k_p_correct=by_k["p_correct"], summary_k_icl=by_k["icl"], summary_lag=by_lag,
                    top_vs_random=versus)
vs_max = versus[(versus["measure"] == "p_correct") & (versus["k"] == max(k_list))]
records.write_summary(  # headline numbers: one row per run in `headlab grid` summaries
    results_dir, top_head=chapter.head_label(scores["layer"].iloc[0], scores["head"].iloc[0]),
    top_induction_score=float(scores["induction_score"].iloc[0]),
    heads_above_0_3=int((scores["induction_score"] > 0.3).sum()), heldout_spearman=float(rho),
    clean_p_correct=float(clean["p_correct"].mean()), clean_icl=float(clean["icl"].mean()), k_max=int(max(k_list)),
    p_correct_induction_kmax=float(vs_max["top"].iloc[0]) if len(vs_max) else None,
    p_correct_random_kmax=float(vs_max["random_mean"].iloc[0]) if len(vs_max) else None,
    p_value_kmax=float(vs_max["p_value"].iloc[0]) if len(vs_max) else None,
    chapter_seconds=time.time() - t_start)
print(f"results in {results_dir}/ (scores.csv: the per-head scores for reuse); total {time.time() - t_start:.0f} s")

# %% tags=["remove-cell"]
# The chapter's answer for the book's front page.
top3 = ", ".join(f"**L{r.layer}H{r.head}** ({r.induction_score:.2f})" for r in scores.head(3).itertuples())
records.update_summary(results_dir, headline=(
    f"The strongest induction heads are {top3} (attention to the token after the earlier occurrence, on "
    f"repeated random tokens); {int((scores['induction_score'] > 0.3).sum())} heads score above 0.3, and "
    f"held-out sequences rank the heads alike (Spearman ρ = {rho:.2f})."))
