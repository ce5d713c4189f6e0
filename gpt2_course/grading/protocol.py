"""What the grader and a runner say to each other, and how it is written down.

Grader -> runner (trusted: the grader wrote it): the inputs of one check at a
time, pickled, their large tensors replaced by keys into a tensor store that
every runner maps read-only. No expected value is ever among them.

Runner -> grader (untrusted: the learner's code ran in that process): events
and outcomes as JSON, tensors as safetensors bytes. Nothing is unpickled, so a
result can only ever be plain numbers, strings and plain tensors; the grader
validates every field before it believes any of it.

A message is an 8-byte big-endian length and that many bytes.
"""

import io
import json
import pickle
import struct
from typing import IO, Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from gpt2_course.checks.core import Case, Outcome

MAX_MESSAGE = 1 << 30  # a runner's result above 1 GiB is refused
STORE_MIN_BYTES = 1 << 20  # tensors this large go to the shared store, not the pipe
HEADER = struct.Struct(">Q")


class ProtocolError(Exception):
    """A message that is not what the protocol allows (a broken or lying runner)."""


# --------------------------------------------------------------------------- framing


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def write_message(stream: IO[bytes], payload: bytes) -> None:
    stream.write(frame(payload))
    stream.flush()


def read_message(stream: IO[bytes], limit: int = MAX_MESSAGE) -> bytes | None:
    """The next message, or None at a clean end of stream."""
    header = _read_exactly(stream, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"a message of {length} bytes (at most {limit} allowed)")
    payload = _read_exactly(stream, length)
    if payload is None:
        raise ProtocolError("the stream ended inside a message")
    return payload


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    chunks, have = [], 0
    while have < n:
        chunk = stream.read(n - have)
        if not chunk:
            if have == 0:
                return None
            raise ProtocolError("the stream ended inside a message")
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- inputs


def run_side(cases: list[Case]) -> list[Case]:
    """The cases as the runner may see them: inputs and weights, never the expected values."""
    return [
        Case(c.name, c.args, c.params, c.cfg, None, c.atol, c.rtol, backward=c.backward)
        for c in cases
    ]


class _StorePickler(pickle.Pickler):
    """Pickles cases, sending each large tensor to the store instead of into the bytes."""

    def __init__(self, file: IO[bytes], store: dict[str, Tensor]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.store = store

    def persistent_id(self, obj: Any) -> str | None:
        if type(obj) is not Tensor and type(obj) is not torch.nn.Parameter:
            return None
        # by its storage's size: pickling a small view would copy all of a large storage
        if obj.untyped_storage().nbytes() < STORE_MIN_BYTES:
            return None
        key = tensor_key(obj)
        if key not in self.store:
            self.store[key] = obj.detach()  # torch.save writes each storage once
        return ("param" if isinstance(obj, torch.nn.Parameter) else "tensor") + ":" + key


def tensor_key(tensor: Tensor) -> str:
    """Names a tensor by where it lives, so that the same weights are stored once."""
    storage = tensor.untyped_storage().data_ptr()
    shape = "x".join(map(str, tensor.shape))
    stride = "x".join(map(str, tensor.stride()))
    return f"{storage:x}_{tensor.storage_offset()}_{shape}_{stride}_{str(tensor.dtype)[6:]}"


def pack_inputs(cases: list[Case], store: dict[str, Tensor]) -> bytes:
    """Pickle run-side cases; their large tensors are added to `store` (key -> tensor)."""
    buffer = io.BytesIO()
    _StorePickler(buffer, store).dump(run_side(cases))
    return buffer.getvalue()


class _StoreUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], store: dict[str, Tensor]):
        super().__init__(file)
        self.store = store

    def persistent_load(self, pid: str) -> Tensor:
        kind, key = pid.split(":", 1)
        tensor = self.store[key]
        return torch.nn.Parameter(tensor, requires_grad=True) if kind == "param" else tensor


def unpack_inputs(data: bytes, store: dict[str, Tensor]) -> list[Case]:
    """The runner's side of `pack_inputs` (the bytes come from the grader, never a learner)."""
    return _StoreUnpickler(io.BytesIO(data), store).load()


# --------------------------------------------------------------------------- outcomes


