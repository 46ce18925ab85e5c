"""Weight sensitivity: edit named weight matrices for the duration of a block, restored bit-exactly.

Everything here acts on weights, never through activation hooks: zeroing or mean-filling whole
matrices and single entries, magnitude and Wanda pruning masks, head pruning in weight space, weight
noise, bit flips in bfloat16 / float16 / float32, and the super-weight search (activation spikes at
the MLP down projection, Yu et al. 2024). Weight names come from :func:`headlab.models.weight_names`
(``"L5.mlp.down"``); every function sees a weight as ``(out_features, in_features)``.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from headlab.edits import seed_for
from headlab.interventions import check_heads, check_neurons, hooks
from headlab.models import (
    LoadedModel,
    head_slice,
    neuron_slice,
    parse_weight_name,
    weight_module,
    weight_names,
)

__all__ = [
    "BIT_POSITIONS",
    "PRUNE_GROUPS",
    "SUPER_COLUMNS",
    "WeightFn",
    "bit_index",
    "bit_width",
    "block_matrix_formats",
    "check_group",
    "down_proj_spikes",
    "early_layers",
    "edit_weights",
    "find_super_weights",
    "flip_bit",
    "flip_weight_bits",
    "global_prune_counts",
    "largest_weight_entries",
    "magnitude_mask",
    "mean_weights",
    "noise_weights",
    "out_in",
    "prune_heads",
    "prune_magnitude",
    "prune_neurons",
    "prune_wanda",
    "pruning_mask",
    "random_weight_entries",
    "round_to_format",
    "spike_threshold",
    "state_checksum",
    "wanda_input_norms",
    "wanda_input_norms_by_rows",
    "wanda_mask",
    "wanda_score",
    "zero_weight_entries",
    "zero_weights",
]
# --------------------------------------------------------------------------------------------------
# Weight edits: change named weight matrices for the duration of a block, restore them bit-exactly
# --------------------------------------------------------------------------------------------------
#: ``fn(w)`` gets the live weight as ``(out_features, in_features)`` (GPT-2's ``Conv1D`` weights are
#: passed transposed) and edits it in place, or returns a replacement of the same shape.
WeightFn = Callable[[Float[Tensor, "out in"]], Float[Tensor, "out in"] | None]


def state_checksum(lm: LoadedModel | nn.Module) -> str:
    """SHA-256 of every tensor of the state dict (names, dtypes, shapes and raw bytes), in name order.

    Two models have the same checksum exactly when their weights are bit-identical; tests use it to
    check that a weight edit restored the model.
    """
    model = lm.model if isinstance(lm, LoadedModel) else lm
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _owners(lm: LoadedModel) -> dict[int, list[str]]:
    """``id(parameter) -> every name it has in the model`` (tied parameters have several)."""
    owners: dict[int, list[str]] = {}
    for name, p in lm.model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


@contextmanager
def edit_weights(lm: LoadedModel, fns: Mapping[str, WeightFn], allow_shared: bool = False) -> Iterator[None]:
    """Apply ``fns[name](w)`` to each named weight matrix inside the block; restore them on exit.

    Only the named matrices are touched: each one's original is cloned before its edit and copied back
    (``copy_``, bit-exact) in ``finally``, so the model is restored also when the edit function or the
    body of the ``with`` block raises. Biases are never edited.

    Args:
        lm: the model (any dtype; a GGUF model is edited in its dequantized float weights).
        fns: ``{name: fn}`` with names from :func:`headlab.models.weight_names` (``"L5.mlp.down"``) or
            ``"embed"`` / ``"unembed"``; ``fn`` receives the weight as ``(out, in)`` (see ``WeightFn``).
        allow_shared: permit editing a parameter that several modules share. Without it a tied
            embedding (the unembedding of SmolLM2 *is* its token embedding) is refused, so that editing
            the output layer never silently edits the input embedding too.

    Raises:
        ValueError: an unknown name, a shared parameter without ``allow_shared``, two names for one
            tensor, or a replacement of the wrong shape.
    """
    owners = _owners(lm)
    targets, seen = [], {}
    for name, fn in fns.items():
        layer, _ = parse_weight_name(lm, name)
        param = weight_module(lm, name).weight
        names = owners.get(id(param), [])
        if len(names) > 1 and not allow_shared:
            raise ValueError(f"weight {name!r} is one tensor shared by {names} (tied embeddings); editing it "
                             "edits all of them. Pass allow_shared=True if that is intended.")
        if id(param) in seen:
            raise ValueError(f"weights {seen[id(param)]!r} and {name!r} are the same tensor; name it once.")
        seen[id(param)] = name
        targets.append((name, fn, param, lm.adapter.conv1d and layer is not None))
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for name, fn, param, transposed in targets:
                saved.append((param, param.detach().clone()))
                view = param.data.T if transposed else param.data  # (out, in)
                out = fn(view)
                if out is not None and out is not view:
                    if out.shape != view.shape:
                        raise ValueError(f"edit of {name!r} returned shape {tuple(out.shape)}; the weight is "
                                         f"{tuple(view.shape)} (out, in).")
                    view.copy_(out)
        yield
    finally:
        with torch.no_grad():
            for param, original in saved:
                param.data.copy_(original)


def out_in(lm: LoadedModel, name: str) -> Tensor:
    """The named weight as ``(out, in)`` (a view; GPT-2's ``Conv1D`` layer weights are stored transposed)."""
    w = weight_module(lm, name).weight
    return w.T if lm.adapter.conv1d and parse_weight_name(lm, name)[0] is not None else w


def _check_names(lm: LoadedModel, names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise ValueError(f"names={names!r} is one text; give a list of weight names, e.g. [{names!r}].")  # noqa: TRY004
    names = list(names)
    if not names:
        raise ValueError("No weight names given; see headlab.models.weight_names(lm).")
    for n in names:
        parse_weight_name(lm, n)
    return names


def zero_weights(lm: LoadedModel, names: Sequence[str]):
    """Context manager: the named matrices set to zero (the module then adds only its bias)."""
    return edit_weights(lm, {n: lambda w: w.zero_() for n in _check_names(lm, names)})


def mean_weights(lm: LoadedModel, names: Sequence[str]):
    """Context manager: every entry of each named matrix replaced by that matrix's mean entry.

    This keeps the matrix's average (its response to a constant input) and removes everything else;
    weight matrices are nearly zero-mean, so it usually acts like :func:`zero_weights`.
    """
    return edit_weights(lm, {n: lambda w: w.fill_(w.double().mean()) for n in _check_names(lm, names)})


def zero_weight_entries(lm: LoadedModel, entries: Mapping[str, Sequence[tuple[int, int]]]):
    """Context manager: single entries ``(row, col)`` (in ``(out, in)`` coordinates) of matrices set to 0."""
    def make(cells: Sequence[tuple[int, int]]) -> WeightFn:
        def fn(w: Tensor) -> None:
            for r, c in cells:
                w[r, c] = 0.0
        return fn

    for name, cells in entries.items():
        shape = tuple(out_in(lm, name).shape)
        bad = [(r, c) for r, c in cells if not (0 <= r < shape[0] and 0 <= c < shape[1])]
        if bad:
            raise ValueError(f"entries {bad} outside {name!r} of shape {shape} (out, in).")
    return edit_weights(lm, {n: make(list(cells)) for n, cells in entries.items()})


#: Comparison groups of a pruning mask: the ``sparsity`` share of smallest scores is removed in every
#: output ``row`` of a matrix (Wanda's group), in every ``matrix`` as a whole, or over all pruned
#: matrices together (``global``).
PRUNE_GROUPS = ("row", "matrix", "global")


def check_group(group: str) -> str:
    """Return ``group`` if it is one of :data:`PRUNE_GROUPS`, else raise a ValueError naming the choices."""
    if group not in PRUNE_GROUPS:
        raise ValueError(f"pruning group={group!r}; choose one of {PRUNE_GROUPS} (the set of weights "
                         "whose scores are compared: each output row, each matrix, or all matrices).")
    return group


def _check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1].")
    return float(sparsity)


def pruning_mask(score: Float[Tensor, "out in"], sparsity: float, group: str) -> Bool[Tensor, "out in"]:
    """True at the weights of smallest ``score`` that pruning to ``sparsity`` removes, within ``group``.

    ``group="row"``: ``round(sparsity * in)`` entries of every output row; ``"matrix"``:
    ``round(sparsity * numel)`` entries of the whole matrix. Ties at the threshold are taken in
    position order, so the count is exact. (``"global"`` compares several matrices: see
    :func:`global_prune_counts`.)
    """
    _check_sparsity(sparsity)
    if check_group(group) == "global":
        raise ValueError("group='global' compares scores over several matrices; use prune_magnitude / "
                         "prune_wanda (or global_prune_counts) instead of a one-matrix mask.")
    if group == "row":
        return _smallest_k(score, round(sparsity * score.shape[1]))
    return _smallest_k(score.reshape(1, -1), round(sparsity * score.numel())).view_as(score)


def magnitude_mask(w: Float[Tensor, "out in"], sparsity: float, group: str = "row") -> Bool[Tensor, "out in"]:
    """Magnitude pruning: True at the weights of smallest ``|w|`` (:func:`pruning_mask` of ``|w|``).

    ``group="row"`` compares the weights of each output row (the group Wanda uses), ``"matrix"``
    all weights of the matrix.
    """
    return pruning_mask(w.abs(), sparsity, group)


def _smallest_k(score: Float[Tensor, "r n"], k: int) -> Bool[Tensor, "r n"]:
    """True at the ``k`` smallest entries of each row; ties at the threshold go to the lowest positions.

    Linear time (``kthvalue``, no sort): dequantized GGUF weights hold many exactly equal values, so
    the tie rule is what makes the count exact.
    """
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= score.shape[1]:
        return torch.ones_like(score, dtype=torch.bool)
    thr = score.kthvalue(k, dim=1, keepdim=True).values  # (r, 1): the k-th smallest value of each row
    below = score < thr
    ties = score == thr
    need = k - below.sum(1, keepdim=True)  # (r, 1) tied entries still to take
    if bool((ties.sum(1, keepdim=True) == need).all()):  # every tie is taken: no position order needed
        return below | ties
    return below | (ties & (ties.cumsum(1) <= need))


def wanda_score(w: Float[Tensor, "out in"], input_norm: Float[Tensor, " in"]) -> Float[Tensor, "out in"]:
    """Wanda's score ``|W_ij| * ||x_j||_2`` (Sun et al. 2023); ``||x_j||_2`` from :func:`wanda_input_norms`."""
    if input_norm.shape != (w.shape[1],):
        raise ValueError(f"input_norm has shape {tuple(input_norm.shape)}; "
                         f"the weight has {w.shape[1]} inputs.")
    return w.abs() * input_norm.to(w.device, w.dtype)[None, :]  # (out, in)


def wanda_mask(w: Float[Tensor, "out in"], input_norm: Float[Tensor, " in"], sparsity: float,
               group: str = "row") -> Bool[Tensor, "out in"]:
    """Wanda (Sun et al. 2023): True at the weights of smallest ``|W_ij| * ||x_j||_2``, by default in
    every output row (``round(sparsity * in)`` per row, the paper's comparison group)."""
    return pruning_mask(wanda_score(w, input_norm), sparsity, group)


def global_prune_counts(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, int]:
    """How many weights each matrix loses when the ``round(sparsity * total)`` smallest scores over
    all matrices together are removed (``group="global"``).

    Ties at the global threshold go to the matrices in the order given, then by position, so the
    total is exact and each matrix's share is its ``count`` smallest scores (:func:`pruning_mask`
    of the matrix with that count reproduces the global choice).
    """
    _check_sparsity(sparsity)
    total = sum(s.numel() for s in scores.values())
    k = round(sparsity * total)
    if k <= 0 or k >= total:
        return {n: (s.numel() if k >= total else 0) for n, s in scores.items()}
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])  # (total,)
    thr = flat.kthvalue(k).values
    del flat
    counts, left = {}, k - sum(int((s < thr).sum()) for s in scores.values())
    for name, s in scores.items():
        take = min(int((s == thr).sum()), left)
        left -= take
        counts[name] = int((s < thr).sum()) + take
    return counts


