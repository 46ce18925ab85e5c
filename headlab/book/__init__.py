"""Offline build pipeline for the headlab book, one module per step.

1. :mod:`headlab.book.deps` -- :func:`plan_chapter`: what each chapter depends on (its code cells,
   parameters, the headlab code it imports, packages and device, model/data fingerprints, the results
   of the chapters it reads: :data:`READS`), recorded in its executed notebook; a chapter is executed
   only when one of them changed, and gets its new markdown spliced in when only markdown changed.
   :mod:`headlab.book.execute` -- :func:`to_notebook` / :func:`execute_chapter`: a jupytext percent
   file ``notebooks/<stem>.py`` is converted to a notebook and executed by papermill into
   ``book/chapters/<stem>.ipynb`` (the executed copy is the build product), reporting finished cells
   and the progress of long loops (:mod:`headlab.progress`) as it runs.
   :mod:`headlab.book.frontpage` -- :func:`write_headlines`: each chapter's headline result on the
   front page, from the summary recorded with its executed notebook.
2. :mod:`headlab.book.vendor` -- :func:`vendor_js`: the JavaScript the HTML needs (MathJax, require.js,
   the ipywidgets HTML manager, d3 and jQuery for bertviz, plotly.js for :mod:`headlab.figures`) is
   fetched from the npm registry with ``npm pack`` and unpacked into ``book/_vendor/``, which Sphinx copies to the HTML root
   (``html_extra_path`` in ``_config.yml``); :func:`localize_outputs` points CDN URLs in executed
   notebooks at those copies.
3. ``jupyter-book build`` renders the book (never executing anything itself).
4. :mod:`headlab.book.offline` -- :func:`check_offline`: the built HTML is scanned for anything a
   browser would load from another host; :mod:`headlab.book.browser` -- with ``--browser-check``,
   every page is opened in headless Chromium (:func:`browser_requests`, :func:`check_drawn`);
   :class:`BrowserPage` operates a page like a reader (menus, mouse) for the tests.

:mod:`headlab.book.build` runs the steps (:func:`build_book`) and is the command line
(:func:`book_main`: ``headlab book`` or ``python -m headlab.book``). Its ``-p NAME VALUE`` values are
read by :mod:`headlab.params`, as ``headlab run``'s are.
"""

from headlab.book.browser import BrowserPage, browser_requests, check_drawn, drawn_outputs, render_page
from headlab.book.build import book_main, build_book, run_chapters
from headlab.book.deps import READS, chapter_inputs, plan_chapter
from headlab.book.execute import KERNELSPEC, ChapterError, execute_chapter, to_notebook
from headlab.book.frontpage import write_headlines
from headlab.book.offline import check_offline, find_external_urls, find_missing_assets
from headlab.book.vendor import CDN_REWRITES, NPM_CACHE, NPM_PACKAGES, localize_outputs, vendor_js

__all__ = [
    "CDN_REWRITES",
    "KERNELSPEC",
    "NPM_CACHE",
    "NPM_PACKAGES",
    "READS",
    "BrowserPage",
    "ChapterError",
    "book_main",
    "browser_requests",
    "build_book",
    "chapter_inputs",
    "check_drawn",
    "check_offline",
    "drawn_outputs",
    "execute_chapter",
    "find_external_urls",
    "find_missing_assets",
    "localize_outputs",
    "plan_chapter",
    "render_page",
    "run_chapters",
    "to_notebook",
    "vendor_js",
    "write_headlines",
]
