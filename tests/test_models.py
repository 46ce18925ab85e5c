"""headlab.models: the adapter table on tiny random models of every architecture, and loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ARCHS, D_MLP, D_MODEL, MODEL_VOCAB, N_HEADS, N_KV_HEADS, N_LAYERS, build_tiny, tiny_config
from headlab import cache, interventions, models
from headlab.models import ADAPTERS, load_model, LoadedModel, resolve_adapter, wrap_model

#: Key/value heads of the tiny models (conftest.tiny_config) where they differ from the query heads:
#: grouped-query attention, Gemma 3's single key/value head, Falcon-7B's multi-query attention.
KV_HEADS = {"llama": N_KV_HEADS, "mistral": N_KV_HEADS, "qwen2": N_KV_HEADS, "qwen3": N_KV_HEADS, "gemma": N_KV_HEADS,
            "gemma2": N_KV_HEADS, "phi3": N_KV_HEADS, "olmo2": N_KV_HEADS, "gemma3_text": 1, "gemma3": 1,
            "falcon": 1}
#: Tiny-config head widths that differ from hidden_size / n_heads (set in conftest.tiny_config).
EXPLICIT_HEAD_DIM = {"qwen3": 16, "gemma": 16, "gemma3_text": 16, "gemma3": 16}
#: FFN widths that the config cannot set (BLOOM's is always 4 * hidden_size).
FIXED_D_MLP = {"bloom": 4 * D_MODEL}


def _ids(lm: LoadedModel, text: str = "Review: a gripping, funny film.\nSentiment:") -> torch.Tensor:
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


def _input_width(lm: LoadedModel, module: nn.Module) -> tuple[int, ...]:
    """Shape of the first input of ``module`` during a real forward pass."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        lm.model(_ids(lm))
    finally:
        handle.remove()
    assert len(seen) == 1, f"expected one call of the hooked module, got {len(seen)}"
    return seen[0]


# --------------------------------------------------------------------------------------------------
# Adapter resolution and dimensions
# --------------------------------------------------------------------------------------------------
def test_every_adapter_arch_has_a_tiny_model():
    assert set(ARCHS) == {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "olmo2",
                          "phi3", "gpt2", "gpt_neo", "gptj", "gpt_neox", "bloom", "falcon", "opt"}
    for arch in ARCHS:
        assert tiny_config(arch).model_type == arch


