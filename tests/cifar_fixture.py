"""CIFAR-10's on-disk format holding real images, for the tests of the 3-channel path.

CIFAR-10 itself cannot be downloaded where the tests run, and random pixels show only that
files parse. So `write_cifar10_digits` writes torchvision's `cifar-10-batches-py` (pickled
batches of 3x32x32 uint8 images, `batches.meta`) from the official MNIST digits
(tests/mnist_fixture.py), each padded to 32x32 and painted in a colour of its own on a
background of its own, with its label as the class. They go through torchvision's real
integrity check and parsing, and a model that learns them shows that normlab's CIFAR-10 path
(per-channel normalization, crop-and-flip augmentation, the wider model) learns real images.

torchvision checks CIFAR-10's files against the official md5 sums, so its lists are pointed
at these files' sums: in this process through `accept_in_process`, in a subprocess (a
command as typed) through `subprocess_env` (tests/cifar_md5s/sitecustomize.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np

from normlab.engine.registry import DATASETS
from tests.mnist_fixture import _read_idx, mnist_t10k

ROOT = Path(__file__).resolve().parents[1]
SITECUSTOMIZE = Path(__file__).resolve().parent / "cifar_md5s"


def _coloured_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 official test digits as (n, 3, 32, 32) uint8 colour images, and labels."""
    source = mnist_t10k()
    (dims, images), (_, labels) = (_read_idx(source / "t10k-images-idx3-ubyte.gz"),
                                   _read_idx(source / "t10k-labels-idx1-ubyte.gz"))
    n, h, w = dims
    ink = np.zeros((n, 32, 32), np.float32)
    ink[:, 2:2 + h, 2:2 + w] = np.frombuffer(images, np.uint8).reshape(n, h, w) / 255
    rng = np.random.default_rng(0)
    foreground = np.array([255, 200, 120])[None, :, None, None] - rng.integers(0, 60, (n, 3, 1, 1))
    background = rng.integers(0, 60, (n, 3, 1, 1))
    pixels = (background + (foreground - background) * ink[:, None]).round().astype(np.uint8)
    return pixels, np.frombuffer(labels, np.uint8).astype(np.int64)


def write_cifar10_digits(root: Path, train: int = 2000, test: int = 500,
                         first_test_label: int | None = None) -> dict[str, object]:
    """root/cifar-10-batches-py: train = the first `train` digits over the five data
    batches, test = the last `test`; returns the files' md5 sums as torchvision lists them."""
    pixels, labels = _coloured_digits()
    assert train % 5 == 0 and train + test <= len(labels)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def write(name: str, lo: int, hi: int) -> list[str]:
        batch = {"data": pixels[lo:hi].reshape(hi - lo, -1), "labels": labels[lo:hi].tolist()}
        if name == "test_batch" and first_test_label is not None:
            batch["labels"][0] = first_test_label
        (folder / name).write_bytes(pickle.dumps(batch))
        return [name, hashlib.md5((folder / name).read_bytes()).hexdigest()]

    per_batch = train // 5
    train_list = [write(f"data_batch_{i + 1}", i * per_batch, (i + 1) * per_batch) for i in range(5)]
    test_list = [write("test_batch", len(labels) - test, len(labels))]
    meta = folder / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": list(DATASETS["cifar10"].classes)}))
    return {"train": train_list, "test": test_list, "meta": hashlib.md5(meta.read_bytes()).hexdigest()}


def accept_in_process(md5s: dict[str, object], monkeypatch) -> None:
    """torchvision's CIFAR10 in this process checks the written files against their own sums."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "train_list", md5s["train"])
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "test_list", md5s["test"])
    monkeypatch.setitem(torchvision.datasets.CIFAR10.meta, "md5", md5s["meta"])


def subprocess_env(md5s: dict[str, object]) -> dict[str, str]:
    """Environment entries under which a normlab process (and the workers it starts) accepts
    the written files: this checkout and the md5-pointing sitecustomize on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(ROOT), str(SITECUSTOMIZE), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "TESTS_CIFAR10_MD5S": json.dumps(md5s)}
