"""Checks for sampling (notebook 07).

* Logit transforms against Hugging Face's logits processors (transformers 5.x: top-k keeps
  every token tied with the k-th, top-p keeps the token that crosses p and at least one),
  the frequency penalty against its closed form; each call also reports in-place changes
  and an output that is the input. Edge values at GPT-2's vocabulary size (k = d_vocab,
  running totals landing exactly on p, tiny p), and the ValueErrors the docstrings promise.
* `beam_step` against the candidates' sorted scores, any order among ties accepted.
* Greedy `generate` and `beam_search` token for token against Hugging Face's `generate`:
  GPT-2 small, and small GPT-2s whose `randn` weights (the same on every CPU, scale 0.3)
  give peaked next-token distributions, so that greedy margins, eos and beams all matter.
* Sampling statistically: many seeded draws, returned as frequencies [groups, d_vocab] and
  judged per token against the probability (5 standard errors plus half a count; never a
  token of probability 0).
"""

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2_course.checks.core import Case, CheckSetupError, Observation, Outcome, compare
from gpt2_course.checks.reference_data import batch_run, batch_tokens, generator, randn, text_run
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig, hf_config
from gpt2_course.reference import get_reference

NEG_INF = float("-inf")
Z = 5.0  # standard errors allowed in the statistical cases
DRAWS = 20_000  # draws per distribution in the statistical cases
SAMPLING_SEED = 20240607
# Two sets of draws (yours and a mistake's, maybe on another CPU) behave the same when their
# frequencies differ by up to Z * sqrt(2 p (1 - p) / DRAWS); since sqrt(p) <= (0.5 + 2 p) / 2,
# atol + rtol * p below covers that for every p.
DRAWS_ATOL, DRAWS_RTOL = Z * (2 / DRAWS) ** 0.5 / 4, Z * (2 / DRAWS) ** 0.5

# A small GPT-2 whose randn weights (scale 0.3) give peaked next-token distributions.
PEAKED_GPT2 = TransformerConfig(
    d_model=64, d_vocab=512, n_ctx=64, d_head=16, n_heads=4, d_mlp=256, n_layers=2, init_range=0.3
)


class HFLogits(nn.Module):
    """A Hugging Face GPT-2 as the course sees a model: `model(tokens) -> logits`, and a cfg."""

    def __init__(self, hf_model: nn.Module, cfg: TransformerConfig):
        super().__init__()
        self.hf, self.cfg = hf_model, cfg

    def forward(self, tokens: Tensor) -> Tensor:
        return self.hf(tokens, use_cache=False).logits


