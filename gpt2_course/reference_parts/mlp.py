"""GPT-2's MLP on torch's kernels."""

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig
from gpt2_course.reference_parts._params import add_parameters


def gelu_new(x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        add_parameters(
            self,
            cfg,
            {
                "W_in": (cfg.d_model, cfg.d_mlp),
                "b_in": (cfg.d_mlp,),
                "W_out": (cfg.d_mlp, cfg.d_model),
                "b_out": (cfg.d_model,),
            },
        )

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        hidden = gelu_new(F.linear(x, self.W_in.T, self.b_in))
        return F.linear(hidden, self.W_out.T, self.b_out)
