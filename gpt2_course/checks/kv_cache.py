"""Checks for the KV cache (notebook 08), each also for a clear error past n_ctx: `KVCache`;
`forward_with_cache` fed chunks, against Hugging Face GPT-2 with its own cache; and
`generate_with_cache` against Hugging Face's `generate`, without the uncached `model(tokens)`.
The models: course Transformers of reference parts holding the sampling checks' seeded GPT-2
(n_ctx 64, so "up to n_ctx" costs little) or GPT-2 small with the reference's weights.
"""

import re
import warnings
from collections.abc import Callable
from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.checks.core import Case, CheckSetupError, Outcome, compare
from gpt2_course.checks.reference_data import GPT2_SMALL, randn, text_run, text_tokens
from gpt2_course.checks.registry import Check, register
from gpt2_course.checks.sampling import PEAKED_GPT2, compare_tokens, small_model
from gpt2_course.checks.sampling import random_prompts as prompts
from gpt2_course.config import TransformerConfig
from gpt2_course.pretrained import course_model
from gpt2_course.reference import get_reference
from gpt2_course.reference_parts.kv_cache import KVCache

# Two layers, so that a counter shared by the layers shows; n_ctx 8, so filling it is quick.
CACHE_CFG = TransformerConfig(d_model=6, n_heads=2, d_head=3, n_layers=2, n_ctx=8, d_vocab=10)
RAISED = "raised an error naming the context (n_ctx)"


@cache
def seeded_model() -> nn.Module:
    return course_model(small_model(0).hf.state_dict(), PEAKED_GPT2)


@cache
def gpt2_course_model() -> nn.Module:
    return course_model(get_reference().hf_state_dict, GPT2_SMALL)


