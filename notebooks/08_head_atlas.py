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
# # Head atlas: do the per-head measures of the chapters agree?
#
# Chapters 02-05 each score every attention head by one property: how much sentiment accuracy drops
# when noise is added to its output or the output is zeroed (02), how strongly it does induction or
# previous-token copying on repeated random tokens (03), how focused its attention is, how much it
# sits on the first token, whether it tracks sentiment words or instructions (04), and how differently
# it attends to gendered words (05). This chapter joins every such per-head measure that exists under
# `results_root` into **one table for one model** (refusing tables whose `config.json` fingerprints
# name different models), and asks: which measures agree, which heads stand out on several, and what
# does a given head's attention look like?
#
# Measures whose chapter has not been run are listed, not guessed. Correlations are Spearman ρ over the
# heads both measures cover.
#
# When other models' results are given (`compare_roots`, one results folder per model, e.g. the
# chapters run with `-p model gpt2 -p results_dir results-gpt2/...`), the last section puts the models
# side by side: where in depth each measure's high-scoring heads sit, and which relations between
# measures hold in every model.

# %% tags=["parameters"]
model: str = "smollm2-135m"  # must match the model the chapters' results come from (spec or fingerprint)
results_root: str = "results"  # folder holding the chapters' results folders (noise, induction, ...)
text: str = "The cat sat on the mat. The cat sat on the"  # short text for the attention patterns of the atlas
n_top: int = 5  # heads listed per measure in the top-heads table
torch_threads: int = 0  # CPU threads for torch (0: torch's default)
results_dir: str = "results/head_atlas"  # the joined table and its config
compare_roots: list = []  # results folders of other models (one model's chapter results each) to compare with
depth_bins: int = 4  # bins of relative depth (layer / (n_layers - 1)) in the cross-model profiles

# %% tags=["hide-input"]
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from headlab import atlas, attention, chapter, plots, records, widgets

t_start = time.time()
params = chapter.parameters(globals())

# %% [markdown]
# ## The joined table
#
# One row per head, one column per measure. The second table lists the measures not found and the
# chapter that produces each.

# %%
found = atlas.load_atlas(results_root, model=model)
table = found.table
measures = found.measures
atlas.save_atlas(found, results_dir, params)
display(Markdown(f"**{len(measures)} measures** over **{len(table)} heads** of "
                 f"`{(found.model or {}).get('spec', model)}` (fingerprint "
                 f"`{(found.model or {}).get('fingerprint')}`)."))
table.round(4)

# %%
found.missing if len(found.missing) else "All known measures were found."

# %% [markdown]
# ## How the measures agree
#
# Spearman ρ between every pair of measures; each cell also shows how many heads the pair shares.

# %%
rho, n_pairs = atlas.spearman_pairs(table, measures)
if len(measures) >= 2:
    plots.correlation_heatmap(rho, n_pairs, title="Per-head measures: Spearman ρ")
    plt.show()

# %% [markdown]
# Selected pairs as scatter plots (a pair is drawn when both measures were found); the heads with the
# largest joint rank are labelled.

# %%
pairs = [("noise_effect", "zero_ablation"), ("induction_score", "entropy"),
         ("induction_score", "previous_token_score"), ("entropy", "first_token_mass"),
         ("noise_effect", "induction_score"), ("sentiment_r", "noise_effect")]
pairs = [(x, y) for x, y in pairs if x in measures and y in measures]
for x, y in pairs:
    plots.compare_scatter(table.dropna(subset=[x, y]), x, y, title=f"{y} vs {x}")
    plt.show()

# %% [markdown]
# ## Where the heads are: layer x head maps per measure

# %%
cols = 3
rows = max(1, -(-len(measures) // cols))
fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 5.5 * rows), squeeze=False)
for ax, name in zip(axes.flat, measures):
    signed = bool((table[name] < 0).any())
    plots.head_heatmap(table, name, ax=ax, center=0.0 if signed else None, cmap="RdBu_r" if signed else "viridis")
for ax in axes.flat[len(measures):]:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Top heads per measure
#
# The `n_top` heads with the largest value of each measure (for signed measures, largest means most
# positive).

# %%
top = pd.DataFrame({name: [f"{chapter.head_label(r['layer'], r['head'])} ({r[name]:.3g})"
                           for _, r in table.nlargest(n_top, name).iterrows()] for name in measures},
                   index=pd.RangeIndex(1, n_top + 1, name="rank"))
top

# %% [markdown]
# ## The atlas
#
# Pick a head (click it in the map, or use the menus): all its scores with rank (1 = largest) and
# percentile among the heads, and its attention pattern on `text` (computed once, with eager attention,
# for all heads). The map can be coloured by any measure; it opens on the head ranked first by the
# first measure found.

# %%
lm = chapter.load(params, attn_implementation="eager")
ids = lm.tokenizer(text, return_tensors="pt").input_ids
patterns = attention.attention_patterns(lm, ids)[0]  # (layers, heads, s, s)
tokens = lm.tokenizer.convert_ids_to_tokens(ids[0])
start = table.nlargest(1, measures[0]).iloc[0] if measures else pd.Series({"layer": 0, "head": 0})
from headlab import figures  # noqa: E402

