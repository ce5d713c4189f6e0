"""Train a small GPT: the course's training loop, checkpoints, and `gpt2-course train`.

The model is your `Transformer`, built from your components through `gpt2_course.parts`
(or the reference solutions where you chose them), and so are the loss, the optimizer,
the learning-rate schedule, the windows and the training step (`next_token_loss`,
`configure_optimizer`, `lr_at_step`, `make_windows`, `train_step`).

Checkpoints (what notebook 07 loads, by default from `checkpoints/tiny-gpt/` at the
root of the course checkout):

    model.safetensors   the model's parameters by their TransformerLens names
    optimizer.pt        AdamW's state (torch.save), so that a resumed run continues exactly
    config.json         {"format": "gpt2-course-checkpoint", "version": 1, "step": ...,
                         "model_config": {...TransformerConfig...}, "train_config": {...},
                         "history": [...], "baselines": {...}, "data": {...},
                         "sha256": {"model.safetensors": ..., "optimizer.pt": ...}}

Each file is written to a temporary file and moved into place with `os.replace`;
config.json goes last and records the other files' hashes, so a checkpoint is
either complete or refused with a clear message. Ctrl-C while training keeps the
last checkpoint (and never interrupts one being written).

Load one with `model, cfg, meta = load_checkpoint("checkpoints/tiny-gpt")`.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.config import TransformerConfig

CHECKPOINT_FORMAT = "gpt2-course-checkpoint"
CHECKPOINT_VERSION = 1
MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE = "model.safetensors", "optimizer.pt", "config.json"

# Model sizes. The vocabulary stays GPT-2's 50257 tokens, and its embedding and
# unembedding dominate both the parameter count and the compute of a model this small.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, d_head=16, d_mlp=256, n_ctx=64),
    "small": dict(d_model=128, n_layers=4, n_heads=4, d_head=32, d_mlp=512, n_ctx=128),
    "medium": dict(d_model=256, n_layers=6, n_heads=8, d_head=32, d_mlp=1024, n_ctx=256),
    # GPT-2 small itself (124M parameters): a job for GPUs (README, "Train GPT-2 small").
    "gpt2-small": dict(d_model=768, n_layers=12, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024),
}
# The peak learning rate `gpt2-course train` uses for each size unless --lr says otherwise:
# the small models take a large one; GPT-2 small trains with GPT-3 paper's 6e-4.
PRESET_LR = {"tiny": 1e-2, "small": 1e-2, "medium": 1e-2, "gpt2-small": 6e-4}
PRECISIONS = ("auto", "bf16", "fp32")
BASELINE_TOKENS = 4_000_000  # the unigram and bigram baselines count at most this many


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says why and what to do."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, damaged, or does not fit the model asked for."""


def model_config(preset: str = "tiny", **overrides: int) -> TransformerConfig:
    """A `TransformerConfig` from a preset, with any field overridden (d_head follows n_heads)."""
    if preset not in PRESETS:
        raise TrainingError(f"unknown model size {preset!r}; choose one of {', '.join(PRESETS)}")
    fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    if "d_head" not in overrides or overrides["d_head"] is None:
        if fields["d_model"] % fields["n_heads"]:
            raise TrainingError(
                f"d_model={fields['d_model']} is not divisible by n_heads={fields['n_heads']}"
            )
        fields["d_head"] = fields["d_model"] // fields["n_heads"]
    if "d_mlp" not in overrides or overrides["d_mlp"] is None:
        fields["d_mlp"] = 4 * fields["d_model"]
    return TransformerConfig(**fields)


