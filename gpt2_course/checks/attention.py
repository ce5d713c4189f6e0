"""Checks for the causal mask and MultiHeadAttention (notebook 03).

What the reference's hooks hold (TransformerLens 4.3 bridge around Hugging Face
GPT-2, verified in tests/test_attention_mlp_block.py):

* `attn.hook_q` / `hook_k` / `hook_v`: [batch, pos, n_heads, d_head], biases included;
* `attn.hook_attn_scores`: q.k / sqrt(d_head), already masked, with the future set
  to torch.finfo(float32).min (not -inf), shape [batch, n_heads, query, key];
* `attn.hook_pattern`: the softmax of those scores; `attn.hook_z`: pattern @ v;
* `hook_attn_out` (= `attn.hook_out`): z through W_O, summed over heads, plus b_O.

A correct mask may use -inf, finfo.min, -1e9, ...: the mask check therefore
accepts any value whose softmax weight is 0, and compares the rest exactly.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_course.checks.core import (
    ATOL,
    RTOL,
    Case,
    Mistake,
    build_cached,
    compare,
    load_params,
)
from gpt2_course.checks.reference_data import GPT2_SMALL, batch_run, randn, text_run
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig
from gpt2_course.reference import get_reference
from solutions.attention import MultiHeadAttention

# A small model whose d_head is not d_model / n_heads: catches hard-coded sizes.
SMALL = TransformerConfig(
    d_model=48, n_heads=3, d_head=8, d_mlp=96, d_vocab=100, n_ctx=32, n_layers=2
)
ATTENTION_PARAMS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")
MASKED_BELOW = -1e30  # a reference (or known-mistake) score this low is a masked one
EMPTY = torch.empty(0)  # "your forward never called apply_causal_mask"


# --------------------------------------------------------------- shared helpers


def nan_aware_compare(actual: Any, expected: Any, atol: float, rtol: float) -> str | None:
    """`compare`, except that NaN where `expected` (a known mistake's output) has NaN matches.

    The reference never holds NaN, so this only matters when a NaN-producing
    mistake is matched against the learner's output during diagnosis.
    """
    if (
        isinstance(actual, Tensor)
        and isinstance(expected, Tensor)
        and actual.shape == expected.shape
    ):
        if actual.is_floating_point() and expected.is_floating_point():
            nan_expected = torch.isnan(expected)
            if nan_expected.any():
                if not torch.equal(torch.isnan(actual), nan_expected):
                    return "NaN in different places"
                actual = actual.masked_fill(nan_expected, 0.0)
                expected = expected.masked_fill(nan_expected, 0.0)
    return compare(actual, expected, atol, rtol)


NAN_HINT = (
    "\n  NaN after a softmax usually means a row of scores that are all -inf (every key "
    "masked, e.g. the diagonal too), or 0 * inf from multiplying the scores by a mask."
)


# --------------------------------------------------------------- independent reference


def split_params(params: dict[str, Tensor]) -> tuple[Tensor, ...]:
    return tuple(params[name] for name in ATTENTION_PARAMS)


def reference_attention(x: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Causal attention from torch's own kernels (not from solutions/): (output, scaled scores)."""
    W_Q, W_K, W_V, W_O, b_Q, b_K, b_V, b_O = split_params(params)
    q = torch.einsum("bpm,hmd->bhpd", x, W_Q) + b_Q[:, None, :]
    k = torch.einsum("bpm,hmd->bhpd", x, W_K) + b_K[:, None, :]
    v = torch.einsum("bpm,hmd->bhpd", x, W_V) + b_V[:, None, :]
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scales by 1/sqrt(d_head)
    out = torch.einsum("bhpd,hdm->bpm", z, W_O) + b_O
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return out, scores


def reference_attention_params(layer: int) -> dict[str, Tensor]:
    """The reference's attention weights of block `layer`, by their TransformerLens names."""
    attn = get_reference().bridge.blocks[layer].attn
    return {name: getattr(attn, name).detach().clone() for name in ATTENTION_PARAMS}


def random_attention_params(cfg: TransformerConfig, seed: int, scale: float) -> dict[str, Tensor]:
    """Weights large enough that scores are O(1) after scaling, and non-zero biases.

    GPT-2's random initialisation gives tiny scores and zero biases, which would
    hide a missing scale, a missing bias or b_O added once per head.
    """
    h, m, d = cfg.n_heads, cfg.d_model, cfg.d_head
    w = scale / math.sqrt(m) * 1.6  # q and k of std ~1.6 * scale for unit-variance inputs
    return {
        "W_Q": randn(h, m, d, seed=seed, scale=w),
        "W_K": randn(h, m, d, seed=seed + 1, scale=w),
        "W_V": randn(h, m, d, seed=seed + 2, scale=w),
        "W_O": randn(h, d, m, seed=seed + 3, scale=1 / math.sqrt(h * d)),
        "b_Q": randn(h, d, seed=seed + 4, scale=0.5),
        "b_K": randn(h, d, seed=seed + 5, scale=0.5),
        "b_V": randn(h, d, seed=seed + 6, scale=0.5),
        "b_O": randn(m, seed=seed + 7, scale=1.0),
    }


# --------------------------------------------------------------- apply_causal_mask


def reference_mask(scores: Tensor) -> Tensor:
    """What the reference does: future keys set to float32's most negative value."""
    q, k = scores.shape[-2:]
    visible = torch.ones(q, k, dtype=torch.bool).tril()
    return scores.masked_fill(~visible, torch.finfo(scores.dtype).min)


def real_scores(acts: dict[str, Tensor], layer: int) -> Tensor:
    """The reference's scaled scores before masking, from its queries and keys."""
    q, k = acts[f"blocks.{layer}.attn.hook_q"], acts[f"blocks.{layer}.attn.hook_k"]
    return torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])


