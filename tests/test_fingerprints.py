"""A release diagnoses from stored fingerprints what the full course diagnoses from the
mistakes' code: for every mistake, both name it, and they name the same mistakes."""

import json
from functools import cache

import pytest

from gpt2_course.checks import all_checks, fingerprints
from gpt2_course.checks.core import Mistake, Outcome
from gpt2_course.grading import protocol

CHECKS = all_checks()
MISTAKES = [(cid, m) for cid, c in CHECKS.items() for m in c.mistakes]


@cache
def stored(check_id: str) -> list[Mistake]:
    """The check's mistakes as a release holds them: through the JSON file format."""
    data = json.loads(json.dumps(fingerprints.build([check_id])))
    return [
        Mistake(
            e["name"], e["description"], fingerprints={int(i): f for i, f in e["seeded"].items()}
        )
        for e in data[check_id]
    ]


def judge_with(check, mistakes: list[Mistake], outcomes: list[Outcome]):
    code = check.__dict__.get("mistakes")
    check.__dict__["mistakes"] = mistakes
    try:
        return check.judge(outcomes)
    finally:
        check.__dict__["mistakes"] = code


@pytest.mark.parametrize(
    ("check_id", "mistake"), MISTAKES, ids=[f"{c}-{m.name}" for c, m in MISTAKES]
)
def test_code_and_fingerprints_name_the_same_mistakes(check_id, mistake):
    check = CHECKS[check_id]
    data = protocol.encode_outcomes(check_id, check.run(mistake.implementation))
    outcomes = protocol.decode_outcomes(data, check_id, len(check.cases))
    from_code = check.judge(outcomes)
    from_prints = judge_with(check, stored(check_id), outcomes)
    assert mistake.name in from_code.mistakes, from_code.feedback
    assert from_prints.mistakes == from_code.mistakes, (from_prints.feedback, from_code.feedback)
    assert from_prints.feedback == from_code.feedback


@pytest.mark.parametrize("check_id", list(CHECKS))
def test_every_mistake_shows_on_a_seeded_case(check_id):
    # fingerprints hold only seeded cases: a mistake right on all of them is undiagnosable there
    check = CHECKS[check_id]
    assert any(case.seeded for case in check.cases), f"{check_id} has no seeded case"


def test_a_fingerprint_holds_no_output_wholesale():
    # a few numbers per tensor, not the tensor: nothing to rebuild the mistake's code from
    check = CHECKS["layernorm.LayerNorm"]
    for mistake in stored(check.id):
        for print_ in mistake.fingerprints.values():
            for _, leaf in print_.get("leaves", []):
                if "nonfinite" not in leaf:  # not a float tensor: a hash (e.g. no gradient)
                    assert set(leaf) <= {"hash", "float", "shape", "dtype"}, leaf
                    continue
                assert len(leaf.get("spots", [])) <= fingerprints.SPOTS + fingerprints.RANDOM_SPOTS
                assert len(leaf.get("proj", [])) == fingerprints.DIRECTIONS