figures.show(figures.head_atlas(table, patterns, tokens, layer=int(start["layer"]), head=int(start["head"])),
             widget=lambda: widgets.head_atlas(table, patterns, tokens, layer=int(start["layer"]),
                                               head=int(start["head"])))

# %% [markdown]
# ## Across models
#
# With `compare_roots`, every model's heads are placed at their relative depth (0 = first layer,
# 1 = last) and each measure becomes a within-model percentile (1 = the model's highest head), since
# raw scales differ between models; the figure shows each model's mean percentile per depth bin. The
# table gives, for each pair of measures, every model's Spearman ρ and whether all models agree on its
# sign (pairs where they do come first).

# %%
cross = None
if compare_roots:
    models_found = atlas.load_atlases([results_root, *compare_roots])
    cross = atlas.compare_atlases(models_found, depth_bins=depth_bins)
    records.save_frames(results_dir, cross_model_depth=cross.depth_profile, cross_model_agreement=cross.agreement)
    plots.depth_profiles(cross.depth_profile, title=f"{len(cross.models)} models: where each measure's heads sit")
    plt.show()
    display(cross.agreement.round(3))
else:
    display(Markdown("Only this model's results were given (`compare_roots` is empty): nothing to compare."))

# %% [markdown]
# ## What we saw

# %% tags=["hide-input"]
lines = [f"Joined {len(measures)} per-head measures ({', '.join(measures)}) over {len(table)} heads of "
         f"{lm.spec}; missing: {', '.join(f'{r.measure} (run {r.chapter})' for r in found.missing.itertuples()) or 'none'}."]
if len(measures) >= 2:
    off = rho.where(~np.eye(len(rho), dtype=bool)).stack()
    off = off[[a < b for a, b in off.index]]
    hi, lo = off.idxmax(), off.idxmin()
    lines.append(f"Highest ρ among {len(off)} pairs: {hi[0]} vs {hi[1]}, ρ = {off[hi]:.2f} (n = {int(n_pairs.loc[hi])}); "
                 f"lowest: {lo[0]} vs {lo[1]}, ρ = {off[lo]:.2f} (n = {int(n_pairs.loc[lo])}); "
                 f"{int((off.abs() >= 0.5).sum())} of {len(off)} pairs have |ρ| >= 0.5.")
    lines += [f"{y} vs {x}: ρ = {rho.loc[x, y]:.2f} over {int(n_pairs.loc[x, y])} heads." for x, y in pairs]
tops = {name: {(int(r.layer), int(r["head"])) for _, r in table.nlargest(n_top, name).iterrows()} for name in measures}
counts = pd.Series([h for s in tops.values() for h in s]).value_counts()
multi = counts[counts > 1]
lines.append("Heads in the top " + str(n_top) + " of more than one measure: " + (", ".join(
    f"{chapter.head_label(L, H)} ({', '.join(m for m, s in tops.items() if (L, H) in s)})" for (L, H) in multi.index) or "none") + ".")
if cross is not None:
    ag = cross.agreement[cross.agreement["n_models"] >= 2]
    same = ag[ag["same_sign"]]
    lines.append(f"Across {len(cross.models)} models ({', '.join(cross.models)}): {len(same)} of {len(ag)} measure pairs "
                 "that at least two models share have the same sign of ρ in every model"
                 + (f"; the strongest is {same.iloc[0]['measure_a']} vs {same.iloc[0]['measure_b']} "
                    f"(ρ from {same.iloc[0]['min_rho']:.2f} to {same.iloc[0]['max_rho']:.2f})" if len(same) else "") + ".")
    shared = cross.shared_peaks()
    lines.append("Measures whose highest-ranking depth bin is the same in every model: "
                 + (", ".join(f"{r.measure} (depth ~{r.depth:.2f})" for r in shared.itertuples()) or "none") + ".")
chapter.bullets(lines)

# %% tags=["hide-input"]
records.write_config(results_dir, params, lm, elapsed_seconds=time.time() - t_start, sources=found.sources)
records.write_summary(results_dir, n_measures=len(measures), n_heads=len(table), n_missing=len(found.missing),
                      n_models=1 + len(compare_roots))

# %% tags=["remove-cell"]
# The chapter's answer for the book's front page.
pairs_rho = rho.where(~np.eye(len(rho), dtype=bool)).stack() if len(measures) >= 2 else pd.Series(dtype=float)
pairs_rho = pairs_rho[[a < b for a, b in pairs_rho.index]]
tops_n = pd.Series([(int(r.layer), int(r["head"])) for m in measures for _, r in table.nlargest(n_top, m).iterrows()])
best_head = tops_n.value_counts().index[0] if len(tops_n) else None
records.update_summary(results_dir, headline=(
    f"{len(measures)} per-head measures joined over {len(table)} heads"
    + (f"; the closest pair is {pairs_rho.abs().idxmax()[0]} and {pairs_rho.abs().idxmax()[1]} "
       f"(Spearman ρ = {pairs_rho[pairs_rho.abs().idxmax()]:.2f})" if len(pairs_rho) else "")
    + (f"; **L{best_head[0]}H{best_head[1]}** is in the top {n_top} of {int(tops_n.value_counts().iloc[0])} measures"
       if best_head else "") + "."))
