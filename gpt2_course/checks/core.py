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

import importlib.util
import os
import re
import sysconfig
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
    # Made from seeded numbers alone, not from the reference's weights: the same in
    # every weights mode, so a release can diagnose on it from stored fingerprints.
    seeded: bool = False
    # Also take the gradients of a seeded scalar of the output (see `gradients`), and
    # compare them with `expected_grads` (judge side only, like `expected`).
    backward: bool = False
    expected_grads: dict[str, Tensor | None] | None = None


@dataclass
class Observation:
    """What a call saw: the implementation's output, and what its probes recorded
    (e.g. the input a submodule received), by name."""

    output: Any = None
    probes: dict[str, Any] = field(default_factory=dict)
    # the parameters, by name, whose gradients a backward case takes (with the inputs')
    parameters: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Outcome:
    """What the learner's code did on one case."""

    output: Any = None
    error: str | None = None
    not_implemented: bool = False
    modified_args: list[int] = field(default_factory=list)
    seconds: float = 0.0
    probes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Mistake:
    """A common wrong implementation: what it looks like, and its code (None in a release,
    which diagnoses from the stored `fingerprints` of its behaviour instead)."""

    name: str  # short, used as a test id
    description: str  # completes "Your output matches ..."
    implementation: Any = None
    fingerprints: dict[int, Any] | None = None  # case index -> fingerprint


@dataclass
class Verdict:
    passed: bool
    feedback: str
    not_implemented: bool = False
    mistakes: list[str] = field(default_factory=list)  # names of diagnosed mistakes


class CheckSetupError(Exception):
    """The learner's module cannot even be set up for the check (a clear message)."""


# --------------------------------------------------------------------------- run


def _course_internal(filename: str) -> bool:
    """Frames that are not the learner's: libraries, the standard library and the
    course's own code (everything in gpt2_course/ except the exercises, and the reference
    solutions, which a learner's code reaches through a lent part)."""
    path = _path(filename)
    if path.startswith("<") or "/site-packages/" in path or "/dist-packages/" in path:
        return True
    if path.startswith(_STDLIB) or _in_solutions(filename):
        return True
    return "/gpt2_course/" in path and "/gpt2_course/exercises/" not in path


def _path(filename: str) -> str:
    """A frame's file as an absolute path with forward slashes ("<...>" names kept)."""
    path = filename if filename.startswith("<") else os.path.abspath(filename)
    return path.replace("\\", "/")


def _in_solutions(filename: str) -> bool:
    return _SOLUTIONS is not None and _path(filename).startswith(_SOLUTIONS)


def _solutions_folder() -> str | None:
    spec = importlib.util.find_spec("solutions")  # None in a learner's release
    locations = list(spec.submodule_search_locations or []) if spec else []
    return str(Path(locations[0]).resolve()).replace("\\", "/") + "/" if locations else None


_STDLIB = sysconfig.get_paths()["stdlib"].replace("\\", "/")
_SOLUTIONS = _solutions_folder()


def describe_exception(error: BaseException) -> str:
    """One or two lines: the error, and the learner's own line that led to it.

    That is the deepest frame in the learner's files (an einops error is reported
    where the learner called einops, not inside einops, and one inside a lent part
    where the learner called the part); with no such frame (the solutions checked
    themselves), the deepest frame in the solutions, else the deepest outside the checks.
    """
    frames = traceback.extract_tb(error.__traceback__)
    mine = (
        [f for f in frames if not _course_internal(f.filename)]
        or [f for f in frames if _in_solutions(f.filename)]
        or [f for f in frames if "/gpt2_course/checks/" not in _path(f.filename)]
    )
    where = ""
    if mine:
        frame = mine[-1]
        short = "/".join(frame.filename.replace("\\", "/").split("/")[-3:])
        where = f"\n  raised at {short}, line {frame.lineno}: {(frame.line or '').strip()}"
        deeper = frames[frames.index(frame) + 1 :]
        if any(_in_solutions(f.filename) for f in deeper):
            where += "\n  (inside the reference solution your code called there)"
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
    return [
        i
        for i, (arg, old) in enumerate(zip(args, before, strict=True))
        if old is not None and not (arg.shape == old.shape and torch.equal(arg.detach(), old))
    ]


