"""How BN, LN, GN and IN normalize, worked on a tensor small enough to check by hand.

All four norms apply one rule to a set of elements: subtract the set's mean, divide by
sqrt(variance + eps). They differ only in which elements form a set. ``explain`` computes
the sets, their statistics and the normalized values from that rule alone, then has the
torch layers normlab builds (``registry.NORMS``) compute the same things and records the
largest difference. ``render`` turns the result into text; it computes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normlab.engine.registry import NORMS
from normlab.errors import ConfigError

# N=2 samples, C=4 channels, 2x2 pixels. Chosen so that every set of every norm (and GN
# with any valid group count) has an integer mean and an integer variance.
EXAMPLE = torch.tensor(
    [
        [[[1, 7], [9, 7]], [[3, 3], [1, 1]], [[3, 1], [9, 3]], [[7, 7], [1, 1]]],
        [[[7, 7], [1, 9]], [[9, 3], [9, 3]], [[5, 5], [9, 5]], [[5, 1], [1, 1]]],
    ],
    dtype=torch.float64,
)
EXPLAINED = ("bn", "ln", "gn", "in")
EPS = 1e-5  # torch's default for every norm layer
MOMENTUM = 0.1  # BatchNorm2d's default running-statistics momentum
TOLERANCE = 1e-9  # float64 arithmetic; a wrong set or formula is off by far more
FULL_NAMES = {"bn": "batch norm", "ln": "layer norm", "gn": "group norm", "in": "instance norm"}
SETS_FORMULA = {"bn": "C", "ln": "N", "gn": "N x G", "in": "N x C"}
LAYER_NAMES = {"bn": "nn.BatchNorm2d({c})", "ln": "nn.GroupNorm(1, {c})", "gn": "nn.GroupNorm({g}, {c})",
               "in": "nn.GroupNorm({c}, {c})"}
FIGURE_ORDER = ("bn", "ln", "in", "gn")  # as in the Group Normalization paper's Figure 2


def valid_example_groups() -> list[int]:
    channels = EXAMPLE.shape[1]
    return [g for g in range(1, channels + 1) if channels % g == 0]


def check_example_groups(groups: int) -> None:
    """Raise ConfigError unless groups divides the example's channel count."""
    if groups not in valid_example_groups():
        choices = ", ".join(map(str, valid_example_groups()))
        raise ConfigError(f"--groups {groups} does not divide the example's {EXAMPLE.shape[1]} channels; "
                          f"valid choices: {choices}")


def statistic_sets(norm: str, shape: tuple[int, int, int, int], groups: int = 2) -> torch.Tensor:
    """For an (N, C, H, W) shape: the number of the statistics set each element belongs to.

    Sets are numbered sample-major: bn by channel; ln by sample; gn by (sample, group);
    in by (sample, channel).
    """
    n, c, h, w = shape
    sample = torch.arange(n).view(n, 1, 1, 1)
    channel = torch.arange(c).view(1, c, 1, 1)
    ids = {
        "bn": channel + 0 * sample,
        "ln": sample + 0 * channel,
        "gn": sample * groups + channel // (c // groups),
        "in": sample * c + channel,
    }[norm]
    return ids.expand(n, c, h, w).contiguous()


def set_label(norm: str, index: int, channels: int, groups: int) -> str:
    if norm == "bn":
        return f"channel {index}"
    if norm == "ln":
        return f"sample {index}"
    if norm == "gn":
        sample, group = divmod(index, groups)
        width = channels // groups
        if width == 1:
            return f"sample {sample}, channel {group}"
        return f"sample {sample}, channels {group * width}-{group * width + width - 1}"
    sample, channel = divmod(index, channels)
    return f"sample {sample}, channel {channel}"


@dataclass(frozen=True)
class StatSet:
    """One set of elements that share a mean and variance."""

    label: str
    blocks: tuple[tuple[float, ...], ...]  # the set's values, one tuple per (sample, channel) it covers
    mean: float
    var: float  # biased: divided by the element count

    @property
    def values(self) -> tuple[float, ...]:
        return tuple(v for block in self.blocks for v in block)


