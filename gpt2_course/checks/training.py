"""Checks for next_token_loss, configure_optimizer and lr_at_step (notebook 06)."""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_course import parts
from gpt2_course.checks import reference_data as data
from gpt2_course.checks.core import Case, CheckSetupError, Outcome, call_function, compare
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig


def loss_cases() -> list[Case]:
    cases = []

    def add(name: str, logits: Tensor, tokens: Tensor, seeded: bool) -> None:
        logits, tokens = logits.detach().clone(), tokens.detach().clone()
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        # atol, rtol: for a loss near 10, float32 rounding is ~1e-6 of it
        cases.append(Case(name, (logits, tokens), None, None, expected, 1e-4, 1e-5, seeded))

    add("reference logits on real text", data.text_run()[0], data.text_tokens(), False)
    add("reference logits on a batch of 3 texts", data.batch_run()[0], data.batch_tokens(), False)
    # Random logits far from uniform make every wrong pairing of logits and targets
    # visibly wrong; the shapes vary so that batch and position cannot be confused.
    for batch, pos, d_vocab, scale, seed in [
        (2, 7, data.GPT2_SMALL.d_vocab, 4.0, 51),
        (5, 3, data.GPT2_SMALL.d_vocab, 8.0, 52),
        (1, 2, 97, 3.0, 53),
        (6, 11, 13, 2.0, 54),
    ]:
        logits = data.randn(batch, pos, d_vocab, seed=seed, scale=scale)
        tokens = torch.randint(0, d_vocab, (batch, pos), generator=data.generator(seed + 100))
        add(f"random logits [{batch}, {pos}, {d_vocab}], scale {scale:g}", logits, tokens, True)
    return cases


register(
    Check(
        "training.next_token_loss",
        "mean cross-entropy of the next token",
        loss_cases,
        call_function,
    )
)

BETAS = (0.9, 0.95)
# every kind of parameter: 3-d attention weights, 2-d embeddings and MLP weights, 1-d biases
# and LayerNorm scales and shifts
EVERY_KIND_OF_PARAMETER = TransformerConfig(
    d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32, n_ctx=8, d_vocab=50
)
COLUMNS = ["times it is in the optimizer", "weight_decay", "lr", "beta1", "beta2"]


def small_model() -> torch.nn.Module:
    # the reference parts; fork_rng leaves the learner's random state alone
    with parts.using(parts.REFERENCE), torch.random.fork_rng(devices=[]):
        return parts.Transformer(EVERY_KIND_OF_PARAMETER)


_PARAM_SHAPES = {name: list(p.shape) for name, p in small_model().named_parameters()}


def optimizer_cases() -> list[Case]:
    cases = []
    for lr, weight_decay in [(3e-4, 0.1), (6e-4, 0.05)]:
        rows = [[1.0, weight_decay * (len(s) >= 2), lr, *BETAS] for s in _PARAM_SHAPES.values()]
        expected = torch.tensor(rows, dtype=torch.float64)
        name = f"small GPT, lr={lr:g}, weight_decay={weight_decay:g}"
        cases.append(Case(name, (lr, weight_decay), expected=expected, seeded=True))
    return cases


def call_optimizer(configure: Any, case: Case) -> Tensor:
    """Build the optimizer for a fresh small model; one row of settings per parameter."""
    model = small_model()
    optimizer = configure(model, *case.args)
    if not isinstance(optimizer, torch.optim.AdamW):
        kind = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        raise CheckSetupError(f"configure_optimizer returned a {kind}, expected torch.optim.AdamW")
    settings: dict[int, list[list[float]]] = {}
    for group in optimizer.param_groups:
        row = [float(v) for v in (group["weight_decay"], group["lr"], *group["betas"])]
        for param in group["params"]:
            settings.setdefault(id(param), []).append(row)
    found = [settings.get(id(param), []) for param in model.parameters()]
    rows = [[float(len(f)), *(f[0] if f else [math.nan] * 4)] for f in found]
    return torch.tensor(rows, dtype=torch.float64)


