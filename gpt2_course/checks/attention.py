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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_course.checks.core import (
    ATOL,
    RTOL,
    Case,
    Observation,
    Outcome,
    build_cached,
    compare,
    load_params,
)
from gpt2_course.checks.reference_data import GPT2_SMALL, batch_run, randn, text_run
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig
from gpt2_course.reference import get_reference

# d_head is not d_model / n_heads: catches a d_head derived from d_model or hard-coded.
ODD_D_HEAD = TransformerConfig(
    d_model=48, n_heads=3, d_head=8, d_mlp=96, d_vocab=100, n_ctx=32, n_layers=2
)
ATTENTION_PARAMS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")
MASKED_BELOW = -1e30  # a reference score this low is a masked one
MASK_INPUT = "apply_causal_mask_input"  # the forward check's probe: the scores it masks


# --------------------------------------------------------------- shared helpers


def nan_aware_compare(actual: Any, expected: Any, atol: float, rtol: float) -> str | None:
    """`compare`, except that NaN where `expected` (a known mistake's output) has NaN matches."""
    if isinstance(actual, Tensor) and isinstance(expected, Tensor):
        nan = torch.isnan(expected) if expected.is_floating_point() else None
        if nan is not None and nan.any() and actual.shape == expected.shape:
            if not torch.equal(torch.isnan(actual), nan):
                return "NaN in different places"
            actual, expected = actual.masked_fill(nan, 0.0), expected.masked_fill(nan, 0.0)
    return compare(actual, expected, atol, rtol)


def same_observation(mine: Outcome, other: Outcome, case: Case) -> bool:
    """The same output and the same probes (NaN matching NaN), as a fingerprint compares them."""
    if mine.probes.keys() != other.probes.keys():
        return False
    pairs = [(mine.output, other.output)] + [(mine.probes[k], other.probes[k]) for k in mine.probes]
    return all(nan_aware_compare(a, b, case.atol, case.rtol) is None for a, b in pairs)


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


def reference_attention(x: Tensor, params: dict[str, Tensor]) -> Observation:
    """Causal attention from torch's own kernels: the output, and the scaled scores
    before masking (what a forward should give `apply_causal_mask`)."""
    W_Q, W_K, W_V, W_O, b_Q, b_K, b_V, b_O = (params[name] for name in ATTENTION_PARAMS)
    q, k, v = (
        torch.einsum("bpm,hmd->bhpd", x, W) + b[:, None, :]
        for W, b in ((W_Q, b_Q), (W_K, b_K), (W_V, b_V))
    )
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scales by 1/sqrt(d_head)
    out = torch.einsum("bhpd,hdm->bpm", z, W_O) + b_O
    return Observation(out, {MASK_INPUT: q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])})


def reference_attention_params(layer: int) -> dict[str, Tensor]:
    """The reference's attention weights of block `layer`, by their TransformerLens names."""
    attn = get_reference().bridge.blocks[layer].attn
    return {name: getattr(attn, name).detach().clone() for name in ATTENTION_PARAMS}


def real_scores(acts: dict[str, Tensor], layer: int) -> Tensor:
    """The reference's scaled scores before masking, from its queries and keys."""
    q, k = acts[f"blocks.{layer}.attn.hook_q"], acts[f"blocks.{layer}.attn.hook_k"]
    return torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])


# --------------------------------------------------------------- apply_causal_mask


def mask_cases() -> list[Case]:
    _, text_acts = text_run()
    _, batch_acts = batch_run()
    cases = [
        # the reference's own masked scores: the hook the learner's mask is compared with
        Case(
            f"{name}, blocks.{layer} scores",
            (real_scores(acts, layer),),
            cfg=GPT2_SMALL,
            expected=acts[f"blocks.{layer}.attn.hook_attn_scores"],
        )
        for name, acts, layer in [("real text", text_acts, 0), ("batch of 3 texts", batch_acts, 6)]
    ]
    for seed, shape, scale in [
        (51, (2, 3, 5, 5), 1.0),
        (52, (1, 12, 17, 17), 30.0),
        (53, (3, 2, 1, 1), 5.0),
    ]:
        scores = randn(*shape, seed=seed, scale=scale)
        future = torch.ones(shape[-2:], dtype=torch.bool).triu(1)
        expected = scores.masked_fill(future, torch.finfo(scores.dtype).min)  # as the reference
        cases.append(
            Case(
                f"random scores {list(shape)}, scale {scale:g}",
                (scores,),
                cfg=GPT2_SMALL,
                expected=expected,
                seeded=True,
            )
        )
    return cases


