"""Inputs the checks share: real text run through the reference, and seeded random tensors."""

import math
from functools import cache

import torch
from torch import Tensor

from gpt2_course.config import TransformerConfig
from gpt2_course.reference import get_reference

# Original sentences, chosen to mix common words, punctuation, digits and a rare name.
CHECK_TEXT = (
    "Maps of the old harbour show three piers, but only two survived the storm of 1953; "
    "the third is now a line of wooden posts that Mrs. Okonkwo counts at low tide."
)
BATCH_TEXTS = [
    "The kettle clicked off just as the first train rattled past the kitchen window.",
    "Seventeen students signed up for the robotics club, twice as many as last spring.",
    "Nobody expected the quiet librarian to win the regional chess tournament in May.",
]

GPT2_SMALL = TransformerConfig()


@cache
def text_tokens() -> Tensor:
    """CHECK_TEXT as tokens, shape [1, pos]."""
    return get_reference().to_tokens(CHECK_TEXT)


@cache
def batch_tokens() -> Tensor:
    """BATCH_TEXTS cut to a common length, shape [3, pos]."""
    ref = get_reference()
    ids = [ref.to_tokens(t)[0] for t in BATCH_TEXTS]
    length = min(len(i) for i in ids)
    return torch.stack([i[:length] for i in ids])


@cache
def text_run() -> tuple[Tensor, dict[str, Tensor]]:
    """Reference logits and activations on CHECK_TEXT."""
    logits, activations = get_reference().run_with_cache(text_tokens())
    return logits, dict(activations.items())


@cache
def batch_run() -> tuple[Tensor, dict[str, Tensor]]:
    """Reference logits and activations on the batch of texts."""
    logits, activations = get_reference().run_with_cache(batch_tokens())
    return logits, dict(activations.items())


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    """Seeded normal noise: the same tensor on every machine and every run.

    Box-Muller on `torch.rand`, whose stream is the same on every CPU: `torch.randn`
    draws differently with and without AVX2, and a release's stored fingerprints
    need the very same inputs on the learner's machine as on the instructor's.
    """
    n = math.prod(shape)
    # float64 arithmetic, rounded once: the same float32 numbers whatever the CPU's kernels
    u = torch.rand(2, (n + 1) // 2, generator=generator(seed), dtype=torch.float64)
    radius = torch.log1p(-u[0]).mul_(-2).sqrt_()  # 1 - u > 0: no log(0)
    angle = u[1].mul_(2 * math.pi)
    normal = torch.cat([radius * angle.cos(), radius.mul_(angle.sin_())])[:n]
    return normal.reshape(shape).mul_(scale).add_(shift).float()
