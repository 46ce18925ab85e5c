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


# --------------------------------------------------------------------------------------------------
# Incremental execution (headlab.book.deps, run_chapters)
# --------------------------------------------------------------------------------------------------
# Two tiny chapters named like the real ones, so that READS applies: 02 reads 01's prompt config.
BASELINE = '''\
# %% [markdown]
# # Baseline (tiny)

# %% tags=["parameters"]
threshold: float = 0.5  # the chosen value
results_dir: str = "results/baseline"  # where it writes

# %%
import json
import pathlib

from headlab.progress import Progress

out = pathlib.Path(results_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "prompt_config.json").write_text(json.dumps({"prompt_config": {"threshold": threshold}}))
(out / "summary.json").write_text(json.dumps({"headline": f"threshold **{threshold}**", "n": 3}))
with Progress(3, "tiny loop", unit="item", every=0.0) as bar:
    for _ in range(3):
        bar.update()
'''

NOISE = '''\
# %% [markdown]
# # Noise (tiny)

# %% tags=["parameters"]
prompt_config: str = "results/baseline/prompt_config.json"  # written by the baseline
results_dir: str = "results/noise"  # where it writes

# %%
import json

print("threshold read:", json.load(open(prompt_config))["prompt_config"]["threshold"])
'''


def _tiny_repo(root: Path) -> Path:
    (root / "notebooks").mkdir(parents=True)
    (root / "notebooks" / "01_baseline.py").write_text(BASELINE)
    (root / "notebooks" / "02_noise_perturbation.py").write_text(NOISE)
    return root


def _actions(log: str) -> dict[str, str]:
    """chapter -> 'execute' / 'splice' / 'skip', from the plan lines of the build log."""
    out = {}
    for line in log.splitlines():
        for stem in ("01_baseline", "02_noise_perturbation"):
            for action in ("execute", "splice", "skip"):
                if line.startswith(f"[book] {stem}: {action}"):
                    out[stem] = action
    return out


def test_chapters_rerun_only_when_an_input_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from headlab.book import plan_chapter, run_chapters
    from headlab.book.deps import read_stamp

    root = _tiny_repo(tmp_path)
    chapters = root / "book" / "chapters"

    # 1. first build: both executed; the log shows cells and the loop's progress, not a kernel warning
    assert set(run_chapters(root)) == {"01_baseline", "02_noise_perturbation"}
    log = capsys.readouterr()
    assert _actions(log.out) == {"01_baseline": "execute", "02_noise_perturbation": "execute"}
    assert "01_baseline: cell 2/2 done" in log.out and "tiny loop: 3/3 items" in log.out
    assert "WARNING" not in log.out + log.err
    stamp = read_stamp(chapters / "01_baseline.ipynb")
    assert stamp["summary"]["headline"] == "threshold **0.5**" and len(stamp["cell_seconds"]) == 2
    assert "headlab/progress.py" in stamp["details"]["headlab"]
    assert stamp["details"]["reads"] == {}
    assert list(read_stamp(chapters / "02_noise_perturbation.ipynb")["details"]["reads"]) == [
        "results/baseline/prompt_config.json"]

    # 2. nothing changed: nothing runs
    assert run_chapters(root) == {}
    assert set(_actions(capsys.readouterr().out).values()) == {"skip"}

    # 3. a markdown edit: outputs kept, new text spliced in, nothing executed
    before = json.loads((chapters / "02_noise_perturbation.ipynb").read_text())
    src = root / "notebooks" / "02_noise_perturbation.py"
    src.write_text(NOISE.replace("# # Noise (tiny)", "# # Noise (tiny)\n# A new sentence.")
                   .replace("# %%\nimport json", '# %% tags=["hide-input"]\nimport json'))
    assert run_chapters(root) == {}
    assert _actions(capsys.readouterr().out)["02_noise_perturbation"] == "splice"
    after = json.loads((chapters / "02_noise_perturbation.ipynb").read_text())
    assert "A new sentence." in "".join(after["cells"][0]["source"])
    code = lambda nb: [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["outputs"] for c in code(after)] == [c["outputs"] for c in code(before)]
    assert "hide-input" in code(after)[-1]["metadata"]["tags"]
    assert run_chapters(root) == {}  # and it is now up to date
    assert _actions(capsys.readouterr().out)["02_noise_perturbation"] == "skip"

    # 4. a parameter of 01 changes its results: 01 runs, then 02 because what it reads changed
    assert set(run_chapters(root, parameters={"threshold": 0.7})) == {"01_baseline", "02_noise_perturbation"}
    log = capsys.readouterr().out
    assert "parameters changed: threshold 'default' -> 0.7" in log
    assert "results it reads changed: results/baseline/prompt_config.json (changed)" in log
    assert "0.7" in json.dumps(code(json.loads((chapters / "02_noise_perturbation.ipynb").read_text()))[-1]["outputs"])

    # 5. 01 executed again with the same inputs writes the same prompt config: 02 is not re-run
    assert set(run_chapters(root, ["01_baseline"], {"threshold": 0.7}, force=True)) == {"01_baseline"}
    assert run_chapters(root, parameters={"threshold": 0.7}) == {}
    capsys.readouterr()

    # 6. results rewritten behind the book's back, and a code edit, are both caught
    (root / "results" / "baseline" / "summary.json").write_text(json.dumps({"headline": "other run"}))
    plan = plan_chapter(root / "notebooks" / "01_baseline.py", chapters / "01_baseline.ipynb", root,
                        {"threshold": 0.7})
    assert plan.action == "execute" and "summary.json changed since it ran" in plan.reasons[0]
    src.write_text(src.read_text().replace('print("threshold read:"', 'print("read:"'))
    plan = plan_chapter(src, chapters / "02_noise_perturbation.ipynb", root, {"threshold": 0.7})
    assert (plan.action, plan.reasons) == ("execute", ["its code cells changed"])
    assert plan.last_seconds and len(plan.last_cell_seconds) == 2


