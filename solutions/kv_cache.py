"""Fast generation with a cache of keys and values.

Without a cache, generating token t runs the model over all t tokens again,
although the keys and values of tokens 0..t-1 have not changed: only the
newest token's query, key and value are new. The cache keeps every layer's
keys and values, so each step runs the model on one token.

The model's own modules keep their contract (`forward(tokens) -> logits`);
`forward_with_cache` reuses their parameters and replaces only the two things
that depend on where the new tokens sit: the positional embedding (an offset)
and attention (new queries against cached keys and values).
"""

import weakref
from collections.abc import Callable

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.config import TransformerConfig
from gpt2_course.prompts import check_prompt


class KVCache:
    """Keys and values of every layer for the positions processed so far.

    Buffers are allocated once, for `capacity` positions (n_ctx by default), so
    that adding a token writes into them instead of copying the whole cache.
    Heads come before positions: [batch, n_heads, pos, d_head], the layout in
    which each head's attention is one matrix product.
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
        """How many positions every layer holds: where the next token's position starts."""
        return min(self.filled)

    def update(
        self,
        layer: int,
        keys: Float[Tensor, "batch n_heads new_pos d_head"],
        values: Float[Tensor, "batch n_heads new_pos d_head"],
    ) -> tuple[
        Float[Tensor, "batch n_heads pos d_head"], Float[Tensor, "batch n_heads pos d_head"]
    ]:
        """Append the new positions' keys and values to `layer`; return all the layer's so far."""
        start = self.filled[layer]
        end = start + keys.shape[2]
        if end > self.capacity:
            raise ValueError(
                f"the KV cache is full: layer {layer} holds {start} positions "
                f"and {keys.shape[2]} more would exceed its capacity of "
                f"{self.capacity} (the context is n_ctx={self.cfg.n_ctx})"
            )
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        self.filled[layer] = end
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


# attn -> (the weights' identities and versions, fused W_QKV, fused b_QKV)
_FUSED_QKV: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def fused_qkv(attn: nn.Module) -> tuple[Float[Tensor, "d_model qkv"], Float[Tensor, " qkv"]]:
    """attn's W_Q, W_K, W_V side by side in one [d_model, 3 * heads * d_head] matrix, and biases.

    For one new token, one product with this matrix costs less than three per-head
    ones. It is rebuilt only when a weight is replaced or changed in place (torch
    counts in-place changes in `_version`), so generating never uses stale weights.
    """
    params = (attn.W_Q, attn.W_K, attn.W_V, attn.b_Q, attn.b_K, attn.b_V)
    key = tuple((p.data_ptr(), p._version) for p in params)
    cached = _FUSED_QKV.get(attn)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            W = einops.rearrange(
                torch.stack(params[:3]), "qkv heads d_model d_head -> d_model (qkv heads d_head)"
            ).contiguous()
            b = einops.rearrange(torch.stack(params[3:]), "qkv heads d_head -> (qkv heads d_head)")
        cached = _FUSED_QKV[attn] = (key, W, b)
    return cached[1], cached[2]


def attention_with_cache(
    attn: nn.Module, x: Float[Tensor, "batch new_pos d_model"], cache: KVCache, layer: int
) -> Float[Tensor, "batch new_pos d_model"]:
    """`attn`'s forward for new positions that also attend to the cached earlier ones."""
    W_QKV, b_QKV = fused_qkv(attn)
    q, k, v = einops.rearrange(
        x @ W_QKV + b_QKV,
        "b pos (qkv heads d_head) -> qkv b heads pos d_head",
        qkv=3,
        heads=attn.cfg.n_heads,
    )
    k, v = cache.update(layer, k, v)  # now every position so far: [b, heads, pos, d_head]
    new_pos, all_pos = q.shape[-2], k.shape[-2]
    visible = None  # a single newest token may look at every position: no mask needed
    if new_pos > 1:
        # new query i sits at absolute position (all_pos - new_pos) + i and sees keys up to there
        query_at = torch.arange(all_pos - new_pos, all_pos, device=q.device)
        visible = torch.arange(all_pos, device=q.device) <= query_at[:, None]
    # softmax(q k^T / sqrt(d_head)) v in torch's fused kernel, which reads the cache in place
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # [b, heads, new_pos, d_head]
    return (
        einops.einsum(z, attn.W_O, "b heads pos d_head, heads d_head d_model -> b pos d_model")
        + attn.b_O
    )


def forward_with_cache(
    model: nn.Module, tokens: Int[Tensor, "batch new_pos"], cache: KVCache, last_only: bool = False
) -> Float[Tensor, "batch new_pos d_vocab"]:
    """Logits for `tokens`, which follow the `cache.length` positions already in the cache.

    `last_only=True` unembeds the last position only (all that generation needs):
    the result is then [batch, 1, d_vocab].
    """
    start, new_pos = cache.length, tokens.shape[1]
    n_ctx = model.cfg.n_ctx
    if start + new_pos > n_ctx:
        raise ValueError(
            f"the context is exceeded: {start} cached + {new_pos} new positions "
            f"> n_ctx={n_ctx}, the most positions the model has embeddings for"
        )
    # The positional embedding of the new tokens: positions start..start+new_pos-1, not 0..
    residual = model.embed(tokens) + model.pos_embed.W_pos[start : start + new_pos]
    for layer, block in enumerate(model.blocks):
        # LayerNorm and the MLP act on each position alone: the block's own modules do.
        residual = residual + attention_with_cache(block.attn, block.ln1(residual), cache, layer)
        residual = residual + block.mlp(block.ln2(residual))
    if last_only:
        residual = residual[:, -1:]
    return model.unembed(model.ln_final(residual))


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
    """`generate`, with the same arguments and results, running the model on one new token per step.

    The prompt goes through the model once, filling the cache; after that only
    the newest token does, and nothing after the last. `on_token`, if given,
    receives each step's appended tokens [batch] as soon as they are chosen (the
    CLI streams text with it). The same ValueErrors as `generate`, before anything runs.
    """
    check_prompt(tokens, max_new_tokens, model)  # before anything runs
    batch, prompt_len = tokens.shape
    if max_new_tokens == 0:
        return tokens.clone()  # as generate, without running the model
    generator = (
        torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None
    )
    weight = next(model.parameters())
    cache = KVCache(model.cfg, batch, prompt_len + max_new_tokens, weight.device, weight.dtype)
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    logits = forward_with_cache(model, tokens, cache, last_only=True)[:, -1, :]
    for step in range(max_new_tokens):
        next_token = parts.sample_next_token(
            logits,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            frequency_penalty=frequency_penalty,
            generated=tokens[:, prompt_len:],
            generator=generator,
        )
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished = finished | (next_token == eos_token_id)
        tokens = torch.cat([tokens, einops.rearrange(next_token, "batch -> batch 1")], dim=1)
        if on_token is not None:
            on_token(next_token)
        if finished.all() or step == max_new_tokens - 1:
            break
        logits = forward_with_cache(model, tokens[:, -1:], cache)[:, -1, :]
    return tokens
