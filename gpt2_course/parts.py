"""Which implementation of each component the course uses: yours or the reference solution.

Every later component is built from earlier ones through this module, e.g. a
block makes its LayerNorm with `parts.LayerNorm(cfg)`. By default each part is
the learner's own, from `gpt2_course/exercises/`. A learner stuck on one
component continues with the reference solution for that component only:

    parts.use_solution("layernorm.LayerNorm")

`GPT2_COURSE_SOLUTIONS=1` (CI, instructors, or to see the finished course run)
makes every part, and every check, use `solutions/` instead.

A learner's copy of the course (`gpt2-course release`) has no `solutions/`; there
a lent part is the reference part of `gpt2_course.reference_parts`, written on
torch's kernels, and `use_solution` says so.
"""

import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

EXERCISES = "gpt2_course.exercises"
SOLUTIONS = "solutions"
REFERENCE = "gpt2_course.reference_parts"

# Every component a learner builds, as "<module>.<Name>", in course order.
COMPONENTS = [
    "bpe.bpe_encode",
    "embeddings.Embedding",
    "embeddings.PositionalEmbedding",
    "embeddings.Unembedding",
    "layernorm.LayerNorm",
    "attention.single_head_attention",
    "attention.MultiHeadAttention",
    "mlp.gelu_new",
    "mlp.MLP",
    "block.TransformerBlock",
    "transformer.Transformer",
    "transformer.load_gpt2_weights",
    "training.next_token_loss",
    "training.configure_optimizer",
    "training.lr_at_step",
    "training.make_windows",
    "training.train_step",
    "sampling.apply_temperature",
    "sampling.apply_top_k",
    "sampling.apply_top_p",
    "sampling.apply_frequency_penalty",
    "sampling.sample_next_token",
    "sampling.generate",
    "sampling.beam_step",
    "sampling.beam_search",
    "kv_cache.KVCache",
    "kv_cache.forward_with_cache",
    "kv_cache.generate_with_cache",
    "inside.to_hf_state_dict",
    "inside.previous_token_score",
    "inside.induction_score",
    "inside.logit_lens",
    "inside.ablate_head",
]
_BY_NAME = {component.split(".")[1]: component for component in COMPONENTS}

_overrides: dict[str, str] = {}  # component -> package it comes from
_default: list[str] = []  # a stack; empty means "from the environment"


def solutions_everywhere() -> bool:
    """True when GPT2_COURSE_SOLUTIONS asks for the reference solutions throughout."""
    return os.environ.get("GPT2_COURSE_SOLUTIONS", "").strip().lower() in {"1", "true", "yes", "on"}


def default_package() -> str:
    """The package parts come from unless overridden: exercises, or solutions in CI."""
    if _default:
        return _default[-1]
    return SOLUTIONS if solutions_everywhere() else EXERCISES


def _component(name: str) -> str:
    """Accept "LayerNorm" or "layernorm.LayerNorm"; return the full component id."""
    full = name if "." in name else _BY_NAME.get(name, name)
    if full not in COMPONENTS:
        known = ", ".join(COMPONENTS)
        raise KeyError(f"Unknown component {name!r}. Known components: {known}")
    return full


def source_of(name: str) -> str:
    """The package that component `name` currently comes from."""
    full = _component(name)
    return _overrides.get(full, default_package())


def load(package: str, module: str) -> ModuleType:
    """Import `<package>.<module>` (e.g. the learner's `gpt2_course.exercises.layernorm`)."""
    return importlib.import_module(f"{package}.{module}")


def get(name: str) -> Any:
    """The implementation of component `name` that the course uses now."""
    full = _component(name)
    module, attr = full.split(".")
    implementation = getattr(load(source_of(full), module), attr, None)
    if implementation is None:
        raise AttributeError(
            f"{source_of(full).replace('.', '/')}/{module}.py defines no `{attr}`. "
            f"Keep the name {attr} from the exercise stub."
        )
    return implementation


def has_solutions() -> bool:
    """Whether this copy of the course has `solutions/` (a learner's release does not)."""
    return importlib.util.find_spec(SOLUTIONS) is not None


def lent_package() -> str:
    """Where a lent part comes from: `solutions/` where it exists, else the reference parts."""
    return SOLUTIONS if has_solutions() else REFERENCE


def use_solution(name: str) -> None:
    """Use the reference solution for component `name` only; the rest stays yours."""
    full = _component(name)
    _overrides[full] = lent_package()
    what = (
        "the reference solution"
        if _overrides[full] == SOLUTIONS
        else "the reference part (gpt2_course/reference_parts, on torch's kernels)"
    )
    print(f"Using {what} for {full}; every other part is unchanged.")


def describe_package(package: str) -> str:
    """Whose parts a package holds, for messages."""
    return {SOLUTIONS: "the reference solutions", REFERENCE: "the reference parts"}.get(
        package, "your code"
    )


def reference_implementation(check_or_component: str) -> Any:
    """A component's reference part (for a check id, the component it checks)."""
    module, name = check_or_component.split(".")[:2]
    return getattr(load(REFERENCE, module), name)


def use_mine(name: str) -> None:
    """Go back to your own implementation of component `name`."""
    _overrides.pop(_component(name), None)


@contextmanager
def using(package: str) -> Iterator[None]:
    """Within the block, every part without an explicit override comes from `package`."""
    _default.append(package)
    try:
        yield
    finally:
        _default.pop()


def whose(name: str) -> str:
    """'yours', 'reference solution' or 'reference part', for display."""
    source = source_of(name)
    return {SOLUTIONS: "reference solution", REFERENCE: "reference part"}.get(source, "yours")


def table(components: list[str] | None = None) -> str:
    """A plain-text table of components and whose implementation is in use."""
    rows = [(c, whose(c)) for c in (components or COMPONENTS)]
    width = max(len(c) for c, _ in rows)
    return "\n".join(f"{c:<{width}}  {w}" for c, w in rows)


def show(components: list[str] | None = None) -> None:
    """Print which parts of the model are yours and which are the reference's."""
    print(table(components))


def __getattr__(name: str) -> Any:
    # parts.LayerNorm, parts.Embedding, ...: resolved at call time, so a change of
    # source (or an autoreloaded edit) takes effect on the next model built.
    if name in _BY_NAME:
        return get(name)
    raise AttributeError(f"module 'gpt2_course.parts' has no attribute {name!r}")
