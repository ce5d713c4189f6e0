"""Every committed notebook follows the course's conventions.

nbval itself runs the notebooks from the Makefile (`make test-notebooks`), not from here.
"""

import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from gpt2_course import colab

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
# The notebooks this test was written with; later ones are picked up by the glob.
FIRST_NOTEBOOKS = ["00_start_here.ipynb", "01_tokens_and_embeddings.ipynb", "02_layernorm.ipynb"]

SETUP_CELL = [
    "%load_ext autoreload",
    "%autoreload 2",
    "from gpt2_course.notebook import setup",
    "setup()",
]
# "About 20 minutes", "~45 min", "1 hour", "30-40 minutes", ...
TIME_ESTIMATE = re.compile(r"\d+\s*(?:[-–]\s*\d+\s*)?(?:min(?:ute)?s?|h(?:ours?)?)\b", re.I)


# Every notebook opens with a link to itself on Colab and, as its first code cell, the Colab
# bootstrap pinned to the same ref (`gpt2-course colab-stamp REF` writes both).
URL = colab.repository_url()


def lines(source: str) -> list[str]:
    return [line.rstrip() for line in source.strip().splitlines()]


# Each rule returns None when the notebook follows it, else what is wrong.


def outputs_problem(nb: nbformat.NotebookNode) -> str | None:
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    if dirty:
        return (
            f"code cells {dirty} have outputs or execution counts; clear them before "
            "committing (jupyter nbconvert --clear-output --inplace)"
        )
    return None


def opening_problem(nb: nbformat.NotebookNode) -> str | None:
    if not nb.cells or nb.cells[0].cell_type != "markdown":
        return "the first cell must be markdown"
    text = colab.BADGE.sub("", nb.cells[0].source, count=1)
    if not text.lstrip().startswith("#"):
        return "the first cell must start with a title"
    if not re.search(r"learning objectives", text, re.I):
        return "the first cell has no learning objectives"
    if not TIME_ESTIMATE.search(text):
        return "the first cell has no time estimate (e.g. 'About 40 minutes')"
    return None


def setup_problem(nb: nbformat.NotebookNode) -> str | None:
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    if len(code) < 2 or lines(code[1].source) != SETUP_CELL:
        return "the code cell after the Colab cell must be exactly:\n" + "\n".join(SETUP_CELL)
    return None


def colab_problem(nb: nbformat.NotebookNode) -> str | None:
    restamp = "; run `gpt2-course colab-stamp REF`"
    link = colab.badge_link(nb)
    if link is None:
        return "the first markdown cell must open with an [Open in Colab](...) link" + restamp
    url, ref = colab.stamped(nb)
    if ref is None:
        return "the first code cell must be the Colab bootstrap cell" + restamp
    code = next(cell for cell in nb.cells if cell.cell_type == "code")
    if code.source != colab.bootstrap_cell(url, ref):
        return "the Colab cell differs from gpt2_course/colab.py's colab_bootstrap" + restamp
    if url != URL:
        return f"the Colab cell installs from {url}, not pyproject.toml's {URL}" + restamp
    if not link.startswith(colab.colab_link(url, ref, "")):
        return f"the Colab link {link} is not for {ref}, the Colab cell's ref" + restamp
    return None


# Committed notebooks carry no outputs, so nbval compares nothing in a marked cell: a cell
# asserts what it shows with gpt2_course.notebook.expect instead.
NBVAL_MARKER = re.compile(r"#\s*NBVAL_CHECK_OUTPUT\b")


def nbval_marker_problem(nb: nbformat.NotebookNode) -> str | None:
    marked = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and NBVAL_MARKER.search(cell.source)
    ]
    if marked:
        return (
            f"code cells {marked} carry # NBVAL_CHECK_OUTPUT; nbval compares nothing in a notebook "
            "without outputs: assert what the cell shows with expect(condition, message)"
        )
    return None


def kernel_problem(nb: nbformat.NotebookNode) -> str | None:
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != "python3":
        return f"kernelspec name is {kernel!r}, not 'python3'"
    return None


