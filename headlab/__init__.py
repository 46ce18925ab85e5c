"""headlab: measure what individual attention heads, FFN neurons and weights of causal LMs contribute.

Modules (one place for each thing):

* :mod:`headlab.models` -- ``load_model(spec)`` and the architecture adapter table ``ADAPTERS``
* :mod:`headlab.data` -- packaged data sets (fetched by ``headlab fetch``) and few-shot prompt pieces
* :mod:`headlab.engine` -- batched forwards: label-token scoring with a shared-prefix cache, perplexity,
  the logit lens (``decode_residual``, ``lens_logits``, ``lens_label_scores``)
* :mod:`headlab.neurons` -- FFN neurons: streaming activation statistics, top snippets, promoted tokens
* :mod:`headlab.attention` -- attention patterns, induction scores, repeated random tokens, ablated losses
* :mod:`headlab.tasks` -- the few-shot sentiment task and prompt selection
* :mod:`headlab.atlas` -- the head atlas: every per-head measure the chapters saved, joined per model
* :mod:`headlab.metrics` -- accuracy, F1, ROC-AUC, bootstrap CIs, chance checks, per-layer readouts
* :mod:`headlab.plots` -- figures from tidy frames
* :mod:`headlab.records` -- results saved with their parameters, model fingerprint and versions
* :mod:`headlab.book` -- the offline Jupyter Book build: ``execute`` (papermill runs the chapters),
  ``vendor`` (JavaScript from npm), ``offline`` (static URL scan), ``browser`` (headless Chromium checks),
  ``build`` (``build_book`` and the ``headlab book`` command)
* :mod:`headlab.params` -- ``-p NAME VALUE`` values of ``headlab run`` and ``headlab book``, read as YAML
* :mod:`headlab.grid` -- ``headlab grid SPEC.yaml``: a chapter over a parameter grid, one resumable
  papermill run per point (local processes, Dask, Slurm via submitit) and a summary table
"""

__version__ = "0.1.0"