@dataclass(frozen=True)
class Check:
    """A value recomputed by torch, and how far it is from ours."""

    what: str
    against: str
    max_abs_diff: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= TOLERANCE


@dataclass(frozen=True, eq=False)
class NormExplanation:
    norm: str
    layer: str  # the registry's layer for this input, as a reader would write it
    sets: tuple[StatSet, ...]
    set_of: torch.Tensor  # (N, C, H, W): set number of each element
    normalized: torch.Tensor  # (N, C, H, W)
    checks: tuple[Check, ...]
    eval_minus_train: float  # max |output in eval mode - output in training mode|, same input
    alone_minus_batched: float  # max |sample 0 normalized alone - sample 0 normalized in the batch|
    parameters: int  # learnable parameters of the layer


@dataclass(frozen=True, eq=False)
class RunningStatistics:
    """What BatchNorm2d keeps after one training batch, starting from mean 0 and variance 1."""

    batch_mean: torch.Tensor  # (C,)
    batch_var: torch.Tensor  # (C,): divided by count, as used for normalizing
    unbiased_var: torch.Tensor  # (C,): divided by count - 1, as used for the running variance
    count: int  # elements per channel: N x H x W
    running_mean: torch.Tensor
    running_var: torch.Tensor
    check: Check


@dataclass(frozen=True, eq=False)
class Explanation:
    x: torch.Tensor
    groups: int
    norms: tuple[NormExplanation, ...]
    running: RunningStatistics
    layernorm_parameters: int  # nn.LayerNorm((C, H, W)) for comparison: affine per element


def compute_sets(x: torch.Tensor, set_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of each set, straight from the definitions."""
    count = int(set_of.max()) + 1
    means = torch.stack([x[set_of == k].mean() for k in range(count)])
    variances = torch.stack([((x[set_of == k] - means[k]) ** 2).mean() for k in range(count)])
    return means, variances


def normalize(x: torch.Tensor, set_of: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    return (x - means[set_of]) / torch.sqrt(variances[set_of] + EPS)


def _torch_statistics(norm: str, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Mean and variance per set as the layer's own kernel saves them (mean, 1/sqrt(var + eps))."""
    n, c, h, w = x.shape
    if norm == "bn":
        _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, MOMENTUM, EPS)
        kernel = "torch.native_batch_norm (the kernel of nn.BatchNorm2d)"
    else:
        g = {"ln": 1, "gn": groups, "in": c}[norm]
        _, mean, invstd = torch.native_group_norm(x, None, None, n, c, h * w, g, EPS)
        kernel = "torch.native_group_norm (the kernel of nn.GroupNorm)"
    return mean.flatten(), invstd.flatten() ** -2 - EPS, kernel


def _registry_layer(norm: str, channels: int, groups: int) -> nn.Module:
    """A new layer as normlab's model builds it (gamma 1, beta 0), in float64 and training mode."""
    return NORMS[norm].make(channels, groups).double().train()


