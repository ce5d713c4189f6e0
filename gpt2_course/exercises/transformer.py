"""Notebook 05: the whole model, and GPT-2's own weights in it.

Fill in `Transformer.forward` and `load_gpt2_weights`. The constructor is given:
it builds every part through `parts`, so your embeddings, LayerNorm and blocks
(or the reference ones, where you chose them) make up the model.
"""

import einops  # noqa: F401  (you will want it in load_gpt2_weights)
import torch  # noqa: F401
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.config import TransformerConfig
from gpt2_course.pretrained import check_gpt2_state_dict  # noqa: F401  (see load_gpt2_weights)


class Transformer(nn.Module):
    """Tokens in, logits out: every position predicts the token that follows it."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = parts.Embedding(cfg)
        self.pos_embed = parts.PositionalEmbedding(cfg)
        self.blocks = nn.ModuleList([parts.TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = parts.LayerNorm(cfg)
        self.unembed = parts.Unembedding(cfg)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        """Return the logits for every position: shape [batch, pos, d_vocab].

        The residual stream starts as token embedding + positional embedding, goes
        through every block in order, then through ln_final and the unembedding.
        """
        raise NotImplementedError(
            "Transformer.forward: write it in gpt2_course/exercises/transformer.py"
        )


def load_gpt2_weights(model: Transformer, hf_state_dict: dict[str, Tensor]) -> None:
    """Copy a Hugging Face GPT-2 state dict into `model`'s parameters, in place.

    Start with `sd = check_gpt2_state_dict(hf_state_dict, model.cfg)`: it removes the
    "transformer." prefix from the names and checks every shape. Then, for cfg =
    model.cfg, d = cfg.d_model:

    | Hugging Face (sd)                 | shape            | yours                        |
    |-----------------------------------|------------------|------------------------------|
    | wte.weight                        | [d_vocab, d]     | embed.W_E                    |
    | wpe.weight                        | [n_ctx, d]       | pos_embed.W_pos              |
    | h.{i}.ln_1.weight / .bias         | [d]              | blocks.{i}.ln1.w / .b        |
    | h.{i}.attn.c_attn.weight          | [d, 3 * d]       | blocks.{i}.attn.W_Q, W_K, W_V|
    | h.{i}.attn.c_attn.bias            | [3 * d]          | blocks.{i}.attn.b_Q, b_K, b_V|
    | h.{i}.attn.c_proj.weight / .bias  | [d, d] / [d]     | blocks.{i}.attn.W_O / b_O    |
    | h.{i}.ln_2.weight / .bias         | [d]              | blocks.{i}.ln2.w / .b        |
    | h.{i}.mlp.c_fc.weight / .bias     | [d, d_mlp]       | blocks.{i}.mlp.W_in / b_in   |
    | h.{i}.mlp.c_proj.weight / .bias   | [d_mlp, d]       | blocks.{i}.mlp.W_out / b_out |
    | ln_f.weight / .bias               | [d]              | ln_final.w / .b              |
    | lm_head.weight (may be absent)    | [d_vocab, d]     | unembed.W_U; b_U is all zero |

    `Conv1D` weights are [d_in, d_out]. `c_attn`'s columns are Q, then K, then V, and
    within each the heads one after another. GPT-2 ties the unembedding to the
    embedding: lm_head.weight, where present, equals wte.weight. Copy with
    `param.copy_(value)` inside `torch.no_grad()`, and do not modify hf_state_dict.
    """
    raise NotImplementedError("load_gpt2_weights: write it in gpt2_course/exercises/transformer.py")
