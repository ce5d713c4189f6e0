"""Notebook 02: layer normalisation.

Fill in `forward`. Keep the parameter names `w` and `b`.
"""

import torch
from jaxtyping import Float
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig


class LayerNorm(nn.Module):
    """Centre each residual vector, scale it to unit variance, then apply w and b."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """Normalise x over d_model, then scale by w and shift by b.

        Subtract the mean, divide by sqrt(variance + eps) with the biased variance
        (divide by d_model, not d_model - 1) and eps = cfg.layer_norm_eps, then
        multiply by w and add b. Do not change x in place.
        """
        raise NotImplementedError(
            "LayerNorm.forward: write it in gpt2_course/exercises/layernorm.py"
        )