def _detached(output: Any) -> Any:
    # An output may be a view of a parameter (e.g. an expanded W_pos); the module is
    # reused for the next case, so keep a copy of what it returned now.
    if isinstance(output, Tensor):
        return output.detach().clone()
    if isinstance(output, tuple | list):
        return type(output)(_detached(o) for o in output)
    if type(output) is dict:  # built afresh by the call (probes, parameters by name): no copy
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in output.items()}
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
        args = tuple(_input(a, case.backward) for a in case.args)
        # no expected values: they are not for the run side
        run_case = Case(case.name, args, case.params, case.cfg, backward=case.backward)
        before = _snapshot(args)
        start = time.perf_counter()
        try:
            with torch.set_grad_enabled(case.backward):
                seen = call(implementation, run_case)
                if not isinstance(seen, Observation):
                    seen = Observation(seen)
                probes = gradients(seen, args) if case.backward else {}
            probes |= {name: _detached(value) for name, value in seen.probes.items()}
            outcome = Outcome(output=_detached(seen.output), probes=probes)
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


def _input(arg: Any, backward: bool) -> Any:
    """The learner's own copy of an input; a float tensor that a backward case differentiates."""
    if not isinstance(arg, Tensor):
        return arg
    copy = arg.detach().clone()
    return copy.requires_grad_() if backward and copy.is_floating_point() else copy


GRADIENT = "gradient of "  # the probes of a backward case: "gradient of W_Q", ...


def output_weights(shape: torch.Size) -> Tensor:
    """Fixed weights in [-1, 1) for the scalar sum(output * weights) whose gradients a
    backward case takes: every output element counts, each differently."""
    g = torch.Generator().manual_seed(1729 + sum(shape))
    return torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1


def gradients(seen: Observation, args: tuple) -> dict[str, Tensor | None]:
    """The gradients of sum(output * output_weights) with respect to every float input
    and every parameter the call named; None where no gradient reaches (e.g. an output
    `.detach()`ed, or a parameter with requires_grad=False)."""
    inputs = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
    wrt = {_input_name(i, len(inputs)): a for i, a in enumerate(inputs)} | seen.parameters
    output = seen.output
    if not isinstance(output, Tensor) or not output.is_floating_point():
        return {}  # the judge reports the output itself
    reached = [name for name, t in wrt.items() if t.requires_grad and output.requires_grad]
    grads: dict[str, Tensor | None] = dict.fromkeys(wrt)
    if reached:
        scalar = (output * output_weights(output.shape).to(output)).sum()
        found = torch.autograd.grad(scalar, [wrt[n] for n in reached], allow_unused=True)
        grads |= {
            n: None if g is None else g.detach().clone()
            for n, g in zip(reached, found, strict=True)
        }
    return {GRADIENT + name: g for name, g in grads.items()}


def _input_name(i: int, n: int) -> str:
    return "the input" if n == 1 else f"float input {i + 1}"


def named_parameters(module: nn.Module, case: Case) -> dict[str, Tensor]:
    """The parameters whose gradients a backward case compares: those it loaded."""
    if not case.backward:
        return {}
    own = dict(module.named_parameters())
    return {name: own[name] for name in (case.params or own) if name in own}


def build_cached(cache: dict, cls: Any, cfg: Any, unfilled: bool = False) -> nn.Module:
    """`cls(cfg)`, built once per class and config (building costs more than running).

    `cache` is the calling check's own dict; it keeps at most one module alive, since
    a GPT-2-sized one holds hundreds of megabytes. `unfilled`: every parameter is about
    to be overwritten, so skip drawing random ones (build on the "meta" device, then give
    it empty memory); a module with buffers, or one that cannot be built so, is built
    the ordinary way.
    """
    key = (id(cls), id(cfg))
    module = cache.get(key)
    if module is not None and type(module) is cls:
        return module
    what = getattr(cls, "__name__", "your module")
    try:
        module = _build_unfilled(cls, cfg) if unfilled else None
        module = module if module is not None else cls(cfg)
    except NotImplementedError:
        raise
    except Exception as error:
        raise CheckSetupError(f"{what}(cfg) failed: {describe_exception(error)}") from error
    if not isinstance(module, nn.Module):
        raise CheckSetupError(f"{what} must be a torch.nn.Module subclass")
    cache.clear()
    cache[key] = module
    return module


def _build_unfilled(cls: Any, cfg: Any) -> nn.Module | None:
    try:
        with torch.device("meta"):
            module = cls(cfg)
        if isinstance(module, nn.Module) and not any(True for _ in module.buffers()):
            return module.to_empty(device="cpu")
    except NotImplementedError:
        raise
    except Exception:
        pass  # built the ordinary way, which reports a genuine error properly
    return None


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
        return Observation(getattr(module, forward)(*case.args), {}, named_parameters(module, case))

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


