"""Checks for sampling (notebook 07).

* The logit transforms are compared with Hugging Face's logits processors
  (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, transformers
  5.x semantics: top-k keeps every token tied with the k-th, top-p keeps the token
  that crosses p and at least one token) on real and random logits, with ties and
  edge values; the frequency penalty against its closed form.
* Greedy `generate` and `beam_search` are compared token for token with Hugging
  Face's `generate` on the same model (the reference GPT-2 small, and small
  seeded GPT-2s whose logits are peaked enough for eos and beams to matter).
* Sampling is checked statistically, only where nothing deterministic can be:
  many draws with a fixed seed, every token's frequency within 5 standard errors
  (plus half a count) of its probability, and never a token of probability 0.

Statistical cases return float64 counts [groups, d_vocab]; deterministic ones
return integer tokens. That is how `compare_sampling` tells them apart when it
matches a learner's output with a known mistake's.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2_course.checks.core import Case, CheckSetupError, Mistake, call_function, compare
from gpt2_course.checks.reference_data import batch_run, batch_tokens, generator, randn, text_run
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig, hf_config
from gpt2_course.reference import get_reference

NEG_INF = float("-inf")
Z = 5.0  # standard errors allowed in the statistical cases
DRAWS = 20_000  # draws per distribution in the statistical cases
SAMPLING_SEED = 20240607

# A small GPT-2 for generation checks: fast, and with init_range 0.3 its next-token
# distributions are peaked enough that greedy margins, eos and beams all matter.
SMALL = TransformerConfig(
    d_model=64, d_vocab=512, n_ctx=64, d_head=16, n_heads=4, d_mlp=256, n_layers=2, init_range=0.3
)


# =============================================================== models the checks use


class HFLogits(nn.Module):
    """A Hugging Face GPT-2 as the course sees a model: `model(tokens) -> logits`, and a cfg."""

    def __init__(self, hf_model: nn.Module, cfg: TransformerConfig):
        super().__init__()
        self.hf = hf_model
        self.cfg = cfg

    def forward(self, tokens: Tensor) -> Tensor:
        return self.hf(tokens, use_cache=False).logits


class BigramModel(nn.Module):
    """A stand-in language model whose next-token logits depend on the current token only.

    Its distributions are known exactly, so sampling can be checked statistically.
    """

    def __init__(self, table: Tensor, n_ctx: int = 64):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        d_vocab = table.shape[0]
        self.cfg = TransformerConfig(
            d_model=8, d_vocab=d_vocab, n_ctx=n_ctx, d_head=4, n_heads=2, d_mlp=16, n_layers=1
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table[tokens]


def small_hf_model(seed: int, cfg: TransformerConfig = SMALL) -> nn.Module:
    """A seeded Hugging Face GPT-2 of config `cfg`: the same weights on every machine."""
    from transformers import GPT2LMHeadModel

    hf_cfg = hf_config(cfg, initializer_range=cfg.init_range, bos_token_id=None, eos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(hf_cfg).eval()


@cache
def small_model(seed: int = 0) -> HFLogits:
    return HFLogits(small_hf_model(seed), SMALL)


@cache
def reference_model() -> HFLogits:
    """The reference's weights in a Hugging Face GPT-2 of their own.

    Not `get_reference().hf_model`: the TransformerLens bridge rewires that model
    in place, and its cached `generate` no longer matches its own forward pass.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):  # no time spent on a random initialisation
        hf = GPT2LMHeadModel(GPT2Config())
    hf.load_state_dict(get_reference().hf_state_dict, assign=True)
    hf.tie_weights()
    return HFLogits(hf.eval(), TransformerConfig())


@cache
def bigram_model() -> BigramModel:
    return BigramModel(randn(16, 16, seed=701, scale=1.6))


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


def random_prompts(batch: int, length: int, seed: int, d_vocab: int = SMALL.d_vocab) -> Tensor:
    return torch.randint(0, d_vocab, (batch, length), generator=generator(seed))


# =============================================================== reference transforms


def hf_temperature(logits: Tensor, temperature: float) -> Tensor:
    from transformers.generation.logits_process import TemperatureLogitsWarper

    return TemperatureLogitsWarper(float(temperature))(None, logits.clone())


def hf_top_k(logits: Tensor, k: int) -> Tensor:
    from transformers.generation.logits_process import TopKLogitsWarper

    return TopKLogitsWarper(top_k=k)(None, logits.clone())


def hf_top_p(logits: Tensor, p: float) -> Tensor:
    from transformers.generation.logits_process import TopPLogitsWarper

    return TopPLogitsWarper(top_p=p)(None, logits.clone())


def closed_form_penalty(logits: Tensor, tokens: Tensor, penalty: float) -> Tensor:
    counts = F.one_hot(tokens, logits.shape[-1]).sum(dim=1).to(logits.dtype)
    return logits - penalty * counts


def reference_distribution(logits: Tensor, settings: dict[str, Any]) -> Tensor:
    """The probabilities `sample_next_token` should draw from, via Hugging Face's warpers."""
    penalty, generated = settings.get("frequency_penalty", 0.0), settings.get("generated")
    if penalty and generated is not None:
        logits = closed_form_penalty(logits, generated, penalty)
    logits = hf_temperature(logits, settings.get("temperature", 1.0))
    if settings.get("top_k") is not None:
        logits = hf_top_k(logits, settings["top_k"])
    if settings.get("top_p") is not None:
        logits = hf_top_p(logits, settings["top_p"])
    return logits.double().softmax(dim=-1)


