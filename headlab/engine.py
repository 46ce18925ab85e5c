"""Batched forward passes: label-token scoring with a shared-prefix KV cache, perplexity, greedy labels.

Few-shot prompts share one long prefix (instruction + shots) and differ only in a short query. The
prefix is run once; its keys/values are broadcast to every batch and only the query tokens are
computed. Queries are left-padded with explicit position ids (pads masked), so every prompt's real
tokens sit at the same positions as when it runs alone and its result does not depend on the other
prompts in its batch; the unembedding runs for the last position only.

The *logit lens* (nostalgebraist 2020) decodes the residual stream after every block through the
model's own final norm and unembedding (:func:`decode_residual`); after the last block it gives the
model's logits exactly. :func:`lens_label_scores` reads the label tokens off every layer for few-shot
prompts with the same prefix cache.

Tokenisation is defined as ``ids(prefix) + ids(query)`` (the query tokenised without special
tokens) in every code path, cached or not, so the two paths score exactly the same token sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import AttentionInterface, DynamicCache

from headlab.models import LoadedModel

__all__ = [
    "CleanRun",
    "EncodedPrompts",
    "TextWindows",
    "clean_run",
    "decode_residual",
    "direction_logits",
    "encode_prompts",
    "forward_last",
    "generate_greedy",
    "label_token_ids",
    "label_logprobs",
    "lens_label_scores",
    "lens_logits",
    "perplexity",
    "prefix_kv",
    "sweep_heads",
    "text_windows",
    "token_nll",
    "windows_nll",
]


@dataclass
class EncodedPrompts:
    """Token ids of prompts that share one prefix.

    Attributes:
        prefix: ``(P,)`` ids of the shared prefix (with the tokenizer's special tokens, if it adds any).
        queries: one ``(Q_i,)`` tensor per prompt.
    """

    prefix: Int[Tensor, " P"]
    queries: list[Int[Tensor, " Q"]]

    def __len__(self) -> int:
        return len(self.queries)

    def full(self, i: int) -> Int[Tensor, " T"]:
        """The whole token sequence of prompt ``i``."""
        return torch.cat([self.prefix, self.queries[i]])

    def subset(self, index: Sequence[int]) -> EncodedPrompts:
        return EncodedPrompts(self.prefix, [self.queries[i] for i in index])


def encode_prompts(lm: LoadedModel, prefix: str, queries: Sequence[str]) -> EncodedPrompts:
    """Tokenise a shared ``prefix`` (with special tokens) and each query (without)."""
    tok = lm.tokenizer
    pre = tok(prefix, add_special_tokens=True)["input_ids"] if prefix else []
    if not prefix and tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
        pre = [tok.bos_token_id]
    qs = [torch.tensor(tok(q, add_special_tokens=False)["input_ids"], dtype=torch.long) for q in queries]
    if any(len(q) == 0 for q in qs):
        raise ValueError("Every query must contain at least one token.")
    return EncodedPrompts(torch.tensor(pre, dtype=torch.long), qs)


def label_token_ids(lm: LoadedModel, words: Sequence[str], leading_space: bool = True) -> list[int]:
    """Token id of each label word (``" positive"`` when ``leading_space``).

    Raises:
        ValueError: a word that is not a single token, naming it and its tokens.
    """
    ids = []
    for w in words:
        text = (" " + w) if leading_space else w
        toks = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            pieces = lm.tokenizer.convert_ids_to_tokens(toks)
            raise ValueError(f"Label word {text!r} is {len(toks)} tokens {pieces}; choose single-token labels.")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"Label words {list(words)} map to the same token ids {ids}.")
    return ids


# --------------------------------------------------------------------------------------------------
# Shared-prefix KV cache
# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def prefix_kv(lm: LoadedModel, prefix: Int[Tensor, " P"]) -> list[tuple[Tensor, Tensor]]:
    """Run the prefix once and return each layer's ``(keys, values)``, shape ``(1, n_kv, P, d_head)``."""
    out = lm.model(prefix[None].to(lm.device), use_cache=True)
    return [(layer.keys, layer.values) for layer in lm.cache_of(out).layers]


def _cache_for_batch(lm: LoadedModel, kv: list[tuple[Tensor, Tensor]], batch: int) -> DynamicCache:
    """A fresh cache holding the prefix keys/values broadcast to ``batch`` rows (no copy)."""
    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
    return DynamicCache(ddp_cache_data=data, config=lm.model.config)


def _pad_left(seqs: Sequence[Tensor], pad_id: int, offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad 1-D id tensors into ``(B, S)`` ids, a 0/1 mask and explicit position ids.

    Real tokens of every row get positions ``offset, offset + 1, ...`` whatever the padding, so a row's
    result does not depend on the longest row of its batch; pads get position ``offset`` and are
    masked out. With left padding every row's last real token sits at index ``S - 1``, so the
    unembedding runs for that one position only.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pos = torch.full((len(seqs), width), offset, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        ids[i, width - n:] = s
        mask[i, width - n:] = 1
        pos[i, width - n:] = offset + torch.arange(n)
    return ids, mask, pos


def _batches(n: int, size: int) -> Iterator[range]:
    if size <= 0:
        raise ValueError(f"batch_size={size} must be positive.")
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _needs_equal_lengths(lm: LoadedModel, enc: EncodedPrompts) -> bool:
    """True when a sliding window could reach back past pads between the prefix and a query."""
    window = lm.sliding_window
    longest = max((len(q) for q in enc.queries), default=0)
    return window is not None and window < len(enc.prefix) + longest


def _chunks(items: Sequence, lengths: Sequence[int], size: int, equal: bool) -> Iterator[list]:
    """Split ``items`` into batches of at most ``size``; with ``equal``, only items of equal
    ``lengths`` share a batch (stable order within each length)."""
    if size <= 0:
        raise ValueError(f"batch_size={size} must be positive.")
    if not equal:
        for start in range(0, len(items), size):
            yield list(items[start:start + size])
        return
    by_len: dict[int, list] = {}
    for item, n in zip(items, lengths):
        by_len.setdefault(int(n), []).append(item)
    for group in by_len.values():
        for start in range(0, len(group), size):
            yield group[start:start + size]


@torch.inference_mode()
def forward_last(
    lm: LoadedModel,
    enc: EncodedPrompts,
    rows: Sequence[int],
    kv: list[tuple[Tensor, Tensor]] | None,
) -> Float[Tensor, "B vocab"]:
    """Logits at the last real token of prompts ``rows`` (one forward, left padding).

    With ``kv`` (from :func:`prefix_kv`) only the query tokens are computed; without, the whole
    prompt is run. Both give the same numbers up to float rounding (for sliding-window models the
    rows are run in groups of equal query length, see :meth:`LoadedModel.sliding_window`).
    """
    rows = list(rows)
    if kv is not None and _needs_equal_lengths(lm, enc):
        lengths = [len(enc.queries[i]) for i in rows]
        if len(set(lengths)) > 1:
            groups = list(_chunks(list(range(len(rows))), lengths, len(rows), equal=True))
            logits = torch.cat([forward_last(lm, enc, [rows[j] for j in g], kv) for g in groups])
            order = torch.tensor([j for g in groups for j in g])
            return logits[torch.argsort(order).to(logits.device)]
    pad = lm.tokenizer.pad_token_id or 0
    dev = lm.device
    offset = 0 if kv is None else len(enc.prefix)
    seqs = [enc.full(i) if kv is None else enc.queries[i] for i in rows]
    ids, mask, positions = _pad_left(seqs, pad, offset)
    b = ids.shape[0]
    kwargs = {}
    if kv is not None:
        kwargs.update(lm.with_cache(_cache_for_batch(lm, kv, b)))
        mask = torch.cat([torch.ones(b, offset, dtype=torch.long), mask], dim=1)
    out = lm.model(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=positions.to(dev),
        use_cache=kv is not None,
        logits_to_keep=1,
        **kwargs,
    )
    return out.logits[:, -1].float()


def label_logprobs(
    lm: LoadedModel,
    enc: EncodedPrompts,
    label_ids: Sequence[int],
    batch_size: int = 16,
    use_prefix_cache: bool = True,
) -> Float[Tensor, "n n_labels"]:
    """Log-probabilities (softmax over the full vocabulary) of each label token after each prompt.

    Args:
        lm: the model.
        enc: prompts from :func:`encode_prompts`.
        label_ids: token ids of the labels, from :func:`label_token_ids`.
        batch_size: prompts per forward pass.
        use_prefix_cache: compute the shared prefix once (exact; disable only to check that).

    Returns:
        ``(n_prompts, n_labels)`` float32 tensor on the CPU. The logit difference between two labels is
        the difference of their columns (the softmax normaliser cancels).
    """
    kv = prefix_kv(lm, enc.prefix) if use_prefix_cache and len(enc.prefix) else None
    idx = torch.tensor(list(label_ids))
    out = []
    for rows in _batches(len(enc), batch_size):
        logits = forward_last(lm, enc, rows, kv)
        out.append(torch.log_softmax(logits, dim=-1)[:, idx.to(logits.device)].cpu())
    return torch.cat(out) if out else torch.empty(0, len(idx))


# --------------------------------------------------------------------------------------------------
# Greedy generation (the seeds' way of reading the answer; kept for comparison)
# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate_greedy(lm: LoadedModel, enc: EncodedPrompts, max_new_tokens: int = 3) -> list[str]:
    """Greedy continuation of each prompt, decoded to text (one prompt at a time, prefix cached)."""
    kv = prefix_kv(lm, enc.prefix) if len(enc.prefix) else None
    texts = []
    for i in range(len(enc)):
        cache = _cache_for_batch(lm, kv, 1) if kv is not None else DynamicCache(config=lm.model.config)
        ids = enc.queries[i][None].to(lm.device)
        pos = len(enc.prefix)
        new: list[int] = []
        for _ in range(max_new_tokens):
            positions = (pos + torch.arange(ids.shape[1], device=lm.device))[None]
            out = lm.model(input_ids=ids, position_ids=positions, use_cache=True, **lm.with_cache(cache))
            nxt = int(out.logits[0, -1].argmax())
            new.append(nxt)
            pos += ids.shape[1]
            cache = lm.cache_of(out)
            ids = torch.tensor([[nxt]], device=lm.device)
        texts.append(lm.tokenizer.decode(new, skip_special_tokens=True))
    return texts


# --------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------
def _nll_spans(n: int, context: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Windows of :func:`token_nll`: ``(window index, start, end, first scored position)``."""
    spans = []
    start, scored_upto = 0, 1  # token 0 has no prediction
    while True:
        end = min(start + context, n)
        spans.append((len(spans), start, end, max(scored_upto, start + 1)))
        scored_upto = end
        if end >= n:
            break
        # Next window: ``stride`` further, but starting early enough that the first unscored token is
        # predicted inside it (matters for stride == context) and, at the end, a full window.
        start = min(start + stride, scored_upto - 1, n - context)
    return spans


@torch.inference_mode()
def token_nll(
    lm: LoadedModel,
    ids: Int[Tensor, " N"],
    context: int = 512,
    stride: int = 256,
    batch_size: int = 8,
) -> tuple[Float[Tensor, " M"], Int[Tensor, " M"]]:
    """Per-token negative log-likelihood of a long token stream with a sliding window.

    Windows of ``context`` tokens start every ``stride`` tokens; each token is scored once, in the
    first window where it has at least ``context - stride`` tokens of left context (all tokens of
    the first window are scored with whatever context they have). This is the usual strided
    perplexity evaluation.

    Args:
        lm: the model.
        ids: the token stream.
        context: window length in tokens.
        stride: step between windows, ``0 < stride <= context``. With ``stride == context`` the
            windows overlap by one token so that the first token of each window is still predicted.
        batch_size: windows per forward pass.

    Returns:
        ``(nll, window)``: NLL in nats of each scored token (the first token is never scored) and the
        index of the window that scored it (for block-bootstrap confidence intervals).
    """
    if context < 2:
        raise ValueError(f"context={context} must be at least 2 tokens (stride={stride}).")
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must satisfy 0 < stride <= context={context}.")
    n = len(ids)
    if n < 2:
        raise ValueError("Need at least 2 tokens to score.")
    nll, win = [], []
    spans = _nll_spans(n, context, stride)
    for rows in _batches(len(spans), batch_size):
        chunk = [spans[r] for r in rows]
        width = max(e - s for _, s, e, _ in chunk)
        x = torch.stack([torch.nn.functional.pad(ids[s:e], (0, width - (e - s))) for _, s, e, _ in chunk])
        mask = torch.stack([(torch.arange(width) < e - s).long() for _, s, e, _ in chunk])
        logits = lm.model(input_ids=x.to(lm.device), attention_mask=mask.to(lm.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = x[:, 1:].to(lm.device)
        tok_nll = -logp.gather(-1, tgt[..., None])[..., 0].cpu()  # (b, width-1): nll of token t+1
        for j, (w, s, e, first) in enumerate(chunk):
            # token at absolute position p is predicted at row position p - s - 1
            sel = tok_nll[j, first - s - 1 : e - s - 1]
            nll.append(sel)
            win.append(torch.full((len(sel),), w, dtype=torch.long))
    return torch.cat(nll), torch.cat(win)


def perplexity(nll: Tensor) -> float:
    """``exp(mean NLL)``."""
    return math.exp(float(nll.double().mean()))


# --------------------------------------------------------------------------------------------------
# Head sweeps: many (head edit, prompt) pairs, computing only what an edit can change
# --------------------------------------------------------------------------------------------------
@dataclass
class CleanRun:
    """Everything a head sweep reuses from one clean pass over the prompts.

    Attributes:
        enc: the prompts.
        kv: clean prefix keys/values per layer, ``(1, n_kv, P, d_head)`` each.
        prefix_hidden: input of every layer for the prefix, ``(L, P, d_model)``.
        query_hidden: input of every layer for the queries, left-padded to the longest query,
            ``(L, N, Q, d_model)``.
        logprobs: clean label log-probabilities ``(N, n_labels)``.
        head_max_abs, head_std: ``(L, n_heads)`` max |z| and std of each head's output ``z`` over the
            prefix positions and all real query positions of all prompts.
        head_mean: ``(L, n_heads, d_head)`` mean head output over the same positions (mean ablation).
    """

    enc: EncodedPrompts
    label_ids: list[int]
    kv: list[tuple[Tensor, Tensor]]
    prefix_hidden: Float[Tensor, "L P d"]
    query_hidden: Float[Tensor, "L N Q d"]
    logprobs: Float[Tensor, "N n_labels"]
    head_max_abs: Float[Tensor, "L H"]
    head_std: Float[Tensor, "L H"]
    head_mean: Float[Tensor, "L H dh"]

    @property
    def prefix_len(self) -> int:
        return len(self.enc.prefix)


@torch.inference_mode()
def clean_run(lm: LoadedModel, enc: EncodedPrompts, label_ids: Sequence[int], batch_size: int = 32) -> CleanRun:
    """Run the prompts once without intervention and keep what a head sweep needs (see :class:`CleanRun`)."""
    from headlab.interventions import capture  # local: interventions imports models only

    if len(enc.prefix) == 0:
        raise ValueError("Head sweeps need a non-empty shared prefix (at least a BOS or instruction token).")
    L, H, dh = lm.n_layers, lm.n_heads, lm.head_dim
    dev = lm.device
    with capture(lm) as z_pre:
        out = lm.model(enc.prefix[None].to(dev), use_cache=True, output_hidden_states=True)
    kv = [(layer.keys, layer.values) for layer in lm.cache_of(out).layers]
    prefix_hidden = torch.stack([h[0] for h in out.hidden_states[:L]])  # (L, P, d)
    # running sums for per-head statistics over prefix + real query positions
    zs = {l: z_pre[l][0].reshape(-1, H, dh).float() for l in range(L)}  # (P, H, dh)
    count = len(enc.prefix)
    s1 = torch.stack([zs[l].sum(0) for l in range(L)])  # (L, H, dh)
    s2 = torch.stack([(zs[l] ** 2).sum((0, 2)) for l in range(L)])  # (L, H)
    mx = torch.stack([zs[l].abs().amax((0, 2)) for l in range(L)])  # (L, H)
    qmax = max(len(q) for q in enc.queries)
    query_hidden = torch.zeros(L, len(enc), qmax, lm.d_model, dtype=lm.dtype, device=dev)
    idx = torch.tensor(list(label_ids), device=dev)
    pad = lm.tokenizer.pad_token_id or 0
    logprobs = torch.empty(len(enc), len(idx))
    lengths = [len(q) for q in enc.queries]
    for rows in _chunks(list(range(len(enc))), lengths, batch_size, _needs_equal_lengths(lm, enc)):
        seqs = [enc.queries[i] for i in rows]
        ids, mask, pos = _pad_left(seqs, pad, len(enc.prefix))
        width = ids.shape[1]
        full_mask = torch.cat([torch.ones(len(rows), len(enc.prefix), dtype=torch.long), mask], 1)
        with capture(lm) as z:
            o = lm.model(input_ids=ids.to(dev), attention_mask=full_mask.to(dev), position_ids=pos.to(dev),
                         use_cache=True, **lm.with_cache(_cache_for_batch(lm, kv, len(rows))),
                         output_hidden_states=True, logits_to_keep=1)
        logprobs[rows] = torch.log_softmax(o.logits[:, -1].float(), -1)[:, idx].cpu()
        sel = torch.tensor(rows, device=dev)
        for l in range(L):
            query_hidden[l, sel, qmax - width:] = o.hidden_states[l]
            zl = z[l].reshape(len(rows), width, H, dh).float()[mask.bool().to(dev)]  # (n_real, H, dh)
            s1[l] += zl.sum(0)
            s2[l] += (zl ** 2).sum((0, 2))
            mx[l] = torch.maximum(mx[l], zl.abs().amax((0, 2)))
        count += int(mask.sum())
    mean = s1 / count
    var = s2 / (count * dh) - (s1.sum(-1) / (count * dh)) ** 2  # pooled over positions and dims
    return CleanRun(enc, list(label_ids), kv, prefix_hidden, query_hidden, logprobs,
                    mx.cpu(), var.clamp_min(0).sqrt().cpu(), mean.cpu())


def _pad_to(x: Tensor, width: int, value: int) -> Tensor:
    """Left-pad a ``(B, S)`` tensor to ``(B, width)``."""
    return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)


@contextmanager
def _skip_layers_before(lm: LoadedModel, layer: int, hidden: Tensor) -> Iterator[None]:
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


def _edit_fn(edits: Sequence, rows_edit: Tensor, samples: Sequence, widths: Tensor, n_pos: int,
             prefix_len: int, in_prefix: bool, clean: CleanRun, d_head: int) -> Callable:
    """Per-row head edit for one layer: row ``b`` applies ``edits[rows_edit[b]]``.

    ``widths[b]`` real tokens sit at the right end of the ``n_pos`` positions (left padding). In the
    prefix pass every row is the whole prefix (``in_prefix``) and noise uses the ``"prefix"`` draw.
    """
    from headlab.interventions import head_noise

    def fn(z: Tensor) -> None:
        for b in range(z.shape[0]):
            e = edits[int(rows_edit[b])]
            n = int(widths[b])
            sl = slice(n_pos - n, n_pos)
            if e.kind == "noise":
                key = "prefix" if in_prefix else samples[b]
                eps = head_noise(e.seed, e.layer, e.head, key, n, d_head)
                z[b, sl, e.head] += (e.scale * eps).to(z.dtype).to(z.device)
            elif e.kind == "zero":
                z[b, sl, e.head] = 0.0
            elif e.kind == "mean":
                z[b, sl, e.head] = clean.head_mean[e.layer, e.head].to(z.dtype).to(z.device)
            else:
                raise ValueError(f"Unknown edit kind {e.kind!r}; use 'noise', 'zero' or 'mean'.")

    return fn


# --------------------------------------------------------------------------------------------------
# Shared-prefix attention: query rows attend to a prefix cache they share, without copying it per row
# --------------------------------------------------------------------------------------------------
#: Name under which :func:`_prefix_attention` is registered with transformers' AttentionInterface.
PREFIX_ATTENTION = "headlab_shared_prefix"


@dataclass
class _PrefixState:
    """What :func:`_prefix_attention` needs besides the query tokens' own keys and values.

    Attributes:
        kv: ``layer -> (keys, values)``, each ``(g, n_kv, P, d_head)``: ``g`` prefix caches.
        groups: ``(b,)`` index of the prefix cache each batch row attends to; rows of one cache
            must be contiguous.
        pads: ``(b,)`` left pads of each row (masked as keys).
    """

    kv: Callable[[int], tuple[Tensor, Tensor]]
    groups: Tensor
    pads: Tensor


_PREFIX_STATE: list[_PrefixState] = []  # the active state (a stack of at most one)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float | None,
            mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scores (to merge key blocks).

    ``q (..., n, d)``, ``k``/``v (..., m, d)``, boolean ``mask`` broadcastable to ``(..., n, m)``
    (True: may attend). Returns ``out (..., n, d)`` and ``lse (..., n)``, computed in float32 for
    half-precision inputs. Uses PyTorch's fused CPU flash kernel when it applies (no soft-cap,
    float32 on the CPU, 4-d tensors: it never materialises the scores), else plain tensor code.
    """
    if not softcap and q.device.type == "cpu" and q.dtype == torch.float32 and q.dim() == 4:
        additive = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=additive, scale=scale)
        return out, lse
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = torch.matmul(q, k.transpose(-1, -2)).to(work).mul_(scale)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = scores.sub_(lse[..., None]).exp_()
    return torch.matmul(probs.to(v.dtype), v).to(work), lse


def _prefix_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, **kwargs: object) -> tuple[Tensor, None]:
    """Attention of the query tokens over [shared prefix cache ; their own keys], exactly.

    For each prefix cache, the queries of all rows that use it (a contiguous run of rows) attend to
    it in one call, as one long query sequence per key/value head: the prefix keys are never
    expanded or copied per row or per GQA group. The own-key part is causal with left pads masked.
    The two parts are merged through their log-sum-exps, which is exactly the softmax over their
    concatenation. Called by transformers in place of sdpa/eager (see :data:`PREFIX_ATTENTION`).

    Shapes: ``query (b, H, q, d)``, ``key``/``value (b, n_kv, q, d)``; returns ``(b, q, H, d)``.
    """
    state = _PREFIX_STATE[-1]
    b, H, q, d = query.shape
    n_kv = key.shape[1]
    rep = H // n_kv
    scale = d ** -0.5 if scaling is None else scaling
    pk, pv = state.kv(module.layer_idx)  # (g, n_kv, P, d)
    # (b, n_kv, rep*q, d): GQA group-major rows; row r*q + i is query position i of head kv*rep + r
    qg = query.reshape(b, n_kv, rep * q, d)
    pos = torch.arange(q, device=query.device)
    # causal over real keys; a pad query sees itself only, so that no row is empty (its output is
    # never read, but a NaN there would reach real rows as 0 * NaN in the next block)
    causal = pos[None, :] <= pos[:, None]
    allowed = (causal[None] & (pos[None, None, :] >= state.pads.to(query.device)[:, None, None])) | torch.eye(
        q, dtype=torch.bool, device=query.device)[None]
    allowed = allowed[:, None, None].expand(b, 1, rep, q, q).reshape(b, 1, rep * q, q)
    own_out, own_lse = _attend(qg, key, value, scale, softcap, allowed)  # (b, n_kv, rq, d), (b, n_kv, rq)
    # runs of rows sharing a prefix cache (one shared cache, g == 1, serves every row)
    if pk.shape[0] == 1:
        runs = [(0, 0, b)]
    else:
        ids, counts = torch.unique_consecutive(state.groups, return_counts=True)
        ends = torch.cumsum(counts, 0).tolist()
        runs = [(int(g), e - int(c), e) for g, c, e in zip(ids, counts, ends)]
    out = torch.empty(b, n_kv, rep * q, d, dtype=query.dtype, device=query.device)
    for g, lo, hi in runs:
        nb = hi - lo
        qr = qg[lo:hi].transpose(0, 1).reshape(1, n_kv, nb * rep * q, d)  # every row's queries in a line
        pre_out, pre_lse = _attend(qr, pk[g:g + 1], pv[g:g + 1], scale, softcap)
        pre_out = pre_out.view(n_kv, nb, rep * q, d).transpose(0, 1)
        pre_lse = pre_lse.view(n_kv, nb, rep * q).transpose(0, 1)
        lse = torch.logaddexp(pre_lse, own_lse[lo:hi])
        merged = pre_out * (pre_lse - lse).exp()[..., None] + own_out[lo:hi] * (own_lse[lo:hi] - lse).exp()[..., None]
        out[lo:hi] = merged.to(query.dtype)
    return out.view(b, H, q, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(PREFIX_ATTENTION, _prefix_attention)


@contextmanager
def _shared_prefix_attention(lm: LoadedModel, state: _PrefixState) -> Iterator[None]:
    """Run the model with :func:`_prefix_attention` and ``state``; the old implementation comes back."""
    old = lm.model.config._attn_implementation
    _PREFIX_STATE.append(state)
    try:
        lm.model.set_attn_implementation(PREFIX_ATTENTION)
        yield
    finally:
        _PREFIX_STATE.pop()
        lm.model.set_attn_implementation(old)


def _prefix_attention_applies(lm: LoadedModel) -> bool:
    """The shared-prefix path needs every layer to see every key (no sliding window)."""
    return lm.sliding_window is None


def _prefix_kv_at(clean_kv: list[tuple[Tensor, Tensor]], edited_kv: list[tuple[Tensor, Tensor]], layer: int,
                  j: int) -> tuple[Tensor, Tensor]:
    """Prefix keys/values block ``j`` attends to when heads of ``layer`` are edited."""
    return clean_kv[j] if j <= layer else edited_kv[j]


def _edited_cache(lm: LoadedModel, clean: CleanRun, edited_kv: list[tuple[Tensor, Tensor]], layer: int,
                  r_edit: Tensor) -> DynamicCache:
    """Per-row prefix cache: clean keys/values up to block ``layer``, row ``i``'s edited ones after."""
    b = len(r_edit)
    data = []
    for j, (k, v) in enumerate(clean.kv):
        if j <= layer:
            data.append((k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)))
        else:
            k, v = edited_kv[j]
            sel = r_edit.to(k.device)
            data.append((k.index_select(0, sel), v.index_select(0, sel)))
    return DynamicCache(ddp_cache_data=data, config=lm.model.config)


@torch.inference_mode()
def sweep_heads(
    lm: LoadedModel,
    clean: CleanRun,
    edits: Sequence,
    batch_size: int = 64,
    edits_per_group: int = 16,
    progress: Callable[[int], None] | None = None,
    shared_prefix_attention: bool | None = None,
) -> Float[Tensor, "n_edits N n_labels"]:
    """Label log-probabilities of every prompt under every head edit, computing only what changes.

    For an edit of a head in layer ``l``: blocks before ``l`` are not run (their output is the cached
    clean input of block ``l``); the shared prefix is run once per edit from block ``l`` on (its keys
    and values change in later blocks); each prompt's query tokens are run from block ``l`` on
    against that edited prefix cache. Rows of one forward pass may carry different edits. The result
    equals running every (edit, prompt) pair as a plain full forward with the edit hooked in
    (:func:`headlab.interventions.noise_heads` / ``ablate_heads``), up to float rounding.

    Args:
        lm: the model.
        clean: from :func:`clean_run` on the same prompts.
        edits: :class:`headlab.interventions.HeadEdit` list (any mix of layers, heads, kinds).
        batch_size: (edit, prompt) rows per forward pass.
        edits_per_group: edits whose edited prefix caches are held in memory at once.
        progress: called with the number of (edit, prompt) rows finished after each batch.
        shared_prefix_attention: attend to the prefix caches without copying them per row (see
            :func:`_prefix_attention`; about twice as fast on CPU). ``None``: whenever the model has no
            sliding window; ``False``: transformers' own attention over a per-batch cache (the
            reference path, also used for sliding-window models).

    Returns:
        ``(n_edits, n_prompts, n_labels)`` float32 on the CPU, in the order of ``edits``.
    """
    from headlab.interventions import edit_heads

    if edits_per_group <= 0:
        raise ValueError(f"edits_per_group={edits_per_group} must be positive.")
    for e in edits:  # fail before any hook is set, naming the bad edit
        if e.kind not in ("noise", "zero", "mean"):
            raise ValueError(f"Unknown edit kind {e.kind!r} in {e}; use 'noise', 'zero' or 'mean'.")
        if not 0 <= e.layer < lm.n_layers:
            raise ValueError(f"layer {e.layer} of {e} out of range 0..{lm.n_layers - 1}.")
        if not 0 <= e.head < lm.n_heads:
            raise ValueError(f"head {e.head} of {e} out of range 0..{lm.n_heads - 1}.")
    enc, P, dev = clean.enc, clean.prefix_len, lm.device
    N, L, dh = len(enc), lm.n_layers, lm.head_dim
    out = torch.empty(len(edits), N, len(clean.label_ids))
    idx = torch.tensor(clean.label_ids, device=dev)
    lengths = torch.tensor([len(q) for q in enc.queries])
    qmax = clean.query_hidden.shape[2]
    pad = lm.tokenizer.pad_token_id or 0
    equal_lengths = _needs_equal_lengths(lm, enc)
    shared_attention = _prefix_attention_applies(lm) if shared_prefix_attention is None else shared_prefix_attention
    if shared_attention and not _prefix_attention_applies(lm):
        raise ValueError(f"shared_prefix_attention=True needs a model without a sliding window "
                         f"(this one has sliding_window={lm.sliding_window}).")
    order = sorted(range(len(edits)), key=lambda i: edits[i].layer)
    groups = [order[i:i + edits_per_group] for i in range(0, len(order), edits_per_group)]
    for group in groups:
        for layer in sorted({edits[i].layer for i in group}):
            members = [i for i in group if edits[i].layer == layer]
            g_edits = [edits[i] for i in members]
            # 1) the prefix under each edit, from block `layer` on -> edited keys/values of later blocks
            g = len(members)
            hidden = clean.prefix_hidden[layer][None].expand(g, -1, -1)
            cache = DynamicCache(config=lm.model.config)
            fn = _edit_fn(g_edits, torch.arange(g), None, torch.full((g,), P), P, P, True, clean, dh)
            with _skip_layers_before(lm, layer, hidden), edit_heads(lm, {layer: fn}):
                pos = torch.arange(P)[None].expand(g, -1)
                lm.model(input_ids=enc.prefix[None].expand(g, -1).to(dev), position_ids=pos.to(dev),
                         use_cache=True, logits_to_keep=1, **lm.with_cache(cache))
            edited_kv = [(cache.layers[j].keys, cache.layers[j].values) for j in range(L)]
            # 2) (edit, prompt) rows in batches
            # Rows sorted by query length: a batch then holds one prompt under many edits (or prompts
            # of similar length), so left padding wastes almost nothing.
            rows = sorted(((m, p) for m in range(g) for p in range(N)), key=lambda r: (int(lengths[r[1]]), r[1], r[0]))
            row_lengths = [int(lengths[p]) for _, p in rows]
            for chunk in _chunks(rows, row_lengths, batch_size, equal_lengths):
                chunk = sorted(chunk, key=lambda r: r[0])  # each edit's rows contiguous (one prefix cache)
                b = len(chunk)
                r_edit = torch.tensor([m for m, _ in chunk])
                r_prompt = torch.tensor([p for _, p in chunk])
                width = int(lengths[r_prompt].max())
                seqs = [enc.queries[p] for p in r_prompt.tolist()]
                ids, mask, pos = _pad_left(seqs, pad, P)
                hid = clean.query_hidden[layer][r_prompt.to(dev), qmax - width:]
                fn = _edit_fn(g_edits, r_edit, r_prompt.tolist(), lengths[r_prompt], width, P, False, clean, dh)
                with _skip_layers_before(lm, layer, hid), edit_heads(lm, {layer: fn}), ExitStack() as stack:
                    # blocks up to `layer` attend to the clean prefix, later blocks to the row's edited one
                    if shared_attention:
                        kv_of = partial(_prefix_kv_at, clean.kv, edited_kv, layer)
                        stack.enter_context(_shared_prefix_attention(lm, _PrefixState(kv_of, r_edit, width - lengths[r_prompt])))
                        kwargs = {"attention_mask": mask, "use_cache": False}
                    else:
                        kwargs = {"attention_mask": torch.cat([torch.ones(b, P, dtype=torch.long), mask], 1),
                                  **lm.with_cache(_edited_cache(lm, clean, edited_kv, layer, r_edit)), "use_cache": True}
                    kwargs["attention_mask"] = kwargs["attention_mask"].to(dev)
                    o = lm.model(input_ids=ids.to(dev), position_ids=pos.to(dev), logits_to_keep=1, **kwargs)
                lp = torch.log_softmax(o.logits[:, -1].float(), -1)[:, idx].cpu()
                for (m, p), row in zip(chunk, lp):
                    out[members[m], p] = row
                if progress is not None:
                    progress(b)
    return out


# --------------------------------------------------------------------------------------------------
# Logit lens: decode the residual stream of every layer through the final norm and unembedding
# --------------------------------------------------------------------------------------------------
def _unembed_tail(lm: LoadedModel, x: Tensor) -> Tensor:
    """Modules after the final norm (OPT's ``project_out``), the unembedding and any logit soft-cap."""
    from headlab.models import get_module

    for path in lm.adapter.post_final:
        mod = get_module(lm.model, path)
        if mod is not None:
            x = mod(x)
    logits = lm.module("unembed")(x)
    cap = getattr(lm.config, lm.adapter.logit_softcap_attr, None) if lm.adapter.logit_softcap_attr else None
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def decode_residual(lm: LoadedModel, hidden: Float[Tensor, "*b d_model"]) -> Float[Tensor, "*b vocab"]:
    """Logits that the model would output if ``hidden`` were its last residual stream.

    Applies the final norm, any module between it and the unembedding (adapter ``post_final``), the
    unembedding and the final logit soft-cap (Gemma 2), all read through the adapter. Decoding the
    output of the last block reproduces the model's logits.
    """
    norm = lm.module("final_norm")
    x = hidden.to(lm.dtype)
    if norm is not None:
        x = norm(x)
    return _unembed_tail(lm, x)


def _norm_gain(norm: torch.nn.Module, d: int) -> Tensor:
    """Per-dimension gain of a final norm, measured by applying it (no knowledge of its class).

    On ``s`` = alternating +-1 (mean 0, mean square 1) every LayerNorm/RMSNorm variant computes
    ``gain * s + bias``, so ``gain = (norm(s) - norm(0)) * s`` (up to its ``eps``, ~1e-6 relative).
    This covers RMSNorms that scale by ``weight`` and those that scale by ``1 + weight`` alike.
    """
    if d % 2:
        raise ValueError(f"d_model={d} is odd; the norm gain probe needs an even width.")
    p = next(norm.parameters(), None)
    dev, dt = (p.device, p.dtype) if p is not None else ("cpu", torch.float32)
    s = torch.ones(d, device=dev, dtype=dt)
    s[1::2] = -1.0
    return (norm(s[None]) - norm(torch.zeros_like(s)[None]))[0] * s


def direction_logits(lm: LoadedModel, direction: Float[Tensor, "*b d_model"]) -> Float[Tensor, "*b vocab"]:
    """Vocabulary logits a residual-stream *direction* adds, through the final norm's linear part.

    The final norm divides by a per-token scale that depends on the whole residual stream; what a
    direction (e.g. a neuron's output weights) contributes is read off with that scale left out:
    the direction is centred (LayerNorm only), multiplied by the norm's gain, then mapped by the
    weights of any ``post_final`` module and of the unembedding. Biases and the final soft-cap are
    left out: they do not depend on the direction.
    """
    from headlab.models import get_module

    norm = lm.module("final_norm")
    x = direction.to(lm.device, lm.dtype)
    if norm is not None:
        if isinstance(norm, torch.nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
        x = x * _norm_gain(norm, x.shape[-1])
    for path in lm.adapter.post_final:
        mod = get_module(lm.model, path)
        if mod is not None:
            x = torch.nn.functional.linear(x, mod.weight)  # nn.Linear in every architecture
    return torch.nn.functional.linear(x, lm.module("unembed").weight)  # lm_head: nn.Linear everywhere


@torch.inference_mode()
def lens_logits(lm: LoadedModel, ids: Int[Tensor, "b s"], layers: Sequence[int] | None = None,
                positions: Sequence[int] | None = None) -> Float[Tensor, "L b p vocab"]:
    """Logit lens over a (small) unpadded batch: decoded residual stream after each listed block.

    Args:
        ids: token rows of equal length (no padding).
        layers: blocks to read (default all); row ``i`` of the result is ``layers[i]``.
        positions: positions to decode (default all).

    Returns:
        ``(n_layers_read, b, n_positions, vocab)`` float32 logits on the CPU.
    """
    from headlab.interventions import capture_residual

    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    with capture_residual(lm, layers) as res:
        lm.model(input_ids=ids.to(lm.device), logits_to_keep=1)
    pos = slice(None) if positions is None else torch.as_tensor(list(positions), device=lm.device)
    return torch.stack([decode_residual(lm, res[layer][:, pos]).float().cpu() for layer in layers])


@torch.inference_mode()
def lens_label_scores(
    lm: LoadedModel,
    enc: EncodedPrompts,
    label_ids: Sequence[int],
    batch_size: int = 16,
) -> tuple[Float[Tensor, "L n n_labels"], Int[Tensor, "L n n_labels"]]:
    """Logit lens at the last token of few-shot prompts: label log-probabilities and ranks per layer.

    The shared prefix is run once (as in :func:`label_logprobs`); the residual stream after every
    block at each prompt's last token is decoded over the full vocabulary.

    Returns:
        ``(logprobs, ranks)``, each ``(n_layers, n_prompts, n_labels)`` on the CPU: the log-softmax of
        each label token and its rank among all vocabulary tokens (0 = the top token; the number of
        tokens with a strictly larger logit). At the last layer ``logprobs`` equals
        :func:`label_logprobs` up to float rounding.
    """
    from headlab.interventions import capture_residual

    kv = prefix_kv(lm, enc.prefix) if len(enc.prefix) else None
    L, n = lm.n_layers, len(enc)
    idx = torch.tensor(list(label_ids), device=lm.device)
    logprobs = torch.empty(L, n, len(idx))
    ranks = torch.empty(L, n, len(idx), dtype=torch.long)
    lengths = [len(q) for q in enc.queries]
    equal = kv is not None and _needs_equal_lengths(lm, enc)
    for rows in _chunks(list(range(n)), lengths, batch_size, equal):
        with capture_residual(lm) as res:
            forward_last(lm, enc, rows, kv)
        for layer in range(L):
            logits = decode_residual(lm, res[layer][:, -1]).float()  # (b, V): left padding, last = real
            lab = logits[:, idx]  # (b, n_labels)
            logprobs[layer, rows] = (lab - torch.logsumexp(logits, -1, keepdim=True)).cpu()
            ranks[layer, rows] = (logits[:, None, :] > lab[:, :, None]).sum(-1).cpu()
    return logprobs, ranks


# Perplexity under many weight edits: the clean pass is kept, an edit in layer l recomputes from l on
# --------------------------------------------------------------------------------------------------
@dataclass
class TextWindows:
    """A token stream cut into the windows of :func:`token_nll`, with each block's clean input.

    Attributes:
        ids: ``(W, C)`` window token ids, right-padded with 0 where a window is shorter.
        mask: ``(W, C)`` 1 at real tokens.
        first: ``(W,)`` first scored position of each window, relative to the window start.
        hidden: ``(L, W, C, d_model)`` input of every block in the clean model (None if not kept).
        batch_size: windows per forward pass the hidden states were computed with (reused, so that a
            recomputation from layer 0 is bit-identical to the clean pass).
    """

    ids: Int[Tensor, "W C"]
    mask: Int[Tensor, "W C"]
    first: Int[Tensor, " W"]
    hidden: Float[Tensor, "L W C d"] | None
    batch_size: int

    @property
    def n_scored(self) -> int:
        return int(sum(int(m.sum()) - int(f) for m, f in zip(self.mask, self.first)))

    def head(self, n_windows: int) -> TextWindows:
        """The first ``n_windows`` windows (a smaller token budget scored in exactly the same way)."""
        if not 1 <= n_windows <= len(self.ids):
            raise ValueError(f"n_windows={n_windows} must be in 1..{len(self.ids)}.")
        hid = None if self.hidden is None else self.hidden[:, :n_windows]
        return TextWindows(self.ids[:n_windows], self.mask[:n_windows], self.first[:n_windows], hid,
                           self.batch_size)


@torch.inference_mode()
def text_windows(lm: LoadedModel, ids: Int[Tensor, " N"], context: int = 512, stride: int = 256,
                 batch_size: int = 8, keep_hidden: bool = True) -> TextWindows:
    """Cut ``ids`` into :func:`token_nll`'s windows and (``keep_hidden``) run the clean model once,
    keeping the input of every block, so that :func:`windows_nll` can start at any layer."""
    if context < 2 or not 0 < stride <= context:
        raise ValueError(f"need context >= 2 and 0 < stride <= context; "
                         f"got context={context}, stride={stride}.")
    if len(ids) < 2:
        raise ValueError("Need at least 2 tokens to score.")
    spans = _nll_spans(len(ids), context, stride)
    width = max(e - s for _, s, e, _ in spans)
    x = torch.stack([torch.nn.functional.pad(ids[s:e], (0, width - (e - s))) for _, s, e, _ in spans])
    mask = torch.stack([(torch.arange(width) < e - s).long() for _, s, e, _ in spans])
    first = torch.tensor([f - s for _, s, _, f in spans])
    hidden = None
    if keep_hidden:
        hidden = torch.empty(lm.n_layers, len(spans), width, lm.d_model, dtype=lm.dtype, device=lm.device)
        for rows in _batches(len(spans), batch_size):
            out = lm.model(input_ids=x[rows].to(lm.device), attention_mask=mask[rows].to(lm.device),
                           output_hidden_states=True, logits_to_keep=1)
            for layer in range(lm.n_layers):
                hidden[layer, rows.start:rows.stop] = out.hidden_states[layer]
    return TextWindows(x, mask, first, hidden, batch_size)


@torch.inference_mode()
def windows_nll(lm: LoadedModel, windows: TextWindows, from_layer: int = 0,
                batch_size: int | None = None) -> tuple[Float[Tensor, " M"], Int[Tensor, " M"]]:
    """Per-token NLL of the windows, as :func:`token_nll` gives it, computing blocks ``from_layer`` on.

    Blocks before ``from_layer`` are not run: their output is the clean input of block ``from_layer``
    kept by :func:`text_windows`. Use it under an edit that changes nothing before ``from_layer``
    (a weight edit in layer ``from_layer`` or later); the result then equals a full forward.

    Returns:
        ``(nll, window)`` like :func:`token_nll`.
    """
    if not 0 <= from_layer < lm.n_layers:
        raise ValueError(f"from_layer={from_layer} out of range 0..{lm.n_layers - 1}.")
    if from_layer > 0 and windows.hidden is None:
        raise ValueError("from_layer > 0 needs the clean hidden states: text_windows(..., keep_hidden=True).")
    batch_size = batch_size or windows.batch_size
    nll, win = [], []
    for rows in _batches(len(windows.ids), batch_size):
        x = windows.ids[rows].to(lm.device)
        mask = windows.mask[rows]
        ctx = (_skip_layers_before(lm, from_layer, windows.hidden[from_layer, rows.start:rows.stop])
               if from_layer > 0 else nullcontext())
        with ctx:
            logits = lm.model(input_ids=x, attention_mask=mask.to(lm.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_nll = -logp.gather(-1, x[:, 1:, None])[..., 0].cpu()  # (b, width-1): nll of token t+1
        for j, w in enumerate(rows):
            first, length = int(windows.first[w]), int(mask[j].sum())
            sel = tok_nll[j, first - 1:length - 1]
            nll.append(sel)
            win.append(torch.full((len(sel),), w, dtype=torch.long))
    return torch.cat(nll), torch.cat(win)
