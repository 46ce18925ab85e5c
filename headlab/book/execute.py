"""Chapters as notebooks: a jupytext percent file is converted and executed by papermill.

``notebooks/<stem>.py`` --:func:`to_notebook`--> a ``python3`` notebook --papermill (parameters)-->
``<out_dir>/<stem>.ipynb``, the executed copy (:func:`execute_chapter`). ``headlab run`` calls
:func:`execute_chapter` for one chapter; :func:`headlab.book.build.build_book` for all of them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

__all__ = ["KERNELSPEC", "ChapterError", "execute_chapter", "to_notebook"]

#: Jupyter kernelspec written into converted notebooks.
KERNELSPEC: dict[str, str] = {"name": "python3", "display_name": "Python 3", "language": "python"}


class ChapterError(RuntimeError):
    """A chapter notebook failed to execute; the partially executed copy is kept on disk."""


def to_notebook(src: Path, dst: Path) -> Path:
    """Convert a jupytext percent-format ``.py`` file to an ``.ipynb`` notebook.

    The notebook gets a ``python3`` kernelspec so papermill (and Jupyter) can run it.
    Cell tags written as ``# %% tags=["parameters"]`` are kept, which is what
    papermill looks for when injecting parameters.

    Args:
        src: The jupytext percent-format Python file.
        dst: Path of the notebook to write (parent folders are created).

    Returns:
        ``dst``.
    """
    import jupytext

    nb = jupytext.read(Path(src), fmt="py:percent")
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.setdefault("language_info", {"name": "python"})
    # The pairing information describes the text file, not this notebook.
    nb.metadata.pop("jupytext", None)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(nb, dst, fmt="ipynb")
    return dst


def execute_chapter(
    src: Path,
    out_dir: Path,
    parameters: dict[str, Any] | None = None,
    kernel: str = "python3",
    cwd: Path | None = None,
    log_output: bool = False,
) -> Path:
    """Convert a percent-format chapter and execute it with papermill.

    Args:
        src: The chapter's jupytext percent-format file, e.g. ``notebooks/01_baseline.py``.
        out_dir: Folder that receives the executed notebook ``<stem>.ipynb``.
        parameters: Values papermill injects after the cell tagged ``parameters``.
        kernel: Name of the Jupyter kernel to run it with.
        cwd: Working directory of the kernel; None keeps this process's current
            directory (papermill's default). :func:`build_book` uses the repository root,
            so relative paths in chapters (``results/...``) resolve against it.
        log_output: Echo the notebook's outputs to this process's log while it runs.

    Returns:
        Path of the executed notebook, ``out_dir / f"{src.stem}.ipynb"``.

    Raises:
        ChapterError: if a cell raises or the kernel fails. The partially executed
            notebook (with the traceback in the failing cell) is left at the output path.
    """
    import papermill

    src = Path(src)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{src.stem}.ipynb"
    with tempfile.TemporaryDirectory(prefix="headlab-nb-") as tmp:
        unexecuted = to_notebook(src, Path(tmp) / f"{src.stem}.ipynb")
        try:
            papermill.execute_notebook(
                str(unexecuted),
                str(dst),
                parameters=dict(parameters or {}),
                kernel_name=kernel,
                progress_bar=False,
                log_output=log_output,
                cwd=None if cwd is None else str(cwd),
            )
        except papermill.PapermillExecutionError as err:
            raise ChapterError(
                f"chapter {src} failed at In [{err.exec_count}]: {err.ename}: {err.evalue}\n"
                f"partially executed notebook kept at {dst}"
            ) from err
        except Exception as err:  # kernel died, timeout, missing kernel, ...
            raise ChapterError(
                f"chapter {src} could not be executed: {type(err).__name__}: {err}\n"
                f"whatever was executed is kept at {dst}"
            ) from err
    return dst

