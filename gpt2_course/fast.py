"""The fast path for training at scale: fused attention, GPT-2's weight tying and its init.

The course's `MultiHeadAttention` spells attention out (einsum, an explicit mask) so that it
can be read and checked; it stays the teaching path. To train a GPT-2 at real size,
`use_fast_attention(model)` replaces, on each attention module (undone by
`use_einsum_attention`), its forward with one that computes the same thing from the same
parameters: one fused QKV product and torch's `scaled_dot_product_attention` (a flash or
memory-efficient kernel on a GPU). The parameters do not change, so the state_dict,
checkpoints, the optimizer and the gradients are those of the einsum model. Before
swapping it checks, on random inputs, that the module's own forward is causal softmax
attention: a fast path over a wrong attention would hide the mistake.

Two of GPT-2's choices the course's model leaves out, for training from scratch:

- `tie_weights(model)`: the unembedding is the embedding transposed (W_U = W_E^T);
- `scale_residual_init(model)`: the weights that write into the residual stream start
  1/sqrt(2 * n_layers) smaller, so the stream does not grow with depth.
"""

import copy
from functools import partial
from typing import Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn


class FastPathError(RuntimeError):
    """A fast path or a GPT-2 training option cannot be applied; the message says why."""


# ------------------------------------------------------------------ fused attention

# The contract's attention parameters (TransformerLens's names and layout).
ATTENTION_PARAMETERS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")
CHECK_COMMAND = "gpt2-course check attention.MultiHeadAttention"


def fast_attention(
    attn: nn.Module, x: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "batch pos d_model"]:
    """Causal multi-head attention with `attn`'s parameters, on torch's fused kernel."""
    heads = attn.W_Q.shape[0]
    # Q, K and V of every head side by side: one matrix product instead of three.
    W_QKV = einops.rearrange(
        [attn.W_Q, attn.W_K, attn.W_V], "qkv heads d_model d_head -> (qkv heads d_head) d_model"
    )
    b_QKV = einops.rearrange(
        [attn.b_Q, attn.b_K, attn.b_V], "qkv heads d_head -> (qkv heads d_head)"
    )
    qkv = F.linear(x, W_QKV, b_QKV)
    q, k, v = einops.rearrange(
        qkv, "batch pos (qkv heads d_head) -> qkv batch heads pos d_head", qkv=3, heads=heads
    )
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scales by 1/sqrt(d_head)
    z = einops.rearrange(z, "batch heads pos d_head -> batch pos (heads d_head)")
    W_O = einops.rearrange(attn.W_O, "heads d_head d_model -> (heads d_head) d_model")
    return F.linear(z, W_O.T, attn.b_O)  # every head writes through its slice of W_O, summed


