"""Offline build pipeline for the headlab book, one module per step.

1. :mod:`headlab.book.execute` -- :func:`to_notebook` / :func:`execute_chapter`: every jupytext percent
   file ``notebooks/<stem>.py`` is converted to a notebook and executed by papermill into
   ``book/chapters/<stem>.ipynb`` (the executed copy is the build product).
2. :mod:`headlab.book.vendor` -- :func:`vendor_js`: the JavaScript the HTML needs (MathJax, require.js,
   the ipywidgets HTML manager, d3 and jQuery for bertviz) is fetched from the npm registry with
   ``npm pack`` and unpacked into ``book/_vendor/``, which Sphinx copies to the HTML root
   (``html_extra_path`` in ``_config.yml``); :func:`localize_outputs` points CDN URLs in executed
   notebooks at those copies.
3. ``jupyter-book build`` renders the book (never executing anything itself).
4. :mod:`headlab.book.offline` -- :func:`check_offline`: the built HTML is scanned for anything a
   browser would load from another host; :mod:`headlab.book.browser` -- with ``--browser-check``,
   every page is opened in headless Chromium (:func:`browser_requests`, :func:`check_drawn`).

:mod:`headlab.book.build` runs the steps (:func:`build_book`) and is the command line
(:func:`book_main`: ``headlab book`` or ``python -m headlab.book``). Its ``-p NAME VALUE`` values are
read by :mod:`headlab.params`, as ``headlab run``'s are.
"""

from headlab.book.browser import browser_requests, check_drawn, drawn_outputs, render_page
from headlab.book.build import book_main, build_book
from headlab.book.execute import KERNELSPEC, ChapterError, execute_chapter, to_notebook
from headlab.book.offline import check_offline, find_external_urls, find_missing_assets
from headlab.book.vendor import CDN_REWRITES, NPM_CACHE, NPM_PACKAGES, localize_outputs, vendor_js

__all__ = [
    "CDN_REWRITES",
    "KERNELSPEC",
    "NPM_CACHE",
    "NPM_PACKAGES",
    "ChapterError",
    "book_main",
    "browser_requests",
    "build_book",
    "check_drawn",
    "check_offline",
    "drawn_outputs",
    "execute_chapter",
    "find_external_urls",
    "find_missing_assets",
    "localize_outputs",
    "render_page",
    "to_notebook",
    "vendor_js",
]
