"""Offline build pipeline for the headlab book.

The book is made in four steps, each a function of this module:

1. :func:`to_notebook` / :func:`execute_chapter` -- every jupytext percent file
   ``notebooks/<stem>.py`` is converted to a notebook and executed by papermill
   into ``book/chapters/<stem>.ipynb`` (the executed copy is the build product).
2. :func:`vendor_js` -- the JavaScript the HTML needs (MathJax, require.js, the
   ipywidgets HTML manager, d3 and jQuery for bertviz) is fetched from the npm
   registry with ``npm pack`` and unpacked into ``book/_vendor/``, which Sphinx
   copies to the HTML root (``html_extra_path`` in ``_config.yml``).
3. ``jupyter-book build`` renders the book (never executing anything itself).
4. :func:`check_offline` -- the built HTML is scanned for anything a browser
   would load from another host.

Run it with ``python -m headlab.book`` (see :func:`book_main`).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

__all__ = [
    "NPM_PACKAGES",
    "ChapterError",
    "book_main",
    "browser_requests",
    "CDN_REWRITES",
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

#: Every npm package the built HTML uses, pinned. ``vendor_js`` fetches exactly these.
NPM_PACKAGES: dict[str, str] = {
    # MathJax 3 (es5 build); Sphinx's default is the same file on jsdelivr.
    "mathjax": "3.2.2",
    # AMD loader that embed-amd.js (and bertviz's output) expect on the page.
    "requirejs": "2.3.6",
    # ipywidgets 8 embed bundle; bundles @jupyter-widgets/base, controls and output.
    "@jupyter-widgets/html-manager": "1.0.15",
    # For bertviz outputs (which ask for d3 5.7.0 and jQuery 2.0.0; 2.0.0 is not on npm).
    "d3": "5.7.0",
    "jquery": "2.2.4",
}

#: Jupyter kernelspec written into converted notebooks.
KERNELSPEC: dict[str, str] = {"name": "python3", "display_name": "Python 3", "language": "python"}

#: Where ``npm pack`` tarballs are kept between builds (override with $HEADLAB_NPM_CACHE).
NPM_CACHE = Path(os.environ.get("HEADLAB_NPM_CACHE", Path.home() / ".cache" / "headlab" / "npm"))

# The one MathJax combined component shipped (Sphinx's default, TeX + MathML -> CHTML).
# The other top-level *.js of MathJax's es5/ are left out, among them latest.js, which
# exists only to fetch "the latest MathJax" from a CDN.
_MATHJAX_ENTRY = "tex-mml-chtml.js"


# Loaded right after require.js (see nb_ipywidgets_js in _config.yml). embed-amd.js
# defines its AMD modules itself, but its webpack runtime derives the URL of the font
# files it ships (font-awesome, for widget icons) from the requirejs module URL, which
# by default is relative to the *page* (chapters/@jupyter-widgets/...: a 404). Mapping
# the ids onto the vendored folder fixes that; d3/jquery are mapped for bertviz output.
_REQUIRE_PATHS_JS = """\
// Written by headlab.book.vendor_js: map AMD module ids onto the vendored copies.
(function () {
  var here = document.currentScript.src.replace(/[?#].*$/, "").replace(/[^\\/]*$/, "");
  require.config({
    paths: {
      "@jupyter-widgets": here + "jupyter-widgets",
      "@jupyter-widgets/html-manager/dist": here + "jupyter-widgets",
      "d3": here + "d3/d3.min",
      "jquery": here + "jquery/jquery.min"
    }
  });
})();
"""


class ChapterError(RuntimeError):
    """A chapter notebook failed to execute; the partially executed copy is kept on disk."""


# ---------------------------------------------------------------------------
# 1. notebooks
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# 2. vendored JavaScript
# ---------------------------------------------------------------------------


def _npm_tarball(package: str, version: str, cache: Path = NPM_CACHE) -> Path:
    """Return the cached ``npm pack`` tarball of ``package@version``, fetching it once.

    Args:
        package: npm package name, possibly scoped (``@scope/name``).
        version: Exact version.
        cache: Cache folder.

    Returns:
        Path of the ``.tgz`` in ``cache``.
    """
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"
    if cached.is_file() and cached.stat().st_size > 0:
        return cached
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is needed to fetch {package}@{version} (not cached in {cache})")
    with tempfile.TemporaryDirectory(prefix="headlab-npm-") as tmp:
        proc = subprocess.run(
            [npm, "pack", f"{package}@{version}", "--json", "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"npm pack {package}@{version} failed:\n{proc.stderr[-2000:]}")
        packed = json.loads(proc.stdout)[0]["filename"]
        # npm names scoped tarballs "scope-name-version.tgz"; move atomically into the cache.
        partial = cached.with_suffix(".partial")
        shutil.move(str(Path(tmp) / packed), partial)
        partial.replace(cached)
    return cached


def _unpack(tarball: Path, dest: Path) -> Path:
    """Extract an npm tarball into ``dest`` and return its ``package/`` folder.

    Args:
        tarball: The ``.tgz`` produced by ``npm pack``.
        dest: Empty folder to extract into.

    Returns:
        The extracted package root.
    """
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="data")
    return dest / "package"


def vendor_js(dest: Path) -> dict[str, str]:
    """Fetch the pinned npm packages and lay out the files the book's HTML loads.

    Tarballs are cached in ``~/.cache/headlab/npm`` (``$HEADLAB_NPM_CACHE``), so a
    rebuild needs no network. ``dest`` is rewritten only when the pinned versions
    change (the ``vendor-versions.json`` stamp records what is there).

    Layout of ``dest``; Sphinx copies its contents to the HTML root
    (``html_extra_path``), and ``_config.yml`` refers to these paths::

        mathjax/                 MathJax es5 tree: tex-mml-chtml.js + lazily loaded parts
        require.js               requirejs
        require-paths.js         require.config() mapping module ids onto this folder
        jupyter-widgets/         embed-amd.js (+ the font files its CSS refers to)
        d3/d3.min.js, jquery/jquery.min.js
        vendor-licenses/         the packages' licence files
        vendor-versions.json     the pinned versions (NPM_PACKAGES)

    Args:
        dest: Target folder, e.g. ``book/_vendor`` (not ``_static``, see ``_config.yml``).

    Returns:
        Mapping from a short name to the path, relative to ``dest``, of its entry file.
    """
    entries = {
        "mathjax": f"mathjax/{_MATHJAX_ENTRY}",
        "requirejs": "require.js",
        "require-paths": "require-paths.js",
        "embed-amd": "jupyter-widgets/embed-amd.js",
        "d3": "d3/d3.min.js",
        "jquery": "jquery/jquery.min.js",
    }
    dest = Path(dest)
    stamp = dest / "vendor-versions.json"
    if (
        stamp.is_file()
        and json.loads(stamp.read_text()) == NPM_PACKAGES
        and all((dest / rel).is_file() for rel in entries.values())
        and (dest / "require-paths.js").read_text() == _REQUIRE_PATHS_JS
    ):
        return entries

    tarballs = {pkg: _npm_tarball(pkg, ver) for pkg, ver in NPM_PACKAGES.items()}
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="headlab-vendor-") as tmp:
        roots = {pkg: _unpack(tgz, Path(tmp) / pkg.replace("/", "_")) for pkg, tgz in tarballs.items()}

        # MathJax: the whole es5 tree (input/, output/ with the CHTML woff fonts, a11y/,
        # ui/, sre/ ...: all loaded lazily, relative to the entry script) but only the one
        # combined component we use. latest.js is left out on purpose: it fetches MathJax
        # from a CDN.
        es5 = roots["mathjax"] / "es5"
        shutil.copytree(
            es5,
            staging / "mathjax",
            ignore=lambda d, names: [
                n for n in names if Path(d) == es5 and n.endswith(".js") and n != _MATHJAX_ENTRY
            ],
        )
        shutil.copy2(roots["requirejs"] / "require.js", staging / "require.js")
        (staging / "require-paths.js").write_text(_REQUIRE_PATHS_JS)
        # embed-amd.js plus the font files (font-awesome) its bundled CSS refers to.
        html_manager = roots["@jupyter-widgets/html-manager"] / "dist"
        (staging / "jupyter-widgets").mkdir()
        for f in html_manager.iterdir():
            if f.name == "embed-amd.js" or f.suffix in {".woff", ".woff2", ".ttf", ".eot", ".svg"}:
                shutil.copy2(f, staging / "jupyter-widgets" / f.name)
        (staging / "d3").mkdir()
        shutil.copy2(roots["d3"] / "dist" / "d3.min.js", staging / "d3" / "d3.min.js")
        (staging / "jquery").mkdir()
        shutil.copy2(roots["jquery"] / "dist" / "jquery.min.js", staging / "jquery" / "jquery.min.js")

        licences = staging / "vendor-licenses"
        licences.mkdir()
        for pkg, root in roots.items():
            for lic in sorted(root.glob("LICEN[CS]E*")):
                shutil.copy2(lic, licences / f"{pkg.replace('/', '_')}-{lic.name}")

    (staging / "vendor-versions.json").write_text(json.dumps(NPM_PACKAGES, indent=2) + "\n")
    missing = [rel for rel in entries.values() if not (staging / rel).is_file()]
    if missing:
        raise RuntimeError(f"vendored packages lack {missing}")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return entries


#: CDN URLs written into executed notebooks by libraries we use, and the vendored file (relative to
#: the HTML root, where :func:`vendor_js` puts its files) each is replaced with. bertviz's head view
#: loads require.js with a ``<script src>`` and asks require.js for d3 and jQuery; jQuery 2.0.0 is
#: not on npm, so the vendored 2.2.4 (same 2.x API) stands in. Module paths have no ``.js`` suffix
#: (require.js adds it).
CDN_REWRITES: dict[str, str] = {
    "https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.6/require.min.js": "require.js",
    "https://cdnjs.cloudflare.com/ajax/libs/d3/5.7.0/d3.min": "d3/d3.min",
    "https://cdnjs.cloudflare.com/ajax/libs/jquery/2.0.0/jquery.min": "jquery/jquery.min",
}


def localize_outputs(notebook: Path, root: str = "../") -> int:
    """Rewrite the CDN URLs of :data:`CDN_REWRITES` in a notebook's outputs to the vendored copies.

    The executed notebook keeps working in JupyterLab on a connected machine until this runs; the
    book build applies it to ``book/chapters/*.ipynb`` before rendering, so pages load the vendored
    files. Both the ``<script src>`` of an HTML output and the ``require.config`` paths of a
    JavaScript output are relative to the page, which sits ``root`` below the HTML root
    (``"../"`` for ``chapters/<stem>.html``; require.js resolves paths against the page's folder).

    Args:
        notebook: An executed ``.ipynb``, rewritten in place when anything changes.
        root: Path from the page's folder to the HTML root.

    Returns:
        Number of URLs replaced.
    """
    notebook = Path(notebook)
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    count = 0

    def fix(value: Any) -> Any:
        nonlocal count
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, str):
            for url, local in CDN_REWRITES.items():
                if url in value:
                    count += value.count(url)
                    value = value.replace(url, root + local)
        return value

    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            data = out.get("data")
            if isinstance(data, dict):
                for mime in ("text/html", "application/javascript"):
                    if mime in data:
                        data[mime] = fix(data[mime])
    if count:
        notebook.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return count


# ---------------------------------------------------------------------------
# 3. offline check
# ---------------------------------------------------------------------------

# A URL "leaves the host" when it has a scheme that reaches the network or is
# scheme-relative ("//cdn..."). Relative paths, "#...", data:, blob:, about:,
# javascript:, mailto: and file: do not.
_EXTERNAL = re.compile(r"^\s*(?:(?:https?|wss?|ftp):)?//", re.IGNORECASE)

# <link rel=...> values that are only metadata/navigation; anything else (stylesheet,
# icon, preload, prefetch, preconnect, dns-prefetch, manifest, ...) makes a request.
_NAV_RELS = frozenset(
    "alternate author bookmark canonical first help index last license me next prev previous "
    "search up".split()
)

# tag -> attributes whose URL the browser fetches by itself. <a href>, <area href> and
# <form action> are only followed when the reader clicks: they are allowed.
_LOAD_ATTRS: dict[str, tuple[str, ...]] = {
    "script": ("src",),
    "img": ("src", "srcset"),
    "source": ("src", "srcset"),
    "iframe": ("src",),
    "frame": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "video": ("src", "poster"),
    "audio": ("src",),
    "track": ("src",),
    "input": ("src",),
    "image": ("href", "xlink:href"),
    "use": ("href", "xlink:href"),
    "feimage": ("href", "xlink:href"),
}

# Quoted absolute or scheme-relative URLs in script text ("https://x.y/...", '//x.y/...').
_QUOTED_URL = re.compile(
    r"""(?P<q>["'`])(?P<url>(?:(?:https?|wss?):)?//[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+(?::\d+)?[^\s"'`<>\\]*)"""
)
_CSS_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
_CSS_URL = re.compile(r"""url\(\s*(?P<q>["']?)(?P<url>[^"')]*)(?P=q)\s*\)""", re.IGNORECASE)
_CSS_IMPORT = re.compile(r"""@import\s+(?P<q>["'])(?P<url>[^"']*)(?P=q)""", re.IGNORECASE)
# A string that is the target of an <a href=...> written inside JavaScript: a link, not a load.
_LINK_BEFORE = re.compile(r"""<a\s[^<>]*href\s*=\s*\\?$""", re.IGNORECASE)

# String constants inside vendored *library code* that look like loads but are never
# fetched with our configuration: (file glob relative to the HTML root, URL regex that
# must match the whole string, why it is inert). Only .js files are filtered this way;
# nothing written into a page's HTML is ever allowed. Scoping by file keeps e.g. the
# jsdelivr entries from hiding a jsdelivr URL in some other script.
_INERT_JS_URLS: tuple[tuple[str, str, str], ...] = (
    # XML/JSON namespace and schema identifiers: compared as strings, never dereferenced.
    ("*", r"http://www\.w3\.org/.*", "XML namespace identifier"),
    ("mathjax/*", r"http://exslt\.org/.*", "XSLT namespace identifier (MathJax mml3)"),
    ("jupyter-widgets/embed-amd.js", r"http://json-schema\.org/.*", "JSON-schema id (ajv)"),
    (
        "jupyter-widgets/embed-amd.js",
        r"https://raw\.githubusercontent\.com/ajv-validator/ajv/master/lib/refs/data\.json#?",
        "ajv's $data meta-schema $id: an identifier, the schema itself is bundled",
    ),
    # embed-amd.js's default widget CDN. Our pages set data-jupyter-widgets-cdn on its
    # script tag (the HTML scan checks that), and base/controls/output are bundled, so
    # the default is never used.
    ("jupyter-widgets/embed-amd.js", r"https://cdn\.jsdelivr\.net/npm/", "overridden in the page"),
    # speech-rule-engine (bundled in MathJax): its default locale path. MathJax sets its
    # own [mathjax]/sre/mathmaps (shipped in mathjax/sre/), and speech/explorer code only
    # runs when a reader switches it on in the MathJax menu.
    ("mathjax/*", r"https://cdn\.jsdelivr\.net/npm/speech-rule-engine@", "SRE default, overridden"),
    # speech-rule-engine fallbacks for browsers without document.evaluate (Internet Explorer).
    ("mathjax/*", r"https://cdn\.jsdelivr\.net/npm/sre-mathmaps-ie@", "SRE IE-only fallback"),
    (
        "mathjax/*",
        r"https://cdn\.jsdelivr\.net/npm/wicked-good-xpath@1\.3\.0/dist/wgxpath\.install\.js",
        "SRE IE-only XPath polyfill",
    ),
)


def _is_external(url: str) -> bool:
    """Return whether ``url`` would be fetched from another host."""
    return bool(_EXTERNAL.match(html.unescape(url)))


def _srcset_urls(value: str) -> list[str]:
    """Split an ``srcset`` attribute into its URLs."""
    return [part.strip().split()[0] for part in value.split(",") if part.strip()]


def _css_urls(css: str) -> list[str]:
    """Return the external URLs a stylesheet (comments stripped) would load."""
    css = _CSS_COMMENT.sub("", css)
    found = [m.group("url") for m in _CSS_URL.finditer(css)]
    found += [m.group("url") for m in _CSS_IMPORT.finditer(css)]
    return [u.strip() for u in found if _is_external(u.strip())]


def _in_block_comment(text: str, pos: int) -> bool:
    """Return whether ``pos`` lies inside a ``/* ... */`` comment (also one embedded in a string)."""
    window = text[max(0, pos - 4000) : pos]
    return window.rfind("/*") > window.rfind("*/")


def _script_urls(js: str, *, library_file: str | None = None) -> list[str]:
    """Return quoted external URLs in JavaScript source that could be loaded.

    Args:
        js: Script text.
        library_file: Path of the ``.js`` file relative to the HTML root; when given, the
            documented constants of ``_INERT_JS_URLS`` for that file are dropped. Left
            out for scripts written into a page.

    Returns:
        The URLs, in order of appearance.
    """
    inert = [
        re.compile(rx) for glob, rx, _ in _INERT_JS_URLS if library_file and fnmatch(library_file, glob)
    ]
    found = []
    for m in _QUOTED_URL.finditer(js):
        url = m.group("url")
        if _LINK_BEFORE.search(js[max(0, m.start() - 300) : m.start()]):
            continue  # '<a href="https://...">' built in JS: a hyperlink
        if _in_block_comment(js, m.start()):
            continue
        if any(rx.fullmatch(url) for rx in inert):
            continue
        found.append(url)
    return found


class _PageScanner(HTMLParser):
    """Collect what an HTML page would load from other hosts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self._script: dict[str, str] | None = None
        self._style = False
        self._text: list[str] = []

    def _add(self, url: str | None) -> None:
        if url and _is_external(url):
            self.urls.append(url.strip())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k.lower(): (v or "") for k, v in attrs}
        tag = tag.lower()
        for name in _LOAD_ATTRS.get(tag, ()):
            if name in a:
                for url in _srcset_urls(a[name]) if name == "srcset" else [a[name]]:
                    self._add(url)
        if tag == "link" and "href" in a:
            rels = set(a.get("rel", "").lower().split())
            if not rels or not rels <= _NAV_RELS:
                self._add(a["href"])
        if "background" in a:
            self._add(a["background"])
        if "style" in a:
            self.urls += _css_urls(a["style"])
        if tag == "script":
            self._script, self._text = a, []
            src = a.get("src", "")
            if src.split("?")[0].endswith("embed-amd.js"):
                # embed-amd.js fetches non-bundled widget modules from this attribute,
                # defaulting to jsdelivr: it must be present and local.
                self._add(a.get("data-jupyter-widgets-cdn") or "https://cdn.jsdelivr.net/npm/")
        elif tag == "style":
            self._style, self._text = True, []

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag.lower() == "script":
            self.handle_endtag("script")

    def handle_data(self, data: str) -> None:
        if self._script is not None or self._style:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        tag = tag.lower()
        if tag == "script" and self._script is not None:
            # Every inline script body is checked, data blocks (widget state JSON) included:
            # a URL there ends up in an <img>, a require path, ... once rendered.
            self.urls += _script_urls("".join(self._text))
            self._script = None
        elif tag == "style" and self._style:
            self.urls += _css_urls("".join(self._text))
            self._style = False


def find_external_urls(html_dir: Path) -> list[tuple[str, str]]:
    """List everything in a built site that would make a browser contact another host.

    Scanned:

    * every ``.html`` file: ``<script src>``, ``<link href>`` (except navigation-only rels
      such as ``canonical``/``next``), ``<img src/srcset>``, ``<iframe src>``, media,
      ``<object data>``, SVG ``href``, ``style`` attributes and ``<style>`` blocks
      (``url()``, ``@import``), and absolute/scheme-relative URLs quoted in any
      ``<script>`` body (e.g. ``require.config({paths: {d3: 'https://...'}})``);
      an ``embed-amd.js`` script tag without a local ``data-jupyter-widgets-cdn``;
    * every ``.css`` file (comments stripped): ``url()`` and ``@import``;
    * every ``.js`` file except ``searchindex.js`` (page text, not code): quoted
      absolute URLs, minus those inside block comments, ``<a href>`` strings built in
      JS, and the documented inert library constants of ``_INERT_JS_URLS``.

    Plain hyperlinks (``<a href="https://...">``) are not loads and are not reported.
    This is a static scan; the ground truth is a browser's request log (see
    :func:`browser_requests`).

    Args:
        html_dir: Root of the built HTML, e.g. ``book/_build/html``.

    Returns:
        ``(file relative to html_dir, url)`` pairs, sorted, duplicates removed.
    """
    html_dir = Path(html_dir)
    found: set[tuple[str, str]] = set()
    for path in sorted(html_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(html_dir).as_posix()
        suffix = path.suffix.lower()
        if suffix not in {".html", ".htm", ".css", ".js", ".mjs"} or path.name == "searchindex.js":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if suffix in {".html", ".htm"}:
            scanner = _PageScanner()
            scanner.feed(text)
            scanner.close()
            urls = scanner.urls
        elif suffix == ".css":
            urls = _css_urls(text)
        else:
            urls = _script_urls(text, library_file=rel)
        found.update((rel, url) for url in urls)
    return sorted(found)


def check_offline(html_dir: Path) -> None:
    """Fail if the built site would load anything from another host.

    Args:
        html_dir: Root of the built HTML.

    Raises:
        RuntimeError: listing every ``(file, url)`` found by :func:`find_external_urls`.
    """
    offending = find_external_urls(html_dir)
    if offending:
        lines = "\n".join(f"  {file}: {url}" for file, url in offending)
        raise RuntimeError(f"{len(offending)} external load(s) in {html_dir}:\n{lines}")


class _AssetScanner(HTMLParser):
    """Collect the local scripts and stylesheets a page loads."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k.lower(): (v or "") for k, v in attrs}
        if tag == "script" and a.get("src"):
            self.refs.append(a["src"])
        elif tag == "link" and a.get("href") and "stylesheet" in a.get("rel", "").lower().split():
            self.refs.append(a["href"])


def find_missing_assets(html_dir: Path) -> list[tuple[str, str]]:
    """List local ``<script src>`` / stylesheet references that point at no file.

    This catches relative paths that are right on one page and wrong on another (pages
    sit at different depths, e.g. ``index.html`` and ``chapters/01_baseline.html``).

    Args:
        html_dir: Root of the built HTML.

    Returns:
        ``(page relative to html_dir, reference)`` pairs.
    """
    html_dir = Path(html_dir).resolve()
    missing = []
    for page in sorted(html_dir.rglob("*.html")):
        if page.relative_to(html_dir).parts[0] == "_static":
            continue  # Jinja macro files the themes ship, not pages
        scanner = _AssetScanner()
        scanner.feed(page.read_text(encoding="utf-8", errors="replace"))
        for ref in scanner.refs:
            if _is_external(ref) or ref.startswith(("data:", "blob:")):
                continue
            target = ref.split("#")[0].split("?")[0]
            resolved = (html_dir / target.lstrip("/")) if target.startswith("/") else page.parent / target
            if not resolved.resolve().is_file():
                missing.append((page.relative_to(html_dir).as_posix(), ref))
    return missing


@contextmanager
def _serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (random port) and yield its base URL."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def browser_requests(
    html_dir: Path, pages: list[str], chromium: str = "chromium", budget_ms: int = 8000
) -> dict[str, list[str]]:
    """Open pages in headless Chromium and return every URL each page requested.

    ``html_dir`` is served on 127.0.0.1, as a host would serve it, and each page is
    loaded with Chromium's network log on (``--log-net-log``), so requests made by
    scripts at run time are seen too, which no static scan can promise. Only requests
    the page initiated are returned: Chromium's own component-update and account
    pings (logged with initiator "not an origin") are left out. Host name resolution
    is disabled for everything but 127.0.0.1, so even a leaking page sends nothing
    out during the check; its attempt is still logged and returned.

    Args:
        html_dir: Root of the built HTML.
        pages: Pages to open, relative to ``html_dir`` (e.g. ``chapters/01_baseline.html``).
        chromium: Name or path of the Chromium executable (Debian package ``chromium``).
        budget_ms: Virtual time each page gets to run its scripts.

    Returns:
        ``{page: sorted distinct URLs it requested}``; external ones are those for which
        :func:`_is_external` is true and whose host is not 127.0.0.1.
    """
    exe = shutil.which(chromium)
    if exe is None:
        raise RuntimeError(f"{chromium} not found (apt-get install chromium)")
    result: dict[str, list[str]] = {}
    with _serve(Path(html_dir)) as base, tempfile.TemporaryDirectory(prefix="headlab-chromium-") as tmp:
        for page in pages:
            netlog = Path(tmp) / "netlog.json"
            netlog.unlink(missing_ok=True)
            subprocess.run(
                [
                    exe, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-default-apps", "--no-first-run",
                    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                    f"--user-data-dir={tmp}/profile", f"--log-net-log={netlog}",
                    f"--virtual-time-budget={budget_ms}", "--dump-dom", base + page,
                ],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            log = json.loads(netlog.read_text()) if netlog.exists() else {"events": [], "constants": {}}
            start_job = log["constants"].get("logEventTypes", {}).get("URL_REQUEST_START_JOB")
            urls = {
                e["params"]["url"]
                for e in log["events"]
                if e.get("type") == start_job
                and "url" in e.get("params", {})
                and e["params"].get("initiator") != "not an origin"
            }
            result[page] = sorted(urls)
    return result


_CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-first-run",
    "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def render_page(html_dir: Path, page: str, screenshot: Path | None = None, chromium: str = "chromium",
                budget_ms: int = 10000, window: tuple[int, int] = (1280, 2400)) -> str:
    """Open one page in headless Chromium (served on 127.0.0.1) and return its DOM after the scripts ran.

    Args:
        html_dir: Root of the built HTML.
        page: Page relative to ``html_dir``.
        screenshot: Also save a PNG of the first ``window`` pixels of the page there.
        chromium: Name or path of the Chromium executable.
        budget_ms: Virtual time the page's scripts get before the DOM is read.
        window: Window size in pixels (width, height).

    Returns:
        The serialised DOM (``--dump-dom``).
    """
    exe = shutil.which(chromium)
    if exe is None:
        raise RuntimeError(f"{chromium} not found (apt-get install chromium)")
    with _serve(Path(html_dir)) as base, tempfile.TemporaryDirectory(prefix="headlab-chromium-") as tmp:
        common = [exe, *_CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile", f"--virtual-time-budget={budget_ms}",
                  f"--window-size={window[0]},{window[1]}"]
        proc = subprocess.run([*common, "--dump-dom", base + page], capture_output=True, text=True,
                              timeout=180, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise RuntimeError(f"chromium could not render {page} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        if screenshot is not None:
            screenshot = Path(screenshot).resolve()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([*common, f"--screenshot={screenshot}", base + page], capture_output=True,
                           text=True, timeout=180, check=False)
            if not screenshot.is_file():
                raise RuntimeError(f"chromium wrote no screenshot of {page} to {screenshot}")
    return proc.stdout


class _DrawnScanner(HTMLParser):
    """Count what interactive outputs drew in a rendered DOM."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, opens a bertviz view, opens a widget output)
        self.bertviz_views = 0
        self.bertviz_drawn: set[int] = set()
        self.svg_shapes = 0
        self.widgets = 0
        self.widget_images = 0

    def _inside(self, which: int) -> int | None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][which]:
                return i
        return None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k.lower(): (v or "") for k, v in attrs}
        classes = a.get("class", "").split()
        bertviz = tag == "div" and a.get("id", "").startswith("bertviz-")
        output = "widget-output" in classes or "jupyter-widgets-output-area" in classes
        if bertviz:
            self.bertviz_views += 1
        if "jupyter-widgets" in classes or any(c.startswith("widget-") for c in classes):
            self.widgets += 1
        view = self._inside(1)
        if tag in ("rect", "line", "text", "path") and view is not None:
            self.svg_shapes += 1
            self.bertviz_drawn.add(view)
        if tag == "img" and a.get("src", "").startswith("data:image/") and self._inside(2) is not None:
            self.widget_images += 1
        if tag not in ("img", "br", "hr", "input", "meta", "link", "rect", "line", "path", "circle"):
            self.stack.append((tag, bertviz, output))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break


