"""Interactive figures for the static HTML book: every choice redraws in the browser, without a kernel.

The explorers of :mod:`headlab.widgets` need a running kernel: in the HTML book they would show their
first state only. The builders here compute everything a reader can pick *before* the page is made
and embed it, sized to stay light, into one HTML output; a small script (``figures.js``, inlined) draws
it with plotly.js and redraws on every menu choice:

* :func:`sweep_explorer` -- layer x head heatmap of a head sweep: mode / level / seed (or the mean over
  seeds) / measure; hover shows layer, head, value and its 95% interval (chapter 02);
* :func:`pattern_explorer` -- one head's attention pattern on one of a few texts (chapter 04);
* :func:`neuron_explorer` -- top-activating snippets and promoted / suppressed tokens of the strongest
  neurons of each layer (chapter 06);
* :func:`head_atlas` -- a layer x head map of any atlas measure; clicking (or picking) a head shows its
  scores with ranks and its attention pattern (chapter 08).

A chapter shows them with :func:`show`: the static figure when the kernel has no frontend (papermill in
``headlab book`` / ``headlab run`` / ``headlab grid``, which set :data:`HEADLESS_ENV`), and the
ipywidgets explorer in JupyterLab, where a kernel answers the callbacks.

plotly.js is loaded once per page from :data:`PLOTLY_URL`; the book build rewrites that URL to the copy
it vendors from npm (:mod:`headlab.book.vendor`), so the pages stay offline. Attention patterns are
sent as bytes (probability x 255, causal lower triangle only, zlib-compressed, base64) and inflated by
the browser (``DecompressionStream``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["HEADLESS_ENV", "PLOTLY_PACKAGE", "PLOTLY_URL", "PLOTLY_VERSION", "Figure", "has_frontend",
           "head_atlas", "neuron_cards", "neuron_explorer", "pattern_explorer", "show", "sweep_explorer"]

#: npm package and version of the plotly.js bundle the figures use (vendored by the book build).
PLOTLY_PACKAGE = "plotly.js-cartesian-dist-min"
PLOTLY_VERSION = "4.1.1"
#: Where a figure loads plotly.js from outside the book (the build rewrites it to the vendored copy).
PLOTLY_URL = f"https://cdn.plot.ly/plotly-cartesian-{PLOTLY_VERSION}.min.js"
#: Set (to anything non-empty) in the environment of a kernel without a frontend: :func:`show` then
#: displays static figures instead of widgets.
HEADLESS_ENV = "HEADLAB_HEADLESS"



def _runtime() -> str:
    """``figures.js`` as inlined into each figure: its header comment, comment lines and indentation
    dropped (about a third smaller), the plotly.js URL filled in."""
    text = Path(__file__).with_name("figures.js").read_text(encoding="utf-8")
    text = text[text.index("*/") + 2:] if text.lstrip().startswith("/*") else text
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("//")).replace("__PLOTLY_URL__", PLOTLY_URL)


_RUNTIME = _runtime()

_STYLE = """<style>
.headlab-figure{margin:0.5em 0 1em 0;font-size:13px}
.headlab-figure .hlf-controls{display:flex;flex-wrap:wrap;gap:0.4em 1.2em;margin-bottom:0.3em}
.headlab-figure select{font-size:13px;margin-left:0.3em}
.headlab-figure .hlf-status{color:#777;font-style:italic}
.headlab-figure .hlf-snippet{font-family:monospace;font-size:12px;margin:2px 0}
.headlab-figure .hlf-act{display:inline-block;width:5.5em;color:#555}
.headlab-figure table.hlf-scores{border-collapse:collapse;font-size:12px}
.headlab-figure table.hlf-scores td,.headlab-figure table.hlf-scores th{padding:1px 8px;text-align:right}
.headlab-figure table.hlf-scores td:first-child,.headlab-figure table.hlf-scores th:first-child{text-align:left}
.headlab-figure .hlf-caption{margin:0.3em 0}
</style>"""


@dataclass(frozen=True)
class Figure:
    """One interactive figure: what the browser needs to draw it (``data``) and a one-line description.

    Displayed in a notebook it renders as HTML (:meth:`to_html`); ``nbytes`` is the size of that HTML.
    """

    kind: str
    data: dict[str, Any]
    description: str = ""

    def to_html(self) -> str:
        """The figure as one self-contained HTML fragment (markup, data, style and script)."""
        payload = json.dumps({"kind": self.kind, **self.data}, separators=(",", ":"), allow_nan=False)
        fid = "hlf-" + hashlib.sha256(payload.encode()).hexdigest()[:12]
        safe = payload.replace("</", "<\\/")  # never close the <script> early
        side = '<div class="hlf-side"></div>' if self.kind in ("neurons", "atlas") else ""
        return (f'{_STYLE}<div class="headlab-figure" id="{fid}" data-kind="{self.kind}">'
                f'<div class="hlf-controls"></div><div class="hlf-status">{html.escape(self.description)} '
                f'(interactive figure: loading plotly.js)</div>'
                f'<div class="hlf-plot"></div>{side}</div>\n'
                f'<script type="application/json" id="{fid}-data">{safe}</script>\n'
                f'<script>{_RUNTIME}\nwindow.headlabFigures.mount("{fid}");</script>\n')

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        return f"<headlab figure {self.kind}: {self.description} ({self.nbytes / 1024:.0f} KiB)>"

    @property
    def nbytes(self) -> int:
        """Size in bytes of :meth:`to_html` (what the figure adds to a page)."""
        return len(self.to_html().encode())


def has_frontend() -> bool:
    """True in a kernel a person works in (JupyterLab, a console); False under papermill in headlab's
    runs (:data:`HEADLESS_ENV` set) and outside IPython."""
    if os.environ.get(HEADLESS_ENV):
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def show(figure: Figure, widget: Callable[[], Any] | None = None) -> None:
    """Display ``figure``, or, in a kernel with a frontend, the widget ``widget()`` builds instead.

    Args:
        figure: the static interactive figure (what the HTML book shows).
        widget: builds the JupyterLab explorer (called only when it will be shown).
    """
    from IPython.display import display

    display(widget() if widget is not None and has_frontend() else figure)


# --------------------------------------------------------------------------------------------------
# Encoding helpers
# --------------------------------------------------------------------------------------------------
def _round(values: Any, digits: int = 4) -> list[float | None]:
    """Floats to ``digits`` significant digits; NaN and inf to None (JSON null)."""
    out: list[float | None] = []
    for v in np.asarray(values, dtype=float).ravel().tolist():
        out.append(None if not math.isfinite(v) else float(f"{v:.{digits}g}"))
    return out


def _head_grid(frame: Any, column: str, n_layers: int, n_heads: int) -> list[float | None]:
    """A per-head column as a flat layer-major list of ``n_layers * n_heads`` values (None where absent)."""
    grid = np.full((n_layers, n_heads), np.nan)
    layers, heads = frame["layer"].to_numpy(int), frame["head"].to_numpy(int)
    grid[layers, heads] = frame[column].to_numpy(float)
    return _round(grid)


def _packed_patterns(patterns: Any) -> str:
    """``(L, H, s, s)`` causal attention probabilities -> base64 of zlib(uint8(p * 255)) of the lower
    triangles (row by row), the layout ``figures.js`` reads."""
    p = np.asarray(patterns, dtype=np.float32)
    if p.ndim != 4 or p.shape[-1] != p.shape[-2]:
        raise ValueError(f"patterns of shape {p.shape}; expected (layers, heads, s, s).")
    rows, cols = np.tril_indices(p.shape[-1])
    q = np.clip(np.rint(p[..., rows, cols] * 255), 0, 255).astype(np.uint8)  # (L, H, s(s+1)/2)
    return base64.b64encode(zlib.compress(q.tobytes(), 9)).decode()


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=float)


# --------------------------------------------------------------------------------------------------
# The explorers
# --------------------------------------------------------------------------------------------------
SWEEP_METRICS = ("logit_diff_drop", "accuracy_drop", "macro_f1_drop", "p_correct_drop")
MEAN_OVER_SEEDS = "mean over seeds"


def sweep_explorer(heads: Any, prompts: Any | None = None, metrics: Sequence[str] = SWEEP_METRICS,
                   n_boot: int = 200, init: Mapping[str, Any] | None = None) -> Figure:
    """Layer x head heatmap of a head sweep; menus for mode, level, seed (or the mean) and the measure.

    Every (mode, level) of ``heads`` is offered with each of its seeds and the mean over them. For the
    logit-difference drop each head gets its 95% interval (paired bootstrap over prompts, from
    ``prompts`` by :func:`headlab.sweeps.rank_heads`); the other measures are accuracies on the same
    prompts, for which no per-prompt values are kept, so they have none.

    Args:
        heads, prompts: the two tables of :func:`headlab.sweeps.head_sweep` (``prompts`` optional).
        metrics: columns of ``heads`` offered in the measure menu.
        n_boot: bootstrap resamples per (setting, seed) for the intervals.
        init: the first choice (``mode``, ``level``, ``seed``, ``metric``); default the first of each.
    """
    from headlab.sweeps import rank_heads

    missing = [m for m in metrics if m not in heads.columns]
    if missing or heads.empty:
        raise ValueError(f"heads table is empty or lacks {missing}; it has {list(heads.columns)}.")
    n_layers, n_heads = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
    views = []
    for (mode, level), g in heads.groupby(["mode", "level"], sort=True):
        seeds = sorted(int(s) for s in g["seed"].unique())
        for seed in ([MEAN_OVER_SEEDS] if len(seeds) > 1 else []) + seeds:
            sel = g if seed == MEAN_OVER_SEEDS else g[g["seed"] == seed]
            mean = sel.groupby(["layer", "head"], as_index=False)[list(metrics)].mean()
            view: dict[str, Any] = {"mode": str(mode), "level": float(level), "seed": seed,
                                    "values": {m: _head_grid(mean, m, n_layers, n_heads) for m in metrics}}
            if prompts is not None and "logit_diff_drop" in metrics:
                p = prompts[(prompts["mode"] == mode) & np.isclose(prompts["level"].astype(float), float(level))]
                h = sel
                if seed != MEAN_OVER_SEEDS:
                    p = p[p["seed"] == seed]
                ranked = rank_heads(h, p, str(mode), float(level), n_boot=n_boot)
                view["low"] = {"logit_diff_drop": _head_grid(ranked, "effect_low", n_layers, n_heads)}
                view["high"] = {"logit_diff_drop": _head_grid(ranked, "effect_high", n_layers, n_heads)}
            views.append(view)
    first = views[0]
    start = {"mode": first["mode"], "level": first["level"], "seed": first["seed"], "metric": metrics[0],
             **dict(init or {})}
    data = {"n_layers": n_layers, "n_heads": n_heads, "metrics": list(metrics), "views": views, "init": start,
            "mean_label": MEAN_OVER_SEEDS,
            "no_interval": "none (no per-prompt values are kept for this measure)"}
    return Figure("sweep", data, f"head sweep: {len(views)} settings x {len(metrics)} measures")


def pattern_explorer(patterns: Mapping[str, Any], tokens: Mapping[str, Sequence[str]], layer: int = 0,
                     head: int = 0, notes: Mapping[tuple[int, int], str] | None = None) -> Figure:
    """Pick a text, a layer and a head and see that head's attention pattern with the tokens.

    Args:
        patterns: text name -> ``(n_layers, n_heads, s, s)`` attention probabilities (causal).
        tokens: text name -> its ``s`` token strings.
        layer, head: the first choice.
        notes: optional ``(layer, head) -> text`` shown under the title (e.g. the head's entropy).
    """
    names = list(patterns)
    if not names or set(names) != set(tokens):
        raise ValueError(f"patterns {names} and tokens {list(tokens)} must name the same, non-empty set of texts.")
    shapes = {n: _as_numpy(patterns[n]).shape for n in names}
    n_layers, n_heads = shapes[names[0]][:2]
    bad = {n: s for n, s in shapes.items() if s[:2] != (n_layers, n_heads) or s[2:] != (len(tokens[n]),) * 2}
    if bad:
        raise ValueError(f"patterns {bad} do not fit ({n_layers}, {n_heads}, s, s) with s = number of tokens.")
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ValueError(f"layer={layer}, head={head} out of range 0..{n_layers - 1}, 0..{n_heads - 1}.")
    texts = [{"name": n, "tokens": [str(t) for t in tokens[n]], "patterns": _packed_patterns(_as_numpy(patterns[n]))}
             for n in names]
    data = {"n_layers": int(n_layers), "n_heads": int(n_heads), "texts": texts,
            "notes": {f"{k[0]},{k[1]}": str(v) for k, v in (notes or {}).items()},
            "init": {"text": names[0], "layer": int(layer), "head": int(head)}}
    return Figure("pattern", data, f"attention patterns of {len(names)} texts")


def neuron_cards(lm: Any, stats: Any, ids: Any, choices: Sequence[tuple[int, int]], n_examples: int = 5,
                 before: int = 10, after: int = 3, k_tokens: int = 6) -> list[dict[str, Any]]:
    """What :func:`neuron_explorer` shows of each ``(layer, neuron)``: computed here, drawn in the page.

    Args:
        lm, stats, ids: the model, :class:`headlab.neurons.NeuronStats` and the rows the stats ran on.
        choices: the ``(layer, neuron)`` pairs a reader can pick.
        n_examples: top-activating examples per neuron (at most ``stats.k``).
        before, after: context tokens around each example's top token.
        k_tokens: promoted and suppressed tokens listed per neuron.

    Returns:
        One dict per choice: ``layer, neuron, note, examples`` (``activation`` and ``tokens`` as
        ``(text, activation, is_top)``), ``promoted`` and ``suppressed`` (``(text, logit)``).
    """
    from headlab import neurons

    cards = []
    for layer, neuron in choices:
        layer, neuron = int(layer), int(neuron)
        ex = neurons.top_examples(lm, stats, ids, layer, neuron, before, after).head(n_examples)
        snip = neurons.snippet_activations(lm, ids, ex, layer, neuron, before, after)
        promo = neurons.promoted_tokens(lm, layer, neuron, k=k_tokens)
        slot = stats.slot(layer)
        examples = [{"activation": float(e.activation),
                     "tokens": [(str(t.token), float(t.activation), int(t.offset == 0))
                                for t in snip[snip["rank"] == e.rank].itertuples()]} for e in ex.itertuples()]
        cards.append({
            "layer": layer, "neuron": neuron,
            "note": f"max {float(stats.max[slot, neuron]):.2f}, mean |act| {float(stats.mean_abs[slot, neuron]):.3f}",
            "examples": examples,
            "promoted": [(str(r.token), float(r.logit)) for r in promo[promo["direction"] == "promoted"].itertuples()],
            "suppressed": [(str(r.token), float(r.logit)) for r in promo[promo["direction"] == "suppressed"].itertuples()],
        })
    return cards


def neuron_explorer(cards: Sequence[Mapping[str, Any]], layer: int | None = None,
                    neuron: int | None = None) -> Figure:
    """Pick a layer and one of its listed neurons: its top-activating snippets (shaded by activation) and
    the tokens its output weights promote and suppress.

    Args:
        cards: :func:`neuron_cards` of the neurons to offer.
        layer, neuron: the first choice (default the first card).
    """
    if not cards:
        raise ValueError("no neuron cards: give at least one (layer, neuron) to neuron_cards.")
    vocab: dict[str, int] = {}

    def tok(text: str) -> int:
        return vocab.setdefault(text, len(vocab))

    packed = []
    for c in cards:
        packed.append({
            "layer": int(c["layer"]), "neuron": int(c["neuron"]), "note": str(c["note"]),
            "examples": [{"activation": _round([e["activation"]], 3)[0],
                          "tokens": [[tok(t), _round([a], 3)[0], top] for t, a, top in e["tokens"]]}
                         for e in c["examples"]],
            "promoted": [[tok(t), _round([v], 3)[0]] for t, v in c["promoted"]],
            "suppressed": [[tok(t), _round([v], 3)[0]] for t, v in c["suppressed"]],
        })
    first = packed[0]
    start = {"layer": first["layer"] if layer is None else int(layer),
             "neuron": first["neuron"] if neuron is None else int(neuron)}
    if not any(c["layer"] == start["layer"] and c["neuron"] == start["neuron"] for c in packed):
        raise ValueError(f"L{start['layer']} N{start['neuron']} is not among the cards.")
    data = {"cards": packed, "vocab": list(vocab), "init": start}
    return Figure("neurons", data, f"neuroscope of {len(packed)} neurons")


def head_atlas(table: Any, patterns: Any, tokens: Sequence[str], layer: int = 0, head: int = 0,
               measure: str | None = None) -> Figure:
    """The head atlas: a layer x head map of one measure (menu), and for the picked head (click the map or
    use the menus) all its scores with rank and percentile and its attention pattern on one text.

    Args:
        table: the atlas table (:func:`headlab.atlas.load_atlas`), one row per ``(layer, head)``.
        patterns: ``(n_layers, n_heads, s, s)`` attention probabilities of one short text.
        tokens: the text's ``s`` token strings.
        layer, head: the first head shown; measure: the first measure (default the first column).
    """
    pats = _as_numpy(patterns)
    if pats.ndim != 4 or pats.shape[-1] != len(tokens) or pats.shape[-2] != len(tokens):
        raise ValueError(f"patterns of shape {pats.shape} do not fit (layers, heads, s, s) with "
                         f"s = {len(tokens)} tokens.")
    n_layers, n_heads = int(pats.shape[0]), int(pats.shape[1])
    measures = [c for c in table.columns if c not in ("layer", "head")]
    if not measures:
        raise ValueError("the atlas table has no measure columns.")
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ValueError(f"layer={layer}, head={head} out of range 0..{n_layers - 1}, 0..{n_heads - 1}.")
    values, ranks, counts = {}, {}, {}
    for m in measures:
        col = table[m].astype(float)
        rank = col.rank(ascending=False, method="min")  # 1 = largest, as headlab.atlas.head_profile
        frame = table[["layer", "head"]].assign(value=col, rank=rank)
        values[m] = _head_grid(frame, "value", n_layers, n_heads)
        ranks[m] = [None if r is None else int(r) for r in _head_grid(frame, "rank", n_layers, n_heads)]
        counts[m] = int(col.notna().sum())
    start = {"measure": measure or measures[0], "layer": int(layer), "head": int(head)}
    data = {"n_layers": n_layers, "n_heads": n_heads, "measures": measures, "values": values, "ranks": ranks,
            "counts": counts, "tokens": [str(t) for t in tokens], "patterns": _packed_patterns(pats), "init": start}
    return Figure("atlas", data, f"head atlas: {len(measures)} measures")