def mask_cases() -> list[Case]:
    _, text_acts = text_run()
    _, batch_acts = batch_run()
    cases = []
    for name, acts, layer in [("real text", text_acts, 0), ("batch of 3 texts", batch_acts, 6)]:
        scores = real_scores(acts, layer)
        # the reference's own masked scores: the hook the learner's mask is compared with
        expected = acts[f"blocks.{layer}.attn.hook_attn_scores"]
        cases.append(Case(f"{name}, blocks.{layer} scores", (scores,), None, GPT2_SMALL, expected))
    for seed, shape, scale in [
        (51, (2, 3, 5, 5), 1.0),
        (52, (1, 12, 17, 17), 30.0),
        (53, (3, 2, 1, 1), 5.0),
    ]:
        scores = randn(*shape, seed=seed, scale=scale)
        cases.append(
            Case(
                f"random scores {list(shape)}, scale {scale:g}",
                (scores,),
                None,
                GPT2_SMALL,
                reference_mask(scores),
            )
        )
    return cases


def compare_mask(actual: Any, expected: Any, atol: float = ATOL, rtol: float = RTOL) -> str | None:
    """Visible scores unchanged; masked ones so negative that the softmax gives them 0."""
    if not isinstance(actual, Tensor) or not isinstance(expected, Tensor):
        return compare(actual, expected, atol, rtol)
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return compare(actual, expected, atol, rtol)
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if torch.isnan(expected).any():  # diagnosis against a NaN-producing mistake
        return nan_aware_compare(actual, expected, atol, rtol)
    if torch.isnan(actual).any():
        where = torch.isnan(actual).nonzero()[0].tolist()
        return (
            f"your masked scores contain NaN ({int(torch.isnan(actual).sum())} of "
            f"{actual.numel()}), "
            f"first at [batch, head, query, key] = {where}. A mask must give -inf or a very "
            "negative number, never NaN (0 * inf is NaN)"
        )
    masked = expected <= MASKED_BELOW
    visible = ~masked
    error = torch.where(visible, (actual - expected).abs(), torch.zeros_like(actual))
    error = torch.nan_to_num(error, nan=float("inf"), posinf=float("inf"))
    allowed = atol + rtol * torch.where(visible, expected.abs(), torch.zeros_like(expected))
    changed = visible & ~(error <= allowed)
    if changed.any():
        b, h, q, k = changed.nonzero()[0].tolist()
        return (
            f"the score of query {q} for key {k} (batch {b}, head {h}) should be left unchanged at "
            f"{expected[b, h, q, k].item():.6g} but is {actual[b, h, q, k].item():.6g}: key {k} <= "
            f"query {q}, so the query may see it. {int(changed.sum())} of {int(visible.sum())} "
            "visible scores differ"
        )
    # Masked scores must get softmax weight 0: -inf, or far below the row's visible scores.
    row_max = torch.where(visible, actual, torch.full_like(actual, -torch.inf)).amax(
        -1, keepdim=True
    )
    limit = torch.where(torch.isfinite(row_max), row_max - 100.0, torch.full_like(row_max, -1e4))
    not_hidden = masked & ~(actual <= limit)
    if not_hidden.any():
        b, h, q, k = not_hidden.nonzero()[0].tolist()
        return (
            f"the score of query {q} for the future key {k} (batch {b}, head {h}) is "
            f"{actual[b, h, q, k].item():.6g}, so the softmax would still give it some weight. "
            f"{int(not_hidden.sum())} of {int(masked.sum())} future scores are not masked: "
            "set them to -inf (or a very negative number such as -1e9)"
        )
    return None


