"""Grades and the reports an instructor reads: a table, JSON, CSV, a feedback file per learner.

Submission labels come from learners (file and folder names), so every format treats them
as hostile: CSV cells that a spreadsheet would run as formulas are neutralised, file names
are sanitised, Markdown and terminal output are escaped. Grades written as JSON by shards of
a class (a batch system's job array) are read back and merged with strict validation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------- grades


@dataclass
class CheckGrade:
    id: str
    passed: bool
    points: float
    max_points: float
    feedback: str

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "passed": self.passed,
            "points": self.points,
            "max_points": self.max_points,
            "feedback": self.feedback,
        }


@dataclass
class Grade:
    submission: str
    score: float
    max_score: float
    checks: list[CheckGrade] = field(default_factory=list)
    isolation: str = ""  # how the submission was graded: "bubblewrap sandbox", ...

    def to_json(self) -> dict:
        return {
            "submission": self.submission,
            "score": self.score,
            "max_score": self.max_score,
            "checks": [c.to_json() for c in self.checks],
            "isolation": self.isolation,
        }


# ---------------------------------------------------------------- scrubbing

_HASHED_PACKAGE = re.compile(r"gpt2_course_submission_[0-9a-f]+")


def _grader_tmp_pattern() -> re.Pattern[str]:
    roots = {"/tmp", tempfile.gettempdir(), os.path.realpath(tempfile.gettempdir())}
    alternatives = "|".join(re.escape(r.rstrip("/")) for r in sorted(roots, key=len, reverse=True))
    return re.compile(rf"(?:{alternatives})/gpt2-course-grade-[\w.-]*")


def scrub(text: str, secrets: dict[str, str]) -> str:
    """Hide the grader's internals from feedback.

    Each key of `secrets` (a temporary folder, a hashed package name) becomes its value
    (`<submission>`, say), longest key first and in one pass, so that a value is never
    rewritten by another key. Then any remaining hashed submission package name becomes
    `submission`, and any remaining grader temporary folder (`/tmp/gpt2-course-grade-XXXX`)
    becomes `<grader>`.
    """
    keys = sorted((k for k in secrets if k), key=len, reverse=True)
    if keys:
        pattern = re.compile("|".join(re.escape(k) for k in keys))
        text = pattern.sub(lambda m: secrets[m.group(0)], text)
    text = _grader_tmp_pattern().sub("<grader>", text)
    return _HASHED_PACKAGE.sub("submission", text)


# ---------------------------------------------------------------- text safety

# C0/C1 controls, line separators, and the invisible and bidirectional formatting characters
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _no_surrogates(text: str) -> str:
    """File names the OS could not decode arrive as lone surrogates; show them as \\udcXX."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def _printable(text: str) -> str:
    """One line, no terminal escape sequences: control characters shown as escapes."""
    text = _no_surrogates(text)
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


# ---------------------------------------------------------------- table, JSON, CSV


def format_table(grades: list[Grade]) -> str:
    """Fixed-width table for a terminal: submission, score, failed checks."""
    labels = [_printable(g.submission) for g in grades]
    width = max([len(label) for label in labels] + [10])
    lines = [f"{'submission':<{width}}  {'score':>9}  failed checks", "-" * (width + 40)]
    for g, label in zip(grades, labels, strict=True):
        failed = [_printable(c.id) for c in g.checks if not c.passed]
        shown = ", ".join(failed[:6]) + (f" (+{len(failed) - 6} more)" if len(failed) > 6 else "")
        lines.append(f"{label:<{width}}  {g.score:>4g}/{g.max_score:<4g}  {shown or '-'}")
    isolations = sorted({g.isolation for g in grades if g.isolation})
    if isolations:
        lines.append("")
        lines.append("isolation: " + "; ".join(_printable(i) for i in isolations))
    return "\n".join(lines)


def format_json(grades: list[Grade]) -> str:
    return json.dumps([g.to_json() for g in grades], indent=2)


_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A cell a spreadsheet will not run: text starting like a formula gets a leading `'`.

    Numbers are left as numbers (a legitimate negative number is not a formula).
    """
    if isinstance(value, str):
        value = _no_surrogates(value)
        if value.startswith(_FORMULA_PREFIXES):
            return "'" + value
    return value


def check_ids(grades: Iterable[Grade]) -> list[str]:
    """Every check id, in the order first seen."""
    ids: dict[str, None] = {}
    for g in grades:
        for c in g.checks:
            ids.setdefault(c.id, None)
    return list(ids)


def format_csv(grades: list[Grade]) -> str:
    """One row per learner: submission, score, max_score, then the points of each check.

    Ready for a learning-management system's import; a check a grade lacks counts 0.
    """
    ids = check_ids(grades)
    buffer = io.StringIO()
    # the default CRLF line ends (RFC 4180) also make the writer quote any cell holding \r or \n
    writer = csv.writer(buffer)
    writer.writerow([csv_cell(h) for h in ["submission", "score", "max_score", *ids]])
    for g in grades:
        points = {c.id: c.points for c in g.checks}
        row = [g.submission, g.score, g.max_score, *(points.get(i, 0) for i in ids)]
        writer.writerow([csv_cell(cell) for cell in row])
    return buffer.getvalue()


# ---------------------------------------------------------------- files


def write_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` so that readers see the old file or the new, never half.

    A temporary file in the same folder is written, fsynced and moved over `path`; on any
    error it is removed. A new file gets the usual permissions (0o666 less the umask).
    """
    path = Path(path)
    data = text.encode("utf-8")  # fails before anything is created
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:60]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable, where the platform allows opening a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


