"""From logits to text on Hugging Face's logits processors.

The three logit transforms are Hugging Face's own warpers (`TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper`), which define the course's contract: top-k
keeps every token tied with the k-th, top-p keeps the token whose probability
crosses p and always the most likely one. The checks compare with the same warpers.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gpt2_course.prompts import check_prompt


def apply_temperature(
    logits: Float[Tensor, "batch d_vocab"], temperature: float
) -> Float[Tensor, "batch d_vocab"]:
    if temperature <= 0:
        raise ValueError(
            f"temperature must be > 0 (got {temperature}); greedy decoding is "
            "generate(..., temperature=0)"
        )
    return TemperatureLogitsWarper(float(temperature))(None, logits)


def apply_top_k(logits: Float[Tensor, "batch d_vocab"], k: int) -> Float[Tensor, "batch d_vocab"]:
    if type(k) is not int or k < 1:
        raise ValueError(f"top-k takes an integer k >= 1, not {k!r}")
    return TopKLogitsWarper(top_k=k)(None, logits)  # clamps k to the vocabulary itself


def apply_top_p(logits: Float[Tensor, "batch d_vocab"], p: float) -> Float[Tensor, "batch d_vocab"]:
    if p <= 0 or p > 1:
        raise ValueError(f"top-p takes 0 < p <= 1, not {p!r}")
    if p == 1:
        # in float32 a cumulative sum can reach 1.0 before the last token; p = 1 keeps all
        return logits.clone()
    return TopPLogitsWarper(top_p=float(p))(None, logits)


def apply_frequency_penalty(
    logits: Float[Tensor, "batch d_vocab"], tokens: Int[Tensor, "batch seq"], penalty: float
) -> Float[Tensor, "batch d_vocab"]:
    occurrences = F.one_hot(tokens, num_classes=logits.shape[-1]).sum(dim=-2)
    return logits - occurrences.to(logits.dtype) * penalty


def sample_next_token(
    logits: Float[Tensor, "batch d_vocab"],
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    frequency_penalty: float = 0.0,
    generated: Int[Tensor, "batch seq"] | None = None,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    if generated is not None and generated.numel() and frequency_penalty != 0:
        logits = apply_frequency_penalty(logits, generated, frequency_penalty)
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    steps = [lambda x: apply_temperature(x, temperature)]
    if top_k is not None:
        steps.append(lambda x: apply_top_k(x, top_k))
    if top_p is not None:
        steps.append(lambda x: apply_top_p(x, top_p))
    for step in steps:
        logits = step(logits)
    drawn = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
    return drawn[:, 0]


@torch.no_grad()
def generate(
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
) -> Int[Tensor, "batch seq_plus_new"]:
    check_prompt(tokens, max_new_tokens, model)
    rng = None if seed is None else torch.Generator(device=tokens.device).manual_seed(seed)
    start = tokens.shape[-1]
    done = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
    sequence = tokens
    while sequence.shape[-1] - start < max_new_tokens and not (
        eos_token_id is not None and done.all()
    ):
        chosen = sample_next_token(
            model(sequence)[:, -1],
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            frequency_penalty=frequency_penalty,
            generated=sequence[:, start:],
            generator=rng,
        )
        if eos_token_id is not None:
            chosen = torch.where(done, eos_token_id, chosen)
            done |= chosen == eos_token_id
        sequence = torch.cat((sequence, chosen.unsqueeze(-1)), dim=-1)
    return sequence


def beam_step(
    scores: Float[Tensor, " beam"], log_probs: Float[Tensor, "beam d_vocab"], num_beams: int
) -> tuple[Float[Tensor, " candidate"], Int[Tensor, " candidate"], Int[Tensor, " candidate"]]:
    candidates = (log_probs + scores.unsqueeze(-1)).reshape(-1)
    best, where = torch.topk(candidates, k=min(candidates.numel(), 2 * num_beams))
    beam, token = (
        torch.div(where, log_probs.shape[1], rounding_mode="floor"),
        where.remainder(log_probs.shape[1]),
    )
    return best, beam, token


@torch.no_grad()
def beam_search(
    model: nn.Module,
    tokens: Int[Tensor, "1 seq"],
    num_beams: int,
    max_new_tokens: int,
    *,
    length_penalty: float = 1.0,
    eos_token_id: int | None = None,
    early_stopping: bool | str = False,
) -> Int[Tensor, "1 seq_plus_new"]:
    """Hugging Face's beam search (`generate(num_beams=...)`, no sampling), step by step."""
    check_prompt(tokens, max_new_tokens, model)
    if tokens.shape[0] != 1:
        raise ValueError(f"beam_search takes one prompt, shape [1, seq], not {len(tokens)} of them")
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError("beam_search needs num_beams >= 1 and max_new_tokens >= 1")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping is True, False or 'never', not {early_stopping!r}")

    running, totals = tokens, tokens.new_zeros(1, dtype=torch.float)
    done: list[tuple[Tensor, Tensor]] = []  # (total / length ** length_penalty, sequence)
    for length in range(1, max_new_tokens + 1):
        best, rows, chosen = beam_step(totals, model(running)[:, -1].log_softmax(dim=-1), num_beams)
        extended = torch.cat((running[rows], chosen[:, None]), dim=1)
        ends = torch.full_like(chosen, length == max_new_tokens, dtype=torch.bool)
        if eos_token_id is not None:
            ends |= chosen == eos_token_id
        for rank in ends[:num_beams].nonzero()[:, 0].tolist():
            done.append((best[rank] / length**length_penalty, extended[rank]))
        done = sorted(done, key=lambda hypothesis: hypothesis[0].item(), reverse=True)[:num_beams]
        keep = (~ends).nonzero()[:num_beams, 0]
        if length == max_new_tokens or (early_stopping is True and len(done) == num_beams):
            break
        running, totals = extended[keep], best[keep]
        if len(done) == num_beams:
            horizon = max_new_tokens if early_stopping == "never" and length_penalty > 0 else length
            if totals.max() / horizon**length_penalty <= done[-1][0]:
                break
    return done[0][1].unsqueeze(0)
