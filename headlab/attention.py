"""Attention patterns of a model, reduced as they are produced: scores, entropy, mass on token spans.

:func:`attention_scores` runs the model over a batch with ``output_attentions=True`` (the model must use
``attn_implementation="eager"``; sdpa returns no weights) and reduces each layer's pattern right away,
so the full ``(batch, layer, head, seq, seq)`` tensor never exists; :func:`reduce_patterns` does the
same for sequences of different lengths. Pattern statistics: normalised entropy
(:func:`attention_entropy`), mass from query tokens onto key spans (:func:`span_mass`). Per-head
output statistics of the clean model (:func:`head_output_means`, :func:`head_write_norms`) give the
references that mean ablation and head pruning use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from headlab import data
from headlab.interventions import capture
from headlab.models import LoadedModel
from headlab.progress import track

__all__ = [
    "PatternFn",
    "attention_entropy",
    "attention_patterns",
    "attention_scores",
    "encode_lexicon",
    "encode_spans",
    "head_output_means",
    "head_write_norms",
    "reduce_patterns",
    "scores_frame",
    "span_attention",
    "span_attentions",
    "span_mass",
    "text_entropy",
    "text_pattern_stats",
]

PatternFn = Callable[[Float[Tensor, "*b q k"]], Float[Tensor, "*b"]]


# --------------------------------------------------------------------------------------------------
# Patterns of a model
# --------------------------------------------------------------------------------------------------
def _attentions(lm: LoadedModel, ids: Int[Tensor, "b s"]) -> tuple[Tensor, ...]:
    out = lm.model(input_ids=ids.to(lm.device), output_attentions=True)
    att = out.attentions
    if att is None or len(att) != lm.n_layers or any(a is None for a in att):
        impl = getattr(lm.model.config, "_attn_implementation", "?")
        raise ValueError(f"The model returned no attention weights (attn_implementation={impl!r}); load it with "
                         "attn_implementation='eager' or call lm.model.set_attn_implementation('eager').")
    return att


@torch.inference_mode()
def attention_patterns(lm: LoadedModel, ids: Int[Tensor, "b s"]) -> Float[Tensor, "b L H s s"]:
    """Attention probabilities of every layer and head for a (small) batch, float32 on the CPU."""
    return torch.stack([a.float().cpu() for a in _attentions(lm, ids)], 1)  # (b, L, H, s, s)


@torch.inference_mode()
def attention_scores(lm: LoadedModel, ids: Int[Tensor, "n s"], score_fns: Mapping[str, PatternFn],
                     batch_size: int = 8) -> dict[str, Float[Tensor, "L H"]]:
    """Average per-head scores of the attention patterns over the rows of ``ids``.

    Args:
        ids: equal-length token rows (no padding).
        score_fns: name -> function of a ``(b, H, q, k)`` pattern returning ``(b, H)`` per-row scores
            (e.g. ``partial(induction_score, period=T)``).
        batch_size: rows per forward pass.

    Returns:
        name -> ``(n_layers, n_heads)`` mean over rows, float32 on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    sums = {k: torch.zeros(lm.n_layers, lm.n_heads) for k in score_fns}
    for s in track(range(0, len(ids), batch_size), "attention scores", unit="batch"):
        att = _attentions(lm, ids[s:s + batch_size])
        for layer, a in enumerate(att):  # a: (b, H, s, s)
            for name, fn in score_fns.items():
                sums[name][layer] += fn(a.float()).sum(0).cpu()
    return {k: v / len(ids) for k, v in sums.items()}


