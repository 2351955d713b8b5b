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