def call_mask() -> Callable[[Any, Case], Any]:
    cache: dict = {}

    def call(cls: Any, case: Case) -> Any:
        module = build_cached(cache, cls, case.cfg)
        return module.apply_causal_mask(*case.args)

    return call


IGNORE = float("-inf")


class MaskWrongTriangle(MultiHeadAttention):
    def apply_causal_mask(self, scores):
        q, k = scores.shape[-2:]
        past = torch.ones(q, k, dtype=torch.bool).tril(-1)
        return scores.masked_fill(past, IGNORE)


class MaskDiagonalToo(MultiHeadAttention):
    def apply_causal_mask(self, scores):
        q, k = scores.shape[-2:]
        return scores.masked_fill(torch.ones(q, k, dtype=torch.bool).triu(), IGNORE)


class MaskWithZero(MultiHeadAttention):
    def apply_causal_mask(self, scores):
        q, k = scores.shape[-2:]
        return scores.masked_fill(torch.ones(q, k, dtype=torch.bool).triu(1), 0.0)


class MaskByMultiplying(MultiHeadAttention):
    def apply_causal_mask(self, scores):
        q, k = scores.shape[-2:]
        keep = torch.ones(q, k).tril()
        return scores * keep + (1 - keep) * IGNORE  # 0 * -inf is NaN on the visible scores


class NoMask(MultiHeadAttention):
    def apply_causal_mask(self, scores):
        return scores.clone()


class MaskInPlace(MultiHeadAttention):
    def apply_causal_mask(self, scores):
        q, k = scores.shape[-2:]
        return scores.masked_fill_(torch.ones(q, k, dtype=torch.bool).triu(1), IGNORE)


register(
    Check(
        "attention.MultiHeadAttention.apply_causal_mask",
        "causal mask on attention scores",
        mask_cases,
        call_mask(),
        [
            Mistake(
                "wrong_triangle",
                "a mask of the wrong triangle: earlier keys hidden and future keys visible",
                MaskWrongTriangle,
            ),
            Mistake(
                "diagonal_masked",
                "a mask that also hides the diagonal (a query must see its own key: the first "
                "token would see nothing)",
                MaskDiagonalToo,
            ),
            Mistake(
                "mask_with_zero",
                "a mask that sets future scores to 0 instead of -inf (exp(0) = 1: the softmax "
                "still gives them weight)",
                MaskWithZero,
            ),
            Mistake(
                "nan_mask",
                "a mask multiplied in (scores * mask + (1 - mask) * -inf): 0 * -inf is NaN",
                MaskByMultiplying,
            ),
            Mistake("no_mask", "the scores returned unmasked", NoMask),
            Mistake(
                "in_place",
                "a mask written into `scores` in place (masked_fill_): the values are right, but "
                "the caller's tensor is changed; use masked_fill or torch.where",
                MaskInPlace,
            ),
        ],
        compare=compare_mask,
    )
)


