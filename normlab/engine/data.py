"""Datasets by name: torchvision download and parsing, then whole splits as device tensors.

Training never goes through a DataLoader: each split is one tensor on the training device,
an epoch is one ``randperm`` plus one batched augmentation call (``affine_grid`` +
``grid_sample``) over the whole split, and batches are slices of that.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import platform
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from normlab.engine.registry import DatasetSpec, check_dataset
from normlab.errors import DataError
from normlab.folders import folders_to_make, nearest_existing, remove_if_empty


@dataclass(frozen=True)
class RawSplits:
    """Both splits as uint8 images (N, C, H, W) and int64 labels, on the CPU."""

    spec: DatasetSpec
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def digest(self) -> str:
        """Content hash of all four tensors: the same digest means the same data."""
        h = hashlib.sha256()
        for t in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def _missing_data_message(spec: DatasetSpec, root: Path, reason: str, details: str = "") -> str:
    folder = root / spec.folder
    files = ", ".join(spec.expected_files)
    return (
        f"{spec.name} data is not in {folder} and could not be downloaded: {reason}.\n{details}"
        f"Expected files in {folder}: {files}.\n"
        f"Provide them by running once on a machine with internet (torchvision downloads "
        f"from {spec.source}) and copying the folder, or point --data-dir at a folder "
        f"that already holds {spec.folder}/."
    )


def _download_failure(spec: DatasetSpec, exc: Exception) -> tuple[str, str]:
    """What went wrong, and one line per address torchvision tried with what it got.

    MNIST's error names the file on its first line and lists each mirror under it as
    "Tried MIRROR, got:" and the error; other datasets raise their one URL's error.
    """
    text = str(exc)
    file = re.match(r"Error downloading (\S+?):", text)
    tried = re.findall(r"^Tried (\S+), got:\n(.*)$", text, re.M)
    if file and tried:
        attempts = [(mirror + file.group(1), error.strip()) for mirror, error in tried]
    else:
        attempts = [(spec.source, " ".join(text.split()) or type(exc).__name__)]
    unreachable = all("urlopen error" in error for _, error in attempts)
    servers = "servers" if len(attempts) > 1 else "server"
    reason = f"no connection to the download {servers} (is this machine offline?)" if unreachable else "the download failed"
    return reason, "".join(f"  tried {url}: {error}\n" for url, error in attempts)


def _check_writable(root: Path) -> None:
    """A download needs a writable folder; say so before torchvision fails obscurely."""
    if not os.access(nearest_existing(root), os.W_OK):
        raise DataError(f"data folder {root} is not writable, so data cannot be downloaded there; "
                        f"choose another --data-dir or make it writable")


IDX_DTYPES = {0x08: 1}  # unsigned byte, the only type MNIST uses


def check_idx_file(path: Path) -> None:
    """Refuse a truncated or mangled IDX file by its header, naming the file.

    torchvision parses whatever bytes are there and fails with a reshape error deep
    inside; the header says exactly how many bytes the file must have.
    """
    with open(path, "rb") as f:
        header = f.read(4)
        if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] not in IDX_DTYPES:
            raise DataError(f"{path} is not an IDX file (bad magic number): the file is corrupt; "
                            f"delete it and download again")
        ndim = header[3]
        dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    expected = 4 + 4 * ndim + math.prod(dims) * IDX_DTYPES[header[2]]
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(f"{path} has {actual} bytes but its header {list(dims)} needs {expected}: "
                        f"the file is truncated or corrupt; delete it and download again")


def _files_failing_md5(cls, folder: Path) -> list[str]:
    """Of the files torchvision knows md5 sums for (CIFAR-10's lists), those that do not match."""
    from torchvision.datasets.utils import check_integrity

    known = getattr(cls, "train_list", []) + getattr(cls, "test_list", [])
    return [name for name, md5 in known if not check_integrity(str(folder / name), md5)]


# The splits as torchvision parsed them, kept beside the data so that later runs need not
# import torchvision: --data-dir/.normlab-cache/<dataset>.pt, valid while every file it was
# parsed from keeps its size and modification time. Bump the version when what is kept changes.
# Measured (benchmarks/data_cache.py, `normlab train` as a process): 11.27 s against 12.09 s on
# the 2-core CPU; no gain on an H200, where the Dynamo that torchvision imports is imported
# anyway by torch's SGD and the Triton convolutions (docs/speed.md).
PARSED_CACHE_VERSION = 1


def parsed_cache_path(root: Path, spec: DatasetSpec) -> Path:
    return root / ".normlab-cache" / f"{spec.name}.pt"


def _file_stamps(folder: Path, spec: DatasetSpec) -> dict[str, list[int]]:
    """Size and modification time (ns) of each file the splits are parsed from."""
    stamps = {}
    for name in spec.expected_files:
        stat = (folder / name).stat()
        stamps[name] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def _load_parsed(path: Path, stamps: dict[str, list[int]], spec: DatasetSpec) -> RawSplits | None:
    """The kept splits if they were parsed from these very files; None otherwise (and for a
    missing, partial or older-format file, which is then parsed anew)."""
    try:
        kept = torch.load(path, weights_only=True)
        if kept["version"] != PARSED_CACHE_VERSION or kept["files"] != stamps:
            return None
        return RawSplits(spec, *(kept[k] for k in ("train_images", "train_labels", "test_images", "test_labels")))
    except Exception:  # noqa: BLE001 -- any unreadable cache is only a reason to parse again
        return None


def _keep_parsed(path: Path, stamps: dict[str, list[int]], splits: RawSplits) -> None:
    """Write the cache atomically (workers may load at once); a read-only folder keeps none."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(exist_ok=True)
        torch.save({"version": PARSED_CACHE_VERSION, "files": stamps, "train_images": splits.train_images,
                    "train_labels": splits.train_labels, "test_images": splits.test_images,
                    "test_labels": splits.test_labels}, partial)
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):  # nothing written, or nowhere it could be
            partial.unlink()


def load_raw(name: str, data_dir: str | os.PathLike, download: bool = True) -> RawSplits:
    """Both splits through torchvision's dataset classes (download, md5 checks, parsing),
    or as torchvision parsed them before from the same files (``PARSED_CACHE_VERSION``)."""
    spec = check_dataset(name)
    root = Path(data_dir)
    folder = root / spec.folder
    present = folder.is_dir() and all((folder / f).exists() for f in spec.expected_files)
    if present:
        kept = _load_parsed(parsed_cache_path(root, spec), _file_stamps(folder, spec), spec)
        if kept is not None:
            check_labels(kept, folder)
            return kept
    splits = _parse_with_torchvision(spec, root, folder, present, download)
    check_labels(splits, folder)
    _keep_parsed(parsed_cache_path(root, spec), _file_stamps(folder, spec), splits)
    return splits


def _parse_with_torchvision(spec: DatasetSpec, root: Path, folder: Path, present: bool, download: bool) -> RawSplits:
    import torchvision  # deferred: importing it costs 1-2 s, and a kept parse or `--help` needs none of it

    name = spec.name
    if not present:
        if not download:
            raise DataError(_missing_data_message(spec, root, "downloading is disabled"))
        _check_writable(root)
    elif name == "mnist":
        for f in spec.expected_files:
            check_idx_file(folder / f)

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    made = folders_to_make(folder)  # taken back where a failed download leaves them empty
    try:
        train = cls(str(root), train=True, download=download and not present)
        test = cls(str(root), train=False, download=False)
    except (RuntimeError, OSError) as exc:  # torchvision raises both for failed downloads/md5
        remove_if_empty(made)
        if present:
            bad = ", ".join(_files_failing_md5(cls, folder)) or "none by md5"
            raise DataError(f"{spec.name} files in {folder} failed torchvision's checks ({exc}); files whose "
                            f"md5 differs from the official one: {bad}. Delete them and download again") from exc
        raise DataError(_missing_data_message(spec, root, *_download_failure(spec, exc))) from exc

    def images(ds) -> torch.Tensor:
        data = torch.as_tensor(ds.data)
        return data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2).contiguous()

    def labels(ds) -> torch.Tensor:
        return torch.as_tensor(ds.targets, dtype=torch.int64)

    return RawSplits(spec, images(train), labels(train), images(test), labels(test))


def check_labels(splits: RawSplits, folder: Path) -> None:
    """One label per image, each a valid class, before any run is created.

    torchvision parses images and labels without comparing them: fewer labels than images
    would train silently on fewer images, and a label beyond the classes fails mid-training.
    """
    spec = splits.spec
    classes = len(spec.classes)
    for split, files, images, labels in [("train", spec.train_files, splits.train_images, splits.train_labels),
                                         ("test", spec.test_files, splits.test_images, splits.test_labels)]:
        if len(images) != len(labels):
            raise DataError(f"{spec.name} {split} split in {folder} ({', '.join(files)}): {len(images)} images but "
                            f"{len(labels)} labels; every image needs exactly one label. The files are damaged or "
                            f"come from different sets; delete them and download again")
        bad = (labels < 0) | (labels >= classes)
        if bad.any():
            first = int(bad.nonzero()[0, 0])
            label_files = [f for f in files if "labels" in f] or files  # MNIST keeps labels in their own file
            where = folder / label_files[0] if len(label_files) == 1 else f"{folder} ({', '.join(label_files)})"
            raise DataError(f"{where} holds label {int(labels[first])} (image {first} of the {split} split; "
                            f"{int(bad.sum())} of {len(labels)} labels out of range): valid labels are 0-{classes - 1}, "
                            f"the {classes} classes of {spec.name}. The file is damaged; delete it and download again")


def random_rotation(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by its own angle in [-degrees, degrees], zero (black) fill."""
    n = x.shape[0]
    angle = (torch.rand(n, device=x.device, generator=generator) * 2 - 1) * math.radians(degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).view(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop from the zero-padded image plus a random horizontal flip.

    A crop at offset (dx, dy) of the padded image is the image shifted by whole pixels,
    so both become one affine transform, sampled with ``nearest`` (exact pixel copies).
    """
    n, _, h, w = x.shape
    shift = torch.randint(-padding, padding + 1, (n, 2), device=x.device, generator=generator)
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    sign = 1.0 - 2.0 * flip.to(x.dtype)
    zero, one = torch.zeros_like(sign), torch.ones_like(sign)
    tx, ty = shift[:, 0].to(x.dtype) * 2 / w, shift[:, 1].to(x.dtype) * 2 / h
    theta = torch.stack([sign, zero, tx, zero, one, ty], dim=1).view(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "mnist": lambda x, g: random_rotation(x, 7.0, g),
    "cifar10": lambda x, g: random_crop_flip(x, 4, g),
}


class DeviceData:
    """Both splits resident on the training device, as float tensors.

    Training images stay in [0, 1] so augmentation fills with true black; they are
    normalized after augmentation. Test images are normalized once.
    """

    def __init__(self, raw: RawSplits, device: torch.device | str):
        self.raw = raw
        self.spec = raw.spec
        self.device = torch.device(device)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(raw.spec.mean, device=self.device).view(shape)
        self.std = torch.tensor(raw.spec.std, device=self.device).view(shape)
        self.train_x = raw.train_images.to(self.device).float().div_(255)
        self.train_y = raw.train_labels.to(self.device)
        self.test_x = self.normalize(raw.test_images.to(self.device).float().div_(255))
        self.test_y = raw.test_labels.to(self.device)
        self._augment = AUGMENTATIONS[raw.spec.name]

    @property
    def train_size(self) -> int:
        return self.train_y.shape[0]

    @property
    def test_size(self) -> int:
        return self.test_y.shape[0]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @functools.cached_property
    def digest(self) -> str:
        """The splits' content hash (RawSplits.digest), computed once."""
        return self.raw.digest()

    @functools.cached_property
    def device_name(self) -> str:
        """The GPU's name (NVIDIA H200), else the processor's, as a run records it."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return platform.processor() or "cpu"

    def test_images_of(self, indices: list[int]) -> np.ndarray:
        """Those test images as uint8 (N, H, W, C) on the host, as plots draw them."""
        return self.raw.test_images[indices].permute(0, 2, 3, 1).numpy()

    def example_input(self) -> np.ndarray:
        """Two normalized test images on the host: a logged model's input example."""
        return self.test_x[:2].cpu().numpy().astype(np.float32)

    def training_epoch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch's inputs: shuffled, augmented per sample, normalized; on the device."""
        order = torch.randperm(self.train_size, device=self.device, generator=generator)
        x = self._augment(self.train_x[order], generator)
        return self.normalize(x), self.train_y[order]


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering n items; the last may be short (like drop_last=False)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
