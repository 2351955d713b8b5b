"""The norm registry and the reference CNN."""

import pytest
import torch
from torch import nn

from normlab.engine.fast.cpu_dropout import Dropout
from normlab.engine.fast.triton_conv import Conv2d
from normlab.engine.fast.triton_norms import BatchNorm2d, GroupNorm
from normlab.engine.models import Net, count_parameters, summarize, summary_text
from normlab.engine.registry import ARCHITECTURES, NORMS, check_norm, valid_groups, variant_label
from normlab.errors import ConfigError


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("dataset", list(ARCHITECTURES))
def test_every_norm_builds_and_classifies(norm, dataset):
    arch = ARCHITECTURES[dataset]
    model = Net(dataset, norm).eval()
    x = torch.randn(3, arch.in_channels, arch.image_size, arch.image_size)
    log_probs = model(x)
    assert log_probs.shape == (3, 10)
    torch.testing.assert_close(log_probs.exp().sum(dim=1), torch.ones(3))


def test_parameter_counts():
    assert count_parameters(Net("mnist", "bn")) == 7750
    for norm in NORMS:
        assert count_parameters(Net("mnist", norm)) <= 8000
        assert count_parameters(Net("cifar10", norm)) < 50000
    # every norm carries the same per-channel affine: 2 x (10+20+20+10+10+10)
    assert count_parameters(Net("mnist", "bn")) - count_parameters(Net("mnist", "none")) == 160
    assert count_parameters(Net("mnist", "gn", groups=5)) == 7750
    # one channel per group: conv6 keeps no norm, 2 x 10 (MNIST) and 2 x 32 (CIFAR-10) fewer
    assert count_parameters(Net("mnist", "in")) == count_parameters(Net("mnist", "gn", groups=10)) == 7730
    assert count_parameters(Net("cifar10", "in")) == 38480 - 64


def every_variant() -> list[tuple[str, str, int]]:
    """(dataset, norm, groups) for every registered norm, and gn with every valid group count."""
    return [(dataset, norm, groups) for dataset in ARCHITECTURES for norm in NORMS
            for groups in (valid_groups(dataset) if norm == "gn" else [2])]


def test_conv6_keeps_its_norm_unless_it_normalizes_each_channel_alone():
    for dataset, norm, groups in every_variant():
        kept = type(Net(dataset, norm, groups).conv6[2])
        alone = norm == "in" or (norm == "gn" and groups == ARCHITECTURES[dataset].widths[-1])
        assert kept == (nn.Identity if alone else type(NORMS[norm].make(10, 1))), (dataset, norm, groups)


@pytest.mark.parametrize("dataset, norm, groups", every_variant(), ids=lambda v: str(v))
def test_eval_output_depends_on_the_input(dataset, norm, groups):
    """A norm that fixes every pooled channel mean makes the logits constant (IN gave the same
    log-probabilities, to 5e-7, for any input), whatever the weights: every variant's must
    follow its input. He-initialized weights keep the activations of order 1 in every
    variant (eval-mode BN with fresh running statistics does not rescale them)."""
    arch = ARCHITECTURES[dataset]
    torch.manual_seed(0)
    model = Net(dataset, norm, groups).eval()
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    x = torch.randn(8, arch.in_channels, arch.image_size, arch.image_size)
    with torch.no_grad():
        log_probs = model(x)
    assert (log_probs - log_probs[0]).abs().amax(dim=1)[1:].min() > 0.05


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """4,000 real training digits and 1,000 held-out ones, on the CPU."""
    from normlab.engine.data import DeviceData, load_raw
    from tests.mnist_fixture import write_mnist

    return DeviceData(load_raw("mnist", write_mnist(tmp_path_factory.mktemp("mnist-4k"), 4000, 1000)), "cpu")


@pytest.mark.parametrize("norm, groups", [(n, g) for d, n, g in every_variant() if d == "mnist"],
                         ids=lambda v: str(v))
def test_every_norm_and_group_count_learns_real_digits(norm, groups, digits):
    """One epoch (two without a norm, which starts slower) of batches of 16 at the default
    learning rate: far above chance (10%; the constant-output models stayed at 10-14% after
    three epochs), every variant at least 70% on held-out digits. A few seconds each."""
    from normlab.engine.config import TrainConfig
    from normlab.engine.train import Trainer, fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CI's 2 cores: one thread each
    try:
        config = TrainConfig(norm=norm, groups=groups, epochs=2 if norm == "none" else 1, batch_size=16, seed=1)
        records = fit(Trainer(config, digits)).records
    finally:
        torch.set_num_threads(threads)
    assert records[-1].test_acc > 70.0, records


