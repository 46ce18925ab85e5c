"""Batched forward passes: label-token scoring with a shared-prefix KV cache, and greedy labels.

Few-shot prompts share one long prefix (instruction + shots) and differ only in a short query. The
prefix is run once; its keys/values are broadcast to every batch and only the query tokens are
computed. Queries are left-padded with explicit position ids (pads masked), so every prompt's real
tokens sit at the same positions as when it runs alone and its result does not depend on the other
prompts in its batch; the unembedding runs for the last position only.

Tokenisation is defined as ``ids(prefix) + ids(query)`` (the query tokenised without special
tokens) in every code path, cached or not, so the two paths score exactly the same token sequence.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import DynamicCache

from headlab.models import LoadedModel
from headlab.progress import track

__all__ = [
    "EncodedPrompts",
    "batches",
    "chunks",
    "encode_prompts",
    "forward_last",
    "generate_greedy",
    "label_logprobs",
    "label_token_ids",
    "needs_equal_lengths",
    "pad_left",
    "prefix_kv",
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
    if isinstance(queries, str) or not len(queries):
        raise ValueError(f"queries={queries!r}: give a non-empty list of prompt texts.")
    tok = lm.tokenizer
    pre = tok(prefix, add_special_tokens=True)["input_ids"] if prefix else []
    if not prefix and tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
        pre = [tok.bos_token_id]
    qs = [torch.tensor(tok(q, add_special_tokens=False)["input_ids"], dtype=torch.long) for q in queries]
    if any(len(q) == 0 for q in qs):
        raise ValueError("Every query must contain at least one token.")
    return EncodedPrompts(torch.tensor(pre, dtype=torch.long), qs)


def label_token_ids(lm: LoadedModel, words: Sequence[str], leading_space: bool = True,
                    context: str = "") -> list[int]:
    """The token each label word starts with, as the model would write it after ``context``.

    Tokenizers split label words differently (`` positive`` is one token in GPT-2's vocabulary and two
    in others; SentencePiece tokenizers may mark the leading space as a token of its own). The label's
    id is the first token that tokenising ``context + " " + word`` adds after the tokens of
    ``context`` (the query's cue, e.g. ``"Sentiment:"``); a word of several tokens is scored by that
    first token, with a warning naming its pieces. Without a context (or when the context's tokens
    change at the boundary) the word is tokenised on its own.

    Raises:
        ValueError: two words that start with the same token (their scores would be identical),
            naming both words and their tokens; a word that adds no token.
    """
    tok = lm.tokenizer

    def ids(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    base = ids(context) if context else []
    out, pieces = [], []
    for w in words:
        text = (" " + w) if leading_space else w
        full = ids(context + text) if context else ids(text)
        toks = full[len(base):] if full[:len(base)] == base else ids(text)
        if not toks:
            raise ValueError(f"Label word {text!r} adds no token after {context!r} for this tokenizer.")
        pieces.append(tok.convert_ids_to_tokens(toks))
        if len(toks) > 1:
            warnings.warn(f"Label word {text!r} is {len(toks)} tokens {pieces[-1]} for this tokenizer; it is "
                          f"scored by its first token {pieces[-1][0]!r}.", stacklevel=2)
        out.append(toks[0])
    for i in range(len(out)):
        for j in range(i):
            if out[i] == out[j]:
                raise ValueError(
                    f"Label words {words[j]!r} and {words[i]!r} start with the same token {pieces[i][0]!r} "
                    f"(id {out[i]}) for this tokenizer (tokens {pieces[j]} and {pieces[i]}), so their scores "
                    "would be identical. Choose label words whose first tokens differ.")
    return out


# --------------------------------------------------------------------------------------------------
# Shared-prefix KV cache
# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def prefix_kv(lm: LoadedModel, prefix: Int[Tensor, " P"]) -> list[tuple[Tensor, Tensor]]:
    """Run the prefix once and return each layer's ``(keys, values)``, shape ``(1, n_kv, P, d_head)``."""
    out = lm.model(prefix[None].to(lm.device), use_cache=True)
    return [(layer.keys, layer.values) for layer in lm.cache_of(out).layers]


def cache_for_batch(lm: LoadedModel, kv: list[tuple[Tensor, Tensor]], batch: int) -> DynamicCache:
    """A fresh cache holding the prefix keys/values broadcast to ``batch`` rows (no copy)."""
    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
    return DynamicCache(ddp_cache_data=data, config=lm.model.config)


def pad_left(seqs: Sequence[Tensor], pad_id: int, offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad 1-D id tensors into ``(B, S)`` ids, a 0/1 mask and explicit position ids.

    Real tokens of every row get positions ``offset, offset + 1, ...`` whatever the padding, so a row's
    result does not depend on the longest row of its batch; pads get position ``offset`` and are
    masked out. With left padding every row's last real token sits at index ``S - 1``, so the
    unembedding runs for that one position only.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pos = torch.full((len(seqs), width), offset, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        ids[i, width - n:] = s
        mask[i, width - n:] = 1
        pos[i, width - n:] = offset + torch.arange(n)
    return ids, mask, pos


def batches(n: int, size: int) -> Iterator[range]:
    if size <= 0:
        raise ValueError(f"batch_size={size} must be positive.")
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def needs_equal_lengths(lm: LoadedModel, enc: EncodedPrompts) -> bool:
    """True when a sliding window could reach back past pads between the prefix and a query.

    transformers counts windows in cache indices, so with a cached prefix the left pads of a shorter
    query would sit inside its window: some layer's window (:attr:`LoadedModel.layer_windows`) is
    shorter than prefix + longest query. ALiBi (BLOOM, Falcon-RW) needs no such care: those models
    build the bias from the cumulative sum of the attention mask, i.e. from real positions.
    """
    window = lm.sliding_window
    longest = max((len(q) for q in enc.queries), default=0)
    return window is not None and window < len(enc.prefix) + longest


def chunks(items: Sequence, lengths: Sequence[int], size: int, equal: bool) -> Iterator[list]:
    """Split ``items`` into batches of at most ``size``; with ``equal``, only items of equal
    ``lengths`` share a batch (stable order within each length)."""
    if size <= 0:
        raise ValueError(f"batch_size={size} must be positive.")
    if not equal:
        for start in range(0, len(items), size):
            yield list(items[start:start + size])
        return
    by_len: dict[int, list] = {}
    for item, n in zip(items, lengths):
        by_len.setdefault(int(n), []).append(item)
    for group in by_len.values():
        for start in range(0, len(group), size):
            yield group[start:start + size]


@torch.inference_mode()
def forward_last(
    lm: LoadedModel,
    enc: EncodedPrompts,
    rows: Sequence[int],
    kv: list[tuple[Tensor, Tensor]] | None,
) -> Float[Tensor, "B vocab"]:
    """Logits at the last real token of prompts ``rows`` (one forward, left padding).

    With ``kv`` (from :func:`prefix_kv`) only the query tokens are computed; without, the whole
    prompt is run. Both give the same numbers up to float rounding (for sliding-window models the
    rows are run in groups of equal query length, see :meth:`LoadedModel.sliding_window`).
    """
    rows = list(rows)
    if kv is not None and needs_equal_lengths(lm, enc):
        lengths = [len(enc.queries[i]) for i in rows]
        if len(set(lengths)) > 1:
            groups = list(chunks(list(range(len(rows))), lengths, len(rows), equal=True))
            logits = torch.cat([forward_last(lm, enc, [rows[j] for j in g], kv) for g in groups])
            order = torch.tensor([j for g in groups for j in g])
            return logits[torch.argsort(order).to(logits.device)]
    pad = lm.tokenizer.pad_token_id or 0
    dev = lm.device
    offset = 0 if kv is None else len(enc.prefix)
    seqs = [enc.full(i) if kv is None else enc.queries[i] for i in rows]
    ids, mask, positions = pad_left(seqs, pad, offset)
    b = ids.shape[0]
    kwargs = {}
    if kv is not None:
        kwargs.update(lm.with_cache(cache_for_batch(lm, kv, b)))
        mask = torch.cat([torch.ones(b, offset, dtype=torch.long), mask], dim=1)
    out = lm.model(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=positions.to(dev),
        use_cache=kv is not None,
        logits_to_keep=1,
        **kwargs,
    )
    return out.logits[:, -1].float()


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
    for rows in batches(len(enc), batch_size):
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
    for i in track(range(len(enc)), "greedy generation", unit="prompt"):
        cache = cache_for_batch(lm, kv, 1) if kv is not None else DynamicCache(config=lm.model.config)
        ids = enc.queries[i][None].to(lm.device)
        pos = len(enc.prefix)
        new: list[int] = []
        for _ in range(max_new_tokens):
            positions = (pos + torch.arange(ids.shape[1], device=lm.device))[None]
            out = lm.model(input_ids=ids, position_ids=positions, use_cache=True, **lm.with_cache(cache))
            nxt = int(out.logits[0, -1].argmax())
            new.append(nxt)
            pos += ids.shape[1]
            cache = lm.cache_of(out)
            ids = torch.tensor([[nxt]], device=lm.device)
        texts.append(lm.tokenizer.decode(new, skip_special_tokens=True))
    return texts


