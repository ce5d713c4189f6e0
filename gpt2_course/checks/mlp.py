"""Checks for gelu_new and the MLP (notebook 04).

The reference's hooks (TransformerLens 4.3 bridge, verified in
tests/test_attention_mlp_block.py): `mlp.hook_pre` = ln2's output @ W_in + b_in,
`mlp.hook_post` = gelu_new(hook_pre), `hook_mlp_out` (= `mlp.hook_out`) =
hook_post @ W_out + b_out.
"""

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_course.checks.attention import nan_aware_compare
from gpt2_course.checks.core import Case, Mistake, build_cached, call_function, load_params
from gpt2_course.checks.reference_data import GPT2_SMALL, batch_run, randn, text_run
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig
from gpt2_course.reference import get_reference
from solutions.mlp import MLP

SMALL = TransformerConfig(
    d_model=48, n_heads=3, d_head=8, d_mlp=80, d_vocab=100, n_ctx=32, n_layers=2
)
MLP_PARAMS = ("W_in", "b_in", "W_out", "b_out")

# gelu_new is elementwise: a correct one differs from the reference by a few float32
# ulps, while the exact (erf) GELU differs by up to 5e-4, so the tolerance is tight.
GELU_ATOL, GELU_RTOL = 1e-6, 1e-5


def reference_gelu(x: Tensor) -> Tensor:
    """torch's own tanh GELU, which is the formula of GPT-2's `gelu_new`."""
    return F.gelu(x, approximate="tanh")


# --------------------------------------------------------------- gelu_new


def gelu_cases() -> list[Case]:
    _, text_acts = text_run()
    _, batch_acts = batch_run()
    grid = torch.linspace(-8.0, 8.0, 1601)
    cases = [
        Case(
            "real text, blocks.0.mlp.hook_pre",
            (text_acts["blocks.0.mlp.hook_pre"],),
            None,
            None,
            text_acts["blocks.0.mlp.hook_post"],
            GELU_ATOL,
            GELU_RTOL,
        ),
        Case(
            "batch of 3 texts, blocks.9.mlp.hook_pre",
            (batch_acts["blocks.9.mlp.hook_pre"],),
            None,
            None,
            batch_acts["blocks.9.mlp.hook_post"],
            GELU_ATOL,
            GELU_RTOL,
        ),
        Case(
            "the grid -8, -7.99, ..., 8",
            (grid,),
            None,
            None,
            reference_gelu(grid),
            GELU_ATOL,
            GELU_RTOL,
        ),
    ]
    for seed, shape, scale in [(71, (2, 3, 4, 5), 3.0), (72, (4, 256), 100.0)]:
        x = randn(*shape, seed=seed, scale=scale)
        cases.append(
            Case(
                f"random {list(shape)}, scale {scale:g}",
                (x,),
                None,
                None,
                reference_gelu(x),
                GELU_ATOL,
                GELU_RTOL,
            )
        )
    return cases


def exact_gelu(x):
    return F.gelu(x)


def relu(x):
    return torch.relu(x)


def sigmoid_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def gelu_no_cubic(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * x))


def gelu_no_half(x):
    return x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_sqrt_2pi(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 * math.pi) * (x + 0.044715 * x**3)))


def gelu_exp_tanh(x):
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    e = torch.exp(2 * u)
    return 0.5 * x * (1 + (e - 1) / (e + 1))  # inf / inf = NaN once exp overflows


register(
    Check(
        "mlp.gelu_new",
        "GPT-2's tanh GELU",
        gelu_cases,
        call_function,
        [
            Mistake(
                "exact_gelu",
                "the exact GELU x * Phi(x) with erf (GPT-2 uses the tanh approximation)",
                exact_gelu,
            ),
            Mistake("relu", "ReLU instead of GELU", relu),
            Mistake(
                "sigmoid_gelu",
                "the sigmoid approximation x * sigmoid(1.702 x), not the tanh one",
                sigmoid_gelu,
            ),
            Mistake("no_cubic", "the tanh GELU without the 0.044715 * x**3 term", gelu_no_cubic),
            Mistake("no_half", "the tanh GELU without the factor 0.5", gelu_no_half),
            Mistake(
                "sqrt_2pi", "the tanh GELU with sqrt(2 * pi) instead of sqrt(2 / pi)", gelu_sqrt_2pi
            ),
            Mistake(
                "exp_tanh_overflow",
                "tanh written out with exp, which overflows to inf / inf = NaN for large inputs "
                "(use torch.tanh)",
                gelu_exp_tanh,
            ),
        ],
        compare=nan_aware_compare,
    )
)


