"""The three pieces of a training loop: the loss, the optimizer and the learning-rate schedule."""

import math

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

# AdamW's betas. beta2 = 0.95 (not PyTorch's default 0.999) lets the second-moment
# estimate forget faster, which keeps steps sane when the gradient scale changes
# quickly, as it does early in training of a language model.
BETAS = (0.9, 0.95)
IGNORE = -100  # a target cross_entropy skips (its ignore_index)


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, ""]:
    """Mean cross-entropy of predicting token t+1 from the logits at position t."""
    # Position t has seen tokens 0..t and predicts token t+1, so the targets are the
    # tokens shifted left by one; the last position has no target and is ignored.
    # (Slicing logits[:, :-1] instead gives the same mean, but copies the largest
    # tensor of the model twice, forward and backward; shifting the targets is free.)
    targets = torch.full_like(tokens, IGNORE)
    targets[:, :-1] = tokens[:, 1:]
    return F.cross_entropy(
        einops.rearrange(logits, "batch pos d_vocab -> (batch pos) d_vocab"),
        einops.rearrange(targets, "batch pos -> (batch pos)"),
        ignore_index=IGNORE,
    )


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only.

    Decay pulls weights towards zero. That regularises matrices (embeddings, attention
    and MLP weights); on biases and LayerNorm's scale and shift it only fights the
    values they need, so those (every parameter with fewer than 2 dimensions) get none.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS)


def lr_at_step(
    step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Linear warmup from 0 to max_lr, then a cosine down to min_lr at total_steps.

    Steps count from 0: step 0 has lr 0, step `warmup_steps` reaches max_lr, step
    `total_steps` reaches min_lr, and every later step stays at min_lr.
    """
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # 0 -> 1
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
