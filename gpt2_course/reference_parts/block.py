"""A pre-LayerNorm block of reference parts."""

from jaxtyping import Float
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig
from gpt2_course.reference_parts.attention import MultiHeadAttention
from gpt2_course.reference_parts.layernorm import LayerNorm
from gpt2_course.reference_parts.mlp import MLP


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1, self.attn = LayerNorm(cfg), MultiHeadAttention(cfg)
        self.ln2, self.mlp = LayerNorm(cfg), MLP(cfg)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        for norm, sublayer in ((self.ln1, self.attn), (self.ln2, self.mlp)):
            x = x + sublayer(norm(x))
        return x
