"""headlab.figures: what the static interactive figures embed (the browser side is tested in
tests/test_book_browser.py), and the JupyterLab sweep explorer's menus."""

from __future__ import annotations

import base64
import json
import re
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from headlab import figures, widgets
from headlab.atlas import head_profile


def _sweep_tables(n_layers: int = 3, n_heads: int = 2, n_prompts: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    heads, prompts = [], []
    for mode, levels, seeds in [("fraction_of_std", [1.0, 3.0], [0, 1]), ("zero", [0.0], [0])]:
        for level in levels:
            for seed in seeds:
                for layer in range(n_layers):
                    for head in range(n_heads):
                        change = rng.normal(size=n_prompts) + layer
                        heads.append(dict(mode=mode, level=level, seed=seed, layer=layer, head=head,
                                          logit_diff_drop=-change.mean(), accuracy_drop=0.1 * layer,
                                          macro_f1_drop=0.0, p_correct_drop=0.0))
                        prompts += [dict(mode=mode, level=level, seed=seed, layer=layer, head=head, prompt=p,
                                         logit_diff_change=c) for p, c in enumerate(change)]
    return pd.DataFrame(heads), pd.DataFrame(prompts)


def _data(fig: figures.Figure) -> dict:
    html = fig.to_html()
    match = re.search(r'<script type="application/json" id="(hlf-[0-9a-f]+)-data">(.*?)</script>', html, re.DOTALL)
    assert match and f'id="{match.group(1)}"' in html and f'mount("{match.group(1)}")' in html
    return json.loads(match.group(2).replace("<\\/", "</"))


def test_sweep_figure_offers_every_setting_seed_and_mean_with_intervals() -> None:
    heads, prompts = _sweep_tables()
    data = _data(figures.sweep_explorer(heads, prompts, n_boot=50))
    keys = [(v["mode"], v["level"], v["seed"]) for v in data["views"]]
    assert keys == [("fraction_of_std", 1.0, "mean over seeds"), ("fraction_of_std", 1.0, 0),
                    ("fraction_of_std", 1.0, 1), ("fraction_of_std", 3.0, "mean over seeds"),
                    ("fraction_of_std", 3.0, 0), ("fraction_of_std", 3.0, 1), ("zero", 0.0, 0)]
    assert data["init"] == {"mode": "fraction_of_std", "level": 1.0, "seed": "mean over seeds",
                            "metric": "logit_diff_drop"}
    seed1 = data["views"][2]
    sel = heads[(heads["level"] == 1.0) & (heads["seed"] == 1) & (heads["mode"] == "fraction_of_std")]
    row = sel[(sel["layer"] == 2) & (sel["head"] == 1)].iloc[0]
    i = 2 * 2 + 1  # layer-major
    assert seed1["values"]["logit_diff_drop"][i] == pytest.approx(row["logit_diff_drop"], rel=1e-3)
    assert seed1["low"]["logit_diff_drop"][i] < seed1["values"]["logit_diff_drop"][i] < seed1["high"]["logit_diff_drop"][i]
    mean = data["views"][0]["values"]["accuracy_drop"]
    assert mean[i] == pytest.approx(0.2)


def test_patterns_are_packed_as_bytes_of_the_causal_triangle() -> None:
    s = 5
    pats = torch.rand(2, 3, s, s).masked_fill(~torch.ones(s, s).tril().bool(), float("-inf")).softmax(-1)
    tokens = list("abcde")
    data = _data(figures.pattern_explorer({"t": pats}, {"t": tokens}, layer=1, head=2, notes={(1, 2): "n"}))
    raw = np.frombuffer(zlib.decompress(base64.b64decode(data["texts"][0]["patterns"])), dtype=np.uint8)
    assert raw.size == 2 * 3 * s * (s + 1) // 2
    tri = raw.reshape(2, 3, -1)[1, 2] / 255  # layer 1, head 2, rows of the lower triangle
    rows, cols = np.tril_indices(s)
    assert np.abs(tri - pats[1, 2].numpy()[rows, cols]).max() <= 0.5 / 255 + 1e-6
    assert data["notes"] == {"1,2": "n"} and data["init"] == {"text": "t", "layer": 1, "head": 2}
    with pytest.raises(ValueError, match="out of range"):
        figures.pattern_explorer({"t": pats}, {"t": tokens}, layer=2)


def test_atlas_figure_ranks_like_head_profile() -> None:
    rng = np.random.default_rng(1)
    table = pd.DataFrame([dict(layer=l, head=h, a=float(rng.normal()), b=float(rng.uniform()))
                          for l in range(3) for h in range(2)])
    table.loc[4, "b"] = np.nan
    pats = torch.full((3, 2, 4, 4), 0.25)
    data = _data(figures.head_atlas(table, pats, list("wxyz"), layer=1, head=1))
    profile = head_profile(table, 1, 1).set_index("measure")
    i = 1 * 2 + 1
    for m in ("a", "b"):
        assert data["ranks"][m][i] == profile.loc[m, "rank"] and data["counts"][m] == profile.loc[m, "of"]
    assert data["values"]["b"][4] is None and data["ranks"]["b"][4] is None


def test_neuron_figure_shares_one_token_table() -> None:
    cards = [dict(layer=0, neuron=n, note="n", examples=[dict(activation=1.0, tokens=[(" a", 0.5, 0), (" b", 1.0, 1)])],
                  promoted=[(" a", 2.0)], suppressed=[(" c", -1.0)]) for n in (3, 4)]
    data = _data(figures.neuron_explorer(cards, layer=0, neuron=4))
    assert data["vocab"] == [" a", " b", " c"] and data["init"] == {"layer": 0, "neuron": 4}
    assert data["cards"][1]["examples"][0]["tokens"] == [[0, 0.5, 0], [1, 1.0, 1]]
    with pytest.raises(ValueError, match="not among the cards"):
        figures.neuron_explorer(cards, layer=1, neuron=3)


def test_show_picks_the_widget_only_with_a_frontend(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    fig = figures.pattern_explorer({"t": torch.ones(1, 1, 1, 1)}, {"t": ["a"]})
    monkeypatch.setattr(figures, "has_frontend", lambda: False)
    figures.show(fig, widget=lambda: "widget")
    monkeypatch.setattr(figures, "has_frontend", lambda: True)
    figures.show(fig, widget=lambda: "widget")
    figures.show(fig)
    assert shown == [fig, "widget", fig]
    monkeypatch.undo()
    monkeypatch.setenv(figures.HEADLESS_ENV, "1")
    assert not figures.has_frontend()  # papermill under headlab book / run / grid


def test_sweep_widget_menus_start_filled() -> None:
    heads, _ = _sweep_tables()
    box = widgets.sweep_explorer(heads)
    (mode, level), (seed, _metric) = box.children[0].children, box.children[1].children
    assert (level.options, level.value, seed.value) == ((1.0, 3.0), 1.0, "mean over seeds")
    mode.value = "zero"
    assert (level.options, level.value, seed.options) == ((0.0,), 0.0, ("mean over seeds", 0))