def _prune(lm: LoadedModel, score_fns: Mapping[str, Callable[[Tensor], Tensor]], sparsity: float, group: str):
    """Context manager: zero, in each named matrix, the weights of smallest ``score_fns[name](w)``."""
    _check_sparsity(sparsity)
    check_group(group)
    _check_names(lm, list(score_fns))
    counts = None
    if group == "global":
        with torch.no_grad():
            counts = global_prune_counts({n: fn(out_in(lm, n).detach()) for n, fn in score_fns.items()}, sparsity)

    def make(name: str) -> WeightFn:
        def fn(w: Tensor) -> None:
            score = score_fns[name](w)
            if counts is None:
                mask = pruning_mask(score, sparsity, group)
            else:
                mask = _smallest_k(score.reshape(1, -1), counts[name]).view_as(w)
            w.masked_fill_(mask, 0.0)
        return fn

    return edit_weights(lm, {n: make(n) for n in score_fns})


def prune_magnitude(lm: LoadedModel, names: Sequence[str], sparsity: float, group: str = "row"):
    """Context manager: unstructured magnitude pruning of each named matrix to ``sparsity``.

    ``group`` is the set of weights whose ``|w|`` are compared (:data:`PRUNE_GROUPS`): each output
    row (default; the same group as Wanda, so the two differ only in the score), each matrix, or all
    named matrices together.
    """
    return _prune(lm, {n: (lambda w: w.abs()) for n in _check_names(lm, names)}, sparsity, group)


