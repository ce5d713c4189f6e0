"""Common causal-mask and attention mistakes (notebook 03), written on the reference part.

The reference part runs torch's fused attention, which never calls
`apply_causal_mask`; `StepByStep` writes attention out as the stub describes it
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


class StepByStep(MultiHeadAttention):
    def qkv(self, x, biases=True):
        """Queries, keys and values as [batch, n_heads, pos, d_head]."""
        q, k, v = (torch.einsum("bpm,hmd->bhpd", x, W) for W in (self.W_Q, self.W_K, self.W_V))
        if biases:
            q, k, v = q + self.b_Q[:, None], k + self.b_K[:, None], v + self.b_V[:, None]
        return q, k, v

    def attend(self, x, scale=None, biases=True):
        """z, [batch, n_heads, pos, d_head], with this class's mask."""
        q, k, v = self.qkv(x, biases)
        scale = math.sqrt(self.cfg.d_head) if scale is None else scale
        return self.apply_causal_mask(q @ k.transpose(-1, -2) / scale).softmax(-1) @ v

    def project(self, z):
        return torch.einsum("bhpd,hdm->bpm", z, self.W_O) + self.b_O

    def forward(self, x):
        return self.project(self.attend(x))


# --------------------------------------------------------------- the mask


class MaskWrongTriangle(StepByStep):
    def apply_causal_mask(self, scores):
        return scores.masked_fill(~future(scores, 0), IGNORE)


class MaskDiagonalToo(StepByStep):
    def apply_causal_mask(self, scores):
        return scores.masked_fill(future(scores, 0), IGNORE)


class MaskWithZero(StepByStep):
    def apply_causal_mask(self, scores):
        return scores.masked_fill(future(scores), 0.0)


class MaskByMultiplying(StepByStep):
    def apply_causal_mask(self, scores):
        keep = (~future(scores)).float()
        return scores * keep + (1 - keep) * IGNORE  # 0 * -inf is NaN on the visible scores


class NoMask(StepByStep):
    def apply_causal_mask(self, scores):
        return scores.clone()


class MaskInPlace(StepByStep):
    def apply_causal_mask(self, scores):
        return scores.masked_fill_(future(scores), IGNORE)


# --------------------------------------------------------------- forward


class NoScale(StepByStep):
    def forward(self, x):
        return self.project(self.attend(x, scale=1.0))


class ScaleBySqrtDModel(StepByStep):
    def forward(self, x):
        return self.project(self.attend(x, scale=math.sqrt(self.cfg.d_model)))


class ScaleByDHead(StepByStep):
    def forward(self, x):
        return self.project(self.attend(x, scale=float(self.cfg.d_head)))


class MaskAfterSoftmax(StepByStep):
    def forward(self, x):
        q, k, v = self.qkv(x)
        pattern = (q @ k.transpose(-1, -2) / math.sqrt(self.cfg.d_head)).softmax(-1)
        return self.project(self.apply_causal_mask(pattern) @ v)


class ZeroAfterSoftmax(StepByStep):
    def forward(self, x):
        q, k, v = self.qkv(x)
        pattern = (q @ k.transpose(-1, -2) / math.sqrt(self.cfg.d_head)).softmax(-1)
        return self.project(pattern.tril() @ v)


class SoftmaxOverQueries(StepByStep):
    def forward(self, x):
        q, k, v = self.qkv(x)
        scores = self.apply_causal_mask(q @ k.transpose(-1, -2) / math.sqrt(self.cfg.d_head))
        return self.project(scores.softmax(-2) @ v)


class HeadsAveraged(StepByStep):
    def forward(self, x):
        per_head = torch.einsum("bhpd,hdm->bphm", self.attend(x), self.W_O)
        return per_head.mean(2) + self.b_O


class HeadsNotSummed(StepByStep):
    def forward(self, x):
        return torch.einsum("bhpd,hdm->bphm", self.attend(x), self.W_O) + self.b_O


