"""Cases whose expected output must not depend on the order a kernel sums in.

The grader builds the expected outputs in its own process and runs the learner's code
in another (one thread, its own environment); a course check must pass a correct
implementation there, and on any CPU. Where a case's values are large enough that
rounding in another order could cross the tolerance, the check builds them so that no
sum rounds at all; these tests hold that property.
"""

import torch
import torch.nn.functional as F

from gpt2_course.checks import get_check


def _on_grid(t: torch.Tensor, steps: int) -> bool:
    return bool(torch.equal(torch.round(t * steps), t * steps))


def test_random_unembedding_cases_are_exact_in_float32():
    cases = [
        c
        for c in get_check("embeddings.Unembedding").cases
        if c.name.startswith("random W_U") and not c.backward  # not its gradient twin
    ]
    assert len(cases) == 2
    for case in cases:
        (x,) = case.args
        W_U, b_U = case.params["W_U"], case.params["b_U"]
        assert _on_grid(x, 16) and _on_grid(W_U, 16) and _on_grid(b_U, 16), case.name
        # every logit and partial sum is a multiple of 1/256 below 2**24 / 256: exact
        largest = (x.abs().double() @ W_U.abs().double()).max() + b_U.abs().max()
        assert largest < 2**24 / 256, (case.name, largest.item())
        exact = F.linear(x.double(), W_U.double().T, b_U.double()).float()
        assert torch.equal(case.expected, exact), case.name
        # and so any other order of summation gives the same bits
        reversed_order = x.flip(-1) @ W_U.flip(0) + b_U
        assert torch.equal(reversed_order, exact), case.name
        chunked = b_U.expand_as(exact).clone()
        for start in reversed(range(0, x.shape[-1], 96)):
            chunked += x[..., start : start + 96] @ W_U[start : start + 96]
        assert torch.equal(chunked, exact), case.name