# --------------------------------------------------------------- forward


@dataclass
class AttentionExpected:
    """The reference's output, and its scaled scores before masking (to locate an error)."""

    output: Tensor
    scores: Tensor


def attention_cases() -> list[Case]:
    _, text_acts = text_run()
    _, batch_acts = batch_run()
    cases = []
    for name, acts, layer in [("real text", text_acts, 0), ("batch of 3 texts", batch_acts, 7)]:
        x = acts[f"blocks.{layer}.ln1.hook_out"]
        expected = AttentionExpected(
            acts[f"blocks.{layer}.hook_attn_out"], real_scores(acts, layer)
        )
        params = reference_attention_params(layer)
        cases.append(Case(f"{name}, blocks.{layer}.attn", (x,), params, GPT2_SMALL, expected))
    for seed, cfg, shape, scale, label in [
        (61, GPT2_SMALL, (2, 11), 1.0, "random weights and biases"),
        (62, GPT2_SMALL, (1, 9), 4.0, "random weights, large scores"),
        (63, SMALL, (3, 7), 1.0, "random weights, d_model=48, 3 heads of d_head=8"),
    ]:
        params = random_attention_params(cfg, seed, scale)
        x = randn(*shape, cfg.d_model, seed=seed + 10)
        cases.append(
            Case(label, (x,), params, cfg, AttentionExpected(*reference_attention(x, params)))
        )
    return cases


def call_attention() -> Callable[[Any, Case], Any]:
    """Run forward, recording what it passes to apply_causal_mask: (output, scores or EMPTY)."""
    cache: dict = {}

    def call(cls: Any, case: Case) -> Any:
        module = build_cached(cache, cls, case.cfg)
        load_params(module, case.params or {}, getattr(cls, "__name__", "your module"))
        module.eval()
        seen: list[Tensor] = []
        mask = getattr(module, "apply_causal_mask", None)
        if callable(mask):

            def recording_mask(scores, *args, **kwargs):
                seen.append(scores.detach().clone())
                return mask(scores, *args, **kwargs)

            module.apply_causal_mask = recording_mask
        try:
            output = module.forward(*case.args)
        finally:
            module.__dict__.pop("apply_causal_mask", None)
        return output, (seen[0] if seen else EMPTY)

    return call


def compare_attention(
    actual: Any, expected: Any, atol: float = ATOL, rtol: float = RTOL
) -> str | None:
    out = actual[0] if isinstance(actual, tuple) else actual
    if not isinstance(expected, AttentionExpected):  # diagnosis: a known mistake's output
        return nan_aware_compare(
            out, expected[0] if isinstance(expected, tuple) else expected, atol, rtol
        )
    problem = compare(out, expected.output, atol, rtol)
    if problem is None:
        return None
    if isinstance(out, Tensor) and torch.isnan(out).any():
        problem += NAN_HINT
    return problem + locate_attention_error(actual, expected, atol, rtol)


