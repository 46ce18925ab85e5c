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
# # Attention patterns: how focused is each head, and which heads track sentiment words and instructions?
#
# Every head turns each query position into a probability distribution over the earlier positions.
# This chapter asks three questions of those distributions on real text:
#
# 1. **How focused is each head?** The Shannon entropy of a head's attention, normalised so that 1
#    means "uniform over everything this query could see" and 0 "all mass on one token".
# 2. **Which heads look at sentiment words more in positive than in negative reviews?** The
#    correlation, over real movie reviews, between a head's attention on sentiment words and the
#    review's label, with permutation p-values corrected for testing 270 heads.
# 3. **Which heads look at directive words more when they give an instruction?** The attention
#    surplus on the same directive word ("explain", "never", ...) in an instruction versus in matched
#    plain prose.
#
# Patterns come from the model's own attention weights (eager attention) and are reduced layer by
# layer as they are produced (`headlab.attention.reduce_patterns`), so no full
# (text x layer x head x position x position) tensor is ever held. At the end, a widget to browse
# any head's pattern and a bertviz head view of a short prompt.

# %% tags=["parameters"]
model: str = "smollm2-135m"  # embedded name, .gguf path, local directory or hub id
device: str = "auto"  # "auto", "cpu" or "cuda"
dtype: str = "auto"  # "auto" (fp32 on CPU, bf16 on CUDA), "float32", "bfloat16", "float16"
n_texts: int = 32  # Wikipedia articles for the entropy sample (one window each)
text_tokens: int = 128  # tokens per window (the start of each article)
n_reviews: int = 300  # movie reviews for the sentiment heads (label-balanced)
n_permutations: int = 10000  # label shuffles for the permutation p-values (> 270 / fdr for BH to reject)
fdr: float = 0.05  # Benjamini-Hochberg false discovery rate for "significant" heads
n_boot: int = 1000  # bootstrap resamples for the intervals
n_show: int = 4  # lowest- and highest-entropy heads drawn as attention maps
seed: int = 0  # seeds the review sample, the permutations and the bootstraps
batch_size: int = 8  # texts per forward pass (results do not depend on it)
torch_threads: int = 0  # CPU threads for torch (0: torch's default; 1 is faster on a busy machine)
bertviz_prompt: str = "Please summarize the main argument of the article in two sentences."  # keep it short
results_dir: str = "results/entropy"  # tables and the run's config

# %% tags=["hide-input"]
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from headlab import attention, bias, chapter, data, metrics, plots, records, widgets

t_start = time.time()
params = chapter.parameters(globals())
lm = chapter.load(params, attn_implementation="eager")
tok = lm.tokenizer
timings = {}
pd.Series(lm.describe()).to_frame("model")

# %% [markdown]
# ## 1. Entropy of every head
#
# For query position $t$ with attention $p_{t,1..n_t}$ over its $n_t$ attendable keys (the real tokens
# at positions $\le t$), the normalised entropy is
# $\tilde H_t = -\sum_k p_{tk}\log p_{tk} \,/\, \log n_t \in [0, 1]$. Dividing by $\log n_t$, the
# entropy of the uniform distribution over those keys, makes late positions (many keys) and early
# ones (few keys) comparable; the raw entropy of a uniform head would grow with the position.
# Position 0 has a single key, so its distribution is forced: it is left out (undefined, not 0), and
# padded positions are masked (`headlab.attention.attention_entropy`). A head's score on a text is
# the mean of $\tilde H_t$ over positions $1 \ldots$; the table averages over texts, with 95%
# bootstrap intervals over texts.
#
# The texts are the first `text_tokens` tokens of each of `n_texts` Wikipedia articles. We also
# record each head's mean attention on the first token: many heads park their attention there
# when they have nothing to do (an *attention sink*), which shows up as low entropy.

