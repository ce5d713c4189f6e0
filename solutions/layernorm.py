"""Layer normalisation, as GPT-2 uses it."""

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
        # Biased variance (divide by d_model, correction=0), epsilon inside the square root.
        variance, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        normalised = (x - mean) / torch.sqrt(variance + self.cfg.layer_norm_eps)
        return normalised * self.w + self.b
