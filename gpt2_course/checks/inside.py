"""Checks for notebook 09, looking inside a model with TransformerLens.

* `to_hf_state_dict`: GPT-2 small (the reference's own Hugging Face weights must come back,
  key for key, bit for bit) and seeded small models of odd shapes (every head count,
  d_mlp and vocabulary its own, a nonzero b_U) whose expected state dicts are checked to
  load back into every parameter with the reference `load_gpt2_weights`; keys, shapes and
  values exactly, and no tensor of the output may share memory with the model.
* `previous_token_score`, `induction_score`: seeded causal patterns (with and without a
  prefix before the repeated block) and a TransformerLens bridge's `hook_pattern`.
* `logit_lens`: a bridge's cache of a seeded model, as a plain dict, against
  `accumulated_resid` and `apply_ln_to_stack(recompute_ln=True)`.
* `ablate_head`: the judge's own `run_with_hooks` on a bridge; the learner's code runs on
  `lens.HookedGPT` (TransformerLens's hook names on torch alone, as a grading runner
  cannot import TransformerLens), recording hooks left behind and weights changed.
"""

from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

from gpt2_course.checks import core
from gpt2_course.checks import reference_data as data
from gpt2_course.checks.core import Case, Observation, Outcome, compare
from gpt2_course.checks.registry import Check, register
from gpt2_course.config import TransformerConfig
from gpt2_course.lens import HookedGPT, bridge_for
from gpt2_course.reference import get_reference
from gpt2_course.reference_parts import inside as reference
from gpt2_course.reference_parts.transformer import Transformer, gpt2_weights, load_gpt2_weights

# Small models of shapes that tell heads from d_head, d_model from d_mlp and d_vocab apart.
ODD_HEADS = TransformerConfig(
    d_model=24, d_vocab=70, n_ctx=16, d_head=4, n_heads=6, d_mlp=40, n_layers=2
)
FEW_HEADS = TransformerConfig(
    d_model=32, d_vocab=50, n_ctx=12, d_head=16, n_heads=2, d_mlp=56, n_layers=3
)
# The model the bridges wrap: booting one costs a second or two, so there is one.
LENS = TransformerConfig(
    d_model=32, d_vocab=128, n_ctx=32, d_head=8, n_heads=4, d_mlp=80, n_layers=2
)
RAISES = "raises ValueError"  # the output of a case whose input the docstring forbids


def seeded_weights(cfg: TransformerConfig, seed: int) -> dict[str, Tensor]:
    """Every parameter of a course model of `cfg`, seeded noise (LayerNorm scales around 1)."""
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Transformer(cfg).named_parameters()}
    return {
        name: data.randn(
            *shape, seed=seed + i, scale=0.3, shift=1.0 if name.endswith(".w") else 0.0
        )
        for i, (name, shape) in enumerate(shapes.items())
    }


def model_of(cfg: TransformerConfig, weights: dict[str, Tensor]) -> nn.Module:
    model = Transformer(cfg)
    core.load_params(model, weights, "the reference Transformer")
    return model.eval()


_BUILT: dict = {}  # the one reference Transformer the calls below keep, and its stand-in


def filled_model(case: Case) -> nn.Module:
    """A reference Transformer of the case's size holding the case's weights."""
    model = core.build_cached(_BUILT, Transformer, case.cfg, unfilled=True)
    core.load_params(model, case.params, "the reference Transformer")
    return model.eval()


# ------------------------------------------------------------------ to_hf_state_dict


def to_hf_cases() -> list[Case]:
    cases = []
    for name, cfg, seed in [
        ("small model, 6 heads of 4, d_mlp 40, every weight random", ODD_HEADS, 1100),
        ("small model, 2 heads of 16, 3 layers, every weight random", FEW_HEADS, 1200),
    ]:
        weights = seeded_weights(cfg, seed)
        expected = reference.to_hf_state_dict(model_of(cfg, weights))
        back = Transformer(cfg)
        load_gpt2_weights(back, expected)  # the round trip gives back every parameter
        assert all(torch.equal(p, weights[n]) for n, p in back.named_parameters()), name
        cases.append(Case(name, (), weights, cfg, expected, atol=0.0, rtol=0.0, seeded=True))
    gpt2 = get_reference().hf_state_dict
    # GPT-2 has no unembedding bias: a course model's is zero
    expected = dict(gpt2) | {"lm_head.bias": torch.zeros(data.GPT2_SMALL.d_vocab)}
    weights = gpt2_weights(gpt2, data.GPT2_SMALL)
    name = "GPT-2 small (the reference's weights)"
    cases.append(Case(name, (), weights, data.GPT2_SMALL, expected, atol=0.0, rtol=0.0))
    return cases


