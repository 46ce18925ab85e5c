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
# # FFN neurons and the logit lens: which neurons fire on real text, what do they write, and from which layer on is the answer readable?
#
# **Neurons.** Every block's feed-forward network (FFN) maps the residual stream into a wider hidden
# layer, applies a nonlinearity and maps back. A *neuron* is one coordinate of that hidden layer after
# the nonlinearity: $a_n = \mathrm{act}(w_{\text{gate},n}\cdot x)\,(w_{\text{up},n}\cdot x)$ in gated
# MLPs (Llama/SmolLM2, Qwen, Gemma), $a_n = \mathrm{act}(w_{\text{in},n}\cdot x)$ in GPT-2, NeoX and OPT.
# It is the input of the down projection, read through the architecture adapter (`mlp_out`), and neuron
# $n$ adds $a_n\,W_{\text{out}}[:, n]$ to the residual stream. We run real Wikipedia text through the
# model and, for every neuron of every layer, keep running statistics (mean |activation|, max, the
# texts that activate it most) *inside the forward hook*, so nothing grows with the corpus
# (`headlab.neurons.neuron_stats`). A neuron's output column pushed through the unembedding (with the
# final norm's gain) says which tokens it promotes.
#
# **Logit lens.** Decoding the residual stream after block $\ell$ with the model's own final norm and
# unembedding (`headlab.lens.decode_residual`) asks: if the model stopped here, what would it say?
# After the last block this is exactly the model's output. On the few-shot sentiment prompts of the
# baseline chapter we read, layer by layer, the probability and rank of the correct label token
# (`" positive"` / `" negative"`) and whether the two labels are already ordered correctly.
#
# **Causal check.** Large activations need not matter. We ablate a layer's $k$ neurons with the largest
# mean |activation| (zero, or their mean over the reference text) and measure the next-token loss on
# *held-out* articles, against ablating $k$ random other neurons of the same layer.

# %% tags=["parameters"]
model: str = "smollm2-135m"  # embedded name, .gguf path, local directory or hub id
device: str = "auto"  # "auto", "cpu" or "cuda"
dtype: str = "auto"  # "auto" (fp32 on CPU, bf16 on CUDA), "float32", "bfloat16", "float16"
seq_len: int = 256  # tokens per Wikipedia row
n_capture_rows: int = 64  # reference rows aggregated into the neuron statistics (x seq_len tokens)
n_heldout_rows: int = 12  # rows of held-out articles scored in the ablation check (one per article)
heldout_len: int = 64  # tokens per held-out row (the ablation check's cost grows with rows x tokens)
n_heldout_articles: int = 20  # articles reserved for the held-out rows (the rest is the reference)
rows_per_article: int = 2  # at most this many consecutive rows per reference article
skip_first: int = 1  # positions per row left out of the statistics (the first has no context)
k_examples: int = 8  # top-activating tokens kept per neuron
n_top: int = 5  # neurons per layer listed in the tables
show_layers: list = []  # layers whose strongest neuron is shown ([]: an early, a middle and a late layer, from the depth)
data_source: str = "rotten_tomatoes"  # sentiment data (as in the baseline chapter)
split_seed: int = 0  # seed of the baseline's data split (used when no prompt config is found)
prompt_config: str = "results/baseline/prompt_config.json"  # written by the baseline chapter
n_lens_prompts: int = 100  # test prompts for the logit lens readout
ablation_layers: list = []  # layers whose neurons are ablated, one at a time ([]: as show_layers)
k_list: list = [16, 128]  # neurons ablated at once
modes: list = ["mean"]  # "zero" and/or "mean" ablation
n_permutations: int = 39  # random neuron sets per (mode, layer, k); 39 or more give a 95% band; p resolution 1/(n+1)
rank_by: str = "mean_abs"  # ranking of the "top" neurons: "mean_abs" or "max"
n_boot: int = 1000  # bootstrap resamples for the intervals
seed: int = 0  # article split and random neuron sets
batch_size: int = 8  # rows / prompts per forward pass (results do not depend on it)
torch_threads: int = 0  # CPU threads for torch (0: torch's default; 1 is faster on a busy machine)
results_dir: str = "results/ffn_neurons"  # tables, shards and the run's config

# %% tags=["hide-input"]
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from IPython.display import HTML, Markdown, display

from headlab import ablation, chapter, data, engine, lens, metrics, neurons, plots, records, tasks, widgets