def _reference_layers(norm: str, shape: tuple[int, ...], groups: int) -> dict[str, nn.Module]:
    """The registry's layer, plus the standard torch layer it is equivalent to."""
    n, c, h, w = shape
    layers = {LAYER_NAMES[norm].format(c=c, g=groups): _registry_layer(norm, c, groups)}
    if norm == "ln":
        layers[f"nn.LayerNorm(({c}, {h}, {w}))"] = nn.LayerNorm((c, h, w)).double()
    if norm == "in":
        layers[f"nn.InstanceNorm2d({c})"] = nn.InstanceNorm2d(c).double()
    return layers


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference; infinite when even the number of values differs."""
    return float((a - b).abs().max()) if a.shape == b.shape else float("inf")


def explain_norm(norm: str, x: torch.Tensor = EXAMPLE, groups: int = 2) -> NormExplanation:
    n, c, h, w = x.shape
    set_of = statistic_sets(norm, tuple(x.shape), groups)
    means, variances = compute_sets(x, set_of)
    normalized = normalize(x, set_of, means, variances)

    torch_mean, torch_var, kernel = _torch_statistics(norm, x, groups)
    checks = [Check("means", kernel, _max_diff(means, torch_mean)),
              Check("variances", kernel, _max_diff(variances, torch_var))]
    layers = _reference_layers(norm, tuple(x.shape), groups)
    with torch.no_grad():
        for name, layer in layers.items():
            what = "normalized values" + (" (training mode)" if norm == "bn" else "")
            checks.append(Check(what, name, _max_diff(normalized, layer(x))))
        layer = _registry_layer(norm, c, groups)
        train_out = layer(x)  # for BN this one batch also updates the running statistics
        eval_out = layer.eval()(x)
        alone = _registry_layer(norm, c, groups)(x[:1])

    sets = []
    for k in range(len(means)):
        blocks = tuple(tuple(x[i, j][set_of[i, j] == k].tolist()) for i in range(n) for j in range(c)
                       if bool((set_of[i, j] == k).any()))
        sets.append(StatSet(set_label(norm, k, c, groups), blocks, float(means[k]), float(variances[k])))
    return NormExplanation(
        norm=norm,
        layer=next(iter(layers)),
        sets=tuple(sets),
        set_of=set_of,
        normalized=normalized,
        checks=tuple(checks),
        eval_minus_train=_max_diff(eval_out, train_out),
        alone_minus_batched=_max_diff(alone, train_out[:1]),
        parameters=sum(p.numel() for p in layer.parameters()),
    )


def running_statistics(x: torch.Tensor = EXAMPLE) -> RunningStatistics:
    """BN's running mean and variance after one training batch, by the update rule and by torch."""
    c = x.shape[1]
    per_channel = x.transpose(0, 1).reshape(c, -1)
    count = per_channel.shape[1]
    batch_mean = per_channel.mean(1)
    batch_var = ((per_channel - batch_mean[:, None]) ** 2).mean(1)
    unbiased_var = batch_var * count / (count - 1)
    running_mean = (1 - MOMENTUM) * 0.0 + MOMENTUM * batch_mean
    running_var = (1 - MOMENTUM) * 1.0 + MOMENTUM * unbiased_var
    layer = _registry_layer("bn", c, 1)
    with torch.no_grad():
        layer(x)
    diff = max(_max_diff(running_mean, layer.running_mean), _max_diff(running_var, layer.running_var))
    check = Check("running mean and variance", f"nn.BatchNorm2d({c}) buffers after one training batch", diff)
    return RunningStatistics(batch_mean, batch_var, unbiased_var, count, running_mean, running_var, check)


def explain(norms: tuple[str, ...] = EXPLAINED, groups: int = 2, x: torch.Tensor = EXAMPLE) -> Explanation:
    """Everything ``render`` prints, as data; raises ConfigError for bad names or groups."""
    unknown = [n for n in norms if n not in EXPLAINED]
    if unknown:
        raise ConfigError(f"unknown norm {unknown[0]!r}; valid choices: all, {', '.join(EXPLAINED)}")
    if "gn" in norms:
        check_example_groups(groups)
    n, c, h, w = x.shape
    return Explanation(
        x=x,
        groups=groups,
        norms=tuple(explain_norm(norm, x, groups) for norm in norms),
        running=running_statistics(x),
        layernorm_parameters=sum(p.numel() for p in nn.LayerNorm((c, h, w)).parameters()),
    )


def all_checks_pass(e: Explanation) -> bool:
    return e.running.check.ok and all(c.ok for ne in e.norms for c in ne.checks)


def figure_panels(groups: int = 2, shape: tuple[int, int, int, int] = tuple(EXAMPLE.shape)):
    """(title, mask) per norm for ``plots.normalization_sets``: mask (N, C, H*W) marks set 0,
    the set that holds the first element, as in the worked example's tables."""
    n, c, h, w = shape
    panels = []
    for norm in FIGURE_ORDER:
        set_of = statistic_sets(norm, shape, groups).reshape(n, c, h * w)
        mask = (set_of == 0).numpy()
        name = f"{NORMS[norm].label} ({FULL_NAMES[norm]}{f', G={groups}' if norm == 'gn' else ''})"
        panels.append((f"{name}\n1 of {int(set_of.max()) + 1} sets: {int(mask.sum())} elements", mask))
    title = (f"Elements that share one mean and variance (blue), for the example's N={n}, C={c}, "
             f"H x W = {h} x {w} (drawn as one axis of {h * w})")
    return panels, title


