"""Notebook 03: causal self-attention, one head and then many.

Fill in `single_head_attention`, then `apply_causal_mask`, then `forward`.
Keep the names and the parameter names and shapes: the checks load GPT-2's
weights into your module by these names.
"""

import einops  # noqa: F401  (you will want it)
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
    """What one causal attention head writes to the residual stream, for one sequence.

    1. q = x @ W_Q + b_Q, and the same for k and v: [pos, d_head] each.
    2. scores[i, j] = q[i] . k[j] / sqrt(d_head): [query_pos, key_pos].
    3. Hide the future: query i may see keys 0..i (itself included); set the
       scores of keys j > i to -inf, before the softmax.
    4. pattern = softmax of the scores over the keys (each row sums to 1).
    5. z = pattern @ v: [pos, d_head]; return z @ W_O: [pos, d_model].

    d_head is W_Q.shape[1] (not necessarily d_model / n_heads). No b_O: a layer
    adds it once, after summing its heads. Do not change any argument in place.
    """
    raise NotImplementedError(
        "single_head_attention: write it in gpt2_course/exercises/attention.py"
    )


class MultiHeadAttention(nn.Module):
    """Each head mixes information from earlier positions into the current one."""

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
        """Return a copy of `scores` in which every query's future keys are hidden.

        Query i may look at keys 0..i (itself included) and must not see keys
        i+1, i+2, ...: set those scores to -inf (or a very negative number such
        as -1e9) so that the softmax gives them weight exactly 0. Leave every
        other score unchanged and do not modify `scores` in place.
        """
        raise NotImplementedError(
            "MultiHeadAttention.apply_causal_mask: write it in gpt2_course/exercises/attention.py"
        )

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """Causal self-attention over the positions of x.

        1. Queries, keys and values for every head: x @ W_Q + b_Q, and the same
           with K and V; shape [batch, pos, n_heads, d_head].
        2. Scores: the dot product of every query with every key, divided by
           sqrt(d_head); shape [batch, n_heads, query_pos, key_pos].
        3. Hide the future with self.apply_causal_mask, then softmax over the keys:
           the attention pattern, each row summing to 1.
        4. z: the pattern-weighted sum of the values, per head.
        5. Output: each head's z through its slice of W_O, summed over the heads,
           plus b_O (added once); shape [batch, pos, d_model].
        """
        raise NotImplementedError(
            "MultiHeadAttention.forward: write it in gpt2_course/exercises/attention.py"
        )
