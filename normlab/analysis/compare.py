"""The comparison step: select runs in MLflow, load their histories, write figures and tables.

It reads MLflow only (params, metric histories, artifacts) and writes, under one folder,
files with stable names that a README can embed; the same files are logged as artifacts
of a run so `mlflow artifacts download` brings them back.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from normlab.analysis import plots, results
from normlab.engine.config import METRICS
from normlab.errors import SelectionError
from normlab.tracking import EXPERIMENT, run_query

CURVE_FILES = {  # file name: (metrics, one per row; title)
    "test_loss.png": (("test_loss",), "Test loss by variant"),
    "test_accuracy.png": (("test_acc",), "Test accuracy by variant"),
    "train_curves.png": (("train_loss", "train_acc"), "Training loss and accuracy by variant"),
}


# histories.csv: every compared run's per-epoch metrics, long form, the data behind the curves
# (docs/results/redraw.py draws them again from it and runs.csv, joined on run_id)
HISTORY_FILE_COLUMNS = ["run_id", "variant", "seed", "metric", "epoch", "value"]


# The names of the files a comparison wrote into its folder, kept beside them: the next one
# written there removes those it does not write again (a variant's gallery, batch_size.png), so
# the folder holds one comparison, not a mix; files it did not write are never touched.
MANIFEST = ".normlab-comparison-files"


class SkippedRunsWarning(UserWarning):
    """Some matching runs are not in the comparison (unfinished, no metric history, or a
    repeat of a variant and seed)."""


class StoppedRunsWarning(SkippedRunsWarning):
    """Some runs kept by --include-unfinished stopped before their last epoch: they are not
    pooled with their variant's seeds but compared as variants of their own."""


@dataclass
class Comparison:
    """What was compared and what came out; `files` and `logged_to_run_id` once written."""

    runs: pd.DataFrame  # one row per compared run (run_query.runs_frame)
    history: pd.DataFrame  # tidy: run identity columns, metric, epoch, value
    runs_metrics: pd.DataFrame  # one row per run: final/best accuracy, min loss, gap, time
    table: pd.DataFrame  # one row per variant: mean and std over seeds
    searched: str
    files: dict[str, Path] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)  # the earlier comparison's files no longer written
    logged_to_run_id: str | None = None

    def describe(self) -> str:
        """'9 runs, 3 variants; mnist (60000/10000 train/test images), 20 epochs' for titles."""
        epochs = sorted(int(e) for e in self.runs_metrics["final_epoch"].unique())
        datasets = ", ".join(sorted(self.runs_metrics["dataset"].astype(str).unique()))
        sizes = ", ".join(f"{a}/{b}" for a, b in self.runs[["train_size", "test_size"]].drop_duplicates()
                          .itertuples(index=False))
        return (f"{len(self.runs_metrics)} run{'' if len(self.runs_metrics) == 1 else 's'}, "
                f"{len(self.table)} variant{'' if len(self.table) == 1 else 's'}; {datasets} "
                f"({sizes} train/test images), {', '.join(map(str, epochs))} epoch{'' if epochs == [1] else 's'}")

    def removed_note(self, out_dir: Path) -> str:
        """The files writing into out_dir removed (self.removed), for the command's output."""
        return (f"removed from {out_dir}/ the earlier comparison's files this one does not have: "
                f"{', '.join(self.removed)}")

    def figure_jobs(self, band: str = "range") -> dict[str, plots.FigureJob]:
        """The curve and summary figures to draw, by file name; `band` as in plots.BANDS: the
        seeds' min–max or the 95% confidence interval of the mean."""
        plots.check_band(band)
        context = self.describe()
        jobs = {name: (plots.curves_figure, (self.history, metrics, f"{title} ({context})", band))
                for name, (metrics, title) in CURVE_FILES.items()}
        jobs["final_accuracy.png"] = (plots.final_accuracy_figure,
                                      (self.runs_metrics, f"Final test accuracy per seed ({context})", band))
        if self.history["batch_size"].nunique() > 1:  # the batch-size study
            jobs["batch_size.png"] = (plots.batch_size_figure, (self.history, "test_acc", band))
        return jobs

    def figures(self, band: str = "range") -> dict[str, Figure]:
        """figure_jobs drawn here, by file name (the caller closes them)."""
        return {name: build(*args) for name, (build, args) in self.figure_jobs(band).items()}

    def gallery_jobs(self, download_dir: Path) -> dict[str, plots.FigureJob]:
        """Per variant, the representative run's logged misclassified.png (downloaded into
        download_dir), titled with which seed it is and why (results.representative_runs); by
        file name."""
        jobs = {}
        for run in results.representative_runs(self.runs_metrics).itertuples():
            found = run_query.download_misclassified(run.run_id, download_dir / run.run_id)
            if found is None:
                warnings.warn(SkippedRunsWarning(
                    f"run {run.run_id} ({run.variant}) has no misclassified.png/json artifacts; no gallery"))
                continue
            png, mistakes = found
            title = (f"{run.variant}: {len(mistakes)} most confident test mistakes\n"
                     f"seed {run.seed}, run {run.run_id[:8]}: {run.picked}")
            confidences = [m["confidence"] for m in mistakes]
            caption = (f"final test accuracy {run.final_test_acc:.2f}%; confidence in the wrong class "
                       f"{max(confidences):.2f}–{min(confidences):.2f}" if confidences else "no mistakes")
            jobs[f"misclassified_{slug(str(run.variant))}.png"] = (plots.gallery_figure_of, (Path(png), title, caption))
        return jobs

    def galleries(self, download_dir: Path) -> dict[str, Figure]:
        """gallery_jobs drawn here, by file name (the caller closes them)."""
        return {name: build(*args) for name, (build, args) in self.gallery_jobs(download_dir).items()}


