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

__all__ = ["sweep_explorer"]


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
