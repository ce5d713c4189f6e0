"""Reading a submission: a folder of exercise files, a course checkout, or a `.zip` of either.

Submissions come from learners, so nothing in them is trusted: a zip's headers can
lie, its names can point anywhere, and a folder can hold links or huge files.
"""

import importlib
import os
import re
import stat
import struct
import sys
import types
import zipfile
import zlib
from pathlib import Path

# Exercise files are tiny; these limits are far above any honest submission.
MAX_ZIP_BYTES = 50 * 1024 * 1024  # bytes a zip may unpack to (and the zip file's own size)
MAX_ZIP_ENTRIES = 2000
MAX_PATH_DEPTH = 12  # components in one name, the file included
MAX_PART_BYTES = 255  # one component of a name (the usual file-system limit)
MAX_NAME_BYTES = 1024  # a whole name
MAX_EXERCISE_FILES = 50
MAX_EXERCISE_FILE_BYTES = 1024 * 1024
CHUNK_BYTES = 64 * 1024

# Everything zipfile (and the zlib under it) raises on a broken, odd or hostile archive.
_ZIP_ERRORS = (
    zipfile.BadZipFile,  # also a bad CRC
    zipfile.LargeZipFile,
    RuntimeError,  # an encrypted entry
    NotImplementedError,  # an unknown compression method
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    struct.error,
)
_DRIVE = re.compile(r"[A-Za-z]:")
_SEPARATORS = re.compile(r"[/\\]")  # Windows tools sometimes write backslashes


class SubmissionError(Exception):
    """A submission that cannot be graded at all (missing, not a course layout, bad zip)."""


# ---------------------------------------------------------------- finding exercises


def _exercise_modules() -> list[str]:
    # Imported here: gpt2_course.checks pulls in torch, which reading a zip does not need.
    from gpt2_course.checks.registry import CHECK_MODULES

    return CHECK_MODULES


def _holds_exercises(folder: Path, modules: list[str]) -> bool:
    return folder.is_dir() and any((folder / f"{m}.py").is_file() for m in modules)


def _where(folder: Path, root: Path) -> str:
    """A candidate folder as a learner would name it: relative to the submission."""
    relative = folder.relative_to(root).as_posix()
    return "the top folder" if relative == "." else f"{relative}/"


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def find_exercises(root: Path) -> Path:
    """The one folder of exercise files inside a submission folder."""
    if not root.exists():
        raise SubmissionError(f"{root} does not exist")
    if not root.is_dir():
        raise SubmissionError(f"{root} is neither a folder nor a .zip file")
    candidates = [root / "gpt2_course" / "exercises", root]
    # A zip often wraps everything in one top-level folder; __MACOSX, __pycache__
    # and dot folders (.git, .ipynb_checkpoints) never hold the submission.
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    if len(subdirs) == 1:
        candidates += [subdirs[0] / "gpt2_course" / "exercises", subdirs[0]]
    modules = _exercise_modules()
    found = [folder for folder in candidates if _holds_exercises(folder, modules)]
    if not found:
        raise SubmissionError(
            f"{root} holds no exercise files: expected files such as layernorm.py, "
            "either directly or under gpt2_course/exercises/"
        )
    if len(found) > 1:
        # Grading one copy silently could grade the wrong one; the learner must choose.
        places = [_where(folder, root) for folder in found]
        both = "both " if len(places) == 2 else ""
        raise SubmissionError(
            f"exercise files were found in {both}{_listing(places)}: "
            "keep a single copy so that it is clear which one is graded"
        )
    return found[0]


# ---------------------------------------------------------------- unpacking zips


