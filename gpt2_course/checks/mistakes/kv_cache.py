"""Common KV-cache mistakes (notebook 08), written on the reference parts.

Each mistake's docstring is what it looks like: the table below takes it from there.
"""

from functools import partial

import einops
import torch
import torch.nn.functional as F

from gpt2_course import parts
from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.kv_cache import KVCache, attention_with_cache, forward_with_cache


def _mistake(name: str, code) -> Mistake:
    return Mistake(name, " ".join(code.__doc__.split()), code)


# --------------------------------------------------------------------------- KVCache


class NeverAdvanced(KVCache):
    """a cache whose filled[layer] never moves on, so every update overwrites position 0
    (the cache is not appended to)"""

    def update(self, layer, keys, values):
        new = keys.shape[2]
        self.keys[layer, :, :, :new], self.values[layer, :, :, :new] = keys, values
        return self.keys[layer, :, :, :new], self.values[layer, :, :, :new]


class ReturnsOnlyNew(KVCache):
    """update returning only the new keys and values instead of every position stored so far"""

    def update(self, layer, keys, values):
        super().update(layer, keys, values)
        return keys, values


class SharedCounter(KVCache):
    """one position counter for all layers (each layer must count its own positions)"""

    position = 0

    @property
    def length(self):
        return self.position

    def update(self, layer, keys, values):
        start, end = self.position, self.position + keys.shape[2]
        if end > self.capacity:
            raise ValueError(f"the context is exceeded (n_ctx={self.cfg.n_ctx})")
        self.keys[layer, :, :, start:end], self.values[layer, :, :, start:end] = keys, values
        self.position = self.filled[layer] = end
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class LengthSums(KVCache):
    """length adding up every layer's positions (it is the smallest per layer)"""

    @property
    def length(self):
        return sum(self.filled)


class NoCapacityCheck(KVCache):
    """a cache with no check for its capacity (raise a ValueError naming n_ctx instead of
    a shape error)"""

    def update(self, layer, keys, values):
        start, end = self.filled[layer], self.filled[layer] + keys.shape[2]
        self.keys[layer, :, :, start:end], self.values[layer, :, :, start:end] = keys, values
        self.filled[layer] = end
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


# --------------------------------------------------------------------------- forward_with_cache


def _blocks(model, x, cache, attention=attention_with_cache):
    """forward_with_cache after the embeddings, with a given cached attention."""
    for layer, block in enumerate(model.blocks):
        x = x + attention(block.attn, block.ln1(x), cache, layer)
        x = x + block.mlp(block.ln2(x))
    return model.unembed(model.ln_final(x))


def _forward(model, tokens, cache, attention):
    start, new = cache.length, tokens.shape[1]
    if start + new > model.cfg.n_ctx:
        raise ValueError(f"the context is exceeded (n_ctx={model.cfg.n_ctx})")
    x = model.embed(tokens) + model.pos_embed.W_pos[start : start + new]
    return _blocks(model, x, cache, attention)


def _attention(attn, x, cache, layer, *, use_cache=True, mask="offset"):
    q, k, v = (
        einops.einsum(x, W, "b p d_model, h d_model d_head -> b h p d_head") + b[:, None]
        for W, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V))
    )
    all_k, all_v = cache.update(layer, k, v)
    k, v = (all_k, all_v) if use_cache else (k, v)
    new, total = q.shape[-2], k.shape[-2]
    visible = None  # mask="none"
    if mask == "offset":
        visible = torch.ones(new, total, dtype=torch.bool).tril(total - new)
    elif mask == "plain":  # as if there were no cached positions
        visible = ~torch.ones(new, total, dtype=torch.bool).triu(1)
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    return einops.einsum(z, attn.W_O, "b h p d_head, h d_head d_model -> b p d_model") + attn.b_O


def positions_restart(model, tokens, cache):
    """positions restarting at 0 for every call (the new tokens' positions start at
    cache.length)"""
    return _blocks(model, model.embed(tokens) + model.pos_embed(tokens), cache)


def cache_not_used(model, tokens, cache):
    """attention over the new positions only: the cached keys and values that update
    returns are not used"""
    return _forward(model, tokens, cache, partial(_attention, use_cache=False))


def mask_without_offset(model, tokens, cache):
    """the plain causal mask triu(ones(new_pos, all_pos), 1), which ignores the cached
    positions (query i sits at position cache.length + i)"""
    return _forward(model, tokens, cache, partial(_attention, mask="plain"))