t_start = time.time()
params = chapter.parameters(globals())
lm = chapter.load(params)
show_layers = chapter.depth_layers(lm.n_layers, show_layers, "show_layers")
ablation_layers = chapter.depth_layers(lm.n_layers, ablation_layers, "ablation_layers")
print(f"{lm.spec}: {lm.n_layers} layers; neuroscope of layers {show_layers}, ablation of layers {ablation_layers}")
pd.Series(lm.describe()).to_frame("model")

# %% [markdown]
# ## Text: reference and held-out articles
#
# The Wikipedia articles are shuffled once (by `seed`); the first `n_heldout_articles` are held out for
# the ablation check, the others give the reference rows for the statistics and for the mean-ablation
# values. A row is `seq_len` (held-out: `heldout_len`) consecutive tokens of one article, so no row
# spans two articles.

# %%
wiki = data.load_wikipedia()
order = np.random.default_rng(seed).permutation(len(wiki))
held_articles, ref_articles = order[:n_heldout_articles], order[n_heldout_articles:]
ref_ids, ref_src = tasks.text_rows(lm, wiki["text"].iloc[ref_articles], n_capture_rows, seq_len, rows_per_article)
held_ids, held_src = tasks.text_rows(lm, wiki["text"].iloc[held_articles], n_heldout_rows, heldout_len, 1)
ref_titles = set(wiki["title"].iloc[ref_articles[np.unique(ref_src)]])
held_titles = set(wiki["title"].iloc[held_articles[np.unique(held_src)]])
assert not ref_titles & held_titles
pd.DataFrame({"rows": [len(ref_ids), len(held_ids)], "tokens": [ref_ids.numel(), held_ids.numel()],
              "articles": [len(ref_titles), len(held_titles)]}, index=["reference", "held-out"])

# %% [markdown]
# ## Streaming capture of every layer
#
# One plain forward pass of one batch first (it also pages in the weights), then the capture under
# `headlab.records.peak_memory`: the resident-set high-water mark of the process is reset before the
# capture and read after it, so the increase is what the streaming capture needs on top of a plain
# forward pass. Holding every activation instead would need (tokens × layers × d_mlp) floats.

# %%
with torch.inference_mode():
    lm.model(input_ids=ref_ids[:batch_size].to(lm.device), logits_to_keep=1)
t0 = time.time()
with records.peak_memory() as mem:
    stats = neurons.neuron_stats(lm, ref_ids, k=k_examples, batch_size=batch_size, skip_first=skip_first)
capture_seconds = time.time() - t0
dense = neurons.dense_bytes(stats.count, lm.n_layers, lm.d_mlp)
batch_layer = neurons.dense_bytes(batch_size * seq_len, 1, lm.d_mlp)
mib = 2.0 ** 20
memory = pd.DataFrame([
    {"quantity": "peak RSS increase during the streaming capture (over a plain forward)", "MiB": (mem["rss_increase"] or np.nan) / mib},
    {"quantity": "statistics kept (sums, min, top-k keys)", "MiB": stats.nbytes() / mib},
    {"quantity": "one layer's activations of one batch (float32)", "MiB": batch_layer / mib},
    {"quantity": f"all activations of {stats.count:,} tokens x {lm.n_layers} layers (float32)", "MiB": dense / mib},
])
if "cuda_peak_allocated" in mem:
    memory.loc[len(memory)] = ["CUDA peak allocated during the capture", mem["cuda_peak_allocated"] / mib]
print(f"{stats.count:,} tokens x {lm.n_layers} layers x {lm.d_mlp} neurons in {capture_seconds:.0f} s "
      f"({stats.count / capture_seconds:.0f} tokens/s)")
memory.round(1)

# %% [markdown]
# ## Which neurons are large?
#
# Per layer, the largest, 99th-percentile and median neuron by mean |activation| and by max
# activation (log scales), then each layer's top neurons by both measures.

# %%
frame = stats.frame()
fig = plots.neuron_profile(frame, title=f"{lm.spec}: {stats.count:,} Wikipedia tokens")

# %%
top_abs = neurons.top_neurons(stats, "mean_abs", n_top)
top_max = neurons.top_neurons(stats, "max", n_top)
listing = lambda t, col: t.groupby("layer").apply(  # noqa: E731
    lambda g: ", ".join(f"{n} ({v:.2f})" for n, v in zip(g["neuron"], g[col])), include_groups=False)
