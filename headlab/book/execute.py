"""Chapters as notebooks: a jupytext percent file is converted and executed by papermill.

``notebooks/<stem>.py`` --:func:`to_notebook`--> a ``python3`` notebook --papermill (parameters)-->
``<out_dir>/<stem>.ipynb``, the executed copy (:func:`execute_chapter`). ``headlab run`` calls
:func:`execute_chapter` for one chapter; :func:`headlab.book.build.build_book` for all of them.

While a chapter runs, :func:`execute_chapter` reports its progress through a callback (the build
prints it): one line per finished code cell (``cell 7/23``, the cell's time, the chapter's elapsed time
and, from the previous run's cell times, an estimate of what is left), the lines that long loops
inside the chapter write with :mod:`headlab.progress`, and, when a cell has been quiet for a minute,
which cell is running and for how long. The kernel gets the environment variable
:data:`headlab.progress.PROGRESS_ENV` naming a file it appends those lines to (so they never land in
the notebook or the HTML) and :data:`headlab.figures.HEADLESS_ENV` (no frontend: explorers are shown
as static figures, not as ipywidgets). It talks to the kernel over IPC sockets, not TCP.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["KERNELSPEC", "ChapterError", "execute_chapter", "to_notebook"]

#: Jupyter kernelspec written into converted notebooks.
KERNELSPEC: dict[str, str] = {"name": "python3", "display_name": "Python 3", "language": "python"}

#: Name under which :func:`execute_chapter` registers its papermill engine.
ENGINE_NAME = "headlab"

#: Seconds without any progress line after which the running cell is named in the log.
HEARTBEAT_SECONDS = 60.0


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

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(read_source(src), dst, fmt="ipynb")
    return dst


def read_source(src: Path) -> Any:
    """The chapter ``src`` (jupytext percent format) as an in-memory notebook with a ``python3`` kernelspec."""
    import jupytext

    nb = jupytext.read(Path(src), fmt="py:percent")
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.setdefault("language_info", {"name": "python"})
    # The pairing information describes the text file, not this notebook.
    nb.metadata.pop("jupytext", None)
    return nb


def _first_line(source: str, width: int = 48) -> str:
    """The first line of a cell that is not a comment, shortened, to name the cell in the log."""
    for line in source.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line if len(line) <= width else line[: width - 3] + "..."
    return ""


def _register_engine() -> None:
    """Register the papermill engine that reports every finished code cell (once per process)."""
    from papermill.engines import NBClientEngine, papermill_engines

    if ENGINE_NAME in papermill_engines._engines:
        return

    class CellReportingEngine(NBClientEngine):
        """papermill's nbclient engine, plus callbacks before and after each code cell
        (``on_cell_start(index, cell)``, ``on_cell(index, cell)``)."""

        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, on_cell: Callable | None = None,
                                     on_cell_start: Callable | None = None, **kwargs: Any) -> Any:
            if on_cell_start is not None:
                begin = nb_man.cell_start

                def cell_start(cell: Any, cell_index: int | None = None, **kw: Any) -> Any:
                    if cell.cell_type == "code":
                        on_cell_start(cell_index, cell)
                    return begin(cell, cell_index=cell_index, **kw)

                nb_man.cell_start = cell_start
            if on_cell is not None:
                complete = nb_man.cell_complete

                def cell_complete(cell: Any, cell_index: int | None = None, **kw: Any) -> Any:
                    out = complete(cell, cell_index=cell_index, **kw)
                    if cell.cell_type == "code":
                        on_cell(cell_index, cell)
                    return out

                nb_man.cell_complete = cell_complete
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register(ENGINE_NAME, CellReportingEngine)


def _kernel_manager_class(env: dict[str, str], ipc_prefix: str) -> type:
    """An nbclient kernel manager class that adds ``env`` to the kernel's environment and connects over
    IPC sockets named ``<ipc_prefix>-<n>`` (ipykernel warns about unencrypted TCP). nbclient creates
    it, so nbclient also shuts the kernel down."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ChapterKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self) -> str:
            return "ipc" if os.name == "posix" else "tcp"  # ZeroMQ has no IPC transport on Windows

        @default("ip")
        def _ip_default(self) -> str:
            return ipc_prefix

        async def _async_pre_start_kernel(self, **kw: Any) -> Any:
            kw["env"] = {**kw.get("env", os.environ), **env}
            return await super()._async_pre_start_kernel(**kw)

    return ChapterKernelManager


