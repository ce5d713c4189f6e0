"""The fast path for training at scale: torch's fused kernels, GPT-2's weight tying and its init.

The course's components spell their computation out (einsum, an explicit mask, LayerNorm's
formula) so that it can be read and checked; they stay the teaching path. To train a GPT-2
at real size, `use_fast_kernels(model)` replaces, on every module it recognises by the
contract's parameters, its forward with one that computes the same thing from the same
parameters on torch's own kernels (undone by `use_own_forwards`):

- attention: one fused QKV product and `scaled_dot_product_attention` (a flash or
  memory-efficient kernel on a GPU); `use_fast_attention(model)` swaps attention alone;
- LayerNorm: `F.layer_norm`; the MLP: two `addmm`s (bias included) around the tanh GELU;
- the unembedding: one `addmm`; on a tied model with W_E itself, so that W_E's gradient
  is computed in W_E's own layout rather than computed for W_U and added in transposed.

The parameters do not change, so the state_dict, checkpoints, the optimizer and the
gradients are those of the course's model, to float rounding. Before swapping, each
module's own forward is checked against its kernel on random inputs (in float64): a fast
path over a wrong component would hide the mistake. Nothing is swapped unless all pass.

Two of GPT-2's choices the course's model leaves out, for training from scratch:

- `tie_weights(model)`: the unembedding is the embedding transposed (W_U = W_E^T);
- `scale_residual_init(model)`: the weights that write into the residual stream start
  1/sqrt(2 * n_layers) smaller, so the stream does not grow with depth.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn


class FastPathError(RuntimeError):
    """A fast path or a GPT-2 training option cannot be applied; the message says why."""


# ------------------------------------------------------------------ the kernels


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


def fast_layer_norm(
    ln: nn.Module, x: Float[Tensor, "batch pos d_model"], eps: float
) -> Float[Tensor, "batch pos d_model"]:
    """GPT-2's LayerNorm with `ln`'s w and b: biased variance, eps inside the square root."""
    return F.layer_norm(x, ln.w.shape, ln.w, ln.b, eps)


# F.linear(x, W.T, b) on a contiguous input is torch.addmm(b, rows of x, W): the bias added
# inside the product, and W's gradient computed in W's own [d_in, d_out] layout (Conv1D's).


def fast_mlp(
    mlp: nn.Module, x: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "batch pos d_model"]:
    """GPT-2's MLP with `mlp`'s parameters: x @ W_in + b_in, the tanh GELU, @ W_out + b_out."""
    pre = F.linear(x, mlp.W_in.T, mlp.b_in)
    return F.linear(F.gelu(pre, approximate="tanh"), mlp.W_out.T, mlp.b_out)


def fast_unembedding(
    unembed: nn.Module, x: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "batch pos d_vocab"]:
    """x @ W_U + b_U; on a tied unembedding x @ W_E^T + b_U with W_E as it is stored."""
    tie = unembed.__dict__.get("weight_tie")
    if isinstance(tie, _Tie):
        # nn.Linear's layout: W_E's gradient is computed as [d_vocab, d_model] directly
        return F.linear(x, tie.embed.W_E, unembed.b_U)
    return F.linear(x, unembed.W_U.T, unembed.b_U)


# ------------------------------------------------------------------ the components they replace


@dataclass(frozen=True, eq=False)  # each one is itself: compared and hashed by identity
class Component:
    """One of the course's components as the fast path sees it."""

    check_id: str  # the course's check for it, which every refusal names
    computes: str  # what its kernel computes, in words ({eps} filled in for LayerNorm)
    layout: dict[str, tuple[str, ...]]  # the contract's parameters and their axes
    kernel: Callable[..., Tensor]  # (module, x, **settings) -> output
    randomize: Callable[[nn.Module, dict[str, int], torch.Generator], None]  # a probe's weights
    probe_input: Callable[[dict[str, int], int, torch.dtype, torch.Generator], Tensor]
    nan_hint: str = ""  # where a NaN comes from, most often

    @property
    def command(self) -> str:
        return f"gpt2-course check {self.check_id}"


