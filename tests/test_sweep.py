"""Head sweeps on tiny random models: ``engine.sweep_heads`` equals a plain forward per (edit, prompt)
with the edit hooked in, does not depend on batching, leaves the model untouched (also after an
error); ``head_noise`` is a pure function of its keys; ``shards.run_grid`` / ``head_sweep`` resume a
killed sweep to the same tables, recomputing only the missing grid points."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import ARCHS, plain_last_logprobs, sentiment_label_ids

from headlab import edits as edits_module
from headlab import engine, interventions, shards, sweeps, tasks
from headlab.edits import HeadEdit, Setting, head_noise
from headlab.engine import prefix_attention, scoring
from headlab.tasks import FORMATS, build_fewshot_prefix

SHOTS = pd.DataFrame({
    "text": ["a gripping, funny and warm film.", "the plot is dull and the acting is worse."],
    "label": ["positive", "negative"],
})
#: Query lengths 4, 20, 11, 11, 5 tokens with the test tokenizer: padding in every mixed batch, and two
#: prompts of equal length (so equal-length batching for sliding windows really forms a batch).
QUERY_TEXTS = [
    "great",
    "boring, predictable and far too long",
    "charming and clever",
    "a bird sang. awful.",
    "ok",
]
QUERY_LABELS = ["positive", "negative", "positive", "negative", "negative"]


def _prompts(lm):
    fmt = FORMATS["plain"]
    return engine.encode_prompts(lm, build_fewshot_prefix(SHOTS, fmt), [fmt.query(t) for t in QUERY_TEXTS])


def _mixed_edits():
    """Noise (two seeds on one head; two scales of one draw), zero and mean ablation, in layers 0 and 1,
    interleaved so that the engine's regrouping by layer matters."""
    return [
        HeadEdit("noise", 0, 1, 1.0, 0),
        HeadEdit("zero", 1, 1),
        HeadEdit("noise", 0, 1, 1.0, 1),
        HeadEdit("mean", 0, 2),
        HeadEdit("noise", 1, 2, 0.5, 3),
        HeadEdit("zero", 0, 3),
        HeadEdit("noise", 1, 2, 2.0, 3),
        HeadEdit("mean", 1, 0),
    ]


@torch.inference_mode()
def _reference(lm, clean, edits):
    """Every (edit, prompt) pair as a plain full forward (prefix + query, no cache, batch 1) with the
    edit hooked in by the plain interventions. Noise: the prefix positions get the ``"prefix"`` draw,
    the query positions the draw of the prompt's index -- the keys the engine uses."""
    enc, P = clean.enc, clean.prefix_len
    out = torch.empty(len(edits), len(enc), len(clean.label_ids))
    for i, e in enumerate(edits):
        for p in range(len(enc)):
            if e.kind == "noise":
                ctx = interventions.noise_heads(lm, [e], samples=[p], prefix_len=P)
            elif e.kind == "zero":
                ctx = interventions.ablate_heads(lm, {e.layer: [e.head]}, mode="zero")
            else:
                ctx = interventions.ablate_heads(lm, {e.layer: [e.head]}, mode="mean",
                                                 means={e.layer: clean.head_mean[e.layer]})
            with ctx:
                logits = lm.model(enc.full(p)[None].to(lm.device)).logits[0, -1].float()
            out[i, p] = torch.log_softmax(logits, -1)[clean.label_ids].cpu()
    return out


def _model_state(lm):
    """Hooks on every module and instance ``forward`` attributes of the blocks (to check nothing leaks)."""
    hooks = {name: (list(m._forward_pre_hooks), list(m._forward_hooks))
             for name, m in lm.model.named_modules()}
    forwards = [block.__dict__.get("forward") for block in lm.layers]
    return hooks, forwards


@pytest.fixture(scope="module")
def llama(tiny_factory):
    """A tiny llama, its prompts and clean run (shared; tests must not modify the model)."""
    lm = tiny_factory("llama")
    enc, labels = _prompts(lm), sentiment_label_ids(lm)
    return lm, enc, labels, engine.clean_run(lm, enc, labels)


# --------------------------------------------------------------------------------------------------
# Exactness against the plain reference
# --------------------------------------------------------------------------------------------------
def _check_sweep_exact(lm, shared_attention, batch_size=4, edits_per_group=3):
    """engine.sweep_heads on the mixed edits == the plain batch-1 forward with the edit hooked in."""
    enc, labels = _prompts(lm), sentiment_label_ids(lm)
    assert len({len(q) for q in enc.queries}) > 2  # batches need padding
    clean = engine.clean_run(lm, enc, labels, batch_size=3)
    torch.testing.assert_close(clean.logprobs, plain_last_logprobs(lm, enc, labels), atol=1e-4, rtol=0)
    edits = _mixed_edits()
    got = engine.sweep_heads(lm, clean, edits, batch_size=batch_size, edits_per_group=edits_per_group,
                             shared_prefix_attention=shared_attention)
    ref = _reference(lm, clean, edits)
    assert got.shape == (len(edits), len(enc), 2) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # Not trivially equal: every edit moves the result, the two noise seeds differ, and so do the
    # two scales of the same draw.
    assert torch.all((ref - clean.logprobs).abs().amax((1, 2)) > 1e-2)
    assert (ref[0] - ref[2]).abs().max() > 1e-2 and (ref[4] - ref[6]).abs().max() > 1e-2


