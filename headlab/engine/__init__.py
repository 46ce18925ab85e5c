"""Forward passes that score prompts, and the exact head-sweep engine.

* :mod:`headlab.engine.scoring` -- prompts with a shared few-shot prefix: encoding, label-token
  log-probabilities through one prefix KV cache, greedy generation.
* :mod:`headlab.engine.headsweep` -- :func:`clean_run` and :func:`sweep_heads`: every prompt under
  every head edit, recomputing only what an edit can change.
* :mod:`headlab.engine.prefix_attention` -- the fused attention over a shared prefix cache that the
  sweep uses (exact; no per-row copy of the prefix).
* :mod:`headlab.engine.recompute` -- the one "keep the clean block inputs, recompute from layer l":
  :func:`~headlab.engine.recompute.keep_block_inputs`, :func:`~headlab.engine.recompute.skip_layers_before`
  and the batched row loop :func:`~headlab.engine.recompute.forward_rows` (used by the head sweep and
  by :mod:`headlab.perplexity`).
"""

from headlab.engine.headsweep import CleanRun, clean_run, sweep_heads
from headlab.engine.scoring import (
    EncodedPrompts,
    encode_prompts,
    forward_last,
    generate_greedy,
    label_logprobs,
    label_token_ids,
    prefix_kv,
)

__all__ = ["CleanRun", "EncodedPrompts", "clean_run", "encode_prompts", "forward_last", "generate_greedy",
           "label_logprobs", "label_token_ids", "prefix_kv", "sweep_heads"]
