"""Recompute only what an edit can change: blocks before the edited layer keep their clean output.

An edit in layer ``l`` (a head, a neuron or a weight of block ``l``) cannot change blocks ``0 .. l-1``.
Their clean output -- the input of block ``l`` -- is kept from one clean pass, and while
:func:`skip_layers_before` is active the model returns it from those blocks without running them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from headlab.models import LoadedModel

__all__ = ["skip_layers_before"]


@contextmanager
def skip_layers_before(lm: LoadedModel, layer: int, hidden: Tensor) -> Iterator[None]:
    """Make blocks ``0 .. layer-1`` return ``hidden`` (the cached input of block ``layer``) unrun."""
    blocks = [lm.layers[i] for i in range(layer)]
    # A block may already carry an instance ``forward`` (accelerate's device hooks do): put it back.
    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for block in blocks:
            block.forward = lambda *args, **kwargs: hidden  # instance attribute shadows the method
        yield
    finally:
        for block, old in zip(blocks, saved):
            if old is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = old
