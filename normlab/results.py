"""The results table and the written findings: pure pandas, from the tidy histories.

Every number is computed from the metric histories MLflow holds (one row per run, metric
and epoch) and the runs' params; nothing is read from local files.
"""

from __future__ import annotations

import pandas as pd

SETTINGS = ["norm", "groups", "l1", "batch_size", "dataset", "epochs", "parameters"]


def per_run(history: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: final and best test accuracy, epoch of best, min test loss, gap, time.

    'Final' is the run's last logged epoch. The gap is final train minus final test
    accuracy in percentage points (train accuracy is measured on augmented images with
    dropout on, so it can be below the test accuracy).
    """
    wide = history.pivot_table(index=["run_id", "epoch"], columns="metric", values="value", observed=True)
    rows = []
    for run_id, curves in wide.groupby(level="run_id"):
        curves = curves.droplevel("run_id").sort_index()
        test_acc = curves["test_acc"].dropna()
        last = curves.index.max()
        rows.append({
            "run_id": run_id,
            "final_epoch": int(last),
            "final_test_acc": test_acc.loc[last],
            "best_test_acc": test_acc.max(),
            "best_epoch": int(test_acc.idxmax()),
            "min_test_loss": curves["test_loss"].min(),
            "final_gap": curves["train_acc"].loc[last] - test_acc.loc[last],
        })
    metrics = pd.DataFrame(rows)
    columns = ["run_id", "variant", "seed", "status", "duration_s", *SETTINGS]
    return runs[columns].merge(metrics, on="run_id").sort_values(["variant", "seed"]).reset_index(drop=True)


def summary_table(runs_metrics: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: settings, n seeds, mean and std of each per-run number.

    `best_epoch` is the epoch where the mean-over-seeds test accuracy curve peaks.
    """
    mean_curves = (history[history["metric"] == "test_acc"]
                   .groupby(["variant", "epoch"], observed=True)["value"].mean())
    rows = []
    for variant, group in runs_metrics.groupby("variant", observed=True, sort=True):
        first = group.iloc[0]
        row = {"variant": variant, **{k: first[k] for k in SETTINGS}}
        row["n"] = len(group)
        row["seeds"] = " ".join(str(s) for s in group["seed"])
        for name in ("final_test_acc", "best_test_acc", "min_test_loss", "final_gap", "duration_s"):
            row[f"{name}_mean"] = group[name].mean()
            row[f"{name}_std"] = group[name].std(ddof=1) if len(group) > 1 else float("nan")
        row["final_test_acc_min"] = group["final_test_acc"].min()
        row["final_test_acc_max"] = group["final_test_acc"].max()
        row["best_epoch"] = int(mean_curves.loc[variant].idxmax())
        rows.append(row)
    table = pd.DataFrame(rows)
    table["variant"] = table["variant"].astype(str)
    return table


def _mean_std(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(table: pd.DataFrame) -> str:
    """The table a README embeds: mean ± std over seeds (sample std, n-1), n per row."""
    header = ["variant", "params", "n (seeds)", "final test acc (%)", "best test acc (%)",
              "epoch of best", "min test loss", "train − test acc (pp)", "run time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in table.itertuples():
        cells = [
            r.variant,
            f"{r.parameters:,}" if not pd.isna(r.parameters) else "?",
            f"{r.n} ({r.seeds})",
            _mean_std(r.final_test_acc_mean, r.final_test_acc_std, 2),
            _mean_std(r.best_test_acc_mean, r.best_test_acc_std, 2),
            str(r.best_epoch),
            _mean_std(r.min_test_loss_mean, r.min_test_loss_std, 4),
            _mean_std(r.final_gap_mean, r.final_gap_std, 2),
            _mean_std(r.duration_s_mean, r.duration_s_std, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def spread_verdict(a: pd.Series, b: pd.Series) -> str:
    """Whether two variants' per-seed final accuracies separate: compare their ranges."""
    if len(a) < 2 or len(b) < 2:
        return "one seed on at least one side, so the seed-to-seed spread is unknown"
    if a.min() > b.max() or b.min() > a.max():
        return "the seed ranges do not overlap: the difference exceeds the seed-to-seed spread"
    return "the seed ranges overlap: the difference is within the seed-to-seed spread"


def findings(table: pd.DataFrame, runs_metrics: pd.DataFrame) -> str:
    """Markdown: variants ranked by final test accuracy; each against the best and the next one."""
    ranked = table.sort_values("final_test_acc_mean", ascending=False).reset_index(drop=True)
    finals = {v: g["final_test_acc"] for v, g in runs_metrics.groupby(runs_metrics["variant"].astype(str))}
    epochs = sorted({int(e) for e in runs_metrics["final_epoch"]})
    datasets = sorted({str(d) for d in runs_metrics["dataset"]})
    lines = [f"Final test accuracy ({', '.join(datasets)}, epoch {', '.join(map(str, epochs))}), "
             f"mean ± std over seeds, best first:", ""]
    for i, r in enumerate(ranked.itertuples(), 1):
        lines.append(f"{i}. **{r.variant}**: {_mean_std(r.final_test_acc_mean, r.final_test_acc_std, 2)} % "
                     f"(n={r.n}, range {r.final_test_acc_min:.2f}–{r.final_test_acc_max:.2f})")
    # each variant against the best, and each against the next in the ranking
    pairs = dict.fromkeys([(0, i) for i in range(1, len(ranked))] + [(i, i + 1) for i in range(1, len(ranked) - 1)])
    if pairs:
        lines += ["", "Differences:", ""]
    for i, j in pairs:
        high, low = ranked.iloc[i], ranked.iloc[j]
        lines.append(f"- {high.variant} vs {low.variant}: "
                     f"{high.final_test_acc_mean - low.final_test_acc_mean:.2f} points higher; "
                     f"{spread_verdict(finals[high.variant], finals[low.variant])}.")
    lowest_loss = table.loc[table["min_test_loss_mean"].idxmin()]
    lines += ["", f"Lowest test loss: {lowest_loss.variant} "
                  f"({_mean_std(lowest_loss.min_test_loss_mean, lowest_loss.min_test_loss_std, 4)}). "
                  f"Train − test accuracy at the last epoch ranges from {table['final_gap_mean'].min():.2f} "
                  f"to {table['final_gap_mean'].max():.2f} points (train accuracy is measured on augmented "
                  f"images with dropout, so a negative gap is not a sign of overfitting)."]
    return "\n".join(lines) + "\n"


def representative_runs(runs_metrics: pd.DataFrame) -> pd.DataFrame:
    """Per variant, the run with the median final test accuracy (the lower one for even n)."""
    picked = []
    for _, group in runs_metrics.groupby("variant", observed=True, sort=True):
        ordered = group.sort_values(["final_test_acc", "seed"]).reset_index(drop=True)
        picked.append(ordered.iloc[(len(ordered) - 1) // 2])
    return pd.DataFrame(picked).reset_index(drop=True)