def scores_frame(scores: Mapping[str, Float[Tensor, "L H"]], sort_by: str | None = None) -> pd.DataFrame:
    """Per-head table: ``layer, head`` and one ``<name>_score`` column per score; sorted (descending,
    ties by layer then head) by ``sort_by`` (default the first score) with a 1-based ``rank``."""
    names = list(scores)
    if not names:
        raise ValueError("scores is empty.")
    sort_by = names[0] if sort_by is None else sort_by
    if sort_by not in scores:
        raise ValueError(f"sort_by={sort_by!r}; choose one of {names}.")
    L, H = scores[names[0]].shape
    frame = pd.DataFrame({"layer": torch.arange(L).repeat_interleave(H).numpy(),
                          "head": torch.arange(H).repeat(L).numpy()})
    for k in names:
        frame[f"{k}_score"] = scores[k].reshape(-1).double().numpy()
    frame = frame.sort_values([f"{sort_by}_score", "layer", "head"], ascending=[False, True, True],
                              kind="stable")
    frame["rank"] = range(1, len(frame) + 1)
    return frame.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Per-head output statistics of the clean model
# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def head_output_means(lm: LoadedModel, ids: Int[Tensor, "n s"],
                      batch_size: int = 8) -> dict[int, Float[Tensor, "H dh"]]:
    """Mean output of every head over all positions of all rows of a reference batch.

    The head output is its slice of the attention output projection's input (what
    :func:`headlab.interventions.ablate_heads` replaces in ``mode="mean"``).

    Returns:
        ``{layer: (n_heads, head_dim)}`` float32 on the CPU.
    """
    H, dh = lm.n_heads, lm.head_dim
    sums = torch.zeros(lm.n_layers, H, dh, dtype=torch.float64)
    for s in range(0, len(ids), batch_size):
        with capture(lm) as z:
            lm.model(input_ids=ids[s:s + batch_size].to(lm.device))
        for layer in range(lm.n_layers):
            sums[layer] += z[layer].reshape(-1, H, dh).double().sum(0).cpu()  # (b*s, H, dh) summed
    mean = (sums / ids.numel()).float()
    return {layer: mean[layer] for layer in range(lm.n_layers)}


@torch.inference_mode()
def head_write_norms(lm: LoadedModel, ids: Int[Tensor, "n s"], batch_size: int = 4) -> Float[Tensor, "L H"]:
    """Mean norm of what each head writes into the residual stream, ``||W_O[:, h] z_h||_2``, over all
    positions of all rows of ``ids`` (a cheap, task-free importance score for heads).

    Returns:
        ``(n_layers, n_heads)`` float32 on the CPU.
    """
    H, dh = lm.n_heads, lm.head_dim
    sums = torch.zeros(lm.n_layers, H, dtype=torch.float64)
    for s in range(0, len(ids), batch_size):
        with capture(lm) as z:
            lm.model(input_ids=ids[s:s + batch_size].to(lm.device))
        for layer in range(lm.n_layers):
            w = lm.adapter.weight_in_out(lm.layer_module(layer, "attn_out")).float()  # (d_model, H * dh)
            zl = z[layer].float().reshape(-1, H, dh)  # (b*s, H, dh)
            wh = w.reshape(w.shape[0], H, dh)  # (d_model, H, dh)
            out = torch.einsum("thd,mhd->thm", zl, wh)  # (b*s, H, d_model): head h's write
            sums[layer] += out.norm(dim=-1).double().sum(0).cpu()
    return (sums / ids.numel()).float()


# --------------------------------------------------------------------------------------------------
# Attention entropy and attention mass on token spans (chapters 04 and 05)
# --------------------------------------------------------------------------------------------------
PatternReduceFn = Callable[[int, Float[Tensor, "b H s s"], Bool[Tensor, "b s"], list[int]], Tensor]


