"""The generic set-ablation sweep with a synthetic scorer whose answer is known, and the top-vs-random
comparison (permutation p-value, band, verdict) on synthetic set values. No model is needed: the
model-backed sweeps are tested in test_induction.py, test_neurons.py and test_attention_patterns.py."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from headlab import ablation

ITEM_WEIGHT = np.array([1.0, 2.0, 3.0])  # item i is hurt ITEM_WEIGHT[i] times the set's total weight


def _pool(weights: dict[tuple[int, int], float], exclude_top: bool = False) -> ablation.Pool:
    units = tuple(sorted(weights))
    return ablation.Pool(units, tuple(weights[u] for u in units), stream="synthetic", exclude_top=exclude_top)


def _weights(n_layers: int = 2, n_units: int = 6) -> dict[tuple[int, int], float]:
    rng = np.random.default_rng(0)
    return {(layer, i): float(rng.uniform(0, 1)) for layer in range(n_layers) for i in range(n_units)}


class Harm:
    """Scorer: ``harm`` of item i = ITEM_WEIGHT[i] * total weight of the ablated units (x2 in "mean" mode),
    so the clean model scores 0 and every set's value is known. Counts its calls."""

    def __init__(self, weights, die_after: int | None = None):
        self.weights, self.die_after, self.calls = weights, die_after, []

    def __call__(self, mode, members):
        self.calls.append((mode, ablation.members_label(members)))
        if self.die_after is not None and len(self.calls) > self.die_after:
            raise KeyboardInterrupt  # killed midway
        total = sum(self.weights[(layer, i)] for layer, idx in members.items() for i in idx)
        return {"harm": ITEM_WEIGHT * total * (2 if mode == "mean" and members else 1)}


def _sweep(score, pools, out, **kw):
    grid = {"key": {"what": "synthetic"}, "items": pd.DataFrame({"weight": ITEM_WEIGHT}), "pool_column": "pool",
            "modes": ("zero", "mean"), "k_list": (0, 1, 3), "n_random": 4, "seed": 0, "perm_chunk": 3,
            "progress": False}
    return ablation.set_ablation_sweep(score, pools, out, **{**grid, **kw})


def _total(weights, label: str) -> float:
    return sum(weights[(int(u[1:].split("H")[0]), int(u.split("H")[1]))] for u in label.split())


def test_generic_sweep_gives_the_known_values(tmp_path):
    w = _weights()
    pools = {"all": _pool(w), "layer 1": _pool({u: v for u, v in w.items() if u[0] == 1})}
    harm = Harm(w)
    rows = _sweep(harm, pools, tmp_path)
    assert list(rows.columns) == ["mode", "pool", "set_type", "k", "permutation", "sequence", "weight", "harm",
                                  "harm_change", "members"]
    # 2 modes x 2 pools x (top: 3 k + random: k=0 once, k=1 and k=3 four sets each) x 3 items
    assert len(rows) == 2 * 2 * (3 + 1 + 4 + 4) * 3
    factor = np.where(rows["mode"] == "mean", 2.0, 1.0)
    want = rows["weight"] * factor * rows["members"].map(lambda m: _total(w, m))
    np.testing.assert_allclose(rows["harm"], want)
    np.testing.assert_allclose(rows["harm_change"], rows["harm"])  # the clean model scores 0
    assert (rows.loc[rows["k"] == 0, "harm"] == 0).all() and (rows.loc[rows["k"] == 0, "members"] == "").all()
    top3 = rows[(rows["set_type"] == "top") & (rows["k"] == 3) & (rows["pool"] == "all")]["members"].iloc[0]
    assert sorted(top3.split()) == sorted(f"L{a}H{b}" for a, b in sorted(w, key=w.get, reverse=True)[:3])
    top1_layer1 = rows[(rows["set_type"] == "top") & (rows["k"] == 1) & (rows["pool"] == "layer 1")]
    assert top1_layer1["members"].iloc[0] == "L1H{}".format(max((i for (a, i) in w if a == 1),
                                                                 key=lambda i: w[(1, i)]))
    # the clean model is scored once; a set met twice (same mode) is scored once
    assert [c for c in harm.calls if c[1] == ""] == [("zero", "")]
    assert len(harm.calls) == len({c if c[1] else ("clean", "") for c in harm.calls})