@pytest.mark.parametrize("shared_attention", [None, False], ids=["default", "reference_attention"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sweep_heads_matches_plain_forward_with_edit(tiny_factory, arch, shared_attention):
    """Both attention paths (the shared-prefix attention, the default wherever the architecture's
    attention goes through transformers' AttentionInterface, and transformers' own attention over
    per-row caches) equal the plain forward. Gemma 3's and GPT-Neo's tiny models have a local layer
    whose window (8 keys) is far shorter than the prompts (~50 tokens)."""
    _check_sweep_exact(tiny_factory(arch), shared_attention)


@pytest.mark.parametrize("shared_attention", [None, False], ids=["default", "reference_attention"])
def test_sweep_heads_exact_on_variants(tiny_variant, shared_attention):
    """Falcon's multi-head, new-decoder (grouped) and ALiBi variants, Phi-3 / Gemma 2 / Mistral with
    windows of 6-8 keys, Llama 3 rope scaling: both attention paths equal the plain forward."""
    _check_sweep_exact(tiny_variant, shared_attention)


@pytest.mark.parametrize("shared_attention", [None, False], ids=["default", "reference_attention"])
@pytest.mark.parametrize("arch,overrides", [("gemma2", {"sliding_window": 6}), ("mistral", {"sliding_window": 6}),
                                            ("gemma3_text", {}), ("gpt_neo", {})])
def test_sweep_heads_exact_with_sliding_window_shorter_than_prompt(tiny_factory, arch, overrides, shared_attention):
    """Windows of 6-8 keys (far shorter than prefix + query), one edit per group and every prompt in one
    batch: transformers' attention must not share a forward between queries of different lengths
    (pads between the cached prefix and a query would count against its index-based window); the
    shared-prefix attention counts real positions, so it may."""
    lm = tiny_factory(arch, **overrides)
    enc = _prompts(lm)
    assert lm.sliding_window is not None and scoring.needs_equal_lengths(lm, enc)
    _check_sweep_exact(lm, shared_attention, batch_size=64, edits_per_group=16)


@pytest.mark.parametrize("arch", ARCHS)
def test_noop_edit_reproduces_clean_run(tiny_factory, arch):
    lm = tiny_factory(arch)
    enc, labels = _prompts(lm), sentiment_label_ids(lm)
    clean = engine.clean_run(lm, enc, labels, batch_size=2)
    torch.testing.assert_close(clean.logprobs, engine.label_logprobs(lm, enc, labels), atol=1e-5, rtol=0)
    torch.testing.assert_close(clean.logprobs, plain_last_logprobs(lm, enc, labels), atol=1e-4, rtol=0)
    noop = [HeadEdit("noise", 0, 0, 0.0, 5), HeadEdit("noise", 1, 3, 0.0, 6)]
    got = engine.sweep_heads(lm, clean, noop, batch_size=3)
    torch.testing.assert_close(got, clean.logprobs[None].expand(2, -1, -1), atol=1e-5, rtol=0)


def test_clean_run_head_statistics(llama):
    """head_mean / head_max_abs / head_std over the prefix positions (once) and every real query
    position, from per-prompt plain forwards. ``head_std`` is the std of all the head's values
    pooled over positions and dimensions."""
    lm, enc, labels, clean = llama
    P, H, dh = len(enc.prefix), lm.n_heads, lm.head_dim
    per_layer: dict[int, list] = {}
    with torch.inference_mode():
        for p in range(len(enc)):
            with interventions.capture(lm) as z:
                lm.model(enc.full(p)[None])
            for layer in range(lm.n_layers):
                zz = z[layer][0].reshape(-1, H, dh).float()
                per_layer.setdefault(layer, [zz[:P]]).append(zz[P:])
    for layer, parts in per_layer.items():
        values = torch.cat(parts)  # (P + sum of query lengths, H, dh)
        assert len(values) == P + sum(len(q) for q in enc.queries)
        torch.testing.assert_close(clean.head_mean[layer], values.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(clean.head_max_abs[layer], values.abs().amax((0, 2)), atol=1e-5, rtol=0)
        std = values.permute(1, 0, 2).reshape(H, -1).var(-1, unbiased=False).sqrt()
        torch.testing.assert_close(clean.head_std[layer], std, atol=1e-5, rtol=1e-4)


def test_noise_heads_adds_prefix_and_sample_draws(llama):
    """The reference's noise: ``scale * head_noise(.., "prefix")`` on the prefix positions and
    ``scale * head_noise(.., sample)`` on the rest, on that head only."""
    lm, enc, _, _ = llama
    P, H, dh = len(enc.prefix), lm.n_heads, lm.head_dim
    e = HeadEdit("noise", 0, 2, 0.7, 11)
    ids = enc.full(3)[None]
    with torch.inference_mode():
        with interventions.capture(lm, [0], site="attn_out") as before:
            lm.model(ids)
        with interventions.noise_heads(lm, [e], samples=[3], prefix_len=P), \
                interventions.capture(lm, [0], site="attn_out") as after:
            lm.model(ids)
    diff = (after[0] - before[0])[0].reshape(-1, H, dh)
    eps = torch.cat([head_noise(11, 0, 2, "prefix", P, dh),
                     head_noise(11, 0, 2, 3, len(enc.queries[3]), dh)])
    torch.testing.assert_close(diff[:, 2], 0.7 * eps, atol=1e-6, rtol=0)
    assert torch.all(diff[:, [0, 1, 3]] == 0)


# --------------------------------------------------------------------------------------------------
# Batch invariance
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("gemma2", {"sliding_window": 6}), ("gemma3_text", {}),
                                            ("gpt_neo", {})])
def test_sweep_heads_batch_invariance(tiny_factory, arch, overrides):
    lm = tiny_factory(arch, **overrides)
    enc, labels = _prompts(lm), sentiment_label_ids(lm)
    clean = engine.clean_run(lm, enc, labels, batch_size=64)
    edits = _mixed_edits()
    base = engine.sweep_heads(lm, clean, edits, batch_size=1, edits_per_group=1)
    for batch_size in (1, 3, 64):
        for per_group in (1, 16):
            rows: list[int] = []
            got = engine.sweep_heads(lm, clean, edits, batch_size=batch_size, edits_per_group=per_group,
                                     progress=rows.append)
            torch.testing.assert_close(got, base, atol=1e-5, rtol=0)
            assert sum(rows) == len(edits) * len(enc) and max(rows) <= batch_size
    # The clean pass's batching does not matter either.
    clean1 = engine.clean_run(lm, enc, labels, batch_size=1)
    for name in ("logprobs", "head_mean", "head_max_abs", "head_std"):
        torch.testing.assert_close(getattr(clean1, name), getattr(clean, name), atol=1e-5, rtol=1e-5)
    assert clean1.prefix_inputs.hidden.keys() == clean.prefix_inputs.hidden.keys() == set(range(1, lm.n_layers))
    for layer in range(1, lm.n_layers):
        torch.testing.assert_close(clean1.prefix_inputs.at(layer), clean.prefix_inputs.at(layer), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.sweep_heads(lm, clean1, edits, batch_size=64), base, atol=1e-5, rtol=0)
    # An edit's rows do not depend on the other edits swept with it, nor on their order.
    for i in (0, 3, 6):
        torch.testing.assert_close(engine.sweep_heads(lm, clean, [edits[i]], batch_size=3), base[i:i + 1],
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(engine.sweep_heads(lm, clean, edits[::-1], batch_size=7), base.flip(0),
                               atol=1e-5, rtol=0)
    # A prompt's row does not depend on the other prompts. Noise is keyed by the prompt's index and
    # mean ablation uses the set's means, so: the first three prompts (same indices) under noise and
    # zero edits, and a reordered subset under zero edits.
    keep = [i for i, e in enumerate(edits) if e.kind != "mean"]
    head3 = engine.clean_run(lm, enc.subset([0, 1, 2]), labels, batch_size=2)
    torch.testing.assert_close(engine.sweep_heads(lm, head3, [edits[i] for i in keep], batch_size=4),
                               base[keep][:, :3], atol=1e-5, rtol=0)
    zeros = [i for i, e in enumerate(edits) if e.kind == "zero"]
    pair = engine.clean_run(lm, enc.subset([4, 1]), labels)
    torch.testing.assert_close(engine.sweep_heads(lm, pair, [edits[i] for i in zeros], batch_size=64),
                               base[zeros][:, [4, 1]], atol=1e-5, rtol=0)


def test_chunks_groups_equal_lengths_in_stable_order():
    items = list("abcdefgh")
    lengths = [3, 1, 3, 2, 1, 3, 3, 2]
    assert list(scoring.chunks(items, lengths, 3, equal=False)) == [list("abc"), list("def"), list("gh")]
    chunks = list(scoring.chunks(items, lengths, 2, equal=True))
    assert sorted(x for c in chunks for x in c) == items  # each item exactly once
    for c in chunks:
        assert 1 <= len(c) <= 2 and len({lengths[items.index(x)] for x in c}) == 1
    for n in set(lengths):
        same = [x for c in chunks for x in c if lengths[items.index(x)] == n]
        assert same == [x for x, m in zip(items, lengths) if m == n]
    with pytest.raises(ValueError, match="batch_size"):
        list(scoring.chunks(items, lengths, 0, equal=True))


def test_needs_equal_lengths_only_when_window_is_shorter_than_prompt(llama):
    lm, enc, _, _ = llama
    total = len(enc.prefix) + max(len(q) for q in enc.queries)
    assert not scoring.needs_equal_lengths(lm, enc)  # no sliding window
    assert not scoring.needs_equal_lengths(SimpleNamespace(sliding_window=None), enc)
    assert not scoring.needs_equal_lengths(SimpleNamespace(sliding_window=total), enc)
    assert scoring.needs_equal_lengths(SimpleNamespace(sliding_window=total - 1), enc)


# --------------------------------------------------------------------------------------------------
# The model is left as it was
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fail_in", ["prefix", "query"])
def test_sweep_heads_restores_model_after_exception(tiny_factory, monkeypatch, fail_in):
    """An error inside the sweep's hooks (here: in the noise draw of the prefix pass or of the query
    pass of a layer-1 edit, while block 0 is short-circuited) leaves no hook and no patched forward."""
    lm = tiny_factory("llama")
    enc, labels = _prompts(lm), sentiment_label_ids(lm)
    clean = engine.clean_run(lm, enc, labels)
    edits = [HeadEdit("zero", 0, 1), HeadEdit("noise", 1, 2, 1.0, 0)]
    expected = engine.sweep_heads(lm, clean, edits)
    state = _model_state(lm)
    attn_impl = lm.model.config._attn_implementation
    with torch.inference_mode():
        logits = lm.model(enc.full(1)[None]).logits

    real = edits_module.head_noise

    def failing(seed, layer, head, sample, n, d):
        if (sample == "prefix") == (fail_in == "prefix"):
            raise RuntimeError("boom")
        return real(seed, layer, head, sample, n, d)

    monkeypatch.setattr(edits_module, "head_noise", failing)  # HeadEdit.apply draws through it
    with pytest.raises(RuntimeError, match="boom"):
        engine.sweep_heads(lm, clean, edits)
    monkeypatch.undo()
    assert _model_state(lm) == state
    assert all("forward" not in block.__dict__ for block in lm.layers)
    assert lm.model.config._attn_implementation == attn_impl  # the shared-prefix attention is undone
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(enc.full(1)[None]).logits, logits, atol=0, rtol=0)
    torch.testing.assert_close(engine.sweep_heads(lm, clean, edits), expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["bloom", "gpt_neo", "falcon"])
def test_shared_prefix_attention_refused_where_the_model_has_its_own_attention(tiny_factory, arch):
    """BLOOM (ALiBi), GPT-Neo (unscaled scores, mask-buffer windows) and Falcon compute attention in
    their own modules: asking for the shared-prefix attention fails naming the architecture and the
    way out; by default the sweep falls back to transformers' attention."""
    lm = tiny_factory(arch)
    enc, labels = _prompts(lm), sentiment_label_ids(lm)
    clean = engine.clean_run(lm, enc, labels)
    reason = prefix_attention.prefix_attention_unsupported(lm)
    assert reason and lm.adapter.name in reason and "shared_prefix_attention=False" in reason
    with pytest.raises(ValueError, match=lm.adapter.name):
        engine.sweep_heads(lm, clean, [HeadEdit("zero", 0, 0)], shared_prefix_attention=True)
    default = engine.sweep_heads(lm, clean, [HeadEdit("zero", 0, 0)])
    torch.testing.assert_close(default, engine.sweep_heads(lm, clean, [HeadEdit("zero", 0, 0)],
                                                           shared_prefix_attention=False), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3", "gptj", "olmo2"])
def test_default_sweep_runs_the_shared_prefix_attention(tiny_factory, monkeypatch, arch):
    """Where the architecture allows it, the default path really calls the shared-prefix attention
    (every layer from the edited one on, for every batch), with the model's own window per layer."""
    from transformers import AttentionInterface

    lm = tiny_factory(arch)
    enc, labels = _prompts(lm), sentiment_label_ids(lm)
    clean = engine.clean_run(lm, enc, labels)
    assert prefix_attention.prefix_attention_unsupported(lm) is None
    calls = []

    def counting(module, *args, **kwargs):
        calls.append((module.layer_idx, kwargs.get("sliding_window")))
        return prefix_attention.prefix_attention(module, *args, **kwargs)

    AttentionInterface.register(prefix_attention.PREFIX_ATTENTION, counting)
    try:
        engine.sweep_heads(lm, clean, [HeadEdit("zero", 0, 0)], batch_size=64)
    finally:
        AttentionInterface.register(prefix_attention.PREFIX_ATTENTION, prefix_attention.prefix_attention)
    assert sorted({layer for layer, _ in calls}) == list(range(lm.n_layers))
    assert all(w is None or w == lm.layer_windows[layer] for layer, w in calls)


def test_sweep_heads_bad_edit_fails_before_touching_the_model(llama):
    lm, enc, _, clean = llama
    state = _model_state(lm)
    with torch.inference_mode():
        logits = lm.model(enc.full(0)[None]).logits
    bad = [  # fields an edit cannot have fail when it is made; heads the model lacks, in the engine
        (("bogus", 1, 0), "'bogus'"),
        (("zero", 0, lm.n_heads), f"head {lm.n_heads} of HeadEdit"),
        (("noise", 1, -1, 1.0), "head=-1"),
        (("mean", lm.n_layers, 0), f"layer {lm.n_layers} of HeadEdit"),
        (("zero", -1, 0), "layer=-1"),
    ]
    for fields, named in bad:
        with pytest.raises(ValueError, match=named):
            engine.sweep_heads(lm, clean, [HeadEdit("zero", 0, 0), HeadEdit(*fields)])
        assert _model_state(lm) == state
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(enc.full(0)[None]).logits, logits, atol=0, rtol=0)


def test_sweep_heads_keeps_existing_block_forward(tiny_factory):
    """Blocks short-circuited during a sweep get back the ``forward`` they had, including an instance
    attribute such as accelerate's device hooks (``device_map=...``), which must keep working."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    lm = tiny_factory("llama")
    enc, labels = _prompts(lm), sentiment_label_ids(lm)
    clean = engine.clean_run(lm, enc, labels)
    block = lm.layers[0]
    add_hook_to_module(block, Count())
    wrapped = block.__dict__["forward"]
    edits = [HeadEdit("zero", 1, 0), HeadEdit("noise", 1, 3, 1.0, 2)]
    engine.sweep_heads(lm, clean, edits)
    assert block.__dict__.get("forward") is wrapped
    before = Count.calls
    with torch.inference_mode():
        lm.model(enc.full(0)[None])
    assert Count.calls == before + 1


def test_hooks_removed_on_exception():
    mod = torch.nn.Linear(3, 3)

    def pre(m, args):
        return None

    def post(m, args, out):
        return None

    with pytest.raises(RuntimeError, match="body"):
        with interventions.hooks(pre=[(mod, pre)], post=[(mod, post)]):
            assert len(mod._forward_pre_hooks) == 1 and len(mod._forward_hooks) == 1
            raise RuntimeError("body")
    assert not mod._forward_pre_hooks and not mod._forward_hooks

    def raising(m, args):
        raise RuntimeError("in hook")

    with pytest.raises(RuntimeError, match="in hook"):
        with interventions.hooks(pre=[(mod, raising)], post=[(mod, post)]):
            mod(torch.zeros(1, 3))
    assert not mod._forward_pre_hooks and not mod._forward_hooks
    # Registration failing half-way removes what was already registered.
    with pytest.raises(AttributeError):
        with interventions.hooks(pre=[(mod, pre)], post=[(mod, post), (object(), post)]):
            pass  # pragma: no cover
    assert not mod._forward_pre_hooks and not mod._forward_hooks


# --------------------------------------------------------------------------------------------------
# head_noise
# --------------------------------------------------------------------------------------------------
def test_head_noise_deterministic_and_keyed():
    a = head_noise(3, 1, 2, 0, 7, 8)
    assert a.shape == (7, 8) and a.dtype == torch.float32
    torch.manual_seed(123)  # the global generator plays no part
    torch.testing.assert_close(head_noise(3, 1, 2, 0, 7, 8), a, atol=0, rtol=0)
    variants = [(4, 1, 2, 0), (3, 0, 2, 0), (3, 1, 3, 0), (3, 1, 2, 1), (3, 1, 2, "prefix")]
    draws = [a] + [head_noise(*keys, 7, 8) for keys in variants]
    for i in range(len(draws)):
        for j in range(i):
            assert (draws[i] - draws[j]).abs().max() > 0.1, (i, j)
    assert head_noise(0, 0, 0, "prefix", 0, 8).shape == (0, 8)
    big = head_noise(0, 0, 0, 0, 4000, 8)
    assert abs(float(big.mean())) < 0.03 and abs(float(big.std()) - 1.0) < 0.03


# --------------------------------------------------------------------------------------------------
# Resumable sweeps
# --------------------------------------------------------------------------------------------------
class Killed(Exception):
    """Stands in for the process being killed midway."""


POINTS = [{"a": i, "b": "odd" if i % 2 else "even", "level": 0.5 * i} for i in range(6)]
BASE = {"model": "tiny", "task": {"k": 2}}


def _compute(calls: list, fail_after: int | None = None):
    def compute(point):
        if fail_after is not None and len(calls) >= fail_after:
            raise Killed()
        calls.append(point)
        i = point["a"]
        main = pd.DataFrame({"a": [i] * 3, "j": range(3), "v": [i * 10.0 + j / 7 for j in range(3)]})
        return {"main": main,
                "extra": pd.DataFrame({"a": [i], "b": [point["b"]]})}

    return compute


def test_run_grid_resumes_after_kill(tmp_path, capsys):
    full_calls: list = []
    full = shards.run_grid(POINTS, _compute(full_calls), shards.ShardStore(tmp_path / "full", BASE),
                          progress=False)
    assert full_calls == POINTS and set(full) == {"main", "extra"} and len(full["main"]) == 18
    assert full["main"]["a"].tolist() == [i for i in range(6) for _ in range(3)]  # in the order of points

    killed: list = []
    with pytest.raises(Killed):
        shards.run_grid(POINTS, _compute(killed, fail_after=2), shards.ShardStore(tmp_path / "run", BASE),
                       progress=False)
    store = shards.ShardStore(tmp_path / "run", BASE)  # a fresh process
    assert [store.done(p) for p in POINTS] == [True, True, False, False, False, False]
    rerun: list = []
    capsys.readouterr()
    resumed = shards.run_grid(POINTS, _compute(rerun), store, progress=True)
    assert "2 of 6" in capsys.readouterr().err
    assert rerun == POINTS[2:]  # only the missing points
    for name in full:
        pd.testing.assert_frame_equal(resumed[name], full[name])
    again: list = []
    shards.run_grid(POINTS, _compute(again), store, progress=False)
    assert again == []
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_shard_without_marker_is_not_done(tmp_path, monkeypatch):
    store = shards.ShardStore(tmp_path, BASE)
    p = POINTS[1]
    store.save(p, _compute([])(p))
    assert store.done(p)
    markers = list(tmp_path.glob("*.json"))
    assert len(markers) == 1 and len(list(tmp_path.glob("*.parquet"))) == 2
    markers[0].unlink()  # tables on disk, no marker
    assert not store.done(p)
    calls: list = []
    shards.run_grid([p], _compute(calls), store, progress=False)
    assert calls == [p] and store.done(p)

    # Killed while writing the second table: the first table is there, the point is not done.
    q = POINTS[2]
    real_to_parquet = pd.DataFrame.to_parquet
    written: list = []

    def dying_to_parquet(self, path, *args, **kwargs):
        if written:
            raise Killed()
        written.append(path)
        return real_to_parquet(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", dying_to_parquet)
    with pytest.raises(Killed):
        store.save(q, _compute([])(q))
    monkeypatch.undo()
    assert written and not store.done(q)

    # Killed after writing the marker's temporary file but before renaming it into place.
    r = POINTS[3]
    real_replace = shards.os.replace

    def dying_replace(src, dst):
        if str(dst).endswith(".json"):
            raise Killed()
        return real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", dying_replace)
    with pytest.raises(Killed):
        store.save(r, _compute([])(r))
    monkeypatch.undo()
    assert list(tmp_path.glob("*.json.tmp")) and not store.done(r)

    calls = []
    out = shards.run_grid(POINTS[1:4], _compute(calls), store, progress=False)
    assert calls == POINTS[2:4]
    assert out["main"]["a"].tolist() == [1] * 3 + [2] * 3 + [3] * 3
    assert not list(tmp_path.glob("*.tmp"))


def test_shard_store_key_ignores_order_but_not_base(tmp_path):
    store = shards.ShardStore(tmp_path, BASE)
    p = {"a": 1, "b": "odd", "level": 0.5}
    store.save(p, _compute([])(p))
    assert store.done({"level": 0.5, "b": "odd", "a": 1})  # the same configuration, other key order
    assert not store.done({**p, "level": 0.25})
    assert not shards.ShardStore(tmp_path, {**BASE, "model": "other"}).done(p)
    assert shards.config_hash({"x": 1, "y": [1, 2]}) == shards.config_hash({"y": [1, 2], "x": 1})


def _task():
    shots = pd.DataFrame({"text": SHOTS["text"].tolist() * 2, "label": SHOTS["label"].tolist() * 2})
    splits = {"shots": shots, "dev": pd.DataFrame({"text": QUERY_TEXTS, "label": QUERY_LABELS})}
    return tasks.make_task(splits, "dev", tasks.PromptConfig("plain", k=2, shot_seed=0))


SETTINGS = [
    {"mode": "absolute", "level": 0.5, "seed": 0},
    {"mode": "fraction_of_std", "level": 0.8, "seed": 1},
    {"mode": "zero"},
    {"mode": "mean"},
]


def _sorted(frame, keys):
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def test_head_sweep_resumes_to_the_same_tables(tiny_factory, tmp_path, monkeypatch):
    lm = tiny_factory("llama")
    task = _task()
    n_points, n_heads, n_prompts = len(SETTINGS) * lm.n_layers, lm.n_heads, len(QUERY_TEXTS)
    heads_a, prompts_a = sweeps.head_sweep(lm, task, SETTINGS, tmp_path / "a", batch_size=8, progress=False)
    assert len(heads_a) == n_points * n_heads and len(prompts_a) == n_points * n_heads * n_prompts
    assert len(list((tmp_path / "a").glob("*.json"))) == n_points

    # The tables hold what the engine computes (rows matched to the right head and prompt).
    enc, labels = task.encode(lm), task.label_ids(lm)
    clean = engine.clean_run(lm, enc, labels)
    zero = [HeadEdit("zero", 1, h) for h in range(n_heads)]
    lp = engine.sweep_heads(lm, clean, zero)
    sign = torch.tensor(2 * task.labels - 1, dtype=torch.float32)
    change = ((lp[..., 1] - lp[..., 0]) - (clean.logprobs[:, 1] - clean.logprobs[:, 0])) * sign
    got = _sorted(prompts_a[(prompts_a["mode"] == "zero") & (prompts_a["layer"] == 1)], ["head", "prompt"])
    table = torch.tensor(got["logit_diff_change"].to_numpy(), dtype=torch.float32)
    torch.testing.assert_close(table.reshape(n_heads, n_prompts), change, atol=1e-4, rtol=0)
    std_rows = _sorted(heads_a[heads_a["mode"] == "fraction_of_std"], ["layer", "head"])
    torch.testing.assert_close(torch.tensor(std_rows["scale"].to_numpy(), dtype=torch.float32),
                               0.8 * clean.head_std.reshape(-1), atol=1e-6, rtol=1e-5)

    real = engine.sweep_heads
    killed: list = []

    def dying(lm_, clean_, edits, **kwargs):
        if len(killed) == 3:
            raise Killed()
        killed.append(tuple(edits))
        return real(lm_, clean_, edits, **kwargs)

    monkeypatch.setattr(engine, "sweep_heads", dying)
    with pytest.raises(Killed):
        sweeps.head_sweep(lm, task, SETTINGS, tmp_path / "b", batch_size=8, progress=False)
    assert len(killed) == 3 and len(list((tmp_path / "b").glob("*.json"))) == 3

    rerun: list = []

    def counting(lm_, clean_, edits, **kwargs):
        rerun.append(tuple(edits))
        return real(lm_, clean_, edits, **kwargs)

    monkeypatch.setattr(engine, "sweep_heads", counting)
    heads_b, prompts_b = sweeps.head_sweep(lm, task, SETTINGS, tmp_path / "b", batch_size=8, progress=False)
    assert len(rerun) == n_points - 3 and not set(rerun) & set(killed)
    assert len(set(rerun) | set(killed)) == n_points
    head_keys = ["mode", "level", "seed", "layer", "head"]
    pd.testing.assert_frame_equal(_sorted(heads_b, head_keys), _sorted(heads_a, head_keys))
    pd.testing.assert_frame_equal(_sorted(prompts_b, head_keys + ["prompt"]),
                                  _sorted(prompts_a, head_keys + ["prompt"]))
    rerun.clear()
    sweeps.head_sweep(lm, task, SETTINGS, tmp_path / "b", progress=False)
    assert rerun == []


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["gaussian", "Zero", "", None])
def test_setting_unknown_mode(mode):
    with pytest.raises(ValueError) as err:
        Setting.parse({"mode": mode, "level": 0.1})
    assert repr(mode) in str(err.value) and all(m in str(err.value) for m in sweeps.MODES)


def test_setting_edit_resolves_the_scale_once(llama):
    """``mode`` -> ``kind`` and ``level`` -> ``scale``: absolute, or relative to the clean run's per-head
    max |z| / std; ablations carry no scale or seed."""
    clean = llama[3]
    assert [Setting("zero", 0.3, 2).edit(1, h, clean) for h in (0, 2)] == [HeadEdit("zero", 1, 0),
                                                                           HeadEdit("zero", 1, 2)]
    assert Setting("mean").edit(0, 3, clean) == HeadEdit("mean", 0, 3)
    assert Setting("absolute", 0.3, 2).edit(1, 3, clean) == HeadEdit("noise", 1, 3, 0.3, 2)
    e = Setting("fraction_of_max", 0.5, 1).edit(0, 1, clean)
    assert (e.kind, e.seed) == ("noise", 1) and e.scale == 0.5 * float(clean.head_max_abs[0, 1])
    assert Setting("fraction_of_std", 2.0).edit(1, 0, clean).scale == 2.0 * float(clean.head_std[1, 0])
    assert Setting.parse({"mode": "absolute", "level": 3, "seed": 4, "layer": 1}) == Setting("absolute", 3.0, 4)


@pytest.mark.parametrize("fields,named", [
    ({"level": -0.1}, "level=-0.1"), ({"level": float("nan")}, "level=nan"), ({"level": float("inf")}, "level=inf"),
    ({"level": "1"}, "level='1'"), ({"seed": 1.5}, "seed=1.5"), ({"seed": True}, "seed=True"),
])
def test_setting_bad_level_or_seed(fields, named):
    with pytest.raises(ValueError, match=named) as err:
        Setting.parse({"mode": "absolute", **fields})
    assert ">= 0" in str(err.value) or "integer" in str(err.value)


@pytest.mark.parametrize("layer,head,named", [
    (0, 4, "head 4 of HeadEdit.*0..3"), (2, 0, "layer 2 of HeadEdit.*0..1"), (1, -1, "head=-1"), (-1, 0, "layer=-1"),
])
@pytest.mark.parametrize("mode", ["zero", "absolute", "fraction_of_max"])
def test_setting_edit_out_of_range(llama, layer, head, named, mode):
    _, _, _, clean = llama
    with pytest.raises(ValueError, match=named):
        Setting(mode, 0.1).edit(layer, head, clean)


@pytest.mark.parametrize("fields,named,allowed", [
    (("gaussian", 0, 1), "kind='gaussian'", "'noise', 'zero', 'mean'"),
    (("noise", 0, 1, -1.0), "scale=-1.0", ">= 0"),
    (("noise", 0, 1, float("nan")), "scale=nan", ">= 0"),
    (("noise", 0, 1, float("-inf")), "scale=-inf", ">= 0"),
    (("noise", 0, 1, 1.0, 2.5), "seed=2.5", "integer"),
    (("noise", 0.5, 1), "layer=0.5", "integer"),
    (("noise", 0, -2), "head=-2", ">= 0"),
    (("zero", 0, 1, 0.5), "kind='zero'", "kind='noise' only"),
    (("mean", 0, 1, 0.0, 3), "kind='mean'", "kind='noise' only"),
])
def test_head_edit_validates_itself(fields, named, allowed):
    """A bad edit cannot be made: the error names the field, its value and what is allowed."""
    with pytest.raises(ValueError) as err:
        HeadEdit(*fields)
    assert named in str(err.value) and allowed in str(err.value)


def test_head_edit_normalises_and_checks_against_a_model(llama):
    import numpy as np

    lm = llama[0]
    e = HeadEdit("noise", np.int64(1), np.int64(2), 1, np.int64(7))
    assert (type(e.layer), type(e.head), type(e.scale), type(e.seed)) == (int, int, float, int)
    assert e == HeadEdit("noise", 1, 2, 1.0, 7) and hash(e) == hash(HeadEdit("noise", 1, 2, 1.0, 7))
    assert e.check(lm.n_layers, lm.n_heads) is e
    with pytest.raises(ValueError, match="head 4 of HeadEdit.*out of range 0..3"):
        HeadEdit("zero", 0, 4).check(lm.n_layers, lm.n_heads)


def test_head_edit_apply_is_the_arithmetic():
    """``apply`` on a head's slice: ``z += scale * eps`` with the row's draws in order; ``z = 0``;
    ``z = means[head]``; it edits the slice in place and nothing else."""
    z = torch.randn(2, 7, 3, 4)  # (b, s, n_heads, d_head)
    means = torch.randn(3, 4)
    keys = edits_module.noise_keys(5, 3, 4)
    assert keys == [("prefix", 3), (5, 4)] and edits_module.noise_keys(5, 0, 4) == [(5, 4)]
    e = HeadEdit("noise", 1, 2, 0.5, 9)
    out = z.clone()
    e.apply(out[1, :, 2], keys, means)
    eps = torch.cat([head_noise(9, 1, 2, "prefix", 3, 4), head_noise(9, 1, 2, 5, 4, 4)])
    torch.testing.assert_close(out[1, :, 2], z[1, :, 2] + 0.5 * eps, atol=0, rtol=0)
    torch.testing.assert_close(e.noise(keys, 4), eps, atol=0, rtol=0)
    out[1, :, 2] = z[1, :, 2]
    assert torch.equal(out, z)  # only the slice changed
    HeadEdit("zero", 1, 1).apply(out[:, 2:, 1])
    assert torch.all(out[:, 2:, 1] == 0) and torch.equal(out[:, :2, 1], z[:, :2, 1])
    HeadEdit("mean", 1, 0).apply(out[0, :, 0], means=means)
    assert torch.equal(out[0, :, 0], means[0].expand(7, -1))
    with pytest.raises(ValueError, match="means"):
        HeadEdit("mean", 1, 0).apply(out[0, :, 0])


def test_engine_and_hooks_share_apply(llama, monkeypatch):
    """The engine and the plain hooks both edit tensors through ``HeadEdit.apply`` (so their exact
    agreement above is one implementation, not two kept in step)."""
    lm, _, _, clean = llama
    calls: list[tuple[str, HeadEdit]] = []
    real = HeadEdit.apply

    def spy(self, z, keys=(), means=None):
        calls.append((self.kind, self))
        return real(self, z, keys, means)

    monkeypatch.setattr(HeadEdit, "apply", spy)
    edits = _mixed_edits()
    engine.sweep_heads(lm, clean, edits, batch_size=4)
    assert {e for _, e in calls} == set(edits)
    calls.clear()
    _reference(lm, clean, edits[:4])
    assert {e for _, e in calls} == set(edits[:4])


def test_head_sweep_bad_settings_fail_before_any_work(tiny_factory, tmp_path):
    lm, task = tiny_factory("llama"), _task()
    with pytest.raises(ValueError) as err:
        sweeps.head_sweep(lm, task, [{"mode": "zero"}, {"mode": "gaussian", "level": 1.0}], tmp_path / "x",
                         progress=False)
    assert "'gaussian'" in str(err.value) and all(m in str(err.value) for m in sweeps.MODES)
    with pytest.raises(ValueError, match="level"):
        sweeps.head_sweep(lm, task, [{"mode": "absolute", "level": -1.0}], tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match=r"layers\[1\]=2 is out of range; expected an integer in 0..1"):
        sweeps.head_sweep(lm, task, [{"mode": "zero"}], tmp_path / "x", layers=[0, 2], progress=False)
    assert not (tmp_path / "x").exists()  # nothing computed or written


# --------------------------------------------------------------------------------------------------
# Designs: antithetic sign, per-edit prompt subsets
# --------------------------------------------------------------------------------------------------
def test_antithetic_sign_negates_the_draw(llama):
    lm, _, _, clean = llama
    plus, minus = HeadEdit("noise", 1, 2, 0.5, 7), HeadEdit("noise", 1, 2, 0.5, 7, sign=-1)
    keys = [("prefix", 3), (4, 2)]
    torch.testing.assert_close(minus.noise(keys, 8), -plus.noise(keys, 8))
    # the engine with sign -1 equals the plain hooks with sign -1 (the one apply)
    ref = _reference(lm, clean, [minus])
    torch.testing.assert_close(engine.sweep_heads(lm, clean, [minus]), ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="sign=2"):
        HeadEdit("noise", 0, 0, 1.0, 0, sign=2)
    with pytest.raises(ValueError, match="sign"):
        HeadEdit("zero", 0, 0, sign=-1)


def test_sweep_heads_per_edit_prompt_subsets(llama):
    lm, enc, _, clean = llama
    edits = _mixed_edits()
    full = engine.sweep_heads(lm, clean, edits)
    subsets = [[0, 3], None, [4], [1, 2, 3], [], [2], [0, 1, 2, 3, 4], [3, 1]]
    part = engine.sweep_heads(lm, clean, edits, batch_size=3, prompts=subsets)
    for i, ps in enumerate(subsets):
        ps = range(len(enc)) if ps is None else ps
        torch.testing.assert_close(part[i, list(ps)], full[i, list(ps)], atol=2e-5, rtol=1e-4)
        rest = [p for p in range(len(enc)) if p not in ps]
        assert torch.isnan(part[i, rest]).all()
    with pytest.raises(ValueError, match="one per edit"):
        engine.sweep_heads(lm, clean, edits, prompts=subsets[:2])
    with pytest.raises(ValueError, match=r"\[5\] out of range"):
        engine.sweep_heads(lm, clean, edits[:1], prompts=[[0, 5]])
