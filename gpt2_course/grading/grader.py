"""The judge's side of grading: one reference per run, runners per submission, verdicts.

`Grader` builds every check's cases (inputs and expected values, from the
reference) once, and packs the run-side inputs once. For each submission it
starts a runner (`runner.py`) on a private copy of the learner's files, feeds it
one check's inputs at a time, reads back outcomes as plain data, and judges
them here, in a process that never imports learner code. A check that hangs
costs that check: the runner's process group is killed and a fresh runner goes
on with the next check, so what passed before keeps its marks.
"""

import collections
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt2_course.checks import all_checks
from gpt2_course.checks.core import Outcome, Verdict
from gpt2_course.checks.registry import Check
from gpt2_course.grading import protocol, sandbox
from gpt2_course.grading.reports import CheckGrade, Grade, scrub
from gpt2_course.grading.submissions import (
    SubmissionError,
    copy_exercises,
    extract_zip,
    find_exercises,
)
from gpt2_course.policy import scan_submission

DEFAULT_CHECK_TIMEOUT = 120.0  # seconds for one check's run phase (plus the runner's start)
RUNNER_START_SECONDS = 60.0  # importing torch and the course in a fresh runner
OUTPUT_CAP = 64 * 1024  # bytes of a runner's stdout/stderr kept for the report


@dataclass
class Settings:
    check_timeout: float = DEFAULT_CHECK_TIMEOUT
    isolation: str = "auto"  # "auto", "bubblewrap" or "none"
    limits: sandbox.Limits = field(default_factory=sandbox.Limits)
    scan: bool = True  # the source scan; off only in tests that prove the rest holds alone


