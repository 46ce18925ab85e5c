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
# # Weight sensitivity: which weights can the model lose, and which single weight can it not?
#
# The earlier chapters perturbed *activations* (a head's output). Here we edit the **weights**
# themselves and measure what the model loses, on two yardsticks: perplexity on real English
# Wikipedia text and few-shot sentiment accuracy. Five experiments:
#
# 1. **Module ablation**: each weight matrix of each layer ($W_Q, W_K, W_V, W_O$, gate, up, down) is
#    set to zero (or to its mean entry) on its own; the perplexity change is drawn as a
#    layer x matrix heatmap.
# 2. **Pruning**: unstructured *magnitude* pruning (the smallest $|W_{ij}|$ of each matrix) against
#    **Wanda** (Sun et al. 2023: the smallest $|W_{ij}|\,\lVert x_j\rVert_2$ within each output row,
#    with $\lVert x_j\rVert_2$ the norm of input feature $j$ over calibration text), at 10-70% sparsity;
#    beside it, removing whole attention heads least-important-first against a random order.
# 3. **Weight noise**: $W \leftarrow W + \text{level}\cdot\operatorname{std}(W)\,\varepsilon$ on every
#    matrix, several levels and seeds.
# 4. **Bit flips**: one bit of one random weight flipped in its 16-bit floating-point representation;
#    the probability that one flip breaks the model, per bit position.
# 5. **Super weights** (Yu et al. 2024, "The Super Weight in Large Language Models"): a handful of
#    weights in an early MLP down projection whose removal destroys the model. We look for the
#    activation spike they cause, zero each candidate, and compare with zeroing the same number of the
#    largest-magnitude ordinary weights.
#
# **How edits are made.** Every edit runs inside a context manager of `headlab.interventions`
# (`zero_weights`, `prune_magnitude`, `prune_wanda`, `noise_weights`, `prune_heads`,
# `flip_weight_bits`, `zero_weight_entries`, all built on `edit_weights`). It clones only the matrices
# it names, edits them in place and copies the originals back in `finally`, so the model is restored
# bit-exactly even when something raises; the chapter checks a SHA-256 of the whole state dict before
# and after. Matrices are named through the architecture adapter (`L12.mlp.down`), so the chapter runs
# unchanged on GPT-2, Pythia, OPT, Qwen or Gemma. The default model is loaded from a GGUF file and
# dequantized to float32: the edits act on those dequantized weights. Its output layer *is* its token
# embedding (tied weights); the edits here touch the 30 blocks only, and `edit_weights` refuses to
# edit a shared tensor unless asked to explicitly.
#
# **Perplexity.** A fixed budget of Wikipedia tokens is cut into windows of `ppl_context` tokens,
# every token scored once (`headlab.perplexity.windows_nll`). An edit in layer $\ell$ cannot change
# layers before it, so the clean inputs of layer $\ell$ are reused and only layers $\ell$ onward are
# recomputed (tested to equal a full forward). Intervals are a block bootstrap over consecutive blocks
# of `block_tokens` scored tokens; changes are paired (the same blocks for the edited and the dense
# run).

