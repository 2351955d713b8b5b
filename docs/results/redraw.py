"""Redraw a study's figures from its committed numbers, with this checkout's plotting code.

A study folder here holds what `normlab compare --out` wrote, runs.csv and histories.csv
among it (the runs' per-epoch metrics: run_id, variant, seed, metric, epoch, value; the
studies compared before compare wrote it had it exported from their stores).
From those two files this draws test_loss.png, test_accuracy.png, train_curves.png,
final_accuracy.png (and batch_size.png for a batch-size study) as `normlab compare` draws
them from the MLflow store, so a change to the figures reaches the studies' figures without
their stores or a re-run. The numbers are the runs' own; only the drawing is new.

    python docs/results/redraw.py docs/results/batch-size [--band range|ci]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from normlab.analysis import plots, results  # noqa: E402
from normlab.analysis.compare import Comparison  # noqa: E402
from normlab.tracking.run_query import RUN_COLUMNS  # noqa: E402


def comparison_from_csv(folder: Path) -> Comparison:
    """The Comparison `normlab compare` made, rebuilt from runs.csv and histories.csv: variants
    in runs.csv's order (compare's reading order), each history row with its run's columns."""
    runs = pd.read_csv(folder / "runs.csv")
    runs["variant"] = pd.Categorical(runs["variant"], categories=list(dict.fromkeys(runs["variant"])))
    metrics = pd.read_csv(folder / "histories.csv", usecols=["run_id", "metric", "epoch", "value"])
    history = runs[list(RUN_COLUMNS)].merge(metrics, on="run_id", how="inner")
    return Comparison(runs, history, runs, results.summary_table(runs, history), searched=str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a study folder holding runs.csv and histories.csv")
    parser.add_argument("--band", default="range", choices=sorted(plots.BANDS))
    args = parser.parse_args()
    missing = [name for name in ("runs.csv", "histories.csv") if not (args.folder / name).is_file()]
    if missing:
        parser.error(f"{args.folder} has no {' or '.join(missing)}: give a study folder of docs/results/")
    for name, (build, figure_args) in comparison_from_csv(args.folder).figure_jobs(args.band).items():
        print(plots.save(args.folder / name, build, figure_args))


if __name__ == "__main__":
    main()