class NoUncachedForward(nn.Module):
    """A model's modules without its uncached forward: cached generation must not need it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.cfg, self.embed, self.pos_embed = model.cfg, model.embed, model.pos_embed
        self.blocks, self.ln_final, self.unembed = model.blocks, model.ln_final, model.unembed

    def forward(self, tokens: Tensor) -> Tensor:
        raise RuntimeError(
            "generate_with_cache called model(tokens), the uncached forward pass over every "
            "token: run the prompt once, then each new token, through forward_with_cache"
        )


def context_error(run: Callable[[], Any]) -> str:
    """RAISED if `run` raises an error naming n_ctx or the context; other errors propagate,
    so that the learner sees them (and a mistake can match them)."""
    try:
        run()
    except NotImplementedError:
        raise
    except Exception as error:
        if re.search(r"n_ctx|context", str(error), re.IGNORECASE):
            return RAISED
        raise
    return "returned normally"


def checked(name: str, title: str, make_cases: Callable[[], list[Case]], values=compare):
    """Register the decorated call as the check `kv_cache.<name>`, judged by `values` where
    the expected is a tensor; an expected str names what must raise a context error."""

    def judge(outcome: Outcome, case: Case) -> str | None:
        if not isinstance(case.expected, str):
            return values(outcome.output, case.expected)
        if outcome.output == RAISED:
            return None
        return (
            f"{case.expected} returned normally: it must raise an error "
            "(a ValueError) that says the context (n_ctx) is exceeded"
        )

    def register_call(call: Callable[[Any, Case], Any]) -> Callable[[Any, Case], Any]:
        register(Check(f"kv_cache.{name}", title, make_cases, call, judge_case=judge))
        return call

    return register_call


# =============================================================== KVCache


def cache_script(positions: list[int]) -> list[tuple[int, Tensor, Tensor]]:
    """Updates as a forward pass makes them: every layer in turn, for each group of positions."""
    script = []
    for step, new in enumerate(positions):
        for layer in range(CACHE_CFG.n_layers):
            seed, shape = 1000 + 10 * step + layer, (2, CACHE_CFG.n_heads, new, CACHE_CFG.d_head)
            script.append((layer, randn(*shape, seed=seed), randn(*shape, seed=seed + 500)))
    return script


def cache_cases() -> list[Case]:
    half_done = "length while a step is half done (layer 0 has 4 positions, layer 1 still 3)"
    over, cases = "storing a 9th position in a cache for n_ctx = 8", []
    for name, positions, upto, want in [
        ("layer 0's keys after a 3-position prompt", [3, 1, 1], 1, "keys"),
        ("layer 0's keys after the prompt and 2 single tokens", [3, 1, 1], 5, "keys"),
        ("layer 1's values after the prompt and 2 single tokens", [3, 1, 1], 6, "values"),
        ("length after the prompt and 2 single tokens", [3, 1, 1], 6, "length"),
        (half_done, [3, 1, 1], 3, "length"),
        ("filled to exactly n_ctx = 8 positions", [6, 1, 1], 6, "keys"),
        ("one position more than n_ctx = 8", [6, 1, 1, 1], 7, "error"),
    ]:
        script = cache_script(positions)
        expected = over if want == "error" else stored(script, upto, want)
        cases.append(Case(name, (script, upto, want), expected=expected, seeded=True))
    return cases


def stored(script: list, upto: int, want: str) -> Tensor:
    """What the cache holds after the first `upto` updates: the last updated layer's keys
    or values (torch.cat of what it was given), or the positions every layer holds."""
    held = [0] * CACHE_CFG.n_layers
    for layer, keys, _ in script[:upto]:
        held[layer] += keys.shape[2]
    if want == "length":
        return torch.tensor([min(held)])
    which, layer = 1 if want == "keys" else 2, script[upto - 1][0]
    return torch.cat([step[which] for step in script[:upto] if step[0] == layer], dim=2)


@checked("KVCache", "a cache of keys and values", cache_cases)
def call_cache(cls: Any, case: Case) -> Any:
    script, upto, want = case.args
    kv = cls(CACHE_CFG, 2)
    for layer, keys, values in script[: upto - 1]:
        kv.update(layer, keys.clone(), values.clone())
    layer, keys, values = script[upto - 1]
    if want == "error":
        return context_error(lambda: kv.update(layer, keys.clone(), values.clone()))
    returned = kv.update(layer, keys.clone(), values.clone())
    if want == "length":
        return torch.tensor([int(kv.length)])
    if not isinstance(returned, tuple) or len(returned) != 2:
        raise CheckSetupError("KVCache.update must return a tuple (keys, values)")
    return returned[0 if want == "keys" else 1]


# =============================================================== forward_with_cache


@torch.no_grad()
def hf_cached_logits(tokens: Tensor, chunks: list[int]) -> Tensor:
    """Hugging Face GPT-2's logits for `tokens` fed in `chunks` through its own cache."""
    hf, past, logits = small_model(0).hf, None, []
    for piece in tokens[:, : sum(chunks)].split(chunks, dim=1):
        out = hf(piece, cache=past, use_cache=True)
        past = out.cache
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def forward_cases() -> list[Case]:
    small, tokens = seeded_model(), prompts(2, PEAKED_GPT2.n_ctx, seed=871)
    offset = "a 4-token prompt, then chunks of 3, 1 and 5 tokens (the mask needs the offset)"
    cases = [
        Case(name, (small, tokens, chunks), expected=hf_cached_logits(tokens, chunks), seeded=True)
        for name, chunks in [
            ("a 6-token prompt, then 6 single tokens", [6] + [1] * 6),
            (offset, [4, 3, 1, 5]),
            ("a 40-token prompt, then single tokens up to exactly n_ctx = 64", [40] + [1] * 24),
        ]
    ]
    # TransformerLens on the whole text: causal, so its first 8 positions are the 8 tokens'
    gpt2 = (gpt2_course_model(), text_tokens()[:, :8], [6, 1, 1])
    name = "GPT-2 small (reference weights): a 6-token prompt, then 2 single tokens"
    cases.append(Case(name, gpt2, expected=text_run()[0][:, :8]))
    over = (small, torch.cat([tokens, tokens[:, :1]], dim=1), [64, 1])
    what = "feeding a 65th token to a model with n_ctx = 64"
    name = "one token after n_ctx = 64 cached positions"
    return [*cases, Case(name, over, expected=what, seeded=True)]


@checked("forward_with_cache", "a forward pass that reads and extends the cache", forward_cases)
def call_forward(fn: Any, case: Case) -> Any:
    model, tokens, chunks = case.args
    kv, outputs = KVCache(model.cfg, tokens.shape[0], capacity=sum(chunks)), []
    for i, piece in enumerate(tokens[:, : sum(chunks)].split(chunks, dim=1)):
        if kv.length + piece.shape[1] > model.cfg.n_ctx:
            return context_error(lambda piece=piece: fn(model, piece, kv))
        logits, shape = fn(model, piece, kv), (*piece.shape, model.cfg.d_vocab)
        if not isinstance(logits, Tensor) or logits.shape != shape:
            got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise CheckSetupError(
                f"forward_with_cache (call {i + 1}, {piece.shape[1]} new tokens) returned "
                f"{got}, expected a tensor of shape {list(shape)}"
            )
        outputs.append(logits)
    return torch.cat(outputs, dim=1)


