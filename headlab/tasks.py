"""The few-shot sentiment task every head/neuron/weight chapter measures against.

A :class:`PromptConfig` (format, number of shots, shot seed) plus a split of the data defines a
:class:`FewShotTask`: one shared prefix of balanced shots and one query per evaluation text. Scoring
reads the log-probabilities of the label tokens (``" negative"``, ``" positive"``) at the last
position. The decision threshold on the logit difference is calibrated on the dev split (small
instruction-tuned models put most mass on one label; a constant offset fixes that without touching
the ranking, cf. Zhao et al. 2021, "Calibrate Before Use").

The baseline chapter chooses the configuration on the dev split and writes it to
``results/baseline/prompt_config.json``; later chapters read it with :func:`load_prompt_config`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headlab import data, engine, metrics
from headlab.models import LoadedModel
from headlab.progress import track

__all__ = [
    "FORMATS",
    "FewShotFormat",
    "build_fewshot_prefix",
    "sample_shots",
    "FewShotTask",
    "PromptConfig",
    "best_threshold",
    "compare_generation",
    "evaluate_configs",
    "load_prompt_config",
    "make_task",
    "save_prompt_config",
    "select_config",
    "sentiment_splits",
    "text_rows",
    "text_stream",
]


# --------------------------------------------------------------------------------------------------
# Few-shot prompt formatting
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FewShotFormat:
    """How one example is written in a few-shot prompt.

    The prompt is ``instruction + shot_1 + sep + ... + shot_k + sep + query`` where a shot is
    ``template.format(text=..., label=...)`` and the query is the template cut just before
    ``{label}``. The model's answer is read off the logits of the label words at the last position:
    the first token of each label word (with its leading space), which must differ between labels
    (see :func:`headlab.engine.label_token_ids`).

    Attributes:
        name: short name used in tables.
        template: must contain ``{text}`` and end with ``{label}``.
        sep: text between examples.
        instruction: text before the first example.
        label_words: label -> the word written after the template prefix.
    """

    name: str
    template: str = "Review: {text}\nSentiment: {label}"
    sep: str = "\n\n"
    instruction: str = ""
    label_words: tuple[tuple[str, str], ...] = (("negative", "negative"), ("positive", "positive"))

    def __post_init__(self) -> None:
        if "{text}" not in self.template or not self.template.endswith("{label}"):
            raise ValueError(f"template {self.template!r} must contain {{text}} and end with {{label}}.")

    @property
    def labels(self) -> list[str]:
        return [lab for lab, _ in self.label_words]

    def word(self, label: str) -> str:
        return dict(self.label_words)[label]

    def shot(self, text: str, label: str) -> str:
        return self.template.format(text=text, label=self.word(label))

    def query(self, text: str) -> str:
        """The query part: the template up to (not including) the label; ends with the cue."""
        return self.template[: -len("{label}")].format(text=text).rstrip(" ")


#: Prompt formats compared in the baseline chapter. ``quoted`` is the seeds' format.
FORMATS: dict[str, FewShotFormat] = {
    "plain": FewShotFormat("plain"),
    "quoted": FewShotFormat("quoted", template='Review: "{text}"\nSentiment: {label}'),
    "instructed": FewShotFormat(
        "instructed",
        instruction="Classify the sentiment of each movie review as positive or negative.\n\n",
    ),
}


def sample_shots(pool: pd.DataFrame, k: int, seed: int = 0, label_col: str = "label") -> pd.DataFrame:
    """Pick ``k`` balanced shots (``k / n_labels`` per label) from ``pool`` in a seeded random order.

    Raises:
        ValueError: ``k`` not a positive multiple of the number of labels, or too few rows.
    """
    labels = sorted(pool[label_col].unique())
    if k <= 0 or k % len(labels):
        raise ValueError(f"k={k} shots must be a positive multiple of the number of labels ({len(labels)}).")
    rng = np.random.default_rng(seed)
    parts = []
    for lab in labels:
        rows = pool[pool[label_col] == lab]
        if len(rows) < k // len(labels):
            raise ValueError(f"Only {len(rows)} rows with label {lab!r}; need {k // len(labels)}.")
        parts.append(rows.iloc[rng.choice(len(rows), k // len(labels), replace=False)])
    shots = pd.concat(parts)
    return shots.iloc[rng.permutation(len(shots))].reset_index(drop=True)


def build_fewshot_prefix(shots: pd.DataFrame, fmt: FewShotFormat) -> str:
    """The shared prompt prefix: instruction and all shots, ending with the separator."""
    body = fmt.sep.join(fmt.shot(t, lab) for t, lab in zip(shots["text"], shots["label"]))
    return fmt.instruction + body + fmt.sep if len(shots) else fmt.instruction


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptConfig:
    """How the few-shot prompt is built.

    Attributes:
        format: key of :data:`FORMATS` (``plain``, ``quoted``, ``instructed``).
        k: number of shots, balanced over labels.
        shot_seed: which shots are drawn from the shot pool, and their order.
        threshold: decision threshold on the logit difference ``lp(positive) - lp(negative)``;
            0 is the plain argmax.
    """

    format: str = "plain"
    k: int = 4
    shot_seed: int = 0
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}; choose one of {sorted(FORMATS)}.")
        if self.k <= 0 or self.k % 2:
            raise ValueError(f"k={self.k} must be a positive even number (balanced binary shots).")


def sentiment_splits(
    source: str = "rotten_tomatoes", n_shots_pool: int = 64, n_dev: int = 128, n_test: int = 400, seed: int = 0
) -> dict[str, pd.DataFrame]:
    """Disjoint, label-balanced ``shots`` (pool to draw shots from), ``dev`` and ``test`` parts.

    The parts are drawn in that order from one permutation, so the same arguments always give the
    same parts (the baseline chapter records them next to the prompt it chose).
    """
    frame = data.load_sentiment(source)
    return data.split_frame(frame, {"shots": n_shots_pool, "dev": n_dev, "test": n_test}, seed=seed)


@dataclass
class FewShotTask:
    """Prompts for one split under one :class:`PromptConfig`.

    Attributes:
        config: the prompt configuration.
        prefix: the shared prefix text (instruction + shots).
        queries: the evaluated rows (``text``, ``label``).
        shots: the shots used.
    """

    config: PromptConfig
    prefix: str
    queries: pd.DataFrame
    shots: pd.DataFrame
    _enc: dict[int, engine.EncodedPrompts] = field(default_factory=dict, repr=False)

    @property
    def fmt(self) -> FewShotFormat:
        return FORMATS[self.config.format]

    @property
    def labels(self) -> np.ndarray:
        """True class per query: index into ``fmt.labels`` (0 = negative, 1 = positive)."""
        order = self.fmt.labels
        return self.queries["label"].map(order.index).to_numpy()

    def prompt(self, i: int) -> str:
        """Full text of prompt ``i`` (for display)."""
        return self.prefix + self.fmt.query(self.queries["text"].iloc[i])

    def encode(self, lm: LoadedModel) -> engine.EncodedPrompts:
        """Token ids (cached per model object)."""
        key = id(lm.tokenizer)
        if key not in self._enc:
            self._enc[key] = engine.encode_prompts(lm, self.prefix, [self.fmt.query(t) for t in self.queries["text"]])
        return self._enc[key]

    def label_ids(self, lm: LoadedModel) -> list[int]:
        """Token ids of the label words as they follow the query's cue (first token of each; they must differ)."""
        return engine.label_token_ids(lm, [self.fmt.word(lab) for lab in self.fmt.labels], context=self.fmt.query(""))

    def logprobs(self, lm: LoadedModel, batch_size: int = 16) -> torch.Tensor:
        """``(n, 2)`` label log-probabilities for every query."""
        return engine.label_logprobs(lm, self.encode(lm), self.label_ids(lm), batch_size=batch_size)

    def head(self, n: int) -> "FewShotTask":
        """The same task on the first ``n`` queries (label-balanced splits are shuffled, so the first
        ``n`` are a random sample)."""
        if n <= 0:
            raise ValueError(f"n={n} must be positive.")
        return FewShotTask(self.config, self.prefix, self.queries.head(n).reset_index(drop=True), self.shots)

    def subset(self, rows: list[int] | np.ndarray) -> "FewShotTask":
        """The same task on queries ``rows`` (positions in this task), in that order."""
        rows = [int(r) for r in rows]
        bad = [r for r in rows if not 0 <= r < len(self.queries)]
        if not rows or bad:
            raise ValueError(f"rows must be a non-empty list of positions 0..{len(self.queries) - 1}; bad: {bad[:5]}.")
        return FewShotTask(self.config, self.prefix, self.queries.iloc[rows].reset_index(drop=True), self.shots)

    def predictions(self, logprobs: torch.Tensor, threshold: float | None = None) -> np.ndarray:
        """Predicted class with the configured (or given) threshold on the logit difference."""
        thr = self.config.threshold if threshold is None else threshold
        return ((logprobs[:, 1] - logprobs[:, 0]).numpy() > thr).astype(int)