def _draw(
    probe: nn.Module,
    name: str,
    shape: tuple[int, ...],
    std: float,
    g: torch.Generator,
    mean: float = 0.0,
) -> None:
    """Fill the probe's parameter `name` with N(mean, std) values of the probe's dtype."""
    param = dict(probe.named_parameters(recurse=False)).get(name)
    dtype = param.dtype if param is not None else next(probe.parameters()).dtype
    value = torch.randn(shape, generator=g, dtype=dtype) * std + mean
    if param is not None:
        with torch.no_grad():
            param.copy_(value)  # in place: the forward may hold the parameter elsewhere too
    else:  # a tied unembedding's W_U, a plain view of W_E^T: the probe gets its own
        setattr(probe, name, nn.Parameter(value))


def _randomize_attention(probe: nn.Module, sizes: dict[str, int], g: torch.Generator) -> None:
    """Weights that make attention scores of order 1, so that every mistake shows."""
    for param, axes in ATTENTION_LAYOUT.items():
        fan_in = sizes["n_heads"] * sizes["d_head"] if param == "W_O" else sizes["d_model"]
        std = fan_in**-0.5 if param.startswith("W") else 0.3
        _draw(probe, param, tuple(sizes[a] for a in axes), std, g)


def _randomize_layer_norm(probe: nn.Module, sizes: dict[str, int], g: torch.Generator) -> None:
    _draw(probe, "w", (sizes["d_model"],), 0.5, g, mean=1.0)  # a forgotten w shows
    _draw(probe, "b", (sizes["d_model"],), 0.3, g)


def _randomize_mlp(probe: nn.Module, sizes: dict[str, int], g: torch.Generator) -> None:
    d_model, d_mlp = sizes["d_model"], sizes["d_mlp"]
    # pre-activations of order 1-3, where the tanh GELU and the others part most
    _draw(probe, "W_in", (d_model, d_mlp), 1.5 * d_model**-0.5, g)
    _draw(probe, "b_in", (d_mlp,), 0.5, g)
    _draw(probe, "W_out", (d_mlp, d_model), d_mlp**-0.5, g)
    _draw(probe, "b_out", (d_model,), 0.3, g)


def _randomize_unembedding(probe: nn.Module, sizes: dict[str, int], g: torch.Generator) -> None:
    # the check runs the class's code on W_U itself: a tied probe lets go of W_E
    probe.__dict__.pop("weight_tie", None)
    _draw(probe, "W_U", (sizes["d_model"], sizes["d_vocab"]), sizes["d_model"] ** -0.5, g)
    _draw(probe, "b_U", (sizes["d_vocab"],), 0.3, g)


def _residual_input(
    sizes: dict[str, int], pos: int, dtype: torch.dtype, g: torch.Generator
) -> Float[Tensor, "batch pos d_model"]:
    return torch.randn(2, pos, sizes["d_model"], generator=g, dtype=dtype)


def _spread_input(
    sizes: dict[str, int], pos: int, dtype: torch.dtype, g: torch.Generator
) -> Float[Tensor, "batch pos d_model"]:
    """Residual vectors of every size from 1e-3 to 10, each around its own mean: tiny ones
    make epsilon matter (how and where it is added), the means make centring matter."""
    x = _residual_input(sizes, pos, dtype, g)
    sizes_in_order = torch.logspace(-3, 1, x.shape[0] * pos, dtype=dtype)
    shuffled = sizes_in_order[torch.randperm(x.shape[0] * pos, generator=g)]
    scale = einops.rearrange(shuffled, "(batch pos) -> batch pos 1", pos=pos)
    mean = torch.randn(x.shape[0], pos, 1, generator=g, dtype=dtype)
    return (x + mean) * scale


