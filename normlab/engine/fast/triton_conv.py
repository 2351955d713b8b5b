"""Stride-1 convolutions for narrow layers, as Triton implicit-GEMM kernels (CUDA).

The reference model's layers have 1 to 20 channels, where cuDNN's kernels, built for wide
layers, took 421 us of the H200's ~550 us training step (batch 128; forward, input and
weight gradients of all 8 convolutions). These kernels take 217 us (TF32) or 271 us
(3xTF32). Each convolution is one gather-GEMM: an output pixel's row of the GEMM gathers
its C x K x K input window straight from the NCHW tensor (nothing unfolded in memory), and
``tl.dot`` multiplies it with all output channels at once.

- forward: rows (n, h_out, w_out), columns o, reduction (c, kh, kw);
- input gradient: the same kernel over the output gradient, with the weights transposed
  (o <-> c) and flipped (kh, kw -> K-1-kh, K-1-kw), and padding K-1-P; over 16 channels or
  more, summed tap by tap (_tap_gemm: the K x K taps unrolled, a channel loop inside);
- weight gradient: rows o, columns (c, kh, kw), reduction over every (n, h_out, w_out),
  split across programs whose partial sums are then added in a fixed order (deterministic;
  in a compiled step Inductor fuses that sum).

``tl.dot`` multiplies in TF32 (10-bit mantissa; ~1e-3 relative error) where
``torch.backends.cudnn.allow_tf32`` allows TF32 convolutions (PyTorch's default), and
otherwise in 3xTF32, as accurate as fp32 (~3e-7), for 1.13x the epoch time. The ops are
``torch.library`` custom ops with autograd, so eager code, ``torch.compile`` and CUDA
graphs call them like any aten op.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton use torch's convolution
    triton = None


def usable(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether this module's convolution of x can run here: CUDA, Triton, and a stride-1,
    undilated, ungrouped, bias-free, zero-padded square convolution in fp32 whose tensors
    have int32 offsets."""
    out_numel = x.numel() // max(conv.in_channels, 1) * conv.out_channels
    return (triton is not None and x.is_cuda and x.dtype == torch.float32 and conv.bias is None
            and max(x.numel(), out_numel) < 2**31
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and conv.padding[0] == conv.padding[1] and conv.kernel_size[0] == conv.kernel_size[1])


def _precision() -> str:
    """tl.dot's input precision under torch's switch for TF32 convolutions."""
    return "tf32" if torch.backends.cudnn.allow_tf32 else "tf32x3"


def _power_of_two_at_least(n: int) -> int:
    """tl.dot's smallest tile side is 16."""
    return max(16, triton.next_power_of_2(n))


