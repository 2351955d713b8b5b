"""Datasets through torchvision's real parsing, device tensors and batched augmentation."""

import contextlib
import gzip
import hashlib
import os
import pickle
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from torchvision.datasets import CIFAR10, MNIST

from normlab.cli import main
from normlab.engine.data import DeviceData, batch_slices, load_raw, parsed_cache_path, random_crop_flip, random_rotation
from normlab.engine.registry import DATASETS
from normlab.errors import DataError
from tests.cifar_fixture import accept_in_process, write_cifar10_digits
from tests.conftest import no_runs_logged
from tests.mlflow_server import free_port
from tests.mnist_fixture import FILES, REPO_MNIST, mnist_t10k, official_md5s, write_idx, write_mnist


def test_the_tests_digits_are_the_official_files_shipped_in_the_repository():
    """The fixtures read the repository's own copy, which matches torchvision's md5 sums."""
    assert mnist_t10k() == REPO_MNIST
    assert {name: hashlib.md5((REPO_MNIST / name).read_bytes()).hexdigest() for name in FILES} == official_md5s()
    assert official_md5s() == {"t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                               "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}


def test_mnist_folder_parses_through_torchvision_into_the_real_digits(mnist_dir):
    raw = load_raw("mnist", mnist_dir, download=False)
    assert raw.train_images.shape == (8000, 1, 28, 28) and raw.train_images.dtype == torch.uint8
    assert raw.test_images.shape == (2000, 1, 28, 28)
    official_labels = gzip.decompress((mnist_t10k() / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:]
    assert raw.train_labels[:10].tolist() == list(official_labels[:10])  # 7 2 1 0 4 1 4 9 5 9
    assert raw.test_labels.tolist() == list(official_labels[-2000:])
    assert sorted(raw.train_labels.unique().tolist()) == list(range(10))
    assert len(raw.digest()) == 16 and raw.digest() == load_raw("mnist", mnist_dir).digest()


def test_device_data_normalizes_the_test_split_with_the_dataset_statistics(small_mnist_dir):
    data = DeviceData(load_raw("mnist", small_mnist_dir), "cpu")
    expected = (data.raw.test_images.float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(data.test_x, expected)
    assert 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0


def test_rotation_keeps_shape_and_range_and_differs_per_sample(small_mnist_dir):
    data = DeviceData(load_raw("mnist", small_mnist_dir), "cpu")
    x = data.train_x[:1].repeat(64, 1, 1, 1)  # one digit, 64 times
    out = random_rotation(x, 7.0, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    distinct = {tuple(o.flatten()[::7].tolist()) for o in out}
    assert len(distinct) == 64  # every sample got its own angle
    # small angles: the digit stays recognisably the same image
    assert (out - x).abs().mean() < 0.1
    zero_angle = random_rotation(x, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(zero_angle, x, atol=1e-5, rtol=0)


def test_training_epoch_is_a_seeded_shuffle_of_the_whole_split(small_mnist_dir):
    data = DeviceData(load_raw("mnist", small_mnist_dir), "cpu")
    x1, y1 = data.training_epoch(torch.Generator().manual_seed(3))
    x2, y2 = data.training_epoch(torch.Generator().manual_seed(3))
    torch.testing.assert_close(x1, x2)
    assert torch.equal(y1, y2)
    assert sorted(y1.tolist()) == sorted(data.train_y.tolist()) and not torch.equal(y1, data.train_y)
    x3, _ = data.training_epoch(torch.Generator().manual_seed(4))
    assert not torch.equal(x1, x3)


def test_crop_flip_copies_whole_pixels():
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = random_crop_flip(img.repeat(50, 1, 1, 1), 2, torch.Generator().manual_seed(0))
    # every output pixel is either padding (0) or a pixel copied exactly from the input
    values = set(img.flatten().tolist()) | {0.0}
    assert set(out.flatten().tolist()) <= values
    # shifts of up to 2 pixels: at least a 4x4 centre survives from the image
    assert (out[:, :, 2:6, 2:6] > 0).all()
    # with no padding every output is the image itself or its mirror image, and both occur
    same = img[:1].repeat(40, 1, 1, 1)
    out = random_crop_flip(same, 0, torch.Generator().manual_seed(1))
    flipped = [bool(torch.equal(o, img[0].flip(-1))) for o in out]
    unflipped = [bool(torch.equal(o, img[0])) for o in out]
    assert all(f != u for f, u in zip(flipped, unflipped))
    assert 5 < sum(flipped) < 35


def test_batches_cover_the_split_with_a_short_last_batch():
    slices = list(batch_slices(1000, 128))
    assert len(slices) == 8 and slices[-1] == slice(896, 1000)


def test_missing_data_without_download_names_folder_files_and_fix(tmp_path):
    with pytest.raises(DataError) as err:
        load_raw("mnist", tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "--data-dir" in message


def test_offline_train_says_what_failed_which_urls_it_tried_and_where_the_files_go(tmp_path, tracking_uri,
                                                                                    monkeypatch):
    """The main command without data and without internet (CI has none: torchvision's real
    download fails); a machine that reaches the mirror is pointed at a closed local port instead."""
    try:
        socket.getaddrinfo("ossci-datasets.s3.amazonaws.com", 443)
        monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{free_port()}/mnist/"])
    except OSError:
        pass  # offline, as CI is: the real mirrors are tried and fail
    data = tmp_path / "fresh"
    result = CliRunner().invoke(main, ["train", "--device", "cpu", "--data-dir", str(data)])
    assert result.exit_code == 1
    message = result.output
    folder = data / "MNIST" / "raw"
    servers = "servers" if len(MNIST.mirrors) > 1 else "server"
    assert (f"mnist data is not in {folder} and could not be downloaded: no connection to the download {servers} "
            f"(is this machine offline?).\n") in message
    for mirror in MNIST.mirrors:
        assert f"  tried {mirror}train-images-idx3-ubyte.gz: <urlopen error " in message
    assert f"Expected files in {folder}: train-images-idx3-ubyte, train-labels-idx1-ubyte, " in message
    assert "point --data-dir at a folder that already holds MNIST/raw/" in message
    assert ":)" not in message and "()" not in message
    assert no_runs_logged(tracking_uri)
    assert not data.exists()  # torchvision made data/MNIST/raw for the download; left empty, it is taken back


def test_failed_download_takes_back_only_the_empty_folders_it_made(tmp_path, monkeypatch):
    """The user's own --data-dir stays, and so does a folder holding a file (a part downloaded)."""
    monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{free_port()}/mnist/"])
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(DataError):
        load_raw("mnist", mine)
    assert mine.is_dir() and list(mine.iterdir()) == []
    part = tmp_path / "part" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"half")
    with pytest.raises(DataError):
        load_raw("mnist", tmp_path / "part")
    assert part.read_bytes() == b"half"
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{free_port()}/cifar-10-python.tar.gz")
    with pytest.raises(DataError):
        load_raw("cifar10", tmp_path / "cifar")
    assert not (tmp_path / "cifar").exists()


@contextlib.contextmanager
def serving(folder: Path):
    """A real HTTP server on 127.0.0.1 for the files under folder: its base URL, and the paths
    asked for, in a list that grows (torchvision opens each URL twice: once to follow
    redirects)."""
    import http.server

    asked: list[str] = []

    class Mirror(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, format, *args):
            asked.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def trained_runs() -> list:
    client = MlflowClient()
    return sorted(client.search_runs([client.get_experiment_by_name("normlab").experiment_id]),
                  key=lambda run: run.info.run_name)


def test_with_internet_the_main_command_downloads_mnist_through_torchvision_once(tmp_path, tracking_uri,
                                                                                 monkeypatch):
    """`normlab train` as typed in a folder without data, on a machine that reaches a mirror:
    torchvision's own download (md5 check, gunzip) fetches the four files into ./data, the
    run trains on them, and the next command finds them there and asks for nothing. The
    mirror serves the official test files (torchvision's own md5s) and, as the training
    files, the first 1,000 of those digits (their md5s put in torchvision's list: the
    official training files are not shipped)."""
    mirror = tmp_path / "mirror" / "mnist"
    mirror.mkdir(parents=True)
    made = write_mnist(tmp_path / "made", train=1000, test=10) / "MNIST" / "raw"
    md5s = dict(MNIST.resources)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (mirror / f"{name}.gz").write_bytes(gzip.compress((made / name).read_bytes()))
        md5s[f"{name}.gz"] = hashlib.md5((mirror / f"{name}.gz").read_bytes()).hexdigest()
    for name in FILES:
        (mirror / name).write_bytes((mnist_t10k() / name).read_bytes())
    monkeypatch.setattr(MNIST, "resources", list(md5s.items()))
    with serving(tmp_path / "mirror") as (url, asked):
        monkeypatch.setattr(MNIST, "mirrors", [f"{url}/mnist/"])
        first = CliRunner().invoke(main, ["train", "--epochs", "1"])
        assert first.exit_code == 0, first.output[-3000:]
        assert set(asked) == {f"/mnist/{name}" for name in md5s}, asked
        asked.clear()
        again = CliRunner().invoke(main, ["train", "--epochs", "1", "--seed", "2"])
        assert again.exit_code == 0 and asked == [], (asked, again.output[-3000:])
    downloaded = load_raw("mnist", tmp_path / "data", download=False)
    assert downloaded.train_labels.tolist() == list((made / "train-labels-idx1-ubyte").read_bytes()[8:])
    assert downloaded.test_labels.tolist() == list(gzip.decompress((mirror / FILES[1]).read_bytes())[8:])
    runs = trained_runs()
    assert [r.info.run_name for r in runs] == ["bn-s1", "bn-s2"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert (run.data.params["train_size"], run.data.params["test_size"]) == ("1000", "10000")
        assert run.data.tags["normlab.data_dir"] == str(tmp_path / "data")


def test_with_internet_cifar10_is_downloaded_and_unpacked_through_torchvision(tmp_path, tracking_uri,
                                                                              monkeypatch):
    """`normlab train --dataset cifar10` without data: torchvision fetches the archive (its md5
    checked), unpacks it into ./data and checks every batch, and the run trains on it. The
    archive is tests/cifar_fixture.py's painted digits in CIFAR-10's format."""
    import tarfile

    import torchvision

    md5s = write_cifar10_digits(tmp_path / "made", train=500, test=100)
    (tmp_path / "mirror").mkdir()
    archive = tmp_path / "mirror" / torchvision.datasets.CIFAR10.filename
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "made" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    accept_in_process(md5s, monkeypatch)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    with serving(tmp_path / "mirror") as (url, asked):
        monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", f"{url}/{archive.name}")
        done = CliRunner().invoke(main, ["train", "--dataset", "cifar10", "--epochs", "1"])
        assert done.exit_code == 0, done.output[-3000:]
        assert set(asked) == {f"/{archive.name}"}, asked
    for name in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        assert ((tmp_path / "data" / "cifar-10-batches-py" / name).read_bytes()
                == (tmp_path / "made" / "cifar-10-batches-py" / name).read_bytes())
    [run] = trained_runs()
    assert (run.info.status, run.data.params["dataset"]) == ("FINISHED", "cifar10")
    assert (run.data.params["train_size"], run.data.params["test_size"]) == ("500", "100")


def _relabel(raw_folder, split, labels):
    """Replace a split's label file by a well-formed IDX file holding these labels."""
    write_idx(raw_folder / f"{split}-labels-idx1-ubyte", (len(labels),), bytes(labels))


def _labels(raw_folder, split):
    return list((raw_folder / f"{split}-labels-idx1-ubyte").read_bytes()[8:])


@pytest.mark.parametrize("split, edit, expected", [
    ("train", lambda labels: labels[:190], "mnist train split in {folder} (train-images-idx3-ubyte, "
     "train-labels-idx1-ubyte): 200 images but 190 labels; every image needs exactly one label"),
    ("t10k", lambda labels: labels + [3] * 5, "mnist test split in {folder} (t10k-images-idx3-ubyte, "
     "t10k-labels-idx1-ubyte): 100 images but 105 labels"),
    ("train", lambda labels: labels[:5] + [12] + labels[6:], "{folder}/train-labels-idx1-ubyte holds label 12 "
     "(image 5 of the train split; 1 of 200 labels out of range): valid labels are 0-9, the 10 classes of mnist"),
    ("t10k", lambda labels: [255] * 3 + labels[3:], "{folder}/t10k-labels-idx1-ubyte holds label 255 "
     "(image 0 of the test split; 3 of 100 labels out of range): valid labels are 0-9"),
])
def test_labels_that_do_not_match_the_images_are_refused_naming_the_file(split, edit, expected, tmp_path):
    root = write_mnist(tmp_path, train=200, test=100)
    folder = root / "MNIST" / "raw"
    _relabel(folder, split, edit(_labels(folder, split)))
    with pytest.raises(DataError) as err:
        load_raw("mnist", root)
    assert expected.format(folder=folder) in str(err.value)
    assert "delete" in str(err.value)


def test_a_bad_label_stops_train_before_any_run_is_created(tmp_path, tracking_uri):
    """Today's failure was an IndexError mid-training, in a run already created."""
    root = write_mnist(tmp_path / "data", train=200, test=100)
    folder = root / "MNIST" / "raw"
    _relabel(folder, "train", [12] + _labels(folder, "train")[1:])
    result = CliRunner().invoke(main, ["train", "--device", "cpu", "--epochs", "1", "--data-dir", str(root)])
    assert result.exit_code == 1
    assert f"{folder / 'train-labels-idx1-ubyte'} holds label 12 (image 0 of the train split" in result.output
    assert no_runs_logged(tracking_uri)


def test_a_later_load_takes_torchvisions_parse_from_the_cache_until_a_file_changes(tmp_path):
    """The second process does not import torchvision (1-2 s) and gets the same tensors; a
    changed file, or an unreadable cache, is parsed through torchvision again."""
    root = write_mnist(tmp_path, train=200, test=100)
    first = load_raw("mnist", root)
    cache = parsed_cache_path(root, DATASETS["mnist"])
    assert cache.is_file() and not list(cache.parent.glob("*.partial"))
    probe = ("import sys; from normlab.engine.data import load_raw; raw = load_raw('mnist', sys.argv[1]); "
             "print('torchvision' in sys.modules, raw.digest(), raw.train_labels[:3].tolist())")

    def load_in_a_new_process() -> str:
        return subprocess.run([sys.executable, "-c", probe, str(root)], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip()

    assert load_in_a_new_process() == f"False {first.digest()} {first.train_labels[:3].tolist()}"

    folder = root / "MNIST" / "raw"
    labels = _labels(folder, "train")
    _relabel(folder, "train", [(labels[0] + 1) % 10] + labels[1:])  # same size, new content
    written = (folder / "train-labels-idx1-ubyte").stat().st_mtime_ns
    os.utime(folder / "train-labels-idx1-ubyte", ns=(written, written + 10**9))  # later, on any file system
    changed = load_raw("mnist", root)
    assert changed.train_labels[0] == (labels[0] + 1) % 10 and changed.digest() != first.digest()
    assert load_in_a_new_process() == f"False {changed.digest()} {changed.train_labels[:3].tolist()}"

    cache.write_bytes(cache.read_bytes()[:1000])  # a cache cut short is parsed anew and rewritten
    assert load_in_a_new_process() == f"True {changed.digest()} {changed.train_labels[:3].tolist()}"
    assert load_in_a_new_process().startswith("False")


def test_a_data_folder_where_the_parse_cannot_be_kept_still_loads(tmp_path):
    """Say a read-only folder, or here a file in the cache's place: every load parses anew."""
    root = write_mnist(tmp_path, train=200, test=100)
    blocker = root / ".normlab-cache"
    blocker.write_text("not a folder")
    first, second = load_raw("mnist", root), load_raw("mnist", root)
    assert first.digest() == second.digest() and first.train_labels.tolist() == second.train_labels.tolist()
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in root.iterdir()) == [".normlab-cache", "MNIST"]


def test_truncated_idx_file_is_named(tmp_path):
    root = write_mnist(tmp_path, train=200, test=100)
    target = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte has .* truncated"):
        load_raw("mnist", root)


def _write_cifar(root, monkeypatch, n_train=50, n_test=20, first_test_label=None):
    """Real digits in CIFAR-10's own pickle format; torchvision's md5 lists pointed at these files."""
    accept_in_process(write_cifar10_digits(root, n_train, n_test, first_test_label), monkeypatch)
    return root / "cifar-10-batches-py"


def test_cifar10_parses_through_torchvision_and_its_md5_checks(tmp_path, monkeypatch):
    folder = _write_cifar(tmp_path, monkeypatch)
    raw = load_raw("cifar10", tmp_path, download=False)
    assert raw.train_images.shape == (50, 3, 32, 32) and raw.test_images.shape == (20, 3, 32, 32)
    first = pickle.loads((folder / "data_batch_1").read_bytes())
    assert torch.equal(raw.train_images[0], torch.as_tensor(first["data"][0]).view(3, 32, 32))
    data = DeviceData(raw, "cpu")
    x, y = data.training_epoch(torch.Generator().manual_seed(0))
    assert x.shape == (50, 3, 32, 32)
    # a corrupted batch fails torchvision's md5 check, and the file's folder is named
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_raw("cifar10", tmp_path, download=False)


def test_cifar10_label_out_of_range_is_refused_naming_the_batch(tmp_path, monkeypatch):
    folder = _write_cifar(tmp_path, monkeypatch, first_test_label=10)
    with pytest.raises(DataError, match=(f"{folder}/test_batch holds label 10 \\(image 0 of the test split; "
                                         f"1 of 20 labels out of range\\): valid labels are 0-9, the 10 classes")):
        load_raw("cifar10", tmp_path, download=False)
