"""Checks for the KV cache (notebook 08), each also for a clear error past n_ctx: `KVCache`
(copies kept, an error that changes nothing); `forward_with_cache` fed chunks, against Hugging
Face GPT-2 with its own cache, in the logits and in the keys and values cached, and on a cache
the check plants (so only code that reads the cache passes); and `generate_with_cache` against
Hugging Face's `generate`, without the uncached `model(tokens)`, recording the positions each
block runs on per call (the prompt once, then 1 per step), what `on_token` receives and when,
and whether torch's global generator was touched.
The models: course Transformers of reference parts holding the sampling checks' seeded GPT-2
(n_ctx 64, so "up to n_ctx" costs little) or GPT-2 small with the reference's weights.
"""

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.checks.core import Case, CheckSetupError, Observation, Outcome, compare
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
RAISED = "raised the documented ValueError"


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


def context_error(run: Callable[[], Any], names: str = r"n_ctx|context") -> str:
    """RAISED if `run` raises a ValueError whose message matches `names`; another error that
    matches is described (a ValueError is documented); other errors propagate, so that the
    learner sees them (and a mistake can match them)."""
    try:
        run()
    except NotImplementedError:
        raise
    except Exception as error:
        if re.search(names, str(error), re.IGNORECASE):
            return RAISED if isinstance(error, ValueError) else f"raised {type(error).__name__}"
        raise
    return "returned normally"


@dataclass
class Raises:
    """The expected of a case that must raise: what is asked for (for the message), and
    what else must hold afterwards (None when all is well)."""

    what: str
    rule: str = "says the context (n_ctx) is exceeded"
    after: Callable[[Outcome], str | None] = lambda outcome: None


def checked(name: str, title: str, make_cases: Callable[[], list[Case]], values: Callable):
    """Register the decorated call as the check `kv_cache.<name>`, judged by
    `values(outcome, case)` where the expected is not `Raises`."""

    def judge(outcome: Outcome, case: Case) -> str | None:
        expected = case.expected
        if not isinstance(expected, Raises):
            return values(outcome, case)
        if outcome.output == RAISED:
            return expected.after(outcome)
        return f"{expected.what} {outcome.output}: it must raise a ValueError that {expected.rule}"

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
    cases = []
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
        if want == "error":
            what = "storing a 9th position in a cache for n_ctx = 8"
            expected = Raises(what, after=partial(unchanged, held(script, upto - 1)))
        else:
            expected = stored(script, upto, want)
        cases.append(Case(name, (script, upto, want), expected=expected, seeded=True))
    return cases


def held(script: list, upto: int) -> list[int]:
    """The positions each layer holds after the first `upto` updates."""
    counts = [0] * CACHE_CFG.n_layers
    for layer, keys, _ in script[:upto]:
        counts[layer] += keys.shape[2]
    return counts


def unchanged(before: list[int], outcome: Outcome) -> str | None:
    after = outcome.probes.get("filled")
    if isinstance(after, Tensor) and after.tolist() == before:
        return None
    got = after.tolist() if isinstance(after, Tensor) else after
    return (
        f"update raised the error, but it had already changed the cache: filled is {got} "
        f"afterwards, {before} before. Check the capacity before writing anything, so that "
        "a caller that catches the error still has a sound cache"
    )


def stored(script: list, upto: int, want: str) -> Tensor:
    """What the cache holds after the first `upto` updates: the last updated layer's keys
    or values (torch.cat of what it was given), or the positions every layer holds."""
    if want == "length":
        return torch.tensor([min(held(script, upto))])
    which, layer = 1 if want == "keys" else 2, script[upto - 1][0]
    return torch.cat([step[which] for step in script[:upto] if step[0] == layer], dim=2)


@checked(
    "KVCache", "a cache of keys and values", cache_cases, lambda o, c: compare(o.output, c.expected)
)
def call_cache(cls: Any, case: Case) -> Any:
    script, upto, want = case.args
    kv = cls(CACHE_CFG, 2)
    for layer, keys, values in script[: upto - 1]:
        given = keys.clone(), values.clone()
        kv.update(layer, *given)
        for tensor in given:  # the caller reuses its tensors: the cache must hold copies
            tensor.zero_()
    layer, keys, values = script[upto - 1]
    if want == "error":
        raised = context_error(lambda: kv.update(layer, keys.clone(), values.clone()))
        return Observation(raised, {"filled": torch.tensor([int(n) for n in kv.filled])})
    returned = kv.update(layer, keys.clone(), values.clone())
    if want == "length":
        return torch.tensor([int(kv.length)])
    if not isinstance(returned, tuple) or len(returned) != 2:
        raise CheckSetupError("KVCache.update must return a tuple (keys, values)")
    return returned[0 if want == "keys" else 1]


