"""Sampling, generation and beam search (solutions/sampling.py): behaviours beyond the checks."""

import itertools

import pytest
import torch

from gpt2_course.checks import sampling as data
from solutions.sampling import (
    apply_frequency_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    beam_search,
    beam_step,
    generate,
    sample_next_token,
)


@pytest.fixture(scope="module")
def small():
    return data.small_model(0)


def prompts(batch: int, length: int = 5, seed: int = 3) -> torch.Tensor:
    return data.random_prompts(batch, length, seed=seed)


# ------------------------------------------------------------------ logit transforms


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: apply_temperature(x, 0.0), "temperature"),
        (lambda x: apply_temperature(x, -1.0), "temperature"),
        (lambda x: apply_top_k(x, 0), "top-k"),
        (lambda x: apply_top_k(x, 2.5), "top-k"),
        (lambda x: apply_top_p(x, 0.0), "top-p"),
        (lambda x: apply_top_p(x, 1.5), "top-p"),
    ],
)
def test_bad_settings_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(2, 10))


def test_transforms_leave_their_input_alone():
    logits = torch.randn(3, 20)
    before = logits.clone()
    apply_temperature(logits, 0.5)
    apply_top_k(logits, 3)
    apply_top_p(logits, 0.5)
    apply_top_p(logits, 1.0)
    apply_frequency_penalty(logits, torch.tensor([[1, 1], [2, 3], [0, 0]]), 1.0)
    assert torch.equal(logits, before)


