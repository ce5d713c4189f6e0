"""Every benchmark in one command, one after the other, on the same machine in one process.

    .venv/bin/python -m benchmarks.run_all              # the full suite (minutes on a laptop CPU)
    .venv/bin/python -m benchmarks.run_all --quick      # smaller sizes, to see that it all runs
    .venv/bin/python -m benchmarks --threads 4          # the same

It ends with one table: every ratio, its goal, and whether it was met.
"""

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a script: make `benchmarks` and `solutions` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import forward_throughput, generation, scale_training, training_step


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    args = parser.parse_args(argv)
    threads = [] if args.threads is None else ["--threads", str(args.threads)]

    forward_args = ["--batch", "1", "--seq", "64", "--repeats", "3"] if args.quick else []
    generation_args = ["--new-tokens", "32", "--repeats", "2"] if args.quick else []
    training_args = ["--steps", "2", "--train-steps", "4", "--repeats", "2"] if args.quick else []
    scale_args = ["--quick"] if args.quick else []

    print("=" * 72 + "\nforward throughput (benchmarks/forward_throughput.py)\n" + "=" * 72)
    ratios = {"forward_vs_hf": forward_throughput.main(threads + forward_args)}
    print("\n" + "=" * 72 + "\ngeneration (benchmarks/generation.py)\n" + "=" * 72)
    ratios |= generation.main(threads + generation_args)
    print("\n" + "=" * 72 + "\ntraining steps (benchmarks/training_step.py)\n" + "=" * 72)
    ratios |= training_step.main(threads + training_args)
    print("\n" + "=" * 72 + "\nscaled-up training (benchmarks/scale_training.py)\n" + "=" * 72)
    ratios |= scale_training.main(threads + scale_args)

    goals = {
        "forward_vs_hf": ("forward tokens/s, ours / Hugging Face", forward_throughput.GOAL),
        "generation_vs_hf": ("cached generation, ours / Hugging Face", generation.HF_GOAL),
        "cached_vs_uncached": ("generation, ours cached / uncached", generation.CACHE_GOAL),
        "training_allocator": (
            "training, freed memory kept / defaults",
            training_step.ALLOCATOR_GOAL,
        ),
        "training_vs_hf": ("training steps, ours / Hugging Face", training_step.HF_GOAL),
        "scale_training_vs_hf": (
            "scaled-up training, course / Hugging Face",
            scale_training.GOAL,
        ),
    }
    print(
        "\n" + "=" * 72 + "\nsummary" + (" (--quick sizes)" if args.quick else "") + "\n" + "=" * 72
    )
    for key, (what, goal) in goals.items():
        verdict = "met" if ratios[key] >= goal else "NOT met"
        print(f"{what:<44} {ratios[key]:8.2f}   goal >= {goal:<4g} {verdict}")
    return ratios


if __name__ == "__main__":
    main()