def _num(value: float) -> str:
    """Integers without decimals (the example is built so its statistics are), else up to 4."""
    return str(int(round(value))) if abs(value - round(value)) < 1e-9 else f"{value:.4f}".rstrip("0")


def _y(value: float) -> str:
    """Normalized values to 3 decimals: eps = 1e-5 moves none of the example's across a rounding
    boundary at 3 decimals (it does at 4), so a reader who ignores eps gets the same digits."""
    return f"{value:.3f}"


def _diff(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}" if value < 1e-3 else f"{value:.4f}"


def _grid(t: torch.Tensor, fmt, indent: str = "    ") -> list[str]:
    """An (N, C, H, W) tensor as rows of samples, each channel an H x W block."""
    n, c, h, w = t.shape
    cells = [[[fmt(float(v)) for v in t[i, j, r]] for j in range(c)] for i in range(n) for r in range(h)]
    width = max(len(s) for row in cells for block in row for s in block)
    block_width = max(w * (width + 1), len(f"channel {c - 1}")) + 2
    lines = [indent + " " * 10 + "".join(f"channel {j}".ljust(block_width) for j in range(c)).rstrip()]
    for i in range(n):
        for r in range(h):
            name = f"sample {i}" if r == 0 else ""
            blocks = ("".join(f"{s:>{width + 1}}" for s in cells[i * h + r][j]) for j in range(c))
            lines.append(indent + f"{name:<9}" + "".join(b.ljust(block_width) for b in blocks).rstrip())
    return lines


def _by_hand(s: StatSet) -> list[str]:
    values = s.values
    squares = [(v - s.mean) ** 2 for v in values]
    first = values[0]
    return [
        f"by hand, {s.label}:",
        f"  mean = ({' + '.join(_num(v) for v in values)}) / {len(values)} = {_num(sum(values))} / {len(values)} "
        f"= {_num(s.mean)}",
        f"  var  = ({' + '.join(_num(q) for q in squares)}) / {len(values)} = {_num(sum(squares))} / {len(values)} "
        f"= {_num(s.var)}",
        f"  first element: ({_num(first)} - {_num(s.mean)}) / sqrt({_num(s.var)} + {EPS:g}) "
        f"= {_y((first - s.mean) / (s.var + EPS) ** 0.5)}",
    ]


def render_norm(e: NormExplanation) -> str:
    size = len(e.sets[0].values)
    mode = ", training mode" if e.norm == "bn" else ""
    lines = [
        f"{NORMS[e.norm].label} ({FULL_NAMES[e.norm]}): {e.layer}{mode}",
        f"  one mean and variance over {NORMS[e.norm].statistics_over}: {len(e.sets)} sets of {size} elements",
    ]
    label_width = max(len(s.label) for s in e.sets) + 2
    value_width = max(len(" | ".join(" ".join(_num(v) for v in b) for b in s.blocks)) for s in e.sets) + 2
    lines.append(f"    {'set':<{label_width}}{'elements':<{value_width}}{'mean':>6}{'var':>6}")
    for s in e.sets:
        elements = " | ".join(" ".join(_num(v) for v in b) for b in s.blocks)
        lines.append(f"    {s.label:<{label_width}}{elements:<{value_width}}{_num(s.mean):>6}{_num(s.var):>6}")
    lines += ["  " + line for line in _by_hand(e.sets[0])]
    lines.append("  normalized values y = (x - mean of its set) / sqrt(var of its set + eps):")
    lines += _grid(e.normalized, _y)
    lines.append("  checked against torch (max |difference|):")
    for c in e.checks:
        lines.append(f"    {c.what + ' vs ' + c.against:<78}{_diff(c.max_abs_diff):>9}  {'OK' if c.ok else 'MISMATCH'}")
    return "\n".join(lines)


