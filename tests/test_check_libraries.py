"""Every registered check: the solutions pass, the stubs fail, and every known mistake
fails with its diagnosis. New check modules are picked up automatically."""

import pytest

from gpt2_course import parts
from gpt2_course.checks import all_checks, run_check
from gpt2_course.grading import protocol

CHECKS = all_checks()
MISTAKES = [(cid, m) for cid, c in CHECKS.items() for m in c.mistakes]


@pytest.mark.parametrize("check_id", list(CHECKS))
def test_solution_passes(check_id):
    result = run_check(check_id, parts.SOLUTIONS)
    assert result.passed, result.feedback
    assert result.points == result.max_points > 0


@pytest.mark.parametrize("check_id", list(CHECKS))
def test_stub_is_not_implemented(check_id):
    result = run_check(check_id, parts.EXERCISES)
    assert not result.passed
    assert result.status == "not implemented", result.feedback
    assert result.points == 0
    assert "gpt2_course/exercises/" in result.feedback


@pytest.mark.parametrize(
    ("check_id", "mistake"), MISTAKES, ids=[f"{c}-{m.name}" for c, m in MISTAKES]
)
def test_mistake_fails_and_is_named(check_id, mistake):
    # as the grader does it: outcomes cross from the runner to the judge as plain data
    check = CHECKS[check_id]
    data = protocol.encode_outcomes(check_id, check.run(mistake.implementation))
    verdict = check.judge(protocol.decode_outcomes(data, check_id, len(check.cases)))
    assert not verdict.passed
    assert mistake.name in verdict.mistakes, verdict.feedback
    assert mistake.description in verdict.feedback


def test_check_ids_follow_the_contract():
    for check_id, check in CHECKS.items():
        assert check.component in parts.COMPONENTS or check.module == "kv_cache", check_id
        assert check.mistakes, f"{check_id} has no mistake library"
