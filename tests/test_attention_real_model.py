"""Attention-pattern measures on the real embedded model (slow): entropy batch invariance with
padding, and the bias pairs lining up token by token under the real tokenizer."""

from __future__ import annotations

import pytest
import torch

from headlab import attention, bias, data


@pytest.mark.slow
def test_entropy_is_batch_invariant_with_padding_on_the_real_model(real_lm):
    texts = ["The cat sat on the mat.", "Please summarize the main argument of the article in two sentences.",
             "A dull, tedious film."]
    seqs = [torch.tensor(real_lm.tokenizer(t)["input_ids"]) for t in texts]
    batched = attention.text_entropy(real_lm, seqs, batch_size=3)  # right-padded to the longest
    alone = torch.cat([attention.text_entropy(real_lm, [s]) for s in seqs])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-3)
    assert ((batched > -1e-5) & (batched < 1 + 1e-5)).all()
    assert batched.std() > 0.05  # heads differ


@pytest.mark.slow
def test_bias_pairs_align_under_the_real_tokenizer(real_lm):
    pairs = data.bias_pairs("winobias")
    enc = bias.encode_pairs(real_lm.tokenizer, pairs)
    assert len(enc) >= 0.95 * len(pairs)
    for a, b, p in zip(enc.a[:50], enc.b[:50], enc.pronoun[:50]):
        assert torch.nonzero(a != b)[:, 0].tolist() == [p]
    assert all(enc.referent[:50])
