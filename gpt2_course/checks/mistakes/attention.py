"""Common attention mistakes (notebook 03): one head's standalone, the mask's and
MultiHeadAttention's written on the reference part.

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


def one_head_with(
    mask=None, scale=None, biases=True, scores_of=None, weigh=None, transposed_W_O=False
):
    """One head on one sequence, written out step by step with one step changed: `mask(scores)`
    for the causal mask, scores divided by `scale(d_head)`, no b_Q, b_K, b_V, `scores_of(q, k)`
    for the scores, `weigh(scores)` for the pattern, or z @ W_O.T."""

    def single_head_attention(x, W_Q, W_K, W_V, b_Q, b_K, b_V, W_O):
        q, k, v = x @ W_Q, x @ W_K, x @ W_V
        if biases:
            q, k, v = q + b_Q, k + b_K, v + b_V
        d_head = W_Q.shape[1]
        scores = (scores_of(q, k) if scores_of else q @ k.T) / (
            scale(d_head) if scale else math.sqrt(d_head)
        )
        masked = mask(scores) if mask else scores.masked_fill(future(scores), IGNORE)
        z = (weigh(scores) if weigh else masked.softmax(-1)) @ v
        return z @ (W_O.T if transposed_W_O else W_O)

    return single_head_attention


def attention_1d_scaled_by_d_model(x, W_Q, W_K, W_V, b_Q, b_K, b_V, W_O):
    q, k, v = x @ W_Q + b_Q, x @ W_K + b_K, x @ W_V + b_V
    scores = q @ k.T / math.sqrt(x.shape[-1])
    return scores.masked_fill(future(scores), IGNORE).softmax(-1) @ v @ W_O


WRONG_TRIANGLE = attention_with(mask=lambda s: s.masked_fill(~future(s, 0), IGNORE))
DIAGONAL_MASKED = attention_with(mask=lambda s: s.masked_fill(future(s, 0), IGNORE))
MASK_WITH_ZERO = attention_with(mask=lambda s: s.masked_fill(future(s), 0.0))
NAN_MASK = attention_with(mask=mask_by_multiplying)
NO_MASK = attention_with(mask=lambda s: s.clone())

# fmt: off
MISTAKES = {
    "attention.single_head_attention": [
        Mistake("no_scaling", "one head without the 1/sqrt(d_head) scaling of the scores", one_head_with(scale=lambda d: 1.0)),
        Mistake("scaled_by_d_head", "one head with scores divided by d_head instead of sqrt(d_head)", one_head_with(scale=float)),
        Mistake("scaled_by_d_model", "one head with scores divided by sqrt(d_model) (x.shape[-1]) instead of sqrt(d_head)", attention_1d_scaled_by_d_model),
        Mistake("scaled_by_8", "one head with scores divided by 8, GPT-2 small's sqrt(d_head) written in, instead of sqrt(d_head) of the weights given", one_head_with(scale=lambda d: 8.0)),
        Mistake("softmax_over_queries", "one head with the softmax over the query axis instead of the key axis (dim=0 instead of -1)", one_head_with(weigh=lambda s: s.masked_fill(future(s), IGNORE).softmax(0))),
        Mistake("no_mask", "one head without the causal mask (every query sees the future)", one_head_with(mask=lambda s: s)),
        Mistake("mask_after_softmax", "one head that masks after the softmax (masked weights become -inf, and -inf times the values gives inf and NaN)", one_head_with(weigh=lambda s: s.softmax(-1).masked_fill(future(s), IGNORE))),
        Mistake("zeroed_after_softmax", "one head that zeroes the future weights after the softmax (rows no longer sum to 1: mask the scores before the softmax)", one_head_with(weigh=lambda s: s.softmax(-1).tril())),
        Mistake("diagonal_masked", "one head whose mask also hides the diagonal (off by one: the first query sees no key, NaN)", one_head_with(mask=lambda s: s.masked_fill(future(s, 0), IGNORE))),
        Mistake("next_key_visible", "one head whose mask leaves the next key visible (off by one: triu(diagonal=2) instead of 1)", one_head_with(mask=lambda s: s.masked_fill(future(s, 2), IGNORE))),
        Mistake("mask_with_zero", "one head whose mask sets future scores to 0 instead of -inf", one_head_with(mask=lambda s: s.masked_fill(future(s), 0.0))),
        Mistake("no_biases", "one head without the biases b_Q, b_K and b_V", one_head_with(biases=False)),
        Mistake("scores_transposed", "one head with the scores transposed (k @ q.T: rows are keys, columns queries)", one_head_with(scores_of=lambda q, k: k @ q.T)),
        Mistake("transposed_W_O", "one head with W_O transposed (z @ W_O.T: it runs only where d_head == d_model)", one_head_with(transposed_W_O=True)),
    ],
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
        Mistake("mask_inline", "attention that masks the scores itself instead of calling self.apply_causal_mask (right numbers, but the notebook asks for the call)", attention_with(weigh=lambda self, s: s.masked_fill(future(s), IGNORE).softmax(-1))),
    ],
}
# fmt: on