def same_output(mine: Outcome, other: Outcome, case: Case) -> bool:
    """The default same-behaviour test, as a fingerprint sees it: the same output and the
    same probes, tensors within the case's tolerance and NaN where the other has NaN."""
    return _same_value(mine.output, other.output, case.atol, case.rtol) and _same_value(
        mine.probes, other.probes, case.atol, case.rtol
    )


def _same_value(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            nan = torch.isnan(b)
            if not torch.equal(torch.isnan(a), nan):
                return False
            a, b = a.masked_fill(nan, 0.0), b.masked_fill(nan, 0.0)
        return compare(a, b, atol, rtol) is None
    if type(a) in (tuple, list) and type(b) is type(a):
        return len(a) == len(b) and all(
            _same_value(x, y, atol, rtol) for x, y in zip(a, b, strict=True)
        )
    if type(a) is dict and type(b) is dict:
        return a.keys() == b.keys() and all(_same_value(a[k], b[k], atol, rtol) for k in a)
    if type(a) is float and type(b) is float:
        return a == b or abs(a - b) <= atol + rtol * abs(b)
    return type(a) is type(b) and a == b


def judge_output(outcome: Outcome, case: Case) -> str | None:
    """The default judge: the output against the case's expected tensor."""
    return compare(outcome.output, case.expected, case.atol, case.rtol)


# Gradients are compared relative to their largest value: float32 rounding in a backward
# pass through GPT-2-sized sums stays below 1e-5 of it, while every gradient-blocking
# mistake moves some gradient by all of its size.
GRAD_ATOL, GRAD_RTOL = 1e-4, 1e-3
NO_GRADIENT = (
    "Something cuts the autograd graph: a `.detach()`, `.data`, `.item()`, `.tolist()` or "
    "`.numpy()`, a `torch.no_grad()` block, or a new tensor built from values "
    "(`torch.tensor(...)`). The forward pass is right, but training could not learn through it"
)


def judge_gradients(outcome: Outcome, case: Case) -> str | None:
    """A backward case's gradients against the reference's (None when they match)."""
    expected = case.expected_grads or {}
    missing = [
        n for n, g in expected.items() if g is not None and outcome.probes.get(GRADIENT + n) is None
    ]
    if missing and len(missing) == sum(g is not None for g in expected.values()):
        return f"no gradient flows back through your code at all. {NO_GRADIENT}."
    if missing:
        names = ", ".join(map(_quoted, missing[:6])) + (", ..." if len(missing) > 6 else "")
        them = "them" if len(missing) > 1 else "it"
        return f"no gradient reaches {names}, so training would never change {them}. {NO_GRADIENT}."
    # a gradient that should be ~0 (b_K's: softmax ignores a shift shared by a row) is
    # judged on the scale of the case's largest gradient
    scale = max((float(g.abs().max()) for g in expected.values() if g is not None), default=0.0)
    atol = GRAD_ATOL * max(scale, 1e-12)
    for name, wanted in expected.items():
        if wanted is None:
            continue
        problem = compare(outcome.probes[GRADIENT + name], wanted, atol, GRAD_RTOL)
        if problem is not None:
            return (
                "the forward pass is right, but the gradient with respect to "
                f"{_quoted(name)} is not the reference's "
                f"({problem.replace('output', 'gradient')}). Part of the "
                "computation is probably cut from the autograd graph (`.detach()`, `.data`) "
                "or computed from a detached copy"
            )
    return None


def _quoted(name: str) -> str:
    return name if name.startswith(("the input", "float input")) else f"`{name}`"


def same_behaviour(
    mine: Outcome, other: Outcome, case: Case, same: Callable[[Outcome, Outcome, Case], bool]
) -> bool:
    """Did two implementations do the same thing on `case` (the same error, or `same` output)?"""
    if mine.error or other.error:
        return bool(mine.error and other.error) and error_line(mine.error) == error_line(
            other.error
        )
    try:
        return bool(same(mine, other, case))
    except Exception:  # the learner's output may be anything
        return False


def error_line(error: str | None) -> str:
    """An error's first line, without what varies between runs and threads."""
    # torch names the first bad index it meets, which varies between threads
    return re.sub(r"index -?\d+", "index N", (error or "").split("\n")[0])