def default_checkpoint_dir() -> Path:
    """`checkpoints/tiny-gpt` at the root of the course checkout (or in the course cache)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "notebooks").is_dir() and os.access(root, os.W_OK):
        return root / "checkpoints" / "tiny-gpt"
    from gpt2_course.tokenizer import cache_dir

    return cache_dir() / "checkpoints" / "tiny-gpt"


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved with every checkpoint)."""

    model: TransformerConfig = field(default_factory=model_config)
    data: str = "auto"  # "auto", "tinystories", "builtin", or a path / glob of .txt files
    steps: int = 600
    batch_size: int = 8
    max_lr: float = 1e-2
    min_lr: float | None = None  # default: max_lr / 10
    warmup_steps: int | None = None  # default: 5% of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_windows: int = 64  # validation (and training) windows each evaluation uses
    sample_interval: int | None = None  # default: halfway; 0: no samples
    sample_tokens: int = 30
    temperature: float = 0.8
    init_output_bias: bool = True  # start b_U at the unigram log-frequencies
    output_bias: bool = (
        True  # False: as in GPT-2, no bias on the logits (b_U stays zero, untrained)
    )
    val_fraction: float = 0.1
    seed: int = 0
    out_dir: str | None = None  # default: default_checkpoint_dir()
    save: bool = True
    device: str | None = None  # default: cuda, then mps, else cpu
    # Scaling up (notebook 10). `batch_size` is the global batch, over all processes.
    micro_batch: int | None = None  # windows per forward pass in a process (default: its share)
    precision: str = "auto"  # "auto": bf16 autocast on GPUs that support it, else fp32
    compile: bool = False  # torch.compile the model
    fast_attention: bool = False  # your attention's weights in F.scaled_dot_product_attention
    fast_kernels: bool = False  # every component on torch's kernels (attention included)
    tie_weights: bool = False  # GPT-2's W_U = W_E^T
    scale_init: bool = False  # GPT-2's 1/sqrt(2 n_layers) on the weights writing to the residual
    hellaswag_interval: int = 0  # steps between HellaSwag evaluations (0: none)
    hellaswag_examples: int | None = None  # default: the whole validation split
    stop_at: int | None = None  # stop this run at this step (with a checkpoint), to resume later

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = TransformerConfig(**self.model)
        self.min_lr = self.max_lr / 10 if self.min_lr is None else self.min_lr
        if self.warmup_steps is None:
            self.warmup_steps = max(1, self.steps // 20)
        if self.sample_interval is None:
            self.sample_interval = max(1, self.steps // 2)
        problems = [
            f"{name} must be positive, got {value}"
            for name, value in [
                ("steps", self.steps),
                ("batch_size", self.batch_size),
                ("max_lr", self.max_lr),
                ("eval_interval", self.eval_interval),
                ("eval_windows", self.eval_windows),
            ]
            if not value > 0
        ]
        if self.warmup_steps < 0 or self.min_lr < 0 or self.weight_decay < 0:
            problems.append("warmup_steps, min_lr and weight_decay cannot be negative")
        if self.micro_batch is not None and self.micro_batch < 1:
            problems.append(f"micro_batch must be positive, got {self.micro_batch}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision is one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.stop_at is not None and self.stop_at < 1:
            problems.append(f"stop_at must be positive, got {self.stop_at}")
        if self.hellaswag_interval < 0:
            problems.append("hellaswag_interval cannot be negative")
        if problems:
            raise TrainingError("; ".join(problems))

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else default_checkpoint_dir()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def quick_mode() -> bool:
    """True for the short CI run: GPT2_COURSE_QUICK=1, or CI=true with the solutions."""
    truthy = {"1", "true", "yes", "on"}
    if os.environ.get("GPT2_COURSE_QUICK", "").strip().lower() in truthy:
        return True
    ci = os.environ.get("CI", "").strip().lower() in truthy
    return ci and parts.solutions_everywhere()


def notebook_config(**overrides: Any) -> TrainConfig:
    """The run notebook 06 makes: about 5 minutes on a 2-core CPU; under a minute in quick mode."""
    if quick_mode():
        settings: dict[str, Any] = dict(steps=60, eval_interval=20, eval_windows=32)
    else:
        settings = dict(steps=600, eval_interval=50)
    return TrainConfig(**{**settings, **overrides})


# ------------------------------------------------------------------ the parts


def _part(name: str) -> Callable[..., Any]:
    """The implementation the course uses now, or a TrainingError that says what is missing."""
    try:
        return parts.get(name)
    except (ImportError, AttributeError) as error:
        raise TrainingError(
            f"{name} cannot be used ({error}).\n"
            f"Write it, or train with the reference version: parts.use_solution({name!r})"
        ) from None


def _not_implemented(name: str, error: NotImplementedError) -> TrainingError:
    # The stubs say "<Name>[.method]: write it in gpt2_course/exercises/<module>.py".
    found = re.search(r"(\w+)(?:\.\w+)?: write it in gpt2_course/exercises/(\w+)\.py", str(error))
    component = f"{found[2]}.{found[1]}" if found else name
    if component not in parts.COMPONENTS:
        component = name
    return TrainingError(
        f"not implemented yet: {error}\n"
        f"Finish it, or train with the reference version: parts.use_solution({component!r})"
    )


@contextlib.contextmanager
def _clear_errors(name: str) -> Iterator[None]:
    """Turn a NotImplementedError from a stub into one clear message."""
    try:
        yield
    except NotImplementedError as error:
        raise _not_implemented(name, error) from None


def build_model(cfg: TransformerConfig, seed: int, config: TrainConfig | None = None) -> nn.Module:
    """Your Transformer (or the reference one), with its weights initialised from `seed`,
    and GPT-2's initialisation scaling and weight tying where `config` asks for them."""
    with torch.random.fork_rng(devices=[]), _clear_errors("transformer.Transformer"):
        torch.manual_seed(seed)
        model = _part("transformer.Transformer")(cfg)
    if config is not None and not config.output_bias and hasattr(model, "unembed"):
        b_U = getattr(model.unembed, "b_U", None)
        if isinstance(b_U, nn.Parameter):
            with torch.no_grad():
                b_U.zero_()
            b_U.requires_grad_(False)  # so the optimizer leaves it out, and backward skips it
    if config is not None and (config.scale_init or config.tie_weights):
        from gpt2_course import fast

        if config.scale_init:
            fast.scale_residual_init(model)
        if config.tie_weights:
            fast.tie_weights(model)
    return model


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    from gpt2_course.notebook import device

    return device()


# ------------------------------------------------------------------ sampling (tiny helper)


@torch.no_grad()
def sample_text(
    model: nn.Module,
    prompt: str,
    n_tokens: int = 30,
    temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """Continue `prompt` by `n_tokens` sampled tokens (temperature 0: greedy).

    A deliberately small sampler, enough to watch training; notebook 07 builds the
    real one (top-k, top-p, penalties, beam search).
    """
    from gpt2_course.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    device = next(model.parameters()).device
    tokens = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    n_ctx = model.cfg.n_ctx if hasattr(model, "cfg") else tokens.shape[1] + n_tokens
    for _ in range(n_tokens):
        logits = model(tokens[:, -n_ctx:])[0, -1].float().cpu()
        if temperature == 0:
            next_token = logits.argmax()
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)[0]
        tokens = torch.cat([tokens, next_token.view(1, 1).to(device)], dim=1)
    model.train(was_training)
    return tokenizer.decode(tokens[0].tolist())


# ------------------------------------------------------------------ checkpoints


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Hold Ctrl-C until the block is done (a checkpoint is never half-written)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _reuse_freed_memory() -> Iterator[None]:
    """On Linux (glibc), keep freed memory in the process while training.

    Each step allocates and frees logits of batch x n_ctx x d_vocab floats (about 100 MB
    for the tiny model). glibc hands blocks that large to the kernel on every free, and
    the kernel zeroes fresh pages on every allocation: half of a CPU run went there. Kept
    in the heap they are reused, and training runs about twice as fast. Defaults return
    afterwards, and `malloc_trim` gives the memory back.
    """
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters, from glibc's malloc.h
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to tune
        yield
        return
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 1 << 30)
    try:
        yield
    finally:
        mallopt(m_mmap_max, 65536)
        mallopt(m_trim_threshold, 128 * 1024)
        malloc_trim(0)


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """On CPU, the same seed gives the same run in every process, whatever the threads.

    With several threads, some CPU kernels add in an order that varies from run to run
    (the backward of `W_E[tokens]`, an accumulating `index_put_`, is one): losses drift
    apart by the 10th step. Their deterministic versions cost nothing measurable here.
    (On CUDA that would need cuBLAS settings made before the process starts; GPU runs
    are reproducible only up to float noise.)
    """
    if device.type != "cpu":
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    # warn_only: an operation with no deterministic version warns rather than stops a run
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    cfg: TransformerConfig | None = None,
) -> Path:
    """Write model.safetensors, optimizer.pt and config.json into `out_dir`, atomically each."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    with _no_interrupts():
        _write_atomically(out / MODEL_FILE, lambda p: save_file(tensors, str(p)))
        hashes = {MODEL_FILE: _sha256(out / MODEL_FILE)}
        if optimizer is not None:
            _write_atomically(out / OPTIMIZER_FILE, lambda p: torch.save(optimizer.state_dict(), p))
            hashes[OPTIMIZER_FILE] = _sha256(out / OPTIMIZER_FILE)
        document = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model_config": dataclasses.asdict(cfg or model.cfg),
            **meta,
            "sha256": hashes,
        }
        text = json.dumps(document, indent=1)
        _write_atomically(out / CONFIG_FILE, lambda p: p.write_text(text, encoding="utf-8"))
    return out


def _set_aside(out_dir: Path) -> Path:
    """Move an earlier checkpoint to <name>.previous, so that a fresh run never destroys it.

    Only an older set-aside checkpoint (nothing in it but the trainer's own files) is
    replaced; a folder holding anything else gets the next free name instead.
    """
    own = {MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE, "loss.png"}
    for n in itertools.count(1):
        aside = out_dir.with_name(f"{out_dir.name}.previous" + (f"-{n}" if n > 1 else ""))
        if not aside.exists():
            break
        if aside.is_dir() and all(p.name in own for p in aside.iterdir()):
            shutil.rmtree(aside)
            break
    out_dir.rename(aside)
    return aside


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name in (MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE) else path


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json, validated (format, version, files present, hashes)."""
    folder = _checkpoint_dir(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"no checkpoint in {folder} ({CONFIG_FILE} is missing). Train one first: "
            "run notebook 06 or `gpt2-course train`."
        )
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is damaged (not valid JSON: {error})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{config_path} is not a gpt2-course checkpoint")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{config_path} has checkpoint version {meta.get('version')}; "
            f"this course reads version {CHECKPOINT_VERSION}"
        )
    for name, expected in meta.get("sha256", {}).items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"the checkpoint in {folder} is incomplete: {name} is missing")
        if _sha256(file) != expected:
            raise CheckpointError(
                f"{file} does not match its checkpoint's {CONFIG_FILE} (damaged, or the save was "
                "killed half-way). Delete the folder and train again, or use another checkpoint."
            )
    try:
        TransformerConfig(**meta["model_config"])
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{config_path} has no valid model_config ({error})") from None
    return meta


