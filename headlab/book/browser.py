"""The built book in headless Chromium: what each page requests, whether its interactive outputs drew,
and what they do when a reader uses them.

The HTML folder is served on 127.0.0.1 (:func:`_serve`) and each page opened in Debian's ``chromium``
with host resolution disabled for every other host. :func:`browser_requests` returns the URLs a page
requested (network log); :func:`render_page` returns the DOM after the scripts ran;
:func:`drawn_outputs` / :func:`check_drawn` count what bertviz views, ipywidgets and headlab figures
drew in it. :class:`BrowserPage` drives a page over the DevTools protocol (on a pipe, no port): run
script, pick a menu entry, move or click the mouse like a reader, take a screenshot.
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

__all__ = ["BrowserPage", "browser_requests", "check_drawn", "drawn_outputs", "render_page"]


@contextmanager
def _serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (random port) and yield its base URL."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a browser that closes a connection early (favicon.ico 404) is not an error here

    handler = functools.partial(Quiet, directory=str(folder))
    server = Server(("127.0.0.1", 0), handler)
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


class BrowserPage:
    """One page of a built site in headless Chromium, driven over the DevTools protocol.

    Chromium talks on a pipe (``--remote-debugging-pipe``: it reads commands from file descriptor 3 and
    answers on 4), so no port is opened and no extra package is needed. Mouse input goes through
    ``Input.dispatchMouseEvent``: the page sees the same trusted events a reader's mouse makes. Every
    URL the page requests (``data:`` URLs aside) is collected in :attr:`requests`.

    Use as a context manager::

        with BrowserPage(html_dir, "chapters/02_noise_perturbation.html") as page:
            page.wait_for("document.querySelector('.headlab-figure[data-ready]') !== null")
            page.select("#fig select[data-key=seed]", "1")

    Args:
        html_dir: root of the built HTML (served on 127.0.0.1).
        page: the page, relative to ``html_dir``.
        chromium: name or path of the Chromium executable.
        window: window size in pixels.
        timeout: seconds :meth:`call` waits for an answer and the page for its load event.
    """

    def __init__(self, html_dir: Path, page: str, chromium: str = "chromium",
                 window: tuple[int, int] = (1280, 1400), timeout: float = 60.0) -> None:
        self.html_dir, self.page, self.exe = Path(html_dir), page, _chromium(chromium)
        self.window, self.timeout = window, timeout
        self.requests: list[str] = []
        self._id = 0
        self._events: list[dict[str, Any]] = []
        self._buffer = b""

    # -- process and protocol
    def __enter__(self) -> BrowserPage:
        import os
        from contextlib import ExitStack

        self._stack = ExitStack()
        try:
            base = self._stack.enter_context(_serve(self.html_dir))
            tmp = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="headlab-cdp-", ignore_cleanup_errors=True))
            to_child, self._write = os.pipe()  # chromium reads fd 3
            self._read, from_child = os.pipe()  # and writes fd 4

            def fds() -> None:  # in the child, before exec: the pipe ends become fds 3 and 4
                import fcntl

                high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
                os.dup2(high[0], 3)  # dup2 leaves the new descriptors inheritable
                os.dup2(high[1], 4)

            # close_fds=False keeps 3 and 4; every other descriptor Python opened is close-on-exec.
            self.proc = subprocess.Popen(
                [self.exe, *_CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={tmp}/profile",
                 f"--window-size={self.window[0]},{self.window[1]}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=fds, close_fds=False)  # fmt: skip
            os.close(to_child)
            os.close(from_child)
            self._stack.callback(self._close)
            target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Network"):
                self.call(f"{domain}.enable", session=True)
            self.call("Emulation.setDeviceMetricsOverride", {"width": self.window[0], "height": self.window[1],
                                                              "deviceScaleFactor": 1, "mobile": False}, session=True)
            self.call("Page.navigate", {"url": base + self.page}, session=True)
            self._wait_event("Page.loadEventFired")
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _close(self) -> None:
        import os

        for fd in (self._write, self._read):
            try:
                os.close(fd)
            except OSError:
                pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _receive(self, deadline: float) -> dict[str, Any]:
        import os
        import select
        import time

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer within {self.timeout:.0f} s ({self.page})")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the DevTools pipe ({self.page})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        msg = json.loads(raw)
        if msg.get("method") == "Network.requestWillBeSent":
            url = msg["params"]["request"]["url"]
            if not url.startswith("data:"):
                self.requests.append(url)
        return msg

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        """Send one DevTools command (to the page when ``session``) and return its result.

        Raises:
            RuntimeError: the command failed.
        """
        import os
        import time

        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._write, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def _wait_event(self, method: str) -> dict[str, Any]:
        import time

        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self._events):
                if ev.get("method") == method:
                    return self._events.pop(i)
            self._events.append(self._receive(deadline))

    # -- what a test or a reader does
    def evaluate(self, expression: str) -> Any:
        """Run JavaScript in the page (promises are awaited) and return its JSON value.

        Raises:
            RuntimeError: the script threw.
        """
        out = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                             "returnByValue": True}, session=True)
        if "exceptionDetails" in out:
            detail = out["exceptionDetails"]
            raise RuntimeError(f"script failed: {detail.get('exception', {}).get('description') or detail.get('text')}")
        return out.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, poll: float = 0.1) -> Any:
        """Evaluate ``expression`` until it is truthy and return its value.

        Raises:
            TimeoutError: it stayed falsy for ``timeout`` seconds.
        """
        import time

        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout:.0f} s: {expression}")
            time.sleep(poll)

    def select(self, css: str, value: str) -> None:
        """Pick ``value`` in the ``<select>`` matched by ``css``, as a reader's choice does (``change``).

        Raises:
            RuntimeError: no such menu, or no such entry in it.
        """
        self.evaluate(f"""(() => {{
            const s = document.querySelector({json.dumps(css)});
            if (!s) throw new Error("no menu " + {json.dumps(css)});
            const values = Array.from(s.options).map(o => o.value);
            if (!values.includes({json.dumps(str(value))}))
                throw new Error("menu " + {json.dumps(css)} + " has no " + {json.dumps(str(value))} + ": " + values);
            s.value = {json.dumps(str(value))};
            s.dispatchEvent(new Event("change", {{bubbles: true}}));
        }})()""")

    def scroll_into_view(self, css: str) -> None:
        """Scroll so that the element matched by ``css`` is in the window."""
        self.evaluate(f"document.querySelector({json.dumps(css)}).scrollIntoView({{block: 'center'}})")

    def mouse(self, x: float, y: float, click: bool = False) -> None:
        """Move the mouse to window point ``(x, y)`` (CSS pixels); press and release there if ``click``."""
        base = {"x": float(x), "y": float(y), "button": "none", "pointerType": "mouse"}
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", **base}, session=True)
        if click:
            for kind in ("mousePressed", "mouseReleased"):
                self.call("Input.dispatchMouseEvent",
                          {"type": kind, **base, "button": "left", "buttons": 1, "clickCount": 1}, session=True)

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of what the window shows."""
        import base64

        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


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
        self.figures = 0
        self.figures_ready = 0

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
        if tag == "div" and "headlab-figure" in classes:
            self.figures += 1
            self.figures_ready += "data-ready" in a
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
        ipywidgets), ``widget_images`` (images inside rendered Output widgets), ``figures``
        (:mod:`headlab.figures` containers) and ``figures_ready`` (those that finished drawing).
    """
    scanner = _DrawnScanner()
    scanner.feed(dom)
    scanner.close()
    return {"bertviz_views": scanner.bertviz_views, "bertviz_drawn": len(scanner.bertviz_drawn),
            "svg_shapes": scanner.svg_shapes, "widgets": scanner.widgets,
            "widget_images": scanner.widget_images, "figures": scanner.figures,
            "figures_ready": scanner.figures_ready}


def check_drawn(html_dir: Path, pages: list[str], artefacts: Path | None = None) -> dict[str, dict[str, int]]:
    """Fail unless every bertviz view and widget output on the pages actually drew in Chromium.

    A page whose HTML holds a bertviz container must show SVG shapes in each; a page that embeds
    widget views (``application/vnd.jupyter.widget-view+json``) must show rendered widgets; every
    :mod:`headlab.figures` figure must have finished drawing (plotly.js loaded, data decoded).

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
        figures = len(re.findall(r'<div class="headlab-figure" id="hlf-', text))
        if not views and not widgets and not figures:
            continue
        shot = None if artefacts is None else Path(artefacts) / (page.replace("/", "__") + ".png")
        drawn = drawn_outputs(render_page(html_dir, page, screenshot=shot))
        report[page] = drawn
        if drawn["bertviz_drawn"] < views:
            problems.append(f"{page}: {drawn['bertviz_drawn']} of {views} bertviz views drew ({drawn})")
        if widgets and drawn["widgets"] == 0:
            problems.append(f"{page}: {widgets} widget views in the HTML but none rendered ({drawn})")
        if drawn["figures_ready"] < figures:
            problems.append(f"{page}: {drawn['figures_ready']} of {figures} headlab figures drew ({drawn})")
    if problems:
        raise RuntimeError("interactive outputs did not draw:\n" + "\n".join(problems))
    return report