# %% tags=["parameters"]
model: str = "smollm2-135m"  # embedded name, .gguf path, local directory or hub id
device: str = "auto"  # "auto", "cpu" or "cuda"
dtype: str = "float32"  # weights stay float32 by default so that bit flips act on exact values
ppl_tokens: int = 2048  # Wikipedia tokens scored for pruning, noise and super-weight settings
ppl_context: int = 256  # window length in tokens; windows follow each other (stride equals context)
heatmap_tokens: int = 512  # tokens for the layer x matrix ablation grid (the first windows)
ablation_modes: list = ["zero"]  # "zero" and/or "mean" (every entry set to the matrix's mean)
ablation_layers: list = []  # layers of the ablation grid (empty list: all layers)
calib_tokens: int = 1024  # calibration tokens (other articles) for Wanda and the super-weight search
sparsities: list = [0.1, 0.3, 0.5, 0.7]  # pruning levels (share of weights / of heads removed)
head_ranking: str = "results/noise/ranking.parquet"  # the noise chapter's head ranking
head_random_seeds: list = [0, 1]  # random head orders
noise_levels: list = [0.03, 0.1, 0.3]  # weight noise std in units of each matrix's std
noise_seeds: list = [0, 1]  # noise draws per level
bit_formats: list = ["bfloat16"]  # 16-bit formats the flipped weight is represented in ("float16" too)
bits: list = ["sign", "exponent_msb", "exponent_lsb", "mantissa_msb", "mantissa_lsb"]  # bit positions
bit_trials: int = 30  # random weights flipped per (format, bit); the same weights for every bit
bit_tokens: int = 256  # tokens scored per bit-flip trial
break_factor: float = 2.0  # a flip "breaks" the model: perplexity > break_factor x dense, or not finite
n_super_candidates: int = 3  # layers with the largest down-projection output spike to test
prompt_config: str = "results/baseline/prompt_config.json"  # written by the baseline chapter
n_prompts: int = 0  # sentiment test prompts per setting (0: 100 on a GPU, 24 on CPU)
block_tokens: int = 128  # tokens per bootstrap block
n_boot: int = 1000  # bootstrap resamples
seed: int = 0  # seeds bit-flip weights
batch_size: int = 8  # windows per forward pass
torch_threads: int = 0  # CPU threads for torch (0: torch's default); 1 is faster on a busy machine
results_dir: str = "results/weights"  # shards, tables and the run's config

# %% tags=["hide-input"]
import time
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from headlab import attention, chapter, data, metrics, perplexity, plots, records, shards, tasks, weight_sweep, weights
from headlab.models import weight_names

t_start = time.time()
params = chapter.parameters(globals())
lm = chapter.load(params, attn_implementation="sdpa")
checksum_start = weights.state_checksum(lm)
shard_dir = Path(results_dir) / "shards"
timings = {}
pd.Series(lm.describe()).to_frame("model")

# %% [markdown]
# ## The text and the dense model
#
# The evaluation stream comes from the first half of the Wikipedia articles, the calibration text
# (Wanda's input norms, the super-weight search, the fallback head ranking) from the second half, so
# no edit is tuned on the tokens it is scored on.

