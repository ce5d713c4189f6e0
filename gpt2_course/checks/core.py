"""The machinery every check shares.

A check works in two phases, kept apart so that a grader can run them in
different processes:

* **run**: call the learner's implementation on inputs and weights that the
  check chose (`Case.args`, `Case.params`) and record what came back
  (`Outcome`): an output, or a clear error. Nothing here needs the reference.
* **judge**: compare those outputs with the expected ones, computed from the
  reference in code the learner's code never calls, and, on a failure, look
  for the common mistake that explains it.
"""

import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gpt2_course.config import TransformerConfig

# Tolerances. The reference and a correct implementation differ only by float32
# rounding and a different order of operations: at GPT-2 small size that is
# below 1e-5 absolute on normalised activations and a few ulps relative on large
# logits. atol 1e-4 and rtol 1e-3 leave room for that (einsum vs matmul, fused
# vs separate kernels, CPU vs GPU) while every mistake in the libraries moves
# outputs by 1e-2 or more on at least one case.
ATOL = 1e-4
RTOL = 1e-3


@dataclass
class Case:
    """One input the check feeds to the learner's code, and what should come out."""

    name: str
    args: tuple = ()
    params: dict[str, Tensor] | None = None  # loaded by name into a module before the call
    cfg: TransformerConfig | None = None
    expected: Any = None  # judge side only; the run phase never reads it
    atol: float = ATOL
    rtol: float = RTOL


@dataclass
class Outcome:
    """What the learner's code did on one case."""

    output: Any = None
    error: str | None = None
    not_implemented: bool = False
    modified_args: list[int] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Mistake:
    """A common wrong implementation, used to diagnose failures and in the tests."""

    name: str  # short, used as a test id
    description: str  # completes "Your output matches ..."
    implementation: Any


@dataclass
class Verdict:
    passed: bool
    feedback: str
    not_implemented: bool = False
    cases_passed: int = 0
    cases_total: int = 0
    mistakes: list[str] = field(default_factory=list)  # names of diagnosed mistakes


class CheckSetupError(Exception):
    """The learner's module cannot even be set up for the check (a clear message)."""


# --------------------------------------------------------------------------- run


def describe_exception(error: BaseException) -> str:
    """One or two lines: the error, and the line of course-external code that raised it."""
    frames = traceback.extract_tb(error.__traceback__)
    mine = [f for f in frames if "/gpt2_course/checks/" not in f.filename.replace("\\", "/")]
    where = ""
    if mine:
        frame = mine[-1]
        short = "/".join(frame.filename.replace("\\", "/").split("/")[-3:])
        where = f"\n  raised at {short}, line {frame.lineno}: {(frame.line or '').strip()}"
    message = str(error).strip() or "(no message)"
    return f"{type(error).__name__}: {message}{where}"


def load_params(module: nn.Module, params: dict[str, Tensor], what: str) -> None:
    """Copy `params` into `module` by name, with a clear error for a missing or misshapen one."""
    own = dict(module.named_parameters())
    for name, value in params.items():
        if name not in own:
            have = ", ".join(own) or "none"
            raise CheckSetupError(
                f"{what} has no parameter named `{name}` (it has: {have}). "
                f"Keep the parameter names of the stub: the checks load GPT-2's weights by name."
            )
        if tuple(own[name].shape) != tuple(value.shape):
            raise CheckSetupError(
                f"{what}.{name} has shape {list(own[name].shape)}, expected {list(value.shape)}."
            )
        with torch.no_grad():
            own[name].copy_(value)


def _snapshot(args: tuple) -> list[Tensor | None]:
    return [a.detach().clone() if isinstance(a, Tensor) else None for a in args]


def _modified(args: tuple, before: list[Tensor | None]) -> list[int]:
    changed = []
    for i, (arg, old) in enumerate(zip(args, before, strict=True)):
        if old is not None and isinstance(arg, Tensor):
            same_shape = arg.shape == old.shape
            if not same_shape or not torch.equal(arg.detach(), old):
                changed.append(i)
    return changed


def _detached(output: Any) -> Any:
    # An output may be a view of a parameter (e.g. an expanded W_pos); the module is
    # reused for the next case, so keep a copy of what it returned now.
    if isinstance(output, Tensor):
        return output.detach().clone()
    if isinstance(output, tuple | list):
        return type(output)(_detached(o) for o in output)
    return output


