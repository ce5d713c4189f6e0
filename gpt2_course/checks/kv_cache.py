"""Checks for the KV cache (notebook 08).

* `kv_cache.KVCache`: what `update` returns and what `length` says, step by
  step, against the plain concatenation of everything stored; a clear error
  when the cache would hold more than its capacity (n_ctx).
* `kv_cache.forward_with_cache`: a prompt, then single tokens and chunks, fed
  through a (reference) cache: the logits at every step equal the uncached
  forward pass over the whole sequence; a clear error past n_ctx.
* `kv_cache.generate_with_cache`: tokens identical to the uncached `generate`
  (greedy, with a penalty, with eos, sampled with a seed), up to exactly n_ctx
  tokens; it must not call the uncached `model(tokens)`; a clear error past n_ctx.

The models are course Transformers built from the reference solutions: a small
seeded GPT-2 (n_ctx 64, so "up to n_ctx" costs little) and GPT-2 small with the
reference's weights.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import einops
import torch
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.checks.core import Case, CheckSetupError, Mistake, compare, describe_exception
from gpt2_course.checks.registry import Check, register
from gpt2_course.checks.sampling import (
    SAMPLING_SEED,
    SMALL,
    compare_tokens,
    eos_of,
    random_prompts,
    small_hf_model,
)
from gpt2_course.config import TransformerConfig
from gpt2_course.reference import get_reference

TINY = TransformerConfig(d_model=6, n_heads=2, d_head=3, n_layers=2, n_ctx=8, d_vocab=10, d_mlp=12)
CONTEXT_WORDS = re.compile(r"n_ctx|context", re.IGNORECASE)


# =============================================================== models


def course_model(cfg: TransformerConfig, hf_state_dict: dict[str, Tensor]) -> nn.Module:
    """A Transformer of the reference solutions holding a Hugging Face GPT-2's weights."""
    from solutions.transformer import Transformer, load_gpt2_weights

    with parts.using(parts.SOLUTIONS), torch.device("meta"):  # no random initialisation
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    load_gpt2_weights(model, hf_state_dict)
    return model.eval()


@cache
def small_course_model(seed: int = 0) -> nn.Module:
    return course_model(SMALL, small_hf_model(seed).state_dict())


@cache
def gpt2_course_model() -> nn.Module:
    return course_model(TransformerConfig(), get_reference().hf_state_dict)