class BigramModel(nn.Module):
    """Next-token logits from the current token alone: exact distributions for the draws."""

    def __init__(self, table: Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.cfg = TransformerConfig(
            d_model=8, d_vocab=table.shape[0], n_ctx=64, d_head=4, n_heads=2, d_mlp=16, n_layers=1
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table[tokens]


@cache
def small_model(seed: int = 0) -> HFLogits:
    """A Hugging Face GPT-2 of config PEAKED_GPT2 with weights from `randn`: the same on every
    CPU (torch's own normal_ init is not). LayerNorms start at w = 1, b = 0, like GPT-2's."""
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(hf_config(PEAKED_GPT2, bos_token_id=None, eos_token_id=None))
    state = {}
    for i, (name, value) in enumerate(model.state_dict().items()):
        if ".ln_" in name:
            state[name] = torch.full(value.shape, float(name.endswith("weight")))
        else:
            state[name] = randn(*value.shape, seed=seed * 1000 + i, scale=PEAKED_GPT2.init_range)
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    return HFLogits(model.eval(), PEAKED_GPT2)


@cache
def reference_model() -> HFLogits:
    """The reference's weights in a Hugging Face GPT-2 of their own: the TransformerLens bridge
    rewires `get_reference().hf_model`, whose cached `generate` then disagrees with it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config())
    hf.load_state_dict(get_reference().hf_state_dict, assign=True)
    hf.tie_weights()
    return HFLogits(hf.eval(), TransformerConfig())


@torch.no_grad()
def hf_generate(model: HFLogits, tokens: Tensor, max_new_tokens: int, **settings: Any) -> Tensor:
    """Hugging Face's `generate` (greedy unless settings say beams), eos only where given."""
    from transformers.utils import logging

    eos = settings.pop("eos_token_id", None)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.hf.generate(
                tokens,
                attention_mask=torch.ones_like(tokens),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos if eos is not None else 0,
                **settings,
            )
    finally:
        logging.set_verbosity(verbosity)


def random_prompts(batch: int, length: int, seed: int) -> Tensor:
    return torch.randint(0, PEAKED_GPT2.d_vocab, (batch, length), generator=generator(seed))


def real_logits() -> Tensor:
    """Next-token logits of the reference on real text: the last 6 positions of CHECK_TEXT."""
    return text_run()[0][0, -6:].clone()


def hf_warp(logits: Tensor, temperature: float = 1.0, top_k=None, top_p=None) -> Tensor:
    from transformers.generation import logits_process as hf

    logits = hf.TemperatureLogitsWarper(float(temperature))(None, logits.clone())
    if top_k is not None:
        logits = hf.TopKLogitsWarper(top_k=top_k)(None, logits)
    return logits if top_p is None else hf.TopPLogitsWarper(top_p=top_p)(None, logits)


def closed_form_penalty(logits: Tensor, tokens: Tensor, penalty: float) -> Tensor:
    counts = F.one_hot(tokens, logits.shape[-1]).sum(dim=1).to(logits.dtype)
    return logits - penalty * counts


def reference_distribution(logits: Tensor, settings: dict[str, Any]) -> Tensor:
    """The probabilities `sample_next_token` should draw from."""
    if settings.get("frequency_penalty") and settings.get("generated") is not None:
        logits = closed_form_penalty(logits, settings["generated"], settings["frequency_penalty"])
    warpers = {k: v for k, v in settings.items() if k in ("temperature", "top_k", "top_p")}
    return hf_warp(logits, **warpers).double().softmax(dim=-1)


@dataclass
class Distribution:
    """Expected output of a statistical case: the probabilities [groups, d_vocab] to draw from."""

    probs: Tensor


def draws_case(name: str, args: tuple, probs: Tensor) -> Case:
    return Case(
        name, args, expected=Distribution(probs), atol=DRAWS_ATOL, rtol=DRAWS_RTOL, seeded=True
    )


def judge_frequencies(freq: Any, probs: Tensor) -> str | None:
    """Are frequencies of DRAWS draws per group consistent with `probs`?"""
    if not isinstance(freq, Tensor) or freq.shape != probs.shape:
        return "the draws could not be counted"
    impossible = (probs == 0) & (freq > 0)
    if impossible.any():
        group, token = impossible.nonzero()[0].tolist()
        return (
            f"token {token} was drawn {round(freq[group, token].item() * DRAWS)} times "
            f"(distribution {group}) although its probability is 0: a "
            "token that temperature/top-k/top-p removed was sampled"
        )
    allowed = Z * (probs * (1 - probs) / DRAWS).sqrt() + 0.5 / DRAWS
    excess = (freq - probs).abs() - allowed
    if (excess > 0).any():
        group, token = [int(i) for i in torch.unravel_index(excess.argmax(), excess.shape)]
        return (
            f"draws do not follow the expected distribution: token {token} (distribution "
            f"{group}) came up with frequency {freq[group, token].item():.4f} in "
            f"{DRAWS} draws, expected probability {probs[group, token].item():.4f} "
            f"(allowed +/-{allowed[group, token].item():.4f}, {Z:g} standard errors)"
        )
    return None


def compare_tokens(actual: Any, expected: Tensor) -> str | None:
    """Token ids, exactly, with the first difference spelled out."""
    if not isinstance(actual, Tensor):
        return f"returned {type(actual).__name__}, expected a tensor of token ids"
    if actual.is_floating_point() or actual.dtype == torch.bool:
        return f"returned a tensor of dtype {actual.dtype}, expected integer token ids (torch.long)"
    if actual.shape != expected.shape:
        extra = ""
        if actual.dim() == expected.dim() and actual.shape[:-1] == expected.shape[:-1]:
            extra = f": {actual.shape[-1]} positions per row instead of {expected.shape[-1]}"
        return f"output has shape {list(actual.shape)}, expected {list(expected.shape)}{extra}"
    different = actual.cpu() != expected
    if not different.any():
        return None
    where = different.nonzero()[0].tolist()
    return (
        f"token at {where} is {actual[tuple(where)].item()}, expected "
        f"{expected[tuple(where)].item()} ({int(different.sum())} of "
        f"{different.numel()} tokens differ)"
    )


SEED_FLAGS = [
    "the same seed gave different tokens on two calls: build one "
    "torch.Generator from `seed` in each call and pass it to every draw",
    "seeds 7 and 8 gave the same tokens: the seed is not used",
    "torch's global random state changed: use a torch.Generator(...).manual_seed(seed), not "
    "torch.manual_seed(seed), so that generating does not reset everyone else's randomness",
]


GENERATOR_FLAGS = [
    "the same generator state gave different tokens on two calls: draw with "
    "torch.multinomial(probs, 1, generator=generator), so the generator decides the draw",
    "generators seeded 7 and 8 gave the same tokens: the `generator` argument is not used",
    "torch's global random state changed although a generator was given: every draw must "
    "come from `generator`",
]


@dataclass
class Flags:
    """Expected output of a reproducibility case: a bool per rule, all True; `messages` say
    what each False means."""

    messages: list[str]


def judge_tokens(outcome: Outcome, case: Case) -> str | None:
    """Token ids exactly, draws against their distribution, or reproducibility flags."""
    if isinstance(case.expected, Distribution):
        return judge_frequencies(outcome.output, case.expected.probs)
    if isinstance(case.expected, Flags):
        flags = zip(case.expected.messages, outcome.output.tolist(), strict=True)
        return "; ".join(flag for flag, ok in flags if not ok) or None
    if isinstance(case.expected, str):  # RAISES
        if isinstance(outcome.output, str) and outcome.output == RAISES:
            return None
        return "this call must raise a ValueError (the docstring promises one), not return"
    return compare_tokens(outcome.output, case.expected)


def as_token_ids(output: Any, shape: tuple[int, ...], what: str) -> Tensor:
    """The output as token ids of `shape`, or a clear error."""
    problem = compare_tokens(output, torch.zeros(shape, dtype=torch.long))
    if problem is not None and not problem.startswith("token at"):
        raise CheckSetupError(f"{what} {problem}")
    return output


def frequencies(tokens: Tensor, groups: int, d_vocab: int) -> Tensor:
    """Float64 frequencies [groups, d_vocab] of draws laid out group after group."""
    counts = F.one_hot(tokens.long().cpu().reshape(groups, -1), d_vocab).sum(dim=1)
    return counts.double() / counts.sum(dim=-1, keepdim=True)


IN_PLACE = (
    "your code changed its input logits in place: build a new tensor instead "
    "(e.g. `logits = logits / t`, not `logits /= t`)"
)
ALIASED = (
    "your output shares memory with the input logits (it is the input itself, or a view of "
    "it), so changing one changes the other: return a new tensor even when nothing changes "
    "(e.g. `logits.clone()`)"
)
RAISES = "raises ValueError"  # last argument of a case whose setting the docstring forbids
BAND = 1e-4  # tokens this close to the p boundary (in probability) may go either way


@dataclass
class Banded:
    """Expected top-p output; tokens within float rounding of the boundary, or tied across
    it, may go either way (but `count` tokens per row must stay where it is not -1)."""

    logits: Tensor  # Hugging Face's output
    original: Tensor  # the input logits
    either: Tensor  # bool: kept or removed are both right
    count: Tensor  # tokens each row keeps; -1 where rounding makes it uncertain

    def accepting(self, actual: Tensor) -> Tensor:
        if actual.shape != self.logits.shape or not actual.is_floating_point():
            return self.logits
        theirs = torch.where(actual == NEG_INF, NEG_INF, self.original)
        return torch.where(self.either, theirs, self.logits)

    def wrong_count(self, actual: Tensor) -> str | None:
        kept = torch.isfinite(actual).sum(dim=-1)
        wrong = (self.count >= 0) & (kept != self.count)
        if not wrong.any():
            return None
        row = int(wrong.nonzero()[0])
        return (
            f"row {row} keeps {int(kept[row])} tokens, expected {int(self.count[row])}: the "
            "probabilities here are exact, and the running total lands exactly on p (keep a "
            "token only while the probability of the tokens before it is below p)"
        )


def banded_top_p(logits: Tensor, p: float) -> Banded:
    """Hugging Face's top-p output, and which tokens sit within float rounding of the boundary
    (an exact landing on p is no rounding: designed rows make it exact in any order)."""
    probs = logits.double().softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs
    before_sorted[..., 0] = -1.0  # the most likely token always stays: never in the band
    before = torch.empty_like(before_sorted).scatter(-1, order, before_sorted)
    near = ((before - p).abs() < BAND) & (before != p) & (probs > 0) & (p < 1)
    expected = hf_warp(logits, top_p=p)
    kept = torch.isfinite(expected)
    either = near.clone()
    for row, row_probs in enumerate(probs):  # tied across the cut: which of them stay is free
        tied = torch.isin(row_probs, row_probs[kept[row]]) & torch.isin(
            row_probs, row_probs[~kept[row]]
        )
        either[row] |= tied & (row_probs > 0)
    count = torch.where(near.any(dim=-1), -1, kept.sum(dim=-1))
    return Banded(expected, logits, either, count)


def call_transform(fn: Any, case: Case) -> Observation:
    """Call a logit transform; the probes record whether it changed or returned its input.
    A case ending in RAISES expects a ValueError: that comes back as the output RAISES."""
    args, raises = case.args, isinstance(case.args[-1], str)
    if raises:
        args = args[:-1]
    before = args[0].clone()
    try:
        output = fn(*args)
    except ValueError:
        if not raises:
            raise
        return Observation(RAISES)
    shares = isinstance(output, Tensor) and (
        output.untyped_storage().data_ptr() == args[0].untyped_storage().data_ptr()
    )
    probes = {"changed_input": not torch.equal(args[0], before), "shares_input": shares}
    return Observation(output, probes)


def judge_transform(outcome: Outcome, case: Case) -> str | None:
    if outcome.probes.get("changed_input"):
        return IN_PLACE
    expected = case.expected
    if isinstance(expected, str):  # RAISES
        if isinstance(outcome.output, str) and outcome.output == RAISES:
            return None
        return (
            "this setting must raise a ValueError (the docstring promises one), but your code "
            f"returned a {type(outcome.output).__name__}"
        )
    if outcome.probes.get("shares_input"):
        return ALIASED
    if isinstance(expected, Banded) and isinstance(outcome.output, Tensor):
        problem = compare(outcome.output, expected.accepting(outcome.output), case.atol, case.rtol)
        return problem or expected.wrong_count(outcome.output)
    return compare(outcome.output, expected, case.atol, case.rtol)


def transform_cases(reference: Callable[..., Any], table: Callable[[], list]) -> list[Case]:
    """A case per row (name, *args) of `table()`; "real ..." rows (reference logits) unseeded;
    rows ending in RAISES expect a ValueError."""
    return [
        Case(
            name,
            tuple(args),
            expected=RAISES if args[-1] is RAISES else reference(*args),
            seeded=not name.startswith("real"),
        )
        for name, *args in table()
    ]


def temperature_table() -> list[tuple]:
    spread, small = randn(4, 1000, seed=801, scale=3.0), randn(3, 50, seed=802, scale=1.0)
    return [
        ("real logits, temperature 0.7", real_logits(), 0.7),
        ("random logits, temperature 2", spread, 2.0),
        ("random logits, temperature 1 (no change)", spread, 1.0),
        ("random logits, temperature near 0 (1e-3)", small, 1e-3),
        ("temperature 0: a ValueError (greedy is generate's job)", small, 0.0, RAISES),
        ("negative temperature -1: a ValueError", small, -1.0, RAISES),
    ]


def top_k_table() -> list[tuple]:
    rows = randn(4, 100, seed=811, scale=2.0)
    ties = torch.tensor(
        [
            [3.0, 2.0, 2.0, 2.0, 1.0, 0.0, -1.0, 0.5],  # k=2: the three 2.0s tie with the 2nd
            [0.1, 0.2, 0.3, 0.3, 0.3, 0.3, -2.0, 5.0],  # k=2: four 0.3s tie
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all tied: nothing removed
        ]
    )
    filtered = rows[:2].clone()
    filtered[:, 10:] = NEG_INF  # already filtered: 10 finite values, k = 20
    return [
        ("random logits, k=5", rows, 5),
        ("ties at the k-th value (k=2)", ties, 2),
        ("k=1", rows, 1),
        ("k larger than the vocabulary (k=500, 100 tokens)", rows, 500),
        ("k larger than the number of finite logits", filtered, 20),
        ("real logits, k=50", real_logits(), 50),
        ("k equal to GPT-2's vocabulary size (50257): every token stays", real_size_rows(), 50257),
        ("k=0: a ValueError", rows, 0, RAISES),
    ]


def peaked_rows() -> Tensor:
    """Rows whose float32 running total reaches exactly 1.0 before the last token (row 0: one
    token holds all but ~5e-9; row 1: four of 0.25 each): in any summation order, only a top-p
    that treats p = 1 as "keep everything" keeps the tail."""
    rows = torch.full((2, 50257), -30.0)
    rows[0, 7] = 0.0
    rows[1] = -40.0
    rows[1, [3, 1000, 20000, 50000]] = 0.0
    return rows


def real_size_rows() -> Tensor:
    """Two peaked rows at GPT-2's vocabulary size, no two logits equal."""
    rows = randn(2, 50257, seed=812, scale=2.0)
    rows[0, 50256] += 15.0  # one token far ahead
    rows[1, [5, 25000]] += torch.tensor([16.0, 15.0])
    return rows


def exact_rows() -> Tensor:
    """Rows at GPT-2's vocabulary size of 4 and 8 equally likely tokens (logit 0; the others
    -1000, probability exactly 0): every probability and running total is exact in float32
    and float64, in any summation order, so a total lands exactly on p = 0.5 and 0.75."""
    rows = torch.full((2, 50257), -1000.0)
    rows[0, [11, 4000, 31000, 50256]] = 0.0
    rows[1, torch.arange(8) * 6000 + 7] = 0.0
    return rows


def top_p_table() -> list[tuple]:
    designed = torch.tensor(
        [
            [0.5, 0.3, 0.15, 0.05],  # p=0.7: 0.5 alone is short of 0.7, 0.3 crosses it: keep 2
            [0.05, 0.15, 0.3, 0.5],  # the same, in another order
            [0.1, 0.6, 0.2, 0.1],  # 0.6 then 0.2 crosses: keep 2 (the 0.1s tie, both out)
            [0.25, 0.25, 0.3, 0.2],  # ties inside the kept set: 0.3 + 0.25 + 0.25 (crosses)
        ]
    ).log()
    rows, real, exact = randn(6, 200, seed=821, scale=2.5), real_logits(), exact_rows()
    filtered = rows.clone()
    filtered[:, 50:] = NEG_INF  # as after top-k
    return [
        ("hand-made rows, p=0.7 (the crossing token must stay)", designed, 0.7),
        ("p=1 on peaked rows at GPT-2's vocabulary size: every token stays", peaked_rows(), 1.0),
        ("random logits, p=0.5", rows, 0.5),
        ("random logits, p=0.9", rows, 0.9),
        ("logits already filtered (-inf), p=0.8", filtered, 0.8),
        ("tiny p=1e-8: only the most likely token stays", rows, 1e-8),
        ("running totals land exactly on p=0.5 (4 and 8 tied tokens, 50257 in all)", exact, 0.5),
        ("running totals land exactly on p=0.75", exact, 0.75),
        ("tiny p=1e-8 on peaked rows at GPT-2's vocabulary size", real_size_rows(), 1e-8),
        ("p=1: every token stays", rows, 1.0),
        ("real logits, p=0.9", real, 0.9),
        ("real logits / 0.1, p=0.6", real / 0.1, 0.6),
        ("p=0: a ValueError", rows, 0.0, RAISES),
        ("p=1.5: a ValueError", rows, 1.5, RAISES),
    ]


def penalty_table() -> list[tuple]:
    texts = ("the cat and the dog and the bird", "a a a a b", "no repeats here")
    ids = [get_reference().to_tokens(t)[0] for t in texts]
    real_tokens = torch.stack([i[: min(map(len, ids))] for i in ids])
    logits, real = randn(2, 30, seed=831, scale=2.0), batch_run()[0][:, -1].clone()
    tokens = torch.tensor(
        [[3, 3, 3, 7, 7, 1, 29, 0, 3, 7, 12, 12], [5, 5, 5, 5, 5, 5, 1, 2, 3, 4, 28, 29]]
    )
    return [
        ("random logits, repeated tokens, penalty 1.5", logits, tokens, 1.5),
        ("rows counted separately, penalty 0.4", logits, tokens.flip(0), 0.4),
        ("negative penalty -0.7 (rewards repeats)", logits, tokens, -0.7),
        ("no tokens yet: no change", logits, torch.zeros(2, 0, dtype=torch.long), 2.0),
        ("penalty 0: no change", logits, tokens, 0.0),
        ("real logits and text tokens, penalty 0.5", real, real_tokens, 0.5),
    ]


for name, title, reference, table in [
    ("apply_temperature", "temperature scaling", hf_warp, temperature_table),
    ("apply_top_k", "top-k filtering", lambda x, k: hf_warp(x, top_k=k), top_k_table),
    ("apply_top_p", "top-p (nucleus) filtering", banded_top_p, top_p_table),
    ("apply_frequency_penalty", "frequency penalty", closed_form_penalty, penalty_table),
]:
    cases = partial(transform_cases, reference, table)
    register(Check(f"sampling.{name}", title, cases, call_transform, judge_case=judge_transform))


def sampler_cases() -> list[Case]:
    cases = []
    for name, logits, seeded in [
        ("real logits", batch_run()[0][:, -1].clone(), False),
        ("random logits", randn(4, 300, seed=842, scale=3.0), True),
    ]:
        top3 = logits.topk(3, dim=-1).indices  # penalise each row's top 3 tokens
        penalty = {"frequency_penalty": 100.0, "generated": top3}
        penalised = closed_form_penalty(logits, top3, 100.0)
        for what, more, expected in [
            ("is greedy", {}, logits),
            ("with a frequency penalty on each row's top 3 tokens", penalty, penalised),
        ]:
            args, expected = (logits, {"temperature": 0.0, **more}, None), expected.argmax(dim=-1)
            cases.append(
                Case(f"temperature 0 {what} ({name})", args, expected=expected, seeded=seeded)
            )
    peaked = torch.tensor([3.0, 2.2, 1.6, 1.0, 0.5, 0.2, 0.0, -0.4, -1.0, -1.5, -2.5, -3.0])
    middling = torch.tensor([0.8, -0.3, 1.1, 0.2, -1.0, 0.9, 0.0, -2.0, 0.5, -0.6, 1.0, -0.1])
    groups = torch.stack([peaked, middling, randn(12, seed=841, scale=1.5)])
    generated = torch.tensor([[0, 0, 1, 5], [10, 2, 2, 2], [3, 4, 3, 11]])
    for name, settings in [
        ("sampling at temperature 1", {}),
        ("temperature 0.5", {"temperature": 0.5}),
        ("temperature 2 and top-k 4", {"temperature": 2.0, "top_k": 4}),
        ("top-p 0.6", {"top_p": 0.6}),
        (
            "temperature 0.6, top-k 6 and top-p 0.8 (order matters)",
            {"temperature": 0.6, "top_k": 6, "top_p": 0.8},
        ),
        ("top-k 3 then top-p 0.5 (top-k first)", {"top_k": 3, "top_p": 0.5, "temperature": 1.8}),
        (
            "frequency penalty 0.8 at temperature 1.5",
            {"frequency_penalty": 0.8, "generated": generated, "temperature": 1.5},
        ),
    ]:
        batch = {
            k: v.repeat_interleave(DRAWS, dim=0) if isinstance(v, Tensor) else v
            for k, v in settings.items()
        }
        args = (groups.repeat_interleave(DRAWS, dim=0), batch, 3)
        probs = reference_distribution(groups, settings)
        cases.append(draws_case(f"{name}: {DRAWS} draws from each of 3 distributions", args, probs))
    flat = torch.zeros(64, 40)  # 64 draws from 40 equally likely tokens: two seeds never agree
    cases.append(
        Case(
            "the generator decides the draw: the same state twice gives the same tokens, "
            "seeds 7 and 8 others, torch's global random state untouched",
            (flat, {"temperature": 1.0, "top_k": 30}, "generator"),
            expected=Flags(GENERATOR_FLAGS),
            seeded=True,
        )
    )
    return cases


def call_sampler(fn: Any, case: Case) -> Any:
    logits, settings, groups = case.args
    settings = {k: v.clone() if isinstance(v, Tensor) else v for k, v in settings.items()}
    if groups == "generator":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SAMPLING_SEED)
            state = torch.get_rng_state()
            runs = [fn(logits, generator=generator(seed), **settings) for seed in (7, 7, 8)]
            untouched = torch.equal(torch.get_rng_state(), state)
        first, again, other = (as_token_ids(t, (len(logits),), "sample_next_token") for t in runs)
        return torch.tensor([torch.equal(first, again), not torch.equal(first, other), untouched])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SAMPLING_SEED)  # reproducible even for code that ignores `generator`
        output = fn(logits, generator=generator(SAMPLING_SEED), **settings)
    tokens = as_token_ids(output, (logits.shape[0],), "sample_next_token")
    return tokens if groups is None else frequencies(tokens, groups, logits.shape[-1])


