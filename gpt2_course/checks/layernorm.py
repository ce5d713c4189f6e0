"""Checks for LayerNorm (notebook 02)."""

import torch.nn.functional as F

from gpt2_course.checks.core import Case, Mistake, call_module
from gpt2_course.checks.reference_data import GPT2_SMALL, batch_run, randn, text_run
from gpt2_course.checks.registry import Check, register
from gpt2_course.reference import get_reference
from solutions.layernorm import LayerNorm

D_MODEL, EPS = GPT2_SMALL.d_model, GPT2_SMALL.layer_norm_eps


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
                f"random w, b; input scale {scale:g}", (x,), {"w": w, "b": b}, GPT2_SMALL, expected
            )
        )
    return cases


class EpsOutsideSqrt(LayerNorm):
    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        return (
            centred
            / (centred.pow(2).mean(-1, keepdim=True).sqrt() + self.cfg.layer_norm_eps)
            * self.w
            + self.b
        )


class NoEps(LayerNorm):
    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        return centred / centred.pow(2).mean(-1, keepdim=True).sqrt() * self.w + self.b


class UnbiasedVariance(LayerNorm):
    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=True)
        return centred / (var + self.cfg.layer_norm_eps).sqrt() * self.w + self.b


class NoCentring(LayerNorm):
    def forward(self, x):
        var = x.var(-1, keepdim=True, unbiased=False)
        return x / (var + self.cfg.layer_norm_eps).sqrt() * self.w + self.b


class RMSNorm(LayerNorm):
    def forward(self, x):
        return (
            x / (x.pow(2).mean(-1, keepdim=True) + self.cfg.layer_norm_eps).sqrt() * self.w + self.b
        )


class WrongAxis(LayerNorm):
    def forward(self, x):
        centred = x - x.mean(1, keepdim=True)
        var = centred.pow(2).mean(1, keepdim=True)
        return centred / (var + self.cfg.layer_norm_eps).sqrt() * self.w + self.b


class DividesByVariance(LayerNorm):
    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        return (
            centred / (centred.pow(2).mean(-1, keepdim=True) + self.cfg.layer_norm_eps) * self.w
            + self.b
        )


class NoWeight(LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), None, None, self.cfg.layer_norm_eps) + self.b


class NoBias(LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), None, None, self.cfg.layer_norm_eps) * self.w


class NoAffine(LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), None, None, self.cfg.layer_norm_eps)


class BiasBeforeWeight(LayerNorm):
    def forward(self, x):
        return (
            F.layer_norm(x, (x.shape[-1],), None, None, self.cfg.layer_norm_eps) + self.b
        ) * self.w


register(
    Check(
        "layernorm.LayerNorm",
        "layer normalisation",
        layernorm_cases,
        call_module(),
        [
            Mistake(
                "eps_outside_sqrt", "LayerNorm with epsilon outside the square root", EpsOutsideSqrt
            ),
            Mistake("no_eps", "LayerNorm without epsilon", NoEps),
            Mistake(
                "unbiased_variance",
                "LayerNorm with the unbiased variance (dividing by d_model - 1)",
                UnbiasedVariance,
            ),
            Mistake("no_centring", "LayerNorm that does not subtract the mean from x", NoCentring),
            Mistake("rmsnorm", "RMSNorm: no centring at all (x / sqrt(mean(x**2) + eps))", RMSNorm),
            Mistake("wrong_axis", "LayerNorm over the position axis instead of d_model", WrongAxis),
            Mistake(
                "divides_by_variance",
                "LayerNorm dividing by the variance instead of its square root",
                DividesByVariance,
            ),
            Mistake("no_weight", "LayerNorm that forgets to multiply by w", NoWeight),
            Mistake("no_bias", "LayerNorm that forgets to add b", NoBias),
            Mistake("no_affine", "LayerNorm without w and b", NoAffine),
            Mistake(
                "bias_before_weight",
                "LayerNorm that adds b before multiplying by w",
                BiasBeforeWeight,
            ),
        ],
    )
)
