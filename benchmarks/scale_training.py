"""Training tokens/s of the course's scaled-up trainer against Hugging Face's GPT-2 (issue 14).

Three contenders hold the same weights, see the same batch and take the same optimizer step:

- "course": the reference `Transformer` (solutions/, through `gpt2_course.parts`) as the
  trainer builds it for GPT-2-style training (`build_model` with tied embeddings and the
  scaled residual init), wrapped by `_wrap_for_training` with `fast_kernels` (every
  component on torch's kernels, `gpt2_course.fast.use_fast_kernels`; compiled with
  --compile), stepping with the trainer's own `_accumulating_step`: micro-batches whose
  gradients add up, autocast, gradient clipping and AdamW from the course's
  `configure_optimizer`;
- "course (attention only)": the same with `fast_attention` alone (the fused attention,
  every other component on its own forward), for comparison;
- "hf": `GPT2LMHeadModel` (attention "sdpa", no dropout, tied embeddings as GPT-2 has)
  holding the course model's weights (`to_hf_state_dict`), in the same loop: the same
  micro-batches, autocast, `clip_grad_norm_`, and AdamW with the same hyperparameters and
  parameter groups (decay on the weight matrices and embeddings only). Its loss is its
  own `labels=` loss: the same shifted cross-entropy as the course's `next_token_loss`.

The course model has one parameter GPT-2 lacks, the unembedding bias b_U. The trainer's
`output_bias=False` (`--no-output-bias`) keeps it at zero and out of training, as GPT-2
has none: so the two models compute the same function with the same trainable weights.
Both run under the trainer's settings for its steps
(`_reuse_freed_memory`, and on CPU `_deterministic`). First the two must agree on the loss
of the first batch in fp32 (within 1e-4); then they are timed interleaved, `--steps`
optimizer steps per timed call: ratio = course tokens/s / Hugging Face's, goal >= 1.0.

On a GPU it also prints each contender's MFU (`gpt2_course.throughput`, with the peak for
the precision used; the goal is 40% for the course at GPT-2 small, 1024 tokens, bf16), as it
does anywhere GPT2_COURSE_PEAK_FLOPS gives a peak. `--loss-curve N`, meant for a GPU session
(it runs anywhere), then trains a fresh course model N steps on learnable windows
(`gpt2_course.induction.induction_windows`) and prints its loss as it falls.

    .venv/bin/python -m benchmarks.scale_training --threads 1 --clock cpu            # small
    .venv/bin/python -m benchmarks.scale_training --model tiny --threads 1 --clock cpu
    .venv/bin/python -m benchmarks.scale_training --device cuda --compile --loss-curve 200
"""

import argparse
import contextlib
import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as a script: make `benchmarks` and `solutions` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from jaxtyping import Int
from torch import Tensor, nn

from benchmarks.common import (
    common_arguments,
    compare,
    describe_machine,
    print_comparison,
    set_threads,
)
from gpt2_course import parts, trainer
from gpt2_course.config import TransformerConfig, hf_config
from gpt2_course.distributed import Rank
from gpt2_course.throughput import mfu, peak_flops

