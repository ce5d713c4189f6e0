"""Checks for one attention head, the causal mask and MultiHeadAttention (notebook 03).

The reference's hooks (TransformerLens 4.3 bridge, verified in tests/test_attention_mlp_block.py):
`attn.hook_q/k/v` are [batch, pos, n_heads, d_head], biases included; `attn.hook_attn_scores`
is q.k / sqrt(d_head) [batch, n_heads, query, key], masked with finfo(float32).min, not -inf;
`hook_attn_out` is z through W_O, summed over heads, plus b_O. A correct mask may use -inf,
finfo.min, -1e9...: the mask check accepts any value whose softmax weight is 0.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_course.checks import core
from gpt2_course.checks.core import Case, Observation, Outcome, compare
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


def random_attention_params(cfg: TransformerConfig, seed: int, scale: float) -> dict[str, Tensor]:
    """Scores O(1) after scaling and non-zero biases: GPT-2's random initialisation (tiny
    scores, zero biases) would hide a missing scale, a missing bias or b_O added per head."""
    h, m, d = cfg.n_heads, cfg.d_model, cfg.d_head
    w = scale / math.sqrt(m) * 1.6  # q and k of std ~1.6 * scale for unit-variance inputs
    params = {f"W_{n}": randn(h, m, d, seed=seed + i, scale=w) for i, n in enumerate("QKV")}
    params["W_O"] = randn(h, d, m, seed=seed + 3, scale=1 / math.sqrt(h * d))
    params |= {f"b_{n}": randn(h, d, seed=seed + 4 + i, scale=0.5) for i, n in enumerate("QKV")}
    params["b_O"] = randn(m, seed=seed + 7, scale=1.0)
    return params


def real_runs(layers: tuple[int, int]) -> list[tuple[str, dict[str, Tensor], int]]:
    """(name, the reference's activations, a layer) for the two stored reference runs."""
    return [
        ("real text", text_run()[1], layers[0]),
        ("batch of 3 texts", batch_run()[1], layers[1]),
    ]


def real_scores(acts: dict[str, Tensor], layer: int) -> Tensor:
    """The reference's scaled scores before masking, from its queries and keys."""
    q, k = acts[f"blocks.{layer}.attn.hook_q"], acts[f"blocks.{layer}.attn.hook_k"]
    return torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])


# --------------------------------------------------------------- single_head_attention

# (name, pos, d_model, d_head, score scale, seed). The square one comes first: a W_O or W_Q
# used transposed runs only where d_head == d_model, and the diagnosis starts at the first
# seeded case that fails. d_head 5 is odd and not a divisor of d_model; pos 1 leaves a
# single visible key, so only the projections and biases matter there.
SINGLE_HEAD_CASES = [
    ("square weights: d_model = d_head = 8, pos 6", 6, 8, 8, 1.0, 81),
    ("pos 7, d_model 16, odd d_head 5", 7, 16, 5, 1.0, 82),
    ("a single position (pos 1), d_head 3", 1, 12, 3, 1.0, 83),
    ("pos 12, d_model 32, d_head 8, large scores", 12, 32, 8, 3.0, 84),
]
HEAD = 3  # the GPT-2 head of the real-text case


def single_head_args(pos: int, d_model: int, d_head: int, scale: float, seed: int) -> tuple:
    """x [pos, d_model], W_Q, W_K, W_V, b_Q, b_K, b_V, W_O: scores of about `scale`, biases
    that matter (GPT-2's random initialisation has none)."""
    w = 1.3 * math.sqrt(scale / d_model)
    weights = [randn(d_model, d_head, seed=seed + i, scale=w) for i in (1, 2, 3)]
    biases = [randn(d_head, seed=seed + i, scale=0.5) for i in (4, 5, 6)]
    W_O = randn(d_head, d_model, seed=seed + 7, scale=1 / math.sqrt(d_head))
    return (randn(pos, d_model, seed=seed), *weights, *biases, W_O)