def prune_wanda(lm: LoadedModel, input_norms: Mapping[str, Tensor], sparsity: float, group: str = "row"):
    """Context manager: Wanda pruning of every matrix in ``input_norms`` to ``sparsity``, comparing
    ``|W_ij| * ||x_j||_2`` within ``group`` (default each output row, as in the paper)."""
    def make(norm: Tensor) -> Callable[[Tensor], Tensor]:
        return lambda w: wanda_score(w, norm)

    return _prune(lm, {n: make(norm) for n, norm in input_norms.items()}, sparsity, group)


def wanda_input_norms(lm: LoadedModel, ids: Int[Tensor, "n s"], names: Sequence[str] | None = None,
                      batch_size: int = 4) -> dict[str, Float[Tensor, " in"]]:
    """``||x_j||_2`` over all tokens of the calibration rows ``ids`` for each input feature ``j`` of
    each named matrix (default: all layer matrices), measured on the unedited model.

    Returns:
        ``{name: (in_features,)}`` float32 on the CPU.
    """
    return wanda_input_norms_by_rows(lm, ids, [len(ids)], names, batch_size)[len(ids)]


@torch.inference_mode()
def wanda_input_norms_by_rows(lm: LoadedModel, ids: Int[Tensor, "n s"], n_rows: Sequence[int],
                              names: Sequence[str] | None = None,
                              batch_size: int = 4) -> dict[int, dict[str, Float[Tensor, " in"]]]:
    """:func:`wanda_input_norms` of the first ``r`` calibration rows, for each ``r`` in ``n_rows``, in
    one pass over ``ids[:max(n_rows)]`` (the squared norms are sums over tokens, so every prefix is a
    running total; batches are cut at each ``r``).

    Returns:
        ``{r: {name: (in_features,)}}`` float32 on the CPU.
    """
    names = weight_names(lm) if names is None else _check_names(lm, names)
    stops = sorted({int(r) for r in n_rows})
    if not stops or stops[0] < 1 or stops[-1] > len(ids):
        raise ValueError(f"n_rows={list(n_rows)} must be in 1..{len(ids)} (the calibration rows given).")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    sums = {n: None for n in names}

    def make(name: str) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            s = x.pow(2).reshape(-1, x.shape[-1]).sum(0).cpu()  # (in,)
            sums[name] = s if sums[name] is None else sums[name] + s
        return pre_hook

    out, start = {}, 0
    with hooks(pre=[(weight_module(lm, n), make(n)) for n in names]):
        for stop in stops:
            for b in range(start, stop, batch_size):
                lm.model(input_ids=ids[b:min(b + batch_size, stop)].to(lm.device))
            start = stop
            out[stop] = {n: s.sqrt().float() for n, s in sums.items()}
    return out


