"""The shortcut policy (gpt2_course/policy.py): what exercise files may import and call.

Fast: no model is built. The source scan is tested on small sources written here,
on every solution and stub, and on folders; the runtime guard on learner files
written into tmp_path and imported with importlib, as the runner does.
"""

import builtins
import importlib
import itertools
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2_course import policy
from gpt2_course.policy import (
    SHORTCUTS,
    ImportRefused,
    Shortcut,
    ShortcutRefused,
    runtime_guard,
    scan_source,
    scan_submission,
)

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
STUBS = ROOT / "gpt2_course" / "exercises"


def scan(source: str, filename: str = "layernorm.py", check_id: str | None = None) -> list:
    return scan_source(textwrap.dedent(source), filename, check_id)


def messages(violations: list) -> str:
    return "\n".join(v.message for v in violations)


# --------------------------------------------------------------------------- the table


def test_the_table_has_exactly_the_registry_check_ids():
    from gpt2_course.checks import all_checks

    assert set(SHORTCUTS) == set(all_checks())


def test_no_check_lists_a_shortcut_twice():
    for check_id, shortcuts in SHORTCUTS.items():
        names = [s.qualname for s in shortcuts]
        assert len(names) == len(set(names)), check_id


def test_every_check_file_exists_in_solutions_and_stubs():
    for check_id, filename in policy.CHECK_FILES.items():
        assert (SOLUTIONS / filename).is_file(), check_id
        assert (STUBS / filename).is_file(), check_id
    assert policy.file_of("attention.MultiHeadAttention.apply_causal_mask") == "attention.py"


@pytest.mark.parametrize(
    "shortcut", sorted({s for ss in SHORTCUTS.values() for s in ss}, key=lambda s: s.qualname)
)
def test_every_shortcut_names_a_torch_object_that_exists(shortcut: Shortcut):
    assert policy._lookup(shortcut.qualname) is not None, shortcut.qualname
    assert shortcut.advice and not shortcut.advice.endswith(".")


def test_the_torch_calls_that_skip_each_exercise_are_in_the_table():
    def refused(check_id: str) -> set[str]:
        return {s.qualname for s in SHORTCUTS[check_id]}

    assert {"torch.nn.functional.layer_norm", "torch.nn.LayerNorm", "torch.layer_norm"} <= refused(
        "layernorm.LayerNorm"
    )
    assert {
        "torch.nn.functional.scaled_dot_product_attention",
        "torch.nn.MultiheadAttention",
        "torch.nn.functional.multi_head_attention_forward",
        "torch.nn.attention",
    } <= refused("attention.MultiHeadAttention")
    assert {"torch.nn.functional.gelu", "torch.nn.GELU"} <= refused("mlp.gelu_new")
    assert {"torch.nn.functional.gelu", "torch.nn.GELU"} <= refused("mlp.MLP")
    for check_id in ("embeddings.Embedding", "embeddings.PositionalEmbedding"):
        assert {"torch.nn.functional.embedding", "torch.nn.Embedding", "torch.embedding"} <= (
            refused(check_id)
        )
    for check_id in ("block.TransformerBlock", "transformer.Transformer"):
        assert {"torch.nn.TransformerEncoderLayer", "torch.nn.TransformerDecoderLayer"} <= (
            refused(check_id)
        )
    assert "torch.optim.lr_scheduler" in refused("training.lr_at_step")
    # the reference KV cache uses torch's fused attention: the cache is that exercise
    assert "torch.nn.functional.scaled_dot_product_attention" not in refused(
        "kv_cache.forward_with_cache"
    )


# --------------------------------------------------------------------------- shortcuts, spelled


def component_source(check_id: str, use: str, imports: str) -> tuple[str, int]:
    """A file defining check_id's component whose body uses `use`; and that line's number."""
    parts = check_id.split(".")
    head = ["import torch", "from torch import nn", imports, ""]
    if len(parts) == 3:
        body = [f"class {parts[1]}(nn.Module):", f"    def {parts[2]}(self, x):"]
    elif parts[1][0].isupper():
        body = [f"class {parts[1]}(nn.Module):", "    def forward(self, x):"]
    else:
        body = [f"def {parts[1]}(x):"]
    indent = " " * (4 * len(body))
    lines = head + body + [f"{indent}y = {use}", f"{indent}return y"]
    return "\n".join(lines) + "\n", len(head) + len(body) + 1


