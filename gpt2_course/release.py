"""`gpt2-course release OUT`: the copy of the course an instructor hands to a class.

It holds the notebooks (without outputs), the exercise stubs, the package and the
README; it holds no `solutions/` and no mistake code. Its checks stand on
TransformerLens, Hugging Face and torch alone, its lent parts are the reference
parts, and it names common mistakes from `checks/fingerprints.json`, written here
by running every mistake of the full course on its check's seeded cases.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What a learner gets, relative to the course root; everything else stays behind
# (solutions/, the mistake libraries, tests, benchmarks, CI).
SHIPPED = ["README.md", "pyproject.toml", "Makefile", "environment.yml", "notebooks", "gpt2_course"]
LEFT_BEHIND = ["gpt2_course/checks/mistakes", "gpt2_course/checks/fingerprints.json"]
NOT_COPIED = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints", "*.egg-info")


class ReleaseError(Exception):
    """The release cannot be made (a clear message, nothing half-written left behind)."""


def course_files(root: Path = ROOT) -> list[Path]:
    """The files under version control (a release never ships a stray local file)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", *SHIPPED],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return [p.relative_to(root) for name in SHIPPED for p in _walk(root / name)]
    return [Path(name) for name in listed.decode().split("\0") if name]


def _walk(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in sorted(path.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]


def _left_behind(relative: Path) -> bool:
    text = relative.as_posix()
    return any(text == gone or text.startswith(gone + "/") for gone in LEFT_BEHIND)


def strip_outputs(notebook: str) -> str:
    """A notebook without outputs or execution counts."""
    data = json.loads(notebook)
    for cell in data.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def release_pyproject(text: str) -> str:
    """The project file without `solutions` in its packages, with the fingerprints as data."""
    text = text.replace('include = ["gpt2_course*", "solutions*"]', 'include = ["gpt2_course*"]')
    return text.replace(
        'gpt2_course = ["py.typed"]', 'gpt2_course = ["py.typed", "checks/fingerprints.json"]'
    )


RELEASE_MAKEFILE = """\
# One command opens the course: make lab
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup lab

setup: $(VENV)/.installed

# torch is pinned and installed first: an open range would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
\ttest -d $(VENV) || $(PYTHON) -m venv $(VENV)
\t$(BIN)/python -m pip install --quiet --upgrade pip
\t$(BIN)/python -m pip install --quiet torch==2.13.0
\t$(BIN)/python -m pip install --quiet -e .
\ttouch $@

lab: setup
\t$(BIN)/jupyter lab notebooks/00_start_here.ipynb
"""


def make_release(out: Path, fingerprint_data: dict | None = None, root: Path = ROOT) -> Path:
    """Write the learner's copy to `out` (which must not exist or be empty)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseError(f"{out} already exists and is not empty: choose a new folder")
    if out.resolve() == root or root in out.resolve().parents:
        raise ReleaseError(f"{out} is inside the course: choose a folder outside it")
    if fingerprint_data is None:
        fingerprint_data = build_fingerprints()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for relative in course_files(root):
            if _left_behind(relative):
                continue
            source, target = root / relative, staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if relative.suffix == ".ipynb":
                target.write_text(strip_outputs(source.read_text()))
            elif relative.as_posix() == "pyproject.toml":
                target.write_text(release_pyproject(source.read_text()))
            elif relative.as_posix() == "Makefile":
                target.write_text(RELEASE_MAKEFILE)
            else:
                shutil.copy2(source, target)
        from gpt2_course.checks import fingerprints

        fingerprints.save(fingerprint_data, staging / "gpt2_course/checks/fingerprints.json")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def build_fingerprints() -> dict:
    """Every mistake's fingerprints, from the full course's mistake code."""
    from gpt2_course.checks import all_checks, fingerprints

    if not (Path(fingerprints.__file__).parent / "mistakes").is_dir():
        raise ReleaseError("this copy has no mistake libraries: release from the full course")
    return fingerprints.build(all_checks())


def add_cli(sub: argparse._SubParsersAction) -> None:
    release = sub.add_parser(
        "release", help="write the learner's copy of the course (no solutions, no mistake code)"
    )
    release.add_argument("out", type=Path, help="a new, empty folder outside the course")
    release.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    try:
        out = make_release(args.out)
    except ReleaseError as error:
        print(f"gpt2-course release: {error}", file=sys.stderr)
        return 2
    print(f"Wrote the learner's copy to {out}: no solutions/, mistakes as fingerprints.")
    return 0


__all__ = ["ReleaseError", "make_release", "strip_outputs", "release_pyproject"]
