"""Attention patterns and induction heads: repeated random tokens, pattern scores, head ablation runs.

An *induction head* (Olsson et al. 2022) completes ``[A][B] ... [A] -> [B]``: from a token it attends
to the token that followed the token's earlier occurrence and copies it. The standard probe is a
sequence of random tokens repeated once after a BOS token,
``[BOS, x_1 .. x_T, x_1 .. x_T]``: a query at ``x_j`` in the second copy should attend to the key at
``x_{j+1}`` in the first copy, ``T - 1`` positions back. :func:`induction_score` measures the
attention a head puts there; :func:`attention_scores` runs the model once over a batch with
``output_attentions=True`` (the model must use ``attn_implementation="eager"``) and reduces each
layer's pattern immediately, so the full ``(batch, layer, head, seq, seq)`` tensor never exists.

:func:`repeated_random_tokens` draws such sequences from the tokenizer's ordinary vocabulary (special
and added tokens excluded), each row from its own seeded generator (row ``i`` is the same whatever the
batch size). Rows may repeat a shorter segment (a *lag* below ``seq_len``) after a random filler, so
one batch of equal-length rows covers several distances between a token and its earlier occurrence.

:func:`token_losses` scores every next token of such rows, optionally with heads ablated through
:func:`headlab.interventions.ablate_heads`; :func:`repeat_metrics` turns those losses into the
per-row probability of the correct repeated token and the in-context loss change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from headlab.models import LoadedModel

__all__ = [
    "RepeatedTokens",
    "attention_entropy",
    "attention_patterns",
    "attention_scores",
    "EncodedPairs",
    "encode_pairs",
    "encode_spans",
    "head_differences",
    "reduce_patterns",
    "span_attention",
    "span_attentions",
    "span_mass",
    "text_entropy",
    "text_pattern_stats",
    "head_output_means",
    "head_write_norms",
    "induction_score",
    "induction_scores",
    "ordinary_token_ids",
    "previous_token_score",
    "repeat_metrics",
    "repeated_random_tokens",
    "scores_frame",
    "token_losses",
]

PatternFn = Callable[[Float[Tensor, "*b q k"]], Float[Tensor, "*b"]]


# --------------------------------------------------------------------------------------------------
# Repeated random token sequences
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RepeatedTokens:
    """A batch of rows ``[BOS?, filler, segment, segment]`` of equal length ``start + 2 * seq_len``.

    Row ``i`` repeats a segment of ``lags[i]`` distinct random tokens; the filler before it has
    ``2 * (seq_len - lags[i])`` further distinct random tokens (none when the lag is ``seq_len``: the
    plain ``[BOS, x, x]`` probe). Every token of the second copy has its earlier occurrence exactly
    ``lags[i]`` positions back.

    Attributes:
        tokens: ``(n, start + 2 * seq_len)`` token ids.
        lags: ``(n,)`` segment length = distance of each repeated token to its earlier occurrence.
        seq_len: the longest possible segment (half the length after the BOS).
        start: 1 when the rows begin with BOS, else 0.
    """

    tokens: Int[Tensor, "n s"]
    lags: Int[Tensor, " n"]
    seq_len: int
    start: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def copy_masks(self) -> tuple[Bool[Tensor, "n s"], Bool[Tensor, "n s"]]:
        """Boolean masks of the first and the second copy of each row's segment (over positions)."""
        pos = torch.arange(self.tokens.shape[1])[None]  # (1, s)
        end = self.start + 2 * self.seq_len
        lag = self.lags[:, None]  # (n, 1)
        first = (pos >= end - 2 * lag) & (pos < end - lag)
        second = pos >= end - lag
        return first, second

    def target_masks(self) -> tuple[Bool[Tensor, "n s-1"], Bool[Tensor, "n s-1"]]:
        """Masks over *predictions* (position ``t`` predicts token ``t + 1``) of the segment tokens
        after the first, in the first copy (``early``) and in the second copy (``late``).

        The first token of each copy is left out: nothing in the context predicts it. The same
        tokens ``x_2 .. x_L`` are thus scored once without and once with an earlier occurrence.
        """
        first, second = self.copy_masks()
        # prediction t scores token t + 1; both in the same copy = token t + 1 is not the copy's first
        return first[:, :-1] & first[:, 1:], second[:, :-1] & second[:, 1:]

    def subset(self, rows: Sequence[int]) -> RepeatedTokens:
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return RepeatedTokens(self.tokens[idx], self.lags[idx], self.seq_len, self.start)


def _tokenizer_of(source: Any) -> tuple[Any, int | None]:
    """(tokenizer, model vocabulary size or None) of a :class:`LoadedModel` or a tokenizer."""
    if isinstance(source, LoadedModel):
        return source.tokenizer, int(source.config.vocab_size)
    return source, None