def attention_entropy(pattern: Float[Tensor, "*b q k"], key_mask: Bool[Tensor, "*b k"] | None = None,
                      window: int | None = None) -> Float[Tensor, "*b q"]:
    """Normalised Shannon entropy of each query's attention distribution of a causal pattern.

    The entropy ``H_t = -sum_k p_tk log p_tk`` (nats, ``0 log 0 = 0``) at query ``t`` is divided by
    ``log n_t``, the entropy of the uniform distribution over the ``n_t`` keys query ``t`` may attend
    to: the real (unmasked) keys at positions ``<= t`` (and within ``window`` positions, for
    sliding-window attention). So 1 means "uniform over everything it could see" and 0 "all mass on
    one key", and early and late positions compare fairly.

    Positions where the value is undefined are **NaN**: queries with a single attendable key
    (``n_t = 1``, e.g. position 0, whose distribution is forced) and padded queries
    (``key_mask`` false at ``t``). Average with ``nanmean``. Probability mass a pattern puts on
    masked keys (zero for a correct mask, up to rounding) is ignored.

    Args:
        pattern: attention probabilities, the last two dimensions (query, key), ``q == k``.
        key_mask: ``True`` for real tokens (the tokenizer's attention mask); broadcast over heads
            when it has fewer leading dimensions (e.g. ``(b, k)`` for a ``(b, H, q, k)`` pattern).
        window: attention window of sliding-window layers (``None``: the whole causal prefix).
    """
    q, k = pattern.shape[-2:]
    if q != k:
        raise ValueError(f"attention_entropy needs a square (query, key) pattern, got {tuple(pattern.shape)}.")
    pos = torch.arange(k, device=pattern.device)
    allowed = pos[None, :] <= pos[:, None]  # (q, k) causal
    if window is not None:
        if window < 1:
            raise ValueError(f"window={window} must be a positive number of positions.")
        allowed &= pos[None, :] > pos[:, None] - window
    real = torch.ones(k, dtype=torch.bool, device=pattern.device) if key_mask is None else key_mask.bool()
    while real.dim() < pattern.dim() - 1:  # (b, k) -> (b, 1, k) for (b, H, q, k)
        real = real.unsqueeze(-2)
    allowed = allowed & real.unsqueeze(-2)  # (..., q, k)
    p = pattern.double() * allowed
    h = -torch.special.xlogy(p, p).sum(-1)  # (..., q)
    n = allowed.sum(-1).double()
    out = h / torch.log(n.clamp_min(2))
    query_real = real.expand(*pattern.shape[:-2], k) if real.shape[-1] == k else real
    out = torch.where((n > 1) & query_real, out, torch.nan)
    return out.to(pattern.dtype if pattern.is_floating_point() else torch.float32)


def span_mass(pattern: Float[Tensor, "b H q k"], query_mask: Bool[Tensor, "b q"],
              key_mask: Bool[Tensor, "b k"]) -> Float[Tensor, "b H"]:
    """Attention mass on a set of key positions, averaged over a set of query positions.

    ``out[b, h] = mean_{q in Q_b} sum_{k in K_b} pattern[b, h, q, k]``. Rows with an empty query set
    give NaN.
    """
    qm, km = query_mask.to(pattern.dtype), key_mask.to(pattern.dtype)
    per_query = (pattern * km[:, None, None, :]).sum(-1)  # (b, H, q)
    n_q = qm.sum(-1)[:, None]  # (b, 1)
    return (per_query * qm[:, None, :]).sum(-1) / n_q.where(n_q > 0, torch.nan)


