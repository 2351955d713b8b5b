"""A run's config and the metrics it logs: torch-free, for the CLI and the comparison."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

from normlab.engine.registry import check_dataset, check_norm, variant_label
from normlab.errors import ConfigError

WARM_UP = 0.2  # the share of a run's steps over which the one-cycle lr rises to --lr


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run's result (not where data lives or runs)."""

    norm: str = "bn"
    groups: int = 2
    l1: float = 0.0
    dataset: str = "mnist"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    dropout: float = 0.05
    seed: int = 1

    def validate(self) -> "TrainConfig":
        """Raise ConfigError for anything that cannot train; checks needing no data.

        NaN passes every comparison, so floats are checked to be finite first: ``--l1 nan``
        would otherwise train without L1 under an "L1" label, and an infinite --lr or --l1
        only fails epochs later as a diverged loss."""
        check_dataset(self.dataset)
        check_norm(self.norm, self.groups, self.dataset)
        for name in ("epochs", "batch_size"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be positive and finite, got {self.lr}; the default is "
                              f"--lr {TrainConfig.lr}")
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise ConfigError(f"--l1 must be zero or positive and finite, got {self.l1}; 0 means no L1, "
                              f"and the study's BN + L1 uses --l1 1e-5")
        if not 0 <= self.seed < 2**64:
            raise ConfigError(f"--seed must be in 0..{2**64 - 1} (torch seeds are unsigned 64-bit), got {self.seed}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        return self

    def check_fits(self, train_size: int) -> None:
        if self.batch_size > train_size:
            raise ConfigError(f"--batch-size {self.batch_size} is larger than the training split "
                              f"({train_size} images); choose at most {train_size}")
        steps = self.epochs * self.steps_per_epoch(train_size)
        if steps * WARM_UP == 1:  # torch's OneCycleLR divides by its warm-up's steps after the first: 0
            raise ConfigError(f"--epochs {self.epochs} with --batch-size {self.batch_size} on {train_size} training "
                              f"images is {steps} steps, whose one-cycle warm-up ({WARM_UP:.0%} of them) would be "
                              f"one step, which torch's schedule cannot take; train more epochs or smaller batches")

    def steps_per_epoch(self, train_size: int) -> int:
        """Batches an epoch: the last one short where the batch size does not divide the split."""
        return math.ceil(train_size / self.batch_size)

    @property
    def label(self) -> str:
        return variant_label(self.norm, self.groups, self.l1)

    @property
    def run_name(self) -> str:
        """Short, unique per variant and seed: 'gn2-s1', 'bn-l1_1e-05-s3'."""
        name = self.norm + (str(self.groups) if self.norm == "gn" else "")
        if self.l1 > 0:
            name += f"-l1_{self.l1:g}"
        if self.batch_size != TrainConfig.batch_size:
            name += f"-b{self.batch_size}"
        return f"{name}-s{self.seed}"

    def config_hash(self) -> str:
        """Stable id of the config; groups only counts for gn (elsewhere it changes nothing)."""
        d = asdict(self)
        if self.norm != "gn":
            d["groups"] = None
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def differences(self, other: "TrainConfig") -> list[str]:
        """'field: ours vs theirs' for every field that changes the result (groups only for gn)."""
        ours, theirs = asdict(self), asdict(other)
        return [f"{k}: {ours[k]!r} vs {theirs[k]!r}" for k in ours
                if ours[k] != theirs[k] and not (k == "groups" and "gn" not in (self.norm, other.norm))]


def architecture_key(config: TrainConfig) -> tuple:
    """What the model's layers depend on: dataset, norm, groups (for gn) and dropout."""
    return config.dataset, config.norm, config.groups if config.norm == "gn" else None, config.dropout


def steps_key(config: TrainConfig) -> tuple:
    """What a compiled step and its captured CUDA graphs depend on: the model, the L1 weight
    (a constant in the update) and the batch size; not the seed, learning rate, momentum or
    epochs."""
    return *architecture_key(config), config.l1, config.batch_size


METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")  # what each run logs per epoch
