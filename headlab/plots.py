"""Figures from tidy frames and small arrays (matplotlib + seaborn). Each function returns the Figure."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

__all__ = ["correlation_heatmap", "ablation_curves", "attention_patterns", "compare_scatter", "confusion_heatmap",
           "config_comparison", "effect_vs_level", "head_heatmap", "layer_module_heatmap", "layer_spikes",
           "lens_readout", "logit_diff_hist", "neuron_profile", "neuron_snippets_html", "position_loss",
           "probability_bars", "rank_ranges", "ranked_effects", "token_pattern"]


def confusion_heatmap(cm: np.ndarray, labels: Sequence[str], title: str = "") -> Figure:
    """Heatmap of a confusion matrix from :func:`headlab.metrics.confusion_matrix`.

    Rows are true labels, columns predicted labels; a last "no answer" column is shown only if used.
    """
    cols = list(labels) + ["no answer"]
    if cm.shape[1] == len(labels) + 1 and cm[:, -1].sum() == 0:
        cm, cols = cm[:, :-1], cols[:-1]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(cols), 1.4 + 0.9 * len(labels)))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax,
                xticklabels=cols, yticklabels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def config_comparison(frame: pd.DataFrame, metrics: Sequence[str] = ("roc_auc", "accuracy", "accuracy_calibrated"),
                      chosen: dict | None = None) -> Figure:
    """Dev-split scores of each prompt configuration (from :func:`headlab.tasks.evaluate_configs`).

    One panel per metric; x = number of shots, one colour per format, dots = shot draws, line = mean.
    """
    ks = sorted(frame["k"].unique())
    formats = list(dict.fromkeys(frame["format"]))
    colors = sns.color_palette(n_colors=len(formats))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for j, (fmt, color) in enumerate(zip(formats, colors)):
            sub = frame[frame["format"] == fmt]
            offset = (j - (len(formats) - 1) / 2) * 0.12
            x = sub["k"].map(ks.index) + offset
            ax.scatter(x, sub[m], color=color, alpha=0.5, s=18)
            means = sub.groupby("k")[m].mean()
            ax.plot([ks.index(k) + offset for k in means.index], means.values, "o-", color=color, label=fmt)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("shots")
        ax.set_title(m)
    axes[0][-1].legend(title="format", fontsize=8)
    if chosen:
        fig.suptitle("chosen: " + ", ".join(f"{k}={v}" for k, v in chosen.items()), fontsize=10)
    fig.tight_layout()
    return fig


def logit_diff_hist(diff: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
                    threshold: float = 0.0) -> Figure:
    """Histogram of the logit difference per true label, with the decision threshold."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    frame = pd.DataFrame({"logit difference": diff, "true label": np.asarray(label_names)[labels]})
    sns.histplot(frame, x="logit difference", hue="true label", bins=40, element="step", ax=ax)
    ax.axvline(0, color="grey", lw=0.8, ls=":", label="argmax (0)")
    ax.axvline(threshold, color="black", lw=1.2, label=f"calibrated ({threshold:.2f})")
    ax.set_title("lp(positive) - lp(negative)")
    fig.tight_layout()
    return fig


def head_heatmap(frame: pd.DataFrame, value: str, title: str = "", center: float | None = 0.0,
                 ax: plt.Axes | None = None, cmap: str = "RdBu_r") -> Figure:
    """Layer x head heatmap of one column of a per-head frame (rows with ``layer``, ``head``).

    Duplicate (layer, head) rows (e.g. several seeds) are averaged.
    """
    grid = frame.pivot_table(index="layer", columns="head", values=value, aggfunc="mean")
    if ax is None:
        fig, ax = plt.subplots(figsize=(0.32 * grid.shape[1] + 2.5, 0.22 * grid.shape[0] + 1.6))
    else:
        fig = ax.figure
    sns.heatmap(grid, ax=ax, cmap=cmap, center=center, cbar_kws={"label": value})
    ax.set_title(title or value)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.tight_layout()
    return fig