def call_to_hf(fn: Any, case: Case) -> Observation:
    """The function on a reference Transformer holding the case's weights; the probe names
    the outputs that share memory with one of the model's parameters."""
    model = filled_model(case)
    state_dict = fn(model)
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    aliased = []
    if isinstance(state_dict, dict):
        aliased = [
            str(name)
            for name, value in state_dict.items()
            if isinstance(value, Tensor) and value.untyped_storage().data_ptr() in owned
        ]
    return Observation(state_dict, {"aliased": aliased})


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def judge_state_dict(outcome: Outcome, case: Case) -> str | None:
    got, want = outcome.output, case.expected
    if not isinstance(got, dict):
        return f"expected a dict of Hugging Face names to tensors, got {type(got).__name__}"
    missing = [k for k in want if k not in got]
    extra = [str(k) for k in got if k not in want]
    if missing or extra:
        problem = "the keys are not GPT2LMHeadModel's:"
        if missing:
            problem += f" missing {_listed(missing)}"
        if extra:
            problem += f"{';' if missing else ''} unexpected {_listed(extra)}"
        return problem
    for name, wanted in want.items():
        value = got[name]
        if not isinstance(value, Tensor):
            return f"{name} is {type(value).__name__}, not a tensor"
        if value.shape != wanted.shape:
            return f"{name} has shape {list(value.shape)}, expected {list(wanted.shape)}"
    differ = [n for n, w in want.items() if not torch.equal(got[n].to(w.dtype), w)]
    if differ:
        first = differ[0]
        problem = f"{first}: {compare(got[first], want[first], 0.0, 0.0)}"
        if len(differ) > 1:
            problem += f"\n  {len(differ) - 1} more differ: {_listed(differ[1:])}"
        return problem
    if aliased := outcome.probes.get("aliased"):
        return (
            f"the values are right, but {_listed(aliased)} share memory with the model's "
            "parameters (a view, or the parameter itself), so changing the state dict would "
            "change the model: return `.detach().clone()`s"
        )
    return None


register(
    Check(
        "inside.to_hf_state_dict",
        "your model's weights under Hugging Face GPT-2's names",
        to_hf_cases,
        call_to_hf,
        judge_case=judge_state_dict,
    )
)


# ------------------------------------------------------------------ the bridge's model


@cache
def lens_model() -> tuple[dict[str, Tensor], nn.Module, Any]:
    """The seeded LENS model's weights, the model, and a bridge around it (built once)."""
    weights = seeded_weights(LENS, 1300)
    model = model_of(LENS, weights)
    return weights, model, bridge_for(model, reference.to_hf_state_dict)


