"""`gpt2-course release OUT`: the learner's copy installs, checks, grades and lends parts
with no solutions/ and no mistake code in it."""

import ast
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_course import release
from gpt2_course.checks import all_checks, fingerprints

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release") / "gpt2-course"
    return release.make_release(out, fingerprints.build(all_checks()))


@pytest.fixture(scope="module")
def python(course, tmp_path_factory) -> Path:
    """A venv of its own holding the release, editable, seeing this one's libraries."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "libraries.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [
            venv / "bin/python",
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-e",
            str(course),
        ],
        check=True,
        cwd=course,
    )
    return venv / "bin/python"


def run(python: Path, course: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GPT2_COURSE_SOLUTIONS")}
    return subprocess.run(
        [str(python), *args], cwd=course, env=env, capture_output=True, text=True, timeout=1500
    )


def test_the_release_has_no_solutions_and_no_mistake_code(course):
    assert not (course / "solutions").exists()
    assert not (course / "gpt2_course/checks/mistakes").exists()
    assert not (course / "tests").exists()
    assert (course / "gpt2_course/checks/fingerprints.json").is_file()
    for notebook in (course / "notebooks").glob("*.ipynb"):
        cells = json.loads(notebook.read_text())["cells"]
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), notebook


def function_bodies(path: Path) -> dict[str, str]:
    """Every function's and class's body, as an AST dump (names and formatting ignored)."""
    bodies = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bodies[f"{path.name}:{node.name}"] = ast.dump(ast.Module(node.body, []))
    return bodies


def test_no_answer_and_no_mistake_is_in_the_release(course):
    given = {}  # what the stubs hand out already (the parameters in __init__, ...)
    for stub in (ROOT / "gpt2_course/exercises").glob("*.py"):
        given |= {body: name for name, body in function_bodies(stub).items()}
    secret = {}
    for source in [
        *(ROOT / "solutions").glob("*.py"),
        *(ROOT / "gpt2_course/checks/mistakes").glob("*.py"),
    ]:
        for name, body in function_bodies(source).items():
            if body not in given and len(body) > 200:  # not a one-liner any code could hold
                secret[body] = name
    assert len(secret) > 100  # the scan sees the answers and the mistakes
    found = [
        f"{path.relative_to(course)} {name} = {secret[body]}"
        for path in course.rglob("*.py")
        for name, body in function_bodies(path).items()
        if body in secret
    ]
    assert not found, "\n".join(found)


def test_the_release_installs_and_has_no_solutions_to_import(python, course):
    where = run(python, course, "-c", "import gpt2_course; print(gpt2_course.__file__)")
    assert where.returncode == 0, where.stderr
    assert str(course) in where.stdout
    missing = run(python, course, "-c", "import solutions")
    assert missing.returncode != 0 and "No module named 'solutions'" in missing.stderr


def test_use_solution_lends_a_reference_part(python, course):
    code = (
        "from gpt2_course import parts\n"
        "from gpt2_course.config import TransformerConfig\n"
        "parts.use_solution('layernorm.LayerNorm')\n"
        "lent = parts.LayerNorm(TransformerConfig())\n"
        "print(parts.whose('layernorm.LayerNorm'), type(lent).__module__)\n"
    )
    result = run(python, course, "-c", code)
    assert result.returncode == 0, result.stderr
    assert "reference part" in result.stdout
    assert "gpt2_course.reference_parts.layernorm" in result.stdout


def test_grading_inside_the_release(python, course, tmp_path):
    right = tmp_path / "right"
    shutil.copytree(ROOT / "solutions", right, ignore=shutil.ignore_patterns("__pycache__"))
    slip = tmp_path / "slip"
    shutil.copytree(right, slip)
    layernorm = slip / "layernorm.py"
    text = layernorm.read_text()
    layernorm.write_text(
        text.replace(
            "torch.sqrt(variance + self.cfg.layer_norm_eps)",
            "(torch.sqrt(variance) + self.cfg.layer_norm_eps)",
        )
    )
    assert layernorm.read_text() != text
    stubs = course / "gpt2_course/exercises"
    result = run(
        python,
        course,
        "-m",
        "gpt2_course.cli",
        "grade",
        str(right),
        str(slip),
        str(stubs),
        "--format",
        "json",
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    grades = {Path(g["submission"]).name: g for g in json.loads(result.stdout)}
    assert grades["right"]["score"] == grades["right"]["max_score"] == len(all_checks())
    assert grades["exercises"]["score"] == 0
    assert all("not implemented" in c["feedback"] for c in grades["exercises"]["checks"])
    by_id = {c["id"]: c for c in grades["slip"]["checks"]}
    assert not by_id["layernorm.LayerNorm"]["passed"]
    assert "epsilon outside the square root" in by_id["layernorm.LayerNorm"]["feedback"]
    assert by_id["embeddings.Embedding"]["passed"]


def test_release_refuses_a_used_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(release.ReleaseError, match="not empty"):
        release.make_release(tmp_path, fingerprint_data={})
    assert (tmp_path / "keep.txt").read_text() == "mine"
