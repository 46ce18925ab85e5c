"""Neuron statistics over a corpus: streaming (aggregate inside the hook) vs storing every activation.

Streaming (:func:`headlab.neurons.neuron_stats`): each layer's activations are folded into running
sums and exact top-k lists as the forward pass produces them. Stored (the seed scripts' way): every
layer's activations of every batch are kept (:func:`headlab.interventions.capture`) and reduced at the
end. Both run on the same Wikipedia rows; the benchmark checks they give the same statistics and prints
time and the peak resident-memory increase of each (:func:`headlab.records.peak_memory`), next to the
computed size of all activations.

Usage::

    python benchmarks/bench_neuron_stats.py              # 8 rows x 256 tokens, all layers
    python benchmarks/bench_neuron_stats.py --rows 32
"""

from __future__ import annotations

import argparse
import time

import torch

from headlab import data, neurons, records, tasks
from headlab.interventions import capture
from headlab.models import load_model


def stored(lm, ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep every activation of every layer, then reduce: ``(mean |act|, max)`` per (layer, neuron)."""
    kept: list[dict[int, torch.Tensor]] = []
    with torch.inference_mode():
        for s in range(0, len(ids), batch_size):
            with capture(lm, site="mlp_out") as acts:
                lm.model(input_ids=ids[s:s + batch_size].to(lm.device), logits_to_keep=1)
            kept.append({layer: a[:, 1:].reshape(-1, a.shape[-1]).float().cpu() for layer, a in acts.items()})
        full = torch.stack([torch.cat([k[layer] for k in kept]) for layer in range(lm.n_layers)])  # (L, T, N)
    return full.abs().mean(1), full.amax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    lm = load_model(args.model)
    ids, _ = tasks.text_rows(lm, data.load_wikipedia()["text"], args.rows, args.seq_len, 2)
    with torch.inference_mode():  # warm-up (pages the weights in)
        lm.model(input_ids=ids[:args.batch_size].to(lm.device), logits_to_keep=1)
    rows = []
    t0 = time.perf_counter()
    with records.peak_memory() as mem:
        stats = neurons.neuron_stats(lm, ids, k=8, batch_size=args.batch_size, skip_first=1)
    rows.append(("streaming (neuron_stats)", time.perf_counter() - t0, mem["rss_increase"]))
    t0 = time.perf_counter()
    with records.peak_memory() as mem:
        mean_abs, mx = stored(lm, ids, args.batch_size)
    rows.append(("store every activation", time.perf_counter() - t0, mem["rss_increase"]))
    torch.testing.assert_close(stats.mean_abs, mean_abs, rtol=1e-4, atol=1e-6)
    assert torch.equal(stats.max, mx)
    dense = neurons.dense_bytes(stats.count, lm.n_layers, lm.d_mlp)
    mib = 2.0 ** 20
    print(f"{stats.count:,} tokens x {lm.n_layers} layers x {lm.d_mlp} neurons; all activations = {dense / mib:,.0f} MiB")
    print(f"{'method':28s} {'seconds':>8s} {'peak RSS +MiB':>14s}")
    for name, sec, rss in rows:
        print(f"{name:28s} {sec:8.1f} {(rss or float('nan')) / mib:14.0f}")
    print("same mean |act| and max: yes")


if __name__ == "__main__":
    main()
