"""The Colab link and bootstrap cell: what they do on Colab, and that elsewhere they do nothing.

Nothing here touches the network: on "Colab" (faked) the commands are recorded, not run.
"""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

from gpt2_course import cli, colab

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "00_start_here.ipynb"
URL = "https://github.com/gpt2-course/gpt2-course"


def first_code_cell(path: Path = NOTEBOOK) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def cell_function():
    """`colab_bootstrap` as the notebook's own cell defines it (its last line, the call, cut)."""
    source = first_code_cell()
    definition, call = source.rsplit("\n", 1)
    assert call.startswith("colab_bootstrap("), call
    namespace: dict = {}
    exec(compile(definition, "colab-cell", "exec"), namespace)
    return namespace["colab_bootstrap"]


@pytest.fixture
def on_colab(monkeypatch, tmp_path):
    """Colab faked: google.colab imported, subprocess.run and os.chdir recorded, not run."""
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    calls: list[list[str]] = []
    moves: list[str] = []

    def fake_run(command, check=False, **kwargs):
        calls.append(list(command))
        if command[:2] == ["git", "clone"]:
            Path(command[-1], ".git").mkdir(parents=True)  # as git would
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(os, "chdir", moves.append)
    return types.SimpleNamespace(calls=calls, moves=moves, root=str(tmp_path / "gpt2-course"))


def test_on_colab_the_cell_clones_the_ref_installs_editable_and_moves_to_notebooks(
    on_colab, capsys
):
    cell_function()(URL, "v1.2.3", root=on_colab.root)
    root = on_colab.root
    assert on_colab.calls == [
        ["git", "clone", "--quiet", URL, root],
        ["git", "-C", root, "checkout", "--quiet", "v1.2.3"],
        [sys.executable, "-m", "pip", "install", "--quiet", "-e", root],
    ]
    assert on_colab.moves == [os.path.join(root, "notebooks")]
    assert sys.path[0] == root  # importable in this kernel, no restart
    said = capsys.readouterr().out
    assert "file editor" in said and "left sidebar" in said, said
    assert f"{root}/gpt2_course/exercises/*.py" in said and "autoreload" in said, said


def test_running_the_cell_again_installs_nothing_twice(on_colab, capsys):
    bootstrap = cell_function()
    bootstrap(URL, "v1.2.3", root=on_colab.root)
    bootstrap(URL, "v1.2.3", root=on_colab.root)
    assert [c[:2] for c in on_colab.calls] == [
        ["git", "clone"],
        ["git", "-C"],
        [sys.executable, "-m"],
    ]
    assert len(on_colab.moves) == 2  # every notebook still starts in notebooks/
    assert sys.path.count(on_colab.root) == 1


def test_a_failed_clone_stops_the_cell(on_colab, monkeypatch):
    def failing(command, check=False, **kwargs):
        on_colab.calls.append(command)
        raise subprocess.CalledProcessError(128, command)

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(subprocess.CalledProcessError):
        cell_function()(URL, "v1.2.3", root=on_colab.root)
    assert len(on_colab.calls) == 1 and on_colab.moves == []  # no install, no chdir


# The exact cell, in a fresh interpreter that refuses to start a process or change folder.
REFUSE = """
import os, subprocess, sys
def refuse(*args, **kwargs):
    raise SystemExit(f"the cell called {args!r}")
subprocess.run = subprocess.Popen = subprocess.call = os.system = os.chdir = refuse
path, cwd = list(sys.path), os.getcwd()
exec(compile(sys.stdin.read(), "colab-cell", "exec"), {})
assert (sys.path, os.getcwd()) == (path, cwd), "the cell changed sys.path or the folder"
"""


@pytest.mark.parametrize(
    "env", [{}, {"COLAB_RELEASE_TAG": "x", "COLAB_GPU": "0"}], ids=["plain", "kaggle-like"]
)
def test_off_colab_the_exact_cell_does_nothing(tmp_path, env):
    # Kaggle's image sets Colab's variables: only the kernel's google.colab module counts.
    result = subprocess.run(
        [sys.executable, "-c", REFUSE],
        input=first_code_cell(),
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert list(tmp_path.iterdir()) == []


def test_every_notebook_carries_the_same_cell():
    cells = {first_code_cell(p) for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    assert len(cells) == 1
    assert cells == {colab.bootstrap_cell(URL, colab.stamped(nbformat.read(NOTEBOOK, 4))[1])}


def test_the_url_comes_from_pyproject_and_the_link_from_url_ref_and_file():
    assert colab.repository_url() == URL
    assert colab.colab_link(URL, "abc123", "03_attention.ipynb") == (
        "https://colab.research.google.com/github/gpt2-course/gpt2-course/blob/abc123/"
        "notebooks/03_attention.ipynb"
    )
    assert colab.colab_link(URL + ".git", "v1", "x.ipynb").endswith(
        "/gpt2-course/gpt2-course/blob/v1/notebooks/x.ipynb"
    )


@pytest.fixture
def notebooks(tmp_path):
    for name in ("00_start_here.ipynb", "02_layernorm.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, tmp_path / name)
    return tmp_path


def test_restamping_rewrites_link_and_cell_and_nothing_else(notebooks):
    before = {p.name: nbformat.read(p, 4) for p in notebooks.iterdir()}
    colab.stamp("0123abcd", notebooks, url="https://github.com/fork/course")
    for path in notebooks.iterdir():
        old, new = before[path.name], nbformat.read(path, 4)
        assert colab.stamped(new) == ("https://github.com/fork/course", "0123abcd")
        assert colab.badge_link(new) == colab.colab_link(
            "https://github.com/fork/course", "0123abcd", path.name
        )
        assert len(new.cells) == len(old.cells)
        assert [c.source for c in new.cells[2:]] == [c.source for c in old.cells[2:]]
    once = {p.name: p.read_text() for p in notebooks.iterdir()}
    colab.stamp("0123abcd", notebooks, url="https://github.com/fork/course")
    assert {p.name: p.read_text() for p in notebooks.iterdir()} == once


def test_stamping_a_notebook_without_colab_adds_link_and_cell_before_setup():
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# 99 · Topic"),
            nbformat.v4.new_code_cell("setup()"),
        ]
    )
    colab.stamp_notebook(nb, "99_topic.ipynb", URL, "v2")
    assert (
        nb.cells[0].source.startswith("[Open in Colab](") and "# 99 · Topic" in nb.cells[0].source
    )
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code"]
    assert colab.stamped(nb) == (URL, "v2") and nb.cells[2].source == "setup()"
    nbformat.validate(nb)


def test_the_command_stamps_and_refuses_a_ref_that_is_not_a_name(notebooks, monkeypatch, capsys):
    monkeypatch.setattr(colab, "NOTEBOOKS", notebooks)
    assert cli.main(["colab-stamp", "v3.0"]) == 0
    assert "Stamped 2 notebooks with v3.0" in capsys.readouterr().out
    assert {colab.stamped(nbformat.read(p, 4))[1] for p in notebooks.iterdir()} == {"v3.0"}
    before = {p.name: p.read_text() for p in notebooks.iterdir()}
    assert cli.main(["colab-stamp", 'v1"); import os; ("']) == 2
    assert "is not a tag or commit name" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in notebooks.iterdir()} == before
