"""Weight edits on tiny random models of every architecture: every edit is undone bit-exactly (state-dict
checksum), also after an exception; only the named matrices change; bit flips give known values;
pruning reaches the requested sparsity; a zero-noise edit reproduces the clean logits; the super-weight
finder finds a planted huge weight; perplexity under an edit computed from the edited layer on equals a
full forward; the weight sweep resumes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from headlab import metrics, perplexity, weight_sweep, weights
from headlab import interventions as iv
from headlab.models import parse_weight_name, weight_module, weight_names

IDS = torch.tensor([[1, 17, 42, 99, 5, 23, 77, 150, 8, 61, 12, 190, 33, 4, 120, 66]])


def _logits(lm, ids=IDS):
    with torch.inference_mode():
        return lm.model(input_ids=ids).logits.float()


def _params(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _changed(lm, before):
    return {n for n, p in lm.model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _param_name(lm, weight):
    p = weight_module(lm, weight).weight
    return next(n for n, q in lm.model.named_parameters() if q is p)


def _edits(lm):
    """One context manager of every kind of weight edit, each on a couple of named matrices."""
    names = weight_names(lm)
    a, b = names[0], names[-1]  # first matrix of layer 0, last (MLP down) of the last layer
    norms = weights.wanda_input_norms(lm, IDS, [a, b])
    entry = weights.random_weight_entries(lm, 1, seed=3, names=[b])[0]
    return {
        "zero": (weights.zero_weights(lm, [a, b]), {a, b}),
        "mean": (weights.mean_weights(lm, [a]), {a}),
        "magnitude": (weights.prune_magnitude(lm, [a, b], 0.5, "row"), {a, b}),
        "magnitude-matrix": (weights.prune_magnitude(lm, [a, b], 0.5, "matrix"), {a, b}),
        "magnitude-global": (weights.prune_magnitude(lm, [a, b], 0.5, "global"), {a, b}),
        "wanda": (weights.prune_wanda(lm, norms, 0.5), {a, b}),
        "noise": (weights.noise_weights(lm, [b], 0.5, seed=1), {b}),
        "heads": (weights.prune_heads(lm, {1: [0, 2]}), {"L1.attn.o"}),
        "neurons": (weights.prune_neurons(lm, {0: [1, 4]}), {"L0.mlp.down"}),
        "bitflip": (weights.flip_weight_bits(lm, {entry[0]: [entry[1:]]}, "exponent_msb"), {entry[0]}),
        "bitflip-fp32": (weights.flip_weight_bits(lm, {entry[0]: [entry[1:]]}, "mantissa_lsb", "float32"), {entry[0]}),
        "entries": (weights.zero_weight_entries(lm, {b: [(0, 0), (1, 2)]}), {b}),
    }


# --------------------------------------------------------------------------------------------------
# Names through the adapter
# --------------------------------------------------------------------------------------------------
def test_weight_names_resolve_to_matrices(tiny_lm):
    names = weight_names(tiny_lm)
    per_layer = len(tiny_lm.adapter.weights)
    assert len(names) == tiny_lm.n_layers * per_layer and len(set(names)) == len(names)
    for name in names:
        w = weight_module(tiny_lm, name).weight
        assert w.ndim == 2
    canon = {c for c, _ in tiny_lm.adapter.weights}
    assert canon <= {"attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.gate_up",
                     "mlp.down"}
    assert {"attn.o", "mlp.down"} <= canon
    assert {"attn.q", "attn.k", "attn.v"} <= canon or "attn.qkv" in canon  # separate or fused
    assert "mlp.up" in canon or "mlp.gate_up" in canon
    assert weight_module(tiny_lm, "L1.attn.o") is tiny_lm.layer_module(1, "attn_out")
    assert weight_module(tiny_lm, "L0.mlp.down") is tiny_lm.layer_module(0, "mlp_out")


@pytest.mark.parametrize("bad", ["L9.attn.o", "L0.attn.z", "layers.0.mlp.down", "mlp.down", "L-1.attn.o"])
def test_bad_weight_name_is_named(tiny_factory, bad):
    lm = tiny_factory("llama")
    with pytest.raises(ValueError, match="weight|Unknown"):
        parse_weight_name(lm, bad)
    with pytest.raises(ValueError):
        with weights.zero_weights(lm, [bad]):
            pass


# --------------------------------------------------------------------------------------------------
# Every edit is undone bit-exactly and touches only what it names
# --------------------------------------------------------------------------------------------------
def test_every_edit_restores_and_touches_only_named(tiny_lm):
    lm = tiny_lm
    checksum = weights.state_checksum(lm)
    clean = _logits(lm)
    for kind, (ctx, named) in _edits(lm).items():
        before = _params(lm)
        with ctx:
            changed = _changed(lm, before)
            assert changed, f"{kind} changed nothing"
            assert changed <= {_param_name(lm, n) for n in named}, kind
        assert weights.state_checksum(lm) == checksum, kind
    assert torch.equal(_logits(lm), clean)


def test_edit_restored_after_exception_in_block(tiny_lm):
    lm = tiny_lm
    checksum = weights.state_checksum(lm)
    for kind, (ctx, _) in _edits(lm).items():
        with pytest.raises(RuntimeError, match="boom"):
            with ctx:
                assert weights.state_checksum(lm) != checksum
                raise RuntimeError("boom")
        assert weights.state_checksum(lm) == checksum, kind


def test_edit_restored_after_failing_edit_function(tiny_factory):
    lm = tiny_factory("llama")
    checksum = weights.state_checksum(lm)
    names = weight_names(lm)

    def bad(w):
        return w[:1]  # wrong shape: refused after the first matrix was already zeroed

    with pytest.raises(ValueError, match="returned shape"):
        with weights.edit_weights(lm, {names[0]: lambda w: w.zero_(), names[1]: bad}):
            pass
    assert weights.state_checksum(lm) == checksum


def test_tied_embedding_is_refused_unless_allowed(tiny_factory):
    lm = tiny_factory("llama", tie_word_embeddings=True)
    lm.model.tie_weights()
    assert lm.module("unembed").weight is lm.module("embed").weight
    checksum = weights.state_checksum(lm)
    with pytest.raises(ValueError, match="shared|tied"):
        with weights.edit_weights(lm, {"unembed": lambda w: w.zero_()}):
            pass
    with pytest.raises(ValueError, match="same tensor"):
        with weights.edit_weights(lm, {"unembed": lambda w: w.zero_(), "embed": lambda w: w.zero_()},
                             allow_shared=True):
            pass
    with weights.edit_weights(lm, {"unembed": lambda w: w.mul_(2)}, allow_shared=True):
        assert weights.state_checksum(lm) != checksum
    assert weights.state_checksum(lm) == checksum


def test_edit_under_inference_mode_restores(tiny_factory):
    lm = tiny_factory("qwen2")
    checksum = weights.state_checksum(lm)
    with torch.inference_mode():
        with weights.prune_magnitude(lm, weight_names(lm), 0.3):
            lm.model(input_ids=IDS)
    assert weights.state_checksum(lm) == checksum


def test_zero_noise_reproduces_clean_logits(tiny_lm):
    clean = _logits(tiny_lm)
    with weights.noise_weights(tiny_lm, weight_names(tiny_lm), 0.0, seed=5):
        assert torch.equal(_logits(tiny_lm), clean)
    with weights.noise_weights(tiny_lm, weight_names(tiny_lm), 0.1, seed=5):
        noisy = _logits(tiny_lm)
    with weights.noise_weights(tiny_lm, weight_names(tiny_lm), 0.1, seed=5):
        assert torch.equal(_logits(tiny_lm), noisy)  # a seed is a fixed draw
    assert not torch.allclose(noisy, clean)


def test_noise_scale_is_relative_to_matrix_std(tiny_factory):
    lm = tiny_factory("llama")
    name = weight_names(lm)[0]
    w0 = weight_module(lm, name).weight.detach().clone()
    with weights.noise_weights(lm, [name], 0.5, seed=0):
        delta = weight_module(lm, name).weight.detach() - w0
    assert delta.std().item() == pytest.approx(0.5 * w0.std().item(), rel=0.1)


def test_prune_heads_equals_zero_ablation(tiny_lm):
    heads = {0: [1], 1: [0, 3]}
    with iv.ablate_heads(tiny_lm, heads, "zero"):
        ref = _logits(tiny_lm)
    with weights.prune_heads(tiny_lm, heads):
        got = _logits(tiny_lm)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_prune_neurons_equals_zero_ablation_and_restores(tiny_lm):
    neurons = {0: [1, 5], 1: [tiny_lm.d_mlp - 1]}
    before = weights.state_checksum(tiny_lm)
    with iv.ablate_neurons(tiny_lm, neurons, "zero"):
        ref = _logits(tiny_lm)
    with weights.prune_neurons(tiny_lm, neurons):
        got = _logits(tiny_lm)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, _logits(tiny_lm), atol=1e-4)
    assert weights.state_checksum(tiny_lm) == before
    with pytest.raises(ValueError, match=f"neuron\\(s\\) \\[{tiny_lm.d_mlp}\\]"):
        weights.prune_neurons(tiny_lm, {0: [tiny_lm.d_mlp]})


def test_weight_edits_are_batch_invariant(tiny_factory):
    lm = tiny_factory("mistral")
    rows = torch.stack([IDS[0], IDS[0].flip(0), IDS[0].roll(3)])
    with weights.prune_magnitude(lm, weight_names(lm), 0.5):
        batched = _logits(lm, rows)
        single = torch.cat([_logits(lm, r[None]) for r in rows])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Bit arithmetic on known values
# --------------------------------------------------------------------------------------------------
def test_flip_bit_known_bfloat16_values():
    one = torch.tensor([1.0])
    assert weights.flip_bit(one, "sign").item() == -1.0
    assert math.isinf(weights.flip_bit(one, "exponent_msb").item())  # exponent 127 -> 255: inf
    assert weights.flip_bit(one, "exponent_lsb").item() == 0.5  # exponent 127 -> 126
    assert weights.flip_bit(one, "mantissa_lsb").item() == 1.0 + 2 ** -7  # the next bfloat16 after 1.0
    assert weights.flip_bit(one, "mantissa_msb").item() == 1.5
    assert weights.flip_bit(torch.tensor([0.01]), "exponent_msb").item() == pytest.approx(
        torch.tensor(0.01).to(torch.bfloat16).item() * 2.0 ** 128, rel=1e-6)  # finite, ~3e36
    assert weights.flip_bit(torch.tensor([-2.0]), 15).item() == 2.0
    assert math.isnan(weights.flip_bit(torch.tensor([1.5]), "exponent_msb").item())  # all-ones exponent + mantissa
    x = torch.randn(100)
    for bit in range(16):
        once = weights.flip_bit(x, bit)
        ok = ~once.isnan()  # a NaN's payload does not survive the float32 round trip
        twice = weights.flip_bit(once, bit)
        assert torch.equal(twice[ok], x.to(torch.bfloat16).float()[ok])  # an involution on the bf16 value


def test_flip_bit_known_float16_values():
    one = torch.tensor([1.0])
    assert weights.flip_bit(one, "sign", "float16").item() == -1.0
    assert math.isinf(weights.flip_bit(one, "exponent_msb", "float16").item())  # exponent 15 -> 31
    assert weights.flip_bit(one, "mantissa_lsb", "float16").item() == 1.0 + 2 ** -10
    assert weights.flip_bit(torch.tensor([0.01]), "exponent_msb", "float16").item() == pytest.approx(
        torch.tensor(0.01).half().item() * 2.0 ** 16)  # finite in float16's narrow range
    assert weights.BIT_POSITIONS["float16"]["exponent_lsb"] == 10


def test_flip_bit_known_float32_values():
    one = torch.tensor([1.0])
    assert weights.flip_bit(one, "sign", "float32").item() == -1.0
    assert math.isinf(weights.flip_bit(one, "exponent_msb", "float32").item())  # exponent 127 -> 255
    assert weights.flip_bit(one, "exponent_lsb", "float32").item() == 0.5
    assert weights.flip_bit(one, "mantissa_lsb", "float32").item() == 1.0 + 2 ** -23  # the next float32
    assert weights.flip_bit(one, "mantissa_msb", "float32").item() == 1.5
    x = torch.tensor([0.0123456789])  # not a bfloat16 value: a float32 flip starts from it exactly
    assert weights.round_to_format(x, "float32").item() == x.item() != weights.round_to_format(x, "bfloat16").item()
    assert weights.flip_bit(x, "sign", "float32").item() == -x.item()
    assert weights.flip_bit(x, "exponent_msb", "float32").item() == pytest.approx(x.item() * 2.0 ** 128, rel=1e-6)
    assert weights.flip_bit(x, "sign", "bfloat16").item() == -weights.round_to_format(x, "bfloat16").item()
    assert weights.BIT_POSITIONS["float32"] == {"sign": 31, "exponent_msb": 30, "exponent_lsb": 23,
                                                "mantissa_msb": 22, "mantissa_lsb": 0}
    y = torch.randn(100)
    for bit in range(32):
        once = weights.flip_bit(y, bit, "float32")
        assert int((once.view(torch.int32) ^ y.view(torch.int32)).ne(0).sum()) == 100  # one bit of each changed
        assert torch.equal(weights.flip_bit(once, bit, "float32").view(torch.int32), y.view(torch.int32))


def test_float32_flip_refused_on_narrower_weights(tiny_factory):
    lm = tiny_factory("llama")
    lm.model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="wider"):
        weights.flip_weight_bits(lm, {"L0.mlp.down": [(0, 0)]}, "sign", "float32")


@pytest.mark.parametrize("bad, fmt", [("exponent", "bfloat16"), (16, "bfloat16"), ("sign", "float8"),
                                      (32, "float32")])
def test_bad_bit_is_named(bad, fmt):
    with pytest.raises(ValueError, match="bit|format"):
        weights.flip_bit(torch.ones(1), bad, fmt)


def test_flip_weight_bits_changes_one_weight(tiny_factory):
    lm = tiny_factory("gpt2")  # Conv1D: (row, col) are (out, in) coordinates on a transposed weight
    name = "L1.mlp.down"
    w = weight_module(lm, name).weight
    before = w.detach().clone()
    with weights.flip_weight_bits(lm, {name: [(3, 5)]}, "sign"):
        diff = (w.detach() != before).nonzero().tolist()
        assert diff == [[5, 3]]  # stored as (in, out)
        assert w[5, 3].item() == -before[5, 3].to(torch.bfloat16).item()
    assert torch.equal(w.detach(), before)


# --------------------------------------------------------------------------------------------------
# Pruning masks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 1.0])
def test_magnitude_and_wanda_reach_sparsity(sparsity):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 30, generator=gen)
    norm = torch.rand(30, generator=gen) + 0.1
    m = weights.magnitude_mask(w, sparsity, "matrix")
    assert int(m.sum()) == round(sparsity * w.numel())
    if 0 < sparsity < 1:
        assert w.abs()[m].max() <= w.abs()[~m].min()
    mr = weights.magnitude_mask(w, sparsity, "row")
    assert (mr.sum(1) == round(sparsity * 30)).all()
    wm = weights.wanda_mask(w, norm, sparsity)
    assert (wm.sum(1) == round(sparsity * 30)).all()  # exactly per output row
    if 0 < sparsity < 1:
        score = w.abs() * norm
        for r in range(12):
            assert score[r][wm[r]].max() <= score[r][~wm[r]].min()


def test_wanda_with_equal_norms_is_rowwise_magnitude():
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    wm = weights.wanda_mask(w, torch.ones(10), 0.4)
    assert torch.equal(wm, weights.magnitude_mask(w, 0.4, "row"))
    for r in range(6):
        assert torch.equal(wm[r], weights.magnitude_mask(w[r:r + 1], 0.4, "matrix")[0])
    assert torch.equal(weights.wanda_mask(w, torch.ones(10), 0.4, "matrix"), weights.magnitude_mask(w, 0.4, "matrix"))


def _smallest_stable(score: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: the k smallest entries of a 1-D score, ties to the lowest positions (a stable sort)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[torch.sort(score.reshape(-1), stable=True).indices[:k]] = True
    return mask.view_as(score)


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.75, 1.0])
def test_row_magnitude_prunes_smallest_of_each_row_with_ties(sparsity):
    # quantized-looking weights: few distinct magnitudes, so ties at every threshold
    gen = torch.Generator().manual_seed(4)
    w = (torch.randint(-3, 4, (9, 20), generator=gen) * 0.25).float()
    m = weights.magnitude_mask(w, sparsity, "row")
    k = round(sparsity * w.shape[1])
    assert (m.sum(1) == k).all()  # exactly round(s * in) in every row
    for r in range(w.shape[0]):
        assert torch.equal(m[r], _smallest_stable(w[r].abs(), k))  # the smallest |w| of the row, ties first-come
        if 0 < k < w.shape[1]:
            assert w[r].abs()[m[r]].max() <= w[r].abs()[~m[r]].min()
    # per matrix: unchanged, the round(s * numel) smallest |w| of the whole matrix
    assert torch.equal(weights.magnitude_mask(w, sparsity, "matrix"),
                       _smallest_stable(w.abs(), round(sparsity * w.numel())))


@pytest.mark.parametrize("group", ["row", "matrix", "global"])
def test_prune_groups_on_a_model(tiny_factory, group):
    lm = tiny_factory("llama")
    names = weight_names(lm)
    before = {n: weights.out_in(lm, n).detach().clone() for n in names}
    with weights.prune_magnitude(lm, names, 0.4, group):
        after = {n: weights.out_in(lm, n).detach().clone() for n in names}
    pruned = {n: (after[n] == 0) & (before[n] != 0) for n in names}
    if group == "row":
        for n in names:
            assert (pruned[n].sum(1) == round(0.4 * before[n].shape[1])).all(), n
    elif group == "matrix":
        for n in names:
            assert int(pruned[n].sum()) == round(0.4 * before[n].numel()), n
    else:  # one threshold over all matrices: the count is exact in total, not per matrix
        total = sum(w.numel() for w in before.values())
        assert sum(int(p.sum()) for p in pruned.values()) == round(0.4 * total)
        cut = max(float(before[n].abs()[pruned[n]].max()) for n in names if pruned[n].any())
        assert all(float(before[n].abs()[~pruned[n]].min()) >= cut for n in names)
        counts = [int(p.sum()) / p.numel() for p in pruned.values()]
        assert max(counts) - min(counts) > 0.01  # matrices lose different shares


def test_global_prune_counts_ties_in_order():
    scores = {"a": torch.tensor([[1.0, 2.0, 2.0]]), "b": torch.tensor([[2.0, 0.5, 3.0]])}
    assert weights.global_prune_counts(scores, 3 / 6) == {"a": 2, "b": 1}  # 0.5, 1.0, then the first tied 2.0
    assert weights.global_prune_counts(scores, 4 / 6) == {"a": 3, "b": 1}
    assert weights.global_prune_counts(scores, 1.0) == {"a": 3, "b": 3}
    assert weights.global_prune_counts(scores, 0.0) == {"a": 0, "b": 0}


@pytest.mark.parametrize("bad", ["layer", "rows", None])
def test_bad_prune_group_is_named(tiny_factory, tmp_path, bad):
    lm = tiny_factory("llama")
    with pytest.raises(ValueError, match="group"):
        weights.magnitude_mask(torch.ones(2, 3), 0.5, bad)
    with pytest.raises(ValueError, match="group"):
        weights.prune_magnitude(lm, weight_names(lm), 0.5, bad)
    windows = perplexity.text_windows(lm, torch.arange(4, 40), context=16, stride=16)
    point = {"kind": "magnitude", "sparsity": 0.5} if bad is None else {"kind": "magnitude", "sparsity": 0.5, "group": bad}
    with pytest.raises(ValueError, match="group.*row"):
        weight_sweep.weight_sweep(lm, windows, [point], tmp_path, progress=False)
    with pytest.raises(ValueError, match="global"):
        weights.magnitude_mask(torch.ones(2, 3), 0.5, "global")  # needs all matrices


def test_wanda_norms_by_rows_equal_separate_runs(tiny_factory):
    lm = tiny_factory("llama")
    ids = torch.randint(4, 200, (5, 12), generator=torch.Generator().manual_seed(2))
    by = weights.wanda_input_norms_by_rows(lm, ids, [1, 3, 5], batch_size=2)
    for r in (1, 3, 5):
        ref = weights.wanda_input_norms(lm, ids[:r], batch_size=2)
        for name in ref:
            torch.testing.assert_close(by[r][name], ref[name])
    assert not torch.equal(by[1]["L0.mlp.down"], by[5]["L0.mlp.down"])
    with pytest.raises(ValueError, match="n_rows"):
        weights.wanda_input_norms_by_rows(lm, ids, [6])


def test_pruned_model_has_requested_sparsity(tiny_lm):
    names = weight_names(tiny_lm)
    norms = weights.wanda_input_norms(tiny_lm, IDS)
    assert set(norms) == set(names)
    for ctx, per_row in [(weights.prune_magnitude(tiny_lm, names, 0.5, "matrix"), False),
                         (weights.prune_magnitude(tiny_lm, names, 0.5, "row"), True),
                         (weights.prune_wanda(tiny_lm, norms, 0.5), True)]:
        with ctx:
            for n in names:
                w = weight_module(tiny_lm, n).weight.detach()
                w = w.T if tiny_lm.adapter.conv1d else w  # (out, in)
                if per_row:
                    assert ((w == 0).sum(1) == round(0.5 * w.shape[1])).all(), n
                else:
                    assert int((w == 0).sum()) == round(0.5 * w.numel()), n


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_sparsity_is_named(tiny_factory, bad):
    lm = tiny_factory("llama")
    with pytest.raises(ValueError, match="sparsity"):
        weights.prune_magnitude(lm, weight_names(lm), bad)


# --------------------------------------------------------------------------------------------------
# Super weights
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_super_weight_finder_finds_planted_weight(tiny_factory, arch):
    lm = tiny_factory(arch)
    name, row, col = "L1.mlp.down", 5, 7
    with weights.edit_weights(lm, {name: lambda w: w.__setitem__((row, col), 200.0)}):
        spikes = pd.DataFrame(weights.down_proj_spikes(lm, IDS))
    top = spikes.loc[spikes["out_max"].idxmax()]
    assert (int(top["layer"]), int(top["row"]), int(top["top_col"])) == (1, row, col)
    assert top["top_weight"] == 200.0


def test_find_super_weights_iterates_in_early_layers(tiny_factory):
    lm = tiny_factory("llama")
    assert weights.early_layers(lm, 0.5) == [0] and weights.early_layers(lm, 1.0) == [0, 1]
    assert weights.early_layers(lm, 0.01) == [0]
    with pytest.raises(ValueError, match="fraction"):
        weights.early_layers(lm, 0.0)
    checksum = weights.state_checksum(lm)
    planted = {"L0.mlp.down": [(5, 7, 300.0), (9, 2, 120.0)], "L1.mlp.down": [(3, 4, 500.0)]}

    def plant(cells):
        def fn(w):
            for r, c, v in cells:
                w[r, c] = v
        return fn

    with weights.edit_weights(lm, {n: plant(c) for n, c in planted.items()}):
        spikes = weights.down_proj_spikes(lm, IDS)
        assert weights.down_proj_spikes(lm, IDS, layers=[0]) == spikes[:1]  # the pass stops after layer 0
        threshold = weights.spike_threshold(spikes, 1.5)
        top = max(spikes, key=lambda e: e["out_max"])
        assert top["out_max"] >= threshold
        early = weights.find_super_weights(lm, IDS, [0], threshold=1e-3 * top["out_max"], max_weights=2,
                                           column="contribution")
        assert [(f["layer"], f["row"], f["col"]) for f in early] == [(0, 5, 7), (0, 9, 2)]  # the larger first
        assert [f["step"] for f in early] == [0, 1] and early[0]["name"] == "L0.mlp.down"
        late = weights.find_super_weights(lm, IDS, [1], threshold=1e-3 * top["out_max"], max_weights=1,
                                          column="contribution")
        assert [(f["layer"], f["row"], f["col"]) for f in late] == [(1, 3, 4)]
        assert weights.find_super_weights(lm, IDS, [0, 1], threshold=10 * top["out_max"]) == []  # nothing that big
        assert 0.5 < early[0]["share"] <= 1.5  # the planted weight makes most of its output spike
    assert weights.state_checksum(lm) == checksum
    with pytest.raises(ValueError, match="layers"):
        weights.down_proj_spikes(lm, IDS, layers=[5])
    with pytest.raises(ValueError, match="column"):
        weights.find_super_weights(lm, IDS, [0], 1.0, column="weight")


def test_paper_rule_reads_the_column_from_the_input_spike(tiny_factory):
    # a super activation: input channel 7 of L0's down projection made huge (its up-projection row
    # scaled), and W_down[5, 7] large, so output 5 spikes at the tokens where channel 7 does
    lm = tiny_factory("llama")
    def up(w):
        w[7] *= 60.0

    def down(w):
        w[5, 7] = 40.0

    edits = {"L0.mlp.up": up, "L0.mlp.down": down}
    with weights.edit_weights(lm, edits):
        spike = weights.down_proj_spikes(lm, IDS, layers=[0])[0]
        assert (spike["row"], spike["col"], spike["top_col"]) == (5, 7, 7)
        found = weights.find_super_weights(lm, IDS, [0], threshold=0.5 * spike["out_max"], max_weights=3)
        assert [(f["row"], f["col"], f["rule"]) for f in found][:1] == [(5, 7, "input")]
        assert found[0]["weight"] == 40.0 and found[0]["share"] > 0.5


def test_super_weight_search_stops_when_the_spike_is_not_the_weight_read(tiny_factory):
    # output 5 of L0's down projection is made by channel 3 (a huge weight), while channel 7 holds the
    # largest input: the paper's rule reads W_down[5, 7], zeroing it leaves the spike, so it would read
    # the same weight again; the search ends instead of listing it twice
    lm = tiny_factory("llama")

    def up(w):
        w[7] *= 60.0

    def down(w):
        w[5, 3] = 5000.0
        w[5, 7] = 1e-3

    with weights.edit_weights(lm, {"L0.mlp.up": up, "L0.mlp.down": down}):
        spike = weights.down_proj_spikes(lm, IDS, layers=[0])[0]
        assert (spike["row"], spike["col"], spike["top_col"]) == (5, 7, 3)
        found = weights.find_super_weights(lm, IDS, [0], threshold=0.5 * spike["out_max"], max_weights=3)
        assert [(f["row"], f["col"]) for f in found] == [(5, 7)]
        by_contribution = weights.find_super_weights(lm, IDS, [0], threshold=0.5 * spike["out_max"], max_weights=3,
                                                     column="contribution")
        assert [(f["row"], f["col"]) for f in by_contribution][:1] == [(5, 3)]


def test_block_matrix_formats_of_an_in_memory_model(tiny_factory):
    lm = tiny_factory("llama")
    assert weights.block_matrix_formats(lm) == {"float32 (as loaded)": len(weight_names(lm))}


# --------------------------------------------------------------------------------------------------
# Perplexity from the edited layer on; the sweep
# --------------------------------------------------------------------------------------------------
def test_windows_nll_from_layer_equals_full_forward(tiny_lm):
    ids = torch.randint(4, 200, (150,), generator=torch.Generator().manual_seed(0))
    ref, ref_w = perplexity.token_nll(tiny_lm, ids, context=40, stride=30, batch_size=2)
    windows = perplexity.text_windows(tiny_lm, ids, context=40, stride=30, batch_size=2)
    nll, win = perplexity.windows_nll(tiny_lm, windows)
    assert torch.equal(nll, ref) and torch.equal(win, ref_w)
    assert windows.n_scored == len(ref)
    last = tiny_lm.n_layers - 1
    with weights.zero_weights(tiny_lm, [f"L{last}.attn.o"]):
        full, _ = perplexity.token_nll(tiny_lm, ids, context=40, stride=30, batch_size=2)
        part, _ = perplexity.windows_nll(tiny_lm, windows, from_layer=last)
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, ref)
    head = windows.head(2)
    assert torch.equal(perplexity.windows_nll(tiny_lm, head)[0], nll[: head.n_scored])


def test_weight_sweep_resumes_and_summarises(tiny_factory, tmp_path):
    lm = tiny_factory("llama")
    ids = torch.randint(4, 200, (120,), generator=torch.Generator().manual_seed(1))
    windows = perplexity.text_windows(lm, ids, context=32, stride=32, batch_size=4)
    norms = weights.wanda_input_norms(lm, ids[None])
    ranking = pd.DataFrame([(layer, h) for layer in range(lm.n_layers) for h in range(lm.n_heads)],
                           columns=["layer", "head"])
    points = [{"kind": "dense"}, {"kind": "ablate", "layer": 1, "matrix": "mlp.down", "mode": "zero"},
              {"kind": "magnitude", "sparsity": 0.5, "group": "row"},
              {"kind": "wanda", "sparsity": 0.5, "group": "row"},
              {"kind": "heads", "order": "ranking", "seed": 0, "fraction": 0.5},
              {"kind": "heads", "order": "random", "seed": 1, "fraction": 0.5},
              {"kind": "noise", "level": 0.0, "seed": 0},
              {"kind": "bitflip", "bit": "sign", "fmt": "bfloat16", "trial": 0, "seed": 0},
              {"kind": "zero_entries", "entries": weight_sweep.entries_text([("L1.mlp.down", 0, 1)])}]
    checksum = weights.state_checksum(lm)
    kw = dict(wanda_norms=norms, head_ranking=ranking, progress=False)
    tokens, info = weight_sweep.weight_sweep(lm, windows, points[:4], tmp_path, **kw)
    calls = []
    real = perplexity.windows_nll
    perplexity.windows_nll = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        tokens2, info2 = weight_sweep.weight_sweep(lm, windows, points, tmp_path, **kw)
    finally:
        perplexity.windows_nll = real
    assert len(calls) == len(points) - 4  # the first four came from their shards
    assert weights.state_checksum(lm) == checksum
    pd.testing.assert_frame_equal(tokens2[tokens2["kind"].isin(["dense", "ablate", "magnitude", "wanda"])]
                                  [tokens.columns].reset_index(drop=True), tokens, check_dtype=False)
    dense = tokens2[tokens2["kind"] == "dense"].sort_values("position")["nll"].to_numpy()
    assert np.allclose(dense, perplexity.token_nll(lm, ids, 32, 32, 4)[0].numpy())
    summary = weight_sweep.nll_summary(tokens2, ["kind", "sparsity", "fraction", "order"], dense, block_tokens=16, n_boot=200)
    assert len(summary) == len(points) - 1 + 1  # the two head orders are separate groups
    d = summary[summary["kind"] == "dense"].iloc[0]
    assert d["nll_change"] == 0 and d["ppl_low"] <= d["perplexity"] <= d["ppl_high"]
    z = summary[summary["kind"] == "noise"].iloc[0]
    assert z["nll_change"] == 0  # zero noise is the dense model
    flip = info2[info2["kind"] == "bitflip"].iloc[0]
    assert flip["flipped"] == -flip["rounded"]
    assert int(info2.loc[info2["kind"] == "heads", "n_heads"].iloc[0]) == lm.n_layers * lm.n_heads // 2


def test_weight_sweep_rejects_bad_kind(tiny_factory, tmp_path):
    lm = tiny_factory("llama")
    windows = perplexity.text_windows(lm, torch.arange(4, 40), context=16, stride=16)
    with pytest.raises(ValueError, match="kind"):
        weight_sweep.weight_sweep(lm, windows, [{"kind": "prune"}], tmp_path, progress=False)


def test_head_prune_order(tiny_factory):
    ranking = pd.DataFrame([(1, 0), (0, 2), (0, 0), (1, 1), (0, 1), (1, 2)], columns=["layer", "head"])
    assert weight_sweep.head_prune_order(2, 3, "ranking", ranking)[:2] == [(1, 2), (0, 1)]  # least important first
    r1, r2 = weight_sweep.head_prune_order(2, 3, "random", seed=1), weight_sweep.head_prune_order(2, 3, "random", seed=2)
    assert sorted(r1) == sorted(r2) == sorted(map(tuple, ranking.to_numpy().tolist())) and r1 != r2
    with pytest.raises(ValueError, match="exactly once"):
        weight_sweep.head_prune_order(2, 3, "ranking", ranking.head(5))


def test_random_weight_entries_deterministic_and_in_range(tiny_lm):
    a = weights.random_weight_entries(tiny_lm, 50, seed=0)
    assert a == weights.random_weight_entries(tiny_lm, 50, seed=0) != weights.random_weight_entries(tiny_lm, 50, seed=1)
    for name, r, c in a:
        w = weight_module(tiny_lm, name).weight
        rows, cols = (w.shape[::-1] if tiny_lm.adapter.conv1d else w.shape)
        assert 0 <= r < rows and 0 <= c < cols


def test_break_probability_and_wilson():
    ci = metrics.wilson_interval(0, 10)
    assert ci.value == 0 and ci.low == 0 and ci.high == pytest.approx(0.2775, abs=1e-3)
    ci = metrics.wilson_interval(5, 10)
    assert (ci.low, ci.high) == pytest.approx((0.2366, 0.7634), abs=1e-3)
    with pytest.raises(ValueError):
        metrics.wilson_interval(3, 2)
    summary = pd.DataFrame({"bit": ["a"] * 4 + ["b"] * 2, "perplexity": [10, 25, np.inf, 19, 10, 11]})
    out = weight_sweep.break_probability(summary, ["bit"], dense_ppl=10.0, factor=2.0).set_index("bit")
    assert out.loc["a", "broken"] == 2 and out.loc["a", "trials"] == 4 and out.loc["b", "broken"] == 0


def test_entries_text_roundtrip():
    text = weight_sweep.entries_text([("L2.mlp.down", 5, 7), ("L2.mlp.down", 1, 0), ("L0.attn.q", 3, 4)])
    assert weight_sweep.parse_entries(text) == {"L2.mlp.down": [(5, 7), (1, 0)], "L0.attn.q": [(3, 4)]}
    with pytest.raises(ValueError, match="NAME:ROW:COL"):
        weight_sweep.parse_entries("L2.mlp.down:5")


# --------------------------------------------------------------------------------------------------
# The real GGUF model (dequantized weights)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_gguf_model_weight_edits_restore(real_lm):
    checksum = weights.state_checksum(real_lm)
    ids = IDS[:, :12] + 1000
    clean = _logits(real_lm, ids)
    names = weight_names(real_lm)
    assert len(names) == 30 * 7
    assert weights.block_matrix_formats(real_lm) == {"Q4_1": 30 * 7}  # read from the GGUF file
    with pytest.raises(ValueError, match="tied"):
        with weights.zero_weights(real_lm, ["unembed"]):
            pass
    with weights.prune_magnitude(real_lm, names[:14], 0.5):
        assert not torch.allclose(_logits(real_lm, ids), clean)
    with pytest.raises(RuntimeError):
        with weights.flip_weight_bits(real_lm, {"L3.mlp.down": [(0, 0)]}, "exponent_msb"):
            raise RuntimeError("interrupted")
    assert weights.state_checksum(real_lm) == checksum
    assert torch.equal(_logits(real_lm, ids), clean)


def test_largest_weight_entries(tiny_factory):
    lm = tiny_factory("gpt2")
    names = ["L0.mlp.down", "L1.mlp.down"]
    top = weights.largest_weight_entries(lm, 3, names)
    mags = []
    for name in names:
        w = weight_module(lm, name).weight.detach().T  # (out, in)
        mags += [(abs(float(w[r, c])), (name, r, c)) for r in range(w.shape[0]) for c in range(w.shape[1])]
    assert top == [e for _, e in sorted(mags, reverse=True)[:3]]
    assert weights.largest_weight_entries(lm, 2, names, exclude=top[:1]) == top[1:3]


def test_masks_count_ties_exactly():
    w = torch.tensor([[0.5, -0.1, 0.1, 0.1, 0.3, -0.1], [0.2, 0.2, 0.2, 0.2, 0.2, 0.2]])  # many equal |w|
    m = weights.magnitude_mask(w, 0.5, "matrix")
    assert int(m.sum()) == 6 and m[1].sum() == 2 and m[0, [1, 2, 3, 5]].all()
    mr = weights.magnitude_mask(w, 0.5, "row")
    assert mr.tolist() == [[False, True, True, True, False, False], [True, True, True, False, False, False]]
    wm = weights.wanda_mask(w, torch.ones(6), 0.5)
    assert wm.sum(1).tolist() == [3, 3] and wm[1].tolist() == [True, True, True, False, False, False]