# =============================================================== forward_with_cache


@torch.no_grad()
def hf_cached_run(tokens: Tensor, chunks: list[int], prefill: tuple | None) -> dict[str, Tensor]:
    """Hugging Face GPT-2's logits for `tokens` fed in `chunks` through its own cache, which
    starts with `prefill` (keys, values) if given; and the keys and values it then holds,
    [n_layers, batch, n_heads, pos, d_head]."""
    from transformers.cache_utils import DynamicCache

    hf, logits = small_model(0).hf, []
    past = DynamicCache(config=hf.config)
    for layer, (keys, values) in enumerate(zip(*(prefill or ()), strict=True)):
        past.update(keys.clone(), values.clone(), layer)
    for piece in tokens[:, : sum(chunks)].split(chunks, dim=1):
        out = hf(piece, cache=past, use_cache=True)
        past = out.cache
        logits.append(out.logits)
    keys, values = (
        torch.stack([getattr(layer, kind) for layer in past.layers]) for kind in ("keys", "values")
    )
    return {"logits": torch.cat(logits, dim=1), "keys": keys, "values": values}


def tl_run(length: int) -> dict[str, Tensor]:
    """The TransformerLens reference on the check text's first `length` tokens (causal, so
    the same as its first `length` positions on the whole text), as `hf_cached_run` gives."""
    logits, activations = text_run()
    keys, values = (
        torch.stack(
            [
                activations[f"blocks.{layer}.attn.hook_{kind}"][:, :length].transpose(1, 2)
                for layer in range(GPT2_SMALL.n_layers)
            ]
        )
        for kind in "kv"
    )
    return {"logits": logits[:, :length], "keys": keys, "values": values}


def forward_cases() -> list[Case]:
    small, tokens = seeded_model(), prompts(2, PEAKED_GPT2.n_ctx, seed=871)
    offset = "a 4-token prompt, then chunks of 3, 1 and 5 tokens (the mask needs the offset)"
    # keys and values of no real tokens: only logits read from the cache can match
    shape = (PEAKED_GPT2.n_layers, 2, PEAKED_GPT2.n_heads, 10, PEAKED_GPT2.d_head)
    made_up = (randn(*shape, seed=873), randn(*shape, seed=874))
    planted = "a cache the check filled with 10 made-up positions, then 3 tokens and 1"
    cases = [
        Case(
            name,
            (small, tokens, chunks, prefill),
            expected=hf_cached_run(tokens, chunks, prefill),
            seeded=True,
        )
        for name, chunks, prefill in [
            ("a 6-token prompt, then 6 single tokens", [6] + [1] * 6, None),
            (offset, [4, 3, 1, 5], None),
            (planted, [3, 1], made_up),
            (
                "a 40-token prompt, then single tokens up to exactly n_ctx = 64",
                [40] + [1] * 24,
                None,
            ),
        ]
    ]
    gpt2 = (gpt2_course_model(), text_tokens()[:, :8], [6, 1, 1], None)
    name = "GPT-2 small (reference weights): a 6-token prompt, then 2 single tokens"
    cases.append(Case(name, gpt2, expected=tl_run(8)))
    over = (small, torch.cat([tokens, tokens[:, :1]], dim=1), [64, 1], None)
    name = "one token after n_ctx = 64 cached positions"
    what = "feeding a 65th token to a model with n_ctx = 64"
    return [*cases, Case(name, over, expected=Raises(what), seeded=True)]


