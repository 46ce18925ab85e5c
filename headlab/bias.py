"""Gender-pair statistics: sentence pairs that differ in one pronoun, and per-head paired differences.

:func:`encode_pairs` tokenises the probe pairs of :func:`headlab.data.bias_pairs` and keeps those whose
token sequences differ exactly at the pronoun; :func:`head_differences` compares a per-head attention
statistic between the two sentences of each pair with paired bootstrap intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from headlab import metrics
from headlab.attention import encode_spans

__all__ = ["EncodedPairs", "encode_pairs", "head_differences"]


def head_differences(a: Float[Tensor, "n L H"], b: Float[Tensor, "n L H"], n_boot: int = 1000,
                     seed: int = 0, names: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """Per-head paired difference ``a - b`` over matched items, with paired bootstrap 95% intervals.

    Items (rows) where either value is NaN are dropped for every head alike, so all heads are
    compared on the same items; the bootstrap resamples items jointly for all heads
    (:func:`headlab.metrics.bootstrap_rows`).

    Returns:
        One row per head, ordered by layer then head: ``layer, head``, the means ``mean_<a>``,
        ``mean_<b>``, ``diff``, ``diff_low``, ``diff_high``, ``effect_size`` (mean / sd of the
        paired differences, Cohen's d_z) and ``n``.
    """
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must both be (items, layers, heads).")
    keep = ~(torch.isnan(a) | torch.isnan(b)).flatten(1).any(1)
    if int(keep.sum()) < 2:
        raise ValueError(f"only {int(keep.sum())} items without NaN; need at least 2.")
    a, b = a[keep].double(), b[keep].double()
    n, L, H = a.shape
    d = (a - b).reshape(n, L * H).T.numpy()  # (heads, items)
    mean, low, high = metrics.bootstrap_rows(d, n_boot=n_boot, seed=seed)
    sd = d.std(1, ddof=1)
    return pd.DataFrame({
        "layer": torch.arange(L).repeat_interleave(H).numpy(), "head": torch.arange(H).repeat(L).numpy(),
        f"mean_{names[0]}": a.mean(0).reshape(-1).numpy(), f"mean_{names[1]}": b.mean(0).reshape(-1).numpy(),
        "diff": mean, "diff_low": low, "diff_high": high,
        "effect_size": mean / (sd + 1e-12), "n": n})


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of sentence pairs that differ in one token (a gendered pronoun) at one position.

    Attributes:
        a, b: token ids of the two sentences of each kept pair (same length within a pair).
        pronoun: position of the differing token in both sentences.
        referent: token positions of the referent noun (empty when it was not found).
        index: row of each kept pair in the frame that was encoded.
        dropped: number of pairs whose token sequences did not align (length or more than one
            differing token).
    """

    a: list[Int[Tensor, " s"]]
    b: list[Int[Tensor, " s"]]
    pronoun: list[int]
    referent: list[list[int]]
    index: list[int]
    dropped: int

    def __len__(self) -> int:
        return len(self.a)

    def after_pronoun(self) -> list[list[int]]:
        """Query positions after the pronoun (to the end of the sentence), per pair."""
        return [list(range(p + 1, len(s))) for p, s in zip(self.pronoun, self.a)]


def encode_pairs(tokenizer: Any, pairs: pd.DataFrame) -> EncodedPairs:
    """Tokenise :func:`headlab.data.bias_pairs` rows; keep pairs whose token sequences have the same
    length and differ in exactly one position, the pronoun's (a single token in both)."""
    out: dict[str, list] = {"a": [], "b": [], "pronoun": [], "referent": [], "index": []}
    dropped = 0
    for i, r in enumerate(pairs.itertuples()):
        ref_a = [r.a_referent_span] if r.a_referent_span is not None else []
        ids_a, (pron_a, *refs) = encode_spans(tokenizer, r.a, [r.a_span, *ref_a])
        ids_b, (pron_b,) = encode_spans(tokenizer, r.b, [r.b_span])
        differ = torch.nonzero(ids_a != ids_b)[:, 0].tolist() if len(ids_a) == len(ids_b) else None
        if differ is None or len(pron_a) != 1 or pron_a != pron_b or differ != pron_a:
            dropped += 1
            continue
        out["a"].append(ids_a)
        out["b"].append(ids_b)
        out["pronoun"].append(pron_a[0])
        out["referent"].append(refs[0] if refs else [])
        out["index"].append(i)
    return EncodedPairs(**out, dropped=dropped)
