"""headlab: measure what individual attention heads, FFN neurons and weights of causal LMs contribute.

Modules, in the order a chapter uses them (one place for each thing):

Models and data
* :mod:`headlab.cache` -- the checksummed cache and the pinned registry packages ``headlab fetch`` fills
* :mod:`headlab.models` -- ``load_model(spec)`` -> ``LoadedModel``; the architecture adapter table ``ADAPTERS``
* :mod:`headlab.data` -- the real data sets: sentiment, Wikipedia text, gender-bias probes, lexicons
* :mod:`headlab.tasks` -- few-shot prompt formatting, the sentiment task, prompt selection on dev

Edits and how they are applied
* :mod:`headlab.edits` -- ``HeadEdit``: one head's perturbation (noise, zero, mean), validated once, with the
  one ``apply``; ``Setting`` (mode, level, seed) resolved into edits; the seeded noise and its keys
* :mod:`headlab.interventions` -- hooks as context managers that always undo themselves (heads, neurons,
  capture of activations)
* :mod:`headlab.weights` -- weight edits restored bit-exactly: ablation, magnitude/Wanda pruning, head
  pruning, weight noise, bit flips, super-weight search

Forward passes
* :mod:`headlab.engine` -- label-token scoring through a shared-prefix cache (``engine.scoring``) and the
  exact batched head-sweep engine (``engine.headsweep``, ``engine.prefix_attention``) and the one
  "keep clean block inputs, recompute from layer l" (``engine.recompute``)
* :mod:`headlab.perplexity` -- strided-window perplexity and next-token losses of token rows (from any layer)
* :mod:`headlab.lens` -- the logit lens: the residual stream of every layer decoded
* :mod:`headlab.attention` -- attention patterns reduced as they are produced: scores, entropy, span mass
* :mod:`headlab.induction` -- repeated random tokens, induction and previous-token scores
* :mod:`headlab.bias` -- gender-pair encoding and per-head paired differences
* :mod:`headlab.neurons` -- FFN neurons: streaming activation statistics, top snippets, promoted tokens

Sweeps and statistics
* :mod:`headlab.shards` -- resumable result shards keyed by everything that changes a number, verified
  on load, one writer per point
* :mod:`headlab.schema` -- setting dicts checked against declarative field specs before any work
* :mod:`headlab.sweeps` -- head sweeps (noise and ablation of every head, one draw per seed) and their rankings
* :mod:`headlab.headrank` -- head rankings that reproduce: a designed noise experiment (label-balanced
  prefix-draw groups, antithetic pairs, two draws per prompt, racing for the top-k), ranked with intervals,
  rank intervals and corrected tests (zero/mean ablation rankings too)
* :mod:`headlab.rankcheck` -- checks of such a ranking: reproducibility between independent halves of a run,
  variance shares (prompts, prefix noise, query noise), antithetic efficiency, the seeds' fresh-noise reference
* :mod:`headlab.stats` -- cluster bootstrap and cluster-robust errors, rank intervals, Holm, variance components
* :mod:`headlab.ablation` -- set ablation: one resumable sweep of top-k vs random-k heads or neurons, and
  the top-vs-random comparison (permutation p-value, band, verdict)
* :mod:`headlab.weight_sweep` -- weight-sensitivity grids scored by perplexity
* :mod:`headlab.metrics` -- accuracy, F1, ROC-AUC, bootstrap intervals, permutation tests, readouts
* :mod:`headlab.atlas` -- the head atlas: every per-head measure the chapters saved, joined per model

Presentation and running
* :mod:`headlab.plots` -- figures from tidy frames; :mod:`headlab.widgets` -- JupyterLab explorers;
  :mod:`headlab.figures` -- the same explorers as plotly figures that work in the static HTML book
* :mod:`headlab.chapter` -- what every chapter's setup and "what we saw" cells share: its parameters (the rule
  ``headlab grid`` checks specs with), loading the model, formatting numbers and head names
* :mod:`headlab.records` -- results saved with their parameters, model fingerprint and versions
* :mod:`headlab.progress` -- progress of long loops with an ETA, into the book's build log
* :mod:`headlab.book` -- the offline Jupyter Book build: ``deps`` (what a chapter depends on; execute only
  what changed), ``execute`` (papermill runs the chapters), ``prose`` (markdown states no result the run did not
  produce), ``frontpage`` (headline results),
  ``vendor`` (JavaScript from npm), ``offline`` (static URL scan), ``browser`` (headless Chromium checks),
  ``build`` (``build_book`` and the ``headlab book`` command)
* :mod:`headlab.params` -- ``-p NAME VALUE`` values of ``headlab run`` and ``headlab book``, read as YAML
* :mod:`headlab.grid` -- ``headlab grid SPEC.yaml``: a chapter over a parameter grid, one resumable
  papermill run per point (local processes, Dask, Slurm via submitit) and a summary table
* :mod:`headlab.cli` -- the ``headlab`` command
"""

__version__ = "0.1.0"