def slug(label: str) -> str:
    """'GN (2 groups)' -> 'gn-2-groups', 'BN + L1 (1e-05)' -> 'bn-l1-1e-05'."""
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")


def load_comparison(experiment: str = EXPERIMENT, filter_string: str | None = None,
                    parent_run_id: str | None = None, run_ids: list[str] | None = None,
                    include_unfinished: bool = False) -> Comparison:
    """Select runs, load their histories and compute the per-run and per-variant numbers.

    Runs left out (not FINISHED, or without a full metric history) are named in a
    SkippedRunsWarning; SelectionError when nothing is left to compare.
    """
    selection = run_query.select_runs(experiment, filter_string or None, parent_run_id or None,
                                     list(run_ids) if run_ids else None, include_unfinished)
    if selection.left_out:
        warnings.warn(SkippedRunsWarning(
            f"{len(selection.left_out)} matching run(s) left out because they are not FINISHED "
            f"(--include-unfinished keeps them): " + "; ".join(map(run_query.describe_run, selection.left_out))))
    runs = run_query.runs_frame(selection.runs, by_code=bool(run_ids))
    history = run_query.load_histories(runs)
    complete = history.groupby("run_id")["metric"].nunique() == len(METRICS)
    finite = np.isfinite(history["value"].astype(float)).groupby(history["run_id"]).all()
    incomplete = [r for r in selection.runs if not complete.get(r.info.run_id, False)]
    if incomplete:
        warnings.warn(SkippedRunsWarning(
            f"{len(incomplete)} run(s) left out because they lack a history of "
            f"{', '.join(METRICS)}: " + "; ".join(map(run_query.describe_run, incomplete))))
    diverged = [r for r in selection.runs if complete.get(r.info.run_id, False) and not finite[r.info.run_id]]
    if diverged:  # normlab stops a run before logging one; other tools may log them
        warnings.warn(SkippedRunsWarning(
            f"{len(diverged)} run(s) left out because their metric history has non-finite values (NaN or "
            f"infinity: the run diverged), which no mean or interval can hold: "
            + "; ".join(map(run_query.describe_run, diverged))))
    complete_ids = set(complete[complete & finite].index)
    if not complete_ids:
        raise SelectionError(f"none of the {len(selection.runs)} runs selected in {selection.searched} "
                                      f"has a metric history to compare")
    runs, repeats = newest_run_per_seed(runs[runs["run_id"].isin(complete_ids)])
    if repeats:
        by_id = {r.info.run_id: r for r in selection.runs}
        warnings.warn(SkippedRunsWarning(
            f"{len(repeats)} run(s) left out because a newer run has the same variant and seed (a seed is one "
            f"sample: counting its repeats as more seeds would narrow the intervals falsely): "
            + "; ".join(run_query.describe_run(by_id[run_id]) for run_id in repeats)))
    history = history[history["run_id"].isin(runs["run_id"])]
    runs, history = _stopped_runs_apart(runs, history)
    runs, history = _drop_unused_variants(runs), _drop_unused_variants(history)
    runs_metrics = results.per_run(history, runs)
    table = results.summary_table(runs_metrics, history)
    return Comparison(runs, history, runs_metrics, table, selection.searched)


