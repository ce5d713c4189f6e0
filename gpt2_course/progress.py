"""One table of every check and its state, for a notebook or a terminal."""

import html

from gpt2_course import parts
from gpt2_course.checks import CheckResult, all_checks, run_check


def progress(modules: list[str] | None = None, solutions: bool = False) -> list[CheckResult]:
    """Run every check (or those of `modules`) on your code and return the results."""
    package = parts.SOLUTIONS if solutions else None
    ids = [cid for cid, c in all_checks().items() if modules is None or c.module in modules]
    return [run_check(cid, package) for cid in ids]


def progress_table(modules: list[str] | None = None, solutions: bool = False) -> str:
    """The progress table as plain text."""
    results = progress(modules, solutions)
    width = max((len(r.id) for r in results), default=10)
    lines = [f"{'check':<{width}}  {'state':<15}  points", "-" * (width + 26)]
    for r in results:
        lines.append(f"{r.id:<{width}}  {r.status:<15}  {r.points:g}/{r.max_points:g}")
    total = sum(r.points for r in results)
    best = sum(r.max_points for r in results)
    lines.append(f"{'total':<{width}}  {'':<15}  {total:g}/{best:g}")
    return "\n".join(lines)


class ProgressView:
    """Rich display of the results: a coloured table in notebooks, text elsewhere."""

    def __init__(self, results: list[CheckResult]):
        self.results = results

    def _repr_html_(self) -> str:
        colour = {"passed": "#1a7f37", "failed": "#cf222e", "not implemented": "#9a6700"}
        rows = "".join(
            f"<tr><td><code>{html.escape(r.id)}</code></td>"
            f'<td style="color:{colour[r.status]}"><b>{r.status}</b></td>'
            f"<td>{r.points:g}/{r.max_points:g}</td>"
            f"<td>{html.escape(_whose(r.id))}</td>"
            f'<td style="text-align:left"><small>{html.escape(_first_line(r.feedback))}</small>'
            "</td></tr>"
            for r in self.results
        )
        total = sum(r.points for r in self.results)
        best = sum(r.max_points for r in self.results)
        header = "".join(
            f"<th>{h}</th>" for h in ["check", "state", "points", "model uses", "detail"]
        )
        footer = f"<tr><td><b>total</b></td><td></td><td><b>{total:g}/{best:g}</b></td></tr>"
        return f"<table><tr>{header}</tr>{rows}{footer}</table>"

    def __repr__(self) -> str:
        lines = [r.report().splitlines()[0] for r in self.results]
        total = sum(r.points for r in self.results)
        best = sum(r.max_points for r in self.results)
        return "\n".join([*lines, f"total {total:g}/{best:g}"])


def _whose(check_id: str) -> str:
    component = ".".join(check_id.split(".")[:2])
    return parts.whose(component) if component in parts.COMPONENTS else ""


def _first_line(text: str) -> str:
    return (text.splitlines() or [""])[0][:120]


def show_progress(modules: list[str] | None = None) -> ProgressView:
    """Every check (or those of `modules`) on your code, as one table."""
    return ProgressView(progress(modules))
