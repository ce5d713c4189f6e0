"""Clear errors for prompts that generation cannot work with (written for you).

`generate` and `beam_search`, yours (gpt2_course/exercises/sampling.py) and the
reference ones (solutions/sampling.py), start with `check_prompt`.
"""

import torch
from torch import Tensor, nn


def check_prompt(tokens: Tensor, max_new_tokens: int, model: nn.Module) -> None:
    """Raise a ValueError that says what is wrong with `tokens` or `max_new_tokens`."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(
            "tokens must be a LongTensor of shape [batch, seq], e.g. reference.to_tokens(text)"
        )
    if tokens.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)  # the context window, if known
    if n_ctx is not None and tokens.shape[1] + max_new_tokens > n_ctx:
        raise ValueError(
            f"the context would be exceeded: {tokens.shape[1]} prompt tokens + {max_new_tokens} "
            f"new tokens > n_ctx={n_ctx}, the most positions the model has embeddings for"
        )