def compare_mask(
    actual: Any, expected: Tensor, atol: float = ATOL, rtol: float = RTOL
) -> str | None:
    """Visible scores unchanged; masked ones so negative that the softmax gives them 0."""
    if (
        not isinstance(actual, Tensor)
        or actual.shape != expected.shape
        or actual.dtype != expected.dtype
    ):
        return compare(actual, expected, atol, rtol)
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if torch.isnan(actual).any():
        where = torch.isnan(actual).nonzero()[0].tolist()
        return (
            f"your masked scores contain NaN ({int(torch.isnan(actual).sum())} of "
            f"{actual.numel()}), first at [batch, head, query, key] = {where}. A mask must give "
            "-inf or a very negative number, never NaN (0 * inf is NaN)"
        )
    visible = expected > MASKED_BELOW
    error = torch.where(visible, (actual - expected).abs(), torch.zeros_like(actual))
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
    row_max = actual.masked_fill(~visible, -torch.inf).amax(-1, keepdim=True)
    limit = torch.where(torch.isfinite(row_max), row_max - 100.0, torch.full_like(row_max, -1e4))
    not_hidden = ~visible & ~(actual <= limit)
    if not_hidden.any():
        b, h, q, k = not_hidden.nonzero()[0].tolist()
        return (
            f"the score of query {q} for the future key {k} (batch {b}, head {h}) is "
            f"{actual[b, h, q, k].item():.6g}, so the softmax would still give it some weight. "
            f"{int(not_hidden.sum())} of {int((~visible).sum())} future scores are not masked: "
            "set them to -inf (or a very negative number such as -1e9)"
        )
    return None


def judge_mask(outcome: Outcome, case: Case) -> str | None:
    problem = compare_mask(outcome.output, case.expected, case.atol, case.rtol)
    if problem is None and outcome.modified_args:
        # judged here, not by the registry's generic message, so that the diagnosis runs
        return (
            "your apply_causal_mask changed `scores` in place: return a masked copy "
            "(masked_fill or torch.where, not masked_fill_)"
        )
    return problem


def call_mask() -> Callable[[Any, Case], Any]:
    cache: dict = {}

    def call(cls: Any, case: Case) -> Any:
        return build_cached(cache, cls, case.cfg).apply_causal_mask(*case.args)

    return call


register(
    Check(
        "attention.MultiHeadAttention.apply_causal_mask",
        "causal mask on attention scores",
        mask_cases,
        call_mask(),
        judge_case=judge_mask,
        same=same_observation,
    )
)


# --------------------------------------------------------------- forward


def attention_cases() -> list[Case]:
    _, text_acts = text_run()
    _, batch_acts = batch_run()
    cases = []
    for name, acts, layer in [("real text", text_acts, 0), ("batch of 3 texts", batch_acts, 7)]:
        expected = Observation(
            acts[f"blocks.{layer}.hook_attn_out"], {MASK_INPUT: real_scores(acts, layer)}
        )
        cases.append(
            Case(
                f"{name}, blocks.{layer}.attn",
                (acts[f"blocks.{layer}.ln1.hook_out"],),
                reference_attention_params(layer),
                GPT2_SMALL,
                expected,
            )
        )
    for seed, cfg, shape, scale, label in [
        (61, GPT2_SMALL, (2, 11), 1.0, "random weights and biases"),
        (62, GPT2_SMALL, (1, 9), 4.0, "random weights, large scores"),
        (63, ODD_D_HEAD, (3, 7), 1.0, "random weights, d_model=48, 3 heads of d_head=8"),
    ]:
        params = random_attention_params(cfg, seed, scale)
        x = randn(*shape, cfg.d_model, seed=seed + 10)
        cases.append(Case(label, (x,), params, cfg, reference_attention(x, params), seeded=True))
    return cases


def call_attention() -> Callable[[Any, Case], Any]:
    """Run forward, recording the scores it first passes to apply_causal_mask (a method,
    so wrapped on the instance; a submodule would take a forward pre-hook)."""
    cache: dict = {}

    def call(cls: Any, case: Case) -> Observation:
        module = build_cached(cache, cls, case.cfg)
        load_params(module, case.params or {}, getattr(cls, "__name__", "your module"))
        module.eval()
        probes: dict[str, Tensor] = {}
        mask = getattr(module, "apply_causal_mask", None)
        if callable(mask):

            def recording_mask(scores, *args, **kwargs):
                probes.setdefault(MASK_INPUT, scores.detach().clone())
                return mask(scores, *args, **kwargs)

            module.apply_causal_mask = recording_mask
        try:
            return Observation(module(*case.args), probes)
        finally:
            module.__dict__.pop("apply_causal_mask", None)

    return call


NAN_HINT = (
    "\n  NaN after a softmax usually means a row of scores that are all -inf (every key "
    "masked, e.g. the diagonal too), or 0 * inf from multiplying the scores by a mask."
)


def judge_attention(outcome: Outcome, case: Case) -> str | None:
    problem = compare(outcome.output, case.expected.output, case.atol, case.rtol)
    if problem is None:
        return None
    if isinstance(outcome.output, Tensor) and torch.isnan(outcome.output).any():
        problem += NAN_HINT
    return problem + locate_attention_error(
        outcome.probes.get(MASK_INPUT), case.expected.probes[MASK_INPUT], case
    )


def locate_attention_error(scores: Tensor | None, ref: Tensor, case: Case) -> str:
    if scores is None:
        return (
            "\n  (Your forward does not call self.apply_causal_mask, so the check cannot tell "
            "whether the scores or a later step is wrong.)"
        )
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
    if compare(scores[..., visible], ref[..., visible], case.atol, case.rtol) is None:
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


register(
    Check(
        "attention.MultiHeadAttention",
        "causal multi-head self-attention",
        attention_cases,
        call_attention(),
        judge_case=judge_attention,
        same=same_observation,
    )
)