# %%
wiki = data.load_wikipedia()
seqs = [torch.tensor(tok(t, add_special_tokens=True)["input_ids"][:text_tokens]) for t in wiki["text"][:n_texts]]
t0 = time.time()
stats = attention.text_pattern_stats(lm, seqs, batch_size=batch_size)  # entropy, first_token: (n, L, H)
timings["entropy"] = time.time() - t0
L, H = lm.n_layers, lm.n_heads
ent_mean, ent_low, ent_high = metrics.bootstrap_rows(stats["entropy"].reshape(len(seqs), -1).T.numpy(),
                                                     n_boot=n_boot, seed=seed)
entropy = pd.DataFrame({"layer": np.repeat(range(L), H), "head": np.tile(range(H), L), "entropy": ent_mean,
                        "entropy_low": ent_low, "entropy_high": ent_high,
                        "first_token": stats["first_token"].mean(0).reshape(-1).numpy()})
entropy = entropy.sort_values("entropy", kind="stable").reset_index(drop=True)
print(f"{len(seqs)} texts x {min(map(len, seqs))}-{max(map(len, seqs))} tokens in {timings['entropy']:.0f} s")
pd.concat([entropy.head(n_show).assign(end="lowest"), entropy.tail(n_show).assign(end="highest")]).round(3)

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 0.2 * L + 1.8))
plots.head_heatmap(entropy, "entropy", "normalised attention entropy", center=None, ax=axes[0], cmap="viridis")
plots.head_heatmap(entropy, "first_token", "attention on the first token", center=None, ax=axes[1], cmap="magma")
fig.tight_layout()

# %%
by_layer = entropy.groupby("layer")["entropy"].agg(["mean", "min", "max"])
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(by_layer.index, by_layer["mean"], "o-", ms=3, label="mean over heads")
ax.fill_between(by_layer.index, by_layer["min"], by_layer["max"], alpha=0.25, label="min-max over heads")
ax.set_xlabel("layer")
ax.set_ylabel("normalised entropy")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ### The most and the least focused heads, on one text
#
# The attention maps of the `n_show` lowest- and highest-entropy heads on the first 40 tokens of the
# first article (query positions down, key positions across).

# %%
show = pd.concat([entropy.head(n_show), entropy.tail(n_show)])
sample = seqs[0][:40]
pats = attention.attention_patterns(lm, sample[None])[0]  # (L, H, s, s)
fig = plots.attention_patterns(np.stack([pats[r.layer, r.head].numpy() for r in show.itertuples()]),
                               [f"{chapter.head_label(r.layer, r.head)}: entropy {r.entropy:.2f}, "
                                f"first token {r.first_token:.2f}"
                                for r in show.itertuples()], ncols=n_show)

# %% [markdown]
# ## 2. Sentiment-correlated heads
#
# **Data.** `n_reviews` label-balanced snippets of the Rotten Tomatoes reviews (Pang & Lee;
# `headlab.data.load_sentiment`). **Sentiment words** are the whole-word matches of
# `headlab.data.SENTIMENT_LEXICON`, a hand-written list of positive and negative evaluative
# words of film reviews (sizes in the table below) (e.g. *brilliant*, *charming* / *dull*, *tedious*); reviews without any are
# left out. **Measure.** For each review and head: the attention mass that the review's *last
# token* puts on all tokens of its sentiment words (the last token is where a causal model has read
# the whole review). **Test.** The Pearson correlation of that mass with the label (1 = positive)
# over reviews, a permutation p-value from `n_permutations` label shuffles, Benjamini-Hochberg
# q-values across all heads, and a family-wise p-value (max-|r| over heads per shuffle).
# A permutation p-value is never below $1/(1 + \text{shuffles})$, and Benjamini-Hochberg over 270
# heads rejects nothing unless the smallest p-value is below $0.05/270$: so the number of shuffles
# must exceed $270/0.05 = 5400$. The family-wise test compares each $|r|$ with the largest $|r|$ of
# all heads in each shuffle; it allows for the strong correlation between heads and controls the
# chance of *any* false positive.
#
# The mass also depends on how many sentiment words a review has and how long it is. If positive
# reviews simply contain more lexicon words, every head that looks at them would correlate with the
# label. So the same test is repeated on the mass with the number of sentiment tokens and the review
# length regressed out (`headlab.metrics.residualize`). Both tests, per head, are
# `headlab.metrics.head_label_test`; the reviews and their sentiment-word tokens come from
# `headlab.attention.encode_lexicon`.

