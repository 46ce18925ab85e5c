"""End-to-end checks on the real embedded model (SmolLM2-135M, GGUF). Run with ``pytest -m slow``."""

from __future__ import annotations

import pytest
import torch

from headlab import engine, perplexity
from headlab.data import load_sentiment, load_wikipedia, split_frame
from headlab.tasks import FORMATS, build_fewshot_prefix, sample_shots

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fewshot(real_lm):
    """4 real few-shot prompts (8 shots, the 'instructed' format) with queries of different lengths."""
    frame = load_sentiment()
    parts = split_frame(frame, {"pool": 40, "test": 4}, seed=0)
    fmt = FORMATS["instructed"]
    shots = sample_shots(parts["pool"], 8, seed=0)
    prefix = build_fewshot_prefix(shots, fmt)
    test = parts["test"]
    enc = engine.encode_prompts(real_lm, prefix, [fmt.query(t) for t in test["text"]])
    labels = engine.label_token_ids(real_lm, [fmt.word(lab) for lab in fmt.labels])
    assert len({len(q) for q in enc.queries}) > 1, "queries should need padding"
    return enc, labels, test


def test_prefix_cache_matches_uncached_on_real_prompts(real_lm, fewshot):
    enc, labels, _ = fewshot
    cached = engine.label_logprobs(real_lm, enc, labels, batch_size=4, use_prefix_cache=True)
    plain = engine.label_logprobs(real_lm, enc, labels, batch_size=4, use_prefix_cache=False)
    assert cached.shape == (4, 2)
    torch.testing.assert_close(cached, plain, atol=1e-4, rtol=0)
    alone = engine.label_logprobs(real_lm, enc, labels, batch_size=1, use_prefix_cache=True)
    torch.testing.assert_close(cached, alone, atol=1e-4, rtol=0)
    # The label words carry real probability mass after a few-shot prompt.
    assert float(cached.exp().sum(1).min()) > 0.3


def test_eager_and_sdpa_agree(real_lm, fewshot):
    enc, labels, _ = fewshot
    ids = enc.full(0)[None]
    model = real_lm.model
    assert model.config._attn_implementation == "eager"
    eager = model(ids).logits[0, -1]
    eager_lp = engine.label_logprobs(real_lm, enc, labels, batch_size=4)
    try:
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
        sdpa = model(ids).logits[0, -1]
        sdpa_lp = engine.label_logprobs(real_lm, enc, labels, batch_size=4)
    finally:
        model.set_attn_implementation("eager")
    torch.testing.assert_close(sdpa, eager, atol=1e-3, rtol=0)
    torch.testing.assert_close(sdpa_lp, eager_lp, atol=1e-3, rtol=0)
    assert int(sdpa.argmax()) == int(eager.argmax())


def test_real_model_perplexity_on_wikipedia_is_sane(real_lm):
    """A correctly dequantized 135M model reads English Wikipedia at a perplexity far below the
    vocabulary size (a broken conversion gives thousands)."""
    text = load_wikipedia()["text"].iloc[0][:2000]
    ids = torch.tensor(real_lm.tokenizer(text)["input_ids"][:300])
    nll, win = perplexity.token_nll(real_lm, ids, context=128, stride=64, batch_size=4)
    assert len(nll) == len(ids) - 1
    assert 1.5 < perplexity.perplexity(nll) < 60
    assert int(win.max()) >= 2