def ordinary_token_ids(source: Any) -> Int[Tensor, " V"]:
    """Ids of the tokenizer's ordinary vocabulary: every id below ``len(tokenizer)`` (and below the
    model's vocabulary size when ``source`` is a :class:`LoadedModel`) that is neither a special token
    nor an added token (chat markers, ``<filename>`` and the like)."""
    tok, model_vocab = _tokenizer_of(source)
    n = len(tok) if model_vocab is None else min(len(tok), model_vocab)
    excluded = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    keep = torch.ones(n, dtype=torch.bool)
    keep[[i for i in excluded if 0 <= i < n]] = False
    return torch.nonzero(keep)[:, 0]


def repeated_random_tokens(source: Any, n_seq: int, seq_len: int, seed: int = 0,
                           lags: Sequence[int] | None = None) -> RepeatedTokens:
    """Random token rows with a repeated segment, BOS first when the tokenizer has one.

    Args:
        source: a :class:`LoadedModel` or a tokenizer.
        n_seq: number of rows.
        seq_len: segment length of the plain probe ``[BOS, x_1 .. x_T, x_1 .. x_T]`` (``T``); every
            row has ``start + 2 * seq_len`` tokens.
        seed: row ``i`` is drawn from a generator keyed by ``(seed, i)`` only, so it does not depend on
            ``n_seq`` or on any batching.
        lags: segment length per row, cycled over the rows (row ``i`` gets ``lags[i % len(lags)]``),
            each ``2 <= lag <= seq_len``; default ``[seq_len]`` (the plain probe).

    Returns:
        :class:`RepeatedTokens`. All tokens of a row other than the repeat are distinct, so each token
        of the second copy has exactly one earlier occurrence.
    """
    from headlab.interventions import _seed_for

    lags = [seq_len] if lags is None else [int(v) for v in lags]
    if n_seq < 1 or seq_len < 2:
        raise ValueError(f"n_seq={n_seq} must be >= 1 and seq_len={seq_len} >= 2.")
    bad = [v for v in lags if not 2 <= v <= seq_len]
    if not lags or bad:
        raise ValueError(f"lags {bad or lags} invalid; each lag must satisfy 2 <= lag <= seq_len={seq_len}.")
    tok, _ = _tokenizer_of(source)
    pool = ordinary_token_ids(source)
    need = 2 * seq_len - min(lags)  # filler + one segment, all distinct
    if len(pool) < need:
        raise ValueError(f"The tokenizer has {len(pool)} ordinary tokens; seq_len={seq_len} with lags {lags} "
                         f"needs {need} distinct ones.")
    bos = tok.bos_token_id
    rows, row_lags = [], []
    for i in range(n_seq):
        lag = lags[i % len(lags)]
        gen = torch.Generator().manual_seed(_seed_for(seed, "repeated-tokens", i))
        draw = pool[torch.randperm(len(pool), generator=gen)[: 2 * seq_len - lag]]
        filler, seg = draw[: 2 * (seq_len - lag)], draw[2 * (seq_len - lag):]
        parts = ([torch.tensor([bos])] if bos is not None else []) + [filler, seg, seg]
        rows.append(torch.cat(parts))
        row_lags.append(lag)
    return RepeatedTokens(torch.stack(rows).long(), torch.tensor(row_lags), seq_len, int(bos is not None))


# --------------------------------------------------------------------------------------------------
# Scores of one attention pattern
# --------------------------------------------------------------------------------------------------
def induction_score(pattern: Float[Tensor, "*b q k"], period: int, start: int = 1) -> Float[Tensor, "*b"]:
    """Mean attention from each token of the second copy to the token after its earlier occurrence.

    For ``[BOS, x_1 .. x_T, x_1 .. x_T]`` (``start = 1``, ``period = T``) the queries are the positions
    ``q = start + T + j`` (``j = 0 .. T-1``) and the target keys ``q - T + 1``. A perfect induction head
    scores 1, a head attending uniformly to all earlier tokens about ``1 / position``, a
    previous-token head 0 (for ``T > 2``).

    Args:
        pattern: attention probabilities, the last two dimensions (query, key).
        period: length ``T`` of the repeated segment.
        start: position of ``x_1`` in the first copy (1 after a BOS token).
    """
    n = pattern.shape[-1]
    if period < 2 or start < 0 or start + 2 * period > n or pattern.shape[-2] != n:
        raise ValueError(f"pattern of shape {tuple(pattern.shape)} does not hold start={start} + 2 x "
                         f"period={period} positions (need period >= 2 and a square (q, k) pattern).")
    q = torch.arange(start + period, start + 2 * period, device=pattern.device)
    return pattern[..., q, q - period + 1].mean(-1)


