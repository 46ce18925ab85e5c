"""headlab.headrank on a tiny model: the design's observations are the engine's numbers, racing measures
only tied heads, shards resume, the seeds' reference estimates the same effects, and -- by simulation
against effects computed from many draws -- the nominal 95% intervals cover about 95% of the time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from headlab import engine, headrank, rankcheck, shards, tasks
from headlab.edits import HeadEdit

POS = ["a gripping, funny and warm film.", "one of the best movies of the year.", "charming and clever.",
       "a great film, funny and warm.", "beautifully shot and clever.", "the best film of the year.",
       "warm, funny and charming.", "a good film."]
NEG = ["the plot is dull and the acting is worse.", "a tedious mess that never ends.",
       "boring, predictable and far too long.", "an awful film.", "dull and boring.",
       "the acting is awful.", "a mess.", "far too long and dull."]


def _task(n_per_label: int = 8) -> tasks.FewShotTask:
    shots = pd.DataFrame({"text": [POS[0], NEG[0], POS[1], NEG[1]], "label": ["positive", "negative"] * 2})
    texts, labels = [], []
    for p, n in zip(POS[:n_per_label], NEG[:n_per_label]):
        texts += [p, n]
        labels += ["positive", "negative"]
    splits = {"shots": shots, "test": pd.DataFrame({"text": texts, "label": labels})}
    return tasks.make_task(splits, "test", tasks.PromptConfig("plain", k=2, shot_seed=0))


@pytest.fixture(scope="module")
def setup(tiny_factory):
    lm = tiny_factory("llama")
    task = _task()
    clean = engine.clean_run(lm, task.encode(lm), task.label_ids(lm))
    return lm, task, clean


def test_balanced_order_blocks_hold_both_labels():
    y = np.array([1, 1, 1, 0, 1, 0, 0, 1, 0])
    order = headrank.balanced_order(y, 4)
    assert len(order) == 8 and len(set(order)) == 8
    for block in order.reshape(-1, 4):
        assert sorted(y[block]) == [0, 0, 1, 1]
    assert headrank.balanced_order(y, 2)[:2].tolist() == [3, 0]  # order within each label is kept
    with pytest.raises(ValueError, match="even"):
        headrank.balanced_order(y, 3)


def test_design_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="prompts_per_group=3"):
        headrank.RankDesign(prompts_per_group=3)
    with pytest.raises(ValueError, match="mode='zero'"):
        headrank.RankDesign(mode="zero")
    with pytest.raises(ValueError, match=r"phases\[1\]=1"):
        headrank.RankDesign(phases=(8, 1))
    with pytest.raises(ValueError, match="level=nan"):
        headrank.RankDesign(level=float("nan"))
    with pytest.raises(ValueError, match="draws=1.5"):
        headrank.RankDesign(draws=1.5)
    with pytest.raises(ValueError, match="level_ci=1"):
        headrank.RankDesign(level_ci=1.0)
    assert headrank.RankDesign(phases=[4, 2], prompts_per_group=2).n_prompts == 12


def test_run_groups_are_the_engines_numbers(setup):
    lm, task, clean = setup
    design = headrank.RankDesign(mode="absolute", level=0.7, prompts_per_group=2, phases=(2,), draws=1, seed=3)
    pool = headrank.balanced_order(task.labels, 2)
    heads = [(0, 1), (1, 2)]
    obs = headrank.run_groups(lm, clean, task.labels, design, pool, heads, [1])
    rows = pool[2:4].tolist()
    assert obs["prompt"].tolist() == rows * 2 and (obs["group"] == 1).all()
    seed = headrank.group_seed(design, 1)
    sign = torch.tensor(np.where(task.labels[rows] == 1, 1.0, -1.0), dtype=torch.float32)
    clean_ld = (clean.logprobs[rows, 1] - clean.logprobs[rows, 0]) * sign
    for s, col in [(1, "drop_plus"), (-1, "drop_minus")]:
        lp = engine.sweep_heads(lm, clean, [HeadEdit("noise", layer, h, 0.7, seed, sign=s) for layer, h in heads])
        lp = lp[:, rows]
        want = clean_ld[None] - (lp[..., 1] - lp[..., 0]) * sign[None]
        np.testing.assert_allclose(obs[col].to_numpy(), want.reshape(-1).numpy(), atol=1e-5)
    # antithetic partners differ (the draw matters) and other groups get other draws
    assert not np.allclose(obs["drop_plus"], obs["drop_minus"])
    other = headrank.run_groups(lm, clean, task.labels, design, np.tile(rows, 2), heads, [0])  # same prompts
    assert not np.allclose(other["drop_plus"], obs["drop_plus"])
    assert obs["evaluations"].sum() == 2 * 2 * 2 and obs["prefix_passes"].sum() == 4
    # a second draw of the same group is the first draw of another seed: (seed, group, draw) keys it
    two = headrank.run_groups(lm, clean, task.labels, dataclasses.replace(design, draws=2), pool, heads, [1])
    np.testing.assert_allclose(two[two["draw"] == 0]["drop_plus"], obs["drop_plus"], atol=1e-6)
    assert not np.allclose(two[two["draw"] == 1]["drop_plus"], obs["drop_plus"])
    assert two["evaluations"].sum() == 16 and len(two) == 2 * len(obs)


def test_halves_split_by_draw_and_by_group():
    obs = pd.DataFrame({"layer": 0, "head": 0, "phase": [1] * 8 + [2] * 4,
                        "group": [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5], "draw": [0, 1] * 6, "drop_plus": 1.0})
    h = rankcheck.halves(obs)
    assert set(h) == {"noise", "prompts"}
    assert (h["noise"]["draw 0"]["draw"] == 0).all() and len(h["noise"]["draw 1"]) == 6
    even, odd = h["prompts"]["even groups"], h["prompts"]["odd groups"]
    assert sorted(set(even["group"])) == [1, 3, 5] and sorted(set(odd["group"])) == [0, 2, 4]  # within each phase
    assert "noise" not in rankcheck.halves(obs.assign(draw=0))
    np.testing.assert_allclose(rankcheck.spearman_brown([0.5, 0.9, -0.2]), [2 / 3, 1.8 / 1.9, np.nan])
    k = rankcheck.size_factor([0.5, 0.95, 0.0])
    np.testing.assert_allclose(k, [9.0, 1.0, np.nan])
    np.testing.assert_allclose(rankcheck.spearman_brown(0.5, k[0]), 0.9)


def test_race_measures_only_tied_heads_and_resumes(setup, tmp_path, monkeypatch):
    lm, task, clean = setup
    design = headrank.RankDesign(mode="fraction_of_std", level=1.0, prompts_per_group=2, phases=(4, 2),
                                 top_k=2, seed=1)
    pool = headrank.balanced_order(task.labels, 2)
    with pytest.raises(ValueError, match="computation identity"):
        headrank.race(lm, clean, task.labels, design, pool, shards.ShardStore(tmp_path, {"model": "tiny"}))
    store = shards.ShardStore(tmp_path, {"model": "tiny"}, lm=lm)
    obs = headrank.race(lm, clean, task.labels, design, pool, store, n_boot=300)
    first = obs[obs["phase"] == 1]
    assert first.groupby(["layer", "head"]).ngroups == lm.n_layers * lm.n_heads
    table = headrank.rank_table(first, top_k=2, n_boot=300)
    tied = set(zip(table.loc[table["status"] == "tied", "layer"], table.loc[table["status"] == "tied", "head"]))
    second = obs[obs["phase"] == 2]
    assert set(zip(second["layer"], second["head"])) == tied
    assert set(second["group"]) == ({4, 5} if tied else set())
    # rerun: every group is read back from its shard, nothing is recomputed
    monkeypatch.setattr(engine, "sweep_heads", lambda *a, **k: pytest.fail("recomputed a saved group"))
    again = headrank.race(lm, clean, task.labels, design, pool, store, n_boot=300)
    pd.testing.assert_frame_equal(again, obs)
    # a further phase reuses every group already measured (phases are not part of a group's key)
    calls = []
    monkeypatch.setattr(engine, "sweep_heads", lambda lm_, clean_, edits, **k: calls.append(k["prompts"][0])
                        or torch.zeros(len(edits), len(clean_.enc), 2))
    longer = headrank.race(lm, clean, task.labels, dataclasses.replace(design, phases=(4, 2, 2)), pool, store,
                           n_boot=300, progress=False)
    assert {p for rows in calls for p in rows} <= set(pool[12:16].tolist())
    pd.testing.assert_frame_equal(longer[longer["phase"] < 3].reset_index(drop=True), obs)
    with pytest.raises(ValueError, match="pool has 4"):
        headrank.race(lm, clean, task.labels, design, pool[:4])


def test_rank_table_columns_and_ablation(setup):
    lm, task, clean = setup
    obs = headrank.ablation_observations(lm, clean, task.labels, range(len(task.labels)), "zero")
    lp = engine.sweep_heads(lm, clean, [HeadEdit("zero", 1, 3)])
    sign = np.where(task.labels == 1, 1.0, -1.0)
    want = ((clean.logprobs[:, 1] - clean.logprobs[:, 0]).numpy() - (lp[0, :, 1] - lp[0, :, 0]).numpy()) * sign
    got = obs[(obs["layer"] == 1) & (obs["head"] == 3)]["drop"].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    table = headrank.rank_table(obs, "drop", cluster="prompt", n_boot=300)
    assert table["rank"].tolist() == list(range(1, 9))
    assert (table["effect"].diff().dropna() <= 0).all()
    assert ((table["effect_low"] <= table["effect"]) & (table["effect"] <= table["effect_high"])).all()
    assert ((table["rank_low"] <= table["rank"]) & (table["rank"] <= table["rank_high"])).all()
    assert (table["p_holm"] >= table["q_bh"] - 1e-12).all() and (table["n_clusters"] == 16).all()
    counts = headrank.significance_counts(table).set_index("test")
    assert counts.loc["Holm (FWER)", "heads non-zero"] <= counts.loc["Benjamini-Hochberg (FDR)", "heads non-zero"] \
        <= counts.loc["uncorrected p", "heads non-zero"] == int((table["p"] <= 0.05).sum())


def test_mean_ablation_is_the_engines_and_resumes(setup, tmp_path, monkeypatch):
    lm, task, clean = setup
    store = shards.ShardStore(tmp_path, {"model": "tiny"}, lm=lm)
    rows = [0, 3, 5, 6]
    obs = headrank.ablation_observations(lm, clean, task.labels, rows, "mean", heads=[(0, 1)], store=store)
    lp = engine.sweep_heads(lm, clean, [HeadEdit("mean", 0, 1)])[0, rows]
    sign = np.where(task.labels[rows] == 1, 1.0, -1.0)
    want = ((clean.logprobs[rows, 1] - clean.logprobs[rows, 0]).numpy() - (lp[:, 1] - lp[:, 0]).numpy()) * sign
    np.testing.assert_allclose(obs["drop"].to_numpy(), want, atol=1e-5)
    assert obs["evaluations"].sum() == 4
    monkeypatch.setattr(engine, "sweep_heads", lambda *a, **k: pytest.fail("recomputed a saved ablation"))
    again = headrank.ablation_observations(lm, clean, task.labels, rows, "mean", heads=[(0, 1)], store=store)
    pd.testing.assert_frame_equal(again, obs)
    with pytest.raises(ValueError, match="use one of"):
        headrank.ablation_observations(lm, clean, task.labels, rows, "noise")


def test_stability_and_variance_table_of_a_run(setup):
    """The checks run on a small design: halves by draw and by group, Spearman-Brown columns, the
    variance shares sum to one, and every head is compared."""
    lm, task, clean = setup
    design = headrank.RankDesign("fraction_of_std", 1.5, prompts_per_group=4, phases=(4,), seed=2)
    obs = headrank.run_groups(lm, clean, task.labels, design, headrank.balanced_order(task.labels, 4),
                              [(layer, h) for layer in range(lm.n_layers) for h in range(lm.n_heads)], range(4),
                              progress=False)
    table, rankings = rankcheck.stability(obs, top_k=2, n_boot=50)
    assert table["split"].tolist() == ["noise", "prompts"] and set(rankings) == {"noise", "prompts"}
    ok = table["spearman"] > 0
    np.testing.assert_allclose(table.loc[ok, "spearman_full"], rankcheck.spearman_brown(table.loc[ok, "spearman"]))
    var = rankcheck.variance_table(obs)
    assert len(var) == lm.n_layers * lm.n_heads
    shares = var[["share_prompts", "share_prefix", "share_query"]].sum(axis=1)
    np.testing.assert_allclose(shares[var["variance"] > 0], 1.0)
    eff = rankcheck.antithetic_efficiency(obs)
    assert (eff["efficiency"] > 0).all()


N_DRAWS = 48


@pytest.fixture(scope="module")
def bank(setup):
    """Every prompt of the task under ``N_DRAWS`` draws of a noise design (draw d = one prefix draw shared
    by all prompts + one query draw per prompt), every head, antithetic pairs: the finite population
    the simulated runs sample from.

    Returns:
        ``(cube, theta, heads)``: effects ``(draw, prompt, head)``, each head's exact expected effect
        under the sampling below (the mean over the whole bank: groups are label-balanced and draws are
        uniform, so a group mean is unbiased for it), and the ``(layer, head)`` pairs.
    """
    lm, task, clean = setup
    order = np.arange(len(task.labels))
    design = headrank.RankDesign("fraction_of_std", 1.5, prompts_per_group=len(order), phases=(N_DRAWS,), draws=1,
                                 seed=11)
    heads = [(layer, h) for layer in range(lm.n_layers) for h in range(lm.n_heads)]
    obs = headrank.run_groups(lm, clean, task.labels, design, np.tile(order, N_DRAWS), heads, range(N_DRAWS),
                              progress=False)
    obs = obs.assign(effect=headrank.effect_column(obs))
    cube = obs.pivot_table(index=["group", "prompt"], columns=["layer", "head"], values="effect")
    cube = cube.to_numpy().reshape(N_DRAWS, len(order), len(heads))  # (draw, prompt, head)
    return cube, cube.mean((0, 1)), np.array(heads)


def _sample_groups(cube, y, rng, n_groups, heads, phase):
    """``n_groups`` simulated groups: each a random draw (with replacement: groups are iid) and 2 prompts
    per label (without replacement within the group), sharing the draw's prefix noise as in the design."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    draws = rng.integers(0, cube.shape[0], n_groups)
    prompts = np.stack([np.concatenate([rng.choice(pos, 2, replace=False), rng.choice(neg, 2, replace=False)])
                        for _ in range(n_groups)])  # (group, 4)
    vals = cube[draws[:, None], prompts][..., heads["index"]]  # (group, 4, heads)
    n_h = len(heads["index"])
    return pd.DataFrame({"layer": np.tile(heads["layer"], 4 * n_groups), "head": np.tile(heads["head"], 4 * n_groups),
                         "group": np.repeat(np.arange(n_groups), 4 * n_h), "phase": phase, "effect": vals.reshape(-1)})