def spellings(qualname: str) -> list[tuple[str, str, str]]:
    """(imports, the use, the name as written) for one refused qualname, several ways."""
    module, _, name = qualname.rpartition(".")
    found = [("", qualname, qualname)]  # torch.nn.functional.layer_norm, written out
    found.append((f"from {module} import {name} as shortcut", "shortcut", "shortcut"))
    found.append((f"import {module} as M", f"M.{name}", f"M.{name}"))
    if qualname == "torch.nn.attention":
        found = [
            ("", "torch.nn.attention.sdpa_kernel", "torch.nn.attention.sdpa_kernel"),
            ("from torch.nn import attention as A", "A.sdpa_kernel", "A.sdpa_kernel"),
            ("from torch.nn.attention import sdpa_kernel", "sdpa_kernel", "sdpa_kernel"),
        ]
    elif qualname == "torch.optim.lr_scheduler":
        found = [
            ("", "torch.optim.lr_scheduler.LambdaLR", "torch.optim.lr_scheduler.LambdaLR"),
            ("from torch.optim import lr_scheduler", "lr_scheduler.CosineAnnealingLR", ""),
        ]
    elif qualname.startswith("torch.nn.") and qualname.count(".") == 2:
        found.append(("", f"nn.{name}", f"nn.{name}"))  # after `from torch import nn`
    elif qualname == "torch.nn.Transformer.generate_square_subsequent_mask":
        found = [
            ("", qualname, qualname),
            ("", f"nn.Transformer.{name}", f"nn.Transformer.{name}"),
            ("from torch.nn import Transformer as T", f"T.{name}", f"T.{name}"),
        ]
    return found


CASES = [
    (check_id, shortcut, spelling)
    for check_id, shortcuts in SHORTCUTS.items()
    for shortcut in shortcuts
    for spelling in spellings(shortcut.qualname)
]


@pytest.mark.parametrize(
    ("check_id", "shortcut", "spelling"),
    CASES,
    ids=[f"{c}-{s.qualname}-{i}" for c, s, (i, _, _) in CASES],
)
def test_each_shortcut_is_reported_with_file_line_and_advice(check_id, shortcut, spelling):
    imports, use, written = spelling
    source, line = component_source(check_id, f"{use}(x)", imports)
    filename = policy.file_of(check_id)
    found = [v for v in scan_source(source, filename, check_id) if v.kind == "shortcut"]
    assert found, f"{use} not reported for {check_id}:\n{source}"
    assert [v.line for v in found] == [line]
    message = found[0].message
    assert message.startswith(f"not accepted: `{filename}` line {line} calls `")
    assert f"`{written or use}`" in message
    advice = {s.advice for s in SHORTCUTS[check_id] if policy._under(use, s.qualname)}
    assert any(message.endswith(a) for a in advice) or message.endswith(shortcut.advice)
    # ... and not by the module rules, which are about imports and escape hatches
    assert not [v for v in scan_source(source, filename, None) if "shortcut" in v.kind]


def test_the_message_shows_the_name_as_written():
    source = """\
    import torch.nn.functional as F


    class MultiHeadAttention:
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    """
    (violation,) = scan(source, "attention.py", "attention.MultiHeadAttention")
    assert violation.message == (
        "not accepted: `attention.py` line 6 calls `F.scaled_dot_product_attention`; "
        "write the attention yourself"
    )
    assert (violation.filename, violation.line, violation.kind) == ("attention.py", 6, "shortcut")
    assert str(violation) == violation.message


