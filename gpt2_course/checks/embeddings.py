"""Checks for Embedding, PositionalEmbedding and Unembedding (notebook 01)."""

import einops
import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_course.checks.core import Case, call_module
from gpt2_course.checks.reference_data import (
    GPT2_SMALL,
    batch_run,
    batch_tokens,
    generator,
    randn,
    text_run,
    text_tokens,
)
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig
from gpt2_course.reference import get_reference

# The random tables use a vocabulary and width of their own: code that reads its sizes
# from cfg passes, code with GPT-2's sizes written in fails (and a 5000-row table is
# quick to draw, where GPT-2's 50257 x 768 takes seconds).
OWN_VOCAB = TransformerConfig(d_model=256, n_heads=4, d_head=64, d_mlp=1024, d_vocab=5000)


def random_tokens(batch: int, pos: int, seed: int, high: int) -> Tensor:
    tokens = torch.randint(0, high, (batch, pos), generator=generator(seed))
    tokens[0, 0], tokens[-1, -1] = 0, high - 1  # the first and last ids of the table
    return tokens


def real_cases(weights: list[str], source: str, out: str) -> list[Case]:
    """The reference's own `weights` on real text: `source` in (the tokens or an
    activation), `out` out (an activation or the logits)."""
    bridge = get_reference().bridge
    params = {name: getattr(bridge, name).detach().clone() for name in weights}
    cases = []
    for name, tokens, (logits, acts) in [
        ("real text", text_tokens(), text_run()),
        ("batch of 3 texts", batch_tokens(), batch_run()),
    ]:
        run = {**acts, "tokens": tokens, "logits": logits}
        cases.append(Case(name, (run[source],), params, GPT2_SMALL, run[out]))
    return cases


def embedding_cases() -> list[Case]:
    vocab, width = OWN_VOCAB.d_vocab, OWN_VOCAB.d_model
    W_E = randn(vocab, width, seed=11, scale=3.0)
    cases = real_cases(["W_E"], "tokens", "hook_embed")
    # ids below d_model let a lookup along the wrong axis run (and be recognised) instead of crash
    for name, tokens in [
        (f"random W_E, token ids < {width - 6}", random_tokens(2, 7, seed=12, high=width - 6)),
        (f"random W_E, ids 0..{vocab - 1}", random_tokens(4, 33, seed=13, high=vocab)),
    ]:
        expected = F.embedding(tokens, W_E)
        cases.append(Case(name, (tokens,), {"W_E": W_E}, OWN_VOCAB, expected, seeded=True))
    return cases


def positional_cases() -> list[Case]:
    W_pos = randn(GPT2_SMALL.n_ctx, GPT2_SMALL.d_model, seed=21, scale=2.0)
    cases = real_cases(["W_pos"], "tokens", "hook_pos_embed")
    for name, seed, batch, pos in [
        ("random W_pos, 3 rows of 5 tokens", 23, 3, 5),
        ("random W_pos, all 1024 positions", 22, 2, GPT2_SMALL.n_ctx),
    ]:
        tokens = random_tokens(batch, pos, seed=seed, high=GPT2_SMALL.d_vocab)
        expected = einops.repeat(W_pos[:pos], "pos d -> batch pos d", batch=batch)
        cases.append(Case(name, (tokens,), {"W_pos": W_pos}, GPT2_SMALL, expected, seeded=True))
    return cases


def on_grid(t: Tensor, steps: int) -> Tensor:
    """`t` rounded to multiples of 1 / `steps` (a power of two): exact in float32.

    With x on a grid of 1/16 (or integers) and W_U and b_U on a grid of 1/16, a logit
    is a multiple of 1/256 whose partial sums stay far below 2**24 / 256: no addition
    rounds, in any order. tests/test_check_cases_exact.py holds the bound.
    """
    return torch.round(t * steps) / steps


def unembedding_cases() -> list[Case]:
    cases = real_cases(["W_U", "b_U"], "ln_final.hook_out", "logits")
    # GPT-2's own b_U is zero, so the random cases give it a value to catch a missing bias.
    # The random values are dyadic (see `on_grid`): every product and partial sum of
    # x @ W_U + b_U is then a float32 number, so the logits come out bit for bit the same
    # whatever order a kernel sums in (another CPU, MKL build or thread count: the
    # grader's runner), even at input scale 30 where some large logits cancel to near 0.
    W_U = on_grid(randn(OWN_VOCAB.d_model, OWN_VOCAB.d_vocab, seed=31, scale=0.5), 16)
    b_U = on_grid(randn(OWN_VOCAB.d_vocab, seed=32, scale=2.0), 16)
    for seed, scale, steps in [(33, 1.0, 16), (34, 30.0, 1)]:
        x = on_grid(randn(2, 6, OWN_VOCAB.d_model, seed=seed, scale=scale), steps)
        name = f"random W_U and b_U, input scale {scale:g}"
        expected = F.linear(x, W_U.T, b_U)
        cases.append(Case(name, (x,), {"W_U": W_U, "b_U": b_U}, OWN_VOCAB, expected, seeded=True))
    return cases


for check_id, title, make_cases in [
    ("embeddings.Embedding", "token embedding lookup", embedding_cases),
    ("embeddings.PositionalEmbedding", "learned positional embedding", positional_cases),
    ("embeddings.Unembedding", "unembedding to logits", unembedding_cases),
]:
    register(Check(check_id, title, make_cases, call_module(), backward=True))
