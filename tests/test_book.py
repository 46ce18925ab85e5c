"""Tests of the offline book pipeline (headlab.book): fast, CPU only, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from headlab.book import (
    check_offline,
    find_external_urls,
    find_missing_assets,
    to_notebook,
)
from headlab.params import parse_value

LOADING_PAGE = """<!DOCTYPE html>
<html><head>
<script src="https://cdn.example.org/lib.js"></script>
<link rel="stylesheet" href="//cdn.example.org/style.css">
<link rel="preload" as="font" href="https://fonts.example.org/f.woff2">
<link rel="icon" href="http://icons.example.org/favicon.ico">
<style>
  @import "https://css.example.org/imported.css";
  body { background: url('https://img.example.org/bg.png'); }
</style>
<script>
  require.config({paths: {d3: 'https://cdnjs.example.org/ajax/libs/d3/5.7.0/d3.min',
                          jquery: "//ajax.example.org/jquery.min"}});
</script>
</head><body>
<img src="https://img.example.org/cat.png" alt="">
<img srcset="local.png 1x, https://img.example.org/cat@2x.png 2x" alt="">
<iframe src="https://frame.example.org/embed"></iframe>
<div style="background-image: url(https://img.example.org/inline.png)"></div>
</body></html>
"""

OFFLINE_PAGE = """<!DOCTYPE html>
<html><head>
<link rel="canonical" href="https://headlab.example.org/intro.html">
<link rel="stylesheet" href="_static/theme.css">
<script src="../_static/../require.js?v=1234"></script>
<script src="_static/app.js"></script>
<script>var link = "see the docs"; var path = "a//b";</script>
<style>/* @import url('https://fonts.example.org/commented-out.css'); */
  .x { background: url("_static/local.png"); }
  .y { background: url(data:image/png;base64,iVBORw0KGgo=); }</style>
</head><body>
<a href="https://papermill.readthedocs.io">papermill</a>
<a href="//example.org/scheme-relative-link">also a link</a>
<img src="_images/fig.png" alt=""><img src="data:image/png;base64,iVBORw0KGgo=" alt="">
</body></html>
"""


def _site(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_loads_from_other_hosts_are_flagged(tmp_path: Path) -> None:
    site = _site(tmp_path, {"page.html": LOADING_PAGE})
    urls = {url for file, url in find_external_urls(site) if file == "page.html"}
    assert urls == {
        "https://cdn.example.org/lib.js",
        "//cdn.example.org/style.css",
        "https://fonts.example.org/f.woff2",
        "http://icons.example.org/favicon.ico",
        "https://css.example.org/imported.css",
        "https://img.example.org/bg.png",
        "https://cdnjs.example.org/ajax/libs/d3/5.7.0/d3.min",
        "//ajax.example.org/jquery.min",
        "https://img.example.org/cat.png",
        "https://img.example.org/cat@2x.png",
        "https://frame.example.org/embed",
        "https://img.example.org/inline.png",
    }


def test_links_relative_paths_and_data_uris_are_not_flagged(tmp_path: Path) -> None:
    site = _site(tmp_path, {"intro.html": OFFLINE_PAGE, "chapters/ch.html": OFFLINE_PAGE})
    assert find_external_urls(site) == []
    check_offline(site)  # does not raise


def test_css_and_js_files_are_scanned(tmp_path: Path) -> None:
    site = _site(
        tmp_path,
        {
            "_static/theme.css": "/* url(https://x.example.org/comment.png) */\n"
            "@import url('https://fonts.example.org/css');\n"
            ".a { background: url(../img/a.png); }\n",
            "_static/app.js": 'var s = document.createElement("script");\n'
            's.src = "https://cdn.example.org/x.js";\n'
            "/* see 'https://docs.example.org/in-a-comment' */\n"
            "var ns = 'http://www.w3.org/2000/svg';\n",
            # The inert-constant allowlist is scoped to the vendored file it was written for.
            "jupyter-widgets/embed-amd.js": "var cdn = 'https://cdn.jsdelivr.net/npm/';",
            "other/lib.js": "var cdn = 'https://cdn.jsdelivr.net/npm/';",
            "searchindex.js": 'Search.setIndex({"titles": ["https://not.a.load.example.org"]})',
        },
    )
    assert find_external_urls(site) == [
        ("_static/app.js", "https://cdn.example.org/x.js"),
        ("_static/theme.css", "https://fonts.example.org/css"),
        ("other/lib.js", "https://cdn.jsdelivr.net/npm/"),
    ]


def test_embed_amd_needs_a_local_widget_cdn(tmp_path: Path) -> None:
    default = '<script src="../jupyter-widgets/embed-amd.js?v=1"></script>'
    local = '<script data-jupyter-widgets-cdn="./no-cdn/" src="../jupyter-widgets/embed-amd.js"></script>'
    site = _site(tmp_path, {"a.html": default, "b.html": local})
    assert find_external_urls(site) == [("a.html", "https://cdn.jsdelivr.net/npm/")]


def test_check_offline_lists_every_offender(tmp_path: Path) -> None:
    site = _site(tmp_path, {"page.html": LOADING_PAGE})
    with pytest.raises(RuntimeError, match="12 external load") as info:
        check_offline(site)
    assert "page.html: https://frame.example.org/embed" in str(info.value)


def test_missing_local_assets_depend_on_page_depth(tmp_path: Path) -> None:
    page = '<script src="../_static/../require.js"></script><link rel="stylesheet" href="_static/a.css">'
    files = {"require.js": "", "_static/a.css": "", "chapters/ch.html": page, "top.html": page}
    site = _site(tmp_path, files)
    assert find_missing_assets(site) == [
        ("chapters/ch.html", "_static/a.css"),
        ("top.html", "../_static/../require.js"),
    ]


def test_to_notebook_sets_kernelspec_and_keeps_parameters_tag(tmp_path: Path) -> None:
    pytest.importorskip("jupytext")
    src = tmp_path / "chapter.py"
    src.write_text(
        "# %% [markdown]\n"
        "# # A chapter\n"
        "# $H = -\\sum_j p_j \\log p_j$\n"
        "\n"
        '# %% tags=["parameters"]\n'
        "n_prompts = 4\n"
        "\n"
        "# %%\n"
        "print(n_prompts)\n"
    )
    dst = to_notebook(src, tmp_path / "out" / "chapter.ipynb")
    assert dst == tmp_path / "out" / "chapter.ipynb"
    nb = json.loads(dst.read_text())
    assert nb["metadata"]["kernelspec"] == {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    cells = nb["cells"]
    assert [c["cell_type"] for c in cells] == ["markdown", "code", "code"]
    tagged = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1
    assert "".join(tagged[0]["source"]).strip() == "n_prompts = 4"


@pytest.mark.parametrize(
    ("text", "value"),
    [("3", 3), ("0.5", 0.5), ("true", True), ("False", False), ("None", None), ("gpt2", "gpt2")],
)
def test_parameter_values_are_typed_like_papermill(text: str, value: object) -> None:
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)