def noise_weights(lm: LoadedModel, names: Sequence[str], level: float, seed: int = 0):
    """Context manager: ``W += level * std(W) * eps`` for each named matrix, ``eps ~ N(0, 1)``.

    ``eps`` is drawn from a generator keyed by ``(seed, name)`` only, so a matrix gets the same noise
    whatever else is perturbed with it. ``level = 0`` leaves the weights untouched.
    """
    if not level >= 0 or level == float("inf"):
        raise ValueError(f"noise level={level} must be a finite number >= 0.")

    def make(name: str) -> WeightFn:
        def fn(w: Tensor) -> None:
            if level == 0:
                return
            gen = torch.Generator().manual_seed(seed_for(seed, "weight-noise", name))
            eps = torch.randn(w.shape, generator=gen, dtype=torch.float32)
            w.add_((level * w.double().std()).float() * eps.to(w.device, w.dtype))
        return fn

    return edit_weights(lm, {n: make(n) for n in _check_names(lm, names)})


def prune_heads(lm: LoadedModel, heads: Mapping[int, Sequence[int]]):
    """Context manager: remove heads by zeroing their input columns of the attention output projection.

    This is the weight-space version of :func:`ablate_heads` in ``"zero"`` mode (the same logits). The
    columns are :func:`headlab.models.head_slice` of ``attn.o``.
    """
    check_heads(lm, heads)

    def make(layer: int, hs: Sequence[int]) -> WeightFn:
        cols = [head_slice(lm, f"L{layer}.attn.o", h) for h in hs]

        def fn(w: Tensor) -> None:
            for sl in cols:
                w[:, sl.index.to(w.device)] = 0.0  # (out, n_heads * d_head): head h's columns
        return fn

    return edit_weights(lm, {f"L{layer}.attn.o": make(layer, list(hs)) for layer, hs in heads.items() if len(hs)})