# %%
reviews = data.split_frame(data.load_sentiment(), {"probe": n_reviews}, seed=seed)["probe"]
rev = attention.encode_lexicon(tok, reviews["text"], reviews["label"] == "positive")  # reviews with a lexicon word
t0 = time.time()
mass = attention.span_attention(lm, list(rev["ids"]), [[len(i) - 1] for i in rev["ids"]], list(rev["keys"]),
                                batch_size=batch_size)  # (n, L, H)
timings["sentiment"] = time.time() - t0
y = rev["label"].to_numpy()
n_keys, n_tok = rev["keys"].map(len).to_numpy(), rev["ids"].map(len).to_numpy()
sentiment = metrics.head_label_test(mass.numpy(), y, np.column_stack([n_keys, n_tok]), n_permutations, seed=seed)
lex = pd.Series({"lexicon words (positive / negative)": " / ".join(str(len(v)) for v in data.SENTIMENT_LEXICON.values()),
                 "reviews with a lexicon word": f"{len(rev)} of {len(reviews)}",
                 "positive reviews": int(y.sum()), "negative reviews": int(len(y) - y.sum()),
                 "corr(label, # sentiment tokens)": np.corrcoef(y, n_keys)[0, 1],
                 "corr(label, # positive words)": np.corrcoef(y, rev["n_positive"])[0, 1],
                 "corr(label, # negative words)": np.corrcoef(y, rev["n_negative"])[0, 1]})
print(f"span attention over {len(rev)} reviews in {timings['sentiment']:.0f} s")
lex.to_frame("sentiment probe")

# %%
sentiment.head(12).round(4)

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 0.2 * L + 1.8))
plots.head_heatmap(sentiment, "r", "r(attention on sentiment words, label)", ax=axes[0])
plots.head_heatmap(sentiment, "r_adjusted", "same, # sentiment tokens and length regressed out", ax=axes[1])
fig.tight_layout()

# %%
fig, ax = plt.subplots(figsize=(6, 3.6))
for r_col, p_col, label, color in (("r", "p", "raw mass", "#4c72b0"),
                                   ("r_adjusted", "p_adjusted", "count/length regressed out", "#dd8452")):
    ax.scatter(sentiment[r_col], -np.log10(sentiment[p_col]), s=10, alpha=0.7, color=color, label=label)
ax.axhline(-np.log10(1 / (1 + n_permutations)), color="grey", lw=0.6, ls=":", label="smallest possible p")
ax.set_xlabel("Pearson r with the label (1 = positive)")
ax.set_ylabel("-log10 permutation p")
ax.legend(fontsize=7)
ax.set_title(f"sentiment heads: effect against evidence ({len(sentiment)} heads each)")
fig.tight_layout()

# %% [markdown]
# ## 3. Instruction-following heads
#
# **Pairs.** `headlab.data.instruction_pairs`: each of 24 directive phrases (imperative verbs such as
# *explain*, *list*, *translate* and the constraint words *always*, *never*, *only*, followed by a
# task) is put into three instruction frames ("Please …", "Your task: …", "Now, …") and three
# matched plain-prose frames ("The students …", "Every week they …", "In the story, the clerks …").
# The directive word and everything after it are identical within a pair, and mid-sentence, so they
# are the same tokens. **Measure.** The attention mass on the directive word's tokens, averaged over
# the query positions after it. **Surplus** = instruction − plain, per pair; heads are ranked by the
# mean surplus with a paired 95% bootstrap interval over pairs (`headlab.bias.head_differences`).
# This is a template set, written for the probe, not text sampled from the wild: 72 pairs.