MAX_NAME = 80  # characters of a feedback file's stem, before any "-2" and ".md"
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {
    f"{d}{i}" for d in ("com", "lpt") for i in range(1, 10)
}


def safe_file_stem(label: str) -> str:
    """A file-name stem from a learner-controlled label: letters, digits, `.`, `_`, `-` only,
    no path separators, no `..`, no leading dot or dash, at most MAX_NAME characters."""
    stem = os.path.basename(label.replace("\\", "/").rstrip("/")) or label
    # accented letters lose their accents (élève -> eleve); anything else non-ASCII goes
    stem = "".join(
        ch for ch in unicodedata.normalize("NFKD", stem) if not unicodedata.combining(ch)
    )
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
    stem = re.sub(r"\.{2,}", ".", stem)
    stem = stem.lstrip("._-")[:MAX_NAME].rstrip("._-")
    if not stem:
        stem = "submission"
    if stem.split(".")[0].lower() in _WINDOWS_RESERVED:
        stem = "_" + stem
    return stem


def feedback_markdown(grade: Grade) -> str:
    """One learner's feedback: score, isolation level, then every check with its feedback."""
    lines = [
        f"# Feedback: {_md_text(grade.submission)}",
        "",
        f"**Score:** {grade.score:g} / {grade.max_score:g}",
        "",
        f"**Graded in:** {_md_text(grade.isolation) if grade.isolation else 'not recorded'}",
        "",
    ]
    if not grade.checks:
        lines += ["No checks were run.", ""]
        return "\n".join(lines)
    passed = sum(c.passed for c in grade.checks)
    lines += [
        f"{passed} of {len(grade.checks)} checks passed.",
        "",
        "| check | result | points |",
        "| --- | --- | --- |",
    ]
    for c in grade.checks:
        result = "passed" if c.passed else "FAILED"
        lines.append(
            f"| {_md_code(c.id, in_table=True)} | {result} | {c.points:g} / {c.max_points:g} |"
        )
    lines.append("")
    for c in grade.checks:
        result = "passed" if c.passed else "FAILED"
        lines += [f"## {_md_code(c.id)}: {result}, {c.points:g} / {c.max_points:g}", ""]
        if c.feedback.strip():
            lines += [_fenced(c.feedback), ""]
        else:
            lines += ["No feedback.", ""]
    return "\n".join(lines)


def _md_text(text: str) -> str:
    """Inline Markdown that shows `text` literally: one line, active characters escaped."""
    return re.sub(r"([\\`*_\[\]<>&|~])", r"\\\1", _printable(text))


