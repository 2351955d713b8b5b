"""A torchvision-layout MNIST folder made from the official MNIST test files (real digits).

The files ship with the repository in tests/data/mnist-t10k (its README gives source, md5 and
license). A copy of the repository without them falls back to ../shared/data/mnist-t10k, then
to torchvision's own download with its md5 check, and the tests that need digits skip only
when none of these works.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import struct
from pathlib import Path

import pytest

REPO_MNIST = Path(__file__).resolve().parent / "data" / "mnist-t10k"
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"
CACHE_MNIST = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "normlab" / "mnist-t10k"
FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def official_md5s() -> dict[str, str]:
    """The md5 sums torchvision checks for the two files."""
    from torchvision.datasets import MNIST

    return {name: md5 for name, md5 in MNIST.resources if name in FILES}


def _problem(folder: Path, md5s: dict[str, str]) -> str | None:
    """Why folder cannot serve the official files, or None when both are there and match."""
    for name in FILES:
        path = folder / name
        if not path.is_file():
            return f"no {name}"
        if hashlib.md5(path.read_bytes()).hexdigest() != md5s[name]:
            return f"{name} does not match torchvision's md5 {md5s[name]}"
    return None


def _download(md5s: dict[str, str]) -> str | None:
    """Fetch the files into CACHE_MNIST through torchvision (each mirror in turn, md5-checked);
    None when done, else what went wrong."""
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import download_url

    for name in FILES:
        errors = []
        for mirror in MNIST.mirrors:
            try:
                download_url(mirror + name, str(CACHE_MNIST), name, md5s[name])
                break
            except (OSError, RuntimeError) as exc:  # unreachable (URLError is an OSError) or bad md5
                errors.append(f"{mirror}{name}: {' '.join(str(exc).split()) or type(exc).__name__}")
        else:
            return "; ".join(errors)
    return None


@functools.cache
def _locate() -> tuple[Path | None, str]:
    """The first source holding the official files (folder, ''), or (None, what was tried)."""
    md5s = official_md5s()
    tried = []
    for folder in (REPO_MNIST, SHARED_MNIST):
        problem = _problem(folder, md5s)
        if problem is None:
            return folder, ""
        tried.append(f"{folder}: {problem}")
    failure = _download(md5s)
    if failure is None:
        return CACHE_MNIST, ""
    tried.append(f"torchvision's download into {CACHE_MNIST}: {failure}")
    return None, "; ".join(tried)


def mnist_t10k() -> Path:
    """The folder holding the official MNIST test files; skips the calling test when none does."""
    folder, tried = _locate()
    if folder is None:
        pytest.skip(f"the official MNIST test files ({', '.join(FILES)}) are not available: {tried}. "
                    f"They ship with the repository in {REPO_MNIST.relative_to(REPO_MNIST.parents[2])}; "
                    f"restore that folder, or run once with internet access")
    return folder


def _read_idx(path: Path) -> tuple[tuple[int, ...], bytes]:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return dims, raw[4 + 4 * ndim :]


def write_idx(path: Path, dims: tuple[int, ...], body: bytes) -> None:
    """An uncompressed IDX file of unsigned bytes, as torchvision's MNIST folder holds them."""
    header = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    path.write_bytes(header + body)


def write_mnist(root: Path, train: int = 8000, test: int = 2000, tile: int = 1) -> Path:
    """MNIST/raw/ under root: train = the first `train` real digits (repeated `tile` times),
    test = the last `test`. Returns root."""
    source = mnist_t10k()
    (img_dims, images), (_, labels) = (
        _read_idx(source / "t10k-images-idx3-ubyte.gz"),
        _read_idx(source / "t10k-labels-idx1-ubyte.gz"),
    )
    n, h, w = img_dims
    assert train + test <= n, f"only {n} real digits available"
    pixels = h * w
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    splits = {"train": (0, train, tile), "t10k": (n - test, n, 1)}
    for prefix, (lo, hi, repeat) in splits.items():
        count = (hi - lo) * repeat
        write_idx(raw / f"{prefix}-images-idx3-ubyte", (count, h, w), images[lo * pixels : hi * pixels] * repeat)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", (count,), labels[lo:hi] * repeat)
    return root
