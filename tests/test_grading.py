"""`gpt2-course grade` on a class: full marks for the solutions, zero for the stubs, and a
class of hostile submissions (tests/adversarial/) that earn nothing they did not compute,
without costing anyone else a mark."""

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from gpt2_course import cli
from gpt2_course.checks import all_checks
from gpt2_course.grading import sandbox
from gpt2_course.grading.grader import Grader, Settings, grade_all

ROOT = Path(__file__).resolve().parents[1]
ADVERSARIAL = Path(__file__).parent / "adversarial"
HOSTILE = sorted(p.name for p in ADVERSARIAL.iterdir() if (p / "expect.json").is_file())
# The model's checks (notebook 01's BPE aside), from the embeddings on.
MODEL_CHECKS = [check_id for check_id in all_checks() if not check_id.startswith("bpe.")]
# The model's components, through the whole model (the single head that teaches attention
# aside): enough for every kind of attack, and a hang in the eleventh after ten passes.
FIRST_ELEVEN = [c for c in MODEL_CHECKS if c != "attention.single_head_attention"]
FIRST_ELEVEN = FIRST_ELEVEN[: FIRST_ELEVEN.index("transformer.load_gpt2_weights") + 1]
assert len(FIRST_ELEVEN) == 11, FIRST_ELEVEN
SLOW = 60.0  # seconds per check: a hostile loop costs this much


def exercise_copy(base: str, into: Path) -> Path:
    source = ROOT / ("solutions" if base == "solutions" else "gpt2_course/exercises")
    into.mkdir(parents=True)
    for path in source.glob("*.py"):
        if path.name != "__init__.py":
            shutil.copy(path, into)
    return into


@pytest.fixture(scope="module")
def grader():
    settings = Settings(check_timeout=SLOW, limits=sandbox.Limits(memory_bytes=8 << 30))
    with Grader(settings, FIRST_ELEVEN) as grader:
        yield grader


@pytest.fixture(scope="module")
def hostile_class(grader, tmp_path_factory):
    """Every hostile submission and an honest one, graded together as one class."""
    tmp = tmp_path_factory.mktemp("class")
    control = exercise_copy("solutions", tmp / "control")
    cache = tmp / "cache"
    cache.mkdir()
    paths = {}
    for name in HOSTILE:
        expect = json.loads((ADVERSARIAL / name / "expect.json").read_text())
        folder = exercise_copy(expect["base"], tmp / name)
        if "edit" in expect:  # one line changed in the base's own file
            old, new = expect["edit"]
            text = (folder / expect["file"]).read_text()
            assert old in text, f"{name}: the edit no longer applies"
            text = text.replace(old, new)
        else:
            text = (ADVERSARIAL / name / expect["file"]).read_text()
        text = text.replace("{{CONTROL}}", str(control)).replace("{{CACHE}}", str(cache))
        text = text.replace("{{COURSE}}", str(ROOT / "gpt2_course"))
        (folder / expect["file"]).write_text(text)
        paths[name] = folder
    before = {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()}
    grades = grade_all(grader, [str(control), *map(str, paths.values())], jobs=2)
    by_name = {Path(g.submission).name: g for g in grades}
    return by_name, before, tmp


@pytest.mark.slow
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_submission_earns_only_what_it_computed(hostile_class, name):
    grades, _, _ = hostile_class
    expect = json.loads((ADVERSARIAL / name / "expect.json").read_text())
    grade = grades[name]
    check = {c.id: c for c in grade.checks}[expect["check"]]
    if expect["score"] == grade.max_score:  # an attack on others: its own code is right
        assert check.passed, check.feedback
    else:
        assert not check.passed and check.points == 0
        assert expect["feedback"].lower() in check.feedback.lower(), check.feedback
    failed = [(c.id, c.feedback) for c in grade.checks if not c.passed]
    assert grade.score == expect["score"], failed
    assert "/tmp/" not in check.feedback and "gpt2_course_submission" not in check.feedback


@pytest.mark.slow
def test_the_class_around_them_is_unharmed(hostile_class, grader):
    grades, before, tmp = hostile_class
    assert grades["control"].score == grader.max_score == len(FIRST_ELEVEN)
    after = {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()}
    assert after == before  # no submission, nor the fake cache, was written
    assert not (ROOT / "gpt2_course" / "hostile.pt").exists()


@pytest.mark.slow
def test_the_report_names_its_isolation(hostile_class, grader):
    grades, _, _ = hostile_class
    assert {g.isolation for g in grades.values()} == {grader.level}
    assert grader.level in (sandbox.BUBBLEWRAP, sandbox.PROCESS)


