"""The results table and the written findings: pure pandas, from the tidy histories.

Every number is computed from the metric histories MLflow holds (one row per run, metric
and epoch) and the runs' params; nothing is read from local files.
"""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd

from normlab.analysis import statistics
from normlab.engine.registry import NORMS, variant_label
from normlab.tracking.run_query import BY_CODE, DISTINGUISHING

SETTINGS = ["norm", "groups", "l1", "batch_size", "dataset", "epochs", "train_size", "test_size", "parameters"]
COMPARABLE = ["dataset", "train_size", "test_size", "epochs"]  # accuracies are ranked only within equal values
# Training settings a study may vary besides the norm and batch size (run_query.DISTINGUISHING),
# carried where the runs have them: a batch-size study's pairs hold them equal (families). The
# code is one where it names variants (runs picked by id from two commits, run_query.BY_CODE).
HYPERPARAMETERS = ["lr", "dropout", "code"]
INTERVAL_METRICS = ("final_test_acc", "best_test_acc", "final_test_loss", "min_test_loss")
NAN = float("nan")


def per_run(history: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: final and best test accuracy, epoch of best, final and min test loss, gap, time.

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
            "final_test_loss": curves["test_loss"].loc[last],
            "min_test_loss": curves["test_loss"].min(),
            "final_gap": curves["train_acc"].loc[last] - test_acc.loc[last],
        })
    metrics = pd.DataFrame(rows)
    columns = ["run_id", "variant", "seed", "status", "duration_s", "speedups", *SETTINGS,
               *(h for h in HYPERPARAMETERS if h in runs)]
    return runs[columns].merge(metrics, on="run_id").sort_values(["variant", "seed"]).reset_index(drop=True)


