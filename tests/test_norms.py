"""normlab.engine.fast.triton_norms' BatchNorm2d and GroupNorm train what torch's train.

As in test_conv.py, CI has no GPU, so there the kernels run in Triton's interpreter
(tests/triton_kernels.py), and the layer's training path runs on CPU tensors with its
CUDA check lifted: the same kernel code, indexing and masking as on the GPU. On a GPU the
tests run the layer itself.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from normlab.engine.config import TrainConfig
from normlab.engine.data import DeviceData, load_raw
from normlab.engine.fast import Speedups
from normlab.engine.fast import triton_norms
from normlab.engine.models import Net
from normlab.engine.train import Callbacks, Trainer
from tests.mnist_fixture import write_mnist
from tests.triton_kernels import interpreted, kernel_launches

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (layer, groups, batch, channels, height, width): the MNIST model's norm inputs at batch 128;
# 53 samples, which BatchNorm's 10-channel split gives two a program and one to the last;
# CIFAR-10's widest layer; maps narrower and wider than one block of pixels, a 1x3 map; LN,
# GN and IN.
CASES = [("BatchNorm2d", 0, 128, 10, 26, 26), ("BatchNorm2d", 0, 3, 20, 24, 24), ("BatchNorm2d", 0, 53, 10, 9, 9),
         ("BatchNorm2d", 0, 3, 32, 32, 32), ("BatchNorm2d", 0, 5, 10, 33, 33), ("BatchNorm2d", 0, 2, 3, 1, 3),
         ("GroupNorm", 1, 128, 10, 26, 26), ("GroupNorm", 2, 3, 20, 24, 24), ("GroupNorm", 1, 3, 32, 32, 32),
         ("GroupNorm", 4, 5, 16, 33, 33), ("GroupNorm", 10, 4, 10, 9, 9), ("GroupNorm", 1, 2, 3, 1, 1)]
INTERPRETED = [case for case in CASES if case[2] != 128]  # the interpreter's pace: about 3x faster without

def layer_errors(cases: list[tuple], device: str) -> list[list[float]]:
    """For each case, normlab's layer's relative errors against torch's in float64: output,
    d x, d weight, d bias; for BatchNorm also the running mean and variance, then the batch
    count's difference."""
    torch.manual_seed(0)
    errors = []
    for layer, groups, n, c, h, w in cases:
        # activations after a ReLU: positive means, where a one-pass variance would lose digits
        x = torch.randn(n, c, h, w, dtype=torch.float64).relu() * 3 + 0.5
        args = (c,) if layer == "BatchNorm2d" else (groups, c)
        ref = getattr(torch.nn, layer)(*args).double()
        ref.weight.data.uniform_(0.5, 1.5), ref.bias.data.uniform_(-0.5, 0.5)
        ours = getattr(triton_norms, layer)(*args).to(device)
        ours.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
        xr = x.clone().requires_grad_()
        want = ref(xr)
        g = torch.randn_like(want)
        want_grads = torch.autograd.grad(want, (xr, ref.weight, ref.bias), g)
        xs = x.float().to(device).requires_grad_()
        got = ours(xs)
        got_grads = torch.autograd.grad(got, (xs, ours.weight, ours.bias), g.float().to(device))
        pairs = list(zip((got, *got_grads), (want, *want_grads)))
        if layer == "BatchNorm2d":
            pairs += [(getattr(ours, name), getattr(ref, name)) for name in ("running_mean", "running_var")]
        row = [((a.double().cpu() - b).abs().max() / b.abs().max()).item() for a, b in pairs]
        if layer == "BatchNorm2d":
            row.append(int(ours.num_batches_tracked) - int(ref.num_batches_tracked))
        errors.append(row)
    return errors


# Triton reads TRITON_INTERPRET when the kernels are defined: a process of its own, one for
# the layers' cases and the blocks' (below), which share the kernels
INTERPRET = """
import json, sys
from normlab.engine.fast import triton_norms
from tests.test_norms import block_errors, layer_errors
triton_norms.usable = lambda x, layer: True  # the interpreter runs the kernels on CPU tensors
layers, blocks = json.loads(sys.argv[1])
print(json.dumps([layer_errors(layers, "cpu"), block_errors(blocks, "cpu")]))
"""


@pytest.fixture(scope="module")
def interpreter_errors(tmp_path_factory) -> tuple[list, list]:
    """(layer_errors of INTERPRETED, block_errors of BLOCK_CASES), run in Triton's interpreter."""
    layers, blocks = interpreted(INTERPRET, [INTERPRETED, BLOCK_CASES], tmp_path_factory.mktemp("norms") / "launches")
    return layers, blocks


def assert_matches_float64(cases: list[tuple], errors: list[list[float]]) -> None:
    for case, row in zip(cases, errors):
        if case[0] == "BatchNorm2d":
            *row, batches = row
            assert batches == 0, (case, batches)
        assert max(row) < 2e-5, (case, row)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the layer itself is compared")
