"""Static offline check of a built site: find everything a browser would load from another host.

:func:`find_external_urls` scans the HTML, CSS and JavaScript files of ``book/_build/html`` (without
running them); :func:`check_offline` fails on any hit; :func:`find_missing_assets` lists local
``<script src>`` / stylesheet references that point at no file. The run-time ground truth is a
browser's request log (:func:`headlab.book.browser.browser_requests`).
"""

from __future__ import annotations

import html
import re
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path

__all__ = ["check_offline", "find_external_urls", "find_missing_assets"]

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
    # plotly.js (cartesian bundle): defaults of options we never use, links and message text.
    ("plotly/plotly-cartesian.min.js", r"https://cdn\.plot\.ly/un/",
     "topojsonURL default: only geo traces fetch it, and the cartesian bundle has none"),
    ("plotly/plotly-cartesian.min.js", r"https://cloud\.plotly\.com/newchart",
     "plotlyServerURL default: used only by the 'edit in Chart Studio' button, off by default"),
    ("plotly/plotly-cartesian.min.js", r"https://plotly\.com/",
     "href of the modebar logo link (headlab.figures sets displaylogo: false)"),
    ("plotly/plotly-cartesian.min.js", r"https://github\.com/d3/d3-(time-)?format/.*",
     "documentation links in error messages"),
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