@torch.no_grad()
def penalised_greedy(model: nn.Module, tokens: Tensor, new_tokens: int, penalty: float) -> Tensor:
    """Greedy decoding with the closed-form penalty on generated tokens (HF has no equivalent)."""
    prompt_len = tokens.shape[1]
    for _ in range(new_tokens):
        logits = closed_form_penalty(model(tokens)[:, -1, :], tokens[:, prompt_len:], penalty)
        tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return tokens


def eos_of(row: Tensor, prompt_len: int, step: int, avoid: Tensor) -> int:
    """A token generated at `step` of `row` and not among `avoid`: an eos that stops it there."""
    taken = avoid.flatten().tolist() + row[prompt_len : prompt_len + step].tolist()
    for token in row[prompt_len + step :].tolist():
        if token not in taken:
            return token
    raise RuntimeError("no usable eos token in this case (the check's data changed?)")


def generate_cases() -> list[Case]:
    small, bigram = small_model(0), BigramModel(randn(16, 16, seed=701, scale=1.6))

    def greedy(name: str, model: HFLogits, prompts: Tensor, n: int, **settings: Any) -> Case:
        if "frequency_penalty" in settings:  # which Hugging Face's generate does not have
            expected = penalised_greedy(model, prompts, n, settings["frequency_penalty"])
        else:
            expected = hf_generate(model, prompts, n, **settings)
        args = ("tokens", model, prompts, n, {"temperature": 0.0, **settings})
        return Case(name, args, expected=expected, seeded=model is not reference_model())

    prompts = random_prompts(3, 5, seed=853)
    free = hf_generate(small, prompts, 12)
    eos_row0 = eos_of(free[0], 5, 3, free[1:, 5:])  # ends row 0 at step 4 and no other row
    eos_alone = free[1, 5 + 5].item()
    words = batch_tokens()[:2, :6].clone()  # the first words of two BATCH_TEXTS
    # a prompt that already holds what greedy would say next: counting the prompt changes it
    base = random_prompts(2, 4, seed=852)
    repeats = torch.cat([base, hf_generate(small, base, 6)[:, 4:8]], dim=1)
    seed_prompts = torch.tensor([[3, 9], [1, 2], [7, 7], [15, 0]])
    draw_settings = {"temperature": 0.8, "top_k": 6, "top_p": 0.9}
    draw_prompts = torch.tensor([[3, 9]]).expand(DRAWS, 2).clone()
    return [
        greedy("greedy, GPT-2 small (reference), 2 prompts, 3 tokens", reference_model(), words, 3),
        greedy("greedy, small GPT-2, 3 prompts, 12 tokens", small, prompts, 12),
        greedy(
            f"greedy, eos {eos_row0} ends row 0 after 4 tokens, the others go on",
            small,
            prompts,
            12,
            eos_token_id=eos_row0,
        ),
        greedy(
            f"greedy, one prompt that reaches eos {eos_alone}: generation stops early",
            small,
            prompts[1:2],
            12,
            eos_token_id=eos_alone,
        ),
        greedy(
            "greedy with frequency penalty 1.5 (generated tokens only, not the prompt)",
            small,
            repeats,
            10,
            frequency_penalty=1.5,
        ),
        Case(
            "seed=7 twice gives the same tokens, seed=8 others, torch's global random state "
            "untouched",
            ("seed", bigram, seed_prompts, 16, {"temperature": 1.0}),
            expected=Flags(SEED_FLAGS),
            seeded=True,
        ),
        draws_case(
            f"first token drawn with temperature 0.8, top-k 6, top-p 0.9: {DRAWS} identical "
            "prompts",
            ("distribution", bigram, draw_prompts, 1, {**draw_settings, "seed": 11}),
            reference_distribution(bigram.table.detach()[9:10], draw_settings),
        ),
    ]


