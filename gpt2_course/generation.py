"""`gpt2-course generate`: continue a prompt with a trained, pretrained or random GPT-2.

    gpt2-course generate "The harbour at dawn" --checkpoint            # notebook 06's model
    gpt2-course generate "The harbour at dawn" --pretrained -n 40 --temperature 0.8 --top-p 0.9
    gpt2-course generate "Once upon a time" --pretrained --beams 4 --length-penalty 1.0
    gpt2-course generate "Hello" --random --seed 1        # GPT-2 small, seeded random weights

Tokens are printed as they are generated (cached generation, one token per
step). Beam search prints its best hypothesis at the end. The reference
solutions generate unless `--yours` asks for your code in gpt2_course/exercises/.
Everything but the text goes to stderr, so `> out.txt` keeps the text alone.
"""

import argparse
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from torch import nn

from gpt2_course import parts
from gpt2_course.config import TransformerConfig
from gpt2_course.pretrained import course_model
from gpt2_course.tokenizer import END_OF_TEXT_ID, get_tokenizer


class GenerationError(Exception):
    """Generation cannot run as asked; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: nn.Module
    description: str


def load_model(args: argparse.Namespace, err: TextIO) -> LoadedModel:
    """The model `args` ask for; a clear message and a fallback where one is reasonable."""
    if args.checkpoint is not None:
        from gpt2_course.trainer import TrainingError, load_checkpoint

        try:
            model, cfg, meta = load_checkpoint(args.checkpoint or None)
        except (TrainingError, OSError) as error:
            raise GenerationError(str(error)) from None
        step = meta.get("step", "?")
        where = args.checkpoint or "checkpoints/tiny-gpt (the default)"
        return LoadedModel(model.eval(), f"trained checkpoint {where}, step {step}")
    if args.pretrained:
        from gpt2_course.pretrained import (
            CheckpointError,
            load_gpt2_state_dict,
        )

        try:
            state_dict = load_gpt2_state_dict("gpt2")
        except CheckpointError as error:
            print(
                f"Pretrained GPT-2 is not available here ({error}).\nFalling back "
                "to GPT-2 small with seeded random weights: expect gibberish.",
                file=err,
            )
        else:
            model = course_model(state_dict, package=None)
            return LoadedModel(model, "pretrained GPT-2 small")
    from gpt2_course.reference import RANDOM_SEED, random_gpt2

    state_dict = random_gpt2().state_dict()
    return LoadedModel(
        course_model(state_dict, TransformerConfig(), package=None),
        f"GPT-2 small with seeded random weights (seed {RANDOM_SEED}): expect gibberish",
    )


def sampling_models(err: TextIO = sys.stdout) -> dict[str, nn.Module]:
    """The models worth sampling from here, best first, built from the current parts.

    Pretrained GPT-2 small and your trained checkpoint from notebook 06
    (checkpoints/tiny-gpt), whichever exist, in that order (pretrained GPT-2 writes
    far better text than a model trained for minutes); if neither, GPT-2 small with
    the reference's seeded random weights. Says what is missing and why.
    """
    from gpt2_course.pretrained import CheckpointError, load_pretrained_model
    from gpt2_course.reference import get_reference
    from gpt2_course.trainer import TrainingError, load_checkpoint

    models: dict[str, nn.Module] = {}
    try:
        models["GPT-2 small, pretrained"] = load_pretrained_model("gpt2")
    except CheckpointError:
        print("No pretrained GPT-2 here (offline, and not in the local cache).", file=err)
    try:
        trained, _, meta = load_checkpoint()
        models[f"your trained model (notebook 06, step {meta.get('step', '?')})"] = trained
    except TrainingError as error:
        print(f"No trained checkpoint: {error}", file=err)
    if not models:
        description = "GPT-2 small with the reference's seeded random weights"
        models[description] = course_model(
            get_reference().hf_state_dict, TransformerConfig(), package=None
        )
        print(
            f"Sampling from {description} instead. Its text is gibberish, but "
            "every setting below still does to the distribution what it says.",
            file=err,
        )
    return models


class TextStream:
    """Prints the text of generated tokens as they come, whole characters only."""

    def __init__(self, out: TextIO):
        self.out = out
        self.tokenizer = get_tokenizer()
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, next_token: torch.Tensor) -> None:
        self.ids.append(int(next_token[0]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for its other bytes
            return
        self.out.write(text[len(self.shown) :])
        self.out.flush()
        self.shown = text


def prompt_tokens(prompt: str, device: torch.device) -> torch.Tensor:
    ids = get_tokenizer()(prompt)["input_ids"] or [END_OF_TEXT_ID]  # empty: start a new text
    return torch.tensor([ids], dtype=torch.long, device=device)


def generate_text(
    args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> str:
    """Run the command: returns the generated text (also streamed to `out`)."""
    package = parts.EXERCISES if args.yours else parts.lent_package()
    with parts.using(package):
        loaded = load_model(args, err)
        model = loaded.model
        device = torch.device(args.device) if args.device else next(model.parameters()).device
        model = model.to(device)
        tokens = prompt_tokens(args.prompt, device)
        eos = None if args.ignore_eos or model.cfg.d_vocab <= END_OF_TEXT_ID else END_OF_TEXT_ID
        whose = "your code" if args.yours else parts.describe_package(package)
        print(f"[{loaded.description}; {whose}; {device}]", file=err)
        out.write(args.prompt)
        out.flush()
        try:
            if args.beams > 1:
                result = parts.get("beam_search")(
                    model,
                    tokens,
                    args.beams,
                    args.max_new_tokens,
                    length_penalty=args.length_penalty,
                    eos_token_id=eos,
                )
                text = get_tokenizer().decode(result[0, tokens.shape[1] :].tolist())
                out.write(text)
            else:
                stream = TextStream(out)
                parts.get("generate_with_cache")(
                    model,
                    tokens,
                    args.max_new_tokens,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    frequency_penalty=args.frequency_penalty,
                    seed=args.seed,
                    eos_token_id=eos,
                    on_token=stream,
                )
                text = get_tokenizer().decode(stream.ids)
                out.write(text[len(stream.shown) :])
        except ValueError as error:  # bad settings or too long for the context: say so plainly
            raise GenerationError(str(error)) from None
        out.write("\n")
        out.flush()
        return text


def _run(args: argparse.Namespace) -> int:
    try:
        generate_text(args)
    except GenerationError as error:
        print(f"\ngpt2-course generate: {error}", file=sys.stderr)
        return 2
    except NotImplementedError as error:
        print(
            f"\ngpt2-course generate --yours: {error}\nFinish that exercise, "
            "or run without --yours to use the reference solutions.",
            file=sys.stderr,
        )
        return 2
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_cli(subparsers: Any) -> None:
    """Register `gpt2-course generate`."""
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt, streaming tokens (checkpoint, pretrained or random GPT-2)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", help='the text to continue ("" starts a new text)')
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        nargs="?",
        const="",
        metavar="PATH",
        help="a checkpoint from notebook 06 / `gpt2-course train` (no PATH: checkpoints/tiny-gpt)",
    )
    source.add_argument(
        "--pretrained",
        action="store_true",
        help="GPT-2 small's pretrained weights (local cache, or the Hub if reachable)",
    )
    source.add_argument(
        "--random", action="store_true", help="GPT-2 small with seeded random weights (the default)"
    )
    p.add_argument("-n", "--max-new-tokens", type=_positive_int, default=40, metavar="N")
    p.add_argument(
        "--temperature", type=_non_negative_float, default=1.0, help="0 is greedy (default 1)"
    )
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="K")
    p.add_argument("--top-p", type=_probability, default=None, metavar="P")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F")
    p.add_argument(
        "--beams", type=_positive_int, default=1, help="beam search with this many beams (greedy)"
    )
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search only")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the model's)")
    p.add_argument(
        "--yours", action="store_true", help="generate with your code in gpt2_course/exercises/"
    )
    p.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpt2-course")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", *(argv or [])])
    return args.func(args)


__all__ = ["GenerationError", "add_cli", "generate_text", "main"]
