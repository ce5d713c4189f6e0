"""Fingerprints: a mistake's behaviour on a check's seeded cases, reduced to a few numbers.

A learner's copy of the course (`gpt2-course release`) holds no mistake code, yet
names the mistake a learner made. For every mistake and seeded case it stores:

* for an error, a hash of its first line;
* for each tensor the call returned or a probe recorded: shape, dtype, a hash of
  where it is NaN or infinite, its values at a few spots (where the mistake
  departs most from the reference, and a few seeded ones), and its projections
  on a few seeded random directions, each with the tolerance that a right
  answer's float noise can reach there;
* for every other value, the value's type and a hash of it (a float, itself).

That is too little to rebuild the mistake's code from, and enough to tell
mistakes apart: two mistakes that agree at their most telling spots and on
random projections behave the same. Seeded cases do not depend on the weights
mode (random or pretrained GPT-2), so the stored numbers hold in both.
"""

import hashlib
import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gpt2_course.checks.core import Case, Mistake, Outcome, error_line

FILE = Path(__file__).with_name("fingerprints.json")
SPOTS = 8  # where the mistake departs most from the reference
RANDOM_SPOTS = 8
DIRECTIONS = 4


def _digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def leaves(outcome: Outcome) -> list[tuple[str, Any]]:
    """Every value an outcome holds, by path: the output's, then each probe's."""
    found: list[tuple[str, Any]] = []

    def walk(path: str, value: Any) -> None:
        if type(value) in (tuple, list):
            found.append((path, f"{type(value).__name__}[{len(value)}]"))
            for i, item in enumerate(value):
                walk(f"{path}[{i}]", item)
        elif type(value) is dict:
            found.append((path, f"dict{sorted(value)}"))
            for key in sorted(value):
                walk(f"{path}.{key}", value[key])
        else:
            found.append((path, value))

    walk("output", outcome.output)
    for name in sorted(outcome.probes):
        walk(f"probe.{name}", outcome.probes[name])
    return found


def _seed(*parts: Any) -> int:
    return int(_digest(parts)[:8], 16)


