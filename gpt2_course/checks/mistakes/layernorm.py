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


def own_eps(x, w, b, eps):
    return normalised(x, 1e-5) * w + b  # GPT-2's value, written in: cfg.layer_norm_eps ignored


def over_axes(*axes):
    """LayerNorm whose mean and variance run over `axes` instead of d_model alone."""

    def formula(x, w, b, eps):
        c = x - x.mean(axes, keepdim=True)
        return c / (c.pow(2).mean(axes, keepdim=True) + eps).sqrt() * w + b

    formula.__name__ = "over_axes_" + "_".join(map(str, axes))
    return formula


def divides_by_variance(x, w, b, eps):
    return centred(x) / (centred(x).pow(2).mean(-1, keepdim=True) + eps) * w + b


# fmt: off
MISTAKES = {
    "layernorm.LayerNorm": [
        Mistake("eps_outside_sqrt", "LayerNorm with epsilon outside the square root", variant(eps_outside_sqrt)),
        Mistake("no_eps", "LayerNorm without epsilon (or with a tiny one of its own instead of cfg.layer_norm_eps)", variant(no_eps)),
        Mistake("own_eps", "LayerNorm with an epsilon of its own (such as 1e-5) instead of cfg.layer_norm_eps", variant(own_eps)),
        Mistake("unbiased_variance", "LayerNorm with the unbiased variance (dividing by d_model - 1)", variant(unbiased_variance)),
        Mistake("no_centring", "LayerNorm that does not subtract the mean from x", variant(no_centring)),
        Mistake("rmsnorm", "RMSNorm: no centring at all (x / sqrt(mean(x**2) + eps))", variant(rmsnorm)),
        Mistake("wrong_axis", "LayerNorm over the position axis instead of d_model", variant(wrong_axis)),
        Mistake("over_pos_and_d_model", "LayerNorm with the mean and variance over (pos, d_model) together instead of d_model alone", variant(over_axes(1, 2))),
        Mistake("over_batch", "LayerNorm over the batch axis instead of d_model", variant(over_axes(0))),
        Mistake("over_whole_tensor", "LayerNorm with one mean and variance for the whole tensor (batch, pos and d_model) instead of per token", variant(over_axes(0, 1, 2))),
        Mistake("over_batch_and_d_model", "LayerNorm with the mean and variance over (batch, d_model) instead of d_model alone", variant(over_axes(0, 2))),
        Mistake("over_batch_and_pos", "LayerNorm over (batch, pos), every d_model feature normalised separately (BatchNorm-like) instead of every token", variant(over_axes(0, 1))),
        Mistake("divides_by_variance", "LayerNorm dividing by the variance instead of its square root", variant(divides_by_variance)),
        Mistake("no_weight", "LayerNorm that forgets to multiply by w", variant(lambda x, w, b, eps: normalised(x, eps) + b)),
        Mistake("no_bias", "LayerNorm that forgets to add b", variant(lambda x, w, b, eps: normalised(x, eps) * w)),
        Mistake("no_affine", "LayerNorm without w and b", variant(lambda x, w, b, eps: normalised(x, eps))),
        Mistake("bias_before_weight", "LayerNorm that adds b before multiplying by w", variant(lambda x, w, b, eps: (normalised(x, eps) + b) * w)),
    ]
}
# fmt: on