def render_counts(e: Explanation, large_batch: int = 128) -> str:
    n, c, h, w = e.x.shape
    lines = [
        "Statistics per batch (mean/variance pairs) and learnable parameters",
        f"    {'norm':<6}{'sets':<8}{f'here (N={n})':>12}{f'N={large_batch}':>9}   learnable parameters",
    ]
    for ne in e.norms:
        big = int(statistic_sets(ne.norm, (large_batch, c, h, w), e.groups).max()) + 1
        lines.append(f"    {NORMS[ne.norm].label:<6}{SETS_FORMULA[ne.norm]:<8}{len(ne.sets):>12}{big:>9}   "
                     f"{ne.parameters} (gamma and beta per channel, 2 x C)")
    lines += [
        "  Only BN's count is fixed by C; the others grow with the batch, because each sample gets its own.",
        "  Parameters never grow with the batch: they are sized by C when the layer is built, before any",
        f"  batch exists. LN here is GroupNorm with 1 group: its affine is per channel ({2 * c} here), while",
        f"  nn.LayerNorm(({c}, {h}, {w}))'s is per element ({e.layernorm_parameters} here). "
        "Same statistics, different affine.",
    ]
    return "\n".join(lines)


def render_modes(e: Explanation) -> str:
    r = e.running
    c = e.x.shape[1]
    m = MOMENTUM
    lines = [
        "Training mode vs evaluation mode",
        "  BN in training mode uses the batch's statistics (so a sample's output depends on the other",
        "  samples in its batch) and updates running statistics, starting from mean 0 and variance 1:",
        f"    running_mean = {1 - m:g} x running_mean + {m:g} x batch mean",
        f"    running_var  = {1 - m:g} x running_var  + {m:g} x batch variance x n / (n - 1)",
        f"  (the running variance is the unbiased one; n = N x H x W = {r.count} elements per channel)",
        "  after this one batch:",
    ]
    for j in range(c):
        mean, var, unbiased = (_num(float(t[j])) for t in (r.batch_mean, r.batch_var, r.unbiased_var))
        lines.append(
            f"    channel {j}: running_mean = {1 - m:g} x 0 + {m:g} x {mean} = {_num(float(r.running_mean[j]))}"
        )
        lines.append(
            f"               running_var  = {1 - m:g} x 1 + {m:g} x {var} x {r.count}/{r.count - 1} "
            f"= {1 - m:g} + {m:g} x {unbiased} = {_num(float(r.running_var[j]))}"
        )
    lines += [
        f"    checked against {r.check.against}: max |difference| {_diff(r.check.max_abs_diff)}  "
        f"{'OK' if r.check.ok else 'MISMATCH'}",
        "  In evaluation mode BN normalizes with these running statistics instead, so one image gets one",
        "  answer whatever it is batched with. LN, GN and IN keep no running statistics: they compute them",
        "  from each sample alone, identically in both modes. (BN's difference is large here because after",
        "  one batch its running statistics are still mostly their starting values, 0 and 1.)",
        f"    {'norm':<6}{'max |eval - train output|':>27}{'max |sample 0 alone - in the batch|':>38}",
    ]
    for ne in e.norms:
        eval_diff, alone_diff = _diff(ne.eval_minus_train), _diff(ne.alone_minus_batched)
        lines.append(f"    {NORMS[ne.norm].label:<6}{eval_diff:>27}{alone_diff:>38}")
    return "\n".join(lines)


def render(e: Explanation) -> str:
    n, c, h, w = e.x.shape
    intro = [
        f"Input x: N={n} samples, C={c} channels, {h}x{w} pixels",
        *_grid(e.x, _num),
        "",
        "Every norm here applies one rule to each set of elements that share statistics:",
        "    mean = sum of the set's values / count",
        "    var  = sum of (value - mean)^2 / count        (divide by count, not count - 1)",
        f"    y    = (value - mean) / sqrt(var + eps)      (eps = {EPS:g})",
        "then outputs gamma x y + beta, with a learnable gamma and beta per channel (1 and 0 when the",
        "layer is new, so y is the output here). The norms differ only in which elements form a set.",
        "Below, a set's elements are listed block by block: | separates (sample, channel) blocks, each",
        "block's pixels in reading order.",
    ]
    sections = ["\n".join(intro), *(render_norm(ne) for ne in e.norms), render_counts(e), render_modes(e)]
    return "\n\n".join(sections) + "\n"
