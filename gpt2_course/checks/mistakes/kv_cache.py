"""Common KV-cache mistakes (notebook 08), written on the reference parts."""

from functools import partial

import einops
import torch
import torch.nn.functional as F

from gpt2_course import parts
from gpt2_course.checks.core import Mistake
from gpt2_course.prompts import check_prompt
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


class AdvancesFirst(KVCache):
    def update(self, layer, keys, values):
        start = self.filled[layer]
        self.filled[layer] += keys.shape[2]  # counted before the capacity is checked
        if self.filled[layer] > self.capacity:
            raise ValueError(f"the context is exceeded (n_ctx={self.cfg.n_ctx})")
        self.keys[layer, :, :, start : self.filled[layer]] = keys
        self.values[layer, :, :, start : self.filled[layer]] = values
        return self.keys[layer, :, :, : self.filled[layer]], self.values[
            layer, :, :, : self.filled[layer]
        ]


class KeepsCallersTensors(KVCache):
    """Keeps the tensors it is given (a list per layer) instead of copying them into its buffers."""

    def update(self, layer, keys, values):
        if self.filled[layer] + keys.shape[2] > self.capacity:
            raise ValueError(f"the context is exceeded (n_ctx={self.cfg.n_ctx})")
        kept = vars(self).setdefault("kept", {}).setdefault(layer, [])
        kept.append((keys, values))
        self.filled[layer] += keys.shape[2]
        return tuple(torch.cat([pair[i] for pair in kept], dim=2) for i in (0, 1))


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


def _attention(attn, x, cache, layer, *, use_cache=True, mask="offset", swap=False, updates=1):
    q, k, v = (
        einops.einsum(x, W, "b p d_model, h d_model d_head -> b h p d_head") + b[:, None]
        for W, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V))
    )
    for _ in range(updates):  # swap: the values stored as keys, and read back the same way round
        all_k, all_v = cache.update(layer, v, k)[::-1] if swap else cache.update(layer, k, v)
    k, v = (all_k, all_v) if use_cache else (k, v)
    new, total = q.shape[-2], k.shape[-2]
    # "plain": the causal mask as if there were no cached positions; "none": no mask
    diagonal = {"offset": total - new, "plain": 0}.get(mask)
    visible = None if diagonal is None else torch.ones(new, total, dtype=torch.bool).tril(diagonal)
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    return einops.einsum(z, attn.W_O, "b h p d_head, h d_head d_model -> b p d_model") + attn.b_O


def recomputes_from_tokens(model, tokens, cache):
    """Keeps the tokens on the cache and runs the whole sequence again, filling the cache too."""
    seen = cache.tokens = torch.cat([getattr(cache, "tokens", tokens[:, :0]), tokens], dim=1)
    fresh = KVCache(model.cfg, len(tokens), seen.shape[1])
    logits = forward_with_cache(model, seen, fresh)
    start, end = seen.shape[1] - tokens.shape[1], seen.shape[1]
    for layer in range(model.cfg.n_layers):
        cache.update(
            layer, fresh.keys[layer, :, :, start:end], fresh.values[layer, :, :, start:end]
        )
    return logits[:, start:]


def no_context_check(model, tokens, cache):
    start = cache.length  # past n_ctx, W_pos has too few rows: a shape error
    x = model.embed(tokens) + model.pos_embed.W_pos[start:][: tokens.shape[1]]
    return _blocks(model, x, cache)


# --------------------------------------------------------------------------- generate_with_cache