# Predict-then-reveal questions, time marks on exercises, further reading (issue 11).
REVEAL = "<details><summary>Reveal</summary>"
MIN_REVEALS = 3
EXERCISE_HEADING = re.compile(r"^#{2,4}\s.*\bExercise\b")
TIME_MARK = re.compile(r"~\s*(\d+)\s*min\b")
LINK = re.compile(r"\]\(https?://")
# The total in the opening's "**Time.**" line: "About 60 minutes", "about an hour", "2 hours"
TOTAL_TIME = re.compile(r"\b(an?|\d+)\s*(?:[-–]\s*(\d+)\s*)?(hours?|h\b|min)", re.I)


def markdown_sources(nb: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "markdown"]


def reveal_problem(nb: nbformat.NotebookNode) -> str | None:
    reveals = [text for text in markdown_sources(nb) if REVEAL in text]
    if len(reveals) < MIN_REVEALS:
        return (
            f"{len(reveals)} predict-then-reveal cells, fewer than {MIN_REVEALS}: a markdown "
            f"cell with the question in bold and the answer in {REVEAL}...</details>"
        )
    unasked = [text.splitlines()[0] for text in reveals if not text.lstrip().startswith("**")]
    if unasked:
        return f"a reveal cell must open with its question in bold: {unasked[0]!r}"
    return None


def exercise_minutes(nb: nbformat.NotebookNode) -> list[tuple[str, int | None]]:
    """Each exercise heading, with the minutes marked on it or on the line after it."""
    found = []
    for text in markdown_sources(nb):
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if EXERCISE_HEADING.match(line):
                after = next((rest for rest in lines[i + 1 :] if rest.strip()), "")
                mark = TIME_MARK.search(line) or TIME_MARK.search(after)
                found.append((line.strip(), int(mark.group(1)) if mark else None))
    return found


def exercise_time_problem(nb: nbformat.NotebookNode) -> str | None:
    unmarked = [heading for heading, minutes in exercise_minutes(nb) if minutes is None]
    if unmarked:
        return (
            f"exercise heading without a time mark ('~15 min' beside its difficulty): "
            f"{unmarked[0]!r}"
        )
    return None


def total_minutes(opening: str) -> int | None:
    line = re.search(r"\*\*Time[.:]\*\*(.*)", opening)
    match = TOTAL_TIME.search(line.group(1)) if line else None
    if not match:
        return None
    amount = 1 if match.group(1).lower() in ("a", "an") else int(match.group(2) or match.group(1))
    if not match.group(3).lower().startswith("h"):
        return amount
    fraction = re.match(r"\s*and a (quarter|half)", line.group(1)[match.end() :])
    return amount * 60 + {None: 0, "quarter": 15, "half": 30}[fraction and fraction.group(1)]


def time_budget_problem(nb: nbformat.NotebookNode) -> str | None:
    marked = sum(minutes or 0 for _, minutes in exercise_minutes(nb))
    total = total_minutes(nb.cells[0].source) if nb.cells else None
    if marked and total is None:
        return "the opening has no '**Time.** About N minutes' line to compare the exercises with"
    if marked and marked > total:
        return (
            f"the exercises' time marks add up to {marked} min, more than the {total} min "
            "the opening announces"
        )
    return None


def further_reading_problem(nb: nbformat.NotebookNode) -> str | None:
    sections = [t for t in markdown_sources(nb) if re.search(r"^#+\s*Further reading", t, re.M)]
    if not sections:
        return "no '## Further reading' section"
    if len(LINK.findall(sections[-1])) < 2:
        return "the further-reading section needs at least 2 links"
    return None


RULES = [
    outputs_problem,
    opening_problem,
    setup_problem,
    colab_problem,
    kernel_problem,
    nbval_marker_problem,
    reveal_problem,
    exercise_time_problem,
    time_budget_problem,
    further_reading_problem,
]