def call_generate(fn: Any, case: Case) -> Any:
    kind, model, tokens, max_new_tokens, settings = case.args
    full = (tokens.shape[0], tokens.shape[1] + max_new_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SAMPLING_SEED)
        if kind != "seed":
            output = fn(model, tokens, max_new_tokens, **settings)
            if kind == "tokens":
                return output
            drawn = as_token_ids(output, full, "generate")[:, -1]
            return frequencies(drawn, 1, model.cfg.d_vocab)
        state = torch.get_rng_state()
        runs = [fn(model, tokens, max_new_tokens, seed=s, **settings) for s in (7, 7, 8)]
        untouched = torch.equal(torch.get_rng_state(), state)
    first, again, other = (as_token_ids(t, full, "generate") for t in runs)
    flags = [torch.equal(first, again), not torch.equal(first, other), untouched]
    return torch.tensor(flags)


@dataclass
class BeamCandidates:
    """Expected output of beam_step: any right answer, ties broken either way."""

    scores: Tensor  # the beams' running scores [beam]
    log_probs: Tensor  # [beam, d_vocab]
    best: Tensor  # the candidates' scores, best first (unique even where tokens tie)


def judge_beam_step(outcome: Outcome, case: Case) -> str | None:
    """Scores best first as expected; each (beam, token) pair real, distinct and scored
    scores[beam] + log_probs[beam, token]: any order among tied candidates is right."""
    want, output = case.expected, outcome.output
    if not (isinstance(output, tuple | list) and len(output) == 3):
        return "expected a tuple of three tensors (scores, beam indices, token indices)"
    if not all(isinstance(x, Tensor) for x in output):
        return "expected a tuple of three tensors (scores, beam indices, token indices)"
    scores, beams, tokens = (x.detach().cpu() for x in output)
    n, (n_beams, d_vocab) = len(want.best), want.log_probs.shape
    for what, x in [("scores", scores), ("beam indices", beams), ("token indices", tokens)]:
        if x.shape != (n,):
            return (
                f"{what} have shape {list(x.shape)}, expected [{n}]: the 2 * num_beams best "
                f"candidates ({n} here) over all beams and tokens"
            )
    if beams.is_floating_point() or tokens.is_floating_point():
        return "beam and token indices must be integer tensors (torch.long), not floats"
    if beams.min() < 0 or beams.max() >= n_beams or tokens.min() < 0 or tokens.max() >= d_vocab:
        return (
            f"an index is out of range: beams must be in [0, {n_beams}), tokens in "
            f"[0, {d_vocab}) (the flat index splits as beam = index // d_vocab, "
            "token = index % d_vocab)"
        )
    problem = compare(scores, want.best, case.atol, case.rtol)
    if problem is not None:
        return f"candidate scores (best first): {problem}"
    actual = want.scores[beams] + want.log_probs[beams, tokens]
    problem = compare(scores, actual, case.atol, case.rtol)
    if problem is not None:
        return f"a score is not its beam's score plus its token's log-probability: {problem}"
    if len(set(zip(beams.tolist(), tokens.tolist(), strict=True))) < n:
        return "the same (beam, token) candidate comes up twice"
    return None