# =============================================================== comparisons


@dataclass
class Distribution:
    """Expected output of a statistical case: the probabilities [groups, d_vocab] to draw from."""

    probs: Tensor


@dataclass
class Banded:
    """Expected top-p output; tokens within float rounding of the boundary may go either way."""

    logits: Tensor  # Hugging Face's output
    original: Tensor  # the input logits
    either: Tensor  # bool: kept or removed are both right


def compare_counts(counts: Tensor, probs: Tensor) -> str | None:
    """Are draws (float64 counts [groups, d_vocab]) consistent with `probs`?"""
    n = counts.sum(dim=-1, keepdim=True)
    impossible = (probs == 0) & (counts > 0)
    if impossible.any():
        group, token = impossible.nonzero()[0].tolist()
        return (
            f"token {token} was drawn {int(counts[group, token])} times "
            f"(distribution {group}) although its probability is 0: a "
            "token that temperature/top-k/top-p removed was sampled"
        )
    freq = counts / n
    allowed = Z * (probs * (1 - probs) / n).sqrt() + 0.5 / n
    excess = (freq - probs).abs() - allowed
    if (excess > 0).any():
        group, token = [int(i) for i in torch.unravel_index(excess.argmax(), excess.shape)]
        return (
            f"draws do not follow the expected distribution: token {token} (distribution "
            f"{group}) came up with frequency {freq[group, token].item():.4f} in "
            f"{int(n[group])} draws, expected probability {probs[group, token].item():.4f} "
            f"(allowed +/-{allowed[group, token].item():.4f}, {Z:g} standard errors)"
        )
    return None


def compare_two_samples(a: Tensor, b: Tensor) -> str | None:
    """Could two sets of draws (float64 counts) come from one distribution?"""
    if a.shape != b.shape:
        return "different shapes"
    na, nb = a.sum(-1, keepdim=True), b.sum(-1, keepdim=True)
    pooled = (a + b) / (na + nb)
    allowed = Z * (pooled * (1 - pooled) * (1 / na + 1 / nb)).sqrt() + 1 / na + 1 / nb
    return None if ((a / na - b / nb).abs() <= allowed).all() else "different distributions"


def compare_tokens(actual: Any, expected: Tensor) -> str | None:
    """Token ids, exactly, with the first difference spelled out."""
    if not isinstance(actual, Tensor):
        return f"returned {type(actual).__name__}, expected a tensor of token ids"
    if actual.is_floating_point() or actual.dtype == torch.bool:
        return f"returned a tensor of dtype {actual.dtype}, expected integer token ids (torch.long)"
    if actual.dim() != expected.dim() or actual.shape[:-1] != expected.shape[:-1]:
        return f"output has shape {list(actual.shape)}, expected {list(expected.shape)}"
    if actual.shape[-1] != expected.shape[-1]:
        return (
            f"output has shape {list(actual.shape)}, expected {list(expected.shape)}: "
            f"{actual.shape[-1]} positions per row instead of {expected.shape[-1]}"
        )
    different = actual.cpu() != expected
    if not different.any():
        return None
    where = different.nonzero()[0].tolist()
    return (
        f"token at {where} is {actual[tuple(where)].item()}, expected "
        f"{expected[tuple(where)].item()} ({int(different.sum())} of "
        f"{different.numel()} tokens differ)"
    )


def compare_sampling(actual: Any, expected: Any, atol: float, rtol: float) -> str | None:
    """Distributions statistically, token ids exactly, anything else with `compare`."""
    if isinstance(expected, Distribution):
        if not isinstance(actual, Tensor) or actual.shape != expected.probs.shape:
            return "the draws could not be counted"
        return compare_counts(actual, expected.probs)
    if (
        isinstance(expected, Tensor)
        and expected.dtype == torch.float64
        and isinstance(actual, Tensor)
    ):
        return compare_two_samples(actual, expected)  # two sets of draws (diagnosis)
    if isinstance(expected, Tensor) and not expected.is_floating_point():
        return compare_tokens(actual, expected)
    return compare(actual, expected, atol, rtol)


def compare_top_p(actual: Any, expected: Any, atol: float, rtol: float) -> str | None:
    if isinstance(expected, Banded):
        if (
            isinstance(actual, Tensor)
            and actual.shape == expected.logits.shape
            and actual.is_floating_point()
        ):
            # within the band, accept either decision
            removed = actual == NEG_INF
            either_value = torch.where(removed, torch.full_like(actual, NEG_INF), expected.original)
            expected_logits = torch.where(expected.either, either_value, expected.logits)
        else:
            expected_logits = expected.logits
        return compare(actual, expected_logits, atol, rtol)
    return compare(actual, expected, atol, rtol)


def count_draws(tokens: Tensor, groups: int, d_vocab: int) -> Tensor:
    """Float64 counts [groups, d_vocab] of draws laid out group after group."""
    per_group = einops.rearrange(tokens.long().cpu(), "(groups n) -> groups n", groups=groups)
    return F.one_hot(per_group, d_vocab).sum(dim=1).double()


def as_token_ids(output: Any, shape: tuple[int, ...], what: str) -> Tensor:
    """The output as token ids of `shape`, or a clear error."""
    if not isinstance(output, Tensor):
        raise CheckSetupError(
            f"{what} returned {type(output).__name__}, expected a tensor of token ids"
        )
    if output.is_floating_point() or output.dtype == torch.bool:
        raise CheckSetupError(
            f"{what} returned dtype {output.dtype}, expected integer token ids (torch.long)"
        )
    if tuple(output.shape) != shape:
        raise CheckSetupError(f"{what} returned shape {list(output.shape)}, expected {list(shape)}")
    return output


