"""FFN neurons and the logit lens on tiny random models of every architecture: captured neuron
activations equal the MLP's own computation, hooks are gone after errors, streaming statistics equal
statistics of the stored activations and do not depend on batching, neuron ablation equals editing the
down projection, and the logit lens of the last layer is the model's output."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from beartype import beartype
from jaxtyping import jaxtyped
from transformers.activations import ACT2FN

from conftest import ARCHS, D_MLP, MODEL_VOCAB, N_LAYERS
from headlab import ablation, engine, lens, models, neurons, perplexity, records, tasks
from headlab.interventions import ablate_neurons, capture, capture_residual, edit_neurons, hooks, observe
from headlab.models import get_module, LoadedModel


def _rows(n: int = 5, s: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, MODEL_VOCAB, (n, s), generator=gen)


_BASELINE_HOOKS: dict[int, int] = {}


def _hook_count(lm: LoadedModel) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in lm.model.modules())


def _no_hooks(lm: LoadedModel) -> bool:
    """No hook of ours is left: the model has the hooks it had when first seen here (transformers may
    install its own output-recording hooks on a model, e.g. after ``output_hidden_states=True``)."""
    return _hook_count(lm) == _BASELINE_HOOKS.get(id(lm.model), 0)


@pytest.fixture(autouse=True)
def _record_hooks(request):
    for name in ("tiny_lm",):
        if name in request.fixturenames:
            lm = request.getfixturevalue(name)
            _BASELINE_HOOKS[id(lm.model)] = _hook_count(lm)
    yield


def _act_fn(lm: LoadedModel):
    cfg = lm.config
    if lm.model_type == "bloom":  # not in its config: BLOOM's MLP hard-codes the tanh approximation of GELU
        return ACT2FN["gelu_new"]
    for attr in ("hidden_activation", "hidden_act", "activation_function", "activation"):
        name = getattr(cfg, attr, None)
        if name:
            return ACT2FN[name]
    raise AssertionError("no activation function in the config")


# --------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------
def test_captured_neurons_equal_the_mlp_computation(tiny_lm):
    """The input of mlp_out is act(gate(x)) * up(x) (gated MLPs) or act(fc(x)), computed by hand from
    the outputs of the adapter's mlp_in projections."""
    ids = _rows(3, 10)
    proj_out: dict[tuple[int, int], torch.Tensor] = {}
    post = []
    for layer in range(tiny_lm.n_layers):
        for j, path in enumerate(tiny_lm.adapter.mlp_in):
            mod = get_module(tiny_lm.layers[layer], path)
            post.append((mod, lambda m, a, o, key=(layer, j): proj_out.__setitem__(key, o.detach())))
    seen: dict[int, torch.Tensor] = {}
    with hooks(post=post), capture(tiny_lm, site="mlp_out") as acts, \
            observe(tiny_lm, lambda layer, x: seen.__setitem__(layer, x.clone())):
        tiny_lm.model(input_ids=ids)
    act = _act_fn(tiny_lm)
    d_mlp = tiny_lm.d_mlp
    for layer in range(tiny_lm.n_layers):
        if len(tiny_lm.adapter.mlp_in) == 2:  # gated: (gate, up)
            manual = act(proj_out[layer, 0]) * proj_out[layer, 1]
        elif "mlp.gate_up" in dict(tiny_lm.adapter.weights):  # fused gate and up: rows from the slice table
            name = f"L{layer}.mlp.gate_up"
            gate = torch.cat([models.neuron_slice(tiny_lm, name, n, "gate").index for n in range(d_mlp)])
            up = torch.cat([models.neuron_slice(tiny_lm, name, n, "up").index for n in range(d_mlp)])
            manual = act(proj_out[layer, 0][..., gate]) * proj_out[layer, 0][..., up]
        else:
            manual = act(proj_out[layer, 0])
        assert acts[layer].shape[-1] == d_mlp and acts[layer].numel() == 3 * 10 * d_mlp  # OPT: (b*s, N)
        torch.testing.assert_close(acts[layer], manual, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen[layer], acts[layer], rtol=0, atol=0)
    assert _no_hooks(tiny_lm)


