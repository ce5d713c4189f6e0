"""`gpt2-course grade`: the command an instructor runs on a class.

Exit codes: 0 every submission was graded (whatever the scores), 1 some could
not be graded (a missing path, an unreadable zip) or the grader itself failed,
2 bad usage.
"""

import argparse
import os
import sys
from pathlib import Path

from gpt2_course.grading import reports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "submissions",
        nargs="*",
        metavar="SUBMISSION",
        help="folders, course checkouts or .zip files (with --merge: JSON results)",
    )
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table")
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        metavar="FILE",
        help="write the report here (atomically, at the end) instead of stdout",
    )
    parser.add_argument(
        "--feedback-dir", type=Path, metavar="DIR", help="one Markdown file of feedback per learner"
    )
    parser.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=os.cpu_count() or 1,
        help="submissions graded at once (default: the number of cores)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="time limit of one check (default 120)",
    )
    parser.add_argument(
        "--isolation",
        choices=["auto", "bubblewrap", "none"],
        default="auto",
        help="bubblewrap where it works (auto), demand it, or a bare process",
    )
    parser.add_argument(
        "--memory-limit",
        type=float,
        default=8.0,
        metavar="GIB",
        help="address space of a learner's process (default 8 GiB)",
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="grade only the I-th of N equal parts of the class (1-based), "
        "e.g. one task of a batch system's job array",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="merge the JSON results of several shards into one report",
    )
    parser.add_argument("--checks", nargs="+", metavar="ID", help=argparse.SUPPRESS)


def shard_of(items: list[str], spec: str) -> list[str]:
    """The I-th of N parts of `items`, in the order given (I counts from 1)."""
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError as error:
        raise ValueError(f"--shard wants I/N, e.g. 2/8, got {spec!r}") from error
    if not 1 <= index <= count:
        raise ValueError(f"--shard {spec}: I must be between 1 and N")
    return items[index - 1 :: count]


def main(args: argparse.Namespace) -> int:
    if not args.submissions:
        print("gpt2-course grade: name at least one submission", file=sys.stderr)
        return 2
    if args.merge:
        try:
            grades = reports.load_grades([Path(p) for p in args.submissions])
        except (OSError, ValueError) as error:
            print(f"gpt2-course grade --merge: {error}", file=sys.stderr)
            return 1
        return _report(grades, args, ungraded=0)
    submissions = list(args.submissions)
    if args.shard:
        try:
            submissions = shard_of(submissions, args.shard)
        except ValueError as error:
            print(f"gpt2-course grade: {error}", file=sys.stderr)
            return 2
    if args.jobs < 1 or (args.timeout is not None and args.timeout <= 0):
        print("gpt2-course grade: --jobs and --timeout must be positive", file=sys.stderr)
        return 2

    from gpt2_course.grading import grader as grading
    from gpt2_course.grading import sandbox

    settings = grading.Settings(isolation=args.isolation)
    if args.timeout is not None:
        settings.check_timeout = args.timeout
    settings.limits = sandbox.Limits(memory_bytes=int(args.memory_limit * (1 << 30)))
    print(
        f"Preparing the reference and every check's cases for {len(submissions)} submission(s) ...",
        file=sys.stderr,
        flush=True,
    )
    try:
        grader = grading.Grader(settings, args.checks)
    except Exception as error:
        print(f"gpt2-course grade: the grader could not start: {error}", file=sys.stderr)
        return 1
    print(f"Grading in a {grader.level}, {args.jobs} at a time.", file=sys.stderr, flush=True)
    ungraded: list[str] = []

    def heard(grade: reports.Grade) -> None:
        # results stream out as they come; the report itself is written at the end
        print(
            f"  {grade.submission}: {grade.score:g}/{grade.max_score:g}",
            file=sys.stderr,
            flush=True,
        )
        if grade.submission in grader.ungraded:
            ungraded.append(grade.submission)

    with grader:
        grades = grading.grade_all(grader, submissions, args.jobs, heard)
    return _report(grades, args, ungraded=len(ungraded))


def _report(grades: list[reports.Grade], args: argparse.Namespace, ungraded: int) -> int:
    text = {
        "json": reports.format_json,
        "csv": reports.format_csv,
        "table": reports.format_table,
    }[args.format](grades)
    if args.output:
        reports.write_atomic(args.output, text if text.endswith("\n") else text + "\n")
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    if args.feedback_dir:
        reports.write_feedback_dir(grades, args.feedback_dir)
    if ungraded:
        print(f"{ungraded} submission(s) could not be graded (see their feedback)", file=sys.stderr)
        return 1
    return 0
