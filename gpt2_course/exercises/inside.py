"""Notebook 09: looking inside a model you trained, with TransformerLens.

Five functions. `to_hf_state_dict` hands your model's weights to Hugging Face's GPT-2,
so that `gpt2_course.lens.bridge_for(model)` can wrap it in a TransformerLens
`TransformerBridge` (it calls your function through `gpt2_course.parts`). The others
read what the bridge shows: attention patterns, the residual stream, and what a head
contributes. Keep the names and signatures: the checks and the notebook call them.
"""

from collections.abc import Mapping
from typing import Any

import einops  # noqa: F401  (you will want it)
import torch  # noqa: F401
from jaxtyping import Float, Int
from torch import Tensor, nn


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Your model's weights as a Hugging Face `GPT2LMHeadModel` state dict: the inverse of
    notebook 05's `load_gpt2_weights`.

    For cfg = model.cfg, d = cfg.d_model (= n_heads * d_head), layer i, return exactly
    these keys (no others):

    | key                                         | shape            | from              |
    |---------------------------------------------|------------------|-------------------|
    | transformer.wte.weight                      | [d_vocab, d]     | embed.W_E         |
    | transformer.wpe.weight                      | [n_ctx, d]       | pos_embed.W_pos   |
    | transformer.h.{i}.ln_1.weight / .bias       | [d]              | blocks.{i}.ln1.w / b |
    | transformer.h.{i}.attn.c_attn.weight        | [d, 3 * d]       | attn.W_Q, W_K, W_V |
    | transformer.h.{i}.attn.c_attn.bias          | [3 * d]          | attn.b_Q, b_K, b_V |
    | transformer.h.{i}.attn.c_proj.weight / .bias| [d, d] / [d]     | attn.W_O / b_O    |
    | transformer.h.{i}.ln_2.weight / .bias       | [d]              | blocks.{i}.ln2.w / b |
    | transformer.h.{i}.mlp.c_fc.weight / .bias   | [d, d_mlp] / [d_mlp] | mlp.W_in / b_in |
    | transformer.h.{i}.mlp.c_proj.weight / .bias | [d_mlp, d] / [d] | mlp.W_out / b_out |
    | transformer.ln_f.weight / .bias             | [d]              | ln_final.w / b    |
    | lm_head.weight                              | [d_vocab, d]     | unembed.W_U, transposed |
    | lm_head.bias                                | [d_vocab]        | unembed.b_U       |

    (attn.* and mlp.* are those of blocks.{i}.)

    `Conv1D` weights are [d_in, d_out]: the layout of W_in and W_out already. `c_attn`'s
    columns are all of Q, then all of K, then all of V, and within each the heads one
    after another (head 0's d_head columns, then head 1's, ...); `c_proj`'s rows are the
    heads one after another too. Your model's unembedding is its own (not tied to W_E)
    and has a bias, so lm_head is an `nn.Linear` here: its weight is [d_out, d_in].

    Return new tensors (`.detach().clone()`), not views of the model's parameters:
    changing the state dict must not change the model.
    """
    raise NotImplementedError("to_hf_state_dict: write it in gpt2_course/exercises/inside.py")


def previous_token_score(
    pattern: Float[Tensor, "batch n_heads query key"],
) -> Float[Tensor, "n_heads"]:
    """How much each head attends to the previous token: a tensor [n_heads].

    `pattern[b, h, q, k]` is the attention of query position q to key position k (a
    TransformerLens `hook_pattern`). The score of head h is the mean of
    pattern[b, h, q, q - 1] over every sequence b and every query q >= 1 (query 0 has
    no previous token). Raise ValueError if pattern is not 4-d with as many queries as
    keys, or has fewer than 2 positions.
    """
    raise NotImplementedError("previous_token_score: write it in gpt2_course/exercises/inside.py")


def induction_score(
    pattern: Float[Tensor, "batch n_heads query key"], half: int
) -> Float[Tensor, "n_heads"]:
    """How much each head does induction on a repeated block: a tensor [n_heads].

    With pos = pattern.shape[-1], the last 2 * half positions of every sequence are a
    random block of `half` tokens written twice; any positions before them (a BOS
    token, say) are a prefix. For a query q in the second copy (pos - half <= q < pos),
    the same token appeared before at q - half, and an induction head attends to the
    token that came after it, at key q - half + 1. The score of head h is the mean of
    pattern[b, h, q, q - half + 1] over every sequence b and those queries.

    Raise ValueError if half < 1, 2 * half > pos, or pattern is not 4-d with as many
    queries as keys.
    """
    raise NotImplementedError("induction_score: write it in gpt2_course/exercises/inside.py")


def logit_lens(
    cache: Mapping[str, Tensor], model: nn.Module
) -> Float[Tensor, "layer batch pos d_vocab"]:
    """The logit lens: what the model would predict if it stopped at each layer.

    `cache` maps TransformerLens hook names to activations [batch, pos, d_model] (an
    `ActivationCache` or a plain dict). Take, for layer = 0 .. n_layers - 1, the residual
    stream entering block `layer`, `cache[f"blocks.{layer}.hook_resid_pre"]` (row 0 is the
    embeddings), then the residual stream after the last block,
    `cache[f"blocks.{n_layers - 1}.hook_resid_post"]`: n_layers + 1 rows. Send each row
    through the model's own final LayerNorm (`model.ln_final`, which computes each row's
    mean and scale afresh: do not reuse the cached `ln_final.hook_scale`, which belongs
    to the last row only) and unembedding (`model.unembed`, bias included). Return them
    stacked: [n_layers + 1, batch, pos, d_vocab]. The last row equals the model's logits.
    """
    raise NotImplementedError("logit_lens: write it in gpt2_course/exercises/inside.py")


def ablate_head(
    model: Any, tokens: Int[Tensor, "batch pos"], layer: int, head: int
) -> Float[Tensor, "batch pos d_vocab"]:
    """The model's logits [batch, pos, d_vocab] with one attention head zero-ablated.

    `model` is a TransformerLens `TransformerBridge` (or any model with its
    `run_with_hooks` and hook names; the check passes a small stand-in built on torch).
    Run `model.run_with_hooks(tokens, fwd_hooks=[(name, hook_fn)])` with a hook that
    sets head `head`'s output in layer `layer` to zero: on
    `f"blocks.{layer}.attn.hook_z"` ([batch, pos, n_heads, d_head]: each head's weighted
    values, before W_O) or on `f"blocks.{layer}.attn.hook_pattern"`
    ([batch, n_heads, query, key]). A hook is called as `hook_fn(activation, hook)` and
    returns the activation to use instead. Every other head, and every other layer,
    stays as it was. No hook may stay on the model afterwards, and its weights must not
    change.
    """
    raise NotImplementedError("ablate_head: write it in gpt2_course/exercises/inside.py")