def beam_step_case(name: str, scores: Tensor, log_probs: Tensor, num_beams: int) -> Case:
    candidates = (scores[:, None].double() + log_probs.double()).flatten()
    best = candidates.sort(descending=True).values[: 2 * num_beams].float()
    expected = BeamCandidates(scores, log_probs, best)
    return Case(name, (scores, log_probs, num_beams), expected=expected, seeded="real" not in name)


def beam_step_cases() -> list[Case]:
    log_probs = randn(4, 60, seed=881, scale=2.5).log_softmax(dim=-1)
    lopsided = randn(3, 60, seed=882, scale=2.5).log_softmax(dim=-1)
    # ties: beams 0 and 1 alike, and round log-probs; the cut at 6 falls inside a tie
    tied = torch.tensor([[0.0, -1.0, -1.0, -2.0, -3.0], [0.0, -1.0, -1.0, -2.0, -3.0]])
    big = randn(4, 50257, seed=883, scale=3.0).log_softmax(dim=-1)
    real = real_logits()[:4].log_softmax(dim=-1)
    return [
        beam_step_case("4 beams, 60 tokens", randn(4, seed=884, scale=2.0) - 3, log_probs, 4),
        beam_step_case(
            "the first step: one beam (the prompt, score 0), 3 beams wanted",
            torch.zeros(1),
            log_probs[:1],
            3,
        ),
        beam_step_case(
            "one beam far ahead holds every best candidate",
            torch.tensor([-1.0, -9.0, -9.5]),
            lopsided,
            3,
        ),
        beam_step_case(
            "scores decide: the best beam's tokens are not the likeliest",
            torch.tensor([-20.0, -1.0, -2.0, -1.5]),
            log_probs,
            4,
        ),
        beam_step_case(
            "ties across beams and tokens (any tied candidate may come first)",
            torch.tensor([-1.0, -1.0]),
            tied,
            3,
        ),
        beam_step_case(
            "fewer candidates than 2 * num_beams: all 5, best first", torch.zeros(1), tied[:1], 4
        ),
        beam_step_case(
            "4 beams at GPT-2's vocabulary size", torch.tensor([-2.0, -2.5, -3.0, -7.0]), big, 4
        ),
        beam_step_case("real log-probs, 4 beams", torch.tensor([-4.0, -5.0, -5.5, -6.0]), real, 4),
    ]