pd.DataFrame({f"top {n_top} by mean |act| (value)": listing(top_abs, "mean_abs"),
              f"top {n_top} by max act (value)": listing(top_max, "max")})

# %% [markdown]
# ## A small neuroscope
#
# For the neuron with the largest max activation in each of `show_layers`: the text snippets that
# activate it most (each token shaded by the neuron's activation, red positive, blue negative; the
# top token boxed; hover a token for its value) and the tokens its output weights promote and
# suppress through the unembedding (`headlab.neurons.promoted_tokens`).

# %%
shown = []
for layer in show_layers:
    row = top_max[(top_max["layer"] == layer) & (top_max["rank"] == 1)].iloc[0]
    n = int(row["neuron"])
    ex = neurons.top_examples(lm, stats, ref_ids, layer, n)
    snip = neurons.snippet_activations(lm, ref_ids, ex, layer, n)
    promo = neurons.promoted_tokens(lm, layer, n, k=8)
    shown.append({"layer": layer, "neuron": n, "max": float(row["max"]), "top_tokens": ex["token"].tolist(),
                  "positions": ex["position"].tolist(),
                  "promoted": promo[promo["direction"] == "promoted"]["token"].tolist()})
    display(HTML(plots.neuron_snippets_html(snip, ex, f"layer {layer}, neuron {n} (max {row['max']:.2f}, "
                                                       f"mean |act| {row['mean_abs']:.3f})")))
    display(promo.pivot(index="rank", columns="direction", values="token").T)

# %% [markdown]
# Pick a layer and one of its three neurons with the largest max activation: their top snippets and the
# tokens they promote and suppress (in JupyterLab, any layer and neuron).

# %%
from headlab import figures  # noqa: E402

choices = top_max[top_max["rank"] <= 3][["layer", "neuron"]].itertuples(index=False)
figures.show(figures.neuron_explorer(figures.neuron_cards(lm, stats, ref_ids, list(choices)),
                                     layer=shown[0]["layer"], neuron=shown[0]["neuron"]),
             widget=lambda: widgets.neuron_explorer(lm, stats, ref_ids, layer=shown[0]["layer"],
                                                    neuron=shown[0]["neuron"]))

# %% [markdown]
# ## Logit lens on one prompt
#
# The few-shot prompt and decision threshold are the ones the baseline chapter validated; the prompts
# come from its test split. The table shows the five most probable next tokens read off the residual
# stream after each block, at the last position of the first test prompt.

# %%
config, splits, validated = tasks.load_prompt_setup(prompt_config, tasks.PromptConfig("plain", 8, 0),
                                                    source=data_source, seed=split_seed)
if not validated:
    display(Markdown(f"**Warning:** `{prompt_config}` not found; using an unvalidated default prompt. "
                     "Run the baseline chapter first."))
task = tasks.make_task(splits, "test", config).head(n_lens_prompts)
enc, label_ids = task.encode(lm), task.label_ids(lm)
one = lens.lens_logits(lm, enc.full(0)[None], positions=[len(enc.full(0)) - 1])[:, 0, 0]  # (L, V)
probs = torch.softmax(one, -1).topk(5)
print(task.prompt(0)[-200:])
print(f"(correct label: {task.fmt.labels[task.labels[0]]!r})")
pd.DataFrame([[f"{lm.tokenizer.decode([int(i)])!r} {p:.2f}" for p, i in zip(pv.tolist(), iv.tolist())]
              for pv, iv in zip(probs.values, probs.indices)], columns=[f"top {j + 1}" for j in range(5)]
             ).rename_axis("layer")

# %% [markdown]
# ## When does the label become readable?
#
# Over the first `n_lens_prompts` test prompts, per layer: the mean probability of the correct label
# token, its median rank among all tokens, the share of prompts where the correct label beats the
# other one (accuracy at threshold 0) and the ROC-AUC of $\log p(\text{positive}) - \log
# p(\text{negative})$, which needs no threshold. Bands and brackets are 95% bootstrap intervals over
# prompts.
# <!-- prose-ok: 95% (the intervals' level, headlab.metrics' default) -->