# =============================================================== apply_temperature


def real_logits() -> Tensor:
    """Next-token logits of the reference on real text: the last 6 positions of CHECK_TEXT."""
    return text_run()[0][0, -6:].clone()


def temperature_cases() -> list[Case]:
    real = real_logits()
    spread = randn(4, 1000, seed=801, scale=3.0)
    small = randn(3, 50, seed=802, scale=1.0)
    settings = [
        ("real logits, temperature 0.7", real, 0.7),
        ("random logits, temperature 2", spread, 2.0),
        ("random logits, temperature 1 (no change)", spread, 1.0),
        ("random logits, temperature near 0 (1e-3)", small, 1e-3),
    ]
    return [
        Case(name, (logits, t), expected=hf_temperature(logits, t)) for name, logits, t in settings
    ]


def temperature_multiplied(logits, temperature):
    return logits * temperature


def temperature_probabilities(logits, temperature):
    return (logits / temperature).softmax(dim=-1)


def temperature_in_place(logits, temperature):
    logits /= temperature
    return logits


register(
    Check(
        "sampling.apply_temperature",
        "temperature scaling",
        temperature_cases,
        call_function,
        [
            Mistake(
                "multiplied",
                "logits multiplied by the temperature instead of divided by it",
                temperature_multiplied,
            ),
            Mistake(
                "probabilities",
                "probabilities (a softmax) instead of logits",
                temperature_probabilities,
            ),
            Mistake(
                "in_place",
                "dividing the logits in place (logits /= temperature)",
                temperature_in_place,
            ),
        ],
    )
)

# =============================================================== apply_top_k


def top_k_cases() -> list[Case]:
    real = real_logits()
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
    settings = [
        ("random logits, k=5", rows, 5),
        ("ties at the k-th value (k=2)", ties, 2),
        ("k=1", rows, 1),
        ("k larger than the vocabulary (k=500, 100 tokens)", rows, 500),
        ("k larger than the number of finite logits", filtered, 20),
        ("real logits, k=50", real, 50),
    ]
    return [Case(name, (logits, k), expected=hf_top_k(logits, k)) for name, logits, k in settings]


def top_k_plus_one(logits, k):
    kth = logits.topk(min(k + 1, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_k_exactly_k(logits, k):
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep.scatter_(-1, logits.topk(min(k, logits.shape[-1]), dim=-1).indices, True)
    return logits.masked_fill(~keep, NEG_INF)


def top_k_smallest(logits, k):
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1, largest=False).values[..., -1:]
    return logits.masked_fill(logits > kth, NEG_INF)


def top_k_zero_fill(logits, k):
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, 0.0)


def top_k_no_clamp(logits, k):
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


register(
    Check(
        "sampling.apply_top_k",
        "top-k filtering",
        top_k_cases,
        call_function,
        [
            Mistake(
                "keeps_k_plus_one",
                "top-k that keeps k + 1 tokens (an off-by-one at the k-th value)",
                top_k_plus_one,
            ),
            Mistake(
                "ties_dropped",
                "top-k that keeps exactly k tokens, dropping tokens tied with the k-th largest "
                "logit (Hugging Face keeps every token whose logit is >= the k-th largest)",
                top_k_exactly_k,
            ),
            Mistake(
                "smallest", "keeping the k smallest logits instead of the k largest", top_k_smallest
            ),
            Mistake(
                "zero_fill",
                "removed tokens set to 0 instead of -inf (a logit of 0 still has probability)",
                top_k_zero_fill,
            ),
            Mistake(
                "no_clamp",
                "k not clamped to the vocabulary size (topk fails when k > d_vocab)",
                top_k_no_clamp,
            ),
        ],
    )
)

# =============================================================== apply_top_p

BAND = 1e-4  # tokens this close to the p boundary (in probability) may go either way


def banded_top_p(logits: Tensor, p: float) -> Banded:
    """Hugging Face's top-p output, and which tokens sit within float rounding of the boundary."""
    expected = hf_top_p(logits, p)
    probs = logits.double().softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs
    before_sorted[..., 0] = -1.0  # the most likely token always stays: never in the band
    before = torch.empty_like(before_sorted).scatter(-1, order, before_sorted)
    either = ((before - p).abs() < BAND) & (probs > 0)
    if p == 1:
        either = torch.zeros_like(either)
    return Banded(expected, logits, either)


def peaked_rows(d_vocab: int = 50257) -> Tensor:
    """Rows whose float32 running total reaches exactly 1.0 before the last token.

    Row 0: one token carries all but ~5e-9 of the mass, so its probability rounds
    to 1.0 in float32. Row 1: four tokens of probability 0.25 each (the tail's
    ~1e-18 each is lost in the rounding), so the total is exactly 1.0 after four
    tokens. Both hold whatever the order or kernel of the summation: p = 1 must
    keep the tail anyway, and only a top-p that treats p = 1 as "keep everything"
    does.
    """
    rows = torch.full((2, d_vocab), -30.0)
    rows[0, 7] = 0.0
    rows[1] = -40.0
    rows[1, [3, 1000, 20000, 50000]] = 0.0
    return rows


