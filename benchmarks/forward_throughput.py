"""Forward throughput of the course's GPT-2 (solutions/) against Hugging Face's, on CPU.

Both models hold the same weights (Hugging Face's, copied into ours with
`load_gpt2_weights`), see the same batch of tokens, run under
`torch.inference_mode()` with the same number of threads, and are timed
interleaved in one process. Hugging Face uses its eager attention, the plain
PyTorch path a from-scratch model should be compared with. The goal is a ratio
(ours / Hugging Face's tokens per second) of at least 0.9.

    .venv/bin/python -m benchmarks.forward_throughput              # 4 x 128 tokens
    .venv/bin/python -m benchmarks.forward_throughput --threads 4 --batch 8 --seq 256

Weights are GPT-2 small's shapes with seeded random values: speed does not
depend on their values, and the benchmark needs no network.
"""

import sys
from pathlib import Path

if not __package__:  # run as a script: make `benchmarks` and `solutions` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.common import (
    common_arguments,
    compare,
    describe_machine,
    print_comparison,
    set_threads,
)
from gpt2_course import parts
from gpt2_course.config import TransformerConfig
from gpt2_course.pretrained import course_model

GOAL = 0.9


def build_models(seed: int) -> tuple[torch.nn.Module, GPT2LMHeadModel]:
    """Hugging Face's GPT-2 small with seeded random weights, and ours holding the same ones."""
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(attn_implementation="eager")).eval()
    hf.config._attn_implementation = "eager"  # older/newer transformers read one or the other
    return course_model(hf.state_dict(), TransformerConfig(), parts.SOLUTIONS), hf


def main(argv: list[str] | None = None) -> float:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)

    ours, hf = build_models(args.seed)
    tokens = torch.randint(
        0, 50257, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed)
    )

    with torch.inference_mode():
        # Same weights, same answer: a benchmark of a wrong model would mean nothing.
        difference = (ours(tokens) - hf(tokens).logits).abs().max().item()
        if difference > 1e-3:
            raise SystemExit(f"the two models disagree (max |logit difference| {difference:.3g})")
        timings = compare(
            {
                "course GPT-2 (solutions/)": lambda: ours(tokens),
                "Hugging Face GPT2LMHeadModel (eager)": lambda: hf(tokens).logits,
            },
            repeats=args.repeats,
            warmup=args.warmup,
            clock=args.clock,
        )

    print(
        f"forward pass, batch {args.batch} x {args.seq} tokens, {args.clock} clock; "
        f"{describe_machine()}"
    )
    print(f"max |logit difference| between the models: {difference:.2g}")
    ratio = print_comparison(timings, work=args.batch * args.seq, unit="tokens")[
        "course GPT-2 (solutions/)"
    ]
    verdict = "meets" if ratio >= GOAL else "is BELOW"
    print(
        f"throughput ratio ours / Hugging Face = {ratio:.3f} "
        f"({verdict} the goal of {GOAL}; threads={threads})"
    )
    return ratio


if __name__ == "__main__":
    main()
