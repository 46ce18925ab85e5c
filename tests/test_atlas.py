"""The head atlas: joining per-head tables across chapters, refusing mixed models, the atlas widget."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from headlab import atlas, records, widgets


def _heads(n_layers=2, n_heads=3, **cols):
    grid = pd.DataFrame([(L, H) for L in range(n_layers) for H in range(n_heads)], columns=["layer", "head"])
    return grid.assign(**{k: v(grid) for k, v in cols.items()})


def _write(root, folder, fingerprint="abc", **frames):
    d = root / folder
    records.save_frames(d, **frames)
    (d / "config.json").write_text(json.dumps({"model": {"spec": "m", "fingerprint": fingerprint}}))


def test_join_is_correct_and_missing_measures_are_reported(tmp_path):
    ind = _heads(induction_score=lambda g: g["layer"] * 10 + g["head"], previous_token_score=lambda g: -g["head"])
    ent = _heads(entropy=lambda g: g["layer"] + 0.5 * g["head"], first_token=lambda g: 0 * g["head"])
    ent = ent.sample(frac=1, random_state=0)  # row order must not matter
    _write(tmp_path, "induction", scores=ind)
    _write(tmp_path, "entropy", entropy=ent.iloc[:-1])  # one head absent from this table
    a = atlas.load_atlas(tmp_path)
    assert len(a.table) == 6
    assert a.measures == ["induction_score", "previous_token_score", "entropy", "first_token_mass"]
    row = a.table[(a.table.layer == 1) & (a.table["head"] == 2)].iloc[0]
    assert row.induction_score == 12 and row.previous_token_score == -2
    dropped = ent.iloc[-1]
    gap = a.table[(a.table.layer == dropped["layer"]) & (a.table["head"] == dropped["head"])].iloc[0]
    assert np.isnan(gap.entropy)
    assert a.table.entropy.notna().sum() == 5
    assert set(a.missing.measure) == {"noise_effect", "zero_ablation", "sentiment_r", "instruction_effect",
                                      "gender_effect"}
    assert set(a.missing.chapter) == {"02_noise_perturbation", "04_entropy", "05_gender_bias"}
    assert a.model["fingerprint"] == "abc"
    assert set(a.long.measure) == set(a.measures) and len(a.long) == 6 + 6 + 5 + 5

    atlas.save_atlas(a, tmp_path / "atlas", {"results_root": str(tmp_path)})
    back = pd.read_parquet(tmp_path / "atlas" / "head_atlas.parquet")
    pd.testing.assert_frame_equal(back, a.table, check_dtype=False)
    assert json.loads((tmp_path / "atlas" / "config.json").read_text())["model"]["fingerprint"] == "abc"


def test_different_models_are_refused(tmp_path):
    _write(tmp_path, "induction", "aaa", scores=_heads(induction_score=lambda g: g["head"], previous_token_score=lambda g: g["head"]))
    _write(tmp_path, "entropy", "bbb", entropy=_heads(entropy=lambda g: g["head"], first_token=lambda g: g["head"]))
    with pytest.raises(ValueError, match="different models.*aaa.*bbb"):
        atlas.load_atlas(tmp_path)
    with pytest.raises(ValueError, match="not from model='zzz'"):
        atlas.load_atlas(tmp_path, model="zzz")


def test_duplicate_heads_and_bad_root_are_refused(tmp_path):
    frame = _heads(induction_score=lambda g: g["head"], previous_token_score=lambda g: g["head"])
    _write(tmp_path, "induction", scores=pd.concat([frame, frame.iloc[:1]]))
    with pytest.raises(ValueError, match="L0H0 appears more than once"):
        atlas.load_atlas(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        atlas.load_atlas(tmp_path / "nowhere")


def test_spearman_pairs_and_profile():
    t = _heads(3, 3, a=lambda g: g["layer"] * 3 + g["head"], b=lambda g: -(g["layer"] * 3 + g["head"]))
    t.loc[0, "b"] = np.nan
    rho, n = atlas.spearman_pairs(t)
    assert rho.loc["a", "b"] == pytest.approx(-1.0)
    assert n.loc["a", "a"] == 9 and n.loc["a", "b"] == 8
    prof = atlas.head_profile(t, 2, 2).set_index("measure")
    assert prof.loc["a", "rank"] == 1 and prof.loc["a", "percentile"] == 100
    assert prof.loc["b", "rank"] == 8 and prof.loc["b", "percentile"] == 0
    with pytest.raises(ValueError, match="L5H0"):
        atlas.head_profile(t, 5, 0)


def test_head_atlas_widget_on_tiny_model(tiny_factory):
    from headlab.attention import attention_patterns

    lm = tiny_factory("llama")
    ids = lm.tokenizer("a short text", return_tensors="pt").input_ids
    pats = attention_patterns(lm, ids)[0]
    assert torch.allclose(pats.sum(-1), torch.ones(pats.shape[:-1]), atol=1e-5)
    table = _heads(lm.n_layers, lm.n_heads, induction_score=lambda g: g["head"] * 1.0)
    tokens = lm.tokenizer.convert_ids_to_tokens(ids[0])
    w = widgets.head_atlas(table, pats, tokens, layer=lm.n_layers - 1, head=1)
    layer_box = w.children[0].children[0]
    layer_box.value = 0  # the callback re-slices without errors
    assert layer_box.max == lm.n_layers - 1
    with pytest.raises(ValueError, match="do not fit"):
        widgets.head_atlas(table, pats[:, :, :-1], tokens)


# --------------------------------------------------------------------------------------------------
# Several models
# --------------------------------------------------------------------------------------------------
def _model_root(root, fingerprint, n_layers, n_heads, sign):
    """Results of one model: induction rises with depth; previous-token tracks induction in every model;
    entropy tracks it with ``sign``."""
    ind = _heads(n_layers, n_heads, induction_score=lambda g: g["layer"] * 10.0 + g["head"],
                 previous_token_score=lambda g: g["layer"] * 5.0 + g["head"] * 0.1)
    ent = _heads(n_layers, n_heads, entropy=lambda g: sign * (g["layer"] * 10.0 + g["head"]),
                 first_token=lambda g: 0.0 * g["head"])
    for folder, frames in (("induction", {"scores": ind}), ("entropy", {"entropy": ent})):
        d = root / folder
        records.save_frames(d, **frames)
        (d / "config.json").write_text(json.dumps({"model": {"spec": f"m{fingerprint}", "fingerprint": fingerprint,
                                                             "n_layers": n_layers}}))
    return root


def test_compare_atlases_by_relative_depth_and_agreement(tmp_path):
    a = _model_root(tmp_path / "a", "aaa", n_layers=2, n_heads=3, sign=1.0)
    b = _model_root(tmp_path / "b", "bbb", n_layers=5, n_heads=2, sign=-1.0)
    found = atlas.load_atlases([a, b])
    assert list(found) == ["maaa", "mbbb"]
    cross = atlas.compare_atlases(found, depth_bins=2)
    assert cross.models == ["maaa", "mbbb"]
    lg = cross.long
    assert set(lg.loc[lg.model == "mbbb", "depth"]) == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert set(lg.loc[lg.model == "maaa", "depth"]) == {0.0, 1.0}
    top = lg[(lg.model == "mbbb") & (lg.measure == "induction_score")].sort_values("value")
    assert top["percentile"].iloc[-1] == 1.0 and top["percentile"].is_monotonic_increasing
    prof = cross.depth_profile
    rising = prof[(prof.measure == "induction_score")].sort_values(["model", "depth_bin"])
    for _, g in rising.groupby("model"):  # deeper bins hold the larger induction scores in both models
        assert g["mean_percentile"].is_monotonic_increasing and set(g["depth"]) == {0.25, 0.75}
    assert prof.groupby("model")["n_heads"].sum().to_dict() == {"maaa": 6 * 4, "mbbb": 10 * 4}
    agree = cross.agreement.set_index(["measure_a", "measure_b"])
    both = agree.loc[("induction_score", "previous_token_score")]
    assert both["same_sign"] and both["rho[maaa]"] == pytest.approx(1.0) and both["rho[mbbb]"] == pytest.approx(1.0)
    split = agree.loc[("entropy", "induction_score")]  # pairs are ordered by name
    assert not split["same_sign"] and split["min_rho"] == pytest.approx(-1.0) and split["max_rho"] == pytest.approx(1.0)
    assert split["n_models"] == 2
    assert bool(cross.agreement["same_sign"].iloc[0])  # agreeing pairs come first
    peaks = cross.peaks()
    assert "first_token_mass" not in set(peaks["measure"])  # flat over depth: no peak
    assert set(peaks.loc[peaks.measure == "entropy", "depth_bin"]) == {0, 1}  # rises in one model, falls in the other
    shared = cross.shared_peaks()
    assert list(shared["measure"]) == ["induction_score", "previous_token_score"]
    assert list(shared["depth"]) == [0.75, 0.75]
    import matplotlib.pyplot as plt

    from headlab import plots

    fig = plots.depth_profiles(cross.depth_profile, title="two models")
    assert len([ax for ax in fig.axes if ax.lines]) == len(set(prof["measure"]))
    plt.close(fig)


def test_load_atlases_refuses_the_same_model_twice(tmp_path):
    a = _model_root(tmp_path / "a", "aaa", 2, 3, 1.0)
    b = _model_root(tmp_path / "b", "aaa", 2, 3, 1.0)
    with pytest.raises(ValueError, match="same model"):
        atlas.load_atlases([a, b])
    with pytest.raises(ValueError, match="empty"):
        atlas.load_atlases([])
    with pytest.raises(ValueError, match="depth_bins"):
        atlas.compare_atlases(atlas.load_atlases([a]), depth_bins=0)