# %%
pairs = data.instruction_pairs()
enc_i = [attention.encode_spans(tok, r.instruction, [r.instruction_span]) for r in pairs.itertuples()]
enc_p = [attention.encode_spans(tok, r.plain, [r.plain_span]) for r in pairs.itertuples()]


def after(ids, keys):
    return list(range(max(keys) + 1, len(ids)))


t0 = time.time()
instr = attention.span_attention(lm, [i for i, _ in enc_i], [after(i, k[0]) for i, k in enc_i],
                                 [k[0] for _, k in enc_i], batch_size=batch_size)
plain = attention.span_attention(lm, [i for i, _ in enc_p], [after(i, k[0]) for i, k in enc_p],
                                 [k[0] for _, k in enc_p], batch_size=batch_size)
timings["instruction"] = time.time() - t0
instruction = bias.head_differences(instr, plain, n_boot=n_boot, seed=seed, names=("instruction", "plain"))
instruction = instruction.sort_values("diff", ascending=False, kind="stable").reset_index(drop=True)
instruction.head(10).round(4)

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, max(3.5, 0.2 * L + 1.8)), gridspec_kw={"width_ratios": [1, 1.2]})
plots.head_heatmap(instruction, "diff", "attention surplus on directive words (instruction − plain)", ax=axes[0])
top_instr = instruction.head(15).iloc[::-1]
axes[1].barh([chapter.head_label(r.layer, r.head) for r in top_instr.itertuples()], top_instr["diff"],
             xerr=[top_instr["diff"] - top_instr["diff_low"], top_instr["diff_high"] - top_instr["diff"]],
             color="#4c72b0", capsize=2)
axes[1].axvline(0, color="black", lw=0.8)
axes[1].set_xlabel("surplus (95% paired bootstrap CI over pairs)")
fig.tight_layout()

# %% [markdown]
# ## 4. Explore the patterns
#
# Pick a text, a layer and a head; hover a cell for the query and key tokens and the attention weight.
# The patterns of three short texts (a Wikipedia opening, a review and an instruction) were computed
# once, for every head, above this figure, which only draws them; it opens on the lowest-entropy head.

# %%
explore_texts = {"wikipedia": seqs[0][:24], "review": rev["ids"].iloc[0][:24], "instruction": enc_i[0][0]}
explore = {name: attention.attention_patterns(lm, ids[None])[0].numpy() for name, ids in explore_texts.items()}
explore_tokens = {name: tok.convert_ids_to_tokens(ids.tolist()) for name, ids in explore_texts.items()}
notes = {(r.layer, r.head): f"entropy {r.entropy:.2f}, first-token attention {r.first_token:.2f}"
         for r in entropy.itertuples()}
first = {"layer": int(entropy["layer"][0]), "head": int(entropy["head"][0]), "notes": notes}
from headlab import figures  # noqa: E402

figures.show(figures.pattern_explorer(explore, explore_tokens, **first),
             widget=lambda: widgets.pattern_explorer(explore, explore_tokens, **first))

# %% [markdown]
# The bertviz head view below draws, for a short instruction, every head of three layers: those of
# the lowest-entropy head, the highest-entropy head and the top instruction head. Hover over a token
# to see where it attends; double-click a colour to show one head. bertviz embeds every number of
# every head shown, so the view is limited to a short prompt and three layers.

# %%
bv_ids = torch.tensor(tok(bertviz_prompt, add_special_tokens=True)["input_ids"])
bv_layers = sorted({int(entropy["layer"].iloc[0]), int(entropy["layer"].iloc[-1]), int(instruction["layer"][0])})
widgets.head_view(attention.attention_patterns(lm, bv_ids[None])[0], tok.convert_ids_to_tokens(bv_ids.tolist()),
                  layers=bv_layers)

# %% [markdown]
# ## What we saw

