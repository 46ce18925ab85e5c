"""Batched forward passes: label-token scoring with a shared-prefix KV cache, perplexity, greedy labels.

Few-shot prompts share one long prefix (instruction + shots) and differ only in a short query. The
prefix is run once; its keys/values are broadcast to every batch and only the query tokens are
computed. Queries are right-padded and read at their own last real token, with explicit position
ids, so a prompt's result does not depend on the other prompts in its batch.

Tokenisation is defined as ``ids(prefix) + ids(query)`` (the query tokenised without special
tokens) in every code path, cached or not, so the two paths score exactly the same token sequence.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import DynamicCache

from headlab.models import LoadedModel

__all__ = [
    "EncodedPrompts",
    "encode_prompts",
    "forward_last",
    "generate_greedy",
    "label_token_ids",
    "label_logprobs",
    "perplexity",
    "prefix_kv",
    "token_nll",
]


@dataclass
class EncodedPrompts:
    """Token ids of prompts that share one prefix.

    Attributes:
        prefix: ``(P,)`` ids of the shared prefix (with the tokenizer's special tokens, if it adds any).
        queries: one ``(Q_i,)`` tensor per prompt.
    """

    prefix: Int[Tensor, " P"]
    queries: list[Int[Tensor, " Q"]]

    def __len__(self) -> int:
        return len(self.queries)

    def full(self, i: int) -> Int[Tensor, " T"]:
        """The whole token sequence of prompt ``i``."""
        return torch.cat([self.prefix, self.queries[i]])

    def subset(self, index: Sequence[int]) -> EncodedPrompts:
        return EncodedPrompts(self.prefix, [self.queries[i] for i in index])


def encode_prompts(lm: LoadedModel, prefix: str, queries: Sequence[str]) -> EncodedPrompts:
    """Tokenise a shared ``prefix`` (with special tokens) and each query (without)."""
    tok = lm.tokenizer
    pre = tok(prefix, add_special_tokens=True)["input_ids"] if prefix else []
    if not prefix and tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
        pre = [tok.bos_token_id]
    qs = [torch.tensor(tok(q, add_special_tokens=False)["input_ids"], dtype=torch.long) for q in queries]
    if any(len(q) == 0 for q in qs):
        raise ValueError("Every query must contain at least one token.")
    return EncodedPrompts(torch.tensor(pre, dtype=torch.long), qs)


def label_token_ids(lm: LoadedModel, words: Sequence[str], leading_space: bool = True) -> list[int]:
    """Token id of each label word (``" positive"`` when ``leading_space``).

    Raises:
        ValueError: a word that is not a single token, naming it and its tokens.
    """
    ids = []
    for w in words:
        text = (" " + w) if leading_space else w
        toks = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            pieces = lm.tokenizer.convert_ids_to_tokens(toks)
            raise ValueError(f"Label word {text!r} is {len(toks)} tokens {pieces}; choose single-token labels.")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"Label words {list(words)} map to the same token ids {ids}.")
    return ids


# --------------------------------------------------------------------------------------------------
# Shared-prefix KV cache
# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def prefix_kv(lm: LoadedModel, prefix: Int[Tensor, " P"]) -> list[tuple[Tensor, Tensor]]:
    """Run the prefix once and return each layer's ``(keys, values)``, shape ``(1, n_kv, P, d_head)``."""
    out = lm.model(prefix[None].to(lm.device), use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def _cache_for_batch(lm: LoadedModel, kv: list[tuple[Tensor, Tensor]], batch: int) -> DynamicCache:
    """A fresh cache holding the prefix keys/values broadcast to ``batch`` rows (no copy)."""
    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
    return DynamicCache(ddp_cache_data=data, config=lm.model.config)


def _pad_right(seqs: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D id tensors into ``(B, S)`` ids and a 0/1 mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def _batches(n: int, size: int) -> Iterator[range]:
    if size <= 0:
        raise ValueError(f"batch_size={size} must be positive.")
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


@torch.inference_mode()
def forward_last(
    lm: LoadedModel,
    enc: EncodedPrompts,
    rows: Sequence[int],
    kv: list[tuple[Tensor, Tensor]] | None,
) -> Float[Tensor, "B vocab"]:
    """Logits at the last real token of prompts ``rows`` (one forward, right padding).

    With ``kv`` (from :func:`prefix_kv`) only the query tokens are computed; without, the whole
    prompt is run. Both give the same numbers up to float rounding.
    """
    pad = lm.tokenizer.pad_token_id or 0
    dev = lm.device
    if kv is None:
        seqs = [enc.full(i) for i in rows]
        offset = 0
    else:
        seqs = [enc.queries[i] for i in rows]
        offset = len(enc.prefix)
    ids, mask = _pad_right(seqs, pad)
    b, s = ids.shape
    position_ids = (offset + torch.arange(s)).expand(b, s)
    kwargs = {}
    if kv is not None:
        kwargs["past_key_values"] = _cache_for_batch(lm, kv, b)
        mask = torch.cat([torch.ones(b, offset, dtype=torch.long), mask], dim=1)
    out = lm.model(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=position_ids.to(dev),
        use_cache=kv is not None,
        **kwargs,
    )
    lengths = torch.tensor([len(x) for x in seqs], device=dev)
    return out.logits[torch.arange(b, device=dev), lengths - 1].float()


def label_logprobs(
    lm: LoadedModel,
    enc: EncodedPrompts,
    label_ids: Sequence[int],
    batch_size: int = 16,
    use_prefix_cache: bool = True,
) -> Float[Tensor, "n n_labels"]:
    """Log-probabilities (softmax over the full vocabulary) of each label token after each prompt.

    Args:
        lm: the model.
        enc: prompts from :func:`encode_prompts`.
        label_ids: token ids of the labels, from :func:`label_token_ids`.
        batch_size: prompts per forward pass.
        use_prefix_cache: compute the shared prefix once (exact; disable only to check that).

    Returns:
        ``(n_prompts, n_labels)`` float32 tensor on the CPU. The logit difference between two labels is
        the difference of their columns (the softmax normaliser cancels).
    """
    kv = prefix_kv(lm, enc.prefix) if use_prefix_cache and len(enc.prefix) else None
    idx = torch.tensor(list(label_ids))
    out = []
    for rows in _batches(len(enc), batch_size):
        logits = forward_last(lm, enc, rows, kv)
        out.append(torch.log_softmax(logits, dim=-1)[:, idx.to(logits.device)].cpu())
    return torch.cat(out) if out else torch.empty(0, len(idx))


# --------------------------------------------------------------------------------------------------
# Greedy generation (the seeds' way of reading the answer; kept for comparison)
# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate_greedy(lm: LoadedModel, enc: EncodedPrompts, max_new_tokens: int = 3) -> list[str]:
    """Greedy continuation of each prompt, decoded to text (one prompt at a time, prefix cached)."""
    kv = prefix_kv(lm, enc.prefix) if len(enc.prefix) else None
    texts = []
    for i in range(len(enc)):
        cache = _cache_for_batch(lm, kv, 1) if kv is not None else DynamicCache(config=lm.model.config)
        ids = enc.queries[i][None].to(lm.device)
        pos = len(enc.prefix)
        new: list[int] = []
        for _ in range(max_new_tokens):
            positions = (pos + torch.arange(ids.shape[1], device=lm.device))[None]
            out = lm.model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)
            nxt = int(out.logits[0, -1].argmax())
            new.append(nxt)
            pos += ids.shape[1]
            cache = out.past_key_values
            ids = torch.tensor([[nxt]], device=lm.device)
        texts.append(lm.tokenizer.decode(new, skip_special_tokens=True))
    return texts


# --------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def token_nll(
    lm: LoadedModel,
    ids: Int[Tensor, " N"],
    context: int = 512,
    stride: int = 256,
    batch_size: int = 8,
) -> tuple[Float[Tensor, " M"], Int[Tensor, " M"]]:
    """Per-token negative log-likelihood of a long token stream with a sliding window.

    Windows of ``context`` tokens start every ``stride`` tokens; each token is scored once, in the
    first window where it has at least ``context - stride`` tokens of left context (all tokens of
    the first window are scored with whatever context they have). This is the usual strided
    perplexity evaluation.

    Args:
        lm: the model.
        ids: the token stream.
        context: window length in tokens.
        stride: step between windows, ``0 < stride <= context``.
        batch_size: windows per forward pass.

    Returns:
        ``(nll, window)``: NLL in nats of each scored token (the first token is never scored) and the
        index of the window that scored it (for block-bootstrap confidence intervals).
    """
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must satisfy 0 < stride <= context={context}.")
    n = len(ids)
    if n < 2:
        raise ValueError("Need at least 2 tokens to score.")
    starts = list(range(0, max(n - context, 0) + 1, stride))
    if starts[-1] + context < n:
        starts.append(n - context)
    nll, win = [], []
    scored_upto = 1  # token 0 has no prediction
    spans = []
    for w, s in enumerate(starts):
        e = min(s + context, n)
        first = max(scored_upto, s + 1)
        spans.append((w, s, e, first))
        scored_upto = e
    for rows in _batches(len(spans), batch_size):
        chunk = [spans[r] for r in rows]
        width = max(e - s for _, s, e, _ in chunk)
        x = torch.stack([torch.nn.functional.pad(ids[s:e], (0, width - (e - s))) for _, s, e, _ in chunk])
        mask = torch.stack([(torch.arange(width) < e - s).long() for _, s, e, _ in chunk])
        logits = lm.model(input_ids=x.to(lm.device), attention_mask=mask.to(lm.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = x[:, 1:].to(lm.device)
        tok_nll = -logp.gather(-1, tgt[..., None])[..., 0].cpu()  # (b, width-1): nll of token t+1
        for j, (w, s, e, first) in enumerate(chunk):
            # token at absolute position p is predicted at row position p - s - 1
            sel = tok_nll[j, first - s - 1 : e - s - 1]
            nll.append(sel)
            win.append(torch.full((len(sel),), w, dtype=torch.long))
    return torch.cat(nll), torch.cat(win)


def perplexity(nll: Tensor) -> float:
    """``exp(mean NLL)``."""
    return math.exp(float(nll.double().mean()))
