"""Checks for gelu_new and the MLP (notebook 04).

The reference's hooks (TransformerLens 4.3 bridge, verified in
tests/test_attention_mlp_block.py): `mlp.hook_pre` = ln2's output @ W_in + b_in,
and `hook_mlp_out` = gelu_new(hook_pre) @ W_out + b_out.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_course.checks.core import Case, Outcome, call_function, call_module
from gpt2_course.checks.reference_data import GPT2_SMALL, batch_run, randn, text_run
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig
from gpt2_course.reference import get_reference

# d_mlp is not 4 * d_model here: code that reads both from cfg passes, code with GPT-2's
# ratio or sizes written in fails.
D_MLP_NOT_4X = TransformerConfig(d_model=48, n_heads=3, d_head=8, d_mlp=80, n_layers=2)

# gelu_new is elementwise: a correct one differs from the reference by a few float32
# ulps, while the exact (erf) GELU differs by up to 5e-4, so the tolerance is tight.
GELU_ATOL, GELU_RTOL = 1e-6, 1e-5


def gelu_cases() -> list[Case]:
    _, text_acts = text_run()
    _, batch_acts = batch_run()
    inputs = [
        ("real text, blocks.0.mlp.hook_pre", text_acts["blocks.0.mlp.hook_pre"], False),
        ("batch of 3 texts, blocks.9.mlp.hook_pre", batch_acts["blocks.9.mlp.hook_pre"], False),
        ("the grid -8, -7.99, ..., 8", torch.linspace(-8.0, 8.0, 1601), True),
        ("random [2, 3, 4, 5], scale 3", randn(2, 3, 4, 5, seed=71, scale=3.0), True),
        ("random [4, 256], scale 100", randn(4, 256, seed=72, scale=100.0), True),
    ]
    return [
        Case(name, (x,), None, None, F.gelu(x, approximate="tanh"), GELU_ATOL, GELU_RTOL, seeded)
        for name, x, seeded in inputs
    ]


def same_or_both_nan(mine: Outcome, other: Outcome, case: Case) -> bool:
    """Within tolerance, and NaN where the other has NaN (as a GELU that overflows has)."""
    a, b = mine.output, other.output
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and (a.shape, a.dtype) == (b.shape, b.dtype)
        and torch.allclose(a, b, case.rtol, case.atol, equal_nan=True)
    )


def reference_mlp(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """GPT-2's MLP from torch's own ops."""
    pre = F.linear(x, params["W_in"].T, params["b_in"])
    return F.linear(F.gelu(pre, approximate="tanh"), params["W_out"].T, params["b_out"])


def reference_mlp_params(layer: int) -> dict[str, Tensor]:
    """The reference's MLP weights of block `layer`, by their TransformerLens names."""
    mlp = get_reference().bridge.blocks[layer].mlp
    return {n: getattr(mlp, n).detach().clone() for n in ("W_in", "b_in", "W_out", "b_out")}


def random_mlp_params(
    cfg: TransformerConfig, seed: int, pre_shift: float, out_scale: float
) -> dict[str, Tensor]:
    """Random weights and non-zero biases (GPT-2's random biases are 0 and hide a missing one).

    `pre_shift` moves the pre-activations: around -3 the tanh and erf GELUs differ
    by 10%, which a sum over d_mlp neurons makes plain.
    """
    m, h = cfg.d_model, cfg.d_mlp
    return {
        "W_in": randn(m, h, seed=seed, scale=1.0 / math.sqrt(m)),
        "b_in": randn(h, seed=seed + 1, scale=0.5, shift=pre_shift),
        "W_out": randn(h, m, seed=seed + 2, scale=out_scale / math.sqrt(h)),
        "b_out": randn(m, seed=seed + 3, scale=1.0),
    }


def mlp_cases() -> list[Case]:
    cases = []
    for name, (_, acts), layer in [
        ("real text", text_run(), 0),
        ("batch of 3 texts", batch_run(), 4),
    ]:
        x, out = acts[f"blocks.{layer}.ln2.hook_out"], acts[f"blocks.{layer}.hook_mlp_out"]
        params = reference_mlp_params(layer)
        cases.append(Case(f"{name}, blocks.{layer}.mlp", (x,), params, GPT2_SMALL, out))
    for seed, cfg, shape, shift, out_scale, name in [
        (81, GPT2_SMALL, (2, 7), 0.0, 1.0, "random weights and biases"),
        (82, GPT2_SMALL, (1, 5), -3.0, 30.0, "random weights, pre-activations around -3"),
        (83, D_MLP_NOT_4X, (3, 4), 0.5, 1.0, "random weights, d_model=48, d_mlp=80"),
    ]:
        params = random_mlp_params(cfg, seed, shift, out_scale)
        x = randn(*shape, cfg.d_model, seed=seed + 10)
        cases.append(Case(name, (x,), params, cfg, reference_mlp(x, params), seeded=True))
    return cases


register(
    Check(
        "mlp.gelu_new",
        "GPT-2's tanh GELU",
        gelu_cases,
        call_function,
        same=same_or_both_nan,
        backward=True,
    )
)
register(
    Check("mlp.MLP", "the MLP (feed-forward) sublayer", mlp_cases, call_module(), backward=True)
)