class NoUncachedForward(nn.Module):
    """A model's modules without its uncached forward: cached generation must not need it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.cfg = model.cfg
        self.embed, self.pos_embed, self.blocks = model.embed, model.pos_embed, model.blocks
        self.ln_final, self.unembed = model.ln_final, model.unembed

    def forward(self, tokens: Tensor) -> Tensor:
        raise RuntimeError(
            "generate_with_cache called model(tokens), the uncached forward pass over every "
            "token: run the prompt once, then each new token, through forward_with_cache"
        )


# =============================================================== "raises a clear error"


@dataclass
class ContextError:
    """Expected outcome: a clear error saying the context (n_ctx) is exceeded."""

    what: str  # what the case did, for the message


def expect_context_error(run: Callable[[], Any]) -> Tensor:
    """True if `run` raises an error that mentions n_ctx or the context; False if it returns.

    Any other error propagates, so that the learner sees it (and a mistake can match it).
    """
    try:
        run()
    except NotImplementedError:
        raise
    except Exception as error:
        if CONTEXT_WORDS.search(str(error)):
            return torch.tensor([True])
        raise
    return torch.tensor([False])


def compare_outcome(actual: Any, expected: Any, atol: float, rtol: float) -> str | None:
    """Logits with `compare`, tokens exactly, context errors by the flag."""
    if isinstance(expected, ContextError):
        if isinstance(actual, Tensor) and actual.dtype == torch.bool and bool(actual.all()):
            return None
        return (
            f"{expected.what} returned normally: it must raise an error "
            "(a ValueError) that says the context (n_ctx) is exceeded"
        )
    if isinstance(expected, Tensor) and expected.dtype == torch.bool:
        return None if isinstance(actual, Tensor) and torch.equal(actual, expected) else "different"
    if isinstance(expected, Tensor) and not expected.is_floating_point():
        return compare_tokens(actual, expected)
    return compare(actual, expected, atol, rtol)


def check_shape(output: Any, shape: tuple[int, ...], what: str) -> Tensor:
    if not isinstance(output, Tensor):
        raise CheckSetupError(f"{what} returned {type(output).__name__}, expected a tensor")
    if tuple(output.shape) != shape:
        raise CheckSetupError(f"{what} returned shape {list(output.shape)}, expected {list(shape)}")
    return output


# =============================================================== KVCache


def chunk(layer_seed: int, positions: int, batch: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(layer_seed)
    return torch.randn(batch, TINY.n_heads, positions, TINY.d_head, generator=g)


def cache_script(positions: list[int]) -> list[tuple[int, Tensor, Tensor]]:
    """Updates as a forward pass makes them: every layer in turn, for each group of positions."""
    script = []
    for step, new in enumerate(positions):
        for layer in range(TINY.n_layers):
            seed = 1000 + 10 * step + layer
            script.append((layer, chunk(seed, new), chunk(seed + 500, new)))
    return script


def stored(script: list[tuple[int, Tensor, Tensor]], layer: int, upto: int, which: int) -> Tensor:
    """Everything `layer` should hold after the first `upto` updates: keys (1) or values (2)."""
    parts_ = [entry[which] for entry in script[:upto] if entry[0] == layer]
    return torch.cat(parts_, dim=2)


def cache_cases() -> list[Case]:
    prompt_then_two = cache_script([3, 1, 1])  # 6 updates: (layer 0, layer 1) x 3
    cases = [
        Case(
            "layer 0's keys after a 3-position prompt",
            (prompt_then_two, 1, "keys"),
            expected=stored(prompt_then_two, 0, 1, 1),
        ),
        Case(
            "layer 0's keys after the prompt and 2 single tokens",
            (prompt_then_two, 5, "keys"),
            expected=stored(prompt_then_two, 0, 5, 1),
        ),
        Case(
            "layer 1's values after the prompt and 2 single tokens",
            (prompt_then_two, 6, "values"),
            expected=stored(prompt_then_two, 1, 6, 2),
        ),
        Case(
            "length after the prompt and 2 single tokens",
            (prompt_then_two, 6, "length"),
            expected=torch.tensor([5]),
        ),
        Case(
            "length while a step is half done (layer 0 has 4 positions, layer 1 still 3)",
            (prompt_then_two, 3, "length"),
            expected=torch.tensor([3]),
        ),
    ]
    full = cache_script([6, 1, 1])  # exactly n_ctx = 8 positions
    cases.append(
        Case(
            "filled to exactly n_ctx = 8 positions",
            (full, 6, "keys"),
            expected=stored(full, 1, 6, 1),
        )
    )
    over = cache_script([6, 1, 1, 1])
    cases.append(
        Case(
            "one position more than n_ctx = 8",
            (over, 7, "error"),
            expected=ContextError("storing a 9th position in a cache for n_ctx = 8"),
        )
    )
    return cases


def call_cache(cls: Any, case: Case) -> Any:
    script, updates, want = case.args
    try:
        cache_ = cls(TINY, 2)
    except NotImplementedError:
        raise
    except Exception as error:
        raise CheckSetupError(f"KVCache(cfg, batch) failed: {describe_exception(error)}") from error

    def run(upto: int) -> tuple[Tensor, Tensor] | None:
        result = None
        for layer, keys, values in script[:upto]:
            result = cache_.update(layer, keys.clone(), values.clone())
        return result

    if want == "error":
        run(updates - 1)
        return expect_context_error(lambda: run_one(cache_, script[updates - 1]))
    result = run(updates)
    if want == "length":
        return torch.tensor([int(cache_.length)])
    if not isinstance(result, tuple) or len(result) != 2:
        raise CheckSetupError("KVCache.update must return a tuple (keys, values)")
    return result[0] if want == "keys" else result[1]


def run_one(cache_: Any, entry: tuple[int, Tensor, Tensor]) -> Any:
    layer, keys, values = entry
    return cache_.update(layer, keys.clone(), values.clone())


class CacheBase:
    """The reference cache, re-expressed so that each mistake changes one line."""

    def __init__(self, cfg, batch, capacity=None, device=None, dtype=torch.float32):
        from solutions.kv_cache import KVCache

        self._inner = KVCache(cfg, batch, capacity, device, dtype)
        self.cfg, self.capacity = cfg, self._inner.capacity
        self.keys, self.values, self.filled = (
            self._inner.keys,
            self._inner.values,
            self._inner.filled,
        )

    @property
    def length(self):
        return min(self.filled)

    def start_of(self, layer):
        return self.filled[layer]

    def advance(self, layer, new):
        self.filled[layer] += new

    def update(self, layer, keys, values):
        start, new = self.start_of(layer), keys.shape[2]
        if start + new > self.capacity:
            raise ValueError(f"the context is exceeded (n_ctx={self.cfg.n_ctx})")
        self.keys[layer, :, :, start : start + new] = keys
        self.values[layer, :, :, start : start + new] = values
        self.advance(layer, new)
        end = self.filled[layer]
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class CacheNeverAdvanced(CacheBase):
    def advance(self, layer, new):
        self.written = new  # forgets to move filled[layer] on

    def update(self, layer, keys, values):
        super().update(layer, keys, values)
        return self.keys[layer, :, :, : keys.shape[2]], self.values[layer, :, :, : keys.shape[2]]


class CacheReturnsNew(CacheBase):
    def update(self, layer, keys, values):
        super().update(layer, keys, values)
        return keys, values


class CacheSharedCounter(CacheBase):
    """One counter for all layers: each layer's update moves everyone's position on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.position = 0

    @property
    def length(self):
        return self.position

    def start_of(self, layer):
        return self.position

    def advance(self, layer, new):
        self.position += new
        self.filled[layer] = self.position


