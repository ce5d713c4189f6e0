"""`gpt2-course grade`: full marks for the solutions, zero for the stubs, and bad
submissions (missing, broken zips, crashes, hangs) graded without taking the grader down."""

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from gpt2_course import cli
from gpt2_course.checks import all_checks
from gpt2_course.grading import Grade, format_csv, grade_submission

ROOT = Path(__file__).resolve().parents[1]
MAX = sum(c.points for c in all_checks().values())


def grade_json(capsys, *paths: str) -> list[dict]:
    assert cli.main(["grade", *paths, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_solutions_full_marks_stubs_zero(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    solutions, stubs = grade_json(capsys, "solutions", "gpt2_course/exercises")
    assert set(solutions) == {"submission", "score", "max_score", "checks"}
    assert solutions["submission"] == "solutions"
    assert solutions["score"] == solutions["max_score"] == MAX
    assert [c["id"] for c in solutions["checks"]] == list(all_checks())
    assert all(c["passed"] and c["points"] == c["max_points"] for c in solutions["checks"])
    assert set(solutions["checks"][0]) == {"id", "passed", "points", "max_points", "feedback"}
    assert stubs["score"] == 0 and stubs["max_score"] == MAX
    assert all("not implemented" in c["feedback"] for c in stubs["checks"])


def test_zip_of_a_checkout_and_table_format(tmp_path, capsys):
    # a learner's checkout, zipped with its top-level folder, edited to the solutions
    checkout = tmp_path / "alice-gpt2-course"
    shutil.copytree(ROOT / "gpt2_course" / "exercises", checkout / "gpt2_course" / "exercises")
    shutil.copy(ROOT / "solutions" / "layernorm.py", checkout / "gpt2_course" / "exercises")
    archive = tmp_path / "alice.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in checkout.rglob("*.py"):
            z.write(path, path.relative_to(tmp_path))
    assert cli.main(["grade", str(archive)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if "alice.zip" in line)
    ln_points = all_checks()["layernorm.LayerNorm"].points
    assert f"{ln_points:g}/{MAX:g}" in row
    assert "layernorm.LayerNorm" not in row  # not among the failed checks
    assert "embeddings.Embedding" in row


def test_unsafe_zip_is_refused_without_extracting(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../escaped.py", "print('gotcha')")
    grade = grade_submission(str(archive))
    assert grade.score == 0
    assert "unsafe path" in grade.checks[0].feedback
    assert not (tmp_path.parent / "escaped.py").exists()


def test_not_a_zip_and_missing_paths(tmp_path):
    fake = tmp_path / "fake.zip"
    fake.write_text("this is not a zip")
    assert "not a readable zip" in grade_submission(str(fake)).checks[0].feedback
    assert "does not exist" in grade_submission(str(tmp_path / "nope")).checks[0].feedback
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no exercise files" in grade_submission(str(empty)).checks[0].feedback


def test_learner_code_that_kills_the_process(tmp_path):
    (tmp_path / "layernorm.py").write_text("import os\nos._exit(3)\n")
    grade = grade_submission(str(tmp_path))
    assert grade.score == 0
    assert "process died" in grade.checks[0].feedback


def test_learner_code_that_hangs(tmp_path):
    (tmp_path / "layernorm.py").write_text("while True:\n    pass\n")
    grade = grade_submission(str(tmp_path), timeout=30)
    assert grade.score == 0
    assert "stopped after 30 s" in grade.checks[0].feedback


def test_grading_never_writes_into_the_submission(tmp_path):
    shutil.copy(ROOT / "solutions" / "layernorm.py", tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*")}
    grade_submission(str(tmp_path))
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if "__pycache__" not in p.parts}
    assert after == before


@pytest.mark.parametrize("score", [0.0, 2.5])
def test_csv_has_one_column_per_check(score):
    ids = list(all_checks())
    from gpt2_course.grading import CheckGrade

    grade = Grade("bob", score, MAX, [CheckGrade(i, False, 0.0, 1.0, "") for i in ids])
    header, row = format_csv([grade]).splitlines()
    assert header.split(",") == ["submission", "score", "max_score", *ids]
    assert row.startswith(f"bob,{score}")
