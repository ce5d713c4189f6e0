"""Every check, by its contract id `<module>.<Name>[.<method>]`, in course order."""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from gpt2_course.checks.core import Case, Mistake, Outcome, Verdict, compare, judge_cases, run_cases

# The modules of gpt2_course.checks that define checks, in course order; a module
# is imported only where its file exists.
CHECK_MODULES = [
    "embeddings",
    "layernorm",
    "attention",
    "mlp",
    "block",
    "transformer",
    "training",
    "sampling",
    "kv_cache",
]


@dataclass
class Check:
    id: str
    title: str
    make_cases: Callable[[], list[Case]]  # judge side: builds inputs and expected outputs
    call: Callable[[Any, Case], Any]  # how to call an implementation on one case
    mistakes: list[Mistake] = field(default_factory=list)
    points: float = 1.0
    compare: Callable[[Any, Any, float, float], str | None] = compare

    @property
    def component(self) -> str:
        """The component under test: the id without a method name."""
        return ".".join(self.id.split(".")[:2])

    @property
    def module(self) -> str:
        return self.id.split(".")[0]

    @cached_property
    def cases(self) -> list[Case]:
        return self.make_cases()

    def run(self, implementation: Any) -> list[Outcome]:
        """Phase 1: run an implementation on the check's inputs."""
        return run_cases(self.call, implementation, self.cases)

    def judge(self, outcomes: list[Outcome]) -> Verdict:
        """Phase 2: compare the outcomes with the reference and diagnose mistakes."""
        return judge_cases(self.cases, outcomes, self.call, self.mistakes, self.compare)


CHECKS: dict[str, Check] = {}


def register(check: Check) -> Check:
    if check.id in CHECKS:
        raise ValueError(f"check {check.id} registered twice")
    CHECKS[check.id] = check
    return check


def all_checks() -> dict[str, Check]:
    """Every registered check, importing the check modules on first use."""
    here = Path(__file__).parent
    for name in CHECK_MODULES:
        if (here / f"{name}.py").is_file():
            importlib.import_module(f"gpt2_course.checks.{name}")
    return {cid: CHECKS[cid] for cid in sorted(CHECKS, key=_course_order)}


def _course_order(check_id: str) -> tuple[int, str]:
    module = check_id.split(".")[0]
    position = CHECK_MODULES.index(module) if module in CHECK_MODULES else len(CHECK_MODULES)
    return position, ""  # registration order within a module (sorted is stable)


def get_check(check_id: str) -> Check:
    checks = all_checks()
    if check_id not in checks:
        raise KeyError(f"No check {check_id!r}. Checks: {', '.join(checks)}")
    return checks[check_id]
