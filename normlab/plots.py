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


HIGHLIGHT = "#3b75af"  # the elements that share one mean and variance
OTHER = "#f2f2f2"


def normalization_sets(panels: Sequence[tuple[str, np.ndarray]], title: str) -> Figure:
    """One 3-D block per norm, as in Figure 2 of the Group Normalization paper (Wu & He, 2018).

    Each panel is (title, mask): mask is a boolean (N, C, H*W) array marking the elements that
    share one mean and variance. Every element is drawn as one cube (one collection), so the
    highlighted cubes of a panel can be counted from the Figure.
    """
    fig = plt.figure(figsize=(3.0 * len(panels), 3.8))
    for i, (panel_title, mask) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1, projection="3d")
        colors = np.where(mask[..., None], np.array(matplotlib.colors.to_rgba(HIGHLIGHT)),
                          np.array(matplotlib.colors.to_rgba(OTHER)))
        ax.voxels(np.ones(mask.shape, dtype=bool), facecolors=colors, edgecolor="#444444", linewidth=0.5,
                  shade=False)
        n, c, hw = mask.shape
        ax.set_box_aspect((n, c, hw))
        ax.view_init(elev=22, azim=-58)
        ax.set_xlabel("N", labelpad=-14)
        ax.set_ylabel("C", labelpad=-14)
        ax.set_zlabel("H, W", labelpad=-14)
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.pane.set_visible(False)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_zticks([])
        ax.set_title(panel_title, fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.02, top=0.86, wspace=0.0)
    return fig