def test_random_draws_do_not_depend_on_the_grid(tmp_path):
    w = _weights()
    pools = {"all": _pool(w)}

    def draws(rows):
        r = rows[(rows["set_type"] == "random") & (rows["k"] == 3) & (rows["mode"] == "zero")]
        return r.groupby("permutation")["members"].first().to_dict()

    base = draws(_sweep(Harm(w), pools, tmp_path / "a"))
    other = draws(_sweep(Harm(w), pools, tmp_path / "b", k_list=(3, 5), n_random=6, perm_chunk=1,
                         set_types=("random",), modes=("zero",)))
    assert base == {p: other[p] for p in base} and len(set(other.values())) > 3
    assert draws(_sweep(Harm(w), pools, tmp_path / "c", seed=1)) != base


def test_generic_sweep_resumes_to_the_same_table(tmp_path):
    w = _weights()
    pools = {"all": _pool(w), "layer 1": _pool({u: v for u, v in w.items() if u[0] == 1})}
    full = _sweep(Harm(w), pools, tmp_path / "a")
    n_shards = len(list((tmp_path / "a").glob("*.json")))
    with pytest.raises(KeyboardInterrupt):
        _sweep(Harm(w, die_after=6), pools, tmp_path / "b")
    assert 0 < len(list((tmp_path / "b").glob("*.json"))) < n_shards
    again = Harm(w)
    resumed = _sweep(again, pools, tmp_path / "b")
    pd.testing.assert_frame_equal(resumed, full)
    assert len(list((tmp_path / "b").glob("*.json"))) == n_shards
    assert _sweep(Harm(w, die_after=0), pools, tmp_path / "b").equals(full)  # all saved: nothing is scored


def test_generic_sweep_rejects_bad_input(tmp_path):
    w = _weights()
    pools = {"all": _pool(w, exclude_top=True)}
    for override, match in [({"modes": ("noise",)}, "mode"), ({"set_types": ("best",)}, "set type"),
                            ({"k_list": (0, 7)}, "k=7 exceeds the largest random set \\(6\\)"),
                            ({"k_list": (-1,)}, "integer"), ({"n_random": 0}, "n_random"),
                            ({"pool_column": "k"}, "clashes")]:
        with pytest.raises(ValueError, match=match):
            _sweep(Harm(w), pools, tmp_path, **override)
    with pytest.raises(ValueError, match=r"\(3,\) array"):
        _sweep(lambda mode, members: {"harm": np.zeros(2)}, pools, tmp_path)
    assert not list(tmp_path.glob("*.parquet"))
    with pytest.raises(ValueError, match="sorted"):
        ablation.Pool(((1, 0), (0, 0)), (0.0, 1.0), stream="s")


def test_top_vs_random_on_a_sweep_with_a_known_answer(tmp_path):
    """Two heavy units among light ones: the top-2 set hurts more than every random set of two."""
    w = {(0, i): (10.0 if i in (3, 7) else 0.1 * i / 20) for i in range(20)}
    rows = _sweep(Harm(w), {"all": _pool(w, exclude_top=True)}, tmp_path, k_list=(0, 2), n_random=99, perm_chunk=50)
    vs = ablation.top_vs_random(rows, {"harm": "greater", "harm_change": "greater"}, by=("mode", "pool", "k"))
    assert list(vs.columns) == ["mode", "pool", "k", "measure", "alternative", "top", "top_low", "top_high",
                                "random_mean", "random_low", "random_high", "band", "difference", "p_value",
                                "p_resolution", "n_random_sets", "n_items", "verdict"]
    assert len(vs) == 2 * 2 and (vs["k"] == 2).all()
    zero = vs[(vs["mode"] == "zero") & (vs["measure"] == "harm")].iloc[0]
    assert zero["top"] == pytest.approx(20.0 * ITEM_WEIGHT.mean())
    assert zero["top_low"] <= zero["top"] <= zero["top_high"] and zero["n_items"] == 3
    assert zero["p_value"] == pytest.approx(0.01) and zero["p_resolution"] == pytest.approx(0.01)
    assert zero["random_high"] < zero["top"] and zero["n_random_sets"] == 99
    assert zero["verdict"] == "top set higher than random (p = 0.01, 99 random sets)"
    assert zero["band"] == "central 95% of 99 random sets"