def top_p_cases() -> list[Case]:
    designed = torch.tensor(
        [
            [0.5, 0.3, 0.15, 0.05],  # p=0.7: 0.5 alone is short of 0.7, 0.3 crosses it: keep 2
            [0.05, 0.15, 0.3, 0.5],  # the same, in another order
            [0.1, 0.6, 0.2, 0.1],  # 0.6 then 0.2 crosses: keep 2 (the 0.1s tie, both out)
            [0.25, 0.25, 0.3, 0.2],  # ties inside the kept set: 0.3 + 0.25 + 0.25 (crosses)
        ]
    ).log()
    rows = randn(6, 200, seed=821, scale=2.5)
    filtered = rows.clone()
    filtered[:, 50:] = NEG_INF  # as after top-k
    real = real_logits()
    settings = [
        ("hand-made rows, p=0.7 (the crossing token must stay)", designed, 0.7),
        ("p=1 on peaked rows at GPT-2's vocabulary size: every token stays", peaked_rows(), 1.0),
        ("random logits, p=0.5", rows, 0.5),
        ("random logits, p=0.9", rows, 0.9),
        ("logits already filtered (-inf), p=0.8", filtered, 0.8),
        ("tiny p=1e-8: only the most likely token stays", rows, 1e-8),
        ("p=1: every token stays", rows, 1.0),
        ("real logits, p=0.9", real, 0.9),
        ("real logits / 0.1, p=0.6", real / 0.1, 0.6),
    ]
    return [
        Case(name, (logits, p), expected=banded_top_p(logits, p)) for name, logits, p in settings
    ]


def _sorted_probs(logits):
    probs = logits.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    return sorted_probs, order


def _remove(logits, drop_sorted, order):
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def top_p_drops_crossing(logits, p):
    sorted_probs, order = _sorted_probs(logits)
    drop = sorted_probs.cumsum(dim=-1) > p  # the token that crosses p goes too
    drop[..., 0] = False
    return _remove(logits, drop, order)


def top_p_on_logits(logits, p):
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = (
        sorted_logits.cumsum(dim=-1) - sorted_logits
    ) >= p  # cumulative logits, not probabilities
    drop[..., 0] = False
    return _remove(logits, drop, order)


def top_p_ascending(logits, p):
    probs = logits.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1)  # least likely first
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= p
    return _remove(logits, drop, order)


def top_p_no_special_one(logits, p):
    sorted_probs, order = _sorted_probs(logits)
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= p  # at p=1 rounding can reach 1.0 early
    drop[..., 0] = False
    return _remove(logits, drop, order)


def top_p_threshold(logits, p):
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < 1 - p, NEG_INF)


register(
    Check(
        "sampling.apply_top_p",
        "top-p (nucleus) filtering",
        top_p_cases,
        call_function,
        [
            Mistake(
                "drops_crossing_token",
                "top-p that drops the token whose probability makes the total "
                "cross p (keep a token while the mass *before* it is below p)",
                top_p_drops_crossing,
            ),
            Mistake(
                "on_logits",
                "top-p computed on cumulative logits instead "
                "of cumulative probabilities (softmax first)",
                top_p_on_logits,
            ),
            Mistake(
                "ascending",
                "top-p that walks from the least likely token up (sort descending)",
                top_p_ascending,
            ),
            Mistake(
                "p_one_rounding",
                "top-p with p=1 removing the least likely tokens: in float32 the running total "
                "can reach 1.0 before the last token, so return the logits unchanged when p == 1",
                top_p_no_special_one,
            ),
            Mistake(
                "threshold",
                "a probability threshold (remove tokens below 1 - p) instead of a cumulative one",
                top_p_threshold,
            ),
        ],
        compare=compare_top_p,
    )
)

# =============================================================== apply_frequency_penalty


def penalty_cases() -> list[Case]:
    ref = get_reference()
    real = batch_run()[0][:, -1].clone()  # [3, d_vocab]
    ids = [
        ref.to_tokens(t)[0]
        for t in ("the cat and the dog and the bird", "a a a a b", "no repeats here")
    ]
    width = min(len(i) for i in ids)
    real_tokens = torch.stack([i[:width] for i in ids])
    logits = randn(2, 30, seed=831, scale=2.0)
    tokens = torch.tensor(
        [[3, 3, 3, 7, 7, 1, 29, 0, 3, 7, 12, 12], [5, 5, 5, 5, 5, 5, 1, 2, 3, 4, 28, 29]]
    )
    empty = torch.zeros(2, 0, dtype=torch.long)
    settings = [
        ("random logits, repeated tokens, penalty 1.5", logits, tokens, 1.5),
        ("rows counted separately, penalty 0.4", logits, tokens.flip(0), 0.4),
        ("negative penalty -0.7 (rewards repeats)", logits, tokens, -0.7),
        ("no tokens yet: no change", logits, empty, 2.0),
        ("real logits and text tokens, penalty 0.5", real, real_tokens, 0.5),
    ]
    return [
        Case(name, (lg, tk, pen), expected=closed_form_penalty(lg, tk, pen))
        for name, lg, tk, pen in settings
    ]


def _counts(logits, tokens):
    return torch.zeros_like(logits).scatter_add(
        -1, tokens, torch.ones(tokens.shape, dtype=logits.dtype)
    )


def penalty_wrong_sign(logits, tokens, penalty):
    return logits + penalty * _counts(logits, tokens)


def penalty_presence(logits, tokens, penalty):
    return logits - penalty * (_counts(logits, tokens) > 0).to(logits.dtype)


def penalty_whole_batch(logits, tokens, penalty):
    counts = torch.bincount(tokens.flatten(), minlength=logits.shape[-1]).to(logits.dtype)
    return logits - penalty * counts