def make_task(splits: dict[str, pd.DataFrame], split: str, config: PromptConfig) -> FewShotTask:
    """Build the task for ``split`` (``"dev"`` or ``"test"``) with shots from ``splits["shots"]``."""
    if split not in splits or split == "shots":
        raise ValueError(f"split={split!r}; choose one of {[s for s in splits if s != 'shots']}.")
    fmt = FORMATS[config.format]
    shots = sample_shots(splits["shots"], config.k, seed=config.shot_seed)
    return FewShotTask(config, build_fewshot_prefix(shots, fmt), splits[split], shots)


def best_threshold(labels: np.ndarray, diff: np.ndarray) -> float:
    """Threshold on the logit difference maximising accuracy (midpoint between sorted scores).

    Ties between thresholds are broken toward the one closest to the median score, which keeps the
    choice stable on small dev sets.
    """
    s = np.sort(np.asarray(diff, dtype=float))
    cands = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2, [s[-1] + 1.0]])
    accs = np.array([np.mean((diff > c).astype(int) == labels) for c in cands])
    best = np.flatnonzero(accs == accs.max())
    med = np.median(s)
    return float(cands[best[np.argmin(np.abs(cands[best] - med))]])


def evaluate_configs(
    lm: LoadedModel, splits: dict[str, pd.DataFrame], configs: list[PromptConfig], batch_size: int = 16,
    n_boot: int = 1000,
) -> pd.DataFrame:
    """Score each configuration on the dev split.

    Returns:
        One row per configuration: ``format, k, shot_seed, prefix_tokens, accuracy`` (argmax),
        ``pred_positive_share``, ``roc_auc`` with its 95% bootstrap interval over dev prompts
        ``roc_auc_low, roc_auc_high``, ``logit_diff`` (mean, toward the correct label), ``threshold``
        (dev-calibrated) and ``accuracy_calibrated``.
    """
    rows = []
    for cfg in track(configs, "dev grid", unit="prompt configuration"):
        task = make_task(splits, "dev", cfg)
        lp = task.logprobs(lm, batch_size=batch_size)
        y = task.labels
        diff = (lp[:, 1] - lp[:, 0]).numpy()
        thr = best_threshold(y, diff)
        auc = metrics.bootstrap_ci(metrics.roc_auc, y, diff, n_boot=n_boot)
        rows.append({
            "format": cfg.format, "k": cfg.k, "shot_seed": cfg.shot_seed,
            "prefix_tokens": len(task.encode(lm).prefix),
            "accuracy": metrics.accuracy(y, diff > 0),
            "pred_positive_share": float((diff > 0).mean()),
            "roc_auc": auc.value, "roc_auc_low": auc.low, "roc_auc_high": auc.high,
            "logit_diff": float(np.mean(np.where(y == 1, diff, -diff))),
            "threshold": thr,
            "accuracy_calibrated": metrics.accuracy(y, (diff > thr).astype(int)),
        })
    return pd.DataFrame(rows)


