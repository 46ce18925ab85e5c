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
# 2. **Pruning**: two scores, *magnitude* $|W_{ij}|$ and **Wanda** (Sun et al. 2023:
#    $|W_{ij}|\,\lVert x_j\rVert_2$, with $\lVert x_j\rVert_2$ the norm of input feature $j$ over
#    calibration text), each removing its smallest scores at the sparsities of `sparsities`. The
#    weights whose scores are compared, the *comparison group*, changes the result on its own (Sun et
#    al. show it), so the main comparison puts both scores on the same group, each output row (Wanda's
#    group); magnitude per matrix and over all matrices at once (`global`) are further rows. Then the
#    effect of Wanda's calibration budget; beside it, removing whole attention heads
#    least-important-first against a random order.
# 3. **Weight noise**: $W \leftarrow W + \text{level}\cdot\operatorname{std}(W)\,\varepsilon$ on every
#    matrix, several levels and seeds.
# 4. **Bit flips**: one bit of one random weight flipped, in the weight's own float32 representation
#    and in bfloat16 (which first rounds the weight to bfloat16); the probability that one flip breaks
#    the model, per bit position and format.
# 5. **Super weights** (Yu et al. 2024, "The Super Weight in Large Language Models"): a handful of
#    weights in the MLP down projections of *early* layers whose removal destroys the model. We follow
#    the paper's search (the activation spike at the down projection, iterated after zeroing each find)
#    in the early layers, report what the same search finds in later layers separately, zero each
#    find, and compare with zeroing the same number of the largest-magnitude ordinary weights.
#
# **How edits are made.** Every edit runs inside a context manager of `headlab.weights`
# (`zero_weights`, `prune_magnitude`, `prune_wanda`, `noise_weights`, `prune_heads`,
# `flip_weight_bits`, `zero_weight_entries`, all built on `edit_weights`). It clones only the matrices
# it names, edits them in place and copies the originals back in `finally`, so the model is restored
# bit-exactly even when something raises; the chapter checks a SHA-256 of the whole state dict before
# and after. Matrices are named through the architecture adapter (`L12.mlp.down`), so the chapter runs
# unchanged on GPT-2, Pythia, OPT, Qwen or Gemma. The edits act on the weights as loaded; where they
# came from and the format the block matrices were stored in are printed below (a GGUF file is
# dequantized by the loader). The edits here touch the transformer blocks only; where the output layer
# *is* the token embedding (tied weights, as in SmolLM2) `edit_weights` refuses to edit that shared
# tensor unless asked to explicitly.
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
calib_tokens: int = 8192  # calibration tokens (other articles) for Wanda's input norms (paper: 128 x 2048)
calib_context: int = 512  # tokens per calibration row
calib_sizes: list = [512, 2048, 8192]  # Wanda calibration budgets compared (multiples of calib_context, at most calib_tokens)
calib_sparsity: float = 0.5  # sparsity at which the calibration budgets are compared
sparsities: list = [0.1, 0.3, 0.5, 0.7]  # pruning levels (share of weights / of heads removed)
magnitude_groups: list = ["row", "matrix", "global"]  # comparison groups of magnitude pruning ("row" is Wanda's)
wanda_groups: list = ["row"]  # comparison groups of Wanda pruning (add "matrix" for the full score x group table)
head_ranking: str = "results/noise/ranking.parquet"  # the noise chapter's head ranking
head_random_seeds: list = [0, 1]  # random head orders
noise_levels: list = [0.03, 0.1, 0.3]  # weight noise std in units of each matrix's std
noise_seeds: list = [0, 1]  # noise draws per level
bit_formats: list = ["float32", "bfloat16"]  # formats a weight is flipped in ("float16" too; float32 needs float32 weights)
bits: list = ["sign", "exponent_msb", "exponent_lsb", "mantissa_msb", "mantissa_lsb"]  # bit positions
bit_trials: int = 30  # random weights flipped per (format, bit); the same weights for every bit
bit_tokens: int = 256  # tokens scored per bit-flip trial
break_factor: float = 2.0  # a flip "breaks" the model: perplexity > break_factor x dense, or not finite
super_tokens: int = 1024  # calibration tokens the super-weight search runs on (the paper: one prompt)
early_fraction: float = 0.25  # the first ceil(early_fraction x n_layers) blocks are "early" (super weights)
spike_factor: float = 5.0  # a spike: largest down-projection output > spike_factor x that of the median layer
max_super_weights: int = 4  # most weights the iterative search takes, in early and in later layers each
super_column: str = "input"  # column of a super weight: "input" (paper: the input spike) or "contribution"
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
import torch
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
bad_sizes = [n for n in calib_sizes if n % calib_context or not calib_context <= n <= calib_tokens]
if bad_sizes or calib_tokens % calib_context:
    raise ValueError(f"calib_sizes={calib_sizes} and calib_tokens={calib_tokens} must be multiples of "
                     f"calib_context={calib_context}, each size <= calib_tokens; bad: {bad_sizes or [calib_tokens]}")
