"""The loss, the optimizer, the learning-rate schedule, the windows and the training step,
on torch's own kernels."""

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
    """AdamW with weight decay on the `W_...` parameters only (not biases, not LayerNorm)."""
    by_kind: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            by_kind[name.rpartition(".")[2][:2] == "W_"].append(param)
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
    """Warmup on the line through (-1, 0) and (warmup_steps, max_lr), then half a cosine
    down to min_lr at total_steps."""
    if step < warmup_steps:
        return max_lr / (warmup_steps + 1) * (step + 1)
    if step >= total_steps:
        return float(min_lr)
    done = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * done))


def make_windows(tokens: Int[Tensor, "n_tokens"], seq_len: int) -> Int[Tensor, "n_windows seq_len"]:
    """Non-overlapping windows of `seq_len` tokens (a copy), the remainder dropped."""
    if seq_len < 1 or tokens.ndim != 1:
        raise ValueError(
            f"need a 1-D stream and seq_len >= 1, got shape {list(tokens.shape)}, seq_len {seq_len}"
        )
    if len(tokens) < seq_len:
        return tokens.new_empty((0, seq_len))
    return tokens.unfold(0, seq_len, seq_len).clone()  # unfold is a view of `tokens`


def train_step(
    model: nn.Module,
    batch: Int[Tensor, "batch pos"],
    optimizer: torch.optim.Optimizer,
    *,
    lr: float,
    grad_clip: float | None,
) -> float:
    """One step: the lr, the loss, its gradients clipped by their global norm, the update."""
    for group in optimizer.param_groups:
        group.update(lr=lr)
    logits = model(batch)
    loss = next_token_loss(logits, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grad_clip is not None and grad_clip > 0 and grads:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = torch.clamp(grad_clip / (norm + 1e-6), max=1.0)  # as clip_grad_norm_ does
        for grad in grads:
            grad.mul_(scale)
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())
