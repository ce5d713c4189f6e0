"""Notebook 08: the KV cache.

Fill in `KVCache.length` and `KVCache.update`, then `attention_with_cache`,
`forward_with_cache` and `generate_with_cache`. Keep the names and signatures:
the checks call them exactly like this.

Your model's modules keep their contract (`model(tokens) -> logits`): the cached
forward pass is a separate function that reuses their parameters.
"""

from collections.abc import Callable

import einops  # noqa: F401  (you will want it)
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course import parts  # noqa: F401  (parts.sample_next_token picks the next token)
from gpt2_course.config import TransformerConfig
from gpt2_course.prompts import check_prompt  # noqa: F401  (generate_with_cache uses it)


class KVCache:
    """Keys and values of every layer for the positions processed so far.

    The buffers are allocated once (written for you), for `capacity` positions
    (n_ctx by default): adding a token writes into them instead of copying the
    whole cache. The layout puts heads before positions, [batch, n_heads, pos,
    d_head], so that each head's attention is one matrix product.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        batch: int,
        capacity: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.cfg = cfg
        self.capacity = cfg.n_ctx if capacity is None else min(capacity, cfg.n_ctx)
        shape = (cfg.n_layers, batch, cfg.n_heads, self.capacity, cfg.d_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.filled = [0] * cfg.n_layers  # positions stored so far, per layer

    @property
    def length(self) -> int:
        """How many positions every layer holds (the smallest of `self.filled`).

        This is where the next token's position starts.
        """
        raise NotImplementedError("KVCache.length: write it in gpt2_course/exercises/kv_cache.py")

    def update(
        self,
        layer: int,
        keys: Float[Tensor, "batch n_heads new_pos d_head"],
        values: Float[Tensor, "batch n_heads new_pos d_head"],
    ) -> tuple[
        Float[Tensor, "batch n_heads pos d_head"], Float[Tensor, "batch n_heads pos d_head"]
    ]:
        """Append the new positions' keys and values to `layer`; return all of that layer's so far.

        Copy them into self.keys / self.values after the positions this layer
        already holds (the caller may reuse its tensors: keep no reference to
        them), advance self.filled[layer], and return the filled part of the
        layer's buffers, shape [batch, n_heads, filled, d_head]. Each layer
        counts its own positions. If they would not fit (more than
        self.capacity), raise a ValueError that says the context (n_ctx) is
        exceeded, before changing anything (filled included).
        """
        raise NotImplementedError("KVCache.update: write it in gpt2_course/exercises/kv_cache.py")


def attention_with_cache(
    attn: nn.Module, x: Float[Tensor, "batch new_pos d_model"], cache: KVCache, layer: int
) -> Float[Tensor, "batch new_pos d_model"]:
    """`attn`'s forward pass for new positions that also attend to the cached earlier ones.

    Use attn.W_Q, attn.b_Q, ... (your MultiHeadAttention's parameters): compute
    the new positions' queries, keys and values in the cache's layout
    [batch, n_heads, new_pos, d_head], store keys and values with
    `cache.update(layer, k, v)`, which returns every position's, and attend.
    The mask needs care: new query i sits at absolute position
    (all_pos - new_pos) + i and may see keys 0..that position. A single new
    token may see every key.
    """
    raise NotImplementedError("attention_with_cache: write it in gpt2_course/exercises/kv_cache.py")


def forward_with_cache(
    model: nn.Module, tokens: Int[Tensor, "batch new_pos"], cache: KVCache
) -> Float[Tensor, "batch new_pos d_vocab"]:
    """Logits for `tokens`, which follow the `cache.length` positions already in the cache.

    Like your Transformer's forward, with two changes: the new tokens' positions
    start at cache.length (use model.pos_embed.W_pos directly), and each block's
    attention is `attention_with_cache`, which stores each layer's new keys and
    values once (the block's ln1, ln2 and mlp act on each position alone, so call
    them as they are: block.ln1(x), ...). Raise a ValueError that says the
    context (n_ctx) is exceeded if cache.length + new_pos > model.cfg.n_ctx.
    """
    raise NotImplementedError("forward_with_cache: write it in gpt2_course/exercises/kv_cache.py")


@torch.no_grad()
def generate_with_cache(
    model: nn.Module,
    tokens: Int[Tensor, "batch seq"],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    on_token: Callable[[Int[Tensor, " batch"]], None] | None = None,
) -> Int[Tensor, "batch seq_plus_new"]:
    """`generate` with the same arguments and results, running the model on one new token per step.

    Start with `check_prompt(tokens, max_new_tokens, model)`, as `generate` does:
    it raises the documented ValueErrors (an empty prompt, max_new_tokens < 0,
    seq + max_new_tokens > n_ctx) before anything runs. Make a
    `KVCache(model.cfg, batch, seq + max_new_tokens, device, dtype)`, run the
    whole prompt through `forward_with_cache` once, then loop: pick the next
    token from the last position's logits with `parts.sample_next_token` (as in
    `generate`: the penalty counts generated tokens only; with a seed, one
    torch.Generator for the whole call, and torch's global generator untouched;
    without one, the global generator; finished rows get eos; stop when every
    row has finished), append it, call `on_token(next_token)` if given (the
    tokens just appended, [batch], before the model runs again), and feed only
    that token to `forward_with_cache`; after the last token, nothing. So the
    blocks run on the prompt once, then on 1 position per step (the check counts
    them), and max_new_tokens = 0 returns the prompt without running the model.
    Do not call `model(tokens)`.
    """
    raise NotImplementedError("generate_with_cache: write it in gpt2_course/exercises/kv_cache.py")
