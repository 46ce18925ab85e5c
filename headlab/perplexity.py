"""Next-token losses: strided-window perplexity of a token stream, and losses of token rows.

:func:`token_nll` is the usual strided perplexity evaluation. :func:`text_windows` cuts a stream into
the same windows and keeps the clean input of every block, so that :func:`windows_nll` can recompute
only the blocks an edit can change (a weight edit in layer ``l`` leaves blocks ``0 .. l-1`` as they
were).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headlab.engine.recompute import skip_layers_before
from headlab.engine.scoring import batches
from headlab.interventions import ablate_heads, capture_residual
from headlab.models import LoadedModel

__all__ = ["TextWindows", "perplexity", "text_windows", "losses_from", "losses_keeping_inputs", "token_losses",
           "token_nll", "windows_nll"]


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
        stride: step between windows, ``0 < stride <= context``. With ``stride == context`` the
            windows overlap by one token so that the first token of each window is still predicted.
        batch_size: windows per forward pass.

    Returns:
        ``(nll, window)``: NLL in nats of each scored token (the first token is never scored) and the
        index of the window that scored it (for block-bootstrap confidence intervals).
    """
    if context < 2:
        raise ValueError(f"context={context} must be at least 2 tokens (stride={stride}).")
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must satisfy 0 < stride <= context={context}.")
    n = len(ids)
    if n < 2:
        raise ValueError("Need at least 2 tokens to score.")
    nll, win = [], []
    spans = _nll_spans(n, context, stride)
    for rows in batches(len(spans), batch_size):
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


@dataclass
class TextWindows:
    """A token stream cut into the windows of :func:`token_nll`, with each block's clean input.

    Attributes:
        ids: ``(W, C)`` window token ids, right-padded with 0 where a window is shorter.
        mask: ``(W, C)`` 1 at real tokens.
        first: ``(W,)`` first scored position of each window, relative to the window start.
        hidden: ``(L, W, C, d_model)`` input of every block in the clean model (None if not kept).
        batch_size: windows per forward pass the hidden states were computed with (reused, so that a
            recomputation from layer 0 is bit-identical to the clean pass).
    """

    ids: Int[Tensor, "W C"]
    mask: Int[Tensor, "W C"]
    first: Int[Tensor, " W"]
    hidden: Float[Tensor, "L W C d"] | None
    batch_size: int

    @property
    def n_scored(self) -> int:
        return int(sum(int(m.sum()) - int(f) for m, f in zip(self.mask, self.first)))

    def head(self, n_windows: int) -> TextWindows:
        """The first ``n_windows`` windows (a smaller token budget scored in exactly the same way)."""
        if not 1 <= n_windows <= len(self.ids):
            raise ValueError(f"n_windows={n_windows} must be in 1..{len(self.ids)}.")
        hid = None if self.hidden is None else self.hidden[:, :n_windows]
        return TextWindows(self.ids[:n_windows], self.mask[:n_windows], self.first[:n_windows], hid,
                           self.batch_size)


@torch.inference_mode()
def text_windows(lm: LoadedModel, ids: Int[Tensor, " N"], context: int = 512, stride: int = 256,
                 batch_size: int = 8, keep_hidden: bool = True) -> TextWindows:
    """Cut ``ids`` into :func:`token_nll`'s windows and (``keep_hidden``) run the clean model once,
    keeping the input of every block, so that :func:`windows_nll` can start at any layer."""
    if context < 2 or not 0 < stride <= context:
        raise ValueError(f"need context >= 2 and 0 < stride <= context; "
                         f"got context={context}, stride={stride}.")
    if len(ids) < 2:
        raise ValueError("Need at least 2 tokens to score.")
    spans = _nll_spans(len(ids), context, stride)
    width = max(e - s for _, s, e, _ in spans)
    x = torch.stack([torch.nn.functional.pad(ids[s:e], (0, width - (e - s))) for _, s, e, _ in spans])
    mask = torch.stack([(torch.arange(width) < e - s).long() for _, s, e, _ in spans])
    first = torch.tensor([f - s for _, s, _, f in spans])
    hidden = None
    if keep_hidden:
        hidden = torch.empty(lm.n_layers, len(spans), width, lm.d_model, dtype=lm.dtype, device=lm.device)
        for rows in batches(len(spans), batch_size):
            out = lm.model(input_ids=x[rows].to(lm.device), attention_mask=mask[rows].to(lm.device),
                           output_hidden_states=True, logits_to_keep=1)
            for layer in range(lm.n_layers):
                hidden[layer, rows.start:rows.stop] = out.hidden_states[layer]
    return TextWindows(x, mask, first, hidden, batch_size)


