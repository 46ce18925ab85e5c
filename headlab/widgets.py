"""Interactive views for JupyterLab (ipywidgets). Each function returns a widget to display.

The views only re-plot data the chapter already computed, so they are cheap and also render (in
their initial state) in the static HTML book.
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as W
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

__all__ = ["neuron_explorer", "sweep_explorer"]


def sweep_explorer(heads: pd.DataFrame, metrics: Sequence[str] = ("logit_diff_drop", "accuracy_drop",
                                                                   "macro_f1_drop", "p_correct_drop")) -> W.Widget:
    """Pick mode / level / seed (or the mean over seeds) / metric and see the layer x head heatmap.

    Args:
        heads: the per-head table of :func:`headlab.sweep.head_sweep`.
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
        sel = heads[heads["mode"] == mode.value]
        level.options = sorted(sel["level"].unique())
        seed.options = ["mean over seeds"] + sorted(int(s) for s in sel["seed"].unique())

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
    sync()
    for w in (mode, level, seed, metric):
        w.observe(draw, "value")
    draw()
    return W.VBox([W.HBox([mode, level]), W.HBox([seed, metric]), out])


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
