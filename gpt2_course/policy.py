"""Shortcuts are refused, and said so: what an exercise file may import, reach and call.

Every check declares what a learner may not use for it. Three kinds of rule:

1. **Imports** (every exercise file, every check): an ALLOWLIST. An exercise file
   may import only torch (public submodules), einops, jaxtyping, a few standard
   helpers (math, typing, collections, dataclasses, functools, ...), the course's
   `gpt2_course.parts`, `config`, `prompts` and `pretrained` (only the helpers the
   stubs use), and its own exercise files. Everything else (`solutions`,
   `gpt2_course.checks`, `gpt2_course.reference`, `transformers`,
   `transformer_lens`, `os`, `sys`, `importlib`, ...) is not accepted.
2. **Escape hatches** (every exercise file): names and attributes legitimate
   exercise code never needs and that reach around rule 1 or hide what the code
   calls: `eval`, `exec`, `__import__`, `getattr` with a computed name,
   `x.__dict__`, `torch.sys`, `torch.ops`, torch's private `torch._C`, ... .
3. **Shortcuts** (per check): the torch call that would skip the exercise,
   `F.layer_norm` for LayerNorm, `F.scaled_dot_product_attention` for attention,
   and so on. The table is `SHORTCUTS`, one entry per check id, each shortcut
   with the advice shown to the learner.

Two ways to apply them:

* `scan_source` / `scan_submission` read the source (AST, nothing is run) and
  report each violation with its file, line and advice, e.g. "not accepted:
  `attention.py` line 12 calls `F.scaled_dot_product_attention`; write the
  attention yourself". The scan is what reports: the grader refuses a check
  whose scan finds anything, and the notebook's `check(...)` says why.
* `runtime_guard(check_id, learner_dir)` is defence in depth for the run phase:
  while it is active, the check's forbidden torch functions and classes raise
  `ShortcutRefused` when called directly from a file in `learner_dir`, and
  imports made from such files go through the same allowlist (`ImportRefused`).
  Course code (the reference, the checks, the solutions) may use the same
  functions in the same run: only the learner's own frames are refused. It
  catches what the scan cannot see (a name built at run time); it does not
  replace the scan, and it is no sandbox.
"""

from __future__ import annotations

import ast
import builtins
import enum
import importlib
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import BuiltinFunctionType, FrameType, FunctionType, ModuleType
from typing import Any

from gpt2_course.parts import COMPONENTS

# --------------------------------------------------------------------------- the API's types


@dataclass(frozen=True)
class Shortcut:
    """A torch function, class or module that would skip an exercise, and what to do instead."""

    qualname: str  # public name, e.g. "torch.nn.functional.layer_norm"; a module covers its members
    advice: str  # completes "not accepted: ... calls `F.layer_norm`; <advice>"


@dataclass(frozen=True)
class Violation:
    """One thing the scan does not accept, with the sentence that says so."""

    filename: str
    line: int
    message: str
    kind: str = "shortcut"  # "import", "escape" or "shortcut"

    def __str__(self) -> str:
        return self.message


class ShortcutRefused(Exception):
    """Raised at run time when learner code calls a shortcut its check refuses."""


class ImportRefused(ShortcutRefused, ImportError):
    """Raised at run time when learner code imports a module exercise files may not import."""


# --------------------------------------------------------------------------- rule 1: imports

# Modules an exercise file may import, exactly.
ALLOWED_MODULES = frozenset(
    {
        "math",
        "typing",
        "typing_extensions",
        "collections",
        "collections.abc",
        "dataclasses",
        "functools",
        "itertools",
        "operator",
        "numbers",
        "enum",
        "abc",
        "weakref",
        "warnings",
        "__future__",
        "gpt2_course",
        "gpt2_course.parts",
        "gpt2_course.config",
        "gpt2_course.prompts",
        "gpt2_course.pretrained",
    }
)
# Packages an exercise file may import, with their submodules.
ALLOWED_PACKAGES = ("torch", "einops", "jaxtyping", "gpt2_course.exercises")

# What exercise code may use from the course's own modules (the stubs' needs).
COURSE_MEMBERS: dict[str, frozenset[str]] = {
    "gpt2_course": frozenset({"parts", "config", "prompts", "pretrained", "exercises"}),
    "gpt2_course.config": frozenset({"TransformerConfig"}),
    "gpt2_course.prompts": frozenset({"check_prompt"}),
    "gpt2_course.pretrained": frozenset(
        {"check_gpt2_state_dict", "gpt2_shapes", "config_from_state_dict", "CheckpointError"}
    ),
    # the components, by name (parts.LayerNorm(cfg)), and the read-only views
    "gpt2_course.parts": frozenset({c.split(".")[1] for c in COMPONENTS} | {"show", "whose"}),
}

# torch's public corners that load or build code rather than compute: never needed here.
TORCH_REFUSED = (
    "torch.ops",
    "torch.classes",
    "torch.library",
    "torch.hub",
    "torch.package",
    "torch.utils.cpp_extension",
    "torch.utils.model_zoo",
    "torch.utils.benchmark",
    "torch.utils.collect_env",
    "torch.multiprocessing",
    "torch.load",
    "torch.serialization",
    "torch.jit.load",
)
# Public helpers of allowed modules that evaluate strings as code.
EVALUATING = (
    "typing.get_type_hints",
    "typing.ForwardRef",
    "typing_extensions.get_type_hints",
    "typing_extensions.ForwardRef",
    "typing_extensions.evaluate_forward_ref",
)

ALLOWED_SUMMARY = (
    "an exercise file may import only torch, einops, jaxtyping, the standard modules math, "
    "typing, typing_extensions, collections, dataclasses, functools, itertools, operator, "
    "numbers, enum, abc, weakref, warnings and __future__, gpt2_course's parts, config, "
    "prompts and pretrained, and the other exercise files"
)

# Why the modules learners reach for most are refused (the allowlist refuses the rest).
MODULE_ADVICE = {
    "solutions": "the reference solutions are not for exercise files (in the notebook, "
    "`parts.use_solution(...)` lends you one component)",
    "gpt2_course.checks": "the checks judge your code and are not for it to use",
    "gpt2_course.reference": "the reference model is what your code is checked against",
    "gpt2_course.reference_parts": "the reference parts are the course's answer key (in the "
    "notebook, `parts.use_solution(...)` lends you one component)",
    "gpt2_course.grading": "the grader is not for exercise files",
    "transformers": "the course checks your code against Hugging Face's GPT-2",
    "transformer_lens": "the course checks your code against TransformerLens",
}

