"""The runner: the only process that runs a learner's code. It never holds an answer.

Started by the grader (`python -m gpt2_course.grading.runner EXERCISES STORE FD`),
inside a sandbox where the machine has one, it imports the learner's exercise
files and runs the *run* phase of one check at a time: it reads the check's
inputs from the grader, calls the learner's code on them under the check's
shortcut policy, and writes back what came out (`protocol.encode_outcomes`).
It gets no expected value, no check object of the grader's, no case that has
not yet been sent, and it cannot build the reference: the functions that
would are replaced by ones that refuse, and the sandbox hides TransformerLens.

Messages in (stdin): `{"check": id}` then the check's packed inputs.
Messages out (the results pipe): b"E" + an event (JSON), or b"R" + a result.
"""

import gc
import json
import os
import sys
from pathlib import Path

PACKAGE = "submission"  # the learner's exercises are imported as this package


def _refuse(*_args, **_kwargs):
    raise RuntimeError("the grading runner holds no expected values and cannot build the reference")


def _seal() -> None:
    """Take from this process every way the course has to compute an answer."""
    import gpt2_course.reference
    from gpt2_course import parts
    from gpt2_course.checks import registry

    for name, module in list(sys.modules.items()):
        if name.startswith("gpt2_course") and hasattr(module, "get_reference"):
            module.get_reference = _refuse
    gpt2_course.reference._boot_bridge = _refuse
    gpt2_course.reference.random_gpt2 = _refuse
    gpt2_course.reference.load_pretrained_gpt2 = _refuse
    for check in registry.CHECKS.values():
        check.make_cases = _refuse
        check.mistakes = []

    def use_solution(name: str) -> None:
        raise RuntimeError("parts.use_solution is not available while grading: write the part")

    parts.use_solution = use_solution


def main(exercises: str, store_path: str, results_fd: str) -> int:
    # Results go back on a pipe of their own; stdout and stderr, which learner code
    # prints to, are captured (and capped) by the grader and never read as results.
    results = os.fdopen(int(results_fd), "wb", buffering=0)
    requests = os.fdopen(0, "rb", buffering=0)
    from gpt2_course.grading.sandbox import LIMITS_VARIABLE, limit_resources

    if os.environ.get(LIMITS_VARIABLE):
        limit_resources(os.environ.pop(LIMITS_VARIABLE))

    import torch

    from gpt2_course import parts
    from gpt2_course.checks import all_checks, load_implementation
    from gpt2_course.checks.core import Outcome, run_cases
    from gpt2_course.grading import protocol
    from gpt2_course.grading.submissions import load_submission_package
    from gpt2_course.policy import runtime_guard

    torch.set_num_threads(1)  # the grader runs several runners at once, one per core
    checks = all_checks()
    _seal()
    store = torch.load(store_path, mmap=True, weights_only=True) if store_path else {}
    folder = Path(exercises)
    load_submission_package(folder, PACKAGE)

    def send(kind: bytes, payload: bytes) -> None:
        protocol.write_message(results, kind + payload)

    with parts.using(PACKAGE):
        while True:
            request = protocol.read_message(requests)
            if request is None:
                return 0
            check_id = json.loads(request)["check"]
            data = protocol.read_message(requests)
            check = checks[check_id]
            cases = protocol.unpack_inputs(data, store)
            send(b"E", json.dumps({"event": "importing", "check": check_id}).encode())
            with runtime_guard(check_id, folder):
                try:
                    implementation = load_implementation(check, PACKAGE)
                except ImportError as error:
                    outcomes = [Outcome(error=str(error))]
                    failure = str(error)
                else:
                    failure = None
                    send(b"E", json.dumps({"event": "running", "check": check_id}).encode())
                    outcomes = run_cases(check.call, implementation, cases, catch_exits=True)
            payload = protocol.encode_outcomes(check_id, outcomes)
            send(b"R", json.dumps({"failure": failure}).encode() + b"\n" + payload)
            del cases, outcomes, payload
            _forget_built_modules(check)


def _forget_built_modules(check) -> None:
    """Free the modules a check's call built (GPT-2-sized ones hold hundreds of MB).

    The calls keep them in dicts captured by their closures, for reuse across one
    check's cases; in a runner the next check never reuses them.
    """
    for cell in check.call.__closure__ or ():
        contents = cell.cell_contents
        if isinstance(contents, dict):
            contents.clear()
    gc.collect()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