def test_the_layers_compute_torchs_norms_and_their_gradients_in_the_interpreter(interpreter_errors):
    assert_matches_float64(INTERPRETED, interpreter_errors[0])


@needs_cuda
def test_on_a_gpu_the_layers_compute_torchs_norms_and_their_gradients():
    assert_matches_float64(CASES, layer_errors(CASES, "cuda"))


# (layer, groups, batch, channels, height, width, dropout): small blocks (the interpreter's
# pace; CASES has the shapes), the model's dropout, one that drops half, and none (0)
BLOCK_CASES = [("BatchNorm2d", 0, 4, 10, 9, 9, 0.05), ("BatchNorm2d", 0, 3, 6, 12, 12, 0.5),
               ("BatchNorm2d", 0, 3, 4, 5, 5, 0.0), ("GroupNorm", 1, 3, 8, 12, 12, 0.05),
               ("GroupNorm", 2, 4, 8, 9, 9, 0.5), ("GroupNorm", 4, 3, 8, 5, 5, 0.0)]


def block_errors(cases: list[tuple], device: str) -> list[list[float]]:
    """For each case, a ConvBlock's (ReLU, norm and dropout in the norm's kernels) relative
    errors against the same layers one by one (torch's ReLU, norm and dropout, the dropout's
    masks drawn from the same seed): output, d x, d weight, d bias; for BatchNorm also the
    running mean and variance. The input has negative values, so the ReLU has work. Last, 0 if
    an input with a NaN gives NaNs in the same places of the output and d x both ways (torch's
    ReLU keeps a NaN), else infinity."""
    torch.manual_seed(0)
    errors = []
    for layer, groups, n, c, h, w, p in cases:
        args = (c,) if layer == "BatchNorm2d" else (groups, c)
        ours = getattr(triton_norms, layer)(*args).to(device)
        ref = getattr(torch.nn, layer)(*args).to(device)
        ref.weight.data.uniform_(0.5, 1.5), ref.bias.data.uniform_(-0.5, 0.5)
        ours.load_state_dict(ref.state_dict())
        block = triton_norms.ConvBlock(torch.nn.Identity(), torch.nn.ReLU(), ours, torch.nn.Dropout(p))
        one_by_one = torch.nn.Sequential(torch.nn.ReLU(), ref)
        x = torch.randn(n, c, h, w, device=device) * 2 + 0.3
        g = torch.randn_like(x)

        def run(model: torch.nn.Module, norm: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
            x = x.clone().requires_grad_()
            torch.manual_seed(1)
            out = model(x)
            if model is one_by_one and p:
                out = torch.native_dropout(out, p, True)[0]  # what nn.Dropout draws on a GPU
            return [out, *torch.autograd.grad(out, (x, norm.weight, norm.bias), g)]

        pairs = zip(run(block, ours, x), run(one_by_one, ref, x))
        row = [((a - b).abs().max() / b.abs().max()).item() for a, b in pairs]
        if layer == "BatchNorm2d":
            row += [((getattr(ours, k) - getattr(ref, k)).abs().max() / getattr(ref, k).abs().max()).item()
                    for k in ("running_mean", "running_var")]
        x[0, 0, 0, 0] = float("nan")
        with_nan = [result[:2] for result in (run(block, ours, x), run(one_by_one, ref, x))]
        same = all(torch.equal(a.isnan(), b.isnan()) for a, b in zip(*with_nan)) and with_nan[0][0].isnan().any()
        errors.append(row + [0.0 if same else float("inf")])
    return errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the block itself is compared")
def test_a_block_runs_its_relu_and_dropout_in_the_norms_kernels_as_the_layers_one_by_one_in_the_interpreter(
        interpreter_errors):
    errors = interpreter_errors[1]
    assert all(max(row) < 2e-5 for row in errors), list(zip(BLOCK_CASES, errors))


@needs_cuda
def test_on_a_gpu_a_block_runs_its_relu_and_dropout_in_the_norms_kernels_as_the_layers_one_by_one():
    errors = block_errors(BLOCK_CASES, "cuda")
    assert all(max(row) < 2e-5 for row in errors), list(zip(BLOCK_CASES, errors))


def test_on_the_cpu_a_block_is_its_layers_one_by_one():
    """Where the kernels cannot run, a ConvBlock is nn.Sequential of its layers, bit for bit."""
    torch.manual_seed(0)
    layers = (torch.nn.Conv2d(3, 10, 3, bias=False), torch.nn.ReLU(), triton_norms.BatchNorm2d(10),
              torch.nn.Dropout(0.1))
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(1)
    ours = triton_norms.ConvBlock(*layers)(x)
    torch.manual_seed(1)
    assert torch.equal(ours, torch.nn.Sequential(*layers)(x))


@pytest.mark.parametrize("layer, args", [("BatchNorm2d", (10,)), ("GroupNorm", (1, 10)), ("GroupNorm", (2, 10))])
def test_on_the_cpu_the_layers_are_torchs(layer, args):
    """Where the kernels cannot run, normlab's layers are torch's: same output and state,
    bit for bit, in training and in evaluation."""
    torch.manual_seed(0)
    ours, theirs = getattr(triton_norms, layer)(*args), getattr(torch.nn, layer)(*args)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 10, 6, 6) * 2 + 1
    assert not triton_norms.usable(x, ours)
    assert torch.equal(ours(x), theirs(x))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    ours.eval(), theirs.eval()
    assert torch.equal(ours(x), theirs(x))