def wrong_cells(outcome: Outcome, case: Case) -> tuple[str | None, list[list[int]]]:
    """`compare`'s verdict on a table, and the [row, column] of each value out of tolerance."""
    actual, expected = outcome.output, case.expected
    problem = compare(actual, expected, case.atol, case.rtol)
    if problem is None or not isinstance(actual, Tensor) or actual.shape != expected.shape:
        return problem, []
    close = (actual - expected).abs() <= case.atol + case.rtol * expected.abs()  # False at NaN
    return problem, (~close).nonzero().tolist()


def judge_optimizer(outcome: Outcome, case: Case) -> str | None:
    """Like `compare`, but names the parameter and the setting that differ."""
    problem, wrong = wrong_cells(outcome, case)
    if not wrong:
        return problem
    i, j = wrong[0]
    name, shape = list(_PARAM_SHAPES.items())[i]
    yours, wanted = outcome.output[i, j].item(), case.expected[i, j].item()
    if j == 0:
        return f"parameter {name} is in the optimizer {yours:g} times, expected once"
    setting = f"{COLUMNS[j]} {yours:g}, expected {wanted:g}"
    return f"parameter {name} ({len(shape)}-d, shape {shape}) has {setting}"


register(
    Check(
        "training.configure_optimizer",
        "AdamW with weight decay on matrices only",
        optimizer_cases,
        call_optimizer,
        judge_case=judge_optimizer,
    )
)


def schedule(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The schedule written out from its definition, for the expected values."""
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    angle = math.pi * (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * (1 + math.cos(angle)) / 2


def lr_cases() -> list[Case]:
    cases = []
    for steps, max_lr, min_lr, warmup, total in [
        (range(0, 121), 6e-4, 6e-5, 10, 100),
        (range(0, 12), 1.0, 0.1, 3, 7),
        (range(0, 61, 5), 1e-2, 0.0, 0, 50),
        ([0, 1, 50, 99, 100, 101, 250, 550, 999, 1000, 1001, 5000], 3e-3, 3e-4, 100, 1000),
    ]:
        settings = dict(max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total)
        name = ", ".join(f"{key}={value:g}" for key, value in settings.items())
        expected = torch.tensor([[s, schedule(s, **settings)] for s in steps], dtype=torch.float64)
        # float64 formulas agree to ~1e-16; the tolerance scales with the schedule
        atol, rtol = 1e-6 * max_lr, 1e-6
        cases.append(Case(name, (list(steps), settings), None, None, expected, atol, rtol, True))
    return cases


def call_schedule(lr_at_step: Any, case: Case) -> Tensor:
    """Ask for the learning rate at every step of the case; one row (step, lr) per step."""
    steps, settings = case.args
    rows = []
    for step in steps:
        value = lr_at_step(step, **settings)
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, int | float):
            raise CheckSetupError(f"lr_at_step returned a {type(value).__name__}, expected a float")
        rows.append([float(step), float(value)])
    return torch.tensor(rows, dtype=torch.float64)


def judge_schedule(outcome: Outcome, case: Case) -> str | None:
    """Like `compare`, but says at which steps the learning rate differs."""
    problem, wrong = wrong_cells(outcome, case)
    if not wrong:
        return problem
    rows, expected = sorted({i for i, _ in wrong}), case.expected
    steps = ", ".join(str(int(expected[i, 0])) for i in rows[:6]) + ", ..." * (len(rows) > 6)
    i = rows[0]
    return (
        f"at step {int(expected[i, 0])} your lr is {outcome.output[i, 1].item():.6g}, expected "
        f"{expected[i, 1].item():.6g} (wrong at {len(rows)} of {len(expected)} steps: {steps})"
    )


register(
    Check(
        "training.lr_at_step",
        "linear warmup, then cosine decay to min_lr",
        lr_cases,
        call_schedule,
        judge_case=judge_schedule,
    )
)
