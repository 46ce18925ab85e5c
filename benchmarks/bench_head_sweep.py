"""Head-sweep speed: the seed scripts' naive method vs headlab's engine, side by side in one run.

Naive (seeds 000/001): one prompt at a time, the full few-shot prompt recomputed for every prompt, a
noise hook on one head, ``model.generate`` of a few greedy tokens, the label read from the text.
Engine (:func:`headlab.engine.sweep_heads`): label-token logits from one forward pass, many
(head, prompt) rows per batch, the shared prefix and the layers before the perturbed head reused.

The naive method is far too slow to run on all heads here, so it runs on ``--naive-heads`` heads
spread evenly over the engine's ranking (from the most to the least affected head) and its
per-head time is scaled to all heads; the output says so. Both methods see the same noise on the
prompt positions (:func:`headlab.edits.head_noise`), so their rankings are comparable.

Usage::

    python benchmarks/bench_head_sweep.py                 # 64 prompts, all heads, 6 naive heads
    python benchmarks/bench_head_sweep.py --engine-dtype bfloat16 --prompts 96
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from headlab import engine, metrics, sweeps, tasks
from headlab.edits import Setting, noise_keys
from headlab.interventions import edit_heads
from headlab.models import load_model


def naive_head(lm, task, edit, rows, max_new_tokens: int) -> tuple[np.ndarray, float]:
    """The seeds' loop for one head: batch 1, full prompt, greedy ``generate``. Returns (preds, s)."""
    enc = task.encode(lm)
    P = len(enc.prefix)
    state = {"sample": 0, "step": 0}

    def fn(z: torch.Tensor) -> None:
        s = z.shape[1]
        if s > 1:  # prompt: the engine's noise (shared prefix draw + this sample's draw)
            keys = noise_keys(state["sample"], P, s - P)
        else:  # each generated token gets its own draw
            state["step"] += 1
            keys = [(f"{state['sample']}/gen{state['step']}", 1)]
        edit.apply(z[0, :, edit.head], keys)

    preds = []
    t0 = time.perf_counter()
    with edit_heads(lm, {edit.layer: fn}), torch.inference_mode():
        for i in rows:
            state.update(sample=i, step=0)
            ids = enc.full(i)[None].to(lm.device)
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=lm.tokenizer.pad_token_id or 0)
            text = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            preds.append(metrics.parse_generated_label(text, task.fmt.labels))
    return np.array(preds), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-config", default="results/baseline/prompt_config.json",
                    help="baseline chapter's validated prompt (falls back to plain, 8 shots)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--mode", default="fraction_of_std", choices=sweeps.MODES[:3])
    ap.add_argument("--level", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--naive-heads", type=int, default=4)
    ap.add_argument("--engine-layers", default="all",
                    help="'all' (default) or comma-separated layers, e.g. 0,7,14,21,28: the engine then "
                         "runs on every head of those layers and its time is scaled to all layers (said so "
                         "in the output); use layers spread over the depth, since early layers cost more")
    ap.add_argument("--max-new-tokens", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--engine-dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="results/bench/head_sweep.json")
    args = ap.parse_args()

    # transformers' default attention (sdpa) for both methods, as the seed scripts load the model
    lm = load_model(args.model, device=args.device, dtype="float32", attn_implementation="sdpa")
    config, splits, validated = tasks.load_prompt_setup(args.prompt_config, tasks.PromptConfig("plain", 8, 0))
    task = tasks.make_task(splits, "test", config).head(args.prompts)
    enc, y = task.encode(lm), task.labels
    n_heads = lm.n_layers * lm.n_heads
    print(f"model {args.model} ({lm.n_layers} layers x {lm.n_heads} heads = {n_heads}), device {lm.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"prompt {config} ({'validated' if validated else 'NOT validated: baseline not run'}); "
          f"{len(y)} prompts, prefix {len(enc.prefix)} tokens, query mean {np.mean([len(q) for q in enc.queries]):.1f}")

    # ---- engine, all heads ----------------------------------------------------------------------
    lm_e = lm if args.engine_dtype == "float32" else load_model(args.model, device=args.device, dtype=args.engine_dtype,
                                                                     attn_implementation="sdpa")
    t0 = time.perf_counter()
    clean = engine.clean_run(lm_e, enc, task.label_ids(lm_e), batch_size=args.batch_size)
    t_clean = time.perf_counter() - t0
    layers = list(range(lm.n_layers)) if args.engine_layers == "all" else [int(x) for x in args.engine_layers.split(",")]
    setting = Setting(args.mode, args.level, args.seed)
    edits = [setting.edit(layer, h, clean) for layer in layers for h in range(lm.n_heads)]
    t0 = time.perf_counter()
    lp = engine.sweep_heads(lm_e, clean, edits, batch_size=args.batch_size)
    t_sweep = time.perf_counter() - t0
    scaled = len(layers) < lm.n_layers
    if scaled:  # an edit in layer l recomputes blocks l..L-1: scale by that work
        work = lambda ls: sum(lm.n_layers - l for l in ls)  # noqa: E731
        t_engine = t_clean + t_sweep * work(range(lm.n_layers)) / work(layers)
        print(f"engine measured on every head of layers {layers} ({len(edits)} heads): clean pass {t_clean:.1f} s "
              f"+ sweep {t_sweep:.1f} s; scaled to all {n_heads} heads by the blocks each edit recomputes", flush=True)
    else:
        t_engine = t_clean + t_sweep
    sign = np.where(y == 1, 1.0, -1.0)
    clean_ld = ((clean.logprobs[:, 1] - clean.logprobs[:, 0]).numpy() * sign).mean()
    ld_drop = clean_ld - ((lp[:, :, 1] - lp[:, :, 0]).numpy() * sign).mean(1)
    argmax_acc = ((lp[:, :, 1] > lp[:, :, 0]).numpy() == y).mean(1)
    print(f"engine ({args.engine_dtype}): {n_heads} heads x {len(y)} prompts in {t_engine:.1f} s"
          f"{' (scaled)' if scaled else ''} = {n_heads * len(y) / t_engine:.1f} head-prompts/s (clean pass included)")

    # ---- naive, a subset of heads spread over the engine's ranking -------------------------------
    order = np.argsort(-ld_drop)
    pick = order[np.linspace(0, len(edits) - 1, args.naive_heads).round().astype(int)]
    naive_acc, naive_s = [], 0.0
    clean32 = clean if lm_e is lm else engine.clean_run(lm, enc, task.label_ids(lm), batch_size=args.batch_size)
    for i in pick:
        e = edits[i]
        edit_fp32 = setting.edit(e.layer, e.head, clean32)
        preds, s = naive_head(lm, task, edit_fp32, range(len(y)), args.max_new_tokens)
        naive_s += s
        naive_acc.append(metrics.accuracy(y, preds))
        print(f"  naive head L{e.layer}H{e.head}: {s:.1f} s, generation accuracy {naive_acc[-1]:.3f} "
              f"(engine: logit-diff drop {ld_drop[i]:+.3f}, argmax accuracy {argmax_acc[i]:.3f})", flush=True)
    per_head = naive_s / len(pick)
    naive_total = per_head * n_heads

    # ---- report ----------------------------------------------------------------------------------
    agree_acc = float((np.array(naive_acc) == argmax_acc[pick]).mean())
    rho = stats.spearmanr(-np.array(naive_acc), ld_drop[pick]).statistic
    rho_acc = stats.spearmanr(naive_acc, argmax_acc[pick]).statistic
    result = {
        "model": args.model, "device": str(lm.device), "threads": torch.get_num_threads(),
        "prompt": config.__dict__, "n_prompts": len(y), "n_heads": n_heads, "setting": vars(args),
        "naive_heads_measured": len(pick), "naive_seconds_per_head": per_head,
        "naive_seconds_all_heads_scaled": naive_total, "engine_seconds_all_heads": t_engine,
        "engine_scaled_from_layers": layers if scaled else None, "engine_clean_seconds": t_clean,
        "engine_sweep_seconds_measured": t_sweep, "engine_heads_measured": len(edits),
        "speedup": naive_total / t_engine,
        "naive_head_prompts_per_s": len(y) / per_head, "engine_head_prompts_per_s": n_heads * len(y) / t_engine,
        "spearman_naive_acc_drop_vs_engine_logit_drop": rho,
        "spearman_naive_acc_vs_engine_argmax_acc": rho_acc,
        "share_heads_same_accuracy": agree_acc,
    }
    print()
    print(f"naive : {per_head:.1f} s per head (measured on {len(pick)} heads) -> {naive_total:.0f} s for all "
          f"{n_heads} heads (scaled), {len(y) / per_head:.1f} head-prompts/s")
    print(f"engine: {t_engine:.1f} s for all {n_heads} heads"
          f"{f' (measured on {len(edits)} heads of layers {layers}, scaled)' if scaled else ''}, "
          f"{n_heads * len(y) / t_engine:.1f} head-prompts/s")
    print(f"SPEEDUP engine vs naive: {naive_total / t_engine:.1f}x")
    print(f"ranking agreement on the {len(pick)} naive heads: Spearman(naive generation-accuracy drop, engine "
          f"logit-diff drop) = {rho:.2f}; Spearman(naive accuracy, engine argmax accuracy) = {rho_acc:.2f}; "
          f"identical accuracy on {agree_acc:.0%} of heads")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
