"""The pieces of a training loop: the loss, the optimizer, the learning-rate schedule, the
training windows and the step that puts them together."""

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
    """AdamW with weight decay on the weight matrices and embeddings only.

    Decay pulls weights towards zero. That regularises the matrices (embeddings, attention
    and MLP weights: every `W_...`); on biases and LayerNorm's scale and shift it only
    fights the values they need, so those get none. The rule goes by name, not by the
    number of dimensions: b_Q, b_K and b_V are [n_heads, d_head], 2-D, and still biases.
    """
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [p for name, p in params if name.split(".")[-1].startswith("W_")]
    no_decay = [p for name, p in params if not name.split(".")[-1].startswith("W_")]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS)


def lr_at_step(
    step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Linear warmup to max_lr, then a cosine down to min_lr at total_steps.

    Steps count from 0. The warmup line max_lr * (step + 1) / (warmup_steps + 1) gives
    step 0 a small but nonzero lr (an lr of 0 would make the first step a no-op) and
    meets the cosine at step `warmup_steps`, where it is max_lr; step `total_steps`
    reaches min_lr, and every later step stays there.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # 0 -> 1
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def make_windows(tokens: Int[Tensor, "n_tokens"], seq_len: int) -> Int[Tensor, "n_windows seq_len"]:
    """Consecutive, non-overlapping windows of `seq_len` tokens; the remainder is dropped."""
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D (one stream), got shape {list(tokens.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    n_windows = tokens.shape[0] // seq_len
    kept = tokens[: n_windows * seq_len]
    # rearrange of a contiguous slice is a view: clone, so the windows are the caller's own
    return einops.rearrange(kept, "(window pos) -> window pos", pos=seq_len).clone()


def train_step(
    model: nn.Module,
    batch: Int[Tensor, "batch pos"],
    optimizer: torch.optim.Optimizer,
    *,
    lr: float,
    grad_clip: float | None,
) -> float:
    """Set the lr, forward, loss, backward, clip, step, zero; the loss before the step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = next_token_loss(model(batch), batch)
    loss.backward()
    if grad_clip:  # None or 0: no clipping
        # one norm over every gradient: clipping each parameter alone would change the
        # direction of the step, not just its length
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # gradients accumulate: clear them for the next batch
    return loss.item()