def single_head_cases() -> list[Case]:
    cases = []
    for name, pos, d_model, d_head, scale, seed in SINGLE_HEAD_CASES:
        args = single_head_args(pos, d_model, d_head, scale, seed)
        x, W_Q, W_K, W_V, b_Q, b_K, b_V, W_O = args
        q, k, v = x @ W_Q + b_Q, x @ W_K + b_K, x @ W_V + b_V
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True) @ W_O  # torch's kernel
        cases.append(Case(name, args, expected=expected, seeded=True))
    # one of GPT-2's heads on real text: what the reference's hook_z holds for it, through W_O
    _, acts = text_run()
    attn = get_reference().bridge.blocks[0].attn
    weights = [getattr(attn, n)[HEAD].detach().clone() for n in ("W_Q", "W_K", "W_V")]
    biases = [getattr(attn, n)[HEAD].detach().clone() for n in ("b_Q", "b_K", "b_V")]
    W_O = attn.W_O[HEAD].detach().clone()
    x, z = acts["blocks.0.ln1.hook_out"][0], acts["blocks.0.attn.hook_z"][0, :, HEAD]
    name = f"real text, blocks.0.attn head {HEAD} (d_model 768, d_head 64)"
    cases.append(Case(name, (x, *weights, *biases, W_O), expected=z @ W_O))
    return cases


NAN_HINT = (
    "\n  NaN after a softmax usually means a row of scores that are all -inf (every key "
    "masked, e.g. the diagonal too), or 0 * inf from multiplying the scores by a mask."
)


def judge_single_head(outcome: Outcome, case: Case) -> str | None:
    problem = compare(outcome.output, case.expected, case.atol, case.rtol)
    if problem and isinstance(outcome.output, Tensor) and torch.isnan(outcome.output).any():
        problem += NAN_HINT
    return problem


register(
    Check(
        "attention.single_head_attention",
        "one causal attention head on one sequence",
        single_head_cases,
        core.call_function,
        judge_case=judge_single_head,
        backward=True,
    )
)


# --------------------------------------------------------------- apply_causal_mask


def mask_cases() -> list[Case]:
    cases = []
    for name, acts, layer in real_runs((0, 6)):
        scores, expected = real_scores(acts, layer), acts[f"blocks.{layer}.attn.hook_attn_scores"]
        cases.append(Case(f"{name}, blocks.{layer} scores", (scores,), None, GPT2_SMALL, expected))
    for seed, shape, scale in [
        (51, (2, 3, 5, 5), 1.0),
        (52, (1, 12, 17, 17), 30.0),
        (53, (3, 2, 1, 1), 5.0),
    ]:
        scores = randn(*shape, seed=seed, scale=scale)
        future = torch.ones(shape[-2:], dtype=torch.bool).triu(1)
        expected = scores.masked_fill(future, torch.finfo(scores.dtype).min)  # as the reference
        name = f"random scores {list(shape)}, scale {scale:g}"
        cases.append(Case(name, (scores,), cfg=GPT2_SMALL, expected=expected, seeded=True))
    return cases


def compare_mask(
    actual: Any, expected: Tensor, atol: float = core.ATOL, rtol: float = core.RTOL
) -> str | None:
    """Visible scores unchanged; masked ones so negative that the softmax gives them 0."""
    form = (actual.shape, actual.dtype) if isinstance(actual, Tensor) else None
    if form != (expected.shape, expected.dtype):
        return compare(actual, expected, atol, rtol)
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if (nan := torch.isnan(actual)).any():
        return (
            f"your masked scores contain NaN ({int(nan.sum())} of {actual.numel()}), first at "
            f"[batch, head, query, key] = {nan.nonzero()[0].tolist()}. A mask must give -inf or "
            "a very negative number, never NaN (0 * inf is NaN)"
        )
    visible = expected > MASKED_BELOW
    changed = visible & ~((actual - expected).abs() <= atol + rtol * expected.abs())
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
    if problem is None and outcome.modified_args:  # here, not generic, so the diagnosis runs
        return (
            "your apply_causal_mask changed `scores` in place: return a masked copy "
            "(masked_fill or torch.where, not masked_fill_)"
        )
    return problem


register(
    Check(
        "attention.MultiHeadAttention.apply_causal_mask",
        "causal mask on attention scores",
        mask_cases,
        core.call_module("apply_causal_mask"),
        judge_case=judge_mask,
    )
)


# --------------------------------------------------------------- forward


