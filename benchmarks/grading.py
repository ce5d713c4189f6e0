"""Grading a class: one reference per run and parallel runners, against one process per
submission that rebuilds the reference each time (how grading worked before).

    .venv/bin/python -m benchmarks.grading                   # 20 copies of the solutions, 10 stubs
    .venv/bin/python -m benchmarks.grading --solutions 4 --stubs 2

Both ways grade the same submissions in the same run, each way in a process of its
own so that its peak memory is its own; it prints seconds per submission and the ratio.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 5.0  # the new grader at least this many times faster per submission


def make_class(folder: Path, solutions: int, stubs: int) -> list[str]:
    paths = []
    for kind, count, source in (
        ("solution", solutions, ROOT / "solutions"),
        ("stub", stubs, ROOT / "gpt2_course" / "exercises"),
    ):
        for i in range(count):
            target = folder / f"{kind}-{i:02d}"
            target.mkdir(parents=True)
            for path in source.glob("*.py"):
                if path.name != "__init__.py":
                    shutil.copy(path, target)
            paths.append(str(target))
    return paths


def grade_new(paths: list[str], jobs: int) -> dict:
    from gpt2_course.grading.grader import Grader, grade_all

    start = time.perf_counter()
    with Grader() as grader:
        prepared = time.perf_counter() - start
        grades = grade_all(grader, paths, jobs)
        level = grader.level
    return {
        "seconds": time.perf_counter() - start,
        "prepare_seconds": prepared,
        "scores": [g.score for g in grades],
        "isolation": level,
    }


def grade_one_in_process(folder: str) -> float:
    """Before: a child that builds the reference, then runs and judges every check itself."""
    from gpt2_course import parts
    from gpt2_course.checks import all_checks, run_check
    from gpt2_course.grading.submissions import load_submission_package

    package = load_submission_package(Path(folder))
    with parts.using(package):
        return sum(run_check(cid, package).points for cid in all_checks())


def grade_old(paths: list[str]) -> dict:
    start = time.perf_counter()
    scores, seconds = [], []
    for path in paths:
        begin = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.grading", "--one", path],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        scores.append(float(child.stdout.strip().splitlines()[-1]))
        seconds.append(time.perf_counter() - begin)
    return {"seconds": time.perf_counter() - start, "scores": scores, "each": seconds}


def run_phase(phase: str, paths: list[str], jobs: int) -> dict:
    """One way of grading, in a fresh process; adds the peak memory of its children."""
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.grading", "--phase", phase, "--jobs", str(jobs), *paths],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if child.returncode != 0:
        raise RuntimeError(f"the {phase} phase failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solutions", type=int, default=20)
    parser.add_argument("--stubs", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--old-sample",
        type=int,
        default=None,
        metavar="K",
        help="grade only K solutions and K stubs the old way (it has no shared work, so its "
        "seconds per submission do not depend on the class size); default: all",
    )
    parser.add_argument("--phase", choices=["new", "old"], help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("GPT2_COURSE_OFFLINE", "1")
    if args.one:
        print(grade_one_in_process(args.one))
        return 0.0
    if args.phase:
        result = grade_new(args.paths, args.jobs) if args.phase == "new" else grade_old(args.paths)
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        result |= {"peak_rss_gib": own / 2**20, "peak_child_rss_gib": children / 2**20}
        print(json.dumps(result))
        return 0.0

    with tempfile.TemporaryDirectory(prefix="grading-benchmark-") as tmp:
        paths = make_class(Path(tmp), args.solutions, args.stubs)
        n = len(paths)
        print(
            f"{args.solutions} copies of the solutions and {args.stubs} of the stubs, "
            f"{os.cpu_count()} cores"
        )
        new = run_phase("new", paths, args.jobs)
        k = args.old_sample
        sample = paths if k is None else paths[:k] + paths[args.solutions : args.solutions + k]
        old = run_phase("old", sample, args.jobs)
    kinds = ["solution"] * args.solutions + ["stub"] * args.stubs
    chosen = (
        kinds
        if k is None
        else ["solution"] * min(k, args.solutions) + ["stub"] * min(k, args.stubs)
    )
    new_scores = dict(zip(paths, new["scores"], strict=True))
    assert [new_scores[p] for p in sample] == old["scores"], (new["scores"], old["scores"])
    # the old way's seconds per submission of each kind, weighted as in the class
    mean = {
        kind: sum(s for s, c in zip(old["each"], chosen, strict=True) if c == kind)
        / max(1, chosen.count(kind))
        for kind in ("solution", "stub")
    }
    per_new = new["seconds"] / n
    per_old = (mean["solution"] * args.solutions + mean["stub"] * args.stubs) / n
    print(
        f"new grader ({new['isolation']}, jobs={args.jobs}): {new['seconds']:.0f} s in all, "
        f"{per_new:.1f} s per submission (of which {new['prepare_seconds']:.0f} s once, "
        f"for the reference and the cases); peak memory: grader "
        f"{new['peak_rss_gib']:.2f} GiB, one runner {new['peak_child_rss_gib']:.2f} GiB"
    )
    print(
        f"one process per submission, reference rebuilt each time ({len(sample)} graded): "
        f"{mean['solution']:.1f} s per solution, {mean['stub']:.1f} s per stub, "
        f"{per_old:.1f} s per submission of this class; peak memory of one "
        f"{old['peak_child_rss_gib']:.2f} GiB"
    )
    ratio = per_old / per_new
    print(f"ratio (before / now, per submission): {ratio:.2f}   goal >= {GOAL:g}")
    return ratio


if __name__ == "__main__":
    main()
