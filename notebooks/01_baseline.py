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
# # Baseline: how well does the model do the task we will perturb?
#
# Every later chapter asks how much a head, a neuron or a weight *contributes* to a task. That only
# means something if the clean model does the task well above chance. This chapter measures the
# default model on few-shot movie-review sentiment (Pang & Lee's Rotten Tomatoes snippets) and on
# language modelling of English Wikipedia, and chooses the prompt that later chapters use.
#
# **How the answer is read.** A prompt is a shared prefix of $k$ labelled reviews followed by the
# query review and the cue `Sentiment:`. We read the model's log-probabilities of the two label
# tokens `" negative"` and `" positive"` at the last position (one forward pass, no generation).
# The *logit difference* $\Delta = \log p(\text{positive}) - \log p(\text{negative})$ is a
# continuous score: accuracy and macro-F1 threshold it, ROC-AUC measures how well it separates the
# classes regardless of threshold.
#
# **How the prompt is chosen.** Formats, shot counts and shot draws are compared on a *dev* split;
# the cheapest configuration (shortest shared prefix) whose dev ROC-AUC is within the best one's
# interval, and its decision threshold (calibrated on dev), are then scored once on a disjoint *test*
# split.

# %% tags=["parameters"]
model: str = "smollm2-135m"  # embedded name, .gguf path, local directory or hub id
device: str = "auto"  # "auto", "cpu" or "cuda"
dtype: str = "auto"  # "auto" (fp32 on CPU, bf16 on CUDA), "float32", "bfloat16", "float16"
data_source: str = "rotten_tomatoes"  # or a CSV with text,label columns, or "hf:NAME[:SPLIT]"
split_seed: int = 0  # seed of the shots-pool / dev / test split
n_dev: int = 128  # dev prompts used to choose the prompt configuration
n_test: int = 400  # test prompts for the reported numbers
formats: list = ["plain", "quoted"]  # prompt formats compared on dev (see headlab.tasks.FORMATS)
shot_counts: list = [4, 8, 16]  # numbers of shots compared on dev
shot_seeds: list = [0, 1]  # shot draws compared on dev
n_generate: int = 100  # test prompts also answered by 3-token greedy generation (the seeds' method)
ppl_tokens: int = 12288  # Wikipedia tokens scored for perplexity
ppl_context: int = 512  # sliding-window length
ppl_stride: int = 384  # sliding-window step
n_boot: int = 1000  # bootstrap resamples for confidence intervals
batch_size: int = 16  # prompts per forward pass
torch_threads: int = 0  # CPU threads for torch (0: torch's default; 1 is faster on a busy machine)
results_dir: str = "results/baseline"  # where tables and the chosen prompt config are written

# %% tags=["hide-input"]
import time

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from headlab import chapter, data, metrics, perplexity, plots, records, tasks

t_start = time.time()
params = chapter.parameters(globals())
lm = chapter.load(params)
pd.Series(lm.describe()).to_frame("model")

# %% [markdown]
# ## The data
#
# The fresh/rotten snippets are split once into a pool the shots are drawn from, a dev split and a
# test split (counted below); the three never share a review. Each split is balanced between the two
# labels, so chance accuracy is 50%.
# <!-- prose-ok: 50% (chance accuracy of two balanced labels, a definition) -->

# %%
splits = tasks.sentiment_splits(data_source, n_dev=n_dev, n_test=n_test, seed=split_seed)
pd.DataFrame({name: part["label"].value_counts() for name, part in splits.items()}).T

# %% [markdown]
# ## Choosing the prompt on the dev split
#
# Every later chapter pays for the shared prefix in every forward pass (a head sweep runs it once per
# perturbation), so the prompt is chosen for accuracy *and* cost: of the configurations whose dev
# ROC-AUC reaches the lower end of the best one's 95% interval (bootstrap over dev prompts), the one
# with the fewest prefix tokens (`headlab.tasks.select_config`): the highest of several dev scores is
# favoured by chance, and a difference inside the interval is one the dev split cannot resolve.

# %%
grid = [tasks.PromptConfig(f, k, s) for f in formats for k in shot_counts for s in shot_seeds]
t0 = time.time()
dev_scores = tasks.evaluate_configs(lm, splits, grid, batch_size=batch_size, n_boot=n_boot)
dev_seconds = time.time() - t0
best = tasks.select_config(dev_scores)
chosen = tasks.PromptConfig(best["format"], int(best["k"]), int(best["shot_seed"]), float(best["threshold"]))
dev_scores["within best's interval"] = dev_scores["roc_auc"] >= best["best_roc_auc_low"]
display(Markdown(
    f"Highest dev ROC-AUC: {best['best_format']}, {int(best['best_k'])} shots (draw {int(best['best_shot_seed'])}), "
    f"{best['best_roc_auc']:.3f} (95% interval from {best['best_roc_auc_low']:.3f}), {int(best['best_cost'])} prefix "
    f"tokens; {int(best['n_eligible'])} of {len(dev_scores)} configurations reach that lower end. Chosen: "
    f"**{chosen.format}, {chosen.k} shots** (draw {chosen.shot_seed}), ROC-AUC {best['roc_auc']:.3f}, "
    f"**{int(best['prefix_tokens'])} prefix tokens** ({best['best_cost'] / best['prefix_tokens']:.1f}x fewer than "
    "the highest-scoring prompt; what that saves downstream is reported in the noise chapter)."))
