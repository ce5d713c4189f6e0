"""Checks for next_token_loss, configure_optimizer, lr_at_step, make_windows and train_step
(notebook 06)."""

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_course import parts
from gpt2_course.checks import reference_data as data
from gpt2_course.checks.core import (
    Case,
    CheckSetupError,
    Observation,
    Outcome,
    call_function,
    compare,
)
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
        backward=True,
    )
)

BETAS = (0.9, 0.95)
# every kind of parameter: 3-d attention weights, 2-d embeddings and MLP weights, 2-d
# biases b_Q, b_K, b_V, 1-d biases and LayerNorm scales and shifts
EVERY_KIND_OF_PARAMETER = TransformerConfig(
    d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32, n_ctx=8, d_vocab=50
)
COLUMNS = ["times it is in the optimizer", "weight_decay", "lr", "beta1", "beta2"]


def small_model() -> torch.nn.Module:
    # the reference parts; fork_rng leaves the learner's random state alone
    with parts.using(parts.REFERENCE), torch.random.fork_rng(devices=[]):
        return parts.Transformer(EVERY_KIND_OF_PARAMETER)


_PARAM_SHAPES = {name: list(p.shape) for name, p in small_model().named_parameters()}


def decayed(name: str) -> bool:
    """GPT-2's rule: the weight matrices and embeddings (W_E, W_pos, W_Q, ..., W_U) are
    decayed; biases (b_Q, b_K, b_V are 2-D, yet biases) and LayerNorm's w and b are not."""
    return name.split(".")[-1].startswith("W_")


def optimizer_cases() -> list[Case]:
    cases = []
    for lr, weight_decay in [(3e-4, 0.1), (6e-4, 0.05)]:
        rows = [[1.0, weight_decay * decayed(name), lr, *BETAS] for name in _PARAM_SHAPES]
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
        "AdamW with weight decay on the W_ matrices and embeddings only",
        optimizer_cases,
        call_optimizer,
        judge_case=judge_optimizer,
    )
)