def drawn_outputs(dom: str) -> dict[str, int]:
    """What the interactive outputs of a rendered page drew (from :func:`render_page`'s DOM).

    Returns:
        ``bertviz_views`` (head-view containers), ``bertviz_drawn`` (containers holding SVG shapes),
        ``svg_shapes`` (rect/line/text/path elements inside them), ``widgets`` (elements of rendered
        ipywidgets) and ``widget_images`` (images inside rendered Output widgets).
    """
    scanner = _DrawnScanner()
    scanner.feed(dom)
    scanner.close()
    return {"bertviz_views": scanner.bertviz_views, "bertviz_drawn": len(scanner.bertviz_drawn),
            "svg_shapes": scanner.svg_shapes, "widgets": scanner.widgets,
            "widget_images": scanner.widget_images}


def check_drawn(html_dir: Path, pages: list[str], artefacts: Path | None = None) -> dict[str, dict[str, int]]:
    """Fail unless every bertviz view and widget output on the pages actually drew in Chromium.

    A page whose HTML holds a bertviz container must show SVG shapes in each; a page that embeds
    widget views (``application/vnd.jupyter.widget-view+json``) must show rendered widgets.

    Args:
        html_dir: Root of the built HTML.
        pages: Pages relative to ``html_dir``.
        artefacts: Folder for a screenshot of each checked page (``<page path with __>.png``).

    Returns:
        ``{page: drawn_outputs(dom)}`` for the pages that have such outputs.
    """
    report, problems = {}, []
    for page in pages:
        text = (Path(html_dir) / page).read_text(encoding="utf-8", errors="replace")
        views = len(re.findall(r'id="bertviz-[0-9a-f]+"', text))
        widgets = text.count("application/vnd.jupyter.widget-view+json")
        if not views and not widgets:
            continue
        shot = None if artefacts is None else Path(artefacts) / (page.replace("/", "__") + ".png")
        drawn = drawn_outputs(render_page(html_dir, page, screenshot=shot))
        report[page] = drawn
        if drawn["bertviz_drawn"] < views:
            problems.append(f"{page}: {drawn['bertviz_drawn']} of {views} bertviz views drew ({drawn})")
        if widgets and drawn["widgets"] == 0:
            problems.append(f"{page}: {widgets} widget views in the HTML but none rendered ({drawn})")
    if problems:
        raise RuntimeError("interactive outputs did not draw:\n" + "\n".join(problems))
    return report


# ---------------------------------------------------------------------------
# 4. the whole book
# ---------------------------------------------------------------------------


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


def _parse_value(text: str) -> Any:
    """Interpret a ``-p`` value like papermill's CLI does: bool, None, int, float or str."""
    lowered = text.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


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
    parser.add_argument(
        "-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
        help="papermill parameter for every chapter (repeatable); VALUE is parsed as "
        "bool/None/int/float, else kept as a string",
    )  # fmt: skip
    parser.add_argument(
        "--browser-check", action="store_true", help="also load every page in headless Chromium"
    )
    ns = parser.parse_args(args)
    parameters = {key: _parse_value(value) for key, value in ns.parameter}
    try:
        build_book(ns.root, ns.chapters, parameters or None, ns.execute, ns.browser_check)
    except (ChapterError, RuntimeError, FileNotFoundError) as err:
        print(f"[book] FAILED: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(book_main())
