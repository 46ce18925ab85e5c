"""The whole book: execute the chapters, vendor the JavaScript, render with Jupyter Book, check offline.

:func:`build_book` runs the steps of the other modules of :mod:`headlab.book` in order;
:func:`book_main` is the ``headlab book`` / ``python -m headlab.book`` command line.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from headlab.book.browser import browser_requests, check_drawn
from headlab.book.execute import ChapterError, execute_chapter, to_notebook
from headlab.book.offline import check_offline, find_missing_assets
from headlab.book.vendor import localize_outputs, vendor_js
from headlab.params import add_parameter_option

__all__ = ["book_main", "build_book"]


@contextmanager
def _step(name: str) -> Iterator[None]:
    """Print how long a build step took."""
    start = time.perf_counter()
    print(f"[book] {name} ...", flush=True)
    yield
    print(f"[book] {name}: {time.perf_counter() - start:.1f} s", flush=True)


def _chapter_sources(notebooks: Path, chapters: list[str] | None) -> list[Path]:
    """Resolve chapter names (``01_baseline``, ``01_baseline.py`` or a path) to files."""
    if not chapters:
        return sorted(notebooks.glob("*.py"))
    sources = []
    for name in chapters:
        path = Path(name)
        if not path.is_file():
            path = notebooks / (path.name if path.suffix == ".py" else f"{path.name}.py")
        if not path.is_file():
            raise FileNotFoundError(f"no chapter {name!r} (looked for {path})")
        sources.append(path)
    return sources


def build_book(
    root: Path,
    chapters: list[str] | None = None,
    parameters: dict[str, Any] | None = None,
    execute: bool = True,
    browser_check: bool = False,
) -> Path:
    """Execute the chapters, vendor the JavaScript, build the HTML and check it is offline.

    Steps: papermill runs each ``notebooks/<stem>.py`` into ``book/chapters/<stem>.ipynb``;
    :func:`vendor_js` fills ``book/_vendor``; ``jupyter-book build book --config
    _config.yml --toc $ROOT/book/_toc.yml --path-output book -W -n --keep-going --all``
    (every warning, broken reference included, fails the build; ``--all`` so that
    warnings of unchanged pages are reported on every build); then :func:`find_missing_assets` and
    :func:`check_offline` on ``book/_build/html``.

    Args:
        root: Repository root (holds ``_config.yml``, ``notebooks/`` and ``book/``).
        chapters: Chapter names or files to execute; default all ``notebooks/*.py``, sorted.
        parameters: papermill parameters passed to every chapter.
        execute: If False, reuse the notebooks already in ``book/chapters`` (a chapter
            never executed is converted without outputs).
        browser_check: Also open every page in headless Chromium and fail on any request
            to another host (see :func:`browser_requests`).

    Returns:
        The HTML folder, ``root / "book" / "_build" / "html"``.
    """
    root = Path(root).resolve()
    book = root / "book"
    out_dir = book / "chapters"
    total = time.perf_counter()
    if execute:
        for src in _chapter_sources(root / "notebooks", chapters):
            with _step(f"execute {src.name}"):
                execute_chapter(src, out_dir, parameters, cwd=root)
    # Chapters not executed now keep their last executed copy; one never executed is
    # rendered without outputs so that the table of contents still resolves.
    for src in sorted((root / "notebooks").glob("*.py")):
        if not (out_dir / f"{src.stem}.ipynb").is_file():
            print(f"[book] {src.name} was never executed; rendering it without outputs", flush=True)
            to_notebook(src, out_dir / f"{src.stem}.ipynb")

    with _step("point CDN URLs in outputs at the vendored copies"):
        for nb in sorted(out_dir.glob("*.ipynb")):
            n = localize_outputs(nb, root="../")
            if n:
                print(f"[book] {nb.name}: {n} CDN URL(s) rewritten", flush=True)

    with _step("vendor JavaScript from npm"):
        vendor_js(book / "_vendor")

    html_dir = book / "_build" / "html"
    with _step("jupyter-book build"):
        # Start from an empty HTML folder so no page or asset of an earlier build survives.
        shutil.rmtree(html_dir, ignore_errors=True)
        cmd = [
            sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
            "build", "book", "--config", "_config.yml",
            # Absolute: Jupyter Book hands the --toc path to sphinx-external-toc, which
            # resolves a relative one against the source folder (book/book/_toc.yml).
            "--toc", str(book / "_toc.yml"),
            # Without it the output goes next to the _config.yml found upwards (./_build).
            "--path-output", "book",
            "-W", "-n", "--keep-going", "--all",
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=root, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}): {' '.join(cmd[3:])}")

    with _step("offline check"):
        missing = find_missing_assets(html_dir)
        if missing:
            lines = "\n".join(f"  {page}: {ref}" for page, ref in missing)
            raise RuntimeError(f"{len(missing)} local asset(s) missing in {html_dir}:\n{lines}")
        check_offline(html_dir)
    if browser_check:
        with _step("browser check"):
            pages = [
                p.relative_to(html_dir).as_posix()
                for p in sorted(html_dir.rglob("*.html"))
                if p.relative_to(html_dir).parts[0] != "_static"
            ]
            leaks = [
                (page, url)
                for page, urls in browser_requests(html_dir, pages).items()
                for url in urls
                if not url.startswith("http://127.0.0.1:")
            ]
            if leaks:
                raise RuntimeError("pages requested other hosts:\n" + "\n".join(map(str, leaks)))
            drawn = check_drawn(html_dir, pages, artefacts=root / "results" / "book-screenshots")
            for page, counts in drawn.items():
                print(f"[book] {page}: {counts}", flush=True)
    print(f"[book] done in {time.perf_counter() - total:.1f} s: {html_dir / 'index.html'}", flush=True)
    return html_dir


def book_main(args: list[str] | None = None) -> int:
    """Command-line entry: ``python -m headlab.book [--chapters ...] [--no-execute] [-p K V]``.

    Args:
        args: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        Process exit code: 0 on success, 1 if a chapter, the build or a check failed.
    """
    parser = argparse.ArgumentParser(
        prog="headlab book",
        description="Execute notebooks/*.py with papermill and build the offline Jupyter Book.",
    )
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: .)")
    parser.add_argument("--chapters", nargs="+", metavar="NAME", help="chapters to execute (default: all)")
    parser.add_argument(
        "--no-execute", dest="execute", action="store_false", help="reuse book/chapters/*.ipynb as they are"
    )
    add_parameter_option(parser, help="papermill parameter for every chapter")
    parser.add_argument(
        "--browser-check", action="store_true", help="also load every page in headless Chromium"
    )
    ns = parser.parse_args(args)
    try:
        build_book(ns.root, ns.chapters, ns.parameters or None, ns.execute, ns.browser_check)
    except (ChapterError, RuntimeError, FileNotFoundError) as err:
        print(f"[book] FAILED: {err}", file=sys.stderr)
        return 1
    return 0
