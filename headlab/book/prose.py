"""Prose that states a result must come from the run: checks on the markdown cells of the chapters.

A chapter's markdown cells are fixed text; its results change with the model, the data and the
parameters. So a markdown cell may explain methods and define terms, but a number in it must be one
the chapter itself produces, and a sentence in it must not report an outcome ("most heads land in
LOW", "accuracy sits near 50%"): such statements belong in a cell that computes them from the run
(a ``display(Markdown(...))`` of the numbers).

Two checks, one per moment:

* :func:`check_executed` (the book build, after papermill ran the chapters: :func:`require_backed_prose`):
  every number in a markdown cell appears in that notebook's code or in its outputs (at the precision
  the prose gives it), and no markdown sentence matches a result pattern (:data:`CLAIM_PATTERNS`).
* :func:`check_source` (``make test``, on ``notebooks/*.py`` without running them): every number in a
  markdown cell appears in the chapter's code, and no markdown sentence matches a result pattern
  (:data:`CLAIM_PATTERNS`).

Numbers that are not results are skipped: inside ``$...$`` math and ```code```, in identifiers
(``L12``, ``Q4_1``, ``GPT-2``, ``16-bit``), citation years (``Sun et al. 2023``), list and section
numbers. Anything else that is fixed on purpose (a definition, a figure from a paper) is allowed,
per cell, by a marker that names it and says why::

    <!-- prose-ok: 10 5 "most heads" (seed 001's impact categories) -->

Numbers and double-quoted phrases before the parenthesis are allowed in that cell; the reason in
parentheses is required. Jupyter Book does not render HTML comments.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CLAIM_PATTERNS", "ProseProblem", "allowances", "check_executed", "check_source", "claims",
           "markdown_numbers", "produced_numbers", "require_backed_prose"]

#: Sentences that report an outcome rather than define or explain: quantified statements about the
#: things a chapter measures, approximate comparisons with a number, and first-person observations.
CLAIM_PATTERNS: tuple[str, ...] = (
    # "most heads land in LOW": how the measured things turned out ("the most X" is a superlative)
    (r"(?<!the )\b(?:most|the majority of|nearly all|almost all|none of)(?: of)?(?: the)?(?: [\w-]+){0,2} "
     r"(?:heads|configurations|configs|neurons|weights|layers|prompts|matrices|trials|flips|bits|candidates|"
     r"items|pairs|seeds|settings|runs|reviews|sentences|probes|models)\b"),
    # "accuracy sits near 50%"
    (r"\b(?:sits?|lands?|stays?|remains?|lies?|hovers?) (?:near|around|at|in|close to|far above|far below|"
     r"well above|well below)\b"),
    # "ROC-AUC far above 0.5"
    (r"\b(?:near|around|about|roughly|approximately|close to|far above|far below|well above|well below)"
     r" ~?\d[\d.,]*%?"),
    # "we saw that ..."
    r"\bwe (?:saw|see|found|observed?|find that)\b",
    # "Wanda is much better"
    (r"\b(?:is|are|was|were) (?:much|far|clearly|slightly|considerably) (?:higher|lower|larger|smaller|"
     r"better|worse|stronger|weaker)\b"),
)

_MARKER = re.compile(r"<!--\s*prose-ok:(?P<items>[^()]*?)\((?P<reason>[^)]*)\)\s*-->", re.DOTALL)
_BAD_MARKER = re.compile(r"<!--\s*prose-ok\b(?![^>]*\([^)]*\S[^)]*\)\s*-->)[^>]*-->", re.DOTALL)
_STRIP = [
    re.compile(r"<!--.*?-->", re.DOTALL),  # HTML comments (markers included: their items are not prose)
    re.compile(r"```.*?```", re.DOTALL),  # fenced code
    re.compile(r"\$\$.*?\$\$", re.DOTALL),  # display math
    re.compile(r"(?<!\\)\$(?:\\\$|[^$])+?(?<!\\)\$"),  # inline math
    re.compile(r"`[^`]*`"),  # inline code
    re.compile(r"\]\([^)]*\)"),  # link targets
    re.compile(r"https?://\S+"),  # bare URLs
    re.compile(r"<[^>]+>"),  # HTML tags
]
# A citation year: "Sun et al. 2023", "Sun et al. (2023)", "Pang & Lee 2005", "(Vig, 2019)".
_CITATION = re.compile(r"\b[A-Z][\w'-]*(?: et al\.?| (?:&|and) [A-Z][\w'-]*)?,? \(?(?:19|20)\d\d[a-z]?\b")
# A number standing on its own: not part of an identifier (L12, Q4_1, GPT-2, SHA-256, float32) and not
# a compound adjective (16-bit, 3-token); thousands separators and one "%" (or a range's) allowed.
_NUMBER = re.compile(
    r"(?<![\w.])(?<![\w]-)(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
    r"(?P<range>[-–]\d+(?:\.\d+)?)?(?P<pct>\s?%|\s?[x×](?![\w-]))?(?![\w-]*[A-Za-z_])(?!\.\d)"
)
# Numbers of any kind in code and outputs (identifiers included: "L12" produces 12).
_ANY_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][+-]?\d+)?")
# Leading "1." of a numbered list item or a numbered heading.
_ENUMERATION = re.compile(r"^(\s*(?:#+\s*|[-*+]\s+)?)\d+[.)](?=\s)", re.MULTILINE)


@dataclass(frozen=True)
class ProseProblem:
    """One statement in a markdown cell that the run does not back: where, what, and why."""

    notebook: str
    cell: int
    text: str
    why: str

    def __str__(self) -> str:
        return f"{self.notebook}, markdown cell {self.cell}: {self.text!r}: {self.why}"


@dataclass(frozen=True)
class _Number:
    text: str
    value: float
    decimals: int
    percent: bool


def allowances(markdown: str) -> tuple[set[str], set[str]]:
    """The numbers and phrases a cell's ``<!-- prose-ok: ... (reason) -->`` markers allow.

    Raises:
        ValueError: a marker without a reason in parentheses.
    """
    bad = _BAD_MARKER.findall(markdown)
    if bad:
        raise ValueError(f"prose-ok marker {bad[0]!r} needs a reason in parentheses: "
                         '<!-- prose-ok: 2023 "a phrase" (why this is not a result) -->')
    numbers, phrases = set(), set()
    for m in _MARKER.finditer(markdown):
        if not m.group("reason").strip():
            raise ValueError(f"prose-ok marker {m.group(0)!r} needs a reason in parentheses.")
        items = m.group("items")
        phrases |= {p.lower() for p in re.findall(r'"([^"]+)"', items)}
        numbers |= {n.replace(" ", "") for n in re.sub(r'"[^"]*"', " ", items).split()}
    return numbers, phrases


def _prose(markdown: str) -> str:
    """The markdown with everything that is not running prose blanked out (math, code, comments, ...)."""
    text = markdown
    for pattern in _STRIP:
        text = pattern.sub(" ", text)
    text = _CITATION.sub(" ", text)
    return _ENUMERATION.sub(r"\1", text)


def markdown_numbers(markdown: str) -> list[str]:
    """The numbers a markdown text states, as written (``"4,863"``, ``"50%"``, ``"0.5"``, ``"10-70%"``),
    leaving out math, code, identifiers, citation years and list numbers."""
    return [m.group(0).strip() for m in _NUMBER.finditer(_prose(markdown))]


def _parse(text: str) -> list[_Number]:
    """``"10-70%"`` -> 10% and 70%; ``"4,863"`` -> 4863."""
    m = _NUMBER.fullmatch(text) or _NUMBER.search(text)
    if m is None:
        return []
    pct = bool(m.group("pct")) and "%" in m.group("pct")
    parts = [m.group("num")] + ([m.group("range")[1:]] if m.group("range") else [])
    out = []
    for p in parts:
        clean = p.replace(",", "")
        out.append(_Number(p, float(clean), len(clean.split(".")[1]) if "." in clean else 0, pct))
    return out


def produced_numbers(texts: Iterable[str]) -> set[float]:
    """Every number in the given code or output texts (identifiers and scientific notation included)."""
    out: set[float] = set()
    for text in texts:
        for m in _ANY_NUMBER.finditer(text):
            try:
                out.add(float(m.group(0).replace(",", "")))
            except ValueError:
                continue
    return out


def _backed(n: _Number, produced: set[float]) -> bool:
    """Whether a produced value, rounded to the prose's precision, is the stated number (a percent may
    be produced as a fraction: 50% <- 0.5, 0.503)."""
    candidates = {round(v, n.decimals) for v in produced}
    if n.percent:
        candidates |= {round(100 * v, n.decimals) for v in produced}
    return round(n.value, n.decimals) in candidates


def claims(markdown: str) -> list[str]:
    """The passages of a markdown text that match a result pattern (:data:`CLAIM_PATTERNS`); headings
    are titles, not statements, and are left out."""
    body = "\n".join(line for line in markdown.splitlines() if not line.lstrip().startswith("#"))
    text = " ".join(_prose(body).split())
    found = []
    for pattern in CLAIM_PATTERNS:
        found += [m.group(0) for m in re.finditer(pattern, text, re.IGNORECASE)]
    return found


def _check_cells(name: str, cells: list[dict], produced: set[float], with_claims: bool) -> list[ProseProblem]:
    problems = []
    for i, cell in enumerate(cells):
        if cell.get("cell_type") != "markdown":
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        try:
            ok_numbers, ok_phrases = allowances(source)
        except ValueError as err:
            problems.append(ProseProblem(name, i, "prose-ok", str(err)))
            continue
        for text in markdown_numbers(source):
            if text.replace(" ", "") in ok_numbers:
                continue
            missing = [n.text for n in _parse(text) if not _backed(n, produced)]
            if missing:
                problems.append(ProseProblem(
                    name, i, text, "a number the run does not produce; compute the sentence in a code cell, "
                    "or allow it with <!-- prose-ok: NUMBER (why it is not a result) -->"))
        if with_claims:
            for phrase in claims(source):
                if not any(ok in phrase.lower() for ok in ok_phrases):
                    problems.append(ProseProblem(
                        name, i, phrase, "reads as a result; state it from the run's numbers in a code cell, "
                        'or allow it with <!-- prose-ok: "PHRASE" (why it is not a result) -->'))
    return problems


def _cell_text(cell: dict) -> str:
    source = cell.get("source", "")
    return source if isinstance(source, str) else "".join(source)


def _output_texts(cell: dict) -> list[str]:
    texts = []
    for out in cell.get("outputs", []):
        if "text" in out:
            texts.append(_cell_text({"source": out["text"]}))
        for mime, value in out.get("data", {}).items():
            if mime.startswith("text/") or mime == "application/json":
                texts.append(value if isinstance(value, str) else
                             "".join(value) if isinstance(value, list) else json.dumps(value))
    return texts


def check_executed(notebook: str | Path) -> list[ProseProblem]:
    """Numbers in the markdown cells of an executed notebook that neither its code nor its outputs
    hold, and markdown passages that read as results.

    Args:
        notebook: an executed ``.ipynb`` (e.g. ``book/chapters/07_weight_sensitivity.ipynb``).

    Returns:
        One :class:`ProseProblem` per unbacked number (empty: the prose is backed by the run).
    """
    path = Path(notebook)
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    texts = []
    for cell in cells:
        if cell.get("cell_type") == "code":
            texts.append(_cell_text(cell))
            texts += _output_texts(cell)
    return _check_cells(path.name, cells, produced_numbers(texts), with_claims=True)


def check_source(source: str | Path) -> list[ProseProblem]:
    """Static check of a jupytext chapter (``notebooks/*.py``): numbers in markdown that its code does
    not contain, and markdown passages that read as results (:data:`CLAIM_PATTERNS`)."""
    import jupytext

    path = Path(source)
    cells = [dict(c) for c in jupytext.read(path, fmt="py:percent").cells]
    code = [_cell_text(c) for c in cells if c.get("cell_type") == "code"]
    return _check_cells(path.name, cells, produced_numbers(code), with_claims=True)


def require_backed_prose(folder: str | Path) -> None:
    """Run :func:`check_executed` on every executed notebook in ``folder`` (one with at least one
    executed code cell; a chapter only converted, never run, has no outputs to compare with).

    Raises:
        RuntimeError: listing every markdown number or passage the runs do not back.
    """
    problems = []
    for path in sorted(Path(folder).glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        if any(c.get("cell_type") == "code" and c.get("execution_count") for c in cells):
            problems += check_executed(path)
    if problems:
        raise RuntimeError(f"{len(problems)} statement(s) in markdown cells that the run does not back "
                           "(headlab.book.prose):\n" + "\n".join(f"  {p}" for p in problems))
