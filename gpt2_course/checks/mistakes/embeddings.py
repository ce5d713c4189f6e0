"""Common mistakes in the embeddings and the unembedding (notebook 01): each the reference
part with a wrong forward."""

import einops
import torch

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.embeddings import Embedding, PositionalEmbedding, Unembedding


def with_forward(part: type, forward) -> type:
    """The reference `part` with `forward` instead of its own."""
    return type(f"Wrong{part.__name__}", (part,), {"forward": forward})


# fmt: off
MISTAKES = {
    "embeddings.Embedding": [
        Mistake("wrong_axis", "indexing W_E along d_model instead of d_vocab (W_E[:, tokens])", with_forward(Embedding, lambda self, tokens: self.W_E[:, tokens])),
        Mistake("scaled_by_sqrt_d_model", "embeddings multiplied by sqrt(d_model), as in the original Transformer paper (GPT-2 does not scale them)", with_forward(Embedding, lambda self, tokens: self.W_E[tokens] * self.cfg.d_model**0.5)),
    ],
    "embeddings.PositionalEmbedding": [
        Mistake("positions_from_one", "positions counted from 1 instead of 0 (W_pos[1:pos+1])", with_forward(PositionalEmbedding, lambda self, tokens: einops.repeat(self.W_pos[1:tokens.shape[1] + 1], 'pos d -> b pos d', b=tokens.shape[0]))),
        Mistake("token_ids_as_positions", "indexing W_pos with the token ids instead of the positions", with_forward(PositionalEmbedding, lambda self, tokens: self.W_pos[tokens])),
        Mistake("no_batch_dim", "W_pos[:pos] without repeating it over the batch dimension", with_forward(PositionalEmbedding, lambda self, tokens: self.W_pos[: tokens.shape[1]])),
    ],
    "embeddings.Unembedding": [
        Mistake("no_bias", "the unembedding without b_U", with_forward(Unembedding, lambda self, x: x @ self.W_U)),
        Mistake("softmax", "probabilities (a softmax) instead of logits", with_forward(Unembedding, lambda self, x: torch.softmax(x @ self.W_U + self.b_U, -1))),
        Mistake("log_softmax", "log-probabilities (a log_softmax) instead of logits", with_forward(Unembedding, lambda self, x: torch.log_softmax(x @ self.W_U + self.b_U, -1))),
    ],
}
# fmt: on