@pytest.mark.parametrize(
    ("imports", "use", "shown"),
    [
        ("import torch.nn.functional as F", "F.layer_norm(x, s)", "`F.layer_norm`"),
        ("from torch.nn import functional as F", "F.layer_norm(x, s)", "`F.layer_norm`"),
        ("from torch.nn import functional", "functional.layer_norm(x, s)", "layer_norm`"),
        (
            "from torch.nn.functional import layer_norm as ln",
            "ln(x, s)",
            "`ln` (`torch.nn.functional.layer_norm`)",
        ),
        ("import torch", "torch.nn.functional.layer_norm(x, s)", "layer_norm`"),
        ("import torch as t", "t.nn.functional.layer_norm(x, s)", "layer_norm`"),
        ("import torch", "torch.layer_norm(x, s)", "`torch.layer_norm`"),
        ("from torch import layer_norm", "layer_norm(x, s)", "`layer_norm`"),
        ("from torch import nn", "nn.LayerNorm(s)(x)", "`nn.LayerNorm`"),
        ("import torch.nn as nn", "nn.functional.layer_norm(x, s)", "layer_norm`"),
        ("from torch.nn import LayerNorm as L", "L(s)(x)", "`L` (`torch.nn.LayerNorm`)"),
        # another name of the same class
        ("import torch", "torch.nn.modules.normalization.LayerNorm(s)(x)", "LayerNorm`"),
        ("from torch.nn.modules import normalization as N", "N.LayerNorm(s)(x)", "LayerNorm`"),
        ("import torch", "getattr(torch.nn.functional, 'layer_norm')(x, s)", "getattr("),
        ("import torch.nn.functional as F", "F.group_norm(x, 1)", "`F.group_norm`"),
        ("import torch.nn.functional as F", "F.rms_norm(x, s)", "`F.rms_norm`"),
    ],
)
def test_aliases_are_resolved(imports, use, shown):
    source = f"""\
    {imports}


    class LayerNorm:
        def forward(self, x, s):
            return {use}
    """
    found = scan(source, "layernorm.py", "layernorm.LayerNorm")
    assert len(found) == 1, messages(found)
    assert "line 6 calls" in found[0].message and shown in found[0].message
    assert found[0].message.endswith("write the normalisation yourself")


@pytest.mark.parametrize(
    "body",
    [
        "gelu = F.gelu",  # a reference without a call counts
        "return list(map(F.gelu, [x]))[0]",
        "return nn.GELU(approximate='tanh')(x)",
        "return torch.nn.GELU.forward(nn.Identity(), x)",
    ],
)
def test_a_reference_without_a_call_counts(body):
    source = f"""\
    import torch
    import torch.nn.functional as F
    from torch import nn


    def gelu_new(x):
        {body}
    """
    found = scan(source, "mlp.py", "mlp.gelu_new")
    assert [v.line for v in found] == [7], messages(found)
    assert found[0].message.endswith("write GPT-2's tanh GELU yourself")


def test_a_component_bound_by_import_or_assignment_is_reported():
    bound = "from torch.nn.functional import gelu as gelu_new\n"
    (violation,) = scan(bound, "mlp.py", "mlp.gelu_new")
    assert "line 1 imports `torch.nn.functional.gelu`" in violation.message
    assigned = "import torch.nn.functional as F\ngelu_new = F.gelu\n"
    (violation,) = scan(assigned, "mlp.py", "mlp.gelu_new")
    assert "line 2 uses `F.gelu`" in violation.message


def test_a_subclass_of_a_refused_class_is_reported():
    source = """\
    from torch import nn


    class LayerNorm(nn.LayerNorm):
        pass
    """
    (violation,) = scan(source, "layernorm.py", "layernorm.LayerNorm")
    assert "line 4 uses `nn.LayerNorm`" in violation.message


EMBEDDINGS = """\
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Module):
    def forward(self, tokens):
        return self.W_E[tokens]


class PositionalEmbedding(nn.Module):
    def forward(self, tokens):
        return F.embedding(torch.arange(tokens.shape[1]), self.W_pos)
"""

ATTENTION = """\
import torch
import torch.nn.functional as F


class MultiHeadAttention(torch.nn.Module):
    IGNORE = float("-inf")

    def apply_causal_mask(self, scores):
        return scores.masked_fill(self._future(scores), MultiHeadAttention.IGNORE)

    def _future(self, scores):
        return torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
"""

MLP = """\
import torch.nn.functional as F
from torch import nn


def _helper(x):
    return F.gelu(x, approximate="tanh")


def gelu_new(x):
    return _helper(x)


class MLP(nn.Module):
    def forward(self, x):
        return gelu_new(x @ self.W_in)
"""


def test_a_check_reads_only_what_its_component_runs():
    assert scan(EMBEDDINGS, "embeddings.py", "embeddings.Embedding") == []
    (violation,) = scan(EMBEDDINGS, "embeddings.py", "embeddings.PositionalEmbedding")
    assert violation.line == 12
    # the mask does not run forward; the attention does
    assert scan(ATTENTION, "attention.py", "attention.MultiHeadAttention.apply_causal_mask") == []
    (violation,) = scan(ATTENTION, "attention.py", "attention.MultiHeadAttention")
    assert violation.line == 15
    # MLP calls gelu_new, which calls a helper, which calls F.gelu
    for check_id in ("mlp.gelu_new", "mlp.MLP"):
        (violation,) = scan(MLP, "mlp.py", check_id)
        assert violation.line == 6, check_id