def _coverage(table, heads, theta, true_rank):
    t = table.set_index(["layer", "head"]).loc[[tuple(h) for h in heads]]
    return (((t["effect_low"] <= theta) & (theta <= t["effect_high"])).mean(),
            ((t["rank_low"] <= true_rank) & (true_rank <= t["rank_high"])).mean())


def _check_coverage(cover, cover_rank):
    """Runs are iid, so the standard error of the mean coverage comes from the spread of the per-run
    coverage (which accounts for the heads of one run sharing their groups); 3 standard errors around
    0.95 is a 0.3% false alarm rate if the coverage is exactly 95%. Rank intervals are simultaneous
    over pairs, so they must cover at least as often."""
    cover, cover_rank = np.asarray(cover), np.asarray(cover_rank)
    mean, se = cover.mean(), cover.std(ddof=1) / np.sqrt(len(cover))
    print(f"interval coverage {mean:.3f} +- {se:.3f}; rank-interval coverage {cover_rank.mean():.3f}")
    assert abs(mean - 0.95) <= 3 * se, f"coverage {mean:.3f} (se {se:.3f}) is not 0.95"
    assert cover_rank.mean() >= 0.95 - 3 * cover_rank.std(ddof=1) / np.sqrt(len(cover_rank))


def test_intervals_cover_the_expected_effect_by_simulation(setup, bank):
    """Coverage of the nominal 95% intervals of :func:`rank_table` under the design, by simulation.

    The population (:func:`bank`): 16 prompts (8 per label) x 48 noise draws of a tiny llama, every head,
    antithetic pairs; its mean per head is the exact expected effect ``theta_h`` of the sampling, computed
    from all 768 (prompt, draw) evaluations. One simulated run draws 10 label-balanced groups of 4
    prompts, each with its own draw. 300 runs x 8 heads = 2400 intervals.
    """
    _, task, _ = setup
    cube, theta, heads = bank
    true_rank = np.argsort(np.argsort(-theta)) + 1
    cols = {"index": np.arange(len(heads)), "layer": heads[:, 0], "head": heads[:, 1]}
    rng = np.random.default_rng(0)
    cover, cover_rank = [], []
    for _ in range(300):
        obs = _sample_groups(cube, task.labels, rng, 10, cols, phase=1)
        c, r = _coverage(headrank.rank_table(obs, n_boot=400, seed=int(rng.integers(1 << 30))), heads, theta, true_rank)
        cover.append(c)
        cover_rank.append(r)
    _check_coverage(cover, cover_rank)