def _mlp_input(
    sizes: dict[str, int], pos: int, dtype: torch.dtype, g: torch.Generator
) -> Float[Tensor, "batch pos d_model"]:
    """Residual vectors of order 1, and one 20 times larger: pre-activations of order 30,
    where a GELU written with exp overflows."""
    x = _residual_input(sizes, pos, dtype, g)
    x[-1, -1] *= 20
    return x


ATTENTION_LAYOUT = {
    **{w: ("n_heads", "d_model", "d_head") for w in ("W_Q", "W_K", "W_V")},
    "W_O": ("n_heads", "d_head", "d_model"),
    **{b: ("n_heads", "d_head") for b in ("b_Q", "b_K", "b_V")},
    "b_O": ("d_model",),
}
ATTENTION = Component(
    check_id="attention.MultiHeadAttention",
    computes="causal softmax attention",
    layout=ATTENTION_LAYOUT,
    kernel=fast_attention,
    randomize=_randomize_attention,
    probe_input=_residual_input,
    nan_hint=(
        " (from the mask, most often: a query left with no key, 0 * -inf, or -inf after the "
        "softmax)"
    ),
)
MLP = Component(
    check_id="mlp.MLP",
    computes="GPT-2's MLP (x @ W_in + b_in, the tanh GELU, then @ W_out + b_out)",
    layout={
        "W_in": ("d_model", "d_mlp"),
        "b_in": ("d_mlp",),
        "W_out": ("d_mlp", "d_model"),
        "b_out": ("d_model",),
    },
    kernel=fast_mlp,
    randomize=_randomize_mlp,
    probe_input=_mlp_input,
    nan_hint=" (tanh written with exp overflows to inf / inf for large inputs)",
)
UNEMBEDDING = Component(
    check_id="embeddings.Unembedding",
    computes="the unembedding (logits x @ W_U + b_U)",
    layout={"W_U": ("d_model", "d_vocab"), "b_U": ("d_vocab",)},
    kernel=fast_unembedding,
    randomize=_randomize_unembedding,
    probe_input=_residual_input,
)
LAYER_NORM = Component(
    check_id="layernorm.LayerNorm",
    computes=(
        "GPT-2's LayerNorm (mean and biased variance over d_model, eps = {eps:g} inside the "
        "square root, then * w + b)"
    ),
    layout={"w": ("d_model",), "b": ("d_model",)},
    kernel=fast_layer_norm,
    randomize=_randomize_layer_norm,
    probe_input=_spread_input,
)
# in the order they are recognised: a module is the first whose parameters it all holds
COMPONENTS = (ATTENTION, MLP, UNEMBEDDING, LAYER_NORM)

# kept for use_fast_attention's callers
ATTENTION_PARAMETERS = tuple(ATTENTION_LAYOUT)
CHECK_COMMAND = ATTENTION.command


def _contract_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The module's own parameters by name; for a tied unembedding also W_U (W_E^T)."""
    own: dict[str, Tensor] = dict(module.named_parameters(recurse=False))
    tie = module.__dict__.get("weight_tie")
    if isinstance(tie, _Tie):
        own.setdefault("W_U", tie.embed.W_E.T)
    return own


