"""Dropout whose CPU masks cost a quarter of torch's random draws."""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Dropout):
    """``nn.Dropout`` that draws a quarter of the random numbers on the CPU.

    For its mask torch draws one Mersenne-twister number per element, a quarter of a
    CPU training step of this model. Here one 64-bit draw gives four 16-bit values, and an
    element is dropped when its value is among the lowest ``round(p * 2**16)`` of the 2**16
    (p = 0.05 drops 3277/65536 = 0.050003); kept elements are scaled by one over the kept
    fraction, so the expectation is the input. Elsewhere (CUDA's Philox draws cost
    nothing here) and in eval mode it is ``nn.Dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = round(self.p * 2**16)
        if not self.training or x.device.type != "cpu" or dropped in (0, 2**16):
            return super().forward(x)
        # every bit random (a bare random_() leaves the top bit 0: that lane would never drop)
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        values = words.view(torch.int16)[: x.numel()].view(x.shape)
        keep = torch.where(values >= dropped - 2**15, 2**16 / (2**16 - dropped), 0.0)
        return x * keep
