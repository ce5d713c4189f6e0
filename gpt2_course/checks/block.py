"""Checks for TransformerBlock (notebook 04).

Only the block's wiring is under test: the check builds the learner's block
with the reference solution's LayerNorm, attention and MLP (through
`parts.using(parts.SOLUTIONS)`), so a bug in another component cannot fail it.
The reference's hooks (TransformerLens 4.3 bridge): `hook_resid_pre` in,
`hook_resid_mid` = resid_pre + hook_attn_out, `hook_resid_post` = resid_mid +
hook_mlp_out.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_course import parts
from gpt2_course.checks.attention import (
    ATTENTION_PARAMS,
    EMPTY,
    SMALL,
    random_attention_params,
    reference_attention,
    reference_attention_params,
)
from gpt2_course.checks.core import (
    ATOL,
    RTOL,
    Case,
    Mistake,
    build_cached,
    compare,
    load_params,
)
from gpt2_course.checks.mlp import random_mlp_params, reference_mlp, reference_mlp_params
from gpt2_course.checks.reference_data import GPT2_SMALL, batch_run, randn, text_run
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig
from gpt2_course.reference import get_reference
from solutions.block import TransformerBlock

ISOLATION_NOTE = (
    "\n  (The check builds your block with the reference LayerNorm, attention and MLP, so only "
    "the wiring in your forward is tested.)"
)


def reference_block_params(layer: int) -> dict[str, Tensor]:
    """Every weight of the reference's block `layer`, by the names of a course block."""
    block = get_reference().bridge.blocks[layer]
    params = {f"attn.{k}": v for k, v in reference_attention_params(layer).items()}
    params |= {f"mlp.{k}": v for k, v in reference_mlp_params(layer).items()}
    for ln in ("ln1", "ln2"):
        params |= {f"{ln}.{k}": getattr(getattr(block, ln), k).detach().clone() for k in ("w", "b")}
    return params


def random_block_params(cfg: TransformerConfig, seed: int) -> dict[str, Tensor]:
    """Random weights, with two different LayerNorms (GPT-2's random ones are identical)."""
    params = {f"attn.{k}": v for k, v in random_attention_params(cfg, seed, 1.0).items()}
    params |= {f"mlp.{k}": v for k, v in random_mlp_params(cfg, seed + 10, 0.0, 1.0).items()}
    for i, ln in enumerate(("ln1", "ln2")):
        params[f"{ln}.w"] = randn(cfg.d_model, seed=seed + 20 + i, scale=0.3, shift=1.0)
        params[f"{ln}.b"] = randn(cfg.d_model, seed=seed + 30 + i, scale=0.3)
    return params


def reference_block(
    x: Tensor, params: dict[str, Tensor], cfg: TransformerConfig
) -> tuple[Tensor, Tensor]:
    """A pre-LN block from torch's own ops (not from solutions/): (resid_post, resid_mid)."""

    def ln(name: str, v: Tensor) -> Tensor:
        return F.layer_norm(
            v, (cfg.d_model,), params[f"{name}.w"], params[f"{name}.b"], cfg.layer_norm_eps
        )

    attn = {k: params[f"attn.{k}"] for k in ATTENTION_PARAMS}
    mlp = {k[len("mlp.") :]: v for k, v in params.items() if k.startswith("mlp.")}
    mid = x + reference_attention(ln("ln1", x), attn)[0]
    return mid + reference_mlp(ln("ln2", mid), mlp), mid


@dataclass
class BlockExpected:
    """The reference's resid_post, and its resid_mid (what ln2 should normalise)."""

    output: Tensor
    resid_mid: Tensor


def block_cases() -> list[Case]:
    _, text_acts = text_run()
    _, batch_acts = batch_run()
    cases = []
    for name, acts, layer in [("real text", text_acts, 0), ("batch of 3 texts", batch_acts, 11)]:
        x = acts[f"blocks.{layer}.hook_resid_pre"]
        expected = BlockExpected(
            acts[f"blocks.{layer}.hook_resid_post"], acts[f"blocks.{layer}.hook_resid_mid"]
        )
        cases.append(
            Case(
                f"{name}, blocks.{layer}", (x,), reference_block_params(layer), GPT2_SMALL, expected
            )
        )
    # Random-weight GPT-2's two LayerNorms are identical (w = 1, b = 0) and its residual
    # stream is small, so a shared LayerNorm or a post-LN block would pass the cases above.
    for seed, cfg, shape, scale, shift, label in [
        (91, GPT2_SMALL, (2, 6), 3.0, 0.5, "random weights, two different LayerNorms"),
        (92, SMALL, (3, 5), 20.0, -4.0, "random weights, d_model=48, large residual stream"),
    ]:
        params = random_block_params(cfg, seed)
        x = randn(*shape, cfg.d_model, seed=seed + 40, scale=scale, shift=shift)
        cases.append(
            Case(label, (x,), params, cfg, BlockExpected(*reference_block(x, params, cfg)))
        )
    return cases


