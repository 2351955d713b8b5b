"""The norm layers' training steps for narrow layers, as Triton kernels (CUDA).

At this model's 10-20 channels, torch's CUDA kernels for the norms give each reduction to
one thread block or a few, so most of the H200's 132 multiprocessors idle: a training
BatchNorm (cuDNN's kernels on NCHW tensors) took 266 us of the BN model's 554 us step, and
GroupNorm (LN, GN) about 210 of 455 us (6 layers, batch 128, torch.profiler). Here each
pass over the activations is one kernel of many programs; a reduction's partial results are
merged in a fixed order (deterministic, no atomics).

BatchNorm2d, over (channel, slice of the batch) programs, hundreds of them:

- forward: each program takes its slice's mean and squared deviations from it (two passes,
  no cancellation); then each program merges its channel's parts (Chan's formula) and
  writes y = (x - mean) / std * weight + bias for its slice; the channel's first program
  also keeps mean and 1/std for the backward and updates the running statistics exactly as
  nn.BatchNorm2d does (momentum; unbiased variance);
- backward: each program adds up g and g * (x - mean) over its slice; then each program
  merges its channel's sums and writes dx = w / std * (g - mean(g) - xhat * mean(g * xhat));
  the channel's first program writes d weight = sum(g * xhat) and d bias = sum(g).

Evaluation (running statistics) stays torch's.

GroupNorm (LN is one group) has the same four kernels over (channel, sample) programs, a
few thousand: the first of each pass is BatchNorm's with one sample per program; the second
merges the parts of the program's group of channels in that sample instead, and writes
dx = 1/std * (g * w - mean(g * w) - xhat * mean(g * w * xhat)); a channel's first program
also adds up d weight and d bias over the samples.

The model's blocks are conv, ReLU, norm, dropout (ConvBlock). Each kernel takes the ReLU
in as it reads x (RELU), and the backward's kernels read the output's gradient through the
dropout's mask (DROPOUT) and write the ReLU's input gradient: a block's ReLU, its backward
and the dropout's backward are no kernels of their own.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton use torch's norms
    triton = None


def usable(x: torch.Tensor, layer: nn.BatchNorm2d | nn.GroupNorm) -> bool:
    """Whether the kernels can normalize x here: CUDA, Triton, a contiguous NCHW fp32 input
    with int32 offsets, and the layer's common form (affine; GroupNorm with at most 65,535
    samples, CUDA's limit on the programs' second grid dimension; BatchNorm with running
    statistics of a fixed momentum and more than one value per channel)."""
    if not (triton is not None and x.is_cuda and x.dtype == torch.float32 and x.dim() == 4
            and x.is_contiguous() and x.numel() < 2**31 and layer.affine):
        return False
    if isinstance(layer, nn.GroupNorm):
        return x.shape[0] < 2**16
    return layer.track_running_stats and layer.momentum is not None and x.shape[0] * x.shape[2] * x.shape[3] > 1


if triton is not None:

    @triton.jit
    def _slice(p, samples_per_program, N):
        """Program p's samples: [first, last)."""
        return p * samples_per_program, tl.minimum((p + 1) * samples_per_program, N)

    @triton.jit
    def _relu_if(x, RELU: tl.constexpr):
        """The norm's input: x, or ReLU(x) where the block's ReLU runs in the norm's kernels
        (NaN kept, as torch's ReLU keeps it)."""
        if RELU:
            x = tl.where(x < 0.0, 0.0, x)
        return x

    @triton.jit
    def _output_grad(g_ptr, keep_ptr, offsets, inside, scale, DROPOUT: tl.constexpr):
        """The gradient of the norm's output at these offsets: g, or, where the block's dropout
        follows the norm, g where the dropout kept the element, times 1 / (1 - p)."""
        g = tl.load(g_ptr + offsets, mask=inside, other=0.0)
        if DROPOUT:
            g = tl.where(tl.load(keep_ptr + offsets, mask=inside, other=0) != 0, g * scale, 0.0)
        return g

    @triton.jit
    def _run_total(x_ptr, start, length, BLOCK: tl.constexpr, RELU: tl.constexpr):
        """The sum of the input over [start, start + length)."""
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for i0 in range(0, length, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            total += _relu_if(tl.load(x_ptr + start + i, mask=i < length, other=0.0), RELU)
        return tl.sum(total, axis=0)

    @triton.jit
    def _run_squares(x_ptr, start, length, centre, BLOCK: tl.constexpr, RELU: tl.constexpr):
        """The sum of (input - centre)^2 over [start, start + length)."""
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for i0 in range(0, length, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            d = _relu_if(tl.load(x_ptr + start + i, mask=i < length, other=0.0), RELU) - centre
            total += tl.where(i < length, d * d, 0.0)
        return tl.sum(total, axis=0)

    @triton.jit
    def _run_grad_sums(g_ptr, x_ptr, keep_ptr, start, length, centre, scale, BLOCK: tl.constexpr,
                       RELU: tl.constexpr, DROPOUT: tl.constexpr):
        """The sums of the output's gradient g and of g * (input - centre) over [start, start + length)."""
        sum_g = tl.zeros((BLOCK,), dtype=tl.float32)
        sum_gx = tl.zeros((BLOCK,), dtype=tl.float32)
        for i0 in range(0, length, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            g = _output_grad(g_ptr, keep_ptr, start + i, i < length, scale, DROPOUT)
            sum_g += g
            x = _relu_if(tl.load(x_ptr + start + i, mask=i < length, other=0.0), RELU)
            sum_gx += g * (x - centre)  # 0 where masked: g is
        return tl.sum(sum_g, axis=0), tl.sum(sum_gx, axis=0)

    @triton.jit
    def _run_normalize(x_ptr, out_ptr, start, length, centre, scale, shift, BLOCK: tl.constexpr,
                       RELU: tl.constexpr):
        """out = scale * (input - centre) + shift over [start, start + length)."""
        for i0 in range(0, length, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            x = _relu_if(tl.load(x_ptr + start + i, mask=i < length, other=0.0), RELU)
            tl.store(out_ptr + start + i, scale * (x - centre) + shift, mask=i < length)

    @triton.jit
    def _run_input_grad(g_ptr, x_ptr, keep_ptr, out_ptr, start, length, centre, a, b, c, scale, BLOCK: tl.constexpr,
                        RELU: tl.constexpr, DROPOUT: tl.constexpr):
        """out = a * g + b * (input - centre) + c over [start, start + length), g the output's
        gradient; where the ReLU runs in the kernels, 0 where x <= 0 (its gradient)."""
        for i0 in range(0, length, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            g = _output_grad(g_ptr, keep_ptr, start + i, i < length, scale, DROPOUT)
            x = tl.load(x_ptr + start + i, mask=i < length, other=0.0)
            dx = a * g + b * (_relu_if(x, RELU) - centre) + c
            if RELU:
                dx = tl.where(x <= 0.0, 0.0, dx)  # torch's ReLU's gradient, NaN kept
            tl.store(out_ptr + start + i, dx, mask=i < length)

    @triton.jit
    def _moments(x_ptr, part_ptr, N, C, HW, samples_per_program, BLOCK: tl.constexpr, RELU: tl.constexpr):
        """part[p, 0|1, c]: the mean of x over program p's samples and all pixels of channel c,
        and the sum of squared deviations from it (a second pass: no cancellation)."""
        c = tl.program_id(0)
        p = tl.program_id(1)
        first, last = _slice(p, samples_per_program, N)
        total = 0.0
        for n in range(first, last):
            total += _run_total(x_ptr, (n * C + c) * HW, HW, BLOCK, RELU)
        mean = total / ((last - first) * HW).to(tl.float32)
        squares = 0.0
        for n in range(first, last):
            squares += _run_squares(x_ptr, (n * C + c) * HW, HW, mean, BLOCK, RELU)
        tl.store(part_ptr + p * 2 * C + c, mean)
        tl.store(part_ptr + p * 2 * C + C + c, squares)

    @triton.jit
    def _grad_sums(g_ptr, x_ptr, keep_ptr, mean_ptr, part_ptr, N, C, HW, samples_per_program, mean_stride,
                   channels_per_mean, scale, BLOCK: tl.constexpr, RELU: tl.constexpr, DROPOUT: tl.constexpr):
        """part[p, 0|1, c]: the sums over program p's samples and all pixels of channel c of g
        and of g * (x - mean), mean[p * mean_stride + c // channels_per_mean] (BatchNorm's per
        channel, GroupNorm's per sample and group)."""
        c = tl.program_id(0)
        p = tl.program_id(1)
        centre = tl.load(mean_ptr + p * mean_stride + c // channels_per_mean)
        first, last = _slice(p, samples_per_program, N)
        sum_g = 0.0
        sum_gx = 0.0
        for n in range(first, last):
            run_g, run_gx = _run_grad_sums(g_ptr, x_ptr, keep_ptr, (n * C + c) * HW, HW, centre, scale, BLOCK,
                                           RELU, DROPOUT)
            sum_g += run_g
            sum_gx += run_gx
        tl.store(part_ptr + p * 2 * C + c, sum_g)
        tl.store(part_ptr + p * 2 * C + C + c, sum_gx)

    @triton.jit
    def _batch_normalize(x_ptr, w_ptr, b_ptr, part_ptr, y_ptr, mean_ptr, invstd_ptr, running_mean_ptr,
                         running_var_ptr, N, C, HW, samples_per_program, programs, momentum, eps,
                         BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, RELU: tl.constexpr):
        """y for program p's samples of channel c, from its channel's moments merged in order."""
        c = tl.program_id(0)
        p = tl.program_id(1)
        q = tl.arange(0, BLOCK_P)
        counts = ((tl.minimum((q + 1) * samples_per_program, N) - q * samples_per_program) * HW).to(tl.float32)
        counts = tl.where(q < programs, counts, 0.0)
        means = tl.load(part_ptr + q * 2 * C + c, mask=q < programs, other=0.0)
        squares = tl.load(part_ptr + q * 2 * C + C + c, mask=q < programs, other=0.0)
        count = (N * HW).to(tl.float32)
        mean = tl.sum(counts * means, axis=0) / count
        var = tl.sum(squares + counts * (means - mean) * (means - mean), axis=0) / count
        invstd = 1.0 / tl.sqrt(var + eps)
        if p == 0:
            tl.store(mean_ptr + c, mean)
            tl.store(invstd_ptr + c, invstd)
            unbiased = var * count / tl.maximum(count - 1.0, 1.0)
            tl.store(running_mean_ptr + c, (1.0 - momentum) * tl.load(running_mean_ptr + c) + momentum * mean)
            tl.store(running_var_ptr + c, (1.0 - momentum) * tl.load(running_var_ptr + c) + momentum * unbiased)
        scale = tl.load(w_ptr + c) * invstd
        bias = tl.load(b_ptr + c)
        first, last = _slice(p, samples_per_program, N)
        for n in range(first, last):
            _run_normalize(x_ptr, y_ptr, (n * C + c) * HW, HW, mean, scale, bias, BLOCK, RELU)

    @triton.jit
    def _batch_input_grad(g_ptr, x_ptr, keep_ptr, mean_ptr, invstd_ptr, w_ptr, part_ptr, dx_ptr, dw_ptr, db_ptr,
                          N, C, HW, samples_per_program, programs, dropout_scale, BLOCK: tl.constexpr,
                          BLOCK_P: tl.constexpr, RELU: tl.constexpr, DROPOUT: tl.constexpr):
        """dx for program p's samples of channel c, from its channel's sums."""
        c = tl.program_id(0)
        p = tl.program_id(1)
        q = tl.arange(0, BLOCK_P)
        sum_g = tl.sum(tl.load(part_ptr + q * 2 * C + c, mask=q < programs, other=0.0), axis=0)
        sum_gx = tl.sum(tl.load(part_ptr + q * 2 * C + C + c, mask=q < programs, other=0.0), axis=0)
        mean = tl.load(mean_ptr + c)
        invstd = tl.load(invstd_ptr + c)
        count = (N * HW).to(tl.float32)
        scale = tl.load(w_ptr + c) * invstd
        if p == 0:
            tl.store(dw_ptr + c, sum_gx * invstd)
            tl.store(db_ptr + c, sum_g)
        # dx = scale * (g - mean(g) - xhat * mean(g * xhat)), with
        # xhat * mean(g * xhat) = (x - mean) * invstd^2 * sum_gx / count
        a, b, shift = scale, -scale * invstd * invstd * sum_gx / count, -scale * sum_g / count
        first, last = _slice(p, samples_per_program, N)
        for n in range(first, last):
            _run_input_grad(g_ptr, x_ptr, keep_ptr, dx_ptr, (n * C + c) * HW, HW, mean, a, b, shift, dropout_scale,
                            BLOCK, RELU, DROPOUT)

    @triton.jit
    def _group_normalize(x_ptr, w_ptr, b_ptr, part_ptr, y_ptr, mean_ptr, invstd_ptr, C, HW, groups, eps,
                         BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, RELU: tl.constexpr):
        """y for sample n's channel c, from the moments of the channels of its group in that sample."""
        c = tl.program_id(0)
        n = tl.program_id(1)
        per_group = C // groups
        c0 = c // per_group * per_group
        k = tl.arange(0, BLOCK_G)
        means = tl.load(part_ptr + n * 2 * C + c0 + k, mask=k < per_group, other=0.0)
        squares = tl.load(part_ptr + n * 2 * C + C + c0 + k, mask=k < per_group, other=0.0)
        mean = tl.sum(means, axis=0) / per_group  # every channel has HW pixels
        spread = tl.where(k < per_group, (means - mean) * (means - mean), 0.0)
        var = (tl.sum(squares, axis=0) + HW * tl.sum(spread, axis=0)) / (per_group * HW).to(tl.float32)
        invstd = 1.0 / tl.sqrt(var + eps)
        if c == c0:
            tl.store(mean_ptr + n * groups + c // per_group, mean)
            tl.store(invstd_ptr + n * groups + c // per_group, invstd)
        _run_normalize(x_ptr, y_ptr, (n * C + c) * HW, HW, mean, tl.load(w_ptr + c) * invstd, tl.load(b_ptr + c),
                       BLOCK, RELU)

    @triton.jit
    def _group_input_grad(g_ptr, x_ptr, keep_ptr, w_ptr, mean_ptr, invstd_ptr, part_ptr, dx_ptr, dw_ptr, db_ptr,
                          N, C, HW, groups, dropout_scale, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr,
                          BLOCK_N: tl.constexpr, RELU: tl.constexpr, DROPOUT: tl.constexpr):
        """dx for sample n's channel c, from the sums of the channels of its group in that
        sample; channel c's first program also adds up d weight and d bias over the samples."""
        c = tl.program_id(0)
        n = tl.program_id(1)
        per_group = C // groups
        c0 = c // per_group * per_group
        row = n * groups + c // per_group
        mean = tl.load(mean_ptr + row)
        invstd = tl.load(invstd_ptr + row)
        k = tl.arange(0, BLOCK_G)
        w = tl.load(w_ptr + c0 + k, mask=k < per_group, other=0.0)
        sum_gw = tl.sum(w * tl.load(part_ptr + n * 2 * C + c0 + k, mask=k < per_group, other=0.0), axis=0)
        sum_gwx = tl.sum(w * tl.load(part_ptr + n * 2 * C + C + c0 + k, mask=k < per_group, other=0.0), axis=0)
        count = (per_group * HW).to(tl.float32)
        # dx = invstd * (g * w - mean(g * w) - xhat * mean(g * w * xhat)), with
        # mean(g * w * xhat) = invstd * sum_gwx / count
        a = invstd * tl.load(w_ptr + c)
        _run_input_grad(g_ptr, x_ptr, keep_ptr, dx_ptr, (n * C + c) * HW, HW, mean, a,
                        -invstd * invstd * invstd * sum_gwx / count, -invstd * sum_gw / count, dropout_scale, BLOCK,
                        RELU, DROPOUT)
        if n == 0:
            sum_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
            sum_gxhat = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for j0 in range(0, N, BLOCK_N):
                j = j0 + tl.arange(0, BLOCK_N)
                sum_g += tl.load(part_ptr + j * 2 * C + c, mask=j < N, other=0.0)
                sum_gxhat += (tl.load(part_ptr + j * 2 * C + C + c, mask=j < N, other=0.0)
                              * tl.load(invstd_ptr + j * groups + c // per_group, mask=j < N, other=0.0))
            tl.store(dw_ptr + c, tl.sum(sum_gxhat, axis=0))
            tl.store(db_ptr + c, tl.sum(sum_g, axis=0))


_PROGRAMS = 512  # BatchNorm's: about 4 per SM of the H200, as the convolutions' weight gradient


def _pixel_block(pixels: int) -> int:
    return min(1024, triton.next_power_of_2(pixels))


def _batch_launch(x: torch.Tensor) -> tuple[int, int, int, int]:
    """BatchNorm's (channels, pixels, programs per channel, samples per program): about
    _PROGRAMS programs in all."""
    n, c, h, w = x.shape
    samples_per_program = triton.cdiv(n, max(1, min(n, _PROGRAMS // c)))
    return c, h * w, triton.cdiv(n, samples_per_program), samples_per_program


def batch_norm_training(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                        running_var: torch.Tensor, momentum: float, eps: float, relu: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, batch mean, batch 1/std) of a training BatchNorm of x (of ReLU(x) with ``relu``);
    updates the running statistics."""
    c, hw, programs, samples_per_program = _batch_launch(x)
    parts = torch.empty((programs, 2, c), device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)
    mean, invstd = torch.empty_like(weight), torch.empty_like(weight)
    _moments[(c, programs)](x, parts, x.shape[0], c, hw, samples_per_program, BLOCK=_pixel_block(hw), RELU=relu)
    _batch_normalize[(c, programs)](x, weight, bias, parts, y, mean, invstd, running_mean, running_var, x.shape[0],
                                    c, hw, samples_per_program, programs, momentum, eps,
                                    BLOCK=_pixel_block(hw), BLOCK_P=triton.next_power_of_2(programs), RELU=relu)
    return y, mean, invstd


def _dropout_args(grad: torch.Tensor, kept: torch.Tensor | None, p: float) -> tuple[torch.Tensor, float]:
    """(the dropout's mask as bytes, 1 / (1 - p)) for the kernels; where no dropout follows,
    any tensor (never read) and 1."""
    return (grad, 1.0) if kept is None else (kept.view(torch.uint8), 1.0 / (1.0 - p))


def batch_norm_grads(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                     weight: torch.Tensor, relu: bool = False, kept: torch.Tensor | None = None, p: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x, d weight, d bias) of a training BatchNorm with batch statistics ``mean``, ``invstd``;
    with ``relu``, of ReLU then the norm; with ``kept`` (a dropout's mask, of rate ``p``), of
    the norm then that dropout."""
    grad = grad.contiguous()
    c, hw, programs, samples_per_program = _batch_launch(x)
    keep, scale = _dropout_args(grad, kept, p)
    parts = torch.empty((programs, 2, c), device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    dw, db = torch.empty_like(weight), torch.empty_like(weight)
    _grad_sums[(c, programs)](grad, x, keep, mean, parts, x.shape[0], c, hw, samples_per_program, 0, 1, scale,
                              BLOCK=_pixel_block(hw), RELU=relu, DROPOUT=kept is not None)
    _batch_input_grad[(c, programs)](grad, x, keep, mean, invstd, weight, parts, dx, dw, db, x.shape[0], c, hw,
                                     samples_per_program, programs, scale,
                                     BLOCK=_pixel_block(hw), BLOCK_P=triton.next_power_of_2(programs), RELU=relu,
                                     DROPOUT=kept is not None)
    return dx, dw, db


def _group_block(channels: int, groups: int) -> int:
    return max(2, triton.next_power_of_2(channels // groups))


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, relu: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, 1/std per (sample, group)) of GroupNorm of x (of ReLU(x) with ``relu``)."""
    n, c, h, w = x.shape
    parts = torch.empty((n, 2, c), device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)
    mean, invstd = x.new_empty(n * groups), x.new_empty(n * groups)
    _moments[(c, n)](x, parts, n, c, h * w, 1, BLOCK=_pixel_block(h * w), RELU=relu)
    _group_normalize[(c, n)](x, weight, bias, parts, y, mean, invstd, c, h * w, groups, eps,
                             BLOCK=_pixel_block(h * w), BLOCK_G=_group_block(c, groups), RELU=relu)
    return y, mean, invstd


def group_norm_grads(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                     weight: torch.Tensor, groups: int, relu: bool = False, kept: torch.Tensor | None = None,
                     p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x, d weight, d bias) of GroupNorm with its statistics ``mean``, ``invstd`` per (sample,
    group); ``relu``, ``kept`` and ``p`` as for batch_norm_grads."""
    grad = grad.contiguous()
    n, c, h, w = x.shape
    keep, scale = _dropout_args(grad, kept, p)
    parts = torch.empty((n, 2, c), device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    dw, db = torch.empty_like(weight), torch.empty_like(weight)
    _grad_sums[(c, n)](grad, x, keep, mean, parts, n, c, h * w, 1, groups, c // groups, scale,
                       BLOCK=_pixel_block(h * w), RELU=relu, DROPOUT=kept is not None)
    _group_input_grad[(c, n)](grad, x, keep, weight, mean, invstd, parts, dx, dw, db, n, c, h * w, groups, scale,
                              BLOCK=_pixel_block(h * w), BLOCK_G=_group_block(c, groups), BLOCK_N=128, RELU=relu,
                              DROPOUT=kept is not None)
    return dx, dw, db


def _dropped(ctx, y: torch.Tensor, p: float) -> torch.Tensor:
    """y through a training dropout of rate p (none at 0), as nn.Dropout draws it on a GPU
    (torch's native_dropout: the same masks from the same generator); keeps its mask in ctx."""
    ctx.p, ctx.kept = p, None
    if p == 0:
        return y
    y, ctx.kept = torch.native_dropout(y, p, True)
    return y


class _BatchNormKernels(torch.autograd.Function):
    """A training BatchNorm as these kernels, forward (with the running statistics' update) and
    backward; with ``relu``, a ReLU before it, and with ``p``, a dropout after it."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, relu, p):
        y, mean, invstd = batch_norm_training(x, weight, bias, running_mean, running_var, momentum, eps, relu)
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.relu = relu
        return _dropped(ctx, y, p)

    @staticmethod
    def backward(ctx, grad):
        x, mean, invstd, weight = ctx.saved_tensors
        dx, dw, db = batch_norm_grads(grad, x, mean, invstd, weight, ctx.relu, ctx.kept, ctx.p)
        return dx, dw, db, None, None, None, None, None, None


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training steps run on CUDA as these Triton kernels. In
    evaluation, on the CPU, or with ``triton_kernels`` off, it is ``nn.BatchNorm2d``. Same
    parameters, buffers and state. Not for torch.compile, which generates the norms' kernels
    itself (Speedups.triton_norms is off in a compiled step)."""

    triton_kernels = True

    def runs_kernels(self, x: torch.Tensor) -> bool:
        return self.triton_kernels and self.training and usable(x, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels(x) if self.runs_kernels(x) else super().forward(x)

    def kernels(self, x: torch.Tensor, relu: bool = False, p: float = 0.0) -> torch.Tensor:
        """The norm of x (of ReLU(x) with ``relu``, then a dropout of rate ``p``) as the kernels."""
        self.num_batches_tracked.add_(1)  # as nn.BatchNorm2d counts its training batches
        return _BatchNormKernels.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                        self.momentum, self.eps, relu, p)


class _GroupNormKernels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, relu, p):
        y, mean, invstd = group_norm(x, weight, bias, groups, eps, relu)
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.groups, ctx.relu = groups, relu
        return _dropped(ctx, y, p)

    @staticmethod
    def backward(ctx, grad):
        x, mean, invstd, weight = ctx.saved_tensors
        dx, dw, db = group_norm_grads(grad, x, mean, invstd, weight, ctx.groups, ctx.relu, ctx.kept, ctx.p)
        return dx, dw, db, None, None, None, None


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that runs on CUDA as these Triton kernels. On the CPU, or with
    ``triton_kernels`` off, it is ``nn.GroupNorm``. Same parameters and state. Not for
    torch.compile (Speedups.triton_norms is off in a compiled step)."""

    triton_kernels = True

    def runs_kernels(self, x: torch.Tensor) -> bool:
        return self.triton_kernels and usable(x, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels(x) if self.runs_kernels(x) else super().forward(x)

    def kernels(self, x: torch.Tensor, relu: bool = False, p: float = 0.0) -> torch.Tensor:
        """The norm of x (of ReLU(x) with ``relu``, then a dropout of rate ``p``) as the kernels."""
        return _GroupNormKernels.apply(x, self.weight, self.bias, self.num_groups, self.eps, relu, p)


class ConvBlock(nn.Sequential):
    """conv, ReLU, norm, dropout: ``nn.Sequential`` of the four, with its layers, names and
    state. Where the norm runs as these kernels, the ReLU runs inside them (the norm reads
    ReLU(x) and its backward zeroes the gradient where x <= 0), and so does the dropout's
    backward (its gradient read through the mask): three kernels fewer a block and step
    than the layers one by one. The dropout's forward stays torch's, so its masks are the ones
    nn.Dropout draws."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, relu, norm, dropout = self
        x = conv(x)
        if type(relu) is nn.ReLU and isinstance(norm, (BatchNorm2d, GroupNorm)) and norm.runs_kernels(x):
            return norm.kernels(x, relu=True, p=dropout.p if dropout.training else 0.0)
        return dropout(norm(relu(x)))


def use_triton_norms(model: nn.Module, on: bool) -> None:
    """Switch every normlab BatchNorm2d and GroupNorm of the model to the Triton kernels (on) or torch's (off)."""
    for layer in model.modules():
        if isinstance(layer, (BatchNorm2d, GroupNorm)):
            layer.triton_kernels = on