def test_neuron_activations_stop_early_and_match_capture(tiny_lm):
    ids = _rows(2, 9)
    with capture(tiny_lm, site="mlp_out") as acts:
        tiny_lm.model(input_ids=ids)
    for layer in range(tiny_lm.n_layers):
        acts[layer] = acts[layer].reshape(2, 9, -1)
        a = jaxtyped(typechecker=beartype)(neurons.neuron_activations)(tiny_lm, ids, layer)
        torch.testing.assert_close(a, acts[layer], rtol=0, atol=0)
    assert _no_hooks(tiny_lm)


@pytest.mark.parametrize("where", ["block", "hook"])
def test_hooks_removed_after_exception(tiny_factory, where):
    lm = tiny_factory("llama")
    ids = _rows(2, 6)

    def boom(*_):
        raise RuntimeError("boom")

    in_hook = where == "hook"
    managers = [  # (context manager, whether its hook raises)
        (lambda: observe(lm, boom if in_hook else (lambda *_: None)), in_hook),
        (lambda: capture_residual(lm), False),
        (lambda: edit_neurons(lm, {0: boom if in_hook else (lambda a: None)}), in_hook),
        (lambda: ablate_neurons(lm, {0: [1, 2], 1: [3]}), False),
    ]
    for make, hook_raises in managers:
        with pytest.raises(RuntimeError, match="boom"):
            with make():
                lm.model(input_ids=ids)
                if not hook_raises:
                    raise RuntimeError("boom")
        assert _no_hooks(lm)
    with pytest.raises(RuntimeError, match="boom"), observe(lm, boom):
        neurons.neuron_stats(lm, ids)
    assert _no_hooks(lm)


