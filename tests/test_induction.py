"""Induction heads on hand-built patterns and tiny random models: the induction score of known patterns,
the structure of repeated random token rows, head ablation (zero = zeroed o_proj input columns, hooks gone
after an error, k = 0 = clean), and the resumable, batch-invariant top-k vs random-k ablation sweep."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from beartype import beartype
from jaxtyping import jaxtyped

from conftest import ARCHS, causal_uniform
from headlab import ablation, attention, induction, metrics, perplexity
from headlab.interventions import ablate_heads
from headlab.models import wrap_model

T, START = 6, 1  # segment length and BOS offset of the hand-built patterns
S = START + 2 * T


def _point_at(targets: dict[int, int], s: int) -> torch.Tensor:
    """A causal pattern with all attention of query q on key targets[q] (BOS for the other queries)."""
    pat = torch.zeros(s, s)
    pat[:, 0] = 1.0
    for q, k in targets.items():
        pat[q] = 0.0
        pat[q, k] = 1.0
    return pat


# --------------------------------------------------------------------------------------------------
# Scores of hand-built patterns
# --------------------------------------------------------------------------------------------------
def test_induction_score_of_known_patterns():
    score = jaxtyped(typechecker=beartype)(induction.induction_score)
    perfect = _point_at({q: q - T + 1 for q in range(START + T, S)}, S)
    assert score(perfect, T, START).item() == pytest.approx(1.0)
    uniform = causal_uniform(S)
    expected = torch.tensor([1 / (q + 1) for q in range(START + T, S)]).mean()
    assert score(uniform, T, START).item() == pytest.approx(expected.item())
    prev = _point_at({q: q - 1 for q in range(1, S)}, S)
    assert score(prev, T, START).item() == 0.0
    assert induction.previous_token_score(prev).item() == pytest.approx(1.0)
    assert induction.previous_token_score(perfect).item() < 1.0
    batched = torch.stack([perfect, uniform, prev])[:, None]  # (b, 1, q, k): leading dims are kept
    assert score(batched, T, START).shape == (3, 1)


def test_induction_score_rejects_bad_period():
    with pytest.raises(ValueError, match="period"):
        induction.induction_score(causal_uniform(S), T + 1, START)


def test_scores_frame_ranks_heads():
    ind = torch.tensor([[0.1, 0.9], [0.5, 0.9]])
    frame = attention.scores_frame({"induction": ind, "previous_token": torch.zeros(2, 2)})
    assert list(zip(frame["layer"], frame["head"])) == [(0, 1), (1, 1), (1, 0), (0, 0)]
    assert frame["rank"].tolist() == [1, 2, 3, 4]
    assert set(frame.columns) >= {"induction_score", "previous_token_score"}


# --------------------------------------------------------------------------------------------------
# Repeated random tokens
# --------------------------------------------------------------------------------------------------
def test_repeated_random_tokens_structure(tokenizer):
    b = induction.repeated_random_tokens(tokenizer, 5, 8, seed=3)
    assert b.tokens.shape == (5, 1 + 16) and b.start == 1
    assert (b.tokens[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(b.tokens[:, 1:9], b.tokens[:, 9:])
    special = set(tokenizer.all_special_ids)
    assert not special & set(b.tokens[:, 1:].flatten().tolist())
    assert all(len(set(row[1:9].tolist())) == 8 for row in b.tokens)  # distinct within a copy
    again = induction.repeated_random_tokens(tokenizer, 3, 8, seed=3)
    assert torch.equal(again.tokens, b.tokens[:3])  # row i depends on (seed, i) only
    assert not torch.equal(induction.repeated_random_tokens(tokenizer, 5, 8, seed=4).tokens, b.tokens)


def test_repeated_random_tokens_with_lags(tokenizer):
    b = induction.repeated_random_tokens(tokenizer, 4, 8, seed=0, lags=[3, 8])
    assert b.lags.tolist() == [3, 8, 3, 8] and b.tokens.shape == (4, 17)
    row = b.tokens[0]
    assert torch.equal(row[-3:], row[-6:-3])  # the segment and its repeat end the row
    assert len(set(row[1:-3].tolist())) == 16 - 3  # filler + first copy: all distinct
    early, late = b.target_masks()
    assert early[0].sum() == 2 and late[0].sum() == 2 and late[1].sum() == 7
    assert late[0].nonzero()[:, 0].tolist() == [14, 15]  # predictions of the 2nd and 3rd repeated token


def test_repeated_random_tokens_bad_values(tokenizer):
    with pytest.raises(ValueError, match="lag"):
        induction.repeated_random_tokens(tokenizer, 2, 8, lags=[1])
    with pytest.raises(ValueError, match="ordinary tokens"):
        induction.repeated_random_tokens(tokenizer, 2, 250)


def test_ordinary_token_ids_exclude_special(tiny_factory):
    lm = tiny_factory("llama")
    ids = induction.ordinary_token_ids(lm).tolist()
    assert not set(ids) & set(lm.tokenizer.all_special_ids)
    assert max(ids) < len(lm.tokenizer)


def test_repeat_metrics_by_hand(tokenizer):
    b = induction.repeated_random_tokens(tokenizer, 2, 4, lags=[4, 2])
    nll = torch.full((2, 8), 2.0)
    early, late = b.target_masks()
    nll[late] = 0.5
    m = induction.repeat_metrics(b, nll)
    assert torch.allclose(m["loss_late"], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(m["icl"], torch.tensor([-1.5, -1.5], dtype=torch.float64))
    assert torch.allclose(m["p_correct"], torch.exp(torch.tensor(-0.5, dtype=torch.float64)).expand(2))


# --------------------------------------------------------------------------------------------------
# Attention patterns and ablation on tiny models of every architecture
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_ablation_equals_zeroed_o_proj_columns(arch, tiny_factory, tokenizer):
    lm = tiny_factory(arch)
    ids = induction.repeated_random_tokens(lm, 2, 5, seed=1).tokens
    heads = {0: [1], 1: [0, 3]}
    with torch.inference_mode(), ablate_heads(lm, heads, "zero"):
        hooked = lm.model(ids).logits
    edited = wrap_model(copy.deepcopy(lm.model), tokenizer)
    dh = lm.head_dim
    with torch.no_grad():
        for layer, hs in heads.items():
            w = edited.adapter.weight_in_out(edited.layer_module(layer, "attn_out"))  # (out, in), view for Conv1D
            for h in hs:
                w[:, h * dh:(h + 1) * dh] = 0.0
    with torch.inference_mode():
        plain = edited.model(ids).logits
        clean = lm.model(ids).logits
    torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hooked, clean, atol=1e-3)


def _count_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_patterns_losses_and_hooks_removed(arch, tiny_factory):
    lm = tiny_factory(arch)
    b = induction.repeated_random_tokens(lm, 3, 5, seed=2)
    pats = attention.attention_patterns(lm, b.tokens)
    s = b.tokens.shape[1]
    assert pats.shape == (3, lm.n_layers, lm.n_heads, s, s)
    torch.testing.assert_close(pats.sum(-1), torch.ones(3, lm.n_layers, lm.n_heads, s))
    scores = induction.induction_scores(lm, b, batch_size=2)
    direct = induction.induction_score(pats, 5, b.start).mean(0)
    torch.testing.assert_close(scores["induction"], direct, rtol=1e-5, atol=1e-6)
    clean = perplexity.token_losses(lm, b.tokens)
    means = attention.head_output_means(lm, b.tokens)
    assert set(means) == set(range(lm.n_layers)) and means[0].shape == (lm.n_heads, lm.head_dim)
    n_hooks = _count_hooks(lm.model)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_heads(lm, {1: [0, 2]}, "mean", means):
            assert _count_hooks(lm.model) > n_hooks
            raise RuntimeError("boom")
    assert _count_hooks(lm.model) == n_hooks
    torch.testing.assert_close(perplexity.token_losses(lm, b.tokens), clean)
    torch.testing.assert_close(perplexity.token_losses(lm, b.tokens, {}), clean)  # k = 0 is the clean run
    ablated = perplexity.token_losses(lm, b.tokens, {1: [0, 2]}, "mean", means, batch_size=1)
    assert not torch.allclose(ablated, clean)


# --------------------------------------------------------------------------------------------------
# Ablation sweep: head sets, resume, batch invariance
# --------------------------------------------------------------------------------------------------
def _scores(n_layers: int = 4, n_heads: int = 3) -> pd.DataFrame:
    gen = torch.Generator().manual_seed(0)
    return attention.scores_frame({"induction": torch.rand(n_layers, n_heads, generator=gen)})


def test_head_pool_choice():
    scores = _scores()
    top = scores.head(2)
    want = {}
    for layer, head in sorted(zip(top["layer"], top["head"])):
        want.setdefault(layer, []).append(head)
    full = ablation.head_pool(scores, "induction_score")
    upper = ablation.head_pool(scores, "induction_score", "top_half")
    assert full.top(2) == want
    assert full.random(0) == {}
    r = upper.random(3, permutation=5, seed=1)
    assert sum(map(len, r.values())) == 3 and set(r) <= {2, 3}
    assert r == upper.random(3, permutation=5, seed=1)
    draws = {str(full.random(3, permutation=p)) for p in range(10)}
    assert len(draws) > 5
    assert set(ablation.head_pool(scores, "induction_score", "bottom_half").top(6)) == {0, 1}
    with pytest.raises(ValueError, match="layer range"):
        ablation.head_pool(scores, "induction_score", "middle")
    with pytest.raises(ValueError, match="set_type"):
        full.choose("best", 1)
    with pytest.raises(ValueError, match="k=7"):
        upper.top(7)


GRID = dict(modes=("zero", "mean"), layer_ranges=("full", "top_half"), set_types=("top", "random"),
            k_list=(0, 1, 3), n_random=3, max_heads=4, seed=0, perm_chunk=2)


def _sweep_inputs(tiny_factory):
    lm = tiny_factory("llama")
    batch = induction.repeated_random_tokens(lm, 4, 5, seed=0, lags=[2, 5])
    ref = induction.repeated_random_tokens(lm, 3, 5, seed=99)
    scores = attention.scores_frame(induction.induction_scores(lm, ref))
    return lm, batch, scores, attention.head_output_means(lm, ref.tokens)


def test_sweep_resumes_to_the_same_table(tiny_factory, tmp_path, monkeypatch):
    lm, batch, scores, means = _sweep_inputs(tiny_factory)
    full = ablation.induction_ablation_sweep(lm, batch, scores, tmp_path / "a", means=means, batch_size=3,
                                          progress=False, **GRID)
    n_points = len(list((tmp_path / "a").glob("*.json")))
    # top: 1 shard per (mode, range, k); random: k=0 one shard, k>0 two chunks (perms 0-1, 2)
    assert n_points == 2 * 2 * (3 + 1 + 2 * 2)
    assert len(full) == 2 * 2 * (3 * 1 + (1 + 3 + 3)) * len(batch)
    clean = full[full["k"] == 0]
    assert clean.groupby("sequence")["p_correct"].nunique().eq(1).all()  # every k = 0 point is the clean run
    real, calls = perplexity.token_losses, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed midway
        return real(*args, **kwargs)

    monkeypatch.setattr(perplexity, "token_losses", dying)
    with pytest.raises(KeyboardInterrupt):
        ablation.induction_ablation_sweep(lm, batch, scores, tmp_path / "b", means=means, batch_size=3,
                                       progress=False, **GRID)
    done = len(list((tmp_path / "b").glob("*.json")))
    assert 0 < done < n_points
    monkeypatch.setattr(perplexity, "token_losses", real)
    resumed = ablation.induction_ablation_sweep(lm, batch, scores, tmp_path / "b", means=means, batch_size=2,
                                             progress=False, **GRID)
    pd.testing.assert_frame_equal(resumed, full, check_exact=False, rtol=1e-5, atol=1e-6)
    summary = ablation.ablation_summary(full, "p_correct", n_boot=50)
    assert (summary["low"] <= summary["value"] + 1e-12).all() and (summary["value"] <= summary["high"] + 1e-12).all()
    with pytest.warns(UserWarning, match="3 random sets cannot give a 95% band"):
        vs = ablation.top_vs_random(full, {"p_correct": "less"}, by=("mode", "layer_range", "k"), n_boot=50)
    assert len(vs) == 2 * 2 * 2 and (vs["n_random_sets"] == 3).all() and vs["p_value"].between(0.25, 1).all()
    assert vs["verdict"].str.startswith("too few random sets to test").all()


def test_sweep_is_batch_invariant(tiny_factory, tmp_path):
    lm, batch, scores, means = _sweep_inputs(tiny_factory)
    grid = {**GRID, "modes": ("mean",), "layer_ranges": ("full",)}
    whole = ablation.induction_ablation_sweep(lm, batch, scores, tmp_path / "a", means=means, batch_size=4,
                                           progress=False, **grid)
    ones = ablation.induction_ablation_sweep(lm, batch, scores, tmp_path / "b", means=means, batch_size=1,
                                          progress=False, **grid)
    pd.testing.assert_frame_equal(whole, ones, check_exact=False, rtol=1e-5, atol=1e-6)
    # a sequence's result does not depend on which other sequences are scored with it
    alone = ablation.induction_ablation_sweep(lm, batch.subset([2]), scores, tmp_path / "c", means=means,
                                           batch_size=1, progress=False, **grid)
    cols = ["p_correct", "loss_early", "loss_late", "members"]
    pd.testing.assert_frame_equal(alone[cols], whole[whole["sequence"] == 2][cols].reset_index(drop=True),
                                  check_exact=False, rtol=1e-5, atol=1e-6)


def test_sweep_rejects_bad_grid(tiny_factory, tmp_path):
    lm, batch, scores, means = _sweep_inputs(tiny_factory)
    bad = [({"modes": ("zero", "inf")}, "mode"), ({"layer_ranges": ("top",)}, "layer range"),
           ({"set_types": ("best",)}, "set type"), ({"k_list": (0, 5)}, "max_heads"),
           ({"k_list": (0, 5), "max_heads": 20}, "exceeds"), ({"n_random": 0}, "n_random"),
           ({"k_list": (0, 1.5)}, "integer")]
    for override, match in bad:
        with pytest.raises(ValueError, match=match):
            ablation.induction_ablation_sweep(lm, batch, scores, tmp_path, means=means, progress=False,
                                           **{**GRID, **override})
    with pytest.raises(ValueError, match="means"):
        ablation.induction_ablation_sweep(lm, batch, scores, tmp_path, progress=False, **GRID)
    assert not list(tmp_path.glob("*.parquet"))


def test_bootstrap_two_way():
    x = torch.arange(12.0).reshape(3, 4).numpy()
    ci = metrics.bootstrap_two_way(x, n_boot=200)
    assert ci.value == pytest.approx(5.5) and ci.low < 5.5 < ci.high
    one = metrics.bootstrap_two_way(x[:1], n_boot=200)
    assert one.value == pytest.approx(1.5) and 0 <= one.low <= one.high <= 3
