"""The offline book in a real browser: a tiny book with a bertviz head view and an ipywidgets output
is executed, built and opened in headless Chromium (Debian's ``chromium``; ``make test`` installs it).

Asserted: no page requests another host, the bertviz view drew SVG shapes, the widgets rendered and
the Output widget shows its figure. A screenshot is saved to ``results/test-artefacts/``.
"""

from __future__ import annotations

import json
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
                                       "widget_images": 1}


@pytest.fixture(scope="module")
def tiny_book(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Execute and build a one-chapter book with the repository's configuration."""
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: run `make chromium` (make test does) or apt-get install chromium")
    root = tmp_path_factory.mktemp("tinybook")
    shutil.copy2(REPO / "_config.yml", root / "_config.yml")
    (root / "notebooks").mkdir()
    (root / "notebooks" / "01_views.py").write_text(CHAPTER)
    (root / "book").mkdir()
    (root / "book" / "intro.md").write_text("# Tiny book\n\nOne chapter with interactive outputs.\n")
    (root / "book" / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: chapters/01_views\n")
    return book.build_book(root, browser_check=True)


def test_bertviz_output_is_rewritten_to_vendored_files(tiny_book: Path) -> None:
    html = (tiny_book / "chapters" / "01_views.html").read_text()
    assert "cdnjs" not in html
    assert '"../d3/d3.min"' in html or "'../d3/d3.min'" in html
    assert book.find_external_urls(tiny_book) == []


def test_pages_request_no_other_host(tiny_book: Path) -> None:
    pages = ["intro.html", "chapters/01_views.html"]
    requests = book.browser_requests(tiny_book, pages)
    chapter = [u.split("?")[0] for u in requests["chapters/01_views.html"]]
    assert any(u.endswith("/d3/d3.min.js") for u in chapter), chapter  # the vendored d3 was loaded
    assert any(u.endswith("/jquery/jquery.min.js") for u in chapter), chapter
    assert any(u.endswith("/jupyter-widgets/embed-amd.js") for u in chapter), chapter
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
