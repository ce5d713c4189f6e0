"""Checks for Transformer and load_gpt2_weights (notebook 05).

`transformer.Transformer`: only the learner's wiring is under test. The check
builds the learner's class with the reference solution's embeddings, LayerNorm
and blocks (`parts.using(parts.SOLUTIONS)`), loads GPT-2's weights into it with
the reference `load_gpt2_weights`, and compares its logits with the reference's
on real text, on a batch of texts and on a small GPT-2 whose every weight is
random (Hugging Face's own logits).

`transformer.load_gpt2_weights`: the learner's function fills a reference
Transformer whose parameters the check first sets to NaN; every parameter must
then equal the TransformerLens bridge's weight of the same name exactly.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import einops
import torch
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.checks.core import (
    ATOL,
    RTOL,
    Case,
    CheckSetupError,
    Mistake,
    compare,
    describe_exception,
)
from gpt2_course.checks.reference_data import (
    GPT2_SMALL,
    batch_run,
    batch_tokens,
    generator,
    text_run,
    text_tokens,
)
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig, hf_config
from gpt2_course.reference import get_reference
from solutions.transformer import Transformer, gpt2_weights, load_gpt2_weights

# A GPT-2 small enough to build in milliseconds, with a head size other than 64.
TINY = TransformerConfig(
    d_model=64, d_vocab=300, n_ctx=32, d_head=16, n_heads=4, d_mlp=256, n_layers=3
)

ISOLATION_NOTE = (
    "\n  (The check builds your Transformer with the reference embeddings, LayerNorm and blocks "
    "and loads GPT-2's weights with the reference load_gpt2_weights, so only your forward's "
    "wiring is tested.)"
)


@cache
def tiny_gpt2() -> tuple[nn.Module, dict[str, Tensor]]:
    """A small Hugging Face GPT-2 with every weight random (LayerNorms and biases included).

    Random-weight GPT-2 small has w = 1 and b = 0 in every LayerNorm and zero biases,
    so a mistake that swaps or skips those would pass on it; here nothing is neutral.
    """
    from transformers import GPT2LMHeadModel

    config = hf_config(
        TINY,
        attn_implementation="eager",
        bos_token_id=TINY.d_vocab - 1,  # GPT-2's 50256 is outside this vocabulary
        eos_token_id=TINY.d_vocab - 1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = GPT2LMHeadModel(config).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if (
                    name.endswith("ln_1.weight")
                    or name.endswith("ln_2.weight")
                    or "ln_f.weight" in name
                ):
                    param.copy_(1.0 + 0.3 * torch.randn_like(param))
                else:
                    param.copy_(0.3 * torch.randn_like(param))
    state_dict = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return model, state_dict


def tiny_tokens() -> Tensor:
    return torch.randint(0, TINY.d_vocab, (2, 11), generator=generator(51))


# ------------------------------------------------------------------ Transformer


@dataclass
class LogitsExpected:
    """The reference's logits, and (for real text) the residual stream at three places."""

    logits: Tensor
    inside: dict[str, Tensor] = field(default_factory=dict)


def watched(cfg: TransformerConfig) -> list[str]:
    """The submodules whose input the check records: every block, ln_final, the unembedding."""
    return [f"blocks.{i}" for i in range(cfg.n_layers)] + ["ln_final", "unembed"]


