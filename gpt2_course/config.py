"""The model's hyperparameters, with GPT-2 small as the default."""

from dataclasses import dataclass
from typing import Any


@dataclass
class TransformerConfig:
    d_model: int = 768
    debug: bool = False
    layer_norm_eps: float = 1e-5
    d_vocab: int = 50257
    init_range: float = 0.02
    n_ctx: int = 1024
    d_head: int = 64
    d_mlp: int = 3072
    n_heads: int = 12
    n_layers: int = 12


def hf_config(cfg: TransformerConfig, **overrides: Any) -> Any:
    """Hugging Face's `GPT2Config` with the shapes of `cfg` (and any other field given)."""
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_mlp,
        vocab_size=cfg.d_vocab,
        n_positions=cfg.n_ctx,
        layer_norm_epsilon=cfg.layer_norm_eps,
        **overrides,
    )
