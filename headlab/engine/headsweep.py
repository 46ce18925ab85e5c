"""The exact head-sweep engine: many (head edit, prompt) pairs, computing only what an edit can change.

:func:`clean_run` runs the few-shot prompts once and keeps the shared prefix's keys/values, the input
of every block for prefix and queries, the clean label log-probabilities and per-head output
statistics (the scales noise levels are relative to). :func:`sweep_heads` then scores every prompt
under every :class:`~headlab.edits.HeadEdit`: blocks before the edited layer are skipped (their clean
output is kept), the prefix is recomputed once per edit from its layer on, and each prompt's query
tokens run from that layer on against the edited prefix cache. The result equals a plain batch-1
forward with the edit hooked in (tested for every architecture).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import DynamicCache

from headlab.edits import HeadEdit, NoiseKeys, noise_keys
from headlab.engine.prefix_attention import (
    PrefixState,
    prefix_attention_unsupported,
    prefix_kv_at,
    use_prefix_attention,
)
from headlab.engine.recompute import BlockInputs, keep_block_inputs, skip_layers_before
from headlab.engine.scoring import EncodedPrompts, cache_for_batch, chunks, needs_equal_lengths, pad_left
from headlab.interventions import HeadFn, capture, edit_heads
from headlab.models import LoadedModel

__all__ = ["CleanRun", "clean_run", "sweep_heads"]


@dataclass
class CleanRun:
    """Everything a head sweep reuses from one clean pass over the prompts.

    Attributes:
        enc: the prompts.
        label_ids: token ids of the labels.
        kv: clean prefix keys/values per layer, ``(1, n_kv, P, d_head)`` each.
        prefix_inputs: input of every block but the first for the prefix, ``(1, P, d_model)`` per layer.
        query_inputs: input of every block but the first for the queries, left-padded to the longest
            query, ``(N, Q, d_model)`` per layer.
        logprobs: clean label log-probabilities ``(N, n_labels)``.
        head_max_abs, head_std: ``(L, n_heads)`` max |z| and std of each head's output ``z`` over the
            prefix positions and all real query positions of all prompts (the units of the sweep modes
            ``fraction_of_max`` / ``fraction_of_std``, see :meth:`headlab.edits.Setting.edit`).
        head_mean: ``(L, n_heads, d_head)`` mean head output over the same positions (mean ablation).
    """

    enc: EncodedPrompts
    label_ids: list[int]
    kv: list[tuple[Tensor, Tensor]]
    prefix_inputs: BlockInputs
    query_inputs: BlockInputs
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
    if len(enc.prefix) == 0:
        raise ValueError("Head sweeps need a non-empty shared prefix (at least a BOS or instruction token).")
    L, H, dh = lm.n_layers, lm.n_heads, lm.head_dim
    dev = lm.device
    with capture(lm) as z_pre, keep_block_inputs(lm, range(L)) as prefix_inputs:
        out = lm.model(enc.prefix[None].to(dev), use_cache=True)
    kv = [(layer.keys, layer.values) for layer in lm.cache_of(out).layers]
    # running sums for per-head statistics over prefix + real query positions
    zs = {l: z_pre[l][0].reshape(-1, H, dh).float() for l in range(L)}  # (P, H, dh)
    count = len(enc.prefix)
    s1 = torch.stack([zs[l].sum(0) for l in range(L)])  # (L, H, dh)
    s2 = torch.stack([(zs[l] ** 2).sum((0, 2)) for l in range(L)])  # (L, H)
    mx = torch.stack([zs[l].abs().amax((0, 2)) for l in range(L)])  # (L, H)
    qmax = max(len(q) for q in enc.queries)
    query_inputs = {l: torch.zeros(len(enc), qmax, lm.d_model, dtype=lm.dtype, device=dev) for l in range(1, L)}
    idx = torch.tensor(list(label_ids), device=dev)
    pad = lm.tokenizer.pad_token_id or 0
    logprobs = torch.empty(len(enc), len(idx))
    lengths = [len(q) for q in enc.queries]
    for rows in chunks(list(range(len(enc))), lengths, batch_size, needs_equal_lengths(lm, enc)):
        seqs = [enc.queries[i] for i in rows]
        ids, mask, pos = pad_left(seqs, pad, len(enc.prefix))
        width = ids.shape[1]
        full_mask = torch.cat([torch.ones(len(rows), len(enc.prefix), dtype=torch.long), mask], 1)
        with capture(lm) as z, keep_block_inputs(lm, range(L)) as kept:
            o = lm.model(input_ids=ids.to(dev), attention_mask=full_mask.to(dev), position_ids=pos.to(dev),
                         use_cache=True, **lm.with_cache(cache_for_batch(lm, kv, len(rows))), logits_to_keep=1)
        logprobs[rows] = torch.log_softmax(o.logits[:, -1].float(), -1)[:, idx].cpu()
        sel = torch.tensor(rows, device=dev)
        for l in range(L):
            if l > 0:
                query_inputs[l][sel, qmax - width:] = kept[l]
            zl = z[l].reshape(len(rows), width, H, dh).float()[mask.bool().to(dev)]  # (n_real, H, dh)
            s1[l] += zl.sum(0)
            s2[l] += (zl ** 2).sum((0, 2))
            mx[l] = torch.maximum(mx[l], zl.abs().amax((0, 2)))
        count += int(mask.sum())
    mean = s1 / count
    var = s2 / (count * dh) - (s1.sum(-1) / (count * dh)) ** 2  # pooled over positions and dims
    return CleanRun(enc, list(label_ids), kv, BlockInputs(prefix_inputs), BlockInputs(query_inputs), logprobs,
                    mx.cpu(), var.clamp_min(0).sqrt().cpu(), mean.cpu())


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
    edits: Sequence[HeadEdit],
    batch_size: int = 64,
    edits_per_group: int = 16,
    progress: Callable[[int], None] | None = None,
    shared_prefix_attention: bool | None = None,
    prompts: Sequence[Sequence[int] | None] | None = None,
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
        edits: :class:`headlab.edits.HeadEdit` list (any mix of layers, heads, kinds), applied by
            :meth:`~headlab.edits.HeadEdit.apply`; checked against the model before any hook is set.
        batch_size: (edit, prompt) rows per forward pass.
        edits_per_group: edits whose edited prefix caches are held in memory at once.
        progress: called with the number of (edit, prompt) rows finished after each batch.
        shared_prefix_attention: attend to the prefix caches without copying them per row (see
            :func:`~headlab.engine.prefix_attention.prefix_attention`; about twice as fast on CPU, and
            prompts of different lengths share a batch also under sliding windows). ``None``: whenever
            the architecture's attention goes through transformers' AttentionInterface (all but
            GPT-Neo, BLOOM and Falcon, see :func:`prefix_attention_unsupported`); ``False``:
            transformers' own attention over a per-batch cache (the reference path).
        prompts: per edit, the indices of the prompts it runs on (``None``: all; default: every edit
            on every prompt). An edit's noise is the same whichever prompts it runs on (the query draw
            is keyed by the prompt's index in ``clean``), so a design can give groups of prompts their
            own prefix draw (one edit per group, differing in seed) without a prefix pass per prompt.

    Returns:
        ``(n_edits, n_prompts, n_labels)`` float32 on the CPU, in the order of ``edits``; NaN where an
        edit did not run on a prompt.
    """
    if edits_per_group <= 0:
        raise ValueError(f"edits_per_group={edits_per_group} must be positive.")
    for e in edits:  # fail before any hook is set, naming the bad edit
        e.check(lm.n_layers, lm.n_heads)
    enc, P, dev = clean.enc, clean.prefix_len, lm.device
    N, L = len(enc), lm.n_layers
    if prompts is not None and len(prompts) != len(edits):
        raise ValueError(f"prompts gives {len(prompts)} prompt lists for {len(edits)} edits; give one per edit.")
    runs_on = [list(range(N)) if prompts is None or prompts[i] is None else [int(p) for p in prompts[i]]
               for i in range(len(edits))]
    bad = sorted({p for ps in runs_on for p in ps if not 0 <= p < N})
    if bad:
        raise ValueError(f"prompt index(es) {bad[:5]} out of range 0..{N - 1} in `prompts`.")
    out = torch.full((len(edits), N, len(clean.label_ids)), float("nan"))
    idx = torch.tensor(clean.label_ids, device=dev)
    lengths = torch.tensor([len(q) for q in enc.queries])
    qmax = max(len(q) for q in enc.queries)
    pad = lm.tokenizer.pad_token_id or 0
    unsupported = prefix_attention_unsupported(lm)
    shared_attention = unsupported is None if shared_prefix_attention is None else shared_prefix_attention
    if shared_attention and unsupported is not None:
        raise ValueError(f"shared_prefix_attention=True: {unsupported}.")
    # transformers' masks count windows in cache indices (pads between prefix and query would shift
    # them); the shared-prefix attention counts real positions, so any lengths may share a batch
    equal_lengths = needs_equal_lengths(lm, enc) and not shared_attention

    def edit_rows(rows: list[tuple[HeadEdit, NoiseKeys, int]], width: int, means: Tensor) -> HeadFn:
        """Hook: batch row ``b`` gets ``rows[b] = (edit, noise keys, n)`` on its last ``n`` of ``width``
        positions (its real tokens; left padding before them)."""
        def fn(z: Tensor) -> None:  # (b, width, n_heads, d_head)
            for b, (e, keys, n) in enumerate(rows):
                e.apply(z[b, width - n:, e.head], keys, means)

        return fn

    order = sorted(range(len(edits)), key=lambda i: edits[i].layer)
    groups = [order[i:i + edits_per_group] for i in range(0, len(order), edits_per_group)]
    for group in groups:
        for layer in sorted({edits[i].layer for i in group}):
            members = [i for i in group if edits[i].layer == layer]
            g_edits = [edits[i] for i in members]
            # 1) the prefix under each edit, from block `layer` on -> edited keys/values of later blocks
            g = len(members)
            means = clean.head_mean[layer]  # (n_heads, d_head)
            hidden = clean.prefix_inputs.at(layer)  # (1, P, d) or None for layer 0
            hidden = None if hidden is None else hidden.expand(g, -1, -1)
            cache = DynamicCache(config=lm.model.config)
            fn = edit_rows([(e, noise_keys(None, P, 0), P) for e in g_edits], P, means)
            with skip_layers_before(lm, layer, hidden), edit_heads(lm, {layer: fn}):
                pos = torch.arange(P)[None].expand(g, -1)
                lm.model(input_ids=enc.prefix[None].expand(g, -1).to(dev), position_ids=pos.to(dev),
                         use_cache=True, logits_to_keep=1, **lm.with_cache(cache))
            edited_kv = [(cache.layers[j].keys, cache.layers[j].values) for j in range(L)]
            # 2) (edit, prompt) rows in batches
            # Rows sorted by query length: a batch then holds one prompt under many edits (or prompts
            # of similar length), so left padding wastes almost nothing.
            rows = sorted(((m, p) for m in range(g) for p in runs_on[members[m]]),
                          key=lambda r: (int(lengths[r[1]]), r[1], r[0]))
            row_lengths = [int(lengths[p]) for _, p in rows]
            for chunk in chunks(rows, row_lengths, batch_size, equal_lengths):
                chunk = sorted(chunk, key=lambda r: r[0])  # each edit's rows contiguous (one prefix cache)
                b = len(chunk)
                r_edit = torch.tensor([m for m, _ in chunk])
                r_prompt = torch.tensor([p for _, p in chunk])
                width = int(lengths[r_prompt].max())
                seqs = [enc.queries[p] for p in r_prompt.tolist()]
                ids, mask, pos = pad_left(seqs, pad, P)
                hid = clean.query_inputs.at(layer, r_prompt.to(dev), slice(qmax - width, None))  # (b, width, d)
                fn = edit_rows([(g_edits[m], noise_keys(p, 0, int(lengths[p])), int(lengths[p])) for m, p in chunk],
                               width, means)
                with skip_layers_before(lm, layer, hid), edit_heads(lm, {layer: fn}), ExitStack() as stack:
                    # blocks up to `layer` attend to the clean prefix, later blocks to the row's edited one
                    if shared_attention:
                        kv_of = partial(prefix_kv_at, clean.kv, edited_kv, layer)
                        pads = width - lengths[r_prompt]
                        stack.enter_context(use_prefix_attention(lm, PrefixState(kv_of, r_edit, pads, lm.layer_windows)))
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