def ranked_effects(ranking: pd.DataFrame, top: int = 20, value: str = "effect",
                   title: str = "", xlabel: str | None = None) -> Figure:
    """Horizontal bars of the ``top`` heads of a ranking with their ``{value}_low``/``_high`` CIs."""
    r = ranking.head(top).iloc[::-1]
    labels = [f"L{int(a)}H{int(b)}" for a, b in zip(r["layer"], r["head"])]
    err = np.vstack([r[value] - r[f"{value}_low"], r[f"{value}_high"] - r[value]])
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(r) + 1.2))
    ax.barh(labels, r[value], xerr=err, color="#4c72b0", ecolor="#333333", capsize=2)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(xlabel or f"{value} (95% bootstrap CI over prompts)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def rank_ranges(ranking: pd.DataFrame, top: int = 30, k: int | None = None, title: str = "") -> Figure:
    """Where each of the ``top`` heads could rank: a line from ``rank_low`` to ``rank_high`` and a dot at
    its ``rank``; with ``k``, the top-``k`` boundary is drawn and lines are coloured by ``status``."""
    r = ranking.head(top).iloc[::-1]
    labels = [f"L{int(a)}H{int(b)}" for a, b in zip(r["layer"], r["head"])]
    colours = {"in": "#4c72b0", "tied": "#dd8452", "out": "#8c8c8c"}
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(r) + 1.2))
    for y, row in enumerate(r.itertuples()):
        c = colours.get(getattr(row, "status", "in"), "#4c72b0")
        ax.plot([row.rank_low, row.rank_high], [y, y], color=c, lw=3, solid_capstyle="butt")
        ax.plot([row.rank], [y], "o", color="black", ms=3)
    ax.set_yticks(range(len(r)), labels)
    if k is not None:
        ax.axvline(k + 0.5, color="black", lw=0.8, ls="--")
    ax.set_xlabel("rank (95% confidence interval; dot: estimate)" + (f"; dashed: top-{k} boundary" if k else ""))
    ax.set_title(title)
    fig.tight_layout()
    return fig


