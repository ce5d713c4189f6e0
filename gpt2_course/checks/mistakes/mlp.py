"""Common mistakes in gelu_new and the MLP (notebook 04): other activations or a wrong
formula, and the reference MLP with a part left out or added."""

import math

import torch
import torch.nn.functional as F

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.mlp import MLP, gelu_new

C = math.sqrt(2 / math.pi)


def gelu_exp_tanh(x):
    e = torch.exp(2 * C * (x + 0.044715 * x**3))
    return 0.5 * x * (1 + (e - 1) / (e + 1))  # inf / inf = NaN once exp overflows


def mlp_with(activation=gelu_new, b_in=True, b_out=True, after_out=None):
    """The reference MLP with another activation, without a bias, or with an extra
    activation after W_out."""

    class WrongMLP(MLP):
        def forward(self, x):
            hidden = activation(x @ self.W_in + (self.b_in if b_in else 0))
            out = hidden @ self.W_out + (self.b_out if b_out else 0)
            return after_out(out) if after_out else out

    return WrongMLP


# fmt: off
MISTAKES = {
    "mlp.gelu_new": [
        Mistake("exact_gelu", "the exact GELU x * Phi(x) with erf (GPT-2 uses the tanh approximation)", F.gelu),
        Mistake("relu", "ReLU instead of GELU", torch.relu),
        Mistake("sigmoid_gelu", "the sigmoid approximation x * sigmoid(1.702 x), not the tanh one", lambda x: x * torch.sigmoid(1.702 * x)),
        Mistake("no_cubic", "the tanh GELU without the 0.044715 * x**3 term", lambda x: 0.5 * x * (1 + torch.tanh(C * x))),
        Mistake("no_half", "the tanh GELU without the factor 0.5", lambda x: x * (1 + torch.tanh(C * (x + 0.044715 * x**3)))),
        Mistake("sqrt_2pi", "the tanh GELU with sqrt(2 * pi) instead of sqrt(2 / pi)", lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 * math.pi) * (x + 0.044715 * x**3)))),
        Mistake("exp_tanh_overflow", "tanh written out with exp, which overflows to inf / inf = NaN for large inputs (use torch.tanh)", gelu_exp_tanh),
    ],
    "mlp.MLP": [
        Mistake("exact_gelu", "an MLP with the exact (erf) GELU instead of GPT-2's tanh GELU", mlp_with(activation=F.gelu)),
        Mistake("relu", "an MLP with ReLU instead of GELU", mlp_with(activation=torch.relu)),
        Mistake("no_activation", "an MLP without any activation between W_in and W_out", mlp_with(activation=lambda pre: pre)),
        Mistake("no_b_in", "an MLP without the bias b_in", mlp_with(b_in=False)),
        Mistake("no_b_out", "an MLP without the bias b_out", mlp_with(b_out=False)),
        Mistake("no_biases", "an MLP without its biases b_in and b_out", mlp_with(b_in=False, b_out=False)),
        Mistake("gelu_after_out", "an MLP that also applies GELU after W_out", mlp_with(after_out=gelu_new)),
    ],
}
# fmt: on
