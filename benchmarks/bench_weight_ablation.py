"""Matrix-ablation perplexity: a full forward per ablated matrix vs recomputing from the edited layer on.

Naive (seed 003's loop): for each matrix, zero it, score the whole token stream with a full forward
(:func:`headlab.perplexity.token_nll`), restore it. headlab (:func:`headlab.perplexity.windows_nll`): the
clean input of every block is kept once (:func:`headlab.perplexity.text_windows`); an edit in layer
``l`` recomputes only blocks ``l..L-1`` and the unembedding. Both run on the same matrices (spread
evenly over the layers) in one process, and the script checks that they give the same NLL.

Usage::

    python benchmarks/bench_weight_ablation.py                  # 512 tokens, 14 matrices
    python benchmarks/bench_weight_ablation.py --tokens 2048 --matrices 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from headlab import data, perplexity, tasks
from headlab.weights import zero_weights
from headlab.models import load_model, weight_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=512, help="Wikipedia tokens scored per ablation")
    parser.add_argument("--context", type=int, default=256, help="window length (stride = context)")
    parser.add_argument("--matrices", type=int, default=14, help="matrices ablated, spread over the layers")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default="results/bench/weight_ablation.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, attn_implementation="sdpa")
    stream = tasks.text_stream(lm, data.load_wikipedia()["text"], args.tokens)
    names = weight_names(lm)
    chosen = [names[i] for i in np.linspace(0, len(names) - 1, args.matrices).round().astype(int)]

    t0 = time.perf_counter()
    naive = []
    for name in chosen:
        with zero_weights(lm, [name]):
            naive.append(perplexity.token_nll(lm, stream, args.context, args.context)[0])
    t_naive = time.perf_counter() - t0

    t0 = time.perf_counter()
    windows = perplexity.text_windows(lm, stream, args.context, args.context)
    fast = []
    for name in chosen:
        layer = int(name.split(".")[0][1:])
        with zero_weights(lm, [name]):
            fast.append(perplexity.windows_nll(lm, windows, from_layer=layer)[0])
    t_fast = time.perf_counter() - t0

    diff = max(float((a - b).abs().max()) for a, b in zip(naive, fast))
    result = {"model": args.model, "tokens": args.tokens, "matrices": len(chosen), "threads": torch.get_num_threads(),
              "naive_s": t_naive, "headlab_s": t_fast, "speedup": t_naive / t_fast, "max_abs_nll_diff": diff}
    print(f"{len(chosen)} ablated matrices x {args.tokens} tokens: full forward {t_naive:.1f} s, from the edited "
          f"layer {t_fast:.1f} s (incl. the clean pass) -> x{t_naive / t_fast:.2f}; max |NLL difference| {diff:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
