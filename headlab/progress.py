"""Progress of long loops, with elapsed time and an ETA, written where the person running it looks.

A loop reports through :class:`Progress` (or :func:`track` around an iterable)::

    with Progress(len(points), "noise sweep", unit="grid point") as bar:
        for p in points:
            ...
            bar.update()

Where the lines go:

* When the environment variable :data:`PROGRESS_ENV` names a file (``headlab book`` and ``headlab run``
  set it for the kernel that executes a chapter), each line is appended there. The build process
  follows that file and prints the lines in its own log, so ``make book`` shows how far a sweep is,
  while the executed notebook, and so the HTML book, stays free of progress output.
* Otherwise (JupyterLab, a script) the lines go to stderr.

Lines are throttled so that short loops stay silent: the first comes ``every`` seconds after the start,
then at most one every ``every`` seconds, and the last one (done) only when an earlier one was written.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["PROGRESS_ENV", "Progress", "format_seconds", "report", "track"]

#: Environment variable naming the file progress lines are appended to (set by the book build).
PROGRESS_ENV = "HEADLAB_PROGRESS"

T = TypeVar("T")


def format_seconds(seconds: float) -> str:
    """``75`` -> ``"1m15s"``, ``3725`` -> ``"1h02m"``, ``9.4`` -> ``"9s"``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def report(line: str) -> None:
    """Write one progress line to the progress file (:data:`PROGRESS_ENV`) or, without one, to stderr."""
    target = os.environ.get(PROGRESS_ENV)
    if target:
        try:
            with open(target, "a", encoding="utf-8") as f:  # one short append per line: never interleaved
                f.write(line.rstrip("\n") + "\n")
            return
        except OSError:
            pass  # the build went away; fall back to stderr
    print(line, file=sys.stderr, flush=True)


class Progress:
    """Count finished steps of a loop and report ``label: done/total unit, elapsed, ETA``.

    Args:
        total: number of steps expected (the ETA is ``elapsed / done * (total - done)``).
        label: what is running, e.g. ``"noise sweep"``.
        unit: name of one step, e.g. ``"grid point"`` (pluralised with an ``s``).
        every: seconds between two reported lines (a loop shorter than that reports nothing).
    """

    def __init__(self, total: int, label: str, unit: str = "step", every: float = 10.0) -> None:
        if total < 0:
            raise ValueError(f"total={total} must be >= 0 (label {label!r}).")
        self.total, self.label, self.unit, self.every = int(total), label, unit, float(every)
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start
        self.reported = 0

    def line(self, note: str = "") -> str:
        """The progress line as it stands."""
        spent = time.monotonic() - self.start
        text = f"{self.label}: {self.done}/{self.total} {self.unit}{'' if self.total == 1 else 's'}, " \
               f"{format_seconds(spent)} elapsed"
        if 0 < self.done < self.total:
            text += f", ETA {format_seconds(spent / self.done * (self.total - self.done))}"
        elif self.done >= self.total:
            text += ", done"
        return text + (f" ({note})" if note else "")

    def update(self, n: int = 1, note: str = "") -> None:
        """Count ``n`` more finished steps; report when due."""
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every or (self.done >= self.total and self.reported):
            self._last = now
            self.reported += 1
            report(self.line(note))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.reported and self.done < self.total and exc[0] is None:
            report(self.line("stopped early"))


def track(items: Iterable[T], label: str, total: int | None = None, unit: str = "step",
          every: float = 10.0) -> Iterator[T]:
    """Yield ``items`` and report progress after each (see :class:`Progress`).

    Args:
        items: the loop's iterable.
        label, unit, every: as for :class:`Progress`.
        total: number of items (default ``len(items)``).
    """
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    bar = Progress(total, label, unit, every)
    for item in items:
        yield item
        bar.update()
