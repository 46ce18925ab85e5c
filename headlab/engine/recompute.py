"""Recompute only what an edit can change: blocks before the edited layer keep their clean output.

An edit in layer ``l`` (a head, a neuron or a weight of block ``l``) cannot change blocks ``0 .. l-1``.
Their clean output -- the input of block ``l`` -- is kept from one clean pass, and a later pass starts
at block ``l``. This is the one implementation of that idea; the head sweep, windowed perplexity and
next-token losses all use it:

* :func:`keep_block_inputs` -- during a clean forward, record the input of chosen blocks;
* :func:`skip_layers_before` -- during a later forward, blocks ``0 .. l-1`` return the kept input of
  block ``l`` without running;
* :class:`BlockInputs` and :func:`forward_rows` -- token rows run in fixed batches, either keeping
  the inputs (the clean pass) or starting from a layer (an edited pass). With the same batches, a
  pass from layer 0 is bit-identical to the clean pass, and from layer ``l`` it equals a full forward
  under an edit in layer ``l`` or later.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headlab.engine.scoring import batches
from headlab.interventions import capture_residual
from headlab.models import LoadedModel
from headlab.progress import track

__all__ = ["BlockInputs", "forward_rows", "keep_block_inputs", "skip_layers_before"]


@contextmanager
def keep_block_inputs(lm: LoadedModel, layers: Iterable[int]) -> Iterator[dict[int, Tensor]]:
    """Record the input of each listed block during the forward pass run inside the ``with`` block.

    Yields a dict that is filled when the ``with`` block ends: ``{layer: (b, s, d_model)}``, the
    output of block ``layer - 1`` (blocks that return a tuple contribute its first element). Layer 0
    is left out: nothing runs before it, so starting there needs no kept input.
    """
    kept: dict[int, Tensor] = {}
    with capture_residual(lm, sorted({layer - 1 for layer in layers if layer > 0})) as out:
        yield kept
    kept.update({layer + 1: hidden for layer, hidden in out.items()})


@contextmanager
def skip_layers_before(lm: LoadedModel, layer: int, hidden: Tensor | None) -> Iterator[None]:
    """Make blocks ``0 .. layer-1`` return ``hidden`` (the kept input of block ``layer``) unrun.

    ``layer=0`` skips nothing (``hidden`` may then be ``None``). Blocks of architectures that return a
    tuple (``Adapter.block_returns_tuple``) return ``(hidden,)``.
    """
    blocks = [lm.layers[i] for i in range(layer)]
    out = (hidden,) if lm.adapter.block_returns_tuple else hidden
    # A block may already carry an instance ``forward`` (accelerate's device hooks do): put it back.
    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for block in blocks:
            block.forward = lambda *args, **kwargs: out  # instance attribute shadows the method
        yield
    finally:
        for block, old in zip(blocks, saved):
            if old is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = old


@dataclass
class BlockInputs:
    """The clean input of some blocks for a set of rows, kept by :func:`keep_block_inputs`.

    Attributes:
        hidden: ``{layer: (n, s, d_model)}``: the input of block ``layer`` for each of ``n`` rows
            (never layer 0, which needs none).
    """

    hidden: dict[int, Float[Tensor, "n s d"]]

    def at(self, layer: int, rows: slice | Tensor = slice(None),
           positions: slice = slice(None)) -> Float[Tensor, "b s d"] | None:
        """The kept input of block ``layer`` for ``rows`` at ``positions``; ``None`` for layer 0 (there
        is nothing to skip)."""
        if layer == 0:
            return None
        if layer not in self.hidden:
            raise ValueError(f"The clean pass kept the input of blocks {sorted(self.hidden)}, not of block "
                             f"{layer}; keep it (keep=[..., {layer}]) to start there.")
        return self.hidden[layer][rows, positions]

    def head(self, n: int) -> BlockInputs:
        """The first ``n`` rows."""
        return BlockInputs({layer: h[:n] for layer, h in self.hidden.items()})

    @staticmethod
    def cat(parts: Sequence[dict[int, Tensor]]) -> BlockInputs:
        """Join the per-batch dicts of :func:`keep_block_inputs` along the rows."""
        layers = parts[0].keys() if parts else ()
        return BlockInputs({layer: torch.cat([p[layer] for p in parts]) for layer in layers})


@torch.inference_mode()
def forward_rows(
    lm: LoadedModel,
    ids: Int[Tensor, "n s"],
    mask: Int[Tensor, "n s"] | None = None,
    *,
    batch_size: int,
    from_layer: int = 0,
    clean: BlockInputs | None = None,
    keep: Iterable[int] = (),
    logits_to_keep: int = 0,
) -> Iterator[tuple[slice, Float[Tensor, "b s vocab"], dict[int, Tensor]]]:
    """Run token rows in batches of ``batch_size`` consecutive rows; yield ``(rows, logits, kept)`` per batch.

    Args:
        lm: the model.
        ids: token rows, right-padded where ``mask`` is 0.
        mask: ``1`` at real tokens (``None``: every token is real and no mask is passed).
        batch_size: rows per forward pass. Recompute with the batch size of the clean pass to be
            bit-identical to it from layer 0.
        from_layer: blocks before it are not run; their output is ``clean.at(from_layer, rows)``.
        clean: the kept inputs of the clean pass (needed for ``from_layer > 0``).
        keep: layers whose block input is recorded: ``kept[layer]`` is ``(b, s, d_model)`` (join the
            batches with :meth:`BlockInputs.cat`).
        logits_to_keep: as in transformers (``0``: every position; ``1``: the last only).

    Yields:
        The batch's rows (a slice), its logits and the kept block inputs (empty without ``keep``).
    """
    if not 0 <= from_layer < lm.n_layers:
        raise ValueError(f"from_layer={from_layer} out of range 0..{lm.n_layers - 1}.")
    if from_layer > 0 and clean is None:
        raise ValueError(f"from_layer={from_layer} needs the clean block inputs (`clean`), kept by a clean pass.")
    keep = list(keep)
    extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    for batch in track(list(batches(len(ids), batch_size)), "forward passes", unit="batch"):
        rows = slice(batch.start, batch.stop)
        if mask is not None:
            extra["attention_mask"] = mask[rows].to(lm.device)
        hidden = None if clean is None else clean.at(from_layer, rows)
        with skip_layers_before(lm, from_layer, hidden), keep_block_inputs(lm, keep) as kept:
            logits = lm.model(input_ids=ids[rows].to(lm.device), **extra).logits
        yield rows, logits, kept
