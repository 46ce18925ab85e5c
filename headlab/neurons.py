"""FFN neurons: streaming activation statistics over a corpus, top-activating snippets, and the tokens
a neuron promotes through the unembedding.

A *neuron* is one coordinate of the FFN's hidden layer *after* the activation function (and the gate
product of gated MLPs): the input of the down projection, ``(batch, seq, d_mlp)``, found through the
adapter (``mlp_out``) for every architecture. Neuron ``n`` writes ``a_n * W_out[:, n]`` to the
residual stream.

:func:`neuron_stats` runs a corpus through the model and aggregates every layer's activations *inside
the forward hook* (:func:`headlab.interventions.observe`): running sums of ``a``, ``|a|`` and ``a**2``,
the minimum, and the ``k`` largest activations of every neuron with their token positions. Only one
layer's activations of one batch exist at a time, so memory does not grow with the corpus.

Ablating neurons is :func:`headlab.interventions.ablate_neurons`; the top-k vs random-k loss sweep
is :func:`headlab.ablation.neuron_ablation_sweep`.

Top-k lists are kept as one int64 key per (token, neuron) that orders by activation and then by
earlier position, so they are exact and do not depend on how the corpus is batched (ties included,
e.g. the zeros of ReLU models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from headlab.models import LoadedModel
from headlab.progress import track

__all__ = [
    "NeuronStats",
    "dense_bytes",
    "neuron_activations",
    "neuron_stats",
    "output_weights",
    "promoted_tokens",
    "snippet_activations",
    "top_examples",
    "top_neurons",
]

_NO_KEY = torch.iinfo(torch.int64).min  # "no token yet" in the top-k lists
_LOW32 = (1 << 32) - 1


def _keys(values: Float[Tensor, "n N"], index: Int[Tensor, " n"]) -> Int[Tensor, "n N"]:
    """int64 keys ordering by float32 value, then by *smaller* token index (exact, no ties)."""
    return _keys_at(values, index[:, None].expand(values.shape))


def _batch_top_keys(a: Float[Tensor, "n N"], index: Int[Tensor, " n"], k: int) -> Int[Tensor, "k N"]:
    """The ``k`` largest keys (:func:`_keys`) of every column of ``a``, without keying every element.

    The ``k`` largest values of a column are unique as a set unless the ``k``-th value equals the
    ``(k+1)``-th; only such columns are keyed in full (ReLU zeros), the rest from ``topk``.
    """
    if a.shape[0] <= k:
        return _keys(a, index)
    vals, rows = a.topk(k + 1, dim=0)  # (k + 1, N), largest first
    keys = _keys_at(vals[:k], index[rows[:k]])
    tied = (vals[k] == vals[k - 1]).nonzero()[:, 0]
    if len(tied):
        keys[:, tied] = _keys(a[:, tied], index).topk(k, dim=0).values
    return keys


def _keys_at(values: Float[Tensor, "k N"], index: Int[Tensor, "k N"]) -> Int[Tensor, "k N"]:
    """:func:`_keys` for values whose token index is given per element."""
    bits = values.float().contiguous().view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()  # monotone in the float value
    return (ordered << 32) + (_LOW32 - index.long())


def _decode(keys: Int[Tensor, "*s"]) -> tuple[Float[Tensor, "*s"], Int[Tensor, "*s"]]:
    """Values and token indices of keys made by :func:`_keys` (``nan`` / ``-1`` for empty slots)."""
    ordered = (keys >> 32).int()
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    values = bits.view(torch.float32).clone()
    index = _LOW32 - (keys & _LOW32)
    empty = keys == _NO_KEY
    values[empty] = float("nan")
    index[empty] = -1
    return values, index


@dataclass
class NeuronStats:
    """Running statistics of the neuron activations of some layers over a corpus.

    Attributes:
        layers: the layers, in the order of the first axis of every tensor.
        count: tokens aggregated (the same for every layer).
        sum, sum_abs, sum_sq: ``(L, d_mlp)`` float64 running sums of ``a``, ``|a|``, ``a**2``.
        min: ``(L, d_mlp)`` smallest activation seen.
        top_keys: ``(L, d_mlp, k)`` int64 keys of the ``k`` largest activations (see
            :meth:`top_values` / :meth:`top_index`), best first.
    """

    layers: list[int]
    count: int
    sum: Float[Tensor, "L N"]
    sum_abs: Float[Tensor, "L N"]
    sum_sq: Float[Tensor, "L N"]
    min: Float[Tensor, "L N"]
    top_keys: Int[Tensor, "L N k"]

    @classmethod
    def empty(cls, layers: Sequence[int], d_mlp: int, k: int, device: str | torch.device = "cpu") -> NeuronStats:
        """Statistics of no tokens yet."""
        if k < 1:
            raise ValueError(f"k={k} must be at least 1 (examples kept per neuron).")
        L = len(layers)
        z = dict(dtype=torch.float64, device=device)
        return cls(list(layers), 0, torch.zeros(L, d_mlp, **z), torch.zeros(L, d_mlp, **z),
                   torch.zeros(L, d_mlp, **z), torch.full((L, d_mlp), float("inf"), device=device),
                   torch.full((L, d_mlp, k), _NO_KEY, dtype=torch.long, device=device))

    @property
    def k(self) -> int:
        return int(self.top_keys.shape[-1])

    @property
    def d_mlp(self) -> int:
        return int(self.sum.shape[1])

    def slot(self, layer: int) -> int:
        """Row of ``layer`` in the tensors."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(f"layer {layer} was not captured; captured layers: {self.layers}.") from None

    def update(self, slot: int, acts: Float[Tensor, "n N"], index: Int[Tensor, " n"]) -> None:
        """Add ``n`` tokens' activations of layer ``layers[slot]``; ``index`` numbers the tokens.

        ``count`` is not changed here (several layers see the same tokens): call :meth:`add_count`
        once per batch.
        """
        a = acts.float()
        # per-batch sums in float32, accumulated across batches in float64
        self.sum[slot] += a.sum(0).double()
        self.sum_abs[slot] += a.abs().sum(0).double()
        self.sum_sq[slot] += a.square().sum(0).double()
        self.min[slot] = torch.minimum(self.min[slot], a.amin(0))
        self.top_keys[slot] = torch.cat([self.top_keys[slot], _batch_top_keys(a, index.to(a.device), self.k).T],
                                        1).topk(self.k, dim=1).values

    def add_count(self, n: int) -> None:
        self.count += int(n)

    def _need_tokens(self) -> None:
        if self.count == 0:
            raise ValueError("No tokens aggregated yet.")

    @property
    def mean(self) -> Float[Tensor, "L N"]:
        """Mean activation (float32); the reference for mean ablation."""
        self._need_tokens()
        return (self.sum / self.count).float()

    @property
    def mean_abs(self) -> Float[Tensor, "L N"]:
        self._need_tokens()
        return (self.sum_abs / self.count).float()

    @property
    def std(self) -> Float[Tensor, "L N"]:
        self._need_tokens()
        m = self.sum / self.count
        return (self.sum_sq / self.count - m * m).clamp_min(0).sqrt().float()

    @property
    def max(self) -> Float[Tensor, "L N"]:
        return self.top_values[..., 0]

    @property
    def top_values(self) -> Float[Tensor, "L N k"]:
        """The ``k`` largest activations of each neuron, largest first (``nan`` if fewer tokens)."""
        return _decode(self.top_keys)[0]

    @property
    def top_index(self) -> Int[Tensor, "L N k"]:
        """Token index (as passed to :meth:`update`) of each top activation (``-1`` if none)."""
        return _decode(self.top_keys)[1]

    def means(self) -> dict[int, Float[Tensor, " N"]]:
        """``{layer: mean activation}`` on the CPU, as :func:`headlab.interventions.ablate_neurons` takes."""
        mean = self.mean.cpu()
        return {layer: mean[i] for i, layer in enumerate(self.layers)}

    def frame(self) -> pd.DataFrame:
        """One row per (layer, neuron): ``mean, mean_abs, std, max, min``."""
        L, N = self.sum.shape
        return pd.DataFrame({
            "layer": np.repeat(self.layers, N), "neuron": np.tile(np.arange(N), L),
            "mean": self.mean.cpu().reshape(-1).numpy(), "mean_abs": self.mean_abs.cpu().reshape(-1).numpy(),
            "std": self.std.cpu().reshape(-1).numpy(), "max": self.max.cpu().reshape(-1).numpy(),
            "min": self.min.float().cpu().reshape(-1).numpy(),
        })

    def nbytes(self) -> int:
        """Memory held by the statistics."""
        return sum(t.numel() * t.element_size() for t in (self.sum, self.sum_abs, self.sum_sq, self.min, self.top_keys))


