"""The hosted CI workflow is valid GitHub Actions and runs what the README promises.

It never runs here; check-jsonschema lints it offline against the GitHub-workflow schema
it ships (`--builtin-schema vendor.github-workflows`).
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"

needs_checker = pytest.mark.skipif(
    importlib.util.find_spec("check_jsonschema") is None,
    reason="check-jsonschema is not installed (it is in the dev extras: pip install -e '.[dev]')",
)


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
        + [str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


@needs_checker
def test_the_workflow_is_valid_for_github():
    result = lint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validation done" in result.stdout


@needs_checker
def test_the_linter_rejects_a_broken_workflow(tmp_path):
    # the lint is real: a job without a runner, and a misspelt key, are caught
    broken = tmp_path / "ci.yml"
    text = WORKFLOW.read_text()
    broken.write_text(text.replace("    runs-on: macos-14\n", "", 1))
    result = lint(broken)
    assert result.returncode == 1 and "macos" in result.stdout, result.stdout
    broken.write_text(text.replace("timeout-minutes: 90", "timeout-minute: 90", 1))
    result = lint(broken)
    assert result.returncode == 1 and "timeout-minute" in result.stdout, result.stdout


def test_it_runs_on_push_and_pull_request():
    flow = workflow()
    triggers = flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert set(triggers) == {"push", "pull_request"}


def setup_python(job: dict) -> dict:
    return next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python"))


def test_linux_runs_ci_run_on_python_311_and_312_with_a_pip_cache():
    job = workflow()["jobs"]["linux"]
    assert job["runs-on"].startswith("ubuntu")
    assert job["strategy"]["matrix"]["python"] == ["3.11", "3.12"]
    assert setup_python(job)["with"] == {
        "python-version": "${{ matrix.python }}",
        "cache": "pip",
        "cache-dependency-path": "pyproject.toml",
    }
    run = next(s for s in job["steps"] if s.get("run") == ".ci/run")
    assert run["env"] == {"PYTHON": "python${{ matrix.python }}"}
    # .ci/run takes the interpreter from the workflow, and sudo where it is not root
    script = (ROOT / ".ci" / "run").read_text()
    assert 'PYTHON="${PYTHON:-python3.11}"' in script and "sudo -n" in script


def test_macos_runs_the_unit_tests_offline():
    flow = workflow()
    job = flow["jobs"]["macos"]
    assert job["runs-on"].startswith("macos")
    assert setup_python(job)["with"]["cache"] == "pip"
    assert [s["run"] for s in job["steps"] if "run" in s] == [
        "make setup PYTHON=python3.11",
        "make test-unit",
    ]
    offline = {"GPT2_COURSE_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    assert offline.items() <= flow["env"].items()
