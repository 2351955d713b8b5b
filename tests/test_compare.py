"""The comparison step against a real sqlite store holding small real training runs.

Five runs are trained once for the module with the real `train` command, in this process
to pay the imports once (BN + L1 and LN with seeds 1 and 2, GN with one seed; 4 epochs on
1,000 real digits). Expected numbers come from what each training
process printed per epoch, not from MLflow, so the store round trip is checked too.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PathCollection, PolyCollection
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from normlab import compare, plots, results
from normlab.cli import main
from normlab.tracking import SelectionError
from tests.conftest import ROOT, cli_env

EPOCHS = 4
TRAINED = [  # (norm, l1, seed, child of the sweep parent run)
    ("bn", "1e-05", 1, True),
    ("bn", "1e-05", 2, True),
    ("ln", "0", 1, True),
    ("ln", "0", 2, True),
    ("gn", "0", 1, False),
]
LABELS = {"bn": "BN + L1 (1e-05)", "ln": "LN", "gn": "GN (2 groups)"}
EPOCH_LINE = re.compile(r"epoch\s+(\d+)/\d+\s+train_loss ([\d.]+)\s+train_acc\s+([\d.]+)%\s+"
                        r"test_loss ([\d.]+)\s+test_acc\s+([\d.]+)%")
TOLERANCE = {"train_loss": 6e-5, "test_loss": 6e-5, "train_acc": 6e-3, "test_acc": 6e-3}  # printed digits


@dataclass
class TrainedRun:
    run_id: str
    variant: str
    seed: int
    printed: pd.DataFrame  # epoch x metric, as the training process printed them


@dataclass
class Store:
    root: Path
    uri: str
    parent_id: str
    runs: list[TrainedRun] = field(default_factory=list)

    def run(self, norm: str, seed: int) -> TrainedRun:
        return next(r for r in self.runs if r.variant == LABELS[norm] and r.seed == seed)

    @property
    def children(self) -> set[str]:
        return {r.run_id for r, spec in zip(self.runs, TRAINED) if spec[3]}


def parse_training_output(stdout: str) -> tuple[str, pd.DataFrame]:
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", stdout).group(1)
    rows = [dict(zip(["epoch", "train_loss", "train_acc", "test_loss", "test_acc"], map(float, m.groups())))
            for m in EPOCH_LINE.finditer(stdout)]
    return run_id, pd.DataFrame(rows).astype({"epoch": int}).set_index("epoch")


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_mnist_dir) -> Store:
    root = tmp_path_factory.mktemp("compare-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)  # MLflow resolves default artifact folders against the working directory
        # training in this process calls mlflow.set_experiment, which sets both; undo them afterwards
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        patch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        experiment = client.create_experiment("normlab", artifact_location=str(root / "artifacts"))
        client.create_experiment("odd", artifact_location=str(root / "odd-artifacts"))
        client.create_experiment("comparisons", artifact_location=str(root / "comparison-artifacts"))
        parent = client.create_run(experiment, run_name="sweep").info.run_id
        client.set_terminated(parent)

        built = Store(root, uri, parent)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a 7,750-parameter model gains little from more; spare shared CI cores
        for norm, l1, seed, child in TRAINED:  # in this process: imports once, ~5 s per run
            done = CliRunner().invoke(main, ["train", "--norm", norm, "--l1", l1, "--seed", str(seed), "--epochs",
                                             str(EPOCHS), "--data-dir", str(small_mnist_dir), "--device", "cpu"])
            assert done.exit_code == 0, done.output[-3000:]
            run_id, printed = parse_training_output(done.output)
            assert list(printed.index) == list(range(1, EPOCHS + 1))
            built.runs.append(TrainedRun(run_id, LABELS[norm], seed, printed))
            if child:
                client.set_tag(run_id, "mlflow.parentRunId", parent)
        torch.set_num_threads(threads)
        os.environ.pop("MLFLOW_EXPERIMENT_ID")  # left by training; `mlflow run` refuses it with a name
        yield built
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def comparison(store) -> compare.Comparison:
    return compare.load_comparison("normlab")


def expected_history(store: Store) -> pd.DataFrame:
    frames = []
    for run in store.runs:
        tidy = run.printed.reset_index().melt(id_vars="epoch", var_name="metric", value_name="value")
        frames.append(tidy.assign(run_id=run.run_id))
    return pd.concat(frames)


# --- loading ---------------------------------------------------------------------------


def test_history_holds_every_epoch_the_runs_printed(store, comparison):
    history = comparison.history
    assert len(history) == len(TRAINED) * 4 * EPOCHS
    merged = history.merge(expected_history(store), on=["run_id", "metric", "epoch"], suffixes=("", "_printed"))
    assert len(merged) == len(history)
    error = (merged["value"] - merged["value_printed"]).abs()
    assert (error <= merged["metric"].map(TOLERANCE)).all()
    assert set(history["status"]) == {"FINISHED"}
    assert list(history.columns[:8]) == ["run_id", "variant", "norm", "l1", "groups", "batch_size", "seed", "status"]


def test_runs_are_labelled_by_variant_with_settings_from_params(store, comparison):
    runs = comparison.runs
    assert list(runs["variant"].cat.categories) == ["BN + L1 (1e-05)", "LN", "GN (2 groups)"]
    by_id = runs.set_index("run_id")
    for run in store.runs:
        row = by_id.loc[run.run_id]
        assert (row["variant"], row["seed"], row["batch_size"], row["parameters"]) == (run.variant, run.seed, 128, 7750)
    assert runs.loc[runs["norm"] == "gn", "groups"].tolist() == [2]
    assert runs.loc[runs["norm"] != "gn", "groups"].isna().all()  # groups means nothing for bn or ln
    assert runs.loc[runs["norm"] == "bn", "l1"].tolist() == [1e-05, 1e-05]


# --- selection -------------------------------------------------------------------------


def test_select_by_parent_filter_and_run_ids(store):
    assert set(compare.load_comparison(parent_run_id=store.parent_id).runs["run_id"]) == store.children
    ln = compare.load_comparison(filter_string="params.norm = 'ln'").runs
    assert set(ln["run_id"]) == {store.run("ln", 1).run_id, store.run("ln", 2).run_id}
    picked = [store.run("gn", 1).run_id, store.run("bn", 2).run_id]
    assert set(compare.load_comparison(run_ids=picked).runs["run_id"]) == set(picked)
    narrowed = compare.load_comparison(parent_run_id=store.parent_id, filter_string="params.seed = '2'")
    assert set(narrowed.runs["run_id"]) == {store.run("bn", 2).run_id, store.run("ln", 2).run_id}


@pytest.mark.parametrize("kwargs, message", [
    ({"experiment": "nope"}, "no experiment named 'nope'"),
    ({"filter_string": "params.norm = 'in'"}, "no training runs to compare in experiment 'normlab', filter"),
    ({"filter_string": "params.norm === 'ln'"}, "MLflow could not search"),
    ({"run_ids": ["0" * 32]}, f"run '{'0' * 32}' not found"),
    ({"parent_run_id": "f" * 32}, f"parent run '{'f' * 32}' not found"),
])
def test_nothing_to_compare_is_a_clear_error(store, kwargs, message):
    with pytest.raises(SelectionError, match=re.escape(message)):
        compare.load_comparison(**kwargs)


def test_unfinished_runs_and_runs_without_history_are_named_and_left_out(tmp_path, store):
    client = MlflowClient()
    source = client.get_run(store.run("ln", 1).run_id)
    experiment = client.get_experiment_by_name("odd").experiment_id

    def copy_run(status: str, with_history: bool, seed: int) -> str:
        """The source run's tags, params and (optionally) histories; no artifacts."""
        run_id = client.create_run(experiment, tags=source.data.tags).info.run_id
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in source.data.params.items()
                                         if k != "seed"] + [mlflow.entities.Param("seed", str(seed))])
        if with_history:
            for metric in source.data.metrics:
                client.log_batch(run_id, metrics=client.get_metric_history(source.info.run_id, metric))
        client.set_terminated(run_id, status)
        return run_id

    failed, empty = copy_run("FAILED", True, seed=0), copy_run("FINISHED", False, seed=7)
    ids = [source.info.run_id, failed, empty]
    with pytest.warns(compare.SkippedRunsWarning) as caught:
        kept = compare.load_comparison(run_ids=ids)
    messages = [str(w.message) for w in caught]
    assert any(failed in m and "FAILED" in m and "not FINISHED" in m for m in messages)
    assert any(empty in m and "lack a history" in m for m in messages)
    assert kept.runs["run_id"].tolist() == [source.info.run_id]

    with pytest.warns(compare.SkippedRunsWarning, match=empty):
        everything = compare.load_comparison(run_ids=ids, include_unfinished=True)
    statuses = everything.history.groupby("run_id")["status"].first()
    assert statuses.to_dict() == {source.info.run_id: "FINISHED", failed: "FAILED"}
    assert everything.table["n"].tolist() == [2]
    # equal final accuracies: the lower seed (the failed copy, without artifacts) is shown
    with pytest.warns(compare.SkippedRunsWarning, match=f"run {failed} .* has no misclassified.png/json"):
        assert everything.galleries(tmp_path) == {}

    with pytest.raises(SelectionError, match="has a metric history"), pytest.warns(compare.SkippedRunsWarning):
        compare.load_comparison(run_ids=[empty])
    with pytest.raises(SelectionError, match=r"1 matched but are not FINISHED: use --include-unfinished"):
        compare.load_comparison(experiment="odd", filter_string="attributes.status = 'FAILED'")


