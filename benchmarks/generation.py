"""Generation speed: the course's cached generation against Hugging Face's, and against no cache.

Both models hold the same weights (GPT-2 small's shapes, seeded random values:
speed does not depend on them, and no network is needed) and generate greedily
from the same prompt, one sequence, `--new-tokens` tokens (256 by default), in
one process with the same threads:

1. ours with the KV cache (`solutions/kv_cache.generate_with_cache`) against
   `GPT2LMHeadModel.generate` with its own cache: ratio = HF time / ours, goal >= 1.0;
2. ours with the cache against ours without (`solutions/sampling.generate`, a full
   forward pass per token): ratio = uncached time / cached, goal >= 5.

Before timing, the generated tokens are compared: a fast wrong generator would
mean nothing.

    .venv/bin/python -m benchmarks.generation                       # 256 tokens
    .venv/bin/python -m benchmarks.generation --new-tokens 64 --threads 2 --repeats 3
"""

import sys
from pathlib import Path

if not __package__:  # run as a script: make `benchmarks` and `solutions` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

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

HF_GOAL = 1.0
CACHE_GOAL = 5.0


def build_models(seed: int, attention: str) -> tuple[nn.Module, nn.Module]:
    """Hugging Face's GPT-2 small with seeded random weights, and ours holding the same ones."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_config = GPT2Config(bos_token_id=None, eos_token_id=None, attn_implementation=attention)
    hf = GPT2LMHeadModel(hf_config).eval()
    hf.config._attn_implementation = attention
    return course_model(hf.state_dict(), TransformerConfig(), parts.SOLUTIONS), hf


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.set_defaults(repeats=3, warmup=1)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument(
        "--uncached-repeats",
        type=int,
        default=1,
        help="timed runs of the (slow) uncached generation and of the cached one beside it "
        "(0: skip that comparison)",
    )
    parser.add_argument(
        "--hf-attention",
        choices=["sdpa", "eager"],
        default="sdpa",
        help="Hugging Face's attention (sdpa is its default)",
    )
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)

    from solutions.kv_cache import generate_with_cache
    from solutions.sampling import generate

    ours, hf = build_models(args.seed, args.hf_attention)
    if args.prompt_tokens + args.new_tokens > ours.cfg.n_ctx:
        raise SystemExit(f"--prompt-tokens + --new-tokens must be at most n_ctx={ours.cfg.n_ctx}")
    prompt = torch.randint(
        0, 50257, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed)
    )
    n = args.new_tokens

    def ours_cached() -> torch.Tensor:
        with parts.using(parts.SOLUTIONS):
            return generate_with_cache(ours, prompt, n, temperature=0)

    def ours_uncached() -> torch.Tensor:
        return generate(ours, prompt, n, temperature=0)

    def hf_cached() -> torch.Tensor:
        return hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    print(f"greedy generation of {n} tokens after {args.prompt_tokens}; {describe_machine()}")
    with torch.inference_mode():
        same = torch.equal(ours_cached(), hf_cached())
        print(f"tokens identical to Hugging Face's: {same}")
        if not same:
            raise SystemExit(
                "the course's cached generation disagrees with Hugging Face's generate"
            )

        print(f"\n1. cached: ours vs Hugging Face generate ({args.hf_attention} attention)")
        timings = compare(
            {"ours, KV cache": ours_cached, "Hugging Face generate, its cache": hf_cached},
            repeats=args.repeats,
            warmup=args.warmup,
        )
        hf_ratio = print_comparison(timings, work=n, unit="tokens")["ours, KV cache"]

        cache_ratio = float("nan")
        if args.uncached_repeats > 0:
            print("\n2. ours: cached vs uncached")
            timings = compare(
                {"ours, KV cache": ours_cached, "ours, no cache": ours_uncached},
                repeats=args.uncached_repeats,
                warmup=0,
            )
            cache_ratio = print_comparison(timings, work=n, unit="tokens")["ours, KV cache"]

    for name, ratio, goal in [
        ("ours cached / Hugging Face generate (speed)", hf_ratio, HF_GOAL),
        ("ours cached / ours uncached (speed)", cache_ratio, CACHE_GOAL),
    ]:
        if ratio != ratio:  # NaN: not measured
            continue
        verdict = "meets" if ratio >= goal else "is BELOW"
        print(f"{name} = {ratio:.2f} ({verdict} the goal of {goal:g}; threads={threads})")
    return {"generation_vs_hf": hf_ratio, "cached_vs_uncached": cache_ratio}


if __name__ == "__main__":
    main()
