"""Notebook 07: from logits to text.

Fill in the functions in order: the four logit transforms, `sample_next_token`,
`generate`, then `beam_step` and `beam_search`. Keep the names and signatures: the checks call
them exactly like this. `check_prompt` (from gpt2_course/prompts.py) is written for you.

Every logit transform takes next-token logits [batch, d_vocab] and returns new
logits of the same shape, removed tokens set to -inf (probability exactly 0
after the softmax). None of them may change its input in place, and each returns a
new tensor even when nothing changes (not the input itself: the caller may change one).
"""

import einops  # noqa: F401  (you will want it)
import torch
import torch.nn.functional as F  # noqa: F401
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course.prompts import check_prompt  # noqa: F401  (generate and beam_search use it)

NEG_INF = float("-inf")


def apply_temperature(
    logits: Float[Tensor, "batch d_vocab"], temperature: float
) -> Float[Tensor, "batch d_vocab"]:
    """Divide the logits by `temperature` (> 0).

    Below 1 the distribution gets sharper, above 1 flatter. Raise a ValueError
    with a helpful message for temperature <= 0 (greedy decoding is
    `generate(..., temperature=0)`, which never calls this function).
    """
    raise NotImplementedError("apply_temperature: write it in gpt2_course/exercises/sampling.py")


def apply_top_k(logits: Float[Tensor, "batch d_vocab"], k: int) -> Float[Tensor, "batch d_vocab"]:
    """Keep the k largest logits of each row; set the others to -inf.

    Ties: every token whose logit equals the k-th largest one stays (so a row can
    keep more than k tokens). A k larger than the vocabulary keeps every token.
    Raise a ValueError for k < 1.
    """
    raise NotImplementedError("apply_top_k: write it in gpt2_course/exercises/sampling.py")


def apply_top_p(logits: Float[Tensor, "batch d_vocab"], p: float) -> Float[Tensor, "batch d_vocab"]:
    """Nucleus (top-p) filtering: keep the fewest most likely tokens whose probability reaches p.

    Work with probabilities (softmax), not logits. Going through the tokens from
    most to least likely, keep a token while the probability of the tokens
    before it is still below p: the token that makes the running total cross p
    is kept. The most likely token always stays; p = 1 keeps every token. Raise
    a ValueError unless 0 < p <= 1.
    """
    raise NotImplementedError("apply_top_p: write it in gpt2_course/exercises/sampling.py")


def apply_frequency_penalty(
    logits: Float[Tensor, "batch d_vocab"], tokens: Int[Tensor, "batch seq"], penalty: float
) -> Float[Tensor, "batch d_vocab"]:
    """Subtract `penalty` times the number of times each token occurs in the same row of `tokens`.

    A token seen 3 times in row b loses 3 * penalty from logits[b, token]; rows
    are counted separately. (`generate` will pass only the generated tokens.)
    """
    raise NotImplementedError(
        "apply_frequency_penalty: write it in gpt2_course/exercises/sampling.py"
    )


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
    """One next token per row, shape [batch].

    In this order:
    1. the frequency penalty, counted over `generated` (when given and penalty != 0);
    2. temperature == 0: return the most likely token of each row (greedy);
    3. otherwise temperature, then top-k (if given), then top-p (if given);
    4. draw one token per row from the softmax with
       `torch.multinomial(probs, 1, generator=generator)`.
    """
    raise NotImplementedError("sample_next_token: write it in gpt2_course/exercises/sampling.py")


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
    """Extend every row of `tokens` by up to `max_new_tokens` tokens.

    Start with `check_prompt(tokens, max_new_tokens, model)`. Then, once per new
    token: run `model(tokens)` on everything so far, take the last position's
    logits, pick the next token with `sample_next_token` (same settings; pass
    `generated=` the tokens generated so far, without the prompt), and append it.

    * temperature=0 is greedy.
    * `seed`: build `torch.Generator(device=tokens.device).manual_seed(seed)` once
      and pass it to every `sample_next_token` call (None: no generator).
    * `eos_token_id`: a row that has produced it has finished and receives
      `eos_token_id` at every later step; stop early as soon as every row has
      finished (the result can then be shorter than seq + max_new_tokens).
    """
    raise NotImplementedError("generate: write it in gpt2_course/exercises/sampling.py")


def beam_step(
    scores: Float[Tensor, " beam"], log_probs: Float[Tensor, "beam d_vocab"], num_beams: int
) -> tuple[Float[Tensor, " candidate"], Int[Tensor, " candidate"], Int[Tensor, " candidate"]]:
    """One step of beam search: the 2 * num_beams best one-token extensions of the beams.

    `scores[b]` is running beam b's total log-probability so far; `log_probs[b, t]` is the
    log-probability of token t after beam b. The candidate "beam b, then token t" scores
    scores[b] + log_probs[b, t]. Rank all beams * d_vocab candidates together (not each
    beam on its own), take the 2 * num_beams best (every candidate if there are fewer),
    best first, and return three tensors of that length: their scores, their beam indices
    and their token indices (split the flat index with // and %).
    """
    raise NotImplementedError("beam_step: write it in gpt2_course/exercises/sampling.py")


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
    """The best continuation found by keeping the `num_beams` best partial sequences.

    The rules (the same as Hugging Face's `generate(num_beams=...)`):

    * start with one running beam, the prompt, with score 0 (its total log-probability);
    * each step: log_softmax of the last position's logits for every running beam,
      added to that beam's score, gives num_running * d_vocab candidates; keep the
      2 * num_beams best, in order (that is `beam_step`: call it);
    * a candidate whose token is `eos_token_id`, or that reaches `max_new_tokens`,
      is finished: if it is among the first num_beams candidates, add it to the
      finished hypotheses with score total / (number of generated tokens ** length_penalty)
      (the prompt does not count; the eos token does); otherwise drop it;
    * the first num_beams unfinished candidates are the next running beams;
    * keep only the num_beams best finished hypotheses. Stop after max_new_tokens
      steps, or when there are num_beams of them and either early_stopping is True
      or the best running beam's score / (steps so far ** length_penalty) is not
      above the worst of them (early_stopping="never": divide by
      max_new_tokens ** length_penalty instead when length_penalty > 0).

    Return the best finished hypothesis, prompt included, shape [1, seq + its length].
    Raise a ValueError for a batch of more than one prompt.
    """
    raise NotImplementedError("beam_search: write it in gpt2_course/exercises/sampling.py")
