"""What every chapter's setup and "what we saw" cells share.

A chapter's parameters are the names *annotated* in its cell tagged ``parameters``
(``n_prompts: int = 24  # test prompts``). The same rule is applied twice, from the two sides of a run:

* before it, on the source: :func:`declared_parameters` (``headlab grid`` validates a spec with it);
* inside it, on the kernel's globals: :func:`parameters`. IPython records module-level annotations in
  ``__annotations__``; papermill's injected cell overrides the values, not the annotations.

So the setup cell of a chapter is::

    params = chapter.parameters(globals())       # {name: value} of the parameters cell, as run
    lm = chapter.load(params, attn_implementation="sdpa")

and a "what we saw" cell builds its text with :func:`bullets`, :func:`fmt_ci`, :func:`head_label` and
:func:`head_list`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from IPython.display import Markdown

    from headlab.models import LoadedModel

__all__ = ["bullets", "declared_parameters", "declared_types", "depth_layers", "fmt_ci", "head_label", "head_list",
           "load",
           "parameters", "parameters_from_source"]

PARAMETERS_TAG = "parameters"


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------
def _declarations(source: str, where: str) -> dict[str, tuple[Any, str]]:
    """``{name: (default, annotation text)}`` of the annotated assignments in ``source``, in order."""
    out: dict[str, tuple[Any, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            names = [ast.get_source_segment(source, t) for t in node.targets]
            raise ValueError(f"{where} assigns {', '.join(map(str, names))} without a type annotation; "
                             f"write `name: type = value` (only annotated names are parameters).")
        if isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name):
            try:
                default = ast.literal_eval(node.value)
            except ValueError:
                default = ast.get_source_segment(source, node.value)
            out[node.target.id] = (default, ast.get_source_segment(source, node.annotation))
    return out


def parameters_from_source(source: str, where: str = "the parameters cell") -> dict[str, Any]:
    """``{name: default}`` of the annotated assignments ``name: type = default`` in ``source``.

    Defaults that are not literals are returned as their source text.

    Raises:
        ValueError: an assignment without annotation (:func:`parameters` would not see it).
    """
    return {name: default for name, (default, _) in _declarations(source, where).items()}


def _parameters_cell(chapter: str | Path) -> tuple[str, str]:
    """The source of a chapter's cell tagged ``parameters`` and how errors name it."""
    import jupytext

    chapter = Path(chapter)
    nb = jupytext.read(chapter, fmt="ipynb" if chapter.suffix == ".ipynb" else "py:percent")
    cells = [c for c in nb.cells if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError(f"{chapter.name} has no cell tagged `{PARAMETERS_TAG}`; papermill needs one to inject "
                         "values.")
    return cells[0].source, f"the parameters cell of {chapter.name}"


def declared_parameters(chapter: str | Path) -> dict[str, Any]:
    """The names and defaults of a chapter's ``parameters`` cell (a jupytext ``.py`` or an ``.ipynb``).

    The cell is parsed with :mod:`ast` (papermill's own line parser skips lines with a second ``=``,
    e.g. in a comment).

    Returns:
        ``{name: default}`` in the order of the cell.

    Raises:
        ValueError: the chapter has no cell tagged ``parameters``, or the cell assigns a name without
            a type annotation.
    """
    return parameters_from_source(*_parameters_cell(chapter))


def declared_types(chapter: str | Path) -> dict[str, str]:
    """``{name: annotation text}`` of a chapter's ``parameters`` cell (``{"seq_len": "int", ...}``), read
    by the same rule as :func:`declared_parameters`; :func:`headlab.params.check_parameters` checks
    values against them before a run."""
    return {name: annotation for name, (_, annotation) in _declarations(*_parameters_cell(chapter)).items()}


def parameters(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The chapter's parameters as this run sees them: every annotated global with its current value.

    Call it from the cell after the parameters cell, ``chapter.parameters(globals())``, before any
    other cell annotates a global.

    Raises:
        ValueError: ``namespace`` holds no annotations (no annotated parameters cell has run in it).
    """
    names = namespace.get("__annotations__")
    if not names:
        raise ValueError("no annotated globals: call chapter.parameters(globals()) in a notebook whose "
                         "parameters cell declares `name: type = value` lines.")
    return {name: namespace[name] for name in names if name in namespace}


def load(params: Mapping[str, Any], *, attn_implementation: str = "eager") -> LoadedModel:
    """Load ``params["model"]`` the way every chapter does.

    Reads ``model`` and, when the chapter declares them, ``device`` (``"auto"``), ``dtype``
    (``"auto"``), ``device_map`` (``""``: off) and ``torch_threads`` (0: torch's default; set before
    the model loads). ``"auto"`` and ``""`` are resolved by :func:`headlab.models.load_model`.
    """
    import torch

    from headlab.models import load_model

    if params.get("torch_threads"):
        torch.set_num_threads(int(params["torch_threads"]))
    return load_model(params["model"], device=params.get("device"), dtype=params.get("dtype"),
                      device_map=params.get("device_map"), attn_implementation=attn_implementation)


def depth_layers(n_layers: int, layers: Iterable[int] = (), name: str = "layers") -> list[int]:
    """A chapter's layer parameter resolved for a model with ``n_layers`` layers.

    Empty ``layers`` means an early, a middle and a late layer: ``n // 15``, ``n // 2`` and ``n - 2``
    (layers 2, 15 and 28 of 30; duplicates removed for shallow models), so a chapter's defaults run
    unchanged on any depth. Otherwise every entry must be an integer layer of the model.

    Args:
        n_layers: the model's number of layers.
        layers: the parameter's value.
        name: the parameter's name, for the error message.

    Returns:
        Distinct layers, sorted.

    Raises:
        ValueError: an entry that is not an integer in ``0 .. n_layers - 1`` (named with ``name``).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers={n_layers} must be positive.")
    layers = list(layers)
    if not layers:
        return sorted({n_layers // 15, n_layers // 2, max(n_layers - 2, 0)})
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"{name} = {layers} names {bad}: the model has layers 0-{n_layers - 1} (integers; "
                         f"[] picks an early, a middle and a late layer).")
    return sorted(set(layers))


# --------------------------------------------------------------------------------------------------
# "What we saw"
# --------------------------------------------------------------------------------------------------
def bullets(lines: Iterable[str | None]) -> Markdown:
    """A Markdown bullet list of the lines that are not empty or None (a cell's last expression shows it)."""
    from IPython.display import Markdown

    return Markdown("\n".join(f"- {line}" for line in lines if line))


def fmt_ci(value: Any, low: float | None = None, high: float | None = None, fmt: str = ".3f") -> str:
    """``"0.812 [0.750, 0.870]"``: a value and its interval, all three in format ``fmt``.

    ``value`` alone may also be anything holding all three: a :class:`headlab.metrics.CI`, or a row
    (mapping or Series) with ``value`` and ``low``/``high`` or ``ci_low``/``ci_high``.
    """
    if low is None or high is None:
        row = value if isinstance(value, Mapping) or hasattr(value, "index") else vars(value)
        value, low, high = (row[k] if k in row else row[f"ci_{k}"] for k in ("value", "low", "high"))
    return f"{value:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def head_label(layer: int, head: int) -> str:
    """``"L5H3"``: the name of head 3 of layer 5 (both 0-based) used in every chapter."""
    return f"L{int(layer)}H{int(head)}"


def head_list(frame: pd.DataFrame, value: str, n: int = 5, ci: bool = False, fmt: str = ".3f") -> str:
    """``"L5H3 (0.812 [0.750, 0.870]), L2H0 (...)"`` for the first ``n`` rows of ``frame``.

    Args:
        frame: rows with ``layer``, ``head`` and ``value`` columns, already in the order to list.
        value: the column shown after each head.
        ci: also show the interval from the columns ``{value}_low`` and ``{value}_high``.
        fmt: format of the numbers.
    """
    parts = []
    for r in frame.head(n).to_dict("records"):
        shown = fmt_ci(r[value], r[f"{value}_low"], r[f"{value}_high"], fmt) if ci else f"{r[value]:{fmt}}"
        parts.append(f"{head_label(r['layer'], r['head'])} ({shown})")
    return ", ".join(parts)