# =============================================================== generate_with_cache


@torch.no_grad()
def hf_generate(tokens: Tensor, max_new_tokens: int, **settings: Any) -> Tensor:
    """Hugging Face's `generate` on the seeded GPT-2, with its own cache. Its draws,
    `torch.multinomial(probs, 1)` on the global generator seeded with `seed`, are a
    torch.Generator's seeded alike."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FrequencyPenalty(LogitsProcessor):  # Hugging Face has no additive one
        def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
            counts = F.one_hot(input_ids[:, tokens.shape[1] :], scores.shape[-1]).sum(1)
            return scores - settings.get("frequency_penalty", 0.0) * counts

    eos, temperature = settings.get("eos_token_id"), settings.get("temperature", 1.0)
    options = {"attention_mask": torch.ones_like(tokens), "max_new_tokens": max_new_tokens}
    options |= {"eos_token_id": eos, "pad_token_id": eos or 0, "do_sample": temperature > 0}
    if temperature > 0:
        options |= {"temperature": temperature, "top_k": settings.get("top_k")}
    penalty = LogitsProcessorList([FrequencyPenalty()])
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(settings.get("seed", 0))
        return small_model(0).hf.generate(tokens, logits_processor=penalty, **options)


def generate_cached_cases() -> list[Case]:
    runner = NoUncachedForward(seeded_model())
    short, greedy = prompts(2, 5, seed=887), {"temperature": 0.0}
    free = hf_generate(short, 12, **greedy)
    # eos: a token that row 0 generates first at step 3 or later and no other row generates
    row, others = free[0, 5:].tolist(), set(free[1:, 5:].flatten().tolist())
    eos = next(t for i, t in enumerate(row) if i >= 3 and t not in others | set(row[:i]))
    sampled = {"temperature": 0.9, "top_k": 20, "seed": 5}
    penalised, wide = greedy | {"frequency_penalty": 1.5}, prompts(3, 5, seed=883)
    cases = [
        Case(name, (runner, p, n, s), expected=hf_generate(p, n, **s), seeded=True)
        for name, p, n, s in [
            ("greedy, 2 prompts, 12 tokens", short, 12, greedy),
            ("greedy, 3 prompts, up to exactly n_ctx = 64 tokens", wide, 59, greedy),
            # prompts ending in greedy's first tokens, which it repeats: counting the
            # prompt's tokens in the penalty changes the answer
            ("greedy with frequency penalty 1.5", free[:, :9], 12, penalised),
            (f"greedy, eos {eos} ends row 0 early", short, 12, greedy | {"eos_token_id": eos}),
            ("sampling with seed 5, temperature 0.9, top-k 20: the same draws", short, 12, sampled),
        ]
    ]
    text = greedy_text = text_tokens()[:, :6]
    for _ in range(3):  # greedy tokens from the TransformerLens reference, one uncached pass each
        logits, _ = get_reference().run_with_cache(greedy_text)
        greedy_text = torch.cat([greedy_text, logits[:, -1:].argmax(-1)], dim=1)
    gpt2 = (NoUncachedForward(gpt2_course_model()), text, 3, greedy)
    name = "GPT-2 small (reference weights), greedy, 3 tokens"
    cases.append(Case(name, gpt2, expected=greedy_text))
    over = (runner, prompts(1, 60, seed=884), 5, greedy)
    what = "asking for 60 + 5 tokens from a model with n_ctx = 64"
    name = "a 60-token prompt and 5 new tokens with n_ctx = 64"
    return [*cases, Case(name, over, expected=what, seeded=True)]


@checked("generate_with_cache", "generation with the cache", generate_cached_cases, compare_tokens)
def call_generate_cached(fn: Any, case: Case) -> Any:
    model, tokens, max_new_tokens, settings = case.args
    # The check is about the cache: the next token comes from the reference sample_next_token.
    with parts.using(parts.REFERENCE), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        run = partial(fn, model, tokens, max_new_tokens, **settings)
        return context_error(run) if tokens.shape[1] + max_new_tokens > model.cfg.n_ctx else run()
