"""Token and positional embeddings and the unembedding, on torch's kernels."""

import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig
from gpt2_course.reference_parts._params import add_parameters


class Embedding(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        add_parameters(self, cfg, {"W_E": (cfg.d_vocab, cfg.d_model)})

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class PositionalEmbedding(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        add_parameters(self, cfg, {"W_pos": (cfg.n_ctx, cfg.d_model)})

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        if tokens.shape[-1] > self.cfg.n_ctx:
            raise ValueError(f"{tokens.shape[-1]} tokens exceed the context of {self.cfg.n_ctx}")
        positions = tokens.new_ones(tokens.shape).cumsum(-1) - 1
        return F.embedding(positions, self.W_pos)


class Unembedding(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        add_parameters(self, cfg, {"W_U": (cfg.d_model, cfg.d_vocab), "b_U": (cfg.d_vocab,)})

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return F.linear(x, self.W_U.T, self.b_U)
