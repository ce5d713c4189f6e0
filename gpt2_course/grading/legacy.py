"""Grade learners' submissions: `gpt2-course grade SUBMISSION... --format table|json|csv`.

A submission is a folder of exercise files, a course checkout that contains
`gpt2_course/exercises/`, or a `.zip` of either. Each submission is graded in a
child process of its own, with a time limit, so that a crash, a hang or a
stray `sys.exit` in one learner's code costs that learner the marks and
nothing else. Inside the child, every check runs its two phases (run the
learner's code, then judge the outputs) exactly as in a notebook.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_TIMEOUT = 900  # seconds per submission: building the reference takes ~20 s
MAX_ZIP_BYTES = 50 * 1024 * 1024  # exercise files are tiny; refuse zip bombs


from gpt2_course.grading.reports import CheckGrade, Grade, format_csv, format_table
from gpt2_course.grading.submissions import (
    SubmissionError,
    extract_zip,
    find_exercises,
    load_submission_package,
)


def grade_folder(folder: Path, label: str) -> Grade:
    """Grade the exercises in `folder` in this process (the child's job)."""
    from gpt2_course import parts
    from gpt2_course.checks import all_checks, run_check

    checks = all_checks()
    try:
        exercises = find_exercises(folder)
    except SubmissionError as error:
        return failed_grade(label, str(error))
    package = load_submission_package(exercises)
    grade = Grade(label, 0.0, 0.0)
    # Parts that a submitted component builds (a block's LayerNorm, say) come from the
    # same submission; the checks of composite parts choose their own sub-parts.
    with parts.using(package):
        for check_id in checks:
            result = run_check(check_id, package)
            feedback = result.feedback.replace(str(exercises), "<submission>")
            grade.checks.append(
                CheckGrade(check_id, result.passed, result.points, result.max_points, feedback)
            )
    grade.score = sum(c.points for c in grade.checks)
    grade.max_score = sum(c.max_points for c in grade.checks)
    return grade


def failed_grade(label: str, reason: str) -> Grade:
    """Zero marks on every check, each saying why."""
    from gpt2_course.checks import all_checks

    checks = [CheckGrade(cid, False, 0.0, c.points, reason) for cid, c in all_checks().items()]
    return Grade(label, 0.0, sum(c.max_points for c in checks), checks)


def grade_submission(path: str, timeout: float = DEFAULT_TIMEOUT) -> Grade:
    """Grade one submission in a child process with a time limit."""
    source = Path(path)
    with tempfile.TemporaryDirectory(prefix="gpt2-course-grade-") as tmp:
        try:
            if source.suffix.lower() == ".zip":
                if not source.is_file():
                    raise SubmissionError(f"{source} does not exist")
                source = extract_zip(source, Path(tmp) / "unzipped")
            elif not source.exists():
                raise SubmissionError(f"{source} does not exist")
        except SubmissionError as error:
            return failed_grade(path, str(error))
        out = Path(tmp) / "grade.json"
        command = [
            sys.executable,
            "-m",
            "gpt2_course.grading.legacy",
            str(source.resolve()),
            path,
            str(out),
        ]
        try:
            child = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=tmp,  # the learner's code never runs inside the course checkout
                env={**os.environ, "GPT2_COURSE_SOLUTIONS": ""},
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return failed_grade(
                path, f"grading stopped after {timeout:g} s: the code hangs or is far too slow"
            )
        if child.returncode != 0 or not out.is_file():
            tail = (child.stderr or child.stdout).strip().splitlines()[-3:]
            return failed_grade(path, "the grader's process died: " + " | ".join(tail))
        data = json.loads(out.read_text())
    checks = [CheckGrade(**c) for c in data["checks"]]
    return Grade(data["submission"], data["score"], data["max_score"], checks)


def main(args: argparse.Namespace) -> int:
    grades = [
        grade_submission(path, getattr(args, "timeout", DEFAULT_TIMEOUT))
        for path in args.submissions
    ]
    if args.format == "json":
        print(json.dumps([g.to_json() for g in grades], indent=2))
    elif args.format == "csv":
        print(format_csv(grades), end="")
    else:
        print(format_table(grades))
    return 0


def _child(folder: str, label: str, out: str) -> None:
    """Entry point of the grading child process."""
    grade = grade_folder(Path(folder), label)
    Path(out).write_text(json.dumps(grade.to_json()))


if __name__ == "__main__":
    _child(*sys.argv[1:4])