def select_config(scores: pd.DataFrame, cost: str = "prefix_tokens") -> pd.Series:
    """The cheapest configuration that scores as well as the best one within the best one's interval.

    The best configuration is the one with the highest dev ROC-AUC (ties: calibrated accuracy). Every
    configuration whose ROC-AUC reaches the lower end of the best one's 95% interval is as good as the
    dev split can tell (the best of many is also favoured by chance); of those, the one with the
    smallest ``cost`` -- by default the shared prefix's length in tokens, which every forward pass of
    every later chapter pays for -- is chosen (ties: higher ROC-AUC, then calibrated accuracy).

    Args:
        scores: the table of :func:`evaluate_configs`.
        cost: the column to minimise.

    Returns:
        The chosen row, with the best configuration's ``best_format``, ``best_k``, ``best_shot_seed``,
        ``best_roc_auc``, ``best_roc_auc_low`` and ``best_cost`` added, and ``n_eligible`` (how many
        configurations are within the best one's interval).
    """
    need = {"roc_auc", "roc_auc_low", "accuracy_calibrated", cost}
    if not need <= set(scores.columns):
        raise ValueError(f"scores lacks column(s) {sorted(need - set(scores.columns))}; use evaluate_configs' table.")
    best = scores.sort_values(["roc_auc", "accuracy_calibrated"], ascending=False, kind="stable").iloc[0]
    eligible = scores[scores["roc_auc"] >= best["roc_auc_low"]]
    chosen = eligible.sort_values([cost, "roc_auc", "accuracy_calibrated"], ascending=[True, False, False],
                                  kind="stable").iloc[0].copy()
    for key in ("format", "k", "shot_seed", "roc_auc", "roc_auc_low"):
        chosen[f"best_{key}"] = best[key]
    chosen["best_cost"], chosen["n_eligible"] = best[cost], len(eligible)
    return chosen