class CacheLengthSums(CacheBase):
    @property
    def length(self):
        return sum(self.filled)


class CacheNoCapacityCheck(CacheBase):
    def update(self, layer, keys, values):
        start, new = self.filled[layer], keys.shape[2]
        self.keys[layer, :, :, start : start + new] = keys  # fails with a shape error past capacity
        self.values[layer, :, :, start : start + new] = values
        self.filled[layer] += new
        end = self.filled[layer]
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


register(
    Check(
        "kv_cache.KVCache",
        "a cache of keys and values",
        cache_cases,
        call_cache,
        [
            Mistake(
                "never_advanced",
                "a cache whose filled[layer] never moves on, so every "
                "update overwrites position 0 (the cache is not appended to)",
                CacheNeverAdvanced,
            ),
            Mistake(
                "returns_only_new",
                "update returning only the new keys and values "
                "instead of every position stored so far",
                CacheReturnsNew,
            ),
            Mistake(
                "shared_counter",
                "one position counter for all layers (each layer must count its own positions)",
                CacheSharedCounter,
            ),
            Mistake(
                "length_sums",
                "length adding up every layer's positions (it is the smallest per layer)",
                CacheLengthSums,
            ),
            Mistake(
                "no_capacity_check",
                "a cache with no check for its capacity (raise a "
                "ValueError naming n_ctx instead of a shape error)",
                CacheNoCapacityCheck,
            ),
        ],
        compare=compare_outcome,
    )
)

# =============================================================== forward_with_cache