# --- figures -------------------------------------------------------------------------


def seed_stats(store: Store, variant: str, metric: str) -> pd.DataFrame:
    values = pd.concat([r.printed[metric] for r in store.runs if r.variant == variant], axis=1)
    return pd.DataFrame({"mean": values.mean(axis=1), "min": values.min(axis=1), "max": values.max(axis=1)})


def test_test_accuracy_figure_has_a_line_per_variant_and_bands_for_seeds(store, comparison):
    figure = comparison.figures()["test_accuracy.png"]
    full, zoom = figure.axes
    assert "Test accuracy by variant" in figure._suptitle.get_text()
    assert full.get_title() == f"Test accuracy, epochs 1–{EPOCHS}"
    assert zoom.get_title() == f"Test accuracy, epochs 3–{EPOCHS} (zoom)"
    for ax in (full, zoom):
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "accuracy (%)")
        assert all(float(t).is_integer() for t in ax.get_xticks())
    legend = full.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["BN + L1 (1e-05) (n=2)", "LN (n=2)", "GN (2 groups) (n=1)"]
    assert legend.get_title().get_text() == plots.BAND
    lines = {line.get_label(): line for line in full.get_lines()}
    bands = [c for c in full.collections if isinstance(c, PolyCollection)]
    assert len(lines) == 3 and len(bands) == 2  # one band per variant with two seeds
    for variant, band in zip(["BN + L1 (1e-05)", "LN"], bands):
        stats = seed_stats(store, variant, "test_acc")
        line = lines[f"{variant} (n=2)"]
        np.testing.assert_allclose(line.get_xdata(), stats.index)
        np.testing.assert_allclose(line.get_ydata(), stats["mean"], atol=6e-3)
        corners = band.get_paths()[0].vertices
        np.testing.assert_allclose(corners[:, 1].min(), stats["min"].min(), atol=6e-3)
        np.testing.assert_allclose(corners[:, 1].max(), stats["max"].max(), atol=6e-3)
    gn = lines["GN (2 groups) (n=1)"]
    np.testing.assert_allclose(gn.get_ydata(), store.run("gn", 1).printed["test_acc"], atol=6e-3)
    finals = {f"{seed_stats(store, v, 'test_acc')['mean'].iloc[-1]:.2f}%" for v in LABELS.values()}
    assert {t.get_text() for t in zoom.texts} == finals
    plt.close("all")


