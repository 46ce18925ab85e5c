"""Weight sensitivity: edit named weight matrices for the duration of a block, restored bit-exactly.

Everything here acts on weights, never through activation hooks: zeroing or mean-filling whole
matrices and single entries, magnitude and Wanda pruning masks, head pruning in weight space, weight
noise, bit flips in 16-bit float formats, and the super-weight search (activation spikes at the MLP
down projection, Yu et al. 2024). Weight names come from :func:`headlab.models.weight_names`
(``"L5.mlp.down"``); every function sees a weight as ``(out_features, in_features)``.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from headlab.edits import seed_for
from headlab.interventions import check_heads, hooks
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
    "WeightFn",
    "bit_index",
    "down_proj_spikes",
    "edit_weights",
    "flip_bit",
    "flip_weight_bits",
    "largest_weight_entries",
    "magnitude_mask",
    "mean_weights",
    "noise_weights",
    "out_in",
    "prune_heads",
    "prune_magnitude",
    "prune_neurons",
    "prune_wanda",
    "random_weight_entries",
    "state_checksum",
    "wanda_input_norms",
    "wanda_mask",
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


def magnitude_mask(w: Float[Tensor, "out in"], sparsity: float) -> Bool[Tensor, "out in"]:
    """True at the ``round(sparsity * w.numel())`` entries of smallest ``|w|`` of the whole matrix.

    Ties are broken by position (stable sort), so the count is exact.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1].")
    k = round(sparsity * w.numel())
    return _smallest_k(w.abs().reshape(1, -1), k).view_as(w)


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
    return below | (ties & (ties.cumsum(1) <= need))


def wanda_mask(w: Float[Tensor, "out in"], input_norm: Float[Tensor, " in"],
               sparsity: float) -> Bool[Tensor, "out in"]:
    """Wanda (Sun et al. 2023): in every output row, True at the ``round(sparsity * in)`` entries of
    smallest ``|W_ij| * ||x_j||_2``, where ``||x_j||_2`` is the norm of input feature ``j`` over
    calibration tokens (:func:`wanda_input_norms`)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1].")
    if input_norm.shape != (w.shape[1],):
        raise ValueError(f"input_norm has shape {tuple(input_norm.shape)}; "
                         f"the weight has {w.shape[1]} inputs.")
    score = w.abs() * input_norm.to(w.device, w.dtype)[None, :]  # (out, in)
    return _smallest_k(score, round(sparsity * w.shape[1]))


def prune_magnitude(lm: LoadedModel, names: Sequence[str], sparsity: float):
    """Context manager: unstructured magnitude pruning, ``sparsity`` of each named matrix set to 0."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1].")
    return edit_weights(lm, {n: lambda w: w.masked_fill_(magnitude_mask(w, sparsity), 0.0)
                             for n in _check_names(lm, names)})


