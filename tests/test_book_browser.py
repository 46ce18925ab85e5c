"""The offline book in a real browser: a tiny book with a bertviz head view and an ipywidgets output
(chapter 1) and the four explorers of :mod:`headlab.figures` on synthetic data (chapter 2) is executed,
built and opened in headless Chromium (Debian's ``chromium``; ``make test`` installs it).

Asserted: no page requests another host, the bertviz view drew SVG shapes, the widgets rendered and
the Output widget shows its figure; every explorer, operated like a reader would (a menu entry picked,
the mouse moved over or clicked on a heatmap cell, through the DevTools protocol), CHANGES what it
draws and shows the right hover text. Screenshots are saved to ``results/test-artefacts/``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from headlab import book

REPO = Path(__file__).resolve().parents[1]
ARTEFACTS = REPO / "results" / "test-artefacts"

CHAPTER = '''\
# %% [markdown]
# # Views
# A bertviz head view and a pattern explorer of random causal attention patterns.

# %% tags=["parameters"]
seed: int = 0  # seeds the random patterns

# %%
import torch

from headlab import widgets

tokens = ["The", " cat", " sat", " on", " the", " mat", "."]
s = len(tokens)
g = torch.Generator().manual_seed(seed)
causal = torch.ones(s, s).tril().bool()
patterns = torch.randn(3, 2, s, s, generator=g).masked_fill(~causal, float("-inf")).softmax(-1)
widgets.head_view(patterns, tokens, layers=[0, 2])

# %%
widgets.pattern_explorer({"cat": patterns}, {"cat": tokens}, layer=1, head=1)
'''

FIGURES = '''\
# %% [markdown]
# # Figures
# The four explorers of headlab.figures on synthetic data.

# %% tags=["parameters"]
seed: int = 0  # seeds the synthetic data

# %% tags=["remove-input"]
import numpy as np
import pandas as pd
import torch

from headlab import figures, widgets

rng = np.random.default_rng(seed)
L, H, P = 4, 3, 6
heads, prompts = [], []
for mode, levels, seeds in [("fraction_of_std", [1.0, 3.0], [0, 1]), ("zero", [0.0], [0])]:
    for level in levels:
        for s in seeds:
            for layer in range(L):
                for head in range(H):
                    change = rng.normal(size=P) * (layer + 1) * level / 3 + 0.01 * (s + 1)
                    heads.append(dict(mode=mode, level=level, seed=s, layer=layer, head=head,
                                      logit_diff_drop=-change.mean(), accuracy_drop=rng.uniform(-0.1, 0.2),
                                      macro_f1_drop=rng.uniform(-0.1, 0.2), p_correct_drop=rng.uniform(-0.1, 0.1)))
                    prompts += [dict(mode=mode, level=level, seed=s, layer=layer, head=head, prompt=p,
                                     logit_diff_change=c) for p, c in enumerate(change)]
heads, prompts = pd.DataFrame(heads), pd.DataFrame(prompts)
figures.show(figures.sweep_explorer(heads, prompts), widget=lambda: widgets.sweep_explorer(heads))

# %% tags=["hide-input"]
tokens = ["The", " cat", " sat", " on", " the", " mat", "."]
s = len(tokens)
g = torch.Generator().manual_seed(seed)
causal = torch.ones(s, s).tril().bool()
patterns = torch.randn(L, H, s, s, generator=g).masked_fill(~causal, float("-inf")).softmax(-1)
figures.show(figures.pattern_explorer({"cat": patterns, "reversed": patterns.flip(0)},
                                      {"cat": tokens, "reversed": tokens}, layer=1, head=2,
                                      notes={(1, 2): "entropy 0.31"}))

# %%
cards = [dict(layer=layer, neuron=n, note=f"max {n + layer:.2f}",
              examples=[dict(activation=2.0 + n, tokens=[(" a", 0.1 * layer, 0), (f" n{n}", 2.0 + n, 1), ("\\n", -0.5, 0)])],
              promoted=[(f" up{layer}", 1.5 + n), (" y", 1.0)], suppressed=[(f" down{n}", -1.2)])
         for layer in (0, 2) for n in (5, 7)]
figures.show(figures.neuron_explorer(cards))

# %%
table = pd.DataFrame([dict(layer=layer, head=head, noise_effect=float(rng.normal()), entropy=float(rng.uniform()))
                      for layer in range(L) for head in range(H)])
figures.show(figures.head_atlas(table, patterns, tokens, layer=2, head=1))
'''


def test_localize_outputs_rewrites_cdn_urls_in_outputs_only(tmp_path: Path) -> None:
    url_js = "https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.6/require.min.js"
    d3 = "https://cdnjs.cloudflare.com/ajax/libs/d3/5.7.0/d3.min"
    nb = {"cells": [
        {"cell_type": "code", "source": f"# {d3}", "metadata": {}, "outputs": [
            {"output_type": "display_data", "metadata": {}, "data": {"text/html": [f'<script src="{url_js}"></script>']}},
            {"output_type": "display_data", "metadata": {},
             "data": {"application/javascript": f"require.config({{paths: {{d3: '{d3}'}}}});",
                      "text/plain": d3}}]}],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "ch.ipynb"
    path.write_text(json.dumps(nb))
    assert book.localize_outputs(path, root="../") == 2
    out = json.loads(path.read_text())
    cell = out["cells"][0]
    assert cell["outputs"][0]["data"]["text/html"] == ['<script src="../require.js"></script>']
    assert cell["outputs"][1]["data"]["application/javascript"] == "require.config({paths: {d3: '../d3/d3.min'}});"
    assert cell["outputs"][1]["data"]["text/plain"] == d3 and cell["source"] == f"# {d3}"  # not rendered as code
    assert book.localize_outputs(path) == 0  # idempotent


def test_drawn_outputs_counts_shapes_inside_views_only() -> None:
    dom = ('<div id="bertviz-0a1b"><div id="vis"><svg><rect></rect><text>a</text><line></line></svg></div></div>'
           '<div id="bertviz-ff00"><div id="vis"></div></div><svg><rect></rect></svg>'
           '<div class="widget-vbox jupyter-widgets"><div class="widget-output"><img src="data:image/png;base64,AA"></div>'
           '</div><img src="data:image/png;base64,AA">')
    assert book.drawn_outputs(dom) == {"bertviz_views": 2, "bertviz_drawn": 1, "svg_shapes": 3, "widgets": 2,
                                       "widget_images": 1, "figures": 0, "figures_ready": 0}


@pytest.fixture(scope="module")
def tiny_book(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Execute and build a one-chapter book with the repository's configuration."""
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: run `make chromium` (make test does) or apt-get install chromium")
    root = tmp_path_factory.mktemp("tinybook")
    shutil.copy2(REPO / "_config.yml", root / "_config.yml")
    (root / "notebooks").mkdir()
    (root / "notebooks" / "01_views.py").write_text(CHAPTER)
    (root / "notebooks" / "02_figures.py").write_text(FIGURES)
    (root / "book").mkdir()
    (root / "book" / "intro.md").write_text("# Tiny book\n\nTwo chapters with interactive outputs.\n\n"
                                            "```{include} headlines.md\n```\n")
    (root / "book" / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: chapters/01_views\n"
                                            "  - file: chapters/02_figures\n")
    return book.build_book(root, browser_check=True)