# --------------------------------------------------------------------------------------------------
# The comparison on synthetic set values
# --------------------------------------------------------------------------------------------------
def test_random_sets_needed_for_a_band():
    assert ablation.random_sets_needed(0.95) == 39  # the range of 39 sets covers 38/40 = 95%
    assert ablation.random_sets_needed(0.9) == 19 and ablation.random_sets_needed(0.99) == 199
    with pytest.raises(ValueError, match="level"):
        ablation.random_sets_needed(1.0)


def test_clearly_worse_top_set_is_called_so():
    rnd = np.random.default_rng(0).normal(0.5, 0.05, 99)  # e.g. p(correct) under 99 random sets
    r = ablation.compare_to_random(0.1, rnd, "less")
    assert r["p_value"] == pytest.approx(1 / 100) and r["p_resolution"] == pytest.approx(1 / 100)
    assert r["verdict"] == "top set lower than random (p = 0.01, 99 random sets)"
    assert r["random_low"] == pytest.approx(np.quantile(rnd, 0.025))
    assert r["difference"] == pytest.approx(0.1 - rnd.mean())
    # the same top set in the other direction is not special
    assert ablation.compare_to_random(0.1, rnd, "greater")["verdict"].startswith("not distinguishable")


def test_identical_distributions_are_not_distinguishable():
    rng = np.random.default_rng(1)
    rnd = rng.normal(size=99)
    r = ablation.compare_to_random(float(np.median(rnd)), rnd, "two-sided")
    assert r["verdict"] == f"not distinguishable from random (p = {r['p_value']:.2g}, 99 random sets)"
    # a top set drawn like the random ones is called special about 5% of the time (a valid test)
    p = np.array([ablation.compare_to_random(rng.normal(), rng.normal(size=99), "less")["p_value"]
                  for _ in range(400)])
    assert 0.02 <= (p <= 0.05).mean() <= 0.09


def test_two_sided_compares_sizes_of_the_change():
    rnd = np.linspace(-1, 1, 99)
    up, down = (ablation.compare_to_random(t, rnd, "two-sided") for t in (3.0, -3.0))
    assert up["p_value"] == down["p_value"] == pytest.approx(0.01)
    assert up["verdict"].startswith("top set larger in size than random")
    # 10 of the 99 random changes are at least 0.9 in size
    assert ablation.compare_to_random(0.9, rnd, "two-sided")["p_value"] == pytest.approx((1 + 10) / 100)


def test_too_few_random_sets_warn_or_refuse():
    rnd = [0.40, 0.45, 0.50, 0.55, 0.60]
    with pytest.warns(UserWarning, match="5 random sets cannot give a 95% band .* at least 39"):
        r = ablation.compare_to_random(0.0, rnd, "less")
    assert (r["random_low"], r["random_high"]) == (0.40, 0.60)  # the range, labelled with its real coverage
    assert r["band"] == "range of 5 random sets (covers ~67%, not 95%)"
    assert r["p_value"] == pytest.approx(1 / 6)
    assert r["verdict"].startswith("too few random sets to test: with 5 the smallest possible p is 0.17")
    with pytest.raises(ValueError, match="5 random sets cannot give a 95% band"):
        ablation.compare_to_random(0.0, rnd, "less", strict=True)
    # 25 sets: enough for a test at 0.05, not for a 95% band
    with pytest.warns(UserWarning, match="25 random sets"):
        r = ablation.compare_to_random(0.0, np.linspace(0.4, 0.6, 25), "less")
    assert r["verdict"] == "top set lower than random (p = 0.038, 25 random sets)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ablation.compare_to_random(0.0, np.linspace(0.4, 0.6, 39), "less", strict=True)  # 39 suffice
    with pytest.raises(ValueError, match="alternative"):
        ablation.compare_to_random(0.0, rnd, "smaller")