def run_cases(
    call: Callable[[Any, Case], Any],
    implementation: Any,
    cases: Sequence[Case],
    catch_exits: bool = False,
) -> list[Outcome]:
    """The run phase: call `implementation` on every case, catching every failure.

    With `catch_exits` (the grader's runner) a `sys.exit` or KeyboardInterrupt in
    the learner's code is that case's error too; in a notebook the learner's own
    interrupt must still stop the cell.
    """
    stops = (Exception, SystemExit, KeyboardInterrupt) if catch_exits else Exception
    outcomes = []
    for case in cases:
        args = tuple(a.clone() if isinstance(a, Tensor) else a for a in case.args)
        run_case = Case(case.name, args, case.params, case.cfg)  # no expected: not for the run side
        before = _snapshot(args)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                output = call(implementation, run_case)
            outcome = Outcome(output=_detached(output))
        except NotImplementedError as error:
            outcome = Outcome(error=describe_exception(error), not_implemented=True)
        except CheckSetupError as error:
            outcome = Outcome(error=str(error))
        except stops as error:  # learner code may raise anything
            outcome = Outcome(error=describe_exception(error))
        outcome.seconds = time.perf_counter() - start
        outcome.modified_args = _modified(args, before)
        outcomes.append(outcome)
        if outcome.not_implemented:
            break  # no point trying the other cases
    return outcomes


def build_cached(cache: dict, cls: Any, cfg: Any) -> nn.Module:
    """`cls(cfg)`, built once per class and config (building costs more than running).

    `cache` is the calling check's own dict; it keeps at most one module alive, since
    a GPT-2-sized one holds hundreds of megabytes.
    """
    key = (id(cls), id(cfg))
    module = cache.get(key)
    if module is not None and type(module) is cls:
        return module
    what = getattr(cls, "__name__", "your module")
    try:
        module = cls(cfg)
    except NotImplementedError:
        raise
    except Exception as error:
        raise CheckSetupError(f"{what}(cfg) failed: {describe_exception(error)}") from error
    if not isinstance(module, nn.Module):
        raise CheckSetupError(f"{what} must be a torch.nn.Module subclass")
    cache.clear()
    cache[key] = module
    return module


def call_module(forward: str = "forward") -> Callable[[Any, Case], Any]:
    """Build `cls(cfg)`, load the case's parameters, call `forward` (or another method).

    The module is built once per class and config and reused across cases (its
    parameters are reloaded every time): building GPT-2-sized embeddings costs
    more than running them.
    """
    built: dict[tuple[int, int], nn.Module] = {}

    def call(cls: Any, case: Case) -> Any:
        module = build_cached(built, cls, case.cfg)
        load_params(module, case.params or {}, getattr(cls, "__name__", "your module"))
        module.eval()
        return getattr(module, forward)(*case.args)

    return call


def call_function(fn: Any, case: Case) -> Any:
    """Call a plain function with the case's arguments."""
    return fn(*case.args)


# --------------------------------------------------------------------------- judge