if triton is not None:

    @triton.jit
    def _pixels(m, HO, WO):
        """(n, i, j) of flat output-pixel indices m."""
        return m // (WO * HO), (m // WO) % HO, m % WO

    @triton.jit
    def _taps(r, K: tl.constexpr):
        """(c, kh, kw) of flat reduction indices r."""
        return r // (K * K), (r // K) % K, r % K

    @triton.jit
    def _inside(i, j, ok, kh, kw, H, W, padding, PADDED: tl.constexpr):
        """``ok`` where pixel (i, j) at tap (kh, kw) reads inside the image; the arguments
        broadcast (a tile's rows by its columns, or a row vector at one tap). Only a PADDED
        convolution can read outside the image."""
        if PADDED:  # unsigned compares catch both negative and too-large coordinates
            hi = (i + kh - padding).to(tl.uint32)
            wi = (j + kw - padding).to(tl.uint32)
            ok = ok & (hi < H) & (wi < W)
        return ok  # one return: Triton's compiler types every return of a function alike

    @triton.jit
    def _windows(x_ptr, n, i, j, m_ok, c, kh, kw, r_ok, H, W, sxn, sxc, sxh, sxw, padding,
                 PADDED: tl.constexpr):
        """x[n, c, i+kh-P, j+kw-P] for rows (n, i, j) x columns (c, kh, kw), 0 outside the image.
        An element's address is a row part plus a column part."""
        mask = _inside(i[:, None], j[:, None], m_ok[:, None], kh[None, :], kw[None, :], H, W, padding,
                       PADDED) & r_ok[None, :]
        row = n * sxn + (i - padding) * sxh + (j - padding) * sxw
        col = c * sxc + kh * sxh + kw * sxw
        return tl.load(x_ptr + row[:, None] + col[None, :], mask=mask, other=0.0)

    @triton.jit
    def _gather_gemm(x_ptr, w_ptr, out_ptr, N, C, H, W, O, HO, WO,
                     sxn, sxc, sxh, sxw, swo, swc, swh, sww, padding,
                     K: tl.constexpr, FLIP: tl.constexpr, PADDED: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
        """out[n, o, i, j] = sum over (c, kh, kw) of x[n, c, i+kh-P, j+kw-P] * w[o, c, kh', kw']
        with (kh', kw') = (kh, kw), or (K-1-kh, K-1-kw) when FLIP; out is contiguous NCHW."""
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < N * HO * WO
        n, i, j = _pixels(m, HO, WO)
        o = tl.arange(0, BLOCK_O)
        acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
        for r0 in range(0, C * K * K, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_ok = r < C * K * K
            c, kh, kw = _taps(r, K)
            a = _windows(x_ptr, n, i, j, m_ok, c, kh, kw, r_ok, H, W, sxn, sxc, sxh, sxw, padding, PADDED)
            if FLIP:
                kh = K - 1 - kh
                kw = K - 1 - kw
            b = tl.load(w_ptr + o[None, :] * swo + (c * swc + kh * swh + kw * sww)[:, None],
                        mask=r_ok[:, None] & (o[None, :] < O), other=0.0)
            acc += tl.dot(a, b, input_precision=PRECISION)
        out = out_ptr + n[:, None] * (O * HO * WO) + o[None, :] * (HO * WO) + (i * WO + j)[:, None]
        tl.store(out, acc, mask=m_ok[:, None] & (o[None, :] < O))

    @triton.jit
    def _weight_grad_parts(x_ptr, g_ptr, part_ptr, N, C, H, W, O, HO, WO,
                           sxn, sxc, sxh, sxw, sgn, sgo, sgh, sgw, padding, rows_per_program,
                           K: tl.constexpr, PADDED: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
        """part[p, o, (c, kh, kw)] = sum over this program's rows (n, i, j) of
        g[n, o, i, j] * x[n, c, i+kh-P, j+kw-P]."""
        p = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < C * K * K
        c, kh, kw = _taps(r, K)
        o = tl.arange(0, BLOCK_O)
        acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
        for m0 in range(p * rows_per_program, (p + 1) * rows_per_program, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            m_ok = m < N * HO * WO
            n, i, j = _pixels(m, HO, WO)
            g = tl.load(g_ptr + (n * sgn + i * sgh + j * sgw)[:, None] + o[None, :] * sgo,
                        mask=m_ok[:, None] & (o[None, :] < O), other=0.0)
            a = _windows(x_ptr, n, i, j, m_ok, c, kh, kw, r_ok, H, W, sxn, sxc, sxh, sxw, padding, PADDED)
            acc += tl.dot(tl.trans(g), a, input_precision=PRECISION)
        out = part_ptr + p * (O * C * K * K) + o[:, None] * (C * K * K) + r[None, :]
        tl.store(out, acc, mask=(o[:, None] < O) & r_ok[None, :])


    @triton.jit
    def _tap_gemm(x_ptr, w_ptr, out_ptr, N, C, H, W, O, HO, WO,
                  sxn, sxc, sxh, sxw, swo, swc, swh, sww, padding,
                  K: tl.constexpr, FLIP: tl.constexpr, PADDED: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
        """_gather_gemm's sum, tap by tap: the K x K taps are unrolled at compile time and the
        loop runs over channels, so an element's address is a row vector plus a channel vector
        and the image-edge mask is one per row and tap, not one per element."""
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < N * HO * WO
        n, i, j = _pixels(m, HO, WO)
        o = tl.arange(0, BLOCK_O)
        o_ok = o < O
        corner = n * sxn + (i - padding) * sxh + (j - padding) * sxw
        acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
        for kh in tl.static_range(K):
            for kw in tl.static_range(K):
                row_ok = _inside(i, j, m_ok, kh, kw, H, W, padding, PADDED)
                row = corner + kh * sxh + kw * sxw
                if FLIP:
                    tap = (K - 1 - kh) * swh + (K - 1 - kw) * sww
                else:
                    tap = kh * swh + kw * sww
                for c0 in range(0, C, BLOCK_R):
                    c = c0 + tl.arange(0, BLOCK_R)
                    c_ok = c < C
                    a = tl.load(x_ptr + row[:, None] + (c * sxc)[None, :], mask=row_ok[:, None] & c_ok[None, :],
                                other=0.0)
                    b = tl.load(w_ptr + o[None, :] * swo + (c * swc + tap)[:, None], mask=c_ok[:, None] & o_ok[None, :],
                                other=0.0)
                    acc += tl.dot(a, b, input_precision=PRECISION)
        out = out_ptr + n[:, None] * (O * HO * WO) + o[None, :] * (HO * WO) + (i * WO + j)[:, None]
        tl.store(out, acc, mask=m_ok[:, None] & o_ok[None, :])


# Tiles (rows, reduction columns, warps, pipeline stages), chosen from 18 configurations (24
# for the weight gradient) timed on the H200 for every convolution of both models
# (docs/speed.md). A program runs its reduction loop serially, so a small layer, with few rows
# to share out, is fastest with short tiles of many columns (fewer iterations) and a large one
# with long tiles. These two rules give convolutions within 4% of the best per-layer choice,
# 1.2x faster than one tile for all (MNIST: 138 instead of 170 us per training step).
# Pipelining the loop's loads (2 or 3 stages) gained nothing (h200-2026-12-01e-conv-tiles-stages.txt).
#
# Tap by tap (_tap_gemm) pays where a 3x3 input gradient sums over 16 channels or more (the
# forward's outputs). MNIST's two 10 -> 20 layers' input gradients took 25.2 and 7.2 us with six
# copies at once (as a sweep's runs share the GPU), 17.1 and 4.9 us tap by tap (alone 27.4 and
# 9.2 us, 20.0 and 9.6 us); CIFAR-10's five took 78 us at once, 59 us tap by tap (alone 95 ->
# 77 us, its 8x8 layer's 9.3 -> 10.5 us). Over 1 to 10 channels, or as a forward, it was no
# faster or slower (MNIST's conv1 2.5x slower), and a weight gradient tap by tap was 2-6x slower
# (h200-2026-12-01e-conv-tiles-by-tap.txt, -cifar-input-gradients.txt). End to end, ten seeds
# 1.04x: 60.9 and 59.7 s against 63.2 and 62.2 s, alternately
# (h200-2026-12-01e-e2e-10seeds-tap-input-gradients.txt).
def _gemm_tiles(rows: int, channels: int, k: int, transposed: bool) -> tuple[tuple[int, int, int, int], bool]:
    """(tiles, tap by tap) for a gather-GEMM over ``rows`` output pixels that sums ``channels``
    channels of a k x k window; ``transposed`` for an input gradient."""
    if transposed and k > 1 and channels >= 16:
        return (128, 16, 4, 1), True
    return ((128, 16, 2, 1) if rows >= 32768 else (32, 32, 4, 1)), False


_WEIGHT_GRAD_TILES = (64, 32, 4, 1)
_WEIGHT_GRAD_PROGRAMS = 512  # ~4 per SM


def _conv(x: torch.Tensor, weight: torch.Tensor, out_channels: int, padding: int, flip: bool,
          tiles: tuple[int, int, int, int] | None = None, by_tap: bool | None = None) -> torch.Tensor:
    """Launch the gather-GEMM; ``weight`` is indexed [o, c, kh, kw] through its strides (the
    input gradient's are flipped). ``tiles`` (rows, reduction columns, warps, stages) and
    ``by_tap`` default to the rule for the layer."""
    n, c, h, w = x.shape
    k = weight.shape[-1]
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    out = torch.empty((n, out_channels, ho, wo), device=x.device, dtype=x.dtype)
    rule_tiles, rule_by_tap = _gemm_tiles(n * ho * wo, c, k, flip)
    block_m, block_r, warps, stages = tiles or rule_tiles
    by_tap = rule_by_tap if by_tap is None else by_tap
    (_tap_gemm if by_tap else _gather_gemm)[(triton.cdiv(n * ho * wo, block_m),)](
        x, weight, out, n, c, h, w, out_channels, ho, wo, *x.stride(), *weight.stride(), padding,
        K=k, FLIP=flip, PADDED=padding > 0, PRECISION=_precision(), BLOCK_M=block_m,
        BLOCK_O=_power_of_two_at_least(out_channels), BLOCK_R=block_r, num_warps=warps, num_stages=stages)
    return out


@torch.library.custom_op("normlab::conv2d", mutates_args=())
def conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """F.conv2d(x, weight, padding=padding) for stride 1, no bias."""
    return _conv(x, weight, weight.shape[0], padding, flip=False)


@torch.library.custom_op("normlab::conv2d_input_grad", mutates_args=())
def conv2d_input_grad(grad: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """d loss / d x: a convolution of the output gradient with the transposed, flipped weights."""
    k = weight.shape[-1]
    return _conv(grad, weight.transpose(0, 1), weight.shape[1], k - 1 - padding, flip=True)


def _weight_grad_split(rows: int, reduction: int, tiles: tuple[int, int, int, int] = _WEIGHT_GRAD_TILES,
                       target: int = _WEIGHT_GRAD_PROGRAMS) -> tuple[int, int]:
    """(programs, rows per program) of the weight gradient's split reduction: about
    ``target`` programs in all, each over a whole number of row tiles."""
    block_m, block_r, *_ = tiles
    programs = max(1, min(triton.cdiv(rows, block_m), target // triton.cdiv(reduction, block_r)))
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), block_m) * block_m
    return triton.cdiv(rows, rows_per_program), rows_per_program


def _weight_grad_partials(grad: torch.Tensor, x: torch.Tensor, weight_shape: list[int], padding: int,
                          tiles: tuple[int, int, int, int] = _WEIGHT_GRAD_TILES,
                          target: int = _WEIGHT_GRAD_PROGRAMS) -> torch.Tensor:
    """Launch the weight gradient's split reduction; returns its (programs, o, c*k*k) parts."""
    o, c, k, _ = weight_shape
    n, _, h, w = x.shape
    ho, wo = grad.shape[2:]
    programs, rows_per_program = _weight_grad_split(n * ho * wo, c * k * k, tiles, target)
    parts = torch.empty((programs, o, c * k * k), device=x.device, dtype=torch.float32)
    block_m, block_r, warps, stages = tiles
    _weight_grad_parts[(programs, triton.cdiv(c * k * k, block_r))](
        x, grad, parts, n, c, h, w, o, ho, wo, *x.stride(), *grad.stride(), padding, rows_per_program,
        K=k, PADDED=padding > 0, PRECISION=_precision(), BLOCK_M=block_m, BLOCK_O=_power_of_two_at_least(o),
        BLOCK_R=block_r, num_warps=warps, num_stages=stages)
    return parts


@torch.library.custom_op("normlab::conv2d_weight_grad_parts", mutates_args=())
def conv2d_weight_grad_parts(grad: torch.Tensor, x: torch.Tensor, weight_shape: list[int],
                             padding: int) -> torch.Tensor:
    """d loss / d weight as per-program partial sums over the rows, shape (programs, o, c*k*k):
    their sum over dim 0 is the gradient. The sum is left to the caller so that, compiled,
    Inductor fuses it (a separate reduction kernel per layer cost 29 us of a 370 us step)."""
    return _weight_grad_partials(grad, x, weight_shape, padding)


@conv2d.register_fake
def _(x, weight, padding):
    k = weight.shape[-1]
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2] + 2 * padding - k + 1, x.shape[3] + 2 * padding - k + 1))


@conv2d_input_grad.register_fake
def _(grad, weight, padding):
    k = weight.shape[-1]
    return grad.new_empty((grad.shape[0], weight.shape[1], grad.shape[2] - 2 * padding + k - 1,
                           grad.shape[3] - 2 * padding + k - 1))


@conv2d_weight_grad_parts.register_fake
def _(grad, x, weight_shape, padding):
    o, c, k, _ = weight_shape
    programs, _ = _weight_grad_split(grad.shape[0] * grad.shape[2] * grad.shape[3], c * k * k)
    return x.new_empty((programs, o, c * k * k))


def _setup(ctx, inputs, output):
    x, weight, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding = padding


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = conv2d_input_grad(grad, weight, ctx.padding) if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[1]:  # the parts summed in a fixed order: deterministic
        grad_w = conv2d_weight_grad_parts(grad, x, list(weight.shape), ctx.padding).sum(0).view(weight.shape)
    return grad_x, grad_w, None


conv2d.register_autograd(_backward, setup_context=_setup)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs on CUDA as these Triton kernels: at this model's 1-20
    channels they take half of cuDNN's time in a graphed training step (docs/speed.md). On
    the CPU, or with ``triton_kernels`` off, it is ``nn.Conv2d``. Same parameters and state."""

    triton_kernels = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton_kernels and usable(x, self):
            return conv2d(x, self.weight, self.padding[0])
        return super().forward(x)


def use_triton_convs(model: nn.Module, on: bool) -> None:
    """Switch every normlab Conv2d of the model to the Triton kernels (on) or cuDNN (off)."""
    for layer in model.modules():
        if isinstance(layer, Conv2d):
            layer.triton_kernels = on