def call_block() -> Callable[[Any, Case], Any]:
    """Build the block from the reference's parts; run forward, recording what ln2 is given."""
    cache: dict = {}

    def call(cls: Any, case: Case) -> Any:
        with parts.using(parts.SOLUTIONS):
            module = build_cached(cache, cls, case.cfg)
        load_params(module, case.params or {}, getattr(cls, "__name__", "your module"))
        module.eval()
        seen: list[Tensor] = []
        ln2 = getattr(module, "ln2", None)
        if isinstance(ln2, torch.nn.Module):
            ln2_forward = ln2.forward

            def recording_forward(x, *args, **kwargs):
                seen.append(x.detach().clone())
                return ln2_forward(x, *args, **kwargs)

            ln2.forward = recording_forward
        try:
            output = module.forward(*case.args)
        finally:
            if isinstance(ln2, torch.nn.Module):
                ln2.__dict__.pop("forward", None)
        return output, (seen[0] if seen else EMPTY)

    return call


def compare_block(actual: Any, expected: Any, atol: float = ATOL, rtol: float = RTOL) -> str | None:
    out = actual[0] if isinstance(actual, tuple) else actual
    if not isinstance(expected, BlockExpected):  # diagnosis: a known mistake's output
        return compare(out, expected[0] if isinstance(expected, tuple) else expected, atol, rtol)
    problem = compare(out, expected.output, atol, rtol)
    if problem is None:
        return None
    ln2_input = actual[1] if isinstance(actual, tuple) and len(actual) > 1 else EMPTY
    if ln2_input.numel() == 0:
        where = (
            "\n  Where: your forward never calls self.ln2. Each sublayer has its own LayerNorm: "
            "ln1 before the attention, ln2 before the MLP."
        )
    elif compare(ln2_input, expected.resid_mid, atol, rtol) is None:
        where = (
            "\n  Where: what you give ln2 matches hook_resid_mid, so the attention half is right; "
            "look at the MLP half: resid_post = resid_mid + mlp(ln2(resid_mid))."
        )
    else:
        where = (
            "\n  Where: what you give ln2 differs from hook_resid_mid = resid_pre + "
            "attn(ln1(resid_pre)): look at the attention half first."
        )
    return problem + where + ISOLATION_NOTE


class PostLN(TransformerBlock):
    def forward(self, resid_pre):
        resid_mid = self.ln1(resid_pre + self.attn(resid_pre))
        return self.ln2(resid_mid + self.mlp(resid_mid))


class NoAttnResidual(TransformerBlock):
    def forward(self, resid_pre):
        resid_mid = self.attn(self.ln1(resid_pre))
        return resid_mid + self.mlp(self.ln2(resid_mid))


class NoMlpResidual(TransformerBlock):
    def forward(self, resid_pre):
        resid_mid = resid_pre + self.attn(self.ln1(resid_pre))
        return self.mlp(self.ln2(resid_mid))


class SharedLN(TransformerBlock):
    def forward(self, resid_pre):
        resid_mid = resid_pre + self.attn(self.ln1(resid_pre))
        return resid_mid + self.mlp(self.ln1(resid_mid))


class ResidualOfNormalised(TransformerBlock):
    def forward(self, resid_pre):
        x = self.ln1(resid_pre)
        x = x + self.attn(x)
        x = self.ln2(x)
        return x + self.mlp(x)


class Parallel(TransformerBlock):
    def forward(self, resid_pre):
        return resid_pre + self.attn(self.ln1(resid_pre)) + self.mlp(self.ln2(resid_pre))


class MlpFirst(TransformerBlock):
    def forward(self, resid_pre):
        resid_mid = resid_pre + self.mlp(self.ln2(resid_pre))
        return resid_mid + self.attn(self.ln1(resid_mid))


register(
    Check(
        "block.TransformerBlock",
        "pre-LN transformer block (wired with the reference's LayerNorm, attention and MLP)",
        block_cases,
        call_block(),
        [
            Mistake(
                "post_ln",
                "a post-LN block (LayerNorm after each residual addition, as in the original "
                "Transformer); GPT-2 normalises the input of each sublayer instead",
                PostLN,
            ),
            Mistake(
                "no_attn_residual",
                "a block without the first residual connection (resid_mid = attn(ln1(resid_pre)))",
                NoAttnResidual,
            ),
            Mistake(
                "no_mlp_residual",
                "a block without the second residual connection (resid_post = mlp(ln2(resid_mid)))",
                NoMlpResidual,
            ),
            Mistake(
                "shared_ln",
                "a block that uses ln1 before the MLP as well (ln2 is never used)",
                SharedLN,
            ),
            Mistake(
                "residual_of_normalised",
                "a block that overwrites the residual stream with its normalised copy "
                "(x = ln1(x); x = x + attn(x)): the residuals must add to the unnormalised stream",
                ResidualOfNormalised,
            ),
            Mistake(
                "parallel",
                "a parallel block (the MLP reads resid_pre, not resid_mid, as in GPT-J)",
                Parallel,
            ),
            Mistake("mlp_first", "a block that runs the MLP before the attention", MlpFirst),
        ],
        compare=compare_block,
    )
)