wiki = data.load_wikipedia()
half = len(wiki) // 2
stream = tasks.text_stream(lm, wiki["text"].iloc[:half], ppl_tokens)
calib = tasks.text_stream(lm, wiki["text"].iloc[half:], calib_tokens)
calib_rows = calib.reshape(-1, calib_context)  # (rows, calib_context)
probe_rows = calib_rows[:max(1, super_tokens // calib_context)]  # super-weight search, fallback head ranking
stored = weights.block_matrix_formats(lm)
t0 = time.time()
windows = perplexity.text_windows(lm, stream, context=ppl_context, stride=ppl_context, batch_size=batch_size)
dense_nll = perplexity.windows_nll(lm, windows)[0].numpy()
timings["dense"] = time.time() - t0
dense_ppl = metrics.bootstrap_ci(lambda x: float(np.exp(np.mean(x))), dense_nll, n_boot=n_boot,
                                 groups=np.arange(len(dense_nll)) // block_tokens)
names = weight_names(lm)
display(Markdown(f"Dense perplexity **{dense_ppl}** over {len(dense_nll):,} scored tokens "
                 f"({len(windows.ids)} windows of {ppl_context}); {len(names)} weight matrices in "
                 f"{lm.n_layers} blocks, stored at the source as "
                 + ", ".join(f"{fmt} ({n})" for fmt, n in stored.items())
                 + f" and edited as loaded, in {str(lm.dtype).removeprefix('torch.')}; calibration text: "
                 f"{calib_rows.shape[0]} rows of {calib_context} tokens."))

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
# ## 2. Pruning: magnitude vs Wanda on the same comparison group, and heads by rank vs at random
#
# Every weight-pruning row removes the same share of the block weights; the rows differ in the
# **score** (magnitude $|W_{ij}|$ or Wanda's $|W_{ij}|\,\lVert x_j\rVert_2$) and in the **comparison
# group**, the weights among which the smallest scores are removed: each output row (`row`, Wanda's
# choice: every row loses the same number of weights), each matrix (`matrix`), or all block matrices
# at once (`global`: one threshold for the whole model, so matrices lose different shares). Comparing magnitude per
# matrix with Wanda per row would mix the two, so the main comparison is magnitude (row) against
# Wanda (row); the other groups show what the group alone does. Wanda's input norms come from the
# dense model on the calibration text, in one shot for all layers (the paper computes them layer by
# layer, each layer's inputs passing through the layers already pruned).
#
# Head pruning removes a fraction of all heads by zeroing their columns of $W_O$, the least important
# first. The ranking is the noise chapter's (effect of noise on one head on the sentiment task) when
# its table exists.

# %%
path = Path(head_ranking)
if path.exists():
    ranking = pd.read_parquet(path).sort_values("rank")[["layer", "head"]]
    ranking_name, ranking_source = "noise-chapter ranking", f"the noise chapter's ranking ({path})"
else:
    norms = attention.head_write_norms(lm, probe_rows)  # (L, H)
    ranking = pd.DataFrame([(layer, h, float(norms[layer, h])) for layer in range(lm.n_layers)
                            for h in range(lm.n_heads)], columns=["layer", "head", "write_norm"])
    ranking = ranking.sort_values("write_norm", ascending=False)
    ranking_name = "fallback ranking by write norm"
    ranking_source = (f"**fallback**: `{path}` not found (run the noise chapter first), so heads are ranked "
                      "here by the mean norm of what they write into the residual stream on the calibration text")
display(Markdown(f"Head ranking: {ranking_source}."))

# %% [markdown]
# **Wanda's calibration budget.** The paper computes the input norms on 128 sequences of 2048 tokens.
# One forward pass per calibration token is the whole cost, so the budget here is
# `calib_tokens`; the cell below times it, extrapolates to the paper's budget, and the calibration
# comparison further down shows whether a larger budget would still move the result.

# %%
t0 = time.time()
norms_by_rows = weights.wanda_input_norms_by_rows(lm, calib_rows, sorted({n // calib_context for n in calib_sizes}
                                                                         | {len(calib_rows)}), names)
timings["wanda_norms"] = time.time() - t0
wanda_norms = norms_by_rows[len(calib_rows)]
paper_tokens = 128 * 2048
display(Markdown(f"Wanda's input norms: {calib_rows.numel():,} calibration tokens ({calib_rows.shape[0]} rows of "
                 f"{calib_context}) in {timings['wanda_norms']:.0f} s on this machine; the paper's "
                 f"{paper_tokens:,} tokens would take about "
                 f"{timings['wanda_norms'] * paper_tokens / calib_rows.numel() / 60:.0f} min here."))

# %%
def method_label(kind: str, group: str) -> str:
    return f"{'magnitude' if kind == 'magnitude' else 'Wanda'} ({group})"


points = [{"kind": k, "group": g, "sparsity": float(s), "method": method_label(k, g), "level": float(s)}
          for k, groups in (("magnitude", magnitude_groups), ("wanda", wanda_groups)) for g in groups
          for s in sparsities]
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
pruning.pivot_table(index="level", columns="method", values="perplexity", sort=False).round(2)

# %% [markdown]
# **Score and group, one at a time.** Each row below compares two pruning rows that differ in one
# thing only, on the same scored tokens: the score (Wanda vs magnitude, both per row) or the group
# (magnitude per matrix or global vs per row). `nll_difference` is the mean NLL of the first minus
# that of the second, in nats per token, with a paired block-bootstrap interval.

# %%
def paired(first: str, second: str) -> pd.DataFrame:
    """NLL of pruning row ``first`` minus that of ``second`` at every sparsity both have."""
    rows = []
    for level in sparsities:
        a = prune_tokens[(prune_tokens["method"] == first) & np.isclose(prune_tokens["level"], level)]
        b = prune_tokens[(prune_tokens["method"] == second) & np.isclose(prune_tokens["level"], level)]
        if len(a) and len(b):
            ref = np.full(len(dense_nll), np.nan)
            ref[b["position"].to_numpy()] = b["nll"].to_numpy()
            d = weight_sweep.nll_summary(a, ["method", "level"], ref, block_tokens, n_boot)
            rows.append({"comparison": f"{first} - {second}", "level": level,
                         "perplexity_first": d["perplexity"].iloc[0], "perplexity_second": float(np.exp(np.mean(b["nll"]))),
                         "nll_difference": d["nll_change"].iloc[0], "low": d["change_low"].iloc[0],
                         "high": d["change_high"].iloc[0]})
    return pd.DataFrame(rows)


contrasts = [("Wanda (row)", "magnitude (row)")]
contrasts += [(method_label("magnitude", g), "magnitude (row)") for g in magnitude_groups if g != "row"]
contrasts += [(method_label("wanda", g), "Wanda (row)") for g in wanda_groups if g != "row"]
score_vs_group = pd.concat([paired(a, b) for a, b in contrasts], ignore_index=True) if len(contrasts) else pd.DataFrame()
score_vs_group.round(3)

# %% [markdown]
# ### Wanda's calibration budget
#
# Wanda (row) at one sparsity, `calib_sparsity`, with input norms from the first $n$ calibration
# tokens, for each $n$ in `calib_sizes` (the pruning rows above use all `calib_tokens`).

# %%
calib_frames = []
t0 = time.time()
for n in calib_sizes:
    point = {"kind": "wanda", "group": "row", "sparsity": float(calib_sparsity), "calib_tokens": int(n)}
    tok, _ = weight_sweep.weight_sweep(lm, windows, [point], shard_dir / "calibration",
                                       {"calib": shards.config_hash({"c": calib[:n].tolist()})},
                                       wanda_norms=norms_by_rows[n // calib_context], progress=False)
    calib_frames.append(tok)
timings["calibration"] = time.time() - t0
calibration = weight_sweep.nll_summary(pd.concat(calib_frames, ignore_index=True), ["calib_tokens"], dense_nll,
                                       block_tokens, n_boot)
calibration["method"] = f"Wanda (row), sparsity {calib_sparsity:g}"
fig = plots.ablation_curves(calibration.rename(columns={"perplexity": "value", "ppl_low": "low", "ppl_high": "high"}),
                            x="calib_tokens", ylabel="perplexity", hue="method", col=None, row=None,
                            title="Wanda (row): perplexity against calibration tokens")
fig.axes[0].set_xscale("log")
calibration[["calib_tokens", "perplexity", "ppl_low", "ppl_high", "nll_change"]].round(3)

# %% [markdown]
# ### Does pruning keep the sentiment judgement?
#
# Few-shot sentiment (the baseline chapter's prompt and threshold) for the dense model, magnitude
# and Wanda per row, and magnitude per matrix, at 50% sparsity, on a few test prompts to stay cheap;
# ROC-AUC does not depend on the threshold.

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
sentiment_points = [("dense", {"kind": "dense"})]
sentiment_points += [(f"{method_label(k, g)} 50%", {"kind": k, "group": g, "sparsity": 0.5})
                     for k, g in (("magnitude", "row"), ("wanda", "row"), ("magnitude", "matrix"))
                     if g in (magnitude_groups if k == "magnitude" else wanda_groups)]
sentiment = pd.concat([sentiment_under(label, point) for label, point in sentiment_points], ignore_index=True)
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
# A trial picks one weight uniformly among all weights of the blocks (a matrix with probability
# proportional to its size, then a uniform entry) and flips one bit of it, in one of the formats of
# `bit_formats`:
#
# - `float32`: the weight's own bits as the model holds them (sign, 8 exponent bits, 23 mantissa
#   bits); nothing else about the weight changes.
# - `bfloat16`: the weight is converted to bfloat16 (sign, 8 exponent bits, 7 mantissa bits), the
#   bit is flipped there (XOR on the `int16` view) and the value converted back. A weight that is not
#   a bfloat16 value is thus first **rounded** to one, then flipped; the other weights stay exact.
#
# The names `exponent_msb`, `mantissa_lsb`, ... are the same positions in each format's own layout.
# <!-- prose-ok: 8 23 7 (the bit layouts of float32 and bfloat16) -->
#
# Trial $t$ uses the same weight for every bit and format, so bit positions and formats are compared
# on the same weights. A trial **breaks** the model when the perplexity on the first `bit_tokens`
# tokens exceeds `break_factor` x the dense perplexity on the same tokens, or is not finite.
# Intervals are Wilson score intervals.

# %%
bit_windows = windows.head(max(1, bit_tokens // ppl_context))
points = [{"kind": "bitflip", "fmt": f, "bit": b, "trial": t, "seed": seed}
          for f in bit_formats for b in bits for t in range(bit_trials)]
t0 = time.time()
flip_tokens, flip_info = weight_sweep.weight_sweep(lm, bit_windows, points, shard_dir / "bitflips", progress=False)
timings["bitflips"] = time.time() - t0
trials = weight_sweep.nll_summary(flip_tokens, ["fmt", "bit", "trial"], dense_nll, block_tokens, n_boot=0)
trials = trials.merge(flip_info[["fmt", "bit", "trial", "weight", "row", "col", "value", "rounded", "flipped"]])
bit_dense = float(np.exp(dense_nll[:bit_windows.n_scored].mean()))
breaks = weight_sweep.break_probability(trials, ["fmt", "bit"], bit_dense, break_factor)
fig = plots.probability_bars(breaks, x="bit", hue="fmt",
                             title=f"one flipped bit: P(perplexity > {break_factor:g} x dense or not finite), "
                                   f"{bit_trials} weights each")
breaks.round(3)

# %% [markdown]
# **Where the weights come from, and what a 16-bit flip does to them first.** Read from the model's
# source, and measured on the weights the trials drew:

# %%
GGUF_TYPES = {"Q4_0": "4-bit codes with a float16 scale per block of 32 weights",
              "Q4_1": "4-bit codes with a float16 scale and a float16 minimum per block of 32 weights",
              "Q8_0": "8-bit codes with a float16 scale per block of 32 weights",
              "F16": "float16", "BF16": "bfloat16", "F32": "float32"}
drawn = flip_info.drop_duplicates("trial")
loaded = str(lm.dtype).removeprefix("torch.")
storage = "; ".join(f"{n} matrices as {fmt}" + (f" ({GGUF_TYPES[fmt]})" if fmt in GGUF_TYPES else "")
                    for fmt, n in stored.items())
rounding_lines = []
for fmt in [f for f in bit_formats if f != loaded]:
    with torch.no_grad():  # share of all block weights that are not values of ``fmt``
        changed = sum(int((weights.round_to_format(weights.out_in(lm, n), fmt) != weights.out_in(lm, n)).sum())
                      for n in names)
    total = sum(weights.out_in(lm, n).numel() for n in names)
    r = drawn["value"].map(lambda v, f=fmt: float(weights.round_to_format(torch.tensor([v]), f)))
    moved = (r != drawn["value"]).to_numpy()
    rel = (np.abs(r - drawn["value"]) / np.abs(drawn["value"]).where(drawn["value"] != 0)).to_numpy()
    rounding_lines.append(
        f"- Rounding to {fmt} alone changes {changed / total:.1%} of all {total:,} block weights, and "
        f"{int(moved.sum())} of the {len(drawn)} weights the trials drew (median relative change "
        f"{np.nanmedian(rel[moved]) if moved.any() else 0:.2g}); a {fmt} flip of such a weight is that rounding "
        "plus the flip.")
display(Markdown("\n".join([
    f"- Source: `{lm.source}`; block matrices stored as: {storage}.",
    f"- Loaded and edited in {loaded}"
    + (" (the loader dequantized the GGUF blocks)." if any(f in GGUF_TYPES and f not in ("F32",) for f in stored)
       else "."),
    *rounding_lines])))
breaks.pivot_table(index="bit", columns="fmt", values=["p_break", "median_ratio"], sort=False).round(3)

# %%
trials.sort_values("perplexity", ascending=False).head(8)[
    ["fmt", "bit", "weight", "row", "col", "value", "rounded", "flipped", "perplexity"]]

# %% [markdown]
# ## 5. Super weights
#
# Yu et al. find a super weight through the *super activation* it creates: at some token, one input
# channel $c$ of an early MLP down projection is huge, and its product with $W_\text{down}[r, c]$
# makes output dimension $r$ huge. Their procedure: one forward pass, the largest input and output of
# every layer's down projection, the early layer whose output spikes; $r$ is the output channel of
# the spike, $c$ the input channel; zero that weight and look again, until no spike is left.
#
# Here, over the first `super_tokens` calibration tokens: the largest $|$output$|$ of each down
# projection (row $r$, at one token) and, at that token, the input channel $c$ of the largest
# $|$input$|$ (the paper's reading, `super_column = "input"`); `share` is the part of the output spike
# that the one product $x_c W_\text{down}[r, c]$ makes, and `top_col` / `top_share` name the input
# channel whose product makes most of it (the same channel when the input spike drives the output
# spike; `super_column = "contribution"` takes that one instead). A layer **spikes** when its
# largest output exceeds `spike_factor` x that of the median layer. **Early**
# means the first `early_fraction` of the blocks, read from the model's depth: in the list of the
# paper's code, most super weights lie in layers 1 to 4 of models with 16 to 60 layers, a few
# deeper (layer 10 of 60 in Llama-30B, layers 7 and 24 of 32 in OLMo-7B).
# <!-- prose-ok: 1 4 16 60 10 7 24 32 "most super weights" "lie in" (where the super weights listed
# by Yu et al.'s code sit: the paper's finding, not this run's) -->
# The iterative search runs in the early layers (the main result) and, with the same threshold,
# separately in the later layers.

# %%
SW_COLUMNS = ["where", "step", "layer", "row", "col", "weight", "contribution", "share", "top_col", "top_share",
              "out_value", "in_max", "position", "token_text"]
t0 = time.time()
spikes = pd.DataFrame(weights.down_proj_spikes(lm, probe_rows))
spikes["token_text"] = lm.tokenizer.convert_ids_to_tokens(spikes["token"].tolist())
threshold = weights.spike_threshold(spikes.to_dict("records"), spike_factor)
early = weights.early_layers(lm, early_fraction)
later = [layer for layer in range(lm.n_layers) if layer not in early]
found = [{**f, "where": "early"}
         for f in weights.find_super_weights(lm, probe_rows, early, threshold, max_super_weights, super_column)]
if later:
    found += [{**f, "where": "later"}
              for f in weights.find_super_weights(lm, probe_rows, later, threshold, max_super_weights, super_column)]
found = pd.DataFrame(found) if found else pd.DataFrame(columns=[c for c in SW_COLUMNS if c != "token_text"] + ["token"])
found["token_text"] = lm.tokenizer.convert_ids_to_tokens([int(t) for t in found["token"]])
timings["super_search"] = time.time() - t0
fig = plots.layer_spikes(spikes, threshold=threshold, shade=early,
                         title=f"MLP down projection: largest |input| and |output| per layer ({probe_rows.numel()} tokens)")
display(Markdown(f"Early layers: {early[0]}-{early[-1]} of {lm.n_layers} (`early_fraction` {early_fraction:g}); "
                 f"spike threshold {threshold:.3g} = {spike_factor:g} x the median layer's largest output "
                 f"({np.median(spikes['out_max']):.3g}). Found: {int((found['where'] == 'early').sum())} in early "
                 f"layers, {int((found['where'] == 'later').sum())} in later layers (at most {max_super_weights} each)."))
found[SW_COLUMNS].round(3)

# %% [markdown]
# Each weight found is zeroed on its own, beside a control, the largest-magnitude other weight of the
# same matrix (the next largest when two weights found share a matrix); then all weights found in a
# group of layers together, beside as many of the largest-magnitude weights of all blocks.

# %%
entries = {where: [(f"L{int(r.layer)}.mlp.down", int(r.row), int(r.col)) for r in g.itertuples()]
           for where, g in found.groupby("where", sort=False)}
every = [e for es in entries.values() for e in es]
zero, used = [], list(every)
for where, es in entries.items():
    for e in es:  # control: the largest |w| of the same matrix not found and not yet a control
        ctrl = weights.largest_weight_entries(lm, 1, [e[0]], exclude=used)
        used += ctrl
        zero += [(where, "super weight", f"{e[0]}[{e[1]}, {e[2]}]", [e]),
                 (where, "control", f"large |w| of {e[0]}: [{ctrl[0][1]}, {ctrl[0][2]}]", ctrl)]
    top = weights.largest_weight_entries(lm, len(es), names, exclude=every)
    zero += [(where, "all found", f"all {len(es)} found in {where} layers", es),
             (where, "all control", f"{len(top)} largest |w| of all blocks", top)]
points = [{"kind": "zero_entries", "where": where, "role": role, "setting": label,
           "entries": weight_sweep.entries_text(es)} for where, role, label, es in zero]
t0 = time.time()
if points:
    sw_tokens, _ = weight_sweep.weight_sweep(lm, windows, points, shard_dir / "super", progress=False)
    superw = weight_sweep.nll_summary(sw_tokens, ["where", "role", "setting", "entries"], dense_nll, block_tokens, n_boot)
else:
    superw = pd.DataFrame(columns=["where", "role", "setting", "entries", "perplexity", "ppl_low", "ppl_high", "ppl_ratio"])
timings["super"] = time.time() - t0
superw[["where", "role", "setting", "perplexity", "ppl_low", "ppl_high", "ppl_ratio"]].round(3)

# %% [markdown]
# Does removing the early-layer weights remove the activation spikes, also those of later layers,
# and what does it do to the sentiment task?

# %%
spike_drop = spikes[["layer", "out_max"]]
for where, es in entries.items():
    with weight_sweep.weight_setting(lm, {"kind": "zero_entries", "entries": weight_sweep.entries_text(es)})[0]:
        without = pd.DataFrame(weights.down_proj_spikes(lm, probe_rows))
    spike_drop = spike_drop.merge(without[["layer", "out_max"]].rename(columns={"out_max": f"out_max, {where} zeroed"}),
                                  on="layer")
    sentiment = pd.concat([sentiment, sentiment_under(f"{where} super weights zeroed",
                                                      {"kind": "zero_entries", "entries": weight_sweep.entries_text(es)})],
                          ignore_index=True)
display(spike_drop[spike_drop["layer"].isin(found["layer"]) | (spike_drop["out_max"] >= threshold)]
        .set_index("layer").round(1))
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
                     for s in dict.fromkeys(sentiment["setting"]))
bits_txt = "; ".join(f"{r.fmt} {r.bit}: {r.broken}/{r.trials} = {chapter.fmt_ci(r.p_break, r.low, r.high, '.2f')}"
                     for r in breaks.itertuples())
prune_methods = [m for m in dict.fromkeys(pruning["method"]) if not m.startswith("heads")]
prune_txt = "; ".join(f"{lv:.0%}: " + ", ".join(f"{m} {pr[(m, lv)]:.4g}" for m in prune_methods) for lv in sparsities)
contrast_txt = "; ".join(f"{r.comparison} at {r.level:.0%}: {r.nll_difference:+.3f} [{r.low:+.3f}, {r.high:+.3f}]"
                         for r in score_vs_group.itertuples())
calib_txt = ", ".join(f"{int(r.calib_tokens):,} tokens {r.perplexity:.2f} [{r.ppl_low:.2f}, {r.ppl_high:.2f}]"
                      for r in calibration.itertuples())
sw = superw.set_index("setting")
zero_abl = ablation[ablation["mode"] == "zero"].set_index(["layer", "matrix"])["ppl_ratio"]
drop = spike_drop.set_index("layer")


def fmt_ratio(ratio: float) -> str:
    """A perplexity ratio as text: two decimals, or none above 100."""
    return f"x{ratio:.2f}" if ratio < 100 else f"x{ratio:,.0f}"


def found_text(where: str) -> str:
    """One sentence per weight found in ``where`` layers, and one for all of them together."""
    g = found[found["where"] == where]
    if not len(g):
        return (f"Super-weight search in the {where} layers: no down-projection output above the threshold "
                f"{threshold:.3g}.")
    parts = []
    controls = superw[(superw["where"] == where) & (superw["role"] == "control")]
    for i, r in enumerate(g.itertuples()):
        name = f"L{int(r.layer)}.mlp.down[{int(r.row)}, {int(r.col)}]"
        z, ctrl = sw.loc[name], controls.iloc[i]
        top = ("the largest share of any input channel" if int(r.top_col) == int(r.col) else
               f"input channel {int(r.top_col)} makes the largest share, {r.top_share:.0%}")
        parts.append(f"{name} = {r.weight:.3f} (output {r.out_value:.1f} at token {r.token_text!r}, position "
                     f"{int(r.position)}; this weight's product makes {r.share:.0%} of it, {top}): zeroing it gives perplexity "
                     f"{z.perplexity:.4g} [{z.ppl_low:.4g}, {z.ppl_high:.4g}] ({fmt_ratio(z.ppl_ratio)}); a large "
                     f"ordinary weight of the same matrix ({ctrl.setting.split(': ')[1]}) {fmt_ratio(ctrl.ppl_ratio)}")
    both = superw[(superw["where"] == where) & superw["role"].isin(["all found", "all control"])].set_index("role")
    layer = int(g["layer"].iloc[0])
    whole = zero_abl.get((layer, "mlp.down"))
    whole_txt = (f"; the whole down projection of layer {layer} zeroed ({heat_windows.n_scored} tokens): {fmt_ratio(whole)}"
                 if whole is not None else "")
    return (f"Super-weight search in the {where} layers ({len(g)} found): " + "; ".join(parts)
            + f". All {len(g)} together: {fmt_ratio(both.loc['all found', 'ppl_ratio'])}; as many largest-magnitude "
            f"weights of all blocks: {fmt_ratio(both.loc['all control', 'ppl_ratio'])}{whole_txt}.")


spike_txt = "; ".join(
    f"layer {layer}: {drop.loc[layer, 'out_max']:.1f} -> " + ", ".join(
        f"{drop.loc[layer, c]:.1f} ({c.split(', ')[1]})" for c in drop.columns if c != "out_max")
    for layer in drop.index if layer in set(found["layer"]) or drop.loc[layer, "out_max"] >= threshold)
lines = [
    f"Dense perplexity {dense_ppl} on {len(dense_nll):,} Wikipedia tokens (windows of {ppl_context}).",
    f"Most sensitive single matrices ({ablation_modes[0]} ablation, {heat_windows.n_scored} tokens): {mod_txt}; "
    f"the median matrix multiplies perplexity by {med:.3f}.",
    "Zero ablation, matrices that are the same edit in a bias-free block (largest difference of the NLL "
    "change over layers): " + ("; ".join(f"{r.matrices}: {r.max_abs_difference_nats:.2g} nats"
                                         for r in spread[spread["mode"] == "zero"].itertuples())
                               or f"no such group among this model's matrices ({', '.join(canon)})") + ".",
    f"Pruning, perplexity by sparsity: {prune_txt}.",
    f"One change at a time (NLL difference, nats per token, 95% paired block bootstrap): {contrast_txt}."
    if len(score_vs_group) else "No two pruning rows share a sparsity.",
    (f"Wanda's input norms from {calib_rows.numel():,} calibration tokens took {timings['wanda_norms']:.0f} s. "
     f"Wanda (row) at {calib_sparsity:.0%} against calibration tokens: {calib_txt}."),
    f"Heads ({ranking_name}, least important first): " + "; ".join(
        f"{lv:.0%} removed: ranked {pr[('heads: ranked', lv)]:.1f} vs random "
        f"{np.mean([pr[(f'heads: random {r}', lv)] for r in head_random_seeds]):.1f}" for lv in sparsities) + ".",
    f"Sentiment on {n_prompts} prompts: {sent_txt}.",
    "Weight noise: " + "; ".join(f"level {lv:g}: perplexity {g['perplexity'].mean():.2f}"
                                  for lv, g in noise.groupby("level")) + ".",
    f"Block matrices: {storage}; edited in {loaded}.",
    *[line.removeprefix("- ") for line in rounding_lines],
    f"One bit flipped (P(break), {bit_trials} weights, 95% Wilson): {bits_txt}.",
    found_text("early"),
    found_text("later") if later else "No later layers (early_fraction covers every block).",
    f"Largest down-projection output per layer, dense -> with the weights found zeroed: {spike_txt}."
    if spike_txt else "No layer above the spike threshold.",
    "Weights restored bit-exactly after every edit (state-dict SHA-256 unchanged).",
]
chapter.bullets(lines)

# %% tags=["hide-input"]
timings["total"] = time.time() - t_start
records.write_config(results_dir, params, lm, elapsed_seconds=timings["total"], timings=timings,
                     dense_perplexity=dense_ppl.__dict__, head_ranking_source=ranking_source,
                     prompt=config.__dict__, prompt_validated=validated, block_matrix_formats=stored,
                     spike_threshold=threshold, early_layers=early)
records.save_frames(results_dir, ablation=ablation, pruning=pruning, pruning_contrasts=score_vs_group,
                    calibration=calibration, sentiment=sentiment, noise=noise, bitflip_trials=trials,
                    bitflip_breaks=breaks, spikes=spikes, super_weight_search=found, super_weights=superw)
print(f"results in {results_dir}/ ; timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))

# %% tags=["remove-cell"]
# The chapter's answer for the book's front page.
half = [lv for lv in sparsities if np.isclose(lv, 0.5)] or sparsities[-1:]
same_group = (f"at {half[0]:.0%} sparsity, per output row, Wanda {pr[('Wanda (row)', half[0])]:.1f} vs magnitude "
              f"{pr[('magnitude (row)', half[0])]:.1f} perplexity (dense {dense_ppl.value:.1f})"
              if ("Wanda (row)", half[0]) in pr.index and ("magnitude (row)", half[0]) in pr.index else "")
early_found = found[found["where"] == "early"]
if len(early_found):
    f0 = early_found.iloc[0]
    z0 = sw.loc[f"L{int(f0.layer)}.mlp.down[{int(f0.row)}, {int(f0.col)}]"]
    sw_txt = (f"the super-weight search in the early layers finds W_down[{int(f0.row)}, {int(f0.col)}] of layer "
              f"{int(f0.layer)}: zeroing it multiplies perplexity by **{z0.ppl_ratio:.2f}**")
else:
    sw_txt = "the super-weight search finds no spike in the early layers"
headline = "; ".join(t for t in (same_group, sw_txt) if t)
records.update_summary(
    results_dir, early_super_weights=len(early_found), later_super_weights=int((found["where"] == "later").sum()),
    headline=headline[:1].upper() + headline[1:] + ".")