def penalty_divides(logits, tokens, penalty):
    seen = _counts(logits, tokens) > 0  # Hugging Face's repetition penalty, not a frequency penalty
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


register(
    Check(
        "sampling.apply_frequency_penalty",
        "frequency penalty",
        penalty_cases,
        call_function,
        [
            Mistake(
                "wrong_sign",
                "the penalty added instead of subtracted (repeats become more likely)",
                penalty_wrong_sign,
            ),
            Mistake(
                "presence",
                "a presence penalty: penalty once per token seen, not once per occurrence",
                penalty_presence,
            ),
            Mistake(
                "whole_batch",
                "occurrences counted over the whole batch instead of per row",
                penalty_whole_batch,
            ),
            Mistake(
                "repetition_penalty",
                "Hugging Face's repetition penalty (divide positive logits of seen "
                "tokens, multiply negative ones) instead of subtracting penalty * count",
                penalty_divides,
            ),
        ],
    )
)

# =============================================================== sample_next_token


def _groups() -> Tensor:
    """Three next-token distributions over 12 tokens: peaked, middling, random."""
    peaked = torch.tensor([3.0, 2.2, 1.6, 1.0, 0.5, 0.2, 0.0, -0.4, -1.0, -1.5, -2.5, -3.0])
    middling = torch.tensor([0.8, -0.3, 1.1, 0.2, -1.0, 0.9, 0.0, -2.0, 0.5, -0.6, 1.0, -0.1])
    return torch.stack([peaked, middling, randn(12, seed=841, scale=1.5)])


def sampler_cases() -> list[Case]:
    groups = _groups()
    generated = torch.tensor([[0, 0, 1, 5], [10, 2, 2, 2], [3, 4, 3, 11]])
    real = batch_run()[0][:, -1].clone()
    real_generated = real.topk(3, dim=-1).indices  # penalise each row's top 3 tokens
    penalised = {"temperature": 0.0, "frequency_penalty": 100.0, "generated": real_generated}
    cases = [
        Case(
            "temperature 0 is greedy (real logits)",
            (real, {"temperature": 0.0}, None),
            expected=real.argmax(dim=-1),
        ),
        Case(
            "temperature 0 with a frequency penalty on each row's top 3 tokens",
            (real, penalised, None),
            expected=closed_form_penalty(real, real_generated, 100.0).argmax(dim=-1),
        ),
    ]
    statistical = [
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
    ]
    for name, settings in statistical:
        probs = reference_distribution(groups, settings)
        batch_settings = dict(settings)
        if "generated" in settings:
            batch_settings["generated"] = einops.repeat(
                settings["generated"], "g n -> (g draws) n", draws=DRAWS
            )
        logits = einops.repeat(groups, "g v -> (g draws) v", draws=DRAWS)
        cases.append(
            Case(
                f"{name}: {DRAWS} draws from each of 3 distributions",
                (logits, batch_settings, 3),
                expected=Distribution(probs),
            )
        )
    return cases


def call_sampler(fn: Any, case: Case) -> Any:
    logits, settings, groups = case.args
    settings = {k: v.clone() if isinstance(v, Tensor) else v for k, v in settings.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SAMPLING_SEED)  # reproducible even for code that ignores `generator`
        output = fn(logits, generator=torch.Generator().manual_seed(SAMPLING_SEED), **settings)
    tokens = as_token_ids(output, (logits.shape[0],), "sample_next_token")
    if groups is None:
        return tokens
    return count_draws(tokens, groups, logits.shape[-1])


def _sampler(
    logits,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    frequency_penalty=0.0,
    generated=None,
    generator=None,
    mistake="",
):
    """The solution's steps, each of which one mistake gets wrong."""
    from solutions.sampling import apply_frequency_penalty, apply_top_k, apply_top_p

    use_penalty = frequency_penalty and generated is not None and generated.shape[-1] > 0
    penalty_first = mistake != "penalty_after_temperature" or temperature == 0
    if use_penalty and penalty_first and not (mistake == "greedy_no_penalty" and temperature == 0):
        logits = apply_frequency_penalty(logits, generated, frequency_penalty)
    if temperature == 0 and mistake != "zero_divides":
        return logits.argmax(dim=-1)
    if mistake == "always_greedy":
        return logits.argmax(dim=-1)

    def filters(x):
        if mistake == "top_p_first":
            x = apply_top_p(x, top_p) if top_p is not None else x
            return apply_top_k(x, top_k) if top_k is not None else x
        x = apply_top_k(x, top_k) if top_k is not None else x
        return apply_top_p(x, top_p) if top_p is not None else x

    if mistake == "filters_before_temperature":
        logits = filters(logits) / temperature
    elif mistake == "temperature_multiplied":
        logits = filters(logits * temperature)
    else:
        logits = filters(logits / temperature)
    if use_penalty and not penalty_first:
        logits = apply_frequency_penalty(logits, generated, frequency_penalty)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def sampler_mistake(name: str) -> Callable[..., Tensor]:
    return partial(_sampler, mistake=name)


