"""Grading a class: `gpt2-course grade SUBMISSION... [--format table|json|csv]`.

The parts, in the order a submission meets them:

* `submissions`: read a folder, a checkout or a zip, trusting nothing in it;
* `grader`: the judge's process: one reference per run, verdicts, reports;
* `sandbox` and `runner`: the learner's code runs in a process of its own,
  sandboxed where the machine allows, and never holds an expected value;
* `protocol`: what the two processes say to each other, as plain data;
* `reports`: table, JSON, CSV and per-learner feedback files;
* `command`: the command line.
"""

from gpt2_course.grading.command import main
from gpt2_course.grading.reports import CheckGrade, Grade, format_csv, format_table
from gpt2_course.grading.submissions import SubmissionError, load_submission_package


def grade_submission(path: str, timeout: float | None = None) -> Grade:
    """Grade one submission with a grader of its own (a class should share one `Grader`)."""
    from gpt2_course.grading.grader import Grader, Settings

    settings = Settings() if timeout is None else Settings(check_timeout=timeout)
    with Grader(settings) as grader:
        return grader.grade(path)


__all__ = [
    "CheckGrade",
    "Grade",
    "SubmissionError",
    "format_csv",
    "format_table",
    "grade_submission",
    "load_submission_package",
    "main",
]