# %%
t0 = time.time()
lens_lp, lens_rank = lens.lens_label_scores(lm, enc, label_ids, batch_size=batch_size)
lens_seconds = time.time() - t0
readout = metrics.layer_readout(lens_lp.numpy(), lens_rank.numpy(), task.labels, n_boot=n_boot, seed=seed)
clean_lp = engine.label_logprobs(lm, enc, label_ids, batch_size=batch_size)
lens_gap = float((lens_lp[-1] - clean_lp).abs().max())
fig = plots.lens_readout(readout, title=f"logit lens, {len(task.labels)} sentiment prompts ({config.format}, "
                                        f"{config.k} shots)")

# %%
readout[["layer", "p_correct", "median_rank", "top1", "accuracy", "accuracy_low", "accuracy_high", "roc_auc",
         "roc_auc_low", "roc_auc_high"]].round(3).assign(p_correct=readout["p_correct"].map("{:.2e}".format))

# %% [markdown]
# ## Causal check: top neurons vs random neurons
#
# For each layer in `ablation_layers` and each $k$: the layer's $k$ neurons with the largest
# mean |activation| on the reference text, or $k$ neurons drawn uniformly from the layer's other neurons
# (`n_permutations` draws per mode, layer and $k$), are ablated together; *zero* sets their activation
# to 0, *mean* to their mean over the reference text (`headlab.ablation.neuron_ablation_sweep`).
# `loss_change` is the change of the mean next-token loss on the held-out rows (nats); the curves'
# intervals resample rows (and random sets). Only the blocks from the ablated layer on are recomputed
# (the clean input of that layer is kept), so a late layer costs little. Every point is a resumable
# shard.

# %%
t0 = time.time()
abl = ablation.neuron_ablation_sweep(lm, held_ids, stats, Path(results_dir) / "shards", layers=ablation_layers,
                                     k_list=k_list, modes=modes, n_random=n_permutations, by=rank_by,
                                     seed=seed, batch_size=batch_size)
ablation_seconds = time.time() - t0
abl_summary = ablation.ablation_summary(abl, "loss_change", by=("mode", "layer", "set_type", "k"), n_boot=n_boot,
                                        seed=seed)
clean_loss = float((abl["loss"] - abl["loss_change"]).groupby(abl["sequence"]).first().mean())
fig = plots.ablation_curves(abl_summary, "k", "Δ loss on held-out text (nats)", col="mode", row="layer", logx=True)

# %% [markdown]
# The top set against the random sets (`headlab.ablation.top_vs_random`): the top set's loss change
# (`top`, with a 95% bootstrap interval over rows), the random sets' mean and band (`band` says what
# it is: with too few random sets for a central 95% band, `headlab.ablation.random_sets_needed`, it is
# their min-max range), and a permutation p-value: (1 + the number of random sets that raise the loss
# at least as much) / (1 + the number of random sets), resolution 1 / (n + 1). The verdict is that
# test at 0.05.
# <!-- prose-ok: 95% 0.05 (levels of the interval and of the test, headlab.ablation defaults) -->

# %%
versus = ablation.top_vs_random(abl, {"loss_change": "greater"}, by=("mode", "layer", "k"), n_boot=n_boot,
                                seed=seed)
versus.round(4)

# %% [markdown]
# ## What we saw