def test_a_decorated_definition_is_read_whole():
    source = """\
    import torch.nn.functional as F

    REGISTRY = {}


    def register(function):
        REGISTRY[function.__name__] = function
        return function


    @register
    def normalise(x):
        return F.layer_norm(x, x.shape[-1:])


    class LayerNorm:
        def forward(self, x):
            return REGISTRY["normalise"](x)
    """
    (violation,) = scan(source, "layernorm.py", "layernorm.LayerNorm")
    assert violation.line == 13


def test_a_method_scope_follows_self_calls():
    source = ATTENTION.replace(
        "return torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)",
        "return torch.nn.Transformer.generate_square_subsequent_mask(scores.shape[-1]) != 0",
    )
    (violation,) = scan(source, "attention.py", "attention.MultiHeadAttention.apply_causal_mask")
    assert violation.line == 12
    assert violation.message.endswith("build the causal mask yourself")


def test_a_check_without_shortcuts_accepts_torch():
    source = """\
    import torch.nn.functional as F


    def next_token_loss(logits, tokens):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    """
    assert scan(source, "training.py", "training.next_token_loss") == []


# --------------------------------------------------------------------------- imports

REFUSED_MODULES = [
    "solutions",
    "solutions.layernorm",
    "gpt2_course.checks",
    "gpt2_course.checks.core",
    "gpt2_course.reference",
    "gpt2_course.grading",
    "gpt2_course.tokenizer",
    "gpt2_course.notebook",
    "transformers",
    "transformer_lens",
    "os",
    "os.path",
    "sys",
    "importlib",
    "importlib.util",
    "builtins",
    "subprocess",
    "ctypes",
    "gc",
    "inspect",
    "pickle",
    "io",
    "pathlib",
    "socket",
    "shutil",
    "types",
    "runpy",
    "threading",
    "numpy",
    "torch._C",
    "torch._dynamo",
    "torch.hub",
    "torch.utils.cpp_extension",
    "torch.library",
]


@pytest.mark.parametrize("module", REFUSED_MODULES)
@pytest.mark.parametrize("form", ["import {m}", "import {m} as alias", "from {m} import thing"])
def test_each_refused_module_is_reported(module, form):
    (violation,) = scan(f"import torch\n\n{form.format(m=module)}\n")
    assert violation.kind == "import"
    assert violation.message.startswith(f"not accepted: `layernorm.py` line 3 imports `{module}")
    assert "may import only torch, einops, jaxtyping" in violation.message or (
        "torch's private internals" in violation.message or "loads no code" in violation.message
    )


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("from gpt2_course import checks", "gpt2_course.checks"),
        ("from gpt2_course import reference", "gpt2_course.reference"),
        ("from gpt2_course.pretrained import load_pretrained_model", "load_pretrained_model"),
        ("from gpt2_course.pretrained import os", "gpt2_course.pretrained.os"),
        ("from gpt2_course.config import hf_config", "hf_config"),
        ("from gpt2_course.parts import load", "gpt2_course.parts.load"),
        ("from torch import _C", "torch._C"),
        ("from torch.nn.functional import *", "torch.nn.functional.*"),
        ("from .. import checks", ".."),
        ("from ..checks import core", "..checks"),
    ],
)
def test_refused_names_from_allowed_modules(source, shown):
    (violation,) = scan(source + "\n")
    assert "line 1 imports" in violation.message and shown in violation.message


def test_what_is_refused_is_said_once_where_it_is_imported():
    source = """\
    from gpt2_course.checks import core

    core.judge_cases = None
    core.compare(1, 2)
    """
    found = scan(source)
    assert [v.line for v in found] == [1, 3]  # the import, and the change to a module


ALLOWED_IMPORTS = """\
from __future__ import annotations

import abc
import collections
import collections.abc
import dataclasses
import enum
import functools
import itertools
import math
import numbers
import operator
import typing
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import einops
import einops.layers.torch
import jaxtyping
import torch
import torch.nn.functional as F
import typing_extensions
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn import functional

import gpt2_course
import gpt2_course.exercises.layernorm
from gpt2_course import config, parts, pretrained, prompts
from gpt2_course.config import TransformerConfig
from gpt2_course.exercises import layernorm
from gpt2_course.pretrained import CheckpointError, check_gpt2_state_dict
from gpt2_course.prompts import check_prompt

from . import layernorm as mine
from .layernorm import LayerNorm

block = parts.TransformerBlock
sampler = parts.sample_next_token
"""


