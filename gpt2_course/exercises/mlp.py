"""Notebook 04: GPT-2's GELU and the MLP.

Fill in `gelu_new`, then `MLP.forward`. Keep the names of the parameters.
"""

import math  # noqa: F401  (you will want it)

import einops  # noqa: F401  (you will want it)
import torch
from jaxtyping import Float
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig


def gelu_new(x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """GPT-2's GELU, the tanh approximation, applied elementwise:

        0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))

    Any shape in, the same shape out; do not change x in place.
    """
    raise NotImplementedError("gelu_new: write it in gpt2_course/exercises/mlp.py")


class MLP(nn.Module):
    """Expand to d_mlp, apply GELU, project back to d_model."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        nn.init.normal_(self.W_in, std=cfg.init_range)
        nn.init.normal_(self.W_out, std=cfg.init_range)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """x @ W_in + b_in, then gelu_new, then @ W_out + b_out: shape [batch, pos, d_model]."""
        raise NotImplementedError("MLP.forward: write it in gpt2_course/exercises/mlp.py")