# --------------------------------------------------------------- MLP


def reference_mlp(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """The MLP from torch's own ops (not from solutions/)."""
    pre = F.linear(x, params["W_in"].T, params["b_in"])
    return F.linear(reference_gelu(pre), params["W_out"].T, params["b_out"])


def reference_mlp_params(layer: int) -> dict[str, Tensor]:
    """The reference's MLP weights of block `layer`, by their TransformerLens names."""
    mlp = get_reference().bridge.blocks[layer].mlp
    return {name: getattr(mlp, name).detach().clone() for name in MLP_PARAMS}


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
    _, text_acts = text_run()
    _, batch_acts = batch_run()
    cases = []
    for name, acts, layer in [("real text", text_acts, 0), ("batch of 3 texts", batch_acts, 4)]:
        x, out = acts[f"blocks.{layer}.ln2.hook_out"], acts[f"blocks.{layer}.hook_mlp_out"]
        cases.append(
            Case(f"{name}, blocks.{layer}.mlp", (x,), reference_mlp_params(layer), GPT2_SMALL, out)
        )
    for seed, cfg, shape, shift, out_scale, label in [
        (81, GPT2_SMALL, (2, 7), 0.0, 1.0, "random weights and biases"),
        (82, GPT2_SMALL, (1, 5), -3.0, 30.0, "random weights, pre-activations around -3"),
        (83, SMALL, (3, 4), 0.5, 1.0, "random weights, d_model=48, d_mlp=80"),
    ]:
        params = random_mlp_params(cfg, seed, shift, out_scale)
        x = randn(*shape, cfg.d_model, seed=seed + 10)
        cases.append(Case(label, (x,), params, cfg, reference_mlp(x, params)))
    return cases


def call_mlp() -> Callable[[Any, Case], Any]:
    cache: dict = {}

    def call(cls: Any, case: Case) -> Any:
        module = build_cached(cache, cls, case.cfg)
        load_params(module, case.params or {}, getattr(cls, "__name__", "your module"))
        module.eval()
        return module.forward(*case.args)

    return call


class ExactGelu(MLP):
    def forward(self, x):
        return F.gelu(x @ self.W_in + self.b_in) @ self.W_out + self.b_out


class Relu(MLP):
    def forward(self, x):
        return torch.relu(x @ self.W_in + self.b_in) @ self.W_out + self.b_out


class NoActivation(MLP):
    def forward(self, x):
        return (x @ self.W_in + self.b_in) @ self.W_out + self.b_out


class NoBIn(MLP):
    def forward(self, x):
        return reference_gelu(x @ self.W_in) @ self.W_out + self.b_out


class NoBOut(MLP):
    def forward(self, x):
        return reference_gelu(x @ self.W_in + self.b_in) @ self.W_out


class NoBiases(MLP):
    def forward(self, x):
        return reference_gelu(x @ self.W_in) @ self.W_out


class GeluAfterOut(MLP):
    def forward(self, x):
        return reference_gelu(reference_gelu(x @ self.W_in + self.b_in) @ self.W_out + self.b_out)


register(
    Check(
        "mlp.MLP",
        "the MLP (feed-forward) sublayer",
        mlp_cases,
        call_mlp(),
        [
            Mistake(
                "exact_gelu",
                "an MLP with the exact (erf) GELU instead of GPT-2's tanh GELU",
                ExactGelu,
            ),
            Mistake("relu", "an MLP with ReLU instead of GELU", Relu),
            Mistake(
                "no_activation",
                "an MLP without any activation between W_in and W_out",
                NoActivation,
            ),
            Mistake("no_b_in", "an MLP without the bias b_in", NoBIn),
            Mistake("no_b_out", "an MLP without the bias b_out", NoBOut),
            Mistake("no_biases", "an MLP without its biases b_in and b_out", NoBiases),
            Mistake("gelu_after_out", "an MLP that also applies GELU after W_out", GeluAfterOut),
        ],
    )
)