class Generation:
    """generate_with_cache step by step, as the reference part; a mistake replaces one step."""

    def __init__(self, **steps):
        vars(self).update(steps)

    def __call__(
        self,
        model,
        tokens,
        max_new_tokens,
        *,
        seed=None,
        eos_token_id=None,
        on_token=None,
        **sampling,
    ):
        self.check(tokens, max_new_tokens, model)
        prompt, stream = tokens.shape[1], on_token or (lambda token: None)
        cache = KVCache(model.cfg, len(tokens))
        generator, finished = self.start(seed), torch.zeros(len(tokens), dtype=torch.bool)
        logits = None
        for step in self.steps(max_new_tokens):
            if logits is None:
                logits = self.prompt_logits(model, tokens, cache)
            generator = self.next_generator(generator, seed)
            raw = parts.sample_next_token(
                logits, generated=self.counted(tokens, prompt), generator=generator, **sampling
            )
            chosen = raw
            if eos_token_id is not None:
                chosen = self.after_eos(raw, finished, eos_token_id)
                finished = finished | (chosen == eos_token_id)
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            self.stream(stream, raw, chosen, tokens)
            if self.stop(finished):
                break
            if step < max_new_tokens - 1 or self.feed_last:
                logits = self.step_logits(model, tokens, cache)
        self.finish(stream, tokens, prompt)
        return tokens

    check = staticmethod(check_prompt)
    steps = staticmethod(range)
    feed_last = False

    @staticmethod
    def start(seed):
        return None if seed is None else torch.Generator().manual_seed(seed)

    @staticmethod
    def next_generator(generator, seed):
        return generator

    @staticmethod
    def prompt_logits(model, tokens, cache):
        return forward_with_cache(model, tokens, cache)[:, -1]

    @staticmethod
    def step_logits(model, tokens, cache):
        return forward_with_cache(model, tokens[:, -1:], cache)[:, -1]

    @staticmethod
    def counted(tokens, prompt):
        return tokens[:, prompt:]

    @staticmethod
    def after_eos(chosen, finished, eos):
        return chosen.masked_fill(finished, eos)

    @staticmethod
    def stream(on_token, raw, chosen, tokens):
        on_token(chosen)

    @staticmethod
    def stop(finished):
        return bool(finished.all())

    @staticmethod
    def finish(on_token, tokens, prompt):
        pass


def _context_off_by_one(tokens, max_new_tokens, model):
    if tokens.shape[1] + max_new_tokens >= model.cfg.n_ctx:
        raise ValueError(f"the context would be exceeded (n_ctx={model.cfg.n_ctx})")
    check_prompt(tokens, max_new_tokens, model)


def _global_seed(seed):
    if seed is not None:
        torch.manual_seed(seed)  # draws from torch's global generator, reseeded


def _recomputed(model, tokens, cache):
    fresh = KVCache(model.cfg, len(tokens), tokens.shape[1])  # a new cache every step
    return forward_with_cache(model, tokens, fresh)[:, -1]


def _stream_at_end(on_token, tokens, prompt):
    for column in tokens[:, prompt:].unbind(dim=1):
        on_token(column)