def prune_neurons(lm: LoadedModel, neurons: Mapping[int, Sequence[int]]):
    """Context manager: remove FFN neurons by zeroing their columns of the down projection.

    The weight-space version of :func:`headlab.interventions.ablate_neurons` in ``"zero"`` mode (the
    same logits). The columns are :func:`headlab.models.neuron_slice` of ``mlp.down``.
    """
    check_neurons(lm, neurons)

    def make(layer: int, ns: Sequence[int]) -> WeightFn:
        cols = torch.cat([neuron_slice(lm, f"L{layer}.mlp.down", n).index for n in ns])

        def fn(w: Tensor) -> None:
            w[:, cols.to(w.device)] = 0.0  # (d_model, d_mlp): neuron n's column
        return fn

    return edit_weights(lm, {f"L{layer}.mlp.down": make(layer, list(ns)) for layer, ns in neurons.items() if len(ns)})


# Bit flips ----------------------------------------------------------------------------------------
#: Named bit positions (0 = least significant) of the float formats a weight can be flipped in.
#: bfloat16: sign 15, exponent 14..7, mantissa 6..0; float16: sign 15, exponent 14..10, mantissa 9..0;
#: float32: sign 31, exponent 30..23, mantissa 22..0.
BIT_POSITIONS: dict[str, dict[str, int]] = {
    "bfloat16": {"sign": 15, "exponent_msb": 14, "exponent_lsb": 7, "mantissa_msb": 6, "mantissa_lsb": 0},
    "float16": {"sign": 15, "exponent_msb": 14, "exponent_lsb": 10, "mantissa_msb": 9, "mantissa_lsb": 0},
    "float32": {"sign": 31, "exponent_msb": 30, "exponent_lsb": 23, "mantissa_msb": 22, "mantissa_lsb": 0},
}
#: ``fmt -> (float dtype, integer dtype of the same width)``.
_FORMATS = {"bfloat16": (torch.bfloat16, torch.int16), "float16": (torch.float16, torch.int16),
            "float32": (torch.float32, torch.int32)}


def bit_width(fmt: str) -> int:
    """Number of bits of the float format ``fmt`` (16 for bfloat16 / float16, 32 for float32)."""
    if fmt not in _FORMATS:
        raise ValueError(f"format {fmt!r}; choose one of {sorted(_FORMATS)}.")
    return torch.finfo(_FORMATS[fmt][0]).bits


def bit_index(bit: int | str, fmt: str) -> int:
    """Bit number for a name of :data:`BIT_POSITIONS` (or an int ``0 .. width-1``) in format ``fmt``."""
    if fmt not in BIT_POSITIONS:
        raise ValueError(f"format {fmt!r}; choose one of {sorted(BIT_POSITIONS)}.")
    width = bit_width(fmt)
    if isinstance(bit, str):
        if bit not in BIT_POSITIONS[fmt]:
            raise ValueError(f"bit {bit!r}; choose one of {sorted(BIT_POSITIONS[fmt])} or an int 0..{width - 1}.")
        return BIT_POSITIONS[fmt][bit]
    if isinstance(bit, bool) or not isinstance(bit, numbers.Integral) or not 0 <= int(bit) < width:
        raise ValueError(f"bit={bit!r} must be an integer in 0..{width - 1} for the {width}-bit format {fmt}, "
                         f"or one of {sorted(BIT_POSITIONS[fmt])}.")
    return int(bit)


def round_to_format(x: Tensor, fmt: str) -> Tensor:
    """``x`` converted to the float format ``fmt`` and back to ``x.dtype`` (the value a flip in ``fmt``
    starts from: rounded when ``fmt`` is narrower than ``x.dtype``, exact otherwise)."""
    if fmt not in _FORMATS:
        raise ValueError(f"format {fmt!r}; choose one of {sorted(_FORMATS)}.")
    return x.to(_FORMATS[fmt][0]).to(x.dtype)


