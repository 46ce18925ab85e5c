"""Attention entropy, attention mass on token spans and paired differential attention: hand-built
patterns (uniform -> 1, one-hot -> 0, padding ignored), tiny random models (batched == one at a time,
agreement with the full pattern tensor), bias/instruction probes, the permutation correlation with
Benjamini-Hochberg, the sentence-pair log-likelihood measures, and the top-k vs random-k ablation sweeps
on sentence pairs and on label tokens."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from beartype import beartype
from conftest import causal_uniform
from jaxtyping import jaxtyped

from headlab import ablation, attention, bias, data, engine, metrics
from headlab.interventions import ablate_heads


# --------------------------------------------------------------------------------------------------
# attention_entropy on hand-built patterns
# --------------------------------------------------------------------------------------------------
def test_entropy_of_uniform_pattern_is_one_and_position_zero_is_undefined():
    h = jaxtyped(typechecker=beartype)(attention.attention_entropy)(causal_uniform(6))
    assert math.isnan(h[0])  # one attendable key: the distribution is forced
    torch.testing.assert_close(h[1:], torch.ones(5))


def test_entropy_of_one_hot_pattern_is_zero():
    pat = torch.zeros(2, 3, 5, 5)  # (b, H, q, k): every query on the first key, or on itself
    pat[0, :, :, 0] = 1.0
    pat[1] = torch.eye(5)
    h = attention.attention_entropy(pat)
    assert torch.isnan(h[..., 0]).all()
    torch.testing.assert_close(h[..., 1:], torch.zeros(2, 3, 4))


def test_entropy_of_two_keys_at_position_two_of_three():
    pat = torch.zeros(4, 4)
    pat[3, :2] = 0.5  # query 3 may see 4 keys and spreads over 2: log 2 / log 4
    pat[1, :2] = 0.5
    pat[2, 2] = 1.0
    h = attention.attention_entropy(pat)
    assert h[1].item() == pytest.approx(1.0)
    assert h[2].item() == pytest.approx(0.0)
    assert h[3].item() == pytest.approx(0.5)


def test_entropy_ignores_padding():
    s, real = 6, 4
    pat = torch.zeros(1, 2, s, s)
    pat[0, :, :real, :real] = causal_uniform(real)
    pat[0, :, real:, :real] = 1.0 / real  # pad queries look at the real keys (as HF does)
    mask = torch.tensor([[True] * real + [False] * (s - real)])
    h = attention.attention_entropy(pat, mask)
    torch.testing.assert_close(h[0, :, 1:real], torch.ones(2, real - 1))
    assert torch.isnan(h[0, :, real:]).all() and torch.isnan(h[0, :, 0]).all()
    # left padding: the first real token has one attendable key, the next ones uniform over theirs
    left = torch.zeros(1, 1, s, s)
    left[0, 0, 2:, 2:] = causal_uniform(s - 2)
    lmask = torch.tensor([[False, False] + [True] * (s - 2)])
    hl = attention.attention_entropy(left, lmask)[0, 0]
    assert torch.isnan(hl[:3]).all()
    torch.testing.assert_close(hl[3:], torch.ones(s - 3))


def test_entropy_with_a_window_normalises_by_the_window():
    s, w = 6, 3
    pat = torch.zeros(s, s)
    for q in range(s):
        lo = max(0, q - w + 1)
        pat[q, lo:q + 1] = 1.0 / (q + 1 - lo)
    h = attention.attention_entropy(pat, window=w)
    torch.testing.assert_close(h[1:], torch.ones(s - 1))
    with pytest.raises(ValueError, match="window"):
        attention.attention_entropy(pat, window=0)


def test_entropy_rejects_non_square_patterns():
    with pytest.raises(ValueError, match="square"):
        attention.attention_entropy(torch.ones(3, 4) / 4)


# --------------------------------------------------------------------------------------------------
# span_mass / head_differences on hand-built cases
# --------------------------------------------------------------------------------------------------
def test_span_mass_by_hand():
    pat = causal_uniform(4)[None, None].repeat(2, 1, 1, 1)  # (2, 1, 4, 4)
    q = torch.tensor([[False, False, False, True], [False, False, True, True]])
    k = torch.tensor([[True, True, False, False], [False, False, True, False]])
    m = jaxtyped(typechecker=beartype)(attention.span_mass)(pat, q, k)
    # row 0: query 3 puts 1/4 + 1/4 on keys 0, 1; row 1: queries 2 and 3 put 1/3 and 1/4 on key 2
    torch.testing.assert_close(m, torch.tensor([[0.5], [(1 / 3 + 1 / 4) / 2]]))
    empty = attention.span_mass(pat, torch.zeros(2, 4, dtype=torch.bool), k)
    assert torch.isnan(empty).all()


def test_head_differences_of_a_hand_built_pair_set():
    n, L, H = 40, 2, 3
    g = torch.Generator().manual_seed(0)
    b = torch.rand(n, L, H, generator=g)
    a = b.clone()
    a[:, 1, 2] += 0.3  # one head attends 0.3 more to the pronoun in the "a" sentences
    a[:, 0, 0] -= 0.1 + 0.01 * torch.randn(n, generator=g)
    frame = bias.head_differences(a, b, n_boot=200, names=("pro", "anti"))
    assert list(frame.columns[:4]) == ["layer", "head", "mean_pro", "mean_anti"]
    diff = frame.set_index(["layer", "head"])["diff"]
    assert diff[(1, 2)] == pytest.approx(0.3, abs=1e-6)
    assert diff[(0, 0)] == pytest.approx(-0.1, abs=0.01)
    assert (diff.drop([(1, 2), (0, 0)]).abs() < 1e-6).all()
    row = frame[(frame["layer"] == 0) & (frame["head"] == 0)].iloc[0]
    assert row["diff_low"] <= row["diff"] <= row["diff_high"] < 0
    # items with NaN (an empty query set) are dropped for every head
    a[3] = torch.nan
    assert (bias.head_differences(a, b, n_boot=50)["n"] == n - 1).all()
    with pytest.raises(ValueError, match="items"):
        bias.head_differences(a[:1], b[:1])


# --------------------------------------------------------------------------------------------------
# Tiny models: batch invariance and agreement with the full pattern tensor
# --------------------------------------------------------------------------------------------------
def _texts(tokenizer):
    texts = ["Review: a gripping, funny and warm film.", "The cat sat on the mat.",
             "Classify the sentiment of each movie review as positive or negative.", "a dull film"]
    return [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]


def test_text_entropy_is_batch_invariant_and_matches_patterns(tiny_lm, tokenizer):
    seqs = _texts(tokenizer)
    batched = attention.text_entropy(tiny_lm, seqs, batch_size=3)
    alone = torch.cat([attention.text_entropy(tiny_lm, [s], batch_size=1) for s in seqs])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    assert batched.shape == (len(seqs), tiny_lm.n_layers, tiny_lm.n_heads)
    assert ((batched >= -1e-6) & (batched <= 1 + 1e-6)).all()
    pats = attention.attention_patterns(tiny_lm, seqs[1][None])[0]  # (L, H, s, s)
    by_hand = torch.stack([torch.nanmean(attention.attention_entropy(pats[layer], window=w), -1)
                           for layer, w in enumerate(tiny_lm.layer_windows)])  # local and global layers
    torch.testing.assert_close(batched[1], by_hand, atol=1e-5, rtol=1e-4)


def test_span_attention_matches_patterns_and_is_batch_invariant(tiny_factory, tokenizer):
    lm = tiny_factory("llama")
    seqs = _texts(tokenizer)
    queries = [[len(s) - 1] for s in seqs]
    keys = [[1, 2], [0], [3, 4, 5], [1]]
    batched = attention.span_attention(lm, seqs, queries, keys, batch_size=4)
    alone = torch.cat([attention.span_attention(lm, [s], [q], [k], batch_size=1)
                       for s, q, k in zip(seqs, queries, keys)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    pats = attention.attention_patterns(lm, seqs[2][None])[0]
    torch.testing.assert_close(batched[2], pats[:, :, len(seqs[2]) - 1, [3, 4, 5]].sum(-1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="out of range"):
        attention.span_attention(lm, seqs[:1], [[99]], [[0]])


def test_differential_attention_of_identical_pairs_is_zero(tiny_factory, tokenizer):
    lm = tiny_factory("qwen2")
    seqs = _texts(tokenizer)
    q = [list(range(2, len(s))) for s in seqs]
    k = [[1]] * len(seqs)
    a = attention.span_attention(lm, seqs, q, k)
    b = attention.span_attention(lm, list(reversed(seqs)), list(reversed(q)), list(reversed(k))).flip(0)
    frame = bias.head_differences(a, b, n_boot=50)
    assert np.allclose(frame["diff"], 0.0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Probes: spans, pairs, lexicon, instruction pairs
# --------------------------------------------------------------------------------------------------
def test_encode_spans_finds_the_tokens_of_a_word(tokenizer):
    text = "The cat sat on the mat."
    ids, (cat, mat) = attention.encode_spans(tokenizer, text, [(4, 7), (19, 22)])
    assert "".join(tokenizer.convert_ids_to_tokens(ids[cat].tolist())).replace("▁", "") == "cat"
    assert "".join(tokenizer.convert_ids_to_tokens(ids[mat].tolist())).replace("▁", "") == "mat"
    assert cat[0] > 0  # the BOS the test tokenizer adds belongs to no span
    with pytest.raises(ValueError, match="span"):
        attention.encode_spans(tokenizer, text, [(5, 5)])


def test_encode_lexicon_marks_the_lexicon_words_and_drops_texts_without(tokenizer):
    texts = ["a gripping, funny and warm film.", "the cat sat on the mat.", "dull and boring, but clever."]
    rev = attention.encode_lexicon(tokenizer, texts, [1, 0, 0])
    assert list(rev.columns) == ["ids", "keys", "label", "n_positive", "n_negative"]
    assert list(rev["label"]) == [1, 0] and list(rev["n_positive"]) == [2, 1] and list(rev["n_negative"]) == [0, 2]
    for (ids, keys), words in zip(zip(rev["ids"], rev["keys"]), [{"gripping", "warm"}, {"dull", "boring", "clever"}]):
        marked = "|".join(tokenizer.decode(ids[k]) for k in keys)  # every token overlapping a lexicon word
        unmarked = tokenizer.decode(ids[[i for i in range(len(ids)) if i not in keys]])
        assert all(w in marked.replace("|", "") for w in words) and not any(w in unmarked for w in words)
    assert attention.encode_lexicon(tokenizer, ["the cat"], [1]).empty


def test_encode_pairs_keeps_only_aligned_single_token_differences(tokenizer):
    pairs = pd.DataFrame([
        {"a": "the cat is bad", "b": "the cat is good", "a_span": (11, 14), "b_span": (11, 15),
         "a_referent_span": (4, 7)},
        {"a": "the cat is a", "b": "the cat is the", "a_span": (11, 12), "b_span": (11, 14),
         "a_referent_span": None},
    ])
    enc = bias.encode_pairs(tokenizer, pairs)
    assert len(enc) + enc.dropped == 2
    for i in range(len(enc)):
        differ = torch.nonzero(enc.a[i] != enc.b[i])[:, 0].tolist()
        assert differ == [enc.pronoun[i]]
        assert enc.after_pronoun()[i] == list(range(enc.pronoun[i] + 1, len(enc.a[i])))


def test_lexicon_spans_and_instruction_pairs():
    text = "A dull, BORING film; the cast is great."
    assert [(text[a:b], p) for a, b, p in data.lexicon_spans(text)] == [
        ("dull", "negative"), ("BORING", "negative"), ("great", "positive")]
    assert not data.SENTIMENT_LEXICON["positive"] & data.SENTIMENT_LEXICON["negative"]
    pairs = data.instruction_pairs()
    assert len(pairs) == len(data.INSTRUCTION_ITEMS) * len(data.INSTRUCTION_FRAMES)
    for r in pairs.itertuples():
        (a, b), (c, d) = r.instruction_span, r.plain_span
        assert r.instruction[a:b] == r.plain[c:d] == r.directive
        assert r.instruction[b:] == r.plain[d:]  # the same words follow the directive


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------
def test_permutation_correlation():
    rng = np.random.default_rng(0)
    y = np.repeat([0.0, 1.0], 30)
    x = np.stack([y + 0.1 * rng.standard_normal(60), rng.standard_normal(60), np.ones(60)], 1)
    r, p, p_fw = metrics.permutation_correlation(x, y, n_perm=499, seed=1)
    assert r[0] > 0.9 and p[0] == pytest.approx(1 / 500) and p_fw[0] == pytest.approx(1 / 500)
    assert r[2] == 0.0 and p[2] == 1.0
    assert abs(r[1]) < 0.4 and p[1] > 0.01
    assert (p_fw >= p).all()
    r2, p2, _ = metrics.permutation_correlation(x, y, n_perm=499, seed=1)
    assert np.array_equal(p, p2)  # reproducible
    assert r[0] == pytest.approx(np.corrcoef(x[:, 0], y)[0, 1])
    with pytest.raises(ValueError, match="finite"):
        metrics.permutation_correlation(np.full((5, 1), np.nan), np.arange(5.0))


def test_head_label_test_is_the_permutation_pipeline_per_head():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    values = rng.standard_normal((40, 2, 3)).astype(np.float32)  # (n, L, H)
    values[:, 1, 2] += 2.0 * y  # L1H2 tracks the label
    length = rng.integers(5, 50, 40)
    values[:, 0, 1] = 0.1 * length + 0.01 * rng.standard_normal(40)  # L0H1 tracks only the length
    table = metrics.head_label_test(values, y, length, n_perm=199, seed=3)
    assert len(table) == 6 and (table["layer"].iloc[0], table["head"].iloc[0]) == (1, 2)
    assert table["r"].abs().is_monotonic_decreasing
    row = table.set_index(["layer", "head"]).loc[(1, 2)]
    x = values.reshape(40, -1)
    assert row["r"] == pytest.approx(np.corrcoef(x[:, 5], y)[0, 1])
    assert row["mass_positive"] == pytest.approx(x[y == 1, 5].mean())
    r, p, pfw = metrics.permutation_correlation(x, y, 199, seed=3)
    ra, pa, _ = metrics.permutation_correlation(metrics.residualize(x, length), y, 199, seed=3)
    by_col = table.assign(col=table["layer"] * 3 + table["head"]).set_index("col").sort_index()
    np.testing.assert_allclose(by_col["p"], p)
    np.testing.assert_allclose(by_col["q"], metrics.benjamini_hochberg(p))
    np.testing.assert_allclose(by_col["p_familywise"], pfw)
    np.testing.assert_allclose(by_col["r_adjusted"], ra)
    np.testing.assert_allclose(by_col["p_adjusted"], pa)
    assert "r_adjusted" not in metrics.head_label_test(values, y, n_perm=9).columns
    with pytest.raises(ValueError, match=r"\(n_items, n_layers, n_heads\)"):
        metrics.head_label_test(x, y)


def test_benjamini_hochberg_by_hand():
    q = metrics.benjamini_hochberg([0.01, 0.04, 0.03, 0.2])
    np.testing.assert_allclose(q, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    with pytest.raises(ValueError, match="p-values"):
        metrics.benjamini_hochberg([0.5, 1.5])


# --------------------------------------------------------------------------------------------------
# Top-k vs random-k ablation: sentence pairs (chapter 05) and label tokens
# --------------------------------------------------------------------------------------------------
def _head_scores(lm) -> pd.DataFrame:
    scores = pd.DataFrame({"layer": np.repeat(range(lm.n_layers), lm.n_heads),
                           "head": np.tile(range(lm.n_heads), lm.n_layers)})
    scores["score"] = np.arange(len(scores))[::-1] * 1.0  # L0H0 first
    return scores


def _toy_pairs(tokenizer):
    pairs = pd.DataFrame([
        {"a": "the cat sat and he ran in the park.", "b": "the cat sat and she ran in the park.",
         "a_span": (16, 18), "b_span": (16, 19), "a_referent_span": (4, 7)},
        {"a": "a dull film is his", "b": "a dull film is her", "a_span": (15, 18), "b_span": (15, 18),
         "a_referent_span": None},
        {"a": "the dog ran and him the", "b": "the dog ran and her the", "a_span": (16, 19),
         "b_span": (16, 19), "a_referent_span": (4, 7)},
    ])
    enc = bias.encode_pairs(tokenizer, pairs)
    assert len(enc) == 3
    return enc


def _sentence_logprob(lm, ids: torch.Tensor) -> torch.Tensor:
    """log p of every token after the first, from one plain batch-1 forward."""
    with torch.no_grad():
        logits = lm.model(input_ids=ids[None]).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pair_scores_are_whole_sentence_loglik_differences(tiny_factory, tokenizer, arch):
    lm, enc = tiny_factory(arch), _toy_pairs(tokenizer)
    got = bias.pair_scores(lm, enc, batch_size=2)
    assert set(got) == set(bias.PAIR_MEASURES)
    for i, p in enumerate(enc.pronoun):
        la, lb = _sentence_logprob(lm, enc.a[i]), _sentence_logprob(lm, enc.b[i])
        # the whole sentences: shared tokens before the pronoun contribute nothing
        assert float(la[:p - 1].sum() - lb[:p - 1].sum()) == pytest.approx(0.0, abs=1e-5)
        assert float(got["sentence"][i]) == pytest.approx(float(la.sum() - lb.sum()), abs=1e-4)
        assert float(got["pronoun"][i]) == pytest.approx(float(la[p - 1] - lb[p - 1]), abs=1e-5)
        assert float(got["after"][i]) == pytest.approx(float(la[p:].sum() - lb[p:].sum()), abs=1e-4)
        assert float(got["p_pair"][i]) == pytest.approx(float(la[p - 1].exp() + lb[p - 1].exp()), abs=1e-6)
    alone = [bias.pair_scores(lm, enc_i, batch_size=1) for enc_i in
             (bias.EncodedPairs([a], [b], [p], [r], [0], 0) for a, b, p, r in
              zip(enc.a, enc.b, enc.pronoun, enc.referent))]
    for name in bias.PAIR_MEASURES:  # one pair at a time == all pairs at once
        torch.testing.assert_close(got[name], torch.cat([x[name] for x in alone]), atol=1e-5, rtol=1e-4)
    swapped = bias.EncodedPairs(enc.b, enc.a, enc.pronoun, enc.referent, enc.index, 0)
    back = bias.pair_scores(lm, swapped)
    torch.testing.assert_close(back["sentence"], -got["sentence"], atol=1e-5, rtol=1e-4)


def test_pair_scores_refuse_a_pronoun_at_position_zero(tiny_factory, tokenizer):
    enc = _toy_pairs(tokenizer)
    bad = bias.EncodedPairs(enc.a, enc.b, [0, *enc.pronoun[1:]], enc.referent, enc.index, 0)
    with pytest.raises(ValueError, match="position 0"):
        bias.pair_scores(tiny_factory("llama"), bad)


def test_prefix_twins_flag_swapped_genders_only():
    pairs = pd.DataFrame({"prefix": ["x because", "x because", "y and told", "y and told", "z said"],
                          "a_male": [True, False, True, True, False]})
    assert bias.prefix_twins(pairs).tolist() == [True, True, False, False, False]
    with pytest.raises(ValueError, match="a_male"):
        bias.prefix_twins(pairs[["prefix"]])


@pytest.mark.data
def test_pair_scores_are_finite_on_the_real_probes(tiny_factory, tokenizer):
    pairs = data.bias_pairs("winobias", "dev").sample(40, random_state=0)
    enc = bias.encode_pairs(tokenizer, pairs)
    assert len(enc) == 40 and min(enc.pronoun) >= 1
    for name, v in bias.pair_scores(tiny_factory("llama"), enc).items():
        assert v.shape == (40,) and torch.isfinite(v).all(), name


def test_pair_ablation_sweep(tiny_factory, tokenizer, tmp_path):
    lm, enc = tiny_factory("llama"), _toy_pairs(tokenizer)
    scores = _head_scores(lm)
    kw = {"k_list": [0, 2], "n_random": 3, "seed": 0, "batch_size": 2, "progress": False,
          "items": pd.DataFrame({"type": [1, 2, 2]})}
    rows = ablation.pair_ablation_sweep(lm, enc, scores, "score", tmp_path / "s", **kw)
    assert len(rows) == (1 + 1 + 1 + 3) * len(enc)
    assert list(rows["type"][:3]) == [1, 2, 2]
    assert np.allclose(rows[rows["k"] == 0]["sentence_change"], 0.0)
    top = rows[(rows["set_type"] == "top") & (rows["k"] == 2)]
    assert set(top["members"]) == {"L0H0 L0H1"}
    with ablate_heads(lm, {0: [0, 1]}):
        want = bias.pair_scores(lm, enc)
    for name in bias.PAIR_MEASURES:
        np.testing.assert_allclose(top[name], want[name].numpy(), atol=1e-5)
    again = ablation.pair_ablation_sweep(lm, enc, scores, "score", tmp_path / "s", **kw)
    pd.testing.assert_frame_equal(rows, again)
    # a second ranking's random sets are the first one's (random heads ignore the scores)
    other = scores.assign(score=np.arange(len(scores)) * 1.0)
    rnd = {**kw, "set_types": ["random"]}
    pd.testing.assert_frame_equal(
        ablation.pair_ablation_sweep(lm, enc, other, "score", tmp_path / "o", **rnd)[["members", "sentence"]],
        rows[rows["set_type"] == "random"].reset_index(drop=True)[["members", "sentence"]])
    with pytest.raises(ValueError, match="items"):
        ablation.pair_ablation_sweep(lm, enc, scores, "score", tmp_path / "t", items=pd.DataFrame({"x": [1]}),
                                     progress=False)


def test_label_scorer_in_the_head_sweep(tiny_factory, tmp_path):
    lm = tiny_factory("llama")
    enc = engine.encode_prompts(lm, "", ["the cat sat on", "a dull film is", "the dog ran in the"])
    labels = engine.label_token_ids(lm, ["the", "a"])
    scores = _head_scores(lm)
    assert ablation.head_pool(scores, "score").top(3) == {0: [0, 1, 2]}
    measures = {"diff": lambda lp: (lp[:, 0] - lp[:, 1]).numpy()}
    score = ablation.label_scorer(lm, enc, labels, measures, batch_size=2)
    kw = {"key": {"labels": labels}, "items": pd.DataFrame(index=range(len(enc))), "k_list": [0, 2],
          "n_random": 3, "seed": 0, "progress": False}
    rows = ablation.head_ablation_sweep(lm, score, scores, "score", tmp_path / "s", **kw)
    assert len(rows) == (1 + 1 + 1 + 3) * len(enc)
    top = rows[(rows["set_type"] == "top") & (rows["k"] == 2)]
    with ablate_heads(lm, {0: [0, 1]}):
        lp = engine.label_logprobs(lm, enc, labels)
    np.testing.assert_allclose(top["diff"], (lp[:, 0] - lp[:, 1]).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        ablation.head_ablation_sweep(lm, score, scores, "score", tmp_path / "t", **kw, modes=["half"])
    with pytest.raises(ValueError, match="measures"):
        ablation.label_scorer(lm, enc, labels, {})


def test_text_pattern_stats_match_the_single_measures(tiny_factory, tokenizer):
    lm = tiny_factory("mistral")
    seqs = _texts(tokenizer)
    stats = attention.text_pattern_stats(lm, seqs, batch_size=2)
    torch.testing.assert_close(stats["entropy"], attention.text_entropy(lm, seqs), atol=1e-5, rtol=1e-4)
    first = attention.span_attention(lm, seqs, [list(range(1, len(s))) for s in seqs], [[0]] * len(seqs))
    torch.testing.assert_close(stats["first_token"], first, atol=1e-5, rtol=1e-4)


def test_residualize_removes_a_linear_covariate():
    rng = np.random.default_rng(0)
    z = rng.standard_normal(50)
    noise = rng.standard_normal((50, 2))
    res = metrics.residualize(np.column_stack([3 * z + 1, noise[:, 0]]) + 0 * noise, z)
    assert np.allclose(res[:, 0], 0.0, atol=1e-9)
    assert abs(np.corrcoef(res[:, 1], z)[0, 1]) < 1e-9


def test_span_attentions_equal_separate_runs_and_empty_keys_are_nan(tiny_factory, tokenizer):
    lm = tiny_factory("gpt2")
    seqs = _texts(tokenizer)
    last = [[len(s) - 1] for s in seqs]
    spans = {"first": (last, [[0]] * 4), "second": (last, [[1], [], [2], [1]])}
    both = attention.span_attentions(lm, seqs, spans, batch_size=2)
    torch.testing.assert_close(both["first"], attention.span_attention(lm, seqs, *spans["first"]))
    assert torch.isnan(both["second"][1]).all() and not torch.isnan(both["second"][[0, 2, 3]]).any()
    with pytest.raises(ValueError, match="spans is empty"):
        attention.span_attentions(lm, seqs, {})
