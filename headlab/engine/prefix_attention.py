"""Shared-prefix attention: query rows attend to a prefix cache they share, without copying it per row.

In a head sweep every (edit, prompt) row attends to the few-shot prefix's keys and values. Expanding
that cache per row costs memory and time; :func:`prefix_attention` instead attends each run of rows
to its prefix cache in one call and to its own tokens in another, and merges the two exactly through
their log-sum-exps. It is registered with transformers' ``AttentionInterface`` and switched on for
the duration of a block by :func:`use_prefix_attention`.

Everything that makes one layer's attention differ from another's comes from the model: the score
scale and soft-cap are the arguments transformers passes (``scaling``, ``softcap``: Gemma's
``query_pre_attn_scalar``, Gemma 2's soft-cap), and the sliding window of each layer is
:attr:`~headlab.models.LoadedModel.layer_windows` (checked against the ``sliding_window`` argument
where the model passes one). Windows are applied in real token positions, so left padding between the
prefix and a query does not matter here (unlike transformers' index-based masks). Architectures whose
attention does not go through the ``AttentionInterface`` (GPT-Neo, BLOOM's ALiBi, Falcon) cannot use
this path; :func:`prefix_attention_unsupported` says why and the sweep uses transformers' attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AttentionInterface

from headlab.models import LoadedModel

__all__ = ["PREFIX_ATTENTION", "PrefixState", "prefix_attention", "prefix_attention_unsupported", "prefix_kv_at",
           "use_prefix_attention"]


#: Name under which :func:`prefix_attention` is registered with transformers' AttentionInterface.
PREFIX_ATTENTION = "headlab_shared_prefix"


@dataclass
class PrefixState:
    """What :func:`prefix_attention` needs besides the query tokens' own keys and values.

    Attributes:
        kv: ``layer -> (keys, values)``, each ``(g, n_kv, P, d_head)``: ``g`` prefix caches.
        groups: ``(b,)`` index of the prefix cache each batch row attends to; rows of one cache
            must be contiguous.
        pads: ``(b,)`` left pads of each row (masked as keys).
        windows: per layer, the sliding window (keys a query may see, itself included) or ``None``.
            A sliding-window layer's cache holds only the last ``K`` prefix keys (transformers keeps
            ``window - 1``), at positions ``P - K .. P - 1``.
    """

    kv: Callable[[int], tuple[Tensor, Tensor]]
    groups: Tensor
    pads: Tensor
    windows: list[int | None]


_PREFIX_STATE: list[PrefixState] = []  # the active state (a stack of at most one)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float | None,
            mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scores (to merge key blocks).

    ``q (..., n, d)``, ``k``/``v (..., m, d)``, boolean ``mask`` broadcastable to ``(..., n, m)``
    (True: may attend). Returns ``out (..., n, d)`` and ``lse (..., n)``, computed in float32 for
    half-precision inputs. Uses PyTorch's fused CPU flash kernel when it applies (no soft-cap,
    float32 on the CPU, 4-d tensors: it never materialises the scores), else plain tensor code.
    """
    if not softcap and q.device.type == "cpu" and q.dtype == torch.float32 and q.dim() == 4:
        additive = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=additive, scale=scale)
        return out, lse
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = torch.matmul(q, k.transpose(-1, -2)).to(work).mul_(scale)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = scores.sub_(lse[..., None]).exp_()
    return torch.matmul(probs.to(v.dtype), v).to(work), lse