def summary_table(runs_metrics: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: settings, n seeds, mean and std of each per-run number, and the
    95% Student-t interval of the mean for the accuracies and losses (NaN, an empty CSV
    cell, where one seed gives no std or interval).

    `best_epoch` is the epoch where the mean-over-seeds test accuracy curve peaks.
    """
    mean_curves = (history[history["metric"] == "test_acc"]
                   .groupby(["variant", "epoch"], observed=True)["value"].mean())
    rows = []
    for variant, group in runs_metrics.groupby("variant", observed=True, sort=True):
        first = group.iloc[0]
        row = {"variant": variant, **{k: first[k] for k in [*SETTINGS, *HYPERPARAMETERS] if k in group}}
        row["n"] = len(group)
        row["seeds"] = " ".join(str(s) for s in group["seed"])
        for name in INTERVAL_METRICS:
            summary = statistics.summarize(group[name])
            row[f"{name}_mean"] = summary.mean
            row[f"{name}_std"] = NAN if summary.std is None else summary.std
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = summary.ci or (NAN, NAN)
        for name in ("final_gap", "duration_s"):
            row[f"{name}_mean"] = group[name].mean()
            row[f"{name}_std"] = group[name].std(ddof=1) if len(group) > 1 else NAN
        row["final_test_acc_min"] = group["final_test_acc"].min()
        row["final_test_acc_max"] = group["final_test_acc"].max()
        row["best_epoch"] = int(mean_curves.loc[variant].idxmax())
        rows.append(row)
    table = pd.DataFrame(rows)
    table["variant"] = table["variant"].astype(str)
    return table


def _mean_std(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def stat_cell(row, name: str, digits: int) -> str:
    """'97.12 ± 0.31 [96.80, 97.44]' (mean ± std [95% CI]); '97.12 (1 seed)' without spread."""
    mean, std = getattr(row, f"{name}_mean"), getattr(row, f"{name}_std")
    if pd.isna(std):
        return f"{mean:.{digits}f} (1 seed)"
    low, high = getattr(row, f"{name}_ci_low"), getattr(row, f"{name}_ci_high")
    return f"{mean:.{digits}f} ± {std:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(table: pd.DataFrame) -> str:
    """The table a README embeds: mean ± std [95% CI] over seeds, n per row."""
    header = ["variant", "params", "n (seeds)", "final test acc (%)", "best test acc (%)", "epoch of best",
              "final test loss", "min test loss", "train − test acc (pp)", "run time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in table.itertuples():
        cells = [
            r.variant,
            f"{r.parameters:,}" if not pd.isna(r.parameters) else "?",
            f"{r.n} ({r.seeds})",
            stat_cell(r, "final_test_acc", 2),
            stat_cell(r, "best_test_acc", 2),
            str(r.best_epoch),
            stat_cell(r, "final_test_loss", 4),
            stat_cell(r, "min_test_loss", 4),
            _mean_std(r.final_gap_mean, r.final_gap_std, 2),
            _mean_std(r.duration_s_mean, r.duration_s_std, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_note(table: pd.DataFrame) -> str:
    """What the table's cells are, and a warning where some variant has fewer than 5 seeds."""
    note = (f"mean ± sample std (n − 1) over seeds [{statistics.INTERVAL}]; "
            f"a variant with one seed has neither.")
    few = table[table["n"] < statistics.MIN_SEEDS]
    if len(few):
        note += (f" {len(few)} of {len(table)} variants have fewer than {statistics.MIN_SEEDS} seeds: "
                 f"their intervals are wide, and findings.md gives no verdict on them.")
    accuracy = [f"{name}_ci_{end}" for name in ("final_test_acc", "best_test_acc") for end in ("low", "high")]
    if ((table[accuracy] < 0) | (table[accuracy] > 100)).any(axis=None):
        note += (" Some accuracy intervals reach below 0 or above 100%: a t interval of few seeds assumes "
                 "normally spread seeds and is not clipped; more seeds narrow it.")
    return note


def _epochs(n) -> str:
    return "? epochs" if pd.isna(n) else f"{n} epoch" + ("" if n == 1 else "s")


def _group_label(dataset, train_size, test_size, epochs) -> str:
    """'mnist, 1000/500 train/test images, 4 epochs'."""
    sizes = "?" if pd.isna(train_size) or pd.isna(test_size) else f"{train_size}/{test_size}"
    return f"{dataset}, {sizes} train/test images, {_epochs(epochs)}"


def ranked_groups(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Variants that can be ranked against each other, best final test accuracy first.

    Accuracies are comparable only on the same data and epoch budget: the table is split by
    dataset, train/test sizes and epochs (labelled as in _group_label).
    """
    groups = []
    for key, group in table.groupby(COMPARABLE, dropna=False, sort=True):
        ranked = group.sort_values("final_test_acc_mean", ascending=False, kind="stable").reset_index(drop=True)
        groups.append((_group_label(*key), ranked, key[-1]))
    # the largest group first, then the longest budget (the study before its smoke test)
    groups.sort(key=lambda g: (-len(g[1]), -(g[2] if pd.notna(g[2]) else 0)))
    return [(label, ranked) for label, ranked, _ in groups]


class Pair(NamedTuple):
    """One tested pair: the group of comparable runs it belongs to, its family (the pairs
    Holm's correction runs across) and the difference, higher-ranked minus lower-ranked."""

    group: str
    family: str
    difference: statistics.Difference


ALL_PAIRS = "every pair"


def norm_setting_label(norm: str, groups=None, l1=None) -> str:
    """The registry's label ('BN + L1 (1e-05)', 'GN (4 groups)') from a frame row, where
    groups and l1 may be missing: one name per norm setting, whatever the batch size."""
    if norm not in NORMS:
        return str(norm)
    return variant_label(norm, int(groups) if pd.notna(groups) else 1, float(l1) if pd.notna(l1) else 0.0)


def _all_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Every pair of the names, each in the order given (ranked: the higher-ranked first)."""
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def families(ranked: pd.DataFrame) -> list[tuple[str, list[tuple[str, str]]]]:
    """The pairs of one ranked group, by the question they answer (each pair higher-ranked first).

    Without a batch-size axis, one family: every pair. With one, the questions of a
    batch-size study, each its own family: at each batch size, the norm settings against
    each other; and for each norm setting, every batch size against its largest (does it
    lose accuracy as the batch shrinks?). Pairs of different norms at different batch sizes
    answer no question and are not tested, so they do not dilute the correction.

    Where the runs also differ in lr or dropout (two batch-size sweeps of different --lr in
    one experiment), a pair holds those equal: the norms are compared at one batch size and
    lr; a norm's batch sizes at one dropout, and at one lr too unless
    each batch size has a single lr (a scaled lr, `--lr-scaling`, follows the batch size)."""
    if ranked["batch_size"].nunique() < 2:
        return [(ALL_PAIRS, _all_pairs(list(ranked["variant"])))]
    rank = {v: i for i, v in enumerate(ranked["variant"])}
    varying = [h for h in HYPERPARAMETERS if h in ranked and ranked[h].nunique(dropna=True) > 1]
    fixed = [h for h in varying if h != "lr"]
    at_one_batch = [*fixed, "lr"] if "lr" in varying and _several_lrs_at_a_batch_size(ranked) else fixed
    out = []
    for key, at in ranked.groupby(["batch_size", *at_one_batch], sort=True, dropna=False):  # rows keep their order
        if len(at) > 1:
            out.append((f"{_setting_words(['batch_size', *at_one_batch], key)}: the norms against each other",
                        _all_pairs(list(at["variant"]))))
    settings = ranked.assign(norm_rank=ranked["norm"].map(list(NORMS).index))
    for key, runs in settings.groupby(["norm_rank", "norm", "groups", "l1", *fixed], sort=True, dropna=False):
        _, norm, groups, l1, *values = key
        by_lr = "lr" in varying and _several_lrs_at_a_batch_size(runs)
        for lr, chain in runs.groupby("lr", sort=True, dropna=False) if by_lr else [(None, runs)]:
            largest = chain.loc[chain["batch_size"].idxmax(), "variant"]
            pairs = [tuple(sorted((v, largest), key=rank.get)) for v in chain.sort_values("batch_size")["variant"]
                     if v != largest]
            held = _setting_words([*fixed, "lr"] if by_lr else fixed, [*values, lr])
            if pairs:
                out.append((f"{norm_setting_label(norm, groups, l1)}{', ' + held if held else ''}: each batch size "
                            f"against batch {chain['batch_size'].max()}", pairs))
    return out


def _several_lrs_at_a_batch_size(variants: pd.DataFrame) -> bool:
    """Whether the lr is a setting of its own here, not a function of the batch size (one lr
    at each batch size, as `--lr-scaling` gives, or one lr for all)."""
    return bool(variants.groupby("batch_size")["lr"].nunique().max() > 1)


def _setting_words(names: list[str], values) -> str:
    """'batch 32, lr 0.1' for ['batch_size', 'lr'] and (32, 0.1), as run_query labels variants."""
    return ", ".join({**DISTINGUISHING, **BY_CODE}[name](value) for name, value in zip(names, values))


def pairwise(table: pd.DataFrame, runs_metrics: pd.DataFrame) -> list[Pair]:
    """Welch on the final test accuracies for the pairs of each family (``families``) of every
    group ranked together, Holm-adjusted within the family."""
    finals = {v: g["final_test_acc"].to_numpy() for v, g in runs_metrics.groupby(runs_metrics["variant"].astype(str))}
    out = []
    for label, ranked in ranked_groups(table):
        for family, pairs in families(ranked):
            out += [Pair(label, family, d) for d in statistics.compare_pairs(finals, pairs)]
    return out


def differences_frame(pairs: list[Pair]) -> pd.DataFrame:
    """differences.csv: one row per pair; test columns empty where there is no test."""
    rows = []
    for label, family, d in pairs:
        low, high = d.ci or (NAN, NAN)
        rows.append({"runs": label, "family": family, "higher": d.a, "lower": d.b, "n_higher": d.n_a,
                     "n_lower": d.n_b, "difference": d.difference, "ci_low": low, "ci_high": high,
                     **{k: NAN if getattr(d, k) is None else getattr(d, k) for k in ("t", "df", "p", "p_holm")},
                     "real": d.real, "verdict": d.verdict()})
    columns = ["runs", "family", "higher", "lower", "n_higher", "n_lower", "difference", "ci_low", "ci_high", "t",
               "df", "p", "p_holm", "real", "verdict"]
    return pd.DataFrame(rows, columns=columns)


def _difference_line(d: statistics.Difference) -> str:
    head = f"- **{d.a}** − **{d.b}**: {d.difference:+.2f} points"
    if d.p is None:
        return f"{head}; {d.verdict()}."
    return (f"{head}, 95% CI [{d.ci[0]:+.2f}, {d.ci[1]:+.2f}]; Welch t = {d.t:.2f}, df = {d.df:.1f}, "
            f"p {statistics.format_p(d.p)}, Holm-adjusted p {statistics.format_p(d.p_holm)}: {d.verdict()}.")


def findings(table: pd.DataFrame, runs_metrics: pd.DataFrame) -> str:
    """Markdown: per group of comparable runs, variants ranked by final test accuracy, then every
    pair's difference with its interval, test and verdict (rules in normlab.analysis.statistics)."""
    groups = ranked_groups(table)
    pairs = pairwise(table, runs_metrics)
    tested = sum(p.difference.p is not None for p in pairs)
    by_family = any(p.family != ALL_PAIRS for p in pairs)
    lines = []
    if len(groups) > 1:
        lines += [f"These runs are not all comparable: they differ in data or epoch budget "
                  f"({'; '.join(label for label, _ in groups)}). Each group is ranked on its own below; "
                  f"no variant is ranked or tested against one of another group.", ""]
    few = table[table["n"] < statistics.MIN_SEEDS]
    if len(few):
        seeds = "; ".join(f"{r.variant} has {r.n} seed{'' if r.n == 1 else 's'}" for r in few.itertuples())
        lines += [f"**n is too small for a verdict**: {seeds}; at least "
                  f"{statistics.MIN_SEEDS} seeds per variant are needed (`normlab sweep --seeds "
                  f"{statistics.MIN_SEEDS}`). The numbers below describe these runs; they do not say which "
                  f"variant is better.", ""]
    if pairs and not tested:
        lines += ["Differences in final test accuracy (higher minus lower mean, in points): no pair has a test, "
                  "which needs at least two seeds a side.", ""]
    elif pairs and by_family:
        lines += [f"Differences in final test accuracy (higher minus lower mean, in points) for the pairs a "
                  f"batch-size study asks about: at each batch size the norm settings against each other, and "
                  f"each norm setting's batch sizes against its largest batch; no pair of different norms at "
                  f"different batch sizes is tested. {statistics.PAIR_METHOD[0].upper()}{statistics.PAIR_METHOD[1:]} "
                  f"the pairs of each family (one batch size, or one norm setting), {tested} pairs with a test in "
                  f"all. A difference is called real only when its Holm-adjusted p < {statistics.ALPHA:.2f} and "
                  f"both variants have at least {statistics.MIN_SEEDS} seeds; its 95% interval then excludes zero "
                  f"as well.", ""]
    elif pairs:
        lines += [f"Differences in final test accuracy, for each pair ranked together (higher minus lower mean, "
                  f"in points): {statistics.PAIR_METHOD} the {tested} pair{'' if tested == 1 else 's'} with a test "
                  f"in this comparison. A difference is called real only when its Holm-adjusted p < "
                  f"{statistics.ALPHA:.2f} and both variants have at least {statistics.MIN_SEEDS} seeds; its 95% "
                  f"interval then excludes zero as well (an interval that excludes zero before the correction "
                  f"is not enough).", ""]
    for label, ranked in groups:
        if len(groups) > 1:
            lines += [f"## {label}", ""]
        lines += [f"Final test accuracy ({label}): mean ± std over seeds [{statistics.INTERVAL}], best first:", ""]
        for i, r in enumerate(ranked.itertuples(), 1):
            if r.n == 1:
                lines.append(f"{i}. **{r.variant}**: {r.final_test_acc_mean:.2f} % (one seed: no std or interval)")
                continue
            lines.append(f"{i}. **{r.variant}**: {r.final_test_acc_mean:.2f} ± {r.final_test_acc_std:.2f} % "
                         f"[{r.final_test_acc_ci_low:.2f}, {r.final_test_acc_ci_high:.2f}] "
                         f"(n={r.n}, range {r.final_test_acc_min:.2f}–{r.final_test_acc_max:.2f})")
        for family in dict.fromkeys(p.family for p in pairs if p.group == label):
            heading = "Differences in final test accuracy" + ("" if family == ALL_PAIRS else f", {family}")
            lines += ["", f"{heading}:", ""] + [_difference_line(p.difference) for p in pairs
                                                 if p.group == label and p.family == family]
        lowest = ranked.loc[ranked["min_test_loss_mean"].idxmin()]
        lines += ["", f"Lowest test loss: {lowest.variant} ({stat_cell(lowest, 'min_test_loss', 4)}).", ""]
    lines += [f"Train − test accuracy at the last epoch ranges from {table['final_gap_mean'].min():.2f} "
              f"to {table['final_gap_mean'].max():.2f} points (train accuracy is measured on augmented "
              f"images with dropout, so a negative gap is not a sign of overfitting)."]
    return "\n".join(lines) + "\n"


def representative_runs(runs_metrics: pd.DataFrame) -> pd.DataFrame:
    """Per variant, the run whose final test accuracy is nearest the variant's mean, and why.

    Ties (always the case with two seeds) go to the lower accuracy, then the lower seed;
    the `picked` column says which rule chose the run, for the gallery's title.
    """
    picked = []
    for _, group in runs_metrics.groupby("variant", observed=True, sort=True):
        mean = group["final_test_acc"].mean()
        distance = (group["final_test_acc"] - mean).abs().round(9)  # equal up to float noise: a tie
        ordered = group.assign(distance=distance).sort_values(["distance", "final_test_acc", "seed"])
        run = ordered.iloc[0].drop("distance")
        tied = int((distance == distance.min()).sum())
        if len(group) == 1:
            run["picked"] = "the only seed"
        else:
            run["picked"] = (f"the seed nearest the mean final accuracy of {len(group)} seeds ({mean:.2f}%)"
                             + (f", the lower of {tied} equally near" if tied > 1 else ""))
        picked.append(run)
    return pd.DataFrame(picked).reset_index(drop=True)
