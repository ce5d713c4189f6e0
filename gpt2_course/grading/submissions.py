"""Reading a submission: a folder of exercise files, a course checkout, or a `.zip` of either."""

import importlib
import sys
import types
import zipfile
from pathlib import Path

MAX_ZIP_BYTES = 50 * 1024 * 1024  # exercise files are tiny; refuse zip bombs


class SubmissionError(Exception):
    """A submission that cannot be graded at all (missing, not a course layout, bad zip)."""


def _exercise_modules() -> set[str]:
    from gpt2_course.checks import all_checks

    return {check.module for check in all_checks().values()}


def find_exercises(root: Path) -> Path:
    """The folder of exercise files inside a submission folder."""
    if not root.exists():
        raise SubmissionError(f"{root} does not exist")
    if not root.is_dir():
        raise SubmissionError(f"{root} is neither a folder nor a .zip file")
    known = _exercise_modules()
    candidates = [root / "gpt2_course" / "exercises", root]
    # a zip often wraps everything in one top-level folder
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    if len(subdirs) == 1:
        candidates += [subdirs[0] / "gpt2_course" / "exercises", subdirs[0]]
    for folder in candidates:
        if folder.is_dir() and any((folder / f"{m}.py").is_file() for m in known):
            return folder
    raise SubmissionError(
        f"{root} holds no exercise files: expected files such as layernorm.py, "
        "either directly or under gpt2_course/exercises/"
    )


def extract_zip(path: Path, into: Path) -> Path:
    """Unpack a submission zip safely: no absolute paths, no '..', no links, bounded size."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise SubmissionError(f"{path} is not a readable zip file ({error})") from error
    with archive:
        total = 0
        for info in archive.infolist():
            name = info.filename
            if name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name:
                raise SubmissionError(f"{path} contains an unsafe path: {name!r}")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise SubmissionError(f"{path} contains a symbolic link: {name!r}")
            total += info.file_size
            if total > MAX_ZIP_BYTES:
                raise SubmissionError(f"{path} unpacks to more than {MAX_ZIP_BYTES // 2**20} MiB")
        archive.extractall(into)
    return into


def load_submission_package(folder: Path) -> str:
    """Make the submission's exercise folder importable as a package of its own; return its name."""
    name = f"gpt2_course_submission_{abs(hash(str(folder.resolve()))):x}"
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    package.__package__ = name
    sys.modules[name] = package
    importlib.invalidate_caches()
    return name


