"""What a head edit is: the perturbation of one head's output, independent of how it is applied.

A :class:`HeadEdit` names one head and what happens to its output slice ``z`` (the head's part of the
input of the attention output projection): seeded Gaussian noise (``z += scale * eps``), or zero /
mean ablation (``z = 0`` / ``z = mean``). It checks its own fields when it is made and has ONE
:meth:`HeadEdit.apply`, used by the exact sweep engine (:func:`headlab.engine.sweep_heads`) and by
the plain hooks (:func:`headlab.interventions.noise_heads`, ``ablate_heads``), so both give the same
numbers. The noise a row receives depends only on ``(seed, layer, head, key)`` (:func:`head_noise`),
never on the batch, and the keys of a row's positions are chosen in one place (:func:`noise_keys`).

A sweep :class:`Setting` is what a chapter asks for: a ``mode`` (:data:`MODES`), a ``level`` in that
mode's unit and a ``seed``. :meth:`Setting.edit` is the one place where a setting becomes an edit
(``mode`` -> ``kind``, ``level`` -> ``scale``). The path of a noise level from a chapter to the tensor
is four hops:

1. ``notebooks/02_noise_perturbation.py``'s parameters cell (``noise_mode``, ``noise_level``) ->
   :class:`headlab.headrank.RankDesign`, which reads them as a :class:`Setting` (the one validation of
   mode, level and seed, before any work; :func:`headlab.sweeps.head_sweep` does the same for a list
   of settings);
2. :meth:`Setting.edit`: ``scale = level`` x the head's clean max |z| or std (resolved once);
3. :func:`headlab.engine.sweep_heads`: checks the edits against the model, hooks them in;
4. :meth:`HeadEdit.apply`: ``z += scale * eps``.

(Before this layout it was about nine hops with two renames and three validations: parameters cell ->
``sweep.head_sweep`` (validation) -> its grid-point closure -> ``sweep.head_edits`` (validation;
mode -> kind, level -> scale) -> ``HeadEdit`` -> ``engine.sweep_heads`` (validation) -> ``_edit_fn``
-> its hook -> ``head_noise`` and a second copy of the arithmetic in ``interventions``.)

A new noise design changes this module only where it says so: which draw a position takes is
:func:`noise_keys` (e.g. several prefix draws), how a draw becomes noise is :meth:`HeadEdit.noise`
(e.g. an antithetic sign), and the arithmetic is :meth:`HeadEdit.apply`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from headlab.engine.headsweep import CleanRun

__all__ = ["ABLATIONS", "KINDS", "MODES", "PREFIX", "HeadEdit", "NoiseKeys", "Setting", "head_noise",
           "noise_keys", "seed_for"]

#: What an edit does to a head's output: add seeded noise, set it to zero, or set it to the clean mean.
KINDS = ("noise", "zero", "mean")

#: Ablation kinds (also sweep modes): deterministic, no level and no seed.
ABLATIONS = ("zero", "mean")

#: Sweep modes. ``absolute``: noise std = level. ``fraction_of_max``: std = level x the largest
#: |value| of that head's output slice over every position (shared prefix + all real query tokens) of
#: every evaluated prompt in the clean run (seed 000's "fraction of max", made precise).
#: ``fraction_of_std``: std = level x the standard deviation of the same values. ``zero`` / ``mean``:
#: ablation (level and seed ignored).
MODES = ("absolute", "fraction_of_max", "fraction_of_std", *ABLATIONS)

#: Noise key of the shared few-shot prefix: every prompt sees the same draw on the positions they share.
PREFIX = "prefix"

#: The noise draws of a row's positions, in order: ``(key, number of positions)`` per draw.
NoiseKeys = Sequence[tuple[int | str, int]]


def seed_for(*keys: int | str) -> int:
    """A 63-bit seed derived from the keys (stable across runs, processes and machines)."""
    digest = hashlib.blake2b("/".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def head_noise(seed: int, layer: int, head: int, sample: int | str, n_positions: int,
               d_head: int) -> Float[Tensor, "n_positions d_head"]:
    """Standard-normal noise for one head of one sample, ``(n_positions, d_head)`` float32.

    The draw depends only on ``(seed, layer, head, sample)``, never on the batch a sample is in, so
    interventions are batch-invariant. ``sample=PREFIX`` names the shared few-shot prefix: every
    prompt sees the same noise on the positions they share.
    """
    gen = torch.Generator().manual_seed(seed_for(seed, layer, head, sample))
    return torch.randn(n_positions, d_head, generator=gen)


def noise_keys(sample: int | str | None, n_prefix: int, n_own: int) -> list[tuple[int | str, int]]:
    """The noise draws of one row: the shared prefix's draw on its first ``n_prefix`` positions, then
    the sample's own draw on the next ``n_own`` (draws of no positions are left out).

    The one place where a row's noise keys are chosen: the engine's prefix pass (``n_own=0``), its
    query pass (``n_prefix=0``) and the plain hooks (both) all call it.
    """
    return [(key, n) for key, n in ((PREFIX, n_prefix), (sample, n_own)) if n > 0]


# Every bad field raises ValueError (one exception type for bad input, wrong type or wrong value).
def _integer(name: str, value: Any, owner: object) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r} in {owner}: must be an integer.")  # noqa: TRY004
    return int(value)


def _index(name: str, value: Any, owner: object) -> int:
    value = _integer(name, value, owner)
    if value < 0:
        raise ValueError(f"{name}={value} in {owner}: must be an integer >= 0.")
    return value


def _magnitude(name: str, value: Any, owner: object) -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} in {owner}: must be a finite number >= 0.")
    return float(value)


@dataclass(frozen=True)
class HeadEdit:
    """One perturbation of one head: additive noise or ablation.

    Made with bad fields it raises ``ValueError`` naming the field, its value and what is allowed.
    Whether ``layer`` and ``head`` exist in a model is checked by :meth:`check` (the engine and the
    hooks call it before any hook is set).

    Attributes:
        kind: one of :data:`KINDS`: ``"noise"``, ``"zero"`` or ``"mean"``.
        layer, head: which head (integers >= 0).
        scale: noise standard deviation, absolute (``"noise"`` only; finite, >= 0).
        seed: noise seed (``"noise"`` only; an integer).
        sign: ``1`` or ``-1`` (``"noise"`` only): the draw enters as ``+eps`` or ``-eps``. Two edits
            that differ only in sign are an antithetic pair: averaging their effects cancels every
            part of the effect that is odd in ``eps`` (see :mod:`headlab.headrank`).
    """

    kind: str
    layer: int
    head: int
    scale: float = 0.0
    seed: int = 0
    sign: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} in {self}: use one of {KINDS}.")
        # normalised in place (numpy integers, int scales): the frozen fields are set once, here
        object.__setattr__(self, "layer", _index("layer", self.layer, self))
        object.__setattr__(self, "head", _index("head", self.head, self))
        object.__setattr__(self, "scale", _magnitude("scale", self.scale, self))
        object.__setattr__(self, "seed", _integer("seed", self.seed, self))
        object.__setattr__(self, "sign", _integer("sign", self.sign, self))
        if self.sign not in (1, -1):
            raise ValueError(f"sign={self.sign} in {self}: must be 1 or -1.")
        if self.kind != "noise" and (self.scale != 0 or self.seed != 0 or self.sign != 1):
            raise ValueError(f"scale, seed and sign apply to kind='noise' only; {self} sets them for "
                             f"kind={self.kind!r}.")

    def check(self, n_layers: int, n_heads: int) -> HeadEdit:
        """Raise ``ValueError`` unless the head exists in a model of ``n_layers`` x ``n_heads``; return self."""
        if self.layer >= n_layers:
            raise ValueError(f"layer {self.layer} of {self} out of range 0..{n_layers - 1}.")
        if self.head >= n_heads:
            raise ValueError(f"head {self.head} of {self} out of range 0..{n_heads - 1}.")
        return self

    def noise(self, keys: NoiseKeys, d_head: int) -> Float[Tensor, "s d_head"]:
        """The standard-normal noise of a row whose positions take the draws ``keys`` (:func:`noise_keys`),
        times ``sign``."""
        draws = [head_noise(self.seed, self.layer, self.head, key, n, d_head) for key, n in keys]
        if not draws:
            return torch.empty(0, d_head)
        eps = draws[0] if len(draws) == 1 else torch.cat(draws)
        return eps if self.sign == 1 else -eps

    def apply(self, z: Float[Tensor, "*rows s d_head"], keys: NoiseKeys = (),
              means: Float[Tensor, "n_heads d_head"] | None = None) -> None:
        """Edit the head's output slice ``z`` in place -- the one place where an edit changes a tensor.

        Args:
            z: this head's slice of the output-projection input, e.g. ``z[row, positions, head]`` of
                the ``(batch, seq, n_heads, d_head)`` view (a view, edited in place).
            keys: for ``"noise"``: the draws of the positions of ``z`` (:func:`noise_keys`); they
                cover ``s`` positions.
            means: for ``"mean"``: the layer's mean head outputs ``(n_heads, d_head)`` from a clean run.
        """
        if self.kind == "noise":
            eps = self.noise(keys, z.shape[-1])  # (s, d_head)
            z += (self.scale * eps).to(z.dtype).to(z.device)
        elif self.kind == "zero":
            z[...] = 0.0
        else:
            if means is None:
                raise ValueError(f"{self} needs the layer's mean head outputs `means` (n_heads, d_head).")
            z[...] = means[self.head].to(z.dtype).to(z.device)


@dataclass(frozen=True)
class Setting:
    """How every head is edited in one sweep: a mode, a level in that mode's unit, a noise seed.

    Attributes:
        mode: one of :data:`MODES`.
        level: noise std in units of the mode (finite, >= 0; ignored by ``zero`` / ``mean``).
        seed: noise seed (an integer; ignored by ``zero`` / ``mean``).
    """

    mode: str
    level: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} in {self}: choose one of {MODES}.")
        object.__setattr__(self, "level", _magnitude("level", self.level, self))
        object.__setattr__(self, "seed", _integer("seed", self.seed, self))

    @classmethod
    def parse(cls, setting: Mapping[str, Any]) -> Setting:
        """A setting from a dict with ``mode`` and optional ``level`` / ``seed`` (other keys, such as a
        grid point's ``layer``, are ignored)."""
        return cls(setting.get("mode"), setting.get("level", 0.0), setting.get("seed", 0))

    def edit(self, layer: int, head: int, clean: CleanRun) -> HeadEdit:
        """The edit of one head under this setting: ``mode`` -> ``kind``, ``level`` -> ``scale``.

        The only place where a setting is resolved. ``scale = level`` for ``absolute``, ``level`` x
        the head's ``clean.head_max_abs`` / ``clean.head_std`` for ``fraction_of_max`` /
        ``fraction_of_std``; ablations carry no scale or seed.

        Args:
            layer, head: the head (checked against the shape of ``clean``'s statistics).
            clean: the clean run of the prompts (:func:`headlab.engine.clean_run`).
        """
        edit = HeadEdit(self.mode if self.mode in ABLATIONS else "noise", layer, head).check(*clean.head_std.shape)
        if self.mode in ABLATIONS:
            return edit
        unit = {"absolute": None, "fraction_of_max": clean.head_max_abs, "fraction_of_std": clean.head_std}[self.mode]
        return replace(edit, scale=self.level * (1.0 if unit is None else float(unit[layer, head])), seed=self.seed)