class HeadsFlattenedWrongly(StepByStep):
    def forward(self, x):
        flat_z = self.attend(x).permute(0, 2, 3, 1).flatten(2)  # (d_head, heads) order ...
        flat_W_O = self.W_O.flatten(0, 1)  # ... against W_O's (heads, d_head) order
        return flat_z @ flat_W_O + self.b_O


class BiasPerHead(StepByStep):
    def forward(self, x):
        per_head = torch.einsum("bhpd,hdm->bphm", self.attend(x), self.W_O) + self.b_O
        return per_head.sum(2)


class NoQKVBiases(StepByStep):
    def forward(self, x):
        return self.project(self.attend(x, biases=False))


# fmt: off
MISTAKES = {
    "attention.MultiHeadAttention.apply_causal_mask": [
        Mistake("wrong_triangle", "a mask of the wrong triangle: earlier keys hidden and future keys visible", MaskWrongTriangle),
        Mistake("diagonal_masked", "a mask that also hides the diagonal (a query must see its own key: the first token would see nothing)", MaskDiagonalToo),
        Mistake("mask_with_zero", "a mask that sets future scores to 0 instead of -inf (exp(0) = 1: the softmax still gives them weight)", MaskWithZero),
        Mistake("nan_mask", "a mask multiplied in (scores * mask + (1 - mask) * -inf): 0 * -inf is NaN", MaskByMultiplying),
        Mistake("no_mask", "the scores returned unmasked", NoMask),
        Mistake("in_place", "a mask written into `scores` in place (masked_fill_): the values are right, but the caller's tensor is changed; use masked_fill or torch.where", MaskInPlace),
    ],
    "attention.MultiHeadAttention": [
        Mistake("no_scaling", "attention without the 1/sqrt(d_head) scaling of the scores", NoScale),
        Mistake("scaled_by_d_model", "attention with scores divided by sqrt(d_model) instead of sqrt(d_head)", ScaleBySqrtDModel),
        Mistake("scaled_by_d_head", "attention with scores divided by d_head instead of sqrt(d_head)", ScaleByDHead),
        Mistake("no_mask", "attention without the causal mask (every query sees the future)", NoMask),
        Mistake("wrong_triangle", "attention masking the wrong triangle (earlier keys hidden, future keys visible)", MaskWrongTriangle),
        Mistake("mask_with_zero", "attention whose mask sets future scores to 0 instead of -inf", MaskWithZero),
        Mistake("diagonal_masked", "attention whose mask also hides the diagonal (the first token sees no key: NaN)", MaskDiagonalToo),
        Mistake("nan_mask", "attention whose mask is multiplied in (0 * -inf = NaN on every visible score)", MaskByMultiplying),
        Mistake("mask_after_softmax", "attention that applies the mask after the softmax (masked weights become -inf, and -inf times the values gives inf and NaN)", MaskAfterSoftmax),
        Mistake("zeroed_after_softmax", "attention that zeroes the future weights after the softmax (rows no longer sum to 1: mask the scores before the softmax)", ZeroAfterSoftmax),
        Mistake("softmax_over_queries", "attention with the softmax over the query axis instead of the key axis (dim=-2)", SoftmaxOverQueries),
        Mistake("heads_averaged", "attention that averages the heads' outputs instead of summing them", HeadsAveraged),
        Mistake("heads_not_summed", "attention that applies W_O per head but never sums over the heads", HeadsNotSummed),
        Mistake("heads_flattened_wrongly", "attention that flattens z as (d_head, heads) but W_O as (heads, d_head), mixing up which head each row of W_O belongs to", HeadsFlattenedWrongly),
        Mistake("b_O_per_head", "attention that adds b_O to every head's output before summing (n_heads times b_O)", BiasPerHead),
        Mistake("no_qkv_biases", "attention without the biases b_Q, b_K and b_V", NoQKVBiases),
    ],
}
# fmt: on
