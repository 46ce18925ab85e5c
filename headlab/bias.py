"""Gender-pair statistics: sentence pairs that differ in one pronoun, per-head paired differences, and
what the model prefers.

:func:`encode_pairs` tokenises the probe pairs of :func:`headlab.data.bias_pairs` and keeps those whose
token sequences differ exactly at the pronoun; :func:`head_differences` compares a per-head attention
statistic between the two sentences of each pair with paired bootstrap intervals; :func:`pair_scores`
compares the model's log-likelihood of the two sentences (whole sentence, pronoun, words after it);
:func:`prefix_twins` finds pairs whose next-pronoun measures cancel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from headlab import metrics
from headlab.attention import encode_spans
from headlab.models import LoadedModel
from headlab.perplexity import sequence_losses

__all__ = ["PAIR_MEASURES", "EncodedPairs", "encode_pairs", "head_differences", "pair_scores", "prefix_twins"]

#: The values of :func:`pair_scores`, per pair (``a`` minus ``b``).
PAIR_MEASURES = ("sentence", "pronoun", "after", "p_pair")


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

    def subset(self, rows: Sequence[int]) -> EncodedPairs:
        """The pairs at ``rows`` (positions in this object), in that order; ``index`` is kept."""
        rows = [int(r) for r in rows]
        return EncodedPairs([self.a[r] for r in rows], [self.b[r] for r in rows], [self.pronoun[r] for r in rows],
                            [self.referent[r] for r in rows], [self.index[r] for r in rows], self.dropped)

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


def pair_scores(lm: LoadedModel, enc: EncodedPairs, batch_size: int = 16) -> dict[str, Float[Tensor, " n"]]:
    """What the model prefers, sentence ``a`` or ``b`` of each pair: log-likelihood contrasts ``a - b``.

    The two sentences share every token but the pronoun at position ``p``, so the tokens before it
    have the same probabilities in both and the whole-sentence log-likelihood difference is the sum
    from the pronoun on (the shared tokens are not summed: they contribute exactly 0). One forward
    pass per sentence (:func:`headlab.perplexity.sequence_losses`);
    hooks set by the caller (head ablation) act on both.

    Returns:
        ``(n_pairs,)`` float64 tensors:

        * ``"sentence"``: ``log P(a) - log P(b)`` of the whole sentences = ``pronoun + after``;
        * ``"pronoun"``: ``log p(a's pronoun | prefix) - log p(b's pronoun | prefix)``, the next-pronoun
          preference (a function of the prefix and the two forms only; see :func:`prefix_twins`);
        * ``"after"``: the sum over the tokens after the pronoun of ``log p(token | a up to it) -
          log p(token | b up to it)``: how much better the rest of the sentence fits ``a``'s pronoun;
        * ``"p_pair"``: ``p(a's pronoun) + p(b's pronoun)`` after the prefix.

    Raises:
        ValueError: a pronoun at position 0 (nothing predicts it).
    """
    if any(p < 1 for p in enc.pronoun):
        bad = [i for i, p in enumerate(enc.pronoun) if p < 1]
        raise ValueError(f"pairs {bad[:5]} have the pronoun at position 0; nothing predicts it.")
    nll = sequence_losses(lm, [*enc.a, *enc.b], batch_size, start=[*enc.pronoun, *enc.pronoun])
    n = len(enc)
    out: dict[str, list[float]] = {name: [] for name in PAIR_MEASURES}
    for i in range(n):
        la, lb = -nll[i].double(), -nll[n + i].double()  # log p of the pronoun and every later token
        pronoun, after = float(la[0] - lb[0]), float((la[1:] - lb[1:]).sum())
        out["pronoun"].append(pronoun)
        out["after"].append(after)
        out["sentence"].append(pronoun + after)
        out["p_pair"].append(float(la[0].exp() + lb[0].exp()))
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in out.items()}


def prefix_twins(pairs: pd.DataFrame) -> pd.Series:
    """Pairs whose prefix also begins another pair with the genders of ``a`` and ``b`` swapped.

    The next-pronoun measure ``log p(a's pronoun | prefix) - log p(b's pronoun | prefix)`` depends on
    the prefix and the two forms only. Two pairs with the same prefix whose ``a`` pronouns have
    opposite genders measure the same preference with opposite signs: exact negatives for the same
    two forms (he/she and she/he), and they cancel in every mean. WinoBias type 1 is full of them
    (the clause after the pronoun decides which reading is stereotyped).

    Args:
        pairs: rows with ``prefix`` and ``a_male`` (:func:`headlab.data.bias_pairs`).

    Returns:
        Boolean Series aligned with ``pairs``: True where such a twin exists.
    """
    missing = [c for c in ("prefix", "a_male") if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs lack column(s) {missing}; they have {list(pairs.columns)}.")
    genders = pairs.groupby("prefix")["a_male"].transform("nunique")
    return (genders > 1).rename("prefix_twin")