def _md_code(text: str, in_table: bool = False) -> str:
    """A code span that shows `text` literally, whatever backticks it holds."""
    text = _printable(text)
    if in_table:
        text = text.replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _fenced(text: str) -> str:
    """A fenced code block that no backtick run inside `text` can close."""
    text = _no_surrogates(text).replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def write_feedback_dir(grades: list[Grade], folder: Path) -> list[Path]:
    """Write one Markdown feedback file per learner into `folder` (created if need be).

    Names come from the labels (see `safe_file_stem`); two labels that sanitise alike get
    `-2`, `-3`, ... (compared case-insensitively, for macOS and Windows file systems). Each
    file is written atomically. Returns the paths, in the order of `grades`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    paths = []
    for grade in grades:
        stem = safe_file_stem(grade.submission)
        name, n = f"{stem}.md", 1
        while name.lower() in used:
            n += 1
            name = f"{stem}-{n}.md"
        used.add(name.lower())
        path = folder / name
        write_atomic(path, feedback_markdown(grade))
        paths.append(path)
    return paths


# ---------------------------------------------------------------- reading and merging

_GRADE_KEYS = {"submission", "score", "max_score", "checks"}
_OPTIONAL_GRADE_KEYS = {"isolation"}
_CHECK_KEYS = {"id", "passed", "points", "max_points", "feedback"}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def _keys(obj: dict, required: set[str], optional: set[str], where: str) -> None:
    missing = sorted(required - obj.keys())
    unknown = sorted(obj.keys() - required - optional)
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")


def _check_from_json(obj: object, where: str) -> CheckGrade:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    _keys(obj, _CHECK_KEYS, set(), where)
    if not isinstance(obj["id"], str) or not obj["id"]:
        raise ValueError(f"{where}: id must be a non-empty string, got {obj['id']!r}")
    where = f"{where} ({obj['id']})"
    if not isinstance(obj["passed"], bool):
        raise ValueError(f"{where}: passed must be true or false, got {obj['passed']!r}")
    for key in ("points", "max_points"):
        if not _is_number(obj[key]):
            raise ValueError(f"{where}: {key} must be a finite number, got {obj[key]!r}")
    if obj["max_points"] < 0:
        raise ValueError(f"{where}: max_points {obj['max_points']!r} is negative")
    if not 0 <= obj["points"] <= obj["max_points"]:
        raise ValueError(
            f"{where}: points {obj['points']!r} outside 0..max_points ({obj['max_points']!r})"
        )
    if not isinstance(obj["feedback"], str):
        raise ValueError(f"{where}: feedback must be a string, got {obj['feedback']!r}")
    return CheckGrade(obj["id"], obj["passed"], obj["points"], obj["max_points"], obj["feedback"])


def grade_from_json(obj: object, where: str = "grade") -> Grade:
    """A Grade from the object `Grade.to_json` writes, validated strictly.

    Raises ValueError naming `where` and the problem: a missing or unknown field, a field
    of the wrong type, points outside 0..max_points, a duplicate check id, or a score
    (max_score) that is not the sum of the checks' points (max_points).
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    _keys(obj, _GRADE_KEYS, _OPTIONAL_GRADE_KEYS, where)
    label = obj["submission"]
    if not isinstance(label, str) or not label:
        raise ValueError(f"{where}: submission must be a non-empty string, got {label!r}")
    where = f"{where} ({_printable(label)!r})"
    for key in ("score", "max_score"):
        if not _is_number(obj[key]):
            raise ValueError(f"{where}: {key} must be a finite number, got {obj[key]!r}")
    isolation = obj.get("isolation", "")
    if not isinstance(isolation, str):
        raise ValueError(f"{where}: isolation must be a string, got {isolation!r}")
    if not isinstance(obj["checks"], list):
        raise ValueError(f"{where}: checks must be a list, got {type(obj['checks']).__name__}")
    checks = [_check_from_json(c, f"{where} checks[{i}]") for i, c in enumerate(obj["checks"])]
    seen: set[str] = set()
    for c in checks:
        if c.id in seen:
            raise ValueError(f"{where}: check {c.id!r} appears twice")
        seen.add(c.id)
    total = math.fsum(c.points for c in checks)
    if not _close(obj["score"], total):
        raise ValueError(f"{where}: score {obj['score']!r} is not the sum of points ({total:g})")
    total_max = math.fsum(c.max_points for c in checks)
    if not _close(obj["max_score"], total_max):
        raise ValueError(
            f"{where}: max_score {obj['max_score']!r} is not the sum of max_points ({total_max:g})"
        )
    return Grade(label, obj["score"], obj["max_score"], checks, isolation)


def _strict_object(pairs: list[tuple[str, object]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number JSON allows")


def load_grades(paths: list[Path]) -> list[Grade]:
    """Read and merge grade files (each the output of `--format json`: a list of grades).

    Every grade is validated (see `grade_from_json`); a submission label may appear only
    once across all files, and every grade must have the same check ids in the same order.
    Returns the grades sorted by submission label. Raises ValueError naming the file.
    """
    grades: list[Grade] = []
    origin: dict[str, Path] = {}
    reference: tuple[list[str], str] | None = None
    for path in paths:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: cannot read: {error}") from error
        try:
            data = json.loads(text, object_pairs_hook=_strict_object, parse_constant=_no_constant)
        except ValueError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from error
        if not isinstance(data, list):
            raise ValueError(
                f"{path}: expected a JSON list of grades (the output of --format json), "
                f"got {type(data).__name__}"
            )
        for i, obj in enumerate(data):
            grade = grade_from_json(obj, f"{path}: grade #{i + 1}")
            label = grade.submission
            if label in origin:
                earlier = "earlier in the same file" if origin[label] == path else origin[label]
                raise ValueError(
                    f"{path}: duplicate submission {_printable(label)!r} (also in {earlier})"
                )
            origin[label] = path
            ids = [c.id for c in grade.checks]
            if reference is None:
                reference = (ids, f"{path}: {_printable(label)!r}")
            elif ids != reference[0]:
                missing = [c for c in reference[0] if c not in ids]
                extra = [c for c in ids if c not in reference[0]]
                parts = [f"missing {missing}"] * bool(missing) + [f"extra {extra}"] * bool(extra)
                detail = "; ".join(parts) or "the same checks in a different order"
                raise ValueError(
                    f"{path}: submission {_printable(label)!r} has check ids that differ "
                    f"from {reference[1]}: {detail}"
                )
            grades.append(grade)
    return sorted(grades, key=lambda g: g.submission)
