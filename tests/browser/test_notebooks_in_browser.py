"""Every notebook in JupyterLab, in headless Chromium: Run All Cells and look at the page.

Runs through `make test-browser`, which installs Chromium (as root, from apt) and Playwright.
One notebook: `make test-browser BROWSER_ARGS="-k 03_attention"`. Screenshots go to
runs/browser/ (printed at the end). GPT2_COURSE_BROWSER_JOBS notebooks run at once (default
2: each kernel computes on one thread).
"""

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_lab import (
    NOTEBOOKS,
    SCREENSHOTS,
    JupyterLab,
    NotebookRun,
    chromium_args,
    find_chromium,
    problems,
    run_notebook,
    run_notebooks,
)

ALL = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
JOBS = int(os.environ.get("GPT2_COURSE_BROWSER_JOBS", "2"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = find_chromium()  # raises BrowserMissing: a failure, never a skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        raise RuntimeError(
            "Playwright is not installed: `pip install -e '.[browser]'` (make test-browser does)"
        ) from error
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, headless=True, args=chromium_args()
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def lab() -> Iterator[JupyterLab]:
    with JupyterLab(ALL) as server:
        yield server


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, browser: Any, lab: JupyterLab
) -> Iterator[dict[str, NotebookRun | Exception]]:
    """Every selected notebook, run JOBS at a time when the first test asks (-k respected)."""
    selected = [
        item.callspec.params["notebook"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_notebook_runs_in_the_browser"
    ]
    start = time.monotonic()
    results = run_notebooks(browser, lab, selected, SCREENSHOTS, jobs=JOBS)
    yield results
    done = [run for run in results.values() if isinstance(run, NotebookRun)]
    print(  # what the report of a CI run should say
        f"\nbrowser test: {len(results)} notebooks, {JOBS} at a time, in "
        f"{time.monotonic() - start:.0f} s; the pages made "
        f"{sum(len(run.requests) for run in done)} requests, "
        f"{sum(len(run.foreign_requests()) for run in done)} to hosts other than the Jupyter "
        f"server; screenshots in {SCREENSHOTS}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("notebook", ALL, ids=[path.stem for path in ALL])
def test_notebook_runs_in_the_browser(
    runs: dict[str, NotebookRun | Exception], notebook: Path
) -> None:
    run = runs[notebook.stem]
    if isinstance(run, Exception):
        raise run
    print(
        f"\n{run.name}: {run.seconds:.0f} s, {len(run.cells)} code cells, "
        f"{len(run.images)} figures, {len(run.pictures)} circuitsvis pictures, "
        f"{len(run.requests)} requests by the page ({len(run.foreign_requests())} not local); "
        f"screenshot {run.screenshot.relative_to(SCREENSHOTS.parents[1])}"
    )
    found = problems(run)
    assert not found, f"{notebook.name} in JupyterLab:\n  " + "\n  ".join(found)


# A notebook with one of each thing the test must catch, after cells that are fine.
BROKEN_CELLS = [
    "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0]);",
    "from gpt2_course.checks import CheckResult\n"
    '# check("layernorm.LayerNorm") shows a failure here, not its pass\n'
    'CheckResult("layernorm.LayerNorm", False, "failed", 0, 1, "values differ", 0.1)',
    "from IPython.display import HTML\n"
    "HTML('<img src=\"https://example.invalid/tracker.png\">'\n"
    '     \'<div id="circuits-vis-never-drawn" style="margin: 15px 0;"></div>\')',
    'import warnings\nwarnings.warn("only a warning: stderr may hold these")',
    "import traceback\ntry:\n    1 / 0\nexcept ZeroDivisionError:\n    traceback.print_exc()",
    'raise ValueError("deliberately broken")',
    'print("never reached: Run All stops at the error")',
]


@pytest.mark.slow
def test_a_broken_notebook_fails(browser: Any, tmp_path: Path) -> None:
    """The judge sees each failure a real notebook could have, and says which, where."""
    import nbformat

    notebook = tmp_path / "broken.ipynb"
    cells = [nbformat.v4.new_code_cell(source) for source in BROKEN_CELLS]
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": kernel}), notebook)
    with JupyterLab([notebook]) as server:
        run = run_notebook(browser, server, notebook, tmp_path / "shots")
    found = "\n".join(problems(run))
    print(f"\nthe broken notebook's problems:\n{found}")
    assert "code cell 5 ('import traceback') shows a traceback on the page" in found
    assert "ZeroDivisionError" in found
    assert "code cell 6 ('raise ValueError(\"deliberately broken\")') raised ValueError" in found
    assert "code cell 7 ('print(\"never reached" in found and "did not run" in found
    assert "check 'layernorm.LayerNorm' does not show its pass" in found
    assert "layernorm.LayerNorm: failed" in found  # the page's text, quoted in the message
    assert "circuitsvis picture circuits-vis-never-drawn drew nothing" in found
    assert "request(s) to hosts other than" in found
    assert "https://example.invalid/tracker.png" in found
    assert "figures" not in found, "the good figure was judged broken"
    for fine in (1, 3, 4):  # a figure, HTML (its faults are the page's, above), a warning
        assert f"code cell {fine} (" not in found