PRIVATE_ADVICE = (
    "torch's private internals (names starting with `_`) are not accepted, because a shortcut "
    "can hide there; use torch's public functions"
)
OTHER_PRIVATE_ADVICE = (
    "private internals (names starting with `_`) are not accepted; use the library's public names"
)
TORCH_REFUSED_ADVICE = (
    "exercise code loads no code, kernels, files or models; compute with torch's public functions"
)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_allowed(module: str) -> bool:
    """True when an exercise file may import `module` (before the finer rules on its names)."""
    return module in ALLOWED_MODULES or any(_under(module, p) for p in ALLOWED_PACKAGES)


def _module_advice(module: str) -> str:
    for prefix, advice in MODULE_ADVICE.items():
        if _under(module, prefix):
            return f"{advice}, and {ALLOWED_SUMMARY}"
    return ALLOWED_SUMMARY


def _is_private(segment: str) -> bool:
    return segment.startswith("_") and not (segment.startswith("__") and segment.endswith("__"))


def reference_refusal(dotted: str, own_module: str | None = None) -> str | None:
    """Why a fully resolved name (`torch._C`, `gpt2_course.parts.load`) is refused, or None.

    `own_module` is the stem of the file the name appears in: a file may not take
    its own component from `parts` (layernorm.py using `parts.LayerNorm`).
    """
    segments = dotted.split(".")
    if any(_under(dotted, name) for name in EVALUATING):
        return ESCAPE_ADVICE
    if segments[0] not in ("torch", "gpt2_course") and any(_is_private(s) for s in segments[1:]):
        return OTHER_PRIVATE_ADVICE
    if segments[0] == "torch":
        if any(_is_private(s) for s in segments[1:]):
            return PRIVATE_ADVICE
        if any(_under(dotted, p) for p in TORCH_REFUSED):
            return TORCH_REFUSED_ADVICE
        return None
    if segments[0] == "gpt2_course" and len(segments) > 1:
        if _under(dotted, "gpt2_course.exercises"):
            return None
        parent, member = ".".join(segments[:2]), segments[1]
        if member not in COURSE_MEMBERS["gpt2_course"]:
            return _module_advice(parent)
        if len(segments) > 2 and parent in COURSE_MEMBERS:
            name = segments[2]
            if name not in COURSE_MEMBERS[parent]:
                allowed = ", ".join(f"`{m}`" for m in sorted(COURSE_MEMBERS[parent]))
                if parent == "gpt2_course.parts":
                    return (
                        "exercise code takes only components from parts, by name "
                        "(e.g. `parts.LayerNorm(cfg)`), and never chooses whose they are"
                    )
                return f"from {parent} an exercise file may use only {allowed}"
            if parent == "gpt2_course.parts" and own_module is not None:
                component = next((c for c in COMPONENTS if c.split(".")[1] == name), "")
                if component.split(".")[0] == own_module:
                    return (
                        f"`{name}` is the component this file defines: write it here "
                        "instead of taking it from parts"
                    )
    return None


def import_refusal(module: str) -> str | None:
    """Why an exercise file may not import `module` (an absolute name), or None."""
    if not module_allowed(module):
        return _module_advice(module)
    return reference_refusal(module)


# --------------------------------------------------------------------------- rule 2: escape hatches

# Builtins that evaluate or import code, reach the interpreter's namespaces or files.
REFUSED_NAMES = frozenset(
    {
        "eval",
        "exec",
        "compile",
        "__import__",
        "globals",
        "locals",
        "vars",
        "open",
        "breakpoint",
        "input",
        "help",
        "exit",
        "quit",
        "__builtins__",
        "__loader__",
        "__spec__",
        "__build_class__",
    }
)
# Module-level names that steer how Python imports; exercise code never sets them.
REFUSED_STORES = frozenset(
    {"__package__", "__path__", "__spec__", "__loader__", "__builtins__", "__name__", "__file__"}
)
# Allowed only with a plain string literal as the attribute name (which is then checked too).
GETATTR_NAMES = frozenset({"getattr", "setattr", "delattr", "hasattr"})
# Attributes into the interpreter's internals: namespaces, frames, code, the import system.
ESCAPE_ATTRIBUTES = frozenset(
    {
        "__dict__",
        "__globals__",
        "__builtins__",
        "__subclasses__",
        "__bases__",
        "__base__",
        "__mro__",
        "__code__",
        "__closure__",
        "__wrapped__",
        "__self__",
        "__loader__",
        "__spec__",
        "__import__",
        "__getattribute__",
        "__getattr__",
        "__setattr__",
        "__delattr__",
        "__reduce__",
        "__reduce_ex__",
        "f_globals",
        "f_locals",
        "f_back",
        "f_builtins",
        "f_code",
        "tb_frame",
        "gi_frame",
        "cr_frame",
        "ag_frame",
        "_getframe",
        "meta_path",
        "path_hooks",
        "path_importer_cache",
    }
)
# Modules reached as attributes of allowed ones (`torch.sys`, `collections._sys`).
ESCAPE_MODULE_ATTRIBUTES = frozenset(
    {
        "sys",
        "os",
        "importlib",
        "builtins",
        "subprocess",
        "ctypes",
        "gc",
        "inspect",
        "pickle",
        "marshal",
        "io",
        "pathlib",
        "shutil",
        "socket",
        "runpy",
        "imp",
        "posix",
        "nt",
        "bootstrap",
        "bootstrap_external",
        "frozen_importlib",
    }
)

ESCAPE_ADVICE = "exercise code never needs it, and it reaches around the rules the checks apply"
COMPUTED_NAME_ADVICE = (
    "write the attribute out (`obj.name`): a name computed at run time hides what the code uses"
)


def escape_attribute(name: str) -> bool:
    """True for an attribute name the scan refuses wherever it appears."""
    return name in ESCAPE_ATTRIBUTES or name.lstrip("_") in ESCAPE_MODULE_ATTRIBUTES


# --------------------------------------------------------------------------- rule 3: shortcuts


def _each(advice: str, *qualnames: str) -> list[Shortcut]:
    return [Shortcut(q, advice) for q in qualnames]