def save_prompt_config(config: PromptConfig, path: str | Path, **extra: object) -> Path:
    """Write the chosen configuration (and any context, e.g. dev scores, the model) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"prompt_config": asdict(config), **extra}, indent=2, default=str))
    return path


def load_prompt_config(path: str | Path | None = None, default: PromptConfig | None = None) -> PromptConfig:
    """Read a configuration saved by the baseline chapter; ``default`` when the file is absent."""
    path = Path(path) if path else Path("results/baseline/prompt_config.json")
    if not path.exists():
        if default is None:
            raise FileNotFoundError(f"{path} not found; run the baseline chapter first or pass a PromptConfig.")
        return default
    return PromptConfig(**json.loads(path.read_text())["prompt_config"])


def load_prompt_setup(
    path: str | Path, default: PromptConfig, source: str = "rotten_tomatoes", seed: int = 0
) -> tuple[PromptConfig, dict[str, pd.DataFrame], bool]:
    """The baseline chapter's validated prompt and the exact data split it was validated on.

    Args:
        path: ``prompt_config.json`` written by the baseline chapter.
        default: configuration to use when the file does not exist.
        source, seed: the split to use when the file does not record one.

    Returns:
        ``(config, splits, validated)``; ``validated`` is False when ``default`` was used.
    """
    path = Path(path)
    if not path.exists():
        return default, sentiment_splits(source, seed=seed), False
    record = json.loads(path.read_text())
    split = record.get("split") or {"source": source, "seed": seed}
    return PromptConfig(**record["prompt_config"]), sentiment_splits(**split), True


def text_stream(lm: LoadedModel, texts: list[str] | pd.Series, n_tokens: int, sep: str = "\n\n") -> torch.Tensor:
    """Concatenate ``texts`` (e.g. Wikipedia articles) into one token stream of ``n_tokens`` ids.

    The stream starts with the tokenizer's special prefix (if any) and joins articles with ``sep``.

    Raises:
        ValueError: the texts hold fewer than ``n_tokens`` tokens.
    """
    if n_tokens < 2:
        raise ValueError(f"n_tokens={n_tokens} must be at least 2.")
    tok = lm.tokenizer
    ids: list[int] = list(tok("", add_special_tokens=True)["input_ids"])
    for text in texts:
        ids += tok(text + sep, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens], dtype=torch.long)
    raise ValueError(f"The texts hold only {len(ids)} tokens; asked for n_tokens={n_tokens}.")


def text_rows(lm: LoadedModel, texts: list[str] | pd.Series, n_rows: int, seq_len: int,
              rows_per_text: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """Equal-length token rows cut from the start of each text, at most ``rows_per_text`` per text.

    Each row is ``seq_len`` consecutive tokens of one text (no padding, no text boundary inside a
    row), so rows from different texts come from different articles. Texts too short for a row are
    skipped.

    Returns:
        ``(ids, source)``: ``(n_rows, seq_len)`` token ids and the position in ``texts`` of each row's text.

    Raises:
        ValueError: the texts do not give ``n_rows`` rows.
    """
    if n_rows < 1 or seq_len < 2 or rows_per_text < 1:
        raise ValueError(f"n_rows={n_rows} (>= 1), seq_len={seq_len} (>= 2), rows_per_text={rows_per_text} "
                         "(>= 1) out of range.")
    rows, source = [], []
    for t, text in enumerate(list(texts)):
        ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"]
        for r in range(min(rows_per_text, len(ids) // seq_len)):
            rows.append(ids[r * seq_len:(r + 1) * seq_len])
            source.append(t)
            if len(rows) == n_rows:
                return torch.tensor(rows, dtype=torch.long), np.array(source)
    raise ValueError(f"The {len(texts)} texts give only {len(rows)} rows of {seq_len} tokens "
                     f"(rows_per_text={rows_per_text}); asked for n_rows={n_rows}.")


def compare_generation(
    lm: LoadedModel, task: FewShotTask, rows: list[int], max_new_tokens: int = 3, batch_size: int = 16
) -> dict[str, float]:
    """Score prompts ``rows`` both by greedy generation (the seeds' method) and by label-token logits.

    Returns:
        ``n``, ``generation_accuracy``, ``generation_no_label`` (share of texts naming no label),
        ``logit_argmax_accuracy``, ``agreement_gen_vs_argmax``, ``roc_auc`` (of the logit difference)
        and ``generation_seconds``.
    """
    import time

    enc = task.encode(lm).subset(rows)
    y = task.labels[rows]
    t0 = time.time()
    texts = engine.generate_greedy(lm, enc, max_new_tokens=max_new_tokens)
    seconds = time.time() - t0
    gen = np.array([metrics.parse_generated_label(t, task.fmt.labels) for t in texts])
    lp = engine.label_logprobs(lm, enc, task.label_ids(lm), batch_size=batch_size)
    argmax = task.predictions(lp, threshold=0.0)
    return {
        "n": len(rows),
        "generation_accuracy": metrics.accuracy(y, gen),
        "generation_no_label": float((gen < 0).mean()),
        "logit_argmax_accuracy": metrics.accuracy(y, argmax),
        "agreement_gen_vs_argmax": float((gen == argmax).mean()),
        "roc_auc": metrics.roc_auc(y, (lp[:, 1] - lp[:, 0]).numpy()),
        "generation_seconds": seconds,
    }