def _show(name: str, limit: int = 80) -> str:
    """A name for a message, cut short: a hostile name can be kilobytes long."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _is_folder(info: zipfile.ZipInfo) -> bool:
    return info.filename.endswith(("/", "\\"))


def _is_junk(parts: tuple[str, ...]) -> bool:
    """Files that macOS adds to every zip it makes."""
    return parts[0] == "__MACOSX" or parts[-1] == ".DS_Store"


def _safe_parts(zip_name: str, info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The components of an entry's name, refusing any name that could leave the target."""
    name = info.filename
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise SubmissionError(f"{zip_name} contains an unsafe path: {_show(name)}")
    parts = tuple(p for p in _SEPARATORS.split(name) if p not in ("", "."))
    if ".." in parts:
        raise SubmissionError(f"{zip_name} contains an unsafe path: {_show(name)}")
    if _is_link(info):
        raise SubmissionError(f"{zip_name} contains a symbolic link: {_show(name)}")
    if len(parts) > MAX_PATH_DEPTH:
        raise SubmissionError(
            f"{zip_name} contains a path more than {MAX_PATH_DEPTH} levels deep: {_show(name)}"
        )
    if any(len(p.encode()) > MAX_PART_BYTES for p in parts):
        raise SubmissionError(
            f"{zip_name} contains a name longer than {MAX_PART_BYTES} bytes: {_show(name)}"
        )
    if len("/".join(parts).encode()) > MAX_NAME_BYTES:
        raise SubmissionError(
            f"{zip_name} contains a path longer than {MAX_NAME_BYTES} bytes: {_show(name)}"
        )
    return parts


