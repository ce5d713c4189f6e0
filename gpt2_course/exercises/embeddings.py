"""Notebook 01: token embeddings, positional embeddings and the unembedding.

Fill in each `forward`. Keep the class names, parameter names and shapes:
the checks load GPT-2's weights into your modules by these names.
"""

import einops  # noqa: F401  (you will want it)
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig


class Embedding(nn.Module):
    """Look up a learned vector for every token id."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        nn.init.normal_(self.W_E, std=cfg.init_range)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Return the row of W_E for every token: shape [batch, pos, d_model]."""
        raise NotImplementedError(
            "Embedding.forward: write it in gpt2_course/exercises/embeddings.py"
        )


class PositionalEmbedding(nn.Module):
    """Add a learned vector for every position 0, 1, ..., pos-1."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        nn.init.normal_(self.W_pos, std=cfg.init_range)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Return W_pos's rows for positions 0..pos-1, for every sequence in the batch.

        Only the shape of `tokens` matters here, not its values.
        """
        raise NotImplementedError(
            "PositionalEmbedding.forward: write it in gpt2_course/exercises/embeddings.py"
        )


class Unembedding(nn.Module):
    """Map the final residual stream to one logit per vocabulary entry."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        nn.init.normal_(self.W_U, std=cfg.init_range)
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        """Return the logits x @ W_U + b_U: shape [batch, pos, d_vocab]."""
        raise NotImplementedError(
            "Unembedding.forward: write it in gpt2_course/exercises/embeddings.py"
        )
