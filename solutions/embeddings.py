"""Token embeddings, positional embeddings and the unembedding."""

import einops
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
        # Indexing rows of W_E is a one-hot matrix product without building the one-hots.
        return self.W_E[tokens]


class PositionalEmbedding(nn.Module):
    """Add a learned vector for every position 0, 1, ..., pos-1."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        nn.init.normal_(self.W_pos, std=cfg.init_range)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        batch, seq_len = tokens.shape
        if seq_len > self.cfg.n_ctx:
            raise ValueError(f"{seq_len} tokens do not fit the model's context of {self.cfg.n_ctx}")
        # Every sequence in the batch starts at position 0.
        return einops.repeat(self.W_pos[:seq_len], "pos d_model -> batch pos d_model", batch=batch)


class Unembedding(nn.Module):
    """Map the final residual stream to one logit per vocabulary entry."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        nn.init.normal_(self.W_U, std=cfg.init_range)
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        logits = einops.einsum(
            x, self.W_U, "batch pos d_model, d_model d_vocab -> batch pos d_vocab"
        )
        return logits + self.b_U
