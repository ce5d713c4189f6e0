"""Checks for Transformer and load_gpt2_weights (notebook 05).

`transformer.Transformer`: only the learner's wiring is under test. The check
builds the learner's class with the reference embeddings, LayerNorm and blocks
(`parts.using(parts.REFERENCE)`), loads GPT-2's weights into it with the
reference `load_gpt2_weights`, and compares its logits with Hugging Face's on a
small GPT-2 whose every weight is seeded noise, and with the reference's on real text.

`transformer.load_gpt2_weights`: the learner's function fills a reference
Transformer whose parameters the check first sets to NaN; every parameter must
then equal the expected weight of the same name exactly.
"""

import math
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.checks.core import (
    Case,
    CheckSetupError,
    Observation,
    Outcome,
    build_cached,
    compare,
)
from gpt2_course.checks.reference_data import (
    GPT2_SMALL,
    batch_run,
    batch_tokens,
    generator,
    randn,
    text_run,
    text_tokens,
)
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig, hf_config
from gpt2_course.reference import get_reference
from gpt2_course.reference_parts.transformer import Transformer, gpt2_weights, load_gpt2_weights

# Small enough to build in milliseconds, with a head size other than 64.
SEEDED_GPT2 = TransformerConfig(
    d_model=64, d_vocab=300, n_ctx=32, d_head=16, n_heads=4, d_mlp=256, n_layers=3
)

ISOLATION_NOTE = (
    "\n  (The check builds your Transformer with the reference embeddings, LayerNorm and blocks "
    "and loads GPT-2's weights with the reference load_gpt2_weights, so only your forward's "
    "wiring is tested.)"
)


@cache
def seeded_gpt2() -> tuple[nn.Module, dict[str, Tensor]]:
    """Hugging Face's GPT-2 at SEEDED_GPT2's size, every weight seeded noise.

    Random-weight GPT-2 small has w = 1 and b = 0 in every LayerNorm and zero biases,
    so a mistake that swaps or skips those would pass on it; here nothing is neutral.
    """
    from transformers import GPT2LMHeadModel

    config = hf_config(
        SEEDED_GPT2,
        attn_implementation="eager",
        bos_token_id=SEEDED_GPT2.d_vocab - 1,  # GPT-2's 50256 is outside this vocabulary
        eos_token_id=SEEDED_GPT2.d_vocab - 1,
    )
    with torch.random.fork_rng(devices=[]):  # its own init is overwritten below
        model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for seed, (name, param) in enumerate(model.named_parameters(), start=300):
            is_ln_scale = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            shift = 1.0 if is_ln_scale else 0.0
            param.copy_(randn(*param.shape, seed=seed, scale=0.3, shift=shift))
    return model, {name: t.detach().clone() for name, t in model.state_dict().items()}


# ------------------------------------------------------------------ Transformer


def watched(cfg: TransformerConfig) -> list[str]:
    """The submodules whose input the check records: every block, ln_final, the unembedding."""
    return [f"blocks.{i}" for i in range(cfg.n_layers)] + ["ln_final", "unembed"]


def transformer_cases() -> list[Case]:
    model, sd = seeded_gpt2()
    tokens = torch.randint(0, SEEDED_GPT2.d_vocab, (2, 11), generator=generator(51))
    ln_f_input: list[Tensor] = []
    hook = model.transformer.ln_f.register_forward_pre_hook(lambda _, a: ln_f_input.append(a[0]))
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    hook.remove()
    # Hugging Face's hidden states: [i] is what block i reads, [-1] is after ln_f.
    inside = {f"blocks.{i}": out.hidden_states[i] for i in range(SEEDED_GPT2.n_layers)}
    inside |= {"ln_final": ln_f_input[0], "unembed": out.hidden_states[-1]}
    cases = [
        Case(
            "small GPT-2 (3 layers, d_model=64), every weight random",
            (tokens,),
            sd,
            SEEDED_GPT2,
            Observation(out.logits, inside),
            seeded=True,
        )
    ]
    gpt2 = get_reference().hf_state_dict
    for name, tokens, (logits, acts) in [
        ("real text", text_tokens(), text_run()),
        ("batch of 3 texts", batch_tokens(), batch_run()),
    ]:
        inside = {
            f"blocks.{i}": acts[f"blocks.{i}.hook_resid_pre"] for i in range(GPT2_SMALL.n_layers)
        }
        inside["ln_final"] = acts["ln_final.hook_in"]  # the last block's output
        inside["unembed"] = acts["ln_final.hook_out"]
        cases.append(Case(name, (tokens,), gpt2, GPT2_SMALL, Observation(logits, inside)))
    return cases


def call_transformer():
    """Build `cls` with reference sub-parts, load the case's weights, run `cls.forward`.

    GPT-2 small costs a second or more to build, so a model is built by the class
    whose __init__ `cls` uses: the known mistakes (subclasses that only override
    `forward`) all run their forward on one reference-built model. Forward pre-hooks
    record what each watched submodule receives, and the order the blocks run in.
    """
    built: dict = {}

    def call(cls: Any, case: Case) -> Observation:
        what = getattr(cls, "__name__", "your Transformer")
        if not isinstance(cls, type):
            raise CheckSetupError(f"{what} must be a class (a torch.nn.Module subclass)")
        owner = next(c for c in cls.__mro__ if "__init__" in c.__dict__)
        with parts.using(parts.REFERENCE):
            module = build_cached(built, owner, case.cfg)
        try:
            load_gpt2_weights(module, case.params)
        except Exception as error:
            problem = f"could not load GPT-2's weights into your {what}: {error}"
            raise CheckSetupError(problem) from error
        module.eval()
        seen: dict[str, Any] = {"block order": []}
        hooks = []
        for name in watched(case.cfg):
            try:
                sub = module.get_submodule(name)
            except AttributeError:
                continue

            def record(_module: nn.Module, args: tuple, name: str = name) -> None:
                if name.startswith("blocks."):
                    seen["block order"].append(int(name.split(".")[1]))
                if name not in seen and args and isinstance(args[0], Tensor):
                    seen[name] = args[0]

            hooks.append(sub.register_forward_pre_hook(record))
        try:
            return Observation(cls.forward(module, *case.args), seen)
        finally:
            for hook in hooks:
                hook.remove()

    return call


