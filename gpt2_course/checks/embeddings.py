"""Checks for Embedding, PositionalEmbedding and Unembedding (notebook 01)."""

import einops
import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_course.checks.core import Case, Mistake, call_module
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
from gpt2_course.reference import get_reference
from solutions.embeddings import Embedding, PositionalEmbedding, Unembedding

D_VOCAB, D_MODEL, N_CTX = GPT2_SMALL.d_vocab, GPT2_SMALL.d_model, GPT2_SMALL.n_ctx


def random_tokens(batch: int, pos: int, seed: int, high: int = D_VOCAB) -> Tensor:
    tokens = torch.randint(0, high, (batch, pos), generator=generator(seed))
    tokens[0, 0], tokens[-1, -1] = 0, high - 1  # the first and last ids of the table
    return tokens


# ------------------------------------------------------------------ Embedding


def embedding_cases() -> list[Case]:
    ref = get_reference()
    W_E = ref.bridge.W_E.detach().clone()
    big_W_E = randn(D_VOCAB, D_MODEL, seed=11, scale=3.0)
    # Token ids below 768 make some wrong-axis lookups run (and be recognised) instead of crash.
    small = random_tokens(2, 7, seed=12, high=700)
    wide = random_tokens(4, 33, seed=13)
    return [
        Case("real text", (text_tokens(),), {"W_E": W_E}, GPT2_SMALL, text_run()[1]["hook_embed"]),
        Case(
            "batch of 3 texts",
            (batch_tokens(),),
            {"W_E": W_E},
            GPT2_SMALL,
            batch_run()[1]["hook_embed"],
        ),
        Case(
            "random W_E, token ids < 700",
            (small,),
            {"W_E": big_W_E},
            GPT2_SMALL,
            F.embedding(small, big_W_E),
        ),
        Case(
            "random W_E, ids 0..50256",
            (wide,),
            {"W_E": big_W_E},
            GPT2_SMALL,
            F.embedding(wide, big_W_E),
        ),
    ]


class EmbeddingWrongAxis(Embedding):
    def forward(self, tokens):
        return self.W_E[:, tokens]


class EmbeddingScaled(Embedding):
    def forward(self, tokens):
        return self.W_E[tokens] * self.cfg.d_model**0.5


register(
    Check(
        "embeddings.Embedding",
        "token embedding lookup",
        embedding_cases,
        call_module(),
        [
            Mistake(
                "wrong_axis",
                "indexing W_E along d_model instead of d_vocab (W_E[:, tokens])",
                EmbeddingWrongAxis,
            ),
            Mistake(
                "scaled_by_sqrt_d_model",
                "embeddings multiplied by sqrt(d_model), as in the original Transformer paper "
                "(GPT-2 does not scale them)",
                EmbeddingScaled,
            ),
        ],
    )
)

# ------------------------------------------------------------------ PositionalEmbedding


def positional_cases() -> list[Case]:
    W_pos = get_reference().bridge.W_pos.detach().clone()
    big_W_pos = randn(N_CTX, D_MODEL, seed=21, scale=2.0)
    full = random_tokens(2, N_CTX, seed=22)

    def expected(W: Tensor, tokens: Tensor) -> Tensor:
        return einops.repeat(W[: tokens.shape[1]], "pos d -> batch pos d", batch=tokens.shape[0])

    return [
        Case(
            "real text",
            (text_tokens(),),
            {"W_pos": W_pos},
            GPT2_SMALL,
            text_run()[1]["hook_pos_embed"],
        ),
        Case(
            "batch of 3 texts",
            (batch_tokens(),),
            {"W_pos": W_pos},
            GPT2_SMALL,
            batch_run()[1]["hook_pos_embed"],
        ),
        Case(
            "random W_pos, 3 rows of 5 tokens",
            (random_tokens(3, 5, seed=23),),
            {"W_pos": big_W_pos},
            GPT2_SMALL,
            expected(big_W_pos, random_tokens(3, 5, seed=23)),
        ),
        Case(
            "random W_pos, all 1024 positions",
            (full,),
            {"W_pos": big_W_pos},
            GPT2_SMALL,
            expected(big_W_pos, full),
        ),
    ]


class PositionsFromOne(PositionalEmbedding):
    def forward(self, tokens):
        batch, seq_len = tokens.shape
        return einops.repeat(self.W_pos[1 : seq_len + 1], "pos d -> batch pos d", batch=batch)


