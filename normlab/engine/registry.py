"""What a user can name: the normalization registry, the model's channel plan per dataset,
and the datasets. Torch-free, so the CLI's options, `--help` and the comparison load without
torch; a norm's layer is built (and torch imported) only when a model is.

Every norm layer here has learnable per-channel scale and shift (gamma, beta), so all
variants of a model have the same parameter count except ``none``. What differs is the set
of elements that share one mean and variance:

- ``bn``: per channel, over the batch and all pixels (N, H, W). Batch-dependent; keeps
  running statistics for evaluation.
- ``ln``: per sample, over all channels and pixels (C, H, W): ``GroupNorm`` with one
  group. Its statistics equal ``torch.nn.LayerNorm((C, H, W))``; unlike that layer, its
  affine is per channel (C values) rather than per element (C*H*W values).
- ``gn``: per sample, over each group of C/G channels and all pixels.
- ``in``: per sample and per channel, over the pixels (H, W): ``GroupNorm`` with C groups.
- ``none``: identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from normlab.errors import ConfigError

if TYPE_CHECKING:
    import torch


def _norm(name: str, *args: int) -> "torch.nn.Module":
    """torch's BatchNorm2d or GroupNorm, run as Triton kernels on CUDA (engine/fast/triton_norms.py)."""
    from normlab.engine.fast import triton_norms

    return getattr(triton_norms, name)(*args)


def _layer(name: str, *args: int) -> "torch.nn.Module":
    from torch import nn  # only building a model needs torch

    return getattr(nn, name)(*args)


@dataclass(frozen=True)
class Norm:
    """One entry of the registry: how to build the layer and how to name it for readers."""

    label: str
    statistics_over: str
    make: Callable[[int, int], "torch.nn.Module"]  # (channels, groups) -> layer


NORMS: dict[str, Norm] = {
    "bn": Norm("BN", "(N, H, W) per channel", lambda c, g: _norm("BatchNorm2d", c)),
    "ln": Norm("LN", "(C, H, W) per sample", lambda c, g: _norm("GroupNorm", 1, c)),
    "gn": Norm("GN", "(C/G, H, W) per sample and group", lambda c, g: _norm("GroupNorm", g, c)),
    "in": Norm("IN", "(H, W) per sample and channel", lambda c, g: _norm("GroupNorm", c, c)),
    "none": Norm("no norm", "nothing", lambda c, g: _layer("Identity")),
}


@dataclass(frozen=True)
class Architecture:
    """Channel plan of the reference network for one input size.

    ``widths`` are the output channels of: conv1, conv2 (3x3), transition (1x1, then
    max-pool), conv3, conv4, conv5 (3x3), conv6 (padded 3x3). The head is global average
    pooling and a 1x1 conv to the classes.
    """

    in_channels: int
    image_size: int
    widths: tuple[int, int, int, int, int, int, int]
    classes: int = 10

    @property
    def norm_channels(self) -> tuple[int, ...]:
        """Channel counts of the layers that get a norm (every 3x3 conv)."""
        c1, c2, _, c3, c4, c5, c6 = self.widths
        return (c1, c2, c3, c4, c5, c6)


ARCHITECTURES: dict[str, Architecture] = {
    # The reference notebooks' best MNIST model: 7,750 parameters with BN.
    "mnist": Architecture(in_channels=1, image_size=28, widths=(10, 20, 10, 20, 10, 10, 10)),
    # The same family, wider, for 32x32 RGB: ~38.5k parameters with BN.
    "cifar10": Architecture(in_channels=3, image_size=32, widths=(16, 32, 16, 32, 32, 32, 32)),
}


def valid_groups(dataset: str) -> list[int]:
    """Group counts that divide every normalized channel count of the dataset's model."""
    channels = ARCHITECTURES[dataset].norm_channels
    return [g for g in range(1, min(channels) + 1) if all(c % g == 0 for c in channels)]


def check_norm(norm: str, groups: int, dataset: str) -> None:
    """Raise ConfigError naming the valid choices when norm or groups cannot be built."""
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; valid choices: {', '.join(NORMS)}")
    if dataset not in ARCHITECTURES:
        raise ConfigError(f"unknown dataset {dataset!r}; valid choices: {', '.join(ARCHITECTURES)}")
    if norm == "gn" and groups not in valid_groups(dataset):
        channels = sorted(set(ARCHITECTURES[dataset].norm_channels))
        choices = ", ".join(map(str, valid_groups(dataset)))
        raise ConfigError(
            f"--groups {groups} does not divide the {dataset} model's channel counts "
            f"{channels}; valid choices: {choices}"
        )


def variant_label(norm: str, groups: int = 2, l1: float = 0.0) -> str:
    """How a reader names a variant: 'GN (2 groups)', 'LN', 'BN + L1 (1e-05)'."""
    label = NORMS[norm].label
    if norm == "gn":
        label += f" ({groups} group{'s' if groups != 1 else ''})"
    if l1 > 0:
        label += f" + L1 ({l1:g})"
    return label


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str  # under --data-dir, as torchvision lays it out
    train_files: tuple[str, ...]  # the files each split's images and labels come from
    test_files: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    augmentation: str  # human-readable, logged as a param
    source: str  # where torchvision downloads it from
    other_files: tuple[str, ...] = ()

    @property
    def expected_files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files + self.other_files


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        folder="MNIST/raw",
        train_files=("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        test_files=("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        mean=(0.1307,),
        std=(0.3081,),
        classes=tuple(str(d) for d in range(10)),
        augmentation="random rotation +-7 deg",
        source="https://ossci-datasets.s3.amazonaws.com/mnist/",
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        augmentation="random crop (4 px padding) + horizontal flip",
        source="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        other_files=("batches.meta",),
    ),
}


def check_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
    return DATASETS[name]