def compare_scatter(frame: pd.DataFrame, x: str, y: str, hue: str | None = None, title: str = "",
                    annotate: int = 5) -> Figure:
    """Scatter of two per-head measures with the Spearman correlation in the title; the ``annotate``
    heads with the largest ``x + y`` are labelled ``L{layer}H{head}``."""
    from scipy import stats

    fig, ax = plt.subplots(figsize=(5, 4.2))
    sns.scatterplot(data=frame, x=x, y=y, hue=hue, ax=ax, s=18, linewidth=0)
    rho = stats.spearmanr(frame[x], frame[y]).statistic
    ax.set_title(f"{title}  (Spearman ρ = {rho:.2f})".strip())
    for _, r in frame.assign(_s=frame[x].rank() + frame[y].rank()).nlargest(annotate, "_s").iterrows():
        ax.annotate(f"L{int(r['layer'])}H{int(r['head'])}", (r[x], r[y]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    fig.tight_layout()
    return fig


def effect_vs_level(frame: pd.DataFrame, value: str, hue: str = "mode", title: str = "") -> Figure:
    """Mean over heads of a per-head measure against noise level, one line per ``hue`` (95% CI over
    heads and seeds)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sns.lineplot(data=frame, x="level", y=value, hue=hue, marker="o", ax=ax, errorbar=("ci", 95))
    ax.set_xscale("log")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def attention_patterns(patterns: np.ndarray, titles: Sequence[str], marks: Sequence[int] = (),
                       ncols: int = 4) -> Figure:
    """Query x key heatmaps of several attention patterns ``(n, s, s)`` side by side.

    ``marks`` are positions drawn as thin lines on both axes (e.g. where the second copy starts).
    """
    pats = np.asarray(patterns, dtype=float)
    n = len(pats)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 3.0 * nrows), squeeze=False)
    for ax, pat, title in zip(axes.flat, pats, titles):
        ax.imshow(pat, cmap="viridis", vmin=0, vmax=max(float(pat.max()), 1e-9), interpolation="nearest")
        for m in marks:
            ax.axhline(m - 0.5, color="white", lw=0.6)
            ax.axvline(m - 0.5, color="white", lw=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def position_loss(frame: pd.DataFrame, x: str = "position", y: str = "loss", hue: str = "condition",
                  marks: Sequence[int] = (), title: str = "") -> Figure:
    """Mean per-token loss along the sequence, one line per ``hue`` (95% CI over sequences)."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    sns.lineplot(data=frame, x=x, y=y, hue=hue, style=hue, ax=ax, errorbar=("ci", 95), lw=1.2)
    for m in marks:
        ax.axvline(m, color="grey", lw=0.8, ls=":")
    ax.set_ylabel(f"{y} (nats)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def ablation_curves(summary: pd.DataFrame, x: str, ylabel: str, hue: str = "set_type",
                    col: str = "mode", row: str | None = "layer_range", title: str = "",
                    logx: bool = False) -> Figure:
    """Lines of ``value`` against ``x`` with ``low``/``high`` bands (from
    :func:`headlab.ablation.ablation_summary`), one line per ``hue``, one panel per ``row`` x ``col``."""
    cols = list(dict.fromkeys(summary[col])) if col else [None]
    rows = list(dict.fromkeys(summary[row])) if row else [None]
    hues = list(dict.fromkeys(summary[hue]))
    colors = dict(zip(hues, sns.color_palette(n_colors=len(hues))))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.9 * len(cols), 2.9 * len(rows) + 0.4),
                             squeeze=False, sharex=True, sharey=True)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            sel = summary
            sel = sel if r is None else sel[sel[row] == r]
            sel = sel if c is None else sel[sel[col] == c]
            for h in hues:
                s = sel[sel[hue] == h].sort_values(x)
                ax.plot(s[x], s["value"], "o-", ms=3, color=colors[h], label=str(h))
                ax.fill_between(s[x], s["low"], s["high"], color=colors[h], alpha=0.25, lw=0)
            ax.set_title(", ".join(f"{name} {v}" for name, v in ((col, c), (row, r)) if v is not None), fontsize=9)
            if logx:
                ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks(sorted(summary[x].unique()), [f"{v:g}" for v in sorted(summary[x].unique())])
            if i == len(rows) - 1:
                ax.set_xlabel(x)
            if j == 0:
                ax.set_ylabel(ylabel)
    axes[0][-1].legend(title=hue, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def token_pattern(pattern: np.ndarray, tokens: Sequence[str], title: str = "",
                  ax: plt.Axes | None = None) -> Figure:
    """One head's query x key attention pattern ``(s, s)`` with the tokens on both axes."""
    pat = np.asarray(pattern, dtype=float)
    n = len(tokens)
    if pat.shape != (n, n):
        raise ValueError(f"pattern has shape {pat.shape} but there are {n} tokens.")
    if ax is None:
        size = min(9.0, 1.8 + 0.24 * n)
        fig, ax = plt.subplots(figsize=(size + 0.8, size))
    else:
        fig = ax.figure
    im = ax.imshow(pat, cmap="viridis", vmin=0, vmax=max(float(pat.max()), 1e-9), interpolation="nearest")
    labels = [t.replace("\n", "\\n") for t in tokens]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="attention")
    fig.tight_layout()
    return fig