def test_bertviz_output_is_rewritten_to_vendored_files(tiny_book: Path) -> None:
    html = (tiny_book / "chapters" / "01_views.html").read_text()
    assert "cdnjs" not in html
    assert '"../d3/d3.min"' in html or "'../d3/d3.min'" in html
    assert book.find_external_urls(tiny_book) == []


def test_pages_request_no_other_host(tiny_book: Path) -> None:
    pages = ["intro.html", "chapters/01_views.html", "chapters/02_figures.html"]
    requests = book.browser_requests(tiny_book, pages)
    chapter = [u.split("?")[0] for u in requests["chapters/01_views.html"]]
    assert any(u.endswith("/d3/d3.min.js") for u in chapter), chapter  # the vendored d3 was loaded
    assert any(u.endswith("/jquery/jquery.min.js") for u in chapter), chapter
    assert any(u.endswith("/jupyter-widgets/embed-amd.js") for u in chapter), chapter
    figures_page = [u.split("?")[0] for u in requests["chapters/02_figures.html"]]
    plotly = [u for u in figures_page if "plotly" in u]
    assert len(plotly) == 1 and re.fullmatch(r"http://127\.0\.0\.1:\d+/plotly/plotly-cartesian\.min\.js", plotly[0])
    leaks = [u for urls in requests.values() for u in urls if not u.startswith("http://127.0.0.1:")]
    assert leaks == []


