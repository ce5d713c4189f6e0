"""One pre-LayerNorm transformer block."""

from jaxtyping import Float
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.config import TransformerConfig


class TransformerBlock(nn.Module):
    """Attention then MLP: each reads a normalised copy of the residual stream and adds to it."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        # parts.X is the learner's component, or the reference one if they chose it
        self.ln1 = parts.LayerNorm(cfg)
        self.attn = parts.MultiHeadAttention(cfg)
        self.ln2 = parts.LayerNorm(cfg)
        self.mlp = parts.MLP(cfg)

    def forward(
        self, resid_pre: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        resid_mid = resid_pre + self.attn(self.ln1(resid_pre))
        return resid_mid + self.mlp(self.ln2(resid_mid))
