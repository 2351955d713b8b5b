"""`--dataset cifar10` as typed: the classic sweep on real colour images in CIFAR-10's format
learns, and logs and draws them as CIFAR-10 (tests/cifar_fixture.py says what the images are)."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import matplotlib.image
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from tests.cifar_fixture import subprocess_env, write_cifar10_digits
from tests.conftest import run_cli

MACHINES = ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("machine", MACHINES)
def test_the_classic_sweep_on_cifar10_learns_colour_images_and_draws_them(machine, tmp_path, migrated_store):
    """`normlab sweep --dataset cifar10 --epochs 4 --batch-sizes 32` on 2,000 training images
    (500 held out): BN + L1, LN and GN each go from 39-51% after one epoch to 74-88% after four
    (measured on the CPU; chance is 10%). Each run is logged as CIFAR-10 (the wider model's
    3x32x32 input), its mistakes are real test images with their labels, and the galleries
    show them in colour. On a GPU the same command trains
    through the Triton kernels at CIFAR-10's shapes."""
    data = tmp_path / "data"
    md5s = write_cifar10_digits(data)
    shutil.copy(migrated_store, tmp_path / "mlflow.db")  # the store the command would create, migrated
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**subprocess_env(md5s), "MLFLOW_TRACKING_URI": uri, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    if machine == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0")
    done = run_cli("sweep", "--dataset", "cifar10", "--data-dir", str(data), "--epochs", "4", "--batch-sizes", "32",
                   "--out", "results", cwd=tmp_path, **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sweep: 3 of 3 children finished" in done.stdout

    client = MlflowClient(uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "normlab"]
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_name for r in children) == ["bn-l1_1e-05-b32-s1", "gn2-b32-s1", "ln-b32-s1"]
    test_labels = pickle.loads((data / "cifar-10-batches-py" / "test_batch").read_bytes())["labels"]
    for run in children:
        name = run.info.run_name
        assert run.data.params["dataset"] == "cifar10" and run.data.params["batch_size"] == "32"
        assert run.data.tags["normlab.device"].startswith("cuda" if machine == "gpu" else "cpu"), name
        accuracy = [m.value for m in client.get_metric_history(run.info.run_id, "test_acc")]
        assert len(accuracy) == 4 and accuracy[-1] >= 60.0 and accuracy[-1] > accuracy[0] + 8, (name, accuracy)
        summary = (tmp_path / client.download_artifacts(run.info.run_id, "model_summary.txt", str(tmp_path))
                   ).read_text()
        assert "16x30x30" in summary.splitlines()[1], summary  # conv1 of the CIFAR-10 model: 3x32x32 in
        mistakes = json.loads((tmp_path / client.download_artifacts(run.info.run_id, "misclassified.json",
                                                                     str(tmp_path))).read_text())
        assert len(mistakes) == 10
        assert all(m["true"] == test_labels[m["index"]] != m["pred"] for m in mistakes), (name, mistakes)

    findings = (tmp_path / "results" / "results.md").read_text()
    assert all(variant in findings for variant in ("BN + L1 (1e-05)", "LN", "GN (2 groups)")), findings
    for gallery in ("misclassified_bn-l1-1e-05.png", "misclassified_ln.png", "misclassified_gn-2-groups.png"):
        pixels = matplotlib.image.imread(tmp_path / "results" / gallery)[..., :3]
        red_minus_blue = pixels[..., 0] - pixels[..., 2]
        assert red_minus_blue.max() > 0.3 and np.mean(red_minus_blue > 0.1) > 0.01, gallery  # coloured digits
