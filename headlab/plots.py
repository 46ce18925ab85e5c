"""Figures from tidy frames and small arrays (matplotlib + seaborn). Each function returns the Figure."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

__all__ = ["confusion_heatmap", "config_comparison", "logit_diff_hist"]


def confusion_heatmap(cm: np.ndarray, labels: Sequence[str], title: str = "") -> Figure:
    """Heatmap of a confusion matrix from :func:`headlab.metrics.confusion_matrix`.

    Rows are true labels, columns predicted labels; a last "no answer" column is shown only if used.
    """
    cols = list(labels) + ["no answer"]
    if cm.shape[1] == len(labels) + 1 and cm[:, -1].sum() == 0:
        cm, cols = cm[:, :-1], cols[:-1]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(cols), 1.4 + 0.9 * len(labels)))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax,
                xticklabels=cols, yticklabels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def config_comparison(frame: pd.DataFrame, metrics: Sequence[str] = ("roc_auc", "accuracy", "accuracy_calibrated"),
                      chosen: dict | None = None) -> Figure:
    """Dev-split scores of each prompt configuration (from :func:`headlab.tasks.evaluate_configs`).

    One panel per metric; x = number of shots, one colour per format, dots = shot draws, line = mean.
    """
    ks = sorted(frame["k"].unique())
    formats = list(dict.fromkeys(frame["format"]))
    colors = sns.color_palette(n_colors=len(formats))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for j, (fmt, color) in enumerate(zip(formats, colors)):
            sub = frame[frame["format"] == fmt]
            offset = (j - (len(formats) - 1) / 2) * 0.12
            x = sub["k"].map(ks.index) + offset
            ax.scatter(x, sub[m], color=color, alpha=0.5, s=18)
            means = sub.groupby("k")[m].mean()
            ax.plot([ks.index(k) + offset for k in means.index], means.values, "o-", color=color, label=fmt)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("shots")
        ax.set_title(m)
    axes[0][-1].legend(title="format", fontsize=8)
    if chosen:
        fig.suptitle("chosen: " + ", ".join(f"{k}={v}" for k, v in chosen.items()), fontsize=10)
    fig.tight_layout()
    return fig


def logit_diff_hist(diff: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
                    threshold: float = 0.0) -> Figure:
    """Histogram of the logit difference per true label, with the decision threshold."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    frame = pd.DataFrame({"logit difference": diff, "true label": np.asarray(label_names)[labels]})
    sns.histplot(frame, x="logit difference", hue="true label", bins=40, element="step", ax=ax)
    ax.axvline(0, color="grey", lw=0.8, ls=":", label="argmax (0)")
    ax.axvline(threshold, color="black", lw=1.2, label=f"calibrated ({threshold:.2f})")
    ax.set_title("lp(positive) - lp(negative)")
    fig.tight_layout()
    return fig
