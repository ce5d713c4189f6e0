"""Grades and the reports an instructor reads: a table, JSON, CSV."""

import csv
import io
from dataclasses import asdict, dataclass, field


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