def test_loss_and_training_figures_name_their_metrics(comparison):
    figures = comparison.figures()
    assert set(figures) == {"test_loss.png", "test_accuracy.png", "train_curves.png", "final_accuracy.png"}
    loss = figures["test_loss.png"].axes[0]
    assert loss.get_title() == f"Test loss, epochs 1–{EPOCHS}"
    assert loss.get_ylabel() == "loss (mean NLL per image, nats)"
    train = figures["train_curves.png"].axes
    assert [ax.get_title() for ax in train] == [
        f"Training loss, epochs 1–{EPOCHS}", f"Training loss, epochs 3–{EPOCHS} (zoom)",
        f"Training accuracy, epochs 1–{EPOCHS}", f"Training accuracy, epochs 3–{EPOCHS} (zoom)"]
    assert [ax.get_ylabel() for ax in train[::2]] == ["loss (mean NLL per image, nats)", "accuracy (%)"]
    plt.close("all")


def test_final_accuracy_figure_shows_every_seed(store, comparison):
    figure = comparison.figures()["final_accuracy.png"]
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(LABELS.values())
    assert ax.get_ylabel() == "final test accuracy (%)"
    points = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections if isinstance(c, PathCollection)])
    printed = sorted(r.printed["test_acc"].iloc[-1] for r in store.runs)
    np.testing.assert_allclose(sorted(points), printed, atol=6e-3)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["one seed", "mean", "min–max over seeds"]
    plt.close("all")


# --- table ---------------------------------------------------------------------------