_LOOKUPS = (
    "torch.nn.functional.embedding",
    "torch.embedding",
    "torch.nn.Embedding",
    "torch.nn.functional.embedding_bag",
    "torch.embedding_bag",
    "torch.nn.EmbeddingBag",
)
_NORMS = (
    "torch.nn.functional.layer_norm",
    "torch.layer_norm",
    "torch.native_layer_norm",
    "torch.nn.LayerNorm",
    "torch.nn.functional.rms_norm",
    "torch.rms_norm",
    "torch.nn.RMSNorm",
    "torch.nn.functional.group_norm",
    "torch.group_norm",
    "torch.native_group_norm",
    "torch.nn.GroupNorm",
    "torch.nn.functional.instance_norm",
    "torch.instance_norm",
    "torch.nn.InstanceNorm1d",
    "torch.nn.InstanceNorm2d",
    "torch.nn.InstanceNorm3d",
    "torch.nn.LazyInstanceNorm1d",
    "torch.nn.LazyInstanceNorm2d",
    "torch.nn.LazyInstanceNorm3d",
    "torch.nn.functional.batch_norm",
    "torch.batch_norm",
    "torch.native_batch_norm",
    "torch.nn.BatchNorm1d",
    "torch.nn.BatchNorm2d",
    "torch.nn.BatchNorm3d",
    "torch.nn.LazyBatchNorm1d",
    "torch.nn.LazyBatchNorm2d",
    "torch.nn.LazyBatchNorm3d",
    "torch.nn.SyncBatchNorm",
)
_ATTENTION = (
    "torch.nn.functional.scaled_dot_product_attention",
    "torch.nn.MultiheadAttention",
    "torch.nn.functional.multi_head_attention_forward",
    "torch.nn.attention",  # the module: sdpa_kernel, flex_attention, bias.causal_lower_right, ...
)
_MASKS = ("torch.nn.Transformer.generate_square_subsequent_mask",)
_GELU = ("torch.nn.functional.gelu", "torch.nn.GELU")
_TORCH_TRANSFORMERS = (
    "torch.nn.Transformer",
    "torch.nn.TransformerEncoder",
    "torch.nn.TransformerEncoderLayer",
    "torch.nn.TransformerDecoder",
    "torch.nn.TransformerDecoderLayer",
)

# Per check id (exactly the registry's), the torch calls that would skip the exercise.
# Every check also has the import and escape-hatch rules above; an empty list means
# those are all it needs (no torch call does the exercise's work for it).
SHORTCUTS: dict[str, list[Shortcut]] = {
    # plain Python; the tokenizers that would do it (transformers, tiktoken, the course's
    # gpt2_course.tokenizer) are refused by the import rules
    "bpe.bpe_encode": [],
    "embeddings.Embedding": _each("look the rows of W_E up yourself", *_LOOKUPS),
    "embeddings.PositionalEmbedding": _each("take the rows of W_pos yourself", *_LOOKUPS),
    # a matrix product and a bias are the exercise; F.linear is that same product
    "embeddings.Unembedding": [],
    "layernorm.LayerNorm": _each("write the normalisation yourself", *_NORMS),
    "attention.single_head_attention": [
        *_each("build the causal mask yourself", *_MASKS),
        *_each("write the attention yourself", *_ATTENTION, *_TORCH_TRANSFORMERS),
    ],
    "attention.MultiHeadAttention.apply_causal_mask": _each(
        "build the causal mask yourself", *_MASKS, "torch.nn.attention"
    ),
    "attention.MultiHeadAttention": [
        *_each("build the causal mask yourself", *_MASKS),
        *_each("write the attention yourself", *_ATTENTION, *_TORCH_TRANSFORMERS),
    ],
    "mlp.gelu_new": _each("write GPT-2's tanh GELU yourself", *_GELU),
    "mlp.MLP": _each("write GPT-2's tanh GELU yourself, in gelu_new", *_GELU),
    "block.TransformerBlock": [
        *_each(
            "write the residual block yourself, from ln1, attn, ln2 and mlp", *_TORCH_TRANSFORMERS
        ),
        *_each("normalise with the block's own ln1 and ln2", *_NORMS),
        *_each("attend with the block's own attn", *_ATTENTION, *_MASKS),
        *_each("use the block's own mlp", *_GELU),
    ],
    "transformer.Transformer": [
        *_each("build the model from its blocks (self.blocks)", *_TORCH_TRANSFORMERS),
        *_each("embed with self.embed and self.pos_embed", *_LOOKUPS),
        *_each("normalise with the model's own LayerNorms (self.ln_final)", *_NORMS),
        *_each("let the model's blocks attend", *_ATTENTION, *_MASKS),
        *_each("let the model's blocks apply the MLP", *_GELU),
    ],
    # renaming and reshaping tensors is the exercise; load_state_dict may do the copying
    "transformer.load_gpt2_weights": [],
    # F.cross_entropy is the tool the stub suggests; shifting the targets is the exercise
    "training.next_token_loss": [],
    # it must return torch.optim.AdamW: choosing the groups is the exercise
    "training.configure_optimizer": [],
    "training.lr_at_step": _each(
        "compute the warmup and the cosine yourself, with math",
        "torch.optim.lr_scheduler",
        "torch.optim.swa_utils.SWALR",
    ),
    # slicing, view, reshape and unfold are all fair: the rule (no overlap, the remainder
    # dropped, a copy) is the exercise, and the check tests each part of it
    "training.make_windows": [],
    # torch.nn.utils.clip_grad_norm_ is the tool the notebook suggests; the order of the
    # calls is the exercise, and the check compares the parameters after each step
    "training.train_step": [],
    # torch has no sampler of its own; Hugging Face's are refused by the import rules
    "sampling.apply_temperature": [],
    "sampling.apply_top_k": [],
    "sampling.apply_top_p": [],
    "sampling.apply_frequency_penalty": [],
    "sampling.sample_next_token": [],
    "sampling.generate": [],
    "sampling.beam_step": [],
    "sampling.beam_search": [],
    # the cache is the exercise; attention itself was notebook 03's, so torch's fused
    # F.scaled_dot_product_attention is welcome here (the reference uses it)
    "kv_cache.KVCache": [],
    "kv_cache.forward_with_cache": [],
    "kv_cache.generate_with_cache": [],
    # renaming and reshaping tensors is the exercise, as in load_gpt2_weights; Hugging Face's
    # and TransformerLens's own converters are refused by the import rules
    "inside.to_hf_state_dict": [],
    # indexing an attention pattern is the exercise; no torch call does it
    "inside.previous_token_score": [],
    "inside.induction_score": [],
    "inside.logit_lens": _each("normalise with the model's own ln_final", *_NORMS),
    # the hook is the exercise; the model it is given brings run_with_hooks
    "inside.ablate_head": [],
}

# The exercise file each check's component lives in.
CHECK_FILES: dict[str, str] = {cid: f"{cid.split('.')[0]}.py" for cid in SHORTCUTS}


def file_of(check_id: str) -> str:
    """The exercise file of a check's component: "mlp.gelu_new" -> "mlp.py"."""
    return CHECK_FILES.get(check_id, f"{check_id.split('.')[0]}.py")


