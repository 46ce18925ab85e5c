"""The front page's answers: each chapter's headline result, from the numbers of this build.

Every chapter ends by writing its headline numbers with :func:`headlab.records.write_summary` into
``<results_dir>/summary.json``; a ``headline`` entry, when present, is the chapter's one-sentence
answer, written from the run's numbers. The build copies the summary into the executed notebook's
record (:func:`headlab.book.deps.record`), so the front page always matches the chapter pages it
links to, also when a chapter was not re-executed. :func:`write_headlines` writes
``book/headlines.md``, which ``book/intro.md`` includes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from headlab.book.deps import read_stamp

__all__ = ["HEADLINES_FILE", "chapter_title", "headline_text", "write_headlines"]

#: The generated page fragment, relative to the book folder (``book/intro.md`` includes it).
HEADLINES_FILE = "headlines.md"


def chapter_title(notebook: Path) -> str:
    """The first ``# `` heading of a notebook's markdown cells (its file stem when it has none)."""
    notebook = Path(notebook)
    try:
        nb = json.loads(notebook.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return notebook.stem
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        for line in text.splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return notebook.stem


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e5 else f"{value:,.0f}"


def headline_text(summary: dict[str, Any] | None, limit: int = 4) -> str:
    """The chapter's ``headline`` entry, else its first ``limit`` summary numbers as ``name value`` pairs."""
    if not summary:
        return "no headline numbers recorded yet (the chapter writes none, or has not been executed)."
    if isinstance(summary.get("headline"), str) and summary["headline"].strip():
        return summary["headline"].strip()
    items = [(k, v) for k, v in summary.items() if v is not None and not k.endswith("_seconds")][:limit]
    return "; ".join(f"{k.replace('_', ' ')} {_number(v)}" for k, v in items) + "."


def write_headlines(book_dir: Path, chapters: list[str]) -> Path:
    """Write ``<book_dir>/headlines.md``: one item per chapter, its headline and a link to it.

    Args:
        book_dir: the book folder (holds ``chapters/<stem>.ipynb`` and ``intro.md``).
        chapters: chapter stems in book order.

    Returns:
        The written file.
    """
    book_dir = Path(book_dir)
    lines = []
    times = []
    for stem in chapters:
        nb = book_dir / "chapters" / f"{stem}.ipynb"
        stamp = read_stamp(nb) if nb.is_file() else None
        title = chapter_title(nb) if nb.is_file() else stem
        # ``{doc}`` links are checked by the build (-n -W): a wrong one fails it.
        title = re.sub(r"[<>`]", "", title)
        text = headline_text((stamp or {}).get("summary"))
        lines.append(f"1. {{doc}}`{title} <chapters/{stem}>`: {text}")
        if stamp and stamp.get("executed_at"):
            times.append(stamp["executed_at"])
    span = ("" if not times else f" The chapter was executed on {times[0]}." if len(times) == 1
            else f" The chapters were executed between {min(times)} and {max(times)}.")
    text = ("*Each line is computed from the results of the chapter it links to, as executed for this "
            f"build.{span}*\n\n" + "\n".join(lines) + "\n")
    out = book_dir / HEADLINES_FILE
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        out.write_text(text, encoding="utf-8")
    return out