@torch.inference_mode()
def reduce_patterns(lm: LoadedModel, seqs: Sequence[Int[Tensor, " s"]], fn: PatternReduceFn,
                    batch_size: int = 8) -> Tensor:
    """Run token sequences of any lengths and reduce every layer's attention pattern on the fly.

    Sequences are sorted by length, right-padded within a batch (pads masked, so every real token
    sees exactly what it sees alone) and run with ``output_attentions=True``; each layer's
    ``(b, H, s, s)`` pattern is handed to ``fn(layer, pattern, mask, rows)`` at once and dropped, so
    the full ``(n, L, H, s, s)`` tensor never exists. ``mask`` is ``(b, s)``, true on real tokens;
    ``rows`` are the indices into ``seqs`` of the batch's rows.

    Args:
        seqs: 1-D token id tensors.
        fn: returns a ``(b, H, ...)`` tensor per layer (e.g. :func:`span_mass` of chosen positions).
        batch_size: sequences per forward pass (results do not depend on it).

    Returns:
        ``(n, L, H, ...)`` float32 on the CPU, in the order of ``seqs``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    if not len(seqs) or any(len(s) == 0 for s in seqs):
        raise ValueError("reduce_patterns needs at least one sequence and no empty sequence.")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    pad = lm.tokenizer.pad_token_id or 0
    parts: list[Tensor] = []
    for start in track(range(0, len(order), batch_size), "attention patterns", unit="batch"):
        rows = order[start:start + batch_size]
        width = max(len(seqs[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for j, i in enumerate(rows):
            ids[j, :len(seqs[i])] = seqs[i]
            mask[j, :len(seqs[i])] = True
        out = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.long().to(lm.device),
                       output_attentions=True)
        att = out.attentions
        if att is None or any(a is None for a in att):
            _attentions(lm, ids[:1])  # raises the explanatory error
        per_layer = [fn(layer, a.float(), mask.to(a.device), rows).float().cpu() for layer, a in enumerate(att)]
        parts.append(torch.stack(per_layer, 1))  # (b, L, H, ...)
    result = torch.cat(parts)
    return result[torch.argsort(torch.tensor(order))]


def text_entropy(lm: LoadedModel, seqs: Sequence[Int[Tensor, " s"]], batch_size: int = 8) -> Float[Tensor, "n L H"]:
    """Mean normalised attention entropy (:func:`attention_entropy`) of every head on each sequence,
    averaged over the query positions where it is defined (positions 1 onwards, real tokens only)."""
    windows = lm.layer_windows  # per layer: sliding window or None

    def fn(layer: int, pattern: Tensor, mask: Tensor, rows: list[int]) -> Tensor:
        return torch.nanmean(attention_entropy(pattern, mask, windows[layer]), -1)  # (b, H)

    return reduce_patterns(lm, seqs, fn, batch_size)


def text_pattern_stats(lm: LoadedModel, seqs: Sequence[Int[Tensor, " s"]],
                       batch_size: int = 8) -> dict[str, Float[Tensor, "n L H"]]:
    """Per sequence and head, in one pass: ``entropy`` (as :func:`text_entropy`) and ``first_token``,
    the mean attention on position 0 over queries 1 onwards (an *attention sink* puts most of its
    mass there, which also makes its entropy low)."""
    windows = lm.layer_windows  # per layer: sliding window or None

    def fn(layer: int, pattern: Tensor, mask: Tensor, rows: list[int]) -> Tensor:
        ent = torch.nanmean(attention_entropy(pattern, mask, windows[layer]), -1)  # (b, H)
        q = mask.clone()
        q[:, 0] = False
        first = span_mass(pattern, q, torch.arange(mask.shape[1], device=mask.device)[None] == 0)
        return torch.stack([ent, first], -1)  # (b, H, 2)

    out = reduce_patterns(lm, seqs, fn, batch_size)  # (n, L, H, 2)
    return {"entropy": out[..., 0], "first_token": out[..., 1]}


def span_attention(lm: LoadedModel, seqs: Sequence[Int[Tensor, " s"]], queries: Sequence[Sequence[int]],
                   keys: Sequence[Sequence[int]], batch_size: int = 8) -> Float[Tensor, "n L H"]:
    """Attention mass of every head on chosen key positions, averaged over chosen query positions.

    Args:
        seqs: token sequences.
        queries, keys: per sequence, the query positions to average over and the key positions
            whose attention is summed (e.g. the last token and the sentiment-word tokens).

    Returns:
        ``(n, n_layers, n_heads)``: :func:`span_mass` per sequence; NaN for a sequence whose query or
        key set is empty.
    """
    return span_attentions(lm, seqs, {"mass": (queries, keys)}, batch_size)["mass"]


def span_attentions(lm: LoadedModel, seqs: Sequence[Int[Tensor, " s"]],
                    spans: Mapping[str, tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]]],
                    batch_size: int = 8) -> dict[str, Float[Tensor, "n L H"]]:
    """Several :func:`span_attention` measures of the same sequences from one forward pass each.

    Args:
        spans: measure name -> ``(queries, keys)``, per sequence position lists as in
            :func:`span_attention`.

    Returns:
        measure name -> ``(n, n_layers, n_heads)``.
    """
    names = list(spans)
    if not names:
        raise ValueError("spans is empty; give at least one name -> (queries, keys).")
    width = max(len(s) for s in seqs)
    qm = torch.zeros(len(names), len(seqs), width, dtype=torch.bool)
    km = torch.zeros(len(names), len(seqs), width, dtype=torch.bool)
    for m, name in enumerate(names):
        queries, keys = spans[name]
        if not len(seqs) == len(queries) == len(keys):
            raise ValueError(f"{name}: {len(seqs)} sequences but {len(queries)} query and {len(keys)} key "
                             "position lists.")
        for i, (s, q, k) in enumerate(zip(seqs, queries, keys)):
            bad = [p for p in [*q, *k] if not 0 <= p < len(s)]
            if bad:
                raise ValueError(f"{name}: sequence {i} has {len(s)} tokens; positions {bad} are out of range.")
            qm[m, i, list(q)] = True
            km[m, i, list(k)] = True
    empty = ~km.any(-1)  # (measures, n): no key -> NaN, not 0

    def fn(layer: int, pattern: Tensor, mask: Tensor, rows: list[int]) -> Tensor:
        s = mask.shape[1]
        return torch.stack([span_mass(pattern, qm[m, rows, :s].to(pattern.device), km[m, rows, :s].to(pattern.device))
                            for m in range(len(names))], -1)  # (b, H, measures)

    out = reduce_patterns(lm, seqs, fn, batch_size)  # (n, L, H, measures)
    return {name: out[..., m].masked_fill(empty[m][:, None, None], torch.nan) for m, name in enumerate(names)}


def encode_spans(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]],
                 add_special_tokens: bool = True) -> tuple[Int[Tensor, " s"], list[list[int]]]:
    """Tokenise ``text`` and find the tokens of each character span ``[start, end)``.

    A token belongs to a span when their character ranges overlap (special tokens, with an empty
    range, never do).

    Returns:
        ``(ids, positions)``: the token ids and, per span, the sorted token positions (possibly empty
        when the span is whitespace only).
    """
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    out = []
    for a, b in spans:
        if not 0 <= a < b <= len(text):
            raise ValueError(f"span ({a}, {b}) is not a non-empty range inside the text of length {len(text)}.")
        out.append([i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a])
    return torch.tensor(enc["input_ids"], dtype=torch.long), out


def encode_lexicon(tokenizer: Any, texts: Sequence[str], labels: Sequence[int],
                   lexicon: Mapping[str, frozenset[str]] | None = None) -> pd.DataFrame:
    """Tokenise texts and mark the tokens of their lexicon words (:func:`headlab.data.lexicon_spans`).

    Texts without a lexicon word are left out.

    Returns:
        One row per kept text: ``ids`` (token ids), ``keys`` (sorted positions of the lexicon words'
        tokens), ``label`` (from ``labels``) and ``n_<polarity>`` (lexicon words of each polarity).
    """
    lexicon = data.SENTIMENT_LEXICON if lexicon is None else lexicon
    rows = []
    for text, label in zip(texts, labels, strict=True):
        spans = data.lexicon_spans(text, lexicon)
        if spans:
            ids, pos = encode_spans(tokenizer, text, [(a, b) for a, b, _ in spans])
            rows.append({"ids": ids, "keys": sorted({p for ps in pos for p in ps}), "label": int(label),
                         **{f"n_{pol}": sum(p == pol for *_, p in spans) for pol in lexicon}})
    return pd.DataFrame(rows, columns=["ids", "keys", "label", *(f"n_{pol}" for pol in lexicon)])