def uncached_logits(model: nn.Module, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        return model(tokens)


def forward_cases() -> list[Case]:
    small = small_course_model(0)
    tokens = random_prompts(2, SMALL.n_ctx, seed=871)
    cases = []
    for name, chunks in [
        ("a 6-token prompt, then 6 single tokens", [6] + [1] * 6),
        (
            "a 4-token prompt, then chunks of 3, 1 and 5 tokens (the mask needs the offset)",
            [4, 3, 1, 5],
        ),
        ("a 40-token prompt, then single tokens up to exactly n_ctx = 64", [40] + [1] * 24),
    ]:
        used = sum(chunks)
        cases.append(
            Case(name, (small, tokens, chunks), expected=uncached_logits(small, tokens[:, :used]))
        )
    gpt2 = gpt2_course_model()
    text = get_reference().to_tokens("The lighthouse keeper wrote down every ship that passed")[
        :, :8
    ]
    cases.append(
        Case(
            "GPT-2 small (reference weights): a 6-token prompt, then 2 single tokens",
            (gpt2, text, [6, 1, 1]),
            expected=uncached_logits(gpt2, text),
        )
    )
    cases.append(
        Case(
            "one token after n_ctx = 64 cached positions",
            (small, torch.cat([tokens, tokens[:, :1]], dim=1), [64, 1]),
            expected=ContextError("feeding a 65th token to a model with n_ctx = 64"),
        )
    )
    return cases


def call_forward(fn: Any, case: Case) -> Any:
    from solutions.kv_cache import KVCache

    model, tokens, chunks = case.args
    cache_ = KVCache(model.cfg, tokens.shape[0], capacity=max(sum(chunks), 1))
    outputs, start = [], 0
    for i, new in enumerate(chunks):
        piece = tokens[:, start : start + new]
        if start + new > model.cfg.n_ctx:
            return expect_context_error(lambda piece=piece: fn(model, piece, cache_))
        logits = fn(model, piece, cache_)
        shape = (tokens.shape[0], new, model.cfg.d_vocab)
        outputs.append(
            check_shape(logits, shape, f"forward_with_cache (call {i + 1}, {new} new tokens)")
        )
        start += new
    return torch.cat(outputs, dim=1)


def _attention(attn, x, cache_, layer, mistake=""):
    """The reference attention_with_cache, with one mistake at a time."""
    x_heads = einops.rearrange(x, "b pos d_model -> b 1 pos d_model")
    q = x_heads @ attn.W_Q + attn.b_Q[:, None, :]
    k_new = x_heads @ attn.W_K + attn.b_K[:, None, :]
    v_new = x_heads @ attn.W_V + attn.b_V[:, None, :]
    k, v = cache_.update(layer, k_new, v_new)
    if mistake == "cache_not_used":
        k, v = k_new, v_new
    scores = q @ k.transpose(-1, -2) / attn.cfg.d_head**0.5
    new_pos, all_pos = scores.shape[-2:]
    if mistake == "mask_without_offset":
        future = torch.triu(torch.ones(new_pos, all_pos, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
    elif mistake != "no_mask":
        query_at = torch.arange(all_pos - new_pos, all_pos)
        scores = scores.masked_fill(torch.arange(all_pos) > query_at[:, None], float("-inf"))
    z = scores.softmax(dim=-1) @ v
    return (
        einops.einsum(z, attn.W_O, "b heads pos d_head, heads d_head d_model -> b pos d_model")
        + attn.b_O
    )


def _forward(model, tokens, cache_, mistake=""):
    start, new_pos = cache_.length, tokens.shape[1]
    if start + new_pos > model.cfg.n_ctx and mistake != "no_context_check":
        raise ValueError(f"the context is exceeded (n_ctx={model.cfg.n_ctx})")
    first = 0 if mistake == "positions_restart" else start
    residual = model.embed(tokens) + model.pos_embed.W_pos[first : first + new_pos]
    for layer, block in enumerate(model.blocks):
        residual = residual + _attention(block.attn, block.ln1(residual), cache_, layer, mistake)
        residual = residual + block.mlp(block.ln2(residual))
    return model.unembed(model.ln_final(residual))


def forward_mistake(name: str) -> Callable[..., Tensor]:
    return partial(_forward, mistake=name)


register(
    Check(
        "kv_cache.forward_with_cache",
        "a forward pass that reads and extends the cache",
        forward_cases,
        call_forward,
        [
            Mistake(
                "positions_restart",
                "positions restarting at 0 for every call (the "
                "new tokens' positions start at cache.length)",
                forward_mistake("positions_restart"),
            ),
            Mistake(
                "cache_not_used",
                "attention over the new positions only: the cached "
                "keys and values that update returns are not used",
                forward_mistake("cache_not_used"),
            ),
            Mistake(
                "mask_without_offset",
                "the plain causal mask triu(ones(new_pos, all_pos), 1), which ignores "
                "the cached positions (query i sits at position cache.length + i)",
                forward_mistake("mask_without_offset"),
            ),
            Mistake(
                "no_mask",
                "no causal mask in the cached attention (a prompt then sees its own future)",
                forward_mistake("no_mask"),
            ),
            Mistake(
                "no_context_check",
                "no check of the context: past n_ctx there are no positional embeddings "
                "left, and the error should say so (a ValueError naming n_ctx)",
                forward_mistake("no_context_check"),
            ),
        ],
        compare=compare_outcome,
    )
)

# =============================================================== generate_with_cache


def uncached_generate(
    model: nn.Module, tokens: Tensor, max_new_tokens: int, **settings: Any
) -> Tensor:
    from solutions.sampling import generate

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SAMPLING_SEED)
        return generate(model, tokens, max_new_tokens, **settings)


def generate_cached_cases() -> list[Case]:
    small = small_course_model(0)
    runner = NoUncachedForward(small)
    prompts = random_prompts(2, 5, seed=881)
    greedy = uncached_generate(small, prompts, 12, temperature=0.0)
    eos = eos_of(greedy[0], 5, 3, greedy[1:, 5:])
    long_prompts = random_prompts(3, 5, seed=883)
    # prompts that already hold what greedy would say next: counting the prompt changes the answer
    penalty_prompts = torch.cat([prompts[:, :4], greedy[:, 5:9]], dim=1)
    settings_list = [
        ("greedy, 2 prompts, 12 tokens", prompts, 12, {"temperature": 0.0}),
        (
            "greedy, 3 prompts, up to exactly n_ctx = 64 tokens",
            long_prompts,
            59,
            {"temperature": 0.0},
        ),
        (
            "greedy with frequency penalty 1.5",
            penalty_prompts,
            12,
            {"temperature": 0.0, "frequency_penalty": 1.5},
        ),
        (
            f"greedy, eos {eos} ends row 0 early",
            prompts,
            12,
            {"temperature": 0.0, "eos_token_id": eos},
        ),
        (
            "sampling with seed 5, temperature 0.9, top-k 20: the same draws",
            prompts,
            12,
            {"temperature": 0.9, "top_k": 20, "seed": 5},
        ),
    ]
    cases = [
        Case(name, ("tokens", runner, p, n, s), expected=uncached_generate(small, p, n, **s))
        for name, p, n, s in settings_list
    ]
    gpt2 = gpt2_course_model()
    text = get_reference().to_tokens("The lighthouse keeper wrote down every ship that passed")[
        :, :6
    ]
    cases.append(
        Case(
            "GPT-2 small (reference weights), greedy, 3 tokens",
            ("tokens", NoUncachedForward(gpt2), text, 3, {"temperature": 0.0}),
            expected=uncached_generate(gpt2, text, 3, temperature=0.0),
        )
    )
    cases.append(
        Case(
            "a 60-token prompt and 5 new tokens with n_ctx = 64",
            ("error", runner, random_prompts(1, 60, seed=884), 5, {"temperature": 0.0}),
            expected=ContextError("asking for 60 + 5 tokens from a model with n_ctx = 64"),
        )
    )
    return cases


def call_generate_cached(fn: Any, case: Case) -> Any:
    kind, model, tokens, max_new_tokens, settings = case.args
    # The check is about the cache: the next token comes from the reference sample_next_token.
    with parts.using(parts.SOLUTIONS), torch.random.fork_rng(devices=[]):
        torch.manual_seed(SAMPLING_SEED)
        if kind == "error":
            return expect_context_error(lambda: fn(model, tokens, max_new_tokens, **settings))
        return fn(model, tokens, max_new_tokens, **settings)


def _generate_cached(
    model,
    tokens,
    max_new_tokens,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    frequency_penalty=0.0,
    seed=None,
    eos_token_id=None,
    on_token=None,
    mistake="",
):
    """The reference generate_with_cache, with one mistake at a time."""
    from solutions.kv_cache import KVCache, forward_with_cache
    from solutions.sampling import sample_next_token

    batch, prompt_len = tokens.shape
    if prompt_len + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(f"the context would be exceeded (n_ctx={model.cfg.n_ctx})")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache_ = KVCache(model.cfg, batch)
    finished = torch.zeros(batch, dtype=torch.bool)
    with torch.no_grad():
        if mistake == "calls_model":
            logits = model(tokens)[:, -1]
        else:
            logits = forward_with_cache(model, tokens, cache_)[
                :, 0 if mistake == "first_position" else -1
            ]
        for step in range(max_new_tokens):
            if mistake == "generator_per_step" and seed is not None:
                generator = torch.Generator().manual_seed(seed)
            next_token = sample_next_token(
                logits,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                frequency_penalty=frequency_penalty,
                generated=tokens if mistake == "prompt_penalised" else tokens[:, prompt_len:],
                generator=generator,
            )
            if eos_token_id is not None:
                if mistake != "finished_rows_continue":
                    next_token = next_token.masked_fill(finished, eos_token_id)
                finished = finished | (next_token == eos_token_id)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if finished.all() or step == max_new_tokens - 1:
                break
            new = tokens if mistake == "refeeds_everything" else tokens[:, -1:]
            logits = forward_with_cache(model, new, cache_)[:, -1]
    return tokens


def generate_cached_mistake(name: str) -> Callable[..., Tensor]:
    return partial(_generate_cached, mistake=name)


register(
    Check(
        "kv_cache.generate_with_cache",
        "generation with the cache",
        generate_cached_cases,
        call_generate_cached,
        [
            Mistake(
                "calls_model",
                "the prompt run through model(tokens), the uncached "
                "forward pass, so the cache never gets the prompt",
                generate_cached_mistake("calls_model"),
            ),
            Mistake(
                "refeeds_everything",
                "the whole sequence fed to forward_with_cache at every step "
                "(feed only the newest token: the cache already holds the rest)",
                generate_cached_mistake("refeeds_everything"),
            ),
            Mistake(
                "first_position",
                "the first position's logits after the prompt (logits[:, 0]) instead of the last",
                generate_cached_mistake("first_position"),
            ),
            Mistake(
                "prompt_penalised",
                "a frequency penalty that counts the prompt's "
                "tokens too (only generated tokens count)",
                generate_cached_mistake("prompt_penalised"),
            ),
            Mistake(
                "finished_rows_continue",
                "rows that produced eos carrying on with ordinary "
                "tokens (a finished row must only get eos)",
                generate_cached_mistake("finished_rows_continue"),
            ),
            Mistake(
                "generator_per_step",
                "a new torch.Generator seeded at every step (one generator for the whole call)",
                generate_cached_mistake("generator_per_step"),
            ),
        ],
        compare=compare_outcome,
    )
)