def prefix_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, **kwargs: object) -> tuple[Tensor, None]:
    """Attention of the query tokens over [shared prefix cache ; their own keys], exactly.

    For each prefix cache, the queries of all rows that use it (a contiguous run of rows) attend to
    it in one call, as one long query sequence per key/value head: the prefix keys are never
    expanded or copied per row or per GQA group. The own-key part is causal with left pads masked.
    The two parts are merged through their log-sum-exps, which is exactly the softmax over their
    concatenation. Called by transformers in place of sdpa/eager (see :data:`PREFIX_ATTENTION`).

    Shapes: ``query (b, H, q, d)``, ``key``/``value (b, n_kv, q, d)``; returns ``(b, q, H, d)``.
    """
    state = _PREFIX_STATE[-1]
    b, H, q, d = query.shape
    n_kv = key.shape[1]
    rep = H // n_kv
    scale = d ** -0.5 if scaling is None else scaling
    layer = module.layer_idx
    window = state.windows[layer]
    declared = kwargs.get("sliding_window")
    if declared is not None and declared != window:
        raise RuntimeError(f"layer {layer} attends with sliding_window={declared}, but the config says {window} "
                           "(headlab.models.Adapter.windows); refusing to guess.")
    pk, pv = state.kv(layer)  # (g, n_kv, K, d): the last K prefix keys (K = P unless the layer slides)
    K = pk.shape[2]
    pads = state.pads.to(query.device)
    # (b, n_kv, rep*q, d): GQA group-major rows; row r*q + i is query position i of head kv*rep + r
    qg = query.reshape(b, n_kv, rep * q, d)
    pos = torch.arange(q, device=query.device)
    # own keys: causal over real keys (and within the window); a pad query sees itself only, so that no
    # row is empty (its output is never read, but a NaN there would reach real rows as 0 * NaN later)
    allowed = pos[None, :] <= pos[:, None]  # (q, q)
    if window is not None:
        allowed = allowed & (pos[:, None] - pos[None, :] < window)
    allowed = (allowed[None] & (pos[None, None, :] >= pads[:, None, None])) | torch.eye(
        q, dtype=torch.bool, device=query.device)[None]
    allowed = allowed[:, None, None].expand(b, 1, rep, q, q).reshape(b, 1, rep * q, q)
    own_out, own_lse = _attend(qg, key, value, scale, softcap, allowed)  # (b, n_kv, rq, d), (b, n_kv, rq)
    # prefix keys: query i of row b is at position P + i - pads[b], prefix key k at P - K + k; a window
    # keeps the keys with (P + i - pads[b]) - (P - K + k) < window
    t = pos[None, :] - pads[:, None]  # (b, q) offset of each query after the prefix
    needs_mask = window is not None and q - 1 + K >= window
    # runs of rows sharing a prefix cache (one shared cache, g == 1, serves every row)
    if pk.shape[0] == 1:
        runs = [(0, 0, b)]
    else:
        ids, counts = torch.unique_consecutive(state.groups, return_counts=True)
        ends = torch.cumsum(counts, 0).tolist()
        runs = [(int(g), e - int(c), e) for g, c, e in zip(ids, counts, ends)]
    out = torch.empty(b, n_kv, rep * q, d, dtype=query.dtype, device=query.device)
    for g, lo, hi in runs:
        nb = hi - lo
        qr = qg[lo:hi].transpose(0, 1).reshape(1, n_kv, nb * rep * q, d)  # every row's queries in a line
        pre_mask = None
        if needs_mask:
            kpos = torch.arange(K, device=query.device)
            seen = kpos[None, None, :] > t[lo:hi, :, None] + K - window  # (nb, q, K)
            pre_mask = seen[:, None].expand(nb, rep, q, K).reshape(1, 1, nb * rep * q, K)
        pre_out, pre_lse = _attend(qr, pk[g:g + 1], pv[g:g + 1], scale, softcap, pre_mask)
        if pre_mask is not None:  # queries further than the window from every prefix key see none of it:
            none = ~pre_mask.any(-1)  # (1, 1, nb*rep*q); their lse is -inf (the flash kernel says 0)
            pre_lse = pre_lse.masked_fill(none, float("-inf"))
            pre_out = pre_out.masked_fill(none[..., None], 0.0)
        pre_out = pre_out.view(n_kv, nb, rep * q, d).transpose(0, 1)
        pre_lse = pre_lse.view(n_kv, nb, rep * q).transpose(0, 1)
        lse = torch.logaddexp(pre_lse, own_lse[lo:hi])
        merged = pre_out * (pre_lse - lse).exp()[..., None] + own_out[lo:hi] * (own_lse[lo:hi] - lse).exp()[..., None]
        out[lo:hi] = merged.to(query.dtype)
    return out.view(b, H, q, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)


@contextmanager
def use_prefix_attention(lm: LoadedModel, state: PrefixState) -> Iterator[None]:
    """Run the model with :func:`prefix_attention` and ``state``; the old implementation comes back.

    Raises:
        ValueError: the architecture's attention does not go through transformers' AttentionInterface
            (:func:`prefix_attention_unsupported`), so the substitution would silently not happen.
    """
    reason = prefix_attention_unsupported(lm)
    if reason is not None:
        raise ValueError(reason)
    old = lm.model.config._attn_implementation
    _PREFIX_STATE.append(state)
    try:
        lm.model.set_attn_implementation(PREFIX_ATTENTION)
        yield
    finally:
        _PREFIX_STATE.pop()
        lm.model.set_attn_implementation(old)


def prefix_attention_unsupported(lm: LoadedModel) -> str | None:
    """Why :func:`prefix_attention` cannot stand in for this model's attention, or ``None`` when it can.

    It can for every architecture whose attention goes through transformers' ``AttentionInterface``
    (sliding windows and soft-caps included); not for those the adapter marks ``own_attention``
    (GPT-Neo, BLOOM, Falcon), whose attention code transformers cannot swap.
    """
    if lm.adapter.own_attention:
        return (f"the shared-prefix attention cannot stand in for {lm.adapter.name} ({lm.adapter.own_attention}); "
                "use transformers' attention over per-row prefix caches (shared_prefix_attention=False)")
    return None


def prefix_kv_at(clean_kv: list[tuple[Tensor, Tensor]], edited_kv: list[tuple[Tensor, Tensor]], layer: int,
                  j: int) -> tuple[Tensor, Tensor]:
    """Prefix keys/values block ``j`` attends to when heads of ``layer`` are edited."""
    return clean_kv[j] if j <= layer else edited_kv[j]