def neuron_profile(frame: pd.DataFrame, title: str = "") -> Figure:
    """Per layer: the largest, 99th-percentile and median neuron by mean |activation| (left) and by
    max activation (right, log scale), from :meth:`headlab.neurons.NeuronStats.frame`."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, col, label in ((axes[0], "mean_abs", "mean |activation|"), (axes[1], "max", "max activation")):
        g = frame.groupby("layer")[col]
        for q, name, style in ((1.0, "largest neuron", "o-"), (0.99, "99th percentile", "s--"),
                               (0.5, "median neuron", "^:")):
            ax.plot(g.quantile(q).index, g.quantile(q).to_numpy(), style, ms=3, lw=1, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def lens_readout(readout: pd.DataFrame, title: str = "") -> Figure:
    """Logit-lens readout of a label by layer (from :func:`headlab.metrics.layer_readout`): probability
    of the correct label token, accuracy and ROC-AUC of the two-label decision, median rank of the
    correct label among all tokens; bands are the bootstrap intervals."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    x = readout["layer"]
    for name, label in (("accuracy", "accuracy (correct > wrong label)"), ("roc_auc", "ROC-AUC")):
        axes[0].plot(x, readout[name], "o-", ms=3, label=label)
        axes[0].fill_between(x, readout[f"{name}_low"], readout[f"{name}_high"], alpha=0.25, lw=0)
    axes[0].axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    axes[0].set_title("two-label decision", fontsize=9)
    axes[1].plot(x, readout["p_correct"], "o-", ms=3)
    axes[1].fill_between(x, readout["p_correct_low"], readout["p_correct_high"], alpha=0.25, lw=0)
    axes[1].set_yscale("log")
    axes[1].set_title("p(correct label token)", fontsize=9)
    axes[2].plot(x, readout["median_rank"] + 1, "o-", ms=3)
    axes[2].fill_between(x, readout["median_rank_low"] + 1, readout["median_rank_high"] + 1, alpha=0.25, lw=0)
    axes[2].set_yscale("log")
    axes[2].invert_yaxis()
    axes[2].set_title("median rank of the correct label (1 = top token)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("layer (residual stream after the block)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def neuron_snippets_html(snippets: pd.DataFrame, examples: pd.DataFrame, title: str = "") -> str:
    """Neuroscope-style HTML: one line per top example, every token shaded by the neuron's activation
    (red positive, blue negative, scaled by the largest |activation| shown); the top token is boxed.

    Args:
        snippets: :func:`headlab.neurons.snippet_activations`.
        examples: :func:`headlab.neurons.top_examples` (gives the order and the top activations).
    """
    import html

    if snippets.empty:
        return "<p>(no examples)</p>"
    scale = float(snippets["activation"].abs().max()) or 1.0
    lines = [f"<p><b>{html.escape(title)}</b></p>"] if title else []
    for ex in examples.itertuples():
        spans = []
        for t in snippets[snippets["rank"] == ex.rank].itertuples():
            v = t.activation / scale
            color = f"rgba(220,40,40,{min(1.0, v):.2f})" if v >= 0 else f"rgba(40,90,220,{min(1.0, -v):.2f})"
            box = "outline:1.5px solid black;" if t.offset == 0 else ""
            text = html.escape(t.token).replace("\n", "\u21b5")
            spans.append(f'<span title="{t.activation:.3f}" style="background:{color};{box}'
                         f'white-space:pre">{text}</span>')
        lines.append(f'<div style="font-family:monospace;font-size:12px;margin:2px 0">'
                     f'<span style="display:inline-block;width:5.5em;color:#555">{ex.activation:8.2f}</span>'
                     f'{"".join(spans)}</div>')
    return "\n".join(lines)


def layer_module_heatmap(frame: pd.DataFrame, value: str, title: str = "", center: float | None = 0.0,
                         cmap: str = "RdBu_r", log: bool = False, annot: str | None = None,
                         robust: bool = False) -> Figure:
    """Layer x weight-matrix heatmap of one column of a frame with ``layer`` and ``matrix`` columns.

    Columns keep the order in which matrices first appear (forward order). ``log`` colours by
    ``log10`` of the value (for ratios spanning orders of magnitude); ``annot`` names a column printed
    in each cell (3 significant digits); ``robust`` sets the colour range from the 2nd-98th percentiles
    so that one extreme cell does not wash out the rest.
    """
    from matplotlib.colors import LogNorm

    order = list(dict.fromkeys(frame["matrix"]))
    grid = frame.pivot_table(index="layer", columns="matrix", values=value, aggfunc="mean")[order]
    fig, ax = plt.subplots(figsize=(0.9 * grid.shape[1] + 3.0, 0.26 * grid.shape[0] + 1.6))
    finite = grid.to_numpy()[np.isfinite(grid.to_numpy())]
    norm = LogNorm(vmin=max(finite.min(), 1e-6), vmax=finite.max()) if log and len(finite) else None
    labels = (frame.pivot_table(index="layer", columns="matrix", values=annot, aggfunc="mean")[order]
              .map(lambda v: f"{v:.3g}") if annot else False)
    sns.heatmap(grid, ax=ax, cmap=cmap, center=None if log else center, norm=norm, robust=robust,
                annot=labels, fmt="", annot_kws={"fontsize": 6},
                cbar_kws={"label": value + (" (log scale)" if log else "")})
    ax.set_title(title or value)
    ax.set_xlabel("weight matrix")
    ax.set_ylabel("layer")
    fig.tight_layout()
    return fig


def probability_bars(frame: pd.DataFrame, x: str, hue: str | None = None, value: str = "p_break",
                     title: str = "", ylabel: str = "P(model breaks)") -> Figure:
    """Bars of a probability per ``x`` (one colour per ``hue``) with ``low``/``high`` interval whiskers."""
    xs = list(dict.fromkeys(frame[x]))
    hues = list(dict.fromkeys(frame[hue])) if hue else [None]
    colors = sns.color_palette(n_colors=len(hues))
    width = 0.8 / len(hues)
    fig, ax = plt.subplots(figsize=(1.1 * len(xs) * max(1, len(hues) / 1.5) + 2, 3.4))
    for j, (h, color) in enumerate(zip(hues, colors)):
        sub = frame if h is None else frame[frame[hue] == h]
        sub = sub.set_index(x).reindex(xs)
        pos = np.arange(len(xs)) + (j - (len(hues) - 1) / 2) * width
        err = np.vstack([sub[value] - sub["low"], sub["high"] - sub[value]])
        ax.bar(pos, sub[value], width=width, color=color, label=None if h is None else str(h),
               yerr=err, capsize=3, ecolor="#333333")
    ax.set_xticks(np.arange(len(xs)), [str(v) for v in xs])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if hue:
        ax.legend(title=hue, fontsize=8)
    fig.tight_layout()
    return fig


def layer_spikes(frame: pd.DataFrame, columns: Sequence[str] = ("in_max", "out_max"),
                 title: str = "", threshold: float | None = None, shade: Sequence[int] = ()) -> Figure:
    """Largest activation per layer (one line per column, log scale), e.g. the MLP down projection's
    input and output from :func:`headlab.weights.down_proj_spikes`; optionally a dashed ``threshold``
    line and a shaded band over the layers ``shade`` (e.g. the early layers)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    if len(shade):
        ax.axvspan(min(shade) - 0.5, max(shade) + 0.5, color="grey", alpha=0.15, lw=0, label="early layers")
    if threshold is not None:
        ax.axhline(threshold, color="black", ls="--", lw=0.8, label=f"spike threshold {threshold:.3g}")
    for col in columns:
        ax.plot(frame["layer"], frame[col], "o-", ms=3, label=col)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max |activation|")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def correlation_heatmap(rho: pd.DataFrame, n: pd.DataFrame, title: str = "") -> Figure:
    """Square heatmap of a correlation matrix; each cell shows ρ and the number of heads behind it."""
    labels = np.array([[f"{r:.2f}\nn={int(k)}" if np.isfinite(r) else f"–\nn={int(k)}"
                        for r, k in zip(rr, kk)] for rr, kk in zip(rho.to_numpy(), n.to_numpy())])
    size = 0.9 * len(rho) + 2
    fig, ax = plt.subplots(figsize=(size + 1, size))
    sns.heatmap(rho, ax=ax, cmap="RdBu_r", center=0, vmin=-1, vmax=1, annot=labels, fmt="",
                annot_kws={"fontsize": 7}, cbar_kws={"label": "Spearman ρ"})
    ax.set_title(title)
    fig.tight_layout()
    return fig


def depth_profiles(profile: pd.DataFrame, measures: Sequence[str] | None = None, title: str = "") -> Figure:
    """One panel per measure: each model's mean within-model percentile of its heads per bin of relative
    depth (0 = first layer, 1 = last), from :attr:`headlab.atlas.CrossModel.depth_profile`."""
    measures = list(dict.fromkeys(profile["measure"])) if measures is None else list(measures)
    cols = min(3, max(1, len(measures)))
    rows = -(-len(measures) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, measures):
        sub = profile[profile["measure"] == name]
        for model, g in sub.groupby("model", sort=False):
            ax.plot(g["depth"], g["mean_percentile"], marker="o", label=model)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("relative depth")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean percentile in model")
    for ax in axes.flat[len(measures):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
