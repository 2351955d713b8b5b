"""The worked example: what `normlab explain` prints is recomputed here from the same input with
torch's own layers; the figure highlights the right elements; `normlab summary` adds up."""

from __future__ import annotations

import re

import matplotlib.colors
import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from normlab.analysis import explain as worked
from normlab.analysis import plots
from normlab.analysis.explain import EXAMPLE
from normlab.cli import main
from normlab.engine.models import Net, count_parameters
from normlab.engine.registry import ARCHITECTURES, NORMS, valid_groups
from tests.conftest import ROOT

N, C, H, W = EXAMPLE.shape
NUMBER = r"-?\d+(?:\.\d+)?"


def torch_statistics(norm: str, groups: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per set, in the order the sets are printed."""
    if norm == "bn":
        flat = EXAMPLE.transpose(0, 1).reshape(C, -1)
    else:
        flat = EXAMPLE.reshape(N * {"ln": 1, "gn": groups, "in": C}[norm], -1)
    return flat.mean(1), flat.var(1, unbiased=False)


def torch_outputs(norm: str, groups: int = 2) -> list[torch.Tensor]:
    """The normalized example from every torch layer that computes this norm (new layers, train mode)."""
    layers = {
        "bn": [nn.BatchNorm2d(C)],
        "ln": [nn.GroupNorm(1, C), nn.LayerNorm((C, H, W))],
        "gn": [nn.GroupNorm(groups, C)],
        "in": [nn.GroupNorm(C, C), nn.InstanceNorm2d(C)],
    }[norm]
    with torch.no_grad():
        return [layer.double().train()(EXAMPLE) for layer in layers]


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def sections(text: str) -> dict[str, str]:
    """The printed explanation split at each norm's heading, keyed by the norm's label."""
    parts = re.split(r"^(BN|LN|GN|IN) \(", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def parse_grid(lines: list[str]) -> torch.Tensor:
    """A printed (N, C, H, W) grid: one line per (sample, pixel row), channels side by side."""
    rows = [[float(v) for v in re.findall(NUMBER, line.removeprefix("    sample ")[2:])] for line in lines]
    return torch.tensor(rows, dtype=torch.float64).view(N, H, C, W).permute(0, 2, 1, 3)


def grid_after(text: str, heading: str) -> torch.Tensor:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(heading)) + 2
    return parse_grid(lines[start:start + N * H])


def set_rows(section: str) -> list[tuple[str, list[float], float, float]]:
    """(label, elements, mean, var) of each printed set."""
    rows = []
    for m in re.finditer(rf"^    ((?:channel|sample) [\w ,-]+?)  +([\d |]+?)  +({NUMBER}) +({NUMBER})$", section, re.M):
        rows.append((m[1], [float(v) for v in re.findall(r"\d+", m[2])], float(m[3]), float(m[4])))
    return rows


@pytest.fixture(scope="module")
def printed() -> str:
    result = run("explain")
    assert result.exit_code == 0, result.output
    return result.output


def test_printed_input_is_the_example(printed):
    assert torch.equal(grid_after(printed, "Input x"), EXAMPLE)


@pytest.mark.parametrize("norm", worked.EXPLAINED)
def test_printed_statistics_and_values_equal_torchs(printed, norm):
    section = sections(printed)[NORMS[norm].label]
    rows = set_rows(section)
    mean, var = torch_statistics(norm)
    assert [r[2] for r in rows] == pytest.approx(mean.tolist(), abs=1e-4)
    assert [r[3] for r in rows] == pytest.approx(var.tolist(), abs=1e-4)
    # the listed elements are exactly the set's members: together, each element once
    assert sorted(v for r in rows for v in r[1]) == sorted(EXAMPLE.flatten().tolist())
    for label, elements, m, v in rows:
        assert m == pytest.approx(sum(elements) / len(elements))
        assert v == pytest.approx(sum((e - m) ** 2 for e in elements) / len(elements))
    y = grid_after(section, "normalized values y")
    for out in torch_outputs(norm):
        assert (y - out).abs().max() <= 0.0005 + 1e-12  # printed to 3 decimals
    checks = re.findall(r"^    (?:means|variances|normalized values).*  (\S+)  (OK|MISMATCH)$", section, re.M)
    assert len(checks) == 2 + len(torch_outputs(norm)) and all(ok == "OK" for _, ok in checks)


@pytest.mark.parametrize("norm", worked.EXPLAINED)
def test_hand_calculation_lines_add_up(printed, norm):
    section = sections(printed)[NORMS[norm].label]
    for name in ("mean", "var"):
        m = re.search(rf"^    {name} += \(([\d + ]+)\) / (\d+) = (\d+) / \2 = ({NUMBER})$", section, re.M)
        terms = [float(t) for t in m[1].split(" + ")]
        assert sum(terms) == float(m[3]) and float(m[3]) / float(m[2]) == float(m[4])
    label, elements, mean, var = set_rows(section)[0]
    first = re.search(rf"first element: .* = ({NUMBER})$", section, re.M)
    assert float(first[1]) == pytest.approx((elements[0] - mean) / var ** 0.5, abs=5e-4)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_explained_values_for_every_group_count_equal_torchs(groups):
    for norm in worked.EXPLAINED:
        e = worked.explain_norm(norm, EXAMPLE, groups)
        mean, var = torch_statistics(norm, groups)
        torch.testing.assert_close(torch.tensor([s.mean for s in e.sets], dtype=torch.float64), mean)
        torch.testing.assert_close(torch.tensor([s.var for s in e.sets], dtype=torch.float64), var)
        for out in torch_outputs(norm, groups):
            torch.testing.assert_close(e.normalized, out)
        assert all(c.ok for c in e.checks)
    # GN with 1 group is LN, with C groups IN
    gn = worked.explain_norm("gn", EXAMPLE, groups).normalized
    if groups in (1, C):
        torch.testing.assert_close(gn, worked.explain_norm("ln" if groups == 1 else "in", EXAMPLE).normalized)


def test_the_torch_check_catches_a_wrong_grouping(monkeypatch):
    """Were GN's groups interleaved channels (0, 2 | 1, 3) instead of neighbours (0, 1 | 2, 3), or
    LN's sets BN's, the comparison with torch would say so, and the command would fail."""
    real = worked.statistic_sets

    def interleaved(norm, shape, groups=2):
        if norm == "gn":
            sample = torch.arange(shape[0]).view(-1, 1, 1, 1)
            channel = torch.arange(shape[1]).view(1, -1, 1, 1)
            return (sample * groups + channel % groups).expand(shape).contiguous()
        return real("bn" if norm == "ln" else norm, shape, groups)

    monkeypatch.setattr(worked, "statistic_sets", interleaved)
    e = worked.explain(("gn", "ln"))
    assert [c.ok for ne in e.norms for c in ne.checks] == [False] * 7
    result = run("explain", "--norm", "gn")
    assert result.exit_code == 1
    assert "MISMATCH" in result.output and "differ from torch" in result.output


def test_counts_parameters_running_statistics_and_modes(printed):
    counts = {m[0]: m[1:] for m in
              re.findall(r"^    (BN|LN|GN|IN) +(?:C|N|N x G|N x C) +(\d+) +(\d+) +(\d+) \(", printed, re.M)}
    layer_params = {norm: sum(p.numel() for p in NORMS[norm].make(C, 2).parameters()) for norm in worked.EXPLAINED}
    assert counts == {
        "BN": (str(C), str(C), str(layer_params["bn"])),
        "LN": (str(N), "128", str(layer_params["ln"])),
        "GN": (str(N * 2), str(128 * 2), str(layer_params["gn"])),
        "IN": (str(N * C), str(128 * C), str(layer_params["in"])),
    }
    assert set(layer_params.values()) == {2 * C}
    layernorm_params = sum(p.numel() for p in nn.LayerNorm((C, H, W)).parameters())
    assert layernorm_params == 2 * C * H * W
    assert (f"per channel ({2 * C} here), while\n"
            f"  nn.LayerNorm(({C}, {H}, {W}))'s is per element ({layernorm_params} here)") in printed

    bn = nn.BatchNorm2d(C).double().train()
    with torch.no_grad():
        train_out = bn(EXAMPLE)
        eval_out = bn.eval()(EXAMPLE)
        alone = nn.BatchNorm2d(C).double().train()(EXAMPLE[:1])
    running_mean = re.findall(rf"channel \d: running_mean = .* = ({NUMBER})$", printed, re.M)
    running_var = re.findall(rf"^ +running_var  = .* = ({NUMBER})$", printed, re.M)
    assert [float(m) for m in running_mean] == pytest.approx(bn.running_mean.tolist(), abs=1e-4)
    assert [float(v) for v in running_var] == pytest.approx(bn.running_var.tolist(), abs=1e-4)

    modes = {m[0]: (float(m[1]), float(m[2]))
             for m in re.findall(r"^    (BN|LN|GN|IN) +(\S+) +(\S+)$", printed, re.M)}
    assert modes["BN"][0] == pytest.approx(float((eval_out - train_out).abs().max()), abs=1e-4)
    assert modes["BN"][1] == pytest.approx(float((alone - train_out[:1]).abs().max()), abs=1e-4)
    assert modes["BN"][0] > 0.1 and modes["BN"][1] > 0.1
    assert modes["LN"] == modes["GN"] == modes["IN"] == (0.0, 0.0)


@pytest.mark.parametrize("groups", [2, 4])
def test_figure_has_one_panel_per_norm_with_the_sharing_elements_highlighted(groups):
    fig = plots.normalization_sets(*worked.figure_panels(groups))
    highlight = matplotlib.colors.to_rgba(plots.HIGHLIGHT)
    expected = {"BN": N * H * W, "LN": C * H * W, "IN": H * W, "GN": C // groups * H * W}
    assert len(fig.axes) == len(expected)
    for ax, (label, count) in zip(fig.axes, expected.items()):
        assert ax.get_title().startswith(label)
        colors = [tuple(col.get_facecolor()[0]) for col in ax.collections]
        assert len(colors) == N * C * H * W  # one cube per element
        assert sum(c == pytest.approx(highlight) for c in colors) == count
        assert f"{count} elements" in ax.get_title()


def test_explain_saves_the_figure(tmp_path):
    result = run("explain", "--norm", "gn", "--groups", "4", "--out", str(tmp_path / "results"))
    assert result.exit_code == 0, result.output
    assert "GN (group norm): nn.GroupNorm(4, 4)" in result.output and "BN (" not in result.output
    image = matplotlib.image.imread(tmp_path / "results" / "normalizations.png")
    assert image.shape[0] > 200 and image.shape[1] > 800


@pytest.mark.parametrize("args, message", [
    (["explain", "--norm", "gn", "--groups", "3"],
     "--groups 3 does not divide the example's 4 channels; valid choices: 1, 2, 4"),
    (["explain", "--groups", "0", "--out", "x"], "--groups 0 does not divide the example's 4 channels"),
    (["explain", "--norm", "batch"], "'batch' is not one of 'all', 'bn', 'ln', 'gn', 'in'"),
    (["summary", "--norm", "gn", "--groups", "3"],
     "--groups 3 does not divide the mnist model's channel counts [10, 20]; valid choices: 1, 2, 5, 10"),
    (["summary", "--norm", "gn", "--groups", "5", "--dataset", "cifar10"], "valid choices: 1, 2, 4, 8, 16"),
    (["summary", "--norm", "xx"], "'xx' is not one of 'bn', 'ln', 'gn', 'in', 'none'"),
])
def test_bad_names_and_group_counts_are_usage_errors(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


@pytest.mark.parametrize("dataset", list(ARCHITECTURES))
def test_summary_totals_equal_the_models_parameter_count(dataset):
    for norm in NORMS:
        result = run("summary", "--norm", norm, "--dataset", dataset)
        assert result.exit_code == 0, result.output
        model = Net(dataset, norm, 2)
        total = re.search(r"^total +([\d,]+) +([\d,]+)$", result.output, re.M)
        assert int(total[1].replace(",", "")) == count_parameters(model)
        layer_rows = re.findall(r"^(?!layer|total)\w+ +\S+ +([\d,]+) +([\d,]+)$", result.output, re.M)
        assert sum(int(p.replace(",", "")) for p, _ in layer_rows) == count_parameters(model)
        assert f"{count_parameters(model):,} trainable parameters" in result.output
    # the norms add gamma and beta per normalized channel, nothing else
    with_norm, without = count_parameters(Net(dataset, "bn")), count_parameters(Net(dataset, "none"))
    assert with_norm - without == 2 * sum(ARCHITECTURES[dataset].norm_channels)


@pytest.mark.parametrize("dataset", list(ARCHITECTURES))
def test_ln_in_the_actual_model_has_layernorm_statistics_over_chw(dataset):
    """Every ln layer of the real network, on its real input shape, normalizes each sample over
    (C, H, W) exactly as torch.nn.LayerNorm((C, H, W)) does (affine aside)."""
    model = Net(dataset, "ln").eval()
    seen = []

    def compare(layer, inputs, output):
        x = inputs[0]
        seen.append(x.shape[1])
        reference = F.layer_norm(x, x.shape[1:], eps=layer.eps)
        torch.testing.assert_close((output - layer.bias.view(1, -1, 1, 1)) / layer.weight.view(1, -1, 1, 1),
                                   reference, rtol=1e-4, atol=1e-4)

    for layer in model.modules():
        if isinstance(layer, nn.GroupNorm):
            nn.init.uniform_(layer.weight, 0.5, 1.5)  # a non-trivial affine that the test undoes
            nn.init.uniform_(layer.bias, -1, 1)
            layer.register_forward_hook(compare)
    arch = ARCHITECTURES[dataset]
    with torch.no_grad():
        model(torch.randn(3, arch.in_channels, arch.image_size, arch.image_size))
    assert tuple(seen) == arch.norm_channels


def readme_block(command: str) -> str:
    """The output pasted under `$ COMMAND` in docs/normalizations.md, the worked example."""
    return (ROOT / "docs" / "normalizations.md").read_text().split(f"$ {command}\n", 1)[1].split("```", 1)[0]


def without_rounding_noise(text: str) -> str:
    """float64 differences of a few ulps (like 2.2e-16) may vary across CPUs; the rest may not."""
    return re.sub(r"\d\.\de-1\d", "<ulps>", text)


def test_readme_shows_the_real_output_and_figure(printed):
    assert without_rounding_noise(readme_block("normlab explain")) == without_rounding_noise(printed)
    assert readme_block("normlab summary --norm bn") == run("summary", "--norm", "bn").output
    assert (ROOT / "docs" / "normalizations.png").is_file()
    rows = re.findall(r"^\| (`bn`.*|`in`.*|`none`) \| ([\d,]+) \| ([\d,]+) \|$",
                      (ROOT / "docs" / "normalizations.md").read_text(), re.M)
    listed = {}  # (dataset, norm, groups) -> the count the README gives
    for norms, mnist, cifar in rows:
        # a row lists norms, and for gn the MNIST group counts it covers ("1, 2 or 5 groups", "10 groups")
        mnist_groups = [int(g) for g in re.findall(r"(\d+)(?:,| or| groups)", norms.split("CIFAR")[0])]
        for norm in re.findall(r"`(\w+)`", norms):
            if norm in NORMS:
                for g in (mnist_groups if norm == "gn" else [2]):
                    listed["mnist", norm, g] = int(mnist.replace(",", ""))
                if norm != "gn" or "CIFAR-10: any" in norms:
                    for g in (valid_groups("cifar10") if norm == "gn" else [2]):
                        listed["cifar10", norm, g] = int(cifar.replace(",", ""))
    expected = {(d, n, g): count_parameters(Net(d, n, g)) for d in ARCHITECTURES for n in NORMS
                for g in (valid_groups(d) if n == "gn" else [2])}
    assert listed == expected