def test_the_kernels_are_on_by_default_only_on_a_gpu_and_not_with_compiling(monkeypatch):
    """Compiled, Inductor generates the norms' kernels itself."""
    assert Speedups.default(torch.device("cuda")).triton_norms
    assert not Speedups.default(torch.device("cpu")).triton_norms
    monkeypatch.setenv("NORMLAB_COMPILE", "always")
    assert not Speedups.default(torch.device("cuda")).triton_norms


KERNELS = ("_moments", "_batch_normalize", "_group_normalize", "_grad_sums", "_batch_input_grad", "_group_input_grad")


def launched(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """The norm kernels a training forward and backward of the model launched, and how often."""
    return {kernel: count for kernel, count in kernel_launches(model, x, KERNELS).items() if count}


@needs_cuda
def test_on_a_gpu_the_models_run_their_norms_as_the_kernels_unless_switched_off():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28, device="cuda")
    bn, ln = Net("mnist", "bn").cuda(), Net("mnist", "ln").cuda()
    assert sum(isinstance(m, triton_norms.BatchNorm2d) for m in bn.modules()) == 6
    assert launched(bn, x) == {"_moments": 6, "_batch_normalize": 6, "_grad_sums": 6, "_batch_input_grad": 6}
    assert launched(ln, x) == {"_moments": 6, "_group_normalize": 6, "_grad_sums": 6, "_group_input_grad": 6}
    for model in (bn, ln):
        triton_norms.use_triton_norms(model, False)
        assert launched(model, x) == {}


def gpu_kernels(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """The GPU kernels a training forward and backward of the model launched, in order (its
    gradients set to None first: none added to earlier ones)."""
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(x).sum().backward()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@needs_cuda
@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_on_a_gpu_a_blocks_relu_and_dropouts_backward_launch_no_kernels_of_their_own(monkeypatch, norm):
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28, device="cuda")
    model = Net("mnist", norm).cuda().train()
    fused = gpu_kernels(model, x)
    monkeypatch.setattr(triton_norms.ConvBlock, "forward", torch.nn.Sequential.forward)
    one_by_one = gpu_kernels(model, x)
    assert len(one_by_one) - len(fused) == 6 * 3  # each block: the ReLU, its backward, the dropout's backward
    assert [sum("masked_scale" in k for k in kernels) for kernels in (fused, one_by_one)] == [0, 6]


@needs_cuda
@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
def test_on_a_gpu_the_engine_trains_with_the_kernels_what_it_trains_with_torchs(tmp_path, norm):
    """The engine's default (CUDA graphs, Triton convolutions and norms) against the same with
    torch's norm kernels, the convolutions in full fp32 precision (3xTF32; with TF32 the two
    round differently from the first step on): from the same weights one step's gradients
    agree to float rounding, and two epochs of training as closely as training's chaos
    allows (test_step.py's channels-last test)."""
    data = DeviceData(load_raw("mnist", write_mnist(tmp_path, train=2000, test=500), download=False), "cuda")
    config = TrainConfig(norm=norm, l1=1e-5 if norm == "bn" else 0.0, epochs=2, seed=3)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ours = Trainer(config, data)
        theirs = Trainer(config, data, speedups=replace(ours.speedups, triton_norms=False))
        assert ours.speedups.triton_norms and not theirs.speedups.triton_norms
        x, y = data.normalize(data.train_x[:128]), data.train_y[:128]
        ours_grads, theirs_grads = (step_gradients(trainer, x, y) for trainer in (ours, theirs))
        for name, a, b in zip(dict(ours.model.named_parameters()), ours_grads, theirs_grads):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max(), name
        for _ in range(config.epochs):
            a, b = ours.run_epoch(Callbacks()), theirs.run_epoch(Callbacks())
            assert a.train_loss == pytest.approx(b.train_loss, rel=5e-3)  # measured: 1e-4 to 2e-3
            assert a.test_loss == pytest.approx(b.test_loss, rel=5e-3)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def step_gradients(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of one training step's loss (dropout drawn from a fixed seed)."""
    trainer.model.train()
    torch.manual_seed(0)
    loss = F.nll_loss(trainer.model(x), y)
    return list(torch.autograd.grad(loss, list(trainer.model.parameters())))