GOAL = 1.0  # course tokens/s / Hugging Face's
MFU_GOAL = 0.40  # GPT-2 small, 1024 tokens, bf16, on a GPU
AGREEMENT = 1e-4  # largest first-batch loss difference (fp32) that counts as the same model
LR, WEIGHT_DECAY, GRAD_CLIP = 6e-4, 0.1, 1.0
CURVE_TOKENS = 512  # token ids the loss curve's windows use
QUICK = dict(model="tiny", batch=2, seq=32, steps=1, repeats=2, warmup=1)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.set_defaults(repeats=None, warmup=None)  # 5 and 1, or QUICK's
    parser.add_argument(
        "--model",
        choices=list(trainer.PRESETS),
        help="model size preset (default: small on the CPU, gpt2-small on CUDA)",
    )
    parser.add_argument("--batch", type=int, help="windows per optimizer step (8; 16 on CUDA)")
    parser.add_argument("--micro-batch", type=int, help="windows per forward pass (the batch)")
    parser.add_argument("--seq", type=int, help="tokens per window (default: the preset's n_ctx)")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on the CPU"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--compile", action="store_true", help="torch.compile both contenders")
    parser.add_argument("--steps", type=int, help="optimizer steps per timed call (default 2)")
    parser.add_argument(
        "--loss-curve",
        type=int,
        default=0,
        metavar="N",
        help="then train a fresh course model N steps on learnable windows, printing the loss",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and few repeats: does it run?"
    )
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) is None:
                setattr(args, name, value)

    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device torch knows (cpu or cuda[:N])")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device} is not supported here: use cpu or cuda")
    cuda = args.device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU here. "
            "Run on the CPU (leave out --device), or on a machine with a GPU."
        )
    model = args.model or ("gpt2-small" if cuda else "small")
    n_ctx = trainer.PRESETS[model]["n_ctx"]
    defaults = dict(
        model=model,
        precision="bf16" if cuda else "fp32",
        batch=16 if cuda else 8,
        seq=n_ctx,
        steps=2,
        repeats=5,
        warmup=1,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.micro_batch is None:
        args.micro_batch = args.batch  # no accumulation unless asked
    for name in ("batch", "micro_batch", "seq", "steps", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.loss_curve < 0:
        parser.error("--warmup and --loss-curve cannot be negative")
    if args.batch % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch} must divide --batch {args.batch}")
    if args.seq > n_ctx:
        parser.error(f"--seq {args.seq} is longer than the {args.model} model's n_ctx={n_ctx}")
    return args


def train_config(args: argparse.Namespace, cfg: TransformerConfig) -> trainer.TrainConfig:
    """The trainer's settings for GPT-2-style training, as the contenders use them."""
    return trainer.TrainConfig(
        model=cfg,
        batch_size=args.batch,
        micro_batch=args.micro_batch,
        max_lr=LR,
        weight_decay=WEIGHT_DECAY,
        grad_clip=GRAD_CLIP,
        precision=args.precision,
        compile=args.compile,
        fast_attention=True,
        fast_kernels=True,
        tie_weights=True,
        output_bias=False,  # GPT-2 has no bias on its logits: the same model as Hugging Face's
        scale_init=True,
        device=str(args.device),
        save=False,
    )


def course_model(cfg: TransformerConfig, seed: int, config: trainer.TrainConfig) -> nn.Module:
    """The reference Transformer as the trainer builds it (tied, scaled init), in train mode."""
    with parts.using(parts.SOLUTIONS):
        return trainer.build_model(cfg, seed, config).train()


def hf_twin(course: nn.Module) -> nn.Module:
    """Hugging Face's GPT2LMHeadModel holding exactly the course model's weights."""
    from transformers import GPT2LMHeadModel

    cfg = course.cfg
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(hf_config(cfg, attn_implementation="sdpa", **no_dropout))
    # its labels= loss by name: unnamed, HF warns on every call, which breaks a compiled graph
    hf.loss_type = "ForCausalLM"
    with parts.using(parts.SOLUTIONS):
        # to_hf_state_dict reads parameters by name; the tied model has no W_U among them,
        # so go through an untied copy (its W_U is W_E^T, loaded from the tied state dict)
        untied = trainer.build_model(cfg, seed=0)
        untied.load_state_dict(course.state_dict())
        state = parts.get("inside.to_hf_state_dict")(untied)
    b_U = state.pop("lm_head.bias")
    if b_U.abs().max() > 0:  # GPT-2 has no unembedding bias: only a zero one carries over
        raise SystemExit("the course model's b_U is not zero: Hugging Face's GPT-2 has none")
    hf.load_state_dict(state, strict=True)
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise SystemExit("Hugging Face's lm_head is not tied to its embedding as GPT-2's is")
    return hf.to(course.embed.W_E.device).train()


def hf_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as the course's configure_optimizer makes it: decay on the weight matrices and
    the embeddings (2-D and more), none on biases and LayerNorms."""
    from solutions.training import BETAS

    params = [p for p in model.parameters() if p.requires_grad]  # the tied weight once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS)


def hf_step(
    model: nn.Module,
    batch: Int[Tensor, "batch pos"],
    optimizer: torch.optim.Optimizer,
    micro: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> float:
    """One optimizer step of Hugging Face's model, exactly as `_accumulating_step` takes it."""
    for group in optimizer.param_groups:
        group["lr"] = LR
    chunks = batch.split(micro)
    total = 0.0
    for chunk in chunks:
        with autocast():
            loss = model(chunk, labels=chunk).loss / len(chunks)
        loss.backward()
        total += float(loss.detach())
    nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def random_tokens(
    n: int, seq: int, d_vocab: int, seed: int, device: torch.device
) -> Int[Tensor, "n seq"]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, d_vocab, (n, seq), generator=generator).to(device)


