"""headlab.engine on tiny random models: the prefix cache is exact, results do not depend on the batch,
strided perplexity scores every token once, greedy generation matches transformers' generate."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import plain_last_logprobs, sentiment_label_ids
from headlab import engine, perplexity
from headlab.engine import recompute
from headlab.tasks import FORMATS, build_fewshot_prefix

SHOTS = pd.DataFrame({
    "text": ["a gripping, funny and warm film.", "the plot is dull and the acting is worse.",
             "one of the best movies of the year.", "a tedious mess that never ends."],
    "label": ["positive", "negative", "positive", "negative"],
})
#: Queries of very different token lengths, so batches need padding.
QUERY_TEXTS = [
    "great",
    "boring, predictable and far too long; the cat sat on the mat and the dog ran in the park",
    "charming and clever",
    "a bird sang in the tree. awful.",
    "ok",
]


def _prompts(lm, fmt_name: str = "plain", instruction_only: bool = False):
    fmt = FORMATS[fmt_name]
    prefix = fmt.instruction if instruction_only else build_fewshot_prefix(SHOTS, fmt)
    return engine.encode_prompts(lm, prefix, [fmt.query(t) for t in QUERY_TEXTS])


# --------------------------------------------------------------------------------------------------
# Encoding and label ids
# --------------------------------------------------------------------------------------------------
def test_encode_prompts_concatenates_prefix_and_query(tiny_factory, tokenizer):
    lm = tiny_factory("llama")
    enc = _prompts(lm)
    assert len(enc) == len(QUERY_TEXTS)
    assert enc.prefix[0].item() == tokenizer.bos_token_id  # prefix keeps special tokens
    prefix_text = build_fewshot_prefix(SHOTS, FORMATS["plain"])
    assert enc.prefix.tolist() == tokenizer(prefix_text)["input_ids"]
    for q, text in zip(enc.queries, QUERY_TEXTS):
        assert tokenizer.bos_token_id not in q.tolist()  # queries do not
        assert q.tolist() == tokenizer(FORMATS["plain"].query(text), add_special_tokens=False)["input_ids"]
    assert enc.full(1).tolist() == enc.prefix.tolist() + enc.queries[1].tolist()
    sub = enc.subset([3, 0])
    assert len(sub) == 2 and torch.equal(sub.queries[0], enc.queries[3]) and torch.equal(sub.prefix, enc.prefix)


def test_encode_prompts_rejects_empty_query(tiny_factory):
    with pytest.raises(ValueError, match="at least one token"):
        engine.encode_prompts(tiny_factory("llama"), "Review: x\n\n", ["Review: ok", ""])


def test_label_token_ids(tiny_factory, tokenizer):
    lm = tiny_factory("llama")
    ids = engine.label_token_ids(lm, ["negative", "positive"])
    assert ids == [tokenizer(" negative", add_special_tokens=False)["input_ids"][0],
                   tokenizer(" positive", add_special_tokens=False)["input_ids"][0]]
    assert ids[0] != ids[1]
    assert tokenizer.decode(ids[1]).strip() == "positive"


def test_label_token_ids_multi_token_word_scores_its_first_token(tiny_factory, tokenizer):
    lm = tiny_factory("llama")
    with pytest.warns(UserWarning, match="unbelievably"):
        ids = engine.label_token_ids(lm, ["positive", "unbelievably"])
    assert ids[1] == tokenizer(" unbelievably", add_special_tokens=False)["input_ids"][0]


def test_label_token_ids_same_first_token_raises_naming_both(tiny_factory):
    """' positive' and ' positively' share their first token with the test tokenizer: scoring them would
    give identical numbers, so this is refused with both words and their tokens named."""
    lm = tiny_factory("llama")
    with pytest.raises(ValueError, match="'positive' and 'positively' start with the same token") as err, \
            pytest.warns(UserWarning):
        engine.label_token_ids(lm, ["positive", "positively"])
    assert "'l', 'y'" in str(err.value)


def test_label_token_ids_after_context_is_the_next_token(tiny_factory, tokenizer):
    """With the query's cue as context the id is the token that follows the cue in the full text (what a
    SentencePiece tokenizer with a separate space token would otherwise get wrong)."""
    lm = tiny_factory("llama")
    cue = FORMATS["plain"].query("")
    ids = engine.label_token_ids(lm, ["negative", "positive"], context=cue)
    for word, i in zip(["negative", "positive"], ids):
        full = tokenizer(cue + " " + word, add_special_tokens=False)["input_ids"]
        assert full[:-1] == tokenizer(cue, add_special_tokens=False)["input_ids"] and full[-1] == i
    assert ids == engine.label_token_ids(lm, ["negative", "positive"])  # this tokenizer: no difference


def test_label_token_ids_duplicate_raises(tiny_factory):
    with pytest.raises(ValueError, match="same token"):
        engine.label_token_ids(tiny_factory("llama"), ["positive", "positive"])


# --------------------------------------------------------------------------------------------------
# label_logprobs
# --------------------------------------------------------------------------------------------------
def test_prefix_cache_equals_no_cache(tiny_lm):
    enc, labels = _prompts(tiny_lm), sentiment_label_ids(tiny_lm)
    assert len(enc.prefix) > 20 and len({len(q) for q in enc.queries}) > 2
    cached = engine.label_logprobs(tiny_lm, enc, labels, batch_size=3, use_prefix_cache=True)
    plain = engine.label_logprobs(tiny_lm, enc, labels, batch_size=3, use_prefix_cache=False)
    assert cached.shape == (len(QUERY_TEXTS), 2) and cached.dtype == torch.float32
    assert torch.all(cached < 0)
    torch.testing.assert_close(cached, plain, atol=1e-4, rtol=0)
    # The numbers are not trivially equal across prompts (the model really reads the query).
    assert (cached[:, 1] - cached[:, 0]).std() > 1e-3


@pytest.mark.parametrize("use_prefix_cache", [True, False])
def test_batch_invariance(tiny_lm, use_prefix_cache):
    enc, labels = _prompts(tiny_lm), sentiment_label_ids(tiny_lm)
    alone = engine.label_logprobs(tiny_lm, enc, labels, batch_size=1, use_prefix_cache=use_prefix_cache)
    batched = engine.label_logprobs(tiny_lm, enc, labels, batch_size=len(enc),
                                    use_prefix_cache=use_prefix_cache)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    # A prompt's row does not depend on which other prompts share its batch.
    sub = engine.label_logprobs(tiny_lm, enc.subset([4, 1]), labels, batch_size=2,
                                use_prefix_cache=use_prefix_cache)
    torch.testing.assert_close(sub, alone[[4, 1]], atol=1e-5, rtol=0)


def test_matches_plain_forward(tiny_lm):
    enc, labels = _prompts(tiny_lm), sentiment_label_ids(tiny_lm)
    got = engine.label_logprobs(tiny_lm, enc, labels, batch_size=4)
    torch.testing.assert_close(got, plain_last_logprobs(tiny_lm, enc, labels), atol=1e-4, rtol=0)


def test_forward_last_returns_full_vocab_logits(tiny_lm):
    enc = _prompts(tiny_lm)
    kv = engine.prefix_kv(tiny_lm, enc.prefix)
    assert len(kv) == tiny_lm.n_layers
    for k, v in kv:
        assert k.shape[0] == 1 and k.shape[1] == tiny_lm.n_kv_heads and k.shape[-1] == tiny_lm.head_dim
        assert v.shape == k.shape
    cached = engine.forward_last(tiny_lm, enc, [0, 1], kv)
    plain = engine.forward_last(tiny_lm, enc, [0, 1], None)
    assert cached.shape == (2, tiny_lm.config.vocab_size)
    torch.testing.assert_close(cached, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,overrides", [
    ("gemma2", {"sliding_window": 6}),
    ("mistral", {"sliding_window": 6}),
    ("phi3", {"sliding_window": 6}),
    ("gemma3_text", {}),  # a local layer of 8 keys, then a global one
    ("gpt_neo", {}),  # the same, windows from GPT-Neo's own attention_layers / window_size
])
def test_prefix_cache_with_sliding_window_shorter_than_prefix(tiny_factory, arch, overrides):
    """Sliding-window layers (Mistral, Phi-3, Gemma 2/3's and GPT-Neo's local layers) must see the same keys with the prefix
    cache as without it, also for prompts that get padded in their batch. The window is counted
    in key *indices*, so pads placed between the cached prefix and a query would push prefix tokens
    out of the window; batch_size=2 pairs queries of different lengths."""
    lm = tiny_factory(arch, **overrides)
    enc, labels = _prompts(lm), sentiment_label_ids(lm)
    assert len(enc.prefix) > 6 * 3
    cached = engine.label_logprobs(lm, enc, labels, batch_size=2, use_prefix_cache=True)
    plain = plain_last_logprobs(lm, enc, labels)
    torch.testing.assert_close(cached, plain, atol=1e-4, rtol=0)


def test_instruction_only_and_empty_prefix(tiny_factory):
    lm = tiny_factory("qwen2")
    labels = sentiment_label_ids(lm)
    for enc in (_prompts(lm, "instructed", instruction_only=True), _prompts(lm, "plain", instruction_only=True)):
        got = engine.label_logprobs(lm, enc, labels, batch_size=2)
        torch.testing.assert_close(got, plain_last_logprobs(lm, enc, labels), atol=1e-4, rtol=0)
    empty = engine.encode_prompts(lm, "", ["Review: ok\nSentiment:"])
    assert len(empty.prefix) <= 1


def test_label_logprobs_empty_and_bad_batch(tiny_factory):
    lm = tiny_factory("llama")
    enc, labels = _prompts(lm), sentiment_label_ids(lm)
    assert engine.label_logprobs(lm, enc.subset([]), labels).shape == (0, 2)
    with pytest.raises(ValueError, match="batch_size"):
        engine.label_logprobs(lm, enc, labels, batch_size=0)


def test_logprob_difference_is_logit_difference(tiny_factory):
    lm = tiny_factory("gpt2")
    enc, labels = _prompts(lm), sentiment_label_ids(lm)
    lp = engine.label_logprobs(lm, enc, labels)
    logits = torch.stack([lm.model(enc.full(i)[None]).logits[0, -1] for i in range(len(enc))])
    torch.testing.assert_close(lp[:, 1] - lp[:, 0], logits[:, labels[1]] - logits[:, labels[0]],
                               atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# token_nll / perplexity
# --------------------------------------------------------------------------------------------------
N_STREAM = 37


def _stream(n: int = N_STREAM, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 200, (n,), generator=g)


def _one_forward_nll(lm, ids: torch.Tensor) -> torch.Tensor:
    """NLL of tokens 1..len-1 of ``ids`` from a single forward (the hand computation)."""
    logp = torch.log_softmax(lm.model(ids[None]).logits[0, :-1].float(), -1)
    return -logp.gather(-1, ids[1:, None])[:, 0]


@pytest.mark.parametrize("context", [N_STREAM, 64])
def test_token_nll_single_window_is_one_forward(tiny_factory, context):
    lm = tiny_factory("llama")
    ids = _stream()
    nll, win = perplexity.token_nll(lm, ids, context=context, stride=context // 2)
    torch.testing.assert_close(nll, _one_forward_nll(lm, ids), atol=1e-5, rtol=1e-5)
    assert torch.all(win == 0)
    assert perplexity.perplexity(nll) == pytest.approx(float(torch.exp(nll.double().mean())))


CONTEXT_STRIDE = [(8, 8), (8, 4), (8, 3), (8, 1), (10, 7), (16, 5), (36, 36), (40, 13)]


@pytest.mark.parametrize("context,stride", CONTEXT_STRIDE)
def test_token_nll_scores_every_position_once_in_order(tiny_factory, context, stride):
    """With the attention output projections zeroed, a token's prediction depends only on the
    previous token, so the NLL of position ``p`` is the same in every window. Every position
    1..N-1 must then appear exactly once, in order (the values are distinct).

    ``stride == context`` (allowed by the docstring and the argument check) is included: there the
    first token of every later window has no prediction inside that window."""
    lm = tiny_factory("llama", seed=1)
    with torch.no_grad():
        for layer in range(lm.n_layers):
            lm.layer_module(layer, "attn_out").weight.zero_()
    ids = _stream()
    reference = _one_forward_nll(lm, ids)
    assert len(set(reference.round(decimals=4).tolist())) == N_STREAM - 1  # distinct values
    for batch_size in (1, 3, 64):
        nll, win = perplexity.token_nll(lm, ids, context=context, stride=stride, batch_size=batch_size)
        assert nll.shape == win.shape == (N_STREAM - 1,)
        torch.testing.assert_close(nll, reference, atol=1e-5, rtol=1e-5)
        assert win[0] == 0 and torch.all(win.diff() >= 0) and torch.all(win.diff() <= 1)


@pytest.mark.parametrize("context,stride", [cs for cs in CONTEXT_STRIDE if cs != (8, 8)])
def test_token_nll_left_context(tiny_factory, context, stride):
    """With a context-dependent model, each window's tokens are scored inside one full window of
    ``context`` tokens, and every token has at least ``context - stride`` tokens of left context
    (or all of them, for tokens of the first window)."""
    lm = tiny_factory("llama", seed=2)
    ids = _stream(seed=1)
    nll, win = perplexity.token_nll(lm, ids, context=context, stride=stride, batch_size=4)
    assert nll.shape == (N_STREAM - 1,)
    # NLL of position p when the window starts at s: table[s][p]
    starts = list(range(0, max(N_STREAM - context, 0) + 1))
    windows = torch.stack([ids[s:s + context] for s in starts])
    logp = torch.log_softmax(lm.model(windows).logits[:, :-1].float(), -1)
    table = {}
    for row, s in enumerate(starts):
        tok = -logp[row].gather(-1, windows[row, 1:, None])[:, 0]
        for j in range(len(tok)):
            table[(s, s + j + 1)] = tok[j]
    positions = torch.arange(1, N_STREAM)  # proven in order by the previous test
    for w in win.unique().tolist():
        ps = positions[win == w].tolist()
        feasible = [s for s in starts
                    if all((s, p) in table and abs(float(table[(s, p)] - nll[p - 1])) < 1e-4 for p in ps)]
        assert feasible, f"window {w} (positions {ps}) matches no single window of the stream"
        assert any(all(p - s >= min(p, context - stride) for p in ps) for s in feasible), (
            f"window {w}: tokens {ps} scored with less than context - stride = {context - stride} "
            "tokens of left context"
        )


@pytest.mark.parametrize("context,stride", [(8, 0), (8, 9), (8, -1), (0, 0)])
def test_token_nll_bad_stride(tiny_factory, context, stride):
    with pytest.raises(ValueError, match="stride"):
        perplexity.token_nll(tiny_factory("llama"), _stream(), context=context, stride=stride)


def test_token_nll_too_short(tiny_factory):
    with pytest.raises(ValueError, match="2 tokens"):
        perplexity.token_nll(tiny_factory("llama"), _stream(1), context=8, stride=4)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gemma2"])
def test_token_nll_other_archs_single_window(tiny_factory, arch):
    lm = tiny_factory(arch)
    ids = _stream(20)
    nll, _ = perplexity.token_nll(lm, ids, context=32, stride=16)
    torch.testing.assert_close(nll, _one_forward_nll(lm, ids), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Recompute from a layer: keep the clean block inputs once, start later passes at block l
# --------------------------------------------------------------------------------------------------
def _rows(n: int = 5, s: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randint(4, 200, (n, s), generator=torch.Generator().manual_seed(seed))


def _ragged_mask(ids: torch.Tensor) -> torch.Tensor:
    """Right padding of different lengths (row i keeps s - i tokens)."""
    n, s = ids.shape
    return (torch.arange(s)[None] < (s - torch.arange(n))[:, None]).long()


def _forward(lm, ids, mask, batch_size, **kw):
    return torch.cat([logits for _, logits, _ in recompute.forward_rows(lm, ids, mask, batch_size=batch_size, **kw)])


@pytest.mark.parametrize("masked", [False, True])
def test_forward_from_every_layer_equals_the_full_forward(tiny_lm, masked):
    """Starting at block l from the kept clean inputs is the full forward, bit for bit (same batches),
    for every architecture and layer; so is the clean pass that keeps them."""
    ids = _rows()
    mask = _ragged_mask(ids) if masked else None
    full = _forward(tiny_lm, ids, mask, 2)
    kept = [k for _, _, k in recompute.forward_rows(tiny_lm, ids, mask, batch_size=2, keep=range(tiny_lm.n_layers))]
    clean = recompute.BlockInputs.cat(kept)
    assert set(clean.hidden) == set(range(1, tiny_lm.n_layers))  # block 0 needs no kept input
    for layer in range(tiny_lm.n_layers):
        assert torch.equal(_forward(tiny_lm, ids, mask, 2, from_layer=layer, clean=clean), full), layer
    assert all("forward" not in block.__dict__ for block in tiny_lm.layers)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_forward_from_the_edited_layer_equals_the_edited_full_forward(tiny_factory, arch):
    """Under an edit in layer l (heads ablated there), the pass from l equals the full forward under the
    edit, and differs from the clean one; the token-row and window scorers agree with their full forms."""
    from headlab.interventions import ablate_heads

    lm = tiny_factory(arch, num_hidden_layers=4)
    ids = _rows(6, 10)
    nll, clean = perplexity.losses_keeping_inputs(lm, ids, [1, 2, 3], batch_size=4)
    assert torch.equal(nll, perplexity.token_losses(lm, ids, batch_size=4))
    stream = _stream(90)
    windows = perplexity.text_windows(lm, stream, context=32, stride=20, batch_size=2)
    for layer in (1, 2, 3):
        with ablate_heads(lm, {layer: [0, 3]}):
            full = perplexity.token_losses(lm, ids, batch_size=4)
            assert torch.equal(perplexity.losses_from(lm, ids, layer, clean, 4), full)
            full_nll = perplexity.token_nll(lm, stream, context=32, stride=20, batch_size=2)
            part_nll = perplexity.windows_nll(lm, windows, from_layer=layer)
        assert not torch.allclose(full, nll)
        assert torch.equal(part_nll[0], full_nll[0]) and torch.equal(part_nll[1], full_nll[1])


def test_recompute_refuses_what_was_not_kept(tiny_factory):
    lm = tiny_factory("llama", num_hidden_layers=3)
    ids = _rows()
    _, clean = perplexity.losses_keeping_inputs(lm, ids, [2], batch_size=2)
    with pytest.raises(ValueError, match=r"blocks \[2\], not of block 1"):
        perplexity.losses_from(lm, ids, 1, clean, 2)
    with pytest.raises(ValueError, match="from_layer=3 out of range 0..2"):
        perplexity.losses_from(lm, ids, 3, clean, 2)
    with pytest.raises(ValueError, match="from_layer=1 needs the clean block inputs"):
        _forward(lm, ids, None, 2, from_layer=1)
    windows = perplexity.text_windows(lm, _stream(), context=16, stride=8, keep_inputs=False)
    assert windows.inputs is None
    with pytest.raises(ValueError, match="keep_inputs=True"):
        perplexity.windows_nll(lm, windows, from_layer=1)
    assert all("forward" not in block.__dict__ for block in lm.layers)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())


def test_skip_and_keep_are_undone_after_an_error(tiny_factory):
    lm = tiny_factory("llama", num_hidden_layers=3)
    ids = _rows()
    _, clean = perplexity.losses_keeping_inputs(lm, ids, [2], batch_size=5)
    with pytest.raises(RuntimeError, match="boom"):
        with recompute.skip_layers_before(lm, 2, clean.at(2)), recompute.keep_block_inputs(lm, [1, 2]):
            assert len(lm.layers[0]._forward_hooks) == 1 and "forward" in lm.layers[1].__dict__
            raise RuntimeError("boom")
    assert all("forward" not in block.__dict__ for block in lm.layers)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())


def test_perplexity_functions_have_the_shapes_they_declare(tiny_factory):
    """The jaxtyping signatures of the scorers, checked at run time."""
    from beartype import beartype
    from jaxtyping import jaxtyped

    lm = tiny_factory("llama")
    ids = _rows(3, 9)
    check = jaxtyped(typechecker=beartype)
    assert check(perplexity.token_losses)(lm, ids).shape == (3, 8)
    nll, window = check(perplexity.token_nll)(lm, _stream(), context=16, stride=8)
    assert nll.shape == window.shape == (N_STREAM - 1,)
    assert check(perplexity.windows_nll)(lm, check(perplexity.text_windows)(lm, _stream(), 16, 8))[0].shape == nll.shape


# --------------------------------------------------------------------------------------------------
# Greedy generation
# --------------------------------------------------------------------------------------------------
def _hf_generate(lm, enc, max_new_tokens):
    texts, n_new = [], []
    for i in range(len(enc)):
        ids = enc.full(i)[None]
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=None, pad_token_id=lm.tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:]
        n_new.append(len(new))
        texts.append(lm.tokenizer.decode(new, skip_special_tokens=True))
    return texts, n_new


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("prefix", ["Review: good.\nSentiment: positive\n\n", ""])
def test_generate_greedy_matches_hf_generate(tiny_factory, tokenizer, arch, prefix):
    # Model vocabulary == tokenizer vocabulary, so every generated token decodes to visible text.
    lm = tiny_factory(arch, seed=4, vocab_size=len(tokenizer))
    enc = engine.encode_prompts(lm, prefix, [FORMATS["plain"].query(t) for t in QUERY_TEXTS[:3]])
    got = engine.generate_greedy(lm, enc, max_new_tokens=3)
    expected, n_new = _hf_generate(lm, enc, 3)
    assert n_new == [3] * len(enc)
    assert got == expected
    assert all(len(t) > 0 for t in got)
