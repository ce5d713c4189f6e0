"""Checks for Transformer (its forward's wiring only) and load_gpt2_weights (notebook 05)."""

import math
import re
from functools import cache
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor, nn

from gpt2_course import parts
from gpt2_course.checks import core
from gpt2_course.checks import reference_data as data
from gpt2_course.checks.core import Case, CheckSetupError, Observation, Outcome, compare
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig, hf_config
from gpt2_course.reference import get_reference
from gpt2_course.reference_parts.transformer import Transformer, gpt2_weights, load_gpt2_weights

# Small enough to build in milliseconds, with a head size other than 64.
SEEDED_GPT2 = TransformerConfig(
    d_model=64, d_vocab=300, n_ctx=32, d_head=16, n_heads=4, d_mlp=256, n_layers=3
)
LAYERS = range(data.GPT2_SMALL.n_layers)


@cache
def seeded_gpt2() -> tuple[nn.Module, dict[str, Tensor]]:
    """Hugging Face's GPT-2 at SEEDED_GPT2's size, every weight seeded noise: random-init GPT-2
    has w = 1, b = 0 in every LayerNorm and zero biases, so mistakes there would pass on it."""
    from transformers import GPT2LMHeadModel

    # GPT-2's 50256 is outside this vocabulary
    special = dict.fromkeys(["bos_token_id", "eos_token_id"], SEEDED_GPT2.d_vocab - 1)
    config = hf_config(SEEDED_GPT2, attn_implementation="eager", **special)
    with torch.random.fork_rng(devices=[]):  # its own init is overwritten below
        model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for seed, (name, param) in enumerate(model.named_parameters(), start=300):
            shift = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            param.copy_(data.randn(*param.shape, seed=seed, scale=0.3, shift=shift))
    return model, {name: t.detach().clone() for name, t in model.state_dict().items()}


def transformer_cases() -> list[Case]:
    model, sd = seeded_gpt2()
    tokens = torch.randint(0, SEEDED_GPT2.d_vocab, (2, 11), generator=data.generator(51))
    ln_f_input: list[Tensor] = []
    hook = model.transformer.ln_f.register_forward_pre_hook(lambda _, a: ln_f_input.append(a[0]))
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    hook.remove()
    # Hugging Face's hidden states: [i] is what block i reads, [-1] is after ln_f.
    inside = {f"blocks.{i}": out.hidden_states[i] for i in range(SEEDED_GPT2.n_layers)}
    inside |= {"ln_final": ln_f_input[0], "unembed": out.hidden_states[-1]}
    name = "small GPT-2 (3 layers, d_model=64), every weight random"
    cases = [Case(name, (tokens,), sd, SEEDED_GPT2, Observation(out.logits, inside), seeded=True)]
    gpt2 = get_reference().hf_state_dict
    for name, tokens, (logits, acts) in [
        ("real text", data.text_tokens(), data.text_run()),
        ("batch of 3 texts", data.batch_tokens(), data.batch_run()),
    ]:
        inside = {f"blocks.{i}": acts[f"blocks.{i}.hook_resid_pre"] for i in LAYERS}
        inside |= {"ln_final": acts["ln_final.hook_in"], "unembed": acts["ln_final.hook_out"]}
        cases.append(Case(name, (tokens,), gpt2, data.GPT2_SMALL, Observation(logits, inside)))
    return cases


_BUILT: dict = {}  # the one model call_transformer keeps


def call_transformer(cls: Any, case: Case) -> Observation:
    """Build `cls` with reference sub-parts, load the case's weights, run `cls.forward`; hooks
    record what each block, ln_final and unembed receive, and the order the blocks run in.
    GPT-2 small costs a second or more to build, so the model is built by the class whose
    __init__ `cls` uses: the known mistakes (which override only `forward`) share one."""
    what = getattr(cls, "__name__", "your Transformer")
    if not isinstance(cls, type):
        raise CheckSetupError(f"{what} must be a class (a torch.nn.Module subclass)")
    owner = next(c for c in cls.__mro__ if "__init__" in c.__dict__)
    with parts.using(parts.REFERENCE):
        module = core.build_cached(_BUILT, owner, case.cfg, unfilled=True)
    try:
        load_gpt2_weights(module, case.params)
    except Exception as error:
        problem = f"could not load GPT-2's weights into your {what}: {error}"
        raise CheckSetupError(problem) from error
    module.eval()
    seen: dict[str, Any] = {"block order": []}
    hooks = []
    for name in [*(f"blocks.{i}" for i in range(case.cfg.n_layers)), "ln_final", "unembed"]:

        def record(_module: nn.Module, args: tuple, name: str = name) -> None:
            if name.startswith("blocks."):
                seen["block order"].append(int(name.split(".")[1]))
            if name not in seen and args and isinstance(args[0], Tensor):
                seen[name] = args[0]

        # the weights loaded, so every one of these submodules exists
        hooks.append(module.get_submodule(name).register_forward_pre_hook(record))
    try:
        output = cls.forward(module, *case.args)
        # every parameter: the case's weights are named as Hugging Face names them
        return Observation(output, seen, dict(module.named_parameters()) if case.backward else {})
    finally:
        for hook in hooks:
            hook.remove()


def judge_logits(outcome: Outcome, case: Case) -> str | None:
    problem = compare(outcome.output, case.expected.output, case.atol, case.rtol)
    if problem is None:
        return None
    return (
        f"{problem}\n  Where: {where(outcome.probes, case)}\n  (The check builds your Transformer "
        "with the reference embeddings, LayerNorm and blocks and loads GPT-2's weights with the "
        "reference load_gpt2_weights, so only your forward's wiring is tested.)"
    )


