"""Looking inside a model (notebook 09), on plain torch indexing and TransformerLens's hooks."""

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under Hugging Face GPT2LMHeadModel's names, in Conv1D layout."""
    cfg = model.cfg
    p = dict(model.named_parameters())
    sd = {
        "transformer.wte.weight": p["embed.W_E"],
        "transformer.wpe.weight": p["pos_embed.W_pos"],
        "transformer.ln_f.weight": p["ln_final.w"],
        "transformer.ln_f.bias": p["ln_final.b"],
        "lm_head.weight": p["unembed.W_U"].T,
        "lm_head.bias": p["unembed.b_U"],
    }
    for layer in range(cfg.n_layers):
        ours, hf = f"blocks.{layer}.", f"transformer.h.{layer}."
        # [heads, d_model, d_head] -> [d_model, heads * d_head], Q then K then V
        W = [p[f"{ours}attn.W_{x}"].permute(1, 0, 2).flatten(1) for x in "QKV"]
        sd |= {
            hf + "ln_1.weight": p[ours + "ln1.w"],
            hf + "ln_1.bias": p[ours + "ln1.b"],
            hf + "attn.c_attn.weight": torch.cat(W, dim=1),
            hf + "attn.c_attn.bias": torch.cat([p[f"{ours}attn.b_{x}"].flatten() for x in "QKV"]),
            hf + "attn.c_proj.weight": p[ours + "attn.W_O"].flatten(0, 1),
            hf + "attn.c_proj.bias": p[ours + "attn.b_O"],
            hf + "ln_2.weight": p[ours + "ln2.w"],
            hf + "ln_2.bias": p[ours + "ln2.b"],
            hf + "mlp.c_fc.weight": p[ours + "mlp.W_in"],
            hf + "mlp.c_fc.bias": p[ours + "mlp.b_in"],
            hf + "mlp.c_proj.weight": p[ours + "mlp.W_out"],
            hf + "mlp.c_proj.bias": p[ours + "mlp.b_out"],
        }
    return {name: t.detach().contiguous().clone() for name, t in sd.items()}


def _square_pattern(pattern: Tensor) -> int:
    if (
        not isinstance(pattern, Tensor)
        or pattern.dim() != 4
        or pattern.shape[-1] != pattern.shape[-2]
    ):
        raise ValueError("pattern must be [batch, n_heads, query, key] with query == key")
    return pattern.shape[-1]


def previous_token_score(
    pattern: Float[Tensor, "batch n_heads query key"],
) -> Float[Tensor, "n_heads"]:
    """Mean over batch and queries q >= 1 of pattern[b, h, q, q - 1]."""
    if _square_pattern(pattern) < 2:
        raise ValueError("a previous-token score needs at least 2 positions")
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))


def induction_score(
    pattern: Float[Tensor, "batch n_heads query key"], half: int
) -> Float[Tensor, "n_heads"]:
    """Mean attention from each query of the second copy to the token after its first copy."""
    pos = _square_pattern(pattern)
    if half < 1 or 2 * half > pos:
        raise ValueError(f"half={half} does not fit: need 1 <= half and 2 * half <= {pos}")
    queries = torch.arange(pos - half, pos)
    return pattern[:, :, queries, queries - half + 1].mean(dim=(0, 2))


def logit_lens(
    cache: Mapping[str, Tensor], model: nn.Module
) -> Float[Tensor, "layer batch pos d_vocab"]:
    """The logits read off the residual stream before every block and after the last."""
    n = model.cfg.n_layers
    rows = [cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(n)]
    rows.append(cache[f"blocks.{n - 1}.hook_resid_post"])
    # one row at a time: the course's ln_final and unembed take [batch, pos, d_model]
    return torch.stack([model.unembed(model.ln_final(row)) for row in rows])


def ablate_head(
    model: Any, tokens: Int[Tensor, "batch pos"], layer: int, head: int
) -> Float[Tensor, "batch pos d_vocab"]:
    """The logits with one head's output (its z) set to zero."""

    def zero(z: Tensor, hook: Any) -> Tensor:
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])