def test_reference_architecture_has_no_biases_and_the_notebook_layout():
    model = Net("mnist", "bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (1, 10, 3), (10, 20, 3), (20, 10, 1), (10, 20, 3), (20, 10, 3), (10, 10, 3), (10, 10, 3), (10, 10, 1)]
    assert convs[6].padding == (1, 1)
    block = list(model.conv1)
    assert [type(m) for m in block] == [Conv2d, nn.ReLU, BatchNorm2d, Dropout]
    assert type(Net("mnist", "ln").conv1[2]) is GroupNorm  # torch's layers, run as Triton kernels on a GPU


def test_cpu_dropout_drops_p_of_the_elements_independently_and_keeps_the_mean():
    layer = Dropout(0.05).train()
    x = torch.full((4_000_000,), 3.0, requires_grad=True)
    torch.manual_seed(0)
    out = layer(x)
    kept = out != 0
    scale = 65536 / (65536 - 3277)  # p = 0.05 rounds to 3277/65536 of the 16-bit values
    assert torch.equal(out[kept], torch.full_like(out[kept], 3.0 * scale))
    # 4M Bernoulli(0.05) draws: the dropped fraction is 0.05 within 5 standard deviations (5 x 1.1e-4)
    dropped = (~kept).double()
    assert abs(dropped.mean().item() - 3277 / 65536) < 5.5e-4
    # each of the four 16-bit lanes of a 64-bit draw drops its own share, and neighbours independently
    for lane in range(4):
        assert abs(dropped[lane::4].mean().item() - 0.05) < 1.1e-3
    assert abs((dropped[:-1] * dropped[1:]).mean().item() - 0.05**2) < 2.5e-4
    assert abs(out.detach().mean().item() - 3.0) < 3.0 * 6e-4
    out.sum().backward()
    assert torch.equal(x.grad, kept * scale)


def test_cpu_dropout_draws_from_the_default_generator_and_is_identity_in_eval():
    layer = Dropout(0.3).train()
    x = torch.randn(2, 10, 7, 7)
    torch.manual_seed(5)
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    torch.manual_seed(5)
    assert torch.equal(layer(x), first)
    state = torch.get_rng_state()
    assert torch.equal(layer.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(torch.get_rng_state(), state)  # no draws where nothing is dropped


def test_ln_statistics_equal_layernorm_over_chw():
    """ln is GroupNorm(1, C): per-sample statistics over (C, H, W), i.e. nn.LayerNorm's."""
    torch.manual_seed(0)
    x = torch.randn(4, 20, 6, 6) * 3 + 1
    ln = NORMS["ln"].make(20, 1)
    reference = nn.LayerNorm((20, 6, 6), elementwise_affine=False)
    torch.testing.assert_close(ln(x), reference(x), rtol=1e-5, atol=1e-5)
    # the affine is per channel (2 x C), not per element like nn.LayerNorm's (2 x C*H*W)
    assert sum(p.numel() for p in ln.parameters()) == 40


def test_gn_statistics_are_per_sample_and_group():
    torch.manual_seed(1)
    x = torch.randn(2, 10, 4, 4)
    out = NORMS["gn"].make(10, 2)(x)
    groups = x.view(2, 2, 5 * 16)
    expected = (groups - groups.mean(-1, keepdim=True)) / torch.sqrt(groups.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, expected.view_as(x), rtol=1e-5, atol=1e-5)


def test_groups_that_do_not_divide_the_channels_list_the_valid_choices():
    assert valid_groups("mnist") == [1, 2, 5, 10]
    assert valid_groups("cifar10") == [1, 2, 4, 8, 16]
    with pytest.raises(ConfigError, match=r"--groups 3 .*\[10, 20\].*valid choices: 1, 2, 5, 10"):
        check_norm("gn", 3, "mnist")
    with pytest.raises(ConfigError, match="unknown norm 'xx'; valid choices: bn, ln, gn, in, none"):
        Net("mnist", "xx")
    check_norm("bn", 3, "mnist")  # groups only matter for gn


def test_variant_labels_read_as_a_reader_names_them():
    assert variant_label("gn", 2) == "GN (2 groups)"
    assert variant_label("ln") == "LN"
    assert variant_label("bn", l1=1e-5) == "BN + L1 (1e-05)"


def test_summary_totals_and_mult_adds():
    model = Net("mnist", "bn")
    rows = summarize(model)
    assert sum(r.parameters for r in rows) == 7750
    conv1 = rows[0]
    assert conv1.output_shape == (10, 26, 26)
    assert conv1.mult_adds == 10 * 26 * 26 * 9  # 1 input channel, 3x3
    transition = next(r for r in rows if r.name == "transition")
    assert transition.output_shape == (10, 12, 12)
    assert transition.mult_adds == 10 * 24 * 24 * 20  # 1x1 conv before the pool
    assert rows[-1].output_shape == (10,)
    text = summary_text(model)
    assert text.splitlines()[-1].split()[:2] == ["total", "7,750"]
