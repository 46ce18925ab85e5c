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
from headlab.book.deps import READS, plan_chapter, record, splice_markdown
from headlab.book.execute import ChapterError, execute_chapter, to_notebook
from headlab.book.frontpage import write_headlines
from headlab.book.offline import check_offline, find_missing_assets
from headlab.book.prose import require_backed_prose
from headlab.book.vendor import localize_outputs, vendor_js
from headlab.params import add_parameter_option
from headlab.progress import format_seconds

__all__ = ["book_main", "build_book", "run_chapters"]


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
            known = ", ".join(p.stem for p in sorted(notebooks.glob("*.py")))
            raise FileNotFoundError(f"no chapter {name!r} (looked for {path}); chapters: {known}")
        sources.append(path)
    return sorted(set(sources), key=lambda p: p.name)


def _results_dirs(sources: list[Path], parameters: dict[str, Any] | None) -> dict[str, str]:
    """chapter stem -> its results folder (its ``results_dir`` parameter, a ``-p results_dir`` winning)."""
    from headlab.chapter import declared_parameters

    out = {}
    for src in sources:
        folder = {**declared_parameters(src), **(parameters or {})}.get("results_dir")
        if isinstance(folder, str):
            out[src.stem] = folder
    return out


def _downstream(stem: str) -> set[str]:
    """Chapters that read ``stem``'s results, directly or through others."""
    found, todo = set(), [stem]
    while todo:
        up = todo.pop()
        for chapter, reads in READS.items():
            if up in reads and chapter not in found:
                found.add(chapter)
                todo.append(chapter)
    return found


def run_chapters(root: Path, chapters: list[str] | None = None, parameters: dict[str, Any] | None = None,
                 force: bool = False) -> dict[str, float]:
    """Execute, splice or skip each chapter as its dependency record says (:mod:`headlab.book.deps`).

    Prints, per chapter, what is done and why; an estimate of the time to execute from the last
    build's recorded times; while a chapter runs, its finished cells and the progress lines of its
    long loops; after each, the time it took and what is left. A chapter that reads the results of
    one executed earlier in the same build is planned again once those results exist.

    Args:
        root: repository root (``notebooks/``, ``book/chapters/``).
        chapters: chapter names to consider (default all ``notebooks/*.py``); the others keep their
            executed notebooks as they are.
        parameters: ``-p`` values for every chapter.
        force: execute the considered chapters whatever their records say.

    Returns:
        chapter stem -> seconds it took to execute (executed chapters only).
    """
    root = Path(root).resolve()
    all_sources = sorted((root / "notebooks").glob("*.py"))
    sources = _chapter_sources(root / "notebooks", chapters)
    out_dir = root / "book" / "chapters"
    dirs = _results_dirs(all_sources, parameters)
    plans = {src.stem: plan_chapter(src, out_dir / f"{src.stem}.ipynb", root, parameters, force, dirs)
             for src in sources}
    running = {s for s, p in plans.items() if p.action == "execute"}
    maybe = {s for s in plans if s not in running and any(s in _downstream(r) for r in running)}
    for stem, plan in plans.items():
        last = f"; last execution {format_seconds(plan.last_seconds)}" if plan.last_seconds else ""
        note = " (may re-run: it reads a chapter that runs first)" if stem in maybe else ""
        print(f"[book] {stem}: {plan.action}{note} - {'; '.join(plan.reasons)}{last}", flush=True)

    def estimate(stems: set[str]) -> tuple[float, int]:
        known = [plans[s].last_seconds for s in stems if plans[s].last_seconds]
        return float(sum(known)), len(stems) - len(known)

    todo_s, untimed = estimate(running)
    maybe_s, _ = estimate(maybe)
    if running:
        timed = (f"~{format_seconds(todo_s)} by the last build's times" + (f" ({untimed} never timed)" if untimed else "")
                 if untimed < len(running) else "no earlier times recorded")
        print(f"[book] to execute: {len(running)} chapter(s), {timed}"
              + (f"; up to ~{format_seconds(maybe_s)} more if {', '.join(sorted(maybe))} must follow" if maybe else ""),
              flush=True)
    else:
        print("[book] nothing to execute", flush=True)

    executed: dict[str, float] = {}
    left = set(running)
    for src in sources:
        stem = src.stem
        plan = plans[stem]
        if any(stem in _downstream(e) for e in executed):
            # a chapter it reads ran in this build: decide again, and record, with its new results
            was, plan = plan, plan_chapter(src, out_dir / f"{stem}.ipynb", root, parameters, force, dirs)
            if (plan.action, plan.reasons) != (was.action, was.reasons):
                print(f"[book] {stem}: {plan.action} - {'; '.join(plan.reasons)}", flush=True)
            if plan.action == "execute":
                left.add(stem)
        if plan.action == "splice":
            try:
                splice_markdown(src, out_dir / f"{stem}.ipynb", plan.inputs)
                print(f"[book] {stem}: markdown spliced into the executed notebook", flush=True)
                continue
            except ValueError as err:
                print(f"[book] {stem}: {err}", flush=True)
                plan.action = "execute"
        if plan.action != "execute":
            continue
        start = time.perf_counter()
        print(f"[book] execute {src.name} ...", flush=True)
        execute_chapter(src, out_dir, parameters, cwd=root, report=lambda line, s=stem: print(f"[book] {s}: {line}",
                                                                                                flush=True),
                        previous_cell_seconds=plan.last_cell_seconds)
        record(out_dir / f"{stem}.ipynb", plan.inputs, root)
        executed[stem] = took = time.perf_counter() - start
        left.discard(stem)
        remaining, unknown = estimate(left)
        was = f" (last build {format_seconds(plan.last_seconds)})" if plan.last_seconds else ""
        rest = (f"; still to execute: {len(left)} chapter(s), ~{format_seconds(remaining)}"
                + (f" + {unknown} never timed" if unknown else "")) if left else ""
        print(f"[book] executed {src.name} in {format_seconds(took)}{was}{rest}", flush=True)
    return executed