class _FastForward:
    """The forward put on one attention module; keeps whatever instance forward it replaced.

    A plain object rather than a closure, so that a deep copy (or a pickle) of the model
    carries a fast forward bound to the copy's own parameters.
    """

    def __init__(self, attn: nn.Module, replaced: Any) -> None:
        self.attn = attn
        self.replaced = replaced  # an instance forward set before ours (rare), else None

    def __call__(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return fast_attention(self.attn, x)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module of `model` (itself included) holding the contract's
    attention parameters."""
    found = []
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if all(p in own for p in ATTENTION_PARAMETERS):
            found.append((name, module))
    return found


def _describe(name: str, attn: nn.Module) -> str:
    where = f"{type(attn).__module__.replace('.', '/')}.py"
    return f"{type(attn).__name__} ({name or 'the model itself'}, from {where})"


def _check_shapes(name: str, attn: nn.Module) -> None:
    if attn.W_Q.dim() != 3:
        raise FastPathError(
            f"{_describe(name, attn)}: W_Q has shape {list(attn.W_Q.shape)}; the fast path needs "
            "the contract's [n_heads, d_model, d_head]"
        )
    heads, d_model, d_head = attn.W_Q.shape
    expected = {
        **{w: (heads, d_model, d_head) for w in ("W_Q", "W_K", "W_V")},
        "W_O": (heads, d_head, d_model),
        **{b: (heads, d_head) for b in ("b_Q", "b_K", "b_V")},
        "b_O": (d_model,),
    }
    for param, shape in expected.items():
        actual = tuple(getattr(attn, param).shape)
        if actual != shape:
            raise FastPathError(
                f"{_describe(name, attn)}: {param} has shape {list(actual)}, the contract's is "
                f"{list(shape)} (n_heads={heads}, d_model={d_model}, d_head={d_head}). "
                "Keep the parameters of the exercise stub."
            )


def _randomize(probe: nn.Module, generator: torch.Generator) -> None:
    """Weights that make attention scores of order 1, so that every mistake shows."""
    heads, d_model, d_head = probe.W_Q.shape
    with torch.no_grad():
        for param in ATTENTION_PARAMETERS:
            value = getattr(probe, param)
            fan_in = heads * d_head if param == "W_O" else d_model
            std = fan_in**-0.5 if param.startswith("W") else 0.3
            value.copy_(torch.randn(value.shape, generator=generator, dtype=value.dtype) * std)


def check_attention(attn: nn.Module, name: str = "") -> None:
    """Refuse (FastPathError) unless `attn`'s own forward computes causal softmax attention.

    Runs on a float64 copy on the CPU with random weights and inputs (float32 where the
    module's code does not run in float64), from a private random generator: the model,
    its weights and the global random state are untouched.
    """
    what = _describe(name, attn)
    heads, d_model, d_head = attn.W_Q.shape
    n_ctx = getattr(getattr(attn, "cfg", None), "n_ctx", 7)
    pos = max(1, min(7, n_ctx))
    try:
        probe = copy.deepcopy(attn).eval()
    except Exception as error:
        raise FastPathError(
            f"{what} cannot be copied to check it ({type(error).__name__}: {error}). "
            "use_fast_attention(model, check=False) swaps without the check."
        ) from None
    failure = None
    for dtype in (torch.float64, torch.float32):
        generator = torch.Generator().manual_seed(0)
        try:
            probe.to("cpu", dtype)
            _randomize(probe, generator)
            x = torch.randn(2, pos, d_model, generator=generator, dtype=dtype)
            # a caller's autocast must not lower the float32 try to bf16
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                expected = fast_attention(probe, x)
                got = probe.forward(x.clone())  # its own forward, without the module's hooks
        except Exception as error:  # e.g. code that only runs in float32: try that next
            failure = f"{type(error).__name__}: {error}"
            continue
        break
    else:
        raise FastPathError(
            f"{what}: its forward fails ({failure}), so it cannot be checked against causal "
            f"softmax attention, and the fast path would hide that. Run `{CHECK_COMMAND}`."
        )
    if not isinstance(got, Tensor) or got.shape != expected.shape:
        shape = list(got.shape) if isinstance(got, Tensor) else type(got).__name__
        raise FastPathError(
            f"{what} returns {shape} for an input of shape {list(x.shape)}; causal attention "
            f"returns {list(expected.shape)}. The fast path would hide that: run `{CHECK_COMMAND}`."
        )
    # relative; float64 leaves room for a constant computed in float32 (a scale, say),
    # while every mistake of the course's mistake library moves outputs by far more
    tolerance = 1e-6 if got.dtype == torch.float64 else 1e-4
    gap = (got.to(dtype) - expected).abs().max().item()
    size = expected.abs().max().item()
    if gap <= tolerance * max(size, 1.0):  # False for NaN too
        return
    if gap != gap:  # NaN
        how = (
            "gives NaN where causal softmax attention gives numbers (from the mask, most often: "
            "a query left with no key, 0 * -inf, or -inf after the softmax)"
        )
    else:
        how = f"differs by up to {gap:.3g} (outputs of size {size:.3g}) on random inputs"
    raise FastPathError(
        f"{what} does not match causal softmax attention: its output {how}. The fast path "
        "computes correct attention and would hide this mistake. Find it with "
        f"`{CHECK_COMMAND}`; use_fast_attention(model, check=False) swaps anyway."
    )


def use_fast_attention(model: nn.Module, *, check: bool = True) -> nn.Module:
    """Run every attention module of `model` on the fused fast path (in place; returns model).

    With `check`, each attention class is first checked to compute causal softmax
    attention (`check_attention`); nothing is swapped unless all pass. Modules already
    on the fast path are left as they are.
    """
    modules = attention_modules(model)
    if not modules:
        raise FastPathError(
            f"{type(model).__name__} has no attention module (one with parameters "
            f"{', '.join(ATTENTION_PARAMETERS)}): there is nothing to put on the fast path"
        )
    to_swap = [(name, attn) for name, attn in modules if not _is_fast(attn)]
    for name, attn in to_swap:
        _check_shapes(name, attn)
    if check:
        checked: set[type] = set()
        for name, attn in to_swap:
            if type(attn) not in checked:  # the code is what is checked: once per class
                check_attention(attn, name)
                checked.add(type(attn))
    for _, attn in to_swap:
        # an instance attribute wins over the class's forward; deleting it restores that
        attn.forward = _FastForward(attn, attn.__dict__.get("forward"))
    return model


def _is_fast(attn: nn.Module) -> bool:
    return isinstance(attn.__dict__.get("forward"), _FastForward)


def use_einsum_attention(model: nn.Module) -> nn.Module:
    """Put every attention module of `model` back on its own forward (in place; returns model)."""
    for _, attn in attention_modules(model):
        fast = attn.__dict__.get("forward")
        if isinstance(fast, _FastForward):
            del attn.forward
            if fast.replaced is not None:
                attn.forward = fast.replaced
    return model


def has_fast_attention(model: nn.Module) -> bool:
    """Whether `model` has attention modules and every one runs on the fast path."""
    modules = attention_modules(model)
    return bool(modules) and all(_is_fast(attn) for _, attn in modules)


# ------------------------------------------------------------------ tied embeddings


class _Tie:
    """Makes `unembed.W_U` read `embed.W_E` transposed, by hooks on the model and its unembedding.

    - during every forward, `unembed.W_U` is a fresh view `embed.W_E.T`, so the learner's
      Unembedding runs unchanged and its gradient lands in W_E (outside a forward, the
      same view without autograd);
    - `state_dict()` still holds `unembed.W_U` (a copy of W_E^T), so a tied model's
      checkpoint has the same names as an untied one and loads into either;
    - `load_state_dict` drops `unembed.W_U` after checking that it is W_E^T.
    """

    def __init__(self, embed: nn.Module, after_W_U: list[str]) -> None:
        self.embed = embed
        self.after_W_U = after_W_U  # the unembedding's state_dict names that follow W_U

    def attach(self, unembed: nn.Module, *args: Any) -> None:
        unembed.W_U = self.embed.W_E.T  # a plain attribute: a view, not a Parameter

    def detach(self, unembed: nn.Module, *args: Any) -> None:
        # between forwards, a view outside autograd: a model holding a tensor that has a
        # grad_fn could not be deep-copied
        unembed.W_U = self.embed.W_E.detach().T

    def add_to_state_dict(
        self, unembed: nn.Module, state_dict: dict, prefix: str, *args: Any
    ) -> None:
        # a copy: safetensors refuses two names for one storage
        state_dict[prefix + "W_U"] = self.embed.W_E.detach().T.contiguous()
        for name in self.after_W_U:  # back in the untied model's order
            if prefix + name in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + name)

    def check_loaded(self, model: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        # on the whole model, so that it runs before any of its parts loads anything
        W_U = state_dict.pop(prefix + "unembed.W_U", None)
        if W_U is None:
            return
        W_E = state_dict.get(prefix + "embed.W_E", self.embed.W_E).detach()
        if tuple(W_U.shape) != tuple(W_E.T.shape) or not torch.equal(
            W_U.to(W_E.device, W_E.dtype), W_E.T
        ):
            raise FastPathError(
                f"the state dict's {prefix}unembed.W_U is not {prefix}embed.W_E transposed: it "
                "comes from a model whose unembedding was not tied. Load it into a model without "
                "tie_weights, or load it first and tie afterwards (the unembedding becomes W_E^T)."
            )


def tie_weights(model: nn.Module) -> nn.Module:
    """Tie `model.unembed`'s W_U to `model.embed`'s W_E (W_U = W_E^T), as GPT-2 does.

    Call it right after building the model (or after loading GPT-2's weights, whose W_U
    is W_E^T already) and before making the optimizer: `unembed.W_U` stops being a
    parameter (its values are dropped), so `model.parameters()` has d_vocab * d_model
    fewer numbers. One Parameter, W_E, serves both uses; its gradient is the sum of both.

    The state_dict keeps its names: `unembed.W_U` is written as a copy of W_E^T, and on
    loading it is checked to be W_E^T and dropped. So a tied model's checkpoint loads
    into a tied model (build, tie, load) and into an untied one (whose W_U is then a
    copy), while an untied checkpoint is refused by a tied model. `model.unembed.W_U` is
    a view of W_E^T renewed at every forward (after `model.to(...)`, read it after one).
    """
    embed, unembed = getattr(model, "embed", None), getattr(model, "unembed", None)
    W_E = getattr(embed, "W_E", None)
    if isinstance(getattr(unembed, "weight_tie", None), _Tie):
        return model  # tied already
    is_module = isinstance(unembed, nn.Module)
    W_U = dict(unembed.named_parameters(recurse=False)).get("W_U") if is_module else None
    if not isinstance(W_E, nn.Parameter) or W_U is None:
        raise FastPathError(
            f"{type(model).__name__} needs `embed` with a parameter W_E and `unembed` with a "
            "parameter W_U (the contract's names) to tie them"
        )
    if W_U.shape != W_E.T.shape:
        raise FastPathError(
            f"unembed.W_U has shape {list(W_U.shape)} and embed.W_E {list(W_E.shape)}: "
            "W_U must be [d_model, d_vocab] and W_E [d_vocab, d_model] to tie them"
        )
    names = list(unembed.state_dict())
    tie = _Tie(embed, after_W_U=names[names.index("W_U") + 1 :])
    del unembed.W_U
    unembed.weight_tie = tie
    tie.detach(unembed)
    # partials: torch marks a state-dict hook with an attribute, which a method cannot take
    unembed.register_forward_pre_hook(partial(tie.attach))
    unembed.register_forward_hook(partial(tie.detach), always_call=True)
    unembed.register_state_dict_post_hook(partial(tie.add_to_state_dict))
    model.register_load_state_dict_pre_hook(partial(tie.check_loaded))
    return model


def has_tied_weights(model: nn.Module) -> bool:
    """Whether `tie_weights` tied `model`'s unembedding to its embedding."""
    return isinstance(getattr(getattr(model, "unembed", None), "weight_tie", None), _Tie)


# ------------------------------------------------------------------ GPT-2's initialisation


def scale_residual_init(model: nn.Module) -> nn.Module:
    """Shrink the weights that write into the residual stream by 1/sqrt(2 * n_layers).

    Each block adds two outputs to the residual stream (attention's, through W_O, and the
    MLP's, through W_out); with N(0, 0.02) weights the stream's variance grows with the
    number of additions, 2 * n_layers. GPT-2 starts those two weights smaller to keep it
    level. Call once, right after building (random init), never on trained weights.
    """
    blocks = getattr(model, "blocks", None)
    if getattr(model, "residual_init_scaled", False):
        raise FastPathError("scale_residual_init was applied to this model already")
    if not blocks:
        raise FastPathError(f"{type(model).__name__} has no `blocks`: nothing to scale")
    factor = (2 * len(blocks)) ** -0.5
    for i, block in enumerate(blocks):
        for sub, weight in (("attn", "W_O"), ("mlp", "W_out")):
            if not isinstance(getattr(getattr(block, sub, None), weight, None), Tensor):
                raise FastPathError(f"blocks.{i}.{sub} has no parameter {weight} to scale")
    with torch.no_grad():
        for block in blocks:
            block.attn.W_O.mul_(factor)
            block.mlp.W_out.mul_(factor)
    model.residual_init_scaled = True
    return model