def prune_wanda(lm: LoadedModel, input_norms: Mapping[str, Tensor], sparsity: float):
    """Context manager: Wanda pruning of every matrix in ``input_norms`` (``sparsity`` per output row)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1].")
    _check_names(lm, list(input_norms))

    def make(norm: Tensor) -> WeightFn:
        return lambda w: w.masked_fill_(wanda_mask(w, norm, sparsity), 0.0)

    return edit_weights(lm, {n: make(norm) for n, norm in input_norms.items()})


@torch.inference_mode()
def wanda_input_norms(lm: LoadedModel, ids: Int[Tensor, "n s"], names: Sequence[str] | None = None,
                      batch_size: int = 4) -> dict[str, Float[Tensor, " in"]]:
    """``||x_j||_2`` over all tokens of the calibration rows ``ids`` for each input feature ``j`` of
    each named matrix (default: all layer matrices), measured on the unedited model.

    Returns:
        ``{name: (in_features,)}`` float32 on the CPU.
    """
    names = weight_names(lm) if names is None else _check_names(lm, names)
    sums = {n: None for n in names}

    def make(name: str) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            s = x.pow(2).reshape(-1, x.shape[-1]).sum(0).cpu()  # (in,)
            sums[name] = s if sums[name] is None else sums[name] + s
        return pre_hook

    with hooks(pre=[(weight_module(lm, n), make(n)) for n in names]):
        for start in range(0, len(ids), batch_size):
            lm.model(input_ids=ids[start:start + batch_size].to(lm.device))
    return {n: s.sqrt().float() for n, s in sums.items()}


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
    for layer, ns in neurons.items():
        if not 0 <= layer < lm.n_layers:
            raise ValueError(f"layer {layer} out of range 0..{lm.n_layers - 1}.")
        bad = [n for n in ns if not 0 <= n < lm.d_mlp]
        if bad:
            raise ValueError(f"neuron(s) {bad} in layer {layer} out of range 0..{lm.d_mlp - 1}.")

    def make(layer: int, ns: Sequence[int]) -> WeightFn:
        cols = torch.cat([neuron_slice(lm, f"L{layer}.mlp.down", n).index for n in ns])

        def fn(w: Tensor) -> None:
            w[:, cols.to(w.device)] = 0.0  # (d_model, d_mlp): neuron n's column
        return fn

    return edit_weights(lm, {f"L{layer}.mlp.down": make(layer, list(ns)) for layer, ns in neurons.items() if len(ns)})


# Bit flips ----------------------------------------------------------------------------------------
#: Named bit positions (0 = least significant) of the 16-bit float formats.
#: bfloat16: sign 15, exponent 14..7, mantissa 6..0; float16: sign 15, exponent 14..10, mantissa 9..0.
BIT_POSITIONS: dict[str, dict[str, int]] = {
    "bfloat16": {"sign": 15, "exponent_msb": 14, "exponent_lsb": 7, "mantissa_msb": 6, "mantissa_lsb": 0},
    "float16": {"sign": 15, "exponent_msb": 14, "exponent_lsb": 10, "mantissa_msb": 9, "mantissa_lsb": 0},
}
_FLOAT16 = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def bit_index(bit: int | str, fmt: str) -> int:
    """Bit number for a name of :data:`BIT_POSITIONS` (or an int 0..15) in format ``fmt``."""
    if fmt not in BIT_POSITIONS:
        raise ValueError(f"format {fmt!r}; choose one of {sorted(BIT_POSITIONS)}.")
    if isinstance(bit, str):
        if bit not in BIT_POSITIONS[fmt]:
            raise ValueError(f"bit {bit!r}; choose one of {sorted(BIT_POSITIONS[fmt])} or an int 0..15.")
        return BIT_POSITIONS[fmt][bit]
    if isinstance(bit, bool) or not isinstance(bit, numbers.Integral) or not 0 <= int(bit) <= 15:
        raise ValueError(f"bit={bit!r} must be an integer in 0..15 for a 16-bit format, or one of "
                         f"{sorted(BIT_POSITIONS[fmt])}.")
    return int(bit)


def flip_bit(x: Tensor, bit: int | str, fmt: str = "bfloat16") -> Tensor:
    """Flip one bit of each value's 16-bit float representation; return the result in ``x.dtype``.

    ``x`` is rounded to ``fmt`` (bfloat16 or float16), the bit is XOR-ed on the ``int16`` view, and the
    result is converted back. Example (bfloat16): ``1.0`` -> sign flip ``-1.0``; exponent MSB flip
    ``inf`` (1.0 has exponent 127, all ones after the flip); mantissa LSB flip ``1.0078125`` (the next
    representable value).
    """
    b = bit_index(bit, fmt)
    mask = torch.tensor(1 << b if b < 15 else -(1 << 15), dtype=torch.int16)  # bit 15 is int16's sign
    y = x.to(_FLOAT16[fmt]).contiguous().view(torch.int16) ^ mask.to(x.device)
    return y.view(_FLOAT16[fmt]).to(x.dtype)


def flip_weight_bits(lm: LoadedModel, entries: Mapping[str, Sequence[tuple[int, int]]], bit: int | str,
                     fmt: str = "bfloat16"):
    """Context manager: flip ``bit`` of single weights ``(row, col)`` (``(out, in)`` coordinates).

    The model's weights stay in their dtype (float32 on CPU): each chosen weight is rounded to ``fmt``,
    its bit flipped and the value converted back; the other weights are not touched.
    """
    bit_index(bit, fmt)

    def make(cells: Sequence[tuple[int, int]]) -> WeightFn:
        def fn(w: Tensor) -> None:
            for r, c in cells:
                w[r, c] = flip_bit(w[r, c], bit, fmt)
        return fn

    return edit_weights(lm, {n: make(list(cells)) for n, cells in entries.items()})


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
def down_proj_spikes(lm: LoadedModel, ids: Int[Tensor, "n s"], batch_size: int = 4) -> list[dict]:
    """Activation spikes at the MLP down projection of every layer (Yu et al. 2024, "super weights").

    A super weight ``W_down[r, c]`` shows as a huge input activation on channel ``c`` and a huge output
    on hidden dimension ``r`` at the same token. Per layer this records the largest ``|output|`` over
    all tokens and dimensions (``out_max`` at ``row``, position ``position``) and, at that token and
    row, the input channel whose product ``x_c * W[row, c]`` contributes most (``col``,
    ``contribution``); also the largest ``|input|`` anywhere (``in_max`` on channel ``in_channel``).

    Returns:
        One dict per layer: ``layer, row, col, weight, contribution, out_max, out_value, in_max,
        in_channel, position, token`` (``row``/``col`` in ``(out, in)`` coordinates).
    """
    stats: dict[int, dict] = {}

    def make(layer: int, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            # (tokens, d_mlp), (tokens, d_model); some models (OPT) flatten batch and sequence already
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            y = output.detach().float().reshape(-1, output.shape[-1])
            w = out_in(lm, name).float()
            t, r = divmod(int(y.abs().reshape(-1).argmax()), y.shape[1])
            contrib = x[t] * w[r]  # (d_mlp,): each input channel's share of output r at token t
            c = int(contrib.abs().argmax())
            in_flat = int(x.abs().reshape(-1).argmax())
            b, s = divmod(t, batch_ids.shape[1])
            entry = {"layer": layer, "row": r, "col": c, "weight": float(w[r, c]),
                     "contribution": float(contrib[c]), "out_max": float(y[t, r].abs()),
                     "out_value": float(y[t, r]), "in_max": float(x.abs().reshape(-1)[in_flat]),
                     "in_channel": in_flat % x.shape[-1], "position": s, "token": int(batch_ids[b, s])}
            old = stats.get(layer)
            if old is None or entry["out_max"] > old["out_max"]:
                if old is not None:
                    entry["in_max"], entry["in_channel"] = max(
                        (entry["in_max"], entry["in_channel"]), (old["in_max"], old["in_channel"]))
                stats[layer] = entry
            elif entry["in_max"] > old["in_max"]:
                old["in_max"], old["in_channel"] = entry["in_max"], entry["in_channel"]
        return hook

    post = [(weight_module(lm, f"L{layer}.mlp.down"), make(layer, f"L{layer}.mlp.down"))
            for layer in range(lm.n_layers)]
    with hooks(post=post):
        for start in range(0, len(ids), batch_size):
            batch_ids = ids[start:start + batch_size]
            lm.model(input_ids=batch_ids.to(lm.device))
    return [stats[layer] for layer in sorted(stats)]