def encode_outcomes(check_id: str, outcomes: list[Outcome]) -> bytes:
    """Outcomes as JSON plus safetensors bytes: plain values only, whatever the learner returned."""
    tensors: dict[str, Tensor] = {}
    encoded = [
        {
            "output": _encode(o.output, tensors),
            "error": o.error if isinstance(o.error, str) else None,
            "not_implemented": bool(o.not_implemented),
            "modified_args": [int(i) for i in o.modified_args],
            "seconds": float(o.seconds),
            "probes": _encode(dict(o.probes), tensors),
        }
        for o in outcomes
    ]
    head = json.dumps({"check": check_id, "outcomes": encoded}).encode()
    return HEADER.pack(len(head)) + head + save_tensors(tensors)


def _encode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        return {"float": repr(value)}  # JSON has no inf or nan
    if isinstance(value, Tensor):
        key = str(len(tensors))
        # Only the numbers travel: a subclass, a view or a lazy tensor arrives plain.
        plain = torch.Tensor.detach(value).cpu().contiguous().clone()
        tensors[key] = torch.Tensor.as_subclass(plain, Tensor)
        return {"tensor": key}
    if type(value) in (tuple, list):
        return {type(value).__name__: [_encode(v, tensors) for v in value]}
    if type(value) is dict and all(type(k) is str for k in value):
        return {"dict": [[k, _encode(v, tensors)] for k, v in value.items()]}
    return {"foreign": type(value).__name__[:80]}


def decode_outcomes(data: bytes, check_id: str, n_cases: int) -> list[Outcome]:
    """The grader's side: validate everything, believe nothing else."""
    if len(data) < HEADER.size:
        raise ProtocolError("a result too short to hold anything")
    (head_length,) = HEADER.unpack(data[: HEADER.size])
    head_end = HEADER.size + head_length
    try:
        head = json.loads(data[HEADER.size : head_end])
        tensors = load_tensors(data[head_end:]) if len(data) > head_end else {}
    except Exception as error:  # malformed JSON or tensor bytes
        raise ProtocolError(f"an unreadable result ({type(error).__name__})") from error
    if not isinstance(head, dict) or head.get("check") != check_id:
        raise ProtocolError(f"a result for another check than {check_id}")
    raw = head.get("outcomes")
    if not isinstance(raw, list) or len(raw) > n_cases:
        raise ProtocolError("a result with more outcomes than the check has cases")
    return [_outcome(item, tensors) for item in raw]


def _outcome(item: Any, tensors: dict[str, Tensor]) -> Outcome:
    if not isinstance(item, dict):
        raise ProtocolError("an outcome that is not an object")
    error, modified, seconds = item.get("error"), item.get("modified_args"), item.get("seconds")
    if error is not None and not isinstance(error, str):
        raise ProtocolError("an error that is not text")
    if not isinstance(modified, list) or not all(type(i) is int for i in modified):
        raise ProtocolError("modified arguments that are not a list of numbers")
    if type(seconds) not in (int, float):
        raise ProtocolError("a time that is not a number")
    probes = _decode(item.get("probes", {"dict": []}), tensors, depth=0)
    if type(probes) is not dict:
        raise ProtocolError("probes that are not a dict")
    return Outcome(
        output=_decode(item.get("output"), tensors, depth=0),
        probes=probes,
        error=error[:4000] if error else None,
        not_implemented=item.get("not_implemented") is True,
        modified_args=modified[:64],
        seconds=float(seconds),
    )


def _decode(value: Any, tensors: dict[str, Tensor], depth: int) -> Any:
    if depth > 20:
        raise ProtocolError("an output nested too deeply")
    if value is None or type(value) in (bool, int, str):
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise ProtocolError("an output of unknown form")
    ((kind, inner),) = value.items()
    if kind == "float" and isinstance(inner, str):
        try:
            return float(inner)
        except ValueError as error:
            raise ProtocolError("a float that is not a number") from error
    if kind == "tensor" and isinstance(inner, str) and inner in tensors:
        return tensors[inner]
    if kind in ("tuple", "list") and isinstance(inner, list):
        items = [_decode(v, tensors, depth + 1) for v in inner]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(inner, list):
        if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in inner):
            raise ProtocolError("a dict output of unknown form")
        return {k: _decode(v, tensors, depth + 1) for k, v in inner}
    if kind == "foreign" and isinstance(inner, str):
        return foreign(inner)
    raise ProtocolError("an output of unknown form")


def foreign(type_name: str) -> Any:
    """A stand-in for a value the runner could not send, named like the learner's type.

    The judge's messages say "returned <type name>, expected ...", as in a notebook.
    """
    name = "".join(ch for ch in type_name if ch.isidentifier() or ch.isdigit()) or "object"
    if not name[0].isidentifier():
        name = "_" + name
    return type(name, (), {"__repr__": lambda self: f"<{name}>"})()