def fast_kernel_modules(model: nn.Module) -> list[tuple[str, nn.Module, Component]]:
    """(name, module, component) for every module of `model` (itself included) that holds
    all the contract's parameters of one component."""
    found = []
    for name, module in model.named_modules():
        own = _contract_tensors(module)
        for component in COMPONENTS:
            if all(param in own for param in component.layout):
                found.append((name, module, component))
                break
    return found


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module of `model` (itself included) holding the contract's
    attention parameters."""
    return [(name, m) for name, m, kind in fast_kernel_modules(model) if kind is ATTENTION]


def _describe(name: str, module: nn.Module) -> str:
    where = f"{type(module).__module__.replace('.', '/')}.py"
    return f"{type(module).__name__} ({name or 'the model itself'}, from {where})"


def _check_shapes(component: Component, name: str, module: nn.Module) -> dict[str, int]:
    """The sizes (d_model, ...) the module's parameters give, all consistent with the
    contract's layout; else FastPathError."""
    sizes: dict[str, int] = {}
    source: dict[str, str] = {}  # the parameter each size was read from
    for param, axes in component.layout.items():
        shape = tuple(_contract_tensors(module)[param].shape)
        if len(shape) != len(axes):
            raise FastPathError(
                f"{_describe(name, module)}: {param} has shape {list(shape)}; the fast path "
                f"needs the contract's [{', '.join(axes)}]"
            )
        for axis, size in zip(axes, shape, strict=True):
            sizes.setdefault(axis, size)
            source.setdefault(axis, param)
        expected = tuple(sizes[axis] for axis in axes)
        if shape != expected:
            known = ", ".join(f"{axis}={size} from {source[axis]}" for axis, size in sizes.items())
            raise FastPathError(
                f"{_describe(name, module)}: {param} has shape {list(shape)}, the contract's "
                f"is {list(expected)} ({known}). Keep the parameters of the exercise stub."
            )
    return sizes


def _settings(component: Component, name: str, module: nn.Module, model: nn.Module) -> dict:
    """What the kernel needs besides the parameters: LayerNorm's epsilon, from the module's
    cfg (else the model's)."""
    if component is not LAYER_NORM:
        return {}
    for owner in (module, model):
        eps = getattr(getattr(owner, "cfg", None), "layer_norm_eps", None)
        if isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0:
            return {"eps": float(eps)}
    raise FastPathError(
        f"{_describe(name, module)}: neither it nor the model has a cfg with layer_norm_eps, "
        "so the fast LayerNorm does not know its epsilon. Keep the exercise stub's self.cfg."
    )


