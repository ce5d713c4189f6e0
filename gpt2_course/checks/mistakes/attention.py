"""Common causal-mask and attention mistakes (notebook 03), written on the reference part.

The reference part runs torch's fused attention, which never calls
`apply_causal_mask`; `attention_with` writes attention out as the stub describes it
(scores, `self.apply_causal_mask`, softmax, values, W_O), and each mistake
changes one step of it.
"""

import math

import torch

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.attention import MultiHeadAttention

IGNORE = float("-inf")


def future(scores, diagonal=1):
    """True where a key lies `diagonal` or more positions after the query."""
    q, k = scores.shape[-2:]
    return torch.ones(q, k, dtype=torch.bool).triu(diagonal)


def attention_with(mask=None, scale=None, biases=True, weigh=None, combine=None):
    """Step-by-step attention with one step changed: `mask(scores)` as apply_causal_mask,
    scores divided by `scale(cfg)`, no b_Q, b_K and b_V, `weigh(self, scores)` for the
    weights, or `combine(self, z)` to turn z [batch, n_heads, pos, d_head] into the output."""

    class WrongAttention(MultiHeadAttention):
        def apply_causal_mask(self, scores):
            return mask(scores) if mask else super().apply_causal_mask(scores)

        def forward(self, x):
            q, k, v = (torch.einsum("bpm,hmd->bhpd", x, W) for W in (self.W_Q, self.W_K, self.W_V))
            if biases:
                q, k, v = q + self.b_Q[:, None], k + self.b_K[:, None], v + self.b_V[:, None]
            divisor = scale(self.cfg) if scale else math.sqrt(self.cfg.d_head)
            scores = q @ k.transpose(-1, -2) / divisor
            z = (weigh(self, scores) if weigh else self.apply_causal_mask(scores).softmax(-1)) @ v
            if combine:
                return combine(self, z)
            return torch.einsum("bhpd,hdm->bpm", z, self.W_O) + self.b_O

    return WrongAttention


def mask_by_multiplying(scores):
    keep = (~future(scores)).float()
    return scores * keep + (1 - keep) * IGNORE  # 0 * -inf is NaN on the visible scores


def per_head(self, z):
    """Each head's output through its slice of W_O: [batch, pos, n_heads, d_model]."""
    return torch.einsum("bhpd,hdm->bphm", z, self.W_O)


def heads_flattened_wrongly(self, z):
    flat_z = z.permute(0, 2, 3, 1).flatten(2)  # (d_head, heads) order ...
    return flat_z @ self.W_O.flatten(0, 1) + self.b_O  # ... against W_O's (heads, d_head) order


WRONG_TRIANGLE = attention_with(mask=lambda s: s.masked_fill(~future(s, 0), IGNORE))
DIAGONAL_MASKED = attention_with(mask=lambda s: s.masked_fill(future(s, 0), IGNORE))
MASK_WITH_ZERO = attention_with(mask=lambda s: s.masked_fill(future(s), 0.0))
NAN_MASK = attention_with(mask=mask_by_multiplying)
NO_MASK = attention_with(mask=lambda s: s.clone())

# fmt: off
MISTAKES = {
    "attention.MultiHeadAttention.apply_causal_mask": [
        Mistake("wrong_triangle", "a mask of the wrong triangle: earlier keys hidden and future keys visible", WRONG_TRIANGLE),
        Mistake("diagonal_masked", "a mask that also hides the diagonal (a query must see its own key: the first token would see nothing)", DIAGONAL_MASKED),
        Mistake("mask_with_zero", "a mask that sets future scores to 0 instead of -inf (exp(0) = 1: the softmax still gives them weight)", MASK_WITH_ZERO),
        Mistake("nan_mask", "a mask multiplied in (scores * mask + (1 - mask) * -inf): 0 * -inf is NaN", NAN_MASK),
        Mistake("no_mask", "the scores returned unmasked", NO_MASK),
        Mistake("in_place", "a mask written into `scores` in place (masked_fill_): the values are right, but the caller's tensor is changed; use masked_fill or torch.where", attention_with(mask=lambda s: s.masked_fill_(future(s), IGNORE))),
    ],
    "attention.MultiHeadAttention": [
        Mistake("no_scaling", "attention without the 1/sqrt(d_head) scaling of the scores", attention_with(scale=lambda cfg: 1.0)),
        Mistake("scaled_by_d_model", "attention with scores divided by sqrt(d_model) instead of sqrt(d_head)", attention_with(scale=lambda cfg: math.sqrt(cfg.d_model))),
        Mistake("scaled_by_d_head", "attention with scores divided by d_head instead of sqrt(d_head)", attention_with(scale=lambda cfg: float(cfg.d_head))),
        Mistake("no_mask", "attention without the causal mask (every query sees the future)", NO_MASK),
        Mistake("wrong_triangle", "attention masking the wrong triangle (earlier keys hidden, future keys visible)", WRONG_TRIANGLE),
        Mistake("mask_with_zero", "attention whose mask sets future scores to 0 instead of -inf", MASK_WITH_ZERO),
        Mistake("diagonal_masked", "attention whose mask also hides the diagonal (the first token sees no key: NaN)", DIAGONAL_MASKED),
        Mistake("nan_mask", "attention whose mask is multiplied in (0 * -inf = NaN on every visible score)", NAN_MASK),
        Mistake("mask_after_softmax", "attention that applies the mask after the softmax (masked weights become -inf, and -inf times the values gives inf and NaN)", attention_with(weigh=lambda self, s: self.apply_causal_mask(s.softmax(-1)))),
        Mistake("zeroed_after_softmax", "attention that zeroes the future weights after the softmax (rows no longer sum to 1: mask the scores before the softmax)", attention_with(weigh=lambda self, s: s.softmax(-1).tril())),
        Mistake("softmax_over_queries", "attention with the softmax over the query axis instead of the key axis (dim=-2)", attention_with(weigh=lambda self, s: self.apply_causal_mask(s).softmax(-2))),
        Mistake("heads_averaged", "attention that averages the heads' outputs instead of summing them", attention_with(combine=lambda self, z: per_head(self, z).mean(2) + self.b_O)),
        Mistake("heads_not_summed", "attention that applies W_O per head but never sums over the heads", attention_with(combine=lambda self, z: per_head(self, z) + self.b_O)),
        Mistake("heads_flattened_wrongly", "attention that flattens z as (d_head, heads) but W_O as (heads, d_head), mixing up which head each row of W_O belongs to", attention_with(combine=heads_flattened_wrongly)),
        Mistake("b_O_per_head", "attention that adds b_O to every head's output before summing (n_heads times b_O)", attention_with(combine=lambda self, z: (per_head(self, z) + self.b_O).sum(2))),
        Mistake("no_qkv_biases", "attention without the biases b_Q, b_K and b_V", attention_with(biases=False)),
    ],
}
# fmt: on
