"""Training speed of the course's trainer: what its allocator setting buys, and ours vs HF.

The model is the `tiny` preset notebook 06 trains (d_model=64, 2 layers, n_ctx=64,
GPT-2's 50,257 tokens), batch 8, on random tokens (speed does not depend on them;
no network needed). Contenders are timed interleaved:

1. `gpt2_course.trainer.train` itself, `--train-steps` steps per timed run (its
   evaluations at the start and the end, model building and baselines included),
   as it is, against the same run with `_reuse_freed_memory` switched off (glibc's
   allocator defaults return every freed block of the 100 MB logits to the kernel):
   ratio = default time / trainer's time, goal >= 1.3 on Linux with glibc;
2. one training step as the trainer takes it (forward, `next_token_loss`, backward,
   gradient clipping, an AdamW step), `--steps` per timed call, ours against Hugging
   Face's `GPT2LMHeadModel` of the same size holding the same weights, both with the
   allocator's defaults: ratio = HF time / ours, goal >= 0.9.

    .venv/bin/python -m benchmarks.training_step
    .venv/bin/python -m benchmarks.training_step --threads 2 --repeats 6
"""

import contextlib
import sys
from pathlib import Path
from unittest import mock

if not __package__:  # run as a script: make `benchmarks` and `solutions` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    common_arguments,
    compare,
    describe_machine,
    print_comparison,
    set_threads,
)
from gpt2_course import parts, trainer
from gpt2_course.config import hf_config

ALLOCATOR_GOAL = 1.3
HF_GOAL = 0.9


def build_models(seed: int) -> tuple[nn.Module, nn.Module]:
    """The tiny preset as ours and as Hugging Face's GPT-2, with the same seeded weights."""
    from transformers import GPT2LMHeadModel

    cfg = trainer.model_config("tiny")
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(
        hf_config(
            cfg,
            attn_implementation="eager",
            tie_word_embeddings=False,  # ours has its own W_U
            resid_pdrop=0.0,  # ours has no dropout
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    with parts.using(parts.SOLUTIONS):
        ours = trainer.build_model(cfg, seed)
        parts.load_gpt2_weights(ours, hf.state_dict())
    return ours.train(), hf.train()


def make_step(model: nn.Module, batch: torch.Tensor, hugging_face: bool):
    """One training step of `model` on `batch`, as the trainer takes it."""
    from solutions.training import configure_optimizer, next_token_loss

    optimizer = configure_optimizer(model, 1e-3, 0.1)

    def step() -> None:
        logits = model(batch).logits if hugging_face else model(batch)
        if hugging_face:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        else:
            loss = next_token_loss(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def trainer_run(steps: int, batch: int, seed: int, keep_freed_memory: bool):
    """A `train()` of `steps` steps on random windows, with or without the allocator setting."""
    from gpt2_course.data import TokenData

    cfg = trainer.model_config("tiny")
    windows = torch.randint(
        0, cfg.d_vocab, (512, cfg.n_ctx), generator=torch.Generator().manual_seed(seed)
    )
    data = TokenData(windows[:448], windows[448:], "random", "random tokens", 1, windows.numel())
    config = trainer.TrainConfig(
        model=cfg,
        steps=steps,
        batch_size=batch,
        eval_interval=steps,
        eval_windows=8,
        sample_interval=0,
        save=False,
        device="cpu",
        seed=seed,
    )
    memory = trainer._reuse_freed_memory if keep_freed_memory else contextlib.nullcontext

    def run() -> None:
        with mock.patch.object(trainer, "_reuse_freed_memory", memory):
            with parts.using(parts.SOLUTIONS):
                trainer.train(config, data=data, progress=False, verbose=False)

    return run


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.set_defaults(repeats=4, warmup=1)
    parser.add_argument("--batch", type=int, default=8, help="windows per step (the trainer's)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed call (2.)")
    parser.add_argument("--train-steps", type=int, default=20, help="steps per trainer run (1.)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)

    ours, hf = build_models(args.seed)
    n_ctx = ours.cfg.n_ctx
    batch = torch.randint(
        0, ours.cfg.d_vocab, (args.batch, n_ctx), generator=torch.Generator().manual_seed(args.seed)
    )
    with torch.no_grad():
        gap = (ours(batch) - hf(batch).logits).abs().max().item()
    print(f"largest logit difference, ours vs Hugging Face: {gap:.2e}")
    if gap > 1e-3:
        raise SystemExit("the two models disagree: the comparison would mean nothing")

    ours_step = make_step(ours, batch, hugging_face=False)
    hf_step = make_step(hf, batch, hugging_face=True)

    def run(step):
        def steps() -> None:
            for _ in range(args.steps):
                step()

        return steps

    print(f"tiny model, batch {args.batch} x {n_ctx} tokens; {describe_machine()}")
    print(f"\n1. the trainer, {args.train_steps} steps: as it is vs with the allocator's defaults")
    sizes = (args.train_steps, args.batch, args.seed)
    timings = compare(
        {
            "trainer, freed memory kept": trainer_run(*sizes, keep_freed_memory=True),
            "trainer, allocator defaults": trainer_run(*sizes, keep_freed_memory=False),
        },
        repeats=args.repeats,
        warmup=args.warmup,
        clock=args.clock,
    )
    trainer_work = args.train_steps * args.batch * n_ctx
    allocator = print_comparison(timings, work=trainer_work)["trainer, freed memory kept"]

    work = args.steps * args.batch * n_ctx
    print("\n2. ours vs Hugging Face, both with the allocator's defaults")
    timings = compare(
        {"ours": run(ours_step), "Hugging Face": run(hf_step)},
        repeats=args.repeats,
        warmup=args.warmup,
        clock=args.clock,
    )
    hf_ratio = print_comparison(timings, work=work)["ours"]

    for name, ratio, goal in [
        ("trainer, freed memory kept / allocator defaults", allocator, ALLOCATOR_GOAL),
        ("training steps, ours / Hugging Face", hf_ratio, HF_GOAL),
    ]:
        verdict = "meets" if ratio >= goal else "is BELOW"
        print(f"{name} = {ratio:.2f} ({verdict} the goal of {goal:g}; threads={threads})")
    return {"training_allocator": allocator, "training_vs_hf": hf_ratio}


if __name__ == "__main__":
    main()
