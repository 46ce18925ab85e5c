"""headlab.chapter: the parameters rule (source and kernel side), loading, "what we saw" formatting."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from headlab import chapter, grid
from headlab.metrics import CI
from headlab.models import load_model

from conftest import build_tiny

CELL = '''\
model: str = "smollm2-135m"  # a comment = with a second equals sign
n: int = 3
levels: list = [0.5, 1.0]
derived: float = 2 ** 0.5  # not a literal: returned as source text
'''


def test_parameters_from_source_reads_annotated_assignments_in_order():
    assert chapter.parameters_from_source(CELL) == {
        "model": "smollm2-135m", "n": 3, "levels": [0.5, 1.0], "derived": "2 ** 0.5"}


def test_unannotated_parameter_is_refused_with_its_name():
    with pytest.raises(ValueError, match=r"assigns n_layers without a type annotation; write `name: type = value`"):
        chapter.parameters_from_source(CELL + "n_layers = 4\n", "the cell")


def test_grid_uses_the_same_rule(tmp_path: Path):
    nb = tmp_path / "ch.py"
    nb.write_text('# %% tags=["parameters"]\n' + CELL + "\n# %%\nx = 1\n")
    assert grid.chapter_parameters(nb) == chapter.declared_parameters(nb) == chapter.parameters_from_source(CELL)
    nb.write_text('# %% tags=["parameters"]\na: int = 1\nb = 2\n')
    with pytest.raises(ValueError, match="parameters cell of ch.py assigns b without"):
        grid.chapter_parameters(nb)


def test_parameters_reads_annotations_with_current_values():
    ns: dict = {}
    exec(CELL + "n = 7  # papermill's injected cell: a plain assignment\nhelper = 1\n", ns)
    assert chapter.parameters(ns) == {"model": "smollm2-135m", "n": 7, "levels": [0.5, 1.0], "derived": 2 ** 0.5}
    with pytest.raises(ValueError, match="no annotated globals"):
        chapter.parameters({"x": 1})


def test_every_chapter_declares_only_annotated_parameters():
    for nb in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.py")):
        declared = chapter.declared_parameters(nb)
        assert "model" in declared and "results_dir" in declared, nb.name


def test_load_resolves_auto_and_sets_threads(tokenizer, tmp_path: Path):
    lm = build_tiny("llama", tokenizer)
    lm.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    before = torch.get_num_threads()
    try:
        loaded = chapter.load({"model": str(tmp_path), "device": "auto", "dtype": "auto", "device_map": "",
                               "torch_threads": 1}, attn_implementation="sdpa")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loaded.device.type == expected and loaded.model.config._attn_implementation == "sdpa"
    assert load_model(tmp_path, device="auto").device.type == expected
    ids = torch.tensor([[1, 5, 9, 12]])
    torch.testing.assert_close(loaded.model(ids).logits, lm.model(ids).logits)


def test_what_we_saw_helpers():
    frame = pd.DataFrame({"layer": [5, 2], "head": [3, 0], "effect": [0.8123, -0.1],
                          "effect_low": [0.75, -0.2], "effect_high": [0.87, 0.0]})
    assert chapter.head_label(5, 3) == "L5H3"
    assert chapter.fmt_ci(0.8123, 0.75, 0.87) == "0.812 [0.750, 0.870]"
    assert chapter.fmt_ci(1.5, -1, 2, "+.1f") == "+1.5 [-1.0, +2.0]"
    assert chapter.fmt_ci(CI(0.5, 0.25, 0.75)) == "0.500 [0.250, 0.750]"
    report = pd.DataFrame({"metric": ["accuracy"], "value": [0.5], "ci_low": [0.25], "ci_high": [0.75]})
    assert chapter.fmt_ci(report.set_index("metric").loc["accuracy"], fmt=".2f") == "0.50 [0.25, 0.75]"
    assert chapter.fmt_ci({"value": 1, "low": 0, "high": 2}, fmt=".0f") == "1 [0, 2]"
    assert chapter.head_list(frame, "effect", ci=True, fmt=".2f") == "L5H3 (0.81 [0.75, 0.87]), L2H0 (-0.10 [-0.20, 0.00])"
    assert chapter.head_list(frame, "effect", n=1) == "L5H3 (0.812)"
    assert chapter.bullets(["a", None, "", "b"]).data == "- a\n- b"


def test_depth_layers_defaults_follow_the_depth_and_bad_layers_are_named():
    assert chapter.depth_layers(30) == [2, 15, 28]
    assert chapter.depth_layers(2) == [0, 1]
    assert chapter.depth_layers(12, []) == [0, 6, 10]
    assert chapter.depth_layers(30, [28, 2, 2]) == [2, 28]
    with pytest.raises(ValueError, match=r"ablation_layers = \[2, 28\] names \[28\].*0-23"):
        chapter.depth_layers(24, [2, 28], "ablation_layers")
    with pytest.raises(ValueError, match="names"):
        chapter.depth_layers(30, [1.5])