def test_table_numbers_equal_the_histories(store, comparison):
    client = MlflowClient()
    table = comparison.table.set_index("variant")
    assert list(table.index) == list(LABELS.values())
    for variant in LABELS.values():
        runs = [r for r in store.runs if r.variant == variant]
        row = table.loc[variant]
        final = pd.Series([r.printed["test_acc"].iloc[-1] for r in runs])
        best = pd.Series([r.printed["test_acc"].max() for r in runs])
        min_loss = pd.Series([r.printed["test_loss"].min() for r in runs])
        gap = pd.Series([r.printed["train_acc"].iloc[-1] - r.printed["test_acc"].iloc[-1] for r in runs])
        infos = [client.get_run(r.run_id).info for r in runs]
        duration = pd.Series([(i.end_time - i.start_time) / 1000 for i in infos])
        assert (row["n"], row["seeds"], row["parameters"]) == (len(runs), " ".join(str(r.seed) for r in runs), 7750)
        for name, values, tol in [("final_test_acc", final, 6e-3), ("best_test_acc", best, 6e-3),
                                  ("min_test_loss", min_loss, 6e-5), ("final_gap", gap, 1.2e-2),
                                  ("duration_s", duration, 1e-9)]:
            assert row[f"{name}_mean"] == pytest.approx(values.mean(), abs=tol)
            if len(runs) > 1:
                assert row[f"{name}_std"] == pytest.approx(values.std(), abs=2 * tol)
            else:
                assert np.isnan(row[f"{name}_std"])
        assert row["best_epoch"] == seed_stats(store, variant, "test_acc")["mean"].idxmax()
    markdown = results.markdown_table(comparison.table)
    ln = table.loc["LN"]
    assert (f"| LN | 7,750 | 2 (1 2) | {ln.final_test_acc_mean:.2f} ± {ln.final_test_acc_std:.2f} | "
            in markdown)
    gn = table.loc["GN (2 groups)"]
    assert f"| GN (2 groups) | 7,750 | 1 (1) | {gn.final_test_acc_mean:.2f} | " in markdown


def test_findings_rank_variants_and_judge_the_seed_spread(comparison):
    text = results.findings(comparison.table, comparison.runs_metrics)
    ranked = comparison.table.sort_values("final_test_acc_mean", ascending=False)["variant"].tolist()
    assert [re.search(rf"^{i}\. \*\*(.+?)\*\*", text, re.M).group(1) for i in (1, 2, 3)] == ranked
    finals = comparison.runs_metrics.groupby(comparison.runs_metrics["variant"].astype(str))["final_test_acc"]
    bn, ln = finals.get_group("BN + L1 (1e-05)"), finals.get_group("LN")
    separate = bn.min() > ln.max() or ln.min() > bn.max()
    verdict = "do not overlap" if separate else "overlap"
    assert re.search(rf"- (LN vs BN \+ L1 \(1e-05\)|BN \+ L1 \(1e-05\) vs LN): [\d.]+ points higher; "
                     rf"the seed ranges {verdict}", text)
    assert "one seed on at least one side" in text  # GN has a single seed


# --- outputs, galleries, logging ---------------------------------------------------------


def test_run_comparison_writes_stable_files_and_logs_them(tmp_path, store):
    client = MlflowClient()
    out = tmp_path / "results"
    done = compare.run_comparison(out, parent_run_id=store.parent_id)
    expected = {"test_loss.png", "test_accuracy.png", "train_curves.png", "final_accuracy.png",
                "misclassified_bn-l1-1e-05.png", "misclassified_ln.png",
                "results.csv", "results.md", "runs.csv", "findings.md"}
    assert {p.name for p in out.iterdir()} == expected == set(done.files)
    written = pd.read_csv(out / "results.csv")
    assert written["variant"].tolist() == ["BN + L1 (1e-05)", "LN"]
    np.testing.assert_allclose(written["final_test_acc_mean"], done.table["final_test_acc_mean"])
    assert results.markdown_table(done.table) in (out / "results.md").read_text()

    logged = client.get_run(done.logged_to_run_id)
    assert logged.info.run_id not in store.children | {store.parent_id}
    assert logged.info.status == "FINISHED"
    assert set(logged.data.tags["compared_run_ids"].split(",")) == store.children
    assert logged.data.params["parent_run_id"] == store.parent_id
    downloaded = Path(mlflow.artifacts.download_artifacts(run_id=done.logged_to_run_id, artifact_path="comparison",
                                                          dst_path=str(tmp_path / "download")))
    assert {p.name for p in downloaded.iterdir()} == expected
    for name in expected:
        assert (downloaded / name).read_bytes() == (out / name).read_bytes()
    # the comparison run lives in the experiment but is not a training run
    assert len(compare.load_comparison("normlab").runs) == len(TRAINED)


