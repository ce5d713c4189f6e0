"""Colab: the link at the top of every notebook and the cell that installs the course there.

On Colab the course is not installed yet when a notebook opens, so the bootstrap cell is
plain Python: the source of `colab_bootstrap` below, copied into each notebook by
`gpt2-course colab-stamp REF` with the repository URL (from pyproject.toml's
`[project.urls] Repository`, the one place it is written) and the ref to pin.

Colab is detected by `"google.colab" in sys.modules`: Colab's kernel imports that module
when it starts, no other kernel does. The COLAB_* environment variables are no good:
Kaggle's notebooks run on Colab's image and have them too.
"""

import argparse
import inspect
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"

COLAB = "https://colab.research.google.com/github"
# A tag or a commit hash; nothing a shell or Python string could misread.
REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
# A plain text link: a badge image would be fetched from the internet by every page view.
BADGE = re.compile(r"\A\[Open in Colab\]\((?P<link>[^)\s]+)\)\n\n")
CALL = re.compile(r'^colab_bootstrap\("(?P<url>[^"]+)", "(?P<ref>[^"]+)"\)$', re.M)
HEADER = (
    "# On Colab: installs the course at the version this notebook belongs to. Elsewhere: nothing."
)


def colab_bootstrap(url: str, ref: str, root: str = "/content/gpt2-course") -> None:
    """On Colab only: clone the course at `ref`, install it editable, work in its notebooks/."""
    import os
    import subprocess
    import sys

    if "google.colab" not in sys.modules:
        return
    if not os.path.isdir(os.path.join(root, ".git")):
        subprocess.run(["git", "clone", "--quiet", url, root], check=True)
        subprocess.run(["git", "-C", root, "checkout", "--quiet", ref], check=True)
    done = os.path.join(root, ".colab-installed")
    if not os.path.exists(done):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", root], check=True)
        open(done, "w").close()
    if root not in sys.path:  # a running kernel does not see a new editable install
        sys.path.insert(0, root)
    os.chdir(os.path.join(root, "notebooks"))
    print(f"The course ({ref}) is in {root}. Edit your exercises in Colab's file editor:")
    print(f"Files (left sidebar) > {root}/gpt2_course/exercises/*.py; autoreload picks edits up.")
    print("Colab deletes these files when the runtime ends: download the ones you edited.")


def repository_url(root: Path = ROOT) -> str:
    """The public repository, from pyproject.toml (change it there, then restamp)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return project["urls"]["Repository"].rstrip("/")


def colab_link(url: str, ref: str, notebook: str) -> str:
    """Colab's address for one notebook of the repository at `ref`."""
    owner_repo = url.removeprefix("https://github.com/").removesuffix(".git")
    return f"{COLAB}/{owner_repo}/blob/{ref}/notebooks/{notebook}"


def bootstrap_cell(url: str, ref: str) -> str:
    """The first code cell of every notebook: the function's own source, then its call."""
    source = inspect.getsource(colab_bootstrap)
    return f'{HEADER}\n{source}\n\ncolab_bootstrap("{url}", "{ref}")'


def badge(url: str, ref: str, notebook: str) -> str:
    return f"[Open in Colab]({colab_link(url, ref, notebook)})\n\n"


def stamped(notebook: dict) -> tuple[str | None, str | None]:
    """The (url, ref) a notebook's bootstrap cell pins, or Nones where it has none."""
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    match = CALL.search(_text(code[0]["source"])) if code else None
    return (match["url"], match["ref"]) if match else (None, None)


def badge_link(notebook: dict) -> str | None:
    """Where the link at the top of the first markdown cell points, or None."""
    first = notebook["cells"][0] if notebook["cells"] else None
    if first is None or first["cell_type"] != "markdown":
        return None
    match = BADGE.match(_text(first["source"]))
    return match["link"] if match else None


def stamp_notebook(notebook: dict, name: str, url: str, ref: str) -> dict:
    """The notebook with its link and bootstrap cell (re)written for `ref`, outputs kept."""
    cells = notebook["cells"]
    first = _text(cells[0]["source"])
    cells[0]["source"] = badge(url, ref, name) + BADGE.sub("", first, count=1)
    code = next(i for i, c in enumerate(cells) if c["cell_type"] == "code")
    source = bootstrap_cell(url, ref)
    if CALL.search(_text(cells[code]["source"])):
        cells[code]["source"] = source
    else:
        cells.insert(code, _code_cell(source, notebook))
    return notebook


def stamp(ref: str, notebooks: Path | None = None, url: str | None = None) -> list[Path]:
    """Rewrite the link and the bootstrap cell of every notebook for `ref`."""
    if not REF.fullmatch(ref):
        raise ValueError(f"{ref!r} is not a tag or commit name (letters, digits, . _ / -)")
    url = url or repository_url()
    import nbformat  # Jupyter's own writer: the files keep their layout

    paths = sorted((notebooks or NOTEBOOKS).glob("*.ipynb"))
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        nbformat.write(stamp_notebook(notebook, path.name, url, ref), path)
    return paths


def _text(source: str | list[str]) -> str:
    return source if isinstance(source, str) else "".join(source)


def _code_cell(source: str, notebook: dict) -> dict:
    from nbformat import from_dict

    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": []}
    if (notebook.get("nbformat"), notebook.get("nbformat_minor", 0)) >= (4, 5):
        cell["id"] = "colab-bootstrap"  # fixed, so that restamping changes nothing else
    return from_dict({**cell, "source": source})


def add_cli(sub: argparse._SubParsersAction) -> None:
    command = sub.add_parser(
        "colab-stamp", help="pin every notebook's Colab link and first cell to a tag or commit"
    )
    command.add_argument("ref", help="the tag (best: it can name the commit that holds it)")
    command.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    try:
        paths = stamp(args.ref)
    except ValueError as error:
        print(f"gpt2-course colab-stamp: {error}", file=sys.stderr)
        return 2
    print(f"Stamped {len(paths)} notebooks with {args.ref} ({repository_url()}).")
    return 0