register(
    Check(
        "sampling.sample_next_token",
        "choosing the next token",
        sampler_cases,
        call_sampler,
        [
            Mistake(
                "greedy_no_penalty",
                "temperature 0 returning the argmax of the "
                "raw logits, before the frequency penalty",
                sampler_mistake("greedy_no_penalty"),
            ),
            Mistake(
                "zero_divides",
                "temperature 0 not treated as greedy (dividing by 0 gives inf / NaN probabilities)",
                sampler_mistake("zero_divides"),
            ),
            Mistake(
                "always_greedy",
                "always the most likely token (argmax) instead of a random draw",
                sampler_mistake("always_greedy"),
            ),
            Mistake(
                "temperature_multiplied",
                "logits multiplied by the temperature instead of divided",
                sampler_mistake("temperature_multiplied"),
            ),
            Mistake(
                "filters_before_temperature",
                "top-k / top-p applied before the temperature "
                "(top-p must see the tempered probabilities)",
                sampler_mistake("filters_before_temperature"),
            ),
            Mistake(
                "top_p_first",
                "top-p applied before top-k (Hugging Face applies top-k first)",
                sampler_mistake("top_p_first"),
            ),
            Mistake(
                "penalty_after_temperature",
                "the frequency penalty applied after the "
                "temperature (it must come first, on the raw logits)",
                sampler_mistake("penalty_after_temperature"),
            ),
        ],
        compare=compare_sampling,
    )
)

# =============================================================== generate


def penalised_greedy(
    model: HFLogits, tokens: Tensor, max_new_tokens: int, penalty: float
) -> Tensor:
    """Greedy decoding with the closed-form penalty on generated tokens (HF has no equivalent)."""
    prompt_len = tokens.shape[1]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(tokens)[:, -1, :]
            logits = closed_form_penalty(logits, tokens[:, prompt_len:], penalty)
            tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return tokens


def eos_of(row: Tensor, prompt_len: int, step: int, avoid: Tensor) -> int:
    """A token generated at `step` of `row` and not among `avoid`: an eos that stops it there."""
    for token in row[prompt_len + step :].tolist():
        if (
            token not in set(avoid.flatten().tolist())
            and token not in row[prompt_len : prompt_len + step].tolist()
        ):
            return token
    raise RuntimeError("no usable eos token in this case (the check's data changed?)")


def generate_cases() -> list[Case]:
    small = small_model(0)
    cases = []

    reference_prompts = batch_tokens()[:2, :6].clone()  # the first words of two BATCH_TEXTS
    expected = hf_generate(reference_model(), reference_prompts, 3)
    cases.append(
        Case(
            "greedy, GPT-2 small (reference), 2 prompts, 3 tokens",
            ("tokens", reference_model(), reference_prompts, 3, {"temperature": 0.0}),
            expected=expected,
        )
    )

    prompts = random_prompts(3, 5, seed=851)
    expected = hf_generate(small, prompts, 12)
    cases.append(
        Case(
            "greedy, small GPT-2, 3 prompts, 12 tokens",
            ("tokens", small, prompts, 12, {"temperature": 0.0}),
            expected=expected,
        )
    )

    # eos that ends row 0 at step 4 and no other row: finished rows get eos from then on
    eos = eos_of(expected[0], 5, 3, expected[1:, 5:])
    with_eos = hf_generate(small, prompts, 12, eos_token_id=eos)
    cases.append(
        Case(
            f"greedy, eos {eos} ends row 0 after 4 tokens, the others go on",
            ("tokens", small, prompts, 12, {"temperature": 0.0, "eos_token_id": eos}),
            expected=with_eos,
        )
    )
    # one prompt, eos reached: generation stops there
    single = prompts[1:2]
    eos = expected[1, 5 + 5].item()
    stopped = hf_generate(small, single, 12, eos_token_id=eos)
    cases.append(
        Case(
            f"greedy, one prompt that reaches eos {eos}: generation stops early",
            ("tokens", small, single, 12, {"temperature": 0.0, "eos_token_id": eos}),
            expected=stopped,
        )
    )

    # a prompt that already contains what greedy would say next: counting the prompt would change it
    base = random_prompts(2, 4, seed=852)
    unpenalised = hf_generate(small, base, 6)
    penalty_prompts = torch.cat([base, unpenalised[:, 4:8]], dim=1)
    expected = penalised_greedy(small, penalty_prompts, 10, 1.5)
    cases.append(
        Case(
            "greedy with frequency penalty 1.5 (generated tokens only, not the prompt)",
            ("tokens", small, penalty_prompts, 10, {"temperature": 0.0, "frequency_penalty": 1.5}),
            expected=expected,
        )
    )

    bigram = bigram_model()
    prompts = torch.tensor([[3, 9], [1, 2], [7, 7], [15, 0]])
    cases.append(
        Case(
            "seed=7 twice gives the same tokens, seed=8 "
            "others, torch's global random state untouched",
            ("seed", bigram, prompts, 16, {"temperature": 1.0}),
            expected=SeedBehaviour(),
        )
    )

    settings = {"temperature": 0.8, "top_k": 6, "top_p": 0.9}
    probs = reference_distribution(bigram.table.detach()[9:10], settings)
    cases.append(
        Case(
            "first token drawn with temperature 0.8, "
            f"top-k 6, top-p 0.9: {DRAWS} identical prompts",
            (
                "distribution",
                bigram,
                torch.tensor([[3, 9]]).expand(DRAWS, 2).clone(),
                1,
                {**settings, "seed": 11},
            ),
            expected=Distribution(probs),
        )
    )
    return cases


SEED_FLAGS = [
    "the same seed gave different tokens on two calls: build one "
    "torch.Generator from `seed` in each call and pass it to every draw",
    "seeds 7 and 8 gave the same tokens: the seed is not used",
    "torch's global random state changed: use a torch.Generator(...).manual_seed(seed), not "
    "torch.manual_seed(seed), so that generating does not reset everyone else's randomness",
]