# fmt: off
MISTAKES = {
    "kv_cache.KVCache": [
        Mistake("never_advanced", "a cache whose filled[layer] never moves on, so every update overwrites position 0 (the cache is not appended to)", NeverAdvanced),
        Mistake("returns_only_new", "update returning only the new keys and values instead of every position stored so far", ReturnsOnlyNew),
        Mistake("shared_counter", "one position counter for all layers (each layer must count its own positions)", SharedCounter),
        Mistake("length_sums", "length adding up every layer's positions (it is the smallest per layer)", LengthSums),
        Mistake("no_capacity_check", "a cache with no check for its capacity (raise a ValueError naming n_ctx instead of a shape error)", NoCapacityCheck),
        Mistake("advances_before_checking", "an update that advances filled[layer] before it checks the capacity, so the error leaves the cache changed", AdvancesFirst),
        Mistake("keeps_callers_tensors", "a cache that keeps the tensors it is given instead of copying them into its buffers (when the caller reuses them, the cache changes)", KeepsCallersTensors),
    ],
    "kv_cache.forward_with_cache": [
        Mistake("positions_restart", "positions restarting at 0 for every call (the new tokens' positions start at cache.length)", lambda model, tokens, cache: _blocks(model, model.embed(tokens) + model.pos_embed(tokens), cache)),
        Mistake("cache_not_used", "attention over the new positions only: the cached keys and values that update returns are not used", partial(_forward, use_cache=False)),
        Mistake("mask_without_offset", "the plain causal mask triu(ones(new_pos, all_pos), 1), which ignores the cached positions (query i sits at position cache.length + i)", partial(_forward, mask="plain")),
        Mistake("no_mask", "no causal mask in the cached attention (a prompt then sees its own future)", partial(_forward, mask="none")),
        Mistake("keys_values_swapped", "cache.update(layer, v, k): keys and values swapped in the cache (and swapped back when read, so the logits stay right)", partial(_forward, swap=True)),
        Mistake("appended_twice", "the new keys and values stored twice per layer (cache.update called twice)", partial(_forward, updates=2)),
        Mistake("recomputes_from_tokens", "a forward pass that keeps the tokens and recomputes the whole sequence instead of reading the cached keys and values", recomputes_from_tokens),
        Mistake("no_context_check", "no check of the context: past n_ctx there are no positional embeddings left, and the error should say so (a ValueError naming n_ctx)", no_context_check),
    ],
    "kv_cache.generate_with_cache": [
        Mistake("calls_model", "the prompt run through model(tokens), the uncached forward pass, so the cache never gets the prompt", Generation(prompt_logits=lambda model, tokens, cache: model(tokens)[:, -1])),
        Mistake("refeeds_everything", "the whole sequence fed to forward_with_cache at every step (feed only the newest token: the cache already holds the rest)", Generation(step_logits=lambda model, tokens, cache: forward_with_cache(model, tokens, cache)[:, -1])),
        Mistake("recomputes_everything", "the whole sequence run again at every step, through a new cache (the cache rebuilt or bypassed: the answer does not come from it)", Generation(step_logits=_recomputed)),
        Mistake("feeds_last_token", "a forward pass after the last token too (its logits are never used, and at n_ctx it does not fit)", Generation(feed_last=True)),
        Mistake("first_position", "the first position's logits after the prompt (logits[:, 0]) instead of the last", Generation(prompt_logits=lambda model, tokens, cache: forward_with_cache(model, tokens, cache)[:, 0])),
        Mistake("prompt_penalised", "a frequency penalty that counts the prompt's tokens too (only generated tokens count)", Generation(counted=lambda tokens, prompt: tokens)),
        Mistake("finished_rows_continue", "rows that produced eos carrying on with ordinary tokens (a finished row must only get eos)", Generation(after_eos=lambda chosen, finished, eos: chosen)),
        Mistake("stops_when_any_finishes", "stopping as soon as one row has finished (stop when every row has)", Generation(stop=lambda finished: bool(finished.any()))),
        Mistake("never_stops_early", "generating max_new_tokens even after every row has finished (stop once all have)", Generation(stop=lambda finished: False)),
        Mistake("generator_per_step", "a new torch.Generator seeded at every step (one generator for the whole call)", Generation(next_generator=lambda generator, seed: Generation.start(seed))),
        Mistake("global_seed", "torch.manual_seed(seed), which reseeds torch's global generator (draw from a torch.Generator of your own and leave the global one alone)", Generation(start=_global_seed)),
        Mistake("fixed_seed_without_seed", "a generator seeded with 0 when no seed is given (with seed=None, draw from torch's global generator)", Generation(start=lambda seed: torch.Generator().manual_seed(seed or 0))),
        Mistake("stream_before_eos", "on_token given the sampled tokens before finished rows get eos (stream the tokens that are appended)", Generation(stream=lambda on_token, raw, chosen, tokens: on_token(raw))),
        Mistake("stream_whole_sequence", "on_token given the whole sequence (give it each step's new tokens, [batch])", Generation(stream=lambda on_token, raw, chosen, tokens: on_token(tokens))),
        Mistake("stream_at_end", "on_token called for every token only after the loop (call it as each token is chosen)", Generation(stream=lambda *args: None, finish=_stream_at_end)),
        Mistake("no_streaming", "on_token never called", Generation(stream=lambda *args: None)),
        Mistake("one_token_when_zero", "one token generated when max_new_tokens is 0 (the prompt comes back unchanged)", Generation(steps=lambda n: range(max(n, 1)))),
        Mistake("context_off_by_one", "a context check that refuses seq + max_new_tokens == n_ctx (exactly n_ctx positions fit)", Generation(check=_context_off_by_one)),
        Mistake("no_argument_check", "no check of the arguments before generating (start with check_prompt, which raises the documented ValueErrors)", Generation(check=lambda tokens, n, model: None)),
    ],
}
# fmt: on
