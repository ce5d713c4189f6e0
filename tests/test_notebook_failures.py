"""A broken reference solution fails the notebook run, at the cell that shows what it got wrong.

Each case copies `solutions/` to a temporary folder, breaks one solution there and puts that
folder first on PYTHONPATH: `parts` imports the package `solutions` by name, so the notebook's
kernel runs the broken copy. nbval then runs the one notebook the break concerns, as
`make test-notebooks` does.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from gpt2_course.notebook import expect

ROOT = Path(__file__).resolve().parent.parent

# (notebook, solution file, correct text, broken text, a line of the cell that must fail, what
# the failure must say). The cell is found by its content: nbval numbers code cells only.
BREAKS = [
    (
        "01_tokens_and_embeddings",
        "embeddings.py",
        "return self.W_E[tokens]",
        "return self.W_E[tokens] * 2",
        'print("position 1 is row 995 of W_E:"',
        "your Embedding: position 1 (token 995) should be row 995 of W_E",
    ),
    (
        "02_layernorm",
        "layernorm.py",
        "torch.sqrt(variance + self.cfg.layer_norm_eps)",
        "torch.sqrt(variance)",  # the epsilon left out
        '# parts.use_solution("layernorm.LayerNorm")  # <- uncomment if stuck',
        "reference solutions failed: layernorm.LayerNorm",
    ),
    (
        "03_attention",
        "attention.py",
        "return scores.masked_fill(future, self.IGNORE)",
        "return scores",  # no causal mask
        "pattern = attn.apply_causal_mask(torch.zeros(1, 1, 5, 5))",
        "your causal mask: equal scores should give row i weight 1/(i+1)",
    ),
]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def nbval_cell(notebook: str, line: str) -> int:
    """nbval's number for the code cell holding `line` (it counts code cells only)."""
    nb = nbformat.read(ROOT / "notebooks" / f"{notebook}.ipynb", as_version=4)
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    holding = [n for n, source in enumerate(code) if line in source]
    assert len(holding) == 1, f"{notebook}: {len(holding)} code cells hold {line!r}: update BREAKS"
    return holding[0]


def test_expect_asserts_only_on_the_reference_solutions(monkeypatch):
    monkeypatch.setenv("GPT2_COURSE_SOLUTIONS", "1")
    expect(True, "unused")
    with pytest.raises(AssertionError, match="your pattern differs"):
        expect(False, "your pattern differs")
    # A learner's own, unfinished code: the cell's printout shows it, not a traceback.
    monkeypatch.delenv("GPT2_COURSE_SOLUTIONS")
    expect(False, "your pattern differs")


def run_notebook(notebook: str, solutions_parent: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(solutions_parent), os.environ.get("PYTHONPATH")])
        ),
        "GPT2_COURSE_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "GPT2_COURSE_SOLUTIONS": "1",
        "GPT2_COURSE_QUICK": "1",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbval-lax",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rf",
            f"notebooks/{notebook}.ipynb",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "notebook, solution, correct, broken, line, message", BREAKS, ids=[b[0] for b in BREAKS]
)
def test_a_broken_solution_fails_its_notebook(
    tmp_path, notebook, solution, correct, broken, line, message
):
    copy = tmp_path / "solutions"
    shutil.copytree(ROOT / "solutions", copy, ignore=shutil.ignore_patterns("__pycache__"))
    source = (copy / solution).read_text()
    assert correct in source, f"solutions/{solution} no longer contains {correct!r}: update BREAKS"
    (copy / solution).write_text(source.replace(correct, broken, 1))

    result = run_notebook(notebook, tmp_path)
    output = ANSI.sub("", result.stdout + result.stderr)
    assert result.returncode != 0, f"{notebook} ran clean on a broken {solution}:\n{output[-3000:]}"
    failed = [
        int(n) for n in re.findall(rf"FAILED notebooks/{notebook}\.ipynb::Cell (\d+)", output)
    ]
    cell = nbval_cell(notebook, line)
    assert cell in failed, f"cell {cell} ({line!r}) is not among the failing cells {failed}"
    assert message in output, f"the failure does not say {message!r}:\n{output[-3000:]}"