def test_the_allowed_imports_are_accepted():
    assert scan(ALLOWED_IMPORTS, "kv_cache.py", None) == []


def test_a_file_does_not_take_its_own_component_from_parts():
    source = "from gpt2_course import parts\n\nLayerNorm = parts.LayerNorm\n"
    (violation,) = scan(source, "layernorm.py")
    assert "line 3 uses `parts.LayerNorm`" in violation.message
    assert "the component this file defines" in violation.message
    assert scan(source, "block.py") == []


# --------------------------------------------------------------------------- escape hatches

ESCAPES = [
    ("eval('1')", "`eval`"),
    ("exec('y = 1')", "`exec`"),
    ("compile('1', 'f', 'eval')", "`compile`"),
    ("__import__('os')", "`__import__`"),
    ("globals()", "`globals`"),
    ("locals()", "`locals`"),
    ("vars(x)", "`vars`"),
    ("open('solutions/layernorm.py')", "`open`"),
    ("breakpoint()", "`breakpoint`"),
    ("e = eval", "`eval`"),
    ("__builtins__", "`__builtins__`"),
    ("getattr(x, name)", "`getattr`"),
    ("getattr(x, 'lay' + 'er_norm')", "`getattr`"),
    ("hasattr(x, name)", "`hasattr`"),
    ("setattr(x, name, 1)", "`setattr`"),
    ("delattr(x, name)", "`delattr`"),
    ("g = getattr", "`getattr`"),
    ("getattr(x, '__dict__')", "__dict__"),
    ("setattr(torch, 'tanh', None)", "setattr(torch"),
    ("x.__dict__", "`x.__dict__`"),
    ("f.__globals__", "`f.__globals__`"),
    ("().__class__.__base__.__subclasses__()", "__subclasses__"),
    ("f.__code__", "`f.__code__`"),
    ("f.__closure__[0].cell_contents", "__closure__"),
    ("F.layer_norm.__wrapped__", "__wrapped__"),
    ("print.__self__", "`print.__self__`"),
    ("x.__loader__", "`x.__loader__`"),
    ("x.__spec__", "`x.__spec__`"),
    ("object.__getattribute__(x, 'y')", "__getattribute__"),
    ("frame.f_globals", "`frame.f_globals`"),
    ("frame.f_locals", "`frame.f_locals`"),
    ("frame.f_back", "`frame.f_back`"),
    ("tb.tb_frame", "`tb.tb_frame`"),
    ("gen.gi_frame", "`gen.gi_frame`"),
    ("coro.cr_frame", "`coro.cr_frame`"),
    ("torch.sys._getframe(0)", "torch.sys._getframe"),
    ("torch.sys.modules['solutions']", "`torch.sys.modules`"),
    ("torch.sys.meta_path", "torch.sys.meta_path"),
    ("x.path_hooks", "`x.path_hooks`"),
    ("torch.os.environ", "`torch.os.environ`"),
    ("typing.sys", "`typing.sys`"),
    ("collections._sys.modules", "`collections._sys.modules`"),
    ("torch.nn.importlib", "`torch.nn.importlib`"),
    ("x.builtins", "`x.builtins`"),
    ("torch.ops.aten.gelu(x)", "`torch.ops.aten.gelu`"),
    ("torch._C._nn.gelu(x)", "`torch._C._nn.gelu`"),
    ("torch._scaled_dot_product_flash_attention_for_cpu(x, x, x)", "flash_attention_for_cpu`"),
    ("F._canonical_mask", "`F._canonical_mask`"),
    ("torch.hub.load('.', 'm', source='local')", "`torch.hub.load`"),
    ("torch.utils.cpp_extension.load_inline('x', '')", "cpp_extension.load_inline`"),
    ("torch.load('answers.pt', weights_only=False)", "`torch.load`"),
    ("torch.utils.benchmark.Timer('import os').timeit(1)", "torch.utils.benchmark.Timer"),
    ("typing.get_type_hints(f)", "`typing.get_type_hints`"),
    ("typing.ForwardRef('x')", "`typing.ForwardRef`"),
    ("collections._collections_abc", "`collections._collections_abc`"),
    ("operator.attrgetter(name)(x)", "`operator.attrgetter`"),
    ("operator.attrgetter('__dict__')(x)", "attrgetter('__dict__')"),
    ("F.gelu = None", "changes `F.gelu`"),
    ("torch.nn.Module.__call__ = None", "changes `torch.nn.Module.__call__`"),
    ("del torch.tanh", "changes `torch.tanh`"),
    ("parts.load('solutions', 'layernorm')", "`parts.load`"),
    ("parts.get('LayerNorm')", "`parts.get`"),
    ("parts.use_solution('layernorm.LayerNorm')", "`parts.use_solution`"),
    ("parts.using('solutions')", "`parts.using`"),
    ("parts.importlib.import_module('solutions')", "parts.importlib"),
    ("parts._overrides['x'] = 'solutions'", "`parts._overrides`"),
    ("pretrained.load_pretrained_model()", "`pretrained.load_pretrained_model`"),
    ("gpt2_course.checks", "`gpt2_course.checks`"),
    ("__package__ = 'gpt2_course'", "`__package__`"),
]