class _Follower:
    """Pass every complete line appended to a file to ``emit``: from a thread every ``poll`` seconds, and
    on demand (:meth:`drain`), so that lines keep their order with the caller's own lines. When nothing
    was emitted for ``idle_after`` seconds, the line ``idle()`` returns is emitted (a heartbeat)."""

    def __init__(self, path: Path, emit: Callable[[str], None], poll: float = 0.5,
                 idle: Callable[[], str] | None = None, idle_after: float = 60.0) -> None:
        self.path, self.poll, self.idle, self.idle_after = path, poll, idle, idle_after
        self.last = time.monotonic()

        def emit_and_note(line: str) -> None:
            self.last = time.monotonic()
            emit(line)

        self.emit = emit_and_note
        self.pos, self.partial = 0, ""
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="headlab-progress", daemon=True)

    def drain(self, final: bool = False) -> None:
        with self.lock:
            try:
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    f.seek(self.pos)
                    chunk = f.read()
                    self.pos = f.tell()
            except OSError:
                chunk = ""
            lines = (self.partial + chunk).split("\n")
            self.partial = "" if final else lines.pop()
            for line in lines:
                if line.strip():
                    self.emit(line)

    def _run(self) -> None:
        while not self.stop.wait(self.poll):
            self.drain()
            if self.idle is not None and time.monotonic() - self.last >= self.idle_after:
                with self.lock:
                    self.emit(self.idle())

    def __enter__(self) -> _Follower:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.drain(final=True)


def _print_report(line: str) -> None:
    print(line, flush=True)


def execute_chapter(
    src: Path,
    out_dir: Path,
    parameters: dict[str, Any] | None = None,
    kernel: str = "python3",
    cwd: Path | None = None,
    log_output: bool = False,
    report: Callable[[str], None] | None = _print_report,
    previous_cell_seconds: list[float] | None = None,
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
        report: Called with each progress line (finished cells, loops inside the chapter); None
            reports nothing. Default: print to stdout.
        previous_cell_seconds: The time each code cell took last time, in order; with it the cell
            lines estimate the time left in the chapter.

    Returns:
        Path of the executed notebook, ``out_dir / f"{src.stem}.ipynb"``.

    Raises:
        ChapterError: if a cell raises or the kernel fails. The partially executed
            notebook (with the traceback in the failing cell) is left at the output path.
    """
    import papermill

    from headlab.figures import HEADLESS_ENV
    from headlab.progress import PROGRESS_ENV, format_seconds

    src = Path(src)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{src.stem}.ipynb"
    emit = report or (lambda line: None)
    _register_engine()
    # Short folder name: IPC socket paths must stay under ~100 characters.
    with tempfile.TemporaryDirectory(prefix="hl-") as tmp:
        unexecuted = to_notebook(src, Path(tmp) / f"{src.stem}.ipynb")
        code = [c.source for c in read_source(src).cells if c.cell_type == "code"]
        n_code = len(code)
        progress_file = Path(tmp) / "progress.log"
        progress_file.touch()
        start, done = time.monotonic(), 0
        cell_start: float | None = None  # None until the kernel runs the first cell
        before = list(previous_cell_seconds or [])

        def on_cell(index: int, cell: Any) -> None:
            nonlocal done
            if "injected-parameters" in cell.metadata.get("tags", []):
                return  # papermill's own cell, not one of the chapter's
            follower.drain()  # the cell's own progress lines first
            done += 1
            took = cell.metadata.get("papermill", {}).get("duration") or 0.0
            line = (f"cell {done}/{n_code} done in {format_seconds(took)} "
                    f"({_first_line(cell.source)}); {format_seconds(time.monotonic() - start)} elapsed")
            if len(before) == n_code and done < n_code:
                line += f", ~{format_seconds(sum(before[done:]))} left by the last run's cell times"
            follower.emit(line)

        def on_cell_start(index: int, cell: Any) -> None:
            nonlocal cell_start
            cell_start = time.monotonic()

        def running() -> str:
            now = time.monotonic()
            if cell_start is None:
                return f"starting the kernel; {format_seconds(now - start)} elapsed"
            line = (f"cell {min(done + 1, n_code)}/{n_code} running for {format_seconds(now - cell_start)} "
                    f"({_first_line(code[min(done, n_code - 1)])}); {format_seconds(now - start)} elapsed")
            if len(before) == n_code and done < n_code:
                line += f", it took {format_seconds(before[done])} last time"
            return line

        env = {PROGRESS_ENV: str(progress_file), HEADLESS_ENV: "1"}
        follower = _Follower(progress_file, emit, idle=running, idle_after=HEARTBEAT_SECONDS)
        try:
            with follower:
                papermill.execute_notebook(
                    str(unexecuted),
                    str(dst),
                    parameters=dict(parameters or {}),
                    kernel_name=kernel,
                    engine_name=ENGINE_NAME,
                    progress_bar=False,
                    log_output=log_output,
                    cwd=None if cwd is None else str(cwd),
                    kernel_manager_class=_kernel_manager_class(env, str(Path(tmp) / "kernel")),
                    on_cell=on_cell,
                    on_cell_start=on_cell_start,
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