def locate_attention_error(
    actual: Any, expected: AttentionExpected, atol: float, rtol: float
) -> str:
    scores = actual[1] if isinstance(actual, tuple) and len(actual) > 1 else EMPTY
    if scores.numel() == 0:
        return (
            "\n  (Your forward does not call self.apply_causal_mask, so the check cannot tell "
            "whether the scores or a later step is wrong.)"
        )
    ref = expected.scores
    if scores.shape != ref.shape:
        return (
            f"\n  Where: the scores you pass to apply_causal_mask have shape {list(scores.shape)}; "
            f"expected [batch, n_heads, query_pos, key_pos] = {list(ref.shape)}."
        )
    if (
        torch.isfinite(scores).all()
        and scores.min() >= 0
        and (scores.sum(-1) - 1).abs().max() < 1e-4
    ):
        return (
            "\n  Where: what you pass to apply_causal_mask is already a softmax (every row sums to "
            "1): mask the scores before the softmax, so that the visible weights sum to 1."
        )
    visible = torch.ones(ref.shape[-2:], dtype=torch.bool).tril()
    same = compare(scores[..., visible], ref[..., visible], atol, rtol) is None
    if same:
        return (
            "\n  Where: the scores you pass to apply_causal_mask match the reference's "
            "(hook_attn_scores), so queries, keys and the 1/sqrt(d_head) scale are right; the "
            "difference comes later: the mask, the softmax, the weighted sum of values, or W_O "
            "and b_O."
        )
    return (
        "\n  Where: the scores you pass to apply_causal_mask already differ from the reference's "
        "(hook_attn_scores = q.k / sqrt(d_head)): look at the queries, the keys, their biases "
        "and the scale."
    )