def newest_run_per_seed(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The runs with one per variant and seed, the newest finished one (by start; the newest
    of any status where none finished), and the ids of the repeats left out: the same study
    run twice into one store (a sweep, then the same sweep through `mlflow run`) or a variant
    trained again would otherwise count each seed twice."""
    newest_first = (runs.assign(finished=runs["status"] == "FINISHED")
                    .sort_values(["finished", "start_time"], ascending=False, kind="stable"))
    repeated = newest_first["seed"].notna() & newest_first.duplicated(["variant", "seed"])
    repeats = list(newest_first.loc[repeated, "run_id"])
    return runs[~runs["run_id"].isin(repeats)], repeats


def _stopped_runs_apart(runs: pd.DataFrame, history: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs whose last logged epoch is before their planned `epochs` (killed or failed, kept by
    --include-unfinished) as variants of their own, "LN, stopped at epoch 2": pooled as seeds of
    "LN", an accuracy two epochs into a ten-epoch schedule would count as a final one."""
    reached = runs["run_id"].map(history.groupby("run_id")["epoch"].max())
    stopped = runs["epochs"].notna() & (reached < runs["epochs"])
    if not stopped.any():
        return runs, history
    position = {variant: i for i, variant in enumerate(runs["variant"].cat.categories)}
    labels, places = {}, {}  # run id -> its label; label -> (its variant's place, its last epoch)
    for run_id, variant, epoch in zip(runs.loc[stopped, "run_id"], runs.loc[stopped, "variant"], reached[stopped]):
        labels[run_id] = f"{variant}, stopped at epoch {int(epoch)}"
        places[labels[run_id]] = (position[variant], int(epoch))
    warnings.warn(StoppedRunsWarning(
        f"{len(labels)} run(s) stopped before their last epoch are compared on their own, not as seeds of "
        f"their variant: " + "; ".join(f"{run_id} ({label})" for run_id, label in labels.items())))
    # each stopped run's label after its variant's, the earliest stop first
    order = sorted([*position, *places], key=lambda name: places.get(name, (position.get(name), 0)))

    def relabelled(frame: pd.DataFrame) -> pd.DataFrame:
        names = frame["run_id"].map(labels).fillna(frame["variant"].astype(str))
        return frame.assign(variant=pd.Categorical(names, categories=order, ordered=True))

    return relabelled(runs), relabelled(history)


def _drop_unused_variants(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["variant"] = frame["variant"].cat.remove_unused_categories()
    return frame.reset_index(drop=True)


def write_outputs(comparison: Comparison, out_dir: Path, band: str = "range",
                  renderers: Executor | None = None) -> dict[str, Path]:
    """Figures, galleries, results.csv/.md, runs.csv, histories.csv, differences.csv and
    findings.md under out_dir, in place of the files an earlier comparison wrote there
    (MANIFEST; those removed in comparison.removed); the figures drawn by ``renderers``
    (analysis/renderers.py) side by side, if given."""
    plots.check_band(band)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as downloads:
        jobs = {**comparison.figure_jobs(band), **comparison.gallery_jobs(Path(downloads))}
        files = _drawn(jobs, out_dir, renderers)
    comparison.table.to_csv(out_dir / "results.csv", index=False)
    comparison.runs_metrics.to_csv(out_dir / "runs.csv", index=False)
    comparison.history[HISTORY_FILE_COLUMNS].to_csv(out_dir / "histories.csv", index=False)
    results.differences_frame(results.pairwise(comparison.table, comparison.runs_metrics)).to_csv(
        out_dir / "differences.csv", index=False)
    (out_dir / "results.md").write_text(
        f"Results of {comparison.describe()}: {results.table_note(comparison.table)}\n\n"
        + results.markdown_table(comparison.table))
    (out_dir / "findings.md").write_text(results.findings(comparison.table, comparison.runs_metrics))
    for name in ("results.csv", "runs.csv", "histories.csv", "differences.csv", "results.md", "findings.md"):
        files[name] = out_dir / name
    comparison.removed = _replace_earlier_comparison(out_dir, set(files))
    return files


def _replace_earlier_comparison(out_dir: Path, written: set[str]) -> list[str]:
    """Remove the files the MANIFEST of out_dir names that this comparison did not write (only
    plain names of that folder), then list this one's there; the names removed."""
    manifest = out_dir / MANIFEST
    earlier = set(manifest.read_text().splitlines()) if manifest.is_file() else set()
    stale = sorted(name for name in earlier - written if name and Path(name).name == name)
    for name in stale:
        (out_dir / name).unlink(missing_ok=True)
    manifest.write_text("".join(f"{name}\n" for name in sorted(written)))
    return stale


def _drawn(jobs: dict[str, plots.FigureJob], out_dir: Path, renderers: Executor | None) -> dict[str, Path]:
    """Each job drawn into out_dir/NAME, by the renderers if given; here if not, or if they
    stopped (a renderer killed, or one that could not start), with a warning."""
    if renderers is not None:
        try:
            drawing = {name: renderers.submit(plots.save, out_dir / name, *job) for name, job in jobs.items()}
            return {name: future.result() for name, future in drawing.items()}
        except BrokenProcessPool as exc:
            warnings.warn(f"the figure renderers stopped ({exc}); drawing the figures here", RuntimeWarning)
    return {name: plots.save(out_dir / name, *job) for name, job in jobs.items()}


def run_comparison(out_dir: Path, experiment: str = EXPERIMENT, filter_string: str | None = None,
                   parent_run_id: str | None = None, run_ids: list[str] | None = None,
                   log_to_run_id: str | None = None, *, include_unfinished: bool = False,
                   band: str = "range", renderers: Executor | None = None) -> Comparison:
    """Compare the selected runs: write every output under out_dir and log it to MLflow.

    `band`: what the curves' bands and the whiskers span, 'range' (min–max over seeds) or
    'ci' (95% confidence interval of the mean); checked before any run is read. `renderers`:
    as in write_outputs.

    The files go under 'comparison/' of `log_to_run_id` (a sweep passes its parent run),
    else of the run `mlflow run` started, else of a new run in the compared runs'
    experiment; that run is tagged with the compared run ids.
    """
    plots.check_band(band)
    comparison = load_comparison(experiment, filter_string, parent_run_id, run_ids, include_unfinished)
    comparison.files = write_outputs(comparison, Path(out_dir), band, renderers)
    params = {"experiment": experiment, "filter": filter_string or "", "parent_run_id": parent_run_id or "",
              "include_unfinished": str(include_unfinished), "band": band}
    comparison.logged_to_run_id = run_query.log_comparison(
        list(comparison.files.values()), list(comparison.runs_metrics["run_id"]), params,
        log_to_run_id, experiment_id=str(comparison.runs["experiment_id"].iloc[0]))
    return comparison
