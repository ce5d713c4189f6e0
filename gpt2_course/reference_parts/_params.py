"""The contract's parameters, created once for every reference part."""

import torch
from torch import nn

from gpt2_course.config import TransformerConfig


def add_parameters(module: nn.Module, cfg: TransformerConfig, shapes: dict[str, tuple]) -> None:
    """Weights (names starting with W) drawn from N(0, init_range); biases and LayerNorm
    parameters at their neutral value (w = 1, everything else 0)."""
    for name, shape in shapes.items():
        if name.startswith("W"):
            value = torch.empty(shape).normal_(std=cfg.init_range)
        else:
            value = torch.ones(shape) if name == "w" else torch.zeros(shape)
        module.register_parameter(name, nn.Parameter(value))