def call_generate(fn: Any, case: Case) -> Any:
    kind, model, tokens, max_new_tokens, settings = case.args
    if kind == "seed":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SAMPLING_SEED)
            state = torch.get_rng_state()
            first = fn(model, tokens, max_new_tokens, seed=7, **settings)
            again = fn(model, tokens, max_new_tokens, seed=7, **settings)
            other = fn(model, tokens, max_new_tokens, seed=8, **settings)
            untouched = torch.equal(torch.get_rng_state(), state)
        shape = (tokens.shape[0], tokens.shape[1] + max_new_tokens)
        first, again, other = (as_token_ids(t, shape, "generate") for t in (first, again, other))
        flags = [torch.equal(first, again), not torch.equal(first, other), untouched]
        return torch.tensor(flags, dtype=torch.bool)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SAMPLING_SEED)
        output = fn(model, tokens, max_new_tokens, **settings)
    if kind == "distribution":
        shape = (tokens.shape[0], tokens.shape[1] + max_new_tokens)
        return count_draws(as_token_ids(output, shape, "generate")[:, -1], 1, model.cfg.d_vocab)
    return output


@dataclass
class SeedBehaviour:
    """Expected output of the seed case: every flag of SEED_FLAGS true."""


def compare_generate(actual: Any, expected: Any, atol: float, rtol: float) -> str | None:
    if isinstance(expected, SeedBehaviour):
        wrong = [flag for flag, ok in zip(SEED_FLAGS, actual.tolist(), strict=True) if not ok]
        return "; ".join(wrong) or None
    if isinstance(expected, Tensor) and expected.dtype == torch.bool:  # two seed cases (diagnosis)
        return None if torch.equal(actual, expected) else "different"
    return compare_sampling(actual, expected, atol, rtol)


def _generate(
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
    mistake="",
):
    """The solution's loop, each step of which one mistake gets wrong."""
    from solutions.sampling import sample_next_token

    if mistake == "global_seed" and seed is not None:
        torch.manual_seed(seed)
    make_generator = seed is not None and mistake not in ("global_seed", "seed_ignored")
    generator = torch.Generator().manual_seed(seed) if make_generator else None
    prompt_len = tokens.shape[1]
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(tokens)[:, 0 if mistake == "first_position" else -1, :]
            next_token = sample_next_token(
                logits,
                temperature=temperature,
                top_k=None if mistake == "settings_dropped" else top_k,
                top_p=None if mistake == "settings_dropped" else top_p,
                frequency_penalty=frequency_penalty,
                generated=tokens if mistake == "prompt_penalised" else tokens[:, prompt_len:],
                generator=generator,
            )
            if eos_token_id is not None and mistake != "ignores_eos":
                if mistake != "finished_rows_continue":
                    next_token = next_token.masked_fill(finished, eos_token_id)
                finished = finished | (next_token == eos_token_id)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if finished.all() and mistake != "no_early_stop":
                break
    return tokens


def generate_mistake(name: str) -> Callable[..., Tensor]:
    return partial(_generate, mistake=name)


register(
    Check(
        "sampling.generate",
        "generating text",
        generate_cases,
        call_generate,
        [
            Mistake(
                "first_position",
                "the logits of the first position (logits[:, 0]) instead of the last",
                generate_mistake("first_position"),
            ),
            Mistake(
                "finished_rows_continue",
                "rows that produced eos carrying on with ordinary "
                "tokens (a finished row must only get eos)",
                generate_mistake("finished_rows_continue"),
            ),
            Mistake("ignores_eos", "eos_token_id ignored", generate_mistake("ignores_eos")),
            Mistake(
                "no_early_stop",
                "generation that goes on to max_new_tokens after "
                "every row has finished (stop once all have eos)",
                generate_mistake("no_early_stop"),
            ),
            Mistake(
                "prompt_penalised",
                "a frequency penalty that counts the prompt's "
                "tokens too (only generated tokens count)",
                generate_mistake("prompt_penalised"),
            ),
            Mistake(
                "seed_ignored",
                "a seed that is ignored (draws from torch's global random state)",
                generate_mistake("seed_ignored"),
            ),
            Mistake(
                "global_seed",
                "seeding with torch.manual_seed, which resets torch's global random state",
                generate_mistake("global_seed"),
            ),
            Mistake(
                "settings_dropped",
                "top_k / top_p not passed on to sample_next_token",
                generate_mistake("settings_dropped"),
            ),
        ],
        compare=compare_generate,
    )
)

# =============================================================== beam_search

# Small seeded models, prompts and eos tokens chosen (once, by a search over a few
# seeds) so that finished hypotheses of different lengths compete: without eos
# every hypothesis has the same length, and neither the length penalty nor early
# stopping would matter. tests/test_check_libraries.py proves each case's worth:
# every mistake below fails on at least one of them.
BEAM_SETTINGS: list[tuple[str, int, int, int, int, dict[str, Any]]] = [
    # name, model seed, prompt seed, num_beams, max_new_tokens, settings
    ("4 beams, 8 tokens, no eos", 0, 861, 4, 8, {}),
    (
        "3 beams, eos 407, length_penalty 2",
        0,
        861,
        3,
        8,
        {"eos_token_id": 407, "length_penalty": 2.0},
    ),
    (
        "4 beams, eos 68, length_penalty 1",
        0,
        861,
        4,
        8,
        {"eos_token_id": 68, "length_penalty": 1.0},
    ),
    (
        "4 beams, eos 148, early_stopping=True",
        1,
        864,
        4,
        8,
        {"eos_token_id": 148, "early_stopping": True},
    ),
    (
        "3 beams, eos 407, early_stopping='never'",
        0,
        861,
        3,
        8,
        {"eos_token_id": 407, "early_stopping": "never"},
    ),
    (
        "4 beams, eos 260, length_penalty -0.5",
        0,
        862,
        4,
        8,
        {"eos_token_id": 260, "length_penalty": -0.5},
    ),
]