def test_top_p_keeps_the_token_that_crosses_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(apply_top_p(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    # exactly reaching p with the first token: the second is not needed
    assert torch.isfinite(apply_top_p(logits, 0.5)).tolist() == [[True, False, False, False]]


def test_exact_rows_land_exactly_on_p_in_any_precision_and_order():
    """The top-p boundary case is exact: no rounding can excuse keeping the extra token."""
    rows = data.exact_rows()
    for dtype in (torch.float32, torch.float64):
        probs = rows.to(dtype).softmax(dim=-1)
        for order in (True, False):
            totals = probs.sort(dim=-1, descending=order).values.cumsum(dim=-1)
            assert {0.5, 0.75} <= set(totals[0].tolist()) | set(totals[1].tolist())
    kept = torch.isfinite(apply_top_p(rows, 0.75)).sum(dim=-1)
    assert kept.tolist() == [3, 6]


def test_transforms_never_return_their_input():
    logits = torch.randn(2, 10)
    for out in [
        apply_temperature(logits, 1.0),
        apply_top_k(logits, 10),
        apply_top_p(logits, 1.0),
        apply_frequency_penalty(logits, torch.zeros(2, 0, dtype=torch.long), 1.0),
        apply_frequency_penalty(logits, torch.ones(2, 3, dtype=torch.long), 0.0),
    ]:
        assert out.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()


def test_frequency_penalty_counts_each_row_separately():
    logits = torch.zeros(2, 5)
    out = apply_frequency_penalty(logits, torch.tensor([[1, 1, 4], [2, 2, 2]]), 0.5)
    assert out.tolist() == [[0, -1.0, 0, 0, -0.5], [0, 0, -1.5, 0, 0]]


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).expand(50_000, 5)
    draws = sample_next_token(
        logits, temperature=0.7, top_k=3, generator=torch.Generator().manual_seed(0)
    )
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    expected = torch.tensor([2.0, 1.0, 0.5]).div(0.7).softmax(-1).double()
    assert freq[3:].sum() == 0
    assert torch.allclose(freq[:3], expected, atol=5 * (0.25 / len(draws)) ** 0.5)


# ------------------------------------------------------------------ generate


def test_greedy_generate_on_gpt2_matches_hugging_face_token_for_token():
    """The course's own Transformer, loaded with load_gpt2_weights, against HF generate."""
    from gpt2_course.checks.kv_cache import gpt2_course_model
    from gpt2_course.checks.reference_data import batch_tokens

    tokens = batch_tokens()[:, :6].clone()  # three equal-length prompts, no padding
    ours = generate(gpt2_course_model(), tokens, 5, temperature=0)
    theirs = data.hf_generate(data.reference_model(), tokens, 5)
    assert torch.equal(ours, theirs)


def test_eos_stops_a_row_and_finished_rows_get_eos(small):
    tokens = prompts(3)
    free = generate(small, tokens, 10, temperature=0)
    eos = data.eos_of(free[0], 5, 2, free[1:, 5:])  # first produced by row 0 at step 3
    out = generate(small, tokens, 10, temperature=0, eos_token_id=eos)
    assert out.shape == free.shape  # the other rows go on
    step = out[0, 5:].tolist().index(eos)
    assert (out[0, 5 + step :] == eos).all()
    assert torch.equal(out[1:], free[1:])
    assert torch.equal(out[0, : 5 + step], free[0, : 5 + step])


def test_generation_stops_once_every_row_has_finished(small):
    tokens = prompts(1)
    free = generate(small, tokens, 10, temperature=0)
    eos = free[0, 5 + 3].item()
    out = generate(small, tokens, 10, temperature=0, eos_token_id=eos)
    assert out.shape[1] <= 5 + 4 and out[0, -1] == eos


def test_seed_makes_sampling_reproducible_without_touching_global_state(small):
    tokens = prompts(2)
    state = torch.get_rng_state()
    first = generate(small, tokens, 8, seed=11, top_k=50)
    again = generate(small, tokens, 8, seed=11, top_k=50)
    other = generate(small, tokens, 8, seed=12, top_k=50)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_batch_of_prompts_is_generated_row_by_row(small):
    tokens = prompts(4)
    batch = generate(small, tokens, 6, temperature=0, frequency_penalty=0.5)
    for row in range(4):
        alone = generate(small, tokens[row : row + 1], 6, temperature=0, frequency_penalty=0.5)
        assert torch.equal(batch[row : row + 1], alone)


def test_generate_says_when_the_context_is_exceeded(small):
    with pytest.raises(ValueError, match="n_ctx=64"):
        generate(small, prompts(1, 60), 5)
    with pytest.raises(ValueError, match="LongTensor"):
        generate(small, prompts(1).float(), 2)


def test_generate_fills_exactly_n_ctx(small):
    assert generate(small, prompts(1, 60), 4, temperature=0).shape == (1, 64)


# ------------------------------------------------------------------ beam search


def test_beam_search_matches_hugging_face_across_settings():
    grid = [(4, 1.0, False), (3, 2.0, False), (4, -0.5, False), (3, 1.0, True), (4, 1.0, "never")]
    for model_seed, prompt_seed in [(0, 871), (2, 872)]:
        model = data.small_model(model_seed)
        tokens = prompts(1, seed=prompt_seed)
        candidates = data.hf_generate(model, tokens, 8, num_beams=4, num_return_sequences=4)
        eos_choices = [None, *candidates[:, 5:8].flatten().unique()[:2].tolist()]
        for eos, (beams, length_penalty, early) in itertools.product(eos_choices, grid):
            settings = {
                "length_penalty": length_penalty,
                "early_stopping": early,
                "eos_token_id": eos,
            }
            theirs = data.hf_generate(model, tokens, 8, num_beams=beams, **settings)
            ours = beam_search(model, tokens, beams, 8, **settings)
            assert torch.equal(ours, theirs), (model_seed, eos, beams, length_penalty, early)


def test_beam_step_ranks_all_beams_together():
    scores = torch.tensor([-1.0, -9.0])
    log_probs = torch.tensor([[-0.1, -0.5, -3.0], [-0.01, -0.02, -0.03]])
    best, beams, tokens = beam_step(scores, log_probs, 2)
    assert beams.tolist() == [0, 0, 0, 1] and tokens.tolist() == [0, 1, 2, 0]
    assert torch.allclose(best, torch.tensor([-1.1, -1.5, -4.0, -9.01]))
    # fewer candidates than 2 * num_beams: all of them
    assert len(beam_step(torch.zeros(1), log_probs[:1], 4)[0]) == 3


BEAM_LOSES_PROMPT_SEED = 110  # found by a search over prompt seeds


def test_beam_search_can_end_less_likely_than_greedy():
    """Nothing guarantees that beam search beats greedy on total log-probability: the
    greedy path can fall out of the beams. A case on the check's small model."""
    model = data.small_model(0)
    tokens = prompts(1, seed=BEAM_LOSES_PROMPT_SEED)
    greedy = generate(model, tokens, 6, temperature=0)
    beams = beam_search(model, tokens, 2, 6)

    def total(sequence):
        with torch.no_grad():
            log_probs = model(sequence).log_softmax(dim=-1)[0, 4:-1]
        return log_probs.gather(-1, sequence[0, 5:, None]).sum().item()

    assert total(beams) < total(greedy) - 1e-3


def test_one_beam_is_greedy(small):
    tokens = prompts(1)
    assert torch.equal(beam_search(small, tokens, 1, 7), generate(small, tokens, 7, temperature=0))


def test_beam_search_takes_one_prompt(small):
    with pytest.raises(ValueError, match="one prompt"):
        beam_search(small, prompts(2), 2, 3)
    with pytest.raises(ValueError, match="early_stopping"):
        beam_search(small, prompts(1), 2, 3, early_stopping="sometimes")


def test_greedy_margins_in_the_generate_check_are_far_above_float_noise():
    """The check compares exact tokens: no near-tie between two logits may decide them."""
    for case in data.generate_cases():
        kind, model, tokens, _, settings = case.args
        if kind != "tokens":
            continue
        expected, prompt_len = case.expected, tokens.shape[1]
        with torch.no_grad():
            logits = model(expected[:, :-1])[:, prompt_len - 1 :]
        for step in range(logits.shape[1]):
            step_logits = logits[:, step]
            penalty = settings.get("frequency_penalty", 0.0)
            if penalty:
                generated = expected[:, prompt_len : prompt_len + step]
                step_logits = apply_frequency_penalty(step_logits, generated, penalty)
            top2 = step_logits.topk(2, dim=-1).values
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, (case.name, step)
