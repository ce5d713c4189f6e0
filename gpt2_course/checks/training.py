"""Checks for next_token_loss, configure_optimizer and lr_at_step (notebook 06).

The references here are PyTorch's own `cross_entropy` on shifted tokens, the weight
decay rule applied to every parameter of a small model, and the warmup and cosine
formulas written out for each step.
"""

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_course import parts
from gpt2_course.checks.core import Case, CheckSetupError, Mistake, call_function, compare
from gpt2_course.checks.reference_data import (
    GPT2_SMALL,
    batch_run,
    batch_tokens,
    generator,
    randn,
    text_run,
    text_tokens,
)
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig

# ------------------------------------------------------------------ next_token_loss

LOSS_ATOL, LOSS_RTOL = 1e-4, 1e-5  # a loss near 10: float32 rounding is ~1e-6 of it


def reference_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    d_vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, d_vocab), tokens[:, 1:].reshape(-1))


def loss_cases() -> list[Case]:
    cases = []

    def add(name: str, logits: Tensor, tokens: Tensor) -> None:
        logits, tokens = logits.detach().clone(), tokens.detach().clone()
        expected = reference_loss(logits, tokens)
        cases.append(
            Case(name, (logits, tokens), expected=expected, atol=LOSS_ATOL, rtol=LOSS_RTOL)
        )

    add("reference logits on real text", text_run()[0], text_tokens())
    add("reference logits on a batch of 3 texts", batch_run()[0], batch_tokens())
    # Random logits far from uniform make every wrong pairing of logits and targets
    # visibly wrong; the shapes vary so that batch and position cannot be confused.
    for batch, pos, d_vocab, scale, seed in [
        (2, 7, GPT2_SMALL.d_vocab, 4.0, 51),
        (5, 3, GPT2_SMALL.d_vocab, 8.0, 52),
        (1, 2, 97, 3.0, 53),
        (6, 11, 13, 2.0, 54),
    ]:
        logits = randn(batch, pos, d_vocab, seed=seed, scale=scale)
        tokens = torch.randint(0, d_vocab, (batch, pos), generator=generator(seed + 100))
        add(f"random logits [{batch}, {pos}, {d_vocab}], scale {scale:g}", logits, tokens)
    return cases


def _flat(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    return logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)


def loss_no_shift(logits, tokens):
    return F.cross_entropy(*_flat(logits, tokens))


def loss_shift_wrong_way(logits, tokens):
    return F.cross_entropy(*_flat(logits[:, 1:], tokens[:, :-1]))


def loss_rolled(logits, tokens):
    return F.cross_entropy(*_flat(logits, tokens.roll(-1, dims=1)))


def loss_summed(logits, tokens):
    return F.cross_entropy(*_flat(logits[:, :-1], tokens[:, 1:]), reduction="sum")


def loss_mean_over_batch_only(logits, tokens):
    per_token = F.cross_entropy(*_flat(logits[:, :-1], tokens[:, 1:]), reduction="none")
    return per_token.view(tokens.shape[0], -1).sum(dim=1).mean()


def loss_softmax_over_positions(logits, tokens):
    log_probs = logits[:, :-1].log_softmax(dim=1)
    return -log_probs.gather(-1, tokens[:, 1:, None]).mean()


def loss_classes_on_wrong_axis(logits, tokens):
    return F.cross_entropy(logits[:, :-1], tokens[:, 1:])


def loss_of_probabilities(logits, tokens):
    return F.cross_entropy(*_flat(logits[:, :-1].softmax(dim=-1), tokens[:, 1:]))


register(
    Check(
        "training.next_token_loss",
        "mean cross-entropy of the next token",
        loss_cases,
        call_function,
        [
            Mistake(
                "no_shift",
                "the cross-entropy of each position's logits against its own token (no shift: "
                "position t must predict token t+1)",
                loss_no_shift,
            ),
            Mistake(
                "shift_wrong_way",
                "a shift the wrong way round: logits[:, 1:] against tokens[:, :-1] "
                "(it should be logits[:, :-1] against tokens[:, 1:])",
                loss_shift_wrong_way,
            ),
            Mistake(
                "rolled_targets",
                "targets made with torch.roll, which wraps the first token round as the "
                "target of the last position (drop the last position instead)",
                loss_rolled,
            ),
            Mistake(
                "sum_not_mean",
                "the sum of the losses instead of their mean (reduction='sum')",
                loss_summed,
            ),
            Mistake(
                "mean_over_batch_only",
                "the loss summed over positions and averaged over the batch only "
                "(average over every prediction)",
                loss_mean_over_batch_only,
            ),
            Mistake(
                "softmax_over_positions",
                "a log-softmax over the positions axis instead of the vocabulary axis",
                loss_softmax_over_positions,
            ),
            Mistake(
                "classes_on_wrong_axis",
                "cross_entropy called on [batch, pos, d_vocab] logits: it reads axis 1 as the "
                "classes, so flatten them to [batch * pos, d_vocab] first",
                loss_classes_on_wrong_axis,
            ),
            Mistake(
                "softmax_first",
                "cross_entropy of probabilities: it expects raw logits (it applies the "
                "log-softmax itself)",
                loss_of_probabilities,
            ),
        ],
    )
)

