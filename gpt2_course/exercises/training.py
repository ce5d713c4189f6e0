"""Notebook 06: the loss, the optimizer, the learning-rate schedule, the training windows
and the training step of a training run.

Keep the names and signatures: the trainer (`gpt2-course train`) calls these five
functions through `gpt2_course.parts`, so the model you train uses your code.
"""

import math  # noqa: F401  (you will want it)

import einops  # noqa: F401  (you will want it)
import torch
import torch.nn.functional as F  # noqa: F401  (you will want it)
from jaxtyping import Float, Int
from torch import Tensor, nn

# The betas to give AdamW. beta2 = 0.95 (PyTorch's default is 0.999) makes the
# second-moment estimate forget faster, which keeps steps sane when the scale of the
# gradients changes quickly, as it does early in training.
BETAS = (0.9, 0.95)


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, ""]:
    """The mean cross-entropy of predicting each next token: a scalar tensor.

    The logits at position t were computed from tokens 0..t, so they predict token
    t+1. Use every position that has a next token (all but the last), and average
    over every prediction in the batch. `torch.nn.functional.cross_entropy` expects
    logits of shape [n, d_vocab] and targets of shape [n].
    """
    raise NotImplementedError("next_token_loss: write it in gpt2_course/exercises/training.py")


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """A `torch.optim.AdamW` over every trainable parameter of `model`, with `lr` and BETAS.

    Weight decay `weight_decay` goes on the weight matrices and embeddings: every
    parameter whose own name (the last part of its `model.named_parameters()` name, e.g.
    "W_Q" in "blocks.0.attn.W_Q") starts with "W_". The others get 0: the biases (every
    "b_..." name, b_Q, b_K and b_V included, although they are 2-D [n_heads, d_head]) and
    LayerNorm's w and b. Give AdamW two parameter groups, each a dict with "params" and
    "weight_decay".
    """
    raise NotImplementedError("configure_optimizer: write it in gpt2_course/exercises/training.py")


def lr_at_step(
    step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """The learning rate to use at `step` (counting from 0), as a Python float (not a tensor).

    * warmup, 0 <= step < warmup_steps: max_lr * (step + 1) / (warmup_steps + 1), a
      straight line that is already above 0 at step 0 (so the first step moves the
      weights) and would reach max_lr at step = warmup_steps;
    * decay, warmup_steps <= step <= total_steps: half a cosine from max_lr (at
      step = warmup_steps) down to min_lr (at step = total_steps);
    * after total_steps: stays at min_lr.
    """
    raise NotImplementedError("lr_at_step: write it in gpt2_course/exercises/training.py")


def make_windows(tokens: Int[Tensor, "n_tokens"], seq_len: int) -> Int[Tensor, "n_windows seq_len"]:
    """Cut one stream of token ids into consecutive windows of `seq_len` tokens.

    Window i is tokens[i * seq_len : (i + 1) * seq_len]: the windows do not overlap, and
    the remainder (the last len(tokens) % seq_len tokens) is dropped. With fewer than
    seq_len tokens the result has 0 rows. The result has the dtype of `tokens` and is a
    new tensor, not a view of `tokens`: writing into a window must leave `tokens` alone.

    Raises ValueError when `tokens` is not 1-D or when seq_len < 1.
    """
    raise NotImplementedError("make_windows: write it in gpt2_course/exercises/training.py")


def train_step(
    model: nn.Module,
    batch: Int[Tensor, "batch pos"],
    optimizer: torch.optim.Optimizer,
    *,
    lr: float,
    grad_clip: float | None,
) -> float:
    """One optimizer step on `batch`; returns the batch's loss, from before the step.

    In this order:
    1. set the learning rate of every parameter group of `optimizer` to `lr`;
    2. run `model` on `batch` and take this file's `next_token_loss` of the logits;
    3. backpropagate the loss;
    4. clip the gradients: if their global norm (all gradients of the model as one long
       vector) is above `grad_clip`, scale them all down to norm `grad_clip`; `None` or
       0 means no clipping;
    5. take the optimizer's step;
    6. zero the gradients, so that none are left behind for the next step.

    Returns the loss as a Python float (not a tensor).
    """
    raise NotImplementedError("train_step: write it in gpt2_course/exercises/training.py")