def flip_bit(x: Tensor, bit: int | str, fmt: str = "bfloat16") -> Tensor:
    """Flip one bit of each value's representation in ``fmt``; return the result in ``x.dtype``.

    ``x`` is converted to ``fmt`` (bfloat16 and float16 round a float32 value; float32 keeps it
    exact), the bit is XOR-ed on the integer view of the same width, and the result is converted
    back. Example (bfloat16): ``1.0`` -> sign flip ``-1.0``; exponent MSB flip ``inf`` (1.0 has
    exponent 127, all ones after the flip); mantissa LSB flip ``1.0078125`` (the next representable
    value). In float32 the mantissa LSB flip of ``1.0`` gives ``1 + 2**-23``.
    """
    b = bit_index(bit, fmt)
    float_t, int_t = _FORMATS[fmt]
    width = torch.finfo(float_t).bits
    # the top bit is the integer type's sign bit: its mask is the most negative value
    mask = torch.tensor(1 << b if b < width - 1 else -(1 << (width - 1)), dtype=int_t)
    y = x.to(float_t).contiguous().view(int_t) ^ mask.to(x.device)
    return y.view(float_t).to(x.dtype)


def flip_weight_bits(lm: LoadedModel, entries: Mapping[str, Sequence[tuple[int, int]]], bit: int | str,
                     fmt: str = "bfloat16"):
    """Context manager: flip ``bit`` of single weights ``(row, col)`` (``(out, in)`` coordinates).

    The model's weights stay in their dtype (float32 on CPU): each chosen weight is converted to
    ``fmt`` (rounded, for a 16-bit format narrower than the weight), its bit flipped and the value
    converted back; the other weights are not touched. A format wider than the weights (float32 bits
    of bfloat16 weights) is refused: converting back would round the flip away.
    """
    bit_index(bit, fmt)
    for name in entries:
        dtype = out_in(lm, name).dtype
        if torch.finfo(dtype).bits < torch.finfo(_FORMATS[fmt][0]).bits:
            raise ValueError(f"fmt={fmt!r} is wider than the {dtype} weights of {name!r}: the flipped value "
                             f"would be rounded back to {dtype}. Choose a format of at most "
                             f"{torch.finfo(dtype).bits} bits, or load the model in float32.")

    def make(cells: Sequence[tuple[int, int]]) -> WeightFn:
        def fn(w: Tensor) -> None:
            for r, c in cells:
                w[r, c] = flip_bit(w[r, c], bit, fmt)
        return fn

    return edit_weights(lm, {n: make(list(cells)) for n, cells in entries.items()})


def block_matrix_formats(lm: LoadedModel) -> dict[str, int]:
    """How the block weight matrices were stored at the model's source: ``{format: number of matrices}``.

    For a model loaded from a GGUF file (``lm.source``) these are the GGUF tensor types of the 2-D
    ``blk.*`` tensors, read from the file (e.g. ``{"Q4_1": 210}``: 4-bit blocks of 32 weights with a
    float16 scale and minimum, which the loader dequantized); otherwise the dtypes of the loaded
    matrices, marked ``"(as loaded)"`` since the checkpoint's own format is not read.
    """
    path = Path(lm.source.split(" (embedded")[0])
    counts: dict[str, int] = {}
    if path.suffix == ".gguf" and path.is_file():
        from gguf import GGUFReader

        for t in GGUFReader(path).tensors:
            if t.name.startswith("blk.") and len(t.shape) == 2:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts
    for name in weight_names(lm):
        key = f"{str(out_in(lm, name).dtype).removeprefix('torch.')} (as loaded)"
        counts[key] = counts.get(key, 0) + 1
    return counts