# Eos tokens chosen (once, by a search) so that finished hypotheses of different lengths
# compete: without eos, neither the length penalty nor early stopping would matter. Each
# mistake fails on at least one case. All on small_model(0), random_prompts(1, 5, seed=861).
BEAM_SETTINGS: list[tuple[str, int, dict[str, Any]]] = [  # name, num_beams, settings
    ("4 beams, 8 tokens, no eos", 4, {}),
    ("4 beams, eos 38, length_penalty 1", 4, {"eos_token_id": 38}),
    ("4 beams, eos 38, length_penalty -0.5", 4, {"eos_token_id": 38, "length_penalty": -0.5}),
    ("4 beams, eos 119, length_penalty 1", 4, {"eos_token_id": 119}),
    ("3 beams, eos 420, early_stopping=True", 3, {"eos_token_id": 420, "early_stopping": True}),
    ("2 beams, eos 420, length_penalty 2", 2, {"eos_token_id": 420, "length_penalty": 2.0}),
    ("2 beams, eos 38, length_penalty 0.5", 2, {"eos_token_id": 38, "length_penalty": 0.5}),
    ("3 beams, eos 420, length_penalty 1", 3, {"eos_token_id": 420}),
    (
        "2 beams, eos 420, early_stopping='never'",
        2,
        {"eos_token_id": 420, "early_stopping": "never"},
    ),
]