def _fmt_index(index: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def compare(actual: Any, expected: Tensor, atol: float = ATOL, rtol: float = RTOL) -> str | None:
    """None when `actual` matches `expected`; otherwise what differs, where, and by how much."""
    if not isinstance(actual, Tensor):
        return (
            f"returned {type(actual).__name__}, expected a tensor of shape {list(expected.shape)}"
        )
    if tuple(actual.shape) != tuple(expected.shape):
        return f"output has shape {list(actual.shape)}, expected {list(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"output has dtype {actual.dtype}, expected {expected.dtype}"
    actual = actual.detach().cpu()
    expected = expected.detach().cpu()
    if actual.is_floating_point():
        bad_actual = ~torch.isfinite(actual)
        bad_expected = ~torch.isfinite(expected)
        # -inf where the reference has -inf (e.g. a masked logit) is right
        wrong_nonfinite = bad_actual & ~(bad_expected & (actual == expected))
        if wrong_nonfinite.any():
            index = wrong_nonfinite.nonzero()[0].tolist()
            kind = "NaN" if torch.isnan(actual).any() else "inf"
            count = int(wrong_nonfinite.sum())
            return (
                f"output contains {kind} ({count} of {actual.numel()} values), first at "
                f"{_fmt_index(index)} where the reference has {expected[tuple(index)].item():.6g}"
            )
        missing = bad_expected & ~bad_actual
        if missing.any():
            index = missing.nonzero()[0].tolist()
            return (
                f"output is finite at {_fmt_index(index)} ({actual[tuple(index)].item():.6g}) "
                f"where the reference has {expected[tuple(index)].item()}"
            )
        both = torch.isfinite(expected)
        error = torch.where(both, (actual - expected).abs(), torch.zeros_like(actual))
        allowed = atol + rtol * expected.abs().where(both, torch.zeros_like(expected))
        outside = error > allowed
    else:
        outside = actual != expected
        error = (actual.double() - expected.double()).abs()
    if not outside.any():
        return None
    worst = (error - (error.new_tensor(atol) if actual.is_floating_point() else 0)).argmax()
    index = list(torch.unravel_index(worst, error.shape)) if error.dim() else []
    index = [int(i) for i in index]
    fraction = outside.float().mean().item()
    where = f" at {_fmt_index(index)}" if index else ""
    return (
        f"values differ: largest error {error[tuple(index)].item():.3g}{where} "
        f"(yours {actual[tuple(index)].item():.6g}, expected {expected[tuple(index)].item():.6g}); "
        f"{fraction:.1%} of values are outside atol={atol:g}, rtol={rtol:g}"
    )


def matches(actual: Any, other: Any, atol: float, rtol: float) -> bool:
    """True when two outputs agree within tolerance (used to recognise mistakes)."""
    if not isinstance(actual, Tensor) or not isinstance(other, Tensor):
        return False
    if actual.shape != other.shape or actual.dtype != other.dtype:
        return False
    return compare(actual, other, atol, rtol) is None


def judge_cases(
    cases: Sequence[Case],
    outcomes: Sequence[Outcome],
    call: Callable[[Any, Case], Any],
    mistakes: Sequence[Mistake],
    compare_fn: Callable[[Any, Any, float, float], str | None] = compare,
) -> Verdict:
    """The judge phase: compare every outcome with its case's expected output."""
    total = len(cases)
    for i, (case, outcome) in enumerate(zip(cases, outcomes, strict=False)):
        if outcome.not_implemented:
            return Verdict(False, f"not implemented yet: {outcome.error}", True, i, total)
        if outcome.error:
            feedback = f"case '{case.name}': your code raised an error:\n  {outcome.error}"
            found = diagnose(cases, outcomes, i, call, mistakes, compare_fn)
            if found:
                feedback += (
                    "\n  This looks like a common mistake: the same error comes from "
                    + "; or ".join(m.description for m in found)
                    + "."
                )
            return Verdict(False, feedback, False, i, total, [m.name for m in found])
        problem = compare_fn(outcome.output, case.expected, case.atol, case.rtol)
        if problem is None and outcome.modified_args:
            which = ", ".join(f"argument {j + 1}" for j in outcome.modified_args)
            problem = (
                f"your code changed its input in place ({which}). Forward passes must leave "
                "their inputs alone: build a new tensor instead "
                "(e.g. `x = x - mean`, not `x -= mean`)"
            )
        if problem is not None:
            found = diagnose(cases, outcomes, i, call, mistakes, compare_fn)
            feedback = f"case '{case.name}': {problem}"
            if found:
                feedback += (
                    "\n  This looks like a common mistake: your output matches "
                    + "; or ".join(m.description for m in found)
                    + "."
                )
            return Verdict(False, feedback, False, i, total, [m.name for m in found])
    if len(outcomes) < total:
        return Verdict(False, "the check did not run every case", False, len(outcomes), total)
    return Verdict(True, f"all {total} cases match the reference", False, total, total)


def _error_line(error: str | None) -> str:
    # torch names the first bad index it meets, which varies between threads
    return re.sub(r"index -?\d+", "index N", (error or "").split("\n")[0])


def _same_behaviour(
    outcome: Outcome,
    wrong: Outcome,
    case: Case,
    compare_fn: Callable[[Any, Any, float, float], str | None],
) -> bool:
    """Did the learner's code and a known mistake do the same thing on `case`?"""
    if outcome.error or wrong.error:
        return bool(outcome.error and wrong.error) and _error_line(outcome.error) == _error_line(
            wrong.error
        )
    if compare_fn is compare and not (
        isinstance(outcome.output, Tensor) and isinstance(wrong.output, Tensor)
    ):
        return False  # a custom compare may judge non-tensor outputs (e.g. a tuple) itself
    try:
        return compare_fn(outcome.output, wrong.output, case.atol, case.rtol) is None
    except Exception:  # the learner's output may be anything
        return False


def diagnose(
    cases: Sequence[Case],
    outcomes: Sequence[Outcome],
    failed: int,
    call: Callable[[Any, Case], Any],
    mistakes: Sequence[Mistake],
    compare_fn: Callable[[Any, Any, float, float], str | None] = compare,
) -> list[Mistake]:
    """The known mistakes that behave like the learner's code.

    A mistake must match on the failing case (same output, or the same error).
    When several do, those that also match on every other case win: on small
    random-weight activations, say, "epsilon outside the square root" and "no
    epsilon" agree, and only another case tells them apart.
    """
    found: list[tuple[Mistake, list[Outcome]]] = []
    for mistake in mistakes:
        wrong = run_cases(call, mistake.implementation, [cases[failed]])[0]
        if _same_behaviour(outcomes[failed], wrong, cases[failed], compare_fn):
            found.append((mistake, []))
    if len(found) <= 1:
        return [m for m, _ in found]
    everywhere = []
    for mistake, _ in found:
        others = [
            j for j in range(len(outcomes)) if j != failed and not outcomes[j].not_implemented
        ]
        wrong = run_cases(call, mistake.implementation, [cases[j] for j in others])
        if all(
            _same_behaviour(outcomes[j], w, cases[j], compare_fn)
            for j, w in zip(others, wrong, strict=True)
        ):
            everywhere.append(mistake)
    return everywhere or [m for m, _ in found]