def dense_bytes(n_tokens: int, n_layers: int, d_mlp: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes needed to hold every activation of ``n_layers`` layers for ``n_tokens`` tokens at once."""
    return n_tokens * n_layers * d_mlp * torch.empty(0, dtype=dtype).element_size()


@torch.inference_mode()
def neuron_stats(
    lm: LoadedModel,
    ids: Int[Tensor, "n s"],
    layers: Sequence[int] | None = None,
    k: int = 8,
    batch_size: int = 4,
    skip_first: int = 1,
) -> NeuronStats:
    """Stream a corpus through the model and aggregate every layer's neuron activations on the fly.

    Token ``(row, pos)`` gets index ``row * s + pos`` (see :meth:`NeuronStats.top_index`). Rows are run
    without padding and only the last position's logits are computed.

    Args:
        ids: ``(n, s)`` equal-length token rows (e.g. :func:`headlab.tasks.text_rows`).
        layers: layers to aggregate (default all).
        k: top activations (with positions) kept per neuron.
        batch_size: rows per forward pass (the statistics do not depend on it).
        skip_first: positions ``< skip_first`` of every row are left out: the first token of a
            sequence, with no context, carries attention-sink activations unrelated to the text.

    Returns:
        :class:`NeuronStats` on the CPU.
    """
    from headlab.interventions import observe

    n, s = ids.shape
    if not 0 <= skip_first < s:
        raise ValueError(f"skip_first={skip_first} must be in 0..{s - 1} (row length {s}).")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < lm.n_layers:
            raise ValueError(f"layer {layer} out of range 0..{lm.n_layers - 1}.")
    stats = NeuronStats.empty(layers, lm.d_mlp, k, device=lm.device)
    slots = {layer: i for i, layer in enumerate(layers)}
    current: dict[str, Tensor] = {}

    def aggregate(layer: int, x: Tensor) -> None:
        x = x.reshape(-1, s, x.shape[-1])  # (b, s, N); OPT's blocks flatten to (b * s, N)
        a = x[:, skip_first:].reshape(-1, x.shape[-1])  # (b * (s - skip_first), N)
        stats.update(slots[layer], a, current["index"])

    with observe(lm, aggregate, layers, site="mlp_out"):
        for start in track(range(0, n, batch_size), "neuron statistics", unit="batch"):
            rows = torch.arange(start, min(n, start + batch_size))
            index = rows[:, None] * s + torch.arange(skip_first, s)[None]  # (b, s - skip_first)
            current["index"] = index.reshape(-1).to(lm.device)
            lm.model(input_ids=ids[rows].to(lm.device), logits_to_keep=1)
            stats.add_count(index.numel())
    return NeuronStats(stats.layers, stats.count, *(t.cpu() for t in (
        stats.sum, stats.sum_abs, stats.sum_sq, stats.min, stats.top_keys)))


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@torch.inference_mode()
def neuron_activations(lm: LoadedModel, ids: Int[Tensor, "b s"], layer: int) -> Float[Tensor, "b s N"]:
    """All neuron activations of one layer for a small unpadded batch (later blocks are not run)."""
    from headlab.interventions import observe

    seen: dict[str, Tensor] = {}

    def keep(_: int, x: Tensor) -> None:
        seen["a"] = x.reshape(*ids.shape, x.shape[-1]).float().cpu()  # OPT's blocks flatten (b * s, N)
        raise _Stop

    try:
        with observe(lm, keep, [layer], site="mlp_out"):
            lm.model(input_ids=ids.to(lm.device), logits_to_keep=1)
    except _Stop:
        pass
    return seen["a"]


def top_neurons(stats: NeuronStats, by: str = "mean_abs", k: int = 5) -> pd.DataFrame:
    """The ``k`` neurons of every layer with the largest ``by`` (``"mean_abs"`` or ``"max"``).

    Returns:
        One row per (layer, rank): ``layer, rank, neuron`` and every column of :meth:`NeuronStats.frame`.
    """
    frame = stats.frame()
    if by not in frame.columns or by in ("layer", "neuron"):
        raise ValueError(f"by={by!r}; choose one of {[c for c in frame.columns if c not in ('layer', 'neuron')]}.")
    top = (frame.sort_values(["layer", by, "neuron"], ascending=[True, False, True], kind="stable")
           .groupby("layer", sort=True).head(k).copy())
    top.insert(1, "rank", top.groupby("layer").cumcount() + 1)
    return top.reset_index(drop=True)


def top_examples(lm: LoadedModel, stats: NeuronStats, ids: Int[Tensor, "n s"], layer: int, neuron: int,
                 before: int = 12, after: int = 3) -> pd.DataFrame:
    """The tokens that most activate a neuron, with their context (a small neuroscope).

    Args:
        ids: the rows :func:`neuron_stats` ran on (indices refer to them).
        before, after: context tokens shown before / after the top token.

    Returns:
        One row per example, best first: ``rank, activation, row, position, token, before, after``
        (``before``/``after`` are decoded text).
    """
    slot = stats.slot(layer)
    if not 0 <= neuron < stats.d_mlp:
        raise ValueError(f"neuron={neuron} out of range 0..{stats.d_mlp - 1}.")
    s = ids.shape[1]
    vals, index = stats.top_values[slot, neuron], stats.top_index[slot, neuron]
    tok = lm.tokenizer
    rows = []
    for r, (v, i) in enumerate(zip(vals.tolist(), index.tolist()), 1):
        if i < 0:
            break
        row, pos = divmod(i, s)
        seq = ids[row].tolist()
        rows.append({"rank": r, "activation": v, "row": row, "position": pos,
                     "token": tok.decode([seq[pos]]),
                     "before": tok.decode(seq[max(0, pos - before):pos]),
                     "after": tok.decode(seq[pos + 1:pos + 1 + after])})
    return pd.DataFrame(rows)


def snippet_activations(lm: LoadedModel, ids: Int[Tensor, "n s"], examples: pd.DataFrame, layer: int,
                        neuron: int, before: int = 12, after: int = 3) -> pd.DataFrame:
    """The neuron's activation on every token around each example of :func:`top_examples`.

    Runs the example rows again (only up to the last shown token, and only up to ``layer``).

    Returns:
        One row per shown token: ``rank`` (of the example), ``offset`` (position - the example's
        position), ``token`` (decoded), ``activation``.
    """
    if examples.empty:
        return pd.DataFrame(columns=["rank", "offset", "token", "activation"])
    rows = torch.tensor(examples["row"].tolist(), dtype=torch.long)
    end = min(ids.shape[1], int(examples["position"].max()) + after + 1)
    acts = neuron_activations(lm, ids[rows, :end], layer)[..., neuron]  # (n_examples, end)
    out = []
    for j, ex in enumerate(examples.itertuples()):
        for pos in range(max(0, ex.position - before), min(end, ex.position + after + 1)):
            out.append({"rank": ex.rank, "offset": pos - ex.position,
                        "token": lm.tokenizer.decode([int(ids[ex.row, pos])]),
                        "activation": float(acts[j, pos])})
    return pd.DataFrame(out)


def output_weights(lm: LoadedModel, layer: int) -> Float[Tensor, "d_model N"]:
    """The down projection's weight of ``layer`` as ``(d_model, d_mlp)``: column ``n`` is what neuron
    ``n`` writes to the residual stream per unit of activation."""
    return lm.adapter.weight_in_out(lm.layer_module(layer, "mlp_out"))


@torch.inference_mode()
def promoted_tokens(lm: LoadedModel, layer: int, neuron: int, k: int = 10) -> pd.DataFrame:
    """Tokens a neuron's output weights promote and suppress through the unembedding.

    Scores are :func:`headlab.lens.direction_logits` of the neuron's output column (the logits one
    unit of activation adds, with the final norm's per-token scale left out).

    Returns:
        ``2k`` rows: ``direction`` (``"promoted"``/``"suppressed"``), ``rank``, ``token``, ``token_id``,
        ``logit``.
    """
    from headlab.lens import direction_logits

    w = output_weights(lm, layer)
    if not 0 <= neuron < w.shape[1]:
        raise ValueError(f"neuron={neuron} out of range 0..{w.shape[1] - 1}.")
    logits = direction_logits(lm, w[:, neuron]).float().cpu()
    rows = []
    for direction, (vals, idx) in {"promoted": logits.topk(k), "suppressed": (-logits).topk(k)}.items():
        for r, (v, i) in enumerate(zip(vals.tolist(), idx.tolist()), 1):
            rows.append({"direction": direction, "rank": r, "token": lm.tokenizer.decode([i]), "token_id": i,
                         "logit": v if direction == "promoted" else -v})
    return pd.DataFrame(rows)
