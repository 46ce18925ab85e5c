"""Interventions as context managers that always undo themselves.

Every hook is registered on entry and removed in ``finally``, so an exception inside the ``with``
block (or inside the hook) leaves the model exactly as it was::

    with ablate_heads(lm, {5: [1, 3]}):
        logits = lm.model(ids).logits

A head's output is edited where it exists on its own: the **input** of the attention output
projection, viewed as ``(batch, seq, n_heads, head_dim)`` (GQA only shares keys/values between
heads; every query head still has its own slice here). Nothing zeroes a slice of the residual stream
and calls it a head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float
from torch import Tensor, nn

from headlab.edits import ABLATIONS, HeadEdit, noise_keys
from headlab.models import LoadedModel

__all__ = [
    "ablate_heads",
    "ablate_neurons",
    "apply_head_edits",
    "check_neurons",
    "capture",
    "capture_residual",
    "check_heads",
    "edit_heads",
    "edit_neurons",
    "hooks",
    "noise_heads",
    "observe",
]

HeadFn = Callable[[Float[Tensor, "b s n_heads d_head"]], Float[Tensor, "b s n_heads d_head"] | None]


@contextmanager
def hooks(
    pre: Sequence[tuple[nn.Module, Callable]] = (),
    post: Sequence[tuple[nn.Module, Callable]] = (),
) -> Iterator[None]:
    """Register forward pre-hooks and forward hooks for the duration of the block.

    Args:
        pre: ``(module, fn)`` pairs; ``fn(module, args)`` may return new ``args``.
        post: ``(module, fn)`` pairs; ``fn(module, args, output)`` may return a new output.
    """
    handles = []
    try:
        for mod, fn in pre:
            handles.append(mod.register_forward_pre_hook(fn))
        for mod, fn in post:
            handles.append(mod.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def _per_head(lm: LoadedModel, fn: HeadFn) -> Callable:
    """Wrap ``fn(z)`` on ``(b, s, n_heads, d_head)`` into a pre-hook on the output projection."""
    n_heads, d_head = lm.n_heads, lm.head_dim

    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        z = x.reshape(*x.shape[:-1], n_heads, d_head).clone()  # (b, s, nh, dh)
        out = fn(z)
        z = z if out is None else out
        return (z.reshape(x.shape), *args[1:])

    return pre_hook


@contextmanager
def edit_heads(lm: LoadedModel, fns: Mapping[int, HeadFn]) -> Iterator[None]:
    """Apply ``fns[layer](z)`` to the per-head outputs ``z`` of each listed layer.

    ``z`` has shape ``(batch, seq, n_heads, head_dim)``; ``fn`` may edit it in place (it is a copy)
    or return a replacement.
    """
    pre = [(lm.layer_module(layer, "attn_out"), _per_head(lm, fn)) for layer, fn in fns.items()]
    with hooks(pre=pre):
        yield


def check_heads(lm: LoadedModel, heads: Mapping[int, Sequence[int]]) -> None:
    """Raise ``ValueError`` naming any layer or head of ``{layer: [head, ...]}`` the model does not have."""
    for layer, hs in heads.items():
        if not 0 <= layer < lm.n_layers:
            raise ValueError(f"layer {layer} out of range 0..{lm.n_layers - 1}.")
        bad = [h for h in hs if not 0 <= h < lm.n_heads]
        if bad:
            raise ValueError(f"head(s) {bad} in layer {layer} out of range 0..{lm.n_heads - 1}.")


@contextmanager
def apply_head_edits(
    lm: LoadedModel,
    edits: Sequence[HeadEdit],
    samples: Sequence[int | str] | None = None,
    prefix_len: int = 0,
    lengths: Sequence[int] | None = None,
    means: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
) -> Iterator[None]:
    """Apply head edits (any mix of kinds, layers and heads) in a plain forward pass, each through
    :meth:`HeadEdit.apply` -- the same arithmetic the engine applies (:func:`headlab.engine.sweep_heads`).

    Row ``b`` of the batch is sample ``samples[b]`` with ``lengths[b]`` real tokens at the start (the
    rest is right padding, left as it is). Its noise on the first ``prefix_len`` positions is the
    shared prefix's draw and on the rest the sample's own draw (:func:`headlab.edits.noise_keys`), so
    it matches the cached engine exactly. Without ``lengths``, zero / mean edits set every position
    of every row.

    Args:
        edits: the edits; checked against the model before any hook is set.
        samples: sample id per batch row (default ``0, 1, ...``).
        prefix_len: number of leading positions that are the shared prefix.
        lengths: real tokens per row (default: the whole row).
        means: for ``"mean"`` edits: ``{layer: (n_heads, head_dim)}`` mean head outputs over a reference
            batch (see :func:`headlab.attention.head_output_means`).
    """
    for e in edits:
        e.check(lm.n_layers, lm.n_heads)
        if e.kind == "mean" and (means is None or e.layer not in means):
            raise ValueError(f"{e} needs `means` for layer {e.layer} (see headlab.attention.head_output_means).")
    by_layer: dict[int, list[HeadEdit]] = {}
    for e in edits:
        by_layer.setdefault(e.layer, []).append(e)

    def make(layer: int, layer_edits: list[HeadEdit]) -> HeadFn:
        m = None if means is None else means.get(layer)

        def fn(z: Tensor) -> None:  # (b, s, n_heads, d_head), a copy
            b, s = z.shape[:2]
            ids = list(range(b)) if samples is None else list(samples)
            for e in layer_edits:
                if e.kind != "noise" and lengths is None:  # the same at every position: all rows at once
                    e.apply(z[:, :, e.head], means=m)
                    continue
                for row in range(b):
                    n = s if lengths is None else lengths[row]
                    e.apply(z[row, :n, e.head], noise_keys(ids[row], prefix_len, n - prefix_len), m)

        return fn

    with edit_heads(lm, {layer: make(layer, es) for layer, es in by_layer.items()}):
        yield


@contextmanager
def ablate_heads(
    lm: LoadedModel,
    heads: Mapping[int, Sequence[int]],
    mode: str = "zero",
    means: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
) -> Iterator[None]:
    """Zero- or mean-ablate heads: replace their output slice by 0 or by a reference mean.

    "Zero" sets the head's output (its attention-weighted sum of values, before the output
    projection) to zero at every position -- equivalently, the head adds nothing but the output
    projection's bias to the residual stream. This is *not* setting attention scores to -inf, which
    gives rows of NaN after the softmax.

    Args:
        heads: ``{layer: [head, ...]}``.
        mode: ``"zero"`` or ``"mean"``.
        means: for ``"mean"``: ``{layer: (n_heads, head_dim)}`` mean head outputs over a reference
            batch (see :func:`headlab.attention.head_output_means`).
    """
    if mode not in ABLATIONS:
        raise ValueError(f"mode={mode!r}; use one of {ABLATIONS}.")
    check_heads(lm, heads)
    with apply_head_edits(lm, [HeadEdit(mode, layer, h) for layer, hs in heads.items() for h in hs], means=means):
        yield


@contextmanager
def noise_heads(
    lm: LoadedModel,
    edits: Sequence[HeadEdit],
    samples: Sequence[int | str] | None = None,
    prefix_len: int = 0,
    lengths: Sequence[int] | None = None,
) -> Iterator[None]:
    """Add seeded Gaussian noise to heads (the plain, one-forward reference implementation).

    Row ``b`` of the batch is sample ``samples[b]``; its noise at sequence position ``t`` is
    ``scale * head_noise(seed, layer, head, PREFIX)[t]`` for ``t < prefix_len`` and
    ``scale * head_noise(seed, layer, head, samples[b])[t - prefix_len]`` after, so it matches the
    cached engine exactly (see :func:`apply_head_edits`, which this is for ``kind="noise"`` edits).
    Rows are assumed unpadded (or right-padded, with ``lengths`` real tokens).

    Args:
        edits: noise edits (``kind="noise"``); several heads may be perturbed at once.
        samples: sample id per batch row (default ``0, 1, ...``).
        prefix_len: number of leading positions that are the shared prefix.
        lengths: real tokens per row (default: the whole row).
    """
    for e in edits:
        if e.kind != "noise":
            raise ValueError(f"noise_heads takes kind='noise' edits, got {e}.")
    with apply_head_edits(lm, edits, samples, prefix_len, lengths):
        yield


@contextmanager
def capture(lm: LoadedModel, layers: Sequence[int] | None = None, site: str = "attn_out",
            store: dict[int, Tensor] | None = None) -> Iterator[dict[int, Tensor]]:
    """Record the input of ``site`` (default: per-head outputs at the output projection) per layer.

    Yields a dict filled during the forward pass: ``{layer: tensor}`` with the module input as it
    arrived (``(b, s, n_heads * head_dim)`` for ``attn_out``, ``(b, s, d_mlp)`` for ``mlp_out``), detached.
    """
    store = {} if store is None else store
    layers = range(lm.n_layers) if layers is None else layers

    def make(layer: int) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            store[layer] = args[0].detach()

        return pre_hook

    with hooks(pre=[(lm.layer_module(layer, site), make(layer)) for layer in layers]):
        yield store


# --------------------------------------------------------------------------------------------------
# FFN neurons and the residual stream
# --------------------------------------------------------------------------------------------------
NeuronFn = Callable[[Float[Tensor, "b s d_mlp"]], Float[Tensor, "b s d_mlp"] | None]


@contextmanager
def observe(lm: LoadedModel, fn: Callable[[int, Tensor], None], layers: Sequence[int] | None = None,
            site: str = "mlp_out") -> Iterator[None]:
    """Call ``fn(layer, x)`` with the input ``x`` of ``site`` in each layer during every forward pass.

    The streaming counterpart of :func:`capture`: nothing is kept unless ``fn`` keeps it, so a caller
    can aggregate each layer's activations as they are produced (``x`` is ``(b, s, d_mlp)`` for
    ``"mlp_out"``, the FFN neuron activations after the activation function / gate product; OPT's
    blocks pass it flattened to ``(b * s, d_mlp)``).
    """
    layers = range(lm.n_layers) if layers is None else layers

    def make(layer: int) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            fn(layer, args[0].detach())

        return pre_hook

    with hooks(pre=[(lm.layer_module(layer, site), make(layer)) for layer in layers]):
        yield


@contextmanager
def capture_residual(lm: LoadedModel, layers: Sequence[int] | None = None,
                     store: dict[int, Tensor] | None = None) -> Iterator[dict[int, Tensor]]:
    """Record the residual stream after each listed block (the block's output), ``(b, s, d_model)``.

    Blocks that return a tuple contribute its first element. The output of the last block is the
    residual stream *before* the final norm (what the logit lens decodes).
    """
    store = {} if store is None else store
    layers = range(lm.n_layers) if layers is None else layers

    def make(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
            store[layer] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    with hooks(post=[(lm.layers[layer], make(layer)) for layer in layers]):
        yield store


@contextmanager
def edit_neurons(lm: LoadedModel, fns: Mapping[int, NeuronFn]) -> Iterator[None]:
    """Apply ``fns[layer](a)`` to the FFN neuron activations ``a`` (input of the down projection).

    ``a`` has shape ``(batch, seq, d_mlp)`` and is a copy: ``fn`` may edit it in place or return a
    replacement.
    """

    def make(fn: NeuronFn) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> tuple:
            a = args[0].clone()
            out = fn(a)
            return (a if out is None else out, *args[1:])

        return pre_hook

    pre = [(lm.layer_module(layer, "mlp_out"), make(fn)) for layer, fn in fns.items()]
    with hooks(pre=pre):
        yield


def check_neurons(lm: LoadedModel, neurons: Mapping[int, Sequence[int]]) -> None:
    """Refuse a ``{layer: [neuron, ...]}`` map with a layer or neuron index outside the model."""
    for layer, ns in neurons.items():
        if not 0 <= layer < lm.n_layers:
            raise ValueError(f"layer {layer} out of range 0..{lm.n_layers - 1}.")
        bad = [n for n in ns if not 0 <= n < lm.d_mlp]
        if bad:
            raise ValueError(f"neuron(s) {bad} in layer {layer} out of range 0..{lm.d_mlp - 1}.")


@contextmanager
def ablate_neurons(
    lm: LoadedModel,
    neurons: Mapping[int, Sequence[int]],
    mode: str = "zero",
    means: Mapping[int, Float[Tensor, " d_mlp"]] | None = None,
) -> Iterator[None]:
    """Zero- or mean-ablate FFN neurons: replace their activation by 0 or a reference mean.

    Zeroing neuron ``n`` of a layer equals deleting column ``n`` of the down projection's weight
    (the neuron then writes nothing to the residual stream); mean ablation writes the neuron's mean
    output direction scaled by its mean activation instead, at every position.

    Args:
        neurons: ``{layer: [neuron, ...]}``; empty lists are allowed (no edit).
        mode: ``"zero"`` or ``"mean"``.
        means: for ``"mean"``: ``{layer: (d_mlp,)}`` mean activations over a reference corpus (see
            :meth:`headlab.neurons.NeuronStats.mean`).
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode={mode!r}; use 'zero' or 'mean'.")
    check_neurons(lm, neurons)
    if mode == "mean" and (means is None or any(layer not in means for layer, ns in neurons.items() if len(ns))):
        raise ValueError("mode='mean' needs `means` for every ablated layer (see headlab.neurons.NeuronStats.mean).")

    def make(layer: int, ns: list[int]) -> NeuronFn:
        idx = torch.tensor(ns, dtype=torch.long)

        def fn(a: Tensor) -> None:
            i = idx.to(a.device)
            if mode == "zero":
                a[..., i] = 0.0
            else:
                a[..., i] = means[layer].to(a.device, a.dtype)[i]

        return fn

    with edit_neurons(lm, {layer: make(layer, list(ns)) for layer, ns in neurons.items() if len(ns)}):
        yield


