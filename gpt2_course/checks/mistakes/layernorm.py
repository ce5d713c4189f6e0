"""Common LayerNorm mistakes (notebook 02): formulas in place of the reference part's."""

import torch.nn.functional as F

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.layernorm import LayerNorm


def variant(formula):
    """The reference LayerNorm (its parameters w, b) computing `formula(x, w, b, eps)`."""

    def forward(self, x):
        return formula(x, self.w, self.b, self.cfg.layer_norm_eps)

    return type(formula.__name__, (LayerNorm,), {"forward": forward})


def centred(x, axis=-1):
    return x - x.mean(axis, keepdim=True)


def normalised(x, eps):
    return F.layer_norm(x, x.shape[-1:], None, None, eps)


def eps_outside_sqrt(x, w, b, eps):
    return centred(x) / (centred(x).pow(2).mean(-1, keepdim=True).sqrt() + eps) * w + b


def no_eps(x, w, b, eps):
    return centred(x) / centred(x).pow(2).mean(-1, keepdim=True).sqrt() * w + b


def unbiased_variance(x, w, b, eps):
    return centred(x) / (x.var(-1, keepdim=True, unbiased=True) + eps).sqrt() * w + b


def no_centring(x, w, b, eps):
    return x / (x.var(-1, keepdim=True, unbiased=False) + eps).sqrt() * w + b


def rmsnorm(x, w, b, eps):
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w + b


def wrong_axis(x, w, b, eps):
    return centred(x, 1) / (centred(x, 1).pow(2).mean(1, keepdim=True) + eps).sqrt() * w + b


def divides_by_variance(x, w, b, eps):
    return centred(x) / (centred(x).pow(2).mean(-1, keepdim=True) + eps) * w + b


# fmt: off
MISTAKES = {
    "layernorm.LayerNorm": [
        Mistake("eps_outside_sqrt", "LayerNorm with epsilon outside the square root", variant(eps_outside_sqrt)),
        Mistake("no_eps", "LayerNorm without epsilon", variant(no_eps)),
        Mistake("unbiased_variance", "LayerNorm with the unbiased variance (dividing by d_model - 1)", variant(unbiased_variance)),
        Mistake("no_centring", "LayerNorm that does not subtract the mean from x", variant(no_centring)),
        Mistake("rmsnorm", "RMSNorm: no centring at all (x / sqrt(mean(x**2) + eps))", variant(rmsnorm)),
        Mistake("wrong_axis", "LayerNorm over the position axis instead of d_model", variant(wrong_axis)),
        Mistake("divides_by_variance", "LayerNorm dividing by the variance instead of its square root", variant(divides_by_variance)),
        Mistake("no_weight", "LayerNorm that forgets to multiply by w", variant(lambda x, w, b, eps: normalised(x, eps) + b)),
        Mistake("no_bias", "LayerNorm that forgets to add b", variant(lambda x, w, b, eps: normalised(x, eps) * w)),
        Mistake("no_affine", "LayerNorm without w and b", variant(lambda x, w, b, eps: normalised(x, eps))),
        Mistake("bias_before_weight", "LayerNorm that adds b before multiplying by w", variant(lambda x, w, b, eps: (normalised(x, eps) + b) * w)),
    ]
}
# fmt: on
