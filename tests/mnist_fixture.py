"""A torchvision-layout MNIST folder made from the real test digits in ../shared."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"


def _read_idx(path: Path) -> tuple[tuple[int, ...], bytes]:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return dims, raw[4 + 4 * ndim :]


def _write_idx(path: Path, dims: tuple[int, ...], body: bytes) -> None:
    header = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    path.write_bytes(header + body)


def write_mnist(root: Path, train: int = 8000, test: int = 2000, tile: int = 1) -> Path:
    """MNIST/raw/ under root: train = the first `train` real digits (repeated `tile` times),
    test = the last `test`. Returns root."""
    (img_dims, images), (_, labels) = (
        _read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz"),
        _read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz"),
    )
    n, h, w = img_dims
    assert train + test <= n, f"only {n} real digits available"
    pixels = h * w
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    splits = {"train": (0, train, tile), "t10k": (n - test, n, 1)}
    for prefix, (lo, hi, repeat) in splits.items():
        count = (hi - lo) * repeat
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", (count, h, w), images[lo * pixels : hi * pixels] * repeat)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", (count,), labels[lo:hi] * repeat)
    return root
