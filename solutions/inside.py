"""Looking inside a trained model: its weights for TransformerLens, attention scores, the logit
lens and head ablation."""

from collections.abc import Mapping
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights as a Hugging Face GPT2LMHeadModel state dict (Conv1D layout)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    sd: dict[str, Tensor] = {
        "transformer.wte.weight": params["embed.W_E"],
        "transformer.wpe.weight": params["pos_embed.W_pos"],
    }
    for layer in range(model.cfg.n_layers):
        ours, hf = f"blocks.{layer}.", f"transformer.h.{layer}."
        W_Q, W_K, W_V = (params[f"{ours}attn.W_{x}"] for x in "QKV")
        b_Q, b_K, b_V = (params[f"{ours}attn.b_{x}"] for x in "QKV")
        sd |= {
            hf + "ln_1.weight": params[ours + "ln1.w"],
            hf + "ln_1.bias": params[ours + "ln1.b"],
            # c_attn's columns: all of Q, then all of K, then all of V, each head after head
            hf + "attn.c_attn.weight": einops.rearrange(
                [W_Q, W_K, W_V], "qkv heads d_model d_head -> d_model (qkv heads d_head)"
            ),
            hf + "attn.c_attn.bias": einops.rearrange(
                [b_Q, b_K, b_V], "qkv heads d_head -> (qkv heads d_head)"
            ),
            hf + "attn.c_proj.weight": einops.rearrange(
                params[ours + "attn.W_O"], "heads d_head d_model -> (heads d_head) d_model"
            ),
            hf + "attn.c_proj.bias": params[ours + "attn.b_O"],
            hf + "ln_2.weight": params[ours + "ln2.w"],
            hf + "ln_2.bias": params[ours + "ln2.b"],
            # Conv1D weights are [d_in, d_out], already the layout of W_in and W_out
            hf + "mlp.c_fc.weight": params[ours + "mlp.W_in"],
            hf + "mlp.c_fc.bias": params[ours + "mlp.b_in"],
            hf + "mlp.c_proj.weight": params[ours + "mlp.W_out"],
            hf + "mlp.c_proj.bias": params[ours + "mlp.b_out"],
        }
    sd |= {
        "transformer.ln_f.weight": params["ln_final.w"],
        "transformer.ln_f.bias": params["ln_final.b"],
        # our unembedding is untied from W_E and has a bias: lm_head is an nn.Linear,
        # whose weight is [d_out, d_in]
        "lm_head.weight": params["unembed.W_U"].T,
        "lm_head.bias": params["unembed.b_U"],
    }
    # clones, so that changing the state dict (or loading it elsewhere) leaves the model alone
    return {name: tensor.clone().contiguous() for name, tensor in sd.items()}


def _positions(pattern: Tensor) -> int:
    """The sequence length of an attention pattern, after checking its shape."""
    if not isinstance(pattern, Tensor) or pattern.ndim != 4:
        raise ValueError("pattern must be a 4-d tensor [batch, n_heads, query, key]")
    if pattern.shape[2] != pattern.shape[3]:
        raise ValueError(f"pattern must be square in query and key, got {list(pattern.shape)}")
    return pattern.shape[3]


def previous_token_score(
    pattern: Float[Tensor, "batch n_heads query key"],
) -> Float[Tensor, "n_heads"]:
    """Per head, the mean attention from each query q >= 1 to the key just before it."""
    pos = _positions(pattern)
    if pos < 2:
        raise ValueError("a previous-token score needs at least 2 positions")
    query = torch.arange(1, pos, device=pattern.device)
    to_previous = pattern[:, :, query, query - 1]  # [batch, n_heads, pos - 1]
    return einops.reduce(to_previous, "batch heads query -> heads", "mean")


def induction_score(
    pattern: Float[Tensor, "batch n_heads query key"], half: int
) -> Float[Tensor, "n_heads"]:
    """Per head, the mean attention from each token of the repeated block's second copy to
    the token that followed its first occurrence."""
    pos = _positions(pattern)
    if half < 1 or 2 * half > pos:
        raise ValueError(f"half={half}: need half >= 1 and 2 * half <= pos={pos}")
    # the second copy is the last `half` positions; the earlier occurrence of the token at q
    # is at q - half, and an induction head attends to the token after it
    query = torch.arange(pos - half, pos, device=pattern.device)
    to_next_of_earlier = pattern[:, :, query, query - half + 1]  # [batch, n_heads, half]
    return einops.reduce(to_next_of_earlier, "batch heads query -> heads", "mean")


def logit_lens(
    cache: Mapping[str, Tensor], model: nn.Module
) -> Float[Tensor, "layer batch pos d_vocab"]:
    """The logits the model would give if it stopped before each block, and after the last."""
    n_layers = model.cfg.n_layers
    resid = [cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(n_layers)]
    resid.append(cache[f"blocks.{n_layers - 1}.hook_resid_post"])
    stack = torch.stack(resid)  # [layer, batch, pos, d_model]
    # ln_final computes each row's own mean and scale: the layers share one LayerNorm call
    # as a longer batch
    flat = einops.rearrange(stack, "layer batch pos d_model -> (layer batch) pos d_model")
    logits = model.unembed(model.ln_final(flat))
    return einops.rearrange(
        logits, "(layer batch) pos d_vocab -> layer batch pos d_vocab", layer=len(resid)
    )


def ablate_head(
    model: Any, tokens: Int[Tensor, "batch pos"], layer: int, head: int
) -> Float[Tensor, "batch pos d_vocab"]:
    """The model's logits with head `head` of layer `layer` zero-ablated."""
    keep = torch.ones(model.cfg.n_heads)
    keep[head] = 0.0

    def zero_head(z: Float[Tensor, "batch pos n_heads d_head"], hook: Any) -> Tensor:
        # a new tensor, not an in-place edit: the hook's input may be needed elsewhere
        return z * einops.rearrange(keep.to(z), "heads -> heads 1")

    # run_with_hooks removes its hooks when the run ends, even when it fails
    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)])