# ------------------------------------------------------------------ configure_optimizer

BETAS = (0.9, 0.95)
# A small GPT with every kind of parameter: 3-d attention weights, 2-d embeddings and
# MLP weights, 1-d biases and LayerNorm scales and shifts.
OPTIMIZER_CFG = TransformerConfig(
    d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32, n_ctx=8, d_vocab=50
)
COLUMNS = ["times it is in the optimizer", "weight_decay", "lr", "beta1", "beta2"]


def small_model() -> torch.nn.Module:
    from solutions.transformer import Transformer

    with parts.using(parts.SOLUTIONS), torch.random.fork_rng(devices=[]):
        return Transformer(OPTIMIZER_CFG)  # (fork_rng: leave the learner's random state alone)


_PARAM_SHAPES = {name: list(p.shape) for name, p in small_model().named_parameters()}
_PARAM_NAMES = list(_PARAM_SHAPES)


def optimizer_cases() -> list[Case]:
    cases = []
    for lr, weight_decay in [(3e-4, 0.1), (6e-4, 0.05)]:
        rows = []
        for shape in _PARAM_SHAPES.values():
            rows.append([1.0, weight_decay if len(shape) >= 2 else 0.0, lr, *BETAS])
        expected = torch.tensor(rows, dtype=torch.float64)
        cases.append(
            Case(
                f"small GPT, lr={lr:g}, weight_decay={weight_decay:g}",
                (lr, weight_decay),
                expected=expected,
            )
        )
    return cases


def call_optimizer(configure: Callable[..., Any], case: Case) -> Tensor:
    """Build the optimizer for a fresh small model; describe each parameter's settings."""
    lr, weight_decay = case.args
    model = small_model()
    optimizer = configure(model, lr, weight_decay)
    if not isinstance(optimizer, torch.optim.AdamW):
        raise CheckSetupError(
            f"configure_optimizer returned a {type(optimizer).__module__}."
            f"{type(optimizer).__name__}, expected a torch.optim.AdamW"
        )
    settings: dict[int, list[list[float]]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            beta1, beta2 = group["betas"]
            row = [group["weight_decay"], group["lr"], beta1, beta2]
            settings.setdefault(id(param), []).append([float(v) for v in row])
    rows = []
    for _, param in model.named_parameters():
        found = settings.get(id(param), [])
        first = found[0] if found else [math.nan] * 4
        rows.append([float(len(found)), *first])
    return torch.tensor(rows, dtype=torch.float64)


def compare_optimizer(actual: Any, expected: Tensor, atol: float, rtol: float) -> str | None:
    """Like `compare`, but names the parameter and the setting that differ."""
    problem = compare(actual, expected, atol, rtol)
    if problem is None or not isinstance(actual, Tensor) or actual.shape != expected.shape:
        return problem
    for i, name in enumerate(_PARAM_NAMES):
        for j, column in enumerate(COLUMNS):
            yours, wanted = actual[i, j].item(), expected[i, j].item()
            if compare(actual[i, j], expected[i, j], atol, rtol) is not None:
                if j == 0:
                    return f"parameter {name} is in the optimizer {yours:g} times, expected once"
                return (
                    f"parameter {name} ({_shape(name)}) has {column} {yours:g}, expected {wanted:g}"
                )
    return problem


def _shape(name: str) -> str:
    return f"{len(_PARAM_SHAPES[name])}-d, shape {_PARAM_SHAPES[name]}"


def _adamw(groups: list[dict], lr: float, **kwargs: Any) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=lr, **{"betas": BETAS, **kwargs})


def opt_decay_everything(model, lr, weight_decay):
    return _adamw([{"params": list(model.parameters()), "weight_decay": weight_decay}], lr)


def opt_decay_nothing(model, lr, weight_decay):
    return _adamw([{"params": list(model.parameters()), "weight_decay": 0.0}], lr)


