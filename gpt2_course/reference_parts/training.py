"""The loss, the optimizer and the learning-rate schedule, on torch's own kernels."""

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

BETAS = (0.9, 0.95)  # AdamW's betas for GPT-2 training (PyTorch's default beta2 is 0.999)


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, ""]:
    """Mean cross-entropy of predicting token t+1 from the logits at position t."""
    predictions = logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(predictions, tokens[:, 1:].flatten())


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the parameters of 2 or more dimensions only."""
    by_kind: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for param in filter(lambda p: p.requires_grad, model.parameters()):
        by_kind[param.ndim >= 2].append(param)
    return torch.optim.AdamW(
        [
            dict(params=by_kind[True], weight_decay=weight_decay),
            dict(params=by_kind[False], weight_decay=0.0),
        ],
        lr=lr,
        betas=BETAS,
    )


def lr_at_step(
    step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Linear warmup from 0 to max_lr, then half a cosine down to min_lr at total_steps."""
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return float(min_lr)
    done = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * done))
