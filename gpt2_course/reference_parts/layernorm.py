"""LayerNorm on torch's kernel."""

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig
from gpt2_course.reference_parts._params import add_parameters


class LayerNorm(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        add_parameters(self, cfg, {"w": (cfg.d_model,), "b": (cfg.d_model,)})

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return F.layer_norm(x, self.w.shape, self.w, self.b, self.cfg.layer_norm_eps)
