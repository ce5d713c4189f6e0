"""`python -m gpt2_course.train`: `gpt2-course train` as a module, for torchrun.

    torchrun --standalone --nproc_per_node 8 -m gpt2_course.train --model gpt2-small ...

takes exactly the options of `gpt2-course train` (see `--help`). Each process trains
its part of every global batch; rank 0 alone writes checkpoints, logs and the bar.
"""

import argparse
import sys
from collections.abc import Sequence

from gpt2_course.trainer import TRAIN_DESCRIPTION, add_train_arguments, train_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_course.train", description=TRAIN_DESCRIPTION
    )
    add_train_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return train_command(args)


if __name__ == "__main__":
    sys.exit(main())
