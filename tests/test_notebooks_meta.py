"""Every committed notebook follows the course's conventions.

nbval itself runs the notebooks from the Makefile (`make test-notebooks`), not from here.
"""

import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

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
    text = nb.cells[0].source
    if not text.lstrip().startswith("#"):
        return "the first cell must start with a title"
    if not re.search(r"learning objectives", text, re.I):
        return "the first cell has no learning objectives"
    if not TIME_ESTIMATE.search(text):
        return "the first cell has no time estimate (e.g. 'About 40 minutes')"
    return None


def setup_problem(nb: nbformat.NotebookNode) -> str | None:
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    if not code or lines(code[0].source) != SETUP_CELL:
        return "the first code cell must be exactly:\n" + "\n".join(SETUP_CELL)
    return None


def kernel_problem(nb: nbformat.NotebookNode) -> str | None:
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != "python3":
        return f"kernelspec name is {kernel!r}, not 'python3'"
    return None


RULES = [outputs_problem, opening_problem, setup_problem, kernel_problem]


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


def test_notebook_is_valid(notebook):
    name, nb = notebook
    nbformat.validate(nb)


@pytest.mark.parametrize("rule", RULES, ids=[rule.__name__ for rule in RULES])
def test_notebook_follows_rule(notebook, rule):
    name, nb = notebook
    problem = rule(nb)
    assert problem is None, f"{name}: {problem}"


# The rules themselves catch what they should: a good notebook passes, each bad one fails.

GOOD_OPENING = "# 99 · Topic\n\n**Learning objectives.** ...\n\n**Time.** About 30 minutes."


def make_notebook(opening: str = GOOD_OPENING, setup: str = "\n".join(SETUP_CELL)):
    nb = new_notebook(
        cells=[new_markdown_cell(opening), new_code_cell(setup), new_code_cell("1 + 1")]
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
    nb.cells[2].execution_count = 3
    assert "[2]" in outputs_problem(nb)
    nb = make_notebook()
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="2\n")]
    assert "[2]" in outputs_problem(nb)


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
    assert setup_problem(make_notebook(setup="from gpt2_course.notebook import setup\nsetup()"))
    # trailing spaces and a final newline are fine
    assert setup_problem(make_notebook(setup="\n".join(SETUP_CELL) + "  \n")) is None


def test_time_estimate_pattern():
    for text in ["**Time.** About 20 minutes.", "~45 min", "1 hour", "30-40 minutes", "2 h"]:
        assert TIME_ESTIMATE.search(text), text
    for text in ["No time given.", "Notebook 01", "1024 positions", "12 heads"]:
        assert not TIME_ESTIMATE.search(text), text
