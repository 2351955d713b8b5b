"""Bad input: a clear error (parameter, bad value, what is valid) before any training, a
non-zero exit, and no run left RUNNING or called FINISHED."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from normlab.cli import main
from normlab.tracking import run_query
from tests.conftest import ROOT, cli_env, no_runs_logged, run_cli, run_cli_noting_imports
from tests.mlflow_server import free_port


def train(*args: str, data_dir: Path):
    return CliRunner().invoke(main, ["train", "--device", "cpu", "--data-dir", str(data_dir), *args])


BAD_OPTIONS = [
    (["--norm", "xn"], ["'--norm'", "'xn'", "'bn', 'ln', 'gn', 'in', 'none'"]),
    (["--dataset", "imagenet"], ["'--dataset'", "'imagenet'", "'mnist', 'cifar10'"]),
    (["--device", "tpu"], ["--device", "'tpu'", "auto, cpu, cuda"]),
    (["--norm", "gn", "--groups", "3"], ["--groups 3", "[10, 20]", "valid choices: 1, 2, 5, 10"]),
    (["--epochs", "0"], ["--epochs must be positive, got 0"]),
    (["--batch-size", "-1"], ["--batch-size must be positive, got -1"]),
    (["--lr", "0"], ["--lr must be positive and finite, got 0.0", "the default is --lr 0.05"]),
    (["--lr", "inf"], ["--lr must be positive and finite, got inf", "the default is --lr 0.05"]),
    (["--lr", "nan"], ["--lr must be positive and finite, got nan"]),
    (["--l1", "-0.1"], ["--l1 must be zero or positive and finite, got -0.1"]),
    (["--l1", "nan"], ["--l1 must be zero or positive and finite, got nan", "uses --l1 1e-5"]),
    (["--l1", "inf"], ["--l1 must be zero or positive and finite, got inf", "0 means no L1"]),
    (["--seed", str(2**64)], [f"--seed must be in 0..{2**64 - 1}", f"got {2**64}"]),
    (["--seed", "-1"], [f"--seed must be in 0..{2**64 - 1}", "got -1"]),
    (["--epochs", "abc"], ["'--epochs'", "'abc'", "not a valid integer"]),
    (["--batch-size", "5000"], ["--batch-size 5000", "training split (1000 images)", "at most 1000"]),
]


@pytest.mark.parametrize("args, expected", BAD_OPTIONS, ids=[" ".join(args) for args, _ in BAD_OPTIONS])
def test_bad_option_is_refused_before_training(args, expected, small_mnist_dir, tracking_uri):
    result = train(*args, data_dir=small_mnist_dir)
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.output
    assert "epoch   1/" not in result.output
    assert no_runs_logged(tracking_uri)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_refused(small_mnist_dir, tracking_uri):
    result = train("--device", "cuda", data_dir=small_mnist_dir)
    assert result.exit_code == 2
    assert "--device cuda was requested but no CUDA GPU is available here; use --device cpu or auto" in result.output


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process may not create files in (root ignores modes, so then /proc/1)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return folder if not os.access(folder, os.W_OK) else Path("/proc/1")


def copy_of(data_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(data_dir, tmp_path / "data"))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[2] = 0x0D  # a float IDX file, which MNIST is not
    path.write_bytes(bytes(data))


def test_unwritable_data_folder_is_refused(tmp_path, tracking_uri):
    folder = unwritable_dir(tmp_path) / "data"
    result = train(data_dir=folder)
    assert result.exit_code == 1
    assert f"data folder {folder} is not writable" in result.output and "--data-dir" in result.output
    assert no_runs_logged(tracking_uri)


def test_missing_data_without_internet_says_how_to_provide_it(tmp_path, tracking_uri):
    result = train(data_dir=tmp_path / "empty")
    assert result.exit_code == 1
    assert "could not be downloaded" in result.output
    assert "Expected files in" in result.output and "train-images-idx3-ubyte" in result.output
    assert "point --data-dir at a folder that already holds MNIST/raw/" in result.output
    assert no_runs_logged(tracking_uri)


@pytest.mark.parametrize("damage, file, expected", [
    (truncate, "train-images-idx3-ubyte", "the file is truncated or corrupt"),
    (corrupt_magic, "t10k-labels-idx1-ubyte", "is not an IDX file (bad magic number)"),
])
def test_damaged_mnist_file_is_named(damage, file, expected, small_mnist_dir, tmp_path, tracking_uri):
    data = copy_of(small_mnist_dir, tmp_path)
    damage(data / "MNIST" / "raw" / file)
    result = train(data_dir=data)
    assert result.exit_code == 1
    assert f"{data / 'MNIST' / 'raw' / file} " in result.output and expected in result.output
    assert no_runs_logged(tracking_uri)


def test_corrupt_cifar10_file_is_named_by_its_md5(tmp_path, tracking_uri):
    """torchvision checks CIFAR-10's md5 sums; the error names the files that fail them."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not a pickle")
    result = train("--dataset", "cifar10", data_dir=tmp_path)
    assert result.exit_code == 1
    assert "md5 differs from the official one: data_batch_1, data_batch_2" in result.output
    assert "test_batch" in result.output and "download again" in result.output


