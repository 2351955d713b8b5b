"""Figures: pure functions, data in and a matplotlib Figure out (nothing is saved here)."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; the notebook's inline backend still displays Figures
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Matplotlib is not thread-safe (its font objects are shared), and a GPU worker's runs draw
# and save their misclassified grids from several threads, each under this lock (run_log).
FIGURE_LOCK = threading.Lock()

# A figure to draw: a function of this module and its arguments (frames, strings, paths), so
# that another process can draw it (analysis/renderers.py).
FigureJob = tuple[Callable[..., "Figure"], tuple]


def misclassified_grid(
    images: np.ndarray,
    true: Sequence[int],
    pred: Sequence[int],
    class_names: Sequence[str],
    title: str,
    rows: int = 5,
    cols: int = 2,
) -> Figure:
    """Up to rows x cols images (uint8, N x H x W x C), each labelled with its predicted and
    true class. Laid out as one image on one axes: ten axes took four times as long to draw,
    a third of the artifacts of a run on the CPU after its first."""
    height, width, channels = images.shape[1:] if len(images) else (28, 28, 1)
    band, gap = height * 3 // 7, width * 5 // 7  # room for two label lines above each image; between columns
    cell_height, cell_width = band + height, width + gap
    canvas = np.full((rows * cell_height, cols * cell_width - gap, channels), 255, dtype=np.uint8)
    fig = plt.figure(figsize=(2.2 * cols, 2.2 * rows + 0.6))
    ax = fig.add_axes((0.02, 0.01, 0.96, 2.2 * rows / (2.2 * rows + 0.6) - 0.01))
    for i in range(min(len(images), rows * cols)):
        row, col = divmod(i, cols)
        top, left = row * cell_height + band, col * cell_width
        canvas[top:top + height, left:left + width] = images[i]
        ax.text(left + width / 2, top - 1, f"pred {class_names[pred[i]]}\ntrue {class_names[true[i]]}",
                ha="center", va="bottom", fontsize=9, linespacing=1.1)
    if channels == 1:
        ax.imshow(canvas[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, fontsize=11, wrap=True)
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


def final_values(df, metric: str = "test_acc"):
    """One row per run: the metric at the run's last logged epoch (long DataFrame in)."""
    rows = df[df["metric"] == metric]
    return rows.loc[rows.groupby("run_id")["epoch"].idxmax()]


def _seeds_per_point(runs) -> str:
    """'5 seeds', or '3-5 seeds a point' where batch sizes have different counts: seeds a point
    has, not distinct seeds over the line (seeds 1-3 at one batch size, 4-6 at another: 3)."""
    counts = runs.groupby("batch_size")["seed"].nunique()
    low, high = counts.min(), counts.max()
    return f"{low} seed{'' if low == 1 else 's'}" if low == high else f"{low}-{high} seeds a point"