# %% tags=["hide-input"]
auc_layer = metrics.first_sustained_layer(readout, "roc_auc_low", 0.5)
acc_layer = metrics.first_sustained_layer(readout, "accuracy_low", 0.5)
top1_layer = metrics.first_sustained_layer(readout, "top1", 0.5)
last = readout.iloc[-1]
g_abs = frame.loc[frame.groupby("layer")["mean_abs"].idxmax()]
outliers = g_abs.assign(ratio=g_abs["mean_abs"].to_numpy() / frame.groupby("layer")["mean_abs"].median().to_numpy())
big = outliers.sort_values("ratio", ascending=False).head(3)
since = lambda v: f"from layer {v} on" if v is not None else "not even at the last layer"  # noqa: E731
positions = stats.top_index % seq_len  # (L, N, k): position in its row of each top example
lines = [
    f"Capture: {stats.count:,} tokens of {len(ref_titles)} reference articles, all {lm.n_layers} layers "
    f"x {lm.d_mlp} neurons, in {capture_seconds:.0f} s; peak RSS rose by "
    f"{(mem['rss_increase'] or float('nan')) / mib:.0f} MiB while holding every activation would take "
    f"{dense / mib:,.0f} MiB (the statistics themselves: {stats.nbytes() / mib:.1f} MiB).",
    "Most lopsided layers (largest neuron's mean |act| / the layer's median): " + "; ".join(
        f"L{r.layer} N{r.neuron} mean |act| {r.mean_abs:.2f} = {r.ratio:.0f}x the median, max {r.max:.1f}, its "
        f"top {k_examples} examples at row positions {sorted(positions[stats.slot(r.layer), r.neuron].tolist())}"
        for r in big.itertuples()) + ".",
    "Neuroscope: " + "; ".join(
        f"L{s['layer']} N{s['neuron']} (max {s['max']:.1f}) fires most on {', '.join(map(repr, s['top_tokens'][:4]))}"
        f" (row positions {s['positions'][:4]}) and promotes {', '.join(map(repr, s['promoted'][:4]))}"
        for s in shown) + ".",
    f"Logit lens at the last layer equals the model's label log-probabilities (max difference {lens_gap:.1e}).",
    f"Sentiment ({len(task.labels)} prompts{'' if validated else ', UNVALIDATED default prompt'}): the ROC-AUC "
    f"interval stays above 0.5 {since(auc_layer)}, the accuracy interval (correct label beats the other) "
    f"{since(acc_layer)}; the correct label is the top token for most prompts {since(top1_layer)}. "
    f"At the last layer: p(correct) "
    f"{last['p_correct']:.3f}, accuracy "
    f"{chapter.fmt_ci(last['accuracy'], last['accuracy_low'], last['accuracy_high'])}, ROC-AUC {last['roc_auc']:.3f}, median rank {last['median_rank']:.0f}.",
]
lines += [
    f"{r.mode} ablation of layer {r.layer}, k = {r.k}: held-out loss {r.top:+.4f} nats "
    f"[{r.top_low:+.4f}, {r.top_high:+.4f}] for the top neurons vs {r.random_mean:+.4f} for random ones "
    f"({r.band}: {r.random_low:+.4f} to {r.random_high:+.4f}; clean {clean_loss:.3f}); {r.verdict}, p resolution "
    f"{r.p_resolution:.3f}."
    for r in versus.itertuples()
]
n_sig, n_test = (int(versus["verdict"].str.startswith(s).sum()) for s in ("top set", ("top set", "not dist")))
lines.append(f"In {n_sig} of the {n_test} (mode, layer, k) settings with enough random sets for a permutation test "
             f"at 0.05 the top neurons raise the loss more than random ones ({len(versus) - n_test} too few to test).")
n_sets = abl[abl["k"] > 0].groupby(["mode", "layer", "set_type", "k", "permutation"]).ngroups
lines.append(f"Run time: capture {capture_seconds:.0f} s, lens {lens_seconds:.0f} s, ablation {ablation_seconds:.0f} s "
             f"({n_sets} neuron sets on {len(held_ids)} held-out rows of {held_ids.shape[1]} tokens).")
chapter.bullets(lines)

# %% tags=["hide-input"]
records.write_config(results_dir, params, lm, elapsed_seconds=time.time() - t_start,
                     timings={"capture": capture_seconds, "lens": lens_seconds, "ablation": ablation_seconds},
                     memory={k: v for k, v in mem.items()}, dense_bytes=dense, prompt_validated=validated)
records.save_frames(results_dir, neuron_stats=frame, top_mean_abs=top_abs, top_max=top_max, lens_readout=readout,
                    ablation=abl, ablation_summary=abl_summary, top_vs_random=versus, memory=memory)
print(f"results in {results_dir}/ ; total {time.time() - t_start:.0f} s")

# %% tags=["remove-cell"]
# The chapter's answer for the book's front page.
auc_from = metrics.first_sustained_layer(readout, "roc_auc_low", 0.5)
ratio = frame["mean_abs"] / frame.groupby("layer")["mean_abs"].transform("median")
lopsided = frame.assign(ratio=ratio).nlargest(1, "ratio").iloc[0]
records.update_summary(results_dir, label_readable_from_layer=auc_from, headline=(
    (f"The sentiment label can be read off the residual stream from layer **{auc_from}** on"
     if auc_from is not None else "The sentiment label cannot be read off the residual stream, not even at the last layer")
    + f" (logit lens: ROC-AUC interval above 0.5, {len(task.labels)} prompts); the most lopsided neuron is "
    f"**L{int(lopsided['layer'])} N{int(lopsided['neuron'])}**, with a mean |activation| {lopsided['ratio']:.0f}x its "
    f"layer's median."))
