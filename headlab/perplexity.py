"""Next-token losses: strided-window perplexity of a token stream, and losses of token rows.

:func:`token_nll` is the usual strided perplexity evaluation. :func:`text_windows` cuts a stream into
the same windows and keeps the clean input of every block, so that :func:`windows_nll` can recompute
only the blocks an edit can change (a weight edit in layer ``l`` leaves blocks ``0 .. l-1`` as they
were). :func:`token_losses` scores equal-length token rows (optionally with heads ablated);
:func:`losses_keeping_inputs` / :func:`losses_from` are its keep / recompute pair.
:func:`sequence_losses` scores sequences of any lengths (no padding: equal lengths share a batch).

Every function here scores rows with one loop (``_rows_nll``) over
:func:`headlab.engine.recompute.forward_rows`, the one implementation of "keep the clean block
inputs, recompute from layer l".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headlab.engine.recompute import BlockInputs, forward_rows
from headlab.engine.scoring import chunks
from headlab.interventions import ablate_heads
from headlab.models import LoadedModel

__all__ = ["TextWindows", "losses_from", "losses_keeping_inputs", "perplexity", "sequence_losses", "text_windows",
           "token_losses", "token_nll", "windows_nll"]


def _nll_spans(n: int, context: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Windows of :func:`token_nll`: ``(window index, start, end, first scored position)``."""
    spans = []
    start, scored_upto = 0, 1  # token 0 has no prediction
    while True:
        end = min(start + context, n)
        spans.append((len(spans), start, end, max(scored_upto, start + 1)))
        scored_upto = end
        if end >= n:
            break
        # Next window: ``stride`` further, but starting early enough that the first unscored token is
        # predicted inside it (matters for stride == context) and, at the end, a full window.
        start = min(start + stride, scored_upto - 1, n - context)
    return spans


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
    perplexity evaluation: :func:`windows_nll` of :func:`text_windows` without kept inputs.

    Args:
        lm: the model.
        ids: the token stream.
        context: window length in tokens.
        stride: step between windows, ``0 < stride <= context``. With ``stride == context`` the
            windows overlap by one token so that the first token of each window is still predicted.
        batch_size: windows per forward pass.

    Returns:
        ``(nll, window)``: NLL in nats of each scored token (the first token is never scored) and the
        index of the window that scored it (for block-bootstrap confidence intervals).
    """
    return windows_nll(lm, text_windows(lm, ids, context, stride, batch_size, keep_inputs=False))


def perplexity(nll: Tensor) -> float:
    """``exp(mean NLL)``."""
    return math.exp(float(nll.double().mean()))


@dataclass
class TextWindows:
    """A token stream cut into the windows of :func:`token_nll`, with each block's clean input.

    Attributes:
        ids: ``(W, C)`` window token ids, right-padded with 0 where a window is shorter.
        mask: ``(W, C)`` 1 at real tokens.
        first: ``(W,)`` first scored position of each window, relative to the window start.
        inputs: the clean input of every block but the first, per window (``None`` if not kept).
        batch_size: windows per forward pass; every pass over the windows uses these batches, so that
            a recomputation from layer 0 is bit-identical to the clean pass.
    """

    ids: Int[Tensor, "W C"]
    mask: Int[Tensor, "W C"]
    first: Int[Tensor, " W"]
    inputs: BlockInputs | None
    batch_size: int

    @property
    def n_scored(self) -> int:
        return int(sum(int(m.sum()) - int(f) for m, f in zip(self.mask, self.first)))

    def head(self, n_windows: int) -> TextWindows:
        """The first ``n_windows`` windows (a smaller token budget scored in exactly the same way)."""
        if not 1 <= n_windows <= len(self.ids):
            raise ValueError(f"n_windows={n_windows} must be in 1..{len(self.ids)}.")
        inputs = None if self.inputs is None else self.inputs.head(n_windows)
        return TextWindows(self.ids[:n_windows], self.mask[:n_windows], self.first[:n_windows], inputs,
                           self.batch_size)


def text_windows(lm: LoadedModel, ids: Int[Tensor, " N"], context: int = 512, stride: int = 256,
                 batch_size: int = 8, keep_inputs: bool = True) -> TextWindows:
    """Cut ``ids`` into :func:`token_nll`'s windows and (``keep_inputs``) run the clean model once,
    keeping the input of every block, so that :func:`windows_nll` can start at any layer.

    Raises:
        ValueError: ``context < 2``, a stride outside ``0 < stride <= context``, or fewer than 2 tokens.
    """
    if context < 2:
        raise ValueError(f"context={context} must be at least 2 tokens (stride={stride}).")
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must satisfy 0 < stride <= context={context}.")
    if len(ids) < 2:
        raise ValueError(f"Need at least 2 tokens to score; got {len(ids)}.")
    spans = _nll_spans(len(ids), context, stride)
    width = max(e - s for _, s, e, _ in spans)  # every window is full unless the stream is shorter
    x = torch.stack([torch.nn.functional.pad(ids[s:e], (0, width - (e - s))) for _, s, e, _ in spans])
    mask = torch.stack([(torch.arange(width) < e - s).long() for _, s, e, _ in spans])
    first = torch.tensor([f - s for _, s, _, f in spans])
    inputs = None
    if keep_inputs:
        kept = [k for _, _, k in forward_rows(lm, x, mask, batch_size=batch_size, keep=range(lm.n_layers),
                                              logits_to_keep=1)]
        inputs = BlockInputs.cat(kept)
    return TextWindows(x, mask, first, inputs, batch_size)


def windows_nll(lm: LoadedModel, windows: TextWindows,
                from_layer: int = 0) -> tuple[Float[Tensor, " M"], Int[Tensor, " M"]]:
    """Per-token NLL of the windows, as :func:`token_nll` gives it, computing blocks ``from_layer`` on.

    Blocks before ``from_layer`` are not run: their output is the clean input of block ``from_layer``
    kept by :func:`text_windows`. Use it under an edit that changes nothing before ``from_layer``
    (a weight edit in layer ``from_layer`` or later); the result then equals a full forward.

    Returns:
        ``(nll, window)`` like :func:`token_nll`.
    """
    if from_layer > 0 and windows.inputs is None:
        raise ValueError(f"from_layer={from_layer} needs the clean block inputs: "
                         "text_windows(..., keep_inputs=True).")
    nll = _rows_nll(lm, windows.ids, windows.mask, windows.batch_size, from_layer, windows.inputs)
    # token at window position t is predicted at row position t - 1
    scored = [nll[w, int(f) - 1:int(m.sum()) - 1] for w, (f, m) in enumerate(zip(windows.first, windows.mask))]
    window = [torch.full((len(sel),), w, dtype=torch.long) for w, sel in enumerate(scored)]
    return torch.cat(scored), torch.cat(window)


def token_losses(lm: LoadedModel, ids: Int[Tensor, "n s"], heads: Mapping[int, Sequence[int]] | None = None,
                 mode: str = "zero", means: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
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
    active = {layer: list(hs) for layer, hs in (heads or {}).items() if len(hs)}
    with ablate_heads(lm, active, mode, means) if active else nullcontext():
        return _rows_nll(lm, ids, None, batch_size)


def sequence_losses(lm: LoadedModel, seqs: Sequence[Int[Tensor, " s"]], batch_size: int = 16,
                    start: Sequence[int] | None = None) -> list[Float[Tensor, " n"]]:
    """Negative log-likelihood (nats) of the next tokens of sequences of any lengths.

    Sequences of equal length are run together in batches of at most ``batch_size`` (stable order), so
    no sequence is padded and each one's losses are those of running it alone up to float rounding.
    Heads or neurons hooked by the caller (e.g. :func:`headlab.interventions.ablate_heads`) act
    on every position.

    Args:
        seqs: 1-D token id tensors, each at least 2 tokens.
        batch_size: sequences per forward pass.
        start: per sequence, the first token whose loss is wanted (1 .. len - 1; default 1: every
            token after the first).

    Returns:
        One tensor per sequence, in the order of ``seqs``: ``nll[j] = -log p(s[t] | s[:t])`` for
        ``t = start + j`` up to the last token; float32 on the CPU.
    """
    if not len(seqs) or min(len(s) for s in seqs) < 2:
        raise ValueError("sequence_losses needs at least one sequence and every sequence >= 2 tokens.")
    start = [1] * len(seqs) if start is None else [int(t) for t in start]
    if len(start) != len(seqs):
        raise ValueError(f"{len(start)} start positions for {len(seqs)} sequences.")
    bad = [(i, t) for i, (t, s) in enumerate(zip(start, seqs)) if not 1 <= t < len(s)]
    if bad:
        raise ValueError(f"start positions (sequence, start) {bad[:5]} out of range 1 .. len - 1.")
    out: list[Tensor | None] = [None] * len(seqs)
    for group in chunks(list(range(len(seqs))), [len(s) for s in seqs], batch_size, equal=True):
        ids = torch.stack([seqs[i] for i in group])  # (b, s): equal lengths
        # (transformers' logits_to_keep for the positions from the earliest start on was slower on CPU)
        nll = _rows_nll(lm, ids, None, len(group))  # (b, s - 1): tokens 1 .. s - 1
        for j, i in enumerate(group):
            out[i] = nll[j, start[i] - 1:]
    return out  # type: ignore[return-value]


def losses_keeping_inputs(lm: LoadedModel, ids: Int[Tensor, "n s"], layers: Sequence[int],
                          batch_size: int) -> tuple[Float[Tensor, "n s-1"], BlockInputs]:
    """Clean next-token losses of ``ids`` (as :func:`token_losses`) and the input of each of ``layers``
    for :func:`losses_from`, from one pass."""
    nll, kept = [], []
    for rows, logits, inputs in forward_rows(lm, ids, batch_size=batch_size, keep=layers):
        nll.append(_next_token_nll(logits, ids[rows]))
        kept.append(inputs)
    return torch.cat(nll), BlockInputs.cat(kept)


def losses_from(lm: LoadedModel, ids: Int[Tensor, "n s"], layer: int, clean: BlockInputs,
                batch_size: int) -> Float[Tensor, "n s-1"]:
    """Next-token losses with blocks before ``layer`` replaced by their clean output from
    :func:`losses_keeping_inputs` (use ``batch_size`` of that pass); an edit in ``layer`` or later
    cannot change them, so this equals a full forward under such an edit."""
    return _rows_nll(lm, ids, None, batch_size, layer, clean)


def _rows_nll(lm: LoadedModel, ids: Int[Tensor, "n s"], mask: Int[Tensor, "n s"] | None, batch_size: int,
              from_layer: int = 0, clean: BlockInputs | None = None) -> Float[Tensor, "n s-1"]:
    """NLL of every next token of every row (pads included), run from ``from_layer`` in fixed batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    return torch.cat([_next_token_nll(logits, ids[rows]) for rows, logits, _ in
                      forward_rows(lm, ids, mask, batch_size=batch_size, from_layer=from_layer, clean=clean)])


def _next_token_nll(logits: Float[Tensor, "b s vocab"], ids: Int[Tensor, "b s"]) -> Float[Tensor, "b s-1"]:
    """``-log p(ids[:, t + 1] | ids[:, :t + 1])`` from the logits of one batch, float32 on the CPU."""
    logp = torch.log_softmax(logits.float()[:, :-1], dim=-1)
    return -logp.gather(-1, ids[:, 1:, None].to(logp.device))[..., 0].cpu()
