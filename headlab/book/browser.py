"""The built book in headless Chromium: what each page requests, and whether its interactive outputs drew.

The HTML folder is served on 127.0.0.1 (:func:`_serve`) and each page opened in Debian's ``chromium``
with host resolution disabled for every other host. :func:`browser_requests` returns the URLs a page
requested (network log); :func:`render_page` returns the DOM after the scripts ran;
:func:`drawn_outputs` / :func:`check_drawn` count what bertviz views and ipywidgets drew in it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

__all__ = ["browser_requests", "check_drawn", "drawn_outputs", "render_page"]


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


# Every Chromium run: headless, no background traffic of its own, and no host but 127.0.0.1 resolves,
# so even a leaking page sends nothing out (its attempt is still in the network log).
_CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-first-run",
    "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def _chromium(name: str) -> str:
    """The path of the Chromium executable ``name``; a clear error when it is not installed."""
    exe = shutil.which(name)
    if exe is None:
        raise RuntimeError(f"{name} not found (apt-get install chromium)")
    return exe


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
        ``{page: sorted distinct URLs it requested}``; external ones are those whose host is not
        127.0.0.1.
    """
    exe = _chromium(chromium)
    result: dict[str, list[str]] = {}
    with _serve(Path(html_dir)) as base, tempfile.TemporaryDirectory(prefix="headlab-chromium-") as tmp:
        for page in pages:
            netlog = Path(tmp) / "netlog.json"
            netlog.unlink(missing_ok=True)
            subprocess.run(
                [exe, *_CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile", f"--log-net-log={netlog}",
                 f"--virtual-time-budget={budget_ms}", "--dump-dom", base + page],
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
    exe = _chromium(chromium)
    with _serve(Path(html_dir)) as base, tempfile.TemporaryDirectory(prefix="headlab-chromium-") as tmp:
        common = [exe, *_CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile",
                  f"--virtual-time-budget={budget_ms}", f"--window-size={window[0]},{window[1]}"]
        proc = subprocess.run([*common, "--dump-dom", base + page], capture_output=True, text=True,
                              timeout=180, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise RuntimeError(
                f"chromium could not render {page} (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
            )
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