@pytest.mark.slow
def test_solutions_full_marks_stubs_zero_through_the_cli(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "grades.json"
    code = cli.main(
        ["grade", "solutions", "gpt2_course/exercises", "--format", "json", "-o", str(out)]
    )
    assert code == 0
    solutions, stubs = json.loads(out.read_text())
    checks = all_checks()
    total = sum(c.points for c in checks.values())
    assert {"submission", "score", "max_score", "checks"} <= set(solutions)
    assert solutions["submission"] == "solutions"
    assert solutions["score"] == solutions["max_score"] == total, [
        (c["id"], c["feedback"]) for c in solutions["checks"] if not c["passed"]
    ]
    assert [c["id"] for c in solutions["checks"]] == list(checks)
    assert set(solutions["checks"][0]) == {"id", "passed", "points", "max_points", "feedback"}
    assert stubs["score"] == 0 and stubs["max_score"] == total
    assert all("not implemented" in c["feedback"] for c in stubs["checks"])


@pytest.mark.slow
def test_zip_of_a_checkout(grader, tmp_path):
    checkout = tmp_path / "alice-gpt2-course"
    exercise_copy("stubs", checkout / "gpt2_course" / "exercises")
    shutil.copy(ROOT / "solutions" / "layernorm.py", checkout / "gpt2_course" / "exercises")
    archive = tmp_path / "alice.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in checkout.rglob("*.py"):
            z.write(path, path.relative_to(tmp_path))
    grade = grader.grade(str(archive))
    passed = [c.id for c in grade.checks if c.passed]
    assert passed == ["layernorm.LayerNorm"]


def test_bad_submissions_are_graded_zero_and_say_why(grader, tmp_path):
    fake = tmp_path / "fake.zip"
    fake.write_text("this is not a zip")
    assert "zip" in grader.grade(str(fake)).checks[0].feedback
    assert "does not exist" in grader.grade(str(tmp_path / "nope")).checks[0].feedback
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no exercise files" in grader.grade(str(empty)).checks[0].feedback
    assert {str(fake), str(tmp_path / "nope"), str(empty)} <= grader.ungraded


def test_exit_codes_and_usage(tmp_path, capsys):
    assert cli.main(["grade", "--merge", str(tmp_path / "missing.json")]) == 1
    with pytest.raises(SystemExit) as stop:
        cli.main(["grade", "--format", "xml", "x"])
    assert stop.value.code == 2
    assert cli.main(["grade", "x", "--shard", "3/2"]) == 2


def test_shards_cover_the_class_once():
    from gpt2_course.grading.command import shard_of

    items = [f"s{i}" for i in range(11)]
    parts = [shard_of(items, f"{i}/4") for i in range(1, 5)]
    assert sorted(sum(parts, [])) == sorted(items)
    with pytest.raises(ValueError):
        shard_of(items, "0/4")


@pytest.mark.slow
def test_without_a_sandbox_grading_still_holds(tmp_path):
    """The bare-process level: the same scores, and a hang still costs one check only."""
    checks = MODEL_CHECKS[:4]  # embeddings and LayerNorm
    honest = exercise_copy("solutions", tmp_path / "honest")
    looping = exercise_copy("solutions", tmp_path / "looping")
    shutil.copy(ADVERSARIAL / "infinite_loop" / "layernorm.py", looping)
    with Grader(Settings(check_timeout=20, isolation="none"), checks) as grader:
        assert grader.level in (sandbox.PROCESS, sandbox.PROCESS_NOBODY)
        first, second = grade_all(grader, [str(honest), str(looping)], jobs=2)
    assert first.score == 4 and second.score == 3
    assert "stopped after 20 s in `layernorm.LayerNorm`" in second.checks[3].feedback
    assert first.isolation == grader.level


@pytest.mark.slow
def test_without_the_source_scan_the_runner_still_holds_no_answer(tmp_path):
    """Attacks the scan would refuse, graded with the scan off: patching the judge in the
    runner changes nothing (the judge is elsewhere), and the reference cannot be built."""
    checks = MODEL_CHECKS[:4]
    paths = []
    for name in ("patch_judge_unscanned", "reference_activations", "imports_solutions"):
        folder = exercise_copy("solutions", tmp_path / name)
        shutil.copy(ADVERSARIAL / name / "layernorm.py", folder)
        paths.append(str(folder))
    with Grader(Settings(check_timeout=60, scan=False), checks) as grader:
        grades = grade_all(grader, paths, jobs=2)
    for grade in grades:
        layernorm = grade.checks[3]
        assert layernorm.id == "layernorm.LayerNorm" and not layernorm.passed, grade.submission
        assert grade.score == 3, [(c.id, c.feedback) for c in grade.checks]


def test_a_zip_bomb_costs_its_sender_only(grader, tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("layernorm.py", b"\n" * (80 << 20))
    grade = grader.grade(str(bomb))
    assert grade.score == 0 and "MiB" in grade.checks[0].feedback
    assert str(bomb) in grader.ungraded