@cache
def lens_run(seed: int, half: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Tokens BOS + a random block of `half` tokens twice (`half` 0: random tokens), and
    the bridge's activations on them as a plain dict."""
    g = data.generator(seed)
    if half:
        block = torch.randint(0, LENS.d_vocab - 1, (3, half), generator=g)
        bos = torch.full((3, 1), LENS.d_vocab - 1)
        tokens = torch.cat([bos, block, block], dim=1)
    else:
        tokens = torch.randint(0, LENS.d_vocab, (2, 13), generator=g)
    with torch.no_grad():
        _, cache_ = lens_model()[2].run_with_cache(tokens)
    return tokens, {name: t.detach().clone() for name, t in cache_.items()}


def random_pattern(batch: int, heads: int, pos: int, seed: int) -> Tensor:
    """A causal attention pattern: softmax of seeded scores over the keys up to each query."""
    scores = data.randn(batch, heads, pos, pos, seed=seed, scale=2.0)
    future = torch.ones(pos, pos, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def call_score(fn: Any, case: Case) -> Any:
    """The function on the case's arguments; a case ending in RAISES expects a ValueError."""
    args = case.args
    if isinstance(args[-1], str):
        try:
            return fn(*args[:-1])
        except ValueError:
            return RAISES
    return fn(*args)


def judge_score(outcome: Outcome, case: Case) -> str | None:
    if isinstance(case.expected, str):
        if outcome.output == RAISES:
            return None
        return (
            "this input must raise a ValueError (the docstring promises one), but your code "
            f"returned {type(outcome.output).__name__}"
        )
    return compare(outcome.output, case.expected, case.atol, case.rtol)


def score_cases(reference_fn: Any, rows: list[tuple]) -> list[Case]:
    return [
        Case(
            name,
            tuple(args),
            expected=RAISES if args[-1] is RAISES else reference_fn(*args),
            seeded=True,
        )
        for name, *args in rows
    ]


def previous_token_cases() -> list[Case]:
    _, activations = lens_run(1400, 0)
    return score_cases(
        reference.previous_token_score,
        [
            (
                "random causal patterns, batch 3, 5 heads, 9 positions",
                random_pattern(3, 5, 9, 1401),
            ),
            ("one sequence, 2 heads, 2 positions", random_pattern(1, 2, 2, 1402)),
            ("a bridge's blocks.1.attn.hook_pattern", activations["blocks.1.attn.hook_pattern"]),
            ("a 3-d pattern: a ValueError", random_pattern(1, 2, 4, 1403)[0], RAISES),
        ],
    )


def induction_cases() -> list[Case]:
    _, activations = lens_run(1500, 6)
    pattern = activations["blocks.1.attn.hook_pattern"]
    return score_cases(
        reference.induction_score,
        [
            ("random patterns, BOS then a block of 4 twice", random_pattern(3, 5, 9, 1501), 4),
            ("random patterns, a block of 5 twice, no prefix", random_pattern(2, 3, 10, 1502), 5),
            (
                "random patterns, 3 prefix tokens, a block of 1 twice",
                random_pattern(2, 4, 5, 1503),
                1,
            ),
            ("a bridge's blocks.1.attn.hook_pattern on BOS + 6 tokens twice", pattern, 6),
            ("half=0: a ValueError", random_pattern(1, 2, 6, 1504), 0, RAISES),
            ("2 * half > pos: a ValueError", random_pattern(1, 2, 6, 1505), 4, RAISES),
        ],
    )


register(
    Check(
        "inside.previous_token_score",
        "how much each head attends to the previous token",
        previous_token_cases,
        call_score,
        judge_case=judge_score,
    )
)
register(
    Check(
        "inside.induction_score",
        "how much each head attends to the token after the earlier copy",
        induction_cases,
        call_score,
        judge_case=judge_score,
    )
)


# ------------------------------------------------------------------ the logit lens


def logit_lens_cases() -> list[Case]:
    weights, _, bridge = lens_model()
    cases = []
    for name, seed, half in [
        ("a bridge's cache of 2 random sequences", 1600, 0),
        ("a bridge's cache of BOS + 6 tokens twice", 1601, 6),
    ]:
        tokens, activations = lens_run(seed, half)
        with torch.no_grad():
            _, tl_cache = bridge.run_with_cache(tokens)
            # each block's resid_pre, then the last resid_post: ['0_pre', '1_pre', 'final_post']
            stack = tl_cache.accumulated_resid(apply_ln=False)
            normalised = tl_cache.apply_ln_to_stack(stack, recompute_ln=True)
            expected = normalised @ bridge.W_U + bridge.b_U
        cases.append(Case(name, (activations,), weights, LENS, expected, seeded=True))
    return cases


def call_logit_lens(fn: Any, case: Case) -> Any:
    """The function on a copy of the cache (a plain dict) and a reference Transformer."""
    model = filled_model(case)
    (activations,) = case.args
    # The contract's LayerNorm and Unembedding take [batch, pos, d_model]; the learner's own
    # (notebook 09 runs the lens on them) may not take a stack of layers, so neither may these.
    guards = [
        part.register_forward_pre_hook(_three_dimensional(name))
        for name, part in [("ln_final", model.ln_final), ("unembed", model.unembed)]
    ]
    try:
        return fn({name: t.clone() for name, t in activations.items()}, model)
    finally:
        for guard in guards:
            guard.remove()


def _three_dimensional(name: str) -> Any:
    def guard(_module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() != 3:
            raise ValueError(
                f"model.{name} was called on a {args[0].dim()}-d tensor of shape "
                f"{list(args[0].shape)}; the course's {name} takes [batch, pos, d_model]. "
                "Apply it to one layer's residual stream at a time (or fold the layers into "
                "the batch)"
            )

    return guard


def judge_logit_lens(outcome: Outcome, case: Case) -> str | None:
    problem = compare(outcome.output, case.expected, case.atol, case.rtol)
    got, rows = outcome.output, case.cfg.n_layers + 1
    if problem is None or not isinstance(got, Tensor) or got.dim() != 4:
        return problem
    if got.shape[0] != rows:
        return (
            f"{problem}\n  (row 0 is the embeddings, blocks.0.hook_resid_pre; then the stream "
            f"entering each later block; the last row is blocks.{rows - 2}.hook_resid_post: "
            f"{rows} rows)"
        )
    if got.shape == case.expected.shape:
        wrong = [
            str(i) for i in range(rows) if compare(got[i], case.expected[i], case.atol, case.rtol)
        ]
        problem += f"\n  rows that differ: {', '.join(wrong)} (of 0..{rows - 1})"
    return problem


register(
    Check(
        "inside.logit_lens",
        "the logit lens on every layer's residual stream",
        logit_lens_cases,
        call_logit_lens,
        judge_case=judge_logit_lens,
    )
)


# ------------------------------------------------------------------ ablating a head


def ablate_cases() -> list[Case]:
    weights, _, bridge = lens_model()
    tokens = torch.randint(0, LENS.d_vocab, (2, 10), generator=data.generator(1700))
    last_layer, last_head = LENS.n_layers - 1, LENS.n_heads - 1
    cases = []
    for layer, head in [(0, 0), (last_layer, last_head), (0, 2), (last_layer, 1)]:

        def zero(z: Tensor, hook: Any, head: int = head) -> Tensor:
            z = z.clone()
            z[:, :, head] = 0.0
            return z

        with torch.no_grad():
            expected = bridge.run_with_hooks(
                tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)]
            )
        name = f"layer {layer}, head {head} of a seeded {LENS.n_layers}-layer model"
        cases.append(Case(name, (tokens, layer, head), weights, LENS, expected, seeded=True))
    return cases


def call_ablate(fn: Any, case: Case) -> Observation:
    """The function on `HookedGPT` around a reference Transformer; the probes name the hooks
    still on the model afterwards and the parameters that changed."""
    model = filled_model(case)
    hooked = _BUILT.get("hooked")
    if hooked is None or hooked.model is not model:
        hooked = _BUILT["hooked"] = HookedGPT(model)
    hooked.reset_hooks()
    try:
        logits = fn(hooked, *case.args)
    finally:
        left = sorted(name for name, point in hooked.hook_dict.items() if point.fns)
        hooked.reset_hooks()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, case.params[n])]
    return Observation(logits, {"hooks left": left, "weights changed": changed})


def judge_ablation(outcome: Outcome, case: Case) -> str | None:
    problem = compare(outcome.output, case.expected, case.atol, case.rtol)
    if problem is not None:
        layer, head = case.args[1:]
        return (
            f"{problem}\n  (expected: the logits with blocks.{layer}.attn.hook_z[:, :, {head}] "
            "set to zero, every other head and layer as it was)"
        )
    if left := outcome.probes.get("hooks left"):
        return (
            f"the logits are right, but hooks stay on the model afterwards ({_listed(left)}): "
            "every later run would be ablated too. Pass them to run_with_hooks, which removes them"
        )
    if changed := outcome.probes.get("weights changed"):
        return (
            f"the logits are right, but the model's weights changed ({_listed(changed)}): "
            "ablate with a hook on the activations, not by editing parameters"
        )
    return None


register(
    Check(
        "inside.ablate_head",
        "the logits with one head zero-ablated",
        ablate_cases,
        call_ablate,
        judge_case=judge_ablation,
    )
)