# --------------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------------
def _dense_stats(lm: LoadedModel, ids: torch.Tensor, skip_first: int, k: int,
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Statistics computed from every stored activation (the reference for the streaming version), from
    forwards of the same batches (so that float rounding of batched matmuls cannot move a top-k)."""
    n, s = ids.shape
    parts: dict[int, list[torch.Tensor]] = {}
    for start in range(0, n, batch_size):
        with capture(lm, site="mlp_out") as got:
            lm.model(input_ids=ids[start:start + batch_size])
        for layer, x in got.items():
            parts.setdefault(layer, []).append(x.reshape(-1, s, x.shape[-1]))
    acts = {layer: torch.cat(xs) for layer, xs in parts.items()}
    a = torch.stack([acts[layer].reshape(n, s, -1)[:, skip_first:].reshape(-1, lm.d_mlp) for layer in range(lm.n_layers)]).double()
    index = (torch.arange(n)[:, None] * s + torch.arange(skip_first, s)[None]).reshape(-1)
    top_v, top_i = [], []
    for layer in range(lm.n_layers):
        v, i = [], []
        for neuron in range(lm.d_mlp):
            order = sorted(range(len(index)), key=lambda t: (-float(a[layer, t, neuron]), int(index[t])))[:k]
            v.append([float(a[layer, t, neuron]) for t in order])
            i.append([int(index[t]) for t in order])
        top_v.append(v)
        top_i.append(i)
    return {"mean": a.mean(1), "mean_abs": a.abs().mean(1), "std": a.std(1, unbiased=False),
            "min": a.amin(1), "top_values": torch.tensor(top_v, dtype=torch.float64), "top_index": torch.tensor(top_i)}


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_stats_equal_stats_of_stored_activations(tiny_factory, arch):
    lm = tiny_factory(arch)
    ids, k, skip = _rows(5, 11), 4, 1
    stats = neurons.neuron_stats(lm, ids, k=k, batch_size=2, skip_first=skip)
    ref = _dense_stats(lm, ids, skip, k, batch_size=2)
    assert stats.count == 5 * (11 - skip)
    for name in ("mean", "mean_abs", "std", "min"):
        torch.testing.assert_close(getattr(stats, name).double(), ref[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(stats.top_values.double(), ref["top_values"], rtol=1e-6, atol=1e-7)
    assert torch.equal(stats.top_index, ref["top_index"])
    assert torch.equal(stats.max, stats.top_values[..., 0])
    assert _no_hooks(lm)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_streaming_stats_are_batch_invariant(tiny_factory, arch):
    lm = tiny_factory(arch)
    ids = _rows(6, 10, seed=1)
    runs = [neurons.neuron_stats(lm, ids, k=5, batch_size=b) for b in (1, 4, 6)]
    for other in runs[1:]:
        assert torch.equal(other.top_keys, runs[0].top_keys)  # exact: same values, same positions
        for name in ("sum", "sum_abs", "sum_sq", "min"):
            torch.testing.assert_close(getattr(other, name), getattr(runs[0], name), rtol=1e-6, atol=1e-6)


def test_topk_ties_prefer_earlier_tokens():
    stats = neurons.NeuronStats.empty([0], d_mlp=2, k=3)
    zeros = torch.zeros(4, 2)
    stats.update(0, zeros, torch.tensor([10, 11, 12, 13]))
    stats.update(0, torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([3, 4]))
    stats.add_count(6)
    assert stats.top_index[0, 0].tolist() == [4, 3, 10]  # 2.0 first, then the zeros by position
    assert stats.top_values[0, 0].tolist() == [2.0, 0.0, 0.0]
    assert stats.top_index[0, 1].tolist() == [3, 4, 10]
    with pytest.raises(ValueError, match="not captured"):
        stats.slot(5)


def test_stats_with_fewer_tokens_than_k():
    stats = neurons.NeuronStats.empty([0, 1], d_mlp=3, k=4)
    stats.update(0, torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([7]))
    assert stats.top_index[0, 0].tolist() == [7, -1, -1, -1]
    assert torch.isnan(stats.top_values[0, 0, 1:]).all()
    with pytest.raises(ValueError, match="No tokens"):
        _ = stats.mean


def test_neuron_stats_rejects_bad_input(tiny_factory):
    lm = tiny_factory("llama")
    with pytest.raises(ValueError, match="skip_first"):
        neurons.neuron_stats(lm, _rows(2, 5), skip_first=5)
    with pytest.raises(ValueError, match="layer 7"):
        neurons.neuron_stats(lm, _rows(2, 5), layers=[7])
    with pytest.raises(ValueError, match="k=0"):
        neurons.neuron_stats(lm, _rows(2, 5), k=0)


def test_top_neurons_and_examples(tiny_factory, tokenizer):
    lm = tiny_factory("llama")
    ids = torch.tensor(tokenizer(["Review: a gripping, funny and warm film. The cat sat on the mat."] * 3,
                                 add_special_tokens=True)["input_ids"])
    stats = neurons.neuron_stats(lm, ids, k=3)
    top = neurons.top_neurons(stats, "mean_abs", k=4)
    assert len(top) == N_LAYERS * 4 and top["rank"].tolist()[:4] == [1, 2, 3, 4]
    first = top[top["layer"] == 0]
    assert first["mean_abs"].is_monotonic_decreasing
    assert first["mean_abs"].iloc[0] == pytest.approx(float(stats.mean_abs[0].max()))
    by_max = neurons.top_neurons(stats, "max", k=1)
    assert by_max["neuron"].tolist() == stats.max.argmax(1).tolist()
    with pytest.raises(ValueError, match="by='nope'"):
        neurons.top_neurons(stats, "nope")
    n = int(by_max["neuron"].iloc[0])
    ex = neurons.top_examples(lm, stats, ids, 0, n, before=3, after=2)
    assert len(ex) == 3 and ex["activation"].is_monotonic_decreasing
    a = neurons.neuron_activations(lm, ids, 0)
    for r in ex.itertuples():
        assert a[r.row, r.position, n].item() == pytest.approx(r.activation)
        assert r.token == tokenizer.decode([int(ids[r.row, r.position])])


# --------------------------------------------------------------------------------------------------
# Neuron ablation
# --------------------------------------------------------------------------------------------------
def test_ablating_no_neurons_reproduces_clean_logits(tiny_lm):
    ids = _rows(3, 8)
    clean = tiny_lm.model(input_ids=ids).logits
    with ablate_neurons(tiny_lm, {0: [], 1: []}):
        same = tiny_lm.model(input_ids=ids).logits
    assert torch.equal(same, clean)
    with edit_neurons(tiny_lm, {0: lambda a: None}):
        torch.testing.assert_close(tiny_lm.model(input_ids=ids).logits, clean, rtol=0, atol=0)


def _down_weight(lm: LoadedModel, layer: int) -> torch.nn.Parameter:
    return lm.layer_module(layer, "mlp_out").weight


def test_zero_ablation_equals_zeroed_down_projection_column(tiny_lm):
    ids = _rows(3, 8)
    chosen = {0: [1, 5], 1: [0, 7, 40]}
    with ablate_neurons(tiny_lm, chosen, "zero"):
        ablated = tiny_lm.model(input_ids=ids).logits
    edited = copy.deepcopy(tiny_lm.model)
    lm2 = LoadedModel(edited, tiny_lm.tokenizer, tiny_lm.adapter, "copy", "copy")
    with torch.no_grad():
        for layer, ns in chosen.items():
            w = _down_weight(lm2, layer)
            if lm2.adapter.conv1d:  # Conv1D stores (in, out): neuron n is row n
                w[ns, :] = 0.0
            else:
                w[:, ns] = 0.0
    torch.testing.assert_close(ablated, edited(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ablated, tiny_lm.model(input_ids=ids).logits)


def test_mean_ablation_writes_the_mean(tiny_lm):
    ids = _rows(2, 7)
    means = {1: torch.linspace(-1, 1, tiny_lm.d_mlp)}
    seen = {}
    with ablate_neurons(tiny_lm, {1: [2, 9]}, "mean", means), \
            observe(tiny_lm, lambda layer, x: seen.__setitem__(layer, x), layers=[1]):
        tiny_lm.model(input_ids=ids)
    # observe's pre-hook was registered after the ablation's, so it sees the edited input
    assert torch.equal(seen[1].reshape(2, 7, -1)[..., [2, 9]], means[1][[2, 9]].expand(2, 7, 2))
    with pytest.raises(ValueError, match="needs `means`"):
        with ablate_neurons(tiny_lm, {0: [1]}, "mean", means):
            pass


def test_neuron_ablation_is_batch_invariant(tiny_factory):
    lm = tiny_factory("qwen2")
    ids = _rows(4, 9, seed=3)
    with ablate_neurons(lm, {0: [3, 4, 5]}, "zero"):
        batched = lm.model(input_ids=ids).logits
        single = torch.cat([lm.model(input_ids=ids[i:i + 1]).logits for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_ablate_neurons_rejects_bad_input(tiny_factory):
    lm = tiny_factory("llama")
    with pytest.raises(ValueError, match=r"neuron\(s\) \[48\]"):
        with ablate_neurons(lm, {0: [48]}):
            pass
    with pytest.raises(ValueError, match="layer 2"):
        with ablate_neurons(lm, {2: [0]}):
            pass
    with pytest.raises(ValueError, match="mode='one'"):
        with ablate_neurons(lm, {0: [0]}, mode="one"):
            pass
    assert _no_hooks(lm)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "opt", "gemma2"])
def test_neuron_ablation_sweep_resumes_and_is_batch_invariant(tiny_factory, tmp_path, arch):
    lm = tiny_factory(arch)
    ids = _rows(4, 10)
    stats = neurons.neuron_stats(lm, _rows(4, 10, seed=9))  # reference rows, disjoint from ids
    kw = dict(layers=[1], k_list=[2, 5], modes=["zero", "mean"], n_random=2, seed=0)
    rows = ablation.neuron_ablation_sweep(lm, ids, stats, tmp_path / "a", batch_size=3, progress=False, **kw)
    assert len(rows) == 2 * 2 * (1 + 2) * 4  # modes x k x (top + 2 random) x sequences

    def chosen(frame):
        return [int(u.split("N")[1]) for u in frame["members"].iloc[0].split()]

    top2 = neurons.top_neurons(stats, "mean_abs", 2)
    top_set = rows[(rows["set_type"] == "top") & (rows["k"] == 2)]
    assert chosen(top_set) == sorted(top2.loc[top2["layer"] == 1, "neuron"])
    assert top_set["members"].iloc[0].startswith("L1N")
    rnd = rows[(rows["set_type"] == "random") & (rows["k"] == 2)]
    assert not {u for m in rnd["members"] for u in m.split()} & set(top_set["members"].iloc[0].split())
    # the zero-ablation loss of one set equals a plain forward with the neurons zeroed
    one = rows[(rows["mode"] == "zero") & (rows["set_type"] == "top") & (rows["k"] == 5)]
    with ablate_neurons(lm, {1: chosen(one)}):
        want = perplexity.token_losses(lm, ids).double().mean(1).numpy()
    np.testing.assert_allclose(one["loss"].to_numpy(), want, rtol=1e-5)
    clean = perplexity.token_losses(lm, ids).double().mean(1).numpy()
    np.testing.assert_allclose((one["loss"] - one["loss_change"]).to_numpy(), clean, rtol=1e-5)
    by_set = rows.groupby(["mode", "k", "set_type", "permutation"])["loss_change"]
    assert by_set.apply(lambda d: (d.abs() > 0).any()).all()
    # batch size does not matter; a second run reads every shard back
    again = ablation.neuron_ablation_sweep(lm, ids, stats, tmp_path / "b", batch_size=1, progress=False, **kw)
    np.testing.assert_allclose(again["loss"].to_numpy(), rows["loss"].to_numpy(), rtol=1e-5)
    n_files = len(list((tmp_path / "a").iterdir()))
    resumed = ablation.neuron_ablation_sweep(lm, ids, stats, tmp_path / "a", progress=False, **kw)
    assert len(list((tmp_path / "a").iterdir())) == n_files
    pd.testing.assert_frame_equal(resumed, rows)
    summary = ablation.ablation_summary(rows, "loss_change", by=("mode", "layer", "set_type", "k"), n_boot=50)
    assert len(summary) == 2 * 2 * 2 and set(summary["n_permutations"]) == {1, 2}
    assert _no_hooks(lm)


def test_neuron_ablation_sweep_rejects_bad_input(tiny_factory, tmp_path):
    lm = tiny_factory("llama")
    stats = neurons.neuron_stats(lm, _rows(2, 6), layers=[0])
    with pytest.raises(ValueError, match="not captured"):
        ablation.neuron_ablation_sweep(lm, _rows(2, 6), stats, tmp_path, layers=[1], k_list=[2])
    with pytest.raises(ValueError, match="k=30 exceeds the largest random set \\(24\\)"):
        ablation.neuron_ablation_sweep(lm, _rows(2, 6), stats, tmp_path, layers=[0], k_list=[30])
    with pytest.raises(ValueError, match="mode\\(s\\) \\['noise'\\]"):
        ablation.neuron_ablation_sweep(lm, _rows(2, 6), stats, tmp_path, layers=[0], k_list=[2], modes=["noise"])
    with pytest.raises(ValueError, match="by='median'"):
        ablation.neuron_ablation_sweep(lm, _rows(2, 6), stats, tmp_path, layers=[0], k_list=[2], by="median")


def test_neuron_pool_random_sets_avoid_the_top_set():
    stats = neurons.NeuronStats.empty([3], 100, 1)
    stats.update(0, torch.rand(7, 100, generator=torch.Generator().manual_seed(0)), torch.arange(7))
    stats.add_count(7)
    pool = ablation.neuron_pools(stats, [3])[3]
    a = pool.random(10, permutation=0, seed=0)
    assert a == pool.random(10, permutation=0, seed=0) and list(a) == [3] and len(a[3]) == 10
    assert a != pool.random(10, permutation=1, seed=0)
    assert not set(a[3]) & set(pool.top(10)[3])
    assert pool.max_k("random") == 50 and pool.max_k("top") == 100
    with pytest.raises(ValueError, match="k=51"):
        pool.random(51)


# --------------------------------------------------------------------------------------------------
# Logit lens and the unembedding of directions
# --------------------------------------------------------------------------------------------------
def test_logit_lens_at_last_layer_is_the_model_output(tiny_lm):
    ids = _rows(2, 9)
    out = jaxtyped(typechecker=beartype)(lens.lens_logits)(tiny_lm, ids)
    assert out.shape == (tiny_lm.n_layers, 2, 9, MODEL_VOCAB)
    torch.testing.assert_close(out[-1], tiny_lm.model(input_ids=ids).logits.float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[-1])
    some = lens.lens_logits(tiny_lm, ids, layers=[1], positions=[0, 8])
    torch.testing.assert_close(some[0], out[1][:, [0, 8]], rtol=0, atol=0)
    assert _no_hooks(tiny_lm)


def test_lens_label_scores_match_label_logprobs(tiny_lm, tokenizer):
    prefix = "Classify the sentiment of each movie review as positive or negative.\n"
    queries = ["Review: a tedious mess.\nSentiment:", "Review: charming and clever, one of the best.\nSentiment:",
               "Review: boring.\nSentiment:"]
    enc = engine.encode_prompts(tiny_lm, prefix, queries)
    labels = engine.label_token_ids(tiny_lm, ["negative", "positive"])
    lp, ranks = lens.lens_label_scores(tiny_lm, enc, labels, batch_size=2)
    assert lp.shape == ranks.shape == (tiny_lm.n_layers, 3, 2)
    torch.testing.assert_close(lp[-1], engine.label_logprobs(tiny_lm, enc, labels), rtol=1e-4, atol=1e-4)
    full = torch.stack([tiny_lm.model(input_ids=enc.full(i)[None]).logits[0, -1] for i in range(3)])
    want = (full[:, None, :] > full[:, labels][:, :, None]).sum(-1)
    assert torch.equal(ranks[-1], want)
    one_by_one = torch.cat([lens.lens_label_scores(tiny_lm, enc.subset([i]), labels)[0] for i in range(3)], 1)
    torch.testing.assert_close(one_by_one, lp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_direction_logits_is_the_linear_part_of_decoding(tiny_factory, arch):
    """decode(h) = direction_logits(h) / scale(h) + decode(0) for LayerNorm and RMSNorm models."""
    lm = tiny_factory(arch, final_logit_softcapping=None) if arch == "gemma2" else tiny_factory(arch)
    h = torch.randn(3, lm.d_model, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    norm = lm.module("final_norm")
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None)
    if isinstance(norm, torch.nn.LayerNorm):
        scale = (h.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    else:
        scale = (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    with torch.no_grad():
        want = lens.decode_residual(lm, h)
        got = lens.direction_logits(lm, h) / scale + lens.decode_residual(lm, torch.zeros(1, lm.d_model))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_promoted_tokens(tiny_factory):
    lm = tiny_factory("gpt2")
    frame = neurons.promoted_tokens(lm, 1, 5, k=4)
    assert list(frame["direction"]) == ["promoted"] * 4 + ["suppressed"] * 4
    w = neurons.output_weights(lm, 1)
    assert w.shape == (lm.d_model, lm.d_mlp)
    with torch.no_grad():
        logits = lens.direction_logits(lm, w[:, 5])
    assert frame["token_id"].iloc[0] == int(logits.argmax()) and frame["token_id"].iloc[4] == int(logits.argmin())
    assert frame["logit"].iloc[0] == pytest.approx(float(logits.max()), rel=1e-5)
    with pytest.raises(ValueError, match="neuron=99"):
        neurons.promoted_tokens(lm, 1, 99)


# --------------------------------------------------------------------------------------------------
# Data rows and memory
# --------------------------------------------------------------------------------------------------
def test_text_rows(tiny_factory):
    lm = tiny_factory("llama")
    texts = ["The cat sat on the mat. " * 6, "short", "The dog ran in the park. " * 10]
    ids, source = tasks.text_rows(lm, texts, n_rows=3, seq_len=12, rows_per_text=2)
    assert ids.shape == (3, 12) and source.tolist() == [0, 0, 2]
    first = lm.tokenizer(texts[0])["input_ids"]
    assert ids[0].tolist() == first[:12] and ids[1].tolist() == first[12:24]
    with pytest.raises(ValueError, match="asked for n_rows=40"):
        tasks.text_rows(lm, texts, n_rows=40, seq_len=12)


def test_peak_memory_sees_a_large_allocation():
    with records.peak_memory() as mem:
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB
        del x
    if mem["rss_increase"] is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert mem["rss_increase"] >= 48 * 1024 * 1024
    assert np.isfinite(mem["rss_peak"])
    assert neurons.dense_bytes(1000, 30, 1536) == 1000 * 30 * 1536 * 4


# --------------------------------------------------------------------------------------------------
# Readout metrics and views
# --------------------------------------------------------------------------------------------------
def test_layer_readout_and_first_sustained_layer():
    from headlab import metrics

    y = np.array([0, 1, 0, 1, 1, 0])
    L = 3
    lp = np.full((L, 6, 2), np.log(0.25))
    ranks = np.full((L, 6, 2), 50)
    # layer 0: no information; layer 1: correct label slightly ahead; layer 2: correct label is the top token
    lp[1, np.arange(6), y] = np.log(0.3)
    lp[2, np.arange(6), y] = np.log(0.9)
    ranks[2, np.arange(6), y] = 0
    out = metrics.layer_readout(lp, ranks, y, n_boot=200)
    assert out["layer"].tolist() == [0, 1, 2]
    assert out["accuracy"].tolist() == [0.0, 1.0, 1.0]  # ties are not "beats"
    assert out["roc_auc"].tolist() == [0.5, 1.0, 1.0]
    assert out["p_correct"].iloc[2] == pytest.approx(0.9)
    assert out["median_rank"].tolist() == [50, 50, 0] and out["top1"].tolist() == [0, 0, 1]
    assert (out["roc_auc_low"] <= out["roc_auc"]).all()
    assert metrics.first_sustained_layer(out, "accuracy", 0.5) == 1
    assert metrics.first_sustained_layer(out, "top1", 0.5) == 2
    assert metrics.first_sustained_layer(out.assign(top1=[1, 0, 0]), "top1", 0.5) is None
    with pytest.raises(ValueError, match="shape"):
        metrics.layer_readout(lp[:, :5], ranks, y)


def test_neuron_views(tiny_factory, tokenizer):
    import matplotlib.pyplot as plt

    from headlab import plots, widgets

    lm = tiny_factory("llama")
    ids = torch.tensor(tokenizer(["Review: a gripping, funny and warm film. The cat sat on the mat."] * 2,
                                 add_special_tokens=True)["input_ids"])
    stats = neurons.neuron_stats(lm, ids, k=3)
    ex = neurons.top_examples(lm, stats, ids, 1, 4, before=4, after=1)
    snip = neurons.snippet_activations(lm, ids, ex, 1, 4, before=4, after=1)
    a = neurons.neuron_activations(lm, ids, 1)[..., 4]
    top = snip[snip["offset"] == 0]
    np.testing.assert_allclose(top["activation"].to_numpy(), ex["activation"].to_numpy(), rtol=1e-5)
    assert snip["offset"].min() >= -4 and snip["offset"].max() <= 1
    assert float(a.max()) == pytest.approx(float(ex["activation"].iloc[0]))
    html = plots.neuron_snippets_html(snip, ex, "L1 N4")
    assert html.count("outline") == len(ex) and "L1 N4" in html
    fig = plots.neuron_profile(stats.frame())
    plt.close(fig)
    box = widgets.neuron_explorer(lm, stats, ids, layer=1, neuron=4, n_examples=2)
    assert box.children[0].children[1].max == D_MLP - 1
    box.children[0].children[1].value = 5  # the callback redraws without error
    assert _no_hooks(lm)


@pytest.mark.slow
def test_real_model_lens_and_streaming_stats(real_lm):
    ids = torch.tensor([real_lm.tokenizer("The capital of France is Paris. The capital of Italy is")["input_ids"]])
    # real_lm is shared by the session: count the hooks it has now (transformers' own recorders
    # may already be installed by earlier tests) and check that ours are gone at the end
    real_lm.model(input_ids=ids, output_hidden_states=True)
    _BASELINE_HOOKS[id(real_lm.model)] = _hook_count(real_lm)
    out = lens.lens_logits(real_lm, ids, positions=[ids.shape[1] - 1])[:, 0, 0]  # (L, V)
    logits = real_lm.model(input_ids=ids).logits[0, -1].float()
    torch.testing.assert_close(out[-1], logits, rtol=1e-4, atol=1e-4)
    assert real_lm.tokenizer.decode([int(out[-1].argmax())]).strip() == "Rome"
    stats = neurons.neuron_stats(real_lm, ids, k=3, skip_first=0)
    with capture(real_lm, site="mlp_out") as acts:
        real_lm.model(input_ids=ids)
    for layer in (0, 15, 29):
        a = acts[layer][0]
        torch.testing.assert_close(stats.mean[layer], a.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.max[layer], a.amax(0), rtol=0, atol=0)
    assert _no_hooks(real_lm)