def _load_weights(model: nn.Module, folder: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(folder / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{folder / MODEL_FILE} cannot be read ({error})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint's parameters do not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Keep the parameter names of the stubs."
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{name} has shape {list(tensor.shape)} in the checkpoint and "
                f"{list(own[name].shape)} in the model"
            )
    model.load_state_dict(tensors)


def load_checkpoint(
    path: str | Path | None = None, *, device: str | torch.device | None = "cpu"
) -> tuple[nn.Module, TransformerConfig, dict[str, Any]]:
    """(model, config, meta) from a checkpoint folder (default: default_checkpoint_dir()).

    The model is your `Transformer` (through `gpt2_course.parts`), in eval mode.
    """
    folder = _checkpoint_dir(path if path is not None else default_checkpoint_dir())
    meta = read_checkpoint_meta(folder)
    cfg = TransformerConfig(**meta["model_config"])
    model = build_model(cfg, seed=0)
    if meta.get("train_config", {}).get("tie_weights"):
        from gpt2_course.fast import tie_weights

        tie_weights(model)  # its W_U is W_E^T, checked on loading
    _load_weights(model, folder)
    model.to(device or "cpu").eval()
    return model, cfg, meta


# ------------------------------------------------------------------ training


@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    history: list[dict[str, float]]  # one row per evaluation
    losses: list[float]  # the training loss of every step's batch
    baselines: dict[str, float]
    samples: list[dict[str, Any]]  # {"step": ..., "text": ...}
    step: int
    seconds: float  # wall time of this call's training loop, evaluations included
    tokens_per_second: float  # training tokens / time spent in training steps
    data_summary: str
    checkpoint: Path | None
    interrupted: bool = False

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}

    def table(self) -> str:
        """Final losses against the baselines, as text."""
        rows = [("model, training windows", self.final.get("train_loss", math.nan))]
        rows.append(("model, validation windows", self.final.get("val_loss", math.nan)))
        rows += [(f"{name} baseline (validation)", value) for name, value in self.baselines.items()]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'':<{width}}  loss (nats/token)"]
        lines += [f"{name:<{width}}  {value:8.3f}" for name, value in rows]
        return "\n".join(lines)


def _batch_indices(n_windows: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Which windows make the global batch of step `step`: a function of (seed, step)
    alone, so that a resumed run draws exactly the batches the uninterrupted one would
    have, on any number of processes (each reads only its own part of them)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_windows, (batch_size,), generator=generator)