def random_weight_entries(lm: LoadedModel, n: int, seed: int, names: Sequence[str] | None = None,
                          key: int | str = 0) -> list[tuple[str, int, int]]:
    """``n`` weights drawn uniformly from all entries of the named matrices (default: all layer matrices).

    Each draw picks a matrix with probability proportional to its size, then a uniform entry, from a
    generator keyed by ``(seed, key)`` only. Returns ``[(name, row, col), ...]`` in ``(out, in)`` coordinates.
    """
    names = weight_names(lm) if names is None else _check_names(lm, names)
    shapes = [tuple(out_in(lm, name).shape) for name in names]
    sizes = torch.tensor([r * c for r, c in shapes], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed_for(seed, "weight-entries", key))
    mats = torch.multinomial(sizes / sizes.sum(), n, replacement=True, generator=gen)
    out = []
    for m in mats.tolist():
        rows, cols = shapes[m]
        flat = int(torch.randint(rows * cols, (1,), generator=gen))
        out.append((names[m], flat // cols, flat % cols))
    return out


def largest_weight_entries(lm: LoadedModel, n: int, names: Sequence[str] | None = None,
                           exclude: Sequence[tuple[str, int, int]] = ()) -> list[tuple[str, int, int]]:
    """The ``n`` weights of largest ``|w|`` over the named matrices (default: all layer matrices),
    leaving out ``exclude``; ``[(name, row, col), ...]`` in ``(out, in)`` coordinates, largest first."""
    names = weight_names(lm) if names is None else _check_names(lm, names)
    skip = set(exclude)
    cands = []
    for name in names:
        w = out_in(lm, name).detach()
        vals, idx = w.abs().flatten().topk(min(n + len(skip), w.numel()))
        cands += [(float(v), name, int(i) // w.shape[1], int(i) % w.shape[1]) for v, i in zip(vals, idx)]
    cands.sort(key=lambda c: -c[0])
    return [(name, r, c) for _, name, r, c in cands if (name, r, c) not in skip][:n]


# Super weights ------------------------------------------------------------------------------------
@torch.inference_mode()
def down_proj_spikes(lm: LoadedModel, ids: Int[Tensor, "n s"], layers: Sequence[int] | None = None,
                     batch_size: int = 4) -> list[dict]:
    """Activation spikes at the MLP down projection of each layer (Yu et al. 2024, "super weights").

    A super weight ``W_down[r, c]`` shows as a huge input activation on channel ``c`` and a huge output
    on hidden dimension ``r`` at the same token. Per layer this records the largest ``|output|`` over
    all tokens and dimensions (``out_max`` at ``row``, token ``position``) and, at that token:

    * ``col``: the channel of the largest ``|input|`` (the paper's column: the input spike), with
      ``weight = W[row, col]``, its product ``contribution = x_col * W[row, col]`` and ``share`` =
      contribution / output;
    * ``top_col``: the channel whose product ``x_c * W[row, c]`` contributes most to that output
      (``top_weight``, ``top_contribution``, ``top_share``); it equals ``col`` when the input spike is
      what drives the output spike;
    * ``in_max`` / ``in_channel``: the largest ``|input|`` anywhere in the layer.

    Args:
        ids: token rows (one prompt suffices for the paper; more rows make the maxima more stable).
        layers: layers to inspect (default all); the forward pass stops after the last of them.

    Returns:
        One dict per layer, in layer order, with the keys above and ``layer, out_max, out_value,
        position, token`` (``row``/``col`` in ``(out, in)`` coordinates).
    """
    layers = list(range(lm.n_layers)) if layers is None else sorted({int(x) for x in layers})
    bad = [x for x in layers if not 0 <= x < lm.n_layers]
    if bad or not layers:
        raise ValueError(f"layers={bad or layers} must be a non-empty subset of 0..{lm.n_layers - 1}.")
    stats: dict[int, dict] = {}
    current: dict[str, Tensor] = {}
    last = layers[-1]

    def make(layer: int, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            # (tokens, d_mlp), (tokens, d_model); some models (OPT) flatten batch and sequence already
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            y = output.detach().float().reshape(-1, output.shape[-1])
            w = out_in(lm, name).float()
            t, r = divmod(int(y.abs().reshape(-1).argmax()), y.shape[1])
            contrib = x[t] * w[r]  # (d_mlp,): each input channel's share of output r at token t
            c, top = int(x[t].abs().argmax()), int(contrib.abs().argmax())
            out = float(y[t, r])
            in_flat = int(x.abs().reshape(-1).argmax())
            b, pos = divmod(t, current["ids"].shape[1])
            entry = {"layer": layer, "row": r, "col": c, "weight": float(w[r, c]),
                     "contribution": float(contrib[c]), "share": float(contrib[c]) / out if out else float("nan"),
                     "top_col": top, "top_weight": float(w[r, top]), "top_contribution": float(contrib[top]),
                     "top_share": float(contrib[top]) / out if out else float("nan"),
                     "out_max": abs(out), "out_value": out,
                     "in_max": float(x.abs().reshape(-1)[in_flat]), "in_channel": in_flat % x.shape[-1],
                     "position": pos, "token": int(current["ids"][b, pos])}
            old = stats.get(layer)
            if old is not None:  # keep the largest output spike and, separately, the largest input
                best_in = max((old["in_max"], old["in_channel"]), (entry["in_max"], entry["in_channel"]))
                entry = entry if entry["out_max"] > old["out_max"] else old
                entry["in_max"], entry["in_channel"] = best_in
            stats[layer] = entry
            if layer == last and last < lm.n_layers - 1:
                raise _StopForward  # later blocks cannot change what was recorded
        return hook

    post = [(weight_module(lm, f"L{layer}.mlp.down"), make(layer, f"L{layer}.mlp.down")) for layer in layers]
    with hooks(post=post):
        for start in range(0, len(ids), batch_size):
            current["ids"] = ids[start:start + batch_size]
            try:
                lm.model(input_ids=current["ids"].to(lm.device))
            except _StopForward:
                pass
    return [stats[layer] for layer in layers]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the last layer of interest has run."""


def early_layers(lm: LoadedModel, fraction: float) -> list[int]:
    """The first ``ceil(fraction * n_layers)`` blocks (at least one): where Yu et al. find super weights.

    The super weights the paper lists for Llama, Mistral, OLMo-1B and Phi-3 sit in layers 1-4 of 32
    or more; ``fraction`` states what "early" means for a model of any depth.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"early fraction={fraction} must be in (0, 1].")
    return list(range(max(1, math.ceil(fraction * lm.n_layers))))


def spike_threshold(spikes: Sequence[dict], factor: float) -> float:
    """``factor`` x the median over layers of the largest down-projection output (:func:`down_proj_spikes`
    of every layer): a spike must stand out from what a typical layer writes."""
    if factor <= 1:
        raise ValueError(f"spike factor={factor} must be > 1 (a multiple of the typical layer's maximum).")
    if not spikes:
        raise ValueError("no spikes given; run down_proj_spikes on every layer first.")
    return float(factor * torch.tensor([s["out_max"] for s in spikes]).median())


#: How :func:`find_super_weights` reads the column of a super weight from a spike: ``"input"`` (the
#: paper's rule: the input channel of the largest activation at the spike token) or ``"contribution"``
#: (the input channel whose product with the weight makes most of the output spike).
SUPER_COLUMNS = ("input", "contribution")


def find_super_weights(lm: LoadedModel, ids: Int[Tensor, "n s"], layers: Sequence[int], threshold: float,
                       max_weights: int = 4, column: str = "input", batch_size: int = 4) -> list[dict]:
    """Yu et al.'s iterative search for super weights in the down projections of ``layers``.

    Step ``i``: run :func:`down_proj_spikes` on ``layers`` with the weights found so far zeroed; if the
    largest output spike is at least ``threshold``, ``W_down[row, c]`` is the next super weight, with
    ``row`` the output channel of the spike and ``c`` read by ``column`` (:data:`SUPER_COLUMNS`);
    otherwise (or after ``max_weights`` weights) stop. Removing a super weight removes the activation
    spike it causes, so the next step sees the next one; a spike that survives the zeroing of the
    weight read from it (the same weight read again) also ends the search, since that weight does not
    make it.

    Returns:
        The :func:`down_proj_spikes` row of each weight found, in order, with ``step``, ``name``
        (``"L2.mlp.down"``) and ``rule`` (``column``); ``col``, ``weight``, ``contribution`` and
        ``share`` describe the chosen weight. Weights restored on return.
    """
    if max_weights < 0:
        raise ValueError(f"max_weights={max_weights} must be >= 0.")
    if column not in SUPER_COLUMNS:
        raise ValueError(f"column={column!r}; choose one of {SUPER_COLUMNS}.")
    found: list[dict] = []
    for step in range(max_weights):
        removed: dict[str, list[tuple[int, int]]] = {}
        for f in found:
            removed.setdefault(f["name"], []).append((f["row"], f["col"]))
        with zero_weight_entries(lm, removed) if removed else nullcontext():
            spikes = down_proj_spikes(lm, ids, layers, batch_size)
        best = max(spikes, key=lambda e: e["out_max"])
        if best["out_max"] < threshold:
            break
        if column == "contribution":
            best = {**best, "col": best["top_col"], "weight": best["top_weight"],
                    "contribution": best["top_contribution"], "share": best["top_share"]}
        if (best["layer"], best["row"], best["col"]) in {(f["layer"], f["row"], f["col"]) for f in found}:
            break  # zeroing that weight left its spike in place: the spike does not come from it
        found.append({**best, "step": step, "name": f"L{best['layer']}.mlp.down", "rule": column})
    return found