def reference_inside(activations: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """What each watched submodule receives in the reference, from its activation cache."""
    inside = {f"blocks.{i}": activations[f"blocks.{i}.hook_resid_pre"] for i in range(cfg.n_layers)}
    inside["ln_final"] = activations["ln_final.hook_in"]  # the last block's output
    inside["unembed"] = activations["ln_final.hook_out"]
    return inside


def transformer_cases() -> list[Case]:
    sd = get_reference().hf_state_dict
    text_logits, text_acts = text_run()
    batch_logits, batch_acts = batch_run()
    tiny, tiny_sd = tiny_gpt2()
    tokens = tiny_tokens()
    ln_f_input: list[Tensor] = []
    hook = tiny.transformer.ln_f.register_forward_pre_hook(
        lambda _, args: ln_f_input.append(args[0])
    )
    try:
        with torch.no_grad():
            out = tiny(tokens, output_hidden_states=True)
    finally:
        hook.remove()
    tiny_logits = out.logits
    # Hugging Face's hidden states: [i] is what block i reads, [-1] is after ln_f.
    tiny_inside = {f"blocks.{i}": out.hidden_states[i] for i in range(TINY.n_layers)}
    tiny_inside |= {"ln_final": ln_f_input[0], "unembed": out.hidden_states[-1]}
    # The small model first: every weight is random there, so it tells the known mistakes
    # apart on its own and diagnosing a failure stays cheap.
    return [
        Case(
            "small GPT-2 (3 layers, d_model=64), every weight random",
            (tokens,),
            tiny_sd,
            TINY,
            LogitsExpected(tiny_logits, tiny_inside),
        ),
        Case(
            "real text",
            (text_tokens(),),
            sd,
            GPT2_SMALL,
            LogitsExpected(text_logits, reference_inside(text_acts, GPT2_SMALL)),
        ),
        Case(
            "batch of 3 texts",
            (batch_tokens(),),
            sd,
            GPT2_SMALL,
            LogitsExpected(batch_logits, reference_inside(batch_acts, GPT2_SMALL)),
        ),
    ]


def build_unfilled(cls: type, cfg: TransformerConfig) -> Any:
    """`cls(cfg)` with the reference's sub-parts and uninitialised parameters.

    Every parameter is about to be overwritten with GPT-2's weights, so drawing 163M
    random numbers first would only waste a second or more: the model is built on the
    "meta" device (shapes only) and then given empty memory. A module with buffers, or
    one that cannot be built that way, is built the ordinary way instead.
    """
    with parts.using(parts.SOLUTIONS):
        try:
            with torch.device("meta"):
                module = cls(cfg)
            if isinstance(module, nn.Module) and not any(True for _ in module.buffers()):
                return module.to_empty(device="cpu")
        except NotImplementedError:
            raise
        except Exception:
            pass  # build it the ordinary way, which reports a genuine error properly
        return cls(cfg)


def _init_owner(cls: type) -> type:
    """The class whose __init__ builds instances of `cls`."""
    return next((c for c in cls.__mro__ if "__init__" in c.__dict__), cls)


def call_transformer() -> Callable[[Any, Case], Any]:
    """Build (once) a model of the class, load the case's weights, run `cls.forward` on it.

    GPT-2 small costs a second or more to build, so a model is built once per class
    whose __init__ it uses: the known mistakes (subclasses that only override
    `forward`) all run their forward on one reference-built model.
    """
    built: dict[tuple[int, int], tuple[type, nn.Module, list[int]]] = {}

    def call(cls: Any, case: Case) -> Any:
        what = getattr(cls, "__name__", "your Transformer")
        if not isinstance(cls, type):
            raise CheckSetupError(f"{what} must be a class (a torch.nn.Module subclass)")
        owner = _init_owner(cls)
        key = (id(owner), id(case.cfg))
        entry = built.get(key)
        if entry is None or entry[0] is not owner:
            try:
                module = build_unfilled(owner, case.cfg)
            except NotImplementedError:
                raise
            except Exception as error:
                raise CheckSetupError(f"{what}(cfg) failed: {describe_exception(error)}") from error
            if not isinstance(module, nn.Module):
                raise CheckSetupError(f"{what} must be a torch.nn.Module subclass")
            if len(built) >= 4:
                built.clear()  # GPT-2 small is 650 MB: keep few alive
            entry = built[key] = (owner, module, [])
        _, module, loaded = entry
        if loaded != [id(case.params)]:
            try:
                load_gpt2_weights(module, case.params)
            except Exception as error:
                raise CheckSetupError(
                    f"could not load GPT-2's weights into your {what}: {error}"
                ) from error
            loaded[:] = [id(case.params)]
        module.eval()
        seen: dict[str, Tensor] = {}  # what each watched submodule received, first call
        order: list[int] = []  # the blocks, in the order the forward called them
        hooks = []
        for name in watched(case.cfg):
            try:
                sub = module.get_submodule(name)
            except AttributeError:
                continue

            def record(_module: nn.Module, args: tuple, name: str = name) -> None:
                if name.startswith("blocks."):
                    order.append(int(name.split(".")[1]))
                if name not in seen and args and isinstance(args[0], Tensor):
                    seen[name] = args[0].detach().clone()

            hooks.append(sub.register_forward_pre_hook(record))
        try:
            logits = cls.forward(module, *case.args)
        finally:
            for hook in hooks:
                hook.remove()
        return logits, seen, order

    return call


def compare_logits(
    actual: Any, expected: Any, atol: float = ATOL, rtol: float = RTOL
) -> str | None:
    logits = actual[0] if isinstance(actual, tuple) else actual
    if not isinstance(expected, LogitsExpected):  # diagnosis: a known mistake's output
        return compare(logits, expected[0] if isinstance(expected, tuple) else expected, atol, rtol)
    problem = compare(logits, expected.logits, atol, rtol)
    if problem is None or not expected.inside:
        return problem if problem is None else problem + ISOLATION_NOTE
    seen, order = actual[1:3] if isinstance(actual, tuple) and len(actual) == 3 else ({}, [])
    return problem + _where(seen, order, expected.inside, atol, rtol) + ISOLATION_NOTE


def _where(
    seen: dict[str, Tensor], order: list[int], inside: dict[str, Tensor], atol: float, rtol: float
) -> str:
    """Which stage of the forward first goes wrong, from what each watched submodule received."""
    n_layers = sum(name.startswith("blocks.") for name in inside)

    def same(name: str) -> bool:
        return name in seen and compare(seen[name], inside[name], atol, rtol) is None

    if not order:
        return "\n  Where: your forward never calls the blocks."
    if order != list(range(n_layers)):
        shown = ", ".join(map(str, order[:8])) + (", ..." if len(order) > 8 else "")
        return (
            f"\n  Where: your forward calls the blocks in the order {shown}; run each of the "
            f"{n_layers} blocks once, in order: blocks[0], blocks[1], ..., blocks[{n_layers - 1}]."
        )
    if not same("blocks.0"):
        return (
            "\n  Where: what blocks[0] receives is not embed(tokens) + pos_embed(tokens): "
            "the residual stream starts as the sum of the two embeddings."
        )
    for i in range(1, n_layers):
        if not same(f"blocks.{i}"):
            return (
                f"\n  Where: blocks[0] receives the right input, but blocks[{i}] does not receive "
                f"blocks[{i - 1}]'s output: each block reads what the previous one returned."
            )
    if "ln_final" not in seen:
        return "\n  Where: your forward never calls self.ln_final."
    if not same("ln_final"):
        return "\n  Where: self.ln_final does not receive the last block's output."
    if "unembed" not in seen:
        return "\n  Where: your forward never calls self.unembed."
    if not same("unembed"):
        return "\n  Where: self.unembed does not receive ln_final's output."
    return "\n  Where: everything up to the unembedding matches: look at what your forward returns."


class NoFinalLayerNorm(Transformer):
    def forward(self, tokens):
        residual = self.embed(tokens) + self.pos_embed(tokens)
        for block in self.blocks:
            residual = block(residual)
        return self.unembed(residual)


class NoPositionalEmbedding(Transformer):
    def forward(self, tokens):
        residual = self.embed(tokens)
        for block in self.blocks:
            residual = block(residual)
        return self.unembed(self.ln_final(residual))


class BlocksReversed(Transformer):
    def forward(self, tokens):
        residual = self.embed(tokens) + self.pos_embed(tokens)
        for block in reversed(self.blocks):
            residual = block(residual)
        return self.unembed(self.ln_final(residual))


class OnlyFirstBlock(Transformer):
    def forward(self, tokens):
        residual = self.embed(tokens) + self.pos_embed(tokens)
        residual = self.blocks[0](residual)
        return self.unembed(self.ln_final(residual))


class BlocksReadEmbeddings(Transformer):
    def forward(self, tokens):
        embedded = self.embed(tokens) + self.pos_embed(tokens)
        for block in self.blocks:
            residual = block(embedded)
        return self.unembed(self.ln_final(residual))


class UnembedBeforeLayerNorm(Transformer):
    def forward(self, tokens):
        residual = self.embed(tokens) + self.pos_embed(tokens)
        for block in self.blocks:
            residual = block(residual)
        return self.ln_final(self.unembed(residual))


register(
    Check(
        "transformer.Transformer",
        "the whole model: logits on real text",
        transformer_cases,
        call_transformer(),
        [
            Mistake(
                "no_ln_final", "a model without the final LayerNorm (ln_final)", NoFinalLayerNorm
            ),
            Mistake(
                "no_positional_embedding",
                "a model that leaves out the positional embedding",
                NoPositionalEmbedding,
            ),
            Mistake(
                "blocks_reversed", "a model that runs the blocks in reverse order", BlocksReversed
            ),
            Mistake("only_first_block", "a model that runs only the first block", OnlyFirstBlock),
            Mistake(
                "blocks_read_embeddings",
                "a model whose every block reads the embeddings instead of the previous "
                "block's output",
                BlocksReadEmbeddings,
            ),
            Mistake(
                "unembed_before_ln_final",
                "a model that applies the unembedding before ln_final",
                UnembedBeforeLayerNorm,
            ),
        ],
        compare=compare_logits,
    )
)

# ------------------------------------------------------------------ load_gpt2_weights


def bridge_weights() -> dict[str, Tensor]:
    """GPT-2 small's weights as the TransformerLens bridge exposes them, by the course's names."""
    bridge = get_reference().bridge
    weights = {
        "embed.W_E": bridge.W_E,
        "pos_embed.W_pos": bridge.W_pos,
        "ln_final.w": bridge.ln_final.w,
        "ln_final.b": bridge.ln_final.b,
        "unembed.W_U": bridge.W_U,
        "unembed.b_U": bridge.b_U,
    }
    per_block = [f"ln{i}.{p}" for i in (1, 2) for p in "wb"]
    per_block += [f"attn.{w}_{x}" for w in "Wb" for x in "QKVO"]
    per_block += [f"mlp.{w}_{x}" for w in "Wb" for x in ("in", "out")]
    for layer, block in enumerate(bridge.blocks):
        for name in per_block:
            sub, attr = name.split(".")
            weights[f"blocks.{layer}.{name}"] = getattr(getattr(block, sub), attr)
    return {name: value.detach().clone().contiguous() for name, value in weights.items()}


def load_cases() -> list[Case]:
    _, tiny_sd = tiny_gpt2()
    tiny_expected = {name: t.clone() for name, t in gpt2_weights(tiny_sd, TINY).items()}
    # A copy is exact: no tolerance. The small model first: see transformer_cases.
    return [
        Case(
            "small GPT-2 (3 layers, 4 heads of 16), every weight random",
            (tiny_sd,),
            None,
            TINY,
            tiny_expected,
            atol=0.0,
            rtol=0.0,
        ),
        Case(
            "GPT-2 small (the reference's weights)",
            (get_reference().hf_state_dict,),
            None,
            GPT2_SMALL,
            bridge_weights(),
            atol=0.0,
            rtol=0.0,
        ),
    ]


def call_load() -> Callable[[Any, Case], Any]:
    """Fill a reference Transformer (all NaN first) with the function; return its parameters."""
    built: dict[int, tuple[TransformerConfig, nn.Module, dict[str, torch.Size]]] = {}

    def shapes_of(model: nn.Module) -> dict[str, torch.Size]:
        return {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}

    def call(fn: Any, case: Case) -> Any:
        if not callable(fn):
            raise CheckSetupError("load_gpt2_weights must be a function")
        entry = built.get(id(case.cfg))
        if entry is not None and (entry[0] is not case.cfg or shapes_of(entry[1]) != entry[2]):
            entry = None  # a previous function replaced parameters: start again
        if entry is None:
            model = build_unfilled(Transformer, case.cfg)
            with torch.no_grad():
                for param in model.parameters():
                    param.fill_(math.nan)  # whatever the function does not set stays NaN
            entry = built[id(case.cfg)] = (case.cfg, model, shapes_of(model))
        model = entry[1]
        # a private copy: the function must not be able to change the reference's weights
        state_dict = {name: t.clone() for name, t in case.args[0].items()}
        output = {}
        try:
            fn(model, state_dict)
            output = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
        finally:
            # Hand the filled tensors over as the output and give the model fresh NaN ones for
            # the next call, even after an error (cheaper than cloning 650 MB, then refilling).
            with torch.no_grad():
                for param in model.parameters():
                    param.data = torch.full_like(param, math.nan)
        return output

    return call


def compare_weights(actual: Any, expected: Any, atol: float = 0.0, rtol: float = 0.0) -> str | None:
    """None when every parameter equals the expected one; else the first that differs, and how."""
    if not isinstance(actual, dict):
        return f"expected the model's parameters, got {type(actual).__name__}"
    differ = []
    for name, want in expected.items():
        got = actual.get(name)
        if not isinstance(got, Tensor) or got.shape != want.shape:
            differ.append(name)
        elif not torch.equal(got, want):
            # NaN at the same places in both (two functions that leave it unset) is a match
            if not (got.isnan() == want.isnan()).all() or not torch.equal(
                got.nan_to_num(0.0), want.nan_to_num(0.0)
            ):
                differ.append(name)
    if not differ:
        return None
    first = differ[0]
    got, want = actual.get(first), expected[first]
    if not isinstance(got, Tensor):
        problem = f"the model has no parameter {first} after your function ran"
    elif got.isnan().all() and not want.isnan().any():
        problem = (
            f"your function did not set {first} (it still holds the NaN the check filled the "
            "model with)"
        )
    elif got.isnan().any() and not want.isnan().any():
        count = int(got.isnan().sum())
        problem = (
            f"your function set only part of {first} "
            f"({count} of {got.numel()} values are still NaN)"
        )
    else:
        problem = f"{first}: {compare(got, want, atol, rtol)}"
    others = len(differ) - 1
    if others:
        listed = ", ".join(differ[1:4]) + (", ..." if others > 3 else "")
        verb = "parameters differ" if others > 1 else "parameter differs"
        problem += f"\n  {others} more {verb}: {listed}"
    return problem


def _copy_into(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """The plain copy a learner writes (no checks): what the mistakes below use."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def load_kqv_order(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    for layer in range(model.cfg.n_layers):
        for kind in "Wb":
            q, k = f"blocks.{layer}.attn.{kind}_Q", f"blocks.{layer}.attn.{kind}_K"
            weights[q], weights[k] = weights[k], weights[q]
    _copy_into(model, weights)


def load_c_proj_transposed(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    sd = {k.removeprefix("transformer."): v for k, v in hf_state_dict.items()}
    for layer in range(model.cfg.n_layers):
        weights[f"blocks.{layer}.attn.W_O"] = einops.rearrange(
            sd[f"h.{layer}.attn.c_proj.weight"].T,
            "(heads d_head) d_model -> heads d_head d_model",
            heads=model.cfg.n_heads,
        )
    _copy_into(model, weights)


def load_mlp_transposed(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    for layer in range(model.cfg.n_layers):
        for name in ("W_in", "W_out"):
            weights[f"blocks.{layer}.mlp.{name}"] = weights[f"blocks.{layer}.mlp.{name}"].T
    _copy_into(model, weights)


def load_no_ln_final(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    del weights["ln_final.w"], weights["ln_final.b"]
    _copy_into(model, weights)


def load_W_U_not_transposed(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    weights["unembed.W_U"] = weights["embed.W_E"]
    _copy_into(model, weights)


def load_W_U_from_W_pos(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    weights["unembed.W_U"] = weights["pos_embed.W_pos"].T
    _copy_into(model, weights)


def load_W_U_is_W_E(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    del weights["unembed.W_U"]
    _copy_into(model, weights)
    model.unembed.W_U = model.embed.W_E  # one Parameter for both, as a tie


def load_b_U_unset(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    del weights["unembed.b_U"]
    _copy_into(model, weights)


def load_heads_split_wrong_way(model, hf_state_dict):
    weights = gpt2_weights(hf_state_dict, model.cfg)
    heads = model.cfg.n_heads
    for layer in range(model.cfg.n_layers):
        for x in "QKV":
            name = f"blocks.{layer}.attn.W_{x}"
            merged = einops.rearrange(
                weights[name], "heads d_model d_head -> d_model (heads d_head)"
            )
            weights[name] = einops.rearrange(
                merged, "d_model (d_head heads) -> heads d_model d_head", heads=heads
            )
    _copy_into(model, weights)


register(
    Check(
        "transformer.load_gpt2_weights",
        "GPT-2's weights mapped into the model",
        load_cases,
        call_load(),
        [
            Mistake(
                "kqv_order",
                "load_gpt2_weights splitting c_attn as K, Q, V (it is Q, then K, then V)",
                load_kqv_order,
            ),
            Mistake(
                "c_proj_transposed",
                "load_gpt2_weights that transposes attn.c_proj as if it were an nn.Linear "
                "(Conv1D weights are already [d_in, d_out])",
                load_c_proj_transposed,
            ),
            Mistake(
                "mlp_transposed",
                "load_gpt2_weights that transposes the MLP's c_fc and c_proj as if they were "
                "nn.Linear weights (Conv1D weights are already [d_in, d_out])",
                load_mlp_transposed,
            ),
            Mistake(
                "no_ln_final",
                "load_gpt2_weights that never loads ln_f into ln_final",
                load_no_ln_final,
            ),
            Mistake(
                "W_U_not_transposed",
                "load_gpt2_weights that sets W_U to wte.weight without transposing it "
                "(W_U is [d_model, d_vocab], wte.weight is [d_vocab, d_model])",
                load_W_U_not_transposed,
            ),
            Mistake(
                "W_U_from_W_pos",
                "load_gpt2_weights that ties W_U to the positional embedding wpe instead of the "
                "token embedding wte",
                load_W_U_from_W_pos,
            ),
            Mistake(
                "W_U_is_W_E",
                "load_gpt2_weights that ties the weights by making unembed.W_U the same Parameter "
                "as embed.W_E ([d_vocab, d_model]: the unembedding needs its transpose, "
                "[d_model, d_vocab])",
                load_W_U_is_W_E,
            ),
            Mistake(
                "b_U_unset",
                "load_gpt2_weights that leaves unembed.b_U unset (GPT-2 has no unembedding bias: "
                "fill b_U with zeros)",
                load_b_U_unset,
            ),
            Mistake(
                "heads_split_wrong_way",
                'load_gpt2_weights that splits heads as "(d_head heads)" '
                'instead of "(heads d_head)"',
                load_heads_split_wrong_way,
            ),
        ],
        compare=compare_weights,
    )
)
