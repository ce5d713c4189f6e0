"""The KV cache on torch's kernels: preallocated buffers written through `narrow`
views, and new queries attending to every cached key in
`F.scaled_dot_product_attention` with an explicit mask."""

from collections.abc import Callable

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.config import TransformerConfig
from gpt2_course.prompts import check_prompt


def _context_error(what: str, n_ctx: int) -> ValueError:
    return ValueError(f"the context is exceeded: {what} > n_ctx={n_ctx}")


class KVCache:
    """Keys and values of every layer, [n_layers, batch, n_heads, capacity, d_head]."""

    def __init__(
        self,
        cfg: TransformerConfig,
        batch: int,
        capacity: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.cfg = cfg
        self.capacity = min(cfg.n_ctx, cfg.n_ctx if capacity is None else capacity)
        self.keys, self.values = (
            torch.zeros(
                cfg.n_layers,
                batch,
                cfg.n_heads,
                self.capacity,
                cfg.d_head,
                device=device,
                dtype=dtype,
            )
            for _ in "kv"
        )
        self.filled = [0 for _ in range(cfg.n_layers)]

    @property
    def length(self) -> int:
        return min(self.filled, default=0)

    def update(
        self,
        layer: int,
        keys: Float[Tensor, "batch n_heads new_pos d_head"],
        values: Float[Tensor, "batch n_heads new_pos d_head"],
    ) -> tuple[
        Float[Tensor, "batch n_heads pos d_head"], Float[Tensor, "batch n_heads pos d_head"]
    ]:
        start, new = self.filled[layer], keys.shape[-2]
        if start + new > self.capacity:
            raise _context_error(
                f"layer {layer}'s {start} cached + {new} new positions (capacity {self.capacity})",
                self.cfg.n_ctx,
            )
        for buffer, fresh in ((self.keys, keys), (self.values, values)):
            buffer[layer].narrow(2, start, new).copy_(fresh)
        self.filled[layer] = start + new
        return self.keys[layer].narrow(2, 0, start + new), self.values[layer].narrow(
            2, 0, start + new
        )


def attention_with_cache(
    attn: nn.Module, x: Float[Tensor, "batch new_pos d_model"], cache: KVCache, layer: int
) -> Float[Tensor, "batch new_pos d_model"]:
    q, k, v = (
        einops.einsum(x, W, "b p d_model, h d_model d_head -> b h p d_head") + b[:, None]
        for W, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V))
    )
    keys, values = cache.update(layer, k, v)
    new, total = q.shape[-2], keys.shape[-2]
    # query i sits at position total - new + i: it sees the keys up to that diagonal
    visible = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(total - new)
    z = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
    return einops.einsum(z, attn.W_O, "b h p d_head, h d_head d_model -> b p d_model") + attn.b_O


def forward_with_cache(
    model: nn.Module, tokens: Int[Tensor, "batch new_pos"], cache: KVCache
) -> Float[Tensor, "batch new_pos d_vocab"]:
    start, new = cache.length, tokens.shape[-1]
    if start + new > model.cfg.n_ctx:
        raise _context_error(f"{start} cached + {new} new positions", model.cfg.n_ctx)
    positions = torch.arange(start, start + new, device=tokens.device)
    x = model.embed(tokens) + F.embedding(positions, model.pos_embed.W_pos)
    for layer, block in enumerate(model.blocks):
        x = x + attention_with_cache(block.attn, block.ln1(x), cache, layer)
        x = x + block.mlp(block.ln2(x))
    return model.unembed(model.ln_final(x))


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
    check_prompt(tokens, max_new_tokens, model)
    batch, prompt = tokens.shape
    W_E = model.embed.W_E
    cache = KVCache(model.cfg, batch, prompt + max_new_tokens, W_E.device, W_E.dtype)
    generator = None if seed is None else torch.Generator(tokens.device).manual_seed(seed)
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    feed = tokens  # the prompt once, then one token per step
    for _ in range(max_new_tokens):
        logits = forward_with_cache(model, feed, cache)[:, -1]
        chosen = parts.sample_next_token(
            logits,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            frequency_penalty=frequency_penalty,
            generated=tokens[:, prompt:],
            generator=generator,
        )
        if eos_token_id is not None:
            chosen = torch.where(finished, eos_token_id, chosen)
            finished = finished | (chosen == eos_token_id)
        feed = chosen[:, None]
        tokens = torch.cat([tokens, feed], dim=-1)
        if on_token is not None:
            on_token(chosen)
        if finished.all():
            break
    return tokens