COUNTS_BEAM_STEP = "counts beam_step calls"  # last argument of the case that counts them
USES_BEAM_STEP = [
    "beam_search never called beam_step: rank each step's candidates with your beam_step "
    "(its own check vouches for it) and keep only the bookkeeping in beam_search",
]


def call_beam_search(fn: Any, case: Case) -> Any:
    model, tokens, num_beams, max_new_tokens, settings, *marker = case.args
    if marker == [COUNTS_BEAM_STEP]:
        return torch.tensor([counts_beam_step(fn, model, tokens, num_beams, max_new_tokens) > 0])
    try:
        return fn(model, tokens, num_beams, max_new_tokens, **settings)
    except ValueError:
        if not marker:
            raise
        return RAISES


def counts_beam_step(fn: Any, *args: Any) -> int:
    """How often `fn` calls the `beam_step` of its own module (wrapped for the call)."""
    function = inspect.unwrap(fn) if inspect.isfunction(fn) else type(fn).__call__  # no_grad
    names = getattr(function, "__globals__", {})
    original = names.get("beam_step")
    if not callable(original):
        fn(*args)
        return 0
    calls = []

    def counting(*step_args: Any, **step_kwargs: Any) -> Any:
        calls.append(1)
        return original(*step_args, **step_kwargs)

    names["beam_step"] = counting
    try:
        fn(*args)
    finally:
        names["beam_step"] = original
    return len(calls)


