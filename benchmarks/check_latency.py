"""How long a learner waits for a check, now and at an earlier commit, on the same machine.

    .venv/bin/python -m benchmarks.check_latency --baseline 2f49ca5

For every check, in a fresh process per tree: the first call (building the cases),
a passing run (the solution), and a failing run with its diagnosis (the check's
first mistake). The earlier commit runs from a temporary git worktree; both trees
run one after the other, twice, interleaved, and the medians are compared.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TIMER = r"""
import json, sys, time
from gpt2_course import parts
from gpt2_course.checks import all_checks, run_check
from gpt2_course.reference import get_reference

start = time.perf_counter()
get_reference()
times = {"reference": time.perf_counter() - start}
for check_id, check in all_checks().items():
    start = time.perf_counter()
    _ = check.cases
    times[check_id + " cases"] = time.perf_counter() - start
    start = time.perf_counter()
    assert run_check(check_id, parts.SOLUTIONS).passed, check_id
    times[check_id + " pass"] = time.perf_counter() - start
    mistake = check.mistakes[0]
    start = time.perf_counter()
    verdict = check.judge(check.run(mistake.implementation))
    times[check_id + " diagnose"] = time.perf_counter() - start
    assert mistake.name in verdict.mistakes, (check_id, verdict.feedback)
print(json.dumps(times))
"""


def measure(tree: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), GPT2_COURSE_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.pop("GPT2_COURSE_SOLUTIONS", None)
    done = subprocess.run(
        [sys.executable, "-c", TIMER], cwd=tree, env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"timing {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the earlier commit to compare with")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        old_tree = Path(scratch) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "-q", "--detach", str(old_tree), args.baseline],
            cwd=ROOT,
            check=True,
        )
        try:
            runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
            for _ in range(args.repeats):
                runs["old"].append(measure(old_tree))
                runs["new"].append(measure(ROOT))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT)
    old = {k: statistics.median(r[k] for r in runs["old"]) for k in runs["old"][0]}
    new = {k: statistics.median(r[k] for r in runs["new"]) for k in runs["new"][0]}
    print(f"{'what':<58} {'before s':>9} {'after s':>9} {'ratio':>6}")
    for key in new:
        if key in old:
            print(f"{key:<58} {old[key]:>9.2f} {new[key]:>9.2f} {old[key] / new[key]:>6.2f}")
    total_old, total_new = sum(old.values()), sum(new.values())
    ratio = total_old / total_new
    print(f"{'total':<58} {total_old:>9.2f} {total_new:>9.2f} {ratio:>6.2f}")
    print(f"check latency, before / after: {ratio:.2f} (goal: at least 1.0, no slower)")
    return ratio


if __name__ == "__main__":
    main()