def shortcuts_for(check_id: str | None) -> list[Shortcut]:
    """The shortcuts a check refuses ([] for None or a check without any)."""
    if check_id is None:
        return []
    if check_id in SHORTCUTS:
        return SHORTCUTS[check_id]
    return SHORTCUTS.get(".".join(check_id.split(".")[:2]), [])


def describe_policy(check_id: str | None) -> str:
    """What a check refuses, in words (for a notebook or the README)."""
    lines = [f"Imports: {ALLOWED_SUMMARY}."]
    lines.append(
        "Never: eval, exec, compile, __import__, globals, vars, open, getattr with a computed "
        "name, x.__dict__ and other interpreter internals, torch.sys / torch.ops / torch._C."
    )
    by_advice: dict[str, list[str]] = {}
    for s in shortcuts_for(check_id):
        by_advice.setdefault(s.advice, []).append(s.qualname)
    for advice, names in by_advice.items():
        lines.append(f"Not {', '.join(names)}: {advice}.")
    return "\n".join(lines)


def feedback(violations: Iterable[Violation], limit: int = 5) -> str:
    """The violations as feedback lines, the first `limit` of them."""
    messages = list(dict.fromkeys(v.message for v in violations))
    shown = messages[:limit]
    if len(messages) > limit:
        shown.append(f"... and {len(messages) - limit} more")
    return "\n".join(shown)


# --------------------------------------------------------------------------- resolving names


def _torch() -> ModuleType | None:
    try:
        return importlib.import_module("torch")
    except Exception:  # pragma: no cover - the course always has torch
        return None


def _walk(dotted: str) -> Iterator[Any]:
    """The objects named by each prefix of a `torch....` name (attribute lookups only)."""
    segments = dotted.split(".")
    if segments[0] != "torch":
        return
    obj: Any = _torch()
    if obj is None:
        return
    for segment in segments[1:]:
        if _is_private(segment):
            return
        try:
            obj = getattr(obj, segment)
        except Exception:
            return
        yield obj


def _lookup(qualname: str) -> Any:
    """The object a public torch name stands for, or None where this torch has none."""
    objects = list(_walk(qualname))
    return objects[-1] if len(objects) == len(qualname.split(".")) - 1 else None


_OBJECTS: dict[tuple[Shortcut, ...], list[tuple[Any, Shortcut]]] = {}


def _shortcut_objects(shortcuts: list[Shortcut]) -> list[tuple[Any, Shortcut]]:
    key = tuple(shortcuts)
    if key not in _OBJECTS:
        found = [(_lookup(s.qualname), s) for s in shortcuts]
        _OBJECTS[key] = [(obj, s) for obj, s in found if obj is not None]
    return _OBJECTS[key]


def match_shortcut(dotted: str, shortcuts: list[Shortcut]) -> Shortcut | None:
    """The shortcut a resolved name uses (the most specific one), or None.

    A name matches a shortcut it equals or lies under (`torch.nn.LayerNorm.forward`),
    and so does another name of the same object (`torch.nn.modules.normalization.
    LayerNorm`), a subclass of a refused class, or a member of a refused module.
    """
    if not shortcuts or not dotted:
        return None
    by_name = [s for s in shortcuts if _under(dotted, s.qualname)]
    if by_name:
        return max(by_name, key=lambda s: len(s.qualname))
    if not dotted.startswith("torch."):
        return None
    objects = _shortcut_objects(shortcuts)
    for obj in _walk(dotted):
        hits = []
        for refused, shortcut in objects:
            if obj is refused:
                hits.append(shortcut)
            elif isinstance(refused, type) and isinstance(obj, type):
                if issubclass(obj, refused):
                    hits.append(shortcut)
            elif isinstance(refused, ModuleType):
                where = obj.__name__ if isinstance(obj, ModuleType) else None
                where = where or getattr(obj, "__module__", None)
                if isinstance(where, str) and _under(where, refused.__name__):
                    hits.append(shortcut)
        if hits:
            return max(hits, key=lambda s: len(s.qualname))
    return None


# --------------------------------------------------------------------------- the source scan


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it was imported as (relative imports start with ".")."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    root = alias.name.split(".")[0]
                    aliases[root] = root
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            for alias in node.names:
                if alias.name != "*":
                    joined = f"{base}.{alias.name}" if node.module else f"{base}{alias.name}"
                    aliases[alias.asname or alias.name] = joined
    return aliases