def where(seen: dict[str, Any], case: Case) -> str:
    """Which stage of the forward first goes wrong, from what each watched submodule received."""
    inside, n_layers = case.expected.probes, case.cfg.n_layers

    def same(name: str) -> bool:
        return name in seen and compare(seen[name], inside[name], case.atol, case.rtol) is None

    order = seen.get("block order", [])
    if not order:
        return "your forward never calls the blocks."
    if order != list(range(n_layers)):
        shown = ", ".join(map(str, order[:8])) + (", ..." if len(order) > 8 else "")
        return (
            f"your forward calls the blocks in the order {shown}; run each of the "
            f"{n_layers} blocks once, in order: blocks[0], blocks[1], ..., blocks[{n_layers - 1}]."
        )
    if not same("blocks.0"):
        return (
            "what blocks[0] receives is not embed(tokens) + pos_embed(tokens): "
            "the residual stream starts as the sum of the two embeddings."
        )
    for i in range(1, n_layers):
        if not same(f"blocks.{i}"):
            return (
                f"blocks[0] receives the right input, but blocks[{i}] does not receive "
                f"blocks[{i - 1}]'s output: each block reads what the previous one returned."
            )
    for name, source in [("ln_final", "the last block's output"), ("unembed", "ln_final's output")]:
        if name not in seen:
            return f"your forward never calls self.{name}."
        if not same(name):
            return f"self.{name} does not receive {source}."
    return "everything up to the unembedding matches: look at what your forward returns."


register(
    Check(
        "transformer.Transformer",
        "the whole model: logits on real text",
        transformer_cases,
        call_transformer,
        backward=True,
        judge_case=judge_logits,
    )
)

# A block's weights by the course's names, in the order a failure lists them.
PER_BLOCK = [f"ln{i}.{p}" for i in (1, 2) for p in "wb"]
PER_BLOCK += [f"attn.{w}_{x}" for w in "Wb" for x in "QKVO"]
PER_BLOCK += [f"mlp.{w}_{x}" for w in "Wb" for x in ("in", "out")]


def load_cases() -> list[Case]:
    # A copy is exact: no tolerance. The small model is seeded noise throughout, so
    # every mistake shows there; on GPT-2 small the TransformerLens bridge says what is right.
    _, small = seeded_gpt2()
    names = ["embed.W_E", "pos_embed.W_pos", "ln_final.w", "ln_final.b", "unembed.W_U"]
    names += ["unembed.b_U"] + [f"blocks.{i}.{n}" for i in LAYERS for n in PER_BLOCK]
    # the bridge has W_E, W_pos, W_U and b_U at its top level, the rest under the same names
    bridge = get_reference().bridge
    found = {n: attrgetter(re.sub(r"^\w*embed\.", "", n))(bridge) for n in names}
    weights = {n: t.detach().clone().contiguous() for n, t in found.items()}
    small_name = "small GPT-2 (3 layers, 4 heads of 16), every weight random"
    gpt2 = (get_reference().hf_state_dict,)
    return [
        Case(small_name, (small,), None, SEEDED_GPT2, gpt2_weights(small, SEEDED_GPT2), 0, 0, True),
        Case("GPT-2 small (the reference's weights)", gpt2, None, data.GPT2_SMALL, weights, 0, 0),
    ]


def _layout(model: nn.Module) -> list:
    """Every parameter's name, shape and identity: what a function could have replaced."""
    return [(n, p.shape, id(p)) for n, p in model.named_parameters(remove_duplicate=False)]


_FILLED: dict = {}  # the reference Transformer call_load fills, and its layout


def call_load(fn: Any, case: Case) -> dict[str, Tensor]:
    """Fill a reference Transformer (all NaN first) with the function; return its parameters."""
    if not callable(fn):
        raise CheckSetupError("load_gpt2_weights must be a function")
    model, layout = _FILLED.get(id(case.cfg), (None, None))
    if model is None or layout != _layout(model):
        _FILLED.clear()  # a new size, or a function that replaced parameters: start again
        with torch.device("meta"):  # no random init: every value is set to NaN below
            model = Transformer(case.cfg).to_empty(device="cpu")
        _FILLED[id(case.cfg)] = model, _layout(model)
    for param in model.parameters():
        # Fresh tensors, so that the last call's output keeps the ones it was handed (cheaper
        # than cloning 650 MB); whatever the function does not set stays NaN.
        param.data = torch.full_like(param, math.nan)
    # a private copy: the function must not be able to change the reference's weights
    fn(model, {name: t.clone() for name, t in case.args[0].items()})
    return {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}


def _equal(got: Any, want: Tensor) -> bool:
    # NaN at the same places in both (two functions that leave it unset) is a match
    return (
        isinstance(got, Tensor)
        and torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
        and torch.equal(got.isnan(), want.isnan())
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
        problem = f"your function did not set {first} (all of it is still the check's NaN)"
    elif got.shape == want.shape and got.isnan().any() and not want.isnan().any():
        count = f"{int(got.isnan().sum())} of {got.numel()}"
        problem = f"your function set only part of {first} ({count} values are still NaN)"
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
        call_load,
        judge_case=judge_weights,
        same=lambda a, b, case: not differing(a.output, b.output),
    )
)