def test_wrap_model_resolves_adapter(tiny_lm):
    arch = tiny_lm.model_type
    assert tiny_lm.adapter is ADAPTERS[arch]
    assert not tiny_lm.model.training
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_dimensions_match_config(tiny_lm):
    arch = tiny_lm.model_type
    assert tiny_lm.n_layers == N_LAYERS
    assert tiny_lm.n_heads == N_HEADS
    assert tiny_lm.n_kv_heads == KV_HEADS.get(arch, N_HEADS)
    assert tiny_lm.n_kv_heads * tiny_lm.kv_group == tiny_lm.n_heads
    assert tiny_lm.head_dim == EXPLICIT_HEAD_DIM.get(arch, D_MODEL // N_HEADS)
    explicit = getattr(tiny_lm.config, "head_dim", None)
    if explicit is not None:
        assert tiny_lm.head_dim == explicit
    assert tiny_lm.d_model == D_MODEL
    assert tiny_lm.d_mlp == FIXED_D_MLP.get(arch, D_MLP)
    desc = tiny_lm.describe()
    assert desc["model_type"] == arch
    assert desc["n_params"] == sum(p.numel() for p in tiny_lm.model.parameters())
    assert (desc["n_layers"], desc["n_heads"], desc["head_dim"]) == (N_LAYERS, N_HEADS, tiny_lm.head_dim)
    assert desc["dtype"] == "float32" and desc["device"] == "cpu"


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_attn_out_input_is_concatenated_heads(tiny_lm, layer):
    shape = _input_width(tiny_lm, tiny_lm.layer_module(layer, "attn_out"))
    assert shape[-1] == tiny_lm.n_heads * tiny_lm.head_dim


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_mlp_out_input_is_neurons(tiny_lm, layer):
    assert _input_width(tiny_lm, tiny_lm.layer_module(layer, "mlp_out"))[-1] == tiny_lm.d_mlp
    # ... and the (first) FFN input projection maps the residual stream to d_mlp (to 2 * d_mlp where
    # it is Phi-3's fused [gate; up]).
    w_in = tiny_lm.adapter.weight_in_out(tiny_lm.layer_module(layer, "mlp_in"))
    halves = 2 if "mlp.gate_up" in dict(tiny_lm.adapter.weights) else 1
    assert tuple(w_in.shape) == (halves * tiny_lm.d_mlp, tiny_lm.d_model)


def _value_states(lm: LoadedModel, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """Value vectors ``(b, n_kv, s, head_dim)`` of ``layer``, computed from the input of the projection
    that holds them and the rows :func:`headlab.models.head_slice` names (fused or not)."""
    names = dict(lm.adapter.weights)
    name = f"L{layer}." + ("attn.v" if "attn.v" in names else "attn.qkv")
    mod = models.weight_module(lm, name)
    seen = []
    handle = mod.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        lm.model(ids)
    finally:
        handle.remove()
    x, w = seen[0], lm.adapter.weight_in_out(mod)  # (b, s, d_model), (out, in)
    part = "v" if name.endswith("qkv") else None
    vs = []
    for g in range(lm.n_kv_heads):
        sl = models.head_slice(lm, name, g * lm.kv_group, part)
        bias = mod.bias[sl.index] if getattr(mod, "bias", None) is not None else 0.0
        vs.append(x @ sl.of(w).T + bias)  # (b, s, head_dim)
    return torch.stack(vs, 1)


def _check_head_h_is_slice_h(lm: LoadedModel, layer: int) -> None:
    """Head ``h``'s output (its attention pattern times the values of its key/value head, with the
    value rows named by :func:`headlab.models.head_slice`) is the slice ``[h*d:(h+1)*d]`` of the
    attention output projection's input."""
    ids = _ids(lm)
    seen = []
    hook = lm.layer_module(layer, "attn_out").register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        out = lm.model(ids, output_attentions=True)
    finally:
        hook.remove()
    pattern = out.attentions[layer]  # (b, n_heads, s, s)
    assert pattern.shape[1] == lm.n_heads
    v = _value_states(lm, layer, ids)
    hd = lm.head_dim
    for h in range(lm.n_heads):
        expected = pattern[:, h] @ v[:, h // lm.kv_group]
        torch.testing.assert_close(seen[0][..., h * hd:(h + 1) * hd], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_head_h_is_slice_h_of_attn_out_input(tiny_lm, layer):
    """The adapter's central claim, for every architecture (query heads grouped onto key/value heads
    for GQA and multi-query attention)."""
    _check_head_h_is_slice_h(tiny_lm, layer)


def test_negative_layer_counts_from_end(tiny_lm):
    assert tiny_lm.layer_module(-1, "attn_out") is tiny_lm.layer_module(N_LAYERS - 1, "attn_out")


@pytest.mark.parametrize("layer", [99, N_LAYERS, -N_LAYERS - 1])
def test_layer_module_out_of_range(tiny_lm, layer):
    with pytest.raises(IndexError, match=f"{N_LAYERS} layers"):
        tiny_lm.layer_module(layer, "attn_out")


def test_model_level_modules(tiny_lm):
    lm = tiny_lm
    embed, final_norm, unembed = lm.module("embed"), lm.module("final_norm"), lm.module("unembed")
    assert isinstance(embed, nn.Embedding) and embed.num_embeddings == MODEL_VOCAB
    assert isinstance(unembed, nn.Linear) and unembed.out_features == MODEL_VOCAB
    assert isinstance(final_norm, nn.Module)
    # The embedding sees the input ids.
    ids = _ids(lm)
    got = []
    h = embed.register_forward_hook(lambda m, a, o: got.append(a[0]))
    try:
        lm.model(ids)
    finally:
        h.remove()
    assert len(got) == 1 and torch.equal(got[0], ids)


def _logit_lens_reproduces_logits(lm: LoadedModel) -> None:
    """final_norm output -> post_final modules -> unembed (-> soft-cap) gives the model's logits."""
    ids = _ids(lm)
    normed = []
    h = lm.module("final_norm").register_forward_hook(lambda m, a, o: normed.append(o))
    try:
        logits = lm.model(ids).logits
    finally:
        h.remove()
    assert len(normed) == 1
    x = normed[0]
    for path in lm.adapter.post_final:
        mod = models.get_module(lm.model, path)
        if mod is not None:
            x = mod(x)
    y = lm.module("unembed")(x)
    cap = getattr(lm.config, lm.adapter.logit_softcap_attr) if lm.adapter.logit_softcap_attr else None
    assert cap or lm.model_type != "gemma2", "the tiny Gemma 2 config sets a soft-cap"
    if cap:  # Gemma 2; Gemma 3 has the attribute but no cap
        y = torch.tanh(y / cap) * cap
    torch.testing.assert_close(y, logits, atol=1e-5, rtol=1e-5)


def test_final_norm_then_unembed_gives_logits(tiny_lm):
    _logit_lens_reproduces_logits(tiny_lm)


def test_opt_project_out_is_applied_after_final_norm(tiny_factory):
    """OPT with word_embed_proj_dim != hidden_size has a project_out that the adapter lists."""
    lm = tiny_factory("opt", word_embed_proj_dim=16)
    assert models.get_module(lm.model, "model.decoder.project_out") is not None
    assert lm.module("embed").embedding_dim == 16
    assert lm.d_model == D_MODEL
    _logit_lens_reproduces_logits(lm)


def test_weight_in_out_is_out_by_in(tiny_lm):
    """For Linear and GPT-2 Conv1D alike, module(x) == x @ W.T + b with W from weight_in_out."""
    lm = tiny_lm
    halves = 2 if "mlp.gate_up" in dict(lm.adapter.weights) else 1  # Phi-3's fused [gate; up]
    for mod, (n_out, n_in) in [
        (lm.layer_module(0, "attn_out"), (lm.d_model, lm.n_heads * lm.head_dim)),
        (lm.layer_module(0, "mlp_out"), (lm.d_model, lm.d_mlp)),
        (lm.layer_module(1, "mlp_in"), (halves * lm.d_mlp, lm.d_model)),
    ]:
        w = lm.adapter.weight_in_out(mod)
        assert tuple(w.shape) == (n_out, n_in)
        x = torch.randn(3, n_in, generator=torch.Generator().manual_seed(0))
        bias = mod.bias if getattr(mod, "bias", None) is not None else torch.zeros(n_out)
        torch.testing.assert_close(mod(x), x @ w.T + bias, atol=1e-5, rtol=1e-5)
    assert lm.adapter.conv1d == (lm.model_type == "gpt2")


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------
def test_resolve_adapter_unknown_lists_supported():
    with pytest.raises(ValueError) as err:
        resolve_adapter("bert")
    msg = str(err.value)
    assert "'bert'" in msg
    for key in ADAPTERS:
        assert key in msg


def test_wrap_model_rejects_unsupported_architecture(tokenizer):
    from transformers import BertConfig, BertLMHeadModel

    cfg = BertConfig(vocab_size=MODEL_VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, is_decoder=True)
    with pytest.raises(ValueError, match="bert"):
        wrap_model(BertLMHeadModel(cfg), tokenizer)


def test_load_model_missing_gguf():
    with pytest.raises(FileNotFoundError, match="x.gguf"):
        load_model("/nonexistent/x.gguf", device="cpu")


def test_load_model_missing_path():
    with pytest.raises(FileNotFoundError):
        load_model("/nonexistent/dir/model", device="cpu")


@pytest.mark.parametrize("spec", ["", "   "])
def test_load_model_empty_spec(spec):
    with pytest.raises(ValueError, match="Empty model spec"):
        load_model(spec, device="cpu")


def test_parse_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert models._parse_dtype(None, cpu) is torch.float32
    assert models._parse_dtype("auto", cuda) is torch.bfloat16
    assert models._parse_dtype("float16", cpu) is torch.float16
    assert models._parse_dtype(torch.bfloat16, cpu) is torch.bfloat16
    with pytest.raises(ValueError) as err:
        models._parse_dtype("float64", cpu)
    for name in ("float32", "float16", "bfloat16", "auto"):
        assert name in str(err.value)


def test_load_model_dir_with_several_ggufs_raises(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="2 .gguf"):
        load_model(str(tmp_path), device="cpu")


# --------------------------------------------------------------------------------------------------
# Loading a save_pretrained directory
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory, tokenizer):
    lm = build_tiny("llama", tokenizer, seed=3)
    path = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return lm, path


def test_load_model_bad_dtype_names_allowed(saved_llama):
    _, path = saved_llama
    with pytest.raises(ValueError, match="float64") as err:
        load_model(str(path), device="cpu", dtype="float64")
    assert "bfloat16" in str(err.value) and "float32" in str(err.value)


def test_load_model_from_save_pretrained_dir(saved_llama):
    lm, path = saved_llama
    loaded = load_model(Path(path), device="cpu")
    assert loaded.adapter is ADAPTERS["llama"]
    assert loaded.source == str(Path(path).resolve())
    assert loaded.fingerprint and len(loaded.fingerprint) == 16
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.padding_side == "right"
    text = "Review: a tedious mess.\nSentiment:"
    ids = loaded.tokenizer(text)["input_ids"]
    assert ids == lm.tokenizer(text)["input_ids"]
    x = torch.tensor([ids])
    torch.testing.assert_close(loaded.model(x).logits, lm.model(x).logits, atol=0, rtol=0)
    assert (loaded.n_layers, loaded.n_heads, loaded.n_kv_heads, loaded.head_dim) == (
        lm.n_layers, lm.n_heads, lm.n_kv_heads, lm.head_dim)
    # The fingerprint depends only on the weight files, so loading again gives the same one.
    assert load_model(str(path), device="cpu").fingerprint == loaded.fingerprint


@pytest.mark.parametrize("arch", ["gpt_neo", "bloom"])
def test_load_model_falls_back_to_eager_where_sdpa_is_missing(tokenizer, tmp_path, arch):
    """Chapters that need no attention weights ask for sdpa; GPT-Neo and BLOOM have only their eager
    attention (same numbers), so they load with it and say so."""
    lm = build_tiny(arch, tokenizer)
    lm.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", attn_implementation="sdpa")
    assert loaded.model.config._attn_implementation == "eager"
    assert "'sdpa' is not available" in loaded.info["attn_implementation"]
    x = _ids(lm)
    torch.testing.assert_close(loaded.model(x).logits, lm.model(x).logits, atol=0, rtol=0)


def test_load_model_dtype_option(saved_llama):
    _, path = saved_llama
    assert load_model(str(path), device="cpu", dtype="bfloat16").dtype == torch.bfloat16


def test_load_model_device_map_auto_on_cpu(saved_llama):
    """accelerate's ``device_map="auto"`` (for a model too big for one GPU) places every weight on the
    CPU when there is no GPU, and gives the plain load's logits, with and without a head ablation."""
    from headlab.interventions import ablate_heads

    lm, path = saved_llama
    mapped = load_model(str(path), device_map="auto")
    assert {p.device.type for p in mapped.model.parameters()} == {"cpu"} and mapped.dtype == torch.float32
    assert set(getattr(mapped.model, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
    x = torch.tensor([lm.tokenizer("Review: a tedious mess.\nSentiment:")["input_ids"]])
    torch.testing.assert_close(mapped.model(x).logits, lm.model(x).logits, atol=0, rtol=0)
    with ablate_heads(mapped, {1: [0, 2]}):
        ablated = mapped.model(x).logits
    with ablate_heads(lm, {1: [0, 2]}):
        torch.testing.assert_close(ablated, lm.model(x).logits, atol=0, rtol=0)
    assert not torch.equal(ablated, lm.model(x).logits)


# --------------------------------------------------------------------------------------------------
# The real GGUF model (slow)
# --------------------------------------------------------------------------------------------------
def _embedded_gguf_path() -> Path:
    from headlab.cache import PACKAGES, fetched_file

    pkg_name, member = models.EMBEDDED_MODELS["smollm2-135m"]
    pkg = PACKAGES[pkg_name]
    return fetched_file(pkg.name, pkg.version, member)


@pytest.mark.slow
def test_embedded_model_dimensions(real_lm):
    assert real_lm.model_type == "llama"
    assert (real_lm.n_layers, real_lm.n_heads, real_lm.n_kv_heads, real_lm.head_dim) == (30, 9, 3, 64)
    assert real_lm.d_model == 576 and real_lm.d_mlp == 1536
    assert real_lm.spec == "smollm2-135m"
    assert real_lm.fingerprint and "embedded smollm2-135m" in real_lm.source


@pytest.mark.slow
def test_gguf_path_and_embedded_name_load_the_same_converted_weights(real_lm):
    gguf = _embedded_gguf_path()
    assert gguf.is_file() and gguf.suffix == ".gguf"
    converted = cache.cache_dir() / "converted" / f"{gguf.stem}-{real_lm.fingerprint}"
    assert (converted / "headlab.json").is_file(), "the first load must leave a converted copy in the cache"
    assert (converted / "model.safetensors").is_file()
    by_path = load_model(str(gguf), device="cpu")
    assert by_path.source == str(gguf.resolve())
    assert by_path.fingerprint == real_lm.fingerprint
    assert (by_path.n_layers, by_path.n_heads, by_path.n_kv_heads, by_path.head_dim) == (30, 9, 3, 64)
    ids = torch.tensor([real_lm.tokenizer("The capital of France is")["input_ids"]])
    assert by_path.tokenizer("The capital of France is")["input_ids"] == ids[0].tolist()
    torch.testing.assert_close(by_path.model(ids).logits, real_lm.model(ids).logits, atol=0, rtol=0)
    # A directory holding exactly one .gguf file is accepted too.
    by_dir = load_model(str(gguf.parent), device="cpu")
    assert by_dir.fingerprint == real_lm.fingerprint


# --------------------------------------------------------------------------------------------------
# Fused weights: which rows and columns belong to a head or a neuron
# --------------------------------------------------------------------------------------------------
def _perturbed(lm: LoadedModel, name: str, index: torch.Tensor, axis: int, site: str, ids: torch.Tensor):
    """Input of ``site`` in the layer of ``name`` with and without noise on the chosen rows/columns."""
    layer = models.parse_weight_name(lm, name)[0]
    w = lm.adapter.weight_in_out(models.weight_module(lm, name))  # (out, in) view
    noise = torch.randn(w.index_select(axis, index).shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), interventions.capture(lm, [layer], site=site) as before:
        lm.model(ids)
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.index_add_(axis, index, noise)
            with interventions.capture(lm, [layer], site=site) as after:
                lm.model(ids)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    return before[layer][0], after[layer][0]


def _heads_coupled_by_qk_norm(lm: LoadedModel, layer: int) -> bool:
    """OLMo 2 normalises q (and k) over all heads together, so one head's query rows reach every head."""
    norm = getattr(lm.layer_module(layer, "attn"), "q_norm", None)
    return norm is not None and norm.weight.numel() == lm.n_heads * lm.head_dim


def _check_head_slices(lm: LoadedModel) -> None:
    """Noise on the rows :func:`head_slice` names for query head ``h`` changes only head ``h``'s output;
    on its key or value rows, only the outputs of the heads that share that key/value head."""
    ids = _ids(lm)
    layer = 1
    fused = "attn.qkv" in dict(lm.adapter.weights)
    d = lm.head_dim
    for h in (0, lm.n_heads - 1):
        group = {g for g in range(lm.n_heads) if g // lm.kv_group == h // lm.kv_group}
        for part in ("q", "k", "v"):
            if part != "v" and _heads_coupled_by_qk_norm(lm, layer):
                continue
            name = f"L{layer}." + ("attn.qkv" if fused else f"attn.{part}")
            sl = models.head_slice(lm, name, h, part if fused else None)
            assert sl.axis == 0 and len(sl.index) == d
            before, after = _perturbed(lm, name, sl.index, 0, "attn_out", ids)
            changed = {g for g in range(lm.n_heads)
                       if not torch.equal(before[..., g * d:(g + 1) * d], after[..., g * d:(g + 1) * d])}
            # a query change moves head h only; a key/value change every head of its group
            assert changed == ({h} if part == "q" else group), (name, part, h, changed)


def test_head_slices_name_each_heads_rows(tiny_lm):
    _check_head_slices(tiny_lm)


def test_neuron_slices_name_each_neurons_rows_and_columns(tiny_lm):
    """Noise on the rows :func:`neuron_slice` names for neuron ``n`` (gate, up or Phi-3's fused [gate; up])
    changes only activation ``n``; zeroing its column of the down projection equals zero-ablating it."""
    lm, ids, layer = tiny_lm, _ids(tiny_lm), 0
    for canon, _ in lm.adapter.weights:
        if not canon.startswith("mlp.") or canon == "mlp.down":
            continue
        parts = ("gate", "up") if canon == "mlp.gate_up" else (None,)
        for part in parts:
            moved = set()
            for n in (0, 1, 2, lm.d_mlp - 1):
                sl = models.neuron_slice(lm, f"L{layer}.{canon}", n, part)
                before, after = _perturbed(lm, f"L{layer}.{canon}", sl.index, 0, "mlp_out", ids)
                changed = set((before != after).reshape(-1, lm.d_mlp).any(0).nonzero().flatten().tolist())
                assert changed <= {n}, (canon, part, n, changed)
                moved |= changed
            assert moved, (canon, part)  # (a ReLU neuron may stay off at every token; not all four)
    sl = models.neuron_slice(lm, f"L{layer}.mlp.down", 3)
    assert sl.axis == 1 and sl.index.tolist() == [3]
    w = lm.adapter.weight_in_out(models.weight_module(lm, f"L{layer}.mlp.down"))
    saved = w.detach().clone()
    with torch.no_grad():
        try:
            w[:, sl.index] = 0.0
            pruned = lm.model(ids).logits
        finally:
            w.copy_(saved)
        with interventions.ablate_neurons(lm, {layer: [3]}):
            ablated = lm.model(ids).logits
    torch.testing.assert_close(pruned, ablated, atol=1e-5, rtol=1e-5)


def test_slices_reject_what_a_weight_does_not_hold(tiny_factory):
    lm = tiny_factory("phi3")
    with pytest.raises(ValueError, match="part='q'"):
        models.head_slice(lm, "L0.attn.qkv", 0)
    with pytest.raises(ValueError, match="no attention heads"):
        models.head_slice(lm, "L0.mlp.down", 0)
    with pytest.raises(ValueError, match="head 4 out of range"):
        models.head_slice(lm, "L0.attn.o", 4)
    with pytest.raises(ValueError, match="no FFN neurons"):
        models.neuron_slice(lm, "L0.attn.o", 0)
    with pytest.raises(ValueError, match="'gate', 'up'"):
        models.neuron_slice(lm, "L0.mlp.gate_up", 0, "down")
    llama = tiny_factory("llama")
    with pytest.raises(ValueError, match="holds 'k' only"):
        models.head_slice(llama, "L0.attn.k", 0, "v")
    # GQA: query heads 0 and 1 read key/value head 0
    assert torch.equal(models.head_slice(llama, "L0.attn.k", 1).index, models.head_slice(llama, "L0.attn.k", 0).index)


# --------------------------------------------------------------------------------------------------
# Attention properties read from the config, checked against the model
# --------------------------------------------------------------------------------------------------
def _check_windows(lm: LoadedModel) -> None:
    """``layer_windows`` is what each layer really does: a windowed layer puts no weight on keys ``w`` or
    more positions back and some on the key ``w - 1`` back; a global layer reaches further than any
    window the model has."""
    ids = torch.tensor([lm.tokenizer("The cat sat on the mat. The dog ran in the park. A bird sang.")["input_ids"]])
    s = ids.shape[1]
    with torch.no_grad():
        att = lm.model(ids, output_attentions=True).attentions
    dist = torch.arange(s)[:, None] - torch.arange(s)[None, :]  # query - key
    assert len(lm.layer_windows) == lm.n_layers
    short = [w for w in lm.layer_windows if w is not None and w < s]
    for layer, w in enumerate(lm.layer_windows):
        p = att[layer][0]  # (H, s, s)
        if w is None:
            far = min(short, default=s // 2)
            assert p[:, dist >= far].abs().sum() > 0, layer
        elif w < s:  # (Gemma 2's default 4096 cannot be seen on a short text)
            assert torch.all(p[:, dist >= w] == 0), layer
            assert torch.all(p[:, dist == w - 1] > 0), layer


def test_layer_windows_match_the_attention_pattern(tiny_lm):
    _check_windows(tiny_lm)


def test_own_attention_flag_matches_transformers(tiny_lm):
    """``Adapter.own_attention`` (no shared-prefix attention) is set exactly for the architectures whose
    attention transformers cannot swap (it warns and keeps its own code for them)."""
    can_swap = getattr(type(tiny_lm.model), "_can_set_attn_implementation", None)
    if can_swap is None:
        pytest.skip("this transformers version has no _can_set_attn_implementation")
    assert bool(tiny_lm.adapter.own_attention) == (not can_swap())


def test_variants_layout_windows_and_lens(tiny_variant):
    """Falcon's three layouts, ALiBi, Phi-3 with a window, Llama 3 rope scaling, Gemma 2 / Mistral with
    short windows: head slices, windows, the head = slice claim and the logit lens."""
    for layer in range(N_LAYERS):
        _check_head_h_is_slice_h(tiny_variant, layer)
    _check_head_slices(tiny_variant)
    _check_windows(tiny_variant)
    _logit_lens_reproduces_logits(tiny_variant)


def test_falcon_variants_kv_heads(tokenizer):
    """Falcon's key/value heads from its fused weights: multi-query 1, new_decoder_architecture
    num_kv_heads, the classic multi-head variant one per query head."""
    assert build_tiny("falcon", tokenizer).n_kv_heads == 1
    assert build_tiny("falcon", tokenizer, new_decoder_architecture=True, num_kv_heads=2).n_kv_heads == 2
    assert build_tiny("falcon", tokenizer, multi_query=False).n_kv_heads == N_HEADS
