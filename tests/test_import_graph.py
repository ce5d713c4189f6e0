"""The checks stand on TransformerLens, Hugging Face and torch alone: no module of the
package imports `solutions` (parts looks it up by name, optionally, to lend a part)."""

import ast
from pathlib import Path

import gpt2_course
from gpt2_course.checks.core import describe_exception

PACKAGE = Path(gpt2_course.__file__).parent
ALLOWED = {"parts.py"}  # `parts.use_solution` lends solutions/ where it exists


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def test_no_module_imports_solutions():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in ALLOWED:
            continue
        for line, module in imported_modules(ast.parse(path.read_text())):
            if module == "solutions" or module.startswith("solutions."):
                offenders.append(f"gpt2_course/{relative}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_the_scan_sees_every_kind_of_import():
    code = "import solutions.x\nfrom solutions import y\nimportlib.import_module('solutions.z')\n"
    assert [m for _, m in imported_modules(ast.parse(code))] == [
        "solutions.x",
        "solutions",
        "solutions.z",
    ]


def test_the_reference_parts_and_mistakes_stand_alone():
    for folder in ("reference_parts", "checks/mistakes"):
        for path in (PACKAGE / folder).glob("*.py"):
            text = path.read_text()
            assert "solutions" not in text.replace("solutions/", ""), path


def test_errors_are_reported_at_the_learners_line(tmp_path):
    # an einops error is reported where the learner called einops, not inside einops
    learner = tmp_path / "learner_layernorm.py"
    learner.write_text(
        "import einops\n\ndef forward(x):\n    return einops.rearrange(x, 'a b -> a b c')\n"
    )
    namespace: dict = {}
    exec(compile(learner.read_text(), str(learner), "exec"), namespace)
    import torch

    try:
        namespace["forward"](torch.zeros(2, 3))
    except Exception as error:
        described = describe_exception(error)
    assert "learner_layernorm.py, line 4" in described.replace(str(tmp_path) + "/", ""), described
    assert "einops/einops.py" not in described


def test_no_notebook_imports_solutions():
    # the notebooks ship in a learner's release, which has no solutions/
    import json

    notebooks = Path(__file__).resolve().parent.parent / "notebooks"
    offenders = []
    for notebook in sorted(notebooks.glob("*.ipynb")):
        for cell in json.loads(notebook.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] != "code" or source.lstrip().startswith(("%", "!")):
                continue
            code = "\n".join(
                line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))
            )
            for _, module in imported_modules(ast.parse(code)):
                if module == "solutions" or module.startswith("solutions."):
                    offenders.append(f"{notebook.name} imports {module}")
            if "parts.SOLUTIONS" in source:
                offenders.append(f"{notebook.name} uses parts.SOLUTIONS")
    assert not offenders, "\n".join(offenders)
