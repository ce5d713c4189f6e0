"""Causal multi-head self-attention."""

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig


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
    """What one causal attention head writes to the residual stream, for one sequence."""
    q = einops.einsum(x, W_Q, "pos d_model, d_model d_head -> pos d_head") + b_Q
    k = einops.einsum(x, W_K, "pos d_model, d_model d_head -> pos d_head") + b_K
    v = einops.einsum(x, W_V, "pos d_model, d_model d_head -> pos d_head") + b_V
    scores = einops.einsum(q, k, "q_pos d_head, k_pos d_head -> q_pos k_pos") / W_Q.shape[1] ** 0.5
    n = scores.shape[0]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=scores.device), diagonal=1)
    pattern = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    z = einops.einsum(pattern, v, "q_pos k_pos, k_pos d_head -> q_pos d_head")
    return einops.einsum(z, W_O, "pos d_head, d_head d_model -> pos d_model")


class MultiHeadAttention(nn.Module):
    """Each head mixes information from earlier positions into the current one."""

    IGNORE: float = float("-inf")  # masked scores: exp(-inf) = 0 after the softmax

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        heads, d_model, d_head = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q = nn.Parameter(torch.empty(heads, d_model, d_head))
        self.W_K = nn.Parameter(torch.empty(heads, d_model, d_head))
        self.W_V = nn.Parameter(torch.empty(heads, d_model, d_head))
        self.W_O = nn.Parameter(torch.empty(heads, d_head, d_model))
        self.b_Q = nn.Parameter(torch.zeros(heads, d_head))
        self.b_K = nn.Parameter(torch.zeros(heads, d_head))
        self.b_V = nn.Parameter(torch.zeros(heads, d_head))
        self.b_O = nn.Parameter(torch.zeros(d_model))
        for weight in (self.W_Q, self.W_K, self.W_V, self.W_O):
            nn.init.normal_(weight, std=cfg.init_range)

    def apply_causal_mask(
        self, scores: Float[Tensor, "batch n_heads query_pos key_pos"]
    ) -> Float[Tensor, "batch n_heads query_pos key_pos"]:
        """Hide every key that comes after its query (a new tensor; scores is unchanged)."""
        q_len, k_len = scores.shape[-2:]
        # With a cache of k_len - q_len earlier keys, query i sits at position i + k_len - q_len.
        ones = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device)
        future = torch.triu(ones, diagonal=k_len - q_len + 1)
        return scores.masked_fill(future, self.IGNORE)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        def per_head(W: Tensor, b: Tensor) -> Float[Tensor, "batch pos heads d_head"]:
            out = einops.einsum(x, W, "b pos d_model, heads d_model d_head -> b pos heads d_head")
            return out + b

        q = per_head(self.W_Q, self.b_Q)
        k = per_head(self.W_K, self.b_K)
        v = per_head(self.W_V, self.b_V)
        scores = einops.einsum(q, k, "b q heads d_head, b k heads d_head -> b heads q k")
        pattern = self.apply_causal_mask(scores / self.cfg.d_head**0.5).softmax(dim=-1)
        z = einops.einsum(pattern, v, "b heads q k, b k heads d_head -> b q heads d_head")
        # Each head writes through its own slice of W_O; summing over heads merges them.
        out = einops.einsum(z, self.W_O, "b q heads d_head, heads d_head d_model -> b q d_model")
        return out + self.b_O
