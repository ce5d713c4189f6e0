"""Checks of the learner's components against the TransformerLens reference.

In a notebook:  `check("layernorm.LayerNorm")`
In a terminal:  `gpt2-course check layernorm.LayerNorm`
"""

import contextlib
import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2_course import parts, policy
from gpt2_course.checks.core import Verdict, describe_exception
from gpt2_course.checks.registry import Check, all_checks, get_check

# status -> (terminal mark, colour, symbol)
LOOK = {
    "passed": ("PASS", "#1a7f37", "&#10004;"),
    "failed": ("FAIL", "#cf222e", "&#10008;"),
    "not implemented": ("TODO", "#9a6700", "&#8230;"),
}


@dataclass
class CheckResult:
    id: str
    passed: bool
    status: str  # "passed", "failed" or "not implemented"
    points: float
    max_points: float
    feedback: str
    seconds: float

    def report(self) -> str:
        return f"[{LOOK[self.status][0]}] {self.id} ({self.seconds:.2f} s): {self.feedback}"

    def _repr_html_(self) -> str:  # shown in notebooks
        import html

        _, colour, symbol = LOOK[self.status]
        return (
            f'<div style="border-left:4px solid {colour};padding:4px 10px">'
            f'<b style="color:{colour}">{symbol} {html.escape(self.id)}: {self.status}</b> '
            f"<small>({self.seconds:.2f} s)</small>"
            '<pre style="white-space:pre-wrap;margin:4px 0">'
            f"{html.escape(self.feedback)}</pre></div>"
        )

    def __repr__(self) -> str:
        return self.report()


def load_implementation(check: Check, package: str) -> Any:
    """The object under test from `package`, or raise ImportError with a clear message."""
    module, name = check.component.split(".")
    where = f"{package.replace('.', '/')}/{module}.py"
    try:
        source = parts.load(package, module)
    except SyntaxError as error:
        raise ImportError(
            f"{where} has a syntax error on line {error.lineno}: {error.msg}"
        ) from error
    except Exception as error:
        if isinstance(error, ModuleNotFoundError) and (error.name or "").endswith(module):
            raise ImportError(f"{where} is missing") from error
        raise ImportError(f"importing {where} failed: {describe_exception(error)}") from error
    implementation = getattr(source, name, None)
    if implementation is None:
        raise ImportError(f"{where} defines no `{name}`: keep the names of the stub")
    return implementation


def judge_implementation(check: Check, implementation: Any) -> Verdict:
    """Run then judge one implementation (both phases, in this process)."""
    return check.judge(check.run(implementation))


def package_folder(package: str) -> Path | None:
    """Where the files of an importable package lie (None if it has no folder)."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    locations = list(getattr(module, "__path__", []) or [])
    return Path(locations[0]) if locations else None


def run_check(check_id: str, package: str | None = None) -> CheckResult:
    """Check the learner's component (or the one in `package`) and return the result.

    The same shortcut policy as the grader's: the source is scanned first (a
    refused import or call is reported with its line, and nothing runs), then the
    learner's code runs under the policy's guard.
    """
    check = get_check(check_id)
    package = package or (parts.SOLUTIONS if parts.solutions_everywhere() else parts.EXERCISES)
    start = time.perf_counter()
    folder = package_folder(package)
    refused = policy.scan_submission(folder, check_id) if folder else []

    def guard() -> contextlib.AbstractContextManager:
        return policy.runtime_guard(check_id, folder) if folder else contextlib.nullcontext()

    if refused:
        return result_of(check, Verdict(False, policy.feedback(refused)), 0.0)
    try:
        with guard():
            implementation = load_implementation(check, package)
    except ImportError as error:
        verdict = Verdict(False, str(error))
    else:
        try:
            _ = check.cases  # built by the course, not the learner: a failure here is ours
        except Exception as error:
            verdict = Verdict(
                False,
                "the check could not prepare its inputs (a problem in the course, not in your "
                f"code; please report it): {describe_exception(error)}",
            )
        else:
            with guard():
                outcomes = check.run(implementation)
            verdict = check.judge(outcomes)
    return result_of(check, verdict, time.perf_counter() - start)


def result_of(check: Check, verdict: Verdict, seconds: float) -> CheckResult:
    status = (
        "passed" if verdict.passed else ("not implemented" if verdict.not_implemented else "failed")
    )
    points = check.points if verdict.passed else 0.0
    return CheckResult(
        check.id, verdict.passed, status, points, check.points, verdict.feedback, seconds
    )


def check(*check_ids: str) -> None:
    """Run checks and show the results (for notebook check cells)."""
    results = [run_check(cid) for cid in check_ids]
    for result in results:
        _show(result)
    failed = [r.id for r in results if not r.passed]
    if failed and parts.solutions_everywhere():
        # CI runs the notebooks on the solutions: a failing check there is a course bug
        raise AssertionError(f"reference solutions failed: {', '.join(failed)}")


def _show(result: CheckResult) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is not None:
            display(result)
            return
    except ImportError:
        pass
    print(result.report())


__all__ = ["CheckResult", "all_checks", "check", "get_check", "run_check"]