def beam_cases() -> list[Case]:
    model, prompt = small_model(0), random_prompts(1, 5, seed=861)
    cases = []
    for name, num_beams, settings in BEAM_SETTINGS:
        hf_settings = {"length_penalty": 1.0, "early_stopping": False, **settings}
        expected = hf_generate(model, prompt, 8, num_beams=num_beams, **hf_settings)
        args = (model, prompt, num_beams, 8, settings)
        cases.append(Case(name, args, expected=expected, seeded=True))
    uses = (model, prompt, 2, 3, {}, COUNTS_BEAM_STEP)
    cases.append(
        Case("beam_search calls beam_step", uses, expected=Flags(USES_BEAM_STEP), seeded=True)
    )
    two_prompts = random_prompts(2, 5, seed=861)
    batch = (model, two_prompts, 2, 3, {}, RAISES)
    cases.append(Case("a batch of 2 prompts: a ValueError", batch, expected=RAISES, seeded=True))
    return cases


for check_id, title, make_cases, call in [
    ("sampling.sample_next_token", "choosing the next token", sampler_cases, call_sampler),
    ("sampling.generate", "generating text", generate_cases, call_generate),
]:
    register(Check(check_id, title, make_cases, call, judge_case=judge_tokens))
register(
    Check(
        "sampling.beam_step",
        "one step of beam search",
        beam_step_cases,
        lambda fn, c: fn(*c.args),
        judge_case=judge_beam_step,
    )
)
register(
    Check(
        "sampling.beam_search", "beam search", beam_cases, call_beam_search, judge_case=judge_tokens
    )
)