@torch.inference_mode(False)  # called in inference mode, the probe still takes gradients
def _check(
    component: Component,
    module: nn.Module,
    name: str = "",
    settings: dict | None = None,
    via: str = "use_fast_kernels",
) -> None:
    """Refuse (FastPathError) unless `module`'s own forward computes what `component`'s
    kernel computes, with `settings`: the same output in eval and in training mode, and
    the same gradients for its input and its trained parameters.

    Runs on a float64 copy on the CPU with random weights and inputs (float32 where the
    module's code does not run in float64), from a private random generator: the model,
    its weights and the global random state are untouched.
    """
    settings = settings or {}
    what, command = _describe(name, module), component.command
    sizes = _check_shapes(component, name, module)
    computes = component.computes.format(**settings)
    n_ctx = getattr(getattr(module, "cfg", None), "n_ctx", 7)
    pos = max(1, min(7, n_ctx))
    try:
        probe = copy.deepcopy(module)
    except Exception as error:
        raise FastPathError(
            f"{what} cannot be copied to check it ({type(error).__name__}: {error}). "
            f"{via}(model, check=False) swaps without the check."
        ) from None
    failure = None
    for dtype in (torch.float64, torch.float32):
        generator = torch.Generator().manual_seed(0)
        try:
            probe.to("cpu", dtype)
            component.randomize(probe, sizes, generator)
            x = component.probe_input(sizes, pos, dtype, generator)
            # a caller's autocast must not lower the float32 try to bf16, nor its no_grad
            # take the gradients away
            with torch.autocast("cpu", enabled=False), torch.enable_grad():
                with torch.no_grad():
                    expected = component.kernel(probe, x, **settings)
                    evaluated = probe.eval().forward(x.clone())  # without the module's hooks
                # in training mode too, with gradients: the fast path trains, and code that
                # is right only in eval mode, or cuts or scales a gradient, must not slip by
                upstream = torch.randn(expected.shape, generator=generator, dtype=dtype)
                kernel = partial(component.kernel, probe, **settings)
                _, expected_grads = _with_gradients(kernel, probe, x, upstream)
                trained, grads = _with_gradients(probe.train().forward, probe, x, upstream)
        except Exception as error:  # e.g. code that only runs in float32: try that next
            failure = f"{type(error).__name__}: {error}"
            continue
        break
    else:
        raise FastPathError(
            f"{what}: its forward fails ({failure}), so it cannot be checked against "
            f"{computes}, and the fast path would hide that. Run `{command}`."
        )
    for got, mode in zip((evaluated, trained), ("eval", "training"), strict=True):
        if not isinstance(got, Tensor) or got.shape != expected.shape:
            shape = list(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise FastPathError(
                f"{what} returns {shape} for an input of shape {list(x.shape)} (in {mode} "
                f"mode); {computes} returns {list(expected.shape)}. The fast path would hide "
                f"that: run `{command}`."
            )
        # relative; float64 leaves room for a constant computed in float32 (a scale, say),
        # while every mistake of the course's mistake libraries moves outputs by far more
        tolerance = 1e-6 if got.dtype == torch.float64 else 1e-4
        gap = (got.to(dtype) - expected).abs().max().item()
        size = expected.abs().max().item()
        if gap <= tolerance * max(size, 1.0):  # False for NaN too
            continue
        if gap != gap:  # NaN
            how = f"gives NaN where {computes} gives numbers{component.nan_hint}"
        else:
            how = f"differs by up to {gap:.3g} (outputs of size {size:.3g}) on random inputs"
        if mode == "training":
            how += " in training mode (model.train()), and not in eval mode"
        raise FastPathError(
            f"{what} does not match {computes}: its output {how}. The fast path computes it "
            f"correctly and would hide this mistake. Find it with `{command}`; "
            f"{via}(model, check=False) swaps anyway."
        )
    if grads is None:
        raise FastPathError(
            f"{what}: its output carries no gradient (a .detach(), .data, torch.no_grad() or "
            "a tensor rebuilt with torch.tensor(...) in its forward?), so nothing before it "
            f"would train. The fast path's gradient would hide that: run `{command}`."
        )
    tolerance = 1e-6 if dtype == torch.float64 else 1e-4
    for wrt, want in expected_grads.items():
        gap = (grads[wrt].to(dtype) - want).abs().max().item()
        size = want.abs().max().item()
        if not gap <= tolerance * max(size, 1.0):  # False for NaN too
            raise FastPathError(
                f"{what} computes the right output, but its gradient for {wrt} differs by up "
                f"to {gap:.3g} (gradients of size {size:.3g}): something in its forward cuts "
                "or scales the gradient (a .detach() on one path, .data, a custom backward?). "
                f"The fast path's gradient would hide that: run `{command}`."
            )


def _with_gradients(
    forward: Callable[[Tensor], Any], module: nn.Module, x: Tensor, upstream: Tensor
) -> tuple[Any, dict[str, Tensor] | None]:
    """forward(x), and the gradients of (output * upstream).sum() for the input and every
    trained parameter of `module` (zeros for one the output does not reach); None for the
    gradients when the output is not a tensor of upstream's shape with a gradient."""
    x = x.clone().requires_grad_(True)
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    out = forward(x)
    if not isinstance(out, Tensor) or out.shape != upstream.shape or not out.requires_grad:
        return out, None
    grads = torch.autograd.grad((out * upstream).sum(), [x, *params.values()], allow_unused=True)
    names = ["the input", *params]
    return out.detach(), {
        name: torch.zeros_like(ref) if grad is None else grad
        for name, grad, ref in zip(names, grads, [x, *params.values()], strict=True)
    }


def check_attention(attn: nn.Module, name: str = "") -> None:
    """Refuse (FastPathError) unless `attn`'s own forward computes causal softmax attention."""
    _check(ATTENTION, attn, name, via="use_fast_attention")


# ------------------------------------------------------------------ swapping forwards


class _FastForward:
    """The forward put on one module: its kernel; keeps whatever instance forward it replaced.

    A plain object rather than a closure, so that a deep copy (or a pickle) of the model
    carries a fast forward bound to the copy's own parameters.
    """

    def __init__(self, module: nn.Module, replaced: Any, kernel: Callable[..., Tensor]) -> None:
        self.module = module
        self.replaced = replaced  # an instance forward set before ours (rare), else None
        self.kernel = kernel  # the component's kernel, its settings bound (a partial)

    def __call__(self, x: Float[Tensor, "batch pos d_model"]) -> Tensor:
        return self.kernel(self.module, x)


def _is_fast(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _FastForward)


def _swap(
    model: nn.Module, found: list[tuple[str, nn.Module, Component]], check: bool, via: str
) -> nn.Module:
    """Check every module not on the fast path yet (once per class and settings: the code
    is what is checked), then swap them all; nothing is swapped unless all pass."""
    to_swap = [
        (name, module, kind, _settings(kind, name, module, model))
        for name, module, kind in found
        if not _is_fast(module)
    ]
    for name, module, component, _ in to_swap:
        _check_shapes(component, name, module)
    if check:
        checked: set[tuple] = set()
        for name, module, component, settings in to_swap:
            key = (component.check_id, type(module), tuple(sorted(settings.items())))
            if key not in checked:
                _check(component, module, name, settings, via)
                checked.add(key)
    for _, module, component, settings in to_swap:
        # an instance attribute wins over the class's forward; deleting it restores that
        kernel = partial(component.kernel, **settings)
        module.forward = _FastForward(module, module.__dict__.get("forward"), kernel)
    return model


def _restore(module: nn.Module) -> None:
    fast = module.__dict__.get("forward")
    if isinstance(fast, _FastForward):
        del module.forward
        if fast.replaced is not None:
            module.forward = fast.replaced


def use_fast_kernels(model: nn.Module, *, check: bool = True) -> nn.Module:
    """Run every component of `model` that the fast path knows on torch's kernels (in place;
    returns model): attention, LayerNorm, the MLP and the unembedding, each recognised by
    the contract's parameter names and shapes.

    With `check`, each module's own forward is first checked against its kernel; nothing
    is swapped unless all pass. Modules already on the fast path are left as they are.
    """
    found = fast_kernel_modules(model)
    if not found:
        names = "; ".join(", ".join(c.layout) for c in COMPONENTS)
        raise FastPathError(
            f"{type(model).__name__} has no module with the contract's parameters of attention, "
            f"the MLP, the unembedding or LayerNorm ({names}): there is nothing to put on the "
            "fast path"
        )
    return _swap(model, found, check, via="use_fast_kernels")


def use_own_forwards(model: nn.Module) -> nn.Module:
    """Put every module of `model` back on its own forward, undoing `use_fast_kernels` and
    `use_fast_attention` (in place; returns model)."""
    for _, module, _ in fast_kernel_modules(model):
        _restore(module)
    return model


def has_fast_kernels(model: nn.Module) -> bool:
    """Whether `model` has modules the fast path knows and every one runs on its kernel."""
    found = fast_kernel_modules(model)
    return bool(found) and all(_is_fast(module) for _, module, _ in found)


def use_fast_attention(model: nn.Module, *, check: bool = True) -> nn.Module:
    """Run every attention module of `model` on the fused fast path (in place; returns model).

    With `check`, each attention class is first checked to compute causal softmax
    attention (`check_attention`); nothing is swapped unless all pass. Modules already
    on the fast path are left as they are.
    """
    found = [entry for entry in fast_kernel_modules(model) if entry[2] is ATTENTION]
    if not found:
        raise FastPathError(
            f"{type(model).__name__} has no attention module (one with parameters "
            f"{', '.join(ATTENTION_PARAMETERS)}): there is nothing to put on the fast path"
        )
    return _swap(model, found, check, via="use_fast_attention")


def use_einsum_attention(model: nn.Module) -> nn.Module:
    """Put every attention module of `model` back on its own forward (in place; returns model);
    the other components stay as they are (`use_own_forwards` restores them all)."""
    for _, attn in attention_modules(model):
        _restore(attn)
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