def _literal(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _display(filename: str) -> str:
    return Path(filename).name or filename


class _Scanner(ast.NodeVisitor):
    """Walks a file (module rules) or a component's part of it (shortcut rules)."""

    def __init__(
        self,
        filename: str,
        aliases: dict[str, str],
        *,
        module_rules: bool,
        shortcuts: list[Shortcut],
    ):
        self.filename = filename
        self.aliases = aliases
        self.module_rules = module_rules
        self.shortcuts = shortcuts
        self.own_module = Path(filename).stem
        self.called: set[int] = set()
        self.handled: set[int] = set()
        self.out: list[Violation] = []

    # ---- reporting

    def report(
        self, node: ast.AST, verb: str, written: str, advice: str, kind: str, qual: str = ""
    ) -> None:
        written = written if len(written) <= 80 else written[:77] + "..."
        extra = ""
        if qual and qual.split(".")[-1] != written.split(".")[-1] and not qual.startswith("."):
            extra = f" (`{qual}`)"
        message = (
            f"not accepted: `{_display(self.filename)}` line {getattr(node, 'lineno', 0)} "
            f"{verb} `{written}`{extra}; {advice}"
        )
        self.out.append(Violation(self.filename, getattr(node, "lineno", 0), message, kind))

    def verb(self, node: ast.AST) -> str:
        return "calls" if id(node) in self.called else "uses"

    # ---- names

    def resolve(self, node: ast.AST) -> str | None:
        """The dotted name an expression stands for, through the file's imports."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            return f"{base}.{node.attr}" if base else None
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and _literal(node.args[1]) is not None
        ):
            base = self.resolve(node.args[0])
            return f"{base}.{_literal(node.args[1])}" if base else None
        return None

    def check_dotted(self, node: ast.AST, dotted: str | None, written: str, verb: str) -> None:
        if not dotted or dotted.startswith("."):
            return
        if self.module_rules and not self.import_reported(node):
            advice = reference_refusal(dotted, self.own_module)
            if advice:
                self.report(node, verb, written, advice, "escape", dotted)
        shortcut = match_shortcut(dotted, self.shortcuts)
        if shortcut:
            self.report(node, verb, written, shortcut.advice, "shortcut", dotted)

    def import_reported(self, node: ast.AST) -> bool:
        """True when the name at the root of `node` came from an import already reported."""
        while isinstance(node, ast.Attribute):
            node = node.value
        if isinstance(node, ast.Call) and node.args:  # getattr(module, "name")
            return self.import_reported(node.args[0])
        if not isinstance(node, ast.Name) or node.id not in self.aliases:
            return False
        target = self.aliases[node.id]
        if target.startswith(".") or import_refusal(target) is None:
            return False
        # `import a.b` refused, or `from a import b` refused for a or for b
        module = target.rpartition(".")[0]
        return import_refusal(module) is not None or reference_refusal(target) is not None

    def check_chain(self, node: ast.expr) -> None:
        """A name or an attribute chain (`torch.nn.functional.layer_norm`), once, at its top."""
        attrs: list[str] = []
        base: ast.expr = node
        while isinstance(base, ast.Attribute):
            attrs.append(base.attr)
            base = base.value
        written = ast.unparse(node)
        verb = self.verb(node)
        store = not isinstance(getattr(node, "ctx", ast.Load()), ast.Load)
        before = len(self.out)
        if self.module_rules:
            for attr in attrs:
                if escape_attribute(attr):
                    self.report(node, verb, written, ESCAPE_ADVICE, "escape")
                    break
            if isinstance(base, ast.Name) and id(base) not in self.handled:
                if base.id in REFUSED_NAMES:
                    verb = "uses" if attrs else verb
                    self.report(node, verb, written, ESCAPE_ADVICE, "escape")
                elif base.id in GETATTR_NAMES:
                    self.report(node, "uses", written, COMPUTED_NAME_ADVICE, "escape")
            if store and attrs and isinstance(base, ast.Name) and base.id in self.aliases:
                self.report(
                    node,
                    "changes",
                    written,
                    "exercise code does not change torch's or the course's modules",
                    "escape",
                )
        if not store and len(self.out) == before:  # one sentence per name is enough
            self.check_dotted(node, self.resolve(node), written, verb)
        if not isinstance(base, ast.Name):
            self.visit(base)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.check_chain(node)
        elif self.module_rules and node.id in REFUSED_STORES:
            self.report(node, "changes", node.id, "it steers how Python imports", "escape")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.check_chain(node)

    # ---- calls

    def visit_Call(self, node: ast.Call) -> None:
        self.called.add(id(node.func))
        func = node.func
        if isinstance(func, ast.Name) and func.id in GETATTR_NAMES:
            self.handled.add(id(func))
            self.check_getattr(node, func.id)
        elif self.resolve(func) in ("operator.attrgetter", "operator.methodcaller"):
            self.check_attrgetter(node)
        self.generic_visit(node)

    def check_getattr(self, node: ast.Call, function: str) -> None:
        name = _literal(node.args[1]) if len(node.args) >= 2 else None
        if name is None:
            if self.module_rules:
                self.report(node, "calls", function, COMPUTED_NAME_ADVICE, "escape")
            return
        written = ast.unparse(node)
        if self.module_rules and escape_attribute(name):
            self.report(node, "calls", written, ESCAPE_ADVICE, "escape")
        target = self.resolve(node.args[0])
        if target is None or target.startswith("."):
            return
        if function in ("setattr", "delattr"):
            if self.module_rules:
                self.report(
                    node,
                    "calls",
                    written,
                    "exercise code does not change torch's or the course's modules",
                    "escape",
                )
            return
        self.check_dotted(node, f"{target}.{name}", written, self.verb(node))

    def check_attrgetter(self, node: ast.Call) -> None:
        if not self.module_rules:
            return
        for arg in node.args:
            name = _literal(arg)
            if name is None:
                self.report(node, "calls", ast.unparse(node.func), COMPUTED_NAME_ADVICE, "escape")
                return
            if any(escape_attribute(part) for part in name.split(".")):
                self.report(node, "calls", ast.unparse(node), ESCAPE_ADVICE, "escape")
                return

    # ---- imports

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if self.module_rules:
                advice = import_refusal(alias.name)
                if advice:
                    self.report(node, "imports", alias.name, advice, "import")
                    continue
            shortcut = match_shortcut(alias.name, self.shortcuts)
            if shortcut:
                self.report(node, "imports", alias.name, shortcut.advice, "shortcut")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level:
            if self.module_rules and node.level > 1:
                written = "." * node.level + module
                self.report(
                    node,
                    "imports from",
                    written,
                    "import only your own exercise files (`from .layernorm import LayerNorm`) "
                    "or the course by its full name (`from gpt2_course.config import ...`)",
                    "import",
                )
            return
        if self.module_rules:
            advice = import_refusal(module)
            if advice:
                self.report(node, "imports", module, advice, "import")
                return
        for alias in node.names:
            if alias.name == "*":
                if self.module_rules:
                    self.report(
                        node,
                        "imports",
                        f"{module}.*",
                        "import names one by one (`from torch import nn`), so that the checks "
                        "can read what your code uses",
                        "import",
                    )
                continue
            dotted = f"{module}.{alias.name}"
            if self.module_rules:
                advice = reference_refusal(dotted, self.own_module)
                if advice:
                    self.report(node, "imports", dotted, advice, "import")
                    continue
            shortcut = match_shortcut(dotted, self.shortcuts)
            if shortcut:
                self.report(node, "imports", dotted, shortcut.advice, "shortcut")


# ---- which part of a file a check reads

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _names_used(node: ast.AST) -> tuple[set[str], set[str]]:
    """Names loaded in `node`, and attributes of self / cls / a class name."""
    names, attributes = set(), set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
            names.add(sub.id)
        elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
            attributes.add(sub.attr)
    return names, attributes


def _import_time_parts(node: ast.AST) -> list[ast.AST]:
    """What of a definition runs when the file is imported: decorators, defaults, bases."""
    parts: list[ast.AST] = list(getattr(node, "decorator_list", []))
    if isinstance(node, ast.ClassDef):
        parts += node.bases + [k.value for k in node.keywords]
    else:
        args = node.args  # type: ignore[attr-defined]
        parts += [d for d in args.defaults + args.kw_defaults if d is not None]
    return parts


def _scope(tree: ast.Module, path: list[str]) -> tuple[list[ast.AST], list[ast.stmt]] | None:
    """The nodes a check's shortcut rules read, and the imports that bind its component.

    That is: the component's definition (a class, a function, or one method of a
    class and the rest of the class body that is not a method), every top-level
    definition or method it refers to, however indirectly, and the module-level
    statements (which run for every component), imports excepted: an import is
    judged where the name it binds is used. Decorated definitions are read whole
    too. None when the file does not define the component (then the whole file
    is read).
    """
    top = {n.name: n for n in tree.body if isinstance(n, _DEFS)}
    statements = [n for n in tree.body if not isinstance(n, _DEFS)]
    module_code = [n for n in statements if not isinstance(n, (ast.Import, ast.ImportFrom))]
    binders = [
        n
        for n in statements
        if isinstance(n, (ast.Import, ast.ImportFrom))
        and any((a.asname or a.name.split(".")[0]) == path[0] for a in n.names)
    ]
    if path[0] not in top and not binders:
        return None
    whole: set[str] = set()  # top-level definitions read whole
    methods: dict[str, set[str]] = {}  # class -> the methods read
    queue: list[ast.AST] = list(module_code)
    # a decorator can register a definition anywhere (`@REGISTRY.add`): read those whole
    for name, node in top.items():
        if node.decorator_list and name != path[0]:
            whole.add(name)
            queue.append(node)
    if path[0] in top:
        node = top[path[0]]
        if len(path) > 1 and isinstance(node, ast.ClassDef):
            own = {n.name: n for n in node.body if isinstance(n, _DEFS)}
            if path[1] in own:
                methods[node.name] = {path[1]}
                queue += [own[path[1]], *_import_time_parts(node)]
                queue += [n for n in node.body if not isinstance(n, _DEFS)]
            else:
                whole.add(node.name)
                queue.append(node)
        else:
            whole.add(node.name)
            queue.append(node)
    seen: set[int] = set()
    while queue:
        node = queue.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        names, attributes = _names_used(node)
        # a method naming its own class (super(C, self), C.CONSTANT) keeps the scope narrow
        for name in (names & set(top)) - whole - set(methods):
            whole.add(name)
            queue.append(top[name])
        for cls, read in methods.items():
            if cls in whole:
                continue
            own = {n.name: n for n in top[cls].body if isinstance(n, _DEFS)}
            for name in (attributes & set(own)) - read:
                read.add(name)
                queue.append(own[name])
    nodes: list[ast.AST] = list(module_code)
    for name, node in top.items():
        if name in whole:
            nodes.append(node)
        elif name in methods:
            assert isinstance(node, ast.ClassDef)
            nodes += _import_time_parts(node)
            nodes += [n for n in node.body if not isinstance(n, _DEFS) or n.name in methods[name]]
        else:
            nodes += _import_time_parts(node)
    return nodes, binders


def _parse(source: str, filename: str) -> ast.Module | None:
    try:
        return ast.parse(source, filename=filename)
    except (SyntaxError, ValueError):  # the checks report syntax errors themselves
        return None


def _dedupe(violations: list[Violation]) -> list[Violation]:
    unique = list(dict.fromkeys(violations))
    return sorted(unique, key=lambda v: (v.filename, v.line))


def scan_source(
    source: str, filename: str, check_id: str | None, *, whole_file: bool = False
) -> list[Violation]:
    """Everything in one exercise file that `check_id` does not accept (module rules always).

    The import and escape-hatch rules read the whole file. The check's shortcut
    rules read the part of the file its component runs (see `_scope`), or the
    whole file with `whole_file=True` or when the file does not define the
    component. A file with a syntax error gives no violations.
    """
    tree = _parse(source, filename)
    if tree is None:
        return []
    aliases = _aliases(tree)
    module_scan = _Scanner(filename, aliases, module_rules=True, shortcuts=[])
    module_scan.visit(tree)
    found = module_scan.out
    shortcuts = shortcuts_for(check_id)
    if shortcuts:
        scanner = _Scanner(filename, aliases, module_rules=False, shortcuts=shortcuts)
        path = check_id.split(".")[1:] if check_id else []
        scope = None if whole_file or not path else _scope(tree, path)
        if scope is None:
            scanner.visit(tree)
        else:
            nodes, binders = scope
            for node in nodes:
                scanner.visit(node)
            for node in binders:  # `from torch.nn.functional import gelu as gelu_new`
                for alias in node.names:
                    if (alias.asname or alias.name.split(".")[0]) != path[0]:
                        continue
                    dotted = _aliases(ast.Module(body=[node], type_ignores=[])).get(path[0], "")
                    shortcut = match_shortcut(dotted, shortcuts)
                    if shortcut:
                        scanner.report(node, "imports", dotted, shortcut.advice, "shortcut")
        found = found + scanner.out
    return _dedupe(found)


def _imported_files(tree: ast.Module, folder: Path, here: Path) -> list[Path]:
    """The .py files in `folder` that a file (in `here`) imports, relatively or by full name."""
    targets: list[list[str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[:2] == ["gpt2_course", "exercises"] and len(parts) > 2:
                    targets.append(parts[2:])
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 1:
                base = here.relative_to(folder).parts + tuple(parts)
            elif node.level == 0 and parts[:2] == ["gpt2_course", "exercises"]:
                base = tuple(parts[2:])
            else:
                continue
            targets.append(list(base))
            targets += [[*base, alias.name] for alias in node.names if alias.name != "*"]
    found = []
    for parts in targets:
        if not parts:
            continue
        for candidate in (
            folder.joinpath(*parts).with_suffix(".py"),
            folder.joinpath(*parts, "__init__.py"),
        ):
            if candidate.is_file():
                found.append(candidate)
    return found


def scan_submission(exercise_dir: Path | str, check_id: str | None) -> list[Violation]:
    """What `check_id` does not accept in a folder of exercise files.

    The module rules and the check's shortcut rules on the check's own file
    (`<module>.py`), and both again on every other file of the folder that it
    imports, directly or not (there, the whole file is read). Violations name
    files relative to the folder. With `check_id=None`: the module rules on
    every .py file of the folder. A missing file gives no violations (the
    check reports it).
    """
    folder = Path(exercise_dir)
    if check_id is None:
        files = sorted(folder.rglob("*.py"))
        found: list[Violation] = []
        for path in files:
            source = path.read_bytes().decode("utf-8", errors="replace")
            found += scan_source(source, path.relative_to(folder).as_posix(), None)
        return _dedupe(found)
    main = folder / file_of(check_id)
    if not main.is_file():
        return []
    found = []
    queue, seen = [main], set()
    while queue:
        path = queue.pop(0)
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        source = path.read_bytes().decode("utf-8", errors="replace")
        name = path.relative_to(folder).as_posix()
        found += scan_source(source, name, check_id, whole_file=path != main)
        tree = _parse(source, name)
        if tree is not None:
            queue += _imported_files(tree, folder, path.parent)
    return _dedupe(found)


# --------------------------------------------------------------------------- the runtime guard


def _own_code_file() -> str:
    return _own_code_file.__code__.co_filename


_THIS_FILE = _own_code_file()
_BOOTSTRAP = ("<frozen importlib", os.path.join("importlib", "__init__.py"))


def _caller(skip_importlib: bool = False) -> FrameType | None:
    """The first frame outside this module (and, if asked, outside the import machinery)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if name == _THIS_FILE or (skip_importlib and name.startswith(_BOOTSTRAP[0])):
            frame = frame.f_back
        elif skip_importlib and name.endswith(_BOOTSTRAP[1]):
            frame = frame.f_back
        else:
            return frame
    return None


