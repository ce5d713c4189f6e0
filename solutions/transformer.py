"""GPT-2: embeddings, a stack of blocks, a final LayerNorm and the unembedding."""

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.config import TransformerConfig


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
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


def load_gpt2_weights(model: Transformer, hf_state_dict: dict[str, Tensor]) -> None:
    """Copy a Hugging Face GPT-2 state dict into `model`, in place.

    Hugging Face stores GPT-2's linear layers as `Conv1D`, whose weight is
    [d_in, d_out] (the transpose of nn.Linear's), and fuses W_Q, W_K and W_V into
    one `c_attn` of width 3 * d_model. We split and reshape them into per-head weights.
    """
    cfg = model.cfg
    sd = {k.removeprefix("transformer."): v for k, v in hf_state_dict.items()}
    weights: dict[str, Tensor] = {
        "embed.W_E": sd["wte.weight"],
        "pos_embed.W_pos": sd["wpe.weight"],
        "ln_final.w": sd["ln_f.weight"],
        "ln_final.b": sd["ln_f.bias"],
        # GPT-2 ties the unembedding to the embedding and has no unembedding bias
        "unembed.W_U": sd.get("lm_head.weight", sd["wte.weight"]).T,
        "unembed.b_U": torch.zeros(cfg.d_vocab),
    }
    for layer in range(cfg.n_layers):
        hf, ours = f"h.{layer}.", f"blocks.{layer}."
        W_Q, W_K, W_V = sd[hf + "attn.c_attn.weight"].split(cfg.d_model, dim=1)
        b_Q, b_K, b_V = sd[hf + "attn.c_attn.bias"].split(cfg.d_model, dim=0)
        split_heads = "d_model (heads d_head) -> heads d_model d_head"
        weights |= {
            ours + "ln1.w": sd[hf + "ln_1.weight"],
            ours + "ln1.b": sd[hf + "ln_1.bias"],
            ours + "ln2.w": sd[hf + "ln_2.weight"],
            ours + "ln2.b": sd[hf + "ln_2.bias"],
            ours + "attn.W_Q": einops.rearrange(W_Q, split_heads, heads=cfg.n_heads),
            ours + "attn.W_K": einops.rearrange(W_K, split_heads, heads=cfg.n_heads),
            ours + "attn.W_V": einops.rearrange(W_V, split_heads, heads=cfg.n_heads),
            ours + "attn.b_Q": einops.rearrange(b_Q, "(heads d_head) -> heads d_head", heads=cfg.n_heads),
            ours + "attn.b_K": einops.rearrange(b_K, "(heads d_head) -> heads d_head", heads=cfg.n_heads),
            ours + "attn.b_V": einops.rearrange(b_V, "(heads d_head) -> heads d_head", heads=cfg.n_heads),
            ours + "attn.W_O": einops.rearrange(
                sd[hf + "attn.c_proj.weight"], "(heads d_head) d_model -> heads d_head d_model", heads=cfg.n_heads
            ),
            ours + "attn.b_O": sd[hf + "attn.c_proj.bias"],
            ours + "mlp.W_in": sd[hf + "mlp.c_fc.weight"],
            ours + "mlp.b_in": sd[hf + "mlp.c_fc.bias"],
            ours + "mlp.W_out": sd[hf + "mlp.c_proj.weight"],
            ours + "mlp.b_out": sd[hf + "mlp.c_proj.bias"],
        }
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])