def attention_cases() -> list[Case]:
    cases = []
    for name, acts, layer in real_runs((0, 7)):
        attn = get_reference().bridge.blocks[layer].attn
        params = {n: getattr(attn, n).detach().clone() for n in ATTENTION_PARAMS}
        x, out = acts[f"blocks.{layer}.ln1.hook_out"], acts[f"blocks.{layer}.hook_attn_out"]
        expected = Observation(out, {MASK_INPUT: real_scores(acts, layer)})
        cases.append(Case(f"{name}, blocks.{layer}.attn", (x,), params, GPT2_SMALL, expected))
    for seed, cfg, shape, scale, label in [
        (61, GPT2_SMALL, (2, 11), 1.0, "random weights and biases"),
        (62, GPT2_SMALL, (1, 9), 4.0, "random weights, large scores"),
        (63, ODD_D_HEAD, (3, 7), 1.0, "random weights, d_model=48, 3 heads of d_head=8"),
    ]:
        p = random_attention_params(cfg, seed, scale)
        x = randn(*shape, cfg.d_model, seed=seed + 10)
        # expected from torch's own kernels, with the scaled scores before masking as the probe
        q, k, v = (
            torch.einsum("bpm,hmd->bhpd", x, p[f"W_{n}"]) + p[f"b_{n}"][:, None] for n in "QKV"
        )
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scales by 1/sqrt(d_head)
        out = torch.einsum("bhpd,hdm->bpm", z, p["W_O"]) + p["b_O"]
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.d_head)
        cases.append(Case(label, (x,), p, cfg, Observation(out, {MASK_INPUT: scores}), seeded=True))
    return cases


_built: dict = {}


def call_attention(cls: Any, case: Case) -> Observation:
    """Run forward, recording the scores it first passes to apply_causal_mask (a method:
    wrapped on the instance)."""
    module = core.build_cached(_built, cls, case.cfg)
    core.load_params(module, case.params or {}, getattr(cls, "__name__", "your module"))
    probes: dict[str, Tensor] = {}
    mask = getattr(module.eval(), "apply_causal_mask", None)
    if callable(mask):

        def recording_mask(scores, *args, **kwargs):
            probes.setdefault(MASK_INPUT, scores.detach().clone())
            return mask(scores, *args, **kwargs)

        module.apply_causal_mask = recording_mask
    try:
        return Observation(module(*case.args), probes, core.named_parameters(module, case))
    finally:
        module.__dict__.pop("apply_causal_mask", None)


NO_MASK_CALL = (
    "your forward does not call self.apply_causal_mask: the notebook asks forward to mask the "
    "scaled scores by calling self.apply_causal_mask(scores), not with a mask of its own (the "
    "attention pictures read the pattern through that method). Call self.apply_causal_mask on "
    "the scores, then take the softmax of what it returns"
)


def judge_attention(outcome: Outcome, case: Case) -> str | None:
    problem = compare(outcome.output, case.expected.output, case.atol, case.rtol)
    if problem is None:
        # right numbers, but not the way the notebook requires
        return None if MASK_INPUT in outcome.probes else NO_MASK_CALL
    if isinstance(outcome.output, Tensor) and torch.isnan(outcome.output).any():
        problem += NAN_HINT
    scores, ref = outcome.probes.get(MASK_INPUT), case.expected.probes[MASK_INPUT]
    if scores is None:
        return problem + (
            "\n  (Your forward does not call self.apply_causal_mask, so the check cannot tell "
            "whether the scores or a later step is wrong.)"
        )
    visible = torch.ones(ref.shape[-2:], dtype=torch.bool).tril()
    if scores.shape != ref.shape:
        where = (
            f"the scores you pass to apply_causal_mask have shape {list(scores.shape)}; "
            f"expected [batch, n_heads, query_pos, key_pos] = {list(ref.shape)}."
        )
    elif scores.min() >= 0 and (scores.sum(-1) - 1).abs().max() < 1e-4:  # NaN, inf: False
        where = (
            "what you pass to apply_causal_mask is already a softmax (every row sums to 1): "
            "mask the scores before the softmax, so that the visible weights sum to 1."
        )
    elif compare(scores[..., visible], ref[..., visible], case.atol, case.rtol) is None:
        where = (
            "the scores you pass to apply_causal_mask match the reference's (hook_attn_scores), "
            "so queries, keys and the 1/sqrt(d_head) scale are right; the difference comes "
            "later: the mask, the softmax, the weighted sum of values, or W_O and b_O."
        )
    else:
        where = (
            "the scores you pass to apply_causal_mask already differ from the reference's "
            "(hook_attn_scores = q.k / sqrt(d_head)): look at the queries, the keys, their "
            "biases and the scale."
        )
    return f"{problem}\n  Where: {where}"


register(
    Check(
        "attention.MultiHeadAttention",
        "causal multi-head self-attention",
        attention_cases,
        call_attention,
        judge_case=judge_attention,
        backward=True,
    )
)