@torch.no_grad()
def evaluate(model: nn.Module, windows: Tensor, loss_fn: Callable, batch_size: int = 16) -> float:
    """Mean next-token loss over `windows` (each window weighs the same)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size].to(device)
        total += float(loss_fn(model(chunk), chunk)) * len(chunk)
    model.train(was_training)
    return total / len(windows)


def evaluate_shared(
    model: nn.Module, windows: Tensor, loss_fn: Callable, place: Any, batch_size: int = 16
) -> float:
    """`evaluate` with the windows split over the training processes: the same mean."""
    from gpt2_course import distributed

    if not place.parallel:
        return evaluate(model, windows, loss_fn, batch_size)
    share = windows.tensor_split(place.world)[place.rank]
    mine = evaluate(model, share, loss_fn, batch_size) * len(share) if len(share) else 0.0
    device = next(model.parameters()).device
    total, count = distributed.sum_everywhere([mine, float(len(share))], device)
    return total / count


# ------------------------------------------------------------------ scaling up


class _Autocast:
    """`with autocast():` runs the forward pass in `dtype` (None: as it is, in fp32)."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device):
        self.dtype, self.device = dtype, device

    def __call__(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _autocast(precision: str, device: torch.device) -> _Autocast:
    """bf16 autocast where asked, or ("auto") on a GPU that has bf16; fp32 otherwise.

    bf16 keeps fp32's range, so no loss scaling is needed (fp16 would need a GradScaler);
    the parameters and AdamW's state stay fp32.
    """
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16 else "fp32"
    return _Autocast(torch.bfloat16 if precision == "bf16" else None, device)


def _split_batch(config: TrainConfig, world: int) -> tuple[int, int]:
    """(windows per process per step, windows per forward pass): the global batch is split
    over `world` processes, and each share into micro-batches whose gradients add up."""
    if config.batch_size % world:
        raise TrainingError(
            f"the global batch of {config.batch_size} windows does not split over {world} "
            f"processes: choose a batch size that is a multiple of {world}"
        )
    per_process = config.batch_size // world
    micro = min(config.micro_batch or per_process, per_process)
    if per_process % micro:
        raise TrainingError(
            f"each process takes {per_process} windows per step, which micro-batches of {micro} "
            "do not divide: choose a micro-batch size that divides it"
        )
    return per_process, micro


def _describe_scale(
    config: TrainConfig,
    place: Any,
    per_process: int,
    micro: int,
    dtype: torch.dtype | None,
    seq_len: int,
) -> str:
    accumulate = per_process // micro
    return (
        f"Global batch {config.batch_size} windows ({config.batch_size * seq_len:,} tokens) = "
        f"{place.world} process(es) x {accumulate} micro-batch(es) of {micro}; "
        f"{'bf16 autocast' if dtype is not None else 'fp32'}"
        + (
            ", torch's kernels for every component"
            if config.fast_kernels
            else ", fused attention"
            if config.fast_attention
            else ""
        )
        + (", compiled" if config.compile else "")
    )


def _wrap_for_training(
    model: nn.Module, config: TrainConfig, device: torch.device, place: Any
) -> nn.Module:
    """The module the training steps call: the model itself, with the fused attention (or
    torch's kernels for every component) where asked, inside DistributedDataParallel when
    there are several processes, compiled where asked. Evaluation, samples and checkpoints
    use `model`, unwrapped (on the fast path too: the same numbers)."""
    if config.fast_attention or config.fast_kernels:
        from gpt2_course.fast import FastPathError, use_fast_attention, use_fast_kernels

        try:
            (use_fast_kernels if config.fast_kernels else use_fast_attention)(model)
        except FastPathError as error:
            raise TrainingError(str(error)) from None
    trained = model
    if place.parallel:
        from torch.nn.parallel import DistributedDataParallel

        # Every process starts from rank 0's weights (DDP broadcasts them here).
        trained = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        trained = torch.compile(trained)
    return trained


def _accumulating_step(
    model: nn.Module,
    batch: Tensor,
    optimizer: torch.optim.Optimizer,
    lr: float,
    grad_clip: float | None,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    micro: int,
    autocast: _Autocast,
) -> float:
    """One optimizer step on `batch`, in micro-batches of `micro` windows whose gradients
    add up to those of the whole batch (each loss is divided by their number), with the
    forward passes under `autocast`. Under DistributedDataParallel, only the last backward
    averages the gradients across processes (`no_sync` on the others)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    chunks = batch.split(micro)
    total = 0.0
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = last or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast():
                loss = loss_fn(model(chunk), chunk) / len(chunks)
            loss.backward()
        total += float(loss.detach())
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _speed(
    tokens_per_second: float,
    cfg: TransformerConfig,
    device: torch.device,
    world: int,
    autocast: _Autocast,
) -> dict[str, float]:
    """Training tokens/s over all processes, and the model FLOPs utilisation where the
    accelerator's peak (for the precision the run computes in) is known."""
    from gpt2_course.throughput import mfu, peak_flops

    row = {"tokens_per_second": tokens_per_second}
    peak = peak_flops(device, autocast.dtype or torch.float32)
    if peak:
        row["mfu"] = mfu(tokens_per_second / world, cfg, peak)  # per accelerator
    return row


class _HellaSwag:
    """HellaSwag accuracy every `hellaswag_interval` steps, the examples split over ranks;
    skipped, once said, where the data set cannot be had."""

    def __init__(self, config: TrainConfig, place: Any, say: Callable[[str], None]):
        self.config, self.place, self.say = config, place, say
        self.examples: list | None = None
        self.missing = not config.hellaswag_interval

    def due(self, step: int) -> bool:
        interval = self.config.hellaswag_interval
        return not self.missing and (step % interval == 0 or step == self.config.steps)

    def score(self, model: nn.Module) -> dict[str, float]:
        from gpt2_course import distributed, hellaswag

        if self.examples is None:
            self.examples = hellaswag.load_hellaswag(limit=self.config.hellaswag_examples)
            if self.examples is None:
                self.missing = True
                self.say("HellaSwag skipped: its data set cannot be downloaded here (offline).")
                return {}
        try:
            counts = hellaswag.score_examples(
                model, self.examples, rank=self.place.rank, world=self.place.world
            )
        except hellaswag.HellaSwagError as error:  # e.g. a context too short for its endings
            self.missing = True
            self.say(f"HellaSwag skipped: {error}")
            return {}
        device = next(model.parameters()).device
        keys = ("n", "correct", "correct_norm")
        summed = distributed.sum_everywhere([float(counts[k]) for k in keys], device)
        return hellaswag.accuracy(dict(zip(keys, (int(v) for v in summed), strict=True)))


def _prompt(source: str) -> str:
    return "Once upon a time" if source == "tinystories" else "The"


def train(
    config: TrainConfig | None = None,
    *,
    data: Any = None,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = True,
    on_eval: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> TrainResult:
    """Train a GPT as `config` says; return the model, its history and the baselines.

    `data`: a `gpt2_course.data.TokenData` to reuse (else it is loaded from config.data).
    `resume`: continue from the checkpoint in config.out_dir when there is one.
    `on_eval`: called with the model at every evaluation; what it returns joins that row
    of the history (e.g. attention scores measured as training goes).
    """
    from tqdm.auto import tqdm

    from gpt2_course import distributed
    from gpt2_course.data import baselines, load_data, unigram_log_probs
    from gpt2_course.shards import open_shards

    config = config or TrainConfig()
    place = distributed.current()  # rank 0 of 1 unless torchrun started several of us
    verbose, progress = verbose and place.main, progress and place.main

    def say(message: str) -> None:
        if verbose:
            tqdm.write(message)  # prints above the progress bar, not through it

    cfg = config.model
    if data is None:
        # rank 0 prepares any shards first; then the others find them ready
        if place.main:
            data = open_shards(config.data, cfg.n_ctx, verbose=verbose)
        distributed.barrier()
        if not place.main:
            data = open_shards(config.data, cfg.n_ctx, verbose=False)
    if data is None:
        with _clear_errors("training.make_windows"):
            data = load_data(
                config.data,
                seq_len=cfg.n_ctx,
                val_fraction=config.val_fraction,
                seed=config.seed,
                verbose=verbose,
                cut=_part("training.make_windows"),
            )
    if data.seq_len > cfg.n_ctx:
        raise TrainingError(f"windows of {data.seq_len} tokens do not fit n_ctx={cfg.n_ctx}")
    device = pick_device(distributed.device_for(place, config.device))
    autocast = _autocast(config.precision, device)
    per_process, micro = _split_batch(config, place.world)
    loss_fn = _part("training.next_token_loss")
    lr_at_step = _part("training.lr_at_step")
    train_step = _part("training.train_step")

    def lr(step: int) -> float:
        with _clear_errors("training.lr_at_step"):
            return float(
                lr_at_step(
                    step,
                    max_lr=config.max_lr,
                    min_lr=config.min_lr,
                    warmup_steps=config.warmup_steps,
                    total_steps=config.steps,
                )
            )

    # The same windows for every evaluation, and for the baselines.
    val_windows = data.sample("val", config.eval_windows)
    train_windows = data.sample("train", config.eval_windows)
    counted = data.sample("train", max(1, BASELINE_TOKENS // data.seq_len))
    base = baselines(counted, val_windows, cfg.d_vocab)
    base_dict = base.as_dict()

    model = build_model(cfg, config.seed, config)
    if (
        config.init_output_bias
        and config.output_bias
        and hasattr(model, "unembed")
        and hasattr(model.unembed, "b_U")
    ):
        # Start from the unigram model: the first steps need not learn token frequencies.
        with torch.no_grad():
            model.unembed.b_U.copy_(unigram_log_probs(counted, cfg.d_vocab, base.unigram_k))
    model.to(device)
    with _clear_errors("training.configure_optimizer"):
        optimizer = _part("training.configure_optimizer")(model, config.max_lr, config.weight_decay)

    out_dir = config.checkpoint_dir
    step, history, losses, samples = 0, [], [], []
    if resume and (out_dir / CONFIG_FILE).exists():
        meta = read_checkpoint_meta(out_dir)
        saved = TransformerConfig(**meta["model_config"])
        if saved != cfg:
            raise CheckpointError(
                f"the checkpoint in {out_dir} is a different model: {_config_diff(saved, cfg)}. "
                "Resume with the same model size, or train into another folder."
            )
        _load_weights(model, out_dir)
        if (out_dir / OPTIMIZER_FILE).is_file():
            try:
                state = torch.load(out_dir / OPTIMIZER_FILE, map_location=device, weights_only=True)
                optimizer.load_state_dict(state)
            except Exception as error:
                raise CheckpointError(
                    f"{out_dir / OPTIMIZER_FILE} cannot be loaded ({error})"
                ) from None
        step = int(meta["step"])
        history, losses, samples = (
            meta.get("history", []),
            meta.get("losses", []),
            meta.get("samples", []),
        )
        if meta.get("data", {}).get("description") != data.description:
            say(f"Note: the checkpoint was trained on {meta.get('data', {}).get('description')}.")
        say(f"Resuming from step {step} of {config.steps} ({out_dir}).")
    elif resume:
        say(f"No checkpoint in {out_dir} yet: starting from scratch.")
    elif config.save and place.main and (out_dir / CONFIG_FILE).exists():
        aside = _set_aside(out_dir)
        say(
            f"Starting afresh: the earlier checkpoint in {out_dir} is now in {aside} "
            "(resume=True would have continued it)."
        )

    def meta_now() -> dict[str, Any]:
        return {
            "step": step,
            "train_config": config.to_json(),
            "history": history,
            "losses": losses,
            "samples": samples,
            "baselines": base_dict,
            "data": {
                "source": data.source,
                "description": data.description,
                "tokens": data.n_tokens,
            },
        }

    prompt = _prompt(data.source)

    def record_sample() -> None:
        if not config.sample_interval or not place.main:
            return
        text = sample_text(
            model, prompt, config.sample_tokens, config.temperature, seed=config.seed
        )
        samples.append({"step": step, "text": text})
        say(f"[sample at step {step}] {text!r}")

    hellaswag = _HellaSwag(config, place, say)

    def record_eval() -> None:
        with _clear_errors("training.next_token_loss"), autocast():
            row = {
                "step": step,
                "tokens": step * config.batch_size * data.seq_len,
                "train_loss": evaluate_shared(model, train_windows, loss_fn, place),
                "val_loss": evaluate_shared(model, val_windows, loss_fn, place),
                "lr": lr(step),
            }
            if step and train_seconds:
                row |= _speed(trained_tokens / train_seconds, cfg, device, place.world, autocast)
            if hellaswag.due(step):
                row |= hellaswag.score(model)
        if on_eval is not None and place.main:
            row |= on_eval(model)
        history.append(row)
        if step:
            extra = "".join(
                f", {name} {row[name]:.3f}" for name in ("hellaswag_acc_norm", "mfu") if name in row
            )
            say(
                f"step {step:>5}: loss on training windows {row['train_loss']:.3f}, "
                f"on validation windows {row['val_loss']:.3f} (lr {row['lr']:.2e}{extra})"
            )

    say(
        f"Model: {_describe(model, cfg)} on {device}. Baselines on the validation windows: "
        + ", ".join(f"{k} {v:.3f}" for k, v in base_dict.items())
    )
    trained = _wrap_for_training(model, config, device, place)
    if micro < per_process or autocast.dtype is not None:
        step_with = partial(_accumulating_step, loss_fn=loss_fn, micro=micro, autocast=autocast)
    else:  # your train_step, as in notebook 06 (under DDP, gradients sync inside backward)
        step_with = train_step
    if (
        place.parallel
        or micro < per_process
        or autocast.dtype
        or config.fast_attention
        or config.fast_kernels
    ):
        say(_describe_scale(config, place, per_process, micro, autocast.dtype, data.seq_len))
    distributed.barrier()  # rank 0 has set any earlier checkpoint aside: all may start
    end = min(config.steps, config.stop_at or config.steps)  # this run stops here
    interrupted = False
    train_seconds = 0.0
    trained_tokens = 0
    start = time.perf_counter()
    if step == 0:
        record_eval()
        record_sample()
    bar = tqdm(
        total=config.steps,
        initial=step,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
    )
    with _reuse_freed_memory(), _deterministic(device):
        try:
            while step < end:
                t0 = time.perf_counter()
                current_lr = lr(step)
                indices = _batch_indices(
                    data.n_windows("train"), config.batch_size, config.seed, step
                )
                batch = data.read("train", distributed.my_part(indices, place)).to(device)
                with _clear_errors("training.train_step"):
                    loss = _take_step(
                        step_with, trained, batch, optimizer, current_lr, config.grad_clip, loss_fn
                    )
                    if place.parallel:  # the loss of the global batch, for every rank's log
                        loss = distributed.sum_everywhere([loss], device)[0] / place.world
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss} at step {step}: lower the learning rate "
                        f"(now {current_lr:.3g}) or check your components"
                    )
                step += 1
                losses.append(round(loss, 5))
                train_seconds += time.perf_counter() - t0
                trained_tokens += config.batch_size * data.seq_len  # over all processes
                tokens_per_second = trained_tokens / train_seconds
                # sample first, so that the checkpoint saved at this step holds it
                if config.sample_interval and (
                    step % config.sample_interval == 0 or step == config.steps
                ):
                    if not samples or samples[-1]["step"] != step:
                        record_sample()
                if step % config.eval_interval == 0 or step in (config.steps, end):
                    record_eval()
                    if config.save and place.main:
                        save_checkpoint(out_dir, model, optimizer, meta_now(), cfg)
                postfix = {"loss": f"{losses[-1]:.3f}", "tok/s": f"{tokens_per_second:.0f}"}
                if history:
                    postfix["val"] = f"{history[-1]['val_loss']:.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
        except KeyboardInterrupt:
            interrupted = True
            saved = None
            if (out_dir / CONFIG_FILE).exists():
                saved = read_checkpoint_meta(out_dir)["step"]
            where = (
                f"the checkpoint of step {saved} is in {out_dir}"
                if saved is not None
                else "no checkpoint yet"
            )
            say(f"\nInterrupted at step {step}: {where}. Resume with resume=True (or --resume).")
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    return TrainResult(
        model=model,
        config=config,
        history=history,
        losses=losses,
        baselines=base_dict,
        samples=samples,
        step=step,
        seconds=seconds,
        tokens_per_second=trained_tokens / train_seconds if train_seconds else 0.0,
        data_summary=data.summary(),
        checkpoint=out_dir if config.save and (out_dir / CONFIG_FILE).exists() else None,
        interrupted=interrupted,
    )


def _take_step(
    train_step: Callable[..., Any],
    model: nn.Module,
    batch: Tensor,
    optimizer: torch.optim.Optimizer,
    lr: float,
    grad_clip: float | None,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> float:
    """`train_step` on one batch: its loss as a float, or a TrainingError saying what is wrong."""
    try:
        loss = train_step(model, batch, optimizer, lr=lr, grad_clip=grad_clip)
    except RuntimeError as error:
        if "does not require grad" not in str(error):  # torch's words for "no grad_fn"
            raise
        raise TrainingError(_why_no_gradient(model, batch, loss_fn)) from None
    try:
        return float(loss)
    except (TypeError, ValueError, RuntimeError):
        raise TrainingError(
            f"train_step returned a {type(loss).__name__}, expected the loss as a Python float "
            "(loss.item())"
        ) from None


def _why_no_gradient(
    model: nn.Module, batch: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> str:
    """Which function cut the loss off from the parameters: the model (and its first module
    whose output carries no gradient), next_token_loss, or train_step itself."""
    lead = "The loss has no gradient (no grad_fn), so backward() cannot train the model: "
    advice = (
        "Look for .detach(), .data, .item(), torch.no_grad() or a tensor rebuilt with "
        "torch.tensor(...) there."
    )
    cut_off: list[str] = []

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if (
                isinstance(output, Tensor)
                and output.is_floating_point()
                and not output.requires_grad
            ):
                cut_off.append(name)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules()]
    try:
        with torch.enable_grad():
            logits = model(batch)
            loss = loss_fn(logits, batch) if isinstance(logits, Tensor) else None
    finally:
        for handle in handles:
            handle.remove()
    if not (isinstance(logits, Tensor) and logits.requires_grad):
        first = cut_off[0] if cut_off else ""
        module = model.get_submodule(first) if first else model
        where = f"`{first}` ({type(module).__name__}.forward)" if first else "Transformer.forward"
        kind = type(module).__name__
        component = next((c for c in parts.COMPONENTS if c.split(".")[1] == kind), None)
        lend = f", or train with parts.use_solution({component!r})" if component else ""
        return (
            f"{lead}the model's logits carry none. The first part whose output has no "
            f"gradient is {where}. {advice[:-1]}{lend}."
        )
    if isinstance(loss, Tensor) and not loss.requires_grad:
        return (
            f"{lead}next_token_loss returned a tensor with no gradient, although the logits "
            f"have one. {advice[:-1]}, or train with the reference loss and the reference step "
            "that calls it: parts.use_solution('training.next_token_loss') and "
            "parts.use_solution('training.train_step')."
        )
    return (
        f"{lead}the model and next_token_loss give a loss with a gradient, so train_step loses "
        f"it before backward(). {advice[:-1]}, or train with "
        "parts.use_solution('training.train_step')."
    )


def _config_diff(saved: TransformerConfig, wanted: TransformerConfig) -> str:
    diffs = [
        f"{f.name}={getattr(saved, f.name)} there, {getattr(wanted, f.name)} here"
        for f in dataclasses.fields(TransformerConfig)
        if getattr(saved, f.name) != getattr(wanted, f.name)
    ]
    return "; ".join(diffs)


def _describe(model: nn.Module, cfg: TransformerConfig) -> str:
    n = sum(p.numel() for p in model.parameters())
    emb = cfg.d_vocab * cfg.d_model
    return (
        f"{n / 1e6:.1f}M parameters ({2 * emb / 1e6:.1f}M in the embedding and unembedding), "
        f"d_model={cfg.d_model}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, n_ctx={cfg.n_ctx}"
    )


# ------------------------------------------------------------------ pictures


def plot_history(result: TrainResult, ax: Any = None, smooth: int = 20) -> Any:
    """Training and validation loss against tokens seen, with the baselines as lines."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    per_step = result.config.batch_size * result.config.model.n_ctx
    losses = torch.tensor(result.losses)
    if len(losses):
        steps = torch.arange(1, len(losses) + 1)
        ax.plot(steps * per_step, losses, color="tab:blue", alpha=0.2, lw=0.8)
        if len(losses) >= smooth:
            kernel = torch.ones(smooth) / smooth
            smoothed = torch.conv1d(losses.view(1, 1, -1), kernel.view(1, 1, -1))[0, 0]
            ax.plot(
                steps[smooth - 1 :] * per_step, smoothed, color="tab:blue", label="training batches"
            )
    if result.history:
        tokens = [row["tokens"] for row in result.history]
        ax.plot(
            tokens,
            [r["train_loss"] for r in result.history],
            "o-",
            color="tab:cyan",
            ms=4,
            label="training windows (eval)",
        )
        ax.plot(
            tokens,
            [r["val_loss"] for r in result.history],
            "o-",
            color="tab:orange",
            ms=4,
            label="validation windows",
        )
    styles = {"uniform": "tab:gray", "unigram": "tab:purple", "bigram": "tab:red"}
    for name, value in result.baselines.items():
        ax.axhline(
            value, ls="--", lw=1, color=styles.get(name, "k"), label=f"{name} baseline {value:.2f}"
        )
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("loss (nats per token)")
    highest = max([result.baselines.get("uniform", 11.0)] + [r["val_loss"] for r in result.history])
    ax.set_ylim(top=highest + 0.5)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


# ------------------------------------------------------------------ the CLI


TRAIN_DESCRIPTION = (
    "Train a GPT with your components and save a checkpoint. On several GPUs (or CPU "
    "processes): torchrun --nproc_per_node N -m gpt2_course.train [these options], "
    "or --processes N here."
)


def add_cli(subparsers: Any) -> None:
    """Register `gpt2-course train`."""
    p = subparsers.add_parser(
        "train",
        help="train a GPT on real text (your components, or --solutions)",
        description=TRAIN_DESCRIPTION,
    )
    add_train_arguments(p)
    p.set_defaults(func=train_command)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `gpt2-course train`, which `python -m gpt2_course.train` shares."""
    p.add_argument(
        "--model", default="tiny", choices=list(PRESETS), help="model size preset (default tiny)"
    )
    for name in ("d-model", "n-layers", "n-heads", "n-ctx"):
        p.add_argument(
            f"--{name}", type=int, help=f"override the preset's {name.replace('-', '_')}"
        )
    p.add_argument("--steps", type=int, help="training steps (default 600; 60 with --quick)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch, in windows")
    p.add_argument(
        "--batch-tokens", type=int, help="global batch in tokens (instead of --batch-size)"
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        help="windows per forward pass in each process; gradients accumulate up to the batch",
    )
    p.add_argument(
        "--lr", type=float, help="peak learning rate (default 1e-2; 6e-4 for gpt2-small)"
    )
    p.add_argument("--warmup", type=int, help="warmup steps (default 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument(
        "--data",
        default="auto",
        help="auto (TinyStories if online, else builtin), tinystories, builtin, builtin-large, "
        ".txt files, fineweb-edu or openwebtext (sharded once into the cache), or a folder "
        "made by `gpt2-course shards`",
    )
    p.add_argument("--out", help=f"checkpoint folder (default {default_checkpoint_dir()})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-interval", type=int, help="steps between evaluations (and checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="stop at this step with a checkpoint (a job with a time limit); --resume goes on",
    )
    p.add_argument(
        "--quick", action="store_true", help="the short CI run (also GPT2_COURSE_QUICK=1)"
    )
    p.add_argument(
        "--solutions", action="store_true", help="use the reference solutions for every part"
    )
    p.add_argument("--device", help="cpu, cuda or mps (default: the fastest here)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    scale = p.add_argument_group("scaling up (README: Train GPT-2 small)")
    scale.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="auto: bf16 on GPUs that have it"
    )
    scale.add_argument("--compile", action="store_true", help="torch.compile the model")
    scale.add_argument(
        "--fast-attention",
        action="store_true",
        help="your attention's weights in F.scaled_dot_product_attention (checked first)",
    )
    scale.add_argument(
        "--fast-kernels",
        action="store_true",
        help="torch's fused kernels for every component, each checked against yours first; "
        "implies --fast-attention",
    )
    scale.add_argument("--tie-weights", action="store_true", help="GPT-2's W_U = W_E^T")
    scale.add_argument(
        "--no-output-bias",
        action="store_true",
        help="as in GPT-2, no bias on the logits (b_U stays zero, untrained)",
    )
    scale.add_argument(
        "--scale-init", action="store_true", help="GPT-2's 1/sqrt(2 n_layers) residual init"
    )
    scale.add_argument(
        "--hellaswag", type=int, default=0, metavar="STEPS", help="HellaSwag every STEPS steps"
    )
    scale.add_argument("--hellaswag-examples", type=int, help="default: all 10,042")
    scale.add_argument(
        "--processes", type=int, default=1, help="start this many processes here (through torchrun)"
    )


def train_command(args: argparse.Namespace) -> int:
    """`gpt2-course train` and `python -m gpt2_course.train`: one process of the run
    (or, with --processes N, the launcher of N of them)."""
    from gpt2_course import distributed

    if args.processes > 1 and not distributed.from_environment().parallel:
        return _launch(args.processes, getattr(args, "argv", None) or sys.argv[1:])
    if args.quick:
        os.environ["GPT2_COURSE_QUICK"] = "1"
    try:
        place = distributed.start(args.device)
    except (RuntimeError, ValueError) as error:
        print(f"error: cannot join the other training processes ({error})", file=sys.stderr)
        return 1
    try:
        return _train_here(args, place)
    finally:
        distributed.stop()


def _launch(nproc: int, argv: list[str]) -> int:
    """Run `torchrun --standalone --nproc_per_node nproc -m gpt2_course.train argv`."""
    import subprocess

    flags = argv[1:] if argv[:1] == ["train"] else argv  # `gpt2-course train ...`: drop "train"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={nproc}", "-m", "gpt2_course.train", *flags]
    return subprocess.call(command)


def _train_here(args: argparse.Namespace, place: Any) -> int:
    try:
        cfg = model_config(
            args.model,
            d_model=args.d_model,
            n_layers=args.n_layers,
            n_heads=args.n_heads,
            n_ctx=args.n_ctx,
        )
        batch_size = args.batch_size
        if args.batch_tokens is not None:
            if args.batch_tokens % cfg.n_ctx or args.batch_tokens < cfg.n_ctx:
                raise TrainingError(
                    f"--batch-tokens {args.batch_tokens} is not a multiple of the window "
                    f"length n_ctx={cfg.n_ctx}"
                )
            batch_size = args.batch_tokens // cfg.n_ctx
        overrides: dict[str, Any] = dict(
            model=cfg,
            data=args.data,
            batch_size=batch_size,
            micro_batch=args.micro_batch,
            max_lr=args.lr if args.lr is not None else PRESET_LR[args.model],
            weight_decay=args.weight_decay,
            seed=args.seed,
            out_dir=args.out,
            device=args.device,
            precision=args.precision,
            compile=args.compile,
            fast_attention=args.fast_attention or args.fast_kernels,  # one implies the other
            fast_kernels=args.fast_kernels,
            tie_weights=args.tie_weights,
            output_bias=not args.no_output_bias,
            scale_init=args.scale_init,
            hellaswag_interval=args.hellaswag,
            hellaswag_examples=args.hellaswag_examples,
            stop_at=args.stop_at,
        )
        for key, value in [
            ("steps", args.steps),
            ("warmup_steps", args.warmup),
            ("eval_interval", args.eval_interval),
        ]:
            if value is not None:
                overrides[key] = value
        config = notebook_config(**overrides)
        package = parts.lent_package() if args.solutions else parts.default_package()
        with parts.using(package):
            whose = parts.describe_package(package)
            if place.main:
                print(f"Training with {whose}.")
            result = train(config, resume=args.resume, progress=not args.no_progress)
    except (TrainingError, ValueError) as error:
        print(f"error{f' (rank {place.rank})' if place.parallel else ''}: {error}", file=sys.stderr)
        return 1
    if not place.main:
        return 130 if result.interrupted else 0
    print(result.table())
    speed = f"{result.tokens_per_second:.0f} training tokens/s"
    print(f"{result.step} steps in {result.seconds:.0f} s, {speed}")
    if result.checkpoint:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ax = plot_history(result)
        ax.figure.savefig(result.checkpoint / "loss.png", dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        print(f"Checkpoint and loss curve: {result.checkpoint}")
    return 130 if result.interrupted else 0