def no_mask(model, tokens, cache):
    """no causal mask in the cached attention (a prompt then sees its own future)"""
    return _forward(model, tokens, cache, partial(_attention, mask="none"))


def no_context_check(model, tokens, cache):
    """no check of the context: past n_ctx there are no positional embeddings left, and
    the error should say so (a ValueError naming n_ctx)"""
    start = cache.length  # past n_ctx, W_pos has too few rows: a shape error
    x = model.embed(tokens) + model.pos_embed.W_pos[start:][: tokens.shape[1]]
    return _blocks(model, x, cache)


# --------------------------------------------------------------------------- generate_with_cache


class Generation:
    """generate_with_cache step by step; each mistake below rewrites one step."""

    def __call__(self, model, tokens, max_new_tokens, *, seed=None, eos_token_id=None, **sampling):
        prompt, end = tokens.shape[1], tokens.shape[1] + max_new_tokens
        if end > model.cfg.n_ctx:
            raise ValueError(f"the context would be exceeded (n_ctx={model.cfg.n_ctx})")
        cache, generator = KVCache(model.cfg, len(tokens)), self.generator(None, seed)
        finished = torch.zeros(len(tokens), dtype=torch.bool)
        logits = self.prompt_logits(model, tokens, cache)
        while True:
            generator = self.generator(generator, seed)
            generated = self.counted(tokens, prompt)
            chosen = parts.sample_next_token(
                logits, generated=generated, generator=generator, **sampling
            )
            if eos_token_id is not None:
                chosen = self.after_eos(chosen, finished, eos_token_id)
                finished = finished | (chosen == eos_token_id)
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            if finished.all() or tokens.shape[1] == end:
                return tokens
            logits = forward_with_cache(model, self.fed(tokens), cache)[:, -1]

    def generator(self, generator, seed):
        if generator is None and seed is not None:
            return torch.Generator().manual_seed(seed)
        return generator

    def prompt_logits(self, model, tokens, cache):
        return forward_with_cache(model, tokens, cache)[:, -1]

    def counted(self, tokens, prompt):
        return tokens[:, prompt:]

    def after_eos(self, chosen, finished, eos):
        return chosen.masked_fill(finished, eos)

    def fed(self, tokens):
        return tokens[:, -1:]


class CallsModel(Generation):
    """the prompt run through model(tokens), the uncached forward pass, so the cache never
    gets the prompt"""

    def prompt_logits(self, model, tokens, cache):
        return model(tokens)[:, -1]


class RefeedsEverything(Generation):
    """the whole sequence fed to forward_with_cache at every step (feed only the newest
    token: the cache already holds the rest)"""

    def fed(self, tokens):
        return tokens


class FirstPosition(Generation):
    """the first position's logits after the prompt (logits[:, 0]) instead of the last"""

    def prompt_logits(self, model, tokens, cache):
        return forward_with_cache(model, tokens, cache)[:, 0]


class PromptPenalised(Generation):
    """a frequency penalty that counts the prompt's tokens too (only generated tokens count)"""

    def counted(self, tokens, prompt):
        return tokens


class FinishedRowsContinue(Generation):
    """rows that produced eos carrying on with ordinary tokens (a finished row must only
    get eos)"""

    def after_eos(self, chosen, finished, eos):
        return chosen


class GeneratorPerStep(Generation):
    """a new torch.Generator seeded at every step (one generator for the whole call)"""

    def generator(self, generator, seed):
        return None if seed is None else torch.Generator().manual_seed(seed)


# fmt: off
MISTAKES = {
    "kv_cache.KVCache": [
        _mistake("never_advanced", NeverAdvanced),
        _mistake("returns_only_new", ReturnsOnlyNew),
        _mistake("shared_counter", SharedCounter),
        _mistake("length_sums", LengthSums),
        _mistake("no_capacity_check", NoCapacityCheck),
    ],
    "kv_cache.forward_with_cache": [
        _mistake("positions_restart", positions_restart),
        _mistake("cache_not_used", cache_not_used),
        _mistake("mask_without_offset", mask_without_offset),
        _mistake("no_mask", no_mask),
        _mistake("no_context_check", no_context_check),
    ],
    "kv_cache.generate_with_cache": [
        _mistake("calls_model", CallsModel()),
        _mistake("refeeds_everything", RefeedsEverything()),
        _mistake("first_position", FirstPosition()),
        _mistake("prompt_penalised", PromptPenalised()),
        _mistake("finished_rows_continue", FinishedRowsContinue()),
        _mistake("generator_per_step", GeneratorPerStep()),
    ],
}
# fmt: on