def schedule(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The schedule written out from its definition, for the expected values."""
    if step < warmup_steps:  # nonzero at step 0, max_lr at step = warmup_steps
        return max_lr * (step + 1) / (warmup_steps + 1)
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
        # the docstring promises a float: the trainer writes it into the optimizer's groups
        if isinstance(value, Tensor):
            raise CheckSetupError(
                "lr_at_step returned a torch.Tensor, expected a Python float: compute it "
                "with math (math.cos, math.pi), or return `value.item()`"
            )
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise CheckSetupError(f"lr_at_step returned a {type(value).__name__}, expected a float")
        rows.append([float(step), float(value)])
    return torch.tensor(rows, dtype=torch.float64)


def judge_schedule(outcome: Outcome, case: Case) -> str | None:
    """Like `compare`, but says at which steps the learning rate differs, showing the step
    where it differs most (decaying to 0 instead of min_lr shows at the end, not at the
    first step of the decay where the two barely differ)."""
    problem, wrong = wrong_cells(outcome, case)
    if not wrong:
        return problem
    rows, expected = sorted({i for i, _ in wrong}), case.expected
    steps = ", ".join(str(int(expected[i, 0])) for i in rows[:6]) + ", ..." * (len(rows) > 6)
    errors = (outcome.output[rows, 1] - expected[rows, 1]).abs().nan_to_num(nan=math.inf)
    i = rows[int(errors.argmax())]  # the first of the largest
    return (
        f"at step {int(expected[i, 0])} your lr is {outcome.output[i, 1].item():.6g}, expected "
        f"{expected[i, 1].item():.6g} (wrong at {len(rows)} of {len(expected)} steps: {steps})"
    )


register(
    Check(
        "training.lr_at_step",
        "linear warmup (nonzero from step 0), then cosine decay to min_lr",
        lr_cases,
        call_schedule,
        judge_case=judge_schedule,
    )
)


# ------------------------------------------------------------------ make_windows

RAISED = "raised ValueError"


def windows_cases() -> list[Case]:
    from gpt2_course.data import cut_windows  # the data pipeline's rule: one definition

    cases = []
    for n_tokens, seq_len, seed in [(103, 10, 61), (64, 16, 62), (9, 1, 63), (12, 12, 64)]:
        tokens = torch.randint(0, 50257, (n_tokens,), generator=data.generator(seed))
        expected = cut_windows(tokens, seq_len)
        name = f"{n_tokens} tokens, seq_len={seq_len}"
        cases.append(Case(name, (tokens, seq_len), expected=expected, seeded=True))
    short = torch.randint(0, 50257, (5,), generator=data.generator(65))
    cases.append(
        Case(
            "5 tokens, seq_len=8: no window",
            (short, 8),
            expected=cut_windows(short, 8),
            seeded=True,
        )
    )
    stream = torch.randint(0, 50257, (24,), generator=data.generator(66))
    for name, args in [
        ("seq_len=0", (stream, 0)),
        ("seq_len=-4", (stream, -4)),
        ("2-D tokens [3, 8], seq_len=4", (stream.view(3, 8), 4)),
    ]:
        cases.append(Case(f"{name} must raise ValueError", args, expected=RAISED, seeded=True))
    return cases


def call_windows(make_windows: Any, case: Case) -> Observation:
    """The windows of a private copy of the tokens, and whether writing into them changes it."""
    tokens, seq_len = case.args
    mine = tokens.clone()
    try:
        windows = make_windows(mine, seq_len)
    except ValueError:
        return Observation(RAISED)
    if not isinstance(windows, Tensor):
        raise CheckSetupError(
            f"make_windows returned a {type(windows).__name__}, expected a tensor"
        )
    output = windows.detach().clone()
    try:
        windows.add_(1)  # the caller owns its windows: it may write into them
        aliased = not torch.equal(mine, tokens)
    except RuntimeError:  # e.g. an expanded view, whose elements share memory
        aliased = True
    return Observation(output, {"writing into the windows changed tokens": aliased})


def judge_windows(outcome: Outcome, case: Case) -> str | None:
    if isinstance(case.expected, str):
        if outcome.output == RAISED:
            return None
        bad = case.name.split(" must")[0]
        return f"make_windows returned normally: for {bad} it must raise a ValueError"
    if outcome.output == RAISED:
        return "make_windows raised a ValueError on valid input"
    problem = compare(outcome.output, case.expected, 0, 0)
    if problem is None and outcome.probes.get("writing into the windows changed tokens"):
        return (
            "the windows are right, but they share memory with `tokens` (a view): writing into "
            "a window changed the stream. Return a copy (`.clone()`)"
        )
    return problem


register(
    Check(
        "training.make_windows",
        "consecutive windows of seq_len tokens, the remainder dropped, a copy",
        windows_cases,
        call_windows,
        judge_case=judge_windows,
    )
)


# ------------------------------------------------------------------ train_step

STEP_CFG = EVERY_KIND_OF_PARAMETER


def step_model(seed: int) -> torch.nn.Module:
    """A small GPT of the reference parts with seeded weights (the learner's random state kept)."""
    with parts.using(parts.REFERENCE), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return parts.Transformer(STEP_CFG)


def step_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    """Two parameter groups (as configure_optimizer makes), at an lr train_step must replace."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if decayed(n)], "weight_decay": 0.1},
        {"params": [p for n, p in named if not decayed(n)], "weight_decay": 0.0},
    ]
    if kind == "sgd":  # plain steps show the gradients themselves: every clipping slip shows
        return torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    # eps 1e-4, not 1e-8: some gradients are 0 in exact arithmetic (b_K's: softmax ignores
    # what all keys add alike) and float noise elsewhere, which Adam would blow up to full steps
    return torch.optim.AdamW(groups, lr=1e-4, betas=BETAS, eps=1e-4)


def step_cases() -> list[Case]:
    cases = []
    for optimizer, lrs, grad_clip, seed in [
        ("sgd", (0.5, 0.3), 0.05, 71),  # the clip scales both steps, by different factors
        ("sgd", (0.5, 0.3), None, 72),
        ("sgd", (0.2, 0.4), 0.0, 73),
        ("sgd", (0.5, 0.3), 100.0, 74),  # a norm far below the clip: nothing to clip
        ("adamw", (1e-2, 5e-3), 0.5, 75),
    ]:
        batches = [
            torch.randint(
                0, STEP_CFG.d_vocab, (4, STEP_CFG.n_ctx), generator=data.generator(seed + 10 * i)
            )
            for i in range(2)
        ]
        settings = dict(optimizer=optimizer, lrs=lrs, grad_clip=grad_clip, seed=seed)
        kind = "SGD with momentum" if optimizer == "sgd" else "AdamW"
        name = f"{kind}, lr {lrs[0]:g} then {lrs[1]:g}, grad_clip={grad_clip}"
        expected = reference_steps(*batches, settings)
        cases.append(Case(name, (*batches, settings), None, None, expected, 1e-6, 1e-5, True))
    return cases


def _flat(model: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _left_over(model: torch.nn.Module) -> Tensor:
    grads = [p.grad.detach().abs().sum() for p in model.parameters() if p.grad is not None]
    return torch.stack(grads).sum().double() if grads else torch.zeros((), dtype=torch.float64)


def reference_steps(first: Tensor, second: Tensor, settings: dict) -> dict[str, Tensor]:
    """Two steps written on torch alone: what train_step must do."""
    model = step_model(settings["seed"])
    optimizer = step_optimizer(model, settings["optimizer"])
    losses, after = [], []
    with torch.enable_grad():
        for batch, lr in zip((first, second), settings["lrs"], strict=True):
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(batch)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            if settings["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            after.append(_flat(model))
    return {
        "losses": torch.tensor(losses, dtype=torch.float64),
        "parameters after step 1": after[0],
        "parameters after step 2": after[1],
        "gradients left after step 2": _left_over(model),
    }


def call_step(train_step: Any, case: Case) -> dict[str, Any]:
    """Two steps of the learner's train_step on a fresh seeded model and optimizer."""
    first, second, settings = case.args
    model = step_model(settings["seed"])
    optimizer = step_optimizer(model, settings["optimizer"])
    losses, after = [], []
    for batch, lr in zip((first, second), settings["lrs"], strict=True):
        try:
            with torch.enable_grad():  # the checks run under no_grad; a training step needs it
                loss = train_step(model, batch, optimizer, lr=lr, grad_clip=settings["grad_clip"])
        except RuntimeError as error:
            if "does not require grad" not in str(error):
                raise
            raise CheckSetupError(
                "train_step: backward() found no gradient to follow (the loss has no grad_fn). "
                "Was the loss .detach()ed or made a number (.item()) before backward(), or "
                "computed under torch.no_grad()?"
            ) from None
        if isinstance(loss, Tensor):
            raise CheckSetupError(
                "train_step returned a torch.Tensor, expected a Python float: return loss.item()"
            )
        if not isinstance(loss, int | float) or isinstance(loss, bool):
            raise CheckSetupError(f"train_step returned a {type(loss).__name__}, expected a float")
        losses.append(float(loss))
        after.append(_flat(model))
    return {
        "losses": torch.tensor(losses, dtype=torch.float64),
        "parameters after step 1": after[0],
        "parameters after step 2": after[1],
        "gradients left after step 2": _left_over(model),
    }


_OFFSETS = list(itertools.accumulate([math.prod(s) for s in _PARAM_SHAPES.values()], initial=0))


def judge_step(outcome: Outcome, case: Case) -> str | None:
    """Like `compare`, entry by entry, naming the step and the parameter that differ most."""
    mine, expected = outcome.output, case.expected
    if type(mine) is not dict or mine.keys() != expected.keys():
        return "the check's own record of the steps is malformed"
    # in the order things happen: a wrong first step also changes the second step's loss
    first_loss = compare(mine["losses"][:1], expected["losses"][:1], case.atol, case.rtol)
    if first_loss is not None:
        return f"the loss train_step returned for the first batch is wrong: {first_loss}"
    for key in [
        "parameters after step 1",
        "losses",
        "parameters after step 2",
        "gradients left after step 2",
    ]:
        wanted = expected[key]
        problem = compare(mine[key], wanted, case.atol, case.rtol)
        if problem is None:
            continue
        if key == "losses":
            return f"the loss train_step returned for the second batch is wrong: {problem}"
        if key.startswith("gradients"):
            return (
                "the parameters still hold gradients after train_step returned "
                f"(sum of |grad| = {mine[key].item():.3g}): zero them at the end of the step"
            )
        error = (mine[key] - wanted).abs()
        worst = int(error.nan_to_num(nan=math.inf).argmax())
        i = next(j for j in range(len(_OFFSETS) - 1) if _OFFSETS[j + 1] > worst)
        name = list(_PARAM_SHAPES)[i]
        return f"{key}, {name} differs most from the reference step: {problem}"
    return None


register(
    Check(
        "training.train_step",
        "one training step: lr, loss, backward, global-norm clip, step, zero_grad",
        step_cases,
        call_step,
        judge_case=judge_step,
    )
)
