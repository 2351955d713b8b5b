"""BN's test accuracy with the running statistics (how every run is evaluated) against the
batch's own statistics, for each BN run of the batch-size study.

A BN model trained at batch 2 has normalized every training image by the mean and variance
of two images; at test time it uses running averages of those noisy statistics instead.
If the model is fine and only the averages are off, evaluating with batch statistics (test
batches of the training batch size) recovers the accuracy; if both are bad, the model itself
learned poorly. Reads each run's last checkpoint (artifact checkpoint/last.pt) from MLflow.

    MLFLOW_TRACKING_URI=sqlite:///STORE/mlflow.db \\
        python docs/results/bn_eval_statistics.py --experiment batch-size --data-dir DATA --out OUT.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from normlab.engine.checkpoint import load  # noqa: E402
from normlab.engine.data import DeviceData, batch_slices, load_raw  # noqa: E402
from normlab.engine.models import Net  # noqa: E402
from normlab.engine.train import evaluate  # noqa: E402
from normlab.tracking.connection import use_command_defaults  # noqa: E402


def accuracy_with_batch_statistics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Test accuracy with BN normalizing each test batch by its own statistics (train mode for
    BN only; dropout stays off). Running statistics change meanwhile, and are not used."""
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.train()
    correct = 0
    with torch.no_grad():
        for s in batch_slices(len(y), batch_size):
            correct += (model(x[s]).argmax(1) == y[s]).sum().item()
    return 100.0 * correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="batch-size")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    use_command_defaults()  # no progress bar per downloaded checkpoint, as in normlab's commands
    data = DeviceData(load_raw("mnist", args.data_dir, download=False), "cpu")
    runs = mlflow.search_runs(experiment_names=[args.experiment],
                              filter_string="params.norm = 'bn' and attributes.status = 'FINISHED'")
    rows = []
    for run in runs.itertuples():
        state = load(Path(mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="checkpoint/last.pt")))
        config = state["config"]
        model = Net(config["dataset"], "bn", config["groups"], config["dropout"])
        model.load_state_dict(state["model"])
        with torch.no_grad():
            running = evaluate(model, data.test_x, data.test_y).accuracy
        batch = accuracy_with_batch_statistics(model, data.test_x, data.test_y, config["batch_size"])
        rows.append({"run_id": run.run_id, "l1": config["l1"], "batch_size": config["batch_size"],
                     "seed": config["seed"], "epoch": state["epoch"], "test_acc_running_statistics": running,
                     "test_acc_batch_statistics": batch})
    frame = pd.DataFrame(rows).sort_values(["l1", "batch_size", "seed"])
    frame.to_csv(args.out, index=False)
    summary = frame.groupby(["l1", "batch_size"])[["test_acc_running_statistics", "test_acc_batch_statistics"]]
    print(summary.agg(["mean", "std"]).round(2).to_string())


if __name__ == "__main__":
    main()