dev_scores.sort_values("roc_auc", ascending=False).round(3)

# %%
fig = plots.config_comparison(dev_scores, chosen={"format": chosen.format, "k": chosen.k, "seed": chosen.shot_seed})

# %% [markdown]
# Argmax accuracy reads whichever label is more probable. A model that ranks the reviews well (high
# ROC-AUC) but puts more probability on one label whatever the review is pulled toward chance by that
# constant offset; the calibrated threshold (chosen on dev only) removes it. How the configurations of
# this run compare:

# %% tags=["hide-input"]
lopsided = (dev_scores["pred_positive_share"] - 0.5).abs() > 0.25
gain = dev_scores["accuracy_calibrated"] - dev_scores["accuracy"]
chapter.bullets([
    (f"Dev, {len(dev_scores)} configurations: argmax accuracy {dev_scores['accuracy'].min():.2f} to "
     f"{dev_scores['accuracy'].max():.2f}, ROC-AUC {dev_scores['roc_auc'].min():.2f} to {dev_scores['roc_auc'].max():.2f}, "
     f"calibrated accuracy {dev_scores['accuracy_calibrated'].min():.2f} to {dev_scores['accuracy_calibrated'].max():.2f}."),
    (f"In {int(lopsided.sum())} of them more than 75% of the argmax answers are the same label; the calibrated "
     f"threshold changes accuracy by {gain.min():+.2f} to {gain.max():+.2f} (median {gain.median():+.2f})."),
])

# %% [markdown]
# ## The chosen prompt on the test split

# %%
test = tasks.make_task(splits, "test", chosen)
print(test.prompt(0))

# %%
t0 = time.time()
lp = test.logprobs(lm, batch_size=batch_size)
test_seconds = time.time() - t0
y, diff = test.labels, (lp[:, 1] - lp[:, 0]).numpy()
pred_cal, pred_argmax = test.predictions(lp), test.predictions(lp, threshold=0.0)
report = pd.concat({
    "calibrated": metrics.classification_report(y, lp.numpy(), threshold=chosen.threshold, n_boot=n_boot),
    "argmax": metrics.classification_report(y, lp.numpy(), threshold=0.0, n_boot=n_boot),
}, names=["decision", None]).reset_index(level=0)
report.round(3)

# %%
warnings_cal = metrics.chance_warnings(y, pred_cal, diff, n_boot=n_boot)
warnings_argmax = metrics.chance_warnings(y, pred_argmax, diff, n_boot=n_boot)
for name, w in [("calibrated threshold", warnings_cal), ("argmax", warnings_argmax)]:
    status = "**NEAR CHANCE**: " + "; ".join(w) if w else "clear of chance"
    display(Markdown(f"- {name}: {status}"))

# %%
fig = plots.confusion_heatmap(metrics.confusion_matrix(y, pred_cal, 2), test.fmt.labels,
                              title=f"test, calibrated threshold {chosen.threshold:.2f}")

# %%
fig = plots.logit_diff_hist(diff, y, test.fmt.labels, threshold=chosen.threshold)

# %% [markdown]
# ## Label-token logits vs greedy generation
#
# The seed scripts generate three tokens greedily and look for the label word in the text. On the
# same prompts, that reads the argmax of the first token whenever the model starts its answer with a
# label, so it cannot be calibrated and costs several forward passes per prompt. We also score the
# seeds' own format (4 shots, quoted review) both ways.

# %%
sub = list(range(min(n_generate, len(test.queries))))
seeds_task = tasks.make_task(splits, "test", tasks.PromptConfig("quoted", 4, 0))
gen_table = pd.DataFrame([
    {"prompt": "chosen", **tasks.compare_generation(lm, test, sub, batch_size=batch_size)},
    {"prompt": "seeds' format (quoted, 4 shots)", **tasks.compare_generation(lm, seeds_task, sub, batch_size=batch_size)},
])
gen_table.round(3)

# %% [markdown]
# ## Perplexity on Wikipedia
#
# Articles are concatenated into one token stream and scored with a sliding window; each token is
# scored once with at least `ppl_context - ppl_stride` tokens of left context. The interval is a
# block bootstrap over windows (neighbouring tokens are not independent).