def test_headlab_modules_follow_imports_and_ignore_docstrings(tmp_path: Path) -> None:
    from headlab.book.deps import _code_hash, headlab_modules

    pkg = tmp_path / "headlab"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""The package."""\n')
    (pkg / "a.py").write_text('"""A."""\nfrom headlab import b\n')
    (pkg / "b.py").write_text("def f():\n    from .engine import scoring  # lazily\n    return scoring\n")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "engine" / "scoring.py").write_text("X = 1\n")
    (pkg / "unused.py").write_text("Y = 2\n")
    found = headlab_modules("import os\n%matplotlib inline\nfrom headlab import a\n", pkg)
    assert list(found) == ["headlab", "headlab.a", "headlab.b", "headlab.engine", "headlab.engine.scoring"]
    before = _code_hash(pkg / "a.py")
    (pkg / "a.py").write_text('"""A, documented at length."""\n# a comment\nfrom headlab import b\n')
    assert _code_hash(pkg / "a.py") == before
    (pkg / "a.py").write_text('"""A."""\nfrom headlab import b, engine\n')
    assert _code_hash(pkg / "a.py") != before


def test_the_atlas_reads_are_declared_in_reads() -> None:
    from headlab.atlas import MEASURES
    from headlab.book import READS

    declared = {(chapter, name) for chapter, names in READS["08_head_atlas"].items() for name in names}
    needed = {(m.chapter, f"{m.table}.parquet") for m in MEASURES} | {(m.chapter, "config.json") for m in MEASURES}
    assert declared == needed


def test_front_page_lists_each_chapter_with_its_headline(tmp_path: Path) -> None:
    from headlab.book import write_headlines
    from headlab.book.frontpage import headline_text

    chapters = tmp_path / "chapters"
    chapters.mkdir()
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# Noise: which heads?\n", "text"]}],
          "metadata": {"headlab": {"summary": {"headline": "Top head **L3H2** (+0.41 [0.30, 0.52]).",
                                               "executed_at": "x"}, "executed_at": "2025-01-01T00:00:00"}},
          "nbformat": 4, "nbformat_minor": 5}
    (chapters / "02_noise.ipynb").write_text(json.dumps(nb))
    text = write_headlines(tmp_path, ["02_noise", "03_never_run"]).read_text()
    assert "1. {doc}`Noise: which heads? <chapters/02_noise>`: Top head **L3H2** (+0.41 [0.30, 0.52])." in text
    assert "{doc}`03_never_run <chapters/03_never_run>`: no headline numbers recorded yet" in text
    assert headline_text({"n_prompts": 24, "clean_accuracy": 0.79166, "sweep_seconds": 12.0}) == \
        "n prompts 24; clean accuracy 0.792."


def test_progress_lines_go_to_the_progress_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from headlab.progress import PROGRESS_ENV, Progress, track

    target = tmp_path / "progress.log"
    monkeypatch.setenv(PROGRESS_ENV, str(target))
    assert list(track(range(3), "quick", every=3600)) == [0, 1, 2]  # shorter than `every`: silent
    with Progress(4, "sweep", unit="grid point", every=0.0) as bar:
        for _ in range(4):
            bar.update(note="layer=1")
    lines = target.read_text().splitlines()
    assert lines[0].startswith("sweep: 1/4 grid points, 0s elapsed, ETA ") and lines[0].endswith("(layer=1)")
    assert lines[-1] == "sweep: 4/4 grid points, 0s elapsed, done (layer=1)"
    assert capsys.readouterr().err == ""
    monkeypatch.delenv(PROGRESS_ENV)
    with Progress(2, "interactive", every=0.0) as bar:
        bar.update()
    assert capsys.readouterr().err.startswith("interactive: 1/2 steps")


def test_update_summary_adds_the_headline_to_the_chapter_numbers(tmp_path: Path) -> None:
    from headlab.records import update_summary, write_summary

    write_summary(tmp_path, n_prompts=24, top_head="L3H2")
    update_summary(tmp_path, headline="Top head L3H2.", n_prompts=25)
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "n_prompts": 25, "top_head": "L3H2", "headline": "Top head L3H2."}
    with pytest.raises(TypeError, match="headline"):
        update_summary(tmp_path, headline=["not", "a", "scalar"])


def test_a_quiet_cell_is_named_while_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headlab.book import execute
    from headlab.book.execute import execute_chapter

    monkeypatch.setattr(execute, "HEARTBEAT_SECONDS", 0.8)
    src = tmp_path / "01_quiet.py"
    src.write_text('# %% tags=["parameters"]\nnap: float = 2.5  # seconds\n\n# %%\nimport time\n\ntime.sleep(nap)\n')
    lines: list[str] = []
    execute_chapter(src, tmp_path / "out", report=lines.append, previous_cell_seconds=[0.0, 3.0])
    running = [line for line in lines if "running for" in line]
    assert running and running[-1].startswith("cell 2/2 running for ") and "(import time)" in running[-1]
    assert "it took 3s last time" in running[-1]
    assert all(line.startswith(("starting the kernel", "cell 1/2", "cell 2/2")) for line in lines)
    assert lines[-1].startswith("cell 2/2 done in ")


def test_build_stops_when_executed_prose_states_an_unproduced_number(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """build_book runs the prose check after execution, before vendoring and Jupyter Book."""
    import nbformat

    from headlab.book import build

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_x.py").write_text("# %%\nppl = 445.27\n")
    chapters = tmp_path / "book" / "chapters"
    chapters.mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("print(ppl)", execution_count=1)
    code.outputs = [nbformat.v4.new_output("stream", text="445.27\n")]
    nb.cells = [code, nbformat.v4.new_markdown_cell("Perplexity 445; accuracy sits near 50%.")]
    nbformat.write(nb, chapters / "01_x.ipynb")
    monkeypatch.setattr(build, "run_chapters", lambda *a, **k: {})
    monkeypatch.setattr(build, "vendor_js", lambda *a, **k: pytest.fail("vendoring ran before the prose check"))
    with pytest.raises(RuntimeError, match=r"(?s)3 statement.*'50%'.*'sits near'"):
        build.build_book(tmp_path)
    nb.cells[1].source = "Perplexity 445 (the run above)."
    nbformat.write(nb, chapters / "01_x.ipynb")
    with pytest.raises(pytest.fail.Exception, match="vendoring"):
        build.build_book(tmp_path)