def _plan(zip_name: str, archive: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Check every entry before writing anything; return the entries to extract."""
    infos = archive.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise SubmissionError(
            f"{zip_name} holds {len(infos)} entries, more than the {MAX_ZIP_ENTRIES} allowed"
        )
    plan, files, folders = [], set(), set()
    for info in infos:
        parts = _safe_parts(zip_name, info)
        if not parts or _is_junk(parts):
            continue
        if _is_folder(info):
            folders.add(parts)
        elif parts in files:  # which copy would be graded would depend on the order
            raise SubmissionError(f"{zip_name} contains {_show('/'.join(parts))} twice")
        else:
            files.add(parts)
        folders.update(parts[:i] for i in range(1, len(parts)))
        plan.append((info, parts))
    if clash := files & folders:
        name = "/".join(min(clash))
        raise SubmissionError(f"{zip_name} contains {_show(name)} both as a file and as a folder")
    return plan


def _reason(error: BaseException) -> str:
    """An error's own words, without any path: str() of an OSError names the temporary one."""
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return str(error) or type(error).__name__


def _describe(error: BaseException) -> str:
    """Why zipfile failed on an entry, in words for the instructor."""
    if isinstance(error, RuntimeError) and "encrypted" in str(error):
        return "it is password-protected; submit a zip without a password"
    if isinstance(error, NotImplementedError):
        return f"it uses a compression method the grader cannot read ({error})"
    if isinstance(error, zipfile.BadZipFile | zlib.error | EOFError):
        return f"its data is corrupted ({_reason(error)})"
    return _reason(error)


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else f"{n} bytes"


def _copy_entry(
    zip_name: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, written: int
) -> int:
    """Write one entry, counting the bytes really written: headers can lie about sizes."""
    with archive.open(info) as source, target.open("xb") as sink:
        while chunk := source.read(CHUNK_BYTES):
            written += len(chunk)
            if written > MAX_ZIP_BYTES:
                raise SubmissionError(f"{zip_name} unpacks to more than {_size(MAX_ZIP_BYTES)}")
            sink.write(chunk)
    return written


def _extract(
    zip_name: str,
    archive: zipfile.ZipFile,
    plan: list[tuple[zipfile.ZipInfo, tuple[str, ...]]],
    into: Path,
) -> None:
    root = into.resolve()
    written = 0
    for info, parts in plan:
        target = root.joinpath(*parts)
        # Only names were checked so far; a link already in `into` could still lead out.
        if not target.resolve().is_relative_to(root):
            raise SubmissionError(f"{zip_name} contains an unsafe path: {_show(info.filename)}")
        try:
            if _is_folder(info):
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                written = _copy_entry(zip_name, archive, info, target, written)
        except _ZIP_ERRORS as error:
            raise SubmissionError(
                f"{zip_name} could not be unpacked at {_show(info.filename)}: {_describe(error)}"
            ) from error


def extract_zip(path: Path, into: Path) -> Path:
    """Unpack a submission zip into `into` (created), trusting none of its headers.

    Refused, with a SubmissionError naming the zip: unsafe names (absolute, '..',
    drive letters), links, too many entries, too deep or too long names, more than
    MAX_ZIP_BYTES unpacked, and anything zipfile cannot read. Names are all checked
    before anything is written; on a refusal `into` may hold part of the zip, and
    the caller, who owns it, removes it.
    """
    zip_name = path.name  # never the full path: it may be a temporary one
    try:
        if path.stat().st_size > MAX_ZIP_BYTES:
            raise SubmissionError(f"{zip_name} is larger than {_size(MAX_ZIP_BYTES)}")
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS as error:
        reason = _reason(error)
        raise SubmissionError(f"{zip_name} is not a readable zip file ({reason})") from error
    with archive:
        plan = _plan(zip_name, archive)
        into.mkdir(parents=True, exist_ok=True)
        _extract(zip_name, archive, plan, into)
    return into


# ---------------------------------------------------------------- the private copy


def _read_exercise_file(path: Path) -> bytes:
    """A file's bytes, at most MAX_EXERCISE_FILE_BYTES, never through a link."""
    # O_NOFOLLOW: the file cannot be swapped for a link between the check and the read.
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as file:
        data = file.read(MAX_EXERCISE_FILE_BYTES + 1)
    if len(data) > MAX_EXERCISE_FILE_BYTES:
        raise SubmissionError(
            f"{path.name} is larger than {_size(MAX_EXERCISE_FILE_BYTES)}: "
            "an exercise file is a few kilobytes of code"
        )
    return data


def _exercise_files(exercises: Path) -> list[Path]:
    """The top-level `.py` files to copy; a link among them is refused."""
    files = []
    for path in sorted(exercises.iterdir()):
        # Dot files (macOS's ._layernorm.py) cannot be imported as modules anyway.
        if path.suffix != ".py" or path.name.startswith("."):
            continue
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise SubmissionError(
                f"{path.name} is a symbolic link: submit the file itself, not a link to it"
            )
        if stat.S_ISREG(mode):  # not a folder, a pipe or a device that happens to end in .py
            files.append(path)
    if len(files) > MAX_EXERCISE_FILES:
        raise SubmissionError(
            f"the exercise folder holds {len(files)} .py files, "
            f"more than the {MAX_EXERCISE_FILES} allowed"
        )
    return files


def copy_exercises(exercises: Path, into: Path) -> Path:
    """Copy the exercise folder's top-level `.py` files into `into` (created); return it.

    The grader runs learner code only on this private copy, so the submission itself
    is never modified (no `__pycache__`, nothing a learner's code writes beside itself).
    """
    try:
        files = _exercise_files(exercises)
        into.mkdir(parents=True, exist_ok=True)
        for path in files:
            (into / path.name).write_bytes(_read_exercise_file(path))
    except OSError as error:
        name = Path(error.filename).name if error.filename else exercises.name
        raise SubmissionError(f"{name} could not be copied ({_reason(error)})") from error
    return into


def load_submission_package(folder: Path, name: str | None = None) -> str:
    """Make the submission's exercise folder importable as a package of its own; return its name.

    The name defaults to one derived from the folder, so that several submissions
    can be imported side by side in one process.
    """
    name = name or f"gpt2_course_submission_{abs(hash(str(folder.resolve()))):x}"
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    package.__package__ = name
    sys.modules[name] = package
    importlib.invalidate_caches()
    return name