def batch_size_figure(df, metric: str = "test_acc", band: str = "range") -> Figure:
    """Final test accuracy against batch size (log x), one line per norm setting.

    The line is the mean over seeds, the bars span the lowest to highest seed (`range`) or
    the 95% t interval of the mean (`ci`), and every seed is a dot: the small-model analogue
    of the GroupNorm paper's Figure 1. Lines are keyed by norm (and groups and L1 when the
    frame has them), not by the variant label, which may itself name the batch size. Each
    setting's points sit a little apart from the others' at the same batch size (at most a
    tenth of the way to the next power of two), so that overlapping bars stay apart.
    """
    from normlab.analysis.results import norm_setting_label  # scipy: only for this figure

    check_band(band)
    final = final_values(df, metric)
    settings = norm_settings(final)
    families = list(dict.fromkeys(settings.values()))  # in the variants' order, as variant_colors
    colors = _setting_colors(len(families))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, setting in enumerate(families):
        runs = final[final["variant"].astype(str).map(settings) == setting]
        stats = spread_stats(runs.groupby("batch_size")["value"], band).sort_index()
        stats = stats.fillna({"low": stats["mean"], "high": stats["mean"]})  # one seed: no bar
        apart = 2 ** (0.2 * (i - (len(families) - 1) / 2) / max(len(families) - 1, 1))  # x factor, log scale
        ax.errorbar(stats.index * apart, stats["mean"],
                    yerr=[stats["mean"] - stats["low"], stats["high"] - stats["mean"]],
                    marker="o", capsize=3, color=colors[i],
                    label=f"{norm_setting_label(*setting)} ({_seeds_per_point(runs)})")
        ax.scatter(runs["batch_size"] * apart, runs["value"], s=10, alpha=0.4, color=colors[i])
    sizes = sorted(final["batch_size"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size (log scale)")
    ax.set_ylabel("final test accuracy (%)" if metric == "test_acc" else f"final {metric}")
    ax.set_title(f"Final test accuracy vs batch size (mean, bars: {SPREADS[band]})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    legend_below(fig, *ax.get_legend_handles_labels())
    return fig


# --- Comparing variants: curves over epochs, final accuracy per seed, galleries ---

METRIC_NAMES = {
    "train_loss": ("Training loss", "loss (mean NLL per image, nats)"),
    "train_acc": ("Training accuracy", "accuracy (%)"),
    "test_loss": ("Test loss", "loss (mean NLL per image, nats)"),
    "test_acc": ("Test accuracy", "accuracy (%)"),
}
BANDS = {  # --band: what the shaded band (and the whiskers) span; the legend title says which
    "range": "line: mean over seeds, band: min–max over seeds",
    "ci": "line: mean over seeds, band: 95% CI of the mean (Student t)",
}
SPREADS = {"range": "min–max over seeds", "ci": "95% CI of the mean"}  # whisker labels


def check_band(band: str) -> str:
    """The band name, or a ValueError naming the choices."""
    if band not in BANDS:
        raise ValueError(f"unknown band {band!r}: choose one of {', '.join(BANDS)}")
    return band


def spread(values, band: str) -> tuple[float, float]:
    """(low, high) of one sample for a band or whisker: min–max, or the 95% t interval of the
    mean; NaN for the interval of one value (nothing is drawn)."""
    from normlab.analysis.statistics import summarize

    values = np.asarray(values, dtype=float)
    if band == "range":
        return values.min(), values.max()
    return summarize(values).ci or (np.nan, np.nan)


def spread_stats(grouped, band: str):
    """Per group of a grouped Series: mean, and the band's low and high (floats, NaN for none)."""
    import pandas as pd

    bounds = np.array([spread(values, band) for _, values in grouped], dtype=float).reshape(-1, 2)
    return pd.DataFrame({"mean": grouped.mean(), "low": bounds[:, 0], "high": bounds[:, 1]})


# A batch-size study's norm settings, each a family of shades of one hue, hues far apart in order.
FAMILIES = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
MAX_END_LABELS = 8  # more final values than this do not fit apart beside the lines: the legend carries them
MAX_COLUMNS = 8  # more variants than this: final_accuracy.png gives each a row, not a column


def _first_rows(frame):
    """The frame's first row of each variant, indexed by the variant's label."""
    return frame.assign(variant=frame["variant"].astype(str)).drop_duplicates("variant").set_index("variant")


def norm_settings(frame) -> dict[str, tuple]:
    """Each variant's norm setting: (norm, groups, l1), None where missing (groups but for GN),
    whatever its batch size."""
    import pandas as pd

    keys = [c for c in ("norm", "groups", "l1") if c in frame.columns]
    first = _first_rows(frame)
    return {v: tuple(None if pd.isna(x) else x for x in first.loc[v, keys]) for v in _variants(frame)}


def variant_colors(frame) -> dict[str, tuple]:
    """One color per variant, the same in every figure of a comparison. Across batch sizes each
    norm setting keeps one hue, light at its smallest batch and dark at its largest, so that a
    study's 28 lines read as 4 families (batch_size.png draws each family's line in its hue)."""
    variants = _variants(frame)
    settings = norm_settings(frame)
    families = list(dict.fromkeys(settings.values()))
    if "batch_size" in frame.columns and frame["batch_size"].nunique() > 1 and len(families) <= len(FAMILIES):
        sizes = sorted(frame["batch_size"].unique())
        batch = _first_rows(frame)["batch_size"]
        return {v: plt.get_cmap(FAMILIES[families.index(settings[v])])(
                    0.4 + 0.55 * sizes.index(batch[v]) / (len(sizes) - 1)) for v in variants}
    return dict(zip(variants, _distinct_colors(len(variants))))


def _setting_colors(count: int) -> list[tuple]:
    """batch_size.png's line colors, one per norm setting: each its family's hue (as
    variant_colors gives its curves), or, beyond the families, distinct qualitative colors."""
    if count <= len(FAMILIES):
        return [plt.get_cmap(family)(0.8) for family in FAMILIES[:count]]
    return _distinct_colors(count)


def _distinct_colors(count: int) -> list[tuple]:
    """count qualitative colors: tab10's, or tab20's beyond 10 (repeating beyond 20)."""
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(count)]


def legend_below(fig: Figure, handles: list, labels: list[str], title: str | None = None) -> None:
    """The figure's legend under its panels, where it covers no line, band or label (the saved
    file is trimmed to its content, legend included); as many columns as fit its width."""
    widest = max(len(label) for label in labels) * 0.075 + 0.6  # inches at fontsize 8, with the handle
    columns = max(1, min(len(labels), int(fig.get_figwidth() // widest)))
    fig.legend(handles, labels, title=title, fontsize=8, title_fontsize=8, ncol=columns,
               loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False)


def _variants(history) -> list[str]:
    """Variants in reading order (the categorical order when there is one)."""
    column = history["variant"]
    if hasattr(column, "cat"):
        return [str(v) for v in column.cat.categories if (column == v).any()]
    return list(dict.fromkeys(map(str, column)))


def _curve_stats(history, metric: str, variant: str, band: str):
    """Per epoch: mean, band low and high over the variant's runs; and the number of runs."""
    rows = history[(history["metric"] == metric) & (history["variant"].astype(str) == variant)]
    return spread_stats(rows.groupby("epoch")["value"], band), rows["run_id"].nunique()


def _format_value(metric: str, value: float) -> str:
    return f"{value:.2f}%" if metric.endswith("_acc") else f"{value:.4f}"


def _draw_curves(ax, history, metric: str, colors: dict, epochs: tuple[int, int], annotate: bool,
                 band: str) -> dict[str, float]:
    """Each variant's mean line (+ band for several seeds) over the epoch range; returns each
    variant's final mean, by line label.

    A single epoch has no width for a band: its mean is a marker and the band a whisker.
    """
    from matplotlib.ticker import MaxNLocator

    first, last = epochs
    lows, highs, ends, finals = [], [], [], {}
    for variant in _variants(history):
        stats, n = _curve_stats(history, metric, variant, band)
        stats = stats.loc[first:last]
        if stats.empty:
            continue
        color = colors[variant]
        label = f"{variant} (n={n})"
        ax.plot(stats.index, stats["mean"], color=color, marker="o" if len(stats) < 12 else None,
                markersize=6 if len(stats) == 1 else 3, label=label)
        finals[label] = stats["mean"].iloc[-1]
        if n > 1 and len(stats) == 1:
            mean, low, high = stats.iloc[0][["mean", "low", "high"]]
            ax.errorbar(stats.index, [mean], yerr=[[mean - low], [high - mean]], fmt="none", color=color, capsize=5,
                        lw=1.5)
        elif n > 1:
            ax.fill_between(stats.index, stats["low"], stats["high"], color=color, alpha=0.2, linewidth=0)
        lows.append(stats[["mean", "low"]].min().min())
        highs.append(stats[["mean", "high"]].max().max())
        ends.append((stats.index[-1], stats["mean"].iloc[-1], color))
    annotate = annotate and len(ends) <= MAX_END_LABELS
    ax.set_xlim(first - 0.3, last + 0.3 + (0.25 * (last - first) + 0.5 if annotate else 0))
    low, high = min(lows), max(highs)
    pad = (high - low) * 0.08 or abs(high) * 0.01 or 0.01
    ax.set_ylim(low - pad, high + pad)
    if annotate:
        _annotate_ends(ax, metric, ends, min_gap=(high - low + 2 * pad) * 0.07)
    ax.set_xticks([t for t in MaxNLocator(integer=True).tick_values(first, last) if first <= t <= last])
    ax.set_xlabel("epoch")
    ax.set_ylabel(METRIC_NAMES[metric][1])
    ax.grid(alpha=0.3)
    return finals


def _annotate_ends(ax, metric: str, ends: list[tuple[int, float, tuple]], min_gap: float) -> None:
    """Write each line's final value right of its last point, nudged apart so none overlap."""
    ends = sorted(ends, key=lambda e: e[1])
    placed: list[float] = []
    for _, y, _ in ends:
        placed.append(max(y, placed[-1] + min_gap) if placed else y)
    for (x, y, color), text_y in zip(ends, placed):  # a plain leader line: an arrow patch draws 10x slower
        ax.plot([x, x + 0.4], [y, text_y], color=color, lw=0.6)
        ax.text(x + 0.4, text_y, _format_value(metric, y), color=color, fontsize=8, va="center")


def _final_values(metrics: Sequence[str], finals: dict[str, dict[str, float]], label: str) -> str:
    """A line's final values for its legend entry: the value alone for one metric, else each
    named by what it measures ("loss 0.0312, accuracy 99.12%")."""
    if len(metrics) == 1:
        return _format_value(metrics[0], finals[metrics[0]][label])
    return ", ".join(f"{METRIC_NAMES[m][0].split()[-1]} {_format_value(m, finals[m][label])}" for m in metrics)


def _epoch_range(first: int, last: int) -> str:
    return f"epoch {first}" if first == last else f"epochs {first}–{last}"


def curves_figure(history, metrics: Sequence[str], title: str, band: str = "range") -> Figure:
    """One row per metric: all epochs on the left, the last half zoomed on the right.

    The zoom is where variants separate (late epochs differ by tenths of a percent); the
    final value of each variant (mean over seeds) is written at the end of its line, or,
    beyond MAX_END_LABELS variants, after its name in the legend under the panels (each
    metric's, named, in a figure of several, such as train_curves.png). The
    band spans the seeds' min–max (`range`) or the 95% t interval of the mean (`ci`).
    """
    check_band(band)
    colors = variant_colors(history)
    first, last = int(history["epoch"].min()), int(history["epoch"].max())
    zoom = last - first >= 3
    cols = 2 if zoom else 1
    fig, axes = plt.subplots(len(metrics), cols, figsize=(6.2 * cols, 4.2 * len(metrics)), squeeze=False)
    finals = {}  # metric -> line label -> final mean
    for row, metric in zip(axes, metrics):
        name = METRIC_NAMES[metric][0]
        finals[metric] = _draw_curves(row[0], history, metric, colors, (first, last), annotate=not zoom, band=band)
        row[0].set_title(f"{name}, {_epoch_range(first, last)}")
        if zoom:
            start = (first + last + 1) // 2
            _draw_curves(row[1], history, metric, colors, (start, last), annotate=True, band=band)
            row[1].set_title(f"{name}, {_epoch_range(start, last)} (zoom)")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()
    if len(labels) > MAX_END_LABELS:  # no final values beside the lines: they go with the names
        labels = [f"{label}: {_final_values(metrics, finals, label)}" for label in labels]
    legend_below(fig, handles, labels, title=BANDS[band])
    return fig


def final_accuracy_figure(runs_metrics, title: str, band: str = "range") -> Figure:
    """Each variant's last-epoch test accuracy: one dot per seed, mean bar, and a whisker
    spanning the seeds' min–max (`range`) or the 95% t interval of the mean (`ci`).

    A column per variant, its name wrapped under it; beyond MAX_COLUMNS variants (a
    batch-size study has 28) a row each instead, named on the left and summed up on the right.
    """
    import textwrap

    from matplotlib.transforms import blended_transform_factory

    check_band(band)
    variants = _variants(runs_metrics)
    colors = variant_colors(runs_metrics)
    rows = len(variants) > MAX_COLUMNS
    if rows:
        fig, ax = plt.subplots(figsize=(7.0, 0.38 * len(variants) + 1.2))
    else:
        fig, ax = plt.subplots(figsize=(max(5.0, 1.9 * len(variants) + 1.5), 4.6))

    def at(slot, value):
        """(x, y) of an accuracy at a variant's slot: the slot is y in rows, x in columns."""
        return (value, slot) if rows else (slot, value)

    drawn = False  # the whisker's legend entry, once
    lows, highs = [runs_metrics["final_test_acc"].min()], [runs_metrics["final_test_acc"].max()]
    for slot, variant in enumerate(variants):
        values = runs_metrics.loc[runs_metrics["variant"].astype(str) == variant, "final_test_acc"].to_numpy()
        offsets = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(*at(slot + offsets, values), color=colors[variant], s=28, zorder=3,
                   label="one seed" if slot == 0 else None)
        mean = values.mean()
        (ax.vlines if rows else ax.hlines)(mean, slot - 0.25, slot + 0.25, color="black", lw=2, zorder=4,
                                           label="mean" if slot == 0 else None)
        low, high = spread(values, band)
        if not np.isnan(low):
            (ax.hlines if rows else ax.vlines)(slot, low, high, color="gray", lw=1, zorder=2,
                                               label=SPREADS[band] if not drawn else None)
            drawn = True
            lows.append(low)
            highs.append(high)
        std = f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else ""
        if rows:  # right of the axes, on the variant's row
            ax.text(1.01, slot, f"{mean:.2f}{std}% (n={len(values)})", fontsize=8, va="center",
                    transform=blended_transform_factory(ax.transAxes, ax.transData))
        else:
            ax.annotate(f"{mean:.2f}{std}%\nn={len(values)}", xy=(slot + 0.28, mean), fontsize=8, va="center")
    low, high = min(lows), max(highs)
    pad = (high - low) * 0.15 or 0.1
    if rows:
        ax.set_yticks(range(len(variants)), variants, fontsize=8)
        ax.set_ylim(len(variants) - 0.4, -0.6)  # the first variant on top, as in the tables
        ax.set_xlim(low - pad, high + pad)
        ax.set_xlabel("final test accuracy (%)")
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.set_xticks(range(len(variants)), [textwrap.fill(v, 18) for v in variants])
        ax.set_xlim(-0.6, len(variants) - 0.1)
        ax.set_ylim(low - pad, high + pad)
        ax.set_ylabel("final test accuracy (%)")
        ax.set_xlabel("variant")
        ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    legend_below(fig, *ax.get_legend_handles_labels())
    return fig


def gallery_figure(image: np.ndarray, title: str, caption: str) -> Figure:
    """A logged image (H x W x C) shown at its own pixel size under a title, with a caption."""
    height, width = image.shape[:2]
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi + 0.9), dpi=dpi)
    ax = fig.add_axes((0, 0.45 / (height / dpi + 0.9), 1, height / dpi / (height / dpi + 0.9)))
    ax.imshow(image)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=9, y=0.995, va="top", wrap=True)
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7, wrap=True)
    return fig


def gallery_figure_of(png: Path, title: str, caption: str) -> Figure:
    """gallery_figure of the image in a PNG file."""
    return gallery_figure(plt.imread(png), title, caption)


def save_misclassified_grid(path: Path, images: np.ndarray, true: Sequence[int], pred: Sequence[int],
                            class_names: Sequence[str], title: str) -> None:
    """misclassified_grid into ``path`` as mlflow.log_figure saves a figure (a run's artifact)."""
    with FIGURE_LOCK:
        figure = misclassified_grid(images, true, pred, class_names, title)
        figure.savefig(path)
        plt.close(figure)


def warm_up() -> None:
    """A process's first figure, drawn and thrown away: its fonts loaded before the first that
    counts (on the 2-core CPU a process's first curves figure took 0.5 s more than later ones)."""
    figure = plt.figure(figsize=(2, 1))
    figure.suptitle("warm-up")
    figure.text(0.5, 0.5, "0.1 %", fontsize=7)
    figure.savefig(io.BytesIO(), format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def save(path: Path, build: Callable[..., Figure], args: tuple) -> Path:
    """Draw build(*args) into path (PNG, 110 dpi, trimmed to its content) and close it."""
    figure = build(*args)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