def test_top_vs_random_groups_and_refuses_thin_bands():
    rng = np.random.default_rng(2)
    frames = []
    for k in (0, 4):
        for st, n_sets in (("top", 1), ("random", 5)):
            for perm in range(n_sets):
                shift = -1.0 if (st == "top" and k) else 0.0
                frames.append(pd.DataFrame({"mode": "zero", "set_type": st, "k": k, "permutation": perm,
                                            "sequence": range(4), "loss_change": shift + rng.normal(0, .01, 4)}))
    rows = pd.concat(frames, ignore_index=True)
    with pytest.warns(UserWarning, match="5 random sets"):
        vs = ablation.top_vs_random(rows, {"loss_change": "less"}, n_boot=100)
    assert len(vs) == 1 and vs["k"].iloc[0] == 4  # k = 0 (clean on both sides) is left out
    assert vs["band"].iloc[0].startswith("range of 5")
    with pytest.raises(ValueError, match="5 random sets"):
        ablation.top_vs_random(rows, {"loss_change": "less"}, strict=True)
    with pytest.raises(ValueError, match="lack column"):
        ablation.top_vs_random(rows, {"loss": "less"})
    with pytest.raises(ValueError, match="2 top sets"):
        ablation.top_vs_random(pd.concat([rows, rows.assign(permutation=1)]), {"loss_change": "less"}, by=["k"])


def test_two_rankings_share_random_sets_and_the_verdict_follows_the_test(tmp_path):
    """Chapter 05's design on a known answer. Ranking A puts the two heavy units first, ranking B the two
    lightest; ablating a set lowers item i's value by ``ITEM_SLOPE[i]`` x the set's weight (item 0, "type 1",
    is untouched). A moves the measure more than every random pair (p = 1/100); B moves it less than every
    random pair, so the two-sided test gives p = 1 and B is never called different; on the untouched item
    nothing is distinguishable."""
    heavy = {(0, 3), (1, 7)}
    w = {(layer, i): 10.0 if (layer, i) in heavy else 1.0 + 0.01 * (10 * layer + i)
         for layer in range(2) for i in range(10)}
    slope = np.array([0.0, 1.0, 2.0])
    calls = []

    def score(mode, members):
        calls.append(ablation.members_label(members))
        return {"bias": -slope * sum(w[(layer, i)] for layer, idx in members.items() for i in idx)}

    pool_a, pool_b = _pool(w), _pool({u: -v for u, v in w.items()})
    assert all(pool_a.random(2, p) == pool_b.random(2, p) for p in range(20))  # draws ignore the scores
    kw = {"key": {"what": "rankings"}, "items": pd.DataFrame({"type": [1, 2, 2]}), "pool_column": "pool",
          "modes": ("mean",), "k_list": (0, 2), "n_random": 99, "perm_chunk": 50, "progress": False}
    rows_a = ablation.set_ablation_sweep(score, {"all": pool_a}, tmp_path, **kw)
    n_a = len(calls)
    rows_b = ablation.set_ablation_sweep(score, {"all": pool_b}, tmp_path, set_types=("top",), **kw)
    assert calls[n_a:] == ["", "L0H0 L0H1"]  # B's sweep scores only the clean model and its own top set
    rows = ablation.share_random_sets({"A": rows_a, "B": rows_b})
    assert list(rows.columns[:2]) == ["ranking", "mode"]
    assert (rows.groupby(["ranking", "set_type"])["permutation"].nunique().to_dict()
            == {("A", "random"): 99, ("A", "top"): 1, ("B", "random"): 99, ("B", "top"): 1})
    vs = ablation.top_vs_random(rows[rows["type"] == 2], {"bias_change": "two-sided"}, by=("ranking", "mode", "k"),
                                n_boot=200).set_index("ranking")
    assert vs.loc["A", "top"] == pytest.approx(-20.0 * 1.5) and vs.loc["A", "p_value"] == pytest.approx(0.01)
    assert vs.loc["A", "verdict"] == "top set larger in size than random (p = 0.01, 99 random sets)"
    assert abs(vs.loc["B", "top"]) < abs(vs.loc["B", "random_high"]) and vs.loc["B", "p_value"] == 1.0
    assert vs.loc["B", "verdict"] == "not distinguishable from random (p = 1, 99 random sets)"
    untouched = ablation.top_vs_random(rows[rows["type"] == 1], {"bias_change": "two-sided"},
                                       by=("ranking", "mode", "k"), n_boot=200)
    assert (untouched["p_value"] == 1.0).all() and untouched["verdict"].str.startswith("not distinguishable").all()
    with pytest.raises(ValueError, match="exactly one ranking"):
        ablation.share_random_sets({"A": rows_a, "A2": rows_a})
    with pytest.raises(ValueError, match="already a column"):
        ablation.share_random_sets({"A": rows_a}, column="pool")