def beam_cases() -> list[Case]:
    cases = []
    for name, model_seed, prompt_seed, num_beams, max_new_tokens, settings in BEAM_SETTINGS:
        model = small_model(model_seed)
        prompt = random_prompts(1, 5, seed=prompt_seed)
        expected = hf_generate(
            model,
            prompt,
            max_new_tokens,
            num_beams=num_beams,
            **{"length_penalty": 1.0, "early_stopping": False, **settings},
        )
        arguments = {k: v for k, v in settings.items()}
        cases.append(
            Case(name, (model, prompt, num_beams, max_new_tokens, arguments), expected=expected)
        )
    return cases


def call_beam_search(fn: Any, case: Case) -> Any:
    model, prompt, num_beams, max_new_tokens, settings = case.args
    return fn(model, prompt, num_beams, max_new_tokens, **settings)


def _beam_search(
    model,
    tokens,
    num_beams,
    max_new_tokens,
    *,
    length_penalty=1.0,
    eos_token_id=None,
    early_stopping=False,
    mistake="",
):
    """Hugging Face's beam search rules, each of which one mistake gets wrong."""
    prompt_len = tokens.shape[1]
    beams, scores = tokens, torch.zeros(1)
    finished: list[tuple[Tensor, Tensor]] = []

    def normalised(score, step):
        if mistake == "no_length_normalisation":
            return score
        length = step + prompt_len if mistake == "length_includes_prompt" else step
        return score / length**length_penalty

    with torch.no_grad():
        for step in range(1, max_new_tokens + 1):
            log_probs = F.log_softmax(model(beams)[:, -1, :], dim=-1)
            d_vocab = log_probs.shape[-1]
            if mistake == "per_beam_greedy" and step > 1:
                best = log_probs.argmax(dim=-1)
                top_index = torch.arange(len(beams)) * d_vocab + best
                top_scores = scores + log_probs.max(dim=-1).values
            else:
                top_scores, top_index = (scores[:, None] + log_probs).flatten().topk(2 * num_beams)
            running, running_scores = [], []
            for rank, (score, index) in enumerate(zip(top_scores, top_index.tolist(), strict=True)):
                parent, token = divmod(index, d_vocab)
                sequence = torch.cat([beams[parent], beams.new_tensor([token])])
                ends = token == eos_token_id or step == max_new_tokens
                if ends and mistake != "finished_dropped" and rank < num_beams:
                    finished.append((normalised(score, step), sequence))
                if (
                    ends
                    and mistake == "finished_dropped"
                    and step == max_new_tokens
                    and rank < num_beams
                ):
                    finished.append((normalised(score, step), sequence))
                if (not ends or mistake == "finished_keep_running") and len(running) < num_beams:
                    running.append(sequence)
                    running_scores.append(score)
            finished = sorted(finished, key=lambda h: -h[0].item())[:num_beams]
            stop_when_full = early_stopping is True and mistake != "ignores_early_stopping"
            if (
                step == max_new_tokens
                or (stop_when_full and len(finished) == num_beams)
                or not running
            ):
                break
            beams, scores = torch.stack(running), torch.stack(running_scores)
            if len(finished) == num_beams and mistake != "never_stops_early":
                length = (
                    max_new_tokens if early_stopping == "never" and length_penalty > 0 else step
                )
                if scores.max() / length**length_penalty <= finished[-1][0]:
                    break
    return finished[0][1][None, :]


def beam_mistake(name: str) -> Callable[..., Tensor]:
    return partial(_beam_search, mistake=name)


register(
    Check(
        "sampling.beam_search",
        "beam search",
        beam_cases,
        call_beam_search,
        [
            Mistake(
                "no_length_normalisation",
                "finished hypotheses ranked by total log-probability, "
                "not divided by length ** length_penalty",
                beam_mistake("no_length_normalisation"),
            ),
            Mistake(
                "length_includes_prompt",
                "a length penalty that counts the prompt "
                "(divide by the number of generated tokens only)",
                beam_mistake("length_includes_prompt"),
            ),
            Mistake(
                "finished_keep_running",
                "beams that ended in eos kept running (a finished "
                "hypothesis must leave the running beams)",
                beam_mistake("finished_keep_running"),
            ),
            Mistake(
                "finished_dropped",
                "hypotheses that ended in eos thrown away (keep the num_beams best finished ones)",
                beam_mistake("finished_dropped"),
            ),
            Mistake(
                "ignores_early_stopping",
                "early_stopping=True treated like False (with True, "
                "stop as soon as num_beams hypotheses have finished)",
                beam_mistake("ignores_early_stopping"),
            ),
            Mistake(
                "never_stops_early",
                "a search that never stops before max_new_tokens (with "
                "early_stopping=False it stops when the best running beam, divided by "
                "its length ** length_penalty, cannot beat the worst kept hypothesis)",
                beam_mistake("never_stops_early"),
            ),
            Mistake(
                "per_beam_greedy",
                "each beam extended only by its own best token (num_beams "
                "greedy searches), not the best candidates over all beams",
                beam_mistake("per_beam_greedy"),
            ),
        ],
        compare=compare_sampling,
    )
)
