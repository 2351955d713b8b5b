"""normlab.engine.fast.triton_conv's Triton convolutions compute what torch's convolution computes.

CI has no GPU, so the kernels run there in Triton's interpreter (TRITON_INTERPRET=1, numpy
on the CPU), in a subprocess because the switch is read when the kernels are defined: the
same kernel code, indexing and masking as on the GPU, in fp32. On a GPU the tests compare
them with float64 in both precisions torch's TF32 switch selects.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normlab.engine.fast import triton_conv as conv
from normlab.engine.fast.triton_conv import Conv2d, use_triton_convs
from normlab.engine.models import Net
from tests.triton_kernels import interpreted, kernel_launches

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (batch, in, out, size, kernel, padding, as a large layer): the MNIST model's layers, the 1x1
# head on a 1x1 map, a padded RGB layer, a map narrower than the row tile, and a layer run as
# the rule runs one of 32768 output pixels or more (its tiles; a weight gradient whose programs
# each sum several row tiles), which at that size would take the interpreter three times as
# long as all the others.
SHAPES = [(2, 1, 10, 28, 3, 0, 0), (2, 10, 20, 26, 3, 0, 0), (2, 20, 10, 24, 1, 0, 0), (3, 10, 10, 6, 3, 1, 0),
          (5, 10, 10, 1, 1, 0, 0), (2, 3, 16, 9, 3, 1, 0), (2, 4, 3, 5, 3, 2, 0), (2, 1, 2, 28, 3, 0, 1)]

COMPARE = """
import json, sys, torch, torch.nn.functional as F
from normlab.engine.fast import triton_conv as conv
torch.manual_seed(0)
errors = []
for n, c, o, size, k, p, large in json.loads(sys.argv[1]):
    x = torch.randn(n, c, size, size, dtype=torch.float64)
    w = torch.randn(o, c, k, k, dtype=torch.float64)
    ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.conv2d(ref_x, ref_w, padding=p)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (ref_x, ref_w), g)
    # fp32 operands; channels_last input to exercise the strides
    xs = x.float().contiguous(memory_format=torch.channels_last).requires_grad_()
    ws = w.float().requires_grad_()
    if not large:
        out = conv.conv2d(xs, ws, p)
        grads = torch.autograd.grad(out, (xs, ws), g.float())
    else:
        tiles, _ = conv._gemm_tiles(32768, c, k, False)
        assert conv._gemm_tiles(32768, o, k, True) == (tiles, False)
        out = conv._conv(xs.detach(), ws.detach(), o, p, False, tiles=tiles)
        parts = conv._weight_grad_partials(g.float(), xs.detach(), [o, c, k, k], p, target=4)
        assert parts.shape[0] == 4 and n * (size - k + 1) ** 2 > 4 * 2 * conv._WEIGHT_GRAD_TILES[0]
        grads = (conv._conv(g.float(), ws.detach().transpose(0, 1), c, k - 1 - p, True, tiles=tiles),
                 parts.sum(0).view(o, c, k, k))
    # each gather-GEMM in the form the rule does not pick for it: tap by tap, or one flat sum
    other_forms = [conv._conv(xs.detach(), ws.detach(), o, p, False, by_tap=True),
                   conv._conv(g.float(), ws.detach().transpose(0, 1), c, k - 1 - p, True,
                              by_tap=not conv._gemm_tiles(n * size * size, o, k, True)[1])]
    scale = lambda t: t.abs().max().item()
    errors.append([(a.double() - b).abs().max().item() / scale(b)
                   for a, b in zip((out, *grads, *other_forms), (ref, *ref_grads, ref, ref_grads[0]))])
print(json.dumps(errors))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels themselves are compared with float64")
def test_the_kernels_compute_torchs_convolution_and_its_gradients_in_the_interpreter(tmp_path):
    errors = interpreted(COMPARE, SHAPES, tmp_path / "launches.json")
    for shape, shape_errors in zip(SHAPES, errors):  # forward, gradients, and both in the other form
        assert len(shape_errors) == 5 and max(shape_errors) < 1e-5, (shape, shape_errors)


def test_on_the_cpu_the_models_convolutions_are_torchs():
    """Where the kernels cannot run, normlab's Conv2d is nn.Conv2d: same output, bit for bit."""
    torch.manual_seed(0)
    layer = Conv2d(10, 20, 3, bias=False)
    x = torch.randn(4, 10, 12, 12)
    assert not conv.usable(x, layer)
    assert torch.equal(layer(x), F.conv2d(x, layer.weight))


@needs_cuda
@pytest.mark.parametrize("tf32, tolerance", [(False, 2e-6), (True, 3e-3)])
def test_on_a_gpu_the_kernels_match_float64(tf32, tolerance):
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        torch.manual_seed(0)
        for n, c, o, size, k, p in [(128, *shape[1:6]) for shape in SHAPES] + [(1000, 10, 20, 26, 3, 0)]:
            x = torch.randn(n, c, size, size, device="cuda", requires_grad=True)
            w = torch.randn(o, c, k, k, device="cuda", requires_grad=True)
            out = conv.conv2d(x, w, p)
            g = torch.randn_like(out)
            got = (out, *torch.autograd.grad(out, (x, w), g))
            x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            ref = F.conv2d(x64, w64, padding=p)
            want = (ref, *torch.autograd.grad(ref, (x64, w64), g.double()))
            for a, b in zip(got, want):
                assert (a.double() - b).abs().max() / b.abs().max() < tolerance, (n, c, o, size, k, p)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


KERNELS = ("_gather_gemm", "_tap_gemm", "_weight_grad_parts")


@needs_cuda
def test_on_a_gpu_the_model_runs_its_convolutions_as_the_kernels_unless_switched_off():
    torch.manual_seed(0)
    model = Net("mnist", "gn").cuda()
    x = torch.randn(64, 1, 28, 28, device="cuda")
    assert sum(isinstance(m, Conv2d) for m in model.modules()) == 8
    # forward of all 8, input gradients of all but conv1 (the image needs none), 8 weight gradients;
    # the input gradients of the two 10 -> 20 layers (3x3, summing 20 channels) tap by tap
    assert kernel_launches(model, x, KERNELS) == {"_gather_gemm": 8 + 5, "_tap_gemm": 2, "_weight_grad_parts": 8}
    use_triton_convs(model, False)
    assert kernel_launches(model, x, KERNELS) == {"_gather_gemm": 0, "_tap_gemm": 0, "_weight_grad_parts": 0}
    strided = Conv2d(10, 10, 3, stride=2, bias=False).cuda()
    assert not conv.usable(torch.randn(2, 10, 8, 8, device="cuda"), strided)
