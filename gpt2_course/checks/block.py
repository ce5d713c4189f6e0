"""Checks for TransformerBlock (notebook 04): only its wiring, as the learner's block is built
with the reference parts' LayerNorm, attention and MLP, so a bug elsewhere cannot fail it.
The reference's hooks (TransformerLens 4.3 bridge): `hook_resid_mid` = hook_resid_pre +
hook_attn_out, `hook_resid_post` = resid_mid + hook_mlp_out.
"""

import math
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.checks import attention
from gpt2_course.checks.core import (
    Case,
    Observation,
    Outcome,
    build_cached,
    compare,
    load_params,
    named_parameters,
)
from gpt2_course.checks.reference_data import GPT2_SMALL, randn
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig
from gpt2_course.reference import get_reference
from gpt2_course.reference_parts.block import TransformerBlock

LN2_INPUT = "ln2_input"  # the probe: what the block gives ln2 (resid_mid when right)
BLOCK_PARAMS = (
    [f"attn.{name}" for name in attention.ATTENTION_PARAMS]
    + [f"mlp.{name}" for name in ("W_in", "b_in", "W_out", "b_out")]
    + [f"{ln}.{name}" for ln in ("ln1", "ln2") for name in ("w", "b")]
)


def random_block_params(cfg: TransformerConfig, seed: int) -> dict[str, Tensor]:
    """Random weights, non-zero biases and two different LayerNorms (GPT-2's random
    LayerNorms are identical, w = 1 and b = 0, and would hide a shared one)."""
    m, h = cfg.d_model, cfg.d_mlp
    params = {f"attn.{k}": v for k, v in attention.random_attention_params(cfg, seed, 1.0).items()}
    params |= {
        "mlp.W_in": randn(m, h, seed=seed + 10, scale=1 / math.sqrt(m)),
        "mlp.b_in": randn(h, seed=seed + 11, scale=0.5),
        "mlp.W_out": randn(h, m, seed=seed + 12, scale=1 / math.sqrt(h)),
        "mlp.b_out": randn(m, seed=seed + 13),
    }
    for i, ln in enumerate(("ln1", "ln2")):
        params[f"{ln}.w"] = randn(m, seed=seed + 20 + i, scale=0.3, shift=1.0)
        params[f"{ln}.b"] = randn(m, seed=seed + 30 + i, scale=0.3)
    return params


def call_block() -> Callable[[Any, Case], Observation]:
    """Build the block from the reference parts; run forward, recording what ln2 is first given."""
    built: dict = {}

    def call(cls: Any, case: Case) -> Observation:
        with parts.using(parts.REFERENCE):
            module = build_cached(built, cls, case.cfg)
        load_params(module, case.params or {}, getattr(cls, "__name__", "your module"))
        probes: dict[str, Tensor] = {}

        def record(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            probes.setdefault(LN2_INPUT, x.detach().clone())

        ln2 = getattr(module.eval(), "ln2", None)
        parameters = named_parameters(module, case)
        if not isinstance(ln2, nn.Module):
            return Observation(module(*case.args), {}, parameters)
        with ln2.register_forward_pre_hook(record, with_kwargs=True):  # removed on leaving
            return Observation(module(*case.args), probes, parameters)

    return call


def block_cases() -> list[Case]:
    cases = []
    for name, acts, layer in attention.real_runs((0, 11)):
        block = get_reference().bridge.blocks[layer]
        params = {name: attrgetter(name)(block).detach().clone() for name in BLOCK_PARAMS}
        hook = f"blocks.{layer}.hook_resid_"
        expected = Observation(acts[hook + "post"], {LN2_INPUT: acts[hook + "mid"]})
        x = acts[hook + "pre"]
        cases.append(Case(f"{name}, blocks.{layer}", (x,), params, GPT2_SMALL, expected))
    # Random-weight GPT-2's two LayerNorms are identical and its residual stream is
    # small, so a shared LayerNorm or a post-LN block would pass the cases above.
    reference, odd = call_block(), attention.ODD_D_HEAD
    for seed, cfg, shape, scale, shift, label in [
        (91, GPT2_SMALL, (2, 6), 3.0, 0.5, "random weights, two different LayerNorms"),
        (92, odd, (3, 5), 20.0, -4.0, "random weights, d_model=48, large residual stream"),
    ]:
        x = randn(*shape, cfg.d_model, seed=seed + 40, scale=scale, shift=shift)
        case = Case(label, (x,), random_block_params(cfg, seed), cfg, seeded=True)
        # the reference parts' block (torch's kernels), whose ln2 input is resid_mid
        with torch.no_grad():
            case.expected = reference(TransformerBlock, case)
        cases.append(case)
    return cases


def judge_block(outcome: Outcome, case: Case) -> str | None:
    problem = compare(outcome.output, case.expected.output, case.atol, case.rtol)
    if problem is None:
        return None
    ln2_input = outcome.probes.get(LN2_INPUT)
    if ln2_input is None:
        where = "your forward never calls self.ln2 (ln1 before the attention, ln2 before the MLP)."
    elif compare(ln2_input, case.expected.probes[LN2_INPUT], case.atol, case.rtol) is None:
        where = (
            "what you give ln2 matches hook_resid_mid, so the attention half is right; "
            "look at the MLP half: resid_post = resid_mid + mlp(ln2(resid_mid))."
        )
    else:
        where = (
            "what you give ln2 differs from hook_resid_mid = resid_pre + "
            "attn(ln1(resid_pre)): look at the attention half first."
        )
    return (
        f"{problem}\n  Where: {where}\n  (The check builds your block with the reference "
        "LayerNorm, attention and MLP, so only the wiring in your forward is tested.)"
    )


register(
    Check(
        "block.TransformerBlock",
        "pre-LN transformer block (wired with the reference's LayerNorm, attention and MLP)",
        block_cases,
        call_block(),
        judge_case=judge_block,
        backward=True,
    )
)