def judge_forward(outcome: Outcome, case: Case) -> str | None:
    """The logits, then what the cache holds: every layer's keys and values of the positions
    so far, each stored once, keys as keys and values as values."""
    expected = case.expected
    problem = compare(outcome.output, expected["logits"], case.atol, case.rtol)
    if problem is not None:
        return problem
    n_layers, positions = expected["keys"].shape[0], expected["keys"].shape[3]
    filled = outcome.probes.get("filled")
    if not isinstance(filled, Tensor) or filled.tolist() != [positions] * n_layers:
        got = filled.tolist() if isinstance(filled, Tensor) else filled
        return (
            f"the logits are right, but afterwards the cache's filled is {got}, expected "
            f"{positions} positions in every layer: each call must store each layer's new keys "
            "and values once, with one cache.update per layer"
        )
    for kind in ("keys", "values"):
        problem = compare(outcome.probes.get(kind), expected[kind], case.atol, case.rtol)
        if problem is not None:
            return (
                f"the logits are right, but the cache's {kind} "
                f"[n_layers, batch, n_heads, pos, d_head] are not the model's {kind} of the "
                f"positions so far ({problem}): give cache.update(layer, k, v) the new keys, "
                "then the values"
            )
    return None


@checked(
    "forward_with_cache",
    "a forward pass that reads and extends the cache",
    forward_cases,
    judge_forward,
)
def call_forward(fn: Any, case: Case) -> Any:
    model, tokens, chunks, prefill = case.args
    start = 0 if prefill is None else prefill[0].shape[3]
    kv, outputs = KVCache(model.cfg, tokens.shape[0], capacity=start + sum(chunks)), []
    if prefill is not None:  # planted by the check: the function under test must read it
        kv.keys[:, :, :, :start], kv.values[:, :, :, :start] = prefill
        kv.filled = [start] * model.cfg.n_layers
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
    length = kv.length
    probes = {"filled": torch.tensor(kv.filled)}
    probes |= {"keys": kv.keys[..., :length, :], "values": kv.values[..., :length, :]}
    return Observation(torch.cat(outputs, dim=1), probes)


# =============================================================== generate_with_cache


