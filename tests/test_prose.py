"""Prose in the chapters is backed by the run: the static check over notebooks/*.py (every chapter, in
`make test`), the check of an executed notebook (the book build), and the rules behind both on
small texts, including the two fixed statements the check was written for."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from headlab.book import prose

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("*.py"))


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_prose_states_no_fixed_results(chapter):
    problems = prose.check_source(chapter)
    assert not problems, "\n".join(map(str, problems))


def _chapter(tmp_path, markdown: str, code: str = "x = 1") -> Path:
    path = tmp_path / "chapter.py"
    path.write_text(f"# %%\n{code}\n\n# %% [markdown]\n" + "".join(f"# {line}\n" for line in markdown.splitlines()))
    return path


@pytest.mark.parametrize("text", [
    # the fixed statements of 01_baseline and 02_noise_perturbation this check was written for
    ("The argmax accuracy of several configurations sits near 50% although their ROC-AUC is far above 0.5:\n"
     "the model ranks the reviews well but puts most probability on one label."),
    ("Accuracy on a few dozen prompts moves in steps of one prompt, so most heads land in LOW even when the\n"
     "logit difference moves clearly."),
    "Magnitude pruning reaches perplexity 445 against Wanda's 61 at half sparsity.",
])
def test_fixed_result_statements_fail(tmp_path, text):
    assert prose.check_source(_chapter(tmp_path, text))


def test_numbers_in_code_definitions_and_markers_pass(tmp_path):
    text = ("Wanda (Sun et al. 2023) and the super weight (Yu et al. (2024)) on GPT-2, layer L12, Q4_1 weights,\n"
            "16-bit floats, $W_{12}$ and `n_2`; `sparsities` up to 70%.\n"
            "Chance accuracy is 50%. <!-- prose-ok: 50% (two balanced labels, a definition) -->")
    assert prose.check_source(_chapter(tmp_path, text, code="sparsities = [0.1, 0.7]")) == []
    assert prose.check_source(_chapter(tmp_path, "Chance accuracy is 50%.", code="sparsities = [0.1, 0.7]"))


def test_marker_needs_a_reason_and_allows_phrases(tmp_path):
    assert prose.check_source(_chapter(tmp_path, "Chance is 50%. <!-- prose-ok: 50% -->"))[0].text == "prose-ok"
    with pytest.raises(ValueError, match="reason"):
        prose.allowances("<!-- prose-ok: 50% () -->")
    assert prose.allowances('<!-- prose-ok: 4 "most super weights" (the paper\'s table) -->') == (
        {"4"}, {"most super weights"})
    ok = 'In the paper most super weights lie in layer 4. <!-- prose-ok: 4 "most super weights" "lie in" (paper) -->'
    assert prose.check_source(_chapter(tmp_path, ok)) == []


def test_markdown_numbers_skip_identifiers_math_citations_and_lists():
    text = ("## 2. Pruning\n1. first item with 3 heads\n- GPT-2, SHA-256, float32, 16-bit, L5H3\n"
            "$x_{10}$ `k=4` (Vig 2019) 4,863 reviews, 10-70% sparsity, 3x larger, -0.25 nats")
    assert prose.markdown_numbers(text) == ["3", "4,863", "10-70%", "3x", "0.25"]


def test_claims_leave_headings_and_superlatives_alone():
    assert prose.claims("## What we saw\nThe most differential heads are ranked first.") == []
    assert prose.claims("Most heads land in LOW.") == ["Most heads", "land in"]


def _executed(tmp_path, markdown: str, outputs: list) -> Path:
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("ppl = run()")
    code.outputs = outputs
    nb.cells = [code, nbformat.v4.new_markdown_cell(markdown)]
    path = tmp_path / "chapter.ipynb"
    nbformat.write(nb, path)
    return path


def test_executed_notebook_numbers_must_come_from_outputs(tmp_path):
    out = [nbformat.v4.new_output("stream", text="perplexity 445.27, accuracy 0.503\n"),
           nbformat.v4.new_output("display_data", data={"text/markdown": "Wanda **61.04**"})]
    assert prose.check_executed(_executed(tmp_path, "Magnitude 445 vs Wanda 61.0; accuracy 50%.", out)) == []
    problems = prose.check_executed(_executed(tmp_path, "Magnitude 446 vs Wanda 61; accuracy 51%.", out))
    assert [p.text for p in problems] == ["446", "51%"]
    assert "does not produce" in str(problems[0])


def test_require_backed_prose_skips_unexecuted_and_names_problems(tmp_path):
    out = [nbformat.v4.new_output("stream", text="perplexity 445.27\n")]
    path = _executed(tmp_path, "Magnitude 446; most heads land in LOW.", out)
    prose.require_backed_prose(tmp_path)  # no executed code cell: a chapter only converted, skipped
    nb = nbformat.read(path, as_version=4)
    nb.cells[0].execution_count = 1
    nbformat.write(nb, path)
    with pytest.raises(RuntimeError, match="3 statement") as err:
        prose.require_backed_prose(tmp_path)
    assert "'446'" in str(err.value) and "'most heads'" in str(err.value)
