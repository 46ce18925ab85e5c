"""What a head edit is: the perturbation of one head's output, independent of how it is applied.

A :class:`HeadEdit` names one head and what happens to its output slice ``z`` (the head's part of the
input of the attention output projection): seeded Gaussian noise, or zero / mean ablation. The noise
a sample receives depends only on ``(seed, layer, head, sample)`` (:func:`head_noise`), never on the
batch, so every way of applying an edit gives the same numbers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HeadEdit", "head_noise", "seed_for"]


def seed_for(*keys: int | str) -> int:
    """A 63-bit seed derived from the keys (stable across runs, processes and machines)."""
    digest = hashlib.blake2b("/".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def head_noise(seed: int, layer: int, head: int, sample: int | str, n_positions: int, d_head: int) -> Tensor:
    """Standard-normal noise for one head of one sample, ``(n_positions, d_head)`` float32.

    The draw depends only on ``(seed, layer, head, sample)``, never on the batch a sample is in, so
    interventions are batch-invariant. ``sample="prefix"`` names the shared few-shot prefix: every
    prompt sees the same noise on the positions they share.
    """
    gen = torch.Generator().manual_seed(seed_for(seed, layer, head, sample))
    return torch.randn(n_positions, d_head, generator=gen)


@dataclass(frozen=True)
class HeadEdit:
    """One perturbation of one head: additive noise or ablation.

    Attributes:
        kind: ``"noise"``, ``"zero"`` or ``"mean"``.
        layer, head: which head.
        scale: noise standard deviation (absolute; for ``"noise"``).
        seed: noise seed (for ``"noise"``).
    """

    kind: str
    layer: int
    head: int
    scale: float = 0.0
    seed: int = 0