def test_unreachable_tracking_server_fails_in_seconds_before_loading_data(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    data = tmp_path / "never-created"  # loading data would create it (and try to download)
    start = time.monotonic()
    try:
        result = train(data_dir=data)
    finally:
        mlflow.set_tracking_uri(None)
    assert time.monotonic() - start < 10
    assert result.exit_code == 1
    assert f"the MLflow tracking server {uri} cannot be reached (ConnectionError)" in result.output
    assert not data.exists()


@pytest.mark.parametrize("command", [("train", "--epochs", "1", "--data-dir"), ("sweep", "--epochs", "1", "--data-dir"),
                                     ("compare", "--out")])
def test_a_tracking_uri_no_store_serves_is_named_before_any_data_loads(command, tmp_path):
    """A typo in MLFLOW_TRACKING_URI's scheme, as typed: named, with MLflow's valid schemes,
    before the data loads (MLflow's own traceback came where the run started, after it)."""
    folder = tmp_path / "never-created"  # the data (or compare's --out): loading or writing would create it
    proc = run_cli(*command, str(folder), cwd=tmp_path, MLFLOW_TRACKING_URI="sqllite:///mlflow.db")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("Error: the tracking URI 'sqllite:///mlflow.db' (MLFLOW_TRACKING_URI) names no kind of store MLflow "
            "knows; valid schemes: ") in proc.stderr
    assert "sqlite://, " in proc.stderr and "http://, https://, " in proc.stderr and "Traceback" not in proc.stderr
    assert not folder.exists() and not list(tmp_path.glob("*.db"))


def test_bad_input_fails_the_run_mlflow_run_created(small_mnist_dir, tracking_uri):
    """`mlflow run` creates the run and passes MLFLOW_RUN_ID; a command refused by normlab's
    checks fails it (click's own parse errors: the `mlflow run` test below), importing MLflow
    for that but not torch."""
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("launched")).info.run_id
    proc = run_cli_noting_imports("train", "--data-dir", str(small_mnist_dir), "--norm", "gn", "--groups", "3",
                                  MLFLOW_RUN_ID=run_id)
    assert proc.returncode == 2, proc.stderr
    assert "imported: ['mlflow']" in proc.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["normlab.status"] == "failed"
    assert "--groups 3 does not divide" in run.data.tags["normlab.reason"]