def _qkv(self: MultiHeadAttention, x: Tensor, biases: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values as [batch, n_heads, pos, d_head]."""
    q = torch.einsum("bpm,hmd->bhpd", x, self.W_Q)
    k = torch.einsum("bpm,hmd->bhpd", x, self.W_K)
    v = torch.einsum("bpm,hmd->bhpd", x, self.W_V)
    if biases:
        q, k, v = q + self.b_Q[:, None], k + self.b_K[:, None], v + self.b_V[:, None]
    return q, k, v


def _attend(
    self: MultiHeadAttention, x: Tensor, scale: float | None = None, biases: bool = True
) -> Tensor:
    """z from the given scale and this module's apply_causal_mask: [batch, n_heads, pos, d_head]."""
    q, k, v = _qkv(self, x, biases)
    scale = math.sqrt(self.cfg.d_head) if scale is None else scale
    pattern = self.apply_causal_mask(q @ k.transpose(-1, -2) / scale).softmax(-1)
    return pattern @ v


def _project(self: MultiHeadAttention, z: Tensor) -> Tensor:
    return torch.einsum("bhpd,hdm->bpm", z, self.W_O) + self.b_O


class NoScale(MultiHeadAttention):
    def forward(self, x):
        return _project(self, _attend(self, x, scale=1.0))


class ScaleBySqrtDModel(MultiHeadAttention):
    def forward(self, x):
        return _project(self, _attend(self, x, scale=math.sqrt(self.cfg.d_model)))


class ScaleByDHead(MultiHeadAttention):
    def forward(self, x):
        return _project(self, _attend(self, x, scale=float(self.cfg.d_head)))


class ForwardNoMask(NoMask):
    pass


class ForwardWrongTriangle(MaskWrongTriangle):
    pass


class ForwardMaskWithZero(MaskWithZero):
    pass


class ForwardDiagonalMasked(MaskDiagonalToo):
    pass


class ForwardNanMask(MaskByMultiplying):
    pass


class MaskAfterSoftmax(MultiHeadAttention):
    def forward(self, x):
        q, k, v = _qkv(self, x)
        pattern = self.apply_causal_mask(
            (q @ k.transpose(-1, -2) / math.sqrt(self.cfg.d_head)).softmax(-1)
        )
        return _project(self, pattern @ v)


class ZeroAfterSoftmax(MultiHeadAttention):
    def forward(self, x):
        q, k, v = _qkv(self, x)
        pattern = (q @ k.transpose(-1, -2) / math.sqrt(self.cfg.d_head)).softmax(-1)
        return _project(self, pattern.tril() @ v)


class SoftmaxOverQueries(MultiHeadAttention):
    def forward(self, x):
        q, k, v = _qkv(self, x)
        scores = self.apply_causal_mask(q @ k.transpose(-1, -2) / math.sqrt(self.cfg.d_head))
        return _project(self, scores.softmax(-2) @ v)


class HeadsAveraged(MultiHeadAttention):
    def forward(self, x):
        per_head = torch.einsum("bhpd,hdm->bphm", _attend(self, x), self.W_O)
        return per_head.mean(2) + self.b_O


class HeadsNotSummed(MultiHeadAttention):
    def forward(self, x):
        return torch.einsum("bhpd,hdm->bphm", _attend(self, x), self.W_O) + self.b_O


class HeadsFlattenedWrongly(MultiHeadAttention):
    def forward(self, x):
        z = _attend(self, x)  # [b, h, p, d]
        flat_z = z.permute(0, 2, 3, 1).flatten(2)  # (d_head, heads) order ...
        flat_W_O = self.W_O.flatten(0, 1)  # ... against W_O's (heads, d_head) order
        return flat_z @ flat_W_O + self.b_O


class BiasPerHead(MultiHeadAttention):
    def forward(self, x):
        per_head = torch.einsum("bhpd,hdm->bphm", _attend(self, x), self.W_O) + self.b_O
        return per_head.sum(2)


class NoQKVBiases(MultiHeadAttention):
    def forward(self, x):
        return _project(self, _attend(self, x, biases=False))


register(
    Check(
        "attention.MultiHeadAttention",
        "causal multi-head self-attention",
        attention_cases,
        call_attention(),
        [
            Mistake(
                "no_scaling", "attention without the 1/sqrt(d_head) scaling of the scores", NoScale
            ),
            Mistake(
                "scaled_by_d_model",
                "attention with scores divided by sqrt(d_model) instead of sqrt(d_head)",
                ScaleBySqrtDModel,
            ),
            Mistake(
                "scaled_by_d_head",
                "attention with scores divided by d_head instead of sqrt(d_head)",
                ScaleByDHead,
            ),
            Mistake(
                "no_mask",
                "attention without the causal mask (every query sees the future)",
                ForwardNoMask,
            ),
            Mistake(
                "wrong_triangle",
                "attention masking the wrong triangle (earlier keys hidden, future keys visible)",
                ForwardWrongTriangle,
            ),
            Mistake(
                "mask_with_zero",
                "attention whose mask sets future scores to 0 instead of -inf",
                ForwardMaskWithZero,
            ),
            Mistake(
                "diagonal_masked",
                "attention whose mask also hides the diagonal (the first token sees no key: NaN)",
                ForwardDiagonalMasked,
            ),
            Mistake(
                "nan_mask",
                "attention whose mask is multiplied in (0 * -inf = NaN on every visible score)",
                ForwardNanMask,
            ),
            Mistake(
                "mask_after_softmax",
                "attention that applies the mask after the softmax (masked weights become -inf, "
                "and -inf times the values gives inf and NaN)",
                MaskAfterSoftmax,
            ),
            Mistake(
                "zeroed_after_softmax",
                "attention that zeroes the future weights after the softmax (rows no longer sum "
                "to 1: mask the scores before the softmax)",
                ZeroAfterSoftmax,
            ),
            Mistake(
                "softmax_over_queries",
                "attention with the softmax over the query axis instead of the key axis (dim=-2)",
                SoftmaxOverQueries,
            ),
            Mistake(
                "heads_averaged",
                "attention that averages the heads' outputs instead of summing them",
                HeadsAveraged,
            ),
            Mistake(
                "heads_not_summed",
                "attention that applies W_O per head but never sums over the heads",
                HeadsNotSummed,
            ),
            Mistake(
                "heads_flattened_wrongly",
                "attention that flattens z as (d_head, heads) but W_O as (heads, d_head), mixing "
                "up which head each row of W_O belongs to",
                HeadsFlattenedWrongly,
            ),
            Mistake(
                "b_O_per_head",
                "attention that adds b_O to every head's output before summing (n_heads times b_O)",
                BiasPerHead,
            ),
            Mistake(
                "no_qkv_biases",
                "attention without the biases b_Q, b_K and b_V",
                NoQKVBiases,
            ),
        ],
        compare=compare_attention,
    )
)
