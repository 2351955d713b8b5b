"""Figures: pure functions, data in and a matplotlib Figure out (nothing is saved here)."""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; the notebook's inline backend still displays Figures
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def misclassified_grid(
    images: np.ndarray,
    true: Sequence[int],
    pred: Sequence[int],
    class_names: Sequence[str],
    title: str,
    rows: int = 5,
    cols: int = 2,
) -> Figure:
    """Up to rows x cols images (uint8, N x H x W x C), each titled 'pred X / true Y'."""
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows + 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(images):
            continue
        img = images[i]
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img)
        ax.set_title(f"pred {class_names[pred[i]]} / true {class_names[true[i]]}", fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def final_values(df, metric: str = "test_acc"):
    """One row per run: the metric at the run's last logged epoch (long DataFrame in)."""
    rows = df[df["metric"] == metric]
    return rows.loc[rows.groupby("run_id")["epoch"].idxmax()]


def _norm_label(norm: str, groups=None, l1=None) -> str:
    """'BN + L1', 'GN (4 groups)': a line per norm setting, whatever the batch size."""
    label = str(norm).upper()
    if label == "GN" and groups is not None and groups == groups:
        label += f" ({int(groups)} groups)"
    if l1 is not None and l1 == l1 and float(l1) > 0:
        label += f" + L1 ({float(l1):g})"
    return label


def batch_size_figure(df, metric: str = "test_acc") -> Figure:
    """Final test accuracy against batch size (log x), one line per norm setting.

    The line is the mean over seeds, the bars span the lowest to highest seed, and every
    seed is a dot: the small-model analogue of the GroupNorm paper's Figure 1. Lines are
    keyed by norm (and groups and L1 when the frame has them), not by the variant label,
    which may itself name the batch size.
    """
    final = final_values(df, metric)
    keys = [c for c in ("norm", "groups", "l1") if c in final.columns]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, runs in final.groupby(keys, sort=False, observed=True):
        key = key if isinstance(key, tuple) else (key,)
        stats = runs.groupby("batch_size")["value"].agg(["mean", "min", "max"]).sort_index()
        line = ax.errorbar(stats.index, stats["mean"],
                           yerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]],
                           marker="o", capsize=3,
                           label=f"{_norm_label(*key)} ({runs['seed'].nunique()} seeds)")
        ax.scatter(runs["batch_size"], runs["value"], s=10, alpha=0.4, color=line[0].get_color())
    sizes = sorted(final["batch_size"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size (log scale)")
    ax.set_ylabel("final test accuracy (%)" if metric == "test_acc" else f"final {metric}")
    ax.set_title("Final test accuracy vs batch size (mean, seed min-max)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