# %%
wiki = data.load_wikipedia()
half = len(wiki) // 2
stream = tasks.text_stream(lm, wiki["text"].iloc[:half], ppl_tokens)
calib = tasks.text_stream(lm, wiki["text"].iloc[half:], calib_tokens - calib_tokens % ppl_context)
calib_rows = calib.reshape(-1, ppl_context)  # (rows, ppl_context)
t0 = time.time()
windows = perplexity.text_windows(lm, stream, context=ppl_context, stride=ppl_context, batch_size=batch_size)
dense_nll = perplexity.windows_nll(lm, windows)[0].numpy()
timings["dense"] = time.time() - t0
dense_ppl = metrics.bootstrap_ci(lambda x: float(np.exp(np.mean(x))), dense_nll, n_boot=n_boot,
                                 groups=np.arange(len(dense_nll)) // block_tokens)
names = weight_names(lm)
display(Markdown(f"Dense perplexity **{dense_ppl}** over {len(dense_nll):,} scored tokens "
                 f"({len(windows.ids)} windows of {ppl_context}); {len(names)} weight matrices in "
                 f"{lm.n_layers} blocks; calibration: {calib_rows.shape[0]} rows of {ppl_context} tokens."))

# %% [markdown]
# ## 1. Module ablation: one matrix at a time
#
# Each matrix is replaced by zeros (its module then passes on nothing; these models have no biases
# in these layers) and the first `heatmap_tokens` tokens are scored. Colour: $\log_{10}$ of the
# perplexity ratio to the dense model on the same tokens.

# %%
heat_windows = windows.head(max(1, heatmap_tokens // ppl_context))
layers = ablation_layers or list(range(lm.n_layers))
canon = [c for c, _ in lm.adapter.weights]
points = [{"kind": "ablate", "layer": layer, "matrix": m, "mode": mode}
          for mode in ablation_modes for layer in layers for m in canon]
t0 = time.time()
abl_tokens, _ = weight_sweep.weight_sweep(lm, heat_windows, points, shard_dir / "ablation", progress=False)
timings["ablation"] = time.time() - t0
ablation = weight_sweep.nll_summary(abl_tokens, ["mode", "layer", "matrix"], dense_nll, block_tokens, n_boot)
ablation["log10_ppl_ratio"] = np.log10(ablation["ppl_ratio"])
print(f"{len(points)} ablations x {heat_windows.n_scored} tokens in {timings['ablation']:.0f} s")

# %%
for mode in ablation_modes:
    fig = plots.layer_module_heatmap(ablation[ablation["mode"] == mode], "log10_ppl_ratio", annot="ppl_ratio",
                                     robust=True, title=f"{mode}-ablating one matrix: perplexity / dense "
                                     "(colour: log10, range clipped to the 2nd-98th percentile)")

# %% [markdown]
# In a block without biases some zero ablations are the same edit in disguise: $W_Q = 0$ and
# $W_K = 0$ both make every attention score 0 (uniform attention); $W_V = 0$ and $W_O = 0$ both make
# the attention output 0; gate, up or down $= 0$ all make the MLP output 0. Where the model has
# biases or the mode is `mean`, the matrices differ. The check below compares the groups on this run.

# %%
def group_spread(frame: pd.DataFrame, groups: list) -> pd.DataFrame:
    """Largest difference of the NLL change within each group of matrices, per mode (over layers)."""
    rows = []
    for mode, g in frame.groupby("mode"):
        wide = g.pivot_table(index="layer", columns="matrix", values="nll_change")
        for grp in groups:
            if set(grp) <= set(wide.columns):
                rows.append({"mode": mode, "matrices": " = ".join(grp),
                             "max_abs_difference_nats": float((wide[grp].max(axis=1) - wide[grp].min(axis=1)).max())})
    return pd.DataFrame(rows, columns=["mode", "matrices", "max_abs_difference_nats"])


spread = group_spread(ablation, [["attn.q", "attn.k"], ["attn.v", "attn.o"], ["mlp.gate", "mlp.up", "mlp.down"]])
spread

# %%
ablation.sort_values("nll_change", ascending=False).head(10).round(3)

# %% [markdown]
# ## 2. Pruning: magnitude vs Wanda, and heads by rank vs at random
#
# Both weight-pruning methods remove the same number of weights from every matrix of every block:
# magnitude per matrix, Wanda per output row (its input norms come from the dense model on the
# calibration text, one shot, not layer by layer). Head pruning removes a fraction of all
# 270 heads by zeroing their columns of $W_O$, the least important first. The ranking is the noise
# chapter's (effect of noise on one head on the sentiment task) when its table exists.

# %%
path = Path(head_ranking)
if path.exists():
    ranking = pd.read_parquet(path).sort_values("rank")[["layer", "head"]]
    ranking_name, ranking_source = "noise-chapter ranking", f"the noise chapter's ranking ({path})"
else:
    norms = attention.head_write_norms(lm, calib_rows)  # (L, H)
    ranking = pd.DataFrame([(layer, h, float(norms[layer, h])) for layer in range(lm.n_layers)
                            for h in range(lm.n_heads)], columns=["layer", "head", "write_norm"])
    ranking = ranking.sort_values("write_norm", ascending=False)
    ranking_name = "fallback ranking by write norm"
    ranking_source = (f"**fallback**: `{path}` not found (run the noise chapter first), so heads are ranked "
                      "here by the mean norm of what they write into the residual stream on the calibration text")
display(Markdown(f"Head ranking: {ranking_source}."))

# %%
wanda_norms = weights.wanda_input_norms(lm, calib_rows, names)
points = [{"kind": k, "sparsity": float(s), "method": k, "level": float(s)}
          for k in ("magnitude", "wanda") for s in sparsities]
points += [{"kind": "heads", "order": "ranking", "seed": 0, "fraction": float(s), "method": "heads: ranked",
            "level": float(s)} for s in sparsities]
points += [{"kind": "heads", "order": "random", "seed": int(r), "fraction": float(s),
            "method": f"heads: random {r}", "level": float(s)} for r in head_random_seeds for s in sparsities]
base = {"calib": shards.config_hash({"c": calib.tolist()}),
        "ranking": shards.config_hash({"r": ranking[["layer", "head"]].to_numpy().tolist()})}
t0 = time.time()
prune_tokens, _ = weight_sweep.weight_sweep(lm, windows, points, shard_dir / "pruning", base, wanda_norms=wanda_norms,
                                     head_ranking=ranking, progress=False)
timings["pruning"] = time.time() - t0
pruning = weight_sweep.nll_summary(prune_tokens, ["method", "level"], dense_nll, block_tokens, n_boot)
pruning["family"] = np.where(pruning["method"].str.startswith("heads"), "heads removed", "weights pruned")

# %%
curves = pruning.rename(columns={"perplexity": "value", "ppl_low": "low", "ppl_high": "high"})
fig = plots.ablation_curves(curves, x="level", ylabel="perplexity", hue="method", col="family", row=None,
                            title=f"Wikipedia perplexity (dense {dense_ppl.value:.1f}), {len(dense_nll):,} tokens")
for ax in fig.axes:
    ax.set_yscale("log")
    ax.axhline(dense_ppl.value, color="grey", lw=0.8, ls=":")

# %%
pruning.pivot_table(index="level", columns="method", values="perplexity").round(2)

# %% [markdown]
# ### Does pruning keep the sentiment judgement?
#
# Few-shot sentiment (the baseline chapter's prompt and threshold) for the dense model and 50%
# magnitude / Wanda pruning, on a few test prompts to stay cheap; ROC-AUC does not depend on the
# threshold.

# %%
n_prompts = params["n_prompts"] = n_prompts or (100 if lm.device.type == "cuda" else 24)
config, splits, validated = tasks.load_prompt_setup(prompt_config, tasks.PromptConfig("plain", 8, 0))
if not validated:  # calibrate the threshold on as many dev prompts, never on the test prompts
    dev = tasks.make_task(splits, "dev", config).head(n_prompts)
    lp_dev = dev.logprobs(lm)
    config = tasks.PromptConfig(config.format, config.k, config.shot_seed,
                                tasks.best_threshold(dev.labels, (lp_dev[:, 1] - lp_dev[:, 0]).numpy()))
task = tasks.make_task(splits, "test", config).head(n_prompts)
display(Markdown(f"Prompt: {config.format}, {config.k} shots, threshold {config.threshold:+.2f} "
                 + ("(the baseline chapter's)." if validated else
                    f"(**`{prompt_config}` not found**: default prompt, threshold calibrated on {n_prompts} dev prompts).")))

# %%
def sentiment_under(label: str, point: dict) -> pd.DataFrame:
    """Accuracy, ROC-AUC, ... of the task prompts with one weight setting applied."""
    with weight_sweep.weight_setting(lm, point, wanda_norms=wanda_norms)[0]:
        lp = task.logprobs(lm)
    rep = metrics.classification_report(task.labels, lp.numpy(), config.threshold, n_boot=n_boot)
    return rep.assign(setting=label)


t0 = time.time()
sentiment = pd.concat([sentiment_under("dense", {"kind": "dense"}),
                       sentiment_under("magnitude 50%", {"kind": "magnitude", "sparsity": 0.5}),
                       sentiment_under("Wanda 50%", {"kind": "wanda", "sparsity": 0.5})], ignore_index=True)
timings["sentiment"] = time.time() - t0
sentiment.pivot_table(index="setting", columns="metric", values="value", sort=False).round(3)

# %% [markdown]
# ## 3. Gaussian noise on every weight matrix

# %%
points = [{"kind": "noise", "level": float(lv), "seed": int(s)} for lv in noise_levels for s in noise_seeds]
t0 = time.time()
noise_tokens, _ = weight_sweep.weight_sweep(lm, windows, points, shard_dir / "noise", progress=False)
timings["noise"] = time.time() - t0
noise = weight_sweep.nll_summary(noise_tokens, ["level", "seed"], dense_nll, block_tokens, n_boot)
fig = plots.ablation_curves(noise.rename(columns={"perplexity": "value", "ppl_low": "low", "ppl_high": "high"}),
                            x="level", ylabel="perplexity", hue="seed", col=None, row=None,
                            title="noise std = level x each matrix's std, on all matrices")
noise.round(3)

# %% [markdown]
# ## 4. Bit flips
#
# A trial picks one weight uniformly among all weights of the 30 blocks (a matrix with probability
# proportional to its size, then a uniform entry) and flips one bit of it. The model computes in
# float32, so the weight is converted to the 16-bit format, the bit is flipped there (XOR on the
# `int16` view) and the value converted back; only that weight changes (the flipped weight is
# rounded to the 16-bit format, every other weight is exact). Trial $t$ uses the same weight for every
# bit and format, so the bit positions are compared on the same weights. A trial **breaks** the model
# when the perplexity on the first `bit_tokens` tokens exceeds `break_factor` x the dense perplexity
# on the same tokens, or is not finite. Intervals are Wilson score intervals.

# %%
bit_windows = windows.head(max(1, bit_tokens // ppl_context))
points = [{"kind": "bitflip", "fmt": f, "bit": b, "trial": t, "seed": seed}
          for f in bit_formats for b in bits for t in range(bit_trials)]
t0 = time.time()
flip_tokens, flip_info = weight_sweep.weight_sweep(lm, bit_windows, points, shard_dir / "bitflips", progress=False)
timings["bitflips"] = time.time() - t0
trials = weight_sweep.nll_summary(flip_tokens, ["fmt", "bit", "trial"], dense_nll, block_tokens, n_boot=0)
trials = trials.merge(flip_info[["fmt", "bit", "trial", "weight", "row", "col", "value", "flipped"]])
bit_dense = float(np.exp(dense_nll[:bit_windows.n_scored].mean()))
breaks = weight_sweep.break_probability(trials, ["fmt", "bit"], bit_dense, break_factor)
fig = plots.probability_bars(breaks, x="bit", hue="fmt",
                             title=f"one flipped bit: P(perplexity > {break_factor:g} x dense or not finite), "
                                   f"{bit_trials} weights each")
breaks.round(3)

# %%
trials.sort_values("perplexity", ascending=False).head(8)[
    ["fmt", "bit", "weight", "row", "col", "value", "flipped", "perplexity"]].round(4)

# %% [markdown]
# ## 5. Super weights
#
# Yu et al. find the super weight through the *super activation* it creates: at some token, one input
# channel $c$ of an early MLP down projection is huge, and the product with $W_\text{down}[r, c]$
# makes output dimension $r$ huge. For every layer we record the largest $|$output$|$ of the down
# projection over the calibration text (row $r$, at one token) and, at that token, the input channel
# whose product with $W_\text{down}[r, c]$ contributes most (column $c$). The layers with the largest
# output spikes give the candidates.

# %%
spikes = pd.DataFrame(weights.down_proj_spikes(lm, calib_rows))
spikes["token_text"] = lm.tokenizer.convert_ids_to_tokens(spikes["token"].tolist())
fig = plots.layer_spikes(spikes, title="MLP down projection: largest |input| and |output| per layer")
cands = spikes.nlargest(n_super_candidates, "out_max")
cands[["layer", "row", "col", "weight", "contribution", "out_value", "in_max", "in_channel", "position", "token_text"]].round(3)

# %%
cand_entries = [(f"L{int(r.layer)}.mlp.down", int(r.row), int(r.col)) for r in cands.itertuples()]
zero = []
for e in cand_entries:  # each candidate, then its control: the largest other weight of the same matrix
    ctrl = weights.largest_weight_entries(lm, 1, [e[0]], exclude=cand_entries)
    zero += [(f"candidate {e[0]}[{e[1]}, {e[2]}]", [e]),
             (f"largest |w| of {e[0]}: [{ctrl[0][1]}, {ctrl[0][2]}]", ctrl)]
top_all = weights.largest_weight_entries(lm, len(cand_entries), names, exclude=cand_entries)
zero += [(f"all {len(cand_entries)} candidates", cand_entries), (f"{len(top_all)} largest |w| of all blocks", top_all)]
points = [{"kind": "zero_entries", "setting": label, "entries": weight_sweep.entries_text(es)} for label, es in zero]
t0 = time.time()
sw_tokens, _ = weight_sweep.weight_sweep(lm, windows, points, shard_dir / "super", progress=False)
timings["super"] = time.time() - t0
superw = weight_sweep.nll_summary(sw_tokens, ["setting", "entries"], dense_nll, block_tokens, n_boot)
superw[["setting", "entries", "perplexity", "ppl_low", "ppl_high", "ppl_ratio"]].round(3)

# %% [markdown]
# Does removing the top candidate remove its activation spike, and what does it do to the sentiment
# task?

# %%
top_entry = weight_sweep.entries_text(cand_entries[:1])
with weight_sweep.weight_setting(lm, {"kind": "zero_entries", "entries": top_entry})[0]:
    spikes_without = pd.DataFrame(weights.down_proj_spikes(lm, calib_rows))
spike_drop = spikes[["layer", "out_max"]].merge(spikes_without[["layer", "out_max"]], on="layer",
                                                suffixes=("", "_zeroed"))
sentiment = pd.concat([sentiment, sentiment_under(f"zeroed {top_entry}",
                                                  {"kind": "zero_entries", "entries": top_entry})],
                      ignore_index=True)
display(spike_drop[spike_drop["layer"].isin(cands["layer"])].set_index("layer").round(1))
sentiment.pivot_table(index="setting", columns="metric", values="value", sort=False).round(3)

# %% [markdown]
# ## What we saw

# %% tags=["hide-input"]
assert weights.state_checksum(lm) == checksum_start, "weights not restored"
pr = pruning.set_index(["method", "level"])["perplexity"]
top_mod = ablation[ablation["mode"] == ablation_modes[0]].nlargest(5, "nll_change")
mod_txt = ", ".join(f"L{r.layer} {r.matrix} (x{r.ppl_ratio:.2f})" for r in top_mod.itertuples())
med = ablation[ablation["mode"] == ablation_modes[0]]["ppl_ratio"].median()
s_at = sentiment.set_index(["setting", "metric"])["value"]
sent_txt = "; ".join(f"{s}: accuracy {s_at[(s, 'accuracy')]:.2f}, ROC-AUC {s_at[(s, 'roc_auc')]:.2f}"
                     for s in ["dense", "magnitude 50%", "Wanda 50%"])
bits_txt = "; ".join(f"{r.fmt} {r.bit}: {r.broken}/{r.trials} = {chapter.fmt_ci(r.p_break, r.low, r.high, '.2f')}"
                     for r in breaks.itertuples())
c0, s0, k0 = cands.iloc[0], superw.iloc[0], superw.iloc[1]
zero_abl = ablation[ablation["mode"] == "zero"].set_index(["layer", "matrix"])["ppl_ratio"]
mlp_whole = zero_abl.get((int(c0.layer), "mlp.down"), float("nan"))
s_at_sw = sentiment[sentiment["setting"] == f"zeroed {top_entry}"].set_index("metric")["value"]
g_all, g_top = superw.iloc[-2], superw.iloc[-1]
lines = [
    f"Dense perplexity {dense_ppl} on {len(dense_nll):,} Wikipedia tokens (windows of {ppl_context}).",
    f"Most sensitive single matrices ({ablation_modes[0]} ablation, {heat_windows.n_scored} tokens): {mod_txt}; "
    f"the median matrix multiplies perplexity by {med:.3f}.",
    "Zero ablation, matrices that are the same edit in a bias-free block (largest difference of the NLL "
    "change over layers): " + ("; ".join(f"{r.matrices}: {r.max_abs_difference_nats:.2g} nats"
                                         for r in spread[spread["mode"] == "zero"].itertuples())
                               or f"no such group among this model's matrices ({', '.join(canon)})") + ".",
    f"50% sparsity: magnitude {pr[('magnitude', 0.5)]:.2f} vs Wanda {pr[('wanda', 0.5)]:.2f} perplexity; "
    f"70%: magnitude {pr[('magnitude', 0.7)]:.1f} vs Wanda {pr[('wanda', 0.7)]:.1f}."
    if ("magnitude", 0.5) in pr.index and ("magnitude", 0.7) in pr.index else "50%/70% sparsity not in the grid.",
    f"Heads ({ranking_name}, least important first): " + "; ".join(
        f"{lv:.0%} removed: ranked {pr[('heads: ranked', lv)]:.1f} vs random "
        f"{np.mean([pr[(f'heads: random {r}', lv)] for r in head_random_seeds]):.1f}" for lv in sparsities) + ".",
    f"Sentiment on {n_prompts} prompts: {sent_txt}.",
    "Weight noise: " + "; ".join(f"level {lv:g}: perplexity {g['perplexity'].mean():.2f}"
                                  for lv, g in noise.groupby("level")) + ".",
    f"One bit flipped (P(break), {bit_trials} weights, 95% Wilson): {bits_txt}.",
    f"Largest down-projection spike: layer {int(c0.layer)}, output dim {int(c0.row)} = {c0.out_value:.1f} at token "
    f"{c0.token_text!r} (position {int(c0.position)}), driven by input channel {int(c0.col)} "
    f"(|input| {c0.in_max:.1f} max in that layer) through W_down[{int(c0.row)}, {int(c0.col)}] = {c0.weight:.3f}.",
    f"Zeroing that one weight: perplexity {s0.perplexity:.2f} [{s0.ppl_low:.2f}, {s0.ppl_high:.2f}] "
    f"(x{s0.ppl_ratio:.2f}); the largest output of layer {int(c0.layer)}'s down projection falls from "
    f"{c0.out_max:.1f} to {spike_drop.set_index('layer').loc[int(c0.layer), 'out_max_zeroed']:.1f}; sentiment "
    f"accuracy {s_at_sw['accuracy']:.2f}, ROC-AUC {s_at_sw['roc_auc']:.2f}. Zeroing the largest-magnitude "
    f"weight of the same matrix instead: {k0.perplexity:.2f} "
    f"(x{k0.ppl_ratio:.2f}). All {len(cand_entries)} candidates: x{g_all.ppl_ratio:.2f}; the {len(top_all)} "
    f"largest-magnitude weights of all blocks: x{g_top.ppl_ratio:.2f}. For comparison, zeroing the whole "
    f"MLP of layer {int(c0.layer)} (its down projection, {heat_windows.n_scored} tokens): x{mlp_whole:.2f}.",
    "Weights restored bit-exactly after every edit (state-dict SHA-256 unchanged).",
]
chapter.bullets(lines)

# %% tags=["hide-input"]
timings["total"] = time.time() - t_start
records.write_config(results_dir, params, lm, elapsed_seconds=timings["total"], timings=timings,
                     dense_perplexity=dense_ppl.__dict__, head_ranking_source=ranking_source,
                     prompt=config.__dict__, prompt_validated=validated)
records.save_frames(results_dir, ablation=ablation, pruning=pruning, sentiment=sentiment, noise=noise,
                    bitflip_trials=trials, bitflip_breaks=breaks, spikes=spikes, super_weights=superw)
print(f"results in {results_dir}/ ; timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))

# %% tags=["remove-cell"]
# The chapter's answer for the book's front page.
sw, ctrl = superw.iloc[0], superw.iloc[1]  # the top candidate, and the largest |w| of its matrix
records.update_summary(
    results_dir, super_weight=f"L{int(cands.iloc[0].layer)} W_down[{int(cands.iloc[0].row)}, {int(cands.iloc[0].col)}]",
    super_weight_ppl_ratio=float(sw.ppl_ratio), headline=(
        f"Zeroing one weight, W_down[{int(cands.iloc[0].row)}, {int(cands.iloc[0].col)}] of layer "
        f"{int(cands.iloc[0].layer)} (the super-weight candidate), multiplies Wikipedia perplexity by "
        f"**{sw.ppl_ratio:.2f}** ({sw.perplexity:.1f} [{sw.ppl_low:.1f}, {sw.ppl_high:.1f}]); zeroing the "
        f"largest-magnitude weight of the same matrix instead: x{ctrl.ppl_ratio:.2f}."))