class PositionsAreTokenIds(PositionalEmbedding):
    def forward(self, tokens):
        return self.W_pos[tokens]


class PositionsNoBatch(PositionalEmbedding):
    def forward(self, tokens):
        return self.W_pos[: tokens.shape[1]]


register(
    Check(
        "embeddings.PositionalEmbedding",
        "learned positional embedding",
        positional_cases,
        call_module(),
        [
            Mistake(
                "positions_from_one",
                "positions counted from 1 instead of 0 (W_pos[1:pos+1])",
                PositionsFromOne,
            ),
            Mistake(
                "token_ids_as_positions",
                "indexing W_pos with the token ids instead of the positions",
                PositionsAreTokenIds,
            ),
            Mistake(
                "no_batch_dim",
                "W_pos[:pos] without repeating it over the batch dimension",
                PositionsNoBatch,
            ),
        ],
    )
)

# ------------------------------------------------------------------ Unembedding


def on_grid(t: Tensor, steps: int) -> Tensor:
    """`t` rounded to multiples of 1 / `steps` (a power of two): exact in float32.

    With x on a grid of 1/16 (or integers) and W_U and b_U on a grid of 1/16, a logit
    is a multiple of 1/256 whose partial sums stay far below 2**24 / 256: no addition
    rounds, in any order. tests/test_check_cases_exact.py holds the bound.
    """
    return torch.round(t * steps) / steps


def unembedding_cases() -> list[Case]:
    ref = get_reference()
    W_U, b_U = ref.bridge.W_U.detach().clone(), ref.bridge.b_U.detach().clone()
    text_logits, text_acts = text_run()
    batch_logits, batch_acts = batch_run()
    # GPT-2's own b_U is zero, so the random case gives it a value to catch a missing bias.
    # The random values are dyadic (see `on_grid`): every product and partial sum of
    # x @ W_U + b_U is then a float32 number, so the logits come out bit for bit the same
    # whatever order a kernel sums in. At input scale 30 the logits reach ~1900 and some
    # cancel to near 0, where rounding in another order (another CPU, MKL build, thread
    # count: the grader's runner) used to miss atol=1e-4 for a correct unembedding.
    rand_W_U = on_grid(randn(D_MODEL, D_VOCAB, seed=31, scale=0.5), 16)
    rand_b_U = on_grid(randn(D_VOCAB, seed=32, scale=2.0), 16)
    cases = [
        Case(
            "real text",
            (text_acts["ln_final.hook_out"],),
            {"W_U": W_U, "b_U": b_U},
            GPT2_SMALL,
            text_logits,
        ),
        Case(
            "batch of 3 texts",
            (batch_acts["ln_final.hook_out"],),
            {"W_U": W_U, "b_U": b_U},
            GPT2_SMALL,
            batch_logits,
        ),
    ]
    for seed, scale, steps in [(33, 1.0, 16), (34, 30.0, 1)]:
        x = on_grid(randn(2, 6, D_MODEL, seed=seed, scale=scale), steps)
        cases.append(
            Case(
                f"random W_U and b_U, input scale {scale:g}",
                (x,),
                {"W_U": rand_W_U, "b_U": rand_b_U},
                GPT2_SMALL,
                F.linear(x, rand_W_U.T, rand_b_U),
            )
        )
    return cases


class UnembeddingNoBias(Unembedding):
    def forward(self, x):
        return x @ self.W_U


class UnembeddingSoftmax(Unembedding):
    def forward(self, x):
        return torch.softmax(x @ self.W_U + self.b_U, dim=-1)


class UnembeddingLogSoftmax(Unembedding):
    def forward(self, x):
        return torch.log_softmax(x @ self.W_U + self.b_U, dim=-1)


register(
    Check(
        "embeddings.Unembedding",
        "unembedding to logits",
        unembedding_cases,
        call_module(),
        [
            Mistake("no_bias", "the unembedding without b_U", UnembeddingNoBias),
            Mistake("softmax", "probabilities (a softmax) instead of logits", UnembeddingSoftmax),
            Mistake(
                "log_softmax",
                "log-probabilities (a log_softmax) instead of logits",
                UnembeddingLogSoftmax,
            ),
        ],
    )
)
