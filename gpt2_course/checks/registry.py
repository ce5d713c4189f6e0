"""Every check, by its contract id `<module>.<Name>[.<method>]`, in course order.

A check module registers its checks (cases, how to call an implementation, how to
judge one case). Its mistake library lives apart, in `checks/mistakes/<module>.py`:
one table per check of (name, what it looks like, the code). A learner's copy of
the course (`gpt2-course release`) has no mistake code; there the same table is
read from `fingerprints.json`, each mistake's behaviour on the seeded cases
reduced to a few numbers, and the diagnosis compares those instead of rerunning.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import Tensor

from gpt2_course import parts
from gpt2_course.checks import fingerprints
from gpt2_course.checks.core import (
    GRADIENT,
    Case,
    Mistake,
    Outcome,
    Verdict,
    judge_gradients,
    judge_output,
    run_cases,
    same_behaviour,
    same_output,
)

# The modules of gpt2_course.checks that define checks, in course order; a module
# is imported only where its file exists.
CHECK_MODULES = [
    "bpe",
    "embeddings",
    "layernorm",
    "attention",
    "mlp",
    "block",
    "transformer",
    "training",
    "sampling",
    "kv_cache",
    "inside",
]
HERE = Path(__file__).parent
IN_PLACE = (
    "your code changed its input in place ({which}). Forward passes must leave their inputs "
    "alone: build a new tensor instead (e.g. `x = x - mean`, not `x -= mean`)"
)


@dataclass
class Check:
    id: str
    title: str
    make_cases: Callable[[], list[Case]]  # judge side: builds inputs and expected outputs
    call: Callable[[Any, Case], Any]  # how to call an implementation on one case
    points: float = 1.0
    # judge: what is wrong with an outcome on a case (None when it is right)
    judge_case: Callable[[Outcome, Case], str | None] = judge_output
    # same behaviour: do two outcomes on a case agree (yours and a known mistake's)
    same: Callable[[Outcome, Outcome, Case], bool] = same_output
    # also check the backward pass (for the parts a model trains through), on a twin of
    # a seeded case: gradients against the reference part's
    backward: bool = False

    @property
    def component(self) -> str:
        """The component under test: the id without a method name."""
        return ".".join(self.id.split(".")[:2])

    @property
    def module(self) -> str:
        return self.id.split(".")[0]

    @cached_property
    def cases(self) -> list[Case]:
        cases = self.make_cases()
        if self.backward:  # the cheapest seeded case: any case shows a cut graph
            cases.append(self._gradient_case(min((c for c in cases if c.seeded), key=_size)))
        return cases

    def _gradient_case(self, case: Case) -> Case:
        """`case` again, now also comparing gradients with the reference part's."""
        twin = replace(case, name=f"{case.name}: gradients", backward=True)
        right = run_cases(self.call, parts.reference_implementation(self.id), [twin])[0]
        if right.error:
            raise RuntimeError(f"the reference part failed on {twin.name!r}: {right.error}")
        twin.expected_grads = {
            name.removeprefix(GRADIENT): value
            for name, value in right.probes.items()
            if name.startswith(GRADIENT)
        }
        return twin

    @cached_property
    def mistakes(self) -> list[Mistake]:
        """The mistake library: code where the course has it, else stored fingerprints."""
        return mistake_table(self.id)

    def run(self, implementation: Any) -> list[Outcome]:
        """Phase 1: run an implementation on the check's inputs."""
        return run_cases(self.call, implementation, self.cases)

    def judge(self, outcomes: list[Outcome]) -> Verdict:
        """Phase 2: compare the outcomes with the reference and diagnose mistakes."""
        for i, (case, outcome) in enumerate(zip(self.cases, outcomes, strict=False)):
            if outcome.not_implemented:
                return Verdict(False, f"not implemented yet: {outcome.error}", True)
            if outcome.error:
                problem = f"your code raised an error:\n  {outcome.error}"
                if case.backward:
                    problem += "\n  (This case runs your code with gradients on, as training does.)"
                lead = "the same error comes from"
            else:
                problem, lead = self.judge_case(outcome, case), "your output matches"
                if problem is None and case.backward:
                    problem = judge_gradients(outcome, case)
                if problem is None and outcome.modified_args:
                    which = ", ".join(f"argument {j + 1}" for j in outcome.modified_args)
                    # right values, wrong manners: no mistake of the library explains it
                    return Verdict(False, f"case '{case.name}': " + IN_PLACE.format(which=which))
            if problem is not None:
                found = self.diagnose(outcomes, i)
                feedback = f"case '{case.name}': {problem}"
                if found:
                    descriptions = "; or ".join(m.description for m in found)
                    feedback += f"\n  This looks like a common mistake: {lead} {descriptions}."
                return Verdict(False, feedback, False, [m.name for m in found])
        if len(outcomes) < len(self.cases):
            return Verdict(False, "the check did not run every case")
        return Verdict(True, f"all {len(self.cases)} cases match the reference")

    def diagnose(self, outcomes: list[Outcome], failed: int) -> list[Mistake]:
        """The known mistakes that behave like the learner's code, on the seeded cases.

        A mistake must behave the same on the first seeded case the learner fails.
        When several do, those that also agree on every other seeded case win: on
        small activations, say, "epsilon outside the square root" and "no epsilon"
        agree, and only another case tells them apart. Only seeded cases count, so
        that the full course (running each mistake's code) and a release (reading
        its fingerprints) name the same mistakes in every weights mode.
        """
        seeded = [
            j
            for j, outcome in enumerate(outcomes)
            if self.cases[j].seeded and not outcome.not_implemented
        ]
        failing = [j for j in seeded if j == failed or self._fails(outcomes[j], j)]
        if not failing:
            return []
        first = failing[0]
        runs: dict[tuple[str, int], Outcome] = {}
        found = [m for m in self.mistakes if self._behaves_like(m, outcomes, first, runs)]
        if len(found) > 1:
            everywhere = [
                m for m in found if all(self._behaves_like(m, outcomes, j, runs) for j in seeded)
            ]
            found = everywhere or found
        return found

    def _fails(self, outcome: Outcome, index: int) -> bool:
        if outcome.error:
            return True
        try:
            return self.judge_case(outcome, self.cases[index]) is not None
        except Exception:
            return True

    def _behaves_like(
        self, mistake: Mistake, outcomes: list[Outcome], index: int, runs: dict
    ) -> bool:
        case = self.cases[index]
        if mistake.implementation is None:  # a release: compare with the stored fingerprint
            stored = (mistake.fingerprints or {}).get(index)
            return stored is not None and fingerprints.matches(outcomes[index], stored, case, index)
        key = (mistake.name, index)
        if key not in runs:
            runs[key] = run_cases(self.call, mistake.implementation, [case])[0]
        return same_behaviour(outcomes[index], runs[key], case, self.same)


def _size(case: Case) -> int:
    tensors = [*case.args, *(case.params or {}).values()]
    return sum(t.numel() for t in tensors if isinstance(t, Tensor))


CHECKS: dict[str, Check] = {}


def register(check: Check) -> Check:
    if check.id in CHECKS:
        raise ValueError(f"check {check.id} registered twice")
    CHECKS[check.id] = check
    return check


def mistake_table(check_id: str) -> list[Mistake]:
    """A check's mistakes: from `checks/mistakes/` (full course) or `fingerprints.json`."""
    module = check_id.split(".")[0]
    if (HERE / "mistakes" / f"{module}.py").is_file():
        library = importlib.import_module(f"gpt2_course.checks.mistakes.{module}")
        cuts = importlib.import_module("gpt2_course.checks.mistakes.gradients")  # graph cut
        return [*library.MISTAKES.get(check_id, []), *cuts.MISTAKES.get(check_id, [])]
    return fingerprints.stored_mistakes(check_id)


def all_checks() -> dict[str, Check]:
    """Every registered check, importing the check modules on first use."""
    for name in CHECK_MODULES:
        if (HERE / f"{name}.py").is_file():
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
