"""The one CNN family, built from the normalization registry (normlab.engine.registry)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normlab.engine.fast.cpu_dropout import Dropout
from normlab.engine.fast.triton_conv import Conv2d
from normlab.engine.fast.triton_norms import ConvBlock
from normlab.engine.registry import ARCHITECTURES, NORMS, check_norm


def normalizes_each_channel_alone(layer: nn.Module) -> bool:
    """Whether the layer gives every channel of every sample mean beta over the pixels
    (instance norm, or group norm with one channel per group), whatever the input."""
    return isinstance(layer, nn.InstanceNorm2d) or (
        isinstance(layer, nn.GroupNorm) and layer.num_groups == layer.num_channels)


def _conv_block(c_in: int, c_out: int, norm: str, groups: int, dropout: float, padding: int = 0,
                before_pooling: bool = False):
    """3x3 conv (no bias), ReLU, norm, dropout: the reference notebooks' block order. Before
    global average pooling, a norm that normalizes each channel alone is left out (Net says why)."""
    layer = NORMS[norm].make(c_out, groups)
    if before_pooling and normalizes_each_channel_alone(layer):
        layer = nn.Identity()
    return ConvBlock(  # nn.Sequential; on a GPU the norm's kernels also run the ReLU and the dropout's backward
        Conv2d(c_in, c_out, 3, padding=padding, bias=False),
        nn.ReLU(),
        layer,
        Dropout(dropout),
    )


class Net(nn.Sequential):
    """The reference CNN: conv1-conv2, 1x1 transition + pool, conv3-conv6, GAP, 1x1 head.

    Returns log-probabilities, so the loss is ``nll_loss`` and ``exp`` gives confidences.

    How the last block differs: global average pooling reads each channel's mean over the
    pixels, and a norm that normalizes each channel of each sample alone (``in``, ``gn`` with
    one channel per group: 10 groups on MNIST) sets exactly that mean to its beta, whatever the
    input, so the logits would be constant and the model could not learn. conv6 therefore
    keeps such a norm out (conv, ReLU, dropout; 20 parameters fewer on MNIST). Every other norm
    keeps its place there: BN, LN and GN with several channels per group leave the pooled
    means input-dependent, and their models are the reference notebooks' (7,750 parameters).

    Without a norm nothing rescales the activations: PyTorch's default initialization shrinks
    them about 2.5x per layer (to 1e-3 at the head) and that model does not learn, so ``none``
    starts from He initialization, which keeps their scale through the ReLUs.
    """

    def __init__(self, dataset: str = "mnist", norm: str = "bn", groups: int = 2, dropout: float = 0.05):
        check_norm(norm, groups, dataset)
        arch = ARCHITECTURES[dataset]
        c1, c2, t, c3, c4, c5, c6 = arch.widths
        super().__init__()
        self.add_module("conv1", _conv_block(arch.in_channels, c1, norm, groups, dropout))
        self.add_module("conv2", _conv_block(c1, c2, norm, groups, dropout))
        self.add_module("transition", nn.Sequential(Conv2d(c2, t, 1, bias=False), nn.MaxPool2d(2)))
        self.add_module("conv3", _conv_block(t, c3, norm, groups, dropout))
        self.add_module("conv4", _conv_block(c3, c4, norm, groups, dropout))
        self.add_module("conv5", _conv_block(c4, c5, norm, groups, dropout))
        self.add_module("conv6", _conv_block(c5, c6, norm, groups, dropout, padding=1, before_pooling=True))
        self.add_module("gap", nn.AdaptiveAvgPool2d(1))
        self.add_module("head", Conv2d(c6, arch.classes, 1, bias=False))
        self.add_module("flatten", nn.Flatten())
        self.add_module("log_softmax", nn.LogSoftmax(dim=1))
        if norm == "none":
            for layer in self.modules():
                if isinstance(layer, nn.Conv2d) and layer is not self.head:
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class LayerRow:
    name: str
    output_shape: tuple[int, ...]
    parameters: int
    mult_adds: int


def summarize(model: Net, dataset: str = "mnist") -> list[LayerRow]:
    """Per top-level layer: output shape for one sample, parameters, conv mult-adds.

    Mult-adds count convolutions only (each output element costs in_channels/groups x
    kh x kw of them); norms, activations and pooling are negligible and count as 0.
    """
    arch = ARCHITECTURES[dataset]
    conv_mult_adds: dict[nn.Module, int] = {}

    def record(layer: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        per_output = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        conv_mult_adds[layer] = output[0].numel() * per_output

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    rows: list[LayerRow] = []
    device = next(model.parameters()).device  # a model trained on a GPU is summarized there
    x = torch.zeros(1, arch.in_channels, arch.image_size, arch.image_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, layer in model.named_children():
                x = layer(x)
                mult_adds = sum(conv_mult_adds.get(m, 0) for m in layer.modules())
                rows.append(LayerRow(name, tuple(x.shape[1:]), count_parameters(layer), mult_adds))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows


def summary_text(model: Net, dataset: str = "mnist") -> str:
    """The per-layer table as fixed-width text, with totals."""
    rows = summarize(model, dataset)
    lines = [f"{'layer':<12}{'output shape':>16}{'parameters':>12}{'mult-adds':>12}"]
    for r in rows:
        shape = "x".join(map(str, r.output_shape))
        lines.append(f"{r.name:<12}{shape:>16}{r.parameters:>12,}{r.mult_adds:>12,}")
    lines.append(f"{'total':<12}{'':>16}{sum(r.parameters for r in rows):>12,}{sum(r.mult_adds for r in rows):>12,}")
    return "\n".join(lines)