def test_mlflow_run_with_a_non_numeric_parameter_ends_failed_with_the_reason(tracking_uri, tmp_path):
    """The real `mlflow run . -P epochs=abc` (MLproject types integers as float, so click checks)."""
    import subprocess

    bin_dir = str(Path(sys.executable).parent)
    env = cli_env(PATH=bin_dir + os.pathsep + os.environ["PATH"])
    proc = subprocess.run([str(Path(bin_dir) / "mlflow"), "run", str(ROOT), "--env-manager", "local",
                           "--experiment-name", "bad-input", "-P", "epochs=abc", "-P", f"data_dir={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Invalid value for '--epochs': 'abc' is not a valid integer" in proc.stderr
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("bad-input").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "'abc' is not a valid integer" in runs[0].data.tags["normlab.reason"]


@pytest.mark.parametrize("args, expected", [
    (["--l1", "nan"], "--l1 must be zero or positive and finite, got nan"),
    (["--lr", "inf"], "--lr must be positive and finite, got inf; the default is --lr 0.05"),
    (["--seed", str(2**64)], f"--seed must be in 0..{2**64 - 1} (torch seeds are unsigned 64-bit), got {2**64}"),
])
def test_non_finite_rates_and_huge_seeds_are_refused_as_typed(args, expected, small_mnist_dir, tracking_uri):
    """As a user types them: `--l1 nan` trained a FINISHED "BN" run without L1, `--lr inf`
    diverged and advised `--lr inf`, a seed beyond 64 bits was a traceback."""
    proc = run_cli("train", "--data-dir", str(small_mnist_dir), *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert "epoch " not in proc.stdout
    assert no_runs_logged(tracking_uri)


def test_unwritable_checkpoint_dir_is_refused_before_data_loads(tmp_path, tracking_uri):
    folder = unwritable_dir(tmp_path) / "checkpoints"
    data = tmp_path / "never-created"  # loading data would create it (and try to download)
    result = train("--checkpoint-dir", str(folder), data_dir=data)
    assert result.exit_code == 2, result.output
    assert f"--checkpoint-dir {folder} is not writable" in result.output
    assert "choose another --checkpoint-dir" in result.output
    assert not data.exists()
    assert no_runs_logged(tracking_uri)


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_data_dir_that_is_a_file_is_refused_before_anything_starts(command, tmp_path, fresh_tracking_uri):
    """A file as --data-dir, or on its path, was reported through torchvision's failed download
    ("Not a directory") after torch's import, 4-5 s in; as typed it is now refused at once, with
    nothing imported, no store and no run."""
    archive = tmp_path / "mnist.zip"
    archive.write_bytes(b"PK")
    for given in (archive, archive / "digits"):
        proc = run_cli_noting_imports(command, "--data-dir", str(given))
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert (f"Error: --data-dir {given}: {archive} is a file, not a folder; give the folder that holds the "
                f"datasets") in proc.stderr
        assert "imported: []" in proc.stdout
    assert not Path(fresh_tracking_uri.removeprefix("sqlite:///")).exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, small_mnist_dir) -> tuple[str, str, Path]:
    """(tracking URI, run id, folder) of one real 1-epoch run in a sqlite store of its own.
    Its --l1 1e-4 names the run bn-l1_0.0001-s1, and MLflow refuses '.' in a model's name:
    such runs failed after their last epoch until the model got a name of its own."""
    root = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    proc = run_cli("train", "--l1", "1e-4", "--epochs", "1", "--data-dir", str(small_mnist_dir),
                   cwd=root, MLFLOW_TRACKING_URI=uri, PYTHONPATH=f"{ROOT}{os.pathsep}{_lightning_installed(root)}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return uri, next(l for l in proc.stdout.splitlines() if l.startswith("MLflow run ")).split()[2], root


def _lightning_installed(root: Path) -> Path:
    """A folder in which `pytorch_lightning` is importable, as where it is installed beside
    torch: a stand-in that notes each import in root/lightning-imported, then fails as an
    unusable install would (MLflow passes over an ImportError there)."""
    package = root / "site" / "pytorch_lightning"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"import os\nopen({str(root / 'lightning-imported')!r}, 'a').write(str(os.getpid()) + '\\n')\n"
        "raise ImportError('the stand-in for an installed pytorch_lightning')\n")
    return package.parent


def test_a_run_does_not_import_pytorch_lightning_where_it_is_installed(trained_run):
    """mlflow.pytorch imports pytorch_lightning, where installed, for an autologging callback
    normlab never uses: with the real one (and transformers, which it pulls in), `normlab
    train` took 1.3-2.0 s longer on the 2-core CPU. No process of the run imports it."""
    _, _, root = trained_run
    assert (root / "site" / "pytorch_lightning").is_dir()
    assert not (root / "lightning-imported").exists(), (root / "lightning-imported").read_text()


@pytest.fixture
def in_store(trained_run, monkeypatch):
    uri, run_id, root = trained_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield run_id, root
    mlflow.set_tracking_uri(None)


CRAFTED_MISTAKES = [
    ([1, 2], "entry 0 (1) is not {index, true, pred: integers, confidence: a number in [0, 1]}"),
    ({"index": 3}, "holds a dict, not a list of mistakes"),
    ([{"index": 0, "true": 1, "pred": 2, "confidence": "high"}], "entry 0 ("),
    ("not json", "is not JSON"),
]


def test_crafted_misclassified_json_is_skipped_with_a_warning(in_store, tmp_path):
    """Anyone who can write to a store can replace a run's misclassified.json; `normlab compare`
    crashed with a TypeError on a list of numbers. Now it leaves that gallery out and says so."""
    import json

    run_id, root = in_store
    crafted = tmp_path / "crafted" / "misclassified.json"
    crafted.parent.mkdir()
    for i, (content, problem) in enumerate(CRAFTED_MISTAKES):
        crafted.write_text(content if isinstance(content, str) else json.dumps(content))
        MlflowClient().log_artifact(run_id, str(crafted))  # replaces the run's own
        with pytest.warns(UserWarning, match=re.escape(f"run {run_id}: its misclassified.json {problem}")):
            assert run_query.download_misclassified(run_id, tmp_path / "download" / str(i)) is None

    crafted.write_text(json.dumps([1, 2]))
    MlflowClient().log_artifact(run_id, str(crafted))
    out = tmp_path / "results"
    proc = run_cli("compare", "--out", str(out), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "TypeError" not in proc.stderr
    assert f"run {run_id} (BN + L1 (0.0001))" in proc.stderr and "no gallery" in proc.stderr
    assert (out / "results.md").is_file() and not list(out.glob("misclassified_*.png"))


def test_logged_model_carries_no_code_and_loads_without_normlab(in_store, tmp_path):
    """MLflow puts a model's code/ artifact first on the loader's sys.path, so a tampered copy
    would run as `normlab` on a later import: the model is a torch.export program instead,
    which loads and predicts in a process where normlab cannot even be imported."""
    import subprocess

    run_id, root = in_store
    model_uri = MlflowClient().get_run(run_id).data.tags["model_uri"]
    assert mlflow.get_logged_model(model_uri.split("/")[-1]).name == "bn-l1_0_0001-s1"
    files = {Path(p).parts[0] for p in _artifact_files(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path)))}
    assert "code" not in files and "model.pt2" in {Path(p).name for p in _artifact_files(tmp_path)}
    load = ("import sys; sys.modules['normlab'] = None\n"  # any import of normlab now fails
            "import mlflow, torch\n"
            f"model = mlflow.pytorch.load_model({model_uri!r})\n"
            "print(tuple(model(torch.zeros(3, 1, 28, 28)).shape), [p for p in sys.path if 'code' in p])")
    env = {k: v for k, v in cli_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", load], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "(3, 10) []"


def _artifact_files(folder) -> list[str]:
    return [str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()]


def test_bad_speed_setting_is_refused_before_normlab_train_starts_anything(monkeypatch, small_mnist_dir,
                                                                         tracking_uri):
    monkeypatch.setenv("NORMLAB_KERNEL_HELPERS", "many")
    result = CliRunner().invoke(main, ["train", "--data-dir", str(small_mnist_dir), "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert "NORMLAB_KERNEL_HELPERS='many'; valid: a whole number from 0 (none) to 64" in result.output
    assert no_runs_logged(tracking_uri)


@pytest.mark.parametrize("name, value, expected", [
    ("NORMLAB_RUNS_PER_GPU", "0", "NORMLAB_RUNS_PER_GPU='0'; valid: a whole number from 1 to 32"),
    ("NORMLAB_RUNS_PER_GPU", "three", "NORMLAB_RUNS_PER_GPU='three'; valid: a whole number from 1 to 32"),
    ("NORMLAB_COMPILE", "sometimes", "NORMLAB_COMPILE='sometimes'; valid choices: auto, always, never"),
    ("NORMLAB_KERNEL_HELPERS", "-1", "NORMLAB_KERNEL_HELPERS='-1'; valid: a whole number from 0 (none) to 64"),
])
def test_bad_speed_setting_is_refused_before_a_sweep_makes_any_run(name, value, expected, monkeypatch,
                                                                    small_mnist_dir, tracking_uri):
    """A sweep checks the speed switches once, up front, on any machine: not in every child
    on a GPU (where they are read), after its parent run exists."""
    monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, ["sweep", "--data-dir", str(small_mnist_dir), "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert no_runs_logged(tracking_uri)
