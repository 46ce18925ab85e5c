"""The logit lens (nostalgebraist 2020): decode the residual stream after every block.

:func:`decode_residual` sends a residual vector through the model's own final norm, any modules after
it and the unembedding; after the last block this gives the model's logits exactly.
:func:`lens_label_scores` reads the label tokens off every layer for few-shot prompts, reusing the
shared-prefix cache of :mod:`headlab.engine.scoring`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headlab.engine.scoring import EncodedPrompts, chunks, forward_last, needs_equal_lengths, prefix_kv
from headlab.interventions import capture_residual
from headlab.models import get_module, LoadedModel

__all__ = ["decode_residual", "direction_logits", "lens_label_scores", "lens_logits"]


def _unembed_tail(lm: LoadedModel, x: Tensor) -> Tensor:
    """Modules after the final norm (OPT's ``project_out``), the unembedding and any logit soft-cap."""
    for path in lm.adapter.post_final:
        mod = get_module(lm.model, path)
        if mod is not None:
            x = mod(x)
    logits = lm.module("unembed")(x)
    cap = getattr(lm.config, lm.adapter.logit_softcap_attr, None) if lm.adapter.logit_softcap_attr else None
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def decode_residual(lm: LoadedModel, hidden: Float[Tensor, "*b d_model"]) -> Float[Tensor, "*b vocab"]:
    """Logits that the model would output if ``hidden`` were its last residual stream.

    Applies the final norm, any module between it and the unembedding (adapter ``post_final``), the
    unembedding and the final logit soft-cap (Gemma 2), all read through the adapter. Decoding the
    output of the last block reproduces the model's logits.
    """
    norm = lm.module("final_norm")
    x = hidden.to(lm.dtype)
    if norm is not None:
        x = norm(x)
    return _unembed_tail(lm, x)


def _norm_gain(norm: torch.nn.Module, d: int) -> Tensor:
    """Per-dimension gain of a final norm, measured by applying it (no knowledge of its class).

    On ``s`` = alternating +-1 (mean 0, mean square 1) every LayerNorm/RMSNorm variant computes
    ``gain * s + bias``, so ``gain = (norm(s) - norm(0)) * s`` (up to its ``eps``, ~1e-6 relative).
    This covers RMSNorms that scale by ``weight`` and those that scale by ``1 + weight`` alike.
    """
    if d % 2:
        raise ValueError(f"d_model={d} is odd; the norm gain probe needs an even width.")
    p = next(norm.parameters(), None)
    dev, dt = (p.device, p.dtype) if p is not None else ("cpu", torch.float32)
    s = torch.ones(d, device=dev, dtype=dt)
    s[1::2] = -1.0
    return (norm(s[None]) - norm(torch.zeros_like(s)[None]))[0] * s


def direction_logits(lm: LoadedModel, direction: Float[Tensor, "*b d_model"]) -> Float[Tensor, "*b vocab"]:
    """Vocabulary logits a residual-stream *direction* adds, through the final norm's linear part.

    The final norm divides by a per-token scale that depends on the whole residual stream; what a
    direction (e.g. a neuron's output weights) contributes is read off with that scale left out:
    the direction is centred (LayerNorm only), multiplied by the norm's gain, then mapped by the
    weights of any ``post_final`` module and of the unembedding. Biases and the final soft-cap are
    left out: they do not depend on the direction.
    """
    norm = lm.module("final_norm")
    x = direction.to(lm.device, lm.dtype)
    if norm is not None:
        if isinstance(norm, torch.nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
        x = x * _norm_gain(norm, x.shape[-1])
    for path in lm.adapter.post_final:
        mod = get_module(lm.model, path)
        if mod is not None:
            x = torch.nn.functional.linear(x, mod.weight)  # nn.Linear in every architecture
    return torch.nn.functional.linear(x, lm.module("unembed").weight)  # lm_head: nn.Linear everywhere


@torch.inference_mode()
def lens_logits(lm: LoadedModel, ids: Int[Tensor, "b s"], layers: Sequence[int] | None = None,
                positions: Sequence[int] | None = None) -> Float[Tensor, "L b p vocab"]:
    """Logit lens over a (small) unpadded batch: decoded residual stream after each listed block.

    Args:
        ids: token rows of equal length (no padding).
        layers: blocks to read (default all); row ``i`` of the result is ``layers[i]``.
        positions: positions to decode (default all).

    Returns:
        ``(n_layers_read, b, n_positions, vocab)`` float32 logits on the CPU.
    """
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    with capture_residual(lm, layers) as res:
        lm.model(input_ids=ids.to(lm.device), logits_to_keep=1)
    pos = slice(None) if positions is None else torch.as_tensor(list(positions), device=lm.device)
    return torch.stack([decode_residual(lm, res[layer][:, pos]).float().cpu() for layer in layers])


@torch.inference_mode()
def lens_label_scores(
    lm: LoadedModel,
    enc: EncodedPrompts,
    label_ids: Sequence[int],
    batch_size: int = 16,
) -> tuple[Float[Tensor, "L n n_labels"], Int[Tensor, "L n n_labels"]]:
    """Logit lens at the last token of few-shot prompts: label log-probabilities and ranks per layer.

    The shared prefix is run once (as in :func:`label_logprobs`); the residual stream after every
    block at each prompt's last token is decoded over the full vocabulary.

    Returns:
        ``(logprobs, ranks)``, each ``(n_layers, n_prompts, n_labels)`` on the CPU: the log-softmax of
        each label token and its rank among all vocabulary tokens (0 = the top token; the number of
        tokens with a strictly larger logit). At the last layer ``logprobs`` equals
        :func:`label_logprobs` up to float rounding.
    """
    kv = prefix_kv(lm, enc.prefix) if len(enc.prefix) else None
    L, n = lm.n_layers, len(enc)
    idx = torch.tensor(list(label_ids), device=lm.device)
    logprobs = torch.empty(L, n, len(idx))
    ranks = torch.empty(L, n, len(idx), dtype=torch.long)
    lengths = [len(q) for q in enc.queries]
    equal = kv is not None and needs_equal_lengths(lm, enc)
    for rows in chunks(list(range(n)), lengths, batch_size, equal):
        with capture_residual(lm) as res:
            forward_last(lm, enc, rows, kv)
        for layer in range(L):
            logits = decode_residual(lm, res[layer][:, -1]).float()  # (b, V): left padding, last = real
            lab = logits[:, idx]  # (b, n_labels)
            logprobs[layer, rows] = (lab - torch.logsumexp(logits, -1, keepdim=True)).cpu()
            ranks[layer, rows] = (logits[:, None, :] > lab[:, :, None]).sum(-1).cpu()
    return logprobs, ranks