@torch.inference_mode()
def windows_nll(lm: LoadedModel, windows: TextWindows, from_layer: int = 0,
                batch_size: int | None = None) -> tuple[Float[Tensor, " M"], Int[Tensor, " M"]]:
    """Per-token NLL of the windows, as :func:`token_nll` gives it, computing blocks ``from_layer`` on.

    Blocks before ``from_layer`` are not run: their output is the clean input of block ``from_layer``
    kept by :func:`text_windows`. Use it under an edit that changes nothing before ``from_layer``
    (a weight edit in layer ``from_layer`` or later); the result then equals a full forward.

    Returns:
        ``(nll, window)`` like :func:`token_nll`.
    """
    if not 0 <= from_layer < lm.n_layers:
        raise ValueError(f"from_layer={from_layer} out of range 0..{lm.n_layers - 1}.")
    if from_layer > 0 and windows.hidden is None:
        raise ValueError("from_layer > 0 needs the clean hidden states: text_windows(..., keep_hidden=True).")
    batch_size = batch_size or windows.batch_size
    nll, win = [], []
    for rows in batches(len(windows.ids), batch_size):
        x = windows.ids[rows].to(lm.device)
        mask = windows.mask[rows]
        ctx = (skip_layers_before(lm, from_layer, windows.hidden[from_layer, rows.start:rows.stop])
               if from_layer > 0 else nullcontext())
        with ctx:
            logits = lm.model(input_ids=x, attention_mask=mask.to(lm.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_nll = -logp.gather(-1, x[:, 1:, None])[..., 0].cpu()  # (b, width-1): nll of token t+1
        for j, w in enumerate(rows):
            first, length = int(windows.first[w]), int(mask[j].sum())
            sel = tok_nll[j, first - 1:length - 1]
            nll.append(sel)
            win.append(torch.full((len(sel),), w, dtype=torch.long))
    return torch.cat(nll), torch.cat(win)


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


def losses_keeping_inputs(lm: LoadedModel, ids: Int[Tensor, "n s"], layers: list[int],
                          batch_size: int) -> tuple[Float[Tensor, "n s-1"], dict[int, Float[Tensor, "n s d"]]]:
    """Clean next-token losses of ``ids`` and the residual stream entering each of ``layers``."""
    before = sorted({layer - 1 for layer in layers if layer > 0})
    nll, kept = [], {layer: [] for layer in before}
    for start in range(0, len(ids), batch_size):
        with capture_residual(lm, before) as res:
            nll.append(token_losses(lm, ids[start:start + batch_size], batch_size=batch_size))
        for layer in before:
            kept[layer].append(res[layer])
    return torch.cat(nll), {layer + 1: torch.cat(h) for layer, h in kept.items()}


def losses_from(lm: LoadedModel, ids: Int[Tensor, "n s"], layer: int, hidden: dict[int, Tensor],
                batch_size: int) -> Float[Tensor, "n s-1"]:
    """Next-token losses with blocks before ``layer`` replaced by their cached clean output ``hidden[layer]``
    (an edit in ``layer`` cannot change them); equal to a full forward up to float rounding."""
    if layer == 0:
        return token_losses(lm, ids, batch_size=batch_size)
    out = []
    for start in range(0, len(ids), batch_size):
        with skip_layers_before(lm, layer, hidden[layer][start:start + batch_size]):
            out.append(token_losses(lm, ids[start:start + batch_size], batch_size=batch_size))
    return torch.cat(out)
