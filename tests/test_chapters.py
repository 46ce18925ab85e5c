"""Smoke test of the book: every chapter executed with papermill on a tiny saved random model.

A chapter that raises fails ``make test`` here, in seconds, instead of in the 35-minute ``make book``.
The numbers mean nothing (the model is random, the tokenizer is a 200-token BPE); what is tested is
that every cell runs, that each chapter reads what the earlier ones wrote, and that nothing in a
chapter assumes the default model (head counts, layer counts, label tokens are read off the model).

Chapters run in book order in one results root, each into its default folder name
(``results/noise`` -> ``<root>/noise``), so 02 finds 01's prompt config, 07 the noise ranking and 08
every per-head table. The real data sets come from the fetched cache (``make test`` fetches them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from headlab.book import execute_chapter
from headlab.book.prose import require_backed_prose
from headlab.grid import chapter_parameters

from conftest import build_tiny

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CHAPTERS = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))

#: Tiny model families the chapters are smoke-tested on (keys of ``headlab.models.ADAPTERS``): Llama
#: (GQA, rotary), GPT-2 (Conv1D weights, fused QKV, learned positions) and Gemma 3 (one key/value head,
#: head_dim * n_heads != hidden size, a local layer with an 8-key window shorter than every prompt,
#: then a global one). BLOOM, GPT-Neo, Phi-3 and Falcon were run through every chapter the same way
#: when their adapter rows were added (``pytest tests/test_chapters.py`` with them listed here).
SMOKE_FAMILIES = ["llama", "gpt2", "gemma3_text"]

#: Per-chapter parameters that make each chapter run in seconds on a 2-layer, 4-head tiny model.
#: ``{root}`` is the shared results root. ``model`` and ``results_dir`` are added by the test.
SMOKE_PARAMS: dict[str, dict] = {
    "01_baseline": dict(n_dev=8, n_test=16, formats=["plain"], shot_counts=[2], shot_seeds=[0], n_generate=2,
                        ppl_tokens=192, ppl_context=64, ppl_stride=48, n_boot=20, batch_size=8),
    "02_noise_perturbation": dict(prompt_config="{root}/baseline/prompt_config.json", noise_level=1.0,
                                  prompts_per_group=4, phases=[2, 2], draws=2, top_k=2, ablations=["zero", "mean"],
                                  reference_heads=2, n_boot=50, batch_size=32),
    "03_induction": dict(n_sequences=4, n_sweep_sequences=4, seq_len=8, lags=[4, 8], n_permutations=2, max_heads=8,
                         k_list=[0, 1, 2],
                         n_boot=20, batch_size=4),
    "04_entropy": dict(n_texts=4, text_tokens=24, n_reviews=24, n_permutations=50, n_boot=20, n_show=2,
                       batch_size=4, bertviz_prompt="Please list it."),
    "05_gender_bias": dict(max_pairs=16, n_ablation_pairs=8, k_list=[0, 2], n_random=2, n_reference=2,
                           reference_tokens=16, n_boot=20, batch_size=8),
    "06_ffn_neurons": dict(seq_len=24, n_capture_rows=8, n_heldout_rows=4, heldout_len=24, n_heldout_articles=4,
                           k_examples=2, n_top=2, show_layers=[], prompt_config="{root}/baseline/prompt_config.json",
                           n_lens_prompts=8, ablation_layers=[1], k_list=[2, 4], n_permutations=2, n_boot=20,
                           batch_size=4),
    "07_weight_sensitivity": dict(ppl_tokens=192, ppl_context=32, heatmap_tokens=64, calib_tokens=128,
                                  calib_context=32, calib_sizes=[64, 128], sparsities=[0.5],
                                  head_ranking="{root}/noise/ranking.parquet",
                                  head_random_seeds=[0], noise_levels=[0.1], noise_seeds=[0], bits=["sign", "exponent_msb"],
                                  bit_trials=2, bit_tokens=64, super_tokens=64, max_super_weights=1,
                                  prompt_config="{root}/baseline/prompt_config.json", n_prompts=8,
                                  block_tokens=32, n_boot=20, batch_size=4),
    "08_head_atlas": dict(results_root="{root}", n_top=2),
}


def test_every_chapter_has_smoke_parameters_it_declares():
    """The table above names every chapter, and only parameters each chapter's parameters cell has."""
    assert sorted(SMOKE_PARAMS) == CHAPTERS
    for name, params in SMOKE_PARAMS.items():
        unknown = set(params) - set(chapter_parameters(NOTEBOOKS / f"{name}.py"))
        assert not unknown, f"{name}: SMOKE_PARAMS names {sorted(unknown)}, not in its parameters cell"


@pytest.fixture(scope="session", params=SMOKE_FAMILIES)
def tiny_model_dir(request, tokenizer, tmp_path_factory) -> Path:
    """A tiny random model of one family, saved with the test tokenizer where ``load_model`` reads it."""
    family = request.param
    # positions: a few-shot prompt of the char-level test tokenizer runs to a few hundred tokens.
    lm = build_tiny(family, tokenizer, max_position_embeddings=1024)
    out = tmp_path_factory.mktemp(f"tiny-{family}")
    lm.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


#: Results roots of the families that already ran every chapter in this session: chapter 08 of each
#: later family compares its heads with theirs (``compare_roots``), so the cross-model section runs too.
_FINISHED_ROOTS: list[Path] = []


@pytest.mark.data
@pytest.mark.timeout(900)  # per family; Gemma 3 takes ~6 min alone and more on a shared machine
def test_every_chapter_runs_on_a_tiny_model(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Execute chapters 01..08 in order; report seconds per chapter. Chapter 08 compares with the
    families that ran before (none for the first)."""
    # one thread: tiny models are much faster single-threaded on a shared machine (see conftest).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "results"
    seconds = {}
    for name in CHAPTERS:
        defaults = chapter_parameters(NOTEBOOKS / f"{name}.py")
        params = {k: v.format(root=root) if isinstance(v, str) else v for k, v in SMOKE_PARAMS[name].items()}
        params["model"] = str(tiny_model_dir)
        params["results_dir"] = str(root / Path(defaults["results_dir"]).name)
        if "compare_roots" in defaults:
            params["compare_roots"] = [str(r) for r in _FINISHED_ROOTS]
        t0 = time.time()
        execute_chapter(NOTEBOOKS / f"{name}.py", tmp_path / "executed", params, cwd=tmp_path)
        seconds[name] = round(time.time() - t0, 1)
        # chapter.parameters(globals()) saw exactly the declared names, with the injected values
        recorded = json.loads((Path(params["results_dir"]) / "config.json").read_text())["parameters"]
        assert list(recorded) == list(defaults), name
        assert {k: recorded[k] for k in params} == params, name
    require_backed_prose(tmp_path / "executed")  # the book build's prose check passes on these runs too
    if _FINISHED_ROOTS:  # the cross-model tables of chapter 08 name every family so far
        depth = pd.read_parquet(root / "head_atlas" / "cross_model_depth.parquet")
        assert depth["model"].nunique() == len(_FINISHED_ROOTS) + 1
    _FINISHED_ROOTS.append(root)
    print(f"\nsmoke seconds ({tiny_model_dir.name}): {json.dumps(seconds)}")
