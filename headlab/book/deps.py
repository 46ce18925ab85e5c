"""What an executed chapter depends on, recorded in its notebook, and what a rebuild has to do with it.

A chapter's outputs are a function of its **inputs**, each hashed on its own so that the log can say
which one changed (:func:`chapter_inputs`):

* ``code`` -- the source of its code cells, in order, with the cell tags that change execution (every
  tag but the rendering tags of :data:`RENDER_TAGS`, e.g. ``parameters``, ``raises-exception``);
* ``parameters`` -- the build's ``-p`` values for names its parameters cell declares (the defaults are
  part of ``code``; papermill injects undeclared names too, but nothing in a chapter reads a global it
  neither declares nor assigns);
* ``headlab`` -- the code of every ``headlab`` module it imports, followed through the imports of
  those modules (:func:`headlab_modules`): editing ``headlab/figures.py`` re-runs the chapters that
  draw with it, not the others. A module counts by its syntax tree without docstrings, so editing a
  docstring or a comment re-runs nothing (the one trace it could leave is the line number in a
  warning printed from that module);
* ``environment`` -- Python, the versions of :data:`ENV_PACKAGES` and the device (CPU or which GPU);
* ``data`` -- the checksums of the pinned registry packages that carry the default model and the data
  sets (:data:`headlab.cache.PACKAGES`), and the size and time stamp of the files of a model given by a
  local path;
* ``reads`` -- the files of other chapters' results it reads, declared in :data:`READS` (02 reads
  01's prompt configuration, 08 the per-head tables of 02-05). A ``config.json`` counts by its
  ``model`` entry only (the rest records times).

The **markdown** (markdown cells and rendering tags) is hashed apart. Markdown never reaches the
kernel and rendering tags are read only by Jupyter Book, so when nothing but the markdown changed the
outputs are provably those of the last run: the executed notebook is kept and the new markdown is
spliced into it (:func:`splice_markdown`) instead of re-executing. Any change of a code cell, even of a
comment, re-executes the chapter (tracebacks and warnings quote cell lines, so outputs may differ).

The hashes (:class:`Inputs`), the time each cell took, and the chapter's ``summary.json`` (its headline
numbers, for the front page) are written into the executed notebook's metadata under ``"headlab"``
(:func:`record`); :func:`plan_chapter` compares them with the current inputs and says why the chapter
is executed, spliced or skipped. A chapter is also executed when its ``summary.json`` changed since it
ran (a ``headlab run`` of it wrote new results that its notebook does not show).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["ENV_PACKAGES", "READS", "RENDER_TAGS", "Inputs", "Plan", "chapter_inputs", "headlab_modules",
           "plan_chapter", "read_stamp", "record", "splice_markdown"]

#: chapter -> {chapter whose results it reads: files of that chapter's ``results_dir`` it reads}.
#: The one place where the chapters' dependencies on each other are declared. 08's list is the
#: folders and tables of :data:`headlab.atlas.MEASURES` (a test keeps the two in step).
READS: dict[str, dict[str, tuple[str, ...]]] = {
    "02_noise_perturbation": {"01_baseline": ("prompt_config.json",)},
    "06_ffn_neurons": {"01_baseline": ("prompt_config.json",)},
    "07_weight_sensitivity": {"01_baseline": ("prompt_config.json",),
                              "02_noise_perturbation": ("ranking.parquet",)},
    "08_head_atlas": {
        "02_noise_perturbation": ("config.json", "ranking.parquet", "noise_vs_ablation.parquet"),
        "03_induction": ("config.json", "scores.parquet"),
        "04_entropy": ("config.json", "entropy.parquet", "sentiment_heads.parquet", "instruction_heads.parquet"),
        "05_gender_bias": ("config.json", "ranked_heads.parquet"),
    },
}

#: Cell tags read only by Jupyter Book when it renders: changing them never changes an output.
RENDER_TAGS = frozenset({
    "hide-input", "hide-output", "hide-cell", "remove-input", "remove-output", "remove-cell",
    "remove-stdout", "remove-stderr", "full-width", "margin", "output_scroll", "scroll-output",
    "scroll-input", "thebe-init",
})

#: Installed packages whose version can change a chapter's numbers or outputs.
ENV_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "safetensors", "gguf", "numpy", "pandas",
                "pyarrow", "scipy", "matplotlib", "seaborn", "ipywidgets", "bertviz", "ipykernel", "papermill",
                "jupytext")

_STAMP = "headlab"


def _hash(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _code_hash(path: Path) -> str:
    """Hash of a Python module's code: its syntax tree without docstrings, so that editing a docstring
    or a comment (never run) does not re-execute the chapters that import it."""
    text = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return _hash(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return _hash(ast.dump(tree))


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Inputs:
    """The hashed inputs of one chapter (see the module docstring).

    Attributes:
        hashes: input name (``code``, ``parameters``, ``headlab``, ``environment``, ``data``, ``reads``)
            -> hash.
        details: input name -> what was hashed, item by item (to name what changed).
        markdown: hash of the markdown cells and rendering tags.
        results_dir: the chapter's results folder (its ``results_dir`` parameter), relative to the root.
    """

    hashes: dict[str, str]
    details: dict[str, Any]
    markdown: str
    results_dir: str | None = None

    def as_record(self) -> dict[str, Any]:
        return {"inputs": self.hashes, "details": self.details, "markdown": self.markdown,
                "results_dir": self.results_dir}


@dataclass
class Plan:
    """What a build does with one chapter and why.

    Attributes:
        chapter: the chapter's stem, e.g. ``02_noise_perturbation``.
        action: ``"execute"``, ``"splice"`` (keep the outputs, take the new markdown) or ``"skip"``.
        reasons: why, one short phrase each.
        inputs: the chapter's current inputs.
        last_seconds: how long its last execution took (None if never timed).
        last_cell_seconds: the time of each code cell in its last execution.
    """

    chapter: str
    action: str
    reasons: list[str]
    inputs: Inputs
    last_seconds: float | None = None
    last_cell_seconds: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# The inputs
# --------------------------------------------------------------------------------------------------
def _module_file(name: str, package_root: Path) -> Path | None:
    """``headlab.x.y`` -> ``<package_root>/x/y.py`` or ``.../x/y/__init__.py`` (None if neither exists)."""
    parts = name.split(".")[1:]
    base = package_root.joinpath(*parts)
    for cand in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if cand is not None and cand.is_file():
            return cand
    return None


def _imported(code: str, package: str, importer: str | None) -> set[str]:
    """Names of ``package`` modules (and candidate submodules) that ``code`` imports."""
    # IPython magics and shell escapes are not Python; they import nothing of ours.
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in code.splitlines()]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return {package}  # cannot tell: depend on the package's __init__ at least
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom):
            if node.level and importer:  # relative import inside the package
                pkg = importer[: -len(".__init__")] if importer.endswith(".__init__") else importer.rsplit(".", 1)[0]
                parts = pkg.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                mod = ".".join(parts + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == package:
                mod = node.module
            else:
                continue
            names.add(mod)
            names |= {f"{mod}.{a.name}" for a in node.names}
    return names


def headlab_modules(code: str, package_root: Path) -> dict[str, Path]:
    """The modules of the package at ``package_root`` that ``code`` imports, followed transitively.

    Imports anywhere in the code count (also inside functions): the set is what the code may run.
    Importing ``headlab.x.y`` also runs ``headlab/__init__.py`` and ``headlab/x/__init__.py``.

    Args:
        code: Python source (a chapter's code cells joined).
        package_root: the package folder, e.g. ``<repo>/headlab``.

    Returns:
        ``{module name: file}``, sorted by name.
    """
    package = package_root.name
    found: dict[str, Path] = {}
    todo = list(_imported(code, package, None))
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages above it run too
            mod = ".".join(parts[:i])
            if mod in found:
                continue
            path = _module_file(mod, package_root)
            if path is None:
                continue  # a name imported from a module, not a module
            found[mod] = path
            todo += _imported(path.read_text(encoding="utf-8"), package,
                              mod + (".__init__" if path.name == "__init__.py" else ""))
    return dict(sorted(found.items()))


@functools.lru_cache(maxsize=1)
def _environment() -> dict[str, Any]:
    versions = {}
    for name in ENV_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "device": _device(), **versions}  # cached: one per build


def _device() -> str:
    """``cpu`` or ``cuda: <GPU models>``: where a chapter's ``device="auto"`` runs. Read from the NVIDIA
    driver's ``/proc`` entries (the same answer in every process, and no torch import in the build)."""
    import os

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "cpu"
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Model:"):
                names.append(line.split(":", 1)[1].strip())
    return "cuda: " + ", ".join(names) if names else "cpu"


def _data(model: Any, root: Path) -> dict[str, Any]:
    from headlab.cache import PACKAGES

    out: dict[str, Any] = {f"package {p.name}": p.sha256[:16] for p in PACKAGES.values()}
    if isinstance(model, str) and model:
        path = Path(model).expanduser()
        path = path if path.is_absolute() else root / path
        if path.exists():
            files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
            out[f"model {model}"] = _hash([(str(p.relative_to(path.parent)), p.stat().st_size,
                                            p.stat().st_mtime_ns) for p in files])
    return out


def _read_file(path: Path) -> str:
    if not path.is_file():
        return "missing"
    if path.name == "config.json":  # only its model matters; the rest records times
        try:
            return _hash(json.loads(path.read_text()).get("model"))
        except (ValueError, AttributeError):
            return _file_hash(path)
    return _file_hash(path)


def _declared(src: Path) -> dict[str, Any]:
    """The chapter's parameters: the annotated names of its ``parameters`` cell, with their defaults."""
    from headlab.chapter import declared_parameters

    return declared_parameters(src)


def chapter_inputs(src: Path, root: Path, parameters: dict[str, Any] | None = None,
                   results_dirs: dict[str, str] | None = None) -> Inputs:
    """Hash everything chapter ``src`` depends on (see the module docstring).

    Args:
        src: the chapter, ``notebooks/<stem>.py``.
        root: repository root (relative results paths resolve against it, as in the build).
        parameters: the build's ``-p`` values.
        results_dirs: chapter stem -> its results folder, for the chapters ``src`` reads (default:
            each one's ``results_dir`` parameter, from its source next to ``src``).

    Returns:
        The chapter's :class:`Inputs`.
    """
    from headlab.book.execute import read_source

    src, root = Path(src), Path(root)
    nb = read_source(src)
    code_cells, markdown = [], []
    for cell in nb.cells:
        tags = list(cell.metadata.get("tags", []))
        run_tags = sorted(t for t in tags if t not in RENDER_TAGS)
        if cell.cell_type == "code":
            code_cells.append({"source": "\n".join(line.rstrip() for line in cell.source.splitlines()).strip(),
                               "tags": run_tags})
            markdown.append({"code cell tags": sorted(t for t in tags if t in RENDER_TAGS)})
        else:
            markdown.append({cell.cell_type: cell.source, "tags": tags})
    declared = _declared(src)
    given = {k: v for k, v in (parameters or {}).items() if k in declared}
    effective = {**declared, **given}

    import headlab

    package_root = Path(headlab.__file__).parent
    modules = headlab_modules("\n".join(c["source"] for c in code_cells), package_root)
    module_hashes = {str(p.relative_to(package_root.parent)): _code_hash(p) for p in modules.values()}

    reads: dict[str, str] = {}
    for upstream, files in READS.get(src.stem, {}).items():
        folder = (results_dirs or {}).get(upstream)
        if folder is None:
            up_src = src.with_name(f"{upstream}.py")
            folder = {**(_declared(up_src) if up_src.is_file() else {}), **(parameters or {})}.get("results_dir")
        for name in files:
            rel = f"{folder}/{name}" if folder else f"({upstream} has no results_dir)/{name}"
            reads[rel] = _read_file(root / rel) if folder else "missing"

    details = {
        "code": {"cells": len(code_cells)},
        "parameters": given,
        "headlab": module_hashes,
        "environment": _environment(),
        "data": _data(effective.get("model"), root),
        "reads": reads,
    }
    hashes = {"code": _hash(code_cells), **{k: _hash(v) for k, v in details.items() if k != "code"}}
    results_dir = effective.get("results_dir")
    return Inputs(hashes, details, _hash(markdown), str(results_dir) if isinstance(results_dir, str) else None)


# --------------------------------------------------------------------------------------------------
# The record in the executed notebook
# --------------------------------------------------------------------------------------------------
def read_stamp(executed: Path) -> dict[str, Any] | None:
    """The ``headlab`` record of an executed notebook (None when absent or unreadable)."""
    try:
        nb = json.loads(Path(executed).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    stamp = nb.get("metadata", {}).get(_STAMP)
    if not isinstance(stamp, dict):
        return None
    stamp.setdefault("cell_seconds", [])
    failed = nb.get("metadata", {}).get("papermill", {}).get("exception")
    return {**stamp, "failed": bool(failed)}


def _summary(root: Path, results_dir: str | None) -> dict[str, Any] | None:
    if not results_dir:
        return None
    path = root / results_dir / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def record(executed: Path, inputs: Inputs, root: Path) -> dict[str, Any]:
    """Write the dependency record into a freshly executed notebook (metadata ``headlab``).

    Besides :meth:`Inputs.as_record`: ``executed_at``, ``seconds`` (papermill's duration),
    ``cell_seconds`` (each code cell's duration, papermill's injected cell left out) and ``summary``
    (the chapter's ``<results_dir>/summary.json`` as it is now, or None).

    Returns:
        The record written.
    """
    executed = Path(executed)
    nb = json.loads(executed.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"
             and "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    stamp = {
        **inputs.as_record(),
        "executed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": nb.get("metadata", {}).get("papermill", {}).get("duration"),
        "cell_seconds": [float(c.get("metadata", {}).get("papermill", {}).get("duration") or 0.0) for c in cells],
        "summary": _summary(Path(root), inputs.results_dir),
    }
    nb.setdefault("metadata", {})[_STAMP] = stamp
    executed.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return stamp


def _what_changed(name: str, old: Any, new: Any) -> str:
    """One phrase naming what changed in input ``name``."""
    if name == "code":
        return "its code cells changed"
    if not isinstance(old, dict) or not isinstance(new, dict):
        return f"{name} changed"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if name == "parameters":
        items = [f"{k} {old.get(k, 'default')!r} -> {new.get(k, 'default')!r}" for k in keys]
        return "parameters changed: " + ", ".join(items)
    if name == "headlab":
        return "headlab code changed: " + ", ".join(Path(k).as_posix() for k in keys)
    if name == "environment":
        return "environment changed: " + ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in keys)
    if name == "reads":
        return "results it reads changed: " + ", ".join(
            f"{k} ({'missing' if new.get(k) == 'missing' else 'new' if old.get(k) in (None, 'missing') else 'changed'})"
            for k in keys)
    return f"{name} changed: " + ", ".join(keys)


def plan_chapter(src: Path, executed: Path, root: Path, parameters: dict[str, Any] | None = None,
                 force: bool = False, results_dirs: dict[str, str] | None = None) -> Plan:
    """Decide whether chapter ``src`` must be executed, can keep its outputs with new markdown, or is current.

    Args:
        src: the chapter's source; executed: its executed notebook (may not exist).
        root, parameters, results_dirs: as for :func:`chapter_inputs`.
        force: execute whatever the record says.

    Returns:
        The :class:`Plan`, with the reasons in words.
    """
    src = Path(src)
    inputs = chapter_inputs(src, root, parameters, results_dirs)
    stamp = read_stamp(executed) if Path(executed).is_file() else None
    last = stamp.get("seconds") if stamp else None
    cells = list(stamp.get("cell_seconds", [])) if stamp else []

    def plan(action: str, *reasons: str) -> Plan:
        return Plan(src.stem, action, list(reasons), inputs, last, cells)

    if force:
        return plan("execute", "--force")
    if not Path(executed).is_file():
        return plan("execute", "never executed")
    if stamp is None:
        return plan("execute", "its executed notebook has no dependency record (older build or failed run)")
    if stamp["failed"]:
        return plan("execute", "its last execution failed")
    old_hashes, old_details = stamp.get("inputs", {}), stamp.get("details", {})
    changed = [k for k in inputs.hashes if old_hashes.get(k) != inputs.hashes[k]]
    if changed:
        return plan("execute", *[_what_changed(k, old_details.get(k), inputs.details.get(k)) for k in changed])
    recorded = stamp.get("summary")
    if recorded is not None and _summary(Path(root), inputs.results_dir) != recorded:
        return plan("execute", f"{inputs.results_dir}/summary.json changed since it ran (results written by "
                               "another run)")
    if stamp.get("markdown") != inputs.markdown:
        return plan("splice", "only markdown or rendering tags changed: outputs kept, markdown replaced")
    return plan("skip", "up to date")


def splice_markdown(src: Path, executed: Path, inputs: Inputs) -> None:
    """Put the current markdown cells and rendering tags of ``src`` into its executed notebook.

    The code cells (source, outputs, execution counts, papermill metadata) stay those of the executed
    notebook; they are matched to the source's code cells in order, and their sources must be equal
    (the caller checked that the code hash is unchanged). The record's markdown hash is updated.

    Raises:
        ValueError: the code cells of the two do not match (then execute instead).
    """
    from headlab.book.execute import read_source

    executed = Path(executed)
    nb = json.loads(executed.read_text(encoding="utf-8"))
    old_code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    injected = [c for c in old_code if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    old_code = [c for c in old_code if c not in injected]
    fresh = read_source(src)
    new_code = [c for c in fresh.cells if c.cell_type == "code"]

    def norm(text: Any) -> str:
        text = "".join(text) if isinstance(text, list) else text
        return "\n".join(line.rstrip() for line in text.splitlines()).strip()

    if len(old_code) != len(new_code) or any(norm(o["source"]) != norm(n.source) for o, n in zip(old_code, new_code)):
        raise ValueError(f"{executed.name}: its code cells do not match {src.name}; execute it instead.")
    cells: list[dict[str, Any]] = []
    code = iter(old_code)
    for cell in fresh.cells:
        if cell.cell_type != "code":
            cells.append(json.loads(json.dumps(cell)))  # plain dict
            continue
        old = next(code)
        tags = [t for t in old.get("metadata", {}).get("tags", []) if t not in RENDER_TAGS]
        tags += [t for t in cell.metadata.get("tags", []) if t in RENDER_TAGS]
        old.setdefault("metadata", {})["tags"] = tags
        if not tags:
            del old["metadata"]["tags"]
        cells.append(old)
        if "parameters" in tags:
            cells += injected  # papermill's cell follows the parameters cell
    nb["cells"] = cells
    nb["metadata"][_STAMP]["markdown"] = inputs.markdown
    executed.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
