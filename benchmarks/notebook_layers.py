"""The reference notebooks' layers swapped into normlab's model, for the benchmarks that time
normlab against them. A module of its own so that the fresh processes of cpu_step.py import
torch and the engine only, not speed.py's MLflow (2.1 s of each 8.4 s process on 2 cores)."""

from __future__ import annotations

import torch

from normlab.engine.fast.cpu_dropout import Dropout
from normlab.engine.fast.triton_conv import use_triton_convs
from normlab.engine.fast.triton_norms import use_triton_norms


def with_torch_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """The model with torch's nn.Dropout in place of normlab's (what the CPU dropout saves)."""
    for block in model.modules():
        for name, layer in block.named_children():
            if isinstance(layer, Dropout):
                setattr(block, name, torch.nn.Dropout(layer.p))
    return model


def as_notebook_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model as the notebooks have it: torch's own nn.Dropout, convolutions (cuDNN) and norms."""
    use_triton_convs(with_torch_dropout(model), False)
    use_triton_norms(model, False)
    return model