@torch.no_grad()
def hf_generate(
    tokens: Tensor, max_new_tokens: int, global_seed: int = 0, **settings: Any
) -> Tensor:
    """Hugging Face's `generate` on the seeded GPT-2, with its own cache. Its draws,
    `torch.multinomial(probs, 1)` on the global generator seeded with `seed`, are a
    torch.Generator's seeded alike; with no seed, they are the course's on the global
    generator seeded with `global_seed`."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FrequencyPenalty(LogitsProcessor):  # Hugging Face has no additive one
        def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
            counts = F.one_hot(input_ids[:, tokens.shape[1] :], scores.shape[-1]).sum(1)
            return scores - settings.get("frequency_penalty", 0.0) * counts

    eos, temperature = settings.get("eos_token_id"), settings.get("temperature", 1.0)
    options = {"attention_mask": torch.ones_like(tokens), "max_new_tokens": max_new_tokens}
    options |= {"eos_token_id": eos, "pad_token_id": eos or 0, "do_sample": temperature > 0}
    if temperature > 0:  # top_k 0 and top_p 1 switch Hugging Face's off (it defaults to top-k 50)
        options |= {"temperature": temperature, "top_k": settings.get("top_k") or 0}
        options |= {"top_p": settings.get("top_p") or 1.0}
    penalty = LogitsProcessorList([FrequencyPenalty()])
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(settings.get("seed", global_seed))
        return small_model(0).hf.generate(tokens, logits_processor=penalty, **options)


def generate_cached_cases() -> list[Case]:
    runner = NoUncachedForward(seeded_model())
    short, greedy = prompts(2, 5, seed=887), {"temperature": 0.0}
    free = hf_generate(short, 12, **greedy)
    # eos: a token that row 0 generates first at step 3 or later and no other row generates
    row, others = free[0, 5:].tolist(), set(free[1:, 5:].flatten().tolist())
    eos = next(t for i, t in enumerate(row) if i >= 3 and t not in others | set(row[:i]))
    # greedy rows of these prompts both reach token 64, at steps 3 and 7: both finish early
    both, both_eos = prompts(2, 5, seed=881), greedy | {"eos_token_id": 64}
    sampled = {"temperature": 0.9, "top_k": 20, "seed": 5}
    nucleus = {"temperature": 0.8, "top_p": 0.9, "seed": 3}
    penalised, wide = greedy | {"frequency_penalty": 1.5}, prompts(3, 5, seed=883)
    cases = [
        Case(name, (runner, p, n, s, 0), expected=hf_generate(p, n, **s), seeded=True)
        for name, p, n, s in [
            ("greedy, 2 prompts, 12 tokens", short, 12, greedy),
            ("greedy, 3 prompts, up to exactly n_ctx = 64 tokens", wide, 59, greedy),
            # prompts ending in greedy's first tokens, which it repeats: counting the
            # prompt's tokens in the penalty changes the answer
            ("greedy with frequency penalty 1.5", free[:, :9], 12, penalised),
            (f"greedy, eos {eos} ends row 0 early", short, 12, greedy | {"eos_token_id": eos}),
            ("greedy, eos 64 ends both rows (steps 4 and 8 of 12)", both, 12, both_eos),
            ("sampling with seed 5, temperature 0.9, top-k 20: the same draws", short, 12, sampled),
            ("sampling with seed 3, temperature 0.8, top-p 0.9", short, 12, nucleus),
        ]
    ]
    name = "sampling with no seed: torch's global generator (the check seeds it with 77)"
    unseeded = {"temperature": 1.0}
    expected = hf_generate(short, 12, global_seed=77, **unseeded)
    cases.append(Case(name, (runner, short, 12, unseeded, 77), expected=expected, seeded=True))
    full = prompts(2, 64, seed=885)
    for name, p in [
        ("max_new_tokens 0: the prompt back", short),
        ("a 64-token prompt and 0 new tokens (n_ctx 64)", full),
    ]:
        cases.append(Case(name, (runner, p, 0, greedy, 0), expected=p.clone(), seeded=True))
    text = greedy_text = text_tokens()[:, :6]
    for _ in range(3):  # greedy tokens from the TransformerLens reference, one uncached pass each
        logits, _ = get_reference().run_with_cache(greedy_text)
        greedy_text = torch.cat([greedy_text, logits[:, -1:].argmax(-1)], dim=1)
    gpt2 = (NoUncachedForward(gpt2_course_model()), text, 3, greedy, 0)
    name = "GPT-2 small (reference weights), greedy, 3 tokens"
    cases.append(Case(name, gpt2, expected=greedy_text))
    over = (runner, prompts(1, 60, seed=884), 5, greedy, 0)
    what = "asking for 60 + 5 tokens from a model with n_ctx = 64"
    name = "a 60-token prompt and 5 new tokens with n_ctx = 64"
    cases.append(Case(name, over, expected=Raises(what, after=ran_nothing), seeded=True))
    what, rule = "max_new_tokens = -1", "names max_new_tokens (check_prompt does)"
    negative = Raises(what, rule, after=ran_nothing)
    name = "max_new_tokens -1"
    cases.append(Case(name, (runner, short, -1, greedy, 0), expected=negative, seeded=True))
    return cases


class Recorded(nn.Module):
    """`inner`, which also records how many positions every input it is called on has."""

    def __init__(self, inner: nn.Module, record: list[int]):
        super().__init__()
        self.inner, self.record = inner, record

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        self.record.append(x.shape[1] if isinstance(x, Tensor) and x.dim() == 3 else -1)
        return self.inner(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # W_Q, w, cfg, ...: the inner module's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def recorded_model(model: NoUncachedForward, records: list[list[int]]) -> NoUncachedForward:
    """`model` whose blocks record the positions each call runs on: those their ln1 gets
    (as forward_with_cache calls it) or the block itself (a recomputation with it)."""
    recorded = NoUncachedForward(model)
    blocks = []
    for block, record in zip(model.blocks, records, strict=True):
        wrapper = Recorded(block, record)
        wrapper.ln1 = Recorded(block.ln1, record)
        blocks.append(wrapper)
    recorded.blocks = nn.ModuleList(blocks)
    return recorded


def streamed_tokens(calls: list, batch: int) -> Any:
    """What on_token received, as [batch, calls], or what was wrong with it."""
    for i, token in enumerate(calls):
        if not isinstance(token, Tensor) or tuple(token.shape) != (batch,):
            got = list(token.shape) if isinstance(token, Tensor) else type(token).__name__
            return f"call {i + 1} of on_token received {got}, not one token per row [{batch}]"
    return torch.stack(calls, dim=1) if calls else torch.zeros(batch, 0, dtype=torch.long)


def ran_nothing(outcome: Outcome) -> str | None:
    positions = outcome.probes.get("positions")
    if isinstance(positions, Tensor) and positions.numel() == 0:
        return None
    return (
        "the error came only after the model had run: check the prompt and max_new_tokens "
        "first, with check_prompt(tokens, max_new_tokens, model), as generate does"
    )


def positions_rule(expected: list[int]) -> str:
    shown = ", ".join(map(str, expected[:6])) + (", ..." if len(expected) > 6 else "")
    return f"[{shown}] ({len(expected)} calls)"


def judge_generate(outcome: Outcome, case: Case) -> str | None:
    """The tokens; then that the cache made them: each block ran on the prompt once, then
    on one new token per step; then the streaming, and torch's global generator."""
    _, prompt, _, settings, _ = case.args
    expected, output = case.expected, outcome.output
    problem = compare_tokens(output, expected)
    if problem is not None:
        return problem
    if output.dtype != torch.long:
        return f"returned dtype {output.dtype}: generate returns token ids as torch.long"
    new = expected.shape[1] - prompt.shape[1]
    want = [prompt.shape[1]] + [1] * (new - 1) if new else []
    positions = outcome.probes.get("positions")
    rows = [[n for n in row if n >= 0] for row in positions.tolist()]
    if not any(rows) and new:
        return (
            "no block's ln1 ran: the check counts the positions each block runs on through "
            "its ln1, so call the block's own ln1, attention, ln2 and mlp in forward_with_cache"
        )
    for layer, row in enumerate(rows):
        if row != want and not (new == 0 and row == [prompt.shape[1]]):
            return (
                f"the tokens are right, but block {layer} ran on {positions_rule(row)} positions "
                f"per call, expected {positions_rule(want)}: the prompt once, then only the newest "
                "token at each step, and nothing after the last token. The cache must be what "
                "makes the answer right, not a recomputation of the whole sequence"
            )
    streamed = outcome.probes.get("streamed")
    if isinstance(streamed, str):
        return f"the tokens are right, but {streamed}"
    if compare_tokens(streamed, expected[:, prompt.shape[1] :]) is not None:
        return (
            f"the tokens are right, but on_token received {streamed.tolist()}, expected "
            f"{expected[:, prompt.shape[1] :].tolist()}: call on_token once per step with that "
            "step's tokens [batch], as they are appended (finished rows' eos included)"
        )
    ran = outcome.probes.get("forwards_before_token")
    if ran.tolist() != list(range(1, new + 1)):
        return (
            f"the tokens are right, but on_token was called after {ran.tolist()} forward passes, "
            f"expected {list(range(1, new + 1))}: stream each token as soon as it is chosen, "
            "before feeding it to the model"
        )
    drawn = settings.get("temperature", 1.0) > 0 and settings.get("seed") is None
    if bool(outcome.probes.get("global_rng_used")) != drawn:
        if drawn:
            return "with no seed, draw from torch's global generator, as generate does"
        return (
            "the tokens are right, but torch's global random state changed: with a seed, draw "
            "from a torch.Generator of your own (and greedy draws nothing), as generate does"
        )
    return None


