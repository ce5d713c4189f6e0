"""Grade learners' submissions: `gpt2-course grade SUBMISSION... --format table|json|csv`."""

from gpt2_course.grading.legacy import grade_submission, main
from gpt2_course.grading.reports import CheckGrade, Grade, format_csv, format_table
from gpt2_course.grading.submissions import SubmissionError, load_submission_package

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