def test_bertviz_view_and_widgets_draw(tiny_book: Path) -> None:
    shot = ARTEFACTS / "tiny_book_views.png"
    shot.unlink(missing_ok=True)
    dom = book.render_page(tiny_book, "chapters/01_views.html", screenshot=shot)
    drawn = book.drawn_outputs(dom)
    assert drawn["bertviz_views"] == 1 and drawn["bertviz_drawn"] == 1, drawn
    # 7 tokens on each side plus attention lines between them for the 2 heads
    assert drawn["svg_shapes"] >= 2 * 7, drawn
    assert drawn["widgets"] >= 3, drawn  # dropdown and two sliders at least
    assert drawn["widget_images"] == 1, drawn  # the Output widget shows the pattern figure
    (ARTEFACTS / "tiny_book_views.dom.html").write_text(dom)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_check_drawn_fails_when_a_view_does_not_draw(tiny_book: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(tiny_book, site)
    page = site / "chapters" / "01_views.html"
    # break the module path: d3 can no longer load, so bertviz cannot draw
    page.write_text(page.read_text().replace("../d3/d3.min", "../d3/missing"))
    with pytest.raises(RuntimeError, match="bertviz views drew"):
        book.check_drawn(site, ["chapters/01_views.html"])


# --------------------------------------------------------------------------------------------------
# headlab.figures operated in the browser: a reader's choice must change the figure
# --------------------------------------------------------------------------------------------------
FIG_PAGE = "chapters/02_figures.html"


def _ready(page: book.BrowserPage) -> dict[str, str]:
    """Wait until every figure drew; kind -> element id."""
    page.wait_for("(() => { const f = document.querySelectorAll('.headlab-figure');"
                  " return f.length === 4 && Array.from(f).every(e => e.dataset.ready); })()", timeout=90)
    pairs = page.evaluate("Array.from(document.querySelectorAll('.headlab-figure')).map(e => [e.dataset.kind, e.id])")
    return dict(pairs)


def _heatmap(page: book.BrowserPage, fid: str, plot: str = ".hlf-plot") -> str:
    """The PNG plotly drew for the figure's heatmap (changes whenever the drawn values change)."""
    return page.evaluate(f"document.querySelector('#{fid} {plot} image').getAttribute('href')")


def _title(page: book.BrowserPage, fid: str, plot: str = ".hlf-plot") -> str:
    return page.evaluate(f"document.querySelector('#{fid} {plot} .gtitle').textContent")


def _hover(page: book.BrowserPage, fid: str, x: float, y: float, plot: str = ".hlf-plot", click: bool = False) -> str:
    """Move the mouse over data point (x, y) of the figure's plot and return the hover label's text."""
    page.scroll_into_view(f"#{fid} {plot}")
    point = page.evaluate(f"""(() => {{
        const gd = document.querySelector('#{fid} {plot}'), fl = gd._fullLayout, r = gd.getBoundingClientRect();
        return [r.left + fl.xaxis._offset + fl.xaxis.l2p({x}), r.top + fl.yaxis._offset + fl.yaxis.l2p({y})];
    }})()""")
    page.mouse(*point, click=click)
    return page.wait_for(f"(() => {{ const h = document.querySelector('#{fid} {plot} .hoverlayer .hovertext');"
                         " return h && h.textContent; })()", timeout=10)


def test_static_figures_draw_and_stay_light(tiny_book: Path) -> None:
    html = (tiny_book / FIG_PAGE).read_text()
    assert "cdn.plot.ly" not in html and "../plotly/plotly-cartesian.min.js" in html
    assert html.count('<div class="headlab-figure" id="hlf-') == 4
    assert "application/vnd.jupyter.widget-view+json" not in html  # the figures, not the widgets
    assert 'tag_remove-input' in html and 'tag_hide-input' in html
    assert "import numpy as np" not in html  # the removed input is not on the page
    # the page (figures and their script included) stays light; plotly.js is one shared file
    assert (tiny_book / FIG_PAGE).stat().st_size < 200_000
    assert (tiny_book / "plotly" / "plotly-cartesian.min.js").stat().st_size < 2_000_000


def test_sweep_explorer_menus_and_hover(tiny_book: Path) -> None:
    with book.BrowserPage(tiny_book, FIG_PAGE, window=(1280, 1000)) as page:
        fid = _ready(page)["sweep"]
        menus = f"#{fid} select"
        options = page.evaluate(f"Object.fromEntries(Array.from(document.querySelectorAll('{menus}'))"
                                ".map(s => [s.dataset.key, Array.from(s.options).map(o => o.value)]))")
        # every menu has entries from the data (chapter 02's widget had empty level/seed menus)
        assert options == {"mode": ["fraction_of_std", "zero"], "level": ["1", "3"],
                           "seed": ["mean over seeds", "0", "1"],
                           "metric": ["logit_diff_drop", "accuracy_drop", "macro_f1_drop", "p_correct_drop"]}
        first, title = _heatmap(page, fid), _title(page, fid)
        assert title == "logit_diff_drop: fraction_of_std, level 1, mean over seeds"
        seen = {first}
        for key, value, expect in [("seed", "1", "level 1, seed 1"), ("level", "3", "level 3, seed 1"),
                                   ("metric", "accuracy_drop", "accuracy_drop: fraction_of_std"),
                                   ("mode", "zero", "zero, level 0, seed 0")]:
            page.select(f"{menus}[data-key={key}]", value)
            assert expect in _title(page, fid)
            image = _heatmap(page, fid)
            assert image not in seen, f"choosing {key}={value} did not change the heatmap"
            seen.add(image)
        # the dependent menus follow the mode: zero ablation has one level and one seed
        assert page.evaluate(f"Array.from(document.querySelector('{menus}[data-key=level]').options)"
                             ".map(o => o.value)") == ["0"]
        page.select(f"{menus}[data-key=mode]", "fraction_of_std")
        page.select(f"{menus}[data-key=metric]", "logit_diff_drop")
        text = _hover(page, fid, 2, 3)  # head 2 of layer 3
        assert text.startswith("layer 3, head 2logit_diff_drop: ") and "95% CI [" in text, text
        page.screenshot(ARTEFACTS / "figure_sweep_hover.png")
        page.select(f"{menus}[data-key=metric]", "accuracy_drop")
        assert "interval: none" in _hover(page, fid, 0, 1)


def test_pattern_explorer_menus_and_hover(tiny_book: Path) -> None:
    with book.BrowserPage(tiny_book, FIG_PAGE, window=(1280, 1000)) as page:
        fid = _ready(page)["pattern"]
        first = _heatmap(page, fid)
        assert _title(page, fid).startswith('L1H2 on "cat"') and "entropy 0.31" in _title(page, fid)
        page.select(f"#{fid} select[data-key=head]", "0")
        second = _heatmap(page, fid)
        assert second != first and _title(page, fid).startswith('L1H0 on "cat"')
        page.select(f"#{fid} select[data-key=text]", "reversed")
        assert _heatmap(page, fid) not in (first, second)
        text = _hover(page, fid, 0, 6)  # key 0 of query 6
        assert text.startswith('query 6 "." → key 0 "The"attention 0.'), text


def test_neuron_explorer_menus(tiny_book: Path) -> None:
    with book.BrowserPage(tiny_book, FIG_PAGE, window=(1280, 1000)) as page:
        fid = _ready(page)["neurons"]
        snippets = f"document.querySelector('#{fid} .hlf-side').textContent"
        bars = f"Array.from(document.querySelectorAll('#{fid} .hlf-plot .ytick text')).map(t => t.textContent)"
        assert "L0 N5" in page.evaluate(snippets) and page.evaluate(bars)[0] == '" up0"'
        page.select(f"#{fid} select[data-key=neuron]", "7")
        assert "L0 N7" in page.evaluate(snippets) and " n7" in page.evaluate(snippets)
        page.select(f"#{fid} select[data-key=layer]", "2")
        assert page.evaluate(f"document.querySelector('#{fid} select[data-key=neuron]').value") == "5"
        assert "L2 N5" in page.evaluate(snippets)
        assert page.evaluate(bars)[0] == '" up2"' and '" down5"' in page.evaluate(bars)


def test_head_atlas_pick_a_head(tiny_book: Path) -> None:
    with book.BrowserPage(tiny_book, FIG_PAGE, window=(1280, 1000)) as page:
        fid = _ready(page)["atlas"]
        table = f"document.querySelector('#{fid} .hlf-table').textContent"
        assert page.evaluate(table).startswith("L2H1: every measure of this head")
        pattern = _heatmap(page, fid, ".hlf-plot2")
        # clicking a cell of the layer x head map picks that head: its scores and its pattern
        text = _hover(page, fid, 0, 3, click=True)
        assert text.startswith("layer 3, head 0noise_effect: ") and "rank " in text, text
        page.wait_for(f"{table}.startsWith('L3H0')")
        assert page.evaluate(f"document.querySelector('#{fid} select[data-key=layer]').value") == "3"
        assert _heatmap(page, fid, ".hlf-plot2") != pattern
        assert _title(page, fid, ".hlf-plot2").startswith("L3H0 attention")
        # the measure menu recolours the map; the menus pick a head too
        before = _heatmap(page, fid)
        page.select(f"#{fid} select[data-key=measure]", "entropy")
        assert _heatmap(page, fid) != before and _title(page, fid).startswith("entropy per head")
        page.select(f"#{fid} select[data-key=head]", "2")
        assert page.evaluate(table).startswith("L3H2") and "entropy" in page.evaluate(table)
        page.screenshot(ARTEFACTS / "figure_atlas.png")
