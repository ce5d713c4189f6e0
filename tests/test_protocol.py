"""What crosses from a runner (learner code) to the judge: plain data only, validated."""

import io
import json
import struct

import pytest
import torch

from gpt2_course.checks.core import Case, Outcome, compare
from gpt2_course.grading import protocol


class Liar(torch.Tensor):
    """A tensor subclass that claims to equal everything."""

    def __eq__(self, other):
        return True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


class AlwaysEqual:
    def __eq__(self, other):
        return True


def round_trip(outcomes, check_id="x.Y", n_cases=None):
    data = protocol.encode_outcomes(check_id, outcomes)
    return protocol.decode_outcomes(data, check_id, n_cases or len(outcomes))


def test_values_cross_as_plain_data():
    t = torch.arange(6.0).reshape(2, 3)
    outputs = [t, (t, 3, 2.5), [None, "s", True], {"a": t[0]}, float("inf"), float("nan")]
    back = round_trip([Outcome(output=o) for o in outputs])
    assert torch.equal(back[0].output, t) and type(back[0].output) is torch.Tensor
    assert isinstance(back[1].output, tuple) and back[1].output[1:] == (3, 2.5)
    assert back[2].output == [None, "s", True]
    assert torch.equal(back[3].output["a"], t[0])
    assert back[4].output == float("inf") and back[5].output != back[5].output


def test_a_lying_tensor_arrives_as_a_plain_tensor_and_is_judged_on_its_numbers():
    liar = torch.zeros(3).as_subclass(Liar)
    (outcome,) = round_trip([Outcome(output=liar)])
    assert type(outcome.output) is torch.Tensor
    assert compare(outcome.output, torch.ones(3)) is not None


def test_an_object_that_equals_everything_becomes_a_named_stand_in():
    (outcome,) = round_trip([Outcome(output=AlwaysEqual())])
    assert type(outcome.output).__name__ == "AlwaysEqual"
    assert "returned AlwaysEqual" in compare(outcome.output, torch.ones(1))


def test_errors_and_flags_survive():
    (outcome,) = round_trip(
        [Outcome(error="ValueError: x", not_implemented=True, modified_args=[0], seconds=1.5)]
    )
    assert (outcome.error, outcome.not_implemented, outcome.modified_args) == (
        "ValueError: x",
        True,
        [0],
    )


def forged(head: dict, tail: bytes = b"") -> bytes:
    raw = json.dumps(head).encode()
    return struct.pack(">Q", len(raw)) + raw + tail


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 3,
        forged({"check": "other.Check", "outcomes": []}),
        forged({"check": "x.Y", "outcomes": [{}] * 5}),
        forged({"check": "x.Y", "outcomes": [{"output": {"pickle": "..."}}]}),
        forged(
            {
                "check": "x.Y",
                "outcomes": [{"output": {"tensor": "9"}, "modified_args": [], "seconds": 0}],
            }
        ),
        forged({"check": "x.Y", "outcomes": [{"error": 3, "modified_args": [], "seconds": 0}]}),
        forged({"check": "x.Y", "outcomes": []}, b"not safetensors"),
    ],
)
def test_malformed_results_are_refused(data):
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_outcomes(data, "x.Y", 2)


def test_framing_refuses_oversized_and_truncated_messages():
    stream = io.BytesIO()
    protocol.write_message(stream, b"hello")
    stream.seek(0)
    assert protocol.read_message(stream) == b"hello"
    assert protocol.read_message(stream) is None
    with pytest.raises(protocol.ProtocolError):
        protocol.read_message(io.BytesIO(struct.pack(">Q", 10) + b"abc"))
    with pytest.raises(protocol.ProtocolError):
        protocol.read_message(io.BytesIO(struct.pack(">Q", 1 << 40)), limit=1 << 20)


def test_inputs_carry_no_expected_values_and_share_large_tensors():
    weights = torch.randn(1024, 512)  # 2 MiB: goes to the store
    cases = [
        Case("a", (torch.ones(2),), {"W": weights}, expected=torch.full((2,), 7.0)),
        Case("b", (torch.ones(3),), {"W": weights}, expected="secret"),
    ]
    store: dict = {}
    data = protocol.pack_inputs(cases, store)
    assert len(store) == 1  # the same weights, stored once
    assert len(data) < 100_000
    back = protocol.unpack_inputs(data, store)
    assert [c.expected for c in back] == [None, None]
    assert torch.equal(back[0].params["W"], weights) and torch.equal(back[1].args[0], torch.ones(3))
    assert cases[0].expected is not None  # the judge's cases are untouched