class _Guard:
    """The state of one `runtime_guard`: what it patched, so that all of it is undone."""

    def __init__(self, check_id: str | None, learner_dir: Path | str):
        self.check_id = check_id
        self.root = os.path.realpath(str(learner_dir))
        self.active = False
        self.inside_cache: dict[str, bool] = {}
        self.undo: list[Callable[[], None]] = []
        self.originals: dict[int, tuple[Any, Any]] = {}  # id(original) -> (original, wrapper)
        self.rebound: list[tuple[dict[str, Any], str, Any, Any]] = []

    # ---- whose code is calling

    def inside(self, filename: str) -> bool:
        known = self.inside_cache.get(filename)
        if known is None:
            if not filename or filename.startswith("<"):
                known = False
            else:
                real = os.path.realpath(filename)
                known = real == self.root or real.startswith(self.root + os.sep)
            self.inside_cache[filename] = known
        return known

    def learner_frame(self, frame: FrameType | None) -> bool:
        return frame is not None and self.active and self.inside(frame.f_code.co_filename)

    def where(self, frame: FrameType) -> str:
        return f"`{os.path.basename(frame.f_code.co_filename)}` line {frame.f_lineno}"

    # ---- patching, with its undoing recorded

    def set(self, owner: Any, attr: str, value: Any) -> None:
        if isinstance(owner, type):
            had, old = attr in owner.__dict__, owner.__dict__.get(attr)
        else:
            had, old = hasattr(owner, attr), getattr(owner, attr, None)
        setattr(owner, attr, value)

        def undo() -> None:
            if had:
                setattr(owner, attr, old)
            else:
                delattr(owner, attr)

        self.undo.append(undo)

    def wrap(self, original: Any, refuse: Callable[[FrameType], str]) -> Any:
        guard = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            frame = _caller()
            if guard.learner_frame(frame):
                assert frame is not None
                raise ShortcutRefused(refuse(frame))
            return original(*args, **kwargs)

        for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
            try:
                setattr(wrapper, attr, getattr(original, attr))
            except (AttributeError, TypeError):
                pass
        return wrapper

    def refuse_callable(self, owner: Any, attr: str, label: str, advice: str) -> None:
        """Make `owner.attr` refuse learner callers (a function, or a class's __init__)."""
        if isinstance(owner, type):
            raw = owner.__dict__.get(attr)
            if raw is None:  # inherited: the wrapper goes on this class, the undo removes it
                raw = getattr(owner, attr, None)
                if not isinstance(raw, FunctionType):
                    return
        else:
            raw = getattr(owner, attr, None)
        if raw is None:
            return
        if isinstance(raw, (staticmethod, classmethod)):
            function = raw.__func__
        else:
            function = raw
        if not callable(function) or getattr(function, "_policy_guard", None) is self:
            return

        def message(frame: FrameType) -> str:
            return f"not accepted: {self.where(frame)} calls `{label}`; {advice}"

        wrapper = self.wrap(function, message)
        wrapper._policy_guard = self  # type: ignore[attr-defined]
        if isinstance(raw, staticmethod):
            value: Any = staticmethod(wrapper)
        elif isinstance(raw, classmethod):
            value = classmethod(wrapper)
        else:
            value = wrapper
        try:
            self.set(owner, attr, value)
        except (AttributeError, TypeError):  # a C type: its attributes are read-only
            return
        if not isinstance(owner, type):
            self.originals[id(function)] = (function, wrapper)

    def refuse_class(self, cls: type, label: str, advice: str) -> None:
        if issubclass(cls, enum.Enum):
            return
        if not isinstance(getattr(cls, "__init__", None), FunctionType):
            return
        self.refuse_callable(cls, "__init__", label, advice)

    def refuse_module(self, module: ModuleType, advice: str) -> None:
        """Every public function and class defined in `module` (and its loaded submodules)."""
        prefix = module.__name__
        loaded = [m for n, m in list(sys.modules.items()) if _under(n, prefix) and m is not None]
        for mod in loaded:
            for name, value in list(vars(mod).items()):
                if name.startswith("_"):
                    continue
                defined_in = getattr(value, "__module__", None)
                if not isinstance(defined_in, str) or not _under(defined_in, prefix):
                    continue
                label = f"{mod.__name__}.{name}"
                if isinstance(value, type):
                    self.refuse_class(value, label, advice)
                elif isinstance(value, (FunctionType, BuiltinFunctionType)):
                    self.refuse_callable(mod, name, label, advice)

    def refuse_shortcut(self, shortcut: Shortcut) -> None:
        segments = shortcut.qualname.split(".")
        owner = _lookup(".".join(segments[:-1])) if len(segments) > 2 else _torch()
        target = _lookup(shortcut.qualname)
        if owner is None or target is None:
            return  # not in this version of torch
        if isinstance(target, ModuleType):
            self.refuse_module(target, shortcut.advice)
        elif isinstance(target, type):
            self.refuse_class(target, shortcut.qualname, shortcut.advice)
        elif callable(target):
            self.refuse_callable(owner, segments[-1], shortcut.qualname, shortcut.advice)

    # ---- the learner's modules already imported hold the originals under their own names

    def learner_modules(self) -> list[ModuleType]:
        found = []
        for module in list(sys.modules.values()):
            filename = getattr(module, "__file__", None)
            if isinstance(filename, str) and self.inside(filename):
                found.append(module)
        return found

    def rebind(self) -> None:
        for module in self.learner_modules():
            namespace = vars(module)
            for name, value in list(namespace.items()):
                pair = self.originals.get(id(value))
                if pair is not None and pair[0] is value:
                    namespace[name] = pair[1]
                    self.rebound.append((namespace, name, pair[1], value))

    def unbind(self) -> None:
        """Put the originals back wherever a learner's module holds one of the wrappers."""
        wrappers = {id(w): original for original, w in self.originals.values()}
        for module in self.learner_modules():
            namespace = vars(module)
            for name, value in list(namespace.items()):
                if id(value) in wrappers:
                    namespace[name] = wrappers[id(value)]
        for namespace, name, wrapper, original in self.rebound:
            if namespace.get(name) is wrapper:
                namespace[name] = original

    # ---- imports

    def learner_package(self, name: str) -> bool:
        module = sys.modules.get(name)
        paths = getattr(module, "__path__", None) or []
        return any(os.path.realpath(str(p)) == self.root for p in paths)

    def own(self, name: str) -> bool:
        """A module of the learner's own package (or of gpt2_course.exercises)."""
        if _under(name, "gpt2_course.exercises"):
            return True
        parts = name.split(".")
        return any(self.learner_package(".".join(parts[:i])) for i in range(1, len(parts) + 1))

    def absolute_refusal(self, name: str) -> str | None:
        if self.own(name):
            return None
        return import_refusal(name)

    def import_refusal(
        self, name: str, globals_: dict[str, Any] | None, fromlist: Any, level: int
    ) -> tuple[str, str] | None:
        """(what is imported, why it is refused) for an import statement, or None."""
        if level:
            package = (globals_ or {}).get("__package__")
            if package is None and globals_:
                module_name = str(globals_.get("__name__", ""))
                package = module_name if "__path__" in globals_ else module_name.rpartition(".")[0]
            written = "." * level + name
            if level > 1 or not package or not self.own(str(package)):
                return written, "import only your own exercise files, with a single dot"
            return None
        advice = self.absolute_refusal(name)
        if advice:
            return name, advice
        if self.own(name):
            return None
        for item in fromlist or ():
            if item == "*":
                return f"{name}.*", "import names one by one"
            advice = reference_refusal(f"{name}.{item}")
            if advice:
                return f"{name}.{item}", advice
        return None

    def install_imports(self) -> None:
        guard = self
        original_import = builtins.__import__

        def guarded_import(
            name: str,
            globals: dict[str, Any] | None = None,
            locals: Any = None,
            fromlist: Any = (),
            level: int = 0,
        ) -> Any:
            frame = _caller()
            if guard.learner_frame(frame):
                assert frame is not None
                refused = guard.import_refusal(name, globals, fromlist, level)
                if refused:
                    raise ImportRefused(
                        f"not accepted: {guard.where(frame)} imports `{refused[0]}`; {refused[1]}",
                        name=name,
                    )
                imported = original_import(name, globals, locals, fromlist, level)
                # a refused module's submodule loaded just now: refused too, before the
                # statement binds its names (`from torch.nn.attention.bias import ...`)
                guard.refresh()
                return imported
            return original_import(name, globals, locals, fromlist, level)

        self.set(builtins, "__import__", guarded_import)

        original_import_module = importlib.import_module

        def guarded_import_module(name: str, package: str | None = None) -> Any:
            frame = _caller()
            if guard.learner_frame(frame):
                assert frame is not None
                absolute = name
                if name.startswith("."):
                    absolute = importlib.util.resolve_name(name, package)
                advice = guard.absolute_refusal(absolute)
                if advice:
                    raise ImportRefused(
                        f"not accepted: {guard.where(frame)} imports `{absolute}`; {advice}",
                        name=absolute,
                    )
            return original_import_module(name, package)

        self.set(importlib, "import_module", guarded_import_module)

        finder = _Finder(self)
        sys.meta_path.insert(0, finder)

        def remove_finder() -> None:
            sys.meta_path[:] = [f for f in sys.meta_path if f is not finder]

        self.undo.append(remove_finder)

    def refresh(self) -> None:
        """Refuse the members of refused modules' submodules that were loaded since."""
        for shortcut in shortcuts_for(self.check_id):
            if isinstance(_lookup(shortcut.qualname), ModuleType):
                self.refuse_shortcut(shortcut)

    def install_parts(self) -> None:
        """parts' functions that choose implementations refuse learner callers."""
        parts = sys.modules.get("gpt2_course.parts")
        if parts is None:
            return
        advice = (
            "exercise code takes only components from parts, by name (e.g. "
            "`parts.LayerNorm(cfg)`), and never chooses whose they are"
        )
        for name in ("load", "get", "use_solution", "use_mine", "using"):
            if callable(getattr(parts, name, None)):
                self.refuse_callable(parts, name, f"parts.{name}", advice)

    def install(self) -> None:
        self.active = True
        for shortcut in shortcuts_for(self.check_id):
            self.refuse_shortcut(shortcut)
        self.install_parts()
        self.install_imports()
        self.rebind()

    def uninstall(self) -> None:
        self.active = False
        try:
            self.unbind()
        finally:
            while self.undo:
                self.undo.pop()()