def previous_token_score(pattern: Float[Tensor, "*b q k"]) -> Float[Tensor, "*b"]:
    """Mean attention from each position ``q >= 1`` to ``q - 1``."""
    q = torch.arange(1, pattern.shape[-1], device=pattern.device)
    return pattern[..., q, q - 1].mean(-1)


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
    for s in range(0, len(ids), batch_size):
        att = _attentions(lm, ids[s:s + batch_size])
        for layer, a in enumerate(att):  # a: (b, H, s, s)
            for name, fn in score_fns.items():
                sums[name][layer] += fn(a.float()).sum(0).cpu()
    return {k: v / len(ids) for k, v in sums.items()}


def induction_scores(lm: LoadedModel, batch: RepeatedTokens,
                     batch_size: int = 8) -> dict[str, Float[Tensor, "L H"]]:
    """``induction`` and ``previous_token`` score of every head on plain repeated rows (every lag =
    ``seq_len``), averaged over the rows."""
    if not bool((batch.lags == batch.seq_len).all()):
        raise ValueError(f"induction_scores needs plain repeats (every lag = seq_len={batch.seq_len}); got "
                         f"lags {sorted(set(batch.lags.tolist()))}. Draw them with lags=None.")
    fns = {"induction": lambda p: induction_score(p, batch.seq_len, batch.start),
           "previous_token": previous_token_score}
    return attention_scores(lm, batch.tokens, fns, batch_size)


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
# Losses with heads ablated
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
    from headlab.interventions import capture

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
    from headlab.interventions import capture

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


@torch.inference_mode()
def token_losses(lm: LoadedModel, ids: Int[Tensor, "n s"], heads: Mapping[int, Sequence[int]] | None = None,
                 mode: str = "zero", means: Mapping[int, Tensor] | None = None,
                 batch_size: int = 8) -> Float[Tensor, "n s-1"]:
    """Negative log-likelihood (nats) of every next token, optionally with heads ablated.

    Rows are scored in independent forward passes of ``batch_size`` rows without padding, so a row's
    losses do not depend on the other rows.

    Args:
        ids: equal-length token rows.
        heads: ``{layer: [head, ...]}`` to ablate (``None`` or empty: the clean model).
        mode, means: as in :func:`headlab.interventions.ablate_heads`.

    Returns:
        ``nll[i, t]`` = ``-log p(ids[i, t + 1] | ids[i, :t + 1])``, float32 on the CPU.
    """
    from headlab.interventions import ablate_heads

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    active = {layer: list(hs) for layer, hs in (heads or {}).items() if len(hs)}
    out = []
    with ablate_heads(lm, active, mode, means) if active else nullcontext():
        for s in range(0, len(ids), batch_size):
            x = ids[s:s + batch_size].to(lm.device)
            logits = lm.model(input_ids=x).logits[:, :-1].float()  # (b, s-1, V)
            tgt = logits.gather(-1, x[:, 1:, None])[..., 0]
            out.append((torch.logsumexp(logits, -1) - tgt).cpu())
    return torch.cat(out)


def repeat_metrics(batch: RepeatedTokens, nll: Float[Tensor, "n s-1"]) -> dict[str, Float[Tensor, " n"]]:
    """Per-row summaries of next-token losses on repeated rows (see :meth:`RepeatedTokens.target_masks`).

    Returns:
        ``p_correct``: mean probability of the correct repeated token over the second copy;
        ``loss_early`` / ``loss_late``: mean NLL of the same segment tokens in the first / second copy;
        ``icl``: ``loss_late - loss_early`` (negative: the earlier occurrence helps; Olsson et al.'s
        in-context learning score on this probe).
    """
    if nll.shape != (len(batch), batch.tokens.shape[1] - 1):
        want = (len(batch), batch.tokens.shape[1] - 1)
        raise ValueError(f"nll has shape {tuple(nll.shape)}; expected {want}.")
    early, late = batch.target_masks()
    nll = nll.double()

    def masked_mean(x: Tensor, m: Tensor) -> Tensor:
        return (x * m).sum(1) / m.sum(1)

    loss_early, loss_late = masked_mean(nll, early), masked_mean(nll, late)
    return {"p_correct": masked_mean(torch.exp(-nll), late), "loss_early": loss_early,
            "loss_late": loss_late, "icl": loss_late - loss_early}


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
    for start in range(0, len(order), batch_size):
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
    window = lm.sliding_window
    types = getattr(lm.config, "layer_types", None)  # per-layer "sliding_attention" / "full_attention"

    def fn(layer: int, pattern: Tensor, mask: Tensor, rows: list[int]) -> Tensor:
        w = window if types is None or types[layer] == "sliding_attention" else None
        return torch.nanmean(attention_entropy(pattern, mask, w), -1)  # (b, H)

    return reduce_patterns(lm, seqs, fn, batch_size)


