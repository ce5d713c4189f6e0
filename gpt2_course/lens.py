"""Your model in TransformerLens (notebook 09).

`bridge_for(model)` hands the model's weights, through your `to_hf_state_dict`, to a
Hugging Face GPT-2 and wraps that in a TransformerLens 4 `TransformerBridge`: then
`run_with_cache`, `run_with_hooks` and the `ActivationCache` tools work on the model
you built and trained.

`HookedGPT` is a small stand-in written on torch alone, with the same hook names
(`blocks.{l}.attn.hook_z`, `hook_pattern`, ...) and the same `run_with_hooks`: the
check of `ablate_head` runs the learner's code on it, since the grader's runner may
not import TransformerLens. Its logits equal the bridge's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_course import parts

if TYPE_CHECKING:  # TransformerLens costs seconds to import: only where a bridge is built
    from transformer_lens.model_bridge import TransformerBridge

# Logits of a bridge and of the model it was built from agree to float32 rounding
# (about 1e-6); a wrong weight moves them by far more.
BRIDGE_ATOL = 1e-4
BRIDGE_RTOL = 1e-3


def _hf_gpt2(cfg: Any) -> nn.Module:
    """A Hugging Face GPT-2 of `cfg`'s shape whose lm_head is its own and has a bias."""
    from transformers import GPT2LMHeadModel

    from gpt2_course.config import hf_config

    special = dict.fromkeys(["bos_token_id", "eos_token_id"], cfg.d_vocab - 1)  # in the vocab
    config = hf_config(
        cfg,
        activation_function="gelu_new",
        tie_word_embeddings=False,
        attn_implementation="eager",  # materialises the pattern that hook_pattern shows
        **special,
    )
    with torch.random.fork_rng(devices=[]):  # every weight is overwritten by the load
        hf_model = GPT2LMHeadModel(config)
        # the course's unembedding has a bias (b_U); GPT-2's lm_head has none
        hf_model.lm_head = nn.Linear(cfg.d_model, cfg.d_vocab, bias=True)
    return hf_model.eval()


def bridge_for(
    model: nn.Module, to_hf_state_dict: Callable[[nn.Module], dict[str, Tensor]] | None = None
) -> TransformerBridge:
    """A TransformerLens bridge around a Hugging Face GPT-2 holding `model`'s weights.

    The weights cross with `to_hf_state_dict` (yours, through `gpt2_course.parts`, unless
    another is given). The bridge's logits are compared with `model(tokens)` on a few
    random tokens before it is returned: a wrong mapping is reported here, not later.
    """
    from gpt2_course import reference
    from gpt2_course.tokenizer import get_tokenizer

    cfg = model.cfg
    if cfg.n_heads * cfg.d_head != cfg.d_model:
        raise ValueError(
            f"Hugging Face's GPT-2 needs n_heads * d_head == d_model, but this model has "
            f"n_heads={cfg.n_heads}, d_head={cfg.d_head}, d_model={cfg.d_model}: it cannot be "
            "wrapped in a TransformerBridge"
        )
    convert = to_hf_state_dict or parts.get("inside.to_hf_state_dict")
    state_dict = convert(model)
    if not isinstance(state_dict, dict):
        raise TypeError(
            f"to_hf_state_dict returned {type(state_dict).__name__}, expected a dict of "
            "Hugging Face names to tensors"
        )
    device = next(model.parameters()).device
    hf_model = _hf_gpt2(cfg)
    try:
        hf_model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(
            "the state dict from to_hf_state_dict does not load into Hugging Face's "
            f"GPT2LMHeadModel:\n{error}"
        ) from error
    bridge = reference._boot_bridge(hf_model.to(device), get_tokenizer())
    tokens = torch.randint(
        0, cfg.d_vocab, (2, min(cfg.n_ctx, 8)), generator=torch.Generator().manual_seed(9)
    ).to(device)
    with torch.no_grad():
        want, got = model(tokens), bridge(tokens)
    if not torch.allclose(got.to(want), want, atol=BRIDGE_ATOL, rtol=BRIDGE_RTOL):
        worst = float((got.to(want) - want).abs().max())
        raise ValueError(
            "the bridge's logits are not your model's (largest difference "
            f"{worst:.3g}): to_hf_state_dict maps some weight to the wrong place or layout. "
            'Try check("inside.to_hf_state_dict").'
        )
    return bridge


# --------------------------------------------------------------------------- the stand-in