@torch.no_grad()
def first_losses(course: nn.Module, hf: nn.Module, batch: Tensor) -> tuple[float, float]:
    """Each model's loss on `batch` in fp32 (the course's next_token_loss; HF's labels=)."""
    from solutions.training import next_token_loss

    with torch.autocast(batch.device.type, enabled=False):
        return float(next_token_loss(course(batch), batch)), float(hf(batch, labels=batch).loss)


def loss_curve(args: argparse.Namespace, cfg: TransformerConfig, steps: int) -> list[float]:
    """Train a fresh course model `steps` steps on induction windows; print the loss as it goes.

    The windows (filler following a local rule, a random block written twice) use only the
    first CURVE_TOKENS token ids, so that a short run can learn them: a working run's loss
    falls from ln(d_vocab) (10.8) to about ln(CURVE_TOKENS) (6.2) within tens of steps, then
    lower as it learns the local rule and to copy the repeated block.
    """
    from gpt2_course.induction import induction_windows
    from solutions.training import configure_optimizer, lr_at_step, next_token_loss

    config = train_config(args, cfg)
    model = course_model(cfg, args.seed + 1, config).to(args.device)
    trained = trainer._wrap_for_training(model, config, args.device, Rank())
    optimizer = configure_optimizer(model, LR, WEIGHT_DECAY)
    n_windows = min(steps * args.batch, 4096)
    pool = induction_windows(n_windows, args.seq, min(CURVE_TOKENS, cfg.d_vocab), args.seed)
    pick = torch.Generator().manual_seed(args.seed)
    autocast = trainer._autocast(args.precision, args.device)
    micro, max_lr = args.micro_batch, trainer.PRESET_LR[args.model]
    warmup = max(1, steps // 10)
    every = max(1, steps // 20)
    print(f"\nloss curve: a fresh {args.model} model, {steps} steps on induction windows")
    losses = []
    start = time.perf_counter()
    with trainer._reuse_freed_memory(), trainer._deterministic(args.device):
        for step in range(steps):
            batch = pool[torch.randint(0, len(pool), (args.batch,), generator=pick)].to(args.device)
            lr = lr_at_step(
                step, max_lr=max_lr, min_lr=max_lr / 10, warmup_steps=warmup, total_steps=steps
            )
            loss = trainer._accumulating_step(
                trained, batch, optimizer, lr, GRAD_CLIP, next_token_loss, micro, autocast
            )
            losses.append(loss)
            if not math.isfinite(losses[-1]):
                raise SystemExit(f"the loss became {losses[-1]} at step {step}")
            if (step + 1) % every == 0 or step in (0, steps - 1):
                recent = losses[-every:] if step else losses
                mean = sum(recent) / len(recent)
                print(f"step {step + 1:>5}: loss {mean:.3f} (mean of the last {len(recent)})")
    seconds = time.perf_counter() - start
    print(f"{steps} steps in {seconds:.1f} s, {steps * args.batch * args.seq / seconds:,.0f} tok/s")
    return losses


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_arguments(argv)
    threads = set_threads(args.threads)
    device = args.device
    cfg = trainer.model_config(args.model)
    config = train_config(args, cfg)

    course = course_model(cfg, args.seed, config).to(device)
    attention_only = copy.deepcopy(course)  # the same weights, tied to its own W_E
    hf = hf_twin(course)
    trained = trainer._wrap_for_training(course, config, device, Rank())  # every component
    attention_config = dataclasses.replace(config, fast_kernels=False)
    trained_attention = trainer._wrap_for_training(attention_only, attention_config, device, Rank())

    batch = random_tokens(args.batch, args.seq, cfg.d_vocab, args.seed, device)
    ours, theirs = first_losses(course, hf, batch)
    ours_attention, _ = first_losses(attention_only, hf, batch)
    gap = max(abs(ours - theirs), abs(ours_attention - theirs))
    print(
        f"first-batch loss in fp32: course {ours:.6f} (attention only {ours_attention:.6f}), "
        f"Hugging Face {theirs:.6f} ({gap:.1e})"
    )
    if not gap <= AGREEMENT:
        raise SystemExit("the models disagree: the comparison would mean nothing")
    if args.compile:
        hf = torch.compile(hf)

    from solutions.training import configure_optimizer, next_token_loss

    autocast = trainer._autocast(args.precision, device)
    hf_optimizer_ = hf_optimizer(hf, LR, WEIGHT_DECAY)

    def course_steps(model: nn.Module, wrapped: nn.Module) -> Callable[[], None]:
        """`args.steps` of the trainer's own step on `wrapped` (`model`, made ready to train)."""
        optimizer = configure_optimizer(model, LR, WEIGHT_DECAY)

        def run() -> None:
            for _ in range(args.steps):
                trainer._accumulating_step(
                    wrapped, batch, optimizer, LR, GRAD_CLIP, next_token_loss,
                    args.micro_batch, autocast,
                )  # fmt: skip

        return run

    def hf_steps() -> None:
        for _ in range(args.steps):
            hf_step(hf, batch, hf_optimizer_, args.micro_batch, autocast)

    accumulate = args.batch // args.micro_batch
    print(
        f"{args.model} model ({sum(p.numel() for p in course.parameters()) / 1e6:.1f}M "
        f"parameters), batch {args.batch} x {args.seq} tokens = {accumulate} micro-batch(es) of "
        f"{args.micro_batch}, {args.precision}, torch's kernels for every component"
        f"{', compiled' if args.compile else ''}, {args.steps} steps per call, {args.clock} clock"
    )
    print(describe_machine(device))
    with trainer._reuse_freed_memory(), trainer._deterministic(device):
        timings = compare(
            {
                "course": course_steps(course, trained),
                "course (attention only)": course_steps(attention_only, trained_attention),
                "hf": hf_steps,
            },
            repeats=args.repeats,
            warmup=args.warmup,
            device=device,
            clock=args.clock,
        )
    work = args.steps * args.batch * args.seq
    ratios = print_comparison(timings, work=work, baseline="hf")
    ratio = ratios["course"]
    verdict = "meets" if ratio >= GOAL else "is BELOW"
    print(
        f"training tokens/s, course / Hugging Face = {ratio:.2f} ({verdict} the goal of {GOAL:g}; "
        f"threads={threads}); with the fused attention alone "
        f"{ratios['course (attention only)']:.2f}"
    )
    result = {"scale_training_vs_hf": ratio}

    # the peak of the dtype the matrix products run in (GPT2_COURSE_PEAK_FLOPS sets one anywhere)
    peak = peak_flops(device, autocast.dtype or torch.float32)
    if peak is not None:
        for name in ("course", "hf"):
            result[f"mfu_{name}"] = mfu(timings[name].rate(work), cfg, peak, seq_len=args.seq)
        verdict = "meets" if result["mfu_course"] >= MFU_GOAL else "is BELOW"
        print(
            f"MFU (peak {peak / 1e12:g} TFLOP/s): course {result['mfu_course']:.1%}, "
            f"Hugging Face {result['mfu_hf']:.1%} (course {verdict} the goal of {MFU_GOAL:.0%})"
        )
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        print(f"MFU: peak unknown for {name} in {args.precision} (set GPT2_COURSE_PEAK_FLOPS)")
    if args.loss_curve:
        losses = loss_curve(args, cfg, args.loss_curve)
        result["loss_first"], result["loss_last"] = losses[0], losses[-1]
    return result


if __name__ == "__main__":
    main()