class Grader:
    """Grades submissions against one reference, built once."""

    def __init__(self, settings: Settings | None = None, check_ids: Iterable[str] | None = None):
        self.settings = settings or Settings()
        self.level = sandbox.available(self.settings.isolation)
        everything = all_checks()
        self.checks: dict[str, Check] = {cid: everything[cid] for cid in (check_ids or everything)}
        self._judging = threading.Lock()  # checks keep caches: judge one at a time
        self._tmp = Path(tempfile.mkdtemp(prefix="gpt2-course-grade-"))
        self._tmp.chmod(0o711)
        self.ungraded: set[str] = set()  # labels of submissions that could not be graded
        self.inputs: dict[str, bytes] = {}
        self.setup_errors: dict[str, str] = {}
        store: dict[str, torch.Tensor] = {}
        for cid, check in self.checks.items():
            try:
                self.inputs[cid] = protocol.pack_inputs(check.cases, store)
            except Exception as error:  # the course's fault, never the learner's
                self.setup_errors[cid] = (
                    "the check could not prepare its inputs (a problem in the course, "
                    f"not in your code; please report it): {type(error).__name__}: {error}"
                )
        self.store_path: Path | None = None
        if store:
            self.store_path = self._tmp / "store.pt"
            torch.save(store, self.store_path)
            self.store_path.chmod(0o644)
        del store

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def max_score(self) -> float:
        return sum(c.points for c in self.checks.values())

    # ------------------------------------------------------------------ one submission

    def grade(self, path: str, label: str | None = None) -> Grade:
        """Grade one submission (a folder or a .zip); never raises for a bad submission."""
        label = label or path
        work = Path(tempfile.mkdtemp(prefix="sub-", dir=self._tmp))
        work.chmod(0o711)  # a runner reaches its own copy; no one can list the others
        try:
            try:
                exercises = copy_exercises(
                    find_exercises(self._unpack(Path(path), work)), work / "exercises"
                )
            except SubmissionError as error:
                self.ungraded.add(label)
                return self.failed(label, str(error))
            for item in [work / "exercises", *(work / "exercises").iterdir()]:
                item.chmod(0o755 if item.is_dir() else 0o644)
            return self._grade_exercises(exercises, label, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _unpack(self, source: Path, work: Path) -> Path:
        if source.suffix.lower() == ".zip":
            if not source.is_file():
                raise SubmissionError(f"{source.name} does not exist")
            return extract_zip(source, work / "unzipped")
        if not source.exists():
            raise SubmissionError(f"{source} does not exist")
        return source

    def failed(self, label: str, reason: str) -> Grade:
        """Zero marks on every check, each saying why."""
        checks = [CheckGrade(cid, False, 0.0, c.points, reason) for cid, c in self.checks.items()]
        return Grade(label, 0.0, self.max_score, checks, self.level)

    def _grade_exercises(self, exercises: Path, label: str, work: Path) -> Grade:
        secrets = {
            str(exercises): "<submission>",
            f"{work.name}/exercises": "<submission>",
            sandbox.SUBMISSION_MOUNT: "<submission>",
            str(self._tmp): "<grader>",
        }
        grades: dict[str, CheckGrade] = {}
        to_run = []
        for cid, check in self.checks.items():
            scanned = scan_submission(exercises, cid) if self.settings.scan else []
            refused = [v.message for v in scanned]
            if cid in self.setup_errors:
                grades[cid] = CheckGrade(cid, False, 0.0, check.points, self.setup_errors[cid])
            elif refused:
                grades[cid] = CheckGrade(cid, False, 0.0, check.points, "\n".join(refused))
            else:
                to_run.append(cid)
        for cid, outcome in self._run(exercises, to_run, work):
            check = self.checks[cid]
            if isinstance(outcome, str):
                verdict = Verdict(False, outcome)
            else:
                with self._judging:
                    verdict = _judge(check, outcome)
            points = check.points if verdict.passed else 0.0
            feedback = scrub(verdict.feedback, secrets)
            grades[cid] = CheckGrade(cid, verdict.passed, points, check.points, feedback)
        ordered = [grades[cid] for cid in self.checks]
        return Grade(label, sum(g.points for g in ordered), self.max_score, ordered, self.level)

    # ------------------------------------------------------------------ the runners

    def _run(
        self, exercises: Path, check_ids: list[str], work: Path
    ) -> Iterator[tuple[str, list[Outcome] | str]]:
        """Each check's outcomes, or why there are none; a fresh runner after every loss."""
        pending = collections.deque(check_ids)
        broken_modules: dict[str, str] = {}
        while pending:
            runner = _Runner(self, exercises, work)
            try:
                while pending:
                    cid = pending[0]
                    module = cid.split(".")[0]
                    if module in broken_modules:
                        pending.popleft()
                        yield cid, broken_modules[module]
                        continue
                    result = runner.run(cid, self.inputs[cid])
                    pending.popleft()
                    if isinstance(result, _Lost):
                        if result.while_importing:
                            broken_modules[module] = result.message
                        yield cid, result.message
                        break  # this runner is gone: a fresh one for the next check
                    yield cid, result
            finally:
                runner.stop()


def _judge(check: Check, outcomes: list[Outcome] | tuple) -> Verdict:
    if isinstance(outcomes, tuple):  # the learner's module could not be imported
        return Verdict(False, outcomes[0])
    try:
        return check.judge(outcomes)
    except Exception as error:  # a malformed outcome the judge could not read
        return Verdict(False, f"the grader could not judge your output ({type(error).__name__})")


@dataclass
class _Lost:
    message: str
    while_importing: bool = False


class _Runner:
    """One runner process and its pipes."""

    def __init__(self, grader: Grader, exercises: Path, work: Path):
        self.grader = grader
        self.timeout = grader.settings.check_timeout
        self.output: collections.deque[bytes] = collections.deque()
        self._output_size = 0
        home = work / "home"
        home.mkdir(exist_ok=True)
        if grader.level == sandbox.PROCESS_NOBODY:
            os.chown(home, sandbox.NOBODY, sandbox.NOBODY)
        read_results, write_results = os.pipe()
        nobody = sandbox.NOBODY if grader.level == sandbox.PROCESS_NOBODY else None
        # the runner sets its own limits before it imports any learner code (a
        # preexec_fn is not safe in a grader that starts runners from several threads)
        limits = grader.settings.limits.to_json(processes=nobody is not None)
        command = sandbox.runner_command(
            grader.level, exercises, grader.store_path, write_results, limits
        )
        env = sandbox.runner_environment(str(home)) | {sandbox.LIMITS_VARIABLE: limits}
        read_requests, self.requests = os.pipe()
        self.process = subprocess.Popen(
            command,
            stdin=read_requests,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=home,
            env=env,
            start_new_session=True,  # its own process group, killed as a whole
            pass_fds=(write_results,),
            close_fds=True,
            user=nobody,
            group=nobody,
            extra_groups=[] if nobody is not None else None,
        )
        os.close(write_results)
        os.close(read_requests)
        self.results = read_results
        os.set_blocking(self.requests, False)
        self.started = time.monotonic()
        self.first = True
        self._drain = threading.Thread(target=self._keep_output, daemon=True)
        self._drain.start()

    def _keep_output(self) -> None:
        for chunk in iter(lambda: self.process.stdout.read(4096), b""):
            self.output.append(chunk)
            self._output_size += len(chunk)
            while self._output_size > OUTPUT_CAP and len(self.output) > 1:
                self._output_size -= len(self.output.popleft())

    def run(self, check_id: str, inputs: bytes) -> tuple | list[Outcome] | _Lost:
        allowed = self.timeout + (RUNNER_START_SECONDS if self.first else 0.0)
        self.first = False
        deadline = time.monotonic() + allowed
        stage = "importing"
        try:
            for payload in (json.dumps({"check": check_id}).encode(), inputs):
                self._send(protocol.frame(payload), deadline)
            while True:
                message = self._receive(deadline)
                if message is None:
                    return self._lost(check_id, stage == "importing")
                kind, body = message[:1], message[1:]
                if kind == b"E":
                    stage = _event(body, check_id) or stage
                    continue
                return self._result(check_id, kind, body)
        except TimeoutError:
            self.stop()
            where = _where(check_id, stage == "importing")
            return _Lost(
                f"stopped after {self.timeout:g} s {where}: the code hangs or is far too slow",
                stage == "importing",
            )
        except BrokenPipeError:
            return self._lost(check_id, stage == "importing")
        except protocol.ProtocolError as error:
            self.stop()
            return _Lost(f"the grader could not read your code's result: {error}")

    def _send(self, data: bytes, deadline: float) -> None:
        """Write all of `data` to the runner, or raise TimeoutError at `deadline`."""
        view = memoryview(data)
        while view:
            _wait(self.requests, deadline, write=True)
            try:
                written = os.write(self.requests, view[: 1 << 16])
            except BlockingIOError:
                continue
            view = view[written:]

    def _receive(self, deadline: float) -> bytes | None:
        """The runner's next message; None if it closed the pipe; TimeoutError at `deadline`."""
        header = self._read(protocol.HEADER.size, deadline, at_start=True)
        if header is None:
            return None
        (length,) = protocol.HEADER.unpack(header)
        if length > protocol.MAX_MESSAGE:
            raise protocol.ProtocolError(f"a message of {length} bytes")
        body = self._read(length, deadline, at_start=False)
        return body

    def _read(self, n: int, deadline: float, at_start: bool) -> bytes | None:
        chunks, have = [], 0
        while have < n:
            _wait(self.results, deadline, write=False)
            chunk = os.read(self.results, min(n - have, 1 << 20))
            if not chunk:
                if have == 0 and at_start:
                    return None
                raise protocol.ProtocolError("the result ended half-way")
            chunks.append(chunk)
            have += len(chunk)
        return b"".join(chunks)

    def _result(self, check_id: str, kind: bytes, body: bytes) -> tuple | list[Outcome] | _Lost:
        if kind != b"R" or b"\n" not in body:
            self.stop()
            return _Lost("the grader could not read your code's result")
        head, payload = body.split(b"\n", 1)
        try:
            failure = json.loads(head).get("failure")
            n_cases = len(self.grader.checks[check_id].cases)
            outcomes = protocol.decode_outcomes(payload, check_id, n_cases)
        except (protocol.ProtocolError, ValueError, AttributeError) as error:
            self.stop()
            return _Lost(f"the grader could not read your code's result: {error}")
        if isinstance(failure, str):
            return (failure[:4000],)
        return outcomes

    def _lost(self, check_id: str, importing: bool) -> _Lost:
        self.stop()  # it closed its end: make sure nothing of it goes on
        code = self.process.returncode
        how = f"was killed by signal {-code}" if code and code < 0 else f"exited with code {code}"
        if code == -signal.SIGXCPU:
            how = "ran out of CPU time"
        where = _where(check_id, importing)
        tail = b"".join(self.output).decode(errors="replace").strip().splitlines()[-3:]
        said = f" Its last output: {' | '.join(tail)[-500:]}" if tail else ""
        return _Lost(f"the process running your code {how} {where}.{said}", importing)

    def stop(self) -> None:
        """Kill the runner's whole process group (whatever it started) and close the pipes."""
        if self.requests == -1:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        for fd in (self.requests, self.results):
            os.close(fd)
        self.requests = self.results = -1


def _where(check_id: str, importing: bool) -> str:
    return f"while importing {check_id.split('.')[0]}.py" if importing else f"in `{check_id}`"


def _wait(fd: int, deadline: float, write: bool) -> None:
    """Wait until `fd` is ready, or raise TimeoutError at `deadline`."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    if not poller.poll(remaining * 1000):
        raise TimeoutError


def _event(body: bytes, check_id: str) -> str | None:
    try:
        event = json.loads(body)
    except ValueError:
        return None
    if isinstance(event, dict) and event.get("check") == check_id:
        return {"importing": "importing", "running": "running"}.get(event.get("event"))
    return None


def grade_all(
    grader: Grader,
    submissions: list[str],
    jobs: int,
    on_result: Callable[[Grade], None] | None = None,
) -> list[Grade]:
    """Grade every submission, `jobs` at a time; `on_result` hears each as it finishes."""
    lock = threading.Lock()

    def one(path: str) -> Grade:
        try:
            grade = grader.grade(path)
        except Exception as error:  # the grader's own failure costs this submission only
            grader.ungraded.add(path)
            grade = grader.failed(path, f"the grader failed on this submission: {error!r}")
        if on_result:
            with lock:
                on_result(grade)
        return grade

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, submissions))