@pytest.fixture(params=NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def notebook(request) -> tuple[str, nbformat.NotebookNode]:
    return request.param.name, nbformat.read(request.param, as_version=4)


def test_first_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    missing = [name for name in FIRST_NOTEBOOKS if name not in names]
    assert not missing, f"missing notebooks: {missing}"


def test_names_follow_nn_topic():
    bad = [p.name for p in NOTEBOOKS if not re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", p.name)]
    assert not bad, f"notebooks must be named NN_topic.ipynb: {bad}"


def test_every_notebook_links_itself_on_colab_at_one_ref():
    pins = {}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        url, ref = colab.stamped(nb)
        assert colab.badge_link(nb) == colab.colab_link(URL, ref, path.name), path.name
        pins[path.name] = (url, ref)
    assert len(set(pins.values())) == 1, f"notebooks pinned to different refs: {pins}"


def test_notebook_is_valid(notebook):
    name, nb = notebook
    nbformat.validate(nb)


@pytest.mark.parametrize("rule", RULES, ids=[rule.__name__ for rule in RULES])
def test_notebook_follows_rule(notebook, rule):
    name, nb = notebook
    problem = rule(nb)
    assert problem is None, f"{name}: {problem}"


# The rules themselves catch what they should: a good notebook passes, each bad one fails.

GOOD_BADGE = colab.badge(URL, "v9.9", "99_topic.ipynb")
GOOD_OPENING = (
    GOOD_BADGE + "# 99 · Topic\n\n**Learning objectives.** ...\n\n**Time.** About 30 minutes."
)


GOOD_REVEAL = f"**Predict: what is 1 + 1?**\n\n{REVEAL}\n\n2.\n</details>"
GOOD_EXERCISE = "### Exercise 1 · `add` &nbsp; Difficulty: ●○○○○ &nbsp; ~10 min\n\nWrite it."
GOOD_READING = (
    "## Further reading\n\n- [A paper](https://arxiv.org/abs/1706.03762)\n"
    "- [Another](https://arxiv.org/abs/1607.06450)"
)


def make_notebook(
    opening: str = GOOD_OPENING,
    setup: str = "\n".join(SETUP_CELL),
    extra: list[str] | None = None,
):
    if extra is None:
        extra = [GOOD_EXERCISE, *[GOOD_REVEAL] * MIN_REVEALS, GOOD_READING]
    nb = new_notebook(
        cells=[
            new_markdown_cell(opening),
            new_code_cell(colab.bootstrap_cell(URL, "v9.9")),
            new_code_cell(setup),
            new_code_cell("1 + 1"),
        ]
        + [new_markdown_cell(text) for text in extra]
    )
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def test_rules_accept_a_good_notebook():
    nb = make_notebook()
    assert [rule(nb) for rule in RULES] == [None] * len(RULES)


def test_rules_reject_outputs_and_execution_counts():
    nb = make_notebook()
    nb.cells[3].execution_count = 3
    assert "[3]" in outputs_problem(nb)
    nb = make_notebook()
    nb.cells[3].outputs = [nbformat.v4.new_output("stream", name="stdout", text="2\n")]
    assert "[3]" in outputs_problem(nb)


@pytest.mark.parametrize(
    "opening, expected",
    [
        ("Just text.\n\nLearning objectives. Time: 20 minutes", "title"),
        ("# Topic\n\nTime: about 20 minutes.", "learning objectives"),
        ("# Topic\n\n**Learning objectives.** a, b.", "time estimate"),
    ],
)
def test_rules_reject_a_bad_opening(opening, expected):
    assert expected in opening_problem(make_notebook(opening=opening))


def test_rules_reject_a_different_setup_cell():
    problem = setup_problem(make_notebook(setup="from gpt2_course.notebook import setup\nsetup()"))
    assert "after the Colab cell must be exactly" in problem
    # trailing spaces and a final newline are fine
    assert setup_problem(make_notebook(setup="\n".join(SETUP_CELL) + "  \n")) is None


def test_rules_reject_an_nbval_marker():
    nb = make_notebook()
    nb.cells[3].source = "# NBVAL_CHECK_OUTPUT\n1 + 1"
    problem = nbval_marker_problem(nb)
    assert "code cells [3] carry # NBVAL_CHECK_OUTPUT" in problem
    assert "expect(condition, message)" in problem


def test_time_estimate_pattern():
    for text in ["**Time.** About 20 minutes.", "~45 min", "1 hour", "30-40 minutes", "2 h"]:
        assert TIME_ESTIMATE.search(text), text
    for text in ["No time given.", "Notebook 01", "1024 positions", "12 heads"]:
        assert not TIME_ESTIMATE.search(text), text


def test_rules_reject_too_few_or_unasked_reveals():
    few = make_notebook(extra=[GOOD_EXERCISE, GOOD_REVEAL, GOOD_REVEAL, GOOD_READING])
    assert "fewer than 3" in reveal_problem(few)
    unasked = GOOD_REVEAL.replace("**Predict: what is 1 + 1?**", "What is 1 + 1?")
    nb = make_notebook(extra=[GOOD_REVEAL, GOOD_REVEAL, unasked, GOOD_READING])
    assert "in bold" in reveal_problem(nb)


@pytest.mark.parametrize(
    "exercise",
    [
        "### Exercise 1 · `add` &nbsp; Difficulty: ●○○○○",
        "### Exercise 2: `add`\n\nDifficulty: ●●○○○\n\nWrite it.",
    ],
)
def test_rules_reject_an_exercise_without_a_time_mark(exercise):
    nb = make_notebook(extra=[exercise, *[GOOD_REVEAL] * 3, GOOD_READING])
    assert "time mark" in exercise_time_problem(nb)


def test_time_mark_on_the_line_after_the_heading():
    exercise = "### Exercise 2: `add`\n\nDifficulty: ●●○○○ &nbsp; ~25 min\n\nWrite it."
    nb = make_notebook(extra=[exercise, *[GOOD_REVEAL] * 3, GOOD_READING])
    assert exercise_minutes(nb) == [("### Exercise 2: `add`", 25)]
    assert exercise_time_problem(nb) is None


def test_rules_reject_exercises_longer_than_the_notebook():
    long = GOOD_EXERCISE.replace("~10 min", "~25 min")
    nb = make_notebook(extra=[long, long, *[GOOD_REVEAL] * 3, GOOD_READING])
    assert "50 min" in time_budget_problem(nb)  # the opening says 30 minutes


@pytest.mark.parametrize(
    "line, minutes",
    [
        ("**Time.** About 60 minutes: 20 exploring, 30 for exercises.", 60),
        ("**Time.** About an hour: 30 minutes for the three exercises.", 60),
        ("**Time:** about 75 minutes.", 75),
        ("**Time.** About 2 hours: 90 minutes for the exercises.", 120),
        ("**Time.** 40-50 minutes.", 50),
        ("**Time.** About an hour and a quarter: 50 minutes for the exercises.", 75),
        ("**Time.** About 1 hour and a half.", 90),
    ],
)
def test_total_minutes(line, minutes):
    assert total_minutes(f"# Title\n\n{line}") == minutes


def test_rules_reject_missing_or_thin_further_reading():
    nb = make_notebook(extra=[*[GOOD_REVEAL] * 3])
    assert "no '## Further reading'" in further_reading_problem(nb)
    thin = "## Further reading\n\n- [Only one](https://arxiv.org/abs/1706.03762)"
    nb = make_notebook(extra=[*[GOOD_REVEAL] * 3, thin])
    assert "at least 2 links" in further_reading_problem(nb)


def test_rules_reject_a_notebook_without_its_colab_link_or_cell():
    nb = make_notebook(opening=GOOD_OPENING.removeprefix(GOOD_BADGE))
    assert "[Open in Colab](...) link" in colab_problem(nb)
    nb = make_notebook()
    del nb.cells[1]
    assert "first code cell must be the Colab bootstrap" in colab_problem(nb)
    assert "after the Colab cell" in setup_problem(nb)  # the setup cell came first


def test_rules_reject_a_colab_cell_that_drifted():
    nb = make_notebook()
    nb.cells[1].source = nb.cells[1].source.replace("--quiet", "-q", 1)
    assert "differs from gpt2_course/colab.py" in colab_problem(nb)
    nb = make_notebook()
    nb.cells[1].source = colab.bootstrap_cell("https://github.com/someone/fork", "v9.9")
    assert "not pyproject.toml's" in colab_problem(nb)
    nb = make_notebook(opening=GOOD_OPENING.replace("/v9.9/", "/v1.0/"))
    assert "is not for v9.9" in colab_problem(nb)
