"""Checks for LayerNorm (notebook 02)."""

import torch.nn.functional as F

from gpt2_course.checks.core import Case, call_module
from gpt2_course.checks.reference_data import GPT2_SMALL, batch_run, randn, text_run
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig
from gpt2_course.reference import get_reference

D_MODEL, EPS = GPT2_SMALL.d_model, GPT2_SMALL.layer_norm_eps
OWN_EPS = TransformerConfig(d_model=64, layer_norm_eps=0.1)  # not GPT-2's 1e-5


def layernorm_cases() -> list[Case]:
    bridge = get_reference().bridge
    _, text_acts = text_run()
    _, batch_acts = batch_run()

    def real(name: str, ln, hook: str, acts) -> Case:
        params = {"w": ln.w.detach().clone(), "b": ln.b.detach().clone()}
        return Case(name, (acts[f"{hook}.hook_in"],), params, GPT2_SMALL, acts[f"{hook}.hook_out"])

    cases = [
        real("real text, blocks.0.ln1", bridge.blocks[0].ln1, "blocks.0.ln1", text_acts),
        real("real text, blocks.5.ln2", bridge.blocks[5].ln2, "blocks.5.ln2", text_acts),
        real("batch of 3 texts, ln_final", bridge.ln_final, "ln_final", batch_acts),
    ]
    # A config with its own, large epsilon, first of the seeded cases (the diagnosis starts
    # at the first one that fails): an epsilon written into the code (1e-5, 1e-6, 1e-12...)
    # instead of cfg.layer_norm_eps is about the same as no epsilon here, while the
    # variance (about 0.25) is not so much larger than 0.1 that epsilon stops mattering.
    w, b = randn(OWN_EPS.d_model, seed=46, scale=0.5, shift=1.0), randn(OWN_EPS.d_model, seed=47)
    x = randn(3, 5, OWN_EPS.d_model, seed=48, scale=0.5, shift=0.3)
    expected = F.layer_norm(x, (OWN_EPS.d_model,), w, b, OWN_EPS.layer_norm_eps)
    name = f"layer_norm_eps={OWN_EPS.layer_norm_eps:g}, d_model={OWN_EPS.d_model}, input scale 0.5"
    cases.append(Case(name, (x,), {"w": w, "b": b}, OWN_EPS, expected, seeded=True))
    # Random-weight GPT-2 has w = 1 and b = 0 and small activations, so a LayerNorm
    # that forgets w or b, or misplaces epsilon, could pass the cases above. These
    # random w, b and inputs at very different scales (and shifted means) catch that.
    w = randn(D_MODEL, seed=41, scale=0.5, shift=1.0)
    b = randn(D_MODEL, seed=42, scale=0.5)
    for seed, scale, shift in [(43, 1e-3, 0.0), (44, 1.0, 0.5), (45, 50.0, -20.0)]:
        x = randn(2, 9, D_MODEL, seed=seed, scale=scale, shift=shift)
        expected = F.layer_norm(x, (D_MODEL,), w, b, EPS)  # what GPT-2's nn.LayerNorm computes
        cases.append(
            Case(
                f"random w, b; input scale {scale:g}",
                (x,),
                {"w": w, "b": b},
                GPT2_SMALL,
                expected,
                seeded=True,
            )
        )
    return cases


register(
    Check(
        "layernorm.LayerNorm", "layer normalisation", layernorm_cases, call_module(), backward=True
    )
)
