"""The speed wing: every technique the engine uses only to be fast, each a switch of
`Speedups`, with its measured effect in docs/speed.md. The plain engine (engine/models.py,
engine/step.py, engine/train.py) reads without any of it: with every switch off, a step is
the plain forward, loss, gradients and SGD update, one batch at a time."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from normlab.engine.config import TrainConfig, architecture_key
from normlab.errors import ConfigError

if TYPE_CHECKING:  # the package imports no torch: engine_process decides before torch is imported
    import torch


# Each switch with its measured effect (docs/speed.md has the runs; BN epochs of 60,000
# images on one H200 unless said). With every switch off the engine is the plain one.
@dataclass(frozen=True)
class Speedups:
    """Which speed techniques are on; ``default`` picks what measured faster on each device.
    Always on, and no switch: the data lives on the device as tensors with one batched
    augmentation per epoch (2.7x the notebook's DataLoader epoch), on the CPU the model's
    dropout draws a quarter of torch's random numbers (cpu_dropout.py: 1.38x per CPU step),
    Dynamo is imported only where something compiles (deferred_dynamo.py: `normlab train` 1.05x),
    and on a GPU Triton's build is hashed once on a thread, from an engine process's start
    (triton_build_hash.py), the GPU's context is made beside torch's import
    (engine_process._make_cuda_context) and the first epoch's augmentation is warmed beside the
    prepare (TrainerPool._warm_up_first_epoch): the prepare 0.44-0.80 s instead of 0.78-1.16 s,
    epoch 1 0.19 s instead of 0.40 s, `normlab train` 1.00-1.07x on four H200s."""

    # CUDA graphs of chunk_steps steps: 1.07 s -> 0.28 s an epoch against none (not compiled).
    # 8 steps rather than 64 capture 13 steps instead of 85 before the first epoch (0.65 -> 0.17 s
    # a run, the same epoch: benchmarks/chunk_steps.py) but launch 59 replays an epoch, not 8.
    # Each torch call lets go of the interpreter's lock, and taking it back from a thread that
    # runs Python (a caller's uploads, another run's setup) waits up to the switch interval,
    # 5 ms by default. Together, 8 steps and 0.5 ms took the classic sweep on an H200 from 27.4
    # to 24.7 s and `normlab train` from 16.0 to 14.6 s; 8 steps at 5 ms gained nothing (0.97x),
    # 0.5 ms at 64 steps 1.02-1.05x (benchmarks/e2e.py --baseline, docs/speed.md).
    cuda_graphs: bool = False
    chunk_steps: int = 1
    switch_interval: float | None = None  # seconds; None leaves the process's as it is
    # glibc keeps freed activations for the next step (host_memory.py): 1.25x per CPU step
    keep_freed_memory: bool = False
    # torch.compile of the step's forward, loss and update: 0.20 s -> 0.15 s an epoch (BN, against
    # the Triton norms), but 15-22 s per variant on cold caches, 0.5-2.6 s on warm ones, where a
    # process loads the compiled functions an earlier one kept (precompiled.py): see
    # COMPILE_PAYS_FROM_EPOCHS
    compile: bool = False
    # the convolutions as Triton kernels (triton_conv.py) instead of cuDNN: 0.36 s -> 0.26 s an
    # epoch with graphs; 12.8 s once on a cold Triton cache
    triton_convs: bool = False
    # the norms (BN, GN, LN, IN) as Triton kernels (triton_norms.py) instead of torch's, which
    # give a channel's reduction to one thread block or a few: an epoch with graphs, BN 0.280 ->
    # 0.200 s, LN 0.257 -> 0.187 s, GN 0.254 -> 0.189 s; end to end, `normlab train --norm ln`
    # 1.10x, `mlflow run` 1.06x, the classic sweep 1.04x. Not when compiled: Inductor's own norm
    # kernels, fused with their neighbours, are faster (BN epochs 0.148 s; these kernels traced
    # into a compiled step 0.200 s: h200-2026-12-01b-concurrency-bn.txt). With them each block's
    # ReLU and its dropout's backward run inside the norms' kernels (triton_norms.ConvBlock): 18
    # kernels fewer a step, LN epochs 0.184 -> 0.173 s (profiled on two machines), 20 epochs in
    # 3.54-3.58 s instead of 3.81-3.88 s (stamped, alternately); end to end not shown: `normlab
    # train` 0.89x in one A/B of three pairs, 1.02x and 1.10x in two stamped pairs, its end
    # there mostly bound by the results process (docs/speed.md, twenty-first session)
    triton_norms: bool = False
    # test images per forward pass: 2,000 instead of 1,000 took evaluation from 2.0 to 1.2 ms
    eval_batch_size: int = 500
    # weights and activations in channels-last memory order on the CPU: oneDNN's convolutions
    # run faster so, but some norms' CPU kernels run slower; on where it paid (CHANNELS_LAST_ON_CPU).
    # The study on the 2-core CPU, one 60,000-image epoch a run: LN and GN train 1.19-1.21x
    # faster, the classic sweep 1.11x and `normlab train --norm ln` 1.13x end to end
    channels_last: bool = False

    @classmethod
    def default(cls, device: torch.device, epochs_ahead: int = 0, config: TrainConfig | None = None) -> "Speedups":
        """On a GPU: CUDA graphs of 8 steps each and a 0.5 ms switch interval, the Triton
        convolutions, evaluation in batches of 2000, and the step compiled when ``epochs_ahead``
        (the epochs of this variant and batch size in the command: a sweep's grid) reach
        COMPILE_PAYS_FROM_EPOCHS, else the Triton norms. On the CPU:
        malloc keeps freed memory, evaluation in batches of 500 (under glibc's mmap limit), no
        compiling (it made CPU steps slower), and channels last for ``config``'s model where
        CHANNELS_LAST_ON_CPU has it."""
        cuda = device.type == "cuda"
        compiled = {"always": True, "never": False}.get(compile_choice(), epochs_ahead >= COMPILE_PAYS_FROM_EPOCHS)
        return cls(cuda_graphs=cuda, chunk_steps=8 if cuda else 1, switch_interval=0.0005 if cuda else None,
                   keep_freed_memory=not cuda,
                   compile=cuda and compiled,
                   triton_convs=cuda, triton_norms=cuda and not compiled, eval_batch_size=2000 if cuda else 500,
                   channels_last=not cuda and config is not None and channels_last_pays_on_cpu(config))

    def described(self) -> str:
        """The switches not at the plain engine's values, as name=value: a run's tag, since
        some change the order its sums add in (a compiled step rounds otherwise than an
        uncompiled one), and so the run's numbers past the first digits."""
        plain = Speedups()
        changed = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                   if getattr(self, f.name) != getattr(plain, f.name)]
        return ", ".join(changed) or "none (the plain engine)"


# Channels last against channels first, per CPU training step (batch 128, 2 cores,
# benchmarks/cpu_channels_last.py, two runs: cpu-2core-2026-12-01-channels-last.txt): oneDNN's
# convolutions gain everywhere, but BatchNorm's CPU kernels lose it all on MNIST's 10 and 20
# channels (1.00x; 0.79-1.04x in earlier runs by hand) and IN's lose more than that (0.65-0.78x);
# GN with 2 groups on CIFAR-10 went either way (0.96-1.07x). On for the models that gained in
# both runs: (dataset, norm, groups for gn) -> the step's speed-up measured.
CHANNELS_LAST_ON_CPU = {
    ("mnist", "ln", None): "1.23x", ("mnist", "gn", 2): "1.18-1.25x", ("mnist", "none", None): "1.31-1.38x",
    ("cifar10", "bn", None): "1.16-1.22x", ("cifar10", "ln", None): "1.06-1.10x",
    ("cifar10", "none", None): "1.11x",
}


def channels_last_pays_on_cpu(config: TrainConfig) -> bool:
    dataset, norm, groups, _dropout = architecture_key(config)
    return (dataset, norm, groups) in CHANNELS_LAST_ON_CPU


# Compiling the step costs 22-29 s per variant on a machine whose compile caches are empty,
# 1.7-2.9 s once they hold it (benchmarks/results/h200-2026-11-29-compile-rule.txt); loading the
# functions an earlier process kept (precompiled.py), 0.5-0.7 s, and 2.6 s for the process's first
# (h200-2026-12-01g-first-compile-precompiled.txt). Against
# the uncompiled step with the Triton norms it saves 0.05 s of a 60,000-image epoch on an H200
# (0.15 instead of 0.20 s, BN), and 0.018 s a run-epoch with six runs at once (0.076 instead of
# 0.094 s): the 10-seed study, warm, took 65.4 s instead of 71.4 s (1.09x,
# h200-2026-12-01b-e2e-10seeds-compiled-vs-not.txt). At 200 epochs of one variant and batch
# size (ten 20-epoch runs, a 10-seed study's share) that pays on warm caches, not on empty
# ones: a first study on a fresh machine (142 s there) pays for the later ones
# (NORMLAB_COMPILE=never skips it). Shorter studies never compile.
COMPILE_PAYS_FROM_EPOCHS = 200
COMPILE_CHOICES = ("auto", "always", "never")  # NORMLAB_COMPILE overrides the rule on a GPU


# On a fresh machine, a GPU engine's first runs' Triton kernels compiled side by side in this many
# helper processes (kernel_warmup.py; at most the cores but one; 0: none): the classic sweep on
# empty caches took 25.4 and 26.2 s against 40.4 and 43.8 s, alternately, 1.63x
# (h200-2026-12-01g-e2e-sweep1-cold-kernels-side-by-side.txt).
KERNEL_HELPERS = 8


def kernel_helpers() -> int:
    """NORMLAB_KERNEL_HELPERS, checked: how many helper processes compile a fresh machine's kernels."""
    value = os.environ.get("NORMLAB_KERNEL_HELPERS")
    if value is None:
        return max(1, min(KERNEL_HELPERS, (os.cpu_count() or 2) - 1))
    if not value.isdigit() or int(value) > 64:
        raise ConfigError(f"NORMLAB_KERNEL_HELPERS={value!r}; valid: a whole number from 0 (none) to 64")
    return int(value)


def compile_choice() -> str:
    """NORMLAB_COMPILE, checked: auto (the rule above), always or never."""
    choice = os.environ.get("NORMLAB_COMPILE", "auto")
    if choice not in COMPILE_CHOICES:
        raise ConfigError(f"NORMLAB_COMPILE={choice!r}; valid choices: {', '.join(COMPILE_CHOICES)}")
    return choice