# %% tags=["hide-input"]
low, high = entropy.head(3), entropy.iloc[::-1].head(3)
sig = sentiment[sentiment["q"] <= fdr]
sig_adj = sentiment[sentiment["q_adjusted"] <= fdr]
fw = sentiment[sentiment["p_familywise"] <= 0.05]
sink = entropy.head(n_show)["first_token"]
chapter.bullets([
    f"Entropy ({len(seqs)} Wikipedia openings of {text_tokens} tokens): lowest "
    f"{chapter.head_list(low, 'entropy', 3, ci=True)}; highest {chapter.head_list(high, 'entropy', 3, ci=True)}. "
    f"Layer means run from {by_layer['mean'].min():.2f} (layer {by_layer['mean'].idxmin()}) to "
    f"{by_layer['mean'].max():.2f} (layer {by_layer['mean'].idxmax()}); "
    f"{int((entropy['entropy'] < 0.3).sum())} heads have mean entropy below 0.3.",
    f"The {n_show} lowest-entropy heads put on average {sink.mean():.2f} of their attention on the first token "
    f"(all heads: {entropy['first_token'].mean():.2f}); Spearman ρ between entropy and first-token attention "
    f"over heads = {entropy['entropy'].corr(entropy['first_token'], method='spearman'):.2f}.",
    f"Sentiment ({len(rev)} reviews with lexicon words): the largest |r| is {chapter.head_list(sentiment, 'r', 1)}; "
    f"{len(sig)} heads have BH q ≤ {fdr} on the raw mass" + (f" ({chapter.head_list(sig, 'r', 5)})" if len(sig) else "")
    + f", {len(fw)} pass the family-wise max-|r| test at 0.05; after regressing out the number of sentiment tokens "
    f"and the length, {len(sig_adj)} heads have q ≤ {fdr}"
    + (f" ({chapter.head_list(sig_adj, 'r_adjusted', 5)})" if len(sig_adj) else "")
    + f". The label itself correlates with the number of sentiment tokens at r = "
    f"{lex['corr(label, # sentiment tokens)']:.2f}. Of the {len(fw)} family-wise significant heads, "
    f"{int((fw['r'] < 0).sum())} have r < 0 (more attention on sentiment words in negative reviews); with count and "
    f"length regressed out, {int((sentiment['p_familywise_adjusted'] <= 0.05).sum())} heads pass the family-wise test.",
    f"Instruction surplus ({len(pairs)} pairs): top heads {chapter.head_list(instruction, 'diff', 5, ci=True)}; "
    f"{int((instruction['diff_low'] > 0).sum())} of {len(instruction)} heads have a 95% interval above 0, "
    f"{int((instruction['diff_high'] < 0).sum())} below 0.",
    f"Run time: entropy {timings['entropy']:.0f} s, sentiment {timings['sentiment']:.0f} s, "
    f"instruction {timings['instruction']:.0f} s.",
])

# %% tags=["hide-input"]
records.write_config(results_dir, params, lm, elapsed_seconds=time.time() - t_start, timings=timings)
records.save_frames(results_dir, entropy=entropy, sentiment_heads=sentiment, instruction_heads=instruction)
print(f"results in {results_dir}/; total {time.time() - t_start:.0f} s")

# %% tags=["remove-cell"]
# The chapter's answer for the book's front page.
low3 = ", ".join(f"**L{r.layer}H{r.head}** ({r.entropy:.2f})" for r in entropy.head(3).itertuples())
fw = int((sentiment["p_familywise"] <= 0.05).sum())
ins = instruction.iloc[0]
records.update_summary(
    results_dir, lowest_entropy_head=f"L{entropy['layer'][0]}H{entropy['head'][0]}", sentiment_heads_familywise=fw,
    headline=(f"The most focused heads are {low3} (normalised attention entropy); {fw} of {len(sentiment)} heads "
              f"track sentiment words (family-wise p ≤ 0.05); the largest attention surplus on directive words "
              f"is **L{int(ins['layer'])}H{int(ins['head'])}** ({ins['diff']:+.3f} [{ins['diff_low']:+.3f}, "
              f"{ins['diff_high']:+.3f}])."))
