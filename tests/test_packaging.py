"""The project's install files agree with each other."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _conda_pip_requirements() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    return [line.strip()[2:] for line in lines[start + 1 :] if line.strip().startswith("- ")]


def test_environment_yml_matches_pyproject():
    project = _pyproject()["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    conda = _conda_pip_requirements()
    by_name = {_name(r): r for r in conda}
    assert set(by_name) == {_name(r) for r in wanted}
    for requirement in wanted:
        name = _name(requirement)
        if name == "torch":  # conda pins the exact build the Makefile installs
            assert by_name[name] == "torch==2.13.0"
        else:
            assert by_name[name].replace(" ", "") == requirement.replace(" ", ""), name


def test_makefile_installs_pinned_torch_first():
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.index("torch==2.13.0") < makefile.index('-e ".[dev]"')


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_no_machine_paths_committed():
    for path in list(ROOT.glob("gpt2_course/**/*.py")) + list(ROOT.glob("notebooks/*.ipynb")):
        assert "/work/" not in path.read_text(), path
