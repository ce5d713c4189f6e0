"""The `gpt2-course` command: check, progress, grade, and (where present) train and generate."""

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that add their own subcommand through `add_cli(subparsers)`.
PLUGINS = [
    "gpt2_course.trainer",
    "gpt2_course.generation",
    "gpt2_course.release",
    "gpt2_course.colab",
    "gpt2_course.shards",
]


def _check(args: argparse.Namespace) -> int:
    from gpt2_course import parts
    from gpt2_course.checks import all_checks, run_check

    ids = args.ids or list(all_checks())
    package = parts.SOLUTIONS if args.solutions else None
    failed = 0
    for check_id in ids:
        try:
            result = run_check(check_id, package)
        except KeyError as error:
            print(error.args[0], file=sys.stderr)
            return 2
        print(result.report())
        failed += not result.passed
    print(f"{len(ids) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _progress(args: argparse.Namespace) -> int:
    from gpt2_course.progress import progress_table

    print(progress_table(solutions=args.solutions))
    return 0


def _grade(args: argparse.Namespace) -> int:
    from gpt2_course.grading import main as grade_main

    return grade_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2-course", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="run checks on your exercises (all, or the ids given)")
    check.add_argument("ids", nargs="*", metavar="ID", help="check ids, e.g. layernorm.LayerNorm")
    check.add_argument("--solutions", action="store_true", help="check solutions/ instead")
    check.set_defaults(func=_check)

    progress = sub.add_parser("progress", help="one table of every check and its state")
    progress.add_argument("--solutions", action="store_true", help="show solutions/ instead")
    progress.set_defaults(func=_progress)

    grade = sub.add_parser("grade", help="grade submissions (folders, checkouts or .zip files)")
    from gpt2_course.grading.command import add_arguments

    add_arguments(grade)
    grade.set_defaults(func=_grade)

    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == name:
                continue  # that chapter is not part of this checkout yet
            raise
        module.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for `train --nproc N`
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
