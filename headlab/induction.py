"""Induction heads: repeated random token sequences and the scores computed on them.

An *induction head* (Olsson et al. 2022) completes ``[A][B] ... [A] -> [B]``: from a token it attends
to the token that followed the token's earlier occurrence and copies it. The standard probe is a
sequence of random tokens repeated once after a BOS token,
``[BOS, x_1 .. x_T, x_1 .. x_T]``: a query at ``x_j`` in the second copy should attend to the key at
``x_{j+1}`` in the first copy, ``T - 1`` positions back. :func:`induction_score` measures the
attention a head puts there (reduced per layer by :func:`headlab.attention.attention_scores`, so the
full pattern tensor never exists).

:func:`repeated_random_tokens` draws such sequences from the tokenizer's ordinary vocabulary (special
and added tokens excluded), each row from its own seeded generator (row ``i`` is the same whatever the
batch size). Rows may repeat a shorter segment (a *lag* below ``seq_len``) after a random filler, so
one batch of equal-length rows covers several distances between a token and its earlier occurrence.
:func:`repeat_metrics` turns next-token losses of such rows (:func:`headlab.perplexity.token_losses`)
into the per-row probability of the correct repeated token and the in-context loss change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from headlab.attention import attention_scores
from headlab.edits import seed_for
from headlab.models import LoadedModel

__all__ = ["RepeatedTokens", "induction_score", "induction_scores", "ordinary_token_ids",
           "previous_token_score", "repeat_metrics", "repeated_random_tokens"]


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
        gen = torch.Generator().manual_seed(seed_for(seed, "repeated-tokens", i))
        draw = pool[torch.randperm(len(pool), generator=gen)[: 2 * seq_len - lag]]
        filler, seg = draw[: 2 * (seq_len - lag)], draw[2 * (seq_len - lag):]
        parts = ([torch.tensor([bos])] if bos is not None else []) + [filler, seg, seg]
        rows.append(torch.cat(parts))
        row_lags.append(lag)
    return RepeatedTokens(torch.stack(rows).long(), torch.tensor(row_lags), seq_len, int(bos is not None))


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