class HookPoint(nn.Module):
    """An identity that calls its hooks as TransformerLens does: `hook(x, hook=self)`,
    whose return value (when not None) replaces x."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fns: list[Callable[..., Any]] = []

    def add_hook(self, hook: Callable[..., Any], dir: str = "fwd", **_: Any) -> None:
        if dir != "fwd":
            raise ValueError("this stand-in model takes forward hooks only")
        self.fns.append(hook)

    def remove_hooks(self, *_: Any, **__: Any) -> None:
        self.fns.clear()

    def forward(self, x: Tensor) -> Tensor:
        for fn in list(self.fns):
            replaced = fn(x, hook=self)
            if replaced is not None:
                x = replaced
        return x


class _Attention(nn.Module):
    def __init__(self, prefix: str):
        super().__init__()
        self.hook_pattern = HookPoint(prefix + "attn.hook_pattern")
        self.hook_z = HookPoint(prefix + "attn.hook_z")


class _Block(nn.Module):
    def __init__(self, layer: int):
        super().__init__()
        prefix = f"blocks.{layer}."
        self.hook_resid_pre = HookPoint(prefix + "hook_resid_pre")
        self.attn = _Attention(prefix)
        self.hook_resid_post = HookPoint(prefix + "hook_resid_post")


class HookedGPT(nn.Module):
    """A course model (TransformerLens parameter names) run with TransformerLens's hook
    names and `run_with_hooks`, on torch alone. It reads the model's parameters; it never
    calls the model's own modules."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.blocks = nn.ModuleList(_Block(layer) for layer in range(self.cfg.n_layers))

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        return {m.name: m for m in self.modules() if isinstance(m, HookPoint)}

    def _norm(self, x: Tensor, ln: nn.Module) -> Tensor:
        return F.layer_norm(x, ln.w.shape, ln.w, ln.b, self.cfg.layer_norm_eps)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        m, pos = self.model, tokens.shape[-1]
        x = m.embed.W_E[tokens] + m.pos_embed.W_pos[:pos]
        future = torch.ones(pos, pos, dtype=torch.bool, device=tokens.device).triu(1)
        for hooks, block in zip(self.blocks, m.blocks, strict=True):
            x = hooks.hook_resid_pre(x)
            h, a = self._norm(x, block.ln1), block.attn
            q, k, v = (
                einops.einsum(h, W, "b p d, n d e -> b p n e") + bias
                for W, bias in ((a.W_Q, a.b_Q), (a.W_K, a.b_K), (a.W_V, a.b_V))
            )
            scores = einops.einsum(q, k, "b q n e, b k n e -> b n q k") / math.sqrt(self.cfg.d_head)
            pattern = hooks.attn.hook_pattern(scores.masked_fill(future, -math.inf).softmax(-1))
            z = hooks.attn.hook_z(einops.einsum(pattern, v, "b n q k, b k n e -> b q n e"))
            x = x + einops.einsum(z, a.W_O, "b q n e, n e d -> b q d") + a.b_O
            h, mlp = self._norm(x, block.ln2), block.mlp
            hidden = F.gelu(h @ mlp.W_in + mlp.b_in, approximate="tanh")
            x = hooks.hook_resid_post(x + hidden @ mlp.W_out + mlp.b_out)
        return self._norm(x, m.ln_final) @ m.unembed.W_U + m.unembed.b_U

    def _points(self, name: str | Callable[[str], bool]) -> list[HookPoint]:
        points = self.hook_dict
        if callable(name):
            return [point for key, point in points.items() if name(key)]
        if name not in points:
            raise ValueError(f"no hook named {name!r}; this model has {', '.join(points)}")
        return [points[name]]

    def add_hook(self, name: str | Callable[[str], bool], hook: Callable, dir: str = "fwd") -> None:
        for point in self._points(name):
            point.add_hook(hook, dir=dir)

    def reset_hooks(self, *_: Any, **__: Any) -> None:
        for point in self.hook_dict.values():
            point.remove_hooks()

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Iterable[tuple[Any, Callable]] = (),
        bwd_hooks: Iterable[tuple[Any, Callable]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedGPT]:
        if list(bwd_hooks):
            raise ValueError("this stand-in model takes forward hooks only")
        try:
            for name, hook in fwd_hooks:
                self.add_hook(name, hook)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks()

    def run_with_hooks(
        self,
        input: Int[Tensor, "batch pos"],
        fwd_hooks: Iterable[tuple[Any, Callable]] = (),
        bwd_hooks: Iterable[tuple[Any, Callable]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        return_type: str | None = "logits",
        **_: Any,
    ) -> Tensor | None:
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            logits = self(input)
        return logits if return_type == "logits" else None


# --------------------------------------------------------------------------- the course model


@torch.no_grad()
def course_cache(model: nn.Module, tokens: Int[Tensor, "batch pos"]) -> dict[str, Tensor]:
    """The residual stream of a course `Transformer` under TransformerLens's names.

    `blocks.{l}.hook_resid_pre` (what enters block l) for every layer and
    `blocks.{n_layers - 1}.hook_resid_post` (what leaves the last), caught with forward
    hooks on the blocks: enough for a logit lens, with no bridge (notebook 05).
    """
    cache: dict[str, Tensor] = {}

    def keep_input(name: str) -> Callable[..., None]:
        return lambda _module, args: cache.__setitem__(name, args[0].detach())

    def keep_output(name: str) -> Callable[..., None]:
        return lambda _module, _args, output: cache.__setitem__(name, output.detach())

    last = len(model.blocks) - 1
    handles = [
        block.register_forward_pre_hook(keep_input(f"blocks.{layer}.hook_resid_pre"))
        for layer, block in enumerate(model.blocks)
    ]
    handles.append(
        model.blocks[last].register_forward_hook(keep_output(f"blocks.{last}.hook_resid_post"))
    )
    try:
        model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return cache
