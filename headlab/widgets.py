"""Interactive views for JupyterLab (ipywidgets). Each function returns a widget to display.

The views only re-plot data the chapter already computed, so they are cheap. They need a kernel to
answer their callbacks: the static HTML book shows the :mod:`headlab.figures` version of each explorer
instead (chapters call :func:`headlab.figures.show`, which picks the one that works where it runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ipywidgets as W
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

__all__ = ["head_atlas", "head_view", "neuron_explorer", "pattern_explorer", "sweep_explorer"]


def sweep_explorer(heads: pd.DataFrame, metrics: Sequence[str] = ("logit_diff_drop", "accuracy_drop",
                                                                   "macro_f1_drop", "p_correct_drop")) -> W.Widget:
    """Pick mode / level / seed (or the mean over seeds) / metric and see the layer x head heatmap.

    Args:
        heads: the per-head table of :func:`headlab.sweeps.head_sweep`.
        metrics: columns offered in the metric menu.
    """
    from headlab import plots

    modes = sorted(heads["mode"].unique())
    mode = W.Dropdown(options=modes, value=modes[0], description="mode")
    level = W.Dropdown(description="level")
    seed = W.Dropdown(description="seed")
    metric = W.Dropdown(options=list(metrics), value=metrics[0], description="metric")
    out = W.Output()

    def sync(*_: object) -> None:
        # ipywidgets 8 keeps value None when the options change under it: choose one explicitly
        # (an empty choice was what the static book showed: "no rows for this choice").
        sel = heads[heads["mode"] == mode.value]
        keep = level.value
        level.options = sorted(float(v) for v in sel["level"].unique())
        level.value = keep if keep in level.options else level.options[0]
        sel = sel[sel["level"] == level.value]
        keep = seed.value
        seed.options = ["mean over seeds"] + sorted(int(s) for s in sel["seed"].unique())
        seed.value = keep if keep in seed.options else seed.options[0]

    def draw(*_: object) -> None:
        sel = heads[(heads["mode"] == mode.value) & (heads["level"] == level.value)]
        if seed.value != "mean over seeds":
            sel = sel[sel["seed"] == seed.value]
        with out:
            out.clear_output(wait=True)
            if sel.empty:
                print("no rows for this choice")
                return
            fig = plots.head_heatmap(sel, metric.value,
                                     title=f"{metric.value}: {mode.value}, level {level.value}, seed {seed.value}")
            display(fig)
            plt.close(fig)

    mode.observe(sync, "value")
    level.observe(sync, "value")
    sync()
    for w in (mode, level, seed, metric):
        w.observe(draw, "value")
    draw()
    return W.VBox([W.HBox([mode, level]), W.HBox([seed, metric]), out])


def pattern_explorer(patterns: Mapping[str, object], tokens: Mapping[str, Sequence[str]], layer: int = 0,
                     head: int = 0, notes: Mapping[tuple[int, int], str] | None = None) -> W.Widget:
    """Pick a text, a layer and a head and see that head's attention pattern with the tokens.

    Compute first (:func:`headlab.attention.attention_patterns` of each text), then call this: the
    callbacks only slice the given patterns and draw them (:func:`headlab.plots.token_pattern`).

    Args:
        patterns: text name -> ``(n_layers, n_heads, s, s)`` attention probabilities.
        tokens: text name -> its ``s`` token strings.
        layer, head: the initial choice (what the static HTML book shows).
        notes: optional ``(layer, head) -> text`` shown under the title (e.g. the head's entropy).
    """
    from headlab import plots

    names = list(patterns)
    if not names or set(names) != set(tokens):
        raise ValueError(f"patterns {names} and tokens {list(tokens)} must name the same, non-empty set of texts.")
    n_layers, n_heads = (int(v) for v in patterns[names[0]].shape[:2])
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ValueError(f"layer={layer}, head={head} out of range 0..{n_layers - 1}, 0..{n_heads - 1}.")
    text = W.Dropdown(options=names, value=names[0], description="text")
    lay = W.IntSlider(value=layer, min=0, max=n_layers - 1, description="layer", continuous_update=False)
    hd = W.IntSlider(value=head, min=0, max=n_heads - 1, description="head", continuous_update=False)
    out = W.Output()

    def draw(*_: object) -> None:
        pat = patterns[text.value][lay.value, hd.value]
        title = f"L{lay.value}H{hd.value} on {text.value!r}"
        if notes and (lay.value, hd.value) in notes:
            title += f"\n{notes[(lay.value, hd.value)]}"
        with out:
            out.clear_output(wait=True)
            fig = plots.token_pattern(pat, list(tokens[text.value]), title)
            display(fig)
            plt.close(fig)

    for w in (text, lay, hd):
        w.observe(draw, "value")
    draw()
    return W.VBox([text, W.HBox([lay, hd]), out])


def head_view(patterns: object, tokens: Sequence[str], layers: Sequence[int], layer: int | None = None) -> None:
    """Display bertviz's interactive head view of the given layers for one short text.

    Args:
        patterns: ``(n_layers, n_heads, s, s)`` attention probabilities of one text.
        tokens: its ``s`` token strings.
        layers: the layers to embed. bertviz writes every number of every chosen head into the page
            (about 26 KB per layer for 10 tokens and 9 heads, growing with tokens squared), so keep
            the text short and the layers few.
        layer: the layer shown first (default the first of ``layers``).

    The output loads require.js, d3 and jQuery from cdnjs; the book build rewrites those URLs to its
    vendored copies (:func:`headlab.book.localize_outputs`).
    """
    import torch
    from bertviz import head_view as _head_view

    pats = torch.as_tensor(patterns, dtype=torch.float32)
    if pats.dim() != 4 or pats.shape[-1] != len(tokens) or pats.shape[-2] != len(tokens):
        raise ValueError(f"patterns of shape {tuple(pats.shape)} do not fit (layers, heads, s, s) with "
                         f"s = {len(tokens)} tokens.")
    layers = sorted(int(v) for v in layers)
    bad = [v for v in layers if not 0 <= v < pats.shape[0]]
    if not layers or bad:
        raise ValueError(f"layers {bad or layers} invalid; choose from 0..{pats.shape[0] - 1}.")
    attention = tuple(pats[i][None] for i in range(pats.shape[0]))  # bertviz: per layer (1, H, s, s)
    _head_view(attention, list(tokens), include_layers=layers, layer=layers[0] if layer is None else layer)


def neuron_explorer(lm, stats, ids, layer: int = 0, neuron: int = 0, n_examples: int = 6,
                    before: int = 12, after: int = 3) -> W.Widget:
    """Pick a layer and a neuron: its top-activating snippets (shaded by activation) and the tokens its
    output weights promote and suppress.

    Args:
        lm: the model; stats: :class:`headlab.neurons.NeuronStats`; ids: the rows the stats ran on.
        layer, neuron: the initial choice (shown in the static book).
        n_examples: examples shown (at most ``stats.k``).
    """
    from headlab import neurons, plots

    pick_layer = W.Dropdown(options=list(stats.layers), value=layer, description="layer")
    pick_neuron = W.BoundedIntText(value=neuron, min=0, max=stats.d_mlp - 1, description="neuron")
    out = W.Output()

    def draw(*_: object) -> None:
        ex = neurons.top_examples(lm, stats, ids, pick_layer.value, pick_neuron.value, before, after).head(n_examples)
        snip = neurons.snippet_activations(lm, ids, ex, pick_layer.value, pick_neuron.value, before, after)
        promo = neurons.promoted_tokens(lm, pick_layer.value, pick_neuron.value, k=8)
        table = promo.pivot(index="rank", columns="direction", values="token")
        with out:
            out.clear_output(wait=True)
            display(W.HTML(plots.neuron_snippets_html(
                snip, ex, f"L{pick_layer.value} N{pick_neuron.value}: top activations (mean |act| "
                f"{float(stats.mean_abs[stats.slot(pick_layer.value), pick_neuron.value]):.3f})")))
            display(table)

    for w in (pick_layer, pick_neuron):
        w.observe(draw, "value")
    draw()
    return W.VBox([W.HBox([pick_layer, pick_neuron]), out])


def head_atlas(table: pd.DataFrame, patterns: object, tokens: Sequence[str], layer: int = 0,
               head: int = 0) -> W.Widget:
    """Pick a head: all its atlas scores (value, rank, percentile) and its attention pattern on one text.

    Args:
        table: the atlas table (:func:`headlab.atlas.load_atlas`), one row per ``(layer, head)``.
        patterns: ``(n_layers, n_heads, s, s)`` attention probabilities of one short text, computed once;
            the callbacks only slice it.
        tokens: the text's ``s`` token strings.
    """
    import torch

    from headlab.atlas import head_profile

    pats = torch.as_tensor(patterns, dtype=torch.float32)
    if pats.dim() != 4 or pats.shape[-1] != len(tokens) or pats.shape[-2] != len(tokens):
        raise ValueError(f"patterns of shape {tuple(pats.shape)} do not fit (layers, heads, s, s) with "
                         f"s = {len(tokens)} tokens.")
    n_layers, n_heads = pats.shape[:2]
    lw = W.BoundedIntText(value=layer, min=0, max=n_layers - 1, description="layer")
    hw = W.BoundedIntText(value=head, min=0, max=n_heads - 1, description="head")
    out = W.Output()

    def draw(*_):
        out.clear_output(wait=True)
        with out:
            L, H = int(lw.value), int(hw.value)
            inside = ((table["layer"] == L) & (table["head"] == H)).any() if len(table) else False
            if inside:
                display(head_profile(table, L, H).round(4))
            else:
                display(f"L{L}H{H} has no scores in the atlas.")
            fig, ax = plt.subplots(figsize=(4.5, 4))
            ax.imshow(pats[L, H].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
            ax.set_title(f"L{L}H{H} attention (query rows, key columns)")
            fig.tight_layout()
            plt.show()

    lw.observe(draw, "value")
    hw.observe(draw, "value")
    draw()
    return W.VBox([W.HBox([lw, hw]), out])