def build_book(
    root: Path,
    chapters: list[str] | None = None,
    parameters: dict[str, Any] | None = None,
    execute: bool = True,
    browser_check: bool = False,
    force: bool = False,
) -> Path:
    """Execute the chapters that need it, vendor the JavaScript, build the HTML and check it is offline.

    Steps: each ``notebooks/<stem>.py`` is planned by :func:`headlab.book.deps.plan_chapter` and, if its
    inputs changed since the executed copy ``book/chapters/<stem>.ipynb`` was made, executed by
    papermill (with its markdown spliced in when only markdown changed, left alone when nothing did);
    :func:`write_headlines` writes the front page's results; :func:`require_backed_prose` checks that
    the chapters' markdown states no number their runs did not produce and no result;
    :func:`vendor_js` fills ``book/_vendor``;
    ``jupyter-book build book --config _config.yml --toc $ROOT/book/_toc.yml --path-output book -W -n
    --keep-going --all`` (every warning, broken reference included, fails the build; ``--all`` so that
    warnings of unchanged pages are reported on every build); then :func:`find_missing_assets` and
    :func:`check_offline` on ``book/_build/html``.

    Args:
        root: Repository root (holds ``_config.yml``, ``notebooks/`` and ``book/``).
        chapters: Chapter names or files to consider (``--only``); default all ``notebooks/*.py``.
        parameters: papermill parameters passed to every chapter.
        execute: If False, reuse the notebooks already in ``book/chapters`` (a chapter
            never executed is converted without outputs).
        browser_check: Also open every page in headless Chromium and fail on any request
            to another host (see :func:`browser_requests`).
        force: Execute the considered chapters even when they are up to date.

    Returns:
        The HTML folder, ``root / "book" / "_build" / "html"``.
    """
    root = Path(root).resolve()
    book = root / "book"
    out_dir = book / "chapters"
    total = time.perf_counter()
    all_sources = sorted((root / "notebooks").glob("*.py"))
    executed: dict[str, float] = {}
    if execute:
        with _step("execute chapters"):
            executed = run_chapters(root, chapters, parameters, force)
    # Chapters not executed now keep their last executed copy; one never executed is
    # rendered without outputs so that the table of contents still resolves.
    for src in all_sources:
        if not (out_dir / f"{src.stem}.ipynb").is_file():
            print(f"[book] {src.name} was never executed; rendering it without outputs", flush=True)
            to_notebook(src, out_dir / f"{src.stem}.ipynb")
    write_headlines(book, [src.stem for src in all_sources])

    with _step("prose check: markdown states only what the runs produced"):
        require_backed_prose(out_dir)

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
    spent = time.perf_counter() - total
    print(f"[book] done in {format_seconds(spent)} (executing {len(executed)} chapter(s): "
          f"{format_seconds(sum(executed.values()))}; the rest {format_seconds(spent - sum(executed.values()))}): "
          f"{html_dir / 'index.html'}", flush=True)
    return html_dir


def book_main(args: list[str] | None = None) -> int:
    """Command-line entry: ``python -m headlab.book [--only CHAPTER ...] [--force] [--no-execute] [-p K V]``.

    Args:
        args: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        Process exit code: 0 on success, 1 if a chapter, the build or a check failed.
    """
    parser = argparse.ArgumentParser(
        prog="headlab book",
        description="Execute the chapters whose inputs changed (notebooks/*.py, papermill) and build the "
                    "offline Jupyter Book. Each chapter's log line says why it is executed or skipped.",
    )
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: .)")
    parser.add_argument("--only", "--chapters", dest="only", nargs="+", metavar="CHAPTER",
                        help="consider only these chapters (e.g. 02_noise_perturbation); the others keep "
                             "their executed notebooks as they are")
    parser.add_argument("--force", action="store_true",
                        help="execute the considered chapters even when nothing they depend on changed")
    parser.add_argument(
        "--no-execute", dest="execute", action="store_false", help="reuse book/chapters/*.ipynb as they are"
    )
    add_parameter_option(parser, help="papermill parameter for every chapter")
    parser.add_argument(
        "--browser-check", action="store_true", help="also load every page in headless Chromium"
    )
    ns = parser.parse_args(args)
    try:
        build_book(ns.root, ns.only, ns.parameters or None, ns.execute, ns.browser_check, ns.force)
    except (ChapterError, RuntimeError, FileNotFoundError, ValueError) as err:
        print(f"[book] FAILED: {err}", file=sys.stderr)
        return 1
    return 0