@checked("generate_with_cache", "generation with the cache", generate_cached_cases, judge_generate)
def call_generate_cached(fn: Any, case: Case) -> Any:
    model, tokens, max_new_tokens, settings, global_seed = case.args
    records: list[list[int]] = [[] for _ in model.blocks]
    calls: list = []

    def on_token(token: Any) -> None:
        calls.append(token.clone() if isinstance(token, Tensor) else token)
        forwards.append(len(records[0]))

    forwards: list[int] = []
    run = partial(
        fn, recorded_model(model, records), tokens, max_new_tokens, on_token=on_token, **settings
    )
    # The check is about the cache: the next token comes from the reference sample_next_token.
    with parts.using(parts.REFERENCE), torch.random.fork_rng(devices=[]):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        if max_new_tokens < 0:
            output = context_error(run, r"max_new_tokens")
        elif tokens.shape[1] + max_new_tokens > model.cfg.n_ctx:
            output = context_error(run)
        else:
            output = run()
        used = not torch.equal(state, torch.get_rng_state())
    width = max(map(len, records))
    positions = torch.tensor([row + [-1] * (width - len(row)) for row in records], dtype=torch.long)
    probes = {"positions": positions, "streamed": streamed_tokens(calls, tokens.shape[0])}
    probes |= {"forwards_before_token": torch.tensor(forwards, dtype=torch.long)}
    return Observation(output, probes | {"global_rng_used": used})