def test_intervals_cover_after_racing_by_simulation(setup, bank):
    """The same coverage check for the design as :func:`headrank.race` runs it: phase 1 measures every
    head on 6 groups, phase 2 adds 4 new groups for the heads whose rank interval crosses the top-3
    boundary only, and the final table (strata: phases) is checked for every head. The selection of
    heads for phase 2 depends on the phase-1 data, which the intervals do not model; this checks that
    it does not cost coverage. 200 runs x 8 heads."""
    _, task, _ = setup
    cube, theta, heads = bank
    true_rank = np.argsort(np.argsort(-theta)) + 1
    cols = {"index": np.arange(len(heads)), "layer": heads[:, 0], "head": heads[:, 1]}
    rng = np.random.default_rng(1)
    cover, cover_rank, raced = [], [], 0
    for _ in range(200):
        first = _sample_groups(cube, task.labels, rng, 6, cols, phase=1)
        table = headrank.rank_table(first, top_k=3, n_boot=200, seed=int(rng.integers(1 << 30)))
        tied = table.set_index(["layer", "head"])["status"].loc[[tuple(h) for h in heads]].to_numpy() == "tied"
        obs = first
        if tied.any():
            raced += 1
            sub = {k: v[tied] for k, v in cols.items()}
            obs = pd.concat([first, _sample_groups(cube, task.labels, rng, 4, sub, phase=2)], ignore_index=True)
        c, r = _coverage(headrank.rank_table(obs, n_boot=400, seed=int(rng.integers(1 << 30))), heads, theta, true_rank)
        cover.append(c)
        cover_rank.append(r)
    assert raced >= 100  # the racing phase ran in most runs (else this checks nothing new)
    _check_coverage(cover, cover_rank)


def test_design_and_seeds_reference_estimate_the_same_effect(setup):
    """Shared prefix draws (the design) and a fresh draw at every position of every prompt (the seeds'
    semantics, through the plain hooks) have the same expected effect: with many draws their means
    agree within 3 combined standard errors, on a head whose noise matters."""
    lm, task, clean = setup
    design = headrank.RankDesign("fraction_of_std", 1.5, prompts_per_group=4, phases=(24,), seed=5)
    pool = np.tile(headrank.balanced_order(task.labels, 4), 6)  # 24 groups: each prompt under 6 draws
    heads = [(0, 2), (1, 1)]
    obs = headrank.run_groups(lm, clean, task.labels, design, pool, heads, range(24))
    ours = headrank.rank_table(obs, n_boot=200)
    ref = rankcheck.reference_effects(lm, task, design, heads, range(len(task.labels)), draws=12, clean=clean)
    check = rankcheck.reference_check(ours, ref, n_boot=200, z_crit=3.0)
    assert len(check) == 2 and check["agree"].all(), check
    assert (check["effect_reference"].abs() > 2 * check["se_reference"]).any()  # the check is not vacuous
