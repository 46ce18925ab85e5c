"""The JavaScript the book's HTML loads, vendored from npm so the pages need no other host.

:func:`vendor_js` fetches the pinned :data:`NPM_PACKAGES` with ``npm pack`` (tarballs cached in
``~/.cache/headlab/npm``) and lays them out in ``book/_vendor/``, which Sphinx copies to the HTML root
(``html_extra_path`` in ``_config.yml``). :func:`localize_outputs` points the CDN URLs that libraries
write into executed notebooks (:data:`CDN_REWRITES`, bertviz) at those vendored copies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from headlab.figures import PLOTLY_PACKAGE, PLOTLY_URL, PLOTLY_VERSION

__all__ = ["CDN_REWRITES", "NPM_CACHE", "NPM_PACKAGES", "localize_outputs", "vendor_js"]

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
    # Draws the interactive figures of headlab.figures: the cartesian bundle (heatmap, scatter, bar).
    PLOTLY_PACKAGE: PLOTLY_VERSION,
}

#: Where ``npm pack`` tarballs are kept between builds (override with $HEADLAB_NPM_CACHE).
NPM_CACHE = Path(os.environ.get("HEADLAB_NPM_CACHE", Path.home() / ".cache" / "headlab" / "npm"))

# plotly.js bundle the figures load, relative to the vendored folder (the same name as in the npm package).
_PLOTLY_FILE = "plotly/plotly-cartesian.min.js"

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
        plotly/plotly-cartesian.min.js   plotly.js for headlab.figures (loaded by the figures that need it)
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
        "plotly": _PLOTLY_FILE,
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
        (staging / "plotly").mkdir()
        shutil.copy2(roots[PLOTLY_PACKAGE] / Path(_PLOTLY_FILE).name, staging / _PLOTLY_FILE)

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


#: CDN URLs written into executed notebooks by libraries we use (and by :mod:`headlab.figures`), and the vendored file (relative to
#: the HTML root, where :func:`vendor_js` puts its files) each is replaced with. bertviz's head view
#: loads require.js with a ``<script src>`` and asks require.js for d3 and jQuery; jQuery 2.0.0 is
#: not on npm, so the vendored 2.2.4 (same 2.x API) stands in. Module paths have no ``.js`` suffix
#: (require.js adds it).
CDN_REWRITES: dict[str, str] = {
    "https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.6/require.min.js": "require.js",
    "https://cdnjs.cloudflare.com/ajax/libs/d3/5.7.0/d3.min": "d3/d3.min",
    "https://cdnjs.cloudflare.com/ajax/libs/jquery/2.0.0/jquery.min": "jquery/jquery.min",
    # headlab.figures loads plotly.js from plotly's CDN when the notebook is opened elsewhere.
    PLOTLY_URL: _PLOTLY_FILE,
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