@pytest.mark.parametrize(("statement", "shown"), ESCAPES, ids=[e[0] for e in ESCAPES])
def test_each_escape_hatch_is_reported(statement, shown):
    source = f"""\
    import collections
    import operator
    import typing

    import gpt2_course
    import torch
    import torch.nn.functional as F
    from gpt2_course import parts, pretrained


    def forward(x, f, name, frame, tb, gen, coro):
        {statement}
    """
    found = scan(source, "mlp.py", "mlp.gelu_new")
    assert [v.line for v in found] == [12], messages(found)
    assert found[0].message.startswith("not accepted: `mlp.py` line 12 ")
    assert shown in found[0].message
    assert found[0].kind == "escape"


def test_a_string_literal_getattr_is_accepted_and_read():
    source = """\
    def forward(x, model):
        if hasattr(model, "cfg") and getattr(model, "cfg", None) is not None:
            return getattr(x, "shape")
    """
    assert scan(source, "sampling.py", None) == []


def test_syntax_errors_give_no_violations():
    assert scan("import os\ndef broken(:\n") == []
    assert scan_source("x = 1\0", "layernorm.py", None) == []  # a NUL byte: never raises


# --------------------------------------------------------------------------- solutions and stubs


def all_files() -> list[Path]:
    return sorted(SOLUTIONS.glob("*.py")) + sorted(STUBS.glob("*.py"))


