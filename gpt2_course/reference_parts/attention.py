"""Causal attention, one head and many, on torch's fused kernel."""

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig
from gpt2_course.reference_parts._params import add_parameters


def single_head_attention(
    x: Float[Tensor, "pos d_model"],
    W_Q: Float[Tensor, "d_model d_head"],
    W_K: Float[Tensor, "d_model d_head"],
    W_V: Float[Tensor, "d_model d_head"],
    b_Q: Float[Tensor, "d_head"],
    b_K: Float[Tensor, "d_head"],
    b_V: Float[Tensor, "d_head"],
    W_O: Float[Tensor, "d_head d_model"],
) -> Float[Tensor, "pos d_model"]:
    q, k, v = (F.linear(x, W.T, b) for W, b in ((W_Q, b_Q), (W_K, b_K), (W_V, b_V)))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True) @ W_O  # scales by 1/sqrt(d_head)


class MultiHeadAttention(nn.Module):
    IGNORE: float = float("-inf")

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        heads, d_model, d_head = cfg.n_heads, cfg.d_model, cfg.d_head
        add_parameters(
            self,
            cfg,
            {
                **{w: (heads, d_model, d_head) for w in ("W_Q", "W_K", "W_V")},
                "W_O": (heads, d_head, d_model),
                **{b: (heads, d_head) for b in ("b_Q", "b_K", "b_V")},
                "b_O": (d_model,),
            },
        )

    def apply_causal_mask(
        self, scores: Float[Tensor, "batch n_heads query_pos key_pos"]
    ) -> Float[Tensor, "batch n_heads query_pos key_pos"]:
        q_len, k_len = scores.shape[-2:]
        # query i sits at position i + k_len - q_len (after k_len - q_len cached keys)
        query_at = torch.arange(k_len - q_len, k_len, device=scores.device)
        future = torch.arange(k_len, device=scores.device) > query_at[:, None]
        return scores.masked_fill(future, self.IGNORE)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        q, k, v = (
            einops.einsum(x, W, "b p d_model, h d_model d_head -> b h p d_head") + b[:, None]
            for W, b in ((self.W_Q, self.b_Q), (self.W_K, self.b_K), (self.W_V, self.b_V))
        )
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return (
            einops.einsum(z, self.W_O, "b h p d_head, h d_head d_model -> b p d_model") + self.b_O
        )