class _Finder(importlib.abc.MetaPathFinder):
    """Refuses, for learner code, imports that reach the import system another way."""

    def __init__(self, guard: _Guard):
        self.guard = guard

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        frame = _caller(skip_importlib=True)
        if self.guard.learner_frame(frame):
            assert frame is not None
            advice = self.guard.absolute_refusal(fullname)
            if advice:
                raise ImportRefused(
                    f"not accepted: {self.guard.where(frame)} imports `{fullname}`; {advice}",
                    name=fullname,
                )
        return None  # not ours to find: the next finder does

    def invalidate_caches(self) -> None:
        pass


@contextmanager
def runtime_guard(check_id: str | None, learner_dir: Path | str) -> Iterator[None]:
    """While active: `check_id`'s shortcuts and non-allowlisted imports refuse learner code.

    Learner code is code whose file lies in `learner_dir`. A refused call raises
    `ShortcutRefused`, a refused import `ImportRefused` (also an ImportError),
    both with a "not accepted: ..." message naming the file and line. Only the
    direct caller counts: course code calling the same torch function in the
    same run is untouched. Everything is restored on exit, after an error too.
    Defence in depth behind the source scan, not a sandbox.
    """
    guard = _Guard(check_id, learner_dir)
    try:
        guard.install()
        yield
    finally:
        guard.uninstall()


def exercises_dir() -> Path:
    """The folder of the learner's own exercise files in this checkout (the notebook's case)."""
    return Path(__file__).resolve().parents[1] / "exercises"


__all__ = [
    "ALLOWED_MODULES",
    "ALLOWED_PACKAGES",
    "CHECK_FILES",
    "ImportRefused",
    "SHORTCUTS",
    "Shortcut",
    "ShortcutRefused",
    "Violation",
    "describe_policy",
    "exercises_dir",
    "feedback",
    "file_of",
    "import_refusal",
    "match_shortcut",
    "module_allowed",
    "reference_refusal",
    "runtime_guard",
    "scan_source",
    "scan_submission",
    "shortcuts_for",
]
