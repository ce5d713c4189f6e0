"""From logits to text: temperature, top-k, top-p, a frequency penalty, generation, beam search.

Every logit transform takes next-token logits `[batch, d_vocab]` and returns new
logits of the same shape, with removed tokens at -inf (probability exactly 0
after the softmax). None of them changes its input in place or returns it.
"""

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course.prompts import check_prompt

NEG_INF = float("-inf")


def apply_temperature(
    logits: Float[Tensor, "batch d_vocab"], temperature: float
) -> Float[Tensor, "batch d_vocab"]:
    """Divide the logits by `temperature`: below 1 sharpens the distribution, above 1 flattens."""
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature}. For greedy "
            "decoding call generate(..., temperature=0) instead."
        )
    return logits / temperature


def apply_top_k(logits: Float[Tensor, "batch d_vocab"], k: int) -> Float[Tensor, "batch d_vocab"]:
    """Keep the k most likely tokens of each row; every token tied with the k-th one stays too."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top-k needs a whole number k >= 1, got {k!r}")
    k = min(k, logits.shape[-1])  # k beyond the vocabulary keeps everything
    kth_largest = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, NEG_INF)


def apply_top_p(logits: Float[Tensor, "batch d_vocab"], p: float) -> Float[Tensor, "batch d_vocab"]:
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches p.

    The token whose probability makes the running total cross p is kept. The most
    likely token always stays, however small p is; p = 1 keeps every token.
    """
    if not 0 < p <= 1:
        raise ValueError(f"top-p needs 0 < p <= 1, got {p!r}")
    if p == 1:
        return logits.clone()
    probs = logits.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    # Probability of all the more likely tokens: a token is dropped once that alone reaches p.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def apply_frequency_penalty(
    logits: Float[Tensor, "batch d_vocab"], tokens: Int[Tensor, "batch seq"], penalty: float
) -> Float[Tensor, "batch d_vocab"]:
    """Subtract `penalty` times the number of times each token occurs in its row of `tokens`.

    Every token of `tokens` counts: `generate` passes only the tokens it has
    generated so far, so the prompt is not penalised.
    """
    counts = torch.zeros_like(logits).scatter_add(
        -1, tokens, torch.ones(tokens.shape, dtype=logits.dtype, device=logits.device)
    )
    return logits - penalty * counts


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
    """One next token per row.

    The order matters: the frequency penalty (on the `generated` tokens) comes
    first; temperature 0 then means the most likely token (greedy); otherwise
    temperature, top-k, top-p (the order Hugging Face uses), then a draw from the
    softmax with `generator` (None: torch's global random state).
    """
    if frequency_penalty and generated is not None and generated.shape[-1] > 0:
        logits = apply_frequency_penalty(logits, generated, frequency_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if top_p is not None:
        logits = apply_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


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
    """Extend every row of `tokens` by up to `max_new_tokens` tokens, one forward pass per token.

    temperature=0 is greedy. A row that has produced `eos_token_id` has finished:
    it keeps receiving `eos_token_id`, and generation stops early once every row
    has finished (so the result may be shorter than seq + max_new_tokens). The
    frequency penalty counts generated tokens only, not the prompt. A `seed`
    makes sampling reproducible without touching torch's global random state.
    """
    check_prompt(tokens, max_new_tokens, model)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    prompt_len = tokens.shape[1]
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        logits = model(tokens)[:, -1, :]
        next_token = sample_next_token(
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
        if finished.all():
            break
    return tokens


def beam_step(
    scores: Float[Tensor, " beam"], log_probs: Float[Tensor, "beam d_vocab"], num_beams: int
) -> tuple[Float[Tensor, " candidate"], Int[Tensor, " candidate"], Int[Tensor, " candidate"]]:
    """The 2 * num_beams best one-token extensions of the running beams, best first.

    A candidate extends beam b by token t and scores scores[b] + log_probs[b, t]. Returns
    the candidates' scores, beams and tokens, each [2 * num_beams] (every candidate when
    there are fewer).
    """
    d_vocab = log_probs.shape[-1]
    totals = einops.rearrange(scores[:, None] + log_probs, "beam vocab -> (beam vocab)")
    top_scores, flat_index = totals.topk(min(2 * num_beams, totals.numel()))
    return top_scores, flat_index // d_vocab, flat_index % d_vocab


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
    """The most likely continuation found by keeping the `num_beams` best partial sequences.

    Same rules as Hugging Face's `generate(num_beams=...)` (greedy beam search):

    * each step extends every running beam by every token and keeps the
      2 * num_beams best candidates by total log-probability (`beam_step`);
    * a candidate ending in `eos_token_id`, or reaching `max_new_tokens`, is a
      finished hypothesis if it ranks among the first num_beams candidates; its
      score is its total log-probability / (generated length ** length_penalty);
    * the num_beams best unfinished candidates keep running;
    * the num_beams best finished hypotheses are kept, and the search stops when
      no running beam can beat them any more (early_stopping=False), as soon as
      there are num_beams of them (True), or never before max_new_tokens ("never").

    Returns the best finished hypothesis, prompt included: [1, seq + its length].
    """
    check_prompt(tokens, max_new_tokens, model)
    if tokens.shape[0] != 1:
        raise ValueError(
            f"beam_search takes one prompt, shape [1, seq]; got a batch of {tokens.shape[0]}"
        )
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError("beam_search needs num_beams >= 1 and max_new_tokens >= 1")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")

    beams = tokens  # [n_running, seq]: the running (unfinished) sequences
    beam_scores = torch.zeros(1, device=tokens.device)  # their total log-probabilities
    finished: list[tuple[Tensor, Tensor]] = []  # (normalised score, sequence), best first

    for step in range(1, max_new_tokens + 1):
        log_probs = F.log_softmax(model(beams)[:, -1, :], dim=-1)
        top_scores, parents, next_tokens = beam_step(beam_scores, log_probs, num_beams)
        next_beams, next_scores = [], []
        candidates = zip(top_scores, parents.tolist(), next_tokens.tolist(), strict=True)
        for rank, (score, parent, token) in enumerate(candidates):
            sequence = torch.cat([beams[parent], beams.new_tensor([token])])
            if token == eos_token_id or step == max_new_tokens:
                if rank < num_beams:  # candidates further down were only a reserve of running beams
                    finished.append((score / step**length_penalty, sequence))
            elif len(next_beams) < num_beams:
                next_beams.append(sequence)
                next_scores.append(score)
        finished = sorted(finished, key=lambda hypothesis: -hypothesis[0].item())[:num_beams]
        if step == max_new_tokens or (early_stopping is True and len(finished) == num_beams):
            break
        beams, beam_scores = torch.stack(next_beams), torch.stack(next_scores)
        if len(finished) == num_beams:
            # Could the best running beam still beat the worst kept hypothesis?
            length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step
            if beam_scores[0] / length**length_penalty <= finished[-1][0]:
                break
    return finished[0][1][None, :]