def _split(model, rule):
    params = list(model.parameters())
    return [p for p in params if rule(p)], [p for p in params if not rule(p)]


def opt_no_decay_group_default(model, lr, weight_decay):
    decay, other = _split(model, lambda p: p.dim() >= 2)
    return _adamw([{"params": decay, "weight_decay": weight_decay}, {"params": other}], lr)


def opt_only_3d(model, lr, weight_decay):
    decay, other = _split(model, lambda p: p.dim() > 2)
    return _adamw(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr,
    )


def opt_only_2d(model, lr, weight_decay):
    decay, other = _split(model, lambda p: p.dim() == 2)
    return _adamw(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr,
    )


def opt_groups_swapped(model, lr, weight_decay):
    decay, other = _split(model, lambda p: p.dim() < 2)
    return _adamw(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr,
    )


def opt_default_betas(model, lr, weight_decay):
    decay, other = _split(model, lambda p: p.dim() >= 2)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def opt_default_lr(model, lr, weight_decay):
    decay, other = _split(model, lambda p: p.dim() >= 2)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, betas=BETAS)


def opt_twice(model, lr, weight_decay):
    decay, _ = _split(model, lambda p: p.dim() >= 2)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": list(model.parameters()), "weight_decay": 0.0},
    ]
    return _adamw(groups, lr)


def opt_adam(model, lr, weight_decay):
    decay, other = _split(model, lambda p: p.dim() >= 2)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.Adam(groups, lr=lr, betas=BETAS)


register(
    Check(
        "training.configure_optimizer",
        "AdamW with weight decay on matrices only",
        optimizer_cases,
        call_optimizer,
        [
            Mistake(
                "decay_everything",
                "weight decay on every parameter, biases and LayerNorm's w and b included "
                "(decay only parameters with 2 or more dimensions)",
                opt_decay_everything,
            ),
            Mistake("decay_nothing", "no weight decay on any parameter", opt_decay_nothing),
            Mistake(
                "no_decay_group_default",
                "a no-decay group without weight_decay=0.0: AdamW then gives it its default "
                "weight_decay of 0.01",
                opt_no_decay_group_default,
            ),
            Mistake(
                "only_3d_decay",
                "decay only on parameters with more than 2 dimensions (p.dim() > 2), which "
                "leaves the embeddings and MLP weights undecayed",
                opt_only_3d,
            ),
            Mistake(
                "only_2d_decay",
                "decay only on parameters with exactly 2 dimensions (p.dim() == 2), which "
                "leaves the 3-d attention weights W_Q, W_K, W_V, W_O undecayed",
                opt_only_2d,
            ),
            Mistake(
                "groups_swapped",
                "the two groups swapped: decay on biases and LayerNorm, none on the matrices",
                opt_groups_swapped,
            ),
            Mistake(
                "default_betas",
                "AdamW's default betas (0.9, 0.999) instead of BETAS = (0.9, 0.95)",
                opt_default_betas,
            ),
            Mistake(
                "default_lr",
                "AdamW's default lr of 0.001 instead of the lr argument",
                opt_default_lr,
            ),
            Mistake(
                "parameter_twice",
                "a parameter in both groups (every parameter must be in exactly one group)",
                opt_twice,
            ),
            Mistake(
                "adam_not_adamw",
                "torch.optim.Adam, whose weight_decay is an L2 penalty mixed into the gradient; "
                "AdamW decays the weights directly",
                opt_adam,
            ),
        ],
        compare=compare_optimizer,
    )
)

# ------------------------------------------------------------------ lr_at_step


