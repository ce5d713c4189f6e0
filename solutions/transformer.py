"""GPT-2: embeddings, a stack of blocks, a final LayerNorm and the unembedding."""

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.config import TransformerConfig
from gpt2_course.pretrained import check_gpt2_state_dict


class Transformer(nn.Module):
    """Tokens in, logits out: every position predicts the token that follows it."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        # parts.X is your component, or the reference one where you chose it
        self.embed = parts.Embedding(cfg)
        self.pos_embed = parts.PositionalEmbedding(cfg)
        self.blocks = nn.ModuleList([parts.TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = parts.LayerNorm(cfg)
        self.unembed = parts.Unembedding(cfg)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        residual = self.embed(tokens) + self.pos_embed(tokens)
        for block in self.blocks:
            residual = block(residual)
        return self.unembed(self.ln_final(residual))


def gpt2_weights(hf_state_dict: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """A Hugging Face GPT-2 state dict's weights under the course's (TransformerLens's) names.

    Hugging Face stores GPT-2's linear layers as `Conv1D`, whose weight is
    [d_in, d_out] (the transpose of nn.Linear's, and already the layout of our
    W_in, W_out, ...), and fuses W_Q, W_K and W_V into one `c_attn` of width
    3 * n_heads * d_head. We split it and give every head its own slice.
    """
    # Hugging Face's names without "transformer.", every shape checked against cfg
    sd = check_gpt2_state_dict(hf_state_dict, cfg)
    heads = cfg.n_heads
    split_heads = "d_model (heads d_head) -> heads d_model d_head"
    split_bias = "(heads d_head) -> heads d_head"

    weights: dict[str, Tensor] = {
        "embed.W_E": sd["wte.weight"],
        "pos_embed.W_pos": sd["wpe.weight"],
        "ln_final.w": sd["ln_f.weight"],
        "ln_final.b": sd["ln_f.bias"],
        # GPT-2 ties the unembedding to the embedding (lm_head.weight is wte.weight)
        # and has no unembedding bias; a course model's own (notebook 09) may have one.
        "unembed.W_U": sd.get("lm_head.weight", sd["wte.weight"]).T,
        "unembed.b_U": sd.get("lm_head.bias", torch.zeros(cfg.d_vocab)),
    }
    for layer in range(cfg.n_layers):
        hf, ours = f"h.{layer}.", f"blocks.{layer}."
        # c_attn's columns are [all of Q | all of K | all of V], each head after head
        W_Q, W_K, W_V = sd[hf + "attn.c_attn.weight"].split(heads * cfg.d_head, dim=1)
        b_Q, b_K, b_V = sd[hf + "attn.c_attn.bias"].split(heads * cfg.d_head, dim=0)
        W_O = sd[hf + "attn.c_proj.weight"]
        weights |= {
            ours + "ln1.w": sd[hf + "ln_1.weight"],
            ours + "ln1.b": sd[hf + "ln_1.bias"],
            ours + "attn.W_Q": einops.rearrange(W_Q, split_heads, heads=heads),
            ours + "attn.W_K": einops.rearrange(W_K, split_heads, heads=heads),
            ours + "attn.W_V": einops.rearrange(W_V, split_heads, heads=heads),
            ours + "attn.b_Q": einops.rearrange(b_Q, split_bias, heads=heads),
            ours + "attn.b_K": einops.rearrange(b_K, split_bias, heads=heads),
            ours + "attn.b_V": einops.rearrange(b_V, split_bias, heads=heads),
            ours + "attn.W_O": einops.rearrange(
                W_O, "(heads d_head) d_model -> heads d_head d_model", heads=heads
            ),
            ours + "attn.b_O": sd[hf + "attn.c_proj.bias"],
            ours + "ln2.w": sd[hf + "ln_2.weight"],
            ours + "ln2.b": sd[hf + "ln_2.bias"],
            ours + "mlp.W_in": sd[hf + "mlp.c_fc.weight"],
            ours + "mlp.b_in": sd[hf + "mlp.c_fc.bias"],
            ours + "mlp.W_out": sd[hf + "mlp.c_proj.weight"],
            ours + "mlp.b_out": sd[hf + "mlp.c_proj.bias"],
        }
    return weights


def load_gpt2_weights(model: Transformer, hf_state_dict: dict[str, Tensor]) -> None:
    """Copy a Hugging Face GPT-2 state dict into `model`, in place."""
    weights = gpt2_weights(hf_state_dict, model.cfg)
    params = dict(model.named_parameters())
    if unknown := [name for name in weights if name not in params]:
        raise ValueError(
            f"the model has no parameter '{unknown[0]}': keep the names of the exercise stubs "
            "(TransformerLens's names), so that GPT-2's weights can be loaded by name"
        )
    if unfilled := [name for name in params if name not in weights]:
        raise ValueError(
            f"GPT-2's checkpoint has no weight for the model's parameter '{unfilled[0]}'"
        )
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != weights[name].shape:
                raise ValueError(
                    f"the model's {name} has shape {list(param.shape)}, "
                    f"GPT-2's weight for it {list(weights[name].shape)}"
                )
            param.copy_(weights[name])
