"""GPT-2 from reference parts, and Hugging Face GPT-2 weights under the course's names."""

import re

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig
from gpt2_course.pretrained import check_gpt2_state_dict
from gpt2_course.reference_parts.block import TransformerBlock
from gpt2_course.reference_parts.embeddings import Embedding, PositionalEmbedding, Unembedding
from gpt2_course.reference_parts.layernorm import LayerNorm


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed, self.pos_embed = Embedding(cfg), PositionalEmbedding(cfg)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_final, self.unembed = LayerNorm(cfg), Unembedding(cfg)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        x = self.embed(tokens) + self.pos_embed(tokens)
        return self.unembed(self.ln_final(nn.Sequential(*self.blocks)(x)))


# Hugging Face name (after "h.N.") -> the course's name in block N, and how to reshape it.
# Conv1D weights are [d_in, d_out] already, the layout of W_in, W_out and W_O.
_HEADS = "d_model (h d_head) -> h d_model d_head"
_BLOCK = {
    "ln_1.weight": ("ln1.w", None),
    "ln_1.bias": ("ln1.b", None),
    "ln_2.weight": ("ln2.w", None),
    "ln_2.bias": ("ln2.b", None),
    "attn.c_proj.weight": ("attn.W_O", "(h d_head) d_model -> h d_head d_model"),
    "attn.c_proj.bias": ("attn.b_O", None),
    "mlp.c_fc.weight": ("mlp.W_in", None),
    "mlp.c_fc.bias": ("mlp.b_in", None),
    "mlp.c_proj.weight": ("mlp.W_out", None),
    "mlp.c_proj.bias": ("mlp.b_out", None),
}


def gpt2_weights(hf_state_dict: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Every weight of a Hugging Face GPT-2 state dict, under the course's names."""
    sd = check_gpt2_state_dict(hf_state_dict, cfg)
    out = {
        "embed.W_E": sd["wte.weight"],
        "pos_embed.W_pos": sd["wpe.weight"],
        "ln_final.w": sd["ln_f.weight"],
        "ln_final.b": sd["ln_f.bias"],
        "unembed.W_U": sd.get("lm_head.weight", sd["wte.weight"]).T,  # tied to W_E in GPT-2
        "unembed.b_U": sd.get("lm_head.bias", sd["wte.weight"].new_zeros(cfg.d_vocab)),
    }
    for name, value in sd.items():
        match = re.fullmatch(r"h\.(\d+)\.(.+)", name)
        if not match:
            continue
        layer, rest = match.groups()
        if rest.startswith("attn.c_attn."):  # [Q | K | V], each head after head
            weight = rest.endswith("weight")
            pattern = _HEADS if weight else "(h d_head) -> h d_head"
            for letter, part in zip("QKV", value.chunk(3, dim=-1), strict=True):
                ours = f"blocks.{layer}.attn.{'W' if weight else 'b'}_{letter}"
                out[ours] = einops.rearrange(part, pattern, h=cfg.n_heads)
        elif rest in _BLOCK:
            ours, pattern = _BLOCK[rest]
            out[f"blocks.{layer}.{ours}"] = (
                einops.rearrange(value, pattern, h=cfg.n_heads) if pattern else value
            )
    return out


def load_gpt2_weights(model: nn.Module, hf_state_dict: dict[str, Tensor]) -> None:
    """Copy a Hugging Face GPT-2 state dict into `model` (strictly: every name, every shape)."""
    weights = gpt2_weights(hf_state_dict, model.cfg)
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights missing for {missing[:3]}, or unknown names {unexpected[:3]}")
