"""How much of the hardware a training run uses: FLOPs per token, peak FLOP/s, and MFU.

Model FLOPs utilisation (MFU, PaLM's appendix B) = achieved FLOP/s / the chip's peak, where
the achieved FLOP/s is tokens/s times the FLOPs a token needs by the model's shapes alone
(whatever the kernels actually do, recomputation included, is not counted):

    training FLOPs per token = 6 N + 12 n_layers n_heads d_head T

- N: the parameters used in matrix products, per token: per block W_Q, W_K, W_V, W_O
  (4 d_model n_heads d_head) and W_in, W_out (2 d_model d_mlp), plus the unembedding W_U
  (d_model d_vocab). Not counted: W_E and W_pos (a lookup, no arithmetic), biases and
  LayerNorms (a few operations per number, well under 1% here). A product with a
  [d_in, d_out] matrix costs 2 d_in d_out FLOPs per token forward (a multiply and an add)
  and twice that backward (gradients of the input and of the weight): 2N + 4N = 6N.
- Attention: Q K^T and pattern @ V each cost 2 n_heads d_head T FLOPs per token and layer
  forward (T = the sequence length, n_ctx unless given): 4 n_layers n_heads d_head T
  forward, 12 ... for training. Counted in full as in PaLM, although a causal kernel
  skips about half; for GPT-2 small at T = 1024 this term is 13% of the total.

A forward pass alone is a third of the training figure.
"""

import os
import re

import torch

from gpt2_course.config import TransformerConfig

PEAK_FLOPS_ENV = "GPT2_COURSE_PEAK_FLOPS"


class ThroughputError(ValueError):
    """A FLOP count or an MFU cannot be computed as asked; the message says why."""


def counted_parameters(cfg: TransformerConfig) -> int:
    """N in 6N: the weights of every matrix product a token goes through (see the docstring)."""
    attention = 4 * cfg.d_model * cfg.n_heads * cfg.d_head  # W_Q, W_K, W_V, W_O
    mlp = 2 * cfg.d_model * cfg.d_mlp  # W_in, W_out
    return cfg.n_layers * (attention + mlp) + cfg.d_model * cfg.d_vocab  # + W_U


def flops_per_token(
    cfg: TransformerConfig, *, training: bool = True, seq_len: int | None = None
) -> float:
    """FLOPs per token of a forward and backward pass (a forward alone: `training=False`),
    for sequences of `seq_len` tokens (default cfg.n_ctx); PaLM's convention."""
    T = cfg.n_ctx if seq_len is None else seq_len
    if T < 1:
        raise ThroughputError(f"seq_len must be at least 1, not {T}")
    attention = 4 * cfg.n_layers * cfg.n_heads * cfg.d_head * T
    forward = 2 * counted_parameters(cfg) + attention
    return float(3 * forward if training else forward)


# Dense peak FLOP/s (no 2:4 sparsity, which datasheets print next to it as twice as much),
# by the pattern of `torch.cuda.get_device_name`, most specific first. Values are from
# NVIDIA's datasheets (H200, H100, A100, L40S, L4, A10, T4, V100) and architecture
# whitepapers (GeForce: Ada for the RTX 4090, GA102 for the RTX 3090, "with FP32
# accumulate", what training uses). fp16 and bf16: tensor cores; tf32: tensor cores on
# float32 matrices when torch allows TF32; fp32: plain float32. None: not supported.
_T = 1e12
PEAK_FLOPS: list[tuple[str, dict[str, float | None]]] = [
    (r"H200 NVL", dict(bf16=835.5 * _T, fp16=835.5 * _T, tf32=417.5 * _T, fp32=60 * _T)),
    (r"H200", dict(bf16=989.5 * _T, fp16=989.5 * _T, tf32=494.5 * _T, fp32=67 * _T)),
    (r"H100 NVL", dict(bf16=835.5 * _T, fp16=835.5 * _T, tf32=417.5 * _T, fp32=60 * _T)),
    (r"H100 PCIe", dict(bf16=756.5 * _T, fp16=756.5 * _T, tf32=378 * _T, fp32=51 * _T)),
    (r"H100", dict(bf16=989.5 * _T, fp16=989.5 * _T, tf32=494.5 * _T, fp32=67 * _T)),  # SXM
    (r"\bA100\b", dict(bf16=312 * _T, fp16=312 * _T, tf32=156 * _T, fp32=19.5 * _T)),
    (r"\bL40S\b", dict(bf16=362 * _T, fp16=362 * _T, tf32=183 * _T, fp32=91.6 * _T)),
    (r"\bL4\b", dict(bf16=121 * _T, fp16=121 * _T, tf32=60 * _T, fp32=30.3 * _T)),
    # NVIDIA publishes no datasheet for AWS's A10G: the A10's figures, an upper bound
    (r"\bA10G?\b", dict(bf16=125 * _T, fp16=125 * _T, tf32=62.5 * _T, fp32=31.2 * _T)),
    (r"RTX 4090", dict(bf16=165.2 * _T, fp16=165.2 * _T, tf32=82.6 * _T, fp32=82.6 * _T)),
    (r"RTX 3090", dict(bf16=71 * _T, fp16=71 * _T, tf32=35.6 * _T, fp32=35.6 * _T)),
    (r"\bT4\b", dict(bf16=None, fp16=65 * _T, tf32=None, fp32=8.1 * _T)),
    (r"V100.*PCIE", dict(bf16=None, fp16=112 * _T, tf32=None, fp32=14 * _T)),
    (r"V100", dict(bf16=None, fp16=125 * _T, tf32=None, fp32=15.7 * _T)),  # SXM2
]


def _tf32_allowed() -> bool:
    """Whether torch runs float32 matrix products on TF32 tensor cores."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or (
        torch.get_float32_matmul_precision() != "highest"
    )


def _peak_from_env() -> float | None:
    text = os.environ.get(PEAK_FLOPS_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ThroughputError(
            f"{PEAK_FLOPS_ENV}={text!r} is not a positive number of FLOP/s "
            "(e.g. 989.5e12 for an H100's dense bf16 peak)"
        )
    return value


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """The dense peak FLOP/s of `device` for matrix products in `dtype`, or None if unknown.

    `GPT2_COURSE_PEAK_FLOPS` (FLOP/s) overrides the table, for any device. The CPU, MPS and
    GPUs not in `PEAK_FLOPS` give None, as does a dtype the GPU has no fast path for.
    """
    override = _peak_from_env()
    if override is not None:
        return override
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        name = torch.cuda.get_device_name(device)
    except (RuntimeError, AssertionError):  # no CUDA here
        return None
    if dtype == torch.float32:
        kind = "tf32" if _tf32_allowed() else "fp32"
    else:
        kind = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if kind is None:
        return None
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peaks[kind]
    return None


def mfu(
    tokens_per_second: float,
    cfg: TransformerConfig,
    peak: float | None,
    *,
    seq_len: int | None = None,
) -> float:
    """Model FLOPs utilisation of a training run: its FLOP/s over the `peak` (0 to 1)."""
    if peak is None or not peak > 0:
        raise ThroughputError(
            f"no peak FLOP/s to compare with (got {peak!r}): this device is not in the table of "
            f"gpt2_course.throughput; set {PEAK_FLOPS_ENV} to its dense peak, e.g. 989.5e12"
        )
    if not tokens_per_second >= 0:
        raise ThroughputError(f"tokens_per_second must be >= 0, not {tokens_per_second!r}")
    return tokens_per_second * flops_per_token(cfg, training=True, seq_len=seq_len) / peak
