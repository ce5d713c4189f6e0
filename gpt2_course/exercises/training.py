"""Notebook 06: the loss, the optimizer and the learning-rate schedule of a training run.

Keep the names and signatures: the trainer (`gpt2-course train`) calls these three
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

    Weight decay `weight_decay` goes on the parameters with 2 or more dimensions (the
    weight matrices and embeddings); the others (biases, LayerNorm's w and b) get 0.
    Give AdamW two parameter groups, each a dict with "params" and "weight_decay".
    """
    raise NotImplementedError("configure_optimizer: write it in gpt2_course/exercises/training.py")


def lr_at_step(
    step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """The learning rate to use at `step` (counting from 0), as a float.

    * warmup, 0 <= step < warmup_steps: rises linearly from 0 (at step 0) towards max_lr;
    * decay, warmup_steps <= step <= total_steps: half a cosine from max_lr (at
      step = warmup_steps) down to min_lr (at step = total_steps);
    * after total_steps: stays at min_lr.
    """
    raise NotImplementedError("lr_at_step: write it in gpt2_course/exercises/training.py")
