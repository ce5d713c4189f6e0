"""Where a runner runs: in bubblewrap where the machine has it, else in a bare process.

Both levels start the runner in a session of its own (the grader kills the whole
process group at the end, so nothing it started outlives it), with resource
limits, a private temporary folder as working directory and HOME, and an
environment that names no path of the grader's. Bubblewrap adds what a process
alone cannot: no network, no view of the file system beyond Python, the course
package, the shared inputs and the learner's own private copy (all read-only),
a fresh /tmp, its own process and user namespaces, and no capabilities.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BUBBLEWRAP = "bubblewrap sandbox"
PROCESS = "separate process, no sandbox"
PROCESS_NOBODY = "separate process as user nobody, no sandbox"
SUBMISSION_MOUNT = "/submission"  # where a sandboxed runner sees the learner's files


LIMITS_VARIABLE = "GPT2_COURSE_RUNNER_LIMITS"


@dataclass
class Limits:
    memory_bytes: int = 8 << 30  # address space; torch alone maps about 2 GiB
    cpu_seconds: int = 3600  # the whole runner; each check also has a wall-clock limit
    file_bytes: int = 64 << 20  # the largest file the runner may write
    open_files: int = 512
    processes: int = 512  # for user nobody, all runners together (threads count too)

    def to_json(self, processes: bool) -> str:
        return json.dumps({**self.__dict__, "processes": self.processes if processes else None})


def available(choice: str = "auto") -> str:
    """The isolation level to use: "bubblewrap" when asked for or found and working."""
    works = choice != "none" and _bubblewrap_works()
    if choice == "bubblewrap" and not works:
        raise RuntimeError(
            "bubblewrap was asked for but does not work here (install the `bubblewrap` package)"
        )
    if works:
        return BUBBLEWRAP
    return PROCESS_NOBODY if drop_to() is not None else PROCESS


_works: bool | None = None


def _bubblewrap_works() -> bool:
    global _works
    if _works is None:
        bwrap = shutil.which("bwrap")
        try:
            _works = (
                bool(bwrap)
                and subprocess.run(
                    [bwrap, *_system_binds(), "--unshare-all", "--die-with-parent", "/bin/true"],
                    capture_output=True,
                    timeout=20,
                ).returncode
                == 0
            )
        except (OSError, subprocess.SubprocessError):
            _works = False
    return _works


NOBODY = 65534


def drop_to() -> int | None:
    """At the bare-process level: the user id to run learner code as, if we are root.

    Only when that user can start this Python (a Python under /root, say, it cannot).
    """
    if os.geteuid() != 0:
        return None
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import torch, gpt2_course"],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            capture_output=True,
            timeout=120,
            cwd="/",
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return NOBODY if probe.returncode == 0 else None


def _system_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib64", "/sbin"):
        path = Path(top)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), top]
        elif path.is_dir():
            args += ["--ro-bind", top, top]
    if Path("/etc").is_dir():
        args += ["--ro-bind", "/etc", "/etc"]
    return args


def _python_paths() -> list[Path]:
    """Folders a runner needs: Python's prefixes and library folders, and the course.

    Not every folder on sys.path: that may hold the grader's script folder, /tmp or a
    home folder, with the class's submissions in it.
    """
    import site
    import sysconfig

    import gpt2_course

    folders = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent}
    folders |= {Path(p) for p in site.getsitepackages()}
    # site folders reached through a .pth file or a user install (not any folder on sys.path)
    folders |= {Path(p) for p in sys.path if Path(p).name in ("site-packages", "dist-packages")}
    folders |= {Path(sysconfig.get_path(name)) for name in ("stdlib", "platstdlib")}
    folders |= {Path(sysconfig.get_path(name)) for name in ("purelib", "platlib")}
    # the course itself, not the checkout around it (which may hold the class's submissions),
    # and not solutions/: the checks stand on the reference parts, so a runner never needs it
    folders |= {Path(gpt2_course.__file__).parent}
    resolved = sorted({f.resolve() for f in folders if f.exists()})
    # drop folders inside another one of the list
    return [f for f in resolved if not any(o != f and o in f.parents for o in resolved)]


def _hidden_packages() -> list[Path]:
    """Packages a runner has no use for and that could compute the reference."""
    hidden = []
    for name in ("transformer_lens",):
        for folder in sys.path:
            candidate = Path(folder) / name
            if folder and candidate.is_dir():
                hidden.append(candidate.resolve())
    return hidden


def runner_environment(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "GPT2_COURSE_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "no_proxy": "*",
        "http_proxy": "http://0.0.0.0:9",  # no network: fail at once, never hang
        "https_proxy": "http://0.0.0.0:9",
    }


def runner_command(
    level: str, exercises: Path, store: Path | None, results_fd: int, limits: str
) -> list[str]:
    """The command line that starts a runner on `exercises` at isolation `level`."""
    python = [sys.executable, "-m", "gpt2_course.grading.runner"]
    if level != BUBBLEWRAP:
        return [*python, str(exercises), str(store or ""), str(results_fd)]
    args = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    args += ["--uid", "65534", "--gid", "65534", *_system_binds()]
    # a fresh /tmp first: Python or the course may themselves live under /tmp, and
    # their binds below must land on top of it, not under it
    args += ["--tmpfs", "/tmp", "--dir", "/tmp/home"]
    for folder in _python_paths():
        args += ["--ro-bind", str(folder), str(folder)]
    for folder in _hidden_packages():
        args += ["--tmpfs", str(folder)]
    args += ["--ro-bind", str(exercises), SUBMISSION_MOUNT]
    if store is not None:
        args += ["--ro-bind", str(store), "/inputs/store.pt"]
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--chdir", "/tmp/home", "--clearenv"]
    for key, value in runner_environment("/tmp/home").items():
        args += ["--setenv", key, value]
    args += ["--setenv", LIMITS_VARIABLE, limits]
    store_arg = "/inputs/store.pt" if store is not None else ""
    return [*args, *python, SUBMISSION_MOUNT, store_arg, str(results_fd)]


def limit_resources(settings: str) -> None:
    """The runner's first act: resource limits (as JSON from `Limits.to_json`), inherited
    by everything it starts, hard limits it cannot raise again.

    The process count is limited only where the runner runs as user nobody: the
    limit counts every process of a user, and root is exempt from it. In
    bubblewrap, the runner's own process namespace dies with it instead.
    """
    limits = json.loads(settings)
    if limits["processes"]:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
    for which, value in (
        (resource.RLIMIT_AS, limits["memory_bytes"]),
        (resource.RLIMIT_CPU, limits["cpu_seconds"]),
        (resource.RLIMIT_FSIZE, limits["file_bytes"]),
        (resource.RLIMIT_NOFILE, limits["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ):
        soft, hard = resource.getrlimit(which)
        cap = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (cap, cap))