def test_run_comparison_logs_into_a_given_run(tmp_path, store):
    client = MlflowClient()
    picked = [store.run("ln", 2).run_id, store.run("gn", 1).run_id]
    experiment = client.get_experiment_by_name("normlab").experiment_id
    before = len(client.search_runs([experiment]))
    done = compare.run_comparison(tmp_path, run_ids=picked, log_to_run_id=store.parent_id)
    assert done.logged_to_run_id == store.parent_id
    assert len(client.search_runs([experiment])) == before  # no new run
    tags = client.get_run(store.parent_id).data.tags
    assert tags["compared_run_ids"] == ",".join(picked)
    assert {a.path for a in client.list_artifacts(store.parent_id, "comparison")} >= {
        "comparison/results.md", "comparison/misclassified_ln.png", "comparison/misclassified_gn-2-groups.png"}


def test_galleries_are_the_runs_logged_mistake_images(tmp_path, store, comparison):
    client = MlflowClient()
    galleries = comparison.galleries(tmp_path / "downloads")
    assert list(galleries) == ["misclassified_bn-l1-1e-05.png", "misclassified_ln.png", "misclassified_gn-2-groups.png"]
    finals = comparison.runs_metrics.set_index("run_id")["final_test_acc"]
    for (name, figure), variant in zip(galleries.items(), LABELS.values()):
        runs = [r for r in store.runs if r.variant == variant]
        shown = min(runs, key=lambda r: (finals[r.run_id], r.seed))  # the lower median of one or two
        title = figure._suptitle.get_text()
        assert title.startswith(f"{variant}: 10 most confident test mistakes")
        assert f"seed {shown.seed}, run {shown.run_id[:8]}" in title
        artifact = client.download_artifacts(shown.run_id, "misclassified.png", str(tmp_path / shown.run_id))
        np.testing.assert_array_equal(figure.axes[0].images[0].get_array(), plt.imread(artifact))
        mistakes = json.loads(Path(client.download_artifacts(shown.run_id, "misclassified.json",
                                                             str(tmp_path / shown.run_id))).read_text())
        confidences = [m["confidence"] for m in mistakes]
        assert f"{max(confidences):.2f}–{min(confidences):.2f}" in figure.texts[-1].get_text()
    plt.close("all")


# --- command line, MLproject entry point, notebook ---------------------------------------


def test_compare_command(tmp_path, store):
    out = tmp_path / "out"
    done = CliRunner().invoke(main, ["compare", "--parent", store.parent_id, "--out", str(out)])
    assert done.exit_code == 0, done.output[-3000:]
    assert "compared 4 runs, 2 variants" in done.output
    assert "| BN + L1 (1e-05) | 7,750 | 2 (1 2) |" in done.output
    assert (out / "test_accuracy.png").stat().st_size > 10_000
    assert "warning:" not in done.output

    missing = CliRunner().invoke(main, ["compare", "--experiment", "nope", "--out", str(tmp_path / "none")])
    assert missing.exit_code == 1
    assert "Error: no experiment named 'nope'" in missing.output and "normlab" in missing.output
    assert not (tmp_path / "none").exists()


def test_mlproject_compare_entry_point(tmp_path, store):
    import subprocess

    out = tmp_path / "out"
    env = cli_env(PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", "compare", "--env-manager", "local",
         "--experiment-name", "comparisons", "-P", f"run_ids={store.run('ln', 1).run_id},{store.run('gn', 1).run_id}",
         "-P", f"out={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "results.md").exists()
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("comparisons").experiment_id])
    assert run.data.tags["compared_run_ids"] == f"{store.run('ln', 1).run_id},{store.run('gn', 1).run_id}"
    assert "comparison/results.csv" in {a.path for a in client.list_artifacts(run.info.run_id, "comparison")}


def test_notebook_is_committed_without_outputs():
    import nbformat

    notebook = nbformat.read(ROOT / "analysis.ipynb", as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_top_to_bottom_against_the_store(store, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("NORMLAB_EXPERIMENT", "normlab")
    notebook = nbformat.read(ROOT / "analysis.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(store.root)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4 + 3  # curves and final accuracy, then one gallery per variant
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "Compared 5 runs, 3 variants" in text and store.uri in text
    assert "| GN (2 groups) | 7,750 | 1 (1) |" in text
    assert "Differences:" in text