def text_pattern_stats(lm: LoadedModel, seqs: Sequence[Int[Tensor, " s"]],
                       batch_size: int = 8) -> dict[str, Float[Tensor, "n L H"]]:
    """Per sequence and head, in one pass: ``entropy`` (as :func:`text_entropy`) and ``first_token``,
    the mean attention on position 0 over queries 1 onwards (an *attention sink* puts most of its
    mass there, which also makes its entropy low)."""
    window = lm.sliding_window
    types = getattr(lm.config, "layer_types", None)

    def fn(layer: int, pattern: Tensor, mask: Tensor, rows: list[int]) -> Tensor:
        w = window if types is None or types[layer] == "sliding_attention" else None
        ent = torch.nanmean(attention_entropy(pattern, mask, w), -1)  # (b, H)
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


def head_differences(a: Float[Tensor, "n L H"], b: Float[Tensor, "n L H"], n_boot: int = 1000,
                     seed: int = 0, names: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """Per-head paired difference ``a - b`` over matched items, with paired bootstrap 95% intervals.

    Items (rows) where either value is NaN are dropped for every head alike, so all heads are
    compared on the same items; the bootstrap resamples items jointly for all heads
    (:func:`headlab.metrics.bootstrap_rows`).

    Returns:
        One row per head, ordered by layer then head: ``layer, head``, the means ``mean_<a>``,
        ``mean_<b>``, ``diff``, ``diff_low``, ``diff_high``, ``effect_size`` (mean / sd of the
        paired differences, Cohen's d_z) and ``n``.
    """
    from headlab import metrics

    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must both be (items, layers, heads).")
    keep = ~(torch.isnan(a) | torch.isnan(b)).flatten(1).any(1)
    if int(keep.sum()) < 2:
        raise ValueError(f"only {int(keep.sum())} items without NaN; need at least 2.")
    a, b = a[keep].double(), b[keep].double()
    n, L, H = a.shape
    d = (a - b).reshape(n, L * H).T.numpy()  # (heads, items)
    mean, low, high = metrics.bootstrap_rows(d, n_boot=n_boot, seed=seed)
    sd = d.std(1, ddof=1)
    return pd.DataFrame({
        "layer": torch.arange(L).repeat_interleave(H).numpy(), "head": torch.arange(H).repeat(L).numpy(),
        f"mean_{names[0]}": a.mean(0).reshape(-1).numpy(), f"mean_{names[1]}": b.mean(0).reshape(-1).numpy(),
        "diff": mean, "diff_low": low, "diff_high": high,
        "effect_size": mean / (sd + 1e-12), "n": n})


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of sentence pairs that differ in one token (a gendered pronoun) at one position.

    Attributes:
        a, b: token ids of the two sentences of each kept pair (same length within a pair).
        pronoun: position of the differing token in both sentences.
        referent: token positions of the referent noun (empty when it was not found).
        index: row of each kept pair in the frame that was encoded.
        dropped: number of pairs whose token sequences did not align (length or more than one
            differing token).
    """

    a: list[Int[Tensor, " s"]]
    b: list[Int[Tensor, " s"]]
    pronoun: list[int]
    referent: list[list[int]]
    index: list[int]
    dropped: int

    def __len__(self) -> int:
        return len(self.a)

    def after_pronoun(self) -> list[list[int]]:
        """Query positions after the pronoun (to the end of the sentence), per pair."""
        return [list(range(p + 1, len(s))) for p, s in zip(self.pronoun, self.a)]


def encode_pairs(tokenizer: Any, pairs: pd.DataFrame) -> EncodedPairs:
    """Tokenise :func:`headlab.data.bias_pairs` rows; keep pairs whose token sequences have the same
    length and differ in exactly one position, the pronoun's (a single token in both)."""
    out: dict[str, list] = {"a": [], "b": [], "pronoun": [], "referent": [], "index": []}
    dropped = 0
    for i, r in enumerate(pairs.itertuples()):
        ref_a = [r.a_referent_span] if r.a_referent_span is not None else []
        ids_a, (pron_a, *refs) = encode_spans(tokenizer, r.a, [r.a_span, *ref_a])
        ids_b, (pron_b,) = encode_spans(tokenizer, r.b, [r.b_span])
        differ = torch.nonzero(ids_a != ids_b)[:, 0].tolist() if len(ids_a) == len(ids_b) else None
        if differ is None or len(pron_a) != 1 or pron_a != pron_b or differ != pron_a:
            dropped += 1
            continue
        out["a"].append(ids_a)
        out["b"].append(ids_b)
        out["pronoun"].append(pron_a[0])
        out["referent"].append(refs[0] if refs else [])
        out["index"].append(i)
    return EncodedPairs(**out, dropped=dropped)