@pytest.mark.parametrize("path", all_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_solutions_and_stubs_scan_clean(path: Path):
    source = path.read_text()
    check_ids = [c for c in SHORTCUTS if c.split(".")[0] == path.stem]
    for check_id in [None, *check_ids]:
        assert scan_source(source, path.name, check_id) == [], check_id
        # and with every other check's shortcuts over the whole file, where they apply
    for check_id in check_ids:
        assert scan_source(source, path.name, check_id, whole_file=True) == [], check_id


@pytest.mark.parametrize("folder", [SOLUTIONS, STUBS], ids=["solutions", "stubs"])
def test_scan_submission_of_solutions_and_stubs_is_clean(folder: Path):
    for check_id in SHORTCUTS:
        assert scan_submission(folder, check_id) == [], check_id
    assert scan_submission(folder, None) == []


# --------------------------------------------------------------------------- scan_submission


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return folder


def test_scan_submission_follows_the_files_a_check_file_imports(tmp_path):
    folder = write(
        tmp_path / "sub",
        {
            "layernorm.py": """\
                from torch import nn

                from .helpers import normalise


                class LayerNorm(nn.Module):
                    def forward(self, x):
                        return normalise(x)
                """,
            "helpers.py": """\
                import os

                from .deeper import inner


                def normalise(x):
                    return inner(x)
                """,
            "deeper.py": """\
                import torch.nn.functional as F


                def inner(x):
                    return F.layer_norm(x, x.shape[-1:])
                """,
            "unrelated.py": "import os\n",
        },
    )
    found = scan_submission(folder, "layernorm.LayerNorm")
    assert {(v.filename, v.line, v.kind) for v in found} == {
        ("helpers.py", 1, "import"),
        ("deeper.py", 5, "shortcut"),
    }
    assert "`deeper.py` line 5 calls `F.layer_norm`" in policy.feedback(found)
    assert scan_submission(folder, "mlp.gelu_new") == []  # no mlp.py: the check says so
    everything = scan_submission(folder, None)
    assert {v.filename for v in everything} == {"helpers.py", "unrelated.py"}


def test_scan_submission_of_a_broken_file_is_empty(tmp_path):
    folder = write(tmp_path / "sub", {"layernorm.py": "def broken(:\n"})
    assert scan_submission(folder, "layernorm.LayerNorm") == []


def test_describe_policy_and_feedback():
    text = policy.describe_policy("layernorm.LayerNorm")
    assert "torch.nn.functional.layer_norm" in text and "write the normalisation yourself" in text
    assert "may import only" in policy.describe_policy(None)
    many = [policy.Violation("a.py", i, f"m{i}") for i in range(8)]
    assert policy.feedback(many, limit=3).splitlines() == ["m0", "m1", "m2", "... and 5 more"]


# --------------------------------------------------------------------------- the runtime guard

LEARNER = """\
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import layer_norm as ln

from gpt2_course.config import TransformerConfig

from .helper import VALUE


def by_module(x):
    return F.layer_norm(x, x.shape[-1:])


def by_alias(x):
    return ln(x, x.shape[-1:])


def by_class(x):
    return nn.LayerNorm(x.shape[-1])(x)


def mine(x):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, correction=0) + 1e-5)


def import_solutions():
    import solutions.layernorm

    return solutions.layernorm


def import_transformers():
    from transformers import GPT2Model

    return GPT2Model


def import_os():
    import os

    return os


def dunder_import():
    return __import__("os")


def import_module_from_parts():
    from gpt2_course import parts

    return parts.importlib.import_module("solutions.layernorm")


def choose_the_solution():
    from gpt2_course import parts

    return parts.get("layernorm.LayerNorm")


def relative():
    from . import helper

    return helper.VALUE + VALUE


def lr_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def causal_mask(n):
    return nn.Transformer.generate_square_subsequent_mask(n)


def causal_bias(n):
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(n, n)
"""

_names = itertools.count()


@pytest.fixture
def learner(tmp_path):
    """The learner's package: LEARNER as learner.py (and a helper) in tmp_path, imported."""
    folder = write(tmp_path / "learner", {"learner.py": LEARNER, "helper.py": "VALUE = 3\n"})
    name = f"policy_test_learner_{next(_names)}"
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    package.__package__ = name
    sys.modules[name] = package
    yield folder, name
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def state() -> dict:
    """Everything the guard may touch, to check it is all back afterwards."""
    return {
        "F.layer_norm": F.layer_norm,
        "torch.layer_norm": torch.layer_norm,
        "LayerNorm.__init__": nn.LayerNorm.__dict__["__init__"],
        "InstanceNorm1d has own __init__": "__init__" in nn.InstanceNorm1d.__dict__,
        "mask": nn.Transformer.__dict__["generate_square_subsequent_mask"],
        "LambdaLR.__init__": torch.optim.lr_scheduler.LambdaLR.__dict__["__init__"],
        "__import__": builtins.__import__,
        "import_module": importlib.import_module,
        "meta_path": list(sys.meta_path),
    }


def course_layer_norm(x):
    """Course code (this file is not the learner's) may use F.layer_norm meanwhile."""
    return F.layer_norm(x, x.shape[-1:])


def test_runtime_guard_refuses_the_learner_and_not_the_course(learner):
    folder, name = learner
    before = state()
    x = torch.randn(2, 3, 4)
    with runtime_guard("layernorm.LayerNorm", folder):
        module = importlib.import_module(f"{name}.learner")  # imported under the guard
        for function in (module.by_module, module.by_alias, module.by_class):
            with pytest.raises(
                ShortcutRefused, match=r"^not accepted: `learner.py` line \d+ calls"
            ):
                function(x)
        with pytest.raises(ShortcutRefused) as refused:
            module.by_module(x)
        assert str(refused.value) == (
            "not accepted: `learner.py` line 12 calls `torch.nn.functional.layer_norm`; "
            "write the normalisation yourself"
        )
        expected = course_layer_norm(x)
        assert nn.LayerNorm(4)(x).shape == x.shape
        torch.testing.assert_close(module.mine(x), expected, atol=1e-5, rtol=1e-5)
        assert module.relative() == 6
    assert state() == before
    torch.testing.assert_close(module.by_module(x), expected)
    torch.testing.assert_close(module.by_alias(x), expected)
    assert module.ln is F.layer_norm


def test_runtime_guard_covers_a_module_imported_before_it(learner):
    folder, name = learner
    module = importlib.import_module(f"{name}.learner")
    x = torch.randn(3, 4)
    with runtime_guard("layernorm.LayerNorm", folder):
        with pytest.raises(ShortcutRefused, match="line 16 calls"):
            module.by_alias(x)  # `ln` was bound to the original before the guard
    assert module.ln is F.layer_norm
    assert module.by_alias(x).shape == x.shape


@pytest.mark.parametrize(
    ("function", "imported"),
    [
        ("import_solutions", "solutions.layernorm"),
        ("import_transformers", "transformers"),
        ("import_os", "os"),
        ("dunder_import", "os"),
        ("import_module_from_parts", "solutions.layernorm"),
    ],
)
def test_runtime_guard_refuses_imports(learner, function, imported):
    folder, name = learner
    import solutions.layernorm  # noqa: F401  (already imported: refused all the same)

    before = state()
    with runtime_guard("layernorm.LayerNorm", folder):
        module = importlib.import_module(f"{name}.learner")
        with pytest.raises(ImportRefused, match=rf"line \d+ imports `{imported}`") as refused:
            getattr(module, function)()
        assert isinstance(refused.value, ImportError)
        assert isinstance(refused.value, ShortcutRefused)
        assert "may import only" in str(refused.value)
        importlib.import_module("os")  # course code imports what it likes
    assert state() == before
    if imported != "transformers":  # (importing it for real takes seconds)
        assert getattr(module, function)() is not None  # after the guard, nothing is refused


def test_runtime_guard_refuses_choosing_the_solution(learner):
    folder, name = learner
    from gpt2_course import parts

    with runtime_guard("layernorm.LayerNorm", folder):
        module = importlib.import_module(f"{name}.learner")
        with pytest.raises(ShortcutRefused, match="calls `parts.get`"):
            module.choose_the_solution()
        assert parts.get("layernorm.LayerNorm") is not None  # the course may


def test_runtime_guard_refuses_a_learner_file_importing_a_refused_module(learner):
    folder, name = learner
    (folder / "cheat.py").write_text("from solutions.layernorm import LayerNorm\n")
    with runtime_guard("layernorm.LayerNorm", folder):
        with pytest.raises(ImportRefused, match="`cheat.py` line 1 imports `solutions.layernorm`"):
            importlib.import_module(f"{name}.cheat")


def test_runtime_guard_per_check_shortcuts(learner):
    folder, name = learner
    module = importlib.import_module(f"{name}.learner")
    before = state()
    with runtime_guard("training.lr_at_step", folder):
        with pytest.raises(ShortcutRefused, match="compute the warmup and the cosine yourself"):
            module.lr_schedule()
        assert module.by_module(torch.ones(2, 2)).shape == (2, 2)  # not this check's shortcut
        course = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        torch.optim.lr_scheduler.LambdaLR(course, lambda step: 1.0)
    with runtime_guard("attention.MultiHeadAttention.apply_causal_mask", folder):
        with pytest.raises(ShortcutRefused, match="build the causal mask yourself"):
            module.causal_mask(3)
        assert nn.Transformer.generate_square_subsequent_mask(3).shape == (3, 3)
        with pytest.raises(ShortcutRefused, match="calls `torch.nn.attention.bias"):
            module.causal_bias(3)  # a submodule of a refused module, loaded just now
    with runtime_guard(None, folder):  # imports only
        assert module.causal_mask(2).shape == (2, 2)
        with pytest.raises(ImportRefused):
            module.import_os()
    assert state() == before
    assert module.lr_schedule() is not None
    assert module.causal_bias(2) is not None


def test_runtime_guard_restores_everything_after_an_error(learner):
    folder, _ = learner
    before = state()
    with pytest.raises(RuntimeError, match="boom"):
        with runtime_guard("layernorm.LayerNorm", folder):
            assert F.layer_norm is not before["F.layer_norm"]
            raise RuntimeError("boom")
    assert state() == before


def test_runtime_guards_nest(learner):
    folder, name = learner
    before = state()
    with runtime_guard("layernorm.LayerNorm", folder):
        with runtime_guard("block.TransformerBlock", folder):
            module = importlib.import_module(f"{name}.learner")
            with pytest.raises(ShortcutRefused):
                module.by_module(torch.ones(2, 2))
        with pytest.raises(ShortcutRefused):
            module.by_module(torch.ones(2, 2))
    assert state() == before