def judge_logits(outcome: Outcome, case: Case) -> str | None:
    problem = compare(outcome.output, case.expected.output, case.atol, case.rtol)
    if problem is None:
        return None
    return problem + where(outcome.probes, case) + ISOLATION_NOTE


def where(seen: dict[str, Any], case: Case) -> str:
    """Which stage of the forward first goes wrong, from what each watched submodule received."""
    inside, n_layers = case.expected.probes, case.cfg.n_layers

    def same(name: str) -> bool:
        return name in seen and compare(seen[name], inside[name], case.atol, case.rtol) is None

    order = seen.get("block order", [])
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
    for name, source in [("ln_final", "the last block's output"), ("unembed", "ln_final's output")]:
        if name not in seen:
            return f"\n  Where: your forward never calls self.{name}."
        if not same(name):
            return f"\n  Where: self.{name} does not receive {source}."
    return "\n  Where: everything up to the unembedding matches: look at what your forward returns."


register(
    Check(
        "transformer.Transformer",
        "the whole model: logits on real text",
        transformer_cases,
        call_transformer(),
        judge_case=judge_logits,
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
    _, sd = seeded_gpt2()
    # A copy is exact: no tolerance. The small model is seeded noise throughout, so
    # every mistake shows there; on GPT-2 small the TransformerLens bridge says what is right.
    return [
        Case(
            "small GPT-2 (3 layers, 4 heads of 16), every weight random",
            (sd,),
            None,
            SEEDED_GPT2,
            gpt2_weights(sd, SEEDED_GPT2),
            atol=0.0,
            rtol=0.0,
            seeded=True,
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


def _layout(model: nn.Module) -> list:
    """Every parameter's name, shape and identity: what a function could have replaced."""
    return [(n, p.shape, id(p)) for n, p in model.named_parameters(remove_duplicate=False)]


def call_load():
    """Fill a reference Transformer (all NaN first) with the function; return its parameters."""
    built: dict = {}

    def call(fn: Any, case: Case) -> dict[str, Tensor]:
        if not callable(fn):
            raise CheckSetupError("load_gpt2_weights must be a function")
        model, layout = built.get(id(case.cfg), (None, None))
        if model is None or layout != _layout(model):
            built.clear()  # a new size, or a function that replaced parameters: start again
            with torch.device("meta"):  # no random init: every value is set to NaN below
                model = Transformer(case.cfg).to_empty(device="cpu")
            with torch.no_grad():
                for param in model.parameters():
                    param.fill_(math.nan)  # whatever the function does not set stays NaN
            built[id(case.cfg)] = model, _layout(model)
        # a private copy: the function must not be able to change the reference's weights
        state_dict = {name: t.clone() for name, t in case.args[0].items()}
        try:
            fn(model, state_dict)
            return {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
        finally:
            # Hand the filled tensors over as the output and give the model fresh NaN ones for
            # the next call, even after an error (cheaper than cloning 650 MB, then refilling).
            with torch.no_grad():
                for param in model.parameters():
                    param.data = torch.full_like(param, math.nan)

    return call


def _equal(got: Any, want: Tensor) -> bool:
    # NaN at the same places in both (two functions that leave it unset) is a match
    return (
        isinstance(got, Tensor)
        and torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
        and (torch.equal(got.isnan(), want.isnan()))
    )


def differing(actual: Any, expected: dict[str, Tensor]) -> list[str]:
    return [name for name, want in expected.items() if not _equal(actual.get(name), want)]


def judge_weights(outcome: Outcome, case: Case) -> str | None:
    """None when every parameter equals the expected one; else the first that differs, and how."""
    actual = outcome.output
    if not isinstance(actual, dict):
        return f"expected the model's parameters, got {type(actual).__name__}"
    differ = differing(actual, case.expected)
    if not differ:
        return None
    first = differ[0]
    got, want = actual.get(first), case.expected[first]
    if not isinstance(got, Tensor):
        problem = f"the model has no parameter {first} after your function ran"
    elif got.shape == want.shape and got.isnan().all() and not want.isnan().any():
        problem = (
            f"your function did not set {first} (it still holds the NaN the check filled the "
            "model with)"
        )
    elif got.shape == want.shape and got.isnan().any() and not want.isnan().any():
        count = int(got.isnan().sum())
        problem = (
            f"your function set only part of {first} "
            f"({count} of {got.numel()} values are still NaN)"
        )
    else:
        problem = f"{first}: {compare(got, want, 0.0, 0.0)}"
    others = len(differ) - 1
    if others:
        listed = ", ".join(differ[1:4]) + (", ..." if others > 3 else "")
        verb = "parameters differ" if others > 1 else "parameter differs"
        problem += f"\n  {others} more {verb}: {listed}"
    return problem


register(
    Check(
        "transformer.load_gpt2_weights",
        "GPT-2's weights mapped into the model",
        load_cases,
        call_load(),
        judge_case=judge_weights,
        same=lambda a, b, case: not differing(a.output, b.output),
    )
)
