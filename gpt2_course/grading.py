"""Grade learners' submissions: `gpt2-course grade SUBMISSION... --format table|json|csv`.

A submission is a folder of exercise files, a course checkout that contains
`gpt2_course/exercises/`, or a `.zip` of either. Each submission is graded in a
child process of its own, with a time limit, so that a crash, a hang or a
stray `sys.exit` in one learner's code costs that learner the marks and
nothing else. Inside the child, every check runs its two phases (run the
learner's code, then judge the outputs) exactly as in a notebook.
"""

import argparse
import csv
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_TIMEOUT = 900  # seconds per submission: building the reference takes ~20 s
MAX_ZIP_BYTES = 50 * 1024 * 1024  # exercise files are tiny; refuse zip bombs


@dataclass
class CheckGrade:
    id: str
    passed: bool
    points: float
    max_points: float
    feedback: str


@dataclass
class Grade:
    submission: str
    score: float
    max_score: float
    checks: list[CheckGrade] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class SubmissionError(Exception):
    """A submission that cannot be graded at all (missing, not a course layout, bad zip)."""


def _exercise_modules() -> set[str]:
    from gpt2_course.checks import all_checks

    return {check.module for check in all_checks().values()}


def find_exercises(root: Path) -> Path:
    """The folder of exercise files inside a submission folder."""
    if not root.exists():
        raise SubmissionError(f"{root} does not exist")
    if not root.is_dir():
        raise SubmissionError(f"{root} is neither a folder nor a .zip file")
    known = _exercise_modules()
    candidates = [root / "gpt2_course" / "exercises", root]
    # a zip often wraps everything in one top-level folder
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    if len(subdirs) == 1:
        candidates += [subdirs[0] / "gpt2_course" / "exercises", subdirs[0]]
    for folder in candidates:
        if folder.is_dir() and any((folder / f"{m}.py").is_file() for m in known):
            return folder
    raise SubmissionError(
        f"{root} holds no exercise files: expected files such as layernorm.py, "
        "either directly or under gpt2_course/exercises/"
    )


def extract_zip(path: Path, into: Path) -> Path:
    """Unpack a submission zip safely: no absolute paths, no '..', no links, bounded size."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise SubmissionError(f"{path} is not a readable zip file ({error})") from error
    with archive:
        total = 0
        for info in archive.infolist():
            name = info.filename
            if name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name:
                raise SubmissionError(f"{path} contains an unsafe path: {name!r}")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise SubmissionError(f"{path} contains a symbolic link: {name!r}")
            total += info.file_size
            if total > MAX_ZIP_BYTES:
                raise SubmissionError(f"{path} unpacks to more than {MAX_ZIP_BYTES // 2**20} MiB")
        archive.extractall(into)
    return into


def load_submission_package(folder: Path) -> str:
    """Make the submission's exercise folder importable as a package of its own; return its name."""
    name = f"gpt2_course_submission_{abs(hash(str(folder.resolve()))):x}"
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    package.__package__ = name
    sys.modules[name] = package
    importlib.invalidate_caches()
    return name


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
            "gpt2_course.grading",
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


def format_table(grades: list[Grade]) -> str:
    width = max([len(g.submission) for g in grades] + [10])
    lines = [f"{'submission':<{width}}  {'score':>9}  failed checks", "-" * (width + 40)]
    for g in grades:
        failed = [c.id for c in g.checks if not c.passed]
        shown = ", ".join(failed[:6]) + (f" (+{len(failed) - 6} more)" if len(failed) > 6 else "")
        lines.append(f"{g.submission:<{width}}  {g.score:>4g}/{g.max_score:<4g}  {shown or '-'}")
    return "\n".join(lines)


def format_csv(grades: list[Grade]) -> str:
    ids = [c.id for c in grades[0].checks] if grades else []
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["submission", "score", "max_score", *ids])
    for g in grades:
        points = {c.id: c.points for c in g.checks}
        writer.writerow([g.submission, g.score, g.max_score, *(points.get(i, 0) for i in ids)])
    return buffer.getvalue()


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
