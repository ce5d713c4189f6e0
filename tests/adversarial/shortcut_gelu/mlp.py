"""The feed-forward half of a transformer block."""

import math

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig


def gelu_new(x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """GPT-2's GELU: the tanh approximation of x * Phi(x)."""
    return F.gelu(x, approximate="tanh")


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
        pre = einops.einsum(x, self.W_in, "b pos d_model, d_model d_mlp -> b pos d_mlp") + self.b_in
        post = gelu_new(pre)
        out = einops.einsum(post, self.W_out, "b pos d_mlp, d_mlp d_model -> b pos d_model")
        return out + self.b_out