def _directions(n: int, seed: int) -> Tensor:
    """DIRECTIONS unit vectors of length n, the same on every machine (from torch.rand)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.rand(DIRECTIONS, n, generator=g, dtype=torch.float64) < 0.5
    return (signs.double() * 2 - 1) / math.sqrt(max(n, 1))


def _finite(value: Tensor) -> tuple[Tensor, Tensor, str]:
    """The values flat in float64 with NaN and inf at 0, where they are finite, and a hash
    of the others and their places."""
    flat = value.detach().reshape(-1).cpu().double()
    finite = torch.isfinite(flat)
    where = _digest([flat[~finite].tolist(), (~finite).nonzero().reshape(-1).tolist()])
    return torch.where(finite, flat, torch.zeros_like(flat)), finite, where


def _tensor_print(value: Tensor, reference: Any, case: Case, seed: int) -> dict:
    out: dict[str, Any] = {"shape": list(value.shape), "dtype": str(value.dtype)}
    if not value.is_floating_point():
        out["hash"] = _digest(value.reshape(-1).tolist())
        return out
    clean, finite, out["nonfinite"] = _finite(value)
    spots: list[int] = []
    if (
        isinstance(reference, Tensor)
        and reference.shape == value.shape
        and reference.is_floating_point()
    ):
        gap = (clean - reference.detach().reshape(-1).double().nan_to_num()).abs()
        spots += gap.topk(min(SPOTS, gap.numel())).indices.tolist()
    g = torch.Generator().manual_seed(seed)
    spots += torch.randint(0, max(clean.numel(), 1), (RANDOM_SPOTS,), generator=g).tolist()
    spots = [s for s in dict.fromkeys(spots) if s < clean.numel() and finite[s]]
    out["spots"] = [[s, clean[s].item()] for s in spots]
    directions = _directions(clean.numel(), seed)
    # a right answer may differ by atol + rtol * |value| per element; through a direction u
    # that adds up to at most sum(|u_i| * allowed_i)
    allowed = case.atol + case.rtol * clean.abs()
    out["proj"] = [[(u @ clean).item(), (u.abs() @ allowed).item()] for u in directions]
    return out


def fingerprint(outcome: Outcome, reference: Outcome | None, case: Case, index: int) -> dict:
    """The fingerprint of `outcome` on seeded case `index` (reference: the right outcome)."""
    if outcome.error:
        return {"error": _digest(error_line(outcome.error))}
    ref_leaves = dict(leaves(reference)) if reference is not None and not reference.error else {}
    prints = []
    for path, value in leaves(outcome):
        if isinstance(value, Tensor):
            seed = _seed(case.name, index, path)
            prints.append([path, _tensor_print(value, ref_leaves.get(path), case, seed)])
        elif type(value) is float:
            prints.append([path, {"float": value if math.isfinite(value) else repr(value)}])
        else:
            prints.append([path, {"hash": _digest((type(value).__name__, repr(value)))}])
    return {"leaves": prints}


def matches(outcome: Outcome, stored: dict, case: Case, index: int) -> bool:
    """Does `outcome` behave like the stored fingerprint (within the case's tolerance)?"""
    if "error" in stored or outcome.error:
        return bool(outcome.error) and stored.get("error") == _digest(error_line(outcome.error))
    mine = leaves(outcome)
    theirs = stored.get("leaves", [])
    if [p for p, _ in mine] != [p for p, _ in theirs]:
        return False
    return all(
        _leaf_matches(value, print_, case, _seed(case.name, index, path))
        for (path, value), (_, print_) in zip(mine, theirs, strict=True)
    )


def _leaf_matches(value: Any, stored: dict, case: Case, seed: int) -> bool:
    if "shape" in stored:
        if not isinstance(value, Tensor):
            return False
        if list(value.shape) != stored["shape"] or str(value.dtype) != stored["dtype"]:
            return False
        if "hash" in stored:
            flat = value.reshape(-1).tolist()
            return not value.is_floating_point() and _digest(flat) == stored["hash"]
        clean, _, nonfinite = _finite(value)
        if nonfinite != stored["nonfinite"]:
            return False
        for spot, expected in stored["spots"]:
            if abs(clean[spot].item() - expected) > case.atol + case.rtol * abs(expected):
                return False
        directions = _directions(clean.numel(), seed)
        return all(
            abs((u @ clean).item() - projection) <= allowed
            for u, (projection, allowed) in zip(directions, stored["proj"], strict=True)
        )
    if "float" in stored:
        expected = stored["float"]
        if type(value) is not float:
            return False
        if isinstance(expected, str):
            return repr(value) == expected
        return abs(value - expected) <= case.atol + case.rtol * abs(expected)
    return stored.get("hash") == _digest((type(value).__name__, repr(value)))


# --------------------------------------------------------------------------- the data file


def build(checks: dict) -> dict:
    """Every mistake's fingerprints on its check's seeded cases (run from the mistakes' code)."""
    return {check_id: of_check(check_id) for check_id in checks}


@cache
def of_check(check_id: str) -> list[dict]:
    """One check's mistake table as a release stores it (built once per process).

    The reference outcome (to find where a mistake departs most from it) is the
    reference part's, from `gpt2_course.reference_parts`.
    """
    from gpt2_course import parts
    from gpt2_course.checks.core import run_cases
    from gpt2_course.checks.registry import get_check

    check = get_check(check_id)
    seeded = [i for i, case in enumerate(check.cases) if case.seeded]
    cases = [check.cases[i] for i in seeded]
    right = run_cases(check.call, parts.reference_implementation(check_id), cases)
    entries = []
    for mistake in check.mistakes:
        wrong = run_cases(check.call, mistake.implementation, cases)
        prints = {
            str(i): fingerprint(w, r, check.cases[i], i)
            for i, w, r in zip(seeded, wrong, right, strict=False)
        }
        entries.append({"name": mistake.name, "description": mistake.description, "seeded": prints})
    return entries


def save(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, separators=(",", ":"), sort_keys=True) + "\n")


_stored: dict | None = None


def stored_mistakes(check_id: str) -> list[Mistake]:
    """A release's mistake table for one check, from the data file (empty without one)."""
    global _stored
    if _stored is None:
        _stored = json.loads(FILE.read_text()) if FILE.is_file() else {}
    return [
        Mistake(
            entry["name"],
            entry["description"],
            fingerprints={int(i): fp for i, fp in entry["seeded"].items()},
        )
        for entry in _stored.get(check_id, [])
    ]