# %%
wiki = data.load_wikipedia()
stream = tasks.text_stream(lm, wiki["text"], ppl_tokens)
t0 = time.time()
nll, window = perplexity.token_nll(lm, stream, context=ppl_context, stride=ppl_stride, batch_size=4)
ppl_seconds = time.time() - t0
ppl = metrics.bootstrap_ci(lambda x: float(np.exp(np.mean(x))), nll.numpy(), n_boot=n_boot,
                           groups=window.numpy())
pd.DataFrame([{"tokens_scored": len(nll), "windows": int(window.max()) + 1, "perplexity": ppl.value,
               "ci_low": ppl.low, "ci_high": ppl.high, "nll_nats": float(nll.mean()), "seconds": ppl_seconds}])

# %% [markdown]
# ## What we saw

# %% tags=["hide-input"]
cal = report[report["decision"] == "calibrated"].set_index("metric")
arg = report[report["decision"] == "argmax"].set_index("metric")
gen = gen_table.iloc[0]
chapter.bullets([
    f"Prompt chosen on dev: **{chosen.format}**, **{chosen.k} shots** (draw {chosen.shot_seed}), calibrated "
    f"threshold {chosen.threshold:+.2f} (dev ROC-AUC {best['roc_auc']:.3f}, {int(best['prefix_tokens'])} prefix tokens): "
    f"the shortest prefix of the {int(best['n_eligible'])} of {len(grid)} configurations within the interval of the "
    f"highest dev ROC-AUC ({best['best_roc_auc']:.3f}, {best['best_format']} {int(best['best_k'])} shots, "
    f"{int(best['best_cost'])} prefix tokens).",
    f"Test ({len(y)} prompts): calibrated accuracy **{chapter.fmt_ci(cal.loc['accuracy'])}**, macro-F1 "
    f"{chapter.fmt_ci(cal.loc['macro_f1'])}; argmax accuracy {chapter.fmt_ci(arg.loc['accuracy'])} with "
    f"{pred_argmax.mean():.0%} of prompts predicted positive; ROC-AUC **{chapter.fmt_ci(cal.loc['roc_auc'])}**; "
    f"mean logit difference toward the correct label {chapter.fmt_ci(cal.loc['logit_diff'])}.",
    f"Chance check (calibrated): {'; '.join(warnings_cal) or 'clear of chance'}.",
    f"Greedy 3-token generation on {int(gen['n'])} test prompts: accuracy {gen['generation_accuracy']:.3f} vs "
    f"{gen['logit_argmax_accuracy']:.3f} for the label-token argmax (they agree on "
    f"{gen['agreement_gen_vs_argmax']:.0%} of prompts), at {gen['generation_seconds'] / len(sub):.2f} s per prompt.",
    f"Wikipedia perplexity: **{ppl}** over {len(nll):,} tokens.",
])

# %% tags=["hide-input"]
records.write_config(results_dir, params, lm, elapsed_seconds=time.time() - t_start,
                     timings={"dev_grid": dev_seconds, "test": test_seconds, "perplexity": ppl_seconds})
records.save_frames(results_dir, dev_scores=dev_scores, test_report=report, generation=gen_table)
tasks.save_prompt_config(chosen, f"{results_dir}/prompt_config.json", model=lm.describe(),
                         split={"source": data_source, "seed": split_seed, "n_dev": n_dev, "n_test": n_test},
                         dev_roc_auc=float(best["roc_auc"]), prefix_tokens=int(best["prefix_tokens"]),
                         highest_scoring={"format": best["best_format"], "k": int(best["best_k"]),
                                          "shot_seed": int(best["best_shot_seed"]),
                                          "roc_auc": float(best["best_roc_auc"]),
                                          "prefix_tokens": int(best["best_cost"])},
                         test_accuracy_calibrated=float(cal.loc["accuracy", "value"]))
print(f"results in {results_dir}/ ; total {time.time() - t_start:.0f} s")

# %% tags=["remove-cell"]
# The chapter's answer for the book's front page (and a column of `headlab grid` summaries).
test_cal = report[report["decision"] == "calibrated"].set_index("metric")
ci = lambda m: f"{test_cal.loc[m, 'value']:.3f} [{test_cal.loc[m, 'ci_low']:.3f}, {test_cal.loc[m, 'ci_high']:.3f}]"  # noqa: E731
records.update_summary(
    results_dir, prompt=f"{chosen.format}, {chosen.k} shots", test_accuracy=float(test_cal.loc["accuracy", "value"]),
    test_roc_auc=float(test_cal.loc["roc_auc", "value"]), perplexity=float(ppl.value),
    headline=f"The prompt chosen on the dev split (**{chosen.format}, {chosen.k} shots**) reaches test accuracy "
             f"**{ci('accuracy')}** and ROC-AUC **{ci('roc_auc')}** on {len(y)} prompts (95% CI); Wikipedia "
             f"perplexity {ppl}.")
