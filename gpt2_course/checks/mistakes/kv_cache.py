"""Common KV-cache mistakes (notebook 08), written on the reference parts."""

from functools import partial

import einops
import torch
import torch.nn.functional as F

from gpt2_course import parts
from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.kv_cache import KVCache, attention_with_cache, forward_with_cache

# --------------------------------------------------------------------------- KVCache


class NeverAdvanced(KVCache):
    def update(self, layer, keys, values):
        new = keys.shape[2]
        self.keys[layer, :, :, :new], self.values[layer, :, :, :new] = keys, values
        return self.keys[layer, :, :, :new], self.values[layer, :, :, :new]


class ReturnsOnlyNew(KVCache):
    def update(self, layer, keys, values):
        super().update(layer, keys, values)
        return keys, values


class NoCapacityCheck(KVCache):
    def update(self, layer, keys, values):
        start, end = self.filled[layer], self.filled[layer] + keys.shape[2]
        self.keys[layer, :, :, start:end], self.values[layer, :, :, start:end] = keys, values
        self.filled[layer] = end
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class SharedCounter(NoCapacityCheck):
    position = 0
    length = property(lambda self: self.position)

    def update(self, layer, keys, values):
        if self.position + keys.shape[2] > self.capacity:
            raise ValueError(f"the context is exceeded (n_ctx={self.cfg.n_ctx})")
        self.filled[layer] = self.position  # every layer writes where the last one stopped
        self.position += keys.shape[2]
        return super().update(layer, keys, values)


class LengthSums(KVCache):
    length = property(lambda self: sum(self.filled))


# --------------------------------------------------------------------------- forward_with_cache


def _blocks(model, x, cache, attention=attention_with_cache):
    for layer, block in enumerate(model.blocks):
        x = x + attention(block.attn, block.ln1(x), cache, layer)
        x = x + block.mlp(block.ln2(x))
    return model.unembed(model.ln_final(x))


def _forward(model, tokens, cache, **attention):
    """forward_with_cache with `_attention(..., **attention)`."""
    start, new = cache.length, tokens.shape[1]
    if start + new > model.cfg.n_ctx:
        raise ValueError(f"the context is exceeded (n_ctx={model.cfg.n_ctx})")
    x = model.embed(tokens) + model.pos_embed.W_pos[start : start + new]
    return _blocks(model, x, cache, partial(_attention, **attention))


def _attention(attn, x, cache, layer, *, use_cache=True, mask="offset"):
    q, k, v = (
        einops.einsum(x, W, "b p d_model, h d_model d_head -> b h p d_head") + b[:, None]
        for W, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V))
    )
    all_k, all_v = cache.update(layer, k, v)
    k, v = (all_k, all_v) if use_cache else (k, v)
    new, total = q.shape[-2], k.shape[-2]
    # "plain": the causal mask as if there were no cached positions; "none": no mask
    diagonal = {"offset": total - new, "plain": 0}.get(mask)
    visible = None if diagonal is None else torch.ones(new, total, dtype=torch.bool).tril(diagonal)
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    return einops.einsum(z, attn.W_O, "b h p d_head, h d_head d_model -> b p d_model") + attn.b_O


def no_context_check(model, tokens, cache):
    start = cache.length  # past n_ctx, W_pos has too few rows: a shape error
    x = model.embed(tokens) + model.pos_embed.W_pos[start:][: tokens.shape[1]]
    return _blocks(model, x, cache)


# --------------------------------------------------------------------------- generate_with_cache