def schedule(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The schedule written out from its definition, for the expected values."""
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    angle = math.pi * (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * (1 + math.cos(angle)) / 2


LR_SETTINGS = [
    # (max_lr, min_lr, warmup_steps, total_steps, steps to ask about)
    (6e-4, 6e-5, 10, 100, list(range(0, 121))),
    (1.0, 0.1, 3, 7, list(range(0, 12))),
    (1e-2, 0.0, 0, 50, list(range(0, 61, 5))),
    (3e-3, 3e-4, 100, 1000, [0, 1, 50, 99, 100, 101, 250, 550, 999, 1000, 1001, 5000]),
]


def lr_cases() -> list[Case]:
    cases = []
    for max_lr, min_lr, warmup, total, steps in LR_SETTINGS:
        expected = torch.tensor(
            [[s, schedule(s, max_lr, min_lr, warmup, total)] for s in steps], dtype=torch.float64
        )
        name = f"max_lr={max_lr:g}, min_lr={min_lr:g}, warmup_steps={warmup}, total_steps={total}"
        args = (max_lr, min_lr, warmup, total, steps)
        # float64 formulas agree to ~1e-16; the tolerance scales with the schedule
        cases.append(Case(name, args, expected=expected, atol=1e-6 * max_lr, rtol=1e-6))
    return cases


def call_schedule(lr_at_step: Callable[..., Any], case: Case) -> Tensor:
    """Ask for the learning rate at every step of the case; one row (step, lr) per step."""
    max_lr, min_lr, warmup, total, steps = case.args
    rows = []
    for step in steps:
        value = lr_at_step(
            step, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total
        )
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, int | float):
            raise CheckSetupError(f"lr_at_step returned a {type(value).__name__}, expected a float")
        rows.append([float(step), float(value)])
    return torch.tensor(rows, dtype=torch.float64)


def compare_schedule(actual: Any, expected: Tensor, atol: float, rtol: float) -> str | None:
    """Like `compare`, but says at which step the learning rate differs."""
    problem = compare(actual, expected, atol, rtol)
    if problem is None or not isinstance(actual, Tensor) or actual.shape != expected.shape:
        return problem
    wrong = [
        i for i in range(len(expected)) if compare(actual[i], expected[i], atol, rtol) is not None
    ]
    i = wrong[0]
    steps = ", ".join(str(int(expected[j, 0])) for j in wrong[:6]) + (
        ", ..." if len(wrong) > 6 else ""
    )
    return (
        f"at step {int(expected[i, 0])} your lr is {actual[i, 1].item():.6g}, expected "
        f"{expected[i, 1].item():.6g} (wrong at {len(wrong)} of {len(expected)} steps: {steps})"
    )


def _cosine(step, max_lr, min_lr, start, end):
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * (step - start) / (end - start))) / 2


def lr_no_warmup(step, *, max_lr, min_lr, warmup_steps, total_steps):
    return min_lr if step >= total_steps else _cosine(step, max_lr, min_lr, 0, total_steps)


def lr_warmup_at_max(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr
    return (
        min_lr if step >= total_steps else _cosine(step, max_lr, min_lr, warmup_steps, total_steps)
    )


def lr_warmup_off_by_one(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    return (
        min_lr if step >= total_steps else _cosine(step, max_lr, min_lr, warmup_steps, total_steps)
    )


def lr_decays_to_zero(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    return 0.0 if step >= total_steps else _cosine(step, max_lr, 0.0, warmup_steps, total_steps)


def lr_ends_late(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    end = warmup_steps + total_steps
    return min_lr if step >= end else _cosine(step, max_lr, min_lr, warmup_steps, end)


def lr_no_clamp(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    return _cosine(step, max_lr, min_lr, warmup_steps, total_steps)


def lr_min_added(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    return (
        min_lr
        + max_lr
        * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))
        / 2
    )


def lr_linear_decay(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    return max_lr - (max_lr - min_lr) * (step - warmup_steps) / (total_steps - warmup_steps)


register(
    Check(
        "training.lr_at_step",
        "linear warmup, then cosine decay to min_lr",
        lr_cases,
        call_schedule,
        [
            Mistake(
                "no_warmup",
                "a cosine from step 0 with no warmup (the lr must rise linearly from 0 "
                "during the first warmup_steps steps)",
                lr_no_warmup,
            ),
            Mistake(
                "warmup_at_max_lr",
                "max_lr throughout the warmup instead of a linear rise from 0",
                lr_warmup_at_max,
            ),
            Mistake(
                "warmup_off_by_one",
                "a warmup one step early: max_lr * (step + 1) / warmup_steps (step 0 must give 0)",
                lr_warmup_off_by_one,
            ),
            Mistake(
                "decays_to_zero",
                "a cosine down to 0 instead of min_lr",
                lr_decays_to_zero,
            ),
            Mistake(
                "cosine_ends_late",
                "a cosine that lasts total_steps steps after the warmup, so it reaches min_lr "
                "at warmup_steps + total_steps instead of total_steps",
                lr_ends_late,
            ),
            Mistake(
                "no_clamp_after_end",
                "a cosine that carries on after total_steps and rises again (stay at min_lr "
                "from total_steps on)",
                lr_no_clamp,
            ),
            Mistake(
                "min_lr_added",
                "min_lr added on top of a cosine from max_lr to 0, so the decay starts at "
                "max_lr + min_lr",
                lr_min_added,
            ),
            Mistake("linear_decay", "a linear decay instead of a cosine", lr_linear_decay),
        ],
        compare=compare_schedule,
    )
)
