"""Notebook 04: one transformer block.

Fill in `forward`. `__init__` is given: it builds the block from your own
LayerNorm, attention and MLP (or the reference's, where you chose them with
`parts.use_solution`). Keep the names ln1, attn, ln2 and mlp.
"""

from jaxtyping import Float
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.config import TransformerConfig


class TransformerBlock(nn.Module):
    """Attention then MLP, each reading a normalised copy of the residual stream."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1 = parts.LayerNorm(cfg)
        self.attn = parts.MultiHeadAttention(cfg)
        self.ln2 = parts.LayerNorm(cfg)
        self.mlp = parts.MLP(cfg)

    def forward(
        self, resid_pre: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """A pre-LayerNorm block, as in GPT-2:

        resid_mid  = resid_pre + attention of the normalised resid_pre (ln1)
        resid_post = resid_mid + MLP of the normalised resid_mid (ln2)

        Return resid_post; do not change resid_pre in place.
        """
        raise NotImplementedError(
            "TransformerBlock.forward: write it in gpt2_course/exercises/block.py"
        )
