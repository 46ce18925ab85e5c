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
    "attention_patterns",
    "attention_scores",
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