class Generation:
    """generate_with_cache step by step; a mistake replaces one step (a plain function)."""

    def __init__(self, **steps):
        vars(self).update(steps)

    def __call__(self, model, tokens, max_new_tokens, *, seed=None, eos_token_id=None, **sampling):
        prompt, end = tokens.shape[1], tokens.shape[1] + max_new_tokens
        if end > model.cfg.n_ctx:
            raise ValueError(f"the context would be exceeded (n_ctx={model.cfg.n_ctx})")
        cache, generator = KVCache(model.cfg, len(tokens)), None
        finished = torch.zeros(len(tokens), dtype=torch.bool)
        logits = self.prompt_logits(model, tokens, cache)
        while True:
            generator = self.generator(generator, seed)
            chosen = parts.sample_next_token(
                logits, generated=self.counted(tokens, prompt), generator=generator, **sampling
            )
            if eos_token_id is not None:
                chosen = self.after_eos(chosen, finished, eos_token_id)
                finished = finished | (chosen == eos_token_id)
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            if finished.all() or tokens.shape[1] == end:
                return tokens
            logits = forward_with_cache(model, self.fed(tokens), cache)[:, -1]

    @staticmethod
    def generator(generator, seed):
        if generator is None and seed is not None:
            return torch.Generator().manual_seed(seed)
        return generator

    @staticmethod
    def prompt_logits(model, tokens, cache):
        return forward_with_cache(model, tokens, cache)[:, -1]

    @staticmethod
    def counted(tokens, prompt):
        return tokens[:, prompt:]

    @staticmethod
    def after_eos(chosen, finished, eos):
        return chosen.masked_fill(finished, eos)

    @staticmethod
    def fed(tokens):
        return tokens[:, -1:]


# fmt: off
MISTAKES = {
    "kv_cache.KVCache": [
        Mistake("never_advanced", "a cache whose filled[layer] never moves on, so every update overwrites position 0 (the cache is not appended to)", NeverAdvanced),
        Mistake("returns_only_new", "update returning only the new keys and values instead of every position stored so far", ReturnsOnlyNew),
        Mistake("shared_counter", "one position counter for all layers (each layer must count its own positions)", SharedCounter),
        Mistake("length_sums", "length adding up every layer's positions (it is the smallest per layer)", LengthSums),
        Mistake("no_capacity_check", "a cache with no check for its capacity (raise a ValueError naming n_ctx instead of a shape error)", NoCapacityCheck),
    ],
    "kv_cache.forward_with_cache": [
        Mistake("positions_restart", "positions restarting at 0 for every call (the new tokens' positions start at cache.length)", lambda model, tokens, cache: _blocks(model, model.embed(tokens) + model.pos_embed(tokens), cache)),
        Mistake("cache_not_used", "attention over the new positions only: the cached keys and values that update returns are not used", partial(_forward, use_cache=False)),
        Mistake("mask_without_offset", "the plain causal mask triu(ones(new_pos, all_pos), 1), which ignores the cached positions (query i sits at position cache.length + i)", partial(_forward, mask="plain")),
        Mistake("no_mask", "no causal mask in the cached attention (a prompt then sees its own future)", partial(_forward, mask="none")),
        Mistake("no_context_check", "no check of the context: past n_ctx there are no positional embeddings left, and the error should say so (a ValueError naming n_ctx)", no_context_check),
    ],
    "kv_cache.generate_with_cache": [
        Mistake("calls_model", "the prompt run through model(tokens), the uncached forward pass, so the cache never gets the prompt", Generation(prompt_logits=lambda model, tokens, cache: model(tokens)[:, -1])),
        Mistake("refeeds_everything", "the whole sequence fed to forward_with_cache at every step (feed only the newest token: the cache already holds the rest)", Generation(fed=lambda tokens: tokens)),
        Mistake("first_position", "the first position's logits after the prompt (logits[:, 0]) instead of the last", Generation(prompt_logits=lambda model, tokens, cache: forward_with_cache(model, tokens, cache)[:, 0])),
        Mistake("prompt_penalised", "a frequency penalty that counts the prompt's tokens too (only generated tokens count)", Generation(counted=lambda tokens, prompt: tokens)),
        Mistake("finished_rows_continue", "rows that produced eos carrying on with ordinary tokens (a finished row must only get eos)", Generation(after_eos=lambda chosen, finished, eos: chosen)),
        Mistake("generator_per_step", "a new torch.Generator seeded at every step (one generator for the whole call)", Generation(generator=lambda generator, seed: None if seed is None else torch.Generator().manual_seed(seed))),
    ],
}
# fmt: on
